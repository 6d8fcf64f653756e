//! Values stored in paqet's BPF maps, and the names both sides use for them.
//!
//! Layouts are `#[repr(C)]` with padding spelled out as fields, because `aya::Pod`
//! copies them as raw bytes and BTF describes them field by field to bpftool.

use crate::wire::{Addr, FrameSummary, ipproto};

/// Name of the XDP program (the function name in `paqet-ebpf`), as bpftool shows it.
pub const PROGRAM_NAME: &str = "paqet_steer";
/// 1-entry `Array<FilterConfig>` that userspace writes and the program reads per frame.
pub const FILTER_MAP: &str = "PAQET_FILTER";
/// 1-entry `PerCpuArray<Stats>`; userspace sums the per-CPU slots.
pub const STATS_MAP: &str = "PAQET_STATS";
/// `XskMap` indexed by RX queue; userspace stores the AF_XDP socket bound to that queue.
pub const XSK_MAP: &str = "PAQET_XSKS";
/// Entries in [`XSK_MAP`]: the largest RX queue index that can be steered, plus one.
pub const MAX_QUEUES: u32 = 64;

/// File names of the pins under `/sys/fs/bpf/paqet/<instance>/`.
pub const PIN_FILTER: &str = "filter";
pub const PIN_STATS: &str = "stats";
pub const PIN_XSKS: &str = "xsks";

/// The transport protocol a [`FilterConfig`] matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => ipproto::TCP,
            Protocol::Udp => ipproto::UDP,
        }
    }
}

/// Most destination addresses one filter steers: a server on a wildcard address steers
/// every address its interface holds, and an interface may hold several of each family.
pub const MAX_LOCALS: usize = 8;

/// Which frames `paqet_steer` takes for paqet; everything else goes to the kernel.
///
/// A frame matches when its IP protocol is [`protocol`](Self::protocol), its destination
/// port is [`local_port`](Self::local_port), with [`FLAG_LOCAL`](Self::FLAG_LOCAL) its
/// destination address is one of the locals (so frames to the port on the host's other
/// addresses, or forwarded through it, stay the kernel's), and, when set, its source
/// address and port are the peer's. An all-zero value (the map's initial state)
/// matches nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FilterConfig {
    /// `FLAG_*` bits.
    pub flags: u32,
    /// IP protocol number: 6 (TCP) or 17 (UDP).
    pub protocol: u8,
    /// 0: any peer address; 4 or 6: only frames from [`peer_addr`](Self::peer_addr).
    pub peer_family: u8,
    /// Destination port of inbound frames, in HOST byte order (the parser converts the
    /// wire's big-endian port before comparing).
    pub local_port: u16,
    /// Source port of inbound frames in host byte order; 0 means any.
    pub peer_port: u16,
    pub _pad: [u8; 2],
    /// Per slot of [`local_addrs`](Self::local_addrs): 0 (unused), 4 or 6.
    pub local_families: [u8; MAX_LOCALS],
    /// IPv4 in the first 4 bytes (rest zero) or IPv6, as in [`Addr`].
    pub peer_addr: [u8; 16],
    /// As `peer_addr`; slots whose family is 0 are unused.
    pub local_addrs: [[u8; 16]; MAX_LOCALS],
}

impl FilterConfig {
    /// Redirect matched frames into the AF_XDP socket registered for the frame's RX
    /// queue. Without it (or with no socket on that queue) matched frames are passed.
    pub const FLAG_REDIRECT: u32 = 1;
    /// Only frames to one of the local addresses; with none set, no frame matches (an
    /// interface that lost its last address steers nothing).
    pub const FLAG_LOCAL: u32 = 2;

    /// Match `protocol` frames to `local_port` from any peer; no redirect yet.
    pub const fn new(protocol: Protocol, local_port: u16) -> Self {
        FilterConfig {
            flags: 0,
            protocol: protocol.number(),
            peer_family: 0,
            local_port,
            peer_port: 0,
            _pad: [0; 2],
            local_families: [0; MAX_LOCALS],
            peer_addr: [0; 16],
            local_addrs: [[0; 16]; MAX_LOCALS],
        }
    }

    /// Only frames to these local addresses (the first [`MAX_LOCALS`] of them), in
    /// place of any set before.
    pub fn with_locals(mut self, addrs: &[Addr]) -> Self {
        self.flags |= Self::FLAG_LOCAL;
        self.local_families = [0; MAX_LOCALS];
        self.local_addrs = [[0; 16]; MAX_LOCALS];
        for (slot, a) in addrs.iter().take(MAX_LOCALS).enumerate() {
            self.local_families[slot] = a.family;
            self.local_addrs[slot] = a.octets;
        }
        self
    }

    /// Only frames from this peer address (and port, unless 0).
    pub const fn with_peer(mut self, addr: Addr, port: u16) -> Self {
        self.peer_family = addr.family;
        self.peer_addr = addr.octets;
        self.peer_port = port;
        self
    }

    pub const fn with_redirect(mut self, on: bool) -> Self {
        if on {
            self.flags |= Self::FLAG_REDIRECT;
        } else {
            self.flags &= !Self::FLAG_REDIRECT;
        }
        self
    }

    pub const fn redirect(&self) -> bool {
        self.flags & Self::FLAG_REDIRECT != 0
    }

    /// The match itself, shared so userspace checks frames exactly as the kernel does.
    #[inline(always)]
    pub fn matches(&self, f: &FrameSummary) -> bool {
        // Protocol 0 is the unset map entry; without this check it would match a
        // summary that was never filled in.
        if self.protocol == 0 || f.protocol != self.protocol || f.dst_port != self.local_port {
            return false;
        }
        if self.peer_port != 0 && f.src_port != self.peer_port {
            return false;
        }
        if self.flags & Self::FLAG_LOCAL != 0 && !self.steers_to(&f.dst) {
            return false;
        }
        if self.peer_family != 0 {
            if f.src.family != self.peer_family {
                return false;
            }
            // Compared as two words: a byte-array `==` may become a bcmp call, which
            // the BPF target cannot link.
            let want = self.peer_addr;
            let got = f.src.octets;
            if words(&want) != words(&got) {
                return false;
            }
        }
        true
    }
}

impl FilterConfig {
    #[inline(always)]
    fn steers_to(&self, dst: &Addr) -> bool {
        let to = words(&dst.octets);
        self.local_families
            .iter()
            .zip(self.local_addrs.iter())
            .any(|(family, addr)| *family != 0 && *family == dst.family && words(addr) == to)
    }
}

#[inline(always)]
fn words(a: &[u8; 16]) -> (u64, u64) {
    let [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7] = *a;
    (
        u64::from_ne_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        u64::from_ne_bytes([b0, b1, b2, b3, b4, b5, b6, b7]),
    )
}

/// Counters of `paqet_steer`, one copy per CPU; userspace adds them up.
///
/// Invariants (per CPU, and so for the sum): `seen = passed + redirected`;
/// `matched = redirected + no_socket + (matched frames passed because FLAG_REDIRECT
/// was clear)`. `passed` counts every frame handed to the kernel, including malformed
/// and no_socket ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stats {
    /// Every frame the program ran on (ARP, IPv6, everything).
    pub seen: u64,
    /// Frames that matched the filter.
    pub matched: u64,
    /// Frames returned to the kernel with XDP_PASS.
    pub passed: u64,
    /// Matched frames redirected into an AF_XDP socket.
    pub redirected: u64,
    /// Matched frames that would have been redirected but no socket was registered
    /// for their RX queue (they were passed).
    pub no_socket: u64,
    /// IP frames whose outer headers were truncated or inconsistent (passed).
    pub malformed: u64,
}

impl Stats {
    /// Adds another CPU's counters (wrapping: counters are free-running).
    pub fn accumulate(&mut self, o: &Stats) {
        self.seen = self.seen.wrapping_add(o.seen);
        self.matched = self.matched.wrapping_add(o.matched);
        self.passed = self.passed.wrapping_add(o.passed);
        self.redirected = self.redirected.wrapping_add(o.redirected);
        self.no_socket = self.no_socket.wrapping_add(o.no_socket);
        self.malformed = self.malformed.wrapping_add(o.malformed);
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both are repr(C), made only of integers and byte arrays, with every
    // padding byte spelled out as a field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::FilterConfig {}
    unsafe impl aya::Pod for super::Stats {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(
            size_of::<FilterConfig>(),
            4 + 1 + 1 + 2 + 2 + 2 + MAX_LOCALS + 16 + 16 * MAX_LOCALS
        );
        assert_eq!(size_of::<Stats>(), 6 * 8);
    }

    fn summary(proto: u8, src: Addr, sport: u16, dport: u16) -> FrameSummary {
        FrameSummary {
            protocol: proto,
            src,
            src_port: sport,
            dst_port: dport,
            ..FrameSummary::default()
        }
    }

    #[test]
    fn filter_matches_protocol_port_and_peer() {
        let peer = Addr::v4([198, 18, 0, 1]);
        let other = Addr::v4([198, 18, 0, 3]);
        let f = FilterConfig::new(Protocol::Udp, 4000);
        assert!(f.matches(&summary(17, other, 1, 4000)));
        assert!(!f.matches(&summary(6, other, 1, 4000)));
        assert!(!f.matches(&summary(17, other, 1, 4001)));
        let f = f.with_peer(peer, 5000);
        assert!(f.matches(&summary(17, peer, 5000, 4000)));
        assert!(!f.matches(&summary(17, peer, 5001, 4000)));
        assert!(!f.matches(&summary(17, other, 5000, 4000)));
        let v6 = Addr::v6([0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 198, 18, 0, 1]);
        assert!(!f.matches(&summary(17, v6, 5000, 4000)));
        assert!(!FilterConfig::default().matches(&FrameSummary::default()));
    }

    #[test]
    fn filter_matches_the_local_address_when_set() {
        let peer = Addr::v4([198, 18, 0, 1]);
        let to = |dst: Addr| FrameSummary {
            dst,
            ..summary(17, peer, 5000, 4000)
        };
        let ours = Addr::v4([198, 18, 0, 2]);
        let f = FilterConfig::new(Protocol::Udp, 4000).with_locals(&[ours]);
        assert!(f.matches(&to(ours)));
        assert!(
            !f.matches(&to(Addr::v4([198, 18, 0, 7]))),
            "another local or forwarded address"
        );
        let v6 = Addr::v6([0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 198, 18, 0, 2]);
        assert!(!f.matches(&to(v6)), "the same bytes in the other family");
        assert!(
            FilterConfig::new(Protocol::Udp, 4000).matches(&to(v6)),
            "unset: any destination"
        );
        let both = f.with_locals(&[ours, v6]);
        assert!(both.matches(&to(ours)) && both.matches(&to(v6)));
        assert!(
            !both.matches(&to(Addr::v4([198, 18, 0, 7]))),
            "forwarded traffic stays the kernel's"
        );
        let replaced = both.with_locals(&[v6]);
        assert!(!replaced.matches(&to(ours)), "a removed address is no longer steered");
        assert!(
            !f.with_locals(&[]).matches(&to(ours)),
            "no local address: nothing matches"
        );
    }

    #[test]
    fn filter_holds_up_to_max_locals() {
        let peer = Addr::v4([198, 18, 0, 1]);
        let addrs: Vec<Addr> = (0..=MAX_LOCALS as u8).map(|i| Addr::v4([198, 18, 1, i])).collect();
        let f = FilterConfig::new(Protocol::Udp, 4000).with_locals(&addrs);
        let to = |dst: Addr| FrameSummary {
            dst,
            ..summary(17, peer, 5000, 4000)
        };
        assert!(addrs[..MAX_LOCALS].iter().all(|a| f.matches(&to(*a))));
        assert!(!f.matches(&to(addrs[MAX_LOCALS])), "beyond the slots");
    }

    #[test]
    fn redirect_flag_round_trips() {
        let f = FilterConfig::new(Protocol::Tcp, 1).with_redirect(true);
        assert!(f.redirect());
        assert!(!f.with_redirect(false).redirect());
    }
}
