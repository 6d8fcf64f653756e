//! What the transport remembers per peer: the MAC to put in frames for it, and the TCP
//! sequence/acknowledgement numbers of TCP-shaped frames exchanged with it.
//!
//! Held behind one mutex that the TX path takes once per batch and the RX path once
//! per drained batch.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::emit::TcpNumbers;
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

#[derive(Clone, Copy, Debug)]
struct Flow {
    /// Sequence number of our next frame.
    seq: u32,
    /// What we acknowledge: the end of the newest data seen from the peer.
    ack: u32,
    /// False until the first frame from the peer sets `ack` for real.
    ack_known: bool,
    used: Instant,
}

#[derive(Debug, Default)]
pub struct Peers {
    /// Looked up for every frame sent: SipHash here was ~1 % of a sending relay's CPU.
    /// Only authenticated peers and our own sends add entries.
    macs: FastMap<IpAddr, MacEntry>,
    flows: FastMap<SocketAddr, Flow>,
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

    /// Numbers for the next TCP-shaped frame to `peer`; the sequence advances by the
    /// payload, as a real connection's does.
    pub fn next_tcp(&mut self, peer: SocketAddr, payload_len: usize, now: Instant) -> TcpNumbers {
        let f = self.flows.entry(peer).or_insert_with(|| new_flow(now));
        f.used = now;
        let n = TcpNumbers { seq: f.seq, ack: f.ack };
        f.seq = f.seq.wrapping_add(payload_len as u32);
        n
    }

    /// Records a TCP-shaped frame from `peer` so our acks follow its sequence numbers,
    /// once we have sent to it. The frame is not authenticated yet: frames from forged
    /// sources must not add entries, or a flood of them would grow the table without
    /// bound. (A server's first answer to a client therefore acks a random number, as
    /// a client's first frame always did.)
    pub fn saw_tcp(&mut self, peer: SocketAddr, seq: u32, payload_len: usize, now: Instant) {
        let Some(f) = self.flows.get_mut(&peer) else {
            return;
        };
        f.used = now;
        let end = seq.wrapping_add(payload_len as u32);
        // Serial-number comparison: only move forward, so a reordered frame does not
        // pull the ack back.
        if !f.ack_known || (end.wrapping_sub(f.ack) as i32) > 0 {
            f.ack = end;
            f.ack_known = true;
        }
    }

    /// Forgets peers not heard from or sent to for `idle`, so a long-running server's
    /// tables stay as large as its live peers.
    pub fn prune(&mut self, now: Instant, idle: Duration) {
        self.macs.retain(|_, e| now.duration_since(e.used) < idle);
        self.flows.retain(|_, f| now.duration_since(f.used) < idle);
    }
}

fn new_flow(now: Instant) -> Flow {
    // Random initial numbers, as a real stack picks them, so flows do not all start alike.
    Flow {
        seq: rand::random(),
        ack: rand::random(),
        ack_known: false,
        used: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_advances_with_payload_and_ack_follows_the_peer() {
        let mut p = Peers::default();
        let now = Instant::now();
        let peer: SocketAddr = "198.18.0.1:5000".parse().unwrap();
        let a = p.next_tcp(peer, 100, now);
        let b = p.next_tcp(peer, 50, now);
        assert_eq!(b.seq, a.seq.wrapping_add(100));
        p.saw_tcp(peer, 1000, 10, now);
        assert_eq!(p.next_tcp(peer, 0, now).ack, 1010);
        p.saw_tcp(peer, 900, 10, now); // older: ignored
        assert_eq!(p.next_tcp(peer, 0, now).ack, 1010);
        p.saw_tcp(peer, u32::MAX - 5, 10, now); // far behind in serial arithmetic: ignored
        assert_eq!(p.next_tcp(peer, 0, now).ack, 1010);
    }

    #[test]
    fn frames_from_peers_we_never_sent_to_add_no_flow() {
        let mut p = Peers::default();
        let now = Instant::now();
        for port in 1..=1000 {
            p.saw_tcp(SocketAddr::from(([198, 18, 0, 9], port)), 7, 10, now);
        }
        assert!(p.flows.is_empty());
    }

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
