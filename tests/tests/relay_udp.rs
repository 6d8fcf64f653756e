//! The relay end to end over the unprivileged `udp` transport, in network namespaces:
//! real curl through the SOCKS5 port, real TCP to a real origin, hashes checked.

use std::time::Duration;

use paqet_tests::netns::OriginHost;
use paqet_tests::relay::{ORIGIN_IP, ORIGIN_NAME, ORIGIN_PORT, RelayBed, RelayOptions};
use paqet_tests::{TwoHosts, pattern, require_root, scenarios, socks, wait_for};

const MIB: u64 = 1 << 20;

#[test]
fn curl_downloads_100_mib_with_matching_sha256() {
    if !require_root("curl_downloads_100_mib_with_matching_sha256") {
        return;
    }
    let bed = RelayBed::start("u1", &RelayOptions::new("udp").unwrap()).unwrap();
    let rate = scenarios::curl_download_is_exact(&bed, 100 * MIB);
    eprintln!("100 MiB over udp at {rate:.1} MB/s");
}

#[test]
fn two_hundred_concurrent_streams_of_mixed_sizes_are_exact() {
    if !require_root("two_hundred_concurrent_streams_of_mixed_sizes_are_exact") {
        return;
    }
    let bed = RelayBed::start("u2", &RelayOptions::new("udp").unwrap()).unwrap();
    scenarios::two_hundred_concurrent_streams(&bed);
}

/// Port 9 of the server's own address is opened by an exact ALLOW (nothing listens
/// there, so paqet's dial is refused by the kernel); every other port there is denied.
const OPENED_OWN_PORT: u16 = 9;

#[test]
fn socks_reply_codes_for_refused_denied_and_unsupported() {
    if !require_root("socks_reply_codes_for_refused_denied_and_unsupported") {
        return;
    }
    let mut opts = RelayOptions::new("udp").unwrap();
    opts.server_extra
        .push(format!("ALLOW={}/32:{OPENED_OWN_PORT}", TwoHosts::SERVER_IP));
    let bed = RelayBed::start("u3", &opts).unwrap();
    let proxy = bed.socks_addr();
    let server_ip = TwoHosts::SERVER_IP.to_string();
    let origin_ip = ORIGIN_IP.to_string();
    let code = |host: &str, port: u16, cmd: u8| socks::connect(proxy, host, port, None, cmd).unwrap().err();
    let codes = bed
        .hosts
        .client
        .run(|| {
            [
                ("closed port on the origin host", code(&origin_ip, 9, 1)),
                (
                    "the exactly allowed closed port on the server",
                    code(&server_ip, OPENED_OWN_PORT, 1),
                ),
                (
                    "the server's own address, another port",
                    code(&server_ip, ORIGIN_PORT, 1),
                ),
                (
                    "the server's own address, the next port",
                    code(&server_ip, OPENED_OWN_PORT + 1, 1),
                ),
                (
                    "the server's address on the origin link",
                    code(&OriginHost::ROUTER_IP.to_string(), OPENED_OWN_PORT, 1),
                ),
                ("the server's loopback", code("127.0.0.1", ORIGIN_PORT, 1)),
                ("cloud metadata", code("169.254.169.254", 80, 1)),
                ("a private address", code("10.0.0.1", 80, 1)),
                ("BIND", code(&origin_ip, ORIGIN_PORT, 2)),
            ]
        })
        .unwrap();
    let expected = [
        Some(socks::REPLY_CONNECTION_REFUSED),
        Some(socks::REPLY_CONNECTION_REFUSED),
        Some(socks::REPLY_NOT_ALLOWED),
        Some(socks::REPLY_NOT_ALLOWED),
        Some(socks::REPLY_NOT_ALLOWED),
        Some(socks::REPLY_NOT_ALLOWED),
        Some(socks::REPLY_NOT_ALLOWED),
        Some(socks::REPLY_NOT_ALLOWED),
        Some(socks::REPLY_COMMAND_NOT_SUPPORTED),
    ];
    for ((what, got), want) in codes.iter().zip(expected) {
        assert_eq!(*got, want, "{what}\n{}", bed.logs());
    }
    // The exact opening is announced at start.
    assert!(
        bed.log_of("server").contains("ALLOW opens a target"),
        "no warning about the opened own address\n{}",
        bed.logs()
    );
}

#[test]
fn a_stream_killed_mid_transfer_frees_both_sides() {
    if !require_root("a_stream_killed_mid_transfer_frees_both_sides") {
        return;
    }
    let bed = RelayBed::start("u4", &RelayOptions::new("udp").unwrap()).unwrap();
    let proxy = bed.socks_addr();
    bed.hosts
        .client
        .run(|| {
            use std::io::{Read, Write};
            let mut s = socks::connect(proxy, ORIGIN_NAME, ORIGIN_PORT, None, 1)
                .unwrap()
                .unwrap();
            write!(s, "GET /bytes/{} HTTP/1.1\r\nHost: x\r\n\r\n", 1u64 << 40).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            s.read_exact(&mut buf).unwrap();
            // Killed mid-transfer: the client application vanishes with a terabyte to go.
        })
        .unwrap();
    let freed = wait_for(
        || bed.origin_open_connections().is_ok_and(|n| n == 0),
        Duration::from_secs(20),
    );
    assert!(freed, "the server side kept the origin connection open\n{}", bed.logs());
    let client_ns = bed.hosts.client.name().to_string();
    let socks_gone = wait_for(
        || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &client_ns, "ss", "-Htn", "state", "established"])
                .output();
            out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim().is_empty())
        },
        Duration::from_secs(20),
    );
    assert!(socks_gone, "the client side kept a SOCKS connection established");
    // And the relay still works afterwards.
    let (hash, _, _) = bed.curl_bytes(MIB).unwrap();
    assert_eq!(hash, pattern::sha256_hex(MIB, MIB));
}

#[test]
fn a_client_with_the_wrong_key_gets_nothing_through() {
    if !require_root("a_client_with_the_wrong_key_gets_nothing_through") {
        return;
    }
    let mut opts = RelayOptions::new("udp").unwrap();
    opts.client_key = paqet_tests::relay::genkey().unwrap();
    opts.timeout_secs = 2;
    let bed = RelayBed::start("u5", &opts).unwrap();
    let proxy = bed.socks_addr();
    let code = bed
        .hosts
        .client
        .run(|| socks::connect(proxy, ORIGIN_NAME, ORIGIN_PORT, None, 1).unwrap().err())
        .unwrap();
    assert_eq!(
        code,
        Some(socks::REPLY_TTL_EXPIRED),
        "the client must time out, not connect"
    );
    let logged = wait_for(
        || bed.log_of("server").contains("failed authentication"),
        Duration::from_secs(15),
    );
    assert!(logged, "the server did not report the failures\n{}", bed.logs());
    assert!(
        !bed.log_of("server").contains("session established"),
        "a wrong key must never establish a session"
    );
}

#[test]
fn username_password_auth_and_an_ipv6_target() {
    if !require_root("username_password_auth_and_an_ipv6_target") {
        return;
    }
    let mut opts = RelayOptions::new("udp").unwrap();
    opts.client_extra.push("SOCKS_USER=alice".into());
    opts.client_extra.push("SOCKS_PASS='correct horse'".into());
    let bed = RelayBed::start("u6", &opts).unwrap();
    // An IPv6 origin next to the IPv4 one, behind the server, reached by its address.
    bed.origin_host.enable_ipv6(&bed.hosts.server).unwrap();
    let origin6 = paqet_tests::ChildGuard::spawn(
        bed.origin_host
            .ns
            .command(&paqet_tests::relay::sibling_bin("paqet-origin").to_string_lossy())
            .arg(format!("[{}]:8081", OriginHost::ORIGIN_IP6)),
    )
    .unwrap();
    let origin6_ip = OriginHost::ORIGIN_IP6.to_string();
    let proxy = bed.socks_addr();
    let (right, wrong, anonymous, v6) = bed
        .hosts
        .client
        .run(|| {
            let right =
                socks::connect(proxy, ORIGIN_NAME, ORIGIN_PORT, Some(("alice", "correct horse")), 1).map(|r| r.is_ok());
            let wrong = socks::connect(proxy, ORIGIN_NAME, ORIGIN_PORT, Some(("alice", "wrong")), 1).map(|r| r.is_ok());
            let anonymous = socks::connect(proxy, ORIGIN_NAME, ORIGIN_PORT, None, 1).map(|r| r.is_ok());
            let v6 = wait_for(
                || socks::fetch_bytes_auth(proxy, &origin6_ip, 8081, 300_000, Some(("alice", "correct horse"))).is_ok(),
                Duration::from_secs(10),
            )
            .then(|| socks::fetch_bytes_auth(proxy, &origin6_ip, 8081, 300_000, Some(("alice", "correct horse"))));
            (right, wrong, anonymous, v6)
        })
        .unwrap();
    drop(origin6);
    assert!(right.unwrap(), "the right password must be let through");
    assert!(wrong.is_err(), "a wrong password must be refused at authentication");
    assert!(
        anonymous.is_err(),
        "no-auth must be refused when credentials are configured"
    );
    let (hash, len) = v6.expect("IPv6 origin never answered through the relay").unwrap();
    assert_eq!((hash, len), (pattern::sha256_hex(300_000, 300_000), 300_000));
}

/// One real curl download of `len` through each of `proxies` (SOCKS ports), all at
/// once; every body sha256-exact.
fn downloads_at_once_are_exact(bed: &RelayBed, proxies: &[std::net::SocketAddr], len: u64) {
    let fetched: Vec<_> = std::thread::scope(|scope| {
        let downloads: Vec<_> = proxies
            .iter()
            .map(|&socks| scope.spawn(move || bed.curl_bytes_via(socks, len)))
            .collect();
        downloads
            .into_iter()
            .map(|d| d.join().expect("a download thread"))
            .collect()
    });
    for (socks, result) in proxies.iter().zip(fetched) {
        let (hash, got, _) = result.unwrap_or_else(|e| panic!("curl through {socks}: {e:#}"));
        assert_eq!(got, len, "through {socks}\n{}", bed.logs());
        assert_eq!(hash, pattern::sha256_hex(len, len), "through {socks}\n{}", bed.logs());
    }
}

#[test]
fn four_clients_through_a_four_engine_server_are_exact() {
    if !require_root("four_clients_through_a_four_engine_server_are_exact") {
        return;
    }
    let mut opts = RelayOptions::new("udp").unwrap();
    opts.server_extra.push("THREADS=4".into());
    let bed = RelayBed::start("u7", &opts).unwrap();
    let more = bed.start_more_clients(3).unwrap();
    let proxies: Vec<std::net::SocketAddr> = std::iter::once(bed.socks_addr())
        .chain(more.iter().map(|(_, socks)| *socks))
        .collect();
    downloads_at_once_are_exact(&bed, &proxies, 16 * MIB);
    assert!(bed.log_of("server").contains("threads=4"), "{}", bed.logs());
    let sessions = bed.log_of("server").matches("session established").count();
    assert!(sessions >= 4, "{sessions} sessions for 4 clients\n{}", bed.logs());
}

#[test]
fn a_client_with_two_engines_opens_two_sessions_and_every_stream_is_exact() {
    if !require_root("a_client_with_two_engines_opens_two_sessions_and_every_stream_is_exact") {
        return;
    }
    let mut opts = RelayOptions::new("udp").unwrap();
    opts.client_extra.push("THREADS=2".into());
    opts.server_extra.push("THREADS=1".into());
    let bed = RelayBed::start("u8", &opts).unwrap();
    downloads_at_once_are_exact(&bed, &[bed.socks_addr(); 6], 8 * MIB);
    assert!(bed.log_of("client").contains("threads=2"), "{}", bed.logs());
    // One server engine: each of the client's engines is a client of its own there.
    let sessions = bed.log_of("server").matches("session established").count();
    assert!(
        sessions >= 2,
        "{sessions} sessions for a client of two engines\n{}",
        bed.logs()
    );
}
