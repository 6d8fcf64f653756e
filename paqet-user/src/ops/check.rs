//! `paqet check`: the troubleshooting list, automated. Each line is OK or FAIL with the
//! fix; the exit status is non-zero on any FAIL. It runs with whatever privileges it is
//! given, so run it the way the service runs (`setpriv`/`systemd-run` as flowless-paqet,
//! or as root) to see what the service would see.

use std::ffi::CString;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::cli::RunArgs;
use crate::config::{Config, DEFAULT_CONFIG_PATH, Role, TransportKind};
use crate::engine::Engine;
use crate::kernel::{BPFFS, PIN_ROOT, is_bpffs};
use crate::node::Node;
use crate::transport::Transport;
use crate::transport::any::AnyTransport;
use crate::transport::netlink;

/// Where the service's binary is: the unit's ExecStart, then `paqet` on PATH.
pub const INSTALLED_BIN: &str = "/opt/flowless/bin/paqet";

struct Report {
    failures: usize,
}

impl Report {
    fn line(&mut self, ok: bool, what: &str, detail: &str) {
        if ok {
            println!("OK    {what}: {detail}");
        } else {
            self.failures += 1;
            println!("FAIL  {what}: {detail}");
        }
    }
}

// ---------------------------------------------------------------- binary

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The binary the service would run: /opt/flowless/bin/paqet, else `paqet` on PATH.
pub fn find_binary() -> Option<PathBuf> {
    let installed = PathBuf::from(INSTALLED_BIN);
    if installed.exists() {
        return Some(installed);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("paqet"))
        .find(|p| p.is_file())
}

fn check_binary(r: &mut Report) {
    let me = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "unknown".into());
    match find_binary() {
        Some(bin) if is_executable(&bin) => {
            r.line(true, "binary", &format!("{} (this is {me})", bin.display()))
        }
        Some(bin) => r.line(false, "binary", &format!("{} is not executable: chmod 755 {}", bin.display(), bin.display())),
        None => r.line(
            true,
            "binary",
            &format!("{me}; not installed ({INSTALLED_BIN} is missing and no paqet on PATH): `cargo xtask install` installs it"),
        ),
    }
}

// ---------------------------------------------------------------- capabilities

use crate::kernel::caps::{XDP_CAPS, missing_caps};

fn check_caps(r: &mut Report, transport: TransportKind) {
    let missing = missing_caps();
    if missing.is_empty() {
        r.line(
            true,
            "capabilities",
            "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_NET_RAW, CAP_IPC_LOCK held",
        );
        return;
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| INSTALLED_BIN.into());
    let why: Vec<String> = XDP_CAPS
        .iter()
        .filter(|(n, _, _)| missing.contains(n))
        .map(|(n, _, what)| format!("{n} ({what})"))
        .collect();
    let fix = format!(
        "run it as the unit does (AmbientCapabilities= in paqet.service), as root, or grant the binary: \
         sudo setcap cap_bpf,cap_perfmon,cap_net_admin,cap_net_raw,cap_ipc_lock+ep {exe}"
    );
    match transport {
        TransportKind::Xdp => r.line(
            false,
            "capabilities",
            &format!("missing {}; TRANSPORT=xdp needs them: {fix}", why.join(", ")),
        ),
        TransportKind::Auto => r.line(
            true,
            "capabilities",
            &format!(
                "missing {}: TRANSPORT=auto will fall back to udp; for xdp, {fix}",
                missing.join(", ")
            ),
        ),
        _ => r.line(
            true,
            "capabilities",
            &format!("missing {} (TRANSPORT=udp needs none)", missing.join(", ")),
        ),
    }
}

// ---------------------------------------------------------------- config

fn check_config(r: &mut Report, args: &RunArgs) -> Option<Config> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    match Config::load(args.config.as_deref(), &args.overrides(), None) {
        Ok(config) => {
            let detail = match std::fs::metadata(&path) {
                Ok(m) => format!(
                    "{} valid and private (mode {:o}, owner uid {})",
                    path.display(),
                    m.permissions().mode() & 0o7777,
                    m.uid()
                ),
                Err(_) => format!("valid (no file at {}: flags and defaults only)", path.display()),
            };
            r.line(true, "config", &detail);
            for line in &config.ignored {
                println!("NOTE  config: {line}");
            }
            Some(config)
        }
        Err(e) => {
            r.line(false, "config", &e.to_string());
            None
        }
    }
}

// ---------------------------------------------------------------- SOCKS port

fn check_socks_port(r: &mut Report, addr: SocketAddr) {
    match TcpListener::bind(addr) {
        Ok(_) => r.line(true, "SOCKS port", &format!("{addr} is free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let holder = port_holder(addr.port()).unwrap_or_else(|| "an unknown process".into());
            r.line(
                false,
                "SOCKS port",
                &format!("{addr} is busy, held by {holder}: stop it, or set SOCKS_ADDR to a free port"),
            );
        }
        Err(e) => r.line(
            false,
            "SOCKS port",
            &format!(
                "cannot listen on {addr} ({e}): pick another SOCKS_ADDR (ports below 1024 need CAP_NET_BIND_SERVICE)"
            ),
        ),
    }
}

/// Who listens on a TCP port: the socket inode and uid from /proc/net/tcp{,6}, then the
/// process whose fd points at it (visible for our own user's processes, or as root);
/// otherwise the owning user and the command that can tell.
fn port_holder(port: u16) -> Option<String> {
    let (inode, uid) = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|f| listening_socket(f, port))?;
    let target = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = proc_entry.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target) {
                let comm = std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
                return Some(format!("pid {pid} ({}, uid {uid})", comm.trim()));
            }
        }
    }
    Some(format!(
        "a process of uid {uid} ({}) that this user cannot inspect; `sudo ss -ltnp 'sport = :{port}'` names it",
        user_name(uid).unwrap_or_else(|| "unknown user".into())
    ))
}

fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2)?.parse::<u32>().ok()? == uid).then(|| f[0].to_string())
    })
}

fn listening_socket(table: &str, port: u16) -> Option<(String, u32)> {
    let text = std::fs::read_to_string(table).ok()?;
    text.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let local_port = cols.get(1)?.rsplit(':').next()?;
        let listening = cols.get(3) == Some(&"0A");
        if listening && u16::from_str_radix(local_port, 16).ok() == Some(port) {
            Some((cols.get(9)?.to_string(), cols.get(7)?.parse().ok()?))
        } else {
            None
        }
    })
}

// ---------------------------------------------------------------- route and neighbour

/// The kernel's neighbour entry for `next_hop` on `dev`: its MAC ("" when it has none)
/// and NUD state named as `ip neigh` names it.
fn neighbour(next_hop: IpAddr, dev: &str) -> Option<(String, String)> {
    let index = netlink::ifindex(dev).ok()?;
    let n = netlink::neigh_get(next_hop, index).ok()??;
    let mac = n.lladdr();
    Some((mac, n.state_name()))
}

fn check_route(r: &mut Report, remote: &str) {
    let resolved = std::net::ToSocketAddrs::to_socket_addrs(remote)
        .ok()
        .and_then(|mut a| a.next());
    let Some(addr) = resolved else {
        r.line(
            false,
            "route to server",
            &format!("cannot resolve {remote}: check REMOTE_ADDR and DNS"),
        );
        return;
    };
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // connect() on UDP sends nothing; it only asks the kernel for a route.
    let socket = match UdpSocket::bind(bind).and_then(|s| s.connect(addr).map(|_| s)) {
        Ok(s) => s,
        Err(e) => {
            r.line(
                false,
                "route to server",
                &format!("no route to {addr} ({e}): add a route or a default gateway"),
            );
            return;
        }
    };
    let route = netlink::route_get(addr.ip()).ok();
    let dev = route
        .as_ref()
        .and_then(|r| netlink::ifname(r.ifindex).ok())
        .unwrap_or_default();
    let gateway = route.as_ref().and_then(|r| r.gateway);
    let local = socket.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    if dev.is_empty() {
        r.line(true, "route to server", &format!("{addr} reachable from {local}"));
        return;
    }
    let via = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
    r.line(true, "route to server", &format!("{addr}{via} dev {dev}, from {local}"));

    // The xdp transport writes the next hop's MAC itself: it must be resolvable.
    let next_hop = gateway.unwrap_or(addr.ip());
    let usable = |s: &str| matches!(s, "REACHABLE" | "STALE" | "DELAY" | "PROBE" | "PERMANENT" | "NOARP");
    let mut seen = neighbour(next_hop, &dev);
    if !seen.as_ref().is_some_and(|(_, s)| usable(s)) {
        // Ask the kernel to resolve it: one datagram to the discard port of the next hop
        // (a gateway drops it; the ARP/ND exchange is what we want), then wait up to 2 s.
        let probe: SocketAddr = SocketAddr::new(next_hop, 9);
        let _ = UdpSocket::bind(bind).and_then(|s| s.send_to(b"paqet check", probe));
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            seen = neighbour(next_hop, &dev);
            if seen.as_ref().is_some_and(|(_, s)| usable(s)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    match seen {
        Some((mac, state)) if usable(&state) => {
            r.line(true, "neighbour", &format!("{next_hop} is {mac} on {dev} ({state})"))
        }
        other => r.line(
            false,
            "neighbour",
            &format!(
                "{next_hop} on {dev} does not answer ARP/ND ({}): is the {} up and on this link?",
                other.map(|(_, s)| s).unwrap_or_else(|| "no entry".into()),
                if gateway.is_some() { "gateway" } else { "server" }
            ),
        ),
    }
}

// ---------------------------------------------------------------- kernel features

fn btf_has(types: &[&str]) -> Vec<bool> {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").unwrap_or_default();
    types
        .iter()
        .map(|t| {
            let needle = [&[0u8][..], t.as_bytes(), &[0u8][..]].concat();
            btf.windows(needle.len()).any(|w| w == needle.as_slice())
        })
        .collect()
}

fn access(path: &str, mode: libc::c_int) -> bool {
    let Ok(c) = CString::new(path) else { return false };
    // SAFETY: c is a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), mode) == 0 }
}

fn check_kernel(r: &mut Report, needed: bool) {
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    r.line(
        btf || !needed,
        "kernel BTF",
        if btf {
            "/sys/kernel/btf/vmlinux present"
        } else {
            "missing: the kernel lacks CONFIG_DEBUG_INFO_BTF (needed for the xdp transport)"
        },
    );
    let found = btf_has(&["xdp_md", "xdp_sock"]);
    let xdp = found[0];
    r.line(
        xdp || !btf || !needed,
        "XDP",
        if xdp {
            "supported (struct xdp_md in the kernel's BTF)"
        } else if !btf {
            "unknown without BTF"
        } else {
            "the kernel has no XDP: use TRANSPORT=udp"
        },
    );
    // socket(AF_XDP): EAFNOSUPPORT = not built in; EPERM = there, but no CAP_NET_RAW.
    // SAFETY: plain socket(2); the fd is closed at once.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    let err = std::io::Error::last_os_error();
    let (ok, detail) = if fd >= 0 {
        // SAFETY: fd was just opened by us.
        unsafe { libc::close(fd) };
        (true, "supported (opened an AF_XDP socket)".to_string())
    } else if err.raw_os_error() == Some(libc::EAFNOSUPPORT) {
        (
            !needed,
            "the kernel has no AF_XDP (CONFIG_XDP_SOCKETS): use TRANSPORT=udp".to_string(),
        )
    } else if found[1] {
        (
            true,
            format!("supported (struct xdp_sock in BTF; opening one here: {err}, see capabilities)"),
        )
    } else {
        (!needed, format!("socket(AF_XDP) failed: {err}"))
    };
    r.line(ok, "AF_XDP", &detail);

    let root = unsafe { libc::geteuid() } == 0;
    if !is_bpffs(BPFFS) {
        if root {
            r.line(
                true,
                "bpffs",
                "not mounted at /sys/fs/bpf; paqet mounts it (running as root)",
            );
        } else {
            r.line(
                !needed,
                "bpffs",
                "not mounted at /sys/fs/bpf and only root may mount it: `sudo mount -t bpf bpf /sys/fs/bpf` (the unit's ExecStartPre does)",
            );
        }
        return;
    }
    // The service user creates <instance>/ under /sys/fs/bpf/paqet and removes it again.
    let writable = if Path::new(PIN_ROOT).exists() {
        access(PIN_ROOT, libc::W_OK | libc::X_OK)
    } else {
        access(BPFFS, libc::W_OK | libc::X_OK)
    };
    let fix = "run the unit's ExecStartPre as root: `chmod o+x /sys/fs/bpf && install -d -o flowless-paqet -g flowless-paqet -m 0755 /sys/fs/bpf/paqet`";
    if writable {
        r.line(
            true,
            "bpffs",
            &format!("mounted at {BPFFS}; pins go under {PIN_ROOT} (writable)"),
        );
    } else if !access(BPFFS, libc::X_OK) {
        r.line(
            !needed,
            "bpffs",
            &format!("mounted, but this user cannot enter {BPFFS}: {fix}"),
        );
    } else {
        r.line(
            !needed,
            "bpffs",
            &format!("mounted, but this user cannot create pins in {PIN_ROOT}: {fix}"),
        );
    }
}

pub fn run(args: &RunArgs) -> Result<()> {
    let mut r = Report { failures: 0 };
    check_binary(&mut r);
    if let Some(config) = check_config(&mut r, args) {
        let xdp_needed = config.transport == TransportKind::Xdp;
        check_caps(&mut r, config.transport);
        if config.transport != TransportKind::Udp {
            check_kernel(&mut r, xdp_needed);
        }
        if config.role == Role::Client {
            check_socks_port(&mut r, config.socks_addr);
            if let Some(remote) = &config.remote_addr {
                check_route(&mut r, &remote.to_string());
            }
            check_server_answers(&mut r, &config);
        }
    }
    if r.failures > 0 {
        bail!("{} check(s) failed", r.failures);
    }
    Ok(())
}

/// How long a probe waits for the server's answer on one path.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A real handshake with the server over each path this client can use, one at a time:
/// which answer, and how fast.
fn check_server_answers(r: &mut Report, config: &Config) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return r.line(false, "server answers", &format!("cannot start a runtime: {e}")),
    };
    let original = config.transport;
    runtime.block_on(async {
        let server = match crate::roles::resolve_remote(config).await {
            Ok(s) => s,
            Err(e) => return r.line(false, "server answers", &format!("{e:#}")),
        };
        let kinds = match config.transport {
            TransportKind::Auto => vec![TransportKind::Xdp, TransportKind::Udp],
            kind => vec![kind],
        };
        let mut paths = Vec::new();
        for kind in kinds {
            let config = Config {
                transport: kind,
                ..config.clone()
            };
            let name = if kind == TransportKind::Udp { "udp" } else { "xdp" };
            // A running client owns its interface's XDP program: a probe cannot steer
            // beside it (and must not take its pins).
            let running = crate::roles::client_xdp_instance(&config, server)
                .filter(|instance| kind != TransportKind::Udp && crate::ops::live::read(instance).is_some());
            if let Some(instance) = running {
                r.line(
                    true,
                    &format!("server over {name}"),
                    &format!(
                        "not probed: the running paqet client ({instance}) uses it; `paqet status` shows its sessions"
                    ),
                );
                continue;
            }
            match crate::roles::open_client_paths(&config, server) {
                Ok(opened) => paths.extend(opened),
                // Under auto a missing xdp is what the udp fallback is for.
                Err(e) => r.line(
                    original != TransportKind::Xdp,
                    &format!("server over {name}"),
                    &format!("not probed: cannot open the {name} transport here: {e:#}"),
                ),
            }
        }
        for path in paths {
            let name = path.name();
            match probe_path(config, server, path).await {
                Some(rtt) => r.line(
                    true,
                    &format!("server over {name}"),
                    &format!("{server} answered a handshake in {:.1} ms", rtt.as_secs_f64() * 1e3),
                ),
                None => r.line(
                    false,
                    &format!("server over {name}"),
                    &format!(
                        "no answer from {server} within {} s: is the server running there (`paqet status` on it)? \
                         is its KEY the same as this one? does a firewall on the way drop port {} ({})?",
                        PROBE_TIMEOUT.as_secs(),
                        server.port(),
                        if name == "udp" { "UDP" } else { "TCP-shaped frames" }
                    ),
                ),
            }
        }
    });
}

/// Handshakes over `path` alone with the engine a client runs; the round trip, or
/// `None` without an answer in time.
async fn probe_path(config: &Config, server: SocketAddr, path: AnyTransport) -> Option<Duration> {
    let mut ec = crate::roles::engine_config(config, crate::engine::Role::Client { server });
    ec.max_datagram = crate::roles::path_datagram_size(std::slice::from_ref(&path), ec.max_datagram);
    let engine = Engine::new(ec, Instant::now());
    let (node, _) = Node::new(engine, vec![path], false);
    let receiver = tokio::spawn(node.clone().run_receivers());
    let timers = tokio::spawn(node.clone().run_timers());
    let started = Instant::now();
    node.with_engine(|e, now| e.connect(now));
    let mut answered = None;
    while started.elapsed() < PROBE_TIMEOUT {
        if node.with_engine(|e, _| e.is_connected()) {
            answered = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    receiver.abort();
    timers.abort();
    answered
}
