//! What a scanner or an attacker on the path gets from paqet: nothing. Random payloads
//! and replayed packets get no reply of any kind (shown by capture), are counted, and do
//! not disturb a transfer; bad local setups are refused with the fix. And what a key
//! holder gets: the target policy keeps the server's own host and private networks shut,
//! except what an exact ALLOW opens.

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use paqet_tests::capture::{Capture, udp_payload};
use paqet_tests::netns::{OriginHost, run_in};
use paqet_tests::relay::{RelayBed, RelayOptions, SERVER_PORT};
use paqet_tests::{TwoHosts, paqet_bin, pattern, require_root, socks, wait_for};

const MIB: u64 = 1 << 20;
const PROBE_PORT: u16 = 47000;

/// Anything the server sends back to the prober: a datagram or an ICMP error.
fn reply_filter() -> String {
    format!(
        "src host {} and (icmp or (udp and dst port {PROBE_PORT}) or (tcp and dst port {PROBE_PORT}))",
        TwoHosts::SERVER_IP
    )
}

/// The total of `field=N` over the server's periodic drop summaries.
fn logged_count(log: &str, field: &str) -> u64 {
    log.match_indices(&format!("{field}="))
        .filter_map(|(i, m)| {
            log[i + m.len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn random_payloads_get_no_reply_and_do_not_disturb_a_transfer() {
    if !require_root("random_payloads_get_no_reply_and_do_not_disturb_a_transfer") {
        return;
    }
    // UDP-shaped xdp frames, so garbage from an ordinary socket matches paqet's filter
    // and goes all the way to the engine.
    let mut opts = RelayOptions::new("xdp").unwrap();
    opts.server_extra.push("WIRE=udp".into());
    opts.client_extra.push("WIRE=udp".into());
    let bed = RelayBed::start("s1", &opts).unwrap();
    let capture = Capture::start(&bed.hosts.client, &bed.hosts.client_if, &reply_filter()).unwrap();
    let server = std::net::SocketAddr::from((TwoHosts::SERVER_IP, SERVER_PORT));
    let (download, sent) = std::thread::scope(|s| {
        let download = s.spawn(|| bed.curl_bytes(32 * MIB));
        let sent = bed
            .hosts
            .client
            .run(|| {
                let sock = UdpSocket::bind((TwoHosts::CLIENT_IP, PROBE_PORT)).unwrap();
                let mut rng = 0x9E37_79B9_7F4A_7C15u64;
                let mut sent = 0u64;
                for i in 0..3000usize {
                    // Never empty: the transport drops empty frames before the engine counts them.
                    let len = 1 + (xorshift(&mut rng) % 1400) as usize + (i % 2);
                    let junk: Vec<u8> = (0..len).map(|_| xorshift(&mut rng) as u8).collect();
                    if sock.send_to(&junk, server).is_ok() {
                        sent += 1;
                    }
                    if i % 50 == 0 {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                sent
            })
            .unwrap();
        (download.join().expect("download thread"), sent)
    });
    let (hash, _, _) = download.unwrap();
    assert_eq!(
        hash,
        pattern::sha256_hex(32 * MIB, 32 * MIB),
        "the transfer was disturbed\n{}",
        bed.logs()
    );
    std::thread::sleep(Duration::from_millis(500));
    let replies = capture.stop().unwrap();
    assert!(
        replies.is_empty(),
        "the server answered garbage: {} packets",
        replies.len()
    );
    // Under load the AF_XDP ring may overflow and the kernel drop a few frames before
    // paqet sees them; everything that reaches paqet must be counted.
    let counted = wait_for(
        || logged_count(&bed.log_of("server"), "unauthentic") >= sent * 9 / 10,
        Duration::from_secs(15),
    );
    let got = logged_count(&bed.log_of("server"), "unauthentic");
    assert!(
        counted,
        "server counted {got} of {sent} unauthentic datagrams\n{}",
        bed.logs()
    );
}

#[test]
fn replayed_handshake_and_data_packets_are_refused_without_reply() {
    if !require_root("replayed_handshake_and_data_packets_are_refused_without_reply") {
        return;
    }
    let mut bed = RelayBed::start("s2", &RelayOptions::new("udp").unwrap()).unwrap();
    let filter = format!("udp and dst port {SERVER_PORT} and src host {}", TwoHosts::CLIENT_IP);
    let capture = Capture::start(&bed.hosts.server, &bed.hosts.server_if, &filter).unwrap();
    // A fresh client instance handshakes while the capture runs, then moves data.
    bed.restart_client().unwrap();
    let (hash, _, _) = bed.curl_bytes(MIB).unwrap();
    assert_eq!(hash, pattern::sha256_hex(MIB, MIB));
    let frames = capture.stop().unwrap();
    let payloads: Vec<Vec<u8>> = frames
        .iter()
        .filter_map(|f| udp_payload(f))
        .map(<[u8]>::to_vec)
        .collect();
    assert!(payloads.len() > 10, "captured only {} client packets", payloads.len());
    let handshake = payloads[0].clone();
    let data = payloads[payloads.len() / 2].clone();

    let before = logged_count(&bed.log_of("server"), "replayed");
    let sessions_before = bed.log_of("server").matches("client authenticated").count();
    let replies = Capture::start(&bed.hosts.client, &bed.hosts.client_if, &reply_filter()).unwrap();
    let server = std::net::SocketAddr::from((TwoHosts::SERVER_IP, SERVER_PORT));
    bed.hosts
        .client
        .run(|| {
            let sock = UdpSocket::bind((TwoHosts::CLIENT_IP, PROBE_PORT)).unwrap();
            sock.send_to(&handshake, server).unwrap();
            sock.send_to(&data, server).unwrap();
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let answered = replies.stop().unwrap();
    assert!(
        answered.is_empty(),
        "the server answered a replay: {} packets",
        answered.len()
    );
    let counted = wait_for(
        || logged_count(&bed.log_of("server"), "replayed") >= before + 2,
        Duration::from_secs(15),
    );
    assert!(counted, "server did not count both replays\n{}", bed.logs());
    assert_eq!(
        bed.log_of("server").matches("client authenticated").count(),
        sessions_before,
        "a replayed handshake must not make a session"
    );
}

/// Plays an attacker who sees the client's handshakes and answers each at once with a
/// forged reply from the server's address and port (a raw socket in the server's
/// namespace, which sees every UDP datagram arriving there and is faster than the
/// server's Diffie-Hellman). Runs until `stop` or a minute; returns the replies forged.
fn forge_handshake_replies(stop: &std::sync::atomic::AtomicBool) -> u32 {
    use std::sync::atomic::Ordering;
    // SAFETY: plain socket calls on a descriptor this function owns and closes.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a valid fd and a timeval of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let started = std::time::Instant::now();
    let (mut forged, mut seed) = (0u32, 0x9e37_79b9_7f4a_7c15u64);
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) && forged < 10_000 {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let packet = &buf[..n as usize];
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        let Some(udp) = packet.get(ihl..ihl + 8) else { continue };
        let (src_port, dst_port) = (
            u16::from_be_bytes([udp[0], udp[1]]),
            u16::from_be_bytes([udp[2], udp[3]]),
        );
        let handshake_sized = (101..=117).contains(&(packet.len() - ihl - 8));
        if dst_port != SERVER_PORT || !handshake_sized {
            continue;
        }
        // A reply of a server answer's size, random bytes, from the server's port.
        let len = 53 + (xorshift(&mut seed) % 17) as usize;
        let mut reply = vec![0u8; 8 + len];
        reply[0..2].copy_from_slice(&SERVER_PORT.to_be_bytes());
        reply[2..4].copy_from_slice(&src_port.to_be_bytes());
        reply[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
        for b in &mut reply[8..] {
            *b = xorshift(&mut seed) as u8;
        }
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(TwoHosts::CLIENT_IP).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and sockaddr_in of the size passed.
        let sent = unsafe {
            libc::sendto(
                fd,
                reply.as_ptr().cast(),
                reply.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if sent > 0 {
            forged += 1;
        }
    }
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    forged
}

#[test]
fn forged_handshake_replies_do_not_keep_a_client_offline() {
    if !require_root("forged_handshake_replies_do_not_keep_a_client_offline") {
        return;
    }
    let mut bed = RelayBed::start("s4", &RelayOptions::new("udp").unwrap()).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let server_ns = bed.hosts.server.path();
    let (forged, fetched) = std::thread::scope(|scope| {
        let attacker = scope.spawn(|| run_in(server_ns, || forge_handshake_replies(&stop)));
        std::thread::sleep(Duration::from_millis(300));
        // A fresh client instance handshakes while every handshake gets a forged reply
        // first. A client that took a forged reply as the answer (and so dropped the
        // real one) would never connect, and curl would get a SOCKS failure.
        let fetched = bed.restart_client().and_then(|()| bed.curl_bytes(MIB));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let forged = attacker
            .join()
            .expect("attacker thread panicked")
            .expect("entering the namespace");
        (forged, fetched)
    });
    let (hash, _, _) = fetched.unwrap_or_else(|e| panic!("no download under forged replies: {e:#}"));
    assert_eq!(hash, pattern::sha256_hex(MIB, MIB));
    assert!(forged >= 1, "the attacker never saw a handshake to answer");
    let counted = wait_for(
        || logged_count(&bed.log_of("client"), "unauthentic") >= 1,
        Duration::from_secs(15),
    );
    assert!(counted, "the client did not count the forged replies\n{}", bed.logs());
}

/// A TCP service for the policy test: answers each connection with `greeting` and
/// closes it; stops taking connections after a minute (the test is long done by then).
fn greeter(listener: TcpListener, greeting: &'static [u8]) -> std::thread::JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.write_all(greeting);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
}

/// Through the relay: the greeting the target sends, or the SOCKS reply code.
fn greeting_through(bed: &RelayBed, host: &str, port: u16) -> Result<String, u8> {
    let proxy = bed.socks_addr();
    bed.hosts
        .client
        .run(|| {
            let mut s = socks::connect(proxy, host, port, None, 1).unwrap()?;
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            Ok(text)
        })
        .unwrap()
}

#[test]
fn the_servers_own_services_and_private_ranges_are_refused_unless_exactly_allowed() {
    if !require_root("the_servers_own_services_and_private_ranges_are_refused_unless_exactly_allowed") {
        return;
    }
    const OPENED: u16 = 7101;
    const SHUT: u16 = 7102;
    let mut opts = RelayOptions::new("udp").unwrap();
    opts.server_extra
        .push(format!("ALLOW={}/32:{OPENED}", TwoHosts::SERVER_IP));
    let bed = RelayBed::start("s3", &opts).unwrap();
    // Two services on the server host, on every address (0.0.0.0), as a database or an
    // admin panel would be: one opened by the exact ALLOW, one not.
    let (opened, shut) = bed
        .hosts
        .server
        .run(|| {
            (
                TcpListener::bind(("0.0.0.0", OPENED)),
                TcpListener::bind(("0.0.0.0", SHUT)),
            )
        })
        .unwrap();
    let _services = [greeter(opened.unwrap(), b"opened"), greeter(shut.unwrap(), b"shut")];
    // A service on a private address behind the server, next to the origin's public one.
    let origin = &bed.origin_host;
    origin
        .ns
        .exec(&["ip", "addr", "add", "10.77.0.2/24", "dev", &origin.origin_if])
        .unwrap();
    bed.hosts
        .server
        .exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", &origin.server_if])
        .unwrap();
    let private = origin.ns.run(|| TcpListener::bind(("0.0.0.0", SHUT))).unwrap().unwrap();
    let _private = greeter(private, b"private");
    // An address the server gains while it runs, in no default range: closed as its own
    // once paqet re-reads the host's addresses (at most a second later).
    bed.hosts
        .server
        .exec(&["ip", "addr", "add", "198.18.2.1/32", "dev", &origin.server_if])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));

    let server_ip = TwoHosts::SERVER_IP.to_string();
    let (router_ip, origin_ip) = (OriginHost::ROUTER_IP.to_string(), OriginHost::ORIGIN_IP.to_string());
    // The server itself can reach all of them: only the policy stands in the way.
    for target in [(server_ip.as_str(), SHUT), ("198.18.2.1", SHUT), ("10.77.0.2", SHUT)] {
        let reachable = bed
            .hosts
            .server
            .run(|| std::net::TcpStream::connect(target).is_ok())
            .unwrap();
        assert!(reachable, "{target:?} is not reachable from the server at all");
    }
    let cases = [
        (server_ip.as_str(), OPENED, Ok("opened".to_string()), "exactly allowed"),
        (
            server_ip.as_str(),
            SHUT,
            Err(socks::REPLY_NOT_ALLOWED),
            "own address, by default",
        ),
        (
            "127.0.0.1",
            OPENED,
            Err(socks::REPLY_NOT_ALLOWED),
            "the same service on loopback",
        ),
        (
            router_ip.as_str(),
            OPENED,
            Err(socks::REPLY_NOT_ALLOWED),
            "the same service on another own address",
        ),
        (
            "198.18.2.1",
            OPENED,
            Err(socks::REPLY_NOT_ALLOWED),
            "an own address added after start",
        ),
        ("10.77.0.2", SHUT, Err(socks::REPLY_NOT_ALLOWED), "a private address"),
        (
            origin_ip.as_str(),
            SHUT,
            Ok("private".to_string()),
            "the same service on a public address",
        ),
    ];
    for (host, port, want, what) in cases {
        assert_eq!(
            greeting_through(&bed, host, port),
            want,
            "{what}: {host}:{port}\n{}",
            bed.logs()
        );
    }
}

fn temp_config(name: &str, text: &str, mode: u32) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("paqet-sec-{}-{name}.conf", std::process::id()));
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn a_key_holding_config_readable_by_others_is_refused_with_the_fix() {
    let key = paqet_tests::relay::genkey().unwrap();
    let path = temp_config("open", &format!("REMOTE_ADDR=198.18.0.2:4000\nKEY={key}\n"), 0o644);
    let out = Command::new(paqet_bin())
        .args(["client", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "paqet started with a world-readable key");
    assert!(
        stderr.contains(&format!("chmod 600 {}", path.display())),
        "no fix printed: {stderr}"
    );
    assert!(!stderr.contains(&key), "the key leaked into the error");
}

#[test]
fn a_public_socks_port_without_credentials_is_refused() {
    let key = paqet_tests::relay::genkey().unwrap();
    let path = temp_config(
        "public",
        &format!("SOCKS_ADDR=0.0.0.0:1080\nREMOTE_ADDR=198.18.0.2:4000\nKEY={key}\n"),
        0o600,
    );
    let out = Command::new(paqet_bin())
        .args(["client", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "paqet opened a public SOCKS port without credentials"
    );
    assert!(
        stderr.contains("open proxy") && stderr.contains("SOCKS_USER"),
        "unclear refusal: {stderr}"
    );
}

#[test]
fn genkey_prints_a_fresh_32_byte_key() {
    let a = paqet_tests::relay::genkey().unwrap();
    let b = paqet_tests::relay::genkey().unwrap();
    assert_ne!(a, b);
    let path = temp_config("genkey", &format!("REMOTE_ADDR=198.18.0.2:4000\nKEY={a}\n"), 0o600);
    let out = Command::new(paqet_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("OK    config"),
        "a genkey key was not accepted: {stdout}"
    );
}
