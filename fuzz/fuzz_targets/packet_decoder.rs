//! Everything paqet does with bytes from the network, before and after authentication.
//!
//! The first input byte picks a mode; the rest is the datagram (or script):
//!
//! - every mode: the pure parsers of `engine::frame` on the rest, with parse → emit →
//!   parse round trips where the format is lossless;
//! - mode 0: one datagram to a fresh server. It must be dropped with nothing sent back,
//!   unless it is a valid handshake (the seed corpus has one; mutation cannot forge one);
//! - mode 1: one datagram to a server with a live session, its first 4 bytes replaced by
//!   the session's index so it reaches the AEAD open; dropped, nothing sent;
//! - mode 2: one datagram to a client, handshaking (bit 2 clear) or connected (set);
//!   dropped, nothing sent;
//! - mode 3: a script against an engine (server if bit 2 clear, else client) with which
//!   this harness completed a real handshake through the public `engine::crypto` API, so
//!   it can seal the fuzz bytes as *authentic* plaintext: see [`Script`] for the ops.
//!   Every datagram the engine sends must open under the session (or, for a client, be a
//!   new handshake) and parse; a replayed datagram must be refused with nothing sent; a
//!   long silence must leave no stream behind.

#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use paqet::engine::crypto::{IndexMask, Initiator, Psk, Responder, SessionCrypto};
use paqet::engine::frame::{
    DATA_HEADER_LEN, DataHeader, InitPayload, Inner, OpenError, ResponsePayload, StreamMsg,
    TargetAddr,
};
use paqet::engine::mux::ReadOutcome;
use paqet::engine::{
    DropReason, Engine, EngineConfig, Event, Now, PROTOCOL_VERSION, PathId, Role, StreamId,
    Transmit,
};

const PSK: Psk = Psk([0x42; 32]);
/// The wall clock every run starts at (the handshake seed carries it).
const UNIX_MS: u64 = 1_800_000_000_000;
/// The index this harness, as a client, asks the server to put on its packets.
const HARNESS_CLIENT_INDEX: u32 = 0x1234_5678;
/// The index this harness, as a server, asks the client to put on its packets.
const HARNESS_SERVER_INDEX: u32 = 0x9abc_def0;
const HARNESS_INSTANCE: u64 = 0x0102_0304_0506_0708;

fn client_addr() -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 1], 40000))
}

fn server_addr() -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 2], 4000))
}

fuzz_target!(init: seeds::write_if_asked(), |data: &[u8]| run(data));

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    parsers(rest);
    let flag = mode & 4 != 0;
    match mode % 4 {
        0 => raw_to_fresh_server(rest),
        1 => raw_to_established_server(rest),
        2 => raw_to_client(rest, flag),
        _ => Script::new(rest, if flag { Side::Client } else { Side::Server }).run(),
    }
}

// ------------------------------------------------------------------------ parsers

fn parsers(buf: &[u8]) {
    if let Ok(h) = DataHeader::parse(buf) {
        let mut out = [0u8; DATA_HEADER_LEN];
        h.emit(&mut out);
        assert_eq!(out[..], buf[..DATA_HEADER_LEN], "DataHeader round trip");
    }
    if let Ok(inner) = Inner::parse(buf) {
        let mut out = Vec::new();
        inner.emit(&mut out);
        // Reset ignores bytes after its conv; Kcp and Keepalive keep everything.
        assert!(
            buf.starts_with(&out),
            "Inner emit is not a prefix of its input"
        );
        assert_eq!(Inner::parse(&out), Ok(inner), "Inner round trip");
    }
    if let Ok((addr, used)) = TargetAddr::parse(buf) {
        assert!(used <= buf.len());
        let mut out = Vec::new();
        addr.emit(&mut out).expect("a parsed address emits");
        assert_eq!(out[..], buf[..used], "TargetAddr round trip");
        let _ = addr.to_string();
    }
    if let Ok(msg) = StreamMsg::parse(buf) {
        let mut out = Vec::new();
        msg.emit(&mut out).expect("a parsed stream message emits");
        // Reply and Fin ignore trailing bytes; Open and Data are exact.
        assert!(
            buf.starts_with(&out),
            "StreamMsg emit is not a prefix of its input"
        );
        assert_eq!(StreamMsg::parse(&out), Ok(msg), "StreamMsg round trip");
    }
    if let Ok(p) = InitPayload::parse(buf) {
        let mut out = Vec::new();
        p.emit(&mut out);
        assert!(buf.starts_with(&out), "InitPayload round trip");
    }
    if let Ok(p) = ResponsePayload::parse(buf) {
        let mut out = Vec::new();
        p.emit(&mut out);
        assert!(buf.starts_with(&out), "ResponsePayload round trip");
    }
}

// ------------------------------------------------------------------------ engines

struct Clock {
    t0: Instant,
    now: Instant,
}

impl Clock {
    fn new() -> Clock {
        let t0 = Instant::now();
        Clock { t0, now: t0 }
    }

    fn now(&self) -> Now {
        Now {
            instant: self.now,
            unix_ms: UNIX_MS + (self.now - self.t0).as_millis() as u64,
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
    }
}

fn server_engine(clock: &Clock) -> Engine {
    Engine::new(EngineConfig::new(Role::Server, PSK, [1; 32]), clock.now)
}

fn client_engine(clock: &Clock) -> Engine {
    Engine::new(
        EngineConfig::new(
            Role::Client {
                server: server_addr(),
            },
            PSK,
            [2; 32],
        ),
        clock.now,
    )
}

fn drain(engine: &mut Engine) -> Vec<Transmit> {
    let mut out = Vec::new();
    engine.drain_transmits(&mut out);
    out
}

fn events(engine: &mut Engine) -> Vec<Event> {
    let mut out = Vec::new();
    engine.drain_events(&mut out);
    out
}

/// The harness's end of an established session.
struct Session {
    crypto: SessionCrypto,
    /// What the harness puts on packets to the engine.
    engine_index: u32,
    /// What the engine puts on packets to the harness.
    own_index: u32,
}

fn handshake_init_payload(unix_ms: u64) -> Vec<u8> {
    let mut p = Vec::new();
    InitPayload {
        version: PROTOCOL_VERSION,
        client_index: HARNESS_CLIENT_INDEX,
        instance: HARNESS_INSTANCE,
        unix_ms,
        resume_proof: [0; 16],
    }
    .emit(&mut p);
    p
}

/// The harness plays the client: a real handshake with `server`.
fn connect_to_server(server: &mut Engine, clock: &Clock) -> Session {
    let (initiator, mut hello) =
        Initiator::start(&PSK, &handshake_init_payload(clock.now().unix_ms)).unwrap();
    // No cookie: the field that would carry its MAC.
    hello.extend_from_slice(&[0; paqet::engine::crypto::cookie::MAC2_LEN]);
    server
        .handle_datagram(clock.now(), PathId(0), client_addr(), &mut hello.clone())
        .expect("valid handshake refused");
    let tx = drain(server);
    assert_eq!(tx.len(), 1, "a handshake gets exactly one answer");
    assert_eq!(tx[0].peer, client_addr());
    let mut initiator = initiator;
    let payload = initiator
        .read_response(&tx[0].payload)
        .expect("server's answer does not authenticate");
    let crypto = initiator.into_session().expect("a finished handshake has keys");
    let resp = ResponsePayload::parse(&payload).expect("server's answer payload");
    assert_eq!(resp.version, PROTOCOL_VERSION);
    assert!(events(server).is_empty());
    Session {
        crypto,
        engine_index: resp.server_index,
        own_index: HARNESS_CLIENT_INDEX,
    }
}

/// The harness plays the server: answers `client`'s handshake.
fn accept_client(client: &mut Engine, clock: &Clock) -> Session {
    client.connect(clock.now());
    let tx = drain(client);
    assert_eq!(tx.len(), 1, "connect sends one handshake");
    assert_eq!(tx[0].peer, server_addr());
    let responder =
        Responder::read(&PSK, &tx[0].payload).expect("client's handshake does not authenticate");
    let init = InitPayload::parse(&responder.payload).expect("client's handshake payload");
    let mut p = Vec::new();
    ResponsePayload {
        version: PROTOCOL_VERSION,
        server_index: HARNESS_SERVER_INDEX,
    }
    .emit(&mut p);
    let (crypto, answer) = responder.respond(&p).unwrap();
    client
        .handle_datagram(clock.now(), PathId(0), server_addr(), &mut answer.clone())
        .expect("client refused a valid answer");
    assert!(client.is_connected());
    assert!(matches!(
        events(client).as_slice(),
        [Event::Connected { path: PathId(0), after_outage: false, .. }]
    ));
    assert!(drain(client).is_empty());
    Session {
        crypto,
        engine_index: init.client_index,
        own_index: HARNESS_SERVER_INDEX,
    }
}

/// Unauthentic input: dropped, counted, nothing sent, nothing reported.
fn assert_dropped_silently(engine: &mut Engine, result: Result<(), DropReason>) {
    assert!(result.is_err(), "unauthentic datagram accepted");
    assert!(
        drain(engine).is_empty(),
        "engine answered an unauthentic datagram"
    );
    assert!(
        events(engine).is_empty(),
        "unauthentic datagram raised an event"
    );
}

// ------------------------------------------------------------------------ raw modes

fn raw_to_fresh_server(datagram: &[u8]) {
    let clock = Clock::new();
    let mut server = server_engine(&clock);
    let result = server.handle_datagram(clock.now(), PathId(0), client_addr(), &mut datagram.to_vec());
    if result.is_ok() {
        // Only a valid handshake (from the seed corpus) gets here: one answer, no event.
        assert_eq!(server.counters().handshakes, 1);
        assert_eq!(drain(&mut server).len(), 1);
        assert!(events(&mut server).is_empty());
        // The same handshake again is stale and unanswered.
        let again = server.handle_datagram(clock.now(), PathId(0), client_addr(), &mut datagram.to_vec());
        assert_eq!(again, Err(DropReason::StaleHandshake));
        assert!(drain(&mut server).is_empty());
    } else {
        assert_dropped_silently(&mut server, result);
        assert_eq!(server.peer_count(), 0);
    }
}

fn raw_to_established_server(datagram: &[u8]) {
    let clock = Clock::new();
    let mut server = server_engine(&clock);
    let session = connect_to_server(&mut server, &clock);
    let mut d = datagram.to_vec();
    if d.len() >= 4 {
        d[..4].copy_from_slice(&session.engine_index.to_be_bytes());
    }
    let result = server.handle_datagram(clock.now(), PathId(0), client_addr(), &mut d);
    assert_dropped_silently(&mut server, result);
    assert_eq!(server.peer_count(), 1);
}

fn raw_to_client(datagram: &[u8], connected: bool) {
    let clock = Clock::new();
    let mut client = client_engine(&clock);
    let mut d = datagram.to_vec();
    if connected {
        let session = accept_client(&mut client, &clock);
        if d.len() >= 4 {
            d[..4].copy_from_slice(&session.engine_index.to_be_bytes());
        }
    } else {
        client.connect(clock.now());
        assert_eq!(drain(&mut client).len(), 1);
    }
    let result = client.handle_datagram(clock.now(), PathId(0), server_addr(), &mut d);
    assert_dropped_silently(&mut client, result);
    assert_eq!(client.is_connected(), connected);
}

// ------------------------------------------------------------------------ scripted mode

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// Ops, one byte each (`op % 8`) followed by their operands:
/// - 0, 1, 2: `len: u16 le`, `len` bytes: seal them as one packet and deliver it;
/// - 3: same, but bytes 1..5 (a KCP conv, after the `Inner` type) are replaced by the
///   conv of the last stream the engine knows, so scripts can talk to client streams;
/// - 4: `n: u8`: advance the clock `n * 4` ms (`n * 1000` ms if `op & 0x80`), run timers;
/// - 5: `choice: u8`: answer pending `StreamOpened` (accept, or refuse with code
///   `choice`), then read every stream until it would block;
/// - 6: `what: u8`, `len: u8`, `len` bytes: write them (0), finish (1), reset (2), or
///   open a stream to the address they encode (3, client) on stream `what >> 2`;
/// - 7: `i: u8`: replay the `i`-th packet delivered so far; it must be refused.
struct Script<'a> {
    input: &'a [u8],
    side: Side,
    clock: Clock,
    engine: Engine,
    session: Session,
    peer: SocketAddr,
    streams: Vec<StreamId>,
    opened: Vec<StreamId>,
    delivered: Vec<Vec<u8>>,
    read_buf: Vec<u8>,
}

impl<'a> Script<'a> {
    fn new(input: &'a [u8], side: Side) -> Script<'a> {
        let clock = Clock::new();
        let (mut engine, peer) = match side {
            Side::Server => (server_engine(&clock), client_addr()),
            Side::Client => (client_engine(&clock), server_addr()),
        };
        let session = match side {
            Side::Server => connect_to_server(&mut engine, &clock),
            Side::Client => accept_client(&mut engine, &clock),
        };
        let read_buf = vec![0u8; engine.read_buffer_len()];
        Script {
            input,
            side,
            clock,
            engine,
            session,
            peer,
            streams: Vec::new(),
            opened: Vec::new(),
            delivered: Vec::new(),
            read_buf,
        }
    }

    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.input.split_first()?;
        self.input = rest;
        Some(b)
    }

    fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (taken, rest) = self.input.split_at(len.min(self.input.len()));
        self.input = rest;
        taken
    }

    fn u16(&mut self) -> usize {
        let lo = self.byte().unwrap_or(0) as usize;
        let hi = self.byte().unwrap_or(0) as usize;
        lo | hi << 8
    }

    fn run(mut self) {
        while let Some(op) = self.byte() {
            match op % 8 {
                0..=2 => {
                    let len = self.u16();
                    let plain = self.bytes(len).to_vec();
                    self.deliver_sealed(&plain);
                }
                3 => {
                    let len = self.u16();
                    let mut plain = self.bytes(len).to_vec();
                    if plain.len() >= 5
                        && let Some(id) = self.streams.last()
                    {
                        plain[1..5].copy_from_slice(&id.conv.to_le_bytes());
                    }
                    self.deliver_sealed(&plain);
                }
                4 => {
                    let n = self.byte().unwrap_or(0) as u64;
                    self.clock
                        .advance(if op & 0x80 != 0 { n * 1000 } else { n * 4 });
                    self.engine.handle_timeout(self.clock.now());
                }
                5 => {
                    let choice = self.byte().unwrap_or(0);
                    self.answer_opens(choice);
                    self.read_all();
                }
                6 => {
                    let what = self.byte().unwrap_or(0);
                    let len = self.byte().unwrap_or(0) as usize;
                    let data = self.bytes(len);
                    self.stream_op(what, data);
                }
                _ => {
                    let i = self.byte().unwrap_or(0) as usize;
                    self.replay(i);
                }
            }
            self.check_output();
        }
        // A long silence: the peer is gone, and every stream with it.
        let timeout = EngineConfig::new(Role::Server, PSK, [0; 32]).peer_timeout;
        self.clock.advance(timeout.as_millis() as u64 + 1000);
        self.engine.handle_timeout(self.clock.now());
        self.check_output();
        assert_eq!(
            self.engine.live_streams(),
            0,
            "streams outlived their silent peer"
        );
    }

    fn deliver_sealed(&mut self, plain: &[u8]) {
        let mut packet = Vec::new();
        if self
            .session
            .crypto
            .seal(self.session.engine_index, plain, &mut packet)
            .is_err()
        {
            return;
        }
        let _ = self
            .engine
            .handle_datagram(self.clock.now(), PathId(0), self.peer, &mut packet.clone());
        self.delivered.push(packet);
    }

    fn replay(&mut self, i: usize) {
        if self.delivered.is_empty() {
            return;
        }
        self.check_output();
        let mut packet = self.delivered[i % self.delivered.len()].clone();
        let result = self
            .engine
            .handle_datagram(self.clock.now(), PathId(0), self.peer, &mut packet);
        assert!(result.is_err(), "replayed packet accepted");
        assert!(
            drain(&mut self.engine).is_empty(),
            "engine answered a replayed packet"
        );
        assert!(
            events(&mut self.engine).is_empty(),
            "replayed packet raised an event"
        );
    }

    fn answer_opens(&mut self, choice: u8) {
        for id in std::mem::take(&mut self.opened) {
            let _ = match choice % 8 {
                0 | 7 => self.engine.accept_stream(id),
                code => self.engine.refuse_stream(id, open_error(code)),
            };
        }
    }

    fn read_all(&mut self) {
        for id in self.streams.clone() {
            for _ in 0..64 {
                match self.engine.stream_read(id, &mut self.read_buf) {
                    Ok(ReadOutcome::Data(range)) => assert!(range.end <= self.read_buf.len()),
                    Ok(ReadOutcome::WouldBlock | ReadOutcome::Fin) | Err(_) => break,
                }
            }
        }
    }

    fn stream_op(&mut self, what: u8, data: &[u8]) {
        let now = self.clock.now();
        let pick = (what >> 2) as usize;
        let id = (!self.streams.is_empty()).then(|| self.streams[pick % self.streams.len()]);
        match (what % 4, id) {
            (0, Some(id)) => {
                if let Ok(n) = self.engine.stream_write(now, id, data) {
                    assert!(n <= data.len());
                }
            }
            (1, Some(id)) => {
                let _ = self.engine.stream_finish(id);
            }
            (2, Some(id)) => self.engine.reset_stream(id),
            (3, _) if self.side == Side::Client => {
                let target = TargetAddr::parse(data)
                    .map(|(t, _)| t)
                    .unwrap_or_else(|_| TargetAddr::Domain("origin.test".into(), 80));
                if let Ok(id) = self.engine.open_stream(now, &target) {
                    self.streams.push(id);
                }
            }
            _ => {}
        }
    }

    /// Everything the engine sends goes to its peer, under the session (or, from a client,
    /// as a fresh handshake), and parses; events are tracked for later ops.
    fn check_output(&mut self) {
        for mut t in drain(&mut self.engine) {
            assert_eq!(t.peer, self.peer, "datagram to a stranger");
            let to_us = IndexMask::new(&PSK).unmask(&t.payload) == Some(self.session.own_index);
            if to_us {
                let opened = self
                    .session
                    .crypto
                    .open_in_place(&mut t.payload)
                    .expect("engine sent a packet that does not open");
                Inner::parse(opened.plaintext).expect("engine sent an unparsable inner frame");
            } else {
                assert!(
                    self.side == Side::Client,
                    "server sent something other than a sealed packet"
                );
                Responder::read(&PSK, &t.payload)
                    .expect("client sent neither a sealed packet nor a handshake");
            }
        }
        for e in events(&mut self.engine) {
            match e {
                Event::StreamOpened { id, target } => {
                    assert!(self.side == Side::Server);
                    let mut out = Vec::new();
                    target.emit(&mut out).expect("an opened target emits");
                    self.streams.push(id);
                    self.opened.push(id);
                }
                Event::StreamClosed(id) => {
                    self.streams.retain(|s| *s != id);
                    self.opened.retain(|s| *s != id);
                }
                Event::Connected { .. }
                | Event::PathFallback { .. }
                | Event::ServerUnanswered { .. } => assert!(self.side == Side::Client),
                Event::StreamReplied { .. } => assert!(self.side == Side::Client),
                Event::Readable(_) | Event::Writable(_) => {}
            }
        }
    }
}

fn open_error(code: u8) -> OpenError {
    match code {
        1 => OpenError::GeneralFailure,
        2 => OpenError::NotAllowed,
        3 => OpenError::NetworkUnreachable,
        4 => OpenError::HostUnreachable,
        5 => OpenError::ConnectionRefused,
        _ => OpenError::TtlExpired,
    }
}

// ------------------------------------------------------------------------ seeds

/// A few valid inputs, written by `cargo xtask fuzz` through PAQET_FUZZ_SEEDS=DIR before
/// libFuzzer reads the corpus (libFuzzer calls the init hook first).
mod seeds {
    use super::*;

    const KCP_PUSH: u8 = 81;
    const KCP_ACK: u8 = 82;

    pub fn write_if_asked() {
        let Some(dir) = std::env::var_os("PAQET_FUZZ_SEEDS") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("creating the seed directory");
        for (name, bytes) in all() {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("writing a seed");
        }
    }

    fn kcp(conv: u32, cmd: u8, sn: u32, una: u32, data: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&conv.to_le_bytes());
        s.push(cmd);
        s.push(0); // frg
        s.extend_from_slice(&128u16.to_le_bytes()); // wnd
        s.extend_from_slice(&0u32.to_le_bytes()); // ts
        s.extend_from_slice(&sn.to_le_bytes());
        s.extend_from_slice(&una.to_le_bytes());
        s.extend_from_slice(&(data.len() as u32).to_le_bytes());
        s.extend_from_slice(data);
        s
    }

    fn msg(m: StreamMsg<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        m.emit(&mut out).unwrap();
        out
    }

    fn inner(i: Inner<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        i.emit(&mut out);
        out
    }

    /// Script builder for mode 3.
    struct S(Vec<u8>);

    impl S {
        fn new(client: bool) -> S {
            S(vec![if client { 7 } else { 3 }])
        }
        fn seal(mut self, op: u8, plain: &[u8]) -> S {
            self.0.push(op);
            self.0
                .extend_from_slice(&(plain.len() as u16).to_le_bytes());
            self.0.extend_from_slice(plain);
            self
        }
        fn op(mut self, bytes: &[u8]) -> S {
            self.0.extend_from_slice(bytes);
            self
        }
    }

    fn target_bytes(t: &TargetAddr) -> Vec<u8> {
        let mut out = Vec::new();
        t.emit(&mut out).unwrap();
        out
    }

    pub fn all() -> Vec<(&'static str, Vec<u8>)> {
        let origin = TargetAddr::Domain("origin.test".into(), 80);
        let v4 = TargetAddr::Ip("198.18.0.2:443".parse().unwrap());
        let v6 = TargetAddr::Ip("[2001:2::1]:8080".parse().unwrap());
        let conv = 7u32;

        let (_, mut hello) = Initiator::start(&PSK, &handshake_init_payload(UNIX_MS)).unwrap();
        hello.extend_from_slice(&[0; paqet::engine::crypto::cookie::MAC2_LEN]);
        let with_mode = |mode: u8, body: &[u8]| [&[mode][..], body].concat();

        let open = inner(Inner::Kcp(&kcp(
            conv,
            KCP_PUSH,
            0,
            0,
            &msg(StreamMsg::Open(origin.clone())),
        )));
        let data = inner(Inner::Kcp(&kcp(
            conv,
            KCP_PUSH,
            1,
            0,
            &msg(StreamMsg::Data(b"GET / HTTP/1.0\r\n\r\n")),
        )));
        let fin = inner(Inner::Kcp(&kcp(conv, KCP_PUSH, 2, 0, &msg(StreamMsg::Fin))));
        let ack = inner(Inner::Kcp(&kcp(conv, KCP_ACK, 0, 1, &[])));
        let server_script = S::new(false)
            .seal(0, &open)
            .op(&[5, 0]) // accept
            .seal(0, &data)
            .op(&[5, 0]) // read
            .op(&[6, 0, 5])
            .op(b"hello")
            .op(&[4, 10]) // 40 ms
            .seal(0, &ack)
            .seal(0, &fin)
            .op(&[6, 1, 0]) // finish
            .op(&[5, 0])
            .seal(0, &inner(Inner::Keepalive { padding: b"pad" }))
            .op(&[7, 1]) // replay
            .op(&[4 | 0x80, 3]) // 3 s
            .0;
        let refused = S::new(false)
            .seal(0, &open)
            .op(&[5, 5])
            .seal(0, &inner(Inner::Reset { conv }))
            .0;

        let reply = inner(Inner::Kcp(&kcp(
            0,
            KCP_PUSH,
            0,
            1,
            &msg(StreamMsg::Reply(Ok(()))),
        )));
        let reply_data = inner(Inner::Kcp(&kcp(
            0,
            KCP_PUSH,
            1,
            1,
            &msg(StreamMsg::Data(b"HTTP/1.0 200 OK\r\n\r\n")),
        )));
        let reply_fin = inner(Inner::Kcp(&kcp(0, KCP_PUSH, 2, 1, &msg(StreamMsg::Fin))));
        let client_ack = inner(Inner::Kcp(&kcp(0, KCP_ACK, 0, 1, &[])));
        let open_v4 = target_bytes(&v4);
        let client_script = S::new(true)
            .op(&[6, 3, open_v4.len() as u8])
            .op(&open_v4)
            .seal(3, &client_ack)
            .seal(3, &reply)
            .op(&[5, 0])
            .op(&[6, 0, 4])
            .op(b"ping")
            .seal(3, &reply_data)
            .op(&[5, 0])
            .seal(3, &reply_fin)
            .op(&[6, 1, 0])
            .op(&[4, 50])
            .seal(0, &inner(Inner::Keepalive { padding: b"" }))
            .op(&[7, 0])
            .op(&[4 | 0x80, 5]) // 5 s: the client re-handshakes
            .0;
        let client_refused = S::new(true)
            .op(&[6, 3, 0])
            .seal(
                3,
                &inner(Inner::Kcp(&kcp(
                    0,
                    KCP_PUSH,
                    0,
                    1,
                    &msg(StreamMsg::Reply(Err(OpenError::NotAllowed))),
                ))),
            )
            .op(&[5, 0])
            .0;

        let mut header = [0u8; DATA_HEADER_LEN];
        DataHeader {
            receiver_index: 1,
            masked_counter: 2,
        }
        .emit(&mut header);
        vec![
            ("handshake", with_mode(0, &hello)),
            ("garbage-48", with_mode(0, &[0xa5; 48])),
            ("header", with_mode(0, &header)),
            ("target-v4", with_mode(0, &target_bytes(&v4))),
            ("target-v6", with_mode(0, &target_bytes(&v6))),
            ("target-domain", with_mode(0, &target_bytes(&origin))),
            (
                "msg-open",
                with_mode(0, &msg(StreamMsg::Open(origin.clone()))),
            ),
            (
                "msg-reply",
                with_mode(0, &msg(StreamMsg::Reply(Err(OpenError::HostUnreachable)))),
            ),
            (
                "inner-reset",
                with_mode(0, &inner(Inner::Reset { conv: 9 })),
            ),
            (
                "init-payload",
                with_mode(0, &handshake_init_payload(UNIX_MS)),
            ),
            ("established-server", with_mode(1, &[0x5a; 64])),
            ("handshaking-client", with_mode(2, &[0x5a; 64])),
            ("connected-client", with_mode(6, &[0x5a; 64])),
            ("server-script", server_script),
            ("server-refuses", refused),
            ("client-script", client_script),
            ("client-refused", client_refused),
        ]
    }
}
