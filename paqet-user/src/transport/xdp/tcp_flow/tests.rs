use super::*;
use rand::Rng;

const KEY: [u8; 32] = [7; 32];
const PORT: u16 = 4000;

fn client_addr() -> SocketAddr {
    "198.19.0.2:40000".parse().unwrap()
}
fn server_addr() -> SocketAddr {
    format!("198.18.0.2:{PORT}").parse().unwrap()
}

const UNIX_MS: u64 = 1_800_000_000_000;

fn flows(side: Side, key: [u8; 32], origin: Instant) -> Flows {
    Flows::new(side, SynKey::new(key), 1448, origin, 0, [side_seed(side); 32])
}

fn side_seed(side: Side) -> u8 {
    match side {
        Side::Client => 1,
        Side::Server { .. } => 2,
    }
}

/// A segment as the peer's parser reports it.
fn received(seg: &Segment, payload_len: usize) -> Received {
    let bytes = seg.option_bytes();
    let options = paqet_common::wire::parse_tcp_options(bytes.as_slice().unwrap()).unwrap();
    Received {
        seq: seg.seq,
        ack: seg.ack,
        flags: seg.flags,
        window: seg.window,
        options,
        payload_len,
    }
}

/// Linux conntrack's `tcp_in_window` (net/netfilter/nf_conntrack_proto_tcp.c), reduced
/// to what paqet's segments exercise, with `be_liberal=0`: every segment of ours must
/// pass it.
#[derive(Default, Clone, Copy, Debug)]
struct Dir {
    end: u32,
    maxend: u32,
    maxwin: u32,
    scale: u8,
    wscale_seen: bool,
}

#[derive(Default, Debug)]
struct Conntrack {
    dirs: [Dir; 2],
}

fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl Conntrack {
    /// `dir` 0: client to server. Returns whether the segment is in window.
    fn in_window(&mut self, dir: usize, seg: &Segment, len: usize) -> bool {
        let r = received(seg, len);
        let syn = seg.flags & SYN != 0;
        let seq = seg.seq;
        let end = seq.wrapping_add(len as u32).wrapping_add(syn as u32);
        let (mut ack, mut win) = (seg.ack, u32::from(seg.window));
        let (s, rcv) = if dir == 0 { (0, 1) } else { (1, 0) };
        if self.dirs[s].maxwin == 0 {
            assert!(syn, "the first segment of a direction must be a SYN (tcp_loose=0)");
            self.dirs[s] = Dir {
                end,
                maxend: end,
                maxwin: win.max(1),
                scale: r.options.window_scale.unwrap_or(0),
                wscale_seen: r.options.window_scale.is_some(),
            };
            if !(self.dirs[s].wscale_seen && self.dirs[rcv].wscale_seen) {
                self.dirs[s].scale = 0;
                self.dirs[rcv].scale = 0;
            }
            if seg.flags & ACK == 0 {
                return true;
            }
        }
        if seg.flags & ACK == 0 {
            ack = self.dirs[rcv].end;
        }
        let (snd, recv) = (self.dirs[s], self.dirs[rcv]);
        let in_recv_win = recv.maxwin == 0 || after(end, snd.end.wrapping_sub(recv.maxwin).wrapping_sub(1));
        let maxack = snd.maxwin.max(66000);
        let ok = before(seq, snd.maxend.wrapping_add(1))
            && in_recv_win
            && before(ack, recv.end.wrapping_add(1))
            && after(ack, recv.end.wrapping_sub(maxack).wrapping_sub(1));
        if !ok {
            return false;
        }
        if !syn {
            win <<= snd.scale;
        }
        let d = &mut self.dirs[s];
        d.maxwin = d.maxwin.max(win);
        if after(end, d.end) {
            d.end = end;
        }
        let snd_maxend = d.maxend;
        let r = &mut self.dirs[rcv];
        if r.maxwin != 0 && after(end, snd_maxend) {
            r.maxwin = r.maxwin.wrapping_add(end.wrapping_sub(snd_maxend));
        }
        if after(ack.wrapping_add(win), r.maxend.wrapping_sub(1)) {
            r.maxend = ack.wrapping_add(win);
        }
        true
    }
}

/// The two ends and a strict conntrack between them.
struct Pair {
    client: Flows,
    server: Flows,
    ct: Conntrack,
    now: Instant,
    /// Payload lengths each side received, in order.
    got: [Vec<usize>; 2],
}

impl Pair {
    fn new() -> Pair {
        let now = Instant::now();
        Pair {
            client: flows(Side::Client, KEY, now),
            server: flows(Side::Server { port: PORT }, KEY, now),
            ct: Conntrack::default(),
            now,
            got: [Vec::new(), Vec::new()],
        }
    }

    fn unix_ms(&self) -> u64 {
        UNIX_MS
    }

    /// Carries one segment through conntrack to the other side (unless `lose`).
    fn carry(&mut self, dir: usize, seg: Segment, len: usize, lose: bool) {
        assert_eq!(seg.flags & (RST | FIN), 0, "paqet never sends RST or FIN");
        assert!(
            self.ct.in_window(dir, &seg, len),
            "conntrack would drop {seg:?} ({len} bytes)"
        );
        if lose {
            return;
        }
        let (to, from) = if dir == 0 {
            (&mut self.server, client_addr())
        } else {
            (&mut self.client, server_addr())
        };
        let v = to.on_receive(from, &received(&seg, len), self.now, UNIX_MS);
        if v == RxVerdict::Deliver {
            self.got[1 - dir].push(len);
        }
    }

    /// Sends everything queued as control on both sides, until none is left.
    fn pump(&mut self) {
        for _ in 0..10 {
            let c = self.client.take_control();
            let s = self.server.take_control();
            if c.is_empty() && s.is_empty() {
                return;
            }
            for ctl in c {
                self.carry(0, ctl.seg, ctl.payload.len(), false);
            }
            for ctl in s {
                self.carry(1, ctl.seg, ctl.payload.len(), false);
            }
        }
        panic!("control segments never stopped");
    }

    fn send(&mut self, dir: usize, len: usize, lose: bool) -> TxVerdict {
        let payload = vec![0u8; len];
        let (from, to) = if dir == 0 {
            (&mut self.client, server_addr())
        } else {
            (&mut self.server, client_addr())
        };
        let v = from.on_send(to, &payload, self.now, UNIX_MS);
        if let TxVerdict::Send(seg) = v {
            self.carry(dir, seg, len, lose);
        }
        v
    }

    fn established() -> Pair {
        let mut p = Pair::new();
        assert_eq!(p.send(0, 200, false), TxVerdict::Held);
        p.pump();
        assert!(p.client.is_established(server_addr()));
        assert!(p.server.is_established(client_addr()));
        assert_eq!(p.got[1], vec![200], "the held datagram follows the handshake");
        p
    }
}

#[test]
fn opens_like_tcp_with_the_usual_options() {
    let mut p = Pair::new();
    assert_eq!(p.send(0, 100, false), TxVerdict::Held);
    let syn = p.client.take_control();
    assert_eq!(syn.len(), 1);
    let s = syn[0].seg;
    assert_eq!(s.flags, SYN);
    assert_eq!(s.ack, 0);
    assert_eq!(s.window, SYN_WINDOW);
    let o = received(&s, 0).options;
    assert_eq!(o.mss, Some(1448));
    assert!(o.sack_permitted);
    assert_eq!(o.window_scale, Some(WINDOW_SCALE));
    assert_eq!(o.timestamps.map(|t| t.1), Some(0));
    assert_eq!(s.option_bytes().len, 20);
    assert_eq!(
        SynKey::new(KEY).syn_numbers(PORT, UNIX_MS),
        (s.seq, o.timestamps.map_or(0, |t| t.0))
    );
    p.carry(0, s, 0, false);
    let synack = p.server.take_control();
    assert_eq!(synack.len(), 1);
    let sa = synack[0].seg;
    assert_eq!(sa.flags, SYN | ACK);
    assert_eq!(sa.ack, s.seq.wrapping_add(1));
    let o = received(&sa, 0).options;
    assert_eq!(
        (o.mss, o.sack_permitted, o.window_scale),
        (Some(1448), true, Some(WINDOW_SCALE))
    );
    assert_eq!(
        o.timestamps.map(|t| t.1),
        received(&s, 0).options.timestamps.map(|t| t.0)
    );
    p.carry(1, sa, 0, false);
    let after_synack = p.client.take_control();
    assert_eq!(after_synack[0].seg.flags, ACK);
    assert_eq!(after_synack[0].seg.seq, s.seq.wrapping_add(1));
    assert_eq!(after_synack[0].seg.ack, sa.seq.wrapping_add(1));
    assert_eq!(after_synack[1].seg.flags, PSH | ACK);
    assert_eq!(after_synack[1].payload.len(), 100);
    for c in after_synack {
        p.carry(0, c.seg, c.payload.len(), false);
    }
    assert_eq!(p.got[1], vec![100]);
    // The server's first data acknowledges exactly what the client sent.
    let TxVerdict::Send(d) = p.send(1, 50, false) else {
        panic!("server cannot answer")
    };
    assert_eq!(d.seq, sa.seq.wrapping_add(1));
    assert_eq!(d.ack, s.seq.wrapping_add(101));
    assert_eq!(d.option_bytes().len as usize, DATA_OPTIONS_LEN);
}

#[test]
fn a_strict_conntrack_accepts_a_lossy_exchange_both_ways() {
    let mut p = Pair::established();
    let mut rng = StdRng::seed_from_u64(3);
    let mut dropped = 0;
    for i in 0..20_000 {
        let dir = rng.random_range(0..2);
        let len = rng.random_range(1..=1436);
        // Loss after the middlebox: the sender's numbers move on anyway.
        let lose = rng.random_bool(0.1);
        if let TxVerdict::Drop(TxDrop::Window) = p.send(dir, len, lose) {
            dropped += 1;
        }
        if i % 100 == 0 {
            p.now += Duration::from_millis(1);
        }
    }
    assert!(dropped < 100, "{dropped} datagrams beyond the window");
    assert!(p.got[0].len() > 8_000 && p.got[1].len() > 8_000);
}

#[test]
fn a_one_way_burst_waits_at_the_peers_window_instead_of_leaving_it() {
    let mut p = Pair::new();
    assert_eq!(p.send(0, 200, false), TxVerdict::Held);
    for (dir, lose) in [(0, false), (1, false), (0, false), (1, true)] {
        let side = if dir == 0 { &mut p.client } else { &mut p.server };
        for c in side.take_control() {
            p.carry(dir, c.seg, c.payload.len(), lose);
        }
    }
    // The server's bare ACK for the first data was lost, so the client knows only its
    // SYN-ACK's window, unscaled.
    assert_eq!(p.server.counters.bare_acks, 1);
    let mut sent = 0usize;
    let mut held = 0usize;
    for _ in 0..(HELD_MAX + 100) {
        match p.send(0, 1400, false) {
            TxVerdict::Send(_) => {
                assert_eq!(held, 0, "sent after holding: out of order");
                sent += 1400;
            }
            TxVerdict::Held => held += 1,
            TxVerdict::Drop(TxDrop::Window) => {}
            v => panic!("{v:?}"),
        }
    }
    assert!(
        sent + 200 <= SYN_WINDOW as usize,
        "{sent} bytes sent into a 64240-byte window"
    );
    assert_eq!(held, HELD_MAX);
    // One segment from the server (acking all, with its scaled window) lets them go,
    // in order, through the strict conntrack.
    let before = p.got[1].len();
    assert!(matches!(p.send(1, 10, false), TxVerdict::Send(_)));
    p.pump();
    assert_eq!(p.got[1].len(), before + HELD_MAX);
    assert!(matches!(p.send(0, 1400, false), TxVerdict::Send(_)));
}

#[test]
fn a_syn_without_the_key_gets_nothing() {
    let now = Instant::now();
    let mut stranger = flows(Side::Client, [9; 32], now);
    let mut server = flows(Side::Server { port: PORT }, KEY, now);
    stranger.on_send(server_addr(), b"x", now, UNIX_MS);
    let syn = stranger.take_control()[0].seg;
    let v = server.on_receive(client_addr(), &received(&syn, 0), now, UNIX_MS);
    assert_eq!(v, RxVerdict::Drop(RxDrop::Unauthentic));
    assert!(!server.has_control());
    assert_eq!(server.counters.syns_refused, 1);
}

#[test]
fn a_corrupt_or_truncated_syn_gets_nothing() {
    let now = Instant::now();
    let mut client = flows(Side::Client, KEY, now);
    let mut server = flows(Side::Server { port: PORT }, KEY, now);
    client.on_send(server_addr(), b"x", now, UNIX_MS);
    let syn = client.take_control()[0].seg;
    let good = received(&syn, 0);
    let mut cases = Vec::new();
    let mut r = good;
    r.seq ^= 1;
    cases.push((r, RxDrop::Unauthentic));
    let mut r = good;
    r.options.timestamps = None; // options cut off
    cases.push((r, RxDrop::Unauthentic));
    let mut r = good;
    r.options.timestamps = r.options.timestamps.map(|(v, e)| (v ^ 0x100, e));
    cases.push((r, RxDrop::Unauthentic));
    let mut r = good;
    r.payload_len = 5; // a SYN with data is not ours
    cases.push((r, RxDrop::Unauthentic));
    let mut r = good;
    r.flags |= RST;
    cases.push((r, RxDrop::Unexpected));
    let mut r = good;
    r.flags = SYN | FIN;
    cases.push((r, RxDrop::Unexpected));
    for (r, want) in cases {
        assert_eq!(
            server.on_receive(client_addr(), &r, now, UNIX_MS),
            RxVerdict::Drop(want),
            "{r:?}"
        );
        assert!(!server.has_control());
    }
    // The same SYN to another port does not prove anything there.
    let mut other = flows(Side::Server { port: PORT + 1 }, KEY, now);
    assert_eq!(
        other.on_receive(client_addr(), &good, now, UNIX_MS),
        RxVerdict::Drop(RxDrop::Unauthentic)
    );
    // And the untouched one is answered.
    assert_eq!(
        server.on_receive(client_addr(), &good, now, UNIX_MS),
        RxVerdict::Consumed
    );
}

#[test]
fn a_stale_syn_gets_nothing() {
    let now = Instant::now();
    let mut client = flows(Side::Client, KEY, now);
    let mut server = flows(Side::Server { port: PORT }, KEY, now);
    client.on_send(server_addr(), b"x", now, UNIX_MS);
    let syn = received(&client.take_control()[0].seg, 0);
    let late = UNIX_MS + u64::from(SYN_MAX_SKEW_MS) + 1;
    assert_eq!(
        server.on_receive(client_addr(), &syn, now, late),
        RxVerdict::Drop(RxDrop::Stale)
    );
    let early = UNIX_MS - u64::from(SYN_MAX_SKEW_MS) - 1;
    assert_eq!(
        server.on_receive(client_addr(), &syn, now, early),
        RxVerdict::Drop(RxDrop::Stale)
    );
    let skewed = UNIX_MS + u64::from(SYN_MAX_SKEW_MS) - 1;
    assert_eq!(server.on_receive(client_addr(), &syn, now, skewed), RxVerdict::Consumed);
}

#[test]
fn a_syn_stamped_before_the_server_started_gets_nothing_and_the_client_soon_sends_a_fresh_one() {
    let now = Instant::now();
    let mut client = flows(Side::Client, KEY, now);
    client.on_send(server_addr(), b"x", now, UNIX_MS);
    let recorded = received(&client.take_control()[0].seg, 0);
    // The server (re)starts a moment after the SYN was sent: it cannot know whether an
    // earlier run answered it.
    let started = UNIX_MS + 1;
    let mut server = Flows::new(
        Side::Server { port: PORT },
        SynKey::new(KEY),
        1448,
        now,
        started,
        [2; 32],
    );
    assert_eq!(
        server.on_receive(client_addr(), &recorded, now, started + 10),
        RxVerdict::Drop(RxDrop::Stale)
    );
    assert!(
        server.take_control().is_empty(),
        "a SYN from before the start was answered"
    );
    // The client's retransmissions repeat that SYN; after SYN_REFRESH it sends a fresh
    // one, which is answered.
    let later = now + SYN_REFRESH;
    let later_ms = UNIX_MS + SYN_REFRESH.as_millis() as u64;
    client.on_send(server_addr(), b"y", later, later_ms);
    let fresh = client.take_control();
    assert_eq!(fresh.len(), 1);
    assert_ne!(fresh[0].seg.seq, recorded.seq, "not a fresh SYN");
    assert_eq!(
        server.on_receive(client_addr(), &received(&fresh[0].seg, 0), later, later_ms),
        RxVerdict::Consumed
    );
    // Long after the start the check stays out of the way (no 32-bit wrap surprises).
    let mut old_server = Flows::new(Side::Server { port: PORT }, SynKey::new(KEY), 1448, now, 1, [3; 32]);
    assert_eq!(
        old_server.on_receive(client_addr(), &received(&fresh[0].seg, 0), later, later_ms),
        RxVerdict::Consumed
    );
}

#[test]
fn a_replayed_syn_gets_nothing_from_any_address() {
    let mut p = Pair::established();
    let syn = {
        // The client's SYN as it was on the wire: open a second client at the same time.
        let mut c = flows(Side::Client, KEY, p.now);
        c.on_send(server_addr(), b"x", p.now, p.unix_ms());
        c.take_control()[0].seg
    };
    let r = received(&syn, 0);
    for from in [client_addr(), "198.18.9.9:1234".parse().unwrap()] {
        assert_eq!(
            p.server.on_receive(from, &r, p.now, UNIX_MS),
            RxVerdict::Drop(RxDrop::Replayed),
            "from {from}"
        );
        assert!(!p.server.has_control());
    }
    // The established flow is untouched.
    assert!(p.server.is_established(client_addr()));
    assert!(matches!(p.send(1, 10, false), TxVerdict::Send(_)));
}

#[test]
fn a_retransmitted_syn_during_the_handshake_gets_the_same_syn_ack() {
    let mut p = Pair::new();
    p.send(0, 10, false);
    let syn = p.client.take_control()[0].seg;
    p.carry(0, syn, 0, false);
    let first = p.server.take_control();
    // The SYN-ACK is lost; a second later the client sends the SYN again, unchanged.
    p.now += SYN_RETRY;
    assert_eq!(p.send(0, 10, false), TxVerdict::Held);
    let again = p.client.take_control();
    assert_eq!(again[0].seg, syn);
    p.carry(0, again[0].seg, 0, false);
    let second = p.server.take_control();
    assert_eq!(first, second);
    for c in second {
        p.carry(1, c.seg, 0, false);
    }
    p.pump();
    assert_eq!(p.got[1], vec![10, 10]);
}

#[test]
fn frames_of_no_flow_are_dropped_and_the_server_never_speaks_first() {
    let now = Instant::now();
    let mut server = flows(Side::Server { port: PORT }, KEY, now);
    let data = Received {
        seq: 1,
        ack: 1,
        flags: PSH | ACK,
        window: 100,
        options: TcpOptions::default(),
        payload_len: 100,
    };
    assert_eq!(
        server.on_receive(client_addr(), &data, now, UNIX_MS),
        RxVerdict::Drop(RxDrop::NoFlow)
    );
    assert_eq!(
        server.on_send(client_addr(), b"x", now, UNIX_MS),
        TxVerdict::Drop(TxDrop::NoFlow)
    );
    assert!(!server.has_control());
    // A client drops a SYN-ACK it did not ask for.
    let mut client = flows(Side::Client, KEY, now);
    let synack = Received {
        flags: SYN | ACK,
        ..data
    };
    assert_eq!(
        client.on_receive(server_addr(), &synack, now, UNIX_MS),
        RxVerdict::Drop(RxDrop::NoFlow)
    );
}

#[test]
fn a_silent_path_reopens_the_flow_and_the_server_starts_it_over() {
    let mut p = Pair::established();
    let old = p.ct.dirs;
    // The router forgets the flow: the client's datagrams get no answer.
    p.ct = Conntrack::default();
    for _ in 0..3 {
        p.now += Duration::from_secs(1);
        let v = p.client.on_send(server_addr(), &[0; 50], p.now, UNIX_MS + 1000);
        assert!(matches!(v, TxVerdict::Send(_)), "{v:?}");
    }
    p.now += Duration::from_millis(1010);
    assert_eq!(
        p.client.on_send(server_addr(), &[0; 60], p.now, UNIX_MS + 4010),
        TxVerdict::Held
    );
    let syn = p.client.take_control();
    assert_eq!(syn.len(), 1);
    assert_eq!(syn[0].seg.flags, SYN);
    assert_eq!(p.client.counters.reopened, 1);
    for c in syn {
        p.carry(0, c.seg, 0, false);
    }
    // The server had the flow established; the fresh SYN starts it over.
    assert!(!p.server.is_established(client_addr()));
    p.pump();
    assert!(p.client.is_established(server_addr()));
    assert!(p.server.is_established(client_addr()));
    assert_eq!(p.got[1].last(), Some(&60));
    assert_ne!(old[0].end, p.ct.dirs[0].end);
    // And the new flow carries data both ways through the new conntrack entry.
    assert!(matches!(p.send(1, 500, false), TxVerdict::Send(_)));
    assert!(matches!(p.send(0, 500, false), TxVerdict::Send(_)));
}

#[test]
fn an_idle_but_answered_client_never_reopens() {
    let mut p = Pair::established();
    for _ in 0..100 {
        p.now += Duration::from_secs(1);
        assert!(matches!(p.send(0, 40, false), TxVerdict::Send(_)));
        assert!(matches!(p.send(1, 40, false), TxVerdict::Send(_)));
    }
    assert_eq!(p.client.counters.reopened, 0);
    assert!(!p.client.has_control());
}

#[test]
fn held_datagrams_are_bounded() {
    let now = Instant::now();
    let mut client = flows(Side::Client, KEY, now);
    let mut held = 0;
    for _ in 0..HELD_MAX + 50 {
        match client.on_send(server_addr(), &[0; 100], now, UNIX_MS) {
            TxVerdict::Held => held += 1,
            TxVerdict::Drop(TxDrop::HeldFull) => {}
            v => panic!("{v:?}"),
        }
    }
    assert_eq!(held, HELD_MAX);
}

#[test]
fn replay_memory_forgets_old_syns_and_prune_forgets_idle_flows() {
    let mut p = Pair::established();
    p.now += SEEN_SYN_KEPT;
    p.server.prune(p.now, Duration::from_secs(60));
    assert!(p.server.seen.is_empty());
    assert!(p.server.flows.is_empty());
}

#[test]
fn a_server_keeps_a_bounded_number_of_flows() {
    let now = Instant::now();
    let mut server = flows(Side::Server { port: PORT }, KEY, now);
    let key = SynKey::new(KEY);
    let syn = |i: u32| {
        let tsval = (UNIX_MS as u32).wrapping_add(i).wrapping_add(key.ts_offset(PORT));
        let mut r = Received {
            seq: key.isn(PORT, tsval),
            flags: SYN,
            window: SYN_WINDOW,
            ..Received::default()
        };
        r.options.timestamps = Some((tsval, 0));
        r
    };
    let peer = |i: u32| SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 1000 + (i >> 16) as u16));
    for i in 0..MAX_FLOWS as u32 {
        assert_eq!(server.on_receive(peer(i), &syn(i), now, UNIX_MS), RxVerdict::Consumed);
    }
    let extra = MAX_FLOWS as u32;
    assert_eq!(
        server.on_receive(peer(extra), &syn(extra), now, UNIX_MS),
        RxVerdict::Drop(RxDrop::Full)
    );
    // A fresh SYN for a flow it has still starts that flow over.
    assert_eq!(
        server.on_receive(peer(0), &syn(extra + 1), now, UNIX_MS),
        RxVerdict::Consumed
    );
}

#[test]
fn a_fresh_syn_is_after_the_last_one_so_a_middlebox_in_syn_sent_takes_it() {
    let mut now = Instant::now();
    let mut client = flows(Side::Client, KEY, now);
    let mut ct = Conntrack::default();
    client.on_send(server_addr(), b"x", now, UNIX_MS);
    let first = client.take_control()[0].seg;
    assert!(ct.in_window(0, &first, 0));
    // No answer for long enough that the SYN is made afresh, many times over.
    let mut last = first;
    for i in 1..=50u64 {
        now += SYN_REFRESH;
        client.on_send(server_addr(), b"x", now, UNIX_MS + i * 100_000);
        let syn = client.take_control()[0].seg;
        assert_ne!(syn.seq, last.seq, "round {i}: the same SYN");
        assert!(after(syn.seq, last.seq), "round {i}: a fresh SYN before the last");
        last = syn;
    }
}

#[test]
fn a_one_way_upload_past_the_window_is_acknowledged_and_never_held() {
    let mut p = Pair::established();
    // 64 MiB from the client, twice the window its SYN-ACK scale allows without an ACK,
    // while the server sends nothing of its own: only its bare ACKs come back.
    let len = 1400;
    let total = (64 << 20) / len;
    for i in 0..total {
        if i % 1000 == 0 {
            p.now += Duration::from_millis(1);
        }
        assert!(
            matches!(p.send(0, len, false), TxVerdict::Send(_)),
            "datagram {i} was not sent at once"
        );
        p.pump();
    }
    assert_eq!(p.got[1].len(), total + 1);
    let acks = p.server.counters.bare_acks;
    assert!(
        (64..=200).contains(&acks),
        "{acks} bare ACKs for 64 MiB: about one per MiB expected"
    );
    // A slow trickle is acknowledged by time: data that waited 200 ms is acknowledged
    // when more arrives.
    let before = p.server.counters.bare_acks;
    for _ in 0..10 {
        p.now += Duration::from_millis(300);
        assert!(matches!(p.send(0, 100, false), TxVerdict::Send(_)));
        p.pump();
    }
    assert_eq!(p.server.counters.bare_acks - before, 5, "every other datagram");
    assert_eq!(p.client.counters.reopened, 0);
    // What the other side answers at once (a keepalive and its answer) needs none.
    p.send(1, 40, false);
    p.pump();
    let before = p.server.counters.bare_acks + p.client.counters.bare_acks;
    for _ in 0..10 {
        p.now += Duration::from_secs(1);
        p.send(0, 40, false);
        p.send(1, 40, false);
        p.pump();
    }
    assert_eq!(p.server.counters.bare_acks + p.client.counters.bare_acks, before);
    // Traffic both ways needs none: each side's data carries its ACK.
    let before = p.server.counters.bare_acks + p.client.counters.bare_acks;
    for _ in 0..2000 {
        p.send(0, len, false);
        p.send(1, len, false);
        p.pump();
    }
    assert_eq!(p.server.counters.bare_acks + p.client.counters.bare_acks, before);
}

#[test]
fn the_server_announces_its_scaled_window_at_the_first_data() {
    let mut p = Pair::new();
    assert_eq!(p.send(0, 200, false), TxVerdict::Held);
    p.pump();
    assert_eq!(p.server.counters.bare_acks, 1, "the first data after the handshake");
    // So the client is not held to the SYN-ACK's 64240 bytes while the server is silent.
    for i in 0..100 {
        assert!(
            matches!(p.send(0, 1400, false), TxVerdict::Send(_)),
            "datagram {i} waited for a window"
        );
    }
}
