//! The SOCKS port against a slowloris, in network namespaces: a client whose SOCKS port
//! listens beyond loopback (with credentials), 1,200 strangers' connections that never
//! send a byte, more arriving all the while, and a real client with credentials who
//! must still download, exactly, at once. Before the hardening, the idle connections
//! took every descriptor under the usual soft limit of 1,024 and the real client got
//! nothing.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use paqet_tests::relay::{ORIGIN_NAME, ORIGIN_PORT, RelayBed, RelayOptions, SERVER_PORT};
use paqet_tests::{TwoHosts, pattern, require_root};

const MIB: u64 = 1 << 20;
/// The report's 1,140, and then some.
const IDLE: usize = 1200;
const USER: &str = "alice";
const PASS: &str = "h0rse-battery-staple";
/// The handshake deadline the client enforces (paqet::socks::gate::HANDSHAKE_TIMEOUT).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn socks_addr() -> SocketAddr {
    (TwoHosts::CLIENT_IP, 1080).into()
}

/// Raises this test process's own soft open-file limit to its hard one (it holds the
/// idle connections); the paqet it starts gets the limit its `ulimit` prefix sets.
fn raise_own_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    assert!(
        lim.rlim_cur as usize > IDLE + 2000,
        "this test needs more than {} descriptors (soft limit {})",
        IDLE + 2000,
        lim.rlim_cur
    );
}

/// The client's SOCKS port on every address (so the bed's readiness probe on
/// 127.0.0.1 still works), reached here on 198.18.0.1: beyond loopback, so credentials
/// are required.
fn bed(tag: &str, ulimit: &str) -> RelayBed {
    let mut opts = RelayOptions::new("udp").unwrap();
    opts.as_written = Some((
        format!("LISTEN_ADDR={}:{SERVER_PORT}\nTRANSPORT=udp", TwoHosts::SERVER_IP),
        format!(
            "SOCKS_ADDR=0.0.0.0:1080\nREMOTE_ADDR={}:{SERVER_PORT}\nTRANSPORT=udp\nSOCKS_USER={USER}\nSOCKS_PASS={PASS}\nLOG_LEVEL=debug",
            TwoHosts::SERVER_IP
        ),
    ));
    // As systemd starts a unit without LimitNOFILE (soft 1024), or a tighter box.
    opts.client_prefix = ["sh", "-c", &format!("{ulimit} && exec \"$0\" \"$@\"")]
        .iter()
        .map(|w| w.to_string())
        .collect();
    RelayBed::start(tag, &opts).unwrap()
}

/// Opens up to `n` connections that send nothing (each connect bounded to 1 s, the
/// whole loop to 30 s); returns them and how many connects failed.
fn open_idle(n: usize) -> (Vec<TcpStream>, usize) {
    let started = Instant::now();
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        if started.elapsed() > Duration::from_secs(30) {
            failed += 1;
            continue;
        }
        match TcpStream::connect_timeout(&socks_addr(), Duration::from_secs(1)) {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    (held, failed)
}

/// The attacker keeps it up: a new idle connection every 2 ms, closing his oldest to
/// stay at `IDLE`, until `stop` (at most 90 s or 45,000 connections).
fn keep_churning(stop: &AtomicBool, opened: &AtomicU64) {
    let started = Instant::now();
    let mut ring = std::collections::VecDeque::with_capacity(IDLE + 1);
    for _ in 0..45_000 {
        if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(90) {
            break;
        }
        if let Ok(s) = TcpStream::connect_timeout(&socks_addr(), Duration::from_millis(500)) {
            opened.fetch_add(1, Ordering::Relaxed);
            ring.push_back(s);
            if ring.len() > IDLE {
                ring.pop_front();
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// curl with credentials through 198.18.0.1:1080, by name; (sha256, time).
fn curl_with_credentials(bed: &RelayBed, len: u64) -> (String, Duration) {
    let url = format!("http://{ORIGIN_NAME}:{ORIGIN_PORT}/bytes/{len}");
    let proxy = format!("socks5h://{USER}:{PASS}@{}", socks_addr());
    let started = Instant::now();
    let out = bed
        .hosts
        .client
        .command("bash")
        .args([
            "-o",
            "pipefail",
            "-c",
            &format!("curl -sS --fail --max-time 30 --proxy {proxy} {url} | sha256sum"),
        ])
        .output()
        .expect("running curl");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "the real client got nothing after {took:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        bed.logs()
    );
    let hash = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    (hash, took)
}

/// How many of `held` the relay has closed (end of stream or reset), polled without
/// blocking until all are or `within` passes.
fn wait_all_closed(held: &mut [TcpStream], within: Duration) -> usize {
    for s in held.iter() {
        s.set_nonblocking(true).unwrap();
    }
    let mut closed = vec![false; held.len()];
    let started = Instant::now();
    loop {
        for (s, c) in held.iter_mut().zip(closed.iter_mut()) {
            if *c {
                continue;
            }
            let mut buf = [0u8; 16];
            match s.read(&mut buf) {
                Ok(0) => *c = true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => *c = true,
            }
        }
        let n = closed.iter().filter(|c| **c).count();
        if n == held.len() || started.elapsed() > within {
            return n;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The soft and hard open-file limits of a running process.
fn nofile_of(pid: u32) -> Option<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    Some((f.next()?.to_string(), f.next()?.to_string()))
}

/// The slowloris, then the real client; returns the download's time.
fn slowloris_then_download(bed: &RelayBed, len: u64) -> Duration {
    let (mut idle, failed) = bed.hosts.client.run(|| open_idle(IDLE)).unwrap();
    eprintln!("{} idle connections open, {failed} connects failed", idle.len());
    let stop = AtomicBool::new(false);
    let opened = AtomicU64::new(0);
    let (hash, took) = std::thread::scope(|s| {
        let churn = s.spawn(|| bed.hosts.client.run(|| keep_churning(&stop, &opened)));
        // Let the churn run a moment: the real client arrives in the middle of it.
        std::thread::sleep(Duration::from_millis(500));
        let result = curl_with_credentials(bed, len);
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap().unwrap();
        result
    });
    eprintln!(
        "download of {len} bytes under the slowloris: {took:?} ({} more idle connections opened meanwhile)",
        opened.load(Ordering::Relaxed)
    );
    assert_eq!(hash, pattern::sha256_hex(len, len), "{}", bed.logs());
    assert!(took < Duration::from_secs(15), "the real client waited {took:?}");

    // Nothing a stranger opened stays open past the handshake deadline.
    let closed = wait_all_closed(&mut idle, HANDSHAKE_TIMEOUT + Duration::from_secs(5));
    assert_eq!(closed, idle.len(), "idle connections the relay never closed");

    // Warnings are summaries (one per 10 s at most), never one per connection.
    let log = bed.log_of("client");
    let summaries = log.lines().filter(|l| l.contains("SOCKS port under pressure")).count();
    let warns = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(
        (1..=4).contains(&summaries) && warns <= summaries + 5,
        "{summaries} summaries, {warns} WARN lines for thousands of idle connections:\n{}",
        bed.logs()
    );
    assert!(
        !log.contains("accept failed"),
        "the accept loop ran out of descriptors:\n{}",
        bed.logs()
    );
    took
}

#[test]
fn idle_connections_do_not_lock_a_real_client_out_under_the_default_soft_limit() {
    if !require_root("idle_connections_do_not_lock_a_real_client_out_under_the_default_soft_limit") {
        return;
    }
    raise_own_nofile();
    let hard = {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit on a struct we own.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        lim.rlim_max
    };
    let bed = bed("sl", "ulimit -Sn 1024");
    slowloris_then_download(&bed, 8 * MIB);
    // paqet raised its soft limit to the hard one at start.
    let limits = nofile_of(bed.client.id());
    assert_eq!(
        limits,
        Some((hard.to_string(), hard.to_string())),
        "paqet's open-file limits (soft, hard)"
    );
}

#[test]
fn idle_connections_do_not_lock_a_real_client_out_when_the_hard_limit_is_1024() {
    if !require_root("idle_connections_do_not_lock_a_real_client_out_when_the_hard_limit_is_1024") {
        return;
    }
    raise_own_nofile();
    // Nothing to raise: the cap on handshakes alone keeps descriptors for real clients.
    let bed = bed("sh", "ulimit -n 1024");
    slowloris_then_download(&bed, 8 * MIB);
}
