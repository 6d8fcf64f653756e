//! The service contract of `dist/paqet.service`, tested without systemd as PID 1 (there
//! is none on these machines): the binary runs the way the unit runs it (user
//! flowless-paqet, only the unit's ambient capabilities, no new privileges, after the
//! unit's ExecStartPre) in network namespaces, and must relay over xdp, stop cleanly on
//! SIGTERM, come back after kill -9, and explain itself through `paqet check`. The unit
//! itself must pass `systemd-analyze verify`.

use std::process::{Command, Stdio};
use std::time::Duration;

use paqet_tests::service::{self, ServiceBed, USER};
use paqet_tests::{ChildGuard, pattern, require_root, wait_for};

const MIB: u64 = 1 << 20;

fn status_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Capability bits of the unit's set, by setpriv name.
fn cap_bits(caps: &[String]) -> u64 {
    caps.iter()
        .map(|c| match c.as_str() {
            "net_admin" => 12,
            "net_raw" => 13,
            "ipc_lock" => 14,
            "perfmon" => 38,
            "bpf" => 39,
            other => panic!("unexpected capability {other} in the unit"),
        })
        .fold(0u64, |acc, bit| acc | (1u64 << bit))
}

#[test]
fn relays_over_xdp_as_the_service_user_with_only_ambient_caps() {
    if !require_root("relays_over_xdp_as_the_service_user_with_only_ambient_caps") {
        return;
    }
    let mut bed = ServiceBed::start("sva").unwrap();
    let (uid, _) = service::user_ids(USER).unwrap();
    let want = cap_bits(&bed.caps);
    for role in ["server", "client"] {
        let pid = bed.pid(role).unwrap();
        let st = status_of(pid);
        assert!(
            status_field(&st, "Name:").starts_with("paqet"),
            "{role}: pid {pid} is not paqet:\n{st}"
        );
        for f in status_field(&st, "Uid:").split_whitespace() {
            assert_eq!(f, uid.to_string(), "{role} runs as uid {f}, not {USER}");
        }
        // Started with the unit's set (ambient, bounding); once up, paqet has dropped
        // all of it but the bounding set (see the privileges tests below).
        assert!(
            wait_for(
                || bed.log_of(role).contains("dropped capabilities"),
                Duration::from_secs(10)
            ),
            "{role} did not drop its capabilities:\n{}",
            bed.log_of(role)
        );
        let st = status_of(pid);
        let eff = u64::from_str_radix(&status_field(&st, "CapEff:"), 16).unwrap();
        let bnd = u64::from_str_radix(&status_field(&st, "CapBnd:"), 16).unwrap();
        let amb = u64::from_str_radix(&status_field(&st, "CapAmb:"), 16).unwrap();
        assert_eq!(
            (eff, bnd, amb),
            (0, want, 0),
            "{role}: CapEff/CapBnd/CapAmb after start are not (none, the unit's set {:?}, none)",
            bed.caps
        );
        assert_eq!(status_field(&st, "NoNewPrivs:"), "1", "{role}: NoNewPrivs");
        let log = bed.log_of(role);
        assert!(
            log.contains("attached paqet_steer"),
            "{role} did not attach XDP:\n{log}"
        );
        assert!(
            bed.pin_dir(role).join("stats").exists(),
            "{role}: no pins at {}",
            bed.pin_dir(role).display()
        );
        assert!(
            bed.xdp_prog_id(role).unwrap().is_some(),
            "{role}: no XDP program on {}",
            bed.interface(role)
        );
    }
    let len = 16 * MIB;
    let hash = bed.curl_sha256(len).unwrap();
    assert_eq!(
        hash,
        pattern::sha256_hex(len, len),
        "corrupted download\n{}",
        bed.logs()
    );
    // The download really went through paqet_steer into the client's AF_XDP socket:
    // `paqet status` (root, host namespace) reads the client's pinned counters.
    let out = Command::new(&bed.bin)
        .args(["status", "--json", "--instance"])
        .arg(format!("client-{}", bed.client_if))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "paqet status failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let redirected: u64 = text
        .split("\"redirected\":")
        .nth(1)
        .and_then(|r| {
            r.chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse()
                .ok()
        })
        .unwrap_or(0);
    assert!(
        redirected > len / 1500,
        "the client redirected only {redirected} frames for {len} bytes: {text}"
    );
    assert!(
        text.contains("\"running\":true") && !text.contains("\"program_ids\":[]"),
        "{text}"
    );
}

#[test]
fn sigterm_during_a_transfer_exits_zero_and_leaves_nothing() {
    if !require_root("sigterm_during_a_transfer_exits_zero_and_leaves_nothing") {
        return;
    }
    let mut bed = ServiceBed::start("svt").unwrap();
    let ids: Vec<(String, u32)> = ["server", "client"]
        .iter()
        .map(|r| (r.to_string(), bed.xdp_prog_id(r).unwrap().expect("attached")))
        .collect();
    // A slow transfer (1 MiB/s for 64 MiB) is surely running when the signal comes.
    let mut curl = ChildGuard::spawn(
        bed.curl_command(64 * MIB, "--limit-rate 1M")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        curl.try_wait().unwrap().is_none(),
        "the transfer ended before the signal"
    );
    for role in ["client", "server"] {
        let took = sigterm_leaves_nothing(&mut bed, role, &["SIGTERM: stopping", "detached paqet_steer"]);
        eprintln!("{role}: SIGTERM → exit 0 in {took:?}");
    }
    for (role, id) in ids {
        assert!(
            !ServiceBed::prog_exists(id).unwrap(),
            "{role}'s paqet_steer (id {id}) is still loaded"
        );
        let out = service::bpftool(&["prog", "show", "name", "paqet_steer"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.lines().any(|l| l.starts_with(&format!("{id}:"))),
            "bpftool still shows id {id}:\n{text}"
        );
    }
}

#[test]
fn second_signal_exits_at_once() {
    if !require_root("second_signal_exits_at_once") {
        return;
    }
    let mut bed = ServiceBed::start("svs").unwrap();
    let _curl = ChildGuard::spawn(
        bed.curl_command(64 * MIB, "--limit-rate 1M")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // The client has a stream open, so the first SIGTERM drains (up to 5 s); the second
    // must cut that short.
    bed.signal("client", libc::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    bed.signal("client", libc::SIGTERM).unwrap();
    let (status, took) = bed.wait_exit("client", Duration::from_secs(14)).unwrap();
    eprintln!("client: SIGTERM, SIGTERM → {status} after {took:?}");
    assert_eq!(status.code(), Some(0), "{}", bed.logs());
    assert!(
        took < Duration::from_secs(2),
        "second signal took {took:?}\n{}",
        bed.logs()
    );
    assert!(bed.log_of("client").contains("second signal"), "{}", bed.logs());
    assert_eq!(
        bed.xdp_prog_id("client").unwrap(),
        None,
        "XDP still attached after the process exited"
    );
    // The second signal skips only the drain: the teardown still runs.
    assert!(
        !bed.pin_dir("client").exists(),
        "pins left behind after the second signal"
    );
    bed.start_role("client").unwrap();
    bed.wait_ready().unwrap();
    let hash = bed.curl_sha256(MIB).unwrap();
    assert_eq!(hash, pattern::sha256_hex(MIB, MIB));
}

#[test]
fn kill_9_then_start_again_replaces_stale_pins_and_relays() {
    if !require_root("kill_9_then_start_again_replaces_stale_pins_and_relays") {
        return;
    }
    let mut bed = ServiceBed::start("svk").unwrap();
    let old: Vec<u32> = ["server", "client"]
        .iter()
        .map(|r| bed.xdp_prog_id(r).unwrap().expect("attached"))
        .collect();
    for role in ["server", "client"] {
        bed.signal(role, libc::SIGKILL).unwrap();
        bed.wait_exit(role, Duration::from_secs(5)).unwrap();
        // The kernel drops the XDP link with the process; the pins stay.
        assert_eq!(
            bed.xdp_prog_id(role).unwrap(),
            None,
            "{role}: XDP still attached after kill -9"
        );
        assert!(
            bed.pin_dir(role).join("stats").exists(),
            "{role}: kill -9 should leave stale pins"
        );
    }
    for role in ["server", "client"] {
        bed.start_role(role).unwrap();
    }
    bed.wait_ready().unwrap();
    for (role, old_id) in ["server", "client"].iter().zip(old) {
        let log = bed.log_of(role);
        assert!(
            log.contains("replacing stale pins"),
            "{role} did not notice the stale pins:\n{log}"
        );
        let new_id = bed.xdp_prog_id(role).unwrap().expect("attached again");
        assert_ne!(new_id, old_id, "{role}: same program id after restart");
    }
    let len = 8 * MIB;
    assert_eq!(
        bed.curl_sha256(len).unwrap(),
        pattern::sha256_hex(len, len),
        "{}",
        bed.logs()
    );
}

/// The service cannot list loaded programs (that needs CAP_SYS_ADMIN), so a second
/// copy must learn from the interface that the first still runs, and leave its pins.
#[test]
fn a_second_copy_beside_the_running_service_leaves_its_pins_and_its_relay_alone() {
    if !require_root("a_second_copy_beside_the_running_service_leaves_its_pins_and_its_relay_alone") {
        return;
    }
    let bed = ServiceBed::start("svd").unwrap();
    let before = bed.xdp_prog_id("server").unwrap().expect("attached");
    let caps = bed.caps.clone();
    let (code, log) = server_with(&bed, &caps, &[]);
    assert!(
        code.is_some_and(|c| c != 0),
        "a second server came up beside the running one (exit {code:?}):\n{log}"
    );
    assert!(
        log.contains(&format!("another paqet server-{} is running", bed.interface("server"))),
        "the second copy did not say which instance runs:\n{log}"
    );
    assert!(
        !log.contains("replacing stale pins"),
        "live pins taken for stale:\n{log}"
    );
    assert!(
        bed.pin_dir("server").join("stats").exists(),
        "the running server lost its pins"
    );
    assert_eq!(
        bed.xdp_prog_id("server").unwrap(),
        Some(before),
        "the running server lost its program"
    );
    // `paqet status` as the service user, with no capability, tells the same way.
    let out = service::as_service(&bed.sns, &[], &[], &bed.bin)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    let instance = format!("server-{}", bed.interface("server"));
    let described: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
    let server = described
        .as_array()
        .and_then(|all| all.iter().find(|v| v["instance"] == instance.as_str()))
        .unwrap_or_else(|| panic!("{instance} not in status:\n{status}"));
    assert_eq!(server["running"], true, "{server}");
    let len = 4 * MIB;
    assert_eq!(
        bed.curl_sha256(len).unwrap(),
        pattern::sha256_hex(len, len),
        "{}",
        bed.logs()
    );
}

#[test]
fn check_names_the_port_holder_and_the_missing_capabilities() {
    if !require_root("check_names_the_port_holder_and_the_missing_capabilities") {
        return;
    }
    let bed = ServiceBed::new("svc").unwrap();
    // Another paqet client (udp transport: no capabilities) already holds the SOCKS port,
    // run by the same user, as a second copy of the service would be.
    let mut holder_cmd = service::as_service(&bed.cns, &[], &[], &bed.bin);
    holder_cmd
        .args(["client", "--config"])
        .arg(bed.conf("client"))
        .args(["--transport", "udp"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let holder = ChildGuard::spawn(&mut holder_cmd).unwrap();
    let socks = bed.socks_addr();
    assert!(
        bed.cns
            .run(|| wait_for(|| std::net::TcpStream::connect(socks).is_ok(), Duration::from_secs(10)))
            .unwrap()
    );

    // `paqet check` as the service user with no capabilities at all.
    let out = service::as_service(&bed.cns, &[], &[], &bed.bin)
        .arg("check")
        .arg("--config")
        .arg(bed.conf("client"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(!out.status.success(), "check passed although it has FAILs:\n{text}");
    // Lines are "OK    what: detail" / "FAIL  what: detail".
    let line = |what: &str| {
        text.lines()
            .find(|l| l.get(6..).is_some_and(|r| r.starts_with(&format!("{what}:"))))
            .unwrap_or_default()
            .to_string()
    };
    let caps = line("capabilities");
    assert!(caps.starts_with("FAIL"), "{text}");
    for cap in &bed.caps {
        assert!(
            caps.contains(&format!("CAP_{}", cap.to_ascii_uppercase())),
            "{cap} not named: {caps}"
        );
    }
    assert!(
        caps.contains("setcap") && caps.contains("AmbientCapabilities"),
        "no fix in: {caps}"
    );
    let port = line("SOCKS port");
    assert!(port.starts_with("FAIL"), "{text}");
    assert!(
        port.contains(&format!("pid {}", holder.id())) && port.contains("paqet"),
        "holder not named: {port}"
    );
    for ok in [
        "config",
        "route to server",
        "neighbour",
        "kernel BTF",
        "bpffs",
        "XDP",
        "AF_XDP",
    ] {
        assert!(line(ok).starts_with("OK"), "expected OK for {ok}:\n{text}");
    }

    // With the unit's capabilities, the port free and the server running (check now
    // handshakes with it), every line is OK.
    drop(holder);
    let mut bed = bed;
    bed.start_role("server").unwrap();
    assert!(wait_for(
        || bed.pin_dir("server").join("stats").exists(),
        Duration::from_secs(10)
    ));
    assert!(
        bed.cns
            .run(|| wait_for(|| std::net::TcpStream::connect(socks).is_err(), Duration::from_secs(10)))
            .unwrap()
    );
    let out = service::as_service(&bed.cns, &bed.caps, &[], &bed.bin)
        .arg("check")
        .arg("--config")
        .arg(bed.conf("client"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("FAIL"),
        "check with the unit's caps:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a server as the service user with `caps` and `prefix`; returns its exit code
/// (None: it stayed up for 2 s and was stopped with SIGTERM) and what it printed.
fn server_with(bed: &ServiceBed, caps: &[String], prefix: &[&str]) -> (Option<i32>, String) {
    service::run_exec_start_pre().unwrap();
    let log_path = bed.dir.join("probe.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = service::as_service(&bed.sns, caps, prefix, &bed.bin);
    cmd.arg("run")
        .arg("--config")
        .arg(bed.conf("server"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut child = ChildGuard::spawn(&mut cmd).unwrap();
    let mut code = None;
    let exited = wait_for(
        || match child.try_wait().unwrap() {
            Some(status) => {
                code = status.code();
                true
            }
            None => false,
        },
        Duration::from_secs(2),
    );
    if !exited {
        // SAFETY: kill(2) on our own, unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert!(
            wait_for(|| child.try_wait().unwrap().is_some(), Duration::from_secs(10)),
            "no exit after SIGTERM"
        );
    }
    (code, std::fs::read_to_string(&log_path).unwrap_or_default())
}

#[test]
fn each_capability_of_the_unit_is_needed() {
    if !require_root("each_capability_of_the_unit_is_needed") {
        return;
    }
    let bed = ServiceBed::new("svn").unwrap();
    let all = bed.caps.clone();
    // With all of them it comes up (and is stopped after 2 s).
    let (code, log) = server_with(&bed, &all, &[]);
    assert_eq!(code, None, "the server did not stay up with the unit's caps:\n{log}");
    // 64 KiB is systemd's default LimitMEMLOCK before v253: with CAP_IPC_LOCK, fine.
    let (code, log) = server_with(&bed, &all, &["prlimit", "--memlock=65536"]);
    assert_eq!(
        code, None,
        "with CAP_IPC_LOCK a 64 KiB RLIMIT_MEMLOCK must not matter:\n{log}"
    );
    let expect: &[(&str, &[&str], &str)] = &[
        ("bpf", &[], "missing capabilities CAP_BPF"),
        ("net_admin", &[], "missing capabilities CAP_NET_ADMIN"),
        // Measured without the pre-check: the verifier refuses paqet_steer with "pointer
        // arithmetic with it prohibited for !root". paqet now names the capability first.
        ("perfmon", &[], "missing capabilities CAP_PERFMON"),
        (
            "net_raw",
            &[],
            "opening an AF_XDP socket failed: Operation not permitted",
        ),
        ("ipc_lock", &["prlimit", "--memlock=65536"], "registering the UMEM"),
    ];
    for (drop_cap, prefix, message) in expect {
        if !all.iter().any(|c| c == drop_cap) {
            panic!("the unit no longer grants {drop_cap}: update this test");
        }
        let caps: Vec<String> = all.iter().filter(|c| c != drop_cap).cloned().collect();
        let (code, log) = server_with(&bed, &caps, prefix);
        let last = log
            .lines()
            .filter(|l| l.starts_with("paqet:") || l.contains(message))
            .collect::<Vec<_>>()
            .join("\n");
        eprintln!(
            "without CAP_{}: exit {code:?}: {}",
            drop_cap.to_ascii_uppercase(),
            last.chars().take(300).collect::<String>()
        );
        assert_eq!(
            code,
            Some(1),
            "without {drop_cap} the server should fail to start:\n{log}"
        );
        assert!(
            log.contains(message),
            "without {drop_cap}: expected {message:?} in:\n{log}"
        );
    }
    assert!(!bed.pin_dir("server").exists(), "a failed start left pins");
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if !require_root("unit_passes_systemd_analyze_verify") {
        return;
    }
    let text = service::unit_text().unwrap();
    let one = |key: &str| service::unit_values(&text, key).join(" ");
    assert_eq!(
        one("ExecStart"),
        "/opt/flowless/bin/paqet run --config /etc/flowless/paqet.conf"
    );
    assert_eq!(one("User"), USER);
    assert_eq!(one("Group"), USER);
    assert_eq!(one("Restart"), "always");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    // "-": a container without /sys/fs/bpf must still start it (udp); the pin folder,
    // not /sys/fs/bpf, which ProtectKernelTunables keeps read-only; see package.rs.
    assert_eq!(one("ReadWritePaths"), "-/sys/fs/bpf/paqet");
    assert_eq!(one("AmbientCapabilities"), one("CapabilityBoundingSet"));
    for cap in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK"] {
        assert!(
            one("AmbientCapabilities").split_whitespace().any(|c| c == cap),
            "{cap} missing"
        );
    }
    for family in ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_XDP"] {
        assert!(
            one("RestrictAddressFamilies").split_whitespace().any(|f| f == family),
            "{family} missing"
        );
    }
    assert!(
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: `cargo xtask setup` installs it (package systemd)"
    );
    // verify needs the ExecStart binary to exist: a copy pointing at the built binary.
    let dir = std::env::temp_dir().join(format!("paqet-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("paqet.service");
    std::fs::write(
        &copy,
        text.replace("/opt/flowless/bin/paqet", &paqet_tests::paqet_bin().to_string_lossy()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

/// Every thread of `pid`: (tid, name, /proc status).
fn threads_of(pid: u32) -> Vec<(String, String, String)> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let tid = entry.file_name().to_string_lossy().into_owned();
        let read = |f: &str| std::fs::read_to_string(entry.path().join(f)).unwrap_or_default();
        let status = read("status");
        if !status.is_empty() {
            out.push((tid, read("comm").trim().to_string(), status));
        }
    }
    out
}

/// Asserts that no thread of `role` holds a capability (effective, permitted,
/// inheritable, ambient) and that the bounding set is still the unit's.
fn assert_no_thread_has_caps(bed: &mut ServiceBed, role: &str, when: &str) -> usize {
    let want_bnd = cap_bits(&bed.caps);
    let pid = bed.pid(role).unwrap();
    let threads = threads_of(pid);
    for (tid, name, st) in &threads {
        let field = |k: &str| u64::from_str_radix(&status_field(st, k), 16).unwrap();
        assert_eq!(
            (field("CapEff:"), field("CapPrm:"), field("CapInh:"), field("CapAmb:")),
            (0, 0, 0, 0),
            "{role} {when}: thread {tid} ({name}) still holds capabilities:\n{st}"
        );
        assert_eq!(
            field("CapBnd:"),
            want_bnd,
            "{role} {when}: thread {tid} ({name}) bounding set"
        );
    }
    threads.len()
}

#[test]
fn every_thread_drops_its_capabilities_after_start_and_the_relay_still_works() {
    if !require_root("every_thread_drops_its_capabilities_after_start_and_the_relay_still_works") {
        return;
    }
    let mut bed = ServiceBed::start("svp").unwrap();
    let ids: Vec<(String, u32)> = ["server", "client"]
        .iter()
        .map(|r| (r.to_string(), bed.xdp_prog_id(r).unwrap().expect("attached")))
        .collect();
    for role in ["server", "client"] {
        // The SOCKS port opens before the drop: wait for paqet to say it is done.
        assert!(
            wait_for(
                || bed.log_of(role).contains("dropped capabilities"),
                Duration::from_secs(10)
            ),
            "{role} did not drop its capabilities:\n{}",
            bed.log_of(role)
        );
        let log = bed.log_of(role);
        let line = log.lines().find(|l| l.contains("dropped capabilities")).unwrap();
        assert!(line.contains("INFO") && line.contains("none remain"), "{line}");
        for cap in &bed.caps {
            assert!(
                line.contains(&format!("CAP_{}", cap.to_ascii_uppercase())),
                "{cap} not named: {line}"
            );
        }
        // The threads that exist before the drop are the point: the next-hop resolver
        // and the eBPF log pump were started while the unit's set was in force (an
        // AF_XDP TX thread too, where frames cannot leave through AF_PACKET).
        let pid = bed.pid(role).unwrap();
        let names: Vec<String> = threads_of(pid).into_iter().map(|(_, n, _)| n).collect();
        assert!(
            names.iter().any(|n| n == "paqet-xdp-neigh") && names.iter().any(|n| n == "paqet-ebpf-log"),
            "{role}: expected the next-hop resolver and eBPF log threads, found {names:?}"
        );
        let n = assert_no_thread_has_caps(&mut bed, role, "after start");
        eprintln!("{role}: {n} threads, none with a capability; {line}");
    }

    let len = 16 * MIB;
    assert_eq!(
        bed.curl_sha256(len).unwrap(),
        pattern::sha256_hex(len, len),
        "corrupted download without capabilities\n{}",
        bed.logs()
    );
    for role in ["server", "client"] {
        assert_no_thread_has_caps(&mut bed, role, "after a download");
    }

    // Detaching and unpinning need none of them either.
    for role in ["client", "server"] {
        sigterm_leaves_nothing(&mut bed, role, &["detached paqet_steer"]);
        let log = bed.log_of(role);
        assert!(!log.contains("while detaching"), "{role} log:\n{log}");
    }
    for (role, id) in ids {
        assert!(
            !ServiceBed::prog_exists(id).unwrap(),
            "{role}'s paqet_steer (id {id}) is still loaded"
        );
    }
}

/// SIGTERMs `role` and checks it exits 0 within the unit's stop timeout (the drain is
/// bounded at 5 s in roles.rs, well under 15 s), its log says `expected`, and it left
/// no pins and no XDP program attached. Returns how long it took.
fn sigterm_leaves_nothing(bed: &mut ServiceBed, role: &str, expected: &[&str]) -> Duration {
    bed.signal(role, libc::SIGTERM).unwrap();
    let (status, took) = bed.wait_exit(role, Duration::from_secs(14)).unwrap();
    assert_eq!(status.code(), Some(0), "{role} after SIGTERM: {status}\n{}", bed.logs());
    let log = bed.log_of(role);
    assert!(expected.iter().all(|e| log.contains(e)), "{role} log:\n{log}");
    assert!(
        !bed.pin_dir(role).exists(),
        "{role} left its pins at {}",
        bed.pin_dir(role).display()
    );
    assert_eq!(
        bed.xdp_prog_id(role).unwrap(),
        None,
        "{role} left XDP attached to {}",
        bed.interface(role)
    );
    took
}
