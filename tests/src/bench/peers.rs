//! What paqet is compared with: kcptun (Debian's package, client + server, optionally
//! with microsocks behind the server as the SOCKS5 server) and direct TCP.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::netns::{ChildGuard, Netns, TwoHosts, wait_for};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KcpConfig {
    /// kcptun's `--crypt`: `aes` (AES-256-CFB, kcptun's default) or `none`.
    pub crypt: &'static str,
    /// Reed-Solomon FEC 10+3 (kcptun's default) or off (0+0).
    pub fec: bool,
    /// `--sndwnd` and `--rcvwnd` on both sides.
    pub wnd: u32,
}

impl KcpConfig {
    pub fn name(&self, socks: bool) -> String {
        format!(
            "kcptun {} {} w{} {}",
            self.crypt,
            if self.fec { "fec" } else { "nofec" },
            self.wnd,
            if socks { "socks" } else { "fwd" }
        )
    }

    pub fn encrypted(&self) -> bool {
        self.crypt != "none"
    }

    fn common_args(&self) -> Vec<String> {
        let (ds, ps) = if self.fec { ("10", "3") } else { ("0", "0") };
        [
            "--key",
            "paqet-bench-key",
            "--crypt",
            self.crypt,
            "--mode",
            "fast3",
            "--nocomp",
            "--quiet",
            "--ds",
            ds,
            "--ps",
            ps,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--sndwnd".into(),
            self.wnd.to_string(),
            "--rcvwnd".into(),
            self.wnd.to_string(),
        ])
        .collect()
    }
}

/// The full sweep: encryption on/off × FEC on/off × windows 1024/4096.
pub fn kcptun_sweep() -> Vec<KcpConfig> {
    let mut v = Vec::new();
    for crypt in ["aes", "none"] {
        for fec in [true, false] {
            for wnd in [1024, 4096] {
                v.push(KcpConfig { crypt, fec, wnd });
            }
        }
    }
    v
}

/// A kcptun client (listening on the client's loopback) and server (UDP on the server
/// address, forwarding every stream to `target`).
pub struct Kcptun {
    pub client: ChildGuard,
    pub server: ChildGuard,
    pub local: SocketAddr,
}

pub fn start_kcptun(
    hosts: &TwoHosts,
    cfg: &KcpConfig,
    udp_port: u16,
    local_port: u16,
    target: SocketAddr,
) -> Result<Kcptun> {
    let listen = format!("{}:{udp_port}", TwoHosts::SERVER_IP);
    let mut cmd = hosts.server.command("kcptun-server");
    cmd.args(["-l", &listen, "-t", &target.to_string()])
        .args(cfg.common_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let server = ChildGuard::spawn(&mut cmd)?;
    let local: SocketAddr = ([127, 0, 0, 1], local_port).into();
    let mut cmd = hosts.client.command("kcptun-client");
    cmd.args(["-l", &local.to_string(), "-r", &listen])
        .args(cfg.common_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let client = ChildGuard::spawn(&mut cmd)?;
    let up = hosts
        .client
        .run(|| wait_for(|| std::net::TcpStream::connect(local).is_ok(), Duration::from_secs(10)))?;
    if !up {
        bail!("kcptun-client did not start listening on {local}");
    }
    Ok(Kcptun { client, server, local })
}

pub const MICROSOCKS_PORT: u16 = 1081;

/// microsocks on the server's loopback: the SOCKS5 server kcptun forwards to.
pub fn start_microsocks(ns: &Netns) -> Result<ChildGuard> {
    let mut cmd = ns.command("microsocks");
    cmd.args(["-i", "127.0.0.1", "-p", &MICROSOCKS_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let g = ChildGuard::spawn(&mut cmd)?;
    let addr: SocketAddr = ([127, 0, 0, 1], MICROSOCKS_PORT).into();
    if !ns.run(|| wait_for(|| std::net::TcpStream::connect(addr).is_ok(), Duration::from_secs(10)))? {
        bail!("microsocks did not start");
    }
    Ok(g)
}

/// The congestion control of direct TCP: the namespaces' sysctl where the host allows
/// it (its tcp_allowed_congestion_control), and TCP_CONGESTION on every origin socket
/// (the sender's is the one that matters) in any case.
pub fn set_cc(hosts: &TwoHosts, cc: &'static str) -> Result<()> {
    for ns in [&hosts.client, &hosts.server] {
        if let Err(e) = ns.sysctl("net.ipv4.tcp_congestion_control", cc) {
            eprintln!("bench: {e:#}; setting {cc} per socket instead");
        }
    }
    super::set_origin_cc(Some(cc));
    Ok(())
}

pub fn available_cc() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").unwrap_or_default()
}

/// Turns veth offloads (TSO/GSO/GRO, checksum) on or off on both hosts' ends.
pub fn set_offloads(hosts: &TwoHosts, on: bool) -> Result<()> {
    let v = if on { "on" } else { "off" };
    for (ns, ifname) in [(&hosts.client, &hosts.client_if), (&hosts.server, &hosts.server_if)] {
        ns.exec(&["ethtool", "-K", ifname, "tso", v, "gso", v, "gro", v, "tx", v])?;
    }
    Ok(())
}

/// With offloads on, UDP datagrams are still segmented in software before they reach
/// the veth (its `tx-udp-segmentation` off), as a NIC without UDP segmentation offload
/// has it; the receiving side keeps GRO.
pub fn segment_udp_before_the_wire(hosts: &TwoHosts) -> Result<()> {
    for (ns, ifname) in [(&hosts.client, &hosts.client_if), (&hosts.server, &hosts.server_if)] {
        ns.exec(&["ethtool", "-K", ifname, "tx-udp-segmentation", "off"])?;
    }
    Ok(())
}
