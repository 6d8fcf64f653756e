//! The other half of the parser: writing outer headers (Ethernet, optional VLAN tags,
//! IPv4/IPv6, TCP/UDP, with checksums) in front of a payload, for transports that
//! build whole frames themselves (AF_XDP, AF_PACKET). Userspace only; the XDP program
//! never emits.
//!
//! Checksums are always computed in full: veth and many NICs would otherwise pass a
//! frame with a partial checksum that the peer's kernel or AF_XDP reader cannot check.

use super::{
    Addr, ETH_HEADER_LEN, IPV4_MIN_HEADER_LEN, IPV6_HEADER_LEN, TCP_MIN_HEADER_LEN, UDP_HEADER_LEN, VLAN_TAG_LEN,
    ethertype, ipproto,
};

/// The longest headers [`Headers::emit`] writes: Ethernet, two VLAN tags, IPv6, TCP
/// with a full 40 bytes of options.
pub const MAX_HEADER_LEN: usize =
    ETH_HEADER_LEN + 2 * VLAN_TAG_LEN + IPV6_HEADER_LEN + TCP_MIN_HEADER_LEN + TCP_MAX_OPTIONS_LEN;

/// TCP options fit in 40 bytes (data offset 15 words minus the fixed 5).
pub const TCP_MAX_OPTIONS_LEN: usize = 40;

/// TCP option bytes to put after the fixed TCP header: a multiple of 4 long (pad with
/// NOP or EOL), at most [`TCP_MAX_OPTIONS_LEN`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptionBytes {
    pub bytes: [u8; TCP_MAX_OPTIONS_LEN],
    pub len: u8,
}

impl Default for TcpOptionBytes {
    fn default() -> Self {
        TcpOptionBytes {
            bytes: [0; TCP_MAX_OPTIONS_LEN],
            len: 0,
        }
    }
}

impl TcpOptionBytes {
    /// The options as written; `None` if `len` is out of range.
    pub fn as_slice(&self) -> Option<&[u8]> {
        self.bytes.get(..self.len as usize)
    }
}

/// Everything the outer headers of one frame say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Headers {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// 0, 1 or 2 tags (802.1ad outer + 802.1Q inner when 2), VLAN IDs outermost first.
    pub vlan_count: u8,
    pub vlan_ids: [u16; 2],
    /// Both of family 4 or both of family 6.
    pub src: Addr,
    pub dst: Addr,
    /// [`ipproto::TCP`] or [`ipproto::UDP`].
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub ttl: u8,
    /// IPv4 identification (ignored for IPv6).
    pub ip_id: u16,
    /// TCP only.
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    pub tcp_flags: u8,
    pub tcp_window: u16,
    /// TCP options (SYN options, timestamps); empty for UDP.
    pub tcp_options: TcpOptionBytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmitError {
    /// The buffer cannot hold headers plus payload.
    BufferTooSmall,
    /// Source and destination are not both IPv4 or both IPv6.
    AddressFamily,
    /// Protocol other than TCP/UDP, more than two VLAN tags, or TCP options that are
    /// not a multiple of 4 bytes or longer than 40.
    Unsupported,
    /// The payload does not fit the IP (or UDP) length field.
    PayloadTooLong,
}

impl Headers {
    /// Bytes of headers in front of the payload.
    pub fn header_len(&self) -> Result<usize, EmitError> {
        if self.vlan_count > 2 {
            return Err(EmitError::Unsupported);
        }
        let l3 = match (self.src.family, self.dst.family) {
            (4, 4) => IPV4_MIN_HEADER_LEN,
            (6, 6) => IPV6_HEADER_LEN,
            _ => return Err(EmitError::AddressFamily),
        };
        let l4 = match self.protocol {
            ipproto::TCP => {
                let opts = self.tcp_options.len as usize;
                if opts > TCP_MAX_OPTIONS_LEN || !opts.is_multiple_of(4) {
                    return Err(EmitError::Unsupported);
                }
                TCP_MIN_HEADER_LEN + opts
            }
            ipproto::UDP => UDP_HEADER_LEN,
            _ => return Err(EmitError::Unsupported),
        };
        Ok(ETH_HEADER_LEN + self.vlan_count as usize * VLAN_TAG_LEN + l3 + l4)
    }

    /// Writes the frame, headers then `payload`, at the start of `buf`; returns its
    /// length.
    ///
    /// The headers are built and checksummed on the stack, and the payload summed where
    /// it comes from, so nothing is read back from `buf`: in an AF_XDP frame, reading
    /// the just-written header back waited for the frame's cache line (last touched by
    /// the kernel's copy on the other core), 70 % of this function's samples. Throughput
    /// did not move measurably: the same lines are still written.
    pub fn emit(&self, buf: &mut [u8], payload: &[u8]) -> Result<usize, EmitError> {
        let hlen = self.header_len()?;
        let total = hlen.checked_add(payload.len()).ok_or(EmitError::PayloadTooLong)?;
        let frame = buf.get_mut(..total).ok_or(EmitError::BufferTooSmall)?;
        let mut header = [0u8; MAX_HEADER_LEN];
        self.write_header(&mut header[..hlen], payload.len(), Some(payload))?;
        frame[..hlen].copy_from_slice(&header[..hlen]);
        frame[hlen..].copy_from_slice(payload);
        Ok(total)
    }

    /// Writes only the headers, at the start of `buf`, for `payload_len` bytes of
    /// payload that are sent from elsewhere; returns their length. The L4 checksum is
    /// left for the kernel or the device to finish (Linux's CHECKSUM_PARTIAL): its field
    /// holds the pseudo-header's sum, uncomplemented, and the sum of the L4 header and
    /// payload is still to be added. Given one payload longer than a segment, the kernel
    /// cuts it into segments (GSO) and fixes lengths and checksums in each.
    pub fn emit_offloaded(&self, buf: &mut [u8], payload_len: usize) -> Result<usize, EmitError> {
        let hlen = self.header_len()?;
        let frame = buf.get_mut(..hlen).ok_or(EmitError::BufferTooSmall)?;
        self.write_header(frame, payload_len, None)?;
        Ok(hlen)
    }

    /// Where the L4 header starts in a frame with these headers, and where its checksum
    /// field is within it: what the kernel needs to finish an offloaded checksum.
    pub fn l4_checksum_at(&self) -> Result<(usize, usize), EmitError> {
        let l4 = ETH_HEADER_LEN + self.vlan_count as usize * VLAN_TAG_LEN + self.l3_len();
        match self.protocol {
            ipproto::TCP => Ok((l4, 16)),
            ipproto::UDP => Ok((l4, 6)),
            _ => Err(EmitError::Unsupported),
        }
    }

    /// The headers in `frame` (exactly `header_len` bytes) for a payload of
    /// `payload_len` bytes: with its bytes, a complete L4 checksum; without, the
    /// pseudo-header's sum only (see [`Headers::emit_offloaded`]).
    fn write_header(&self, frame: &mut [u8], payload_len: usize, payload: Option<&[u8]>) -> Result<(), EmitError> {
        let hlen = frame.len();

        // Ethernet and VLAN tags.
        frame[0..6].copy_from_slice(&self.dst_mac);
        frame[6..12].copy_from_slice(&self.src_mac);
        let mut off = 12;
        for i in 0..self.vlan_count as usize {
            let tpid = if i == 0 && self.vlan_count == 2 {
                ethertype::QINQ
            } else {
                ethertype::VLAN
            };
            frame[off..off + 2].copy_from_slice(&tpid.to_be_bytes());
            frame[off + 2..off + 4].copy_from_slice(&(self.vlan_ids[i] & 0x0fff).to_be_bytes());
            off += VLAN_TAG_LEN;
        }
        let ty = if self.src.family == 4 {
            ethertype::IPV4
        } else {
            ethertype::IPV6
        };
        frame[off..off + 2].copy_from_slice(&ty.to_be_bytes());
        let l3 = off + 2;

        // IP header; the L4 checksum's pseudo-header sum comes from it.
        let l4_len = hlen - l3 - self.l3_len() + payload_len;
        let l4 = l3 + self.l3_len();
        let pseudo = if self.src.family == 4 {
            let total_len = u16::try_from(self.l3_len() + l4_len).map_err(|_| EmitError::PayloadTooLong)?;
            let h = &mut frame[l3..l4];
            h[0] = 0x45;
            h[1] = 0;
            h[2..4].copy_from_slice(&total_len.to_be_bytes());
            h[4..6].copy_from_slice(&self.ip_id.to_be_bytes());
            h[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF: paqet never fragments
            h[8] = self.ttl;
            h[9] = self.protocol;
            h[10..12].copy_from_slice(&[0, 0]);
            h[12..16].copy_from_slice(&self.src.octets[..4]);
            h[16..20].copy_from_slice(&self.dst.octets[..4]);
            let c = checksum(0, h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            let s = sum(0, &self.src.octets[..4]);
            let s = sum(s, &self.dst.octets[..4]);
            s + self.protocol as u32 + l4_len as u32
        } else {
            let plen = u16::try_from(l4_len).map_err(|_| EmitError::PayloadTooLong)?;
            let h = &mut frame[l3..l4];
            h[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
            h[4..6].copy_from_slice(&plen.to_be_bytes());
            h[6] = self.protocol;
            h[7] = self.ttl;
            h[8..24].copy_from_slice(&self.src.octets);
            h[24..40].copy_from_slice(&self.dst.octets);
            let s = sum(0, &self.src.octets);
            let s = sum(s, &self.dst.octets);
            s + self.protocol as u32 + l4_len as u32
        };

        // TCP/UDP header, then the checksum over pseudo-header, header and payload.
        let seg = &mut frame[l4..];
        seg[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        seg[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        let csum_at = if self.protocol == ipproto::UDP {
            let len = u16::try_from(l4_len).map_err(|_| EmitError::PayloadTooLong)?;
            seg[4..6].copy_from_slice(&len.to_be_bytes());
            seg[6..8].copy_from_slice(&[0, 0]);
            6
        } else {
            seg[4..8].copy_from_slice(&self.tcp_seq.to_be_bytes());
            seg[8..12].copy_from_slice(&self.tcp_ack.to_be_bytes());
            let opts = self.tcp_options.as_slice().ok_or(EmitError::Unsupported)?;
            seg[12] = (((TCP_MIN_HEADER_LEN + opts.len()) / 4) as u8) << 4;
            seg[13] = self.tcp_flags;
            seg[14..16].copy_from_slice(&self.tcp_window.to_be_bytes());
            seg[16..20].copy_from_slice(&[0, 0, 0, 0]);
            seg[TCP_MIN_HEADER_LEN..TCP_MIN_HEADER_LEN + opts.len()].copy_from_slice(opts);
            16
        };
        let Some(payload) = payload else {
            let partial = fold(pseudo as u64);
            seg[csum_at..csum_at + 2].copy_from_slice(&partial.to_be_bytes());
            return Ok(());
        };
        // The L4 header's length is even, so the payload's words line up as in the frame.
        let mut c = checksum(sum(pseudo, payload), seg);
        // In UDP, 0 means "no checksum"; a computed 0 is sent as all ones.
        if c == 0 && self.protocol == ipproto::UDP {
            c = 0xffff;
        }
        seg[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        Ok(())
    }

    fn l3_len(&self) -> usize {
        if self.src.family == 4 {
            IPV4_MIN_HEADER_LEN
        } else {
            IPV6_HEADER_LEN
        }
    }
}

/// One's-complement sum of big-endian 16-bit words (odd tail padded with zero) with
/// `acc` added, folded to 16 bits but not complemented.
///
/// Summed 8 bytes at a time in native byte order and swapped once at the end (RFC 1071
/// §2: the sum is independent of byte order), which the compiler vectorises: it runs
/// over every payload paqet sends, and word by word it was a tenth of the sender's CPU.
pub fn sum(acc: u32, data: &[u8]) -> u32 {
    let mut native = 0u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let w = u64::from_ne_bytes(b);
        // Two 32-bit halves: the sum cannot overflow for any frame.
        native += (w & 0xffff_ffff) + (w >> 32);
    }
    let mut pairs = words.remainder().chunks_exact(2);
    for p in &mut pairs {
        native += u16::from_ne_bytes([p[0], p[1]]) as u64;
    }
    if let [last] = pairs.remainder() {
        native += u16::from_ne_bytes([*last, 0]) as u64;
    }
    let big_endian = u16::from_be_bytes(fold(native).to_ne_bytes());
    fold(acc as u64 + big_endian as u64) as u32
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum (RFC 1071) of `data` with `acc` (a partial [`sum`]) folded in.
/// Over data that contains a correct checksum it yields 0.
pub fn checksum(acc: u32, data: &[u8]) -> u16 {
    !fold(sum(acc, data) as u64)
}
