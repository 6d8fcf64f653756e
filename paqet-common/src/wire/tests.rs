use super::*;
use std::vec::Vec;

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const SERVER: [u8; 4] = [198, 18, 0, 2];

/// Builds test frames by hand, independently of any emit code, so a parser bug cannot
/// hide behind a matching builder bug.
fn eth(vlans: &[u16], ty: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    for (i, v) in vlans.iter().enumerate() {
        let tpid = if i == 0 && vlans.len() == 2 {
            ethertype::QINQ
        } else {
            ethertype::VLAN
        };
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(0x2000 | v).to_be_bytes());
    }
    f.extend_from_slice(&ty.to_be_bytes());
    f
}

fn ipv4(proto: u8, options: usize, l4: &[u8]) -> Vec<u8> {
    let ihl = 20 + options;
    let total = (ihl + l4.len()) as u16;
    let mut h = vec![0x40 | (ihl / 4) as u8, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&CLIENT);
    h.extend_from_slice(&SERVER);
    h.extend(std::iter::repeat_n(1u8, options)); // NOP options
    h.extend_from_slice(l4);
    h
}

fn ipv6(next: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 63]);
    h.extend_from_slice(&[0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend_from_slice(&[0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    h.extend_from_slice(l4);
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

fn tcp(sport: u16, dport: u16, flags: u8, options: usize, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    h.push((((20 + options) / 4) as u8) << 4);
    h.push(flags);
    h.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    h.extend(std::iter::repeat_n(1u8, options));
    h.extend_from_slice(payload);
    h
}

fn frame(l2: Vec<u8>, l3: Vec<u8>) -> Vec<u8> {
    let mut f = l2;
    f.extend_from_slice(&l3);
    f
}

fn udp4(vlans: &[u16]) -> Vec<u8> {
    frame(
        eth(vlans, ethertype::IPV4),
        ipv4(ipproto::UDP, 0, &udp(5000, 4000, b"hello")),
    )
}

#[test]
fn ipv4_udp() {
    let f = udp4(&[]);
    let s = parse_frame(&f[..]).unwrap();
    assert_eq!(s.ether_type, ethertype::IPV4);
    assert_eq!(s.protocol, ipproto::UDP);
    assert_eq!(s.src, Addr::v4(CLIENT));
    assert_eq!(s.dst, Addr::v4(SERVER));
    assert_eq!((s.src_port, s.dst_port), (5000, 4000));
    assert_eq!(
        (s.l3_offset, s.l4_offset, s.payload_offset, s.payload_len),
        (14, 34, 42, 5)
    );
    assert_eq!(&f[42..47], b"hello");
    assert_eq!(s.vlan_count, 0);
    assert_eq!(s.ttl, 64);
    assert_eq!(s.src_mac, [2, 0, 0, 0, 0, 1]);
}

#[test]
fn ipv4_options_and_tcp_options_are_honoured() {
    let f = frame(
        eth(&[], ethertype::IPV4),
        ipv4(ipproto::TCP, 8, &tcp(443, 4000, 0x02, 12, b"xy")),
    );
    let s = parse_frame(&f[..]).unwrap();
    assert_eq!(s.protocol, ipproto::TCP);
    assert_eq!(s.l4_offset, 14 + 28);
    assert_eq!(s.payload_offset, 14 + 28 + 32);
    assert_eq!(s.payload_len, 2);
    assert_eq!(s.tcp_flags, 0x02);
    assert_eq!((s.src_port, s.dst_port), (443, 4000));
}

#[test]
fn ethernet_padding_is_not_payload() {
    let mut f = udp4(&[]);
    f.resize(60, 0xee); // what a minimum-size Ethernet frame carries
    let s = parse_frame(&f[..]).unwrap();
    assert_eq!(s.payload_len, 5);
}

#[test]
fn vlan_one_and_two_tags() {
    let s = parse_frame(&udp4(&[42])[..]).unwrap();
    assert_eq!((s.vlan_count, s.vlan_ids), (1, [42, 0]));
    assert_eq!(s.l3_offset, 18);
    assert_eq!(s.dst_port, 4000);
    let s = parse_frame(&udp4(&[7, 300])[..]).unwrap();
    assert_eq!((s.vlan_count, s.vlan_ids), (2, [7, 300]));
    assert_eq!(s.l3_offset, 22);
    assert_eq!(s.payload_offset, 22 + 28);
    assert_eq!(parse_frame(&udp4(&[1, 2, 3])[..]), Err(ParseError::Unsupported));
}

#[test]
fn ipv6_tcp_and_udp() {
    let f = frame(
        eth(&[], ethertype::IPV6),
        ipv6(ipproto::TCP, &tcp(1, 4000, 0x10, 0, b"abc")),
    );
    let s = parse_frame(&f[..]).unwrap();
    assert_eq!(s.ether_type, ethertype::IPV6);
    assert_eq!(s.src.family, 6);
    assert_eq!(s.src.octets[15], 1);
    assert_eq!(s.dst.octets[15], 2);
    assert_eq!((s.l4_offset, s.payload_offset, s.payload_len), (54, 74, 3));
    assert_eq!(s.ttl, 63);
    let f = frame(eth(&[9], ethertype::IPV6), ipv6(ipproto::UDP, &udp(1, 2, b"")));
    let s = parse_frame(&f[..]).unwrap();
    assert_eq!((s.dst_port, s.payload_len), (2, 0));
}

#[test]
fn not_paqet_is_unsupported() {
    let arp = frame(eth(&[], ethertype::ARP), vec![0; 28]);
    assert_eq!(parse_frame(&arp[..]), Err(ParseError::Unsupported));
    let icmp = frame(eth(&[], ethertype::IPV4), ipv4(1, 0, &[8, 0, 0, 0, 0, 0, 0, 0]));
    assert_eq!(parse_frame(&icmp[..]), Err(ParseError::Unsupported));
    let nd = frame(
        eth(&[], ethertype::IPV6),
        ipv6(ipproto::ICMPV6, &[135, 0, 0, 0, 0, 0, 0, 0]),
    );
    assert_eq!(parse_frame(&nd[..]), Err(ParseError::Unsupported));
    // Hop-by-hop extension header in front of UDP.
    let ext = frame(eth(&[], ethertype::IPV6), ipv6(0, &[17, 0, 0, 0, 0, 0, 0, 0]));
    assert_eq!(parse_frame(&ext[..]), Err(ParseError::Unsupported));
    for frag in [[0x20u8, 0x00], [0x00, 0x10], [0x20, 0x10]] {
        let mut f = udp4(&[]);
        f[14 + 6] = frag[0];
        f[14 + 7] = frag[1];
        assert_eq!(parse_frame(&f[..]), Err(ParseError::Unsupported), "{frag:?}");
    }
}

#[test]
fn truncated_at_every_length() {
    let frames = [
        udp4(&[]),
        udp4(&[5]),
        udp4(&[5, 6]),
        frame(
            eth(&[], ethertype::IPV4),
            ipv4(ipproto::TCP, 4, &tcp(1, 2, 0x12, 4, b"zz")),
        ),
        frame(eth(&[], ethertype::IPV6), ipv6(ipproto::UDP, &udp(1, 2, b"q"))),
        frame(eth(&[], ethertype::IPV6), ipv6(ipproto::TCP, &tcp(1, 2, 0x02, 0, b""))),
    ];
    for f in &frames {
        assert!(parse_frame(&f[..]).is_ok());
        for n in 0..f.len() {
            assert_eq!(
                parse_frame(&f[..n]),
                Err(ParseError::Truncated),
                "len {n} of {}",
                f.len()
            );
        }
    }
}

#[test]
fn corrupt_lengths_are_malformed() {
    let base = udp4(&[]);
    let ip = 14;
    let cases: &[(&str, usize, &[u8])] = &[
        ("version 5", ip, &[0x55]),
        ("ihl 4", ip, &[0x44]),
        ("total < ihl", ip + 2, &[0, 19]),
        ("total < ihl + udp", ip + 2, &[0, 24]),
        ("udp len < 8", ip + 20 + 4, &[0, 7]),
        ("udp len > ip payload", ip + 20 + 4, &[0, 14]),
    ];
    for (what, at, bytes) in cases {
        let mut f = base.clone();
        f[*at..*at + bytes.len()].copy_from_slice(bytes);
        assert_eq!(parse_frame(&f[..]), Err(ParseError::Malformed), "{what}");
    }
    // IP total length beyond the frame: the frame is what is short.
    let mut f = base.clone();
    f[ip + 2..ip + 4].copy_from_slice(&200u16.to_be_bytes());
    assert_eq!(parse_frame(&f[..]), Err(ParseError::Truncated));
    // IHL pointing past the whole packet.
    let mut f = base.clone();
    f[ip] = 0x4f;
    assert_eq!(parse_frame(&f[..]), Err(ParseError::Malformed));

    let t = frame(
        eth(&[], ethertype::IPV4),
        ipv4(ipproto::TCP, 0, &tcp(1, 2, 0x02, 0, b"")),
    );
    for (doff, want) in [(0x40u8, ParseError::Malformed), (0x60, ParseError::Malformed)] {
        let mut f = t.clone();
        f[14 + 20 + 12] = doff;
        assert_eq!(parse_frame(&f[..]), Err(want), "doff {doff:#x}");
    }
    let mut f = frame(eth(&[], ethertype::IPV6), ipv6(ipproto::UDP, &udp(1, 2, b"")));
    f[14] = 0x40;
    assert_eq!(parse_frame(&f[..]), Err(ParseError::Malformed));
    let mut f = frame(eth(&[], ethertype::IPV6), ipv6(ipproto::UDP, &udp(1, 2, b"")));
    f[14 + 4..14 + 6].copy_from_slice(&4u16.to_be_bytes());
    assert_eq!(parse_frame(&f[..]), Err(ParseError::Malformed));
}

#[test]
fn slice_bytes_is_bounds_checked() {
    let b = [1u8, 2, 3];
    assert_eq!(b[..].load::<2>(1), Some([2, 3]));
    assert_eq!(b[..].load::<2>(2), None);
    assert_eq!(b[..].load::<1>(usize::MAX), None);
}

mod emit {
    use super::*;

    fn headers(v6: bool, proto: u8, vlans: u8) -> Headers {
        let (src, dst) = if v6 {
            (
                Addr::v6([0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
                Addr::v6([0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]),
            )
        } else {
            (Addr::v4(CLIENT), Addr::v4(SERVER))
        };
        Headers {
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_mac: [2, 0, 0, 0, 0, 1],
            vlan_count: vlans,
            vlan_ids: [10, 20],
            src,
            dst,
            protocol: proto,
            src_port: 40000,
            dst_port: 4000,
            ttl: 64,
            ip_id: 7,
            tcp_seq: 0xdead_beef,
            tcp_ack: 0x0102_0304,
            tcp_flags: 0x18,
            tcp_window: 512,
            tcp_options: TcpOptionBytes::default(),
        }
    }

    fn build(h: &Headers, payload: &[u8]) -> Vec<u8> {
        let hl = h.header_len().unwrap();
        let mut buf = vec![0u8; hl + payload.len() + 16];
        let n = h.emit(&mut buf, payload).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn parse_of_emit_is_identity() {
        for v6 in [false, true] {
            for proto in [ipproto::UDP, ipproto::TCP] {
                for vlans in 0..=2u8 {
                    for payload in [&b""[..], b"x", b"sealed payload bytes"] {
                        let h = headers(v6, proto, vlans);
                        let f = build(&h, payload);
                        let s = parse_frame(&f[..]).unwrap();
                        let what = format!("v6 {v6} proto {proto} vlans {vlans} len {}", payload.len());
                        assert_eq!((s.src, s.dst), (h.src, h.dst), "{what}");
                        assert_eq!((s.src_port, s.dst_port, s.protocol, s.ttl), (40000, 4000, proto, 64));
                        assert_eq!((s.dst_mac, s.src_mac), (h.dst_mac, h.src_mac));
                        assert_eq!(s.vlan_count, vlans);
                        assert_eq!(s.vlan_ids[..vlans as usize], h.vlan_ids[..vlans as usize]);
                        assert_eq!(s.payload_len as usize, payload.len(), "{what}");
                        let p = s.payload_offset as usize;
                        assert_eq!(&f[p..p + payload.len()], payload);
                        if proto == ipproto::TCP {
                            assert_eq!(
                                (s.tcp_seq, s.tcp_ack, s.tcp_flags, s.tcp_window),
                                (0xdead_beef, 0x0102_0304, 0x18, 512)
                            );
                        }
                        // Checksums verify: the IPv4 header and the L4 segment with its
                        // pseudo-header both sum to zero.
                        let l3 = s.l3_offset as usize;
                        let l4 = s.l4_offset as usize;
                        let pseudo = if v6 {
                            sum(sum(0, &f[l3 + 8..l3 + 40]), &[])
                        } else {
                            assert_eq!(checksum(0, &f[l3..l4]), 0, "{what}");
                            sum(0, &f[l3 + 12..l3 + 20])
                        };
                        let seg = &f[l4..];
                        let pseudo = pseudo + proto as u32 + seg.len() as u32;
                        assert_eq!(checksum(pseudo, seg), 0, "{what}");
                    }
                }
            }
        }
    }

    /// Headers emitted for an offloaded checksum, finished the way the kernel finishes
    /// CHECKSUM_PARTIAL (sum from the L4 header to the end, complement into the field),
    /// are exactly the headers `emit` computes in full.
    #[test]
    fn offloaded_checksum_finishes_to_the_full_one() {
        for v6 in [false, true] {
            for proto in [ipproto::UDP, ipproto::TCP] {
                for payload in [&b""[..], b"x", b"sealed payload bytes", &[0xffu8; 1400][..]] {
                    let h = headers(v6, proto, 1);
                    let full = build(&h, payload);
                    let mut partial = vec![0u8; full.len()];
                    let hl = h.emit_offloaded(&mut partial, payload.len()).unwrap();
                    partial[hl..].copy_from_slice(payload);
                    let (l4, at) = h.l4_checksum_at().unwrap();
                    let mut c = checksum(0, &partial[l4..]);
                    if c == 0 && proto == ipproto::UDP {
                        c = 0xffff;
                    }
                    partial[l4 + at..l4 + at + 2].copy_from_slice(&c.to_be_bytes());
                    assert_eq!(partial, full, "v6 {v6} proto {proto} len {}", payload.len());
                }
            }
        }
        let h = headers(false, ipproto::UDP, 0);
        assert_eq!(h.emit_offloaded(&mut [0u8; 20], 10), Err(EmitError::BufferTooSmall));
        assert_eq!(h.emit_offloaded(&mut [0u8; 64], 65_530), Err(EmitError::PayloadTooLong));
    }

    /// RFC 1071's definition, word by word: what the wide `sum` must equal.
    fn reference_sum(acc: u32, data: &[u8]) -> u32 {
        let mut acc = acc as u64;
        for pair in data.chunks(2) {
            acc += (pair[0] as u64) << 8 | pair.get(1).copied().unwrap_or(0) as u64;
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u32
    }

    #[test]
    fn wide_sum_matches_rfc1071_for_every_length_and_offset() {
        // Bytes chosen to carry often (many 0xff) but not uniformly.
        let data: Vec<u8> = (0..1500u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80)
            .collect();
        for start in 0..9 {
            for len in (0..80).chain([1399, 1400, 1401, 1472]) {
                let slice = &data[start..start + len];
                for acc in [0, 1, 0xfffe, 0x1_2345] {
                    assert_eq!(
                        sum(acc, slice),
                        reference_sum(acc, slice),
                        "start {start} len {len} acc {acc:#x}"
                    );
                }
            }
        }
        assert_eq!(sum(0, &[0xff; 1400]), 0xffff);
    }

    #[test]
    fn known_ipv4_header_checksum() {
        // The RFC 1071 / Wikipedia example header.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(checksum(0, &h), 0xb861);
    }

    #[test]
    fn emit_errors() {
        let mut h = headers(false, ipproto::UDP, 0);
        let mut small = [0u8; 20];
        assert_eq!(h.emit(&mut small, &[]), Err(EmitError::BufferTooSmall));
        let mut big = vec![0u8; 70_000];
        assert_eq!(h.emit(&mut big, &[0; 65_530]), Err(EmitError::PayloadTooLong));
        h.dst = Addr::v6([0; 16]);
        assert_eq!(h.header_len(), Err(EmitError::AddressFamily));
        let mut h = headers(false, 1, 0);
        assert_eq!(h.header_len(), Err(EmitError::Unsupported));
        h.protocol = ipproto::TCP;
        h.vlan_count = 3;
        assert_eq!(h.header_len(), Err(EmitError::Unsupported));
    }

    /// A SYN's usual options (Linux's order), emitted, parsed back by both parsers.
    #[test]
    fn tcp_options_roundtrip() {
        let syn_opts = [2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 7, 0, 0, 0, 0, 1, 3, 3, 9];
        for v6 in [false, true] {
            let mut h = headers(v6, ipproto::TCP, 0);
            h.tcp_options.bytes[..syn_opts.len()].copy_from_slice(&syn_opts);
            h.tcp_options.len = syn_opts.len() as u8;
            let f = build(&h, b"");
            let s = parse_frame(&f[..]).unwrap();
            assert_eq!(s.payload_len, 0);
            assert_eq!(s.payload_offset - s.l4_offset, 40);
            let opts = &f[s.l4_offset as usize + 20..s.payload_offset as usize];
            let o = parse_tcp_options(opts).unwrap();
            assert_eq!(o.mss, Some(1460));
            assert_eq!(o.window_scale, Some(9));
            assert!(o.sack_permitted);
            assert_eq!(o.timestamps, Some((7, 0)));
            // The checksum covers the options.
            let l4 = s.l4_offset as usize;
            let pseudo = if v6 {
                sum(sum(0, &h.src.octets), &h.dst.octets) + 6 + (f.len() - l4) as u32
            } else {
                sum(sum(0, &h.src.octets[..4]), &h.dst.octets[..4]) + 6 + (f.len() - l4) as u32
            };
            assert_eq!(checksum(pseudo, &f[l4..]), 0);
        }
        let mut h = headers(false, ipproto::TCP, 0);
        h.tcp_options.len = 6;
        assert_eq!(h.header_len(), Err(EmitError::Unsupported));
        h.tcp_options.len = 44;
        assert_eq!(h.header_len(), Err(EmitError::Unsupported));
    }

    #[test]
    fn tcp_options_truncated_or_corrupt() {
        let good = [1u8, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        assert_eq!(parse_tcp_options(&good).unwrap().timestamps, Some((1, 2)));
        // Every truncation of a timestamps option is malformed, never a panic.
        for cut in 3..good.len() {
            assert_eq!(parse_tcp_options(&good[..cut]), Err(ParseError::Malformed), "cut {cut}");
        }
        // Wrong lengths for known kinds; length 0 and 1 (would loop forever if trusted).
        for bad in [
            &[2u8, 3, 5][..],
            &[3, 4, 1, 1],
            &[4, 3, 0],
            &[8, 9, 0, 0, 0, 0, 0, 0, 0],
            &[9, 0],
            &[9, 1],
            &[2],
        ] {
            assert_eq!(parse_tcp_options(bad), Err(ParseError::Malformed), "{bad:?}");
        }
        // Unknown options are skipped; EOL ends the list; empty is fine.
        let o = parse_tcp_options(&[30, 4, 0xaa, 0xbb, 3, 3, 7, 0, 0xff]).unwrap();
        assert_eq!(o.window_scale, Some(7));
        assert_eq!(parse_tcp_options(&[]).unwrap(), TcpOptions::default());
        // Arbitrary bytes never panic.
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut b = [0u8; 40];
            for v in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *v = (x % 12) as u8;
            }
            let _ = parse_tcp_options(&b[..(x % 41) as usize]);
        }
    }
}
