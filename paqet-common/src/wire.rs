//! The outer-header parser: Ethernet, up to two 802.1Q/802.1ad tags, IPv4 or IPv6,
//! then TCP or UDP. One implementation, run by the XDP program and by userspace.
//!
//! The parser never touches memory directly; it asks a [`Bytes`] for fixed-size copies
//! at offsets. Over a slice that is an ordinary bounds check; in XDP it is a check of
//! `data + off + N <= data_end` right before the load, which is the shape the verifier
//! needs to accept the access. For the same reason the code avoids runtime indexing
//! (a failed index check would be a call into a panic handler) and keeps every offset
//! derived from masked header fields, so the verifier can bound it.
//!
//! Classification: a frame that is not Ethernet/IP/TCP-or-UDP, an IPv4 fragment, or an
//! IPv6 packet with extension headers is [`ParseError::Unsupported`] (never paqet's);
//! a frame shorter than its own headers say is [`ParseError::Truncated`]; headers that
//! contradict themselves are [`ParseError::Malformed`]. Checksums are not verified:
//! the kernel does that for what it receives, and AEAD authenticates paqet's payload.

/// Byte access for the parser: a fixed-size copy at an offset, or `None` when any byte
/// of `[off, off + N)` lies outside the frame.
pub trait Bytes {
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
    /// Length of the frame in bytes.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Bytes for [u8] {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let end = off.checked_add(N)?;
        let s = self.get(off..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Some(out)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const QINQ: u16 = 0x88A8;
    pub const IPV6: u16 = 0x86DD;
}

pub mod ipproto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

pub const ETH_HEADER_LEN: usize = 14;
pub const VLAN_TAG_LEN: usize = 4;
pub const IPV4_MIN_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;
pub const UDP_HEADER_LEN: usize = 8;
pub const TCP_MIN_HEADER_LEN: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The frame ends before the headers (or the IP length) say it should.
    Truncated,
    /// Not something paqet ever sends: another ethertype or protocol, a fragment,
    /// IPv6 extension headers, a third VLAN tag.
    Unsupported,
    /// Header fields that contradict each other or the protocol (bad version, IHL < 5,
    /// UDP length beyond the IP payload, TCP data offset < 5, ...).
    Malformed,
}

/// An IP address as both sides store it: IPv4 in the first four bytes, rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Addr {
    /// 0 (none), 4 or 6.
    pub family: u8,
    pub octets: [u8; 16],
}

impl Addr {
    pub const fn v4(a: [u8; 4]) -> Self {
        Addr {
            family: 4,
            octets: [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    pub const fn v6(a: [u8; 16]) -> Self {
        Addr { family: 6, octets: a }
    }

    pub fn to_ip(&self) -> Option<core::net::IpAddr> {
        let o = self.octets;
        match self.family {
            4 => Some(core::net::IpAddr::from([o[0], o[1], o[2], o[3]])),
            6 => Some(core::net::IpAddr::from(o)),
            _ => None,
        }
    }
}

impl From<core::net::IpAddr> for Addr {
    fn from(ip: core::net::IpAddr) -> Self {
        match ip {
            core::net::IpAddr::V4(v4) => Addr::v4(v4.octets()),
            core::net::IpAddr::V6(v6) => Addr::v6(v6.octets()),
        }
    }
}

/// What the outer headers of one TCP/UDP-over-IP frame say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FrameSummary {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Number of VLAN tags (0..=2) and their VLAN IDs, outermost first (0 if absent).
    pub vlan_count: u8,
    pub vlan_ids: [u16; 2],
    /// [`ethertype::IPV4`] or [`ethertype::IPV6`].
    pub ether_type: u16,
    /// [`ipproto::TCP`] or [`ipproto::UDP`].
    pub protocol: u8,
    pub src: Addr,
    pub dst: Addr,
    /// Host byte order.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte (FIN=0x01 SYN=0x02 RST=0x04 PSH=0x08 ACK=0x10); 0 for UDP.
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgment numbers and window; 0 for UDP.
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    pub tcp_window: u16,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// Offsets from the start of the frame.
    pub l3_offset: u16,
    pub l4_offset: u16,
    pub payload_offset: u16,
    /// Payload bytes after the TCP/UDP header, bounded by the IP/UDP lengths (Ethernet
    /// padding after the IP packet is not payload).
    pub payload_len: u16,
}

/// Ethernet header and VLAN tags: returns (offset of the L3 header, ethertype).
#[inline(always)]
pub fn parse_ethernet<B: Bytes + ?Sized>(b: &B, s: &mut FrameSummary) -> Result<(usize, u16), ParseError> {
    let hdr: [u8; ETH_HEADER_LEN] = b.load(0).ok_or(ParseError::Truncated)?;
    let [d0, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5, t0, t1] = hdr;
    s.dst_mac = [d0, d1, d2, d3, d4, d5];
    s.src_mac = [s0, s1, s2, s3, s4, s5];
    let mut ty = u16::from_be_bytes([t0, t1]);
    let mut off = ETH_HEADER_LEN;
    // Unrolled rather than looped: two tags at most, and no runtime index into vlan_ids.
    if is_vlan(ty) {
        let [c0, c1, n0, n1]: [u8; 4] = b.load(off).ok_or(ParseError::Truncated)?;
        s.vlan_ids[0] = u16::from_be_bytes([c0, c1]) & 0x0fff;
        s.vlan_count = 1;
        ty = u16::from_be_bytes([n0, n1]);
        off = ETH_HEADER_LEN + VLAN_TAG_LEN;
        if is_vlan(ty) {
            let [c0, c1, n0, n1]: [u8; 4] = b.load(off).ok_or(ParseError::Truncated)?;
            s.vlan_ids[1] = u16::from_be_bytes([c0, c1]) & 0x0fff;
            s.vlan_count = 2;
            ty = u16::from_be_bytes([n0, n1]);
            off = ETH_HEADER_LEN + 2 * VLAN_TAG_LEN;
            if is_vlan(ty) {
                return Err(ParseError::Unsupported);
            }
        }
    }
    s.ether_type = ty;
    Ok((off, ty))
}

#[inline(always)]
fn is_vlan(ty: u16) -> bool {
    ty == ethertype::VLAN || ty == ethertype::QINQ
}

/// IPv4 header at `off`: returns (offset of L4, end of the IP packet).
#[inline(always)]
pub fn parse_ipv4<B: Bytes + ?Sized>(b: &B, off: usize, s: &mut FrameSummary) -> Result<(usize, usize), ParseError> {
    let h: [u8; IPV4_MIN_HEADER_LEN] = b.load(off).ok_or(ParseError::Truncated)?;
    let [
        vihl,
        _tos,
        l0,
        l1,
        _id0,
        _id1,
        f0,
        f1,
        ttl,
        proto,
        _c0,
        _c1,
        a0,
        a1,
        a2,
        a3,
        b0,
        b1,
        b2,
        b3,
    ] = h;
    if vihl >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HEADER_LEN {
        return Err(ParseError::Malformed);
    }
    let total = u16::from_be_bytes([l0, l1]) as usize;
    if total < ihl {
        return Err(ParseError::Malformed);
    }
    let end = off + total;
    if end > b.len() {
        return Err(ParseError::Truncated);
    }
    // MF set or a non-zero offset: a fragment. Only a first fragment has ports, and
    // paqet never fragments, so none of them is paqet's.
    if u16::from_be_bytes([f0, f1]) & 0x3fff != 0 {
        return Err(ParseError::Unsupported);
    }
    s.l3_offset = off as u16;
    s.ttl = ttl;
    s.protocol = proto;
    s.src = Addr::v4([a0, a1, a2, a3]);
    s.dst = Addr::v4([b0, b1, b2, b3]);
    Ok((off + ihl, end))
}

/// IPv6 header at `off`: returns (offset of L4, end of the IP packet).
#[inline(always)]
pub fn parse_ipv6<B: Bytes + ?Sized>(b: &B, off: usize, s: &mut FrameSummary) -> Result<(usize, usize), ParseError> {
    let [v, _tc, _fl0, _fl1, l0, l1, next, hops]: [u8; 8] = b.load(off).ok_or(ParseError::Truncated)?;
    let src: [u8; 16] = b.load(off + 8).ok_or(ParseError::Truncated)?;
    let dst: [u8; 16] = b.load(off + 24).ok_or(ParseError::Truncated)?;
    if v >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let payload = u16::from_be_bytes([l0, l1]) as usize;
    // Length 0 means a jumbogram (hop-by-hop option): never paqet's.
    if payload == 0 {
        return Err(ParseError::Unsupported);
    }
    let end = off + IPV6_HEADER_LEN + payload;
    if end > b.len() {
        return Err(ParseError::Truncated);
    }
    s.l3_offset = off as u16;
    s.ttl = hops;
    s.protocol = next;
    s.src = Addr::v6(src);
    s.dst = Addr::v6(dst);
    Ok((off + IPV6_HEADER_LEN, end))
}

/// UDP header at `off` inside an IP packet ending at `end`.
#[inline(always)]
pub fn parse_udp<B: Bytes + ?Sized>(b: &B, off: usize, end: usize, s: &mut FrameSummary) -> Result<(), ParseError> {
    if off + UDP_HEADER_LEN > end {
        return Err(ParseError::Malformed);
    }
    let [p0, p1, q0, q1, l0, l1, _c0, _c1]: [u8; UDP_HEADER_LEN] = b.load(off).ok_or(ParseError::Truncated)?;
    let len = u16::from_be_bytes([l0, l1]) as usize;
    if len < UDP_HEADER_LEN || off + len > end {
        return Err(ParseError::Malformed);
    }
    s.l4_offset = off as u16;
    s.src_port = u16::from_be_bytes([p0, p1]);
    s.dst_port = u16::from_be_bytes([q0, q1]);
    s.tcp_flags = 0;
    s.payload_offset = (off + UDP_HEADER_LEN) as u16;
    s.payload_len = (len - UDP_HEADER_LEN) as u16;
    Ok(())
}

/// TCP header at `off` inside an IP packet ending at `end`.
#[inline(always)]
pub fn parse_tcp<B: Bytes + ?Sized>(b: &B, off: usize, end: usize, s: &mut FrameSummary) -> Result<(), ParseError> {
    if off + TCP_MIN_HEADER_LEN > end {
        return Err(ParseError::Malformed);
    }
    let h: [u8; TCP_MIN_HEADER_LEN] = b.load(off).ok_or(ParseError::Truncated)?;
    let [
        p0,
        p1,
        q0,
        q1,
        s0,
        s1,
        s2,
        s3,
        a0,
        a1,
        a2,
        a3,
        doff,
        flags,
        w0,
        w1,
        _,
        _,
        _,
        _,
    ] = h;
    let hlen = ((doff >> 4) as usize) * 4;
    if hlen < TCP_MIN_HEADER_LEN || off + hlen > end {
        return Err(ParseError::Malformed);
    }
    s.l4_offset = off as u16;
    s.src_port = u16::from_be_bytes([p0, p1]);
    s.dst_port = u16::from_be_bytes([q0, q1]);
    s.tcp_flags = flags;
    s.tcp_seq = u32::from_be_bytes([s0, s1, s2, s3]);
    s.tcp_ack = u32::from_be_bytes([a0, a1, a2, a3]);
    s.tcp_window = u16::from_be_bytes([w0, w1]);
    s.payload_offset = (off + hlen) as u16;
    s.payload_len = (end - off - hlen) as u16;
    Ok(())
}

/// Parses a whole frame's outer headers.
#[inline(always)]
pub fn parse_frame<B: Bytes + ?Sized>(b: &B) -> Result<FrameSummary, ParseError> {
    let mut s = FrameSummary::default();
    let (l3, ty) = parse_ethernet(b, &mut s)?;
    let (l4, end) = if ty == ethertype::IPV4 {
        parse_ipv4(b, l3, &mut s)?
    } else if ty == ethertype::IPV6 {
        parse_ipv6(b, l3, &mut s)?
    } else {
        return Err(ParseError::Unsupported);
    };
    if s.protocol == ipproto::UDP {
        parse_udp(b, l4, end, &mut s)?;
    } else if s.protocol == ipproto::TCP {
        parse_tcp(b, l4, end, &mut s)?;
    } else {
        return Err(ParseError::Unsupported);
    }
    Ok(s)
}

/// What the TCP options of a segment say (the ones paqet writes and reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpOptions {
    pub mss: Option<u16>,
    /// Window scale shift as sent (RFC 7323 caps its use at 14; the value is kept as is).
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
    /// (TSval, TSecr).
    pub timestamps: Option<(u32, u32)>,
}

pub mod tcpopt {
    pub const EOL: u8 = 0;
    pub const NOP: u8 = 1;
    pub const MSS: u8 = 2;
    pub const WINDOW_SCALE: u8 = 3;
    pub const SACK_PERMITTED: u8 = 4;
    pub const SACK: u8 = 5;
    pub const TIMESTAMPS: u8 = 8;
}

/// Reads TCP options (the bytes between the fixed 20-byte header and the payload).
/// Unknown options are skipped by their length; a length that is too short for its
/// kind or runs past the end is [`ParseError::Malformed`]. Userspace only (the XDP
/// program matches outer addresses and ports, never options).
pub fn parse_tcp_options(opts: &[u8]) -> Result<TcpOptions, ParseError> {
    let mut out = TcpOptions::default();
    let mut i = 0usize;
    // Every option is at least one byte long, so this ends within 40 steps for any
    // header (and within opts.len() steps for any slice).
    while let Some(&kind) = opts.get(i) {
        match kind {
            tcpopt::EOL => break,
            tcpopt::NOP => {
                i += 1;
                continue;
            }
            _ => {}
        }
        let len = *opts.get(i + 1).ok_or(ParseError::Malformed)? as usize;
        let body = opts.get(i + 2..i + len.max(2)).ok_or(ParseError::Malformed)?;
        if len < 2 {
            return Err(ParseError::Malformed);
        }
        match (kind, body.len()) {
            (tcpopt::MSS, 2) => out.mss = Some(u16::from_be_bytes([body[0], body[1]])),
            (tcpopt::WINDOW_SCALE, 1) => out.window_scale = Some(body[0]),
            (tcpopt::SACK_PERMITTED, 0) => out.sack_permitted = true,
            (tcpopt::TIMESTAMPS, 8) => {
                out.timestamps = Some((
                    u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                    u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                ))
            }
            (tcpopt::MSS | tcpopt::WINDOW_SCALE | tcpopt::SACK_PERMITTED | tcpopt::TIMESTAMPS, _) => {
                return Err(ParseError::Malformed);
            }
            _ => {}
        }
        i += len;
    }
    Ok(out)
}

mod emit;
pub use emit::{EmitError, Headers, MAX_HEADER_LEN, TCP_MAX_OPTIONS_LEN, TcpOptionBytes, checksum, sum};

#[cfg(test)]
mod tests;
