//! The engine end to end over an in-memory link that drops, duplicates, reorders and
//! corrupts datagrams, on a virtual clock: delivery must still be exact and in order.

use super::endpoint::{ACK_DELAY, LINGER, admission};
use super::mux::{ReadOutcome, StreamError};
use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CLIENT: &str = "198.18.0.1:40000";
const SERVER: &str = "198.18.0.2:4000";

#[derive(Clone, Copy, Default)]
struct Impairment {
    drop: f64,
    duplicate: f64,
    corrupt: f64,
    /// Extra random delay (ms) on top of the base, which reorders packets.
    jitter_ms: u64,
}

struct InFlight {
    at: Instant,
    to_server: bool,
    from: SocketAddr,
    bytes: Vec<u8>,
}

struct Sim {
    t0: Instant,
    now: Instant,
    client: Engine,
    server: Engine,
    link: Vec<InFlight>,
    rng: StdRng,
    impair: Impairment,
    client_events: Vec<Event>,
    server_events: Vec<Event>,
    /// Datagrams each side sent: [client, server].
    datagrams_sent: [usize; 2],
}

fn psk() -> Psk {
    Psk([0x42; 32])
}

impl Sim {
    fn new(impair: Impairment, seed: u8) -> Sim {
        Sim::with_keys(impair, seed, psk(), psk())
    }

    fn with_keys(impair: Impairment, seed: u8, client_key: Psk, server_key: Psk) -> Sim {
        let t0 = Instant::now();
        let client_cfg = EngineConfig::new(
            Role::Client {
                server: SERVER.parse().unwrap(),
            },
            client_key,
            [seed; 32],
        );
        let server_cfg = EngineConfig::new(Role::Server, server_key, [seed.wrapping_add(1); 32]);
        Sim {
            t0,
            now: t0,
            client: Engine::new(client_cfg, t0),
            server: Engine::new(server_cfg, t0),
            link: Vec::new(),
            rng: StdRng::from_seed([seed; 32]),
            impair,
            client_events: Vec::new(),
            server_events: Vec::new(),
            datagrams_sent: [0, 0],
        }
    }

    fn clock(&self) -> Now {
        Now {
            instant: self.now,
            unix_ms: 1_800_000_000_000 + (self.now - self.t0).as_millis() as u64,
        }
    }

    /// Moves the engines' output onto the link, impaired.
    fn collect(&mut self) {
        let mut out = Vec::new();
        self.client.drain_transmits(&mut out);
        let from_client = out.len();
        self.server.drain_transmits(&mut out);
        self.datagrams_sent[0] += from_client;
        self.datagrams_sent[1] += out.len() - from_client;
        for (i, t) in out.into_iter().enumerate() {
            let to_server = i < from_client;
            let from = if to_server {
                CLIENT.parse().unwrap()
            } else {
                SERVER.parse().unwrap()
            };
            self.send_impaired(to_server, from, t.payload);
        }
        self.client.drain_events(&mut self.client_events);
        self.server.drain_events(&mut self.server_events);
    }

    fn send_impaired(&mut self, to_server: bool, from: SocketAddr, mut bytes: Vec<u8>) {
        let copies = if self.rng.random_bool(self.impair.drop) {
            0
        } else if self.rng.random_bool(self.impair.duplicate) {
            2
        } else {
            1
        };
        if self.rng.random_bool(self.impair.corrupt) && !bytes.is_empty() {
            let i = self.rng.random_range(0..bytes.len());
            bytes[i] ^= 1 << self.rng.random_range(0..8);
        }
        for _ in 0..copies {
            let jitter = if self.impair.jitter_ms > 0 {
                self.rng.random_range(0..self.impair.jitter_ms)
            } else {
                0
            };
            let at = self.now + Duration::from_millis(1 + jitter);
            self.link.push(InFlight {
                at,
                to_server,
                from,
                bytes: bytes.clone(),
            });
        }
    }

    /// Advances to the next delivery or timer and processes it.
    fn step(&mut self) {
        let next_packet = self.link.iter().map(|p| p.at).min();
        let next_timer = self.client.poll_timeout().min(self.server.poll_timeout());
        let next = next_packet.map_or(next_timer, |p| p.min(next_timer));
        self.now = self.now.max(next);
        let now = self.clock();
        let due: Vec<InFlight> = {
            let (due, later): (Vec<_>, Vec<_>) = self.link.drain(..).partition(|p| p.at <= self.now);
            self.link = later;
            due
        };
        for mut p in due {
            let engine = if p.to_server {
                &mut self.server
            } else {
                &mut self.client
            };
            let _ = engine.handle_datagram(now, PathId(0), p.from, &mut p.bytes);
        }
        if self.client.poll_timeout() <= self.now {
            self.client.handle_timeout(now);
        }
        if self.server.poll_timeout() <= self.now {
            self.server.handle_timeout(now);
        }
        self.collect();
    }

    /// Runs until nothing is on the link and the client holds back no ACKs.
    fn settle(&mut self) {
        let settled = self.run_until(10_000, |sim| sim.link.is_empty() && !sim.client.acks_delayed());
        assert!(settled);
    }

    fn run_until(&mut self, max_steps: usize, mut done: impl FnMut(&mut Sim) -> bool) -> bool {
        for _ in 0..max_steps {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }

    /// Opens a stream from the client and accepts it at the server.
    fn open(&mut self, target: &str) -> (StreamId, StreamId) {
        let now = self.clock();
        let target = TargetAddr::Domain(target.into(), 80);
        let cid = self.client.open_stream(now, &target).unwrap();
        self.collect();
        let mut sid = None;
        let ok = self.run_until(20_000, |sim| {
            if sid.is_none()
                && let Some(pos) = sim
                    .server_events
                    .iter()
                    .position(|e| matches!(e, Event::StreamOpened { .. }))
                && let Event::StreamOpened { id, target: t } = sim.server_events.remove(pos)
            {
                assert_eq!(t, target);
                sim.server.accept_stream(id).unwrap();
                sid = Some(id);
                sim.collect();
            }
            sim.client_events
                .iter()
                .any(|e| matches!(e, Event::StreamReplied { id, result: Ok(()) } if *id == cid))
        });
        assert!(ok, "stream never opened");
        (cid, sid.unwrap())
    }
}

/// Pumps `data` from one side's stream to the other's, then FIN; returns what arrived.
fn transfer(sim: &mut Sim, from_client: bool, writer: StreamId, reader: StreamId, data: &[u8]) -> Vec<u8> {
    let mut written = 0;
    let mut finished = false;
    let mut got = Vec::new();
    let mut fin = false;
    // The smallest buffer one way (one message per read), a larger one the other way
    // (several messages gathered per read).
    let buffers = if from_client { 1 } else { 5 };
    let mut buf = vec![0u8; sim.client.read_buffer_len() * buffers];
    let ok = sim.run_until(2_000_000, |sim| {
        let now = sim.clock();
        let (w, r) = if from_client {
            (&mut sim.client, &mut sim.server)
        } else {
            (&mut sim.server, &mut sim.client)
        };
        if written < data.len() {
            let n = w
                .stream_write(now, writer, &data[written..(written + 64 * 1024).min(data.len())])
                .unwrap();
            written += n;
        } else if !finished {
            w.stream_finish(writer).unwrap();
            finished = true;
        }
        loop {
            match r.stream_read(reader, &mut buf) {
                Ok(ReadOutcome::Data(range)) => got.extend_from_slice(&buf[range]),
                Ok(ReadOutcome::Fin) => {
                    fin = true;
                    break;
                }
                Ok(ReadOutcome::WouldBlock) => break,
                Err(e) => panic!("read failed: {e}"),
            }
        }
        sim.collect();
        fin
    });
    assert!(ok, "transfer did not finish: {} of {} bytes", got.len(), data.len());
    got
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

fn both_ways(impair: Impairment, seed: u8, len: usize) {
    let mut sim = Sim::new(impair, seed);
    let (cid, sid) = sim.open("origin.test");
    let up = pattern(len, 1);
    assert_eq!(transfer(&mut sim, true, cid, sid, &up), up);
    let down = pattern(len * 2, 2);
    assert_eq!(transfer(&mut sim, false, sid, cid, &down), down);
    // Both FINs are through: both sides report the stream closed.
    let closed = sim.run_until(100_000, |sim| {
        sim.client_events.contains(&Event::StreamClosed(cid)) && sim.server_events.contains(&Event::StreamClosed(sid))
    });
    assert!(closed, "stream not closed on both sides");
}

#[test]
fn clean_link_delivers_exactly() {
    both_ways(Impairment::default(), 1, 300_000);
}

#[test]
fn lossy_duplicating_reordering_link_delivers_exactly() {
    let impair = Impairment {
        drop: 0.05,
        duplicate: 0.05,
        corrupt: 0.0,
        jitter_ms: 20,
    };
    both_ways(impair, 2, 200_000);
}

#[test]
fn corrupted_packets_are_dropped_not_delivered() {
    let impair = Impairment {
        drop: 0.02,
        duplicate: 0.02,
        corrupt: 0.05,
        jitter_ms: 5,
    };
    let mut sim = Sim::new(impair, 3);
    let (cid, sid) = sim.open("origin.test");
    let up = pattern(150_000, 3);
    assert_eq!(transfer(&mut sim, true, cid, sid, &up), up);
    let dropped = sim.server.counters().dropped_unauthentic + sim.client.counters().dropped_unauthentic;
    assert!(dropped > 0, "the corrupting link should have produced drops");
}

#[test]
fn many_streams_do_not_mix() {
    let impair = Impairment {
        drop: 0.02,
        duplicate: 0.01,
        corrupt: 0.0,
        jitter_ms: 10,
    };
    let mut sim = Sim::new(impair, 4);
    let pairs: Vec<_> = (0..8).map(|i| sim.open(&format!("host{i}.test"))).collect();
    for (i, (cid, sid)) in pairs.into_iter().enumerate() {
        let data = pattern(20_000 + i * 1000, i as u64);
        assert_eq!(transfer(&mut sim, true, cid, sid, &data), data);
    }
}

#[test]
fn wrong_key_gets_nothing_through() {
    let mut sim = Sim::with_keys(Impairment::default(), 5, Psk([1; 32]), Psk([2; 32]));
    let now = sim.clock();
    sim.client
        .open_stream(now, &TargetAddr::Domain("origin.test".into(), 80))
        .unwrap();
    sim.collect();
    sim.run_until(2_000, |_| false);
    assert!(sim.server_events.is_empty(), "{:?}", sim.server_events);
    assert!(!sim.client.is_connected());
    assert!(sim.server.counters().dropped_unauthentic > 0);
    assert_eq!(
        sim.server.counters().datagrams_out,
        0,
        "server must not answer a wrong key"
    );
}

#[test]
fn replayed_handshake_and_data_are_refused() {
    let mut sim = Sim::new(Impairment::default(), 6);
    let now = sim.clock();
    sim.client.connect(now);
    let mut first = Vec::new();
    sim.client.drain_transmits(&mut first);
    let hello = first.pop().unwrap().payload;
    let from: SocketAddr = CLIENT.parse().unwrap();
    sim.server
        .handle_datagram(now, PathId(0), from, &mut hello.clone())
        .unwrap();
    assert_eq!(
        sim.server.handle_datagram(now, PathId(0), from, &mut hello.clone()),
        Err(DropReason::StaleHandshake)
    );
    let mut answer = Vec::new();
    sim.server.drain_transmits(&mut answer);
    assert_eq!(answer.len(), 1, "exactly one response, for the original only");
    sim.client
        .handle_datagram(now, PathId(0), SERVER.parse().unwrap(), &mut answer[0].payload)
        .unwrap();
    assert!(sim.client.is_connected());

    let (cid, _sid) = sim.open("origin.test");
    let now = sim.clock();
    sim.client.stream_write(now, cid, b"secret").unwrap();
    let mut data = Vec::new();
    sim.client.drain_transmits(&mut data);
    let packet = data.pop().unwrap().payload;
    sim.server
        .handle_datagram(now, PathId(0), from, &mut packet.clone())
        .unwrap();
    assert_eq!(
        sim.server.handle_datagram(now, PathId(0), from, &mut packet.clone()),
        Err(DropReason::Replayed)
    );
}

#[test]
fn garbage_is_dropped_silently() {
    let mut sim = Sim::new(Impairment::default(), 7);
    let now = sim.clock();
    let from: SocketAddr = CLIENT.parse().unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for len in [0usize, 1, 11, 12, 13, 31, 32, 48, 64, 100, 1400, 2000] {
        let mut junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        assert!(sim.server.handle_datagram(now, PathId(0), from, &mut junk).is_err());
    }
    let mut out = Vec::new();
    sim.server.drain_transmits(&mut out);
    assert!(out.is_empty(), "garbage must get no reply");
    assert_eq!(sim.server.counters().dropped_unauthentic, 12);
}

#[test]
fn restarted_server_is_noticed_and_streams_reset() {
    let mut sim = Sim::new(Impairment::default(), 8);
    let (cid, _sid) = sim.open("origin.test");
    // The server restarts: a fresh engine that knows no session.
    let cfg = EngineConfig::new(Role::Server, psk(), [99; 32]);
    sim.server = Engine::new(cfg, sim.now);
    let handshakes_before = sim.server.counters().handshakes;
    let ok = sim.run_until(200_000, |sim| {
        sim.server.counters().handshakes > handshakes_before && sim.client.is_connected()
    });
    assert!(ok, "client never re-handshook");
    // Its old stream's segments are unknown to the new server, which resets it at once
    // (it used to adopt the conversation and let it stall until TIMEOUT).
    let reconnected = sim.now;
    let now = sim.clock();
    let _ = sim.client.stream_write(now, cid, b"after restart");
    sim.collect();
    let reset = sim.run_until(200_000, |sim| sim.client_events.contains(&Event::StreamClosed(cid)));
    assert!(reset, "stale stream was not reset");
    assert!(
        sim.now - reconnected < Duration::from_secs(2),
        "the reset took {:?} after the new session",
        sim.now - reconnected
    );
    assert_eq!(
        sim.server.live_streams(),
        0,
        "the new server adopted a stream it never saw open"
    );
    let elapsed = sim.now - sim.t0;
    assert!(
        elapsed < Duration::from_secs(60),
        "recovery took {elapsed:?} of virtual time"
    );
}

#[test]
fn refused_stream_reports_reason() {
    let mut sim = Sim::new(Impairment::default(), 9);
    let now = sim.clock();
    let cid = sim
        .client
        .open_stream(now, &TargetAddr::Ip("198.18.0.2:1".parse().unwrap()))
        .unwrap();
    sim.collect();
    let ok = sim.run_until(20_000, |sim| {
        if let Some(Event::StreamOpened { id, .. }) = sim.server_events.pop() {
            sim.server.refuse_stream(id, OpenError::ConnectionRefused).unwrap();
            sim.collect();
        }
        sim.client_events
            .iter()
            .any(|e| matches!(e, Event::StreamReplied { id, result: Err(OpenError::ConnectionRefused) } if *id == cid))
    });
    assert!(ok);
}

#[test]
fn fin_behind_data_waits_for_a_slow_reader() {
    let mut sim = Sim::new(Impairment::default(), 9);
    let (cid, sid) = sim.open("origin.test");
    let now = sim.clock();
    let data = pattern(3000, 9);
    assert_eq!(sim.server.stream_write(now, sid, &data).unwrap(), data.len());
    sim.server.stream_finish(sid).unwrap();
    sim.client.stream_finish(cid).unwrap();
    sim.collect();
    // Everything arrives and is acknowledged while the client's reader is away for
    // longer than the linger time.
    let away = sim.now + LINGER * 3;
    sim.run_until(100_000, |sim| sim.now >= away);
    let mut buf = vec![0u8; sim.client.read_buffer_len() * 5];
    let Ok(ReadOutcome::Data(range)) = sim.client.stream_read(cid, &mut buf) else {
        panic!("the data must be readable")
    };
    assert_eq!(&buf[range], &data[..]);
    sim.client.drain_events(&mut sim.client_events);
    assert!(
        !sim.client_events.contains(&Event::StreamClosed(cid)),
        "the stream closed before its FIN was read: {:?}",
        sim.client_events
    );
    // Time passes while the reader writes that data out; the stream must stay.
    let later = sim.now + LINGER * 3;
    sim.run_until(100_000, |sim| sim.now >= later);
    assert_eq!(sim.client.stream_read(cid, &mut buf), Ok(ReadOutcome::Fin));
}

#[test]
fn streams_together_queue_no_more_than_the_send_budget() {
    let mut sim = Sim::new(Impairment::default(), 10);
    let (_, first) = sim.open("first.test");
    let (_, second) = sim.open("second.test");
    // Both streams have windows far larger than the budget set now (as streams that
    // opened before many others came have), and nothing gets acknowledged for a while.
    let segments = 100;
    sim.server.config.window_budget = 2 * sim.server.mss() * segments;
    sim.impair.drop = 1.0;
    let now = sim.clock();
    let data = pattern(4 << 20, 10);
    let took_first = sim.server.stream_write(now, first, &data).unwrap();
    assert!(took_first > 0);
    let took_second = sim.server.stream_write(now, second, &data).unwrap();
    assert_eq!(took_second, 0, "the second stream queued past the shared budget");
    // Nor is its writer told to try again before the budget has room: it would spin.
    sim.server.drain_events(&mut sim.server_events);
    assert!(
        !sim.server_events.contains(&Event::Writable(second)),
        "{:?}",
        sim.server_events
    );
    let queued: usize = [first, second]
        .iter()
        .map(|id| sim.server.stream_mut(*id).unwrap().kcp.wait_snd())
        .sum();
    assert!(
        queued <= segments + 8,
        "{queued} segments queued for a budget of {segments}"
    );
    // Once the first stream's data is acknowledged (and counted at the next tick), the
    // second may write.
    sim.impair.drop = 0.0;
    let drained = sim.run_until(100_000, |sim| sim.server.stream_mut(first).unwrap().kcp.wait_snd() == 0);
    assert!(drained);
    let tick = sim.now + Duration::from_millis(50);
    sim.run_until(100_000, |sim| sim.now >= tick);
    let now = sim.clock();
    assert!(sim.server.stream_write(now, second, &data).unwrap() > 0);
}

#[test]
fn a_stream_queues_few_unsent_segments_and_a_reader_wakes_its_writer() {
    let mut sim = Sim::new(Impairment::default(), 11);
    let (cid, sid) = sim.open("bulk.test");
    // The client's reader is away: its window fills, the server's flight stops, and
    // what the writer adds waits unsent.
    let data = pattern(128 << 20, 11);
    let mut taken = 0;
    for _ in 0..100_000 {
        let now = sim.clock();
        let n = sim.server.stream_write(now, sid, &data[taken..]).unwrap();
        taken += n;
        if n == 0 && sim.link.is_empty() {
            break;
        }
        sim.step();
    }
    let unsent = sim.server.stream_mut(sid).unwrap().kcp.unsent();
    assert!(
        (mux::MAX_UNSENT_SEGMENTS..=mux::MAX_UNSENT_SEGMENTS + 8).contains(&unsent),
        "{unsent} segments wait unsent; the cap is {}",
        mux::MAX_UNSENT_SEGMENTS
    );
    assert!(
        taken < data.len() / 2,
        "the writer was never stopped: {taken} bytes taken"
    );
    // The reader comes back: the window it opens lets the flush take the queue, and the
    // writer is told.
    sim.server_events.clear();
    let mut buf = vec![0u8; sim.client.read_buffer_len() * 4];
    let woken = sim.run_until(100_000, |sim| {
        while let Ok(ReadOutcome::Data(_)) = sim.client.stream_read(cid, &mut buf) {}
        sim.server_events.contains(&Event::Writable(sid))
    });
    assert!(woken, "the writer was never woken");
    let now = sim.clock();
    assert!(sim.server.stream_write(now, sid, &data[taken..]).unwrap() > 0);
}

#[test]
fn a_few_owed_acks_go_out_after_the_ack_delay() {
    let mut sim = Sim::new(Impairment::default(), 13);
    let (_, sid) = sim.open("echo.test");
    sim.settle();
    let now = sim.clock();
    sim.server.stream_write(now, sid, b"one small reply").unwrap();
    sim.collect();
    // The reply arrives; the client owes one ACK and holds it back.
    let sent_before = sim.datagrams_sent[0];
    sim.step();
    let arrived = sim.now;
    assert_eq!(sim.datagrams_sent[0], sent_before, "a lone ACK went out at once");
    assert_eq!(sim.client.poll_timeout(), arrived + ACK_DELAY);
    // At the deadline it goes.
    let sent = sim.run_until(100, |sim| sim.datagrams_sent[0] > sent_before);
    assert!(sent);
    assert_eq!(sim.now, arrived + ACK_DELAY);
}

#[test]
fn a_writer_stopped_by_the_unsent_cap_is_woken_when_its_own_flush_makes_room() {
    let mut sim = Sim::new(Impairment::default(), 14);
    let (_, sid) = sim.open("write.test");
    let data = pattern(4 << 20, 14);
    let now = sim.clock();
    let taken = sim.server.stream_write(now, sid, &data).unwrap();
    assert!(taken < data.len(), "the cap did not stop the writer");
    // The window was empty: the flush put everything in flight, so the writer may go on.
    sim.collect();
    assert!(
        sim.server_events.contains(&Event::Writable(sid)),
        "{:?}",
        sim.server_events
    );
}

#[test]
fn acks_for_data_past_a_hole_go_out_at_once() {
    let mut sim = Sim::new(Impairment::default(), 15);
    let (_, sid) = sim.open("hole.test");
    sim.settle();
    let now = sim.clock();
    sim.server.stream_write(now, sid, &pattern(8 * 1024, 15)).unwrap();
    sim.collect();
    let to_client = sim.link.iter().filter(|p| !p.to_server).count();
    assert!(to_client >= 3, "the data took {to_client} datagrams");
    let first = sim.link.iter().position(|p| !p.to_server).unwrap();
    sim.link.remove(first);
    let sent_before = sim.datagrams_sent[0];
    sim.step();
    assert!(sim.datagrams_sent[0] > sent_before, "ACKs past a hole were held back");
}

/// Where the server's next datagram for the client goes.
fn server_sends_to(sim: &mut Sim, sid: StreamId) -> SocketAddr {
    let now = sim.clock();
    sim.server.stream_write(now, sid, b"reply").unwrap();
    let mut out = Vec::new();
    sim.server.drain_transmits(&mut out);
    out.last().expect("the server sent nothing").peer
}

#[test]
fn the_server_follows_the_client_to_the_address_of_its_latest_packet_only() {
    let mut sim = Sim::new(Impairment::default(), 21);
    let (cid, sid) = sim.open("roam.test");
    sim.settle();
    let old: SocketAddr = CLIENT.parse().unwrap();
    let moved: SocketAddr = "198.18.0.3:41000".parse().unwrap();
    let elsewhere: SocketAddr = "198.18.0.4:42000".parse().unwrap();
    let sealed = |sim: &mut Sim, data: &[u8]| {
        let now = sim.clock();
        sim.client.stream_write(now, cid, data).unwrap();
        let mut out = Vec::new();
        sim.client.drain_transmits(&mut out);
        assert_eq!(out.len(), 1);
        out.pop().unwrap().payload
    };
    let overtaken = sealed(&mut sim, b"first");
    let latest = sealed(&mut sim, b"second");
    let now = sim.clock();

    // The client's NAT mapping changed: its latest packet comes from a new address.
    sim.server
        .handle_datagram(now, PathId(0), moved, &mut latest.clone())
        .unwrap();
    assert_eq!(server_sends_to(&mut sim, sid), moved);
    // A packet overtaken on the way, from the address the client left: authentic and
    // taken, but the server stays with the new address.
    sim.server
        .handle_datagram(now, PathId(0), old, &mut overtaken.clone())
        .unwrap();
    assert_eq!(server_sends_to(&mut sim, sid), moved);
    // A copy of the latest packet from anywhere else is a replay.
    assert_eq!(
        sim.server
            .handle_datagram(now, PathId(0), elsewhere, &mut latest.clone()),
        Err(DropReason::Replayed)
    );
    assert_eq!(server_sends_to(&mut sim, sid), moved);
}

#[test]
fn forged_replies_do_not_cancel_the_pending_handshake_and_only_the_server_may_answer() {
    let mut sim = Sim::new(Impairment::default(), 31);
    let now = sim.clock();
    sim.client.connect(now);
    let mut out = Vec::new();
    sim.client.drain_transmits(&mut out);
    let hello = out.pop().unwrap().payload;
    let stranger: SocketAddr = "198.18.0.9:4000".parse().unwrap();
    // One forged packet per retry used to keep a client offline: it consumed the
    // pending handshake even though it failed to authenticate.
    for from in [SERVER.parse().unwrap(), stranger] {
        let mut forged = vec![0x55; 96];
        assert_eq!(
            sim.client.handle_datagram(now, PathId(0), from, &mut forged),
            Err(DropReason::Unauthentic)
        );
    }
    sim.server
        .handle_datagram(now, PathId(0), CLIENT.parse().unwrap(), &mut hello.clone())
        .unwrap();
    let mut answer = Vec::new();
    sim.server.drain_transmits(&mut answer);
    let answer = answer.pop().unwrap().payload;
    assert_eq!(
        sim.client
            .handle_datagram(now, PathId(0), stranger, &mut answer.clone()),
        Err(DropReason::Unauthentic),
        "the server's answer, sent on by someone else, is not the server's"
    );
    sim.client
        .handle_datagram(now, PathId(0), SERVER.parse().unwrap(), &mut answer.clone())
        .unwrap();
    assert!(sim.client.is_connected());
}

/// A client with two paths and a server that only path `open` reaches; the server sees
/// that path as `server_path`. Runs `ms` of virtual time in 50 ms steps.
struct TwoPaths {
    sim: Sim,
    open: [bool; 2],
    server_path: PathId,
}

impl TwoPaths {
    fn new(seed: u8, open: [bool; 2]) -> TwoPaths {
        let mut sim = Sim::new(Impairment::default(), seed);
        let mut cfg = EngineConfig::new(
            Role::Client {
                server: SERVER.parse().unwrap(),
            },
            psk(),
            [seed; 32],
        );
        cfg.paths = vec![PathId(0), PathId(1)];
        sim.client = Engine::new(cfg, sim.now);
        TwoPaths {
            sim,
            open,
            server_path: PathId(7),
        }
    }

    fn run(&mut self, ms: u64) {
        let client_from: SocketAddr = CLIENT.parse().unwrap();
        let server_from: SocketAddr = SERVER.parse().unwrap();
        for _ in 0..ms / 50 {
            self.sim.now += Duration::from_millis(50);
            let now = self.sim.clock();
            self.sim.client.handle_timeout(now);
            self.sim.server.handle_timeout(now);
            let mut up = Vec::new();
            self.sim.client.drain_transmits(&mut up);
            for t in up {
                let mut payload = t.payload;
                if self.open[t.path.0 as usize] {
                    let _ = self
                        .sim
                        .server
                        .handle_datagram(now, self.server_path, client_from, &mut payload);
                }
            }
            let mut down = Vec::new();
            self.sim.server.drain_transmits(&mut down);
            for t in down {
                assert_eq!(t.path, self.server_path, "the server answers on the path a client used");
                let open_path = PathId(self.open.iter().position(|&o| o).unwrap() as u8);
                let mut payload = t.payload;
                let _ = self
                    .sim
                    .client
                    .handle_datagram(now, open_path, server_from, &mut payload);
            }
            self.sim.client.drain_events(&mut self.sim.client_events);
            self.sim.server.drain_events(&mut self.sim.server_events);
        }
    }

    fn connected_over(&self) -> Vec<PathId> {
        self.sim
            .client_events
            .iter()
            .filter_map(|e| match e {
                Event::Connected { path, .. } => Some(*path),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_client_tries_its_best_path_first_then_falls_back_and_later_tries_the_best_again() {
    let mut two = TwoPaths::new(32, [false, true]);
    two.sim.client.connect(two.sim.clock());
    two.run(1_900);
    assert!(two.connected_over().is_empty(), "the second path was tried too early");
    two.run(1_000);
    assert_eq!(two.connected_over(), [PathId(1)]);
    assert!(two.sim.client_events.contains(&Event::PathFallback {
        unanswered: vec![PathId(0)],
        next: PathId(1),
    }));
    // Streams work over the fallback path.
    let now = two.sim.clock();
    two.sim
        .client
        .open_stream(now, &TargetAddr::Domain("fallback.test".into(), 80))
        .unwrap();
    two.run(200);
    assert!(
        two.sim
            .server_events
            .iter()
            .any(|e| matches!(e, Event::StreamOpened { .. })),
        "no stream reached the server over the fallback path"
    );
    // The best path comes back: within a minute or so the session moves there.
    two.open = [true, false];
    two.run(65_000);
    assert_eq!(two.connected_over(), [PathId(1), PathId(0)]);
}

#[test]
fn an_unanswered_server_fails_waiting_streams_within_seconds_and_new_ones_at_once() {
    let mut two = TwoPaths::new(33, [false, false]);
    let now = two.sim.clock();
    let cid = two
        .sim
        .client
        .open_stream(now, &TargetAddr::Domain("nobody.test".into(), 80))
        .unwrap();
    two.run(9_000);
    assert!(
        !two.sim
            .client_events
            .iter()
            .any(|e| matches!(e, Event::StreamReplied { .. })),
        "failed before the server had its chance"
    );
    two.run(3_000);
    assert!(two.sim.client_events.contains(&Event::StreamReplied {
        id: cid,
        result: Err(OpenError::GeneralFailure)
    }));
    let warned = two
        .sim
        .client_events
        .iter()
        .find_map(|e| match e {
            Event::ServerUnanswered { tried, silent } => Some((tried.clone(), *silent)),
            _ => None,
        })
        .expect("no ServerUnanswered event");
    assert_eq!(warned.0, [PathId(0), PathId(1)]);
    assert!(warned.1 >= SERVER_UNANSWERED_AFTER);
    let now = two.sim.clock();
    assert_eq!(
        two.sim
            .client
            .open_stream(now, &TargetAddr::Domain("nobody.test".into(), 80)),
        Err(StreamError::ServerUnanswered)
    );
    // The server comes up: the client reconnects by itself and says so.
    two.open = [false, true];
    two.run(3_000);
    assert!(two.sim.client_events.iter().any(|e| matches!(
        e,
        Event::Connected {
            path: PathId(1),
            after_outage: true,
            ..
        }
    )));
    let now = two.sim.clock();
    assert!(
        two.sim
            .client
            .open_stream(now, &TargetAddr::Domain("back.test".into(), 80))
            .is_ok()
    );
}

#[test]
fn a_key_holder_who_saw_the_clients_handshake_cannot_take_over_its_streams() {
    let mut sim = Sim::new(Impairment::default(), 34);
    let (_cid, sid) = sim.open("victim.test");
    sim.settle();
    // The client handshakes again (an outage, say); another key holder sees the message
    // and learns its instance and proof.
    let now = sim.clock();
    sim.client.connect(now);
    let mut out = Vec::new();
    sim.client.drain_transmits(&mut out);
    let genuine = out.pop().unwrap().payload;
    let (noise, _) = crypto::cookie::split_mac2(&genuine).unwrap();
    let seen = crypto::Responder::read(&psk(), noise).unwrap();
    let victim = frame::InitPayload::parse(&seen.payload).unwrap();
    let forged = frame::InitPayload {
        client_index: 77,
        ..victim
    };
    let mut payload = Vec::new();
    forged.emit(&mut payload);
    let (_attacker, mut hello) = crypto::Initiator::start(&psk(), &payload).unwrap();
    hello.extend_from_slice(&[0; crypto::cookie::MAC2_LEN]);
    let attacker_addr: SocketAddr = "198.18.0.66:5000".parse().unwrap();
    assert_eq!(
        sim.server
            .handle_datagram(now, PathId(0), attacker_addr, &mut hello.clone()),
        Err(DropReason::Unauthentic),
        "a handshake with someone else's instance and a copied proof was taken"
    );
    assert_eq!(
        server_sends_to(&mut sim, sid),
        CLIENT.parse().unwrap(),
        "the stream was re-pointed"
    );
    // The client's own handshake, whose proof is bound to its own ephemeral key, is.
    sim.server
        .handle_datagram(now, PathId(0), CLIENT.parse().unwrap(), &mut genuine.clone())
        .unwrap();
    assert_eq!(server_sends_to(&mut sim, sid), CLIENT.parse().unwrap());
}

#[test]
fn a_handshake_stamped_before_the_server_started_gets_nothing() {
    let mut sim = Sim::new(Impairment::default(), 35);
    let now = sim.clock();
    sim.client.connect(now);
    let mut out = Vec::new();
    sim.client.drain_transmits(&mut out);
    let recorded = out.pop().unwrap().payload;
    // The server restarts a moment later: it remembers no handshake it answered.
    let mut cfg = EngineConfig::new(Role::Server, psk(), [36; 32]);
    cfg.started_unix_ms = now.unix_ms + 1;
    sim.server = Engine::new(cfg, sim.now);
    let later = Now {
        instant: now.instant + Duration::from_millis(5),
        unix_ms: now.unix_ms + 5,
    };
    assert_eq!(
        sim.server
            .handle_datagram(later, PathId(0), CLIENT.parse().unwrap(), &mut recorded.clone()),
        Err(DropReason::StaleHandshake)
    );
    let mut answer = Vec::new();
    sim.server.drain_transmits(&mut answer);
    assert!(answer.is_empty(), "a replayed handshake got a reply");
    // A fresh one from the same client is answered.
    sim.client.connect(later);
    let mut out = Vec::new();
    sim.client.drain_transmits(&mut out);
    sim.server
        .handle_datagram(
            later,
            PathId(0),
            CLIENT.parse().unwrap(),
            &mut out.pop().unwrap().payload,
        )
        .unwrap();
}

#[test]
fn a_client_cannot_hold_more_streams_than_its_cap() {
    let mut sim = Sim::new(Impairment::default(), 37);
    let mut cfg = EngineConfig::new(Role::Server, psk(), [38; 32]);
    cfg.max_streams_per_peer = 2;
    sim.server = Engine::new(cfg, sim.now);
    let (first, _) = sim.open("one.test");
    let (second, _) = sim.open("two.test");
    let now = sim.clock();
    let third = sim
        .client
        .open_stream(now, &TargetAddr::Domain("three.test".into(), 80))
        .unwrap();
    sim.collect();
    let reset = sim.run_until(20_000, |sim| sim.client_events.contains(&Event::StreamClosed(third)));
    assert!(reset, "the stream past the cap was not refused");
    assert_eq!(sim.server.counters().refused_streams, 1);
    assert_eq!(sim.server.live_streams(), 2);
    assert!(!sim.client_events.contains(&Event::StreamClosed(first)));
    assert!(!sim.client_events.contains(&Event::StreamClosed(second)));
}

#[test]
fn a_receiver_whose_buffer_overflows_slows_its_peer_down_until_it_stops() {
    let mut sim = Sim::new(Impairment::default(), 39);
    let (_cid, sid) = sim.open("overflow.test");
    sim.settle();
    let full = sim.server.stream_mut(sid).unwrap().kcp.snd_wnd();
    // A little overflow (the xdp ring's usual ~0.5 %) is left to KCP.
    sim.client.receive_overflowed(PathId(0), 1, 1000);
    sim.collect();
    sim.settle();
    assert_eq!(sim.server.stream_mut(sid).unwrap().kcp.snd_wnd(), full);
    // Overflow on a path the server does not use is not the server's doing.
    sim.client.receive_overflowed(PathId(1), 900, 100);
    sim.collect();
    sim.settle();
    assert_eq!(sim.server.stream_mut(sid).unwrap().kcp.snd_wnd(), full);
    // Most of a burst lost to the client's full socket: the server halves its window.
    sim.client.receive_overflowed(PathId(0), 900, 100);
    sim.collect();
    sim.settle();
    assert_eq!(sim.server.stream_mut(sid).unwrap().kcp.snd_wnd(), full / 2);
    // Path loss (no report) changes nothing, and a quiet second brings it back.
    let back = sim.run_until(200_000, |sim| {
        sim.server.stream_mut(sid).is_some_and(|s| s.kcp.snd_wnd() == full)
    });
    assert!(back, "the window never recovered");
    assert!(sim.now - sim.t0 < Duration::from_secs(10));
}

/// The client's handshake datagrams, after `connect`.
fn client_handshake(sim: &mut Sim) -> Vec<u8> {
    let now = sim.clock();
    sim.client.connect(now);
    let mut out = Vec::new();
    sim.client.drain_transmits(&mut out);
    out.pop().expect("connect sent nothing").payload
}

#[test]
fn a_fresh_client_whose_first_answer_was_lost_is_answered_on_its_retry() {
    let mut sim = Sim::new(Impairment::default(), 40);
    let from: SocketAddr = CLIENT.parse().unwrap();
    let now = sim.clock();
    let mut hello = client_handshake(&mut sim);
    sim.server.handle_datagram(now, PathId(0), from, &mut hello).unwrap();
    let mut lost = Vec::new();
    sim.server.drain_transmits(&mut lost);
    assert_eq!(lost.len(), 1);
    // The retry has no proof (the client never had a session): nothing to take over,
    // so it is answered.
    sim.now += Duration::from_millis(1100);
    let now = sim.clock();
    let mut retry = client_handshake(&mut sim);
    assert_eq!(sim.server.handle_datagram(now, PathId(0), from, &mut retry), Ok(()));
}

#[test]
fn after_a_lost_answer_the_server_answers_under_the_session_the_client_still_has() {
    let mut sim = Sim::new(Impairment::default(), 41);
    let (cid, sid) = sim.open("lost-answer.test");
    sim.settle();
    let from: SocketAddr = CLIENT.parse().unwrap();
    // The client handshakes again; the server installs the new session, but its
    // answer never arrives.
    let now = sim.clock();
    let mut hello = client_handshake(&mut sim);
    sim.server.handle_datagram(now, PathId(0), from, &mut hello).unwrap();
    let mut lost = Vec::new();
    sim.server.drain_transmits(&mut lost);
    // The client goes on under its session; the server must follow it, or everything
    // it sends is sealed under keys the client never got.
    sim.client.stream_write(sim.clock(), cid, b"still here").unwrap();
    sim.collect();
    sim.settle();
    sim.server.stream_write(sim.clock(), sid, b"and so am I").unwrap();
    sim.collect();
    sim.settle();
    let mut buf = vec![0u8; sim.client.read_buffer_len()];
    let got = sim.client.stream_read(cid, &mut buf);
    assert!(
        matches!(&got, Ok(ReadOutcome::Data(range)) if &buf[range.clone()] == b"and so am I"),
        "{got:?}"
    );
}

/// One datagram from `from` into `engine`; what it sent back.
fn exchange(engine: &mut Engine, now: Now, from: &str, datagram: &[u8]) -> (Result<(), DropReason>, Vec<Vec<u8>>) {
    let result = engine.handle_datagram(now, PathId(0), from.parse().unwrap(), &mut datagram.to_vec());
    let mut out = Vec::new();
    engine.drain_transmits(&mut out);
    (result, out.into_iter().map(|t| t.payload).collect())
}

#[test]
fn a_server_under_load_asks_for_a_cookie_and_does_no_diffie_hellman_without_one() {
    let mut sim = Sim::new(Impairment::default(), 39);
    let mut cfg = EngineConfig::new(Role::Server, psk(), [40; 32]);
    cfg.handshakes_before_cookies = 0;
    sim.server = Engine::new(cfg, sim.now);
    let now = sim.clock();
    sim.client.connect(now);
    let mut out = Vec::new();
    sim.client.drain_transmits(&mut out);
    let first = out.pop().unwrap().payload;

    let (result, replies) = exchange(&mut sim.server, now, CLIENT, &first);
    assert_eq!(result, Ok(()));
    assert_eq!(replies.len(), 1);
    assert!(
        admission::cookie_reply_len().contains(&replies[0].len()),
        "not a cookie reply"
    );
    let cookie_reply = replies[0].clone();
    assert_eq!(sim.server.counters().cookies_sent, 1);
    assert_eq!(
        sim.server.counters().handshakes,
        0,
        "a session without a cookie under load"
    );
    // Replayed, the same message gets nothing at all.
    let (result, replies) = exchange(&mut sim.server, now, CLIENT, &first);
    assert_eq!(result, Err(DropReason::StaleHandshake));
    assert!(replies.is_empty(), "a replayed handshake got a reply");

    // The client reads the cookie and handshakes again at once, proving its address.
    let (result, second) = exchange(&mut sim.client, now, SERVER, &cookie_reply);
    assert_eq!(result, Ok(()));
    assert_eq!(second.len(), 1, "no new handshake after the cookie");
    // From another address (a spoofer replaying it), the proof is worth nothing.
    let (_, replies) = exchange(&mut sim.server, now, "198.18.0.66:40000", &second[0]);
    assert_eq!(
        sim.server.counters().handshakes,
        0,
        "a cookie made for another address passed"
    );
    assert!(replies.iter().all(|r| admission::cookie_reply_len().contains(&r.len())));
    // From the client's own address, a fresh handshake with the cookie is answered.
    sim.client.connect(now);
    let mut out = Vec::new();
    sim.client.drain_transmits(&mut out);
    let (result, replies) = exchange(&mut sim.server, now, CLIENT, &out.pop().unwrap().payload);
    assert_eq!(result, Ok(()));
    assert_eq!(sim.server.counters().handshakes, 1);
    let (result, _) = exchange(&mut sim.client, now, SERVER, &replies[0]);
    assert_eq!(result, Ok(()));
    assert!(sim.client.is_connected());
    // A cookie reply for an old message does not open for the new pending handshake.
    let (result, replies) = exchange(&mut sim.client, now, SERVER, &cookie_reply);
    assert!(result.is_err() && replies.is_empty());
}

#[test]
fn below_the_load_threshold_no_cookie_is_asked() {
    let mut sim = Sim::new(Impairment::default(), 41);
    sim.open("origin.test");
    assert!(sim.client.is_connected());
    assert_eq!(sim.server.counters().handshakes, 1);
    assert_eq!(sim.server.counters().cookies_sent, 0);
}

#[path = "datagram_tests.rs"]
mod datagram_tests;

/// A sim whose server is shard 0 of two, and shard 1 beside it.
fn sharded_sim(seed: u8) -> (Sim, Engine) {
    let mut sim = Sim::new(Impairment::default(), seed);
    let mut shards = shards::Shard::split(2).into_iter();
    let config = |shard| EngineConfig::new(Role::Server, psk(), [seed.wrapping_add(1); 32]).for_shard(shard);
    sim.server = Engine::new(config(shards.next().unwrap()), sim.t0);
    let other = Engine::new(config(shards.next().unwrap()), sim.t0);
    (sim, other)
}

/// Hands `datagram` to `shard` as a datagram from `from`, and returns what it handed on.
fn reaches_wrong_shard(shard: &mut Engine, now: Now, from: SocketAddr, datagram: &[u8]) -> shards::Handoff {
    assert_eq!(
        shard.handle_datagram(now, PathId(0), from, &mut datagram.to_vec()),
        Ok(())
    );
    let mut handoffs = Vec::new();
    shard.drain_handoffs(&mut handoffs);
    let mut sent = Vec::new();
    shard.drain_transmits(&mut sent);
    assert!(sent.is_empty(), "a shard answered for a client it does not hold");
    assert_eq!(handoffs.len(), 1);
    handoffs.pop().unwrap()
}

#[test]
fn a_client_whose_address_moved_to_another_shard_is_handed_back_to_its_own() {
    let (mut sim, mut other) = sharded_sim(50);
    let (cid, sid) = sim.open("shards.test");
    sim.settle();
    let moved: SocketAddr = "198.18.0.3:41000".parse().unwrap();
    let now = sim.clock();
    sim.client.stream_write(now, cid, b"from a new port").unwrap();
    let mut out = Vec::new();
    sim.client.drain_transmits(&mut out);
    let datagram = out.pop().expect("the client sent nothing").payload;

    let mut handoff = reaches_wrong_shard(&mut other, now, moved, &datagram);
    assert_eq!((handoff.shard, handoff.from), (0, moved));
    assert_eq!(other.counters().handed_off, 1);
    assert_eq!(
        other.counters().datagrams_in,
        0,
        "counted where it is handled, not twice"
    );
    sim.server
        .handle_datagram(now, handoff.path, handoff.from, &mut handoff.datagram)
        .unwrap();
    let mut buf = vec![0u8; sim.server.read_buffer_len()];
    let got = sim.server.stream_read(sid, &mut buf);
    assert!(
        matches!(&got, Ok(ReadOutcome::Data(range)) if &buf[range.clone()] == b"from a new port"),
        "{got:?}"
    );
    assert_eq!(server_sends_to(&mut sim, sid), moved, "the owner follows the client");
}

#[test]
fn a_client_resuming_from_another_shard_is_judged_by_its_own() {
    let (mut sim, mut other) = sharded_sim(51);
    sim.open("shards.test");
    sim.settle();
    let moved: SocketAddr = "198.18.0.3:41000".parse().unwrap();
    sim.now += Duration::from_millis(1100);
    let now = sim.clock();
    let hello = client_handshake(&mut sim);
    let mut handoff = reaches_wrong_shard(&mut other, now, moved, &hello);
    assert_eq!(handoff.shard, 0);
    assert_eq!(other.peer_count(), 0, "the wrong shard took the client");
    let handshakes = sim.server.counters().handshakes;
    sim.server
        .handle_datagram(now, handoff.path, handoff.from, &mut handoff.datagram)
        .unwrap();
    assert_eq!(sim.server.counters().handshakes, handshakes + 1);
}

#[test]
fn a_new_client_is_served_by_the_shard_it_reached() {
    let (mut sim, mut other) = sharded_sim(52);
    let now = sim.clock();
    let from: SocketAddr = CLIENT.parse().unwrap();
    let mut hello = client_handshake(&mut sim);
    assert_eq!(other.handle_datagram(now, PathId(0), from, &mut hello), Ok(()));
    let mut answer = Vec::new();
    other.drain_transmits(&mut answer);
    assert_eq!(answer.len(), 1);
    assert_eq!((other.counters().handshakes, other.counters().handed_off), (1, 0));
}
