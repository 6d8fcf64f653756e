//! Builds one frame around a relay datagram in a UMEM frame: the payload is copied to
//! its place, then `paqet_common::wire::Headers` (the emitting twin of the shared
//! parser) writes Ethernet, IPv4/IPv6 and a TCP-shaped or UDP header in front of it,
//! with every checksum computed in software: AF_XDP frames bypass the stack's
//! checksum offload, and a veth with `tx off` sends exactly the bytes it is given.
//!
//! TCP-shaped frames carry the header fields their flow ([`super::tcp_flow`]) gives
//! them: SYN, SYN-ACK and ACK with their options, then PSH|ACK with timestamps, the
//! sequence advancing with the payload and the ACK following the peer.

use std::net::{IpAddr, SocketAddr};

use paqet_common::wire::{Addr, Headers, TcpOptionBytes, ipproto};

use super::tcp_flow::{self, Segment};

use crate::config::WireShape;

pub use paqet_common::wire::EmitError;

/// TTL / hop limit of paqet's frames: what Linux uses by default, so nothing stands out.
const HOP_LIMIT: u8 = 64;
/// Everything the headers of one frame say.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub wire: WireShape,
    /// The TCP header fields (TCP-shaped wire only; `None` on the UDP wire).
    pub tcp: Option<Segment>,
    /// IPv4 identification field (unused for IPv6).
    pub ip_id: u16,
    pub payload: &'a [u8],
}

fn protocol(wire: WireShape) -> u8 {
    match wire {
        WireShape::Tcp => ipproto::TCP,
        WireShape::Udp => ipproto::UDP,
    }
}

/// The headers `f` describes (its payload aside).
pub fn headers(f: &Frame<'_>) -> Headers {
    let tcp = f.tcp.filter(|_| f.wire == WireShape::Tcp);
    Headers {
        dst_mac: f.dst_mac,
        src_mac: f.src_mac,
        src: Addr::from(f.src.ip()),
        dst: Addr::from(f.dst.ip()),
        protocol: protocol(f.wire),
        src_port: f.src.port(),
        dst_port: f.dst.port(),
        ttl: HOP_LIMIT,
        ip_id: f.ip_id,
        tcp_seq: tcp.map_or(0, |t| t.seq),
        tcp_ack: tcp.map_or(0, |t| t.ack),
        tcp_flags: tcp.map_or(0, |t| t.flags),
        tcp_window: tcp.map_or(0, |t| t.window),
        tcp_options: tcp.map_or_else(TcpOptionBytes::default, |t| t.option_bytes()),
        ..Headers::default()
    }
}

/// Bytes of headers in front of a data payload for this address family and wire shape
/// (on the TCP-shaped wire including the timestamps every data segment carries).
pub fn header_len(ipv6: bool, wire: WireShape) -> usize {
    let ip = if ipv6 {
        IpAddr::from([0u16; 8])
    } else {
        IpAddr::from([0u8; 4])
    };
    let mut h = Headers {
        src: Addr::from(ip),
        dst: Addr::from(ip),
        protocol: protocol(wire),
        ..Headers::default()
    };
    if wire == WireShape::Tcp {
        h.tcp_options.len = tcp_flow::DATA_OPTIONS_LEN as u8;
    }
    // Cannot fail: both addresses of one family, TCP or UDP, no VLAN tags.
    h.header_len().unwrap_or(usize::MAX)
}

/// Writes the whole frame (headers and payload) at the start of `buf` and returns its
/// length.
pub fn emit(buf: &mut [u8], f: &Frame<'_>) -> Result<usize, EmitError> {
    headers(f).emit(buf, f.payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use paqet_common::wire::{checksum, parse_frame, sum};

    fn frame<'a>(src: &str, dst: &str, wire: WireShape, payload: &'a [u8]) -> Frame<'a> {
        Frame {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            wire,
            tcp: Some(Segment {
                seq: 0x0102_0304,
                ack: 0xa0b0_c0d0,
                flags: tcp_flow::PSH | tcp_flow::ACK,
                window: tcp_flow::DATA_WINDOW,
                options: tcp_flow::Options::Timestamps { tsval: 5, tsecr: 6 },
            }),
            ip_id: 7,
            payload,
        }
    }

    /// A checksum over data that contains its own correct checksum comes out zero.
    fn verifies(pseudo: u32, l4: &[u8]) -> bool {
        checksum(pseudo, l4) == 0
    }

    fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
        sum(sum(0, src), dst) + u32::from(proto) + len as u32
    }

    #[test]
    fn roundtrips_through_the_shared_parser() {
        let payloads: [&[u8]; 4] = [b"x", b"odd-length", &[0u8; 0], &[0xab; 1400]];
        for wire in [WireShape::Tcp, WireShape::Udp] {
            for (src, dst) in [
                ("198.18.0.1:40000", "198.18.0.2:4000"),
                ("[2001:2::1]:40000", "[2001:2::2]:4000"),
            ] {
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
                            assert_eq!(checksum(0, &buf[l3..l4]), 0, "IPv4 header checksum");
                            pseudo(&a.octets(), &b.octets(), s.protocol, n - l4)
                        }
                        (IpAddr::V6(a), IpAddr::V6(b)) => pseudo(&a.octets(), &b.octets(), s.protocol, n - l4),
                        _ => unreachable!(),
                    };
                    assert!(verifies(pseudo, &buf[l4..n]), "{wire} {src} L4 checksum");
                    if wire == WireShape::Tcp {
                        let t = f.tcp.unwrap();
                        assert_eq!(s.tcp_flags, tcp_flow::PSH | tcp_flow::ACK);
                        assert_eq!((s.tcp_seq, s.tcp_ack), (t.seq, t.ack));
                        assert_eq!(n - s.payload_len as usize, header_len(f.dst.is_ipv6(), wire));
                    }
                }
            }
        }
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let f = frame("198.18.0.1:1", "198.18.0.2:2", WireShape::Udp, &[0u8; 100]);
        let mut small = [0u8; 64];
        assert_eq!(emit(&mut small, &f), Err(EmitError::BufferTooSmall));
        let f = frame("198.18.0.1:1", "[2001:2::2]:2", WireShape::Udp, b"x");
        let mut buf = [0u8; 256];
        assert_eq!(emit(&mut buf, &f), Err(EmitError::AddressFamily));
    }
}
