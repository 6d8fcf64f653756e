//! What a new user meets first, in network namespaces: the README's and the seed's
//! example configs as written, a client and a server with different privileges, and a
//! server that does not answer. Real paqet processes, real curl, hashes checked.

use std::time::{Duration, Instant};

use paqet_tests::relay::{ORIGIN_NAME, ORIGIN_PORT, RelayBed, RelayOptions, SERVER_PORT};
use paqet_tests::{ChildGuard, TwoHosts, pattern, require_root, scenarios, socks, wait_for};

const MIB: u64 = 1 << 20;

/// The README's server config (`LISTEN_ADDR=0.0.0.0:4000`) and the seed's client
/// example, with the testbed's server address in place of the documentation address.
fn readme_and_seed_configs() -> (String, String) {
    let server = format!("LISTEN_ADDR=0.0.0.0:{SERVER_PORT}");
    let client = format!(
        "# Basic configuration for typical usage\nSOCKS_ADDR=127.0.0.1:1080\nREMOTE_ADDR={}:{SERVER_PORT}\nKCP_MODE=fast3",
        TwoHosts::SERVER_IP
    );
    (server, client)
}

/// Runs paqet as an unprivileged user holding only `caps` (ambient), as the seed's
/// `setcap cap_net_raw+ep` advice leaves it.
fn only_caps(caps: &str) -> Vec<String> {
    [
        "setpriv",
        "--reuid",
        "nobody",
        "--regid",
        "nogroup",
        "--clear-groups",
        &format!("--inh-caps=-all,{caps}"),
        &format!("--ambient-caps=-all,{caps}"),
        &format!("--bounding-set=-all,{caps}"),
        "--",
    ]
    .iter()
    .map(|w| w.to_string())
    .collect()
}

fn as_written(opts: &mut RelayOptions) {
    opts.transport = "auto";
    opts.as_written = Some(readme_and_seed_configs());
}

/// The path the client's log says its session took, e.g. "xdp/tcp" or "udp".
fn session_path(bed: &RelayBed) -> Option<String> {
    let log = bed.log_of("client");
    let line = log.lines().rev().find(|l| l.contains("session established"))?;
    let path = line.split("path=").nth(1)?.split_whitespace().next()?;
    Some(path.to_string())
}

#[test]
fn the_readme_server_and_the_seed_client_as_written_relay_over_xdp() {
    if !require_root("the_readme_server_and_the_seed_client_as_written_relay_over_xdp") {
        return;
    }
    let mut opts = RelayOptions::new("auto").unwrap();
    as_written(&mut opts);
    let bed = RelayBed::start("f1", &opts).unwrap();
    scenarios::curl_download_is_exact(&bed, 20 * MIB);
    assert_eq!(
        session_path(&bed).as_deref(),
        Some("xdp/tcp"),
        "a server on 0.0.0.0 is reached over xdp\n{}",
        bed.logs()
    );
    // `paqet status` shows the server's sessions per path (live data is refreshed
    // every second).
    let pid = bed.server.id();
    let server_paths = || -> Option<(u64, u64)> {
        let out = std::process::Command::new(paqet_tests::paqet_bin())
            .args(["status", "--json"])
            .output()
            .ok()?;
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let server = all.as_array()?.iter().find(|v| v["live"]["pid"] == pid)?.clone();
        let sessions = |name: &str| -> u64 {
            server["live"]["paths"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["name"] == name)
                .filter_map(|p| p["sessions"].as_u64())
                .sum()
        };
        Some((sessions("xdp/tcp"), sessions("udp")))
    };
    let mut seen = None;
    let shown = wait_for(
        || {
            seen = server_paths();
            seen == Some((1, 0))
        },
        Duration::from_secs(10),
    );
    assert!(
        shown,
        "paqet status shows the server's sessions on xdp/tcp, udp as {seen:?}"
    );
}

#[test]
fn a_client_with_cap_net_raw_only_reaches_a_root_server() {
    if !require_root("a_client_with_cap_net_raw_only_reaches_a_root_server") {
        return;
    }
    let mut opts = RelayOptions::new("auto").unwrap();
    as_written(&mut opts);
    opts.client_prefix = only_caps("+net_raw");
    let bed = RelayBed::start("f2", &opts).unwrap();
    scenarios::curl_download_is_exact(&bed, 20 * MIB);
    assert_eq!(session_path(&bed).as_deref(), Some("udp"), "{}", bed.logs());
}

#[test]
fn a_root_client_reaches_a_server_with_cap_net_raw_only() {
    if !require_root("a_root_client_reaches_a_server_with_cap_net_raw_only") {
        return;
    }
    let mut opts = RelayOptions::new("auto").unwrap();
    as_written(&mut opts);
    opts.server_prefix = only_caps("+net_raw");
    let bed = RelayBed::start("f3", &opts).unwrap();
    scenarios::curl_download_is_exact(&bed, 20 * MIB);
    let client_log = bed.log_of("client");
    assert!(
        client_log.contains("also trying udp"),
        "the client should say why it left xdp\n{}",
        bed.logs()
    );
    assert_eq!(session_path(&bed).as_deref(), Some("udp"), "{}", bed.logs());
}

#[test]
fn without_a_server_socks_requests_fail_within_seconds_and_the_log_says_why() {
    if !require_root("without_a_server_socks_requests_fail_within_seconds_and_the_log_says_why") {
        return;
    }
    let mut opts = RelayOptions::new("auto").unwrap();
    as_written(&mut opts);
    opts.start_server = false;
    // TIMEOUT stays at its default (30 s): the failure must not wait for it.
    let bed = RelayBed::start("f4", &opts).unwrap();
    let proxy = bed.socks_addr();
    let (first, first_took, second, second_took) = bed
        .hosts
        .client
        .run(|| {
            let started = Instant::now();
            let first = socks::connect(proxy, ORIGIN_NAME, ORIGIN_PORT, None, 1).unwrap().err();
            let first_took = started.elapsed();
            let started = Instant::now();
            let second = socks::connect(proxy, ORIGIN_NAME, ORIGIN_PORT, None, 1).unwrap().err();
            (first, first_took, second, started.elapsed())
        })
        .unwrap();
    assert_eq!(first, Some(socks::REPLY_GENERAL_FAILURE), "{}", bed.logs());
    assert!(
        first_took < Duration::from_secs(25),
        "the failure came after {first_took:?}, as late as TIMEOUT"
    );
    assert_eq!(second, Some(socks::REPLY_GENERAL_FAILURE));
    assert!(
        second_took < Duration::from_secs(5),
        "while the server is known silent, requests fail at once (took {second_took:?})"
    );
    let log = bed.log_of("client");
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("has not answered"))
        .unwrap_or_else(|| panic!("no WARN line about the silent server\n{log}"));
    for expected in [
        &format!("{}:{SERVER_PORT}", TwoHosts::SERVER_IP),
        "xdp/tcp",
        "udp",
        "KEY",
        "paqet check",
    ] {
        assert!(warning.contains(expected), "the warning lacks {expected:?}: {warning}");
    }
}

#[test]
fn the_seeds_udp_buffer_advice_still_relays_at_speed() {
    if !require_root("the_seeds_udp_buffer_advice_still_relays_at_speed") {
        return;
    }
    let mut opts = RelayOptions::new("udp").unwrap();
    // "Increase UDP buffer sizes (in paqet.conf): UDP_BUFFER=8192", on both ends.
    opts.server_extra.push("UDP_BUFFER=8192".into());
    opts.client_extra.push("UDP_BUFFER=8192".into());
    let bed = RelayBed::start("f5", &opts).unwrap();
    let rate = scenarios::curl_download_is_exact(&bed, 50 * MIB);
    eprintln!("50 MiB with UDP_BUFFER=8192 at {rate:.1} MB/s");
    for role in ["server", "client"] {
        assert!(
            bed.log_of(role).contains("UDP_BUFFER=8192 is too small"),
            "the {role} should say it raised the buffer\n{}",
            bed.logs()
        );
    }
}

/// `paqet check` on the client's own config: its output and whether it passed.
fn check(bed: &RelayBed) -> (bool, String) {
    let out = bed.run_client_command(&["check"]).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn paqet_check_probes_the_server_over_each_path() {
    if !require_root("paqet_check_probes_the_server_over_each_path") {
        return;
    }
    let mut opts = RelayOptions::new("auto").unwrap();
    as_written(&mut opts);
    let bed = RelayBed::start("f6", &opts).unwrap();
    let live = std::path::PathBuf::from(format!("/run/paqet/client-{}.json", bed.hosts.client_if));
    assert!(
        wait_for(|| live.exists(), Duration::from_secs(10)),
        "the client published no live status at {}\n{}",
        live.display(),
        bed.logs()
    );
    let (ok, text) = check(&bed);
    let line = text
        .lines()
        .find(|l| l.contains("server over udp"))
        .unwrap_or_else(|| panic!("no probe over udp:\n{text}"));
    assert!(line.contains("answered a handshake in"), "{text}\n{}", bed.logs());
    // The running client holds the SOCKS port, which check reports as busy (naming
    // it); nothing else may fail.
    let failures: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        failures.iter().all(|l| l.contains("SOCKS port") && l.contains("paqet")),
        "check failed against a live server:\n{text}"
    );
    assert!(!ok, "check hides the busy SOCKS port:\n{text}");
    // The running client holds the interface's XDP program: check says so, not FAIL.
    assert!(
        text.lines()
            .any(|l| l.contains("server over xdp") && l.contains("not probed") && l.starts_with("OK")),
        "{text}"
    );

    let mut opts = RelayOptions::new("auto").unwrap();
    as_written(&mut opts);
    opts.start_server = false;
    let silent = RelayBed::start("f7", &opts).unwrap();
    let (ok, text) = check(&silent);
    assert!(!ok, "check passed with no server running:\n{text}");
    let line = text
        .lines()
        .find(|l| l.contains("server over udp"))
        .unwrap_or_else(|| panic!("no probe over udp:\n{text}"));
    assert!(
        line.contains("FAIL") && line.contains("no answer") && line.contains("KEY"),
        "{text}"
    );
}

/// A config file of the test's own, removed on drop.
struct OwnConf(std::path::PathBuf);

impl OwnConf {
    fn write(name: &str, text: &str) -> OwnConf {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("paqet-{name}-{}.conf", std::process::id()));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        OwnConf(path)
    }
}

impl Drop for OwnConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_second_paqet_on_the_same_interface_is_refused_clearly_and_auto_falls_back_to_udp() {
    if !require_root("a_second_paqet_on_the_same_interface_is_refused_clearly_and_auto_falls_back_to_udp") {
        return;
    }
    let mut opts = RelayOptions::new("auto").unwrap();
    as_written(&mut opts);
    let bed = RelayBed::start("f8", &opts).unwrap();
    // The same instance name as the running client (client-<interface>): before, the
    // second one removed the first's pins as "stale".
    let conf = OwnConf::write(
        "f8-second",
        &format!(
            "SOCKS_ADDR=127.0.0.1:1081\nREMOTE_ADDR={}:{SERVER_PORT}\nKEY={}\n",
            TwoHosts::SERVER_IP,
            opts.client_key
        ),
    );
    let log = std::env::temp_dir().join(format!("paqet-f8-second-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log).unwrap();
    let second = ChildGuard::spawn(
        bed.hosts
            .client
            .nsenter_command(&paqet_tests::paqet_bin().to_string_lossy())
            .args(["client", "--config"])
            .arg(&conf.0)
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file),
    )
    .unwrap();
    let proxy: std::net::SocketAddr = ([127, 0, 0, 1], 1081).into();
    let fetched = bed
        .hosts
        .client
        .run(|| {
            wait_for(|| std::net::TcpStream::connect(proxy).is_ok(), Duration::from_secs(20));
            socks::fetch_bytes(proxy, ORIGIN_NAME, ORIGIN_PORT, 5 * MIB)
        })
        .unwrap();
    let second_log = std::fs::read_to_string(&log).unwrap_or_default();
    drop(second);
    let _ = std::fs::remove_file(&log);
    let (hash, got) = fetched.unwrap_or_else(|e| panic!("second client: {e:#}\n{second_log}\n{}", bed.logs()));
    assert_eq!(
        (hash.as_str(), got),
        (pattern::sha256_hex(5 * MIB, 5 * MIB).as_str(), 5 * MIB)
    );
    assert!(
        second_log.contains("already carries paqet's XDP program") || second_log.contains("another paqet"),
        "the refusal is not explained:\n{second_log}"
    );
    assert!(second_log.contains("path=udp"), "{second_log}");
    // The first client still relays over xdp.
    scenarios::curl_download_is_exact(&bed, 5 * MIB);
    assert_eq!(session_path(&bed).as_deref(), Some("xdp/tcp"), "{}", bed.logs());
}

#[test]
fn a_server_on_the_ipv6_wildcard_serves_an_ipv4_client_over_xdp() {
    if !require_root("a_server_on_the_ipv6_wildcard_serves_an_ipv4_client_over_xdp") {
        return;
    }
    let mut opts = RelayOptions::new("auto").unwrap();
    as_written(&mut opts);
    // `[::]` covers both families, as a dual-stack socket on it does.
    if let Some((server, _)) = opts.as_written.as_mut() {
        *server = format!("LISTEN_ADDR=[::]:{SERVER_PORT}");
    }
    let bed = RelayBed::start("f9", &opts).unwrap();
    scenarios::curl_download_is_exact(&bed, 10 * MIB);
    assert_eq!(session_path(&bed).as_deref(), Some("xdp/tcp"), "{}", bed.logs());
}

/// `paqet_steer`'s counters of the server's instance on the client's link.
fn server_steering(bed: &RelayBed) -> paqet_common::Stats {
    let instance = format!("server-{}", bed.hosts.server_if);
    paqet::kernel::read_pinned_stats(&instance).unwrap_or_else(|e| panic!("{instance}: {e}\n{}", bed.logs()))
}

/// Sends `probes` UDP datagrams to `to` and then one to `marker` from the client's
/// namespace, and waits until `paqet_steer` has matched `expect` more frames than
/// before: the matched count it reached, or what it stood at when the wait gave up.
fn steered_by_probes(bed: &RelayBed, to: &str, probes: usize, marker: &str, expect: u64) -> u64 {
    let before = server_steering(bed).matched;
    let target = |ip: &str| -> std::net::SocketAddr { format!("{ip}:{SERVER_PORT}").parse().unwrap() };
    bed.hosts
        .client
        .run(|| {
            let sock = std::net::UdpSocket::bind("198.18.0.1:0").unwrap();
            for _ in 0..probes {
                sock.send_to(b"probe", target(to)).unwrap();
            }
            sock.send_to(b"marker", target(marker)).unwrap();
        })
        .unwrap();
    let mut matched = before;
    wait_for(
        || {
            matched = server_steering(bed).matched;
            matched >= before + expect
        },
        Duration::from_secs(10),
    );
    matched - before
}

/// A second address the tests add to a running server: its own /32, so removing the
/// /24 later leaves it (a secondary of the /24 would go with it).
const ADDED: &str = "198.18.0.20";

/// A server on `0.0.0.0` over xdp with `wire`, and a client told to reach it at
/// [`ADDED`], which the server's interface gains only once both run. Relays 5 MiB
/// through that address (hash checked) before returning.
fn relay_through_an_added_address(tag: &str, wire: &str) -> RelayBed {
    let mut opts = RelayOptions::new("xdp").unwrap();
    opts.as_written = Some((
        format!("LISTEN_ADDR=0.0.0.0:{SERVER_PORT}\nTRANSPORT=xdp\nWIRE={wire}"),
        format!("SOCKS_ADDR=127.0.0.1:1080\nREMOTE_ADDR={ADDED}:{SERVER_PORT}\nTRANSPORT=xdp\nWIRE={wire}"),
    ));
    let bed = RelayBed::start(tag, &opts).unwrap();
    let server_if = bed.hosts.server_if.clone();
    let added_cidr = format!("{ADDED}/32");
    bed.hosts
        .server
        .exec(&["ip", "addr", "add", &added_cidr, "dev", &server_if])
        .unwrap();
    // Neighbours pinned, so that no ARP is needed: the client, its capabilities
    // dropped, can no longer ask its kernel to resolve an address that did not answer
    // at its start, and probes must reach both addresses.
    bed.hosts.pin_neighbours().unwrap();
    let server_mac = paqet_tests::fmt_mac(bed.hosts.server.mac(&server_if).unwrap());
    let client_if = bed.hosts.client_if.clone();
    bed.hosts
        .client
        .exec(&[
            "ip",
            "neigh",
            "replace",
            ADDED,
            "lladdr",
            &server_mac,
            "dev",
            &client_if,
            "nud",
            "permanent",
        ])
        .unwrap();
    scenarios::curl_download_is_exact(&bed, 5 * MIB);
    bed
}

/// On the TCP-shaped wire the client takes only frames from the address it named, so
/// the server's SYN-ACK and data must leave from the added address, not its first.
#[test]
fn a_wildcard_server_answers_from_the_address_a_client_reached() {
    if !require_root("a_wildcard_server_answers_from_the_address_a_client_reached") {
        return;
    }
    let bed = relay_through_an_added_address("fb", "tcp");
    assert_eq!(session_path(&bed).as_deref(), Some("xdp/tcp"), "{}", bed.logs());
}

#[test]
fn a_wildcard_server_steers_the_addresses_its_interface_holds_now() {
    if !require_root("a_wildcard_server_steers_the_addresses_its_interface_holds_now") {
        return;
    }
    const PROBES: usize = 5;
    // The UDP-shaped wire: a frame to the port is then exactly a probe or the relay's
    // own, with no kernel RST to count (the kernel answers stray UDP with ICMP).
    let mut bed = relay_through_an_added_address("fa", "udp");
    let server_if = bed.hosts.server_if.clone();

    // From here on only the probes reach the server's port.
    let placeholder = ChildGuard::spawn(&mut std::process::Command::new("true")).unwrap();
    drop(std::mem::replace(&mut bed.client, placeholder));
    let old = TwoHosts::SERVER_IP.to_string();
    assert_eq!(
        steered_by_probes(&bed, &old, PROBES, ADDED, PROBES as u64 + 1),
        PROBES as u64 + 1,
        "frames to both addresses are steered while the interface holds both\n{}",
        bed.logs()
    );

    let old_cidr = format!("{old}/24");
    bed.hosts
        .server
        .exec(&["ip", "addr", "del", &old_cidr, "dev", &server_if])
        .unwrap();
    let followed = wait_for(
        || bed.log_of("server").contains(&format!("addresses=[{ADDED}]")),
        Duration::from_secs(10),
    );
    assert!(
        followed,
        "the server should say it steers {ADDED} alone\n{}",
        bed.logs()
    );
    assert_eq!(
        steered_by_probes(&bed, &old, PROBES, ADDED, 1),
        1,
        "only the marker to {ADDED} is steered; frames to the removed {old} reach the kernel\n{}",
        bed.logs()
    );
}
