//! `cargo xtask bench` support: the measuring side of the benchmark (a fast origin and
//! an echo server inside the server namespace, downloads / round trips / many streams
//! from the client namespace), per-process CPU and peak RSS from /proc, and the peers
//! paqet is compared with (kcptun, direct TCP). The driver is `src/bin/paqet-bench.rs`.

pub mod charts;
pub mod peers;
pub mod report;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// The bench's own origin (a repeated 1 MiB body, so serving costs a memcpy, not a
/// pattern computation per byte) and echo server, both on the server's address.
pub const BENCH_ORIGIN_PORT: u16 = 8081;
pub const ECHO_PORT: u16 = 7007;
/// Where the forwarders of the "TCP via 2 forwarders" round trips listen.
pub const FORWARD_PORT: u16 = 7008;
pub const SERVER_IP: std::net::Ipv4Addr = crate::netns::TwoHosts::SERVER_IP;

pub const GIB: f64 = (1u64 << 30) as f64;
pub const MIB: u64 = 1 << 20;

fn body_block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut b = vec![0u8; MIB as usize];
        crate::pattern::fill(1, 0, &mut b);
        b
    })
}

/// Spawns a thread that enters the network namespace at `ns_path` and runs `f`;
/// threads `f` spawns inherit the namespace.
pub fn spawn_in_ns<F: FnOnce() + Send + 'static>(ns_path: PathBuf, f: F) -> Result<JoinHandle<()>> {
    let file = std::fs::File::open(&ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
    Ok(std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace fd; CLONE_NEWNET only affects this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "bench: setns into {}: {}",
                ns_path.display(),
                std::io::Error::last_os_error()
            );
            return;
        }
        f();
    }))
}

/// TCP services in one namespace (the origin and the echo server, or a forwarder),
/// each connection on a thread of its own, until dropped.
pub struct Servers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

type Serve = Arc<dyn Fn(TcpStream) + Send + Sync>;

fn accept_loop(listener: TcpListener, stop: Arc<AtomicBool>, serve: Serve) {
    listener.set_nonblocking(true).expect("nonblocking listener");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let serve = serve.clone();
                let _ = std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn(move || serve(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// The congestion control the origin (the sender of every download) sets on each
/// connection with TCP_CONGESTION; `None` keeps the namespace's default. Per socket,
/// because a namespace's sysctl only takes what the host's
/// tcp_allowed_congestion_control lists (here: reno bbr, not cubic).
static ORIGIN_CC: std::sync::Mutex<Option<&'static str>> = std::sync::Mutex::new(None);

pub fn set_origin_cc(cc: Option<&'static str>) {
    *ORIGIN_CC.lock().unwrap_or_else(|e| e.into_inner()) = cc;
}

/// Sets TCP_CONGESTION on `s`; returns what the socket then uses.
pub fn set_socket_cc(s: &TcpStream, cc: &str) -> String {
    use std::os::fd::AsRawFd;
    // SAFETY: valid socket, buffer pointers and lengths.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as u32,
        );
        let mut buf = [0u8; 16];
        let mut len = buf.len() as libc::socklen_t;
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            buf.as_mut_ptr().cast(),
            &mut len,
        );
        String::from_utf8_lossy(&buf[..len as usize])
            .trim_end_matches('\0')
            .to_string()
    }
}

fn serve_origin(mut s: TcpStream) {
    let cc = *ORIGIN_CC.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cc) = cc {
        let got = set_socket_cc(&s, cc);
        if got != cc {
            eprintln!("bench: origin asked for {cc}, socket uses {got}");
        }
    }
    let _ = s.set_write_timeout(Some(Duration::from_secs(120)));
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
        if head.len() > 8192 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("/");
    let Some(len) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<u64>().ok()) else {
        let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    if write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    let block = body_block();
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(block.len() as u64) as usize;
        if s.write_all(&block[..n]).is_err() {
            return;
        }
        sent += n as u64;
    }
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s direction.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = from.set_read_timeout(Some(Duration::from_secs(120)));
    let mut b = [0u8; 16 * 1024];
    loop {
        match from.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn serve_echo(s: TcpStream) {
    let _ = s.set_nodelay(true);
    if let Ok(back) = s.try_clone() {
        pipe(s, back);
    }
}

/// A plain TCP forwarder that polls both directions on one thread: the least a relay
/// hop can cost here (no parsing, no crypto, no sleeping; blocking threads that sleep
/// between reads took ~110 µs per round trip through two of them, from idle-vCPU
/// wake-ups). Gives up after [`FORWARD_IDLE`] without traffic.
fn serve_forward(inbound: TcpStream, to: SocketAddr) {
    let Ok(outbound) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let mut b = [0u8; 16 * 1024];
    let mut last_traffic = Instant::now();
    while last_traffic.elapsed() < FORWARD_IDLE {
        let mut moved = false;
        for (from, mut to) in [(&inbound, &outbound), (&outbound, &inbound)] {
            match read_now(from, &mut b) {
                Some(0) => return,
                Some(n) => {
                    if to.write_all(&b[..n]).is_err() {
                        return;
                    }
                    moved = true;
                }
                None => {}
            }
        }
        if moved {
            last_traffic = Instant::now();
        } else {
            std::thread::yield_now();
        }
    }
}

/// A forwarder connection without traffic for this long is closed.
const FORWARD_IDLE: Duration = Duration::from_secs(30);

/// Reads what `s` has without waiting: `None` if nothing, `Some(0)` at its end or on
/// an error.
fn read_now(s: &TcpStream, buf: &mut [u8]) -> Option<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket and a buffer of `buf.len()` writable bytes.
    let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    match n {
        n if n > 0 => Some(n as usize),
        0 => Some(0),
        _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock => None,
        _ => Some(0),
    }
}

impl Servers {
    /// The origin and the echo server on the server's address.
    pub fn start(ns: &Netns) -> Result<Servers> {
        body_block();
        Servers::listen(
            ns,
            vec![
                ((SERVER_IP, BENCH_ORIGIN_PORT).into(), Arc::new(serve_origin)),
                ((SERVER_IP, ECHO_PORT).into(), Arc::new(serve_echo)),
            ],
        )
    }

    /// Forwards every connection to `listen` on to `to`.
    pub fn forwarder(ns: &Netns, listen: SocketAddr, to: SocketAddr) -> Result<Servers> {
        Servers::listen(ns, vec![(listen, Arc::new(move |s| serve_forward(s, to)))])
    }

    fn listen(ns: &Netns, services: Vec<(SocketAddr, Serve)>) -> Result<Servers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for (addr, serve) in services {
            let stop = stop.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            handles.push(spawn_in_ns(ns.path(), move || match TcpListener::bind(addr) {
                Ok(l) => {
                    widen_backlog(&l);
                    let _ = tx.send(Ok(()));
                    accept_loop(l, stop, serve);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })?);
            rx.recv_timeout(Duration::from_secs(5))
                .context("bench server did not start")?
                .context("binding a bench server")?;
        }
        Ok(Servers { stop, handles })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Room for the 1,000 streams that connect at once: std listens with a backlog of 128,
/// and a direct-TCP run once completed only 749 of them. Listening again only changes
/// the backlog.
fn widen_backlog(l: &TcpListener) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid listening socket.
    unsafe { libc::listen(l.as_raw_fd(), 1024) };
}

/// How the client namespace reaches a service on the server side.
#[derive(Clone, Debug)]
pub enum Access {
    /// Through a SOCKS5 proxy (paqet's port, or kcptun's forward to microsocks).
    Socks { proxy: SocketAddr, target: SocketAddr },
    /// A plain TCP connect: the service itself (direct TCP) or a port forward.
    Direct(SocketAddr),
}

impl Access {
    pub fn open(&self) -> Result<TcpStream> {
        let s = match self {
            Access::Socks { proxy, target } => {
                match crate::socks::connect(*proxy, &target.ip().to_string(), target.port(), None, 1)? {
                    Ok(s) => s,
                    Err(code) => bail!("SOCKS refused with reply code {code}"),
                }
            }
            Access::Direct(a) => {
                TcpStream::connect_timeout(a, Duration::from_secs(10)).with_context(|| format!("connecting to {a}"))?
            }
        };
        Ok(s)
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Transfer {
    pub bytes: u64,
    pub secs: f64,
    /// Streams that delivered every byte, of `streams`.
    pub complete: usize,
    pub streams: usize,
}

impl Transfer {
    pub fn mb_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / 1e6
        } else {
            0.0
        }
    }
    pub fn all_complete(&self) -> bool {
        self.complete == self.streams
    }
}

/// One `GET /bytes/len`, counting body bytes until EOF or `deadline`. Bytes are not
/// hashed here (a sha256 per byte would compete with the relay for the two cores):
/// integrity is what the end-to-end tests assert; the bench checks the count.
pub fn download_one(access: &Access, len: u64, deadline: Instant) -> Result<(u64, bool)> {
    let mut s = access.open()?;
    s.set_read_timeout(Some(Duration::from_millis(250)))?;
    write!(
        s,
        "GET /bytes/{len} HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = vec![0u8; 256 << 10];
    let mut head = Vec::new();
    let mut body = 0u64;
    let mut in_body = false;
    loop {
        if Instant::now() >= deadline {
            return Ok((body, false));
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if in_body {
                    body += n as u64;
                } else {
                    head.extend_from_slice(&buf[..n]);
                    if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        in_body = true;
                        body += (head.len() - p - 4) as u64;
                    }
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok((body, body == len))
}

/// `streams` downloads of `len_each` at once (one thread each); the time is from the
/// common start to the last stream's end (or the deadline).
pub fn download_many(access: &Access, streams: usize, len_each: u64, cap: Duration) -> Transfer {
    download_spread(std::slice::from_ref(access), streams, len_each, cap)
}

/// [`download_many`] with stream `i` through `accesses[i % accesses.len()]` (several
/// clients at once).
pub fn download_spread(accesses: &[Access], streams: usize, len_each: u64, cap: Duration) -> Transfer {
    if accesses.is_empty() {
        return Transfer {
            bytes: 0,
            secs: 0.0,
            complete: 0,
            streams,
        };
    }
    let started = Instant::now();
    let deadline = started + cap;
    let barrier = std::sync::Barrier::new(streams);
    let results: Vec<(u64, bool, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams)
            .map(|i| {
                let barrier = &barrier;
                let access = &accesses[i % accesses.len()];
                std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn_scoped(s, move || {
                        barrier.wait();
                        let r = download_one(access, len_each, deadline);
                        let end = Instant::now();
                        match r {
                            Ok((b, ok)) => (b, ok, end),
                            Err(e) => {
                                eprintln!("bench: stream failed: {e:#}");
                                (0, false, end)
                            }
                        }
                    })
                    .expect("spawning a stream thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or((0, false, Instant::now())))
            .collect()
    });
    let last = results.iter().map(|r| r.2).max().unwrap_or(started);
    Transfer {
        bytes: results.iter().map(|r| r.0).sum(),
        secs: last.duration_since(started).as_secs_f64(),
        complete: results.iter().filter(|r| r.1).count(),
        streams,
    }
}

/// `n` 64-byte request/response round trips on one connection (after 50 warm-up ones);
/// returns (p50, p99) in microseconds.
pub fn round_trips(access: &Access, n: usize) -> Result<(f64, f64)> {
    let mut s = access.open()?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let req = [0x42u8; 64];
    let mut resp = [0u8; 64];
    let mut times = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp).context("reading an echo")?;
        if i >= 50 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    Ok((pct(0.50), pct(0.99)))
}

/// A process whose CPU time and peak RSS count as the relay's.
#[derive(Clone, Debug)]
pub struct Proc {
    pub label: String,
    pub pid: u32,
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of `pid` (or `pid/task/tid`), in seconds.
pub fn cpu_secs(pid: impl std::fmt::Display) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ut + st) as f64 / clk_tck())
}

/// utime + stime of each thread of `pid`, in seconds, by thread id.
pub fn thread_cpu_secs(pid: u32) -> std::collections::BTreeMap<u32, f64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Default::default();
    };
    tasks
        .filter_map(|e| {
            let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            Some((tid, cpu_secs(format!("{pid}/task/{tid}"))?))
        })
        .collect()
}

/// VmHWM (peak RSS) of `pid`, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn total_cpu(procs: &[Proc]) -> f64 {
    procs.iter().filter_map(|p| cpu_secs(p.pid)).sum()
}

/// `pid` itself if it runs `comm`, else its first descendant that does (a wrapper such
/// as `sh -c ... exec` may sit in between for a moment).
pub fn find_comm(pid: u32, comm: &str) -> u32 {
    for _ in 0..100 {
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim() == comm)
            .unwrap_or(false)
        {
            return pid;
        }
        if let Some(child) = descendant_with_comm(pid, comm) {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    pid
}

fn descendant_with_comm(pid: u32, comm: &str) -> Option<u32> {
    let mut frontier = vec![pid];
    let entries: Vec<(u32, u32, String)> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| {
            let p: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let name = stat[open + 1..close].to_string();
            let ppid: u32 = stat[close + 2..].split_whitespace().nth(1)?.parse().ok()?;
            Some((p, ppid, name))
        })
        .collect();
    while let Some(p) = frontier.pop() {
        for (c, pp, name) in &entries {
            if *pp == p {
                if name == comm {
                    return Some(*c);
                }
                frontier.push(*c);
            }
        }
    }
    None
}

/// Raises RLIMIT_NOFILE to its hard limit (children inherit it): 1,000 streams need
/// about 2,000 descriptors in the relay processes and the bench itself.
pub fn raise_nofile() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            return r.rlim_cur;
        }
    }
    0
}
