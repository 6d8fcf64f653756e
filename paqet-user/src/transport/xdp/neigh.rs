//! The L2 next hop of a peer, from the kernel's route and neighbour tables, asked over
//! rtnetlink (see [`crate::transport::netlink`]) from the calling thread, so it sees
//! that thread's network namespace, which is the transport's. Lookups happen at open,
//! on a cache miss and every [`REFRESH_EVERY`], never per packet.
//!
//! When the neighbour is unknown, resolution is triggered with RTM_NEWNEIGH + NTF_USE
//! (what `ip neigh replace ADDR dev DEV use` sends): the kernel sends its own ARP
//! request / neighbour solicitation, and no datagram goes to the peer, so nothing
//! reaches a port that might answer with an RST or an ICMP error. (For IPv6 the kernel
//! sends such an unprompted solicitation only from a link-local address that has
//! finished DAD; a host whose interface has none cannot be resolved this way, and sends
//! are dropped and counted until something else fills the neighbour entry.)

use crate::sync::lock;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::iface::fmt_mac;
use super::peers::Peers;
use crate::transport::netlink;

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
    #[error("no interface {dev} in this network namespace")]
    NoInterface {
        dev: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed (rtnetlink)")]
    Netlink {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot ask the kernel to resolve next hop {next_hop} on {dev}: that needs CAP_NET_ADMIN, \
         which paqet gives up after start; its neighbour table is still read (the host's own \
         traffic keeps it current; `ip neigh show dev {dev}` shows it)"
    )]
    TriggerNotPermitted { next_hop: IpAddr, dev: String },
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
    /// The output interface's name (its index when it has none we can read).
    pub dev: String,
    pub ifindex: u32,
    /// The gateway, or the peer itself when it is on-link.
    pub next_hop: IpAddr,
}

fn ifindex(dev: &str) -> Result<u32, NeighError> {
    netlink::ifindex(dev).map_err(|source| NeighError::NoInterface {
        dev: dev.to_string(),
        source,
    })
}

pub fn route_get(peer: IpAddr) -> Result<Route, NeighError> {
    let r = netlink::route_get(peer).map_err(|source| NeighError::Netlink {
        what: format!("route get {peer}"),
        source,
    })?;
    Ok(Route {
        dev: netlink::ifname(r.ifindex).unwrap_or_else(|_| format!("ifindex {}", r.ifindex)),
        ifindex: r.ifindex,
        next_hop: r.next_hop(peer),
    })
}

/// The neighbour's MAC if the kernel has a usable entry (anything but INCOMPLETE or
/// FAILED; a STALE entry still names the right host).
pub fn neigh_show(next_hop: IpAddr, dev: &str) -> Result<Option<[u8; 6]>, NeighError> {
    let index = ifindex(dev)?;
    let entry = netlink::neigh_get(next_hop, index).map_err(|source| NeighError::Netlink {
        what: format!("neighbour get {next_hop} dev {dev}"),
        source,
    })?;
    Ok(entry.and_then(|n| n.usable_mac()))
}

/// Asks the kernel to resolve (or re-confirm) `next_hop` now.
pub fn trigger(next_hop: IpAddr, dev: &str) -> Result<(), NeighError> {
    let index = ifindex(dev)?;
    netlink::neigh_use(next_hop, index).map_err(|source| {
        if source.raw_os_error() == Some(libc::EPERM) {
            NeighError::TriggerNotPermitted {
                next_hop,
                dev: dev.to_string(),
            }
        } else {
            NeighError::Netlink {
                what: format!("neighbour use {next_hop} dev {dev} (NTF_USE)"),
                source,
            }
        }
    })
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
    // Without the right to ask, the wait still serves: the host's own traffic may make
    // the kernel resolve it meanwhile; failing, the refusal says why.
    let refused = match trigger(route.next_hop, interface) {
        Ok(()) => None,
        Err(e @ NeighError::TriggerNotPermitted { .. }) => Some(e),
        Err(e) => return Err(e),
    };
    let deadline = Instant::now() + wait;
    loop {
        std::thread::sleep(POLL_EVERY);
        if let Some(mac) = neigh_show(route.next_hop, interface)? {
            tracing::debug!(%peer, next_hop = %route.next_hop, mac = %fmt_mac(mac), "resolved next hop");
            return Ok(mac);
        }
        if Instant::now() >= deadline {
            return Err(refused.unwrap_or(NeighError::Unresolved {
                peer,
                next_hop: route.next_hop,
                dev: interface.to_string(),
                waited: wait,
            }));
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
    let mut warnings = Warnings::default();
    loop {
        let timeout = next_refresh.saturating_duration_since(Instant::now());
        match requests.recv_timeout(timeout) {
            Ok(ip) => resolve_into(ip, interface, peers, &mut warnings),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if Instant::now() >= next_refresh {
            refresh(interface, peers, &mut warnings);
            next_refresh = Instant::now() + REFRESH_EVERY;
        }
    }
}

/// What the resolver thread has said, so that a failure repeated by every send (the TX
/// path asks again each time it finds no MAC) is one WARN per peer per
/// [`REFRESH_EVERY`], and a refusal that cannot change is said once.
#[derive(Default)]
struct Warnings {
    last: std::collections::HashMap<IpAddr, Instant>,
    told_refresh_unprivileged: bool,
}

impl Warnings {
    fn due(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self
            .last
            .get(&ip)
            .is_some_and(|at| now.duration_since(*at) < REFRESH_EVERY)
        {
            return false;
        }
        // Bounded by the peers the TX path asks about; forget the old ones.
        self.last.retain(|_, at| now.duration_since(*at) < REFRESH_EVERY);
        self.last.insert(ip, now);
        true
    }
}

fn resolve_into(ip: IpAddr, interface: &str, peers: &Mutex<Peers>, warnings: &mut Warnings) {
    let result = resolve(ip, interface, RESOLVE_WAIT);
    let mut p = lock(peers);
    p.done_resolving(ip);
    match result {
        Ok(mac) => p.set_from_kernel(ip, mac, Instant::now()),
        Err(e) if warnings.due(ip, Instant::now()) => tracing::warn!(
            peer = %ip,
            "cannot resolve the next hop (sends to it are dropped meanwhile): {}",
            crate::kernel::error_chain(&e)
        ),
        Err(e) => tracing::debug!(peer = %ip, "cannot resolve the next hop: {}", crate::kernel::error_chain(&e)),
    }
}

/// Re-confirms kernel-resolved next hops (the `use` trigger also makes the kernel
/// re-probe a STALE entry, which our own frames, bypassing it, never refresh). Once
/// paqet has given up CAP_NET_ADMIN the kernel refuses the trigger; the table is then
/// only read, which still follows any change the kernel learns by itself.
fn refresh(interface: &str, peers: &Mutex<Peers>, warnings: &mut Warnings) {
    let ips: VecDeque<IpAddr> = {
        let mut p = lock(peers);
        p.prune(Instant::now(), IDLE_PEER);
        p.kernel_resolved().into()
    };
    for ip in ips {
        let fresh = route_get(ip).and_then(|r| {
            // Refused once, refused for good: the capability does not come back.
            if !warnings.told_refresh_unprivileged {
                match trigger(r.next_hop, interface) {
                    Ok(()) => {}
                    Err(e @ NeighError::TriggerNotPermitted { .. }) => {
                        warnings.told_refresh_unprivileged = true;
                        tracing::info!(peer = %ip, "{e}");
                    }
                    Err(e) => return Err(e),
                }
            }
            neigh_show(r.next_hop, interface)
        });
        match fresh {
            Ok(Some(mac)) => lock(peers).set_from_kernel(ip, mac, Instant::now()),
            Ok(None) => {
                tracing::debug!(peer = %ip, "the kernel has no usable entry for the next hop now; keeping the old MAC")
            }
            Err(e) if warnings.due(ip, Instant::now()) => {
                tracing::warn!(peer = %ip, "refreshing the next hop failed: {}", crate::kernel::error_chain(&e))
            }
            Err(e) => tracing::debug!(peer = %ip, "refreshing the next hop failed: {}", crate::kernel::error_chain(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_cap_net_admin_the_trigger_is_refused_with_a_reason_not_a_netlink_failure() {
        let refused = std::thread::spawn(|| {
            // As paqet's drop after start leaves it, in this thread only.
            crate::ops::privileges::clear_effective_in_this_thread(crate::ops::privileges::CAP_NET_ADMIN)
                .expect("capset");
            trigger(IpAddr::from([127, 0, 0, 1]), "lo")
        })
        .join()
        .expect("the test thread");
        let e = refused.expect_err("the kernel asks for CAP_NET_ADMIN to resolve a neighbour");
        assert!(matches!(e, NeighError::TriggerNotPermitted { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("CAP_NET_ADMIN") && text.contains("ip neigh show dev lo"),
            "{text}"
        );
    }

    #[test]
    fn a_repeated_failure_warns_once_per_refresh_interval_and_peer() {
        let mut w = Warnings::default();
        let (a, b) = (IpAddr::from([198, 18, 0, 2]), IpAddr::from([198, 18, 0, 3]));
        let t0 = Instant::now();
        assert!(w.due(a, t0));
        assert!(!w.due(a, t0 + Duration::from_secs(1)), "every send asks again");
        assert!(w.due(b, t0 + Duration::from_secs(1)), "another peer has its own");
        assert!(w.due(a, t0 + REFRESH_EVERY), "said again after the interval");
    }
}
