//! The relay through a strict stateful firewall and NAT ([`paqet_tests::router`]): a
//! router namespace between client and server masquerades IPv4, forwards only flows
//! opened from the LAN, runs conntrack with `tcp_loose=0` and `be_liberal=0`, and drops
//! (and counts) whatever conntrack calls invalid. IPv6 goes through the same filter,
//! without NAT. The origin lives behind the server, as in the other relay suites.
//!
//! What it shows, for each address family:
//! - the TCP-shaped wire passes: a download through real curl is sha256-exact, the
//!   router tracks the flow as an ordinary established TCP connection, and its
//!   invalid-drop counter does not move during the transfer;
//! - a router that forgets the flow (`conntrack -F`) mid-stream: the client opens the
//!   flow again by itself and the stream carries on without losing a byte;
//! - a stream idle for longer than the router's established-flow timeout still gets
//!   the server's data afterwards (keepalives keep the router's state), and what an
//!   idle client costs in packets per second is printed;
//! - `TRANSPORT=auto` (and the default `WIRE=auto`) relays through a router that drops
//!   all UDP (on the TCP-shaped wire) and through one that drops the TCP wire (on UDP);
//! - a udp server with several engines (`THREADS`): a client whose NAT port moves until
//!   its datagrams reach another engine than its session's keeps its stream, exact;
//! - datagrams that go one way only (an upload through a UDP forward) stay in the
//!   router's window and keep the flow alive past 32 MiB and 4 s.

use std::io::{Read, Write};
use std::time::Duration;

use paqet_tests::relay::{ORIGIN_NAME, ORIGIN_PORT, RelayBed, RelayOptions, SERVER_PORT, SOCKS_PORT};
use paqet_tests::router::{self, Router};
use paqet_tests::{pattern, require_root, socks};

const MIB: u64 = 1 << 20;

/// A relay whose client sits behind the router; `transport`/`wire` as the configs say.
fn relay_behind_router(tag: &str, ipv6: bool, transport: &'static str, wire: Option<&str>) -> (RelayBed, Router) {
    let (bed, router, _key) = keyed_relay_behind_router(tag, ipv6, transport, wire, ("", ""));
    (bed, router)
}

/// [`relay_behind_router`] with extra config lines (client's, server's), and the key
/// both ends use.
fn keyed_relay_behind_router(
    tag: &str,
    ipv6: bool,
    transport: &'static str,
    wire: Option<&str>,
    (client_extra, server_extra): (&str, &str),
) -> (RelayBed, Router, String) {
    router::tools_present().expect("firewall tools");
    let (hosts, router) = router::behind_router(tag, ipv6).expect("client, router and server namespaces");
    let server_ip = router::server_ip(ipv6);
    let listen = std::net::SocketAddr::new(server_ip, SERVER_PORT);
    let wire_line = wire.map(|w| format!("WIRE={w}\n")).unwrap_or_default();
    let common = format!("TRANSPORT={transport}\n{wire_line}TIMEOUT=10\nLOG_LEVEL=debug\n");
    let mut opts = RelayOptions::new(transport).expect("relay options");
    opts.as_written = Some((
        format!("LISTEN_ADDR={listen}\n{common}{server_extra}"),
        format!("SOCKS_ADDR=127.0.0.1:{SOCKS_PORT}\nREMOTE_ADDR={listen}\nKCP_MODE=fast3\n{common}{client_extra}"),
    ));
    let bed = RelayBed::start_on_hosts(hosts, tag, &opts).expect("relay behind the router");
    (bed, router, opts.client_key)
}

/// A body fetched through the SOCKS port in two parts: `first` bytes, then `between`
/// runs (the client stops reading meanwhile), then the rest. Returns its sha256 and
/// length.
fn fetch_in_two_parts(bed: &RelayBed, len: u64, first: u64, between: impl FnOnce() + Send) -> (String, u64) {
    use sha2::{Digest, Sha256};
    let proxy = bed.socks_addr();
    let result = bed.hosts.client.run(move || -> anyhow::Result<(String, u64)> {
        let mut s = match socks::connect(proxy, ORIGIN_NAME, ORIGIN_PORT, None, 1)? {
            Ok(s) => s,
            Err(code) => anyhow::bail!("SOCKS refused with reply code {code}"),
        };
        write!(
            s,
            "GET /bytes/{len} HTTP/1.1\r\nHost: {ORIGIN_NAME}\r\nConnection: close\r\n\r\n"
        )?;
        // The header, byte by byte up to its end (it is short).
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            anyhow::ensure!(head.len() < 4096, "no end of the HTTP header");
            s.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        while got < first {
            let want = buf.len().min((first - got) as usize);
            let n = s.read(&mut buf[..want])?;
            anyhow::ensure!(n > 0, "the stream ended after {got} bytes");
            hash.update(&buf[..n]);
            got += n as u64;
        }
        between();
        let resumed = std::time::Instant::now();
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            got += n as u64;
        }
        eprintln!(
            "fetch: the {} bytes after the pause took {:.1} s",
            got - first,
            resumed.elapsed().as_secs_f64()
        );
        Ok((pattern::hex(&hash.finalize()), got))
    });
    match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("fetch through the relay failed: {e:#}\n{}", bed.logs()),
        Err(e) => panic!("entering the client namespace: {e:#}"),
    }
}

/// Real curl through the SOCKS port: its body's sha256 and length.
fn curl(bed: &RelayBed, len: u64) -> (String, u64) {
    let (hash, got, _) = bed.curl_bytes(len).expect("curl through the relay");
    (hash, got)
}

fn assert_exact(bed: &RelayBed, (hash, got): (String, u64), len: u64) {
    assert_eq!(got, len, "body length\n{}", bed.logs());
    assert_eq!(hash, pattern::sha256_hex(len, len), "body corrupted\n{}", bed.logs());
}

/// The router tracks the relay's flow as an ordinary assured, established TCP flow to
/// the server's port.
fn assert_tracked_as_tcp(router: &Router, bed: &RelayBed) {
    let flows = router.tcp_flows().expect("conntrack -L");
    let ours = flows
        .lines()
        .find(|l| l.contains(&format!("dport={SERVER_PORT} ")))
        .unwrap_or_else(|| {
            panic!(
                "no TCP flow to port {SERVER_PORT} in the router:\n{flows}\n{}",
                bed.logs()
            )
        });
    assert!(
        ours.contains("ESTABLISHED") && ours.contains("[ASSURED]"),
        "the router does not see an established TCP flow: {ours}"
    );
}

fn download_over_the_tcp_wire(tag: &str, ipv6: bool) {
    let (bed, router) = relay_behind_router(tag, ipv6, "xdp", Some("tcp"));
    // The handshake and a first small stream, then the transfer under watch.
    assert_exact(&bed, curl(&bed, 1000), 1000);
    let invalid_before = router.invalid_drops().expect("invalid counter");
    let (out_before, in_before) = router.relay_packets().expect("relay counters");
    let len = 32 * MIB;
    assert_exact(&bed, curl(&bed, len), len);
    let invalid_after = router.invalid_drops().expect("invalid counter");
    let (out_after, in_after) = router.relay_packets().expect("relay counters");
    assert_eq!(
        invalid_after - invalid_before,
        0,
        "the router's strict conntrack dropped relay segments as invalid\n{}",
        bed.logs()
    );
    assert!(
        out_after > out_before && in_after > in_before + len / 1500,
        "the transfer did not go through the router's filter"
    );
    assert_tracked_as_tcp(&router, &bed);
    assert_eq!(
        router.sysctl_value("net.netfilter.nf_conntrack_tcp_loose").unwrap(),
        "0"
    );
    assert_eq!(
        router
            .sysctl_value("net.netfilter.nf_conntrack_tcp_be_liberal")
            .unwrap(),
        "0"
    );
    eprintln!("firewall {tag}: invalid drops in total {invalid_after}");
}

#[test]
fn tcp_wire_download_is_exact_through_strict_nat_ipv4() {
    if !require_root("tcp_wire_download_is_exact_through_strict_nat_ipv4") {
        return;
    }
    download_over_the_tcp_wire("f4", false);
}

#[test]
fn tcp_wire_download_is_exact_through_strict_firewall_ipv6() {
    if !require_root("tcp_wire_download_is_exact_through_strict_firewall_ipv6") {
        return;
    }
    download_over_the_tcp_wire("f6", true);
}

fn forgotten_flow_is_reopened(tag: &str, ipv6: bool) {
    let (bed, router) = relay_behind_router(tag, ipv6, "xdp", Some("tcp"));
    let len = 16 * MIB;
    let fetched = fetch_in_two_parts(&bed, len, MIB, || {
        router.forget_flows().expect("conntrack -F");
        assert!(
            !router
                .tcp_flows()
                .expect("conntrack -L")
                .contains(&format!("dport={SERVER_PORT} ")),
            "the router still tracks the flow after conntrack -F"
        );
    });
    assert_exact(&bed, fetched, len);
    assert!(
        bed.log_of("client").contains("opening it again"),
        "the client did not re-open the flow\n{}",
        bed.logs()
    );
    // And new streams work too, over the new flow.
    assert_exact(&bed, curl(&bed, MIB), MIB);
    assert_tracked_as_tcp(&router, &bed);
}

#[test]
fn a_forgotten_flow_is_reopened_and_the_stream_carries_on_ipv4() {
    if !require_root("a_forgotten_flow_is_reopened_and_the_stream_carries_on_ipv4") {
        return;
    }
    forgotten_flow_is_reopened("r4", false);
}

#[test]
fn a_forgotten_flow_is_reopened_and_the_stream_carries_on_ipv6() {
    if !require_root("a_forgotten_flow_is_reopened_and_the_stream_carries_on_ipv6") {
        return;
    }
    forgotten_flow_is_reopened("r6", true);
}

#[test]
fn a_new_public_address_reopens_the_flow_and_the_session_roams_ipv4() {
    if !require_root("a_new_public_address_reopens_the_flow_and_the_session_roams_ipv4") {
        return;
    }
    let (bed, router) = relay_behind_router("a4", false, "xdp", Some("tcp"));
    let len = 16 * MIB;
    let fetched = fetch_in_two_parts(&bed, len, MIB, || {
        router.change_public_address().expect("a new public address");
    });
    assert_exact(&bed, fetched, len);
    assert!(
        bed.log_of("client").contains("opening it again"),
        "the client did not re-open the flow\n{}",
        bed.logs()
    );
    assert!(
        bed.log_of("server")
            .contains(&format!("new={}", router::ROUTER_WAN_IP2)),
        "the server did not move the session to the new address\n{}",
        bed.logs()
    );
    assert_tracked_as_tcp(&router, &bed);
}

/// The router's established-flow timeout in the idle test (Linux's default is 5 days).
const SHORT_TIMEOUT_SECS: u32 = 3;

fn idle_stream_outlives_the_router_timeout(tag: &str, ipv6: bool) {
    let (bed, router) = relay_behind_router(tag, ipv6, "xdp", Some("tcp"));
    router
        .set_established_timeout(SHORT_TIMEOUT_SECS)
        .expect("short timeout");
    assert_exact(&bed, curl(&bed, 1000), 1000);
    // What an idle client costs: packets through the router while nothing is relayed.
    let idle = Duration::from_secs(5);
    let (out0, in0) = router.relay_packets().expect("relay counters");
    std::thread::sleep(idle);
    let (out1, in1) = router.relay_packets().expect("relay counters");
    eprintln!(
        "firewall {tag}: an idle client costs {:.1} packets/s to the server and {:.1} back",
        (out1 - out0) as f64 / idle.as_secs_f64(),
        (in1 - in0) as f64 / idle.as_secs_f64()
    );
    let invalid_before = router.invalid_drops().expect("invalid counter");
    let len = 4 * MIB;
    let fetched = fetch_in_two_parts(&bed, len, 64 * 1024, || {
        std::thread::sleep(Duration::from_secs(3 * u64::from(SHORT_TIMEOUT_SECS)));
    });
    assert_exact(&bed, fetched, len);
    assert_eq!(
        router.invalid_drops().expect("invalid counter") - invalid_before,
        0,
        "segments dropped as invalid around the idle period\n{}",
        bed.logs()
    );
    assert!(
        !bed.log_of("client").contains("opening it again"),
        "the router forgot the idle flow (keepalives did not keep it)\n{}",
        bed.logs()
    );
}

#[test]
fn an_idle_stream_outlives_the_routers_flow_timeout_ipv4() {
    if !require_root("an_idle_stream_outlives_the_routers_flow_timeout_ipv4") {
        return;
    }
    idle_stream_outlives_the_router_timeout("i4", false);
}

#[test]
fn an_idle_stream_outlives_the_routers_flow_timeout_ipv6() {
    if !require_root("an_idle_stream_outlives_the_routers_flow_timeout_ipv6") {
        return;
    }
    idle_stream_outlives_the_router_timeout("i6", true);
}

/// `TRANSPORT=auto` with the default wire through a router that drops one wire.
fn auto_finds_the_open_wire(tag: &str, ipv6: bool, block_udp: bool) {
    let (bed, router) = relay_behind_router(tag, ipv6, "auto", None);
    if block_udp {
        router.drop_udp().expect("dropping UDP");
    } else {
        router.drop_tcp_to_port(SERVER_PORT).expect("dropping the TCP wire");
    }
    // Rules take effect for packets from now on; the client may have connected before,
    // so restart it to make it choose under the blocked network.
    let mut bed = bed;
    bed.restart_client().expect("restarting the client");
    assert_exact(&bed, curl(&bed, 4 * MIB), 4 * MIB);
    let log = bed.log_of("client");
    let chosen = if block_udp { "xdp/tcp" } else { "udp" };
    assert!(
        log.lines()
            .rfind(|l| l.contains("session established"))
            .is_some_and(|l| l.contains(&format!("path={chosen}"))),
        "the client did not settle on {chosen}\n{}",
        bed.logs()
    );
    if !block_udp {
        assert!(log.contains("also trying udp"), "no fallback logged\n{}", bed.logs());
    }
}

#[test]
fn auto_relays_over_the_tcp_wire_where_udp_is_blocked_ipv4() {
    if !require_root("auto_relays_over_the_tcp_wire_where_udp_is_blocked_ipv4") {
        return;
    }
    auto_finds_the_open_wire("u4", false, true);
}

#[test]
fn auto_relays_over_the_tcp_wire_where_udp_is_blocked_ipv6() {
    if !require_root("auto_relays_over_the_tcp_wire_where_udp_is_blocked_ipv6") {
        return;
    }
    auto_finds_the_open_wire("u6", true, true);
}

#[test]
fn auto_falls_back_to_udp_where_the_tcp_wire_is_blocked_ipv4() {
    if !require_root("auto_falls_back_to_udp_where_the_tcp_wire_is_blocked_ipv4") {
        return;
    }
    auto_finds_the_open_wire("t4", false, false);
}

#[test]
fn auto_falls_back_to_udp_where_the_tcp_wire_is_blocked_ipv6() {
    if !require_root("auto_falls_back_to_udp_where_the_tcp_wire_is_blocked_ipv6") {
        return;
    }
    auto_finds_the_open_wire("t6", true, false);
}

/// The server namespace's count of RSTs its kernel sent.
/// The port of the UDP sink behind the server, reached through the client's forward.
const SINK_PORT: u16 = 5301;

/// Datagrams one way only, client to a sink behind the server, over the TCP-shaped
/// wire through the strict router: 48 MB at about 50 Mbit/s, more than the 32 MiB the
/// wire's window allows without an ACK and longer than the 4 s after which a client
/// that hears nothing takes the server for gone. The server has nothing of its own to
/// send, so only its bare ACKs and keepalive answers keep the window open, the router's
/// conntrack in window, and the client's flow alive.
fn one_way_udp_upload(tag: &str, ipv6: bool) {
    let forward = format!(
        "FORWARD=udp/127.0.0.1:{SINK_PORT}={}:{SINK_PORT}\n",
        paqet_tests::relay::ORIGIN_IP
    );
    let (bed, router, _key) = keyed_relay_behind_router(tag, ipv6, "xdp", Some("tcp"), (&forward, ""));
    // The session and the flow first.
    assert_exact(&bed, curl(&bed, 1000), 1000);
    let invalid_before = router.invalid_drops().expect("invalid counter");
    const COUNT: u64 = 40_000;
    const PER_SECOND: f64 = 5_000.0;
    let payload = vec![0x5a_u8; 1200];
    let (sent, got) = std::thread::scope(|s| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = s.spawn(|| {
            bed.origin_host.ns.run(move || -> std::io::Result<u64> {
                let sock = std::net::UdpSocket::bind((paqet_tests::relay::ORIGIN_IP, SINK_PORT))?;
                sock.set_read_timeout(Some(Duration::from_secs(3)))?;
                let _ = ready_tx.send(());
                let mut buf = [0u8; 2048];
                let mut got = 0u64;
                // Ends with the upload, or 3 s after the last datagram if it stalls.
                while got < COUNT {
                    match sock.recv(&mut buf) {
                        Ok(1200) if buf[..1200].iter().all(|&b| b == 0x5a) => got += 1,
                        Ok(n) => return Err(std::io::Error::other(format!("a {n}-byte datagram differs"))),
                        Err(_) => break,
                    }
                }
                Ok(got)
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the sink did not start");
        let sent = bed
            .hosts
            .client
            .run(|| -> std::io::Result<u64> {
                let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
                let start = std::time::Instant::now();
                for i in 0..COUNT {
                    let due = start + Duration::from_secs_f64(i as f64 / PER_SECOND);
                    if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    sock.send_to(&payload, ("127.0.0.1", SINK_PORT))?;
                }
                Ok(COUNT)
            })
            .expect("entering the client namespace")
            .expect("sending the upload");
        let got = sink
            .join()
            .expect("sink thread")
            .expect("entering the origin namespace")
            .expect("the sink");
        (sent, got)
    });
    let invalid = router.invalid_drops().expect("invalid counter") - invalid_before;
    eprintln!("firewall {tag}: one-way upload: {got} of {sent} datagrams arrived, {invalid} invalid drops");
    assert!(
        got * 100 >= sent * 99,
        "only {got} of {sent} datagrams arrived\n{}",
        bed.logs()
    );
    assert_eq!(
        invalid,
        0,
        "the router dropped relay segments as invalid\n{}",
        bed.logs()
    );
    assert!(
        !bed.logs().contains("handshaking again"),
        "the client took the server for gone during the upload\n{}",
        bed.logs()
    );
}

#[test]
fn a_one_way_udp_upload_keeps_the_tcp_wire_in_window_ipv4() {
    if !require_root("a_one_way_udp_upload_keeps_the_tcp_wire_in_window_ipv4") {
        return;
    }
    one_way_udp_upload("o4", false);
}

#[test]
fn a_one_way_udp_upload_keeps_the_tcp_wire_in_window_ipv6() {
    if !require_root("a_one_way_udp_upload_keeps_the_tcp_wire_in_window_ipv6") {
        return;
    }
    one_way_udp_upload("o6", true);
}

fn kernel_rsts(ns: &paqet_tests::Netns) -> u64 {
    let out = ns.exec(&["cat", "/proc/net/snmp"]).expect("reading /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (header, values) = (tcp.next().unwrap_or_default(), tcp.next().unwrap_or_default());
    let idx = header.split_whitespace().position(|h| h == "OutRsts").expect("OutRsts");
    values
        .split_whitespace()
        .nth(idx)
        .and_then(|v| v.parse().ok())
        .expect("OutRsts value")
}

#[test]
fn a_replayed_syn_and_a_keyless_syn_get_no_answer() {
    if !require_root("a_replayed_syn_and_a_keyless_syn_get_no_answer") {
        return;
    }
    use paqet_tests::capture::{Capture, inject};
    // The router is where an on-path observer sits: it sees the SYN leave (after NAT)
    // and can send it again. (On the paqet hosts XDP takes the frames before tcpdump.)
    let (mut bed, router, key) = keyed_relay_behind_router("k1", false, "xdp", Some("tcp"), ("", ""));
    let syns = format!("tcp dst port {SERVER_PORT} and tcp[tcpflags] & tcp-syn != 0");
    let capture = Capture::start(&router.ns, &router.wan_if, &syns).expect("capture");
    // A fresh client opens a fresh flow while the capture runs.
    bed.restart_client().expect("restarting the client");
    assert_exact(&bed, curl(&bed, MIB), MIB);
    let seen = capture.stop().expect("capture");
    let syn = seen
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("no SYN captured\n{}", bed.logs()));
    assert_eq!(syn[14 + 20 + 13] & 0x12, 0x02, "the first captured segment is a SYN");
    // The same SYN from another source port too (the tag does not cover the source).
    let mut moved = syn.clone();
    moved[14 + 20] ^= 0x40;
    // The control: a fresh SYN made with the key, from a third port, which must be
    // answered; it shows the replays reach the server and an answer would be seen.
    let key = paqet::config::Key::from_base64(&key).expect("the bed's key");
    let syn_key = paqet::transport::xdp::tcp_flow::SynKey::new(*paqet::engine::crypto::syn_tag_key(
        &paqet::engine::crypto::Psk(key.0),
    ));
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let (isn, tsval) = syn_key.syn_numbers(SERVER_PORT, unix_ms);
    let mut fresh = syn.clone();
    let tcp = 14 + 20;
    fresh[tcp] ^= 0x20;
    fresh[tcp + 4..tcp + 8].copy_from_slice(&isn.to_be_bytes());
    // Options as paqet writes them: MSS (4), SACK-permitted (2), then timestamps.
    assert_eq!(
        &fresh[tcp + 20 + 6..tcp + 20 + 8],
        &[8, 10],
        "timestamps where paqet puts them"
    );
    fresh[tcp + 20 + 8..tcp + 20 + 12].copy_from_slice(&tsval.to_be_bytes());
    let port_of = |f: &[u8], at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
    let fresh_port = port_of(&fresh, tcp);

    let rsts_before = kernel_rsts(&bed.hosts.server);
    let answers = format!(
        "src host {} and tcp src port {SERVER_PORT} and tcp[tcpflags] & (tcp-syn | tcp-rst) != 0",
        router::SERVER_IP
    );
    let replies = Capture::start(&router.ns, &router.wan_if, &answers).expect("capture");
    let wan_if = router.wan_if.clone();
    router
        .ns
        .run(move || inject(&wan_if, &[syn, moved, fresh], Duration::ZERO))
        .expect("router namespace");
    // The kernel's own SYN, from the client through the router, carries no tag: the
    // port must look filtered (no SYN-ACK, no RST), so the connect times out instead of
    // being refused.
    let server: std::net::SocketAddr = (router::SERVER_IP, SERVER_PORT).into();
    let keyless = bed
        .hosts
        .client
        .run(move || std::net::TcpStream::connect_timeout(&server, Duration::from_secs(2)).map(|_| ()))
        .expect("client namespace");
    let err = keyless.expect_err("a keyless SYN was answered");
    assert_ne!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the server's port refused (RST) instead of staying silent"
    );
    let answered = replies.stop().expect("capture");
    let to_ports: Vec<u16> = answered.iter().map(|f| port_of(f, tcp + 2)).collect();
    assert_eq!(
        to_ports,
        vec![fresh_port],
        "the fresh keyed SYN must get one SYN-ACK, the replayed and keyless ones nothing\n{}",
        bed.logs()
    );
    assert_eq!(answered[0][tcp + 13], 0x12, "a SYN-ACK");
    assert_eq!(
        kernel_rsts(&bed.hosts.server),
        rsts_before,
        "the server's kernel sent RSTs"
    );
    // The live flow is untouched by the replays.
    assert_exact(&bed, curl(&bed, MIB), MIB);
}

/// Engines of the sharded server below, and the NAT ports its client is moved through
/// until one lands on another engine than its session's (each does with probability
/// 3/4, so all eight miss with probability 4^-8).
const ENGINES: u8 = 4;
const REBIND_PORTS: std::ops::Range<u16> = 40_001..40_009;

/// The server's `handed_off` counter, from `paqet status --json` (found by its pid:
/// other tests' servers may publish under the same instance name).
fn server_handed_off(bed: &RelayBed) -> Option<u64> {
    let out = std::process::Command::new(paqet_tests::paqet_bin())
        .args(["status", "--json"])
        .output()
        .ok()?;
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let pid = u64::from(bed.server.0.id());
    let live = all
        .as_array()?
        .iter()
        .map(|i| &i["live"])
        .find(|l| l["pid"].as_u64() == Some(pid))?;
    assert_eq!(live["engines"].as_u64(), Some(u64::from(ENGINES)), "{live}");
    live["handed_off"].as_u64()
}

#[test]
fn a_client_whose_nat_port_moves_to_another_engine_keeps_its_stream() {
    if !require_root("a_client_whose_nat_port_moves_to_another_engine_keeps_its_stream") {
        return;
    }
    let threads = format!("THREADS={ENGINES}\n");
    let (bed, router, _key) = keyed_relay_behind_router("t2", false, "udp", None, ("", &threads));
    // More than the relay and the sockets buffer while the client pauses: most of it
    // crosses after the move.
    let len = 96 * MIB;
    let mut moves = 0;
    let mut handed_off = 0;
    let fetched = fetch_in_two_parts(&bed, len, MIB, || {
        for port in REBIND_PORTS {
            router.rebind_udp_to_port(port).expect("a NAT rebinding");
            moves += 1;
            // The client's next ACK or keepalive (within a second) comes from the new port.
            paqet_tests::wait_for(
                || {
                    handed_off = server_handed_off(&bed).unwrap_or(0);
                    handed_off > 0
                },
                Duration::from_secs(3),
            );
            if handed_off > 0 {
                break;
            }
        }
    });
    assert_exact(&bed, fetched, len);
    assert!(
        handed_off > 0,
        "after {moves} NAT rebindings no datagram reached another engine than the client's\n{}",
        bed.logs()
    );
    eprintln!("{moves} rebinding(s); {handed_off} datagrams handed to the client's engine so far");
}
