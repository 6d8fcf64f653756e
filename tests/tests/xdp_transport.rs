//! The xdp transport end to end on a real veth: an `XdpTransport` in each of two
//! namespaces (server 198.18.0.2:4000, client 198.18.0.1 with a picked port) moves
//! 10,000 datagrams of varied sizes each way, for both wire shapes (and TCP-shaped over
//! IPv6, 2001:2::1 ⇄ 2001:2::2), and every payload is checked byte for byte.
//!
//! While it runs:
//! - neither namespace's kernel sees any of it: the namespace-wide SNMP counters that
//!   would move if it did (Tcp InSegs/OutRsts, Udp InDatagrams/NoPorts, Icmp
//!   OutDestUnreachs) stay put, although nothing listens on either port;
//! - the client namespace throws garbage at the server from an AF_PACKET socket:
//!   random non-IP frames and truncated IPv4 headers (left to the kernel by
//!   `paqet_steer`, which counts them malformed), frames with valid headers and an
//!   empty payload (redirected, then dropped and counted by the transport), and frames
//!   with valid headers and random payloads from another port (redirected and, on the
//!   UDP wire, handed on: only the engine's AEAD can reject those; on the TCP-shaped
//!   wire no flow takes them, since that port never sent a keyed SYN, and they are
//!   dropped and counted). The transfer carries on regardless. On the TCP-shaped wire
//!   the client's first datagrams wait for the flow's handshake (SYN, SYN-ACK, ACK),
//!   which is counted exactly.
//!
//! Flow control is a sliding window smaller than any ring, so no frame can be lost by
//! design, and the test asserts that (every frame sent was received, no drops) as
//! well as integrity. Stalls fall back to go-back-N so a lost frame shows up as a
//! failed loss assertion, not a hang.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Barrier, Mutex, Once};
use std::time::{Duration, Instant};

use paqet::engine::Transmit;
use paqet::transport::xdp::{AttachMode, Follow, WireShape, XdpCountersSnapshot, XdpOptions, XdpTransport};
use paqet::transport::{RecvBatch, Transport, Via};
use paqet_tests::{TwoHosts, require_root};

const SERVER_PORT: u16 = 4000;
const DATAGRAMS: u32 = 10_000;
/// Datagrams in flight per direction: far below the 1024-frame RX ring and the veth
/// backlog, so nothing may be dropped.
const WINDOW: u32 = 256;
const STALL: Duration = Duration::from_millis(300);
const DEADLINE: Duration = Duration::from_secs(90);
const HEADER: usize = 9;
const KIND_DATA: u8 = 0xd1;
const KIND_ACK: u8 = 0xa5;
/// Garbage frames of each kind.
const GARBAGE_EACH: usize = 10;
const FOREIGN_PORT: u16 = 9999;
/// Datagrams each side sends before the garbage, and the rest after it.
const GATE: u32 = DATAGRAMS / 2;

/// One transfer at a time: two cores, and the measured rate should mean something.
static SERIAL: Mutex<()> = Mutex::new(());

fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .try_init();
    });
}

#[test]
fn tcp_shaped_frames_both_ways_kernel_blind() {
    run_case(WireShape::Tcp, "xt", false);
}

#[test]
fn udp_frames_both_ways_kernel_blind() {
    run_case(WireShape::Udp, "xu", false);
}

#[test]
fn tcp_shaped_frames_over_ipv6() {
    run_case(WireShape::Tcp, "x6", true);
}

/// Body size of datagram `seq`: the extremes, tiny ones, and a spread in between.
fn body_len(seq: u32, max_body: usize) -> usize {
    match seq % 7 {
        0 => max_body,
        1 => 0,
        2 => 1,
        _ => (seq as usize).wrapping_mul(7919) % (max_body + 1),
    }
}

fn body_byte(seed: u64, seq: u32, j: usize) -> u8 {
    let x = (seed ^ (u64::from(seq) << 20) ^ (j as u64 / 8)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> (8 * (j % 8))) as u8
}

fn datagram(kind: u8, seq: u32, ack: u32, seed: u64, max_body: usize) -> Vec<u8> {
    let len = if kind == KIND_DATA { body_len(seq, max_body) } else { 0 };
    let mut d = Vec::with_capacity(HEADER + len);
    d.push(kind);
    d.extend_from_slice(&seq.to_be_bytes());
    d.extend_from_slice(&ack.to_be_bytes());
    d.extend((0..len).map(|j| body_byte(seed, seq, j)));
    d
}

/// What one side saw.
#[derive(Debug, Default)]
struct Outcome {
    received_unique: u32,
    duplicates: u64,
    corrupt: u64,
    foreign: u64,
    retransmit_rounds: u64,
    elapsed: Duration,
    /// Until the first half had gone both ways (before the garbage pause).
    first_half: Duration,
    counters: XdpCountersSnapshot,
    socket_drops: (u64, u64, u64),
    steer_redirected: u64,
    steer_no_socket: u64,
}

struct Shared {
    done: [AtomicBool; 2],
    /// Set by the server when the first datagram arrived (the garbage starts then).
    flowing: AtomicBool,
    garbage_sent: AtomicBool,
    /// Both transports are open (so no frame reaches a namespace before its steering).
    opened: Barrier,
    settle: Barrier,
}

/// The sliding-window exchange one side runs; `me` is 0 (client) or 1 (server).
struct Side<'a> {
    t: &'a XdpTransport,
    me: usize,
    shared: &'a Shared,
    peer: Option<SocketAddr>,
    send_seed: u64,
    recv_seed: u64,
    max_body: usize,
    next: u32,
    peer_acked: u32,
    got: Vec<bool>,
    contiguous: u32,
    out: Outcome,
}

impl Side<'_> {
    fn send_window(&mut self) -> bool {
        let Some(peer) = self.peer else { return false };
        let end = (self.peer_acked + WINDOW).min(self.limit());
        if self.next >= end {
            return false;
        }
        let batch: Vec<Transmit> = (self.next..end)
            .map(|seq| Transmit {
                peer,
                path: paqet::engine::PathId(0),
                payload: datagram(KIND_DATA, seq, self.contiguous, self.send_seed, self.max_body),
            })
            .collect();
        self.t.send_batch(&batch).expect("send_batch");
        self.next = end;
        true
    }

    fn send_ack(&self) {
        if let Some(peer) = self.peer {
            let ack = Transmit {
                peer,
                path: paqet::engine::PathId(0),
                payload: datagram(KIND_ACK, u32::MAX, self.contiguous, 0, 0),
            };
            self.t.send_batch(&[ack]).expect("send_batch");
        }
    }

    /// Handles one received datagram; true if it was new data (needs an ack).
    fn on_datagram(&mut self, from: SocketAddr, bytes: &[u8]) -> bool {
        if from.port() == FOREIGN_PORT {
            self.out.foreign += 1;
            return false;
        }
        if self.peer.is_none() {
            self.peer = Some(from);
        }
        if Some(from) != self.peer || bytes.len() < HEADER {
            self.out.corrupt += 1;
            return false;
        }
        let seq = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let ack = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        self.peer_acked = self.peer_acked.max(ack.min(DATAGRAMS));
        match bytes[0] {
            KIND_ACK => false,
            KIND_DATA if seq < DATAGRAMS => {
                let want = datagram(KIND_DATA, seq, ack, self.recv_seed, self.max_body);
                if bytes != want.as_slice() {
                    self.out.corrupt += 1;
                    return false;
                }
                if self.got[seq as usize] {
                    self.out.duplicates += 1;
                } else {
                    self.got[seq as usize] = true;
                    self.out.received_unique += 1;
                    while self.contiguous < DATAGRAMS && self.got[self.contiguous as usize] {
                        self.contiguous += 1;
                    }
                }
                true
            }
            _ => {
                self.out.corrupt += 1;
                false
            }
        }
    }

    /// Half the datagrams wait until the garbage has gone out, so the second half shows
    /// the transport still works after it.
    fn limit(&self) -> u32 {
        if self.shared.garbage_sent.load(Ordering::Acquire) {
            DATAGRAMS
        } else {
            GATE
        }
    }

    fn finished(&self) -> bool {
        self.contiguous == DATAGRAMS && self.peer_acked == DATAGRAMS
    }

    async fn recv_some(&mut self, batch: &mut RecvBatch, wait: Duration) -> bool {
        match tokio::time::timeout(wait, self.t.recv_batch(batch)).await {
            Err(_) => false,
            Ok(r) => {
                r.expect("recv_batch");
                let items: Vec<(SocketAddr, Vec<u8>, Option<Via>)> = batch
                    .filled()
                    .iter()
                    .map(|s| (s.peer, s.payload().to_vec(), s.via))
                    .collect();
                let mut new_data = false;
                for (from, bytes, link) in items {
                    let rejected_before = (self.out.corrupt, self.out.foreign);
                    new_data |= self.on_datagram(from, &bytes);
                    // This test's content check stands in for the engine's authentication,
                    // which is what lets the transport trust the frame's source MAC.
                    if (self.out.corrupt, self.out.foreign) == rejected_before {
                        self.t.peer_authenticated(from, link);
                    }
                }
                new_data
            }
        }
    }

    async fn run(&mut self) {
        let mut batch = RecvBatch::new(64, 2048);
        let start = Instant::now();
        let mut last_progress = (Instant::now(), self.peer_acked);
        while !(self.shared.done.iter().all(|d| d.load(Ordering::Acquire))
            && self.shared.garbage_sent.load(Ordering::Acquire))
        {
            assert!(
                start.elapsed() < DEADLINE,
                "side {} timed out: {:?} next={} acked={}",
                self.me,
                self.out,
                self.next,
                self.peer_acked
            );
            let sent = self.send_window();
            let new_data = self.recv_some(&mut batch, Duration::from_millis(20)).await;
            if self.me == 1 && self.out.received_unique > 0 {
                self.shared.flowing.store(true, Ordering::Release);
            }
            if new_data && !sent {
                self.send_ack();
            }
            if self.peer_acked != last_progress.1 || self.peer_acked == self.limit() {
                last_progress = (Instant::now(), self.peer_acked);
            } else if self.peer_acked < DATAGRAMS && last_progress.0.elapsed() > STALL && self.peer.is_some() {
                // Go-back-N: resend from the first unacknowledged datagram.
                self.next = self.peer_acked;
                self.out.retransmit_rounds += 1;
                last_progress = (Instant::now(), self.peer_acked);
            }
            if self.out.first_half.is_zero() && self.contiguous >= GATE && self.peer_acked >= GATE {
                self.out.first_half = start.elapsed();
            }
            if self.finished() && !self.shared.done[self.me].swap(true, Ordering::AcqRel) {
                self.out.elapsed = start.elapsed();
                // The peer may still miss our last ack: one more for it.
                self.send_ack();
            }
        }
        // Both sides are done: let stray acks land, take them, then count.
        self.shared.settle.wait();
        let settle_until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < settle_until {
            self.recv_some(&mut batch, Duration::from_millis(50)).await;
        }
        self.out.counters = self.t.counters().snapshot();
        self.out.socket_drops = self.t.socket_drops();
        let s = self.t.steering_stats().expect("steering stats");
        self.out.steer_redirected = s.redirected;
        self.out.steer_no_socket = s.no_socket;
        self.shared.settle.wait();
    }
}

fn side(
    opts: XdpOptions,
    me: usize,
    shared: &Shared,
    peer: Option<SocketAddr>,
    seeds: (u64, u64),
    local_tx: Option<mpsc::Sender<SocketAddr>>,
) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let t = XdpTransport::open(opts).expect("opening the xdp transport");
        if let Some(tx) = local_tx {
            tx.send(t.local_addr()).expect("announcing the client address");
        }
        shared.opened.wait();
        let max_body = t.max_payload() - HEADER;
        let mut s = Side {
            t: &t,
            me,
            shared,
            peer,
            send_seed: seeds.0,
            recv_seed: seeds.1,
            max_body,
            next: 0,
            peer_acked: 0,
            got: vec![false; DATAGRAMS as usize],
            contiguous: 0,
            out: Outcome::default(),
        };
        s.run().await;
        s.out
    })
}

/// The counters of /proc/net/snmp that move when the kernel handles (or answers) a
/// TCP, UDP or ICMP packet, read inside the namespace.
fn kernel_counters(ns: &paqet_tests::Netns) -> Vec<(String, u64)> {
    let out = ns.exec(&["cat", "/proc/net/snmp"]).expect("reading /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let wanted = [
        ("Tcp", "InSegs"),
        ("Tcp", "OutRsts"),
        ("Udp", "InDatagrams"),
        ("Udp", "NoPorts"),
        ("Icmp", "OutDestUnreachs"),
    ];
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((proto, names)), Some((_, values))) = (names.split_once(':'), values.split_once(':')) else {
            continue;
        };
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if wanted.contains(&(proto, n)) {
                found.push((format!("{proto}{n}"), v.parse().unwrap_or(u64::MAX)));
            }
        }
    }
    assert_eq!(
        found.len(),
        wanted.len(),
        "counters missing from /proc/net/snmp: {text}"
    );
    // TCP's counters above cover IPv6 too; UDP and ICMP have their own for IPv6.
    let out = ns.exec(&["cat", "/proc/net/snmp6"]).expect("reading /proc/net/snmp6");
    let text6 = String::from_utf8_lossy(&out.stdout).to_string();
    let wanted6 = ["Udp6InDatagrams", "Udp6NoPorts", "Icmp6OutDestUnreachs"];
    for line in text6.lines() {
        if let Some((name, value)) = line.split_once(char::is_whitespace)
            && wanted6.contains(&name)
        {
            found.push((name.to_string(), value.trim().parse().unwrap_or(u64::MAX)));
        }
    }
    assert_eq!(
        found.len(),
        wanted.len() + wanted6.len(),
        "counters missing from /proc/net/snmp6: {text6}"
    );
    found
}

/// Turns IPv6 on in both namespaces (quietly: no router solicitations) and gives the
/// link 2001:2::1 (client) and 2001:2::2 (server); returns their addresses.
///
/// DAD is off on the link so its link-local addresses are usable at once: the kernel
/// sends a neighbour solicitation that no packet asked for (how the transport triggers
/// resolution) only from a link-local source, and a tentative one does not count. On
/// a real host the link-local address has long finished DAD.
fn ipv6_hosts(hosts: &TwoHosts) -> (IpAddr, IpAddr) {
    for (ns, ifname, cidr) in [
        (&hosts.client, &hosts.client_if, "2001:2::1/64"),
        (&hosts.server, &hosts.server_if, "2001:2::2/64"),
    ] {
        ns.sysctl("net.ipv6.conf.all.accept_ra", "0").expect("accept_ra");
        ns.sysctl("net.ipv6.conf.default.accept_ra", "0").expect("accept_ra");
        ns.sysctl(&format!("net.ipv6.conf.{ifname}.accept_dad"), "0")
            .expect("accept_dad");
        ns.enable_ipv6().expect("enabling IPv6");
        ns.exec(&["ip", "-6", "addr", "add", cidr, "dev", ifname, "nodad"])
            .expect("adding an IPv6 address");
    }
    ("2001:2::1".parse().expect("v6"), "2001:2::2".parse().expect("v6"))
}

fn run_case(wire: WireShape, tag: &str, ipv6: bool) {
    let family = if ipv6 { "IPv6" } else { "IPv4" };
    if !require_root(&format!("xdp_transport {wire} {family}")) {
        return;
    }
    init_tracing();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let hosts = TwoHosts::new(tag).expect("creating the namespaces");
    let (client_ip, server_ip) = if ipv6 {
        ipv6_hosts(&hosts)
    } else {
        (IpAddr::V4(TwoHosts::CLIENT_IP), IpAddr::V4(TwoHosts::SERVER_IP))
    };
    let server_mac = hosts.server.mac(&hosts.server_if).expect("server MAC");
    let client_mac = hosts.client.mac(&hosts.client_if).expect("client MAC");
    let server_addr = SocketAddr::new(server_ip, SERVER_PORT);
    let pid = std::process::id();

    let shared = Shared {
        done: [AtomicBool::new(false), AtomicBool::new(false)],
        flowing: AtomicBool::new(false),
        garbage_sent: AtomicBool::new(false),
        opened: Barrier::new(2),
        settle: Barrier::new(2),
    };
    let server_opts = XdpOptions {
        interface: hosts.server_if.clone(),
        instance: format!("test-{tag}-server-{pid}"),
        local: server_addr,
        local_other_family: None,
        follow: Follow::Fixed,
        peer: None,
        wire,
        mode: AttachMode::Auto,
        // Any key, the same at both ends: the TCP-shaped wire's SYNs must carry its tag.
        syn_key: [7; 32],
    };
    let client_opts = XdpOptions {
        interface: hosts.client_if.clone(),
        instance: format!("test-{tag}-client-{pid}"),
        local: SocketAddr::new(client_ip, 0),
        local_other_family: None,
        follow: Follow::Fixed,
        peer: Some(server_addr),
        wire,
        mode: AttachMode::Auto,
        // Any key, the same at both ends: the TCP-shaped wire's SYNs must carry its tag.
        syn_key: [7; 32],
    };
    let before = (kernel_counters(&hosts.client), kernel_counters(&hosts.server));
    let (addr_tx, addr_rx) = mpsc::channel();

    let (client, server) = std::thread::scope(|s| {
        let shared = &shared;
        let hosts = &hosts;
        let server = s.spawn(move || {
            hosts
                .server
                .run(move || side(server_opts, 1, shared, None, (2, 1), None))
                .expect("server namespace")
        });
        let client = s.spawn(move || {
            hosts
                .client
                .run(move || side(client_opts, 0, shared, Some(server_addr), (1, 2), Some(addr_tx)))
                .expect("client namespace")
        });
        let garbage = s.spawn(move || {
            let client_addr = addr_rx.recv_timeout(Duration::from_secs(30)).expect("client address");
            let flowing = paqet_tests::wait_for(|| shared.flowing.load(Ordering::Acquire), Duration::from_secs(30));
            assert!(flowing, "no datagram reached the server");
            hosts
                .client
                .run(|| send_garbage(&hosts.client_if, client_mac, server_mac, client_addr, server_addr, wire))
                .expect("client namespace");
            shared.garbage_sent.store(true, Ordering::Release);
        });
        garbage.join().expect("garbage thread");
        (client.join().expect("client side"), server.join().expect("server side"))
    });
    let after = (kernel_counters(&hosts.client), kernel_counters(&hosts.server));

    // Informational: the first half, which runs without pauses.
    let per_sec = 2.0 * f64::from(GATE) / client.first_half.max(server.first_half).as_secs_f64();
    eprintln!("xdp_transport {wire} {family}: client {client:?}");
    eprintln!("xdp_transport {wire} {family}: server {server:?}");
    eprintln!("xdp_transport {wire} {family}: {per_sec:.0} datagrams/s (both directions, window {WINDOW})");

    // Integrity: every datagram, intact, exactly where it was sent.
    for (name, o) in [("client", &client), ("server", &server)] {
        assert_eq!(o.received_unique, DATAGRAMS, "{name} missed datagrams");
        assert_eq!(o.corrupt, 0, "{name} saw corrupted datagrams");
    }
    // UDP wire: only the server gets the garbage with a payload; the empty ones are
    // dropped. TCP-shaped wire: the garbage comes from a port that never sent a keyed
    // SYN, so no flow takes any of it, and nothing answers it.
    let garbage_handed_on = if wire == WireShape::Tcp { 0 } else { GARBAGE_EACH as u64 };
    assert_eq!(server.foreign, garbage_handed_on, "random-payload garbage handed on");
    assert_eq!(client.foreign, 0);
    if wire == WireShape::Tcp {
        assert_eq!(server.counters.rx_dropped_malformed, 0);
        assert_eq!(
            server.counters.rx_dropped_flow,
            2 * GARBAGE_EACH as u64,
            "garbage of no flow dropped and counted"
        );
        // One handshake: SYN and ACK from the client, SYN-ACK from the server; then the
        // server's bare ACK at the client's first data, which announces its scaled
        // window (the client knew only the SYN-ACK's 64240 bytes). Data both ways
        // carries every later ACK: no more bare ones.
        assert_eq!((client.counters.tx_control, server.counters.rx_control), (2, 2));
        assert_eq!((server.counters.tx_control, client.counters.rx_control), (2, 2));
        assert_eq!(client.counters.rx_dropped_flow, 0);
        assert_eq!(
            (client.counters.tx_dropped_flow, server.counters.tx_dropped_flow),
            (0, 0)
        );
    } else {
        assert_eq!(
            server.counters.rx_dropped_malformed, GARBAGE_EACH as u64,
            "empty-payload garbage dropped and counted"
        );
    }
    assert_eq!(client.counters.rx_dropped_malformed, 0);

    // Nothing lost on the way: each frame sent was received, none refused.
    for (name, o) in [("client", &client), ("server", &server)] {
        let c = &o.counters;
        assert_eq!(
            (c.tx_dropped_full, c.tx_dropped_no_neighbour, c.tx_dropped_invalid),
            (0, 0, 0),
            "{name} TX drops"
        );
        assert_eq!(o.socket_drops, (0, 0, 0), "{name} AF_XDP socket drops");
        assert_eq!(o.steer_no_socket, 0, "{name}: matched frames with no socket");
        assert_eq!(o.retransmit_rounds, 0, "{name} had to retransmit: a frame was lost");
    }
    assert_eq!(server.counters.rx_frames, client.counters.tx_frames + garbage_handed_on);
    assert_eq!(client.counters.rx_frames, server.counters.tx_frames);
    let taken = |c: &XdpCountersSnapshot| c.rx_frames + c.rx_dropped_malformed + c.rx_control + c.rx_dropped_flow;
    assert_eq!(server.steer_redirected, taken(&server.counters));
    assert_eq!(client.steer_redirected, taken(&client.counters));

    // The kernels never saw a relay frame, and answered none.
    assert_eq!(after.0, before.0, "client namespace's kernel saw relay traffic");
    assert_eq!(after.1, before.1, "server namespace's kernel saw relay traffic");
}

/// Ethernet + IPv4/IPv6 + L4 header with valid lengths (checksums left zero: nothing
/// that reads these checks them), then `payload`.
fn frame(dst: [u8; 6], src: [u8; 6], from: SocketAddr, to: SocketAddr, wire: WireShape, payload: &[u8]) -> Vec<u8> {
    let proto = if wire == WireShape::Tcp { 6 } else { 17 };
    let l4 = if wire == WireShape::Tcp { 20 } else { 8 };
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    match (from.ip(), to.ip()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let total = (20 + l4 + payload.len()) as u16;
            f.extend_from_slice(&[0x08, 0x00]);
            f.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, proto, 0, 0]);
            f.extend_from_slice(&a.octets());
            f.extend_from_slice(&b.octets());
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let plen = (l4 + payload.len()) as u16;
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend_from_slice(&[0x60, 0, 0, 0, (plen >> 8) as u8, plen as u8, proto, 64]);
            f.extend_from_slice(&a.octets());
            f.extend_from_slice(&b.octets());
        }
        _ => panic!("mixed address families"),
    }
    f.extend_from_slice(&from.port().to_be_bytes());
    f.extend_from_slice(&to.port().to_be_bytes());
    if wire == WireShape::Tcp {
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        let ulen = (8 + payload.len()) as u16;
        f.extend_from_slice(&[(ulen >> 8) as u8, ulen as u8, 0, 0]);
    }
    f.extend_from_slice(payload);
    f
}

/// Sends the garbage described in the module doc from an AF_PACKET socket.
fn send_garbage(ifname: &str, src: [u8; 6], dst: [u8; 6], client: SocketAddr, server: SocketAddr, wire: WireShape) {
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect()
    };
    let foreign = SocketAddr::new(client.ip(), FOREIGN_PORT);
    let mut frames = Vec::new();
    for i in 0..GARBAGE_EACH {
        // Not IP at all (a local experimental ethertype), random contents.
        let mut f = Vec::from(dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend(random(46 + i * 37));
        frames.push(f);
        // An IP header that claims far more bytes than the frame has.
        let mut t = frame(dst, src, foreign, server, wire, &random(8));
        let (len_at, ip_len) = if server.is_ipv4() { (16, 20) } else { (18, 40) };
        t[len_at] = 0x05;
        t.truncate(14 + ip_len + 4);
        frames.push(t);
        // Valid headers, empty payload: paqet's, but never a relay datagram.
        frames.push(frame(dst, src, foreign, server, wire, &[]));
        // Valid headers, random payload from another port: handed on to the engine.
        frames.push(frame(dst, src, foreign, server, wire, &random(1 + i * 97)));
    }

    paqet_tests::capture::inject(ifname, &frames, Duration::from_millis(2));
}
