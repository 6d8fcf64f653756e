//! `paqet check`: each line OK or FAIL with the fix; non-zero exit on any FAIL.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;

use anyhow::{Result, bail};

use crate::cli::RunArgs;
use crate::config::{Config, Role, TransportKind};

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

/// Effective capability bits of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

const CAPS: [(&str, u32); 4] = [("CAP_NET_ADMIN", 12), ("CAP_NET_RAW", 13), ("CAP_IPC_LOCK", 14), ("CAP_BPF", 39)];

fn check_caps(r: &mut Report, needed: bool) {
    let eff = effective_caps();
    let missing: Vec<&str> = CAPS.iter().filter(|(_, bit)| eff & (1u64 << bit) == 0).map(|(n, _)| *n).collect();
    if missing.is_empty() {
        r.line(true, "capabilities", "CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW, CAP_IPC_LOCK held");
    } else if needed {
        r.line(false, "capabilities", &format!(
            "missing {}; the xdp transport needs them: run as root, or `sudo setcap cap_bpf,cap_net_admin,cap_net_raw,cap_ipc_lock+ep $(command -v paqet)`",
            missing.join(", ")
        ));
    } else {
        r.line(true, "capabilities", &format!("missing {} (only the xdp transport needs them)", missing.join(", ")));
    }
}

fn check_socks_port(r: &mut Report, addr: SocketAddr) {
    match TcpListener::bind(addr) {
        Ok(_) => r.line(true, "SOCKS port", &format!("{addr} is free")),
        Err(e) => {
            let holder = port_holder(addr.port()).unwrap_or_else(|| "an unknown process".into());
            r.line(false, "SOCKS port", &format!("{addr} is busy ({e}), held by {holder}: stop it or set SOCKS_ADDR to another port"));
        }
    }
}

/// Finds which process listens on a TCP port: the socket inode from /proc/net/tcp{,6},
/// then the process whose fd points at it.
fn port_holder(port: u16) -> Option<String> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|f| listening_inode(f, port))?;
    let target = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = proc_entry.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target) {
                let comm = std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
                return Some(format!("pid {pid} ({})", comm.trim()));
            }
        }
    }
    None
}

fn listening_inode(table: &str, port: u16) -> Option<String> {
    let text = std::fs::read_to_string(table).ok()?;
    text.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let local_port = cols.get(1)?.rsplit(':').next()?;
        let listening = cols.get(3) == Some(&"0A");
        (listening && u16::from_str_radix(local_port, 16).ok() == Some(port)).then(|| cols.get(9).map(|s| s.to_string()))?
    })
}

fn check_route(r: &mut Report, remote: &str) {
    let resolved = std::net::ToSocketAddrs::to_socket_addrs(remote).ok().and_then(|mut a| a.next());
    let Some(addr) = resolved else {
        r.line(false, "route to server", &format!("cannot resolve {remote}: check REMOTE_ADDR and DNS"));
        return;
    };
    let bind: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    // connect() on UDP sends nothing; it only asks the kernel for a route.
    match UdpSocket::bind(bind).and_then(|s| s.connect(addr).and_then(|_| s.local_addr())) {
        Ok(local) => r.line(true, "route to server", &format!("{addr} reachable from {}", local.ip())),
        Err(e) => r.line(false, "route to server", &format!("no route to {addr} ({e}): check the interface and default route")),
    }
}

fn check_kernel(r: &mut Report, needed: bool) {
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    r.line(btf || !needed, "kernel BTF", if btf { "/sys/kernel/btf/vmlinux present" } else { "missing: the kernel lacks CONFIG_DEBUG_INFO_BTF" });
    let bpffs = std::fs::read_to_string("/proc/mounts").unwrap_or_default().lines().any(|l| l.contains(" /sys/fs/bpf bpf "));
    r.line(true, "bpffs", if bpffs { "mounted at /sys/fs/bpf" } else { "not mounted; paqet mounts it when run as root (or: mount -t bpf bpf /sys/fs/bpf)" });
}

pub fn run(args: &RunArgs) -> Result<()> {
    let mut r = Report { failures: 0 };
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "unknown".into());
    r.line(true, "binary", &exe);
    match Config::load(args.config.as_deref(), &args.overrides(), None) {
        Ok(config) => {
            r.line(true, "config", "valid (and private, if it holds a key)");
            let xdp = config.transport == TransportKind::Xdp;
            check_caps(&mut r, xdp);
            check_kernel(&mut r, xdp);
            if config.role == Role::Client {
                check_socks_port(&mut r, config.socks_addr);
                if let Some(remote) = &config.remote_addr {
                    check_route(&mut r, &remote.to_string());
                }
            }
        }
        Err(e) => r.line(false, "config", &e.to_string()),
    }
    if r.failures > 0 {
        bail!("{} check(s) failed", r.failures);
    }
    Ok(())
}
