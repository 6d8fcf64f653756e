//! What the transport remembers per peer: the MAC to put in frames for it, the address
//! of ours it reached, and on the TCP-shaped wire its flow ([`super::tcp_flow`]); and
//! our own current addresses ([`Locals`]).
//!
//! Held behind one mutex that the TX path takes once per batch and the RX path once
//! per drained batch.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::locals::Locals;
use super::tcp_flow::Flows;
use crate::engine::FastMap;
use crate::transport::Via;

/// Where a MAC came from. Learned (the source MAC of a frame the peer sent) wins over
/// the kernel's tables: it is the hop that actually carried the peer's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacOrigin {
    Learned,
    Kernel,
}

#[derive(Clone, Copy, Debug)]
struct MacEntry {
    mac: [u8; 6],
    origin: MacOrigin,
    /// Learned entries: our address the peer's frames were sent to.
    local: Option<IpAddr>,
    used: Instant,
}

#[derive(Default)]
pub struct Peers {
    /// Looked up for every frame sent: SipHash here was ~1 % of a sending relay's CPU.
    /// Only authenticated peers and our own sends add entries.
    macs: FastMap<IpAddr, MacEntry>,
    /// The TCP-shaped wire's flows; `None` on the UDP wire.
    pub tcp: Option<Flows>,
    /// Addresses a resolution was asked for and has not finished.
    pending: HashSet<IpAddr>,
    /// Here because every TX and RX pass takes this lock already.
    pub locals: Locals,
}

impl Peers {
    pub fn mac(&mut self, ip: IpAddr, now: Instant) -> Option<[u8; 6]> {
        let e = self.macs.get_mut(&ip)?;
        e.used = now;
        Some(e.mac)
    }

    pub fn learn(&mut self, ip: IpAddr, via: Via, now: Instant) {
        let learned = MacEntry {
            mac: via.mac,
            origin: MacOrigin::Learned,
            local: Some(via.local),
            used: now,
        };
        let e = self.macs.entry(ip).or_insert(learned);
        if e.mac != via.mac || e.origin != MacOrigin::Learned {
            tracing::debug!(%ip, mac = %super::iface::fmt_mac(via.mac), "learned next hop from a received frame");
        }
        *e = learned;
    }

    /// The address our frames to `ip` leave from: the one of ours it reached while we
    /// still hold it, else our first of its family.
    pub fn source_for(&self, ip: IpAddr) -> Option<IpAddr> {
        self.macs
            .get(&ip)
            .and_then(|e| e.local)
            .filter(|l| self.locals.contains(*l))
            .or_else(|| self.locals.first_for(ip))
    }

    /// A MAC from the kernel's neighbour table; never overrides a learned one.
    pub fn set_from_kernel(&mut self, ip: IpAddr, mac: [u8; 6], now: Instant) {
        match self.macs.get_mut(&ip) {
            Some(e) if e.origin == MacOrigin::Learned => {}
            Some(e) => e.mac = mac,
            None => {
                self.macs.insert(
                    ip,
                    MacEntry {
                        mac,
                        origin: MacOrigin::Kernel,
                        local: None,
                        used: now,
                    },
                );
            }
        }
    }

    /// Marks `ip` as being resolved; false if it already was.
    pub fn start_resolving(&mut self, ip: IpAddr) -> bool {
        self.pending.insert(ip)
    }

    pub fn done_resolving(&mut self, ip: IpAddr) {
        self.pending.remove(&ip);
    }

    /// Addresses whose MAC came from the kernel, for periodic refresh.
    pub fn kernel_resolved(&self) -> Vec<IpAddr> {
        self.macs
            .iter()
            .filter(|(_, e)| e.origin == MacOrigin::Kernel)
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Forgets peers not heard from or sent to for `idle`, so a long-running server's
    /// tables stay as large as its live peers.
    pub fn prune(&mut self, now: Instant, idle: Duration) {
        self.macs.retain(|_, e| now.duration_since(e.used) < idle);
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.prune(now, idle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(mac: u8, local: &str) -> Via {
        Via {
            mac: [mac; 6],
            local: local.parse().unwrap(),
        }
    }

    #[test]
    fn learned_macs_win_over_the_kernel() {
        let mut p = Peers::default();
        let now = Instant::now();
        let ip: IpAddr = "198.18.0.1".parse().unwrap();
        p.set_from_kernel(ip, [1; 6], now);
        assert_eq!(p.mac(ip, now), Some([1; 6]));
        p.learn(ip, via(2, "198.18.0.2"), now);
        p.set_from_kernel(ip, [3; 6], now);
        assert_eq!(p.mac(ip, now), Some([2; 6]));
        assert!(p.kernel_resolved().is_empty());
        p.prune(now + Duration::from_secs(10), Duration::from_secs(5));
        assert_eq!(p.mac(ip, now), None);
    }

    #[test]
    fn replies_leave_from_the_address_the_peer_reached() {
        use paqet_common::maps::{FilterConfig, Protocol};
        let ours = |s: &[&str]| s.iter().map(|a| a.parse().unwrap()).collect::<Vec<IpAddr>>();
        let mut p = Peers {
            locals: Locals::new(
                FilterConfig::new(Protocol::Tcp, 4000),
                ours(&["198.18.0.2", "198.18.0.20"]),
            ),
            ..Peers::default()
        };
        let now = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("198.18.0.1".parse().unwrap(), "198.18.0.3".parse().unwrap());
        assert_eq!(
            p.source_for(a),
            Some("198.18.0.2".parse().unwrap()),
            "not heard yet: the first"
        );
        p.learn(a, via(2, "198.18.0.20"), now);
        assert_eq!(p.source_for(a), Some("198.18.0.20".parse().unwrap()));
        assert_eq!(p.source_for(b), Some("198.18.0.2".parse().unwrap()), "another peer");
        p.locals.replace(ours(&["198.18.0.2"]));
        assert_eq!(
            p.source_for(a),
            Some("198.18.0.2".parse().unwrap()),
            "the address it reached is gone"
        );
    }
}
