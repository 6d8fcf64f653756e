//! What the transport remembers per peer: the MAC to put in frames for it, and on the
//! TCP-shaped wire its flow ([`super::tcp_flow`]).
//!
//! Held behind one mutex that the TX path takes once per batch and the RX path once
//! per drained batch.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::tcp_flow::Flows;
use crate::engine::FastMap;

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
}

impl Peers {
    pub fn mac(&mut self, ip: IpAddr, now: Instant) -> Option<[u8; 6]> {
        let e = self.macs.get_mut(&ip)?;
        e.used = now;
        Some(e.mac)
    }

    pub fn learn(&mut self, ip: IpAddr, mac: [u8; 6], now: Instant) {
        let e = self.macs.entry(ip).or_insert(MacEntry {
            mac,
            origin: MacOrigin::Learned,
            used: now,
        });
        if e.mac != mac || e.origin != MacOrigin::Learned {
            tracing::debug!(%ip, mac = %super::iface::fmt_mac(mac), "learned next hop from a received frame");
        }
        *e = MacEntry {
            mac,
            origin: MacOrigin::Learned,
            used: now,
        };
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

    #[test]
    fn learned_macs_win_over_the_kernel() {
        let mut p = Peers::default();
        let now = Instant::now();
        let ip: IpAddr = "198.18.0.1".parse().unwrap();
        p.set_from_kernel(ip, [1; 6], now);
        assert_eq!(p.mac(ip, now), Some([1; 6]));
        p.learn(ip, [2; 6], now);
        p.set_from_kernel(ip, [3; 6], now);
        assert_eq!(p.mac(ip, now), Some([2; 6]));
        assert!(p.kernel_resolved().is_empty());
        p.prune(now + Duration::from_secs(10), Duration::from_secs(5));
        assert_eq!(p.mac(ip, now), None);
    }
}
