//! The L2 next hop of a peer, from the kernel's route and neighbour tables.
//!
//! First version: it asks iproute2 (`ip -j route get`, `ip -j neigh show`) and reads
//! its JSON. That is a few dozen lines against several hundred for hand-rolled
//! rtnetlink (or a new async netlink stack), `ip` is installed wherever paqet's setup
//! ran, and a child process inherits the calling thread's network namespace, so it
//! sees what the transport sees. Lookups happen at open, on a cache miss and every
//! [`REFRESH_EVERY`], never per packet, so the cost of a fork does not matter.
//!
//! When the neighbour is unknown, resolution is triggered with `ip neigh replace ADDR
//! dev DEV use` (NTF_USE): the kernel sends its own ARP request / neighbour
//! solicitation, and no datagram goes to the peer, so nothing reaches a port that
//! might answer with an RST or an ICMP error. (For IPv6 the kernel sends such an
//! unprompted solicitation only from a link-local address that has finished DAD; a
//! host whose interface has none cannot be resolved this way, and sends are dropped
//! and counted until something else fills the neighbour entry.)

use crate::sync::lock;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::process::Command;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::iface::{fmt_mac, parse_mac};
use super::peers::Peers;

/// How often kernel-resolved next hops are looked up again (a gateway may change).
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// How long one resolution waits for the kernel's ARP/ND to answer.
pub const RESOLVE_WAIT: Duration = Duration::from_secs(2);
/// Peers unused for this long are forgotten.
const IDLE_PEER: Duration = Duration::from_secs(600);
const POLL_EVERY: Duration = Duration::from_millis(20);
/// Requests queued for the resolver thread; more are dropped (the next send asks again).
const QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("running `{cmd}` failed")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("unexpected output of `{cmd}`: {detail}")]
    Parse { cmd: String, detail: String },
    #[error("no neighbour entry for next hop {next_hop} (to reach {peer}) on {dev} after {waited:?}")]
    Unresolved {
        peer: IpAddr,
        next_hop: IpAddr,
        dev: String,
        waited: Duration,
    },
}

/// Where packets to a peer go next, per the kernel's routing table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dev: String,
    /// The gateway, or the peer itself when it is on-link.
    pub next_hop: IpAddr,
}

/// Runs `ip ARGS`; a failure to start or a non-zero exit is an error naming the command.
/// Returns the command line (for later error messages) and its stdout.
fn run_ip(args: &[&str]) -> Result<(String, Vec<u8>), NeighError> {
    let cmd = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NeighError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NeighError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok((cmd, out.stdout))
}

fn ip_json(args: &[&str]) -> Result<Value, NeighError> {
    let (cmd, stdout) = run_ip(args)?;
    serde_json::from_slice(&stdout).map_err(|e| NeighError::Parse {
        cmd,
        detail: e.to_string(),
    })
}

pub fn route_get(peer: IpAddr) -> Result<Route, NeighError> {
    let peer_s = peer.to_string();
    let v = ip_json(&["-j", "route", "get", &peer_s])?;
    parse_route(peer, &v).ok_or_else(|| NeighError::Parse {
        cmd: format!("ip -j route get {peer}"),
        detail: v.to_string(),
    })
}

fn parse_route(peer: IpAddr, v: &Value) -> Option<Route> {
    let r = v.as_array()?.first()?;
    let dev = r.get("dev")?.as_str()?.to_string();
    let next_hop = match r.get("gateway").and_then(Value::as_str) {
        Some(gw) => gw.parse().ok()?,
        None => peer,
    };
    Some(Route { dev, next_hop })
}

/// The neighbour's MAC if the kernel has a usable entry (anything but INCOMPLETE or
/// FAILED; a STALE entry still names the right host).
pub fn neigh_show(next_hop: IpAddr, dev: &str) -> Result<Option<[u8; 6]>, NeighError> {
    let hop = next_hop.to_string();
    let v = ip_json(&["-j", "neigh", "show", &hop, "dev", dev])?;
    Ok(parse_neigh(next_hop, &v))
}

fn parse_neigh(next_hop: IpAddr, v: &Value) -> Option<[u8; 6]> {
    v.as_array()?.iter().find_map(|e| {
        let dst: IpAddr = e.get("dst")?.as_str()?.parse().ok()?;
        if dst != next_hop {
            return None;
        }
        let unusable = e
            .get("state")
            .and_then(Value::as_array)
            .is_some_and(|s| s.iter().any(|x| matches!(x.as_str(), Some("FAILED" | "INCOMPLETE"))));
        if unusable {
            return None;
        }
        parse_mac(e.get("lladdr")?.as_str()?)
    })
}

/// Asks the kernel to resolve (or re-confirm) `next_hop` now.
pub fn trigger(next_hop: IpAddr, dev: &str) -> Result<(), NeighError> {
    let hop = next_hop.to_string();
    run_ip(&["neigh", "replace", hop.as_str(), "dev", dev, "use"]).map(|_| ())
}

/// The MAC to send frames for `peer` to, resolving through the kernel if it has no
/// entry yet (waiting at most `wait`).
pub fn resolve(peer: IpAddr, interface: &str, wait: Duration) -> Result<[u8; 6], NeighError> {
    let route = route_get(peer)?;
    if route.dev != interface {
        tracing::warn!(%peer, route_dev = %route.dev, interface, "the kernel routes this peer through another interface; sending on {interface} anyway");
    }
    if let Some(mac) = neigh_show(route.next_hop, interface)? {
        return Ok(mac);
    }
    trigger(route.next_hop, interface)?;
    let deadline = Instant::now() + wait;
    loop {
        std::thread::sleep(POLL_EVERY);
        if let Some(mac) = neigh_show(route.next_hop, interface)? {
            tracing::debug!(%peer, next_hop = %route.next_hop, mac = %fmt_mac(mac), "resolved next hop");
            return Ok(mac);
        }
        if Instant::now() >= deadline {
            return Err(NeighError::Unresolved {
                peer,
                next_hop: route.next_hop,
                dev: interface.to_string(),
                waited: wait,
            });
        }
    }
}

/// A thread that resolves next hops the TX path found missing and refreshes the ones
/// it has, so `send_batch` never waits on the kernel. It is spawned from the thread
/// that opened the transport and so lives in the same network namespace.
pub struct Resolver {
    requests: Option<SyncSender<IpAddr>>,
    thread: Option<JoinHandle<()>>,
}

impl Resolver {
    pub fn spawn(interface: String, peers: Arc<Mutex<Peers>>) -> std::io::Result<Resolver> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("paqet-xdp-neigh".into())
            .spawn(move || run(&interface, &peers, &rx))?;
        Ok(Resolver {
            requests: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues `ip` for resolution; the caller has marked it pending in [`Peers`].
    /// Returns false if the queue was full (the caller unmarks it).
    pub fn request(&self, ip: IpAddr) -> bool {
        match self.requests.as_ref().map(|r| r.try_send(ip)) {
            Some(Ok(())) => true,
            Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) | None => false,
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        // Closing the channel is the thread's stop signal.
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(interface: &str, peers: &Mutex<Peers>, requests: &Receiver<IpAddr>) {
    let mut next_refresh = Instant::now() + REFRESH_EVERY;
    loop {
        let timeout = next_refresh.saturating_duration_since(Instant::now());
        match requests.recv_timeout(timeout) {
            Ok(ip) => resolve_into(ip, interface, peers),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if Instant::now() >= next_refresh {
            refresh(interface, peers);
            next_refresh = Instant::now() + REFRESH_EVERY;
        }
    }
}

fn resolve_into(ip: IpAddr, interface: &str, peers: &Mutex<Peers>) {
    let result = resolve(ip, interface, RESOLVE_WAIT);
    let mut p = lock(peers);
    p.done_resolving(ip);
    match result {
        Ok(mac) => p.set_from_kernel(ip, mac, Instant::now()),
        Err(e) => tracing::warn!(peer = %ip, "cannot resolve the next hop: {}", crate::kernel::error_chain(&e)),
    }
}

/// Re-confirms kernel-resolved next hops (the `use` trigger also makes the kernel
/// re-probe a STALE entry, which our own frames, bypassing it, never refresh).
fn refresh(interface: &str, peers: &Mutex<Peers>) {
    let ips: VecDeque<IpAddr> = {
        let mut p = lock(peers);
        p.prune(Instant::now(), IDLE_PEER);
        p.kernel_resolved().into()
    };
    for ip in ips {
        let fresh = route_get(ip).and_then(|r| {
            trigger(r.next_hop, interface)?;
            neigh_show(r.next_hop, interface)
        });
        match fresh {
            Ok(Some(mac)) => lock(peers).set_from_kernel(ip, mac, Instant::now()),
            Ok(None) => tracing::debug!(peer = %ip, "next hop being re-resolved; keeping the old MAC meanwhile"),
            Err(e) => tracing::warn!(peer = %ip, "refreshing the next hop failed: {}", crate::kernel::error_chain(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_routes_with_and_without_a_gateway() {
        let peer: IpAddr = "198.18.0.2".parse().unwrap();
        let onlink: Value = serde_json::from_str(
            r#"[{"dst":"198.18.0.2","dev":"veth-c","prefsrc":"198.18.0.1","flags":[],"uid":0,"cache":[]}]"#,
        )
        .unwrap();
        assert_eq!(
            parse_route(peer, &onlink),
            Some(Route {
                dev: "veth-c".into(),
                next_hop: peer
            })
        );
        let via: Value =
            serde_json::from_str(r#"[{"dst":"198.18.0.2","gateway":"198.18.1.1","dev":"eth0","flags":[]}]"#).unwrap();
        assert_eq!(
            parse_route(peer, &via).unwrap().next_hop,
            "198.18.1.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(parse_route(peer, &Value::Array(vec![])), None);
    }

    #[test]
    fn parses_neighbours_and_skips_unusable_ones() {
        let hop: IpAddr = "198.18.0.2".parse().unwrap();
        let ok: Value =
            serde_json::from_str(r#"[{"dst":"198.18.0.2","lladdr":"92:2f:98:d1:38:df","state":["STALE"]}]"#).unwrap();
        assert_eq!(parse_neigh(hop, &ok), Some([0x92, 0x2f, 0x98, 0xd1, 0x38, 0xdf]));
        let failed: Value = serde_json::from_str(r#"[{"dst":"198.18.0.2","state":["FAILED"]}]"#).unwrap();
        assert_eq!(parse_neigh(hop, &failed), None);
        let other: Value =
            serde_json::from_str(r#"[{"dst":"198.18.0.3","lladdr":"92:2f:98:d1:38:df","state":["REACHABLE"]}]"#)
                .unwrap();
        assert_eq!(parse_neigh(hop, &other), None);
    }
}
