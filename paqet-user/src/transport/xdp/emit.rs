//! Builds the outer headers of one frame around a relay datagram: Ethernet, IPv4 or
//! IPv6, then a TCP-shaped or a UDP header, with every checksum computed here.
//!
//! Checksums are computed in software because AF_XDP frames bypass the stack's
//! checksum offload: a veth with `tx off` (and most NICs in AF_XDP copy mode) sends
//! exactly the bytes it is given. This is the emitting twin of
//! `paqet_common::wire::parse_frame`; the tests feed one into the other.

use std::net::{IpAddr, SocketAddr};

use paqet_common::wire::{
    ETH_HEADER_LEN, IPV4_MIN_HEADER_LEN, IPV6_HEADER_LEN, TCP_MIN_HEADER_LEN, UDP_HEADER_LEN, ethertype, ipproto,
};

use crate::config::WireShape;

/// TTL / hop limit of paqet's frames: what Linux uses by default, so nothing stands out.
const HOP_LIMIT: u8 = 64;
/// IPv4 "don't fragment": paqet never sends datagrams larger than the path MTU it knows.
const IPV4_DF: u16 = 0x4000;
/// PSH|ACK: what a TCP connection in the middle of a bulk transfer sends.
pub const TCP_FLAGS_PSH_ACK: u8 = 0x18;
/// An advertised window a Linux peer commonly shows (44 × 1460-byte segments).
const TCP_WINDOW: u16 = 64240;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EmitError {
    #[error("frame buffer of {have} bytes cannot hold {need}")]
    BufferTooSmall { need: usize, have: usize },
    #[error("source {src} and destination {dst} are of different address families")]
    FamilyMismatch { src: IpAddr, dst: IpAddr },
    #[error("payload of {0} bytes does not fit one IP packet")]
    PayloadTooLarge(usize),
}

/// TCP sequence and acknowledgement numbers of one frame (ignored for UDP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpNumbers {
    pub seq: u32,
    pub ack: u32,
}

/// Everything the headers of one frame say.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub wire: WireShape,
    pub tcp: TcpNumbers,
    /// IPv4 identification field (unused for IPv6).
    pub ip_id: u16,
    pub payload: &'a [u8],
}

/// Bytes of headers in front of the payload for this address family and wire shape.
pub const fn header_len(ipv6: bool, wire: WireShape) -> usize {
    let l3 = if ipv6 { IPV6_HEADER_LEN } else { IPV4_MIN_HEADER_LEN };
    let l4 = match wire {
        WireShape::Tcp => TCP_MIN_HEADER_LEN,
        WireShape::Udp => UDP_HEADER_LEN,
    };
    ETH_HEADER_LEN + l3 + l4
}

/// Writes the whole frame (headers and payload) at the start of `buf` and returns its
/// length.
pub fn emit(buf: &mut [u8], f: &Frame<'_>) -> Result<usize, EmitError> {
    let ipv6 = match (f.src.ip(), f.dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => false,
        (IpAddr::V6(_), IpAddr::V6(_)) => true,
        (src, dst) => return Err(EmitError::FamilyMismatch { src, dst }),
    };
    let hdr = header_len(ipv6, f.wire);
    let need = hdr + f.payload.len();
    if need > buf.len() {
        return Err(EmitError::BufferTooSmall { need, have: buf.len() });
    }
    let l4_len = need - ETH_HEADER_LEN - if ipv6 { IPV6_HEADER_LEN } else { IPV4_MIN_HEADER_LEN };
    let l4_len16 = u16::try_from(l4_len).map_err(|_| EmitError::PayloadTooLarge(f.payload.len()))?;
    let buf = &mut buf[..need];

    let (eth, rest) = buf.split_at_mut(ETH_HEADER_LEN);
    eth[0..6].copy_from_slice(&f.dst_mac);
    eth[6..12].copy_from_slice(&f.src_mac);
    let ty = if ipv6 { ethertype::IPV6 } else { ethertype::IPV4 };
    eth[12..14].copy_from_slice(&ty.to_be_bytes());

    let proto = match f.wire {
        WireShape::Tcp => ipproto::TCP,
        WireShape::Udp => ipproto::UDP,
    };
    let (ip, l4) = rest.split_at_mut(if ipv6 { IPV6_HEADER_LEN } else { IPV4_MIN_HEADER_LEN });
    let pseudo = match (f.src.ip(), f.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(IPV4_MIN_HEADER_LEN + l4_len)
                .map_err(|_| EmitError::PayloadTooLarge(f.payload.len()))?;
            write_ipv4(ip, s.octets(), d.octets(), proto, total, f.ip_id);
            pseudo_v4(s.octets(), d.octets(), proto, l4_len16)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            write_ipv6(ip, s.octets(), d.octets(), proto, l4_len16);
            pseudo_v6(s.octets(), d.octets(), proto, l4_len as u32)
        }
        (src, dst) => return Err(EmitError::FamilyMismatch { src, dst }),
    };

    let (l4h, payload) = l4.split_at_mut(l4_len - f.payload.len());
    payload.copy_from_slice(f.payload);
    match f.wire {
        WireShape::Tcp => write_tcp(l4h, f.src.port(), f.dst.port(), f.tcp),
        WireShape::Udp => write_udp(l4h, f.src.port(), f.dst.port(), l4_len16),
    }
    // The checksum field is zero at this point, so summing the header as written is
    // summing it without its checksum.
    let sum = sum_words(sum_words(pseudo, l4h), payload);
    let mut csum = fold(sum);
    let csum_at = match f.wire {
        WireShape::Tcp => 16,
        WireShape::Udp => {
            // In UDP a transmitted 0 means "no checksum"; RFC 768 sends all ones instead.
            if csum == 0 {
                csum = 0xffff;
            }
            6
        }
    };
    l4h[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());
    Ok(need)
}

fn write_ipv4(h: &mut [u8], src: [u8; 4], dst: [u8; 4], proto: u8, total: u16, id: u16) {
    h[0] = 0x45;
    h[1] = 0;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6..8].copy_from_slice(&IPV4_DF.to_be_bytes());
    h[8] = HOP_LIMIT;
    h[9] = proto;
    h[10..12].copy_from_slice(&[0, 0]);
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let csum = fold(sum_words(0, h));
    h[10..12].copy_from_slice(&csum.to_be_bytes());
}

fn write_ipv6(h: &mut [u8], src: [u8; 16], dst: [u8; 16], proto: u8, payload_len: u16) {
    h[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    h[4..6].copy_from_slice(&payload_len.to_be_bytes());
    h[6] = proto;
    h[7] = HOP_LIMIT;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&dst);
}

fn write_tcp(h: &mut [u8], sport: u16, dport: u16, n: TcpNumbers) {
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&n.seq.to_be_bytes());
    h[8..12].copy_from_slice(&n.ack.to_be_bytes());
    h[12] = ((TCP_MIN_HEADER_LEN / 4) as u8) << 4;
    h[13] = TCP_FLAGS_PSH_ACK;
    h[14..16].copy_from_slice(&TCP_WINDOW.to_be_bytes());
    h[16..20].copy_from_slice(&[0, 0, 0, 0]);
}

fn write_udp(h: &mut [u8], sport: u16, dport: u16, len: u16) {
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&len.to_be_bytes());
    h[6..8].copy_from_slice(&[0, 0]);
}

fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u64 {
    let sum = sum_words(sum_words(0, &src), &dst);
    sum + u64::from(proto) + u64::from(len)
}

fn pseudo_v6(src: [u8; 16], dst: [u8; 16], proto: u8, len: u32) -> u64 {
    let sum = sum_words(sum_words(0, &src), &dst);
    sum + u64::from(len >> 16) + u64::from(len & 0xffff) + u64::from(proto)
}

/// Adds `data` to a ones'-complement accumulator as big-endian 16-bit words. Reads
/// 32-bit words for speed: 2^16 ≡ 1 modulo 2^16 − 1, so the fold gives the same sum.
/// Every call but the last must pass an even number of bytes.
pub fn sum_words(mut acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds the accumulator to 16 bits and complements it: the checksum field's value.
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use paqet_common::wire::parse_frame;

    fn frame<'a>(src: &str, dst: &str, wire: WireShape, payload: &'a [u8]) -> Frame<'a> {
        Frame {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            wire,
            tcp: TcpNumbers { seq: 0x0102_0304, ack: 0xa0b0_c0d0 },
            ip_id: 7,
            payload,
        }
    }

    /// A checksum over data that contains its own correct checksum sums to zero.
    fn verifies(pseudo: u64, l4: &[u8]) -> bool {
        fold(sum_words(pseudo, l4)) == 0
    }

    #[test]
    fn roundtrips_through_the_shared_parser() {
        let payloads: [&[u8]; 4] = [b"x", b"odd-length", &[0u8; 0], &[0xab; 1400]];
        for wire in [WireShape::Tcp, WireShape::Udp] {
            for (src, dst) in [("198.18.0.1:40000", "198.18.0.2:4000"), ("[2001:2::1]:40000", "[2001:2::2]:4000")] {
                for p in payloads {
                    let f = frame(src, dst, wire, p);
                    let mut buf = [0u8; 2048];
                    let n = emit(&mut buf, &f).unwrap();
                    let s = parse_frame(&buf[..n]).unwrap();
                    assert_eq!(s.src_mac, f.src_mac);
                    assert_eq!(s.dst_mac, f.dst_mac);
                    assert_eq!((s.src.to_ip().unwrap(), s.src_port), (f.src.ip(), f.src.port()));
                    assert_eq!((s.dst.to_ip().unwrap(), s.dst_port), (f.dst.ip(), f.dst.port()));
                    let off = s.payload_offset as usize;
                    assert_eq!(&buf[off..off + s.payload_len as usize], p);
                    let l3 = s.l3_offset as usize;
                    let l4 = s.l4_offset as usize;
                    let pseudo = match (f.src.ip(), f.dst.ip()) {
                        (IpAddr::V4(a), IpAddr::V4(b)) => {
                            assert_eq!(fold(sum_words(0, &buf[l3..l4])), 0, "IPv4 header checksum");
                            pseudo_v4(a.octets(), b.octets(), s.protocol, (n - l4) as u16)
                        }
                        (IpAddr::V6(a), IpAddr::V6(b)) => pseudo_v6(a.octets(), b.octets(), s.protocol, (n - l4) as u32),
                        _ => unreachable!(),
                    };
                    assert!(verifies(pseudo, &buf[l4..n]), "{wire} {src} L4 checksum");
                    if wire == WireShape::Tcp {
                        assert_eq!(s.tcp_flags, TCP_FLAGS_PSH_ACK);
                    }
                }
            }
        }
    }

    /// The header most checksum write-ups use as their example (DF, TTL 64, UDP):
    /// 4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7.
    #[test]
    fn ipv4_header_checksum_matches_a_known_value() {
        let mut h = [0u8; 20];
        write_ipv4(&mut h, [0xc0, 0xa8, 0x00, 0x01], [0xc0, 0xa8, 0x00, 0xc7], 17, 0x0073, 0);
        assert_eq!(fold(sum_words(0, &h)), 0);
        assert_eq!(h[10..12], [0xb8, 0x61]);
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let f = frame("198.18.0.1:1", "198.18.0.2:2", WireShape::Udp, &[0u8; 100]);
        let mut small = [0u8; 64];
        assert!(matches!(emit(&mut small, &f), Err(EmitError::BufferTooSmall { .. })));
        let f = frame("198.18.0.1:1", "[2001:2::2]:2", WireShape::Udp, b"x");
        let mut buf = [0u8; 256];
        assert!(matches!(emit(&mut buf, &f), Err(EmitError::FamilyMismatch { .. })));
    }
}
