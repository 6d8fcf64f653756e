//! Our addresses on the interface, kept current while the transport runs.
//!
//! The interface is fixed at start; its addresses are not (a DHCP renewal, a new IPv6
//! address, an operator's `ip addr add`). A server on a wildcard LISTEN_ADDR takes
//! frames for every address the interface holds, and a client sends from the address
//! the kernel's route to the server picks. A [`Watcher`] thread follows the kernel's
//! address notifications and rewrites `paqet_steer`'s filter when the set changes, so
//! frames to a new address are taken and frames to a removed one go back to the kernel.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use paqet_common::maps::{FilterConfig, MAX_LOCALS};
use paqet_common::wire::Addr;

use super::peers::Peers;
use crate::kernel::FilterWriter;
use crate::sync::lock;
use crate::transport::{local, netlink};

/// How often the watcher looks up from the socket to see whether it should stop: the
/// most a transport's drop waits for it.
const STOP_POLL: Duration = Duration::from_millis(250);

/// Which addresses the transport takes frames for and sends from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// Only the address the user named (a server's specific LISTEN_ADDR).
    Fixed,
    /// Every address of the interface: IPv4 only, or with `v6` both families (a
    /// server on `0.0.0.0` or `[::]`).
    Interface { v6: bool },
    /// The source address of the kernel's route to this peer (a client).
    RouteTo(SocketAddr),
}

/// The current addresses and the filter that steers them.
#[derive(Default)]
pub struct Locals {
    addrs: Vec<IpAddr>,
    filter: FilterConfig,
}

impl Locals {
    /// `base` without addresses (protocol, port, peer, redirect); `addrs` in preference
    /// order: the first of a family is the source towards a peer not yet heard.
    pub fn new(base: FilterConfig, addrs: Vec<IpAddr>) -> Locals {
        // Set even for an empty set: without FLAG_LOCAL any destination would match.
        let mut locals = Locals {
            addrs: Vec::new(),
            filter: base.with_locals(&[]),
        };
        locals.replace(addrs);
        locals
    }

    pub fn filter(&self) -> &FilterConfig {
        &self.filter
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.addrs.contains(&ip)
    }

    /// Our first address of `peer`'s family.
    pub fn first_for(&self, peer: IpAddr) -> Option<IpAddr> {
        self.addrs.iter().copied().find(|a| a.is_ipv4() == peer.is_ipv4())
    }

    /// Takes a new set; the filter to write when it differs from the current one.
    pub fn replace(&mut self, mut addrs: Vec<IpAddr>) -> Option<FilterConfig> {
        if addrs.len() > MAX_LOCALS {
            tracing::warn!(
                count = addrs.len(),
                "more addresses than paqet_steer holds; steering the first {MAX_LOCALS}"
            );
            addrs.truncate(MAX_LOCALS);
        }
        if addrs == self.addrs {
            return None;
        }
        let steered: Vec<Addr> = addrs.iter().map(|ip| Addr::from(*ip)).collect();
        self.filter = self.filter.with_locals(&steered);
        self.addrs = addrs;
        Some(self.filter)
    }
}

/// The addresses `follow` names now, asked of the kernel in the calling thread's
/// network namespace.
fn current(follow: Follow, ifindex: u32) -> io::Result<Vec<IpAddr>> {
    match follow {
        Follow::Fixed => Err(io::Error::from(io::ErrorKind::Unsupported)),
        Follow::Interface { v6 } => Ok(netlink::addresses(ifindex)?
            .into_iter()
            .filter(|ip| v6 || ip.is_ipv4())
            .collect()),
        Follow::RouteTo(peer) => match local::route_source(peer) {
            Ok(ip) => Ok(vec![ip]),
            // No address left to reach the server from: send nothing until one comes.
            Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => Ok(Vec::new()),
            Err(e) => Err(e),
        },
    }
}

/// The thread that keeps [`Locals`] and the filter map current. Stops on drop.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Follower {
    follow: Follow,
    interface: String,
    ifindex: u32,
    peers: Arc<Mutex<Peers>>,
    writer: FilterWriter,
}

impl Watcher {
    /// Subscribes in the calling thread's network namespace (the new thread inherits
    /// it), then re-reads the addresses at once: one may have changed since the
    /// transport picked them. `None` for [`Follow::Fixed`].
    pub fn spawn(
        follow: Follow,
        interface: &str,
        ifindex: u32,
        peers: Arc<Mutex<Peers>>,
        writer: FilterWriter,
    ) -> io::Result<Option<Watcher>> {
        if follow == Follow::Fixed {
            return Ok(None);
        }
        let mut events = netlink::AddressEvents::subscribe(STOP_POLL)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut follower = Follower {
            follow,
            interface: interface.to_string(),
            ifindex,
            peers,
            writer,
        };
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("paqet-xdp-addrs".into())
            .spawn(move || {
                follower.refresh();
                while !stopped.load(Ordering::Relaxed) {
                    follower.on_wait(events.wait());
                }
            })?;
        Ok(Some(Watcher {
            stop,
            thread: Some(thread),
        }))
    }
}

impl Follower {
    fn on_wait(&mut self, waited: io::Result<bool>) {
        match waited {
            Ok(true) => self.refresh(),
            Ok(false) => {}
            // The kernel dropped notifications: what changed is unknown, so re-read.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => self.refresh(),
            Err(e) => {
                tracing::warn!(interface = %self.interface, "reading address notifications: {e}");
                std::thread::sleep(STOP_POLL);
            }
        }
    }

    fn refresh(&mut self) {
        let addrs = match current(self.follow, self.ifindex) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(interface = %self.interface, "cannot read the interface's addresses; steering as before: {e}");
                return;
            }
        };
        let Some(filter) = lock(&self.peers).locals.replace(addrs.clone()) else {
            return;
        };
        match self.writer.set(&filter) {
            Ok(()) => {
                tracing::info!(interface = %self.interface, addresses = ?addrs, "steering the interface's current addresses")
            }
            Err(e) => tracing::error!(
                interface = %self.interface,
                "cannot update paqet_steer's filter; frames to new addresses reach the kernel: {}",
                crate::kernel::error_chain(&e)
            ),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paqet_common::maps::Protocol;
    use paqet_common::wire::FrameSummary;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn to(dst: &str) -> FrameSummary {
        FrameSummary {
            protocol: 6,
            dst: Addr::from(ip(dst)),
            dst_port: 4000,
            ..FrameSummary::default()
        }
    }

    #[test]
    fn the_filter_follows_the_set() {
        let mut l = Locals::new(FilterConfig::new(Protocol::Tcp, 4000), vec![ip("198.18.0.2")]);
        assert!(l.filter().matches(&to("198.18.0.2")));
        assert!(!l.filter().matches(&to("198.18.0.20")));
        let added = l.replace(vec![ip("198.18.0.2"), ip("198.18.0.20")]).expect("a new set");
        assert!(added.matches(&to("198.18.0.20")) && added.matches(&to("198.18.0.2")));
        assert_eq!(l.replace(vec![ip("198.18.0.2"), ip("198.18.0.20")]), None, "unchanged");
        let removed = l.replace(vec![ip("198.18.0.20")]).expect("a new set");
        assert!(!removed.matches(&to("198.18.0.2")));
        assert!(!l.contains(ip("198.18.0.2")) && l.contains(ip("198.18.0.20")));
        let none = l.replace(Vec::new()).expect("a new set");
        assert!(!none.matches(&to("198.18.0.20")), "no address: nothing is steered");
    }

    #[test]
    fn the_first_address_of_a_family_is_the_default_source() {
        let l = Locals::new(
            FilterConfig::new(Protocol::Tcp, 4000),
            vec![ip("2001:2::2"), ip("198.18.0.2"), ip("198.18.0.20")],
        );
        assert_eq!(l.first_for(ip("198.18.0.1")), Some(ip("198.18.0.2")));
        assert_eq!(l.first_for(ip("2001:2::1")), Some(ip("2001:2::2")));
        let v4_only = Locals::new(FilterConfig::new(Protocol::Tcp, 4000), vec![ip("198.18.0.2")]);
        assert_eq!(v4_only.first_for(ip("2001:2::1")), None);
    }

    #[test]
    fn more_addresses_than_slots_keeps_the_first() {
        let many: Vec<IpAddr> = (0..=MAX_LOCALS as u8).map(|i| IpAddr::from([198, 18, 1, i])).collect();
        let l = Locals::new(FilterConfig::new(Protocol::Tcp, 4000), many.clone());
        assert!(l.contains(many[0]) && !l.contains(many[MAX_LOCALS]));
    }

    /// Against the running kernel: loopback's 127.0.0.1 is host-scoped, so a wildcard
    /// server steers nothing there, and an unreachable peer leaves a client no source.
    #[test]
    fn reads_the_kernel() {
        let lo = netlink::ifindex("lo").unwrap();
        assert_eq!(
            current(Follow::Interface { v6: true }, lo).unwrap(),
            Vec::<IpAddr>::new()
        );
        assert_eq!(
            current(Follow::RouteTo("127.0.0.1:9".parse().unwrap()), lo).unwrap(),
            vec![ip("127.0.0.1")]
        );
        assert!(current(Follow::Fixed, lo).is_err());
    }
}
