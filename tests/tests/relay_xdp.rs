//! The relay end to end over the `xdp` transport: XDP steering into AF_XDP on real veth
//! links, TCP-shaped frames, and proof that the kernel never saw the relay's packets.

use paqet_tests::capture::Capture;
use paqet_tests::relay::{ORIGIN_NAME, ORIGIN_PORT, RelayBed, RelayOptions};
use paqet_tests::{require_root, scenarios, socks};

const MIB: u64 = 1 << 20;

/// The namespace's kernel counters that would move if the kernel saw a relay packet
/// addressed to a port it has no socket for (RST, port unreachable, no port).
fn kernel_rejections(bed: &RelayBed, server_side: bool) -> (u64, u64, u64) {
    let ns = if server_side {
        &bed.hosts.server
    } else {
        &bed.hosts.client
    };
    let out = ns.exec(&["cat", "/proc/net/snmp"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |proto: &str, name: &str| -> u64 {
        let mut lines = text.lines().filter(|l| l.starts_with(&format!("{proto}:")));
        let (header, values) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
        let idx = header
            .split_whitespace()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no {proto} {name}"));
        values
            .split_whitespace()
            .nth(idx)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (
        field("Tcp", "OutRsts"),
        field("Icmp", "OutDestUnreachs"),
        field("Udp", "NoPorts"),
    )
}

#[test]
fn xdp_relay_100_mib_and_the_kernel_never_sees_it() {
    if !require_root("xdp_relay_100_mib_and_the_kernel_never_sees_it") {
        return;
    }
    let bed = RelayBed::start("x1", &RelayOptions::new("xdp").unwrap()).unwrap();
    // Any RST or ICMP error leaving either host while the relay runs.
    let kernel_answers = "tcp[tcpflags] & tcp-rst != 0 or icmp";
    let captures = [
        Capture::start(&bed.hosts.client, &bed.hosts.client_if, kernel_answers).unwrap(),
        Capture::start(&bed.hosts.server, &bed.hosts.server_if, kernel_answers).unwrap(),
    ];
    let before = (kernel_rejections(&bed, true), kernel_rejections(&bed, false));
    let rate = scenarios::curl_download_is_exact(&bed, 100 * MIB);
    let after = (kernel_rejections(&bed, true), kernel_rejections(&bed, false));
    assert_eq!(
        before,
        after,
        "the kernel answered relay packets (RST / ICMP / no port)\n{}",
        bed.logs()
    );
    for capture in captures {
        let seen = capture.stop().unwrap();
        assert!(
            seen.is_empty(),
            "{} RST/ICMP packets left a host during the transfer",
            seen.len()
        );
    }
    assert!(
        bed.log_of("server").contains("xdp transport open"),
        "server did not run on xdp\n{}",
        bed.logs()
    );
    assert!(
        bed.log_of("client").contains("xdp transport open"),
        "client did not run on xdp\n{}",
        bed.logs()
    );
    eprintln!("100 MiB over xdp at {rate:.1} MB/s");
}

#[test]
fn xdp_relay_200_concurrent_streams_are_exact() {
    if !require_root("xdp_relay_200_concurrent_streams_are_exact") {
        return;
    }
    let bed = RelayBed::start("x2", &RelayOptions::new("xdp").unwrap()).unwrap();
    scenarios::two_hundred_concurrent_streams(&bed);
}

#[test]
fn xdp_relay_through_a_lossy_reordering_link_is_exact() {
    if !require_root("xdp_relay_through_a_lossy_reordering_link_is_exact") {
        return;
    }
    let imp = paqet_tests::linkem::Impairment {
        delay_ms: 5.0,
        jitter_ms: 4.0,
        loss: 0.02,
        rate_mbit: 0.0,
    };
    let bed = RelayBed::start_through("x3", &RelayOptions::new("xdp").unwrap(), imp).unwrap();
    let rate = scenarios::curl_download_is_exact(&bed, 8 * MIB);
    eprintln!("8 MiB over xdp through 2% loss, 10-18 ms RTT with reordering at {rate:.1} MB/s");
}

#[test]
fn status_shows_live_sessions_streams_and_throughput() {
    if !require_root("status_shows_live_sessions_streams_and_throughput") {
        return;
    }
    let bed = RelayBed::start("x4", &RelayOptions::new("xdp").unwrap()).unwrap();
    let proxy = bed.socks_addr();
    let client_instance = format!("client-{}", bed.hosts.client_if);
    let server_instance = format!("server-{}", bed.hosts.server_if);
    let status = |instance: &str| -> serde_json::Value {
        let out = std::process::Command::new(paqet_tests::paqet_bin())
            .args(["status", "--json", "--instance", instance])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "paqet status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        all[0].clone()
    };
    // Client and server start together: the client's first handshake may arrive before
    // the server's XDP program is attached, and its retry comes 2 s later. The session,
    // not that race, is what this test reads.
    let session_up = paqet_tests::wait_for(
        || status(&client_instance)["live"]["sessions"] == 1,
        std::time::Duration::from_secs(10),
    );
    assert!(session_up, "no session within 10 s\n{}", bed.logs());
    // A slow download keeps one stream busy while status is read.
    let busy = bed.hosts.client.run(|| {
        std::thread::scope(|s| {
            let reader = s.spawn(move || {
                use std::io::{Read, Write};
                let mut sock = socks::connect(proxy, ORIGIN_NAME, ORIGIN_PORT, None, 1)
                    .unwrap()
                    .unwrap();
                write!(sock, "GET /bytes/{} HTTP/1.1\r\nHost: x\r\n\r\n", 1u64 << 40).unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(4);
                while std::time::Instant::now() < deadline {
                    if sock.read(&mut buf).unwrap_or(0) == 0 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            });
            std::thread::sleep(std::time::Duration::from_millis(2500));
            let seen = (status(&client_instance), status(&server_instance));
            reader.join().unwrap();
            seen
        })
    });
    let (client, server) = busy.unwrap();
    for (name, v) in [("client", &client), ("server", &server)] {
        assert_eq!(v["running"], true, "{name}: {v}");
        assert!(
            v["program_ids"].as_array().is_some_and(|a| !a.is_empty()),
            "{name}: {v}"
        );
        assert!(
            v["redirected"].as_u64().unwrap_or(0) > 0,
            "{name}: no redirected frames: {v}"
        );
        let live = &v["live"];
        // The live transport names the path, wire included (an explicit TRANSPORT=xdp has one).
        assert_eq!(live["transport"], "xdp/tcp", "{name}: {v}");
        assert_eq!(live["sessions"], 1, "{name}: {v}");
        assert_eq!(live["streams"], 1, "{name}: {v}");
        // The AF_XDP sockets' own drop counters are readable (their value depends on
        // how the two processes were scheduled).
        assert!(live["receive_overflows"].is_u64(), "{name}: {v}");
    }
    assert!(
        client["live"]["bytes_in_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "client shows no throughput: {client}"
    );
    assert!(
        server["live"]["bytes_out_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "server shows no throughput: {server}"
    );
}

/// Frames leave the xdp transport as super-frames the kernel segments (`transport::xdp::
/// gso`): what reaches the wire must still be frames of the MTU whose IPv4 and TCP
/// checksums hold (the kernel finishes the checksum from the pseudo-header sum paqet
/// leaves in the field) and whose sequence numbers follow each other. A strict
/// firewall would drop a frame with a bad checksum; the firewall tests cross one.
#[test]
fn segmented_frames_reach_the_wire_whole_and_checksummed() {
    use paqet_common::wire::{checksum, parse_frame, sum};
    if !require_root("segmented_frames_reach_the_wire_whole_and_checksummed") {
        return;
    }
    let bed = RelayBed::start("x5", &RelayOptions::new("xdp").unwrap()).unwrap();
    let filter = format!("tcp src port {}", paqet_tests::relay::SERVER_PORT);
    let capture = Capture::start(&bed.hosts.server, &bed.hosts.server_if, &filter).unwrap();
    scenarios::curl_download_is_exact(&bed, 8 * MIB);
    let frames = capture.stop().unwrap();
    assert!(
        bed.log_of("server").contains("segmentation=true"),
        "the server did not send through the kernel's segmentation path\n{}",
        bed.logs()
    );
    let mut data_frames = 0u64;
    let mut payload_bytes = 0u64;
    let mut next_seq = None;
    let mut in_order = 0u64;
    for f in &frames {
        assert!(f.len() <= 1514, "a {}-byte frame left a 1500-byte MTU link", f.len());
        let s = parse_frame(&f[..]).expect("a frame paqet sent parses");
        let (l3, l4) = (s.l3_offset as usize, s.l4_offset as usize);
        assert_eq!(checksum(0, &f[l3..l4]), 0, "IPv4 header checksum");
        let pseudo = sum(0, &f[l3 + 12..l3 + 20]) + u32::from(s.protocol) + (f.len() - l4) as u32;
        assert_eq!(
            checksum(pseudo, &f[l4..]),
            0,
            "TCP checksum of a {}-byte frame",
            f.len()
        );
        if s.payload_len > 0 {
            data_frames += 1;
            payload_bytes += u64::from(s.payload_len);
            if next_seq == Some(s.tcp_seq) {
                in_order += 1;
            }
            next_seq = Some(s.tcp_seq.wrapping_add(u32::from(s.payload_len)));
        }
    }
    assert!(
        payload_bytes >= 8 * MIB,
        "{payload_bytes} payload bytes in {data_frames} captured data frames for an 8 MiB download"
    );
    // Retransmissions and the odd capture drop break the chain now and then; a kernel
    // that cut super-frames into segments with wrong sequence numbers breaks it always.
    assert!(
        in_order * 10 >= data_frames * 9,
        "only {in_order} of {data_frames} data frames followed the one before"
    );
}
