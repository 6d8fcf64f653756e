//! Sending through the kernel's segmentation path: runs of equal-sized datagrams to one
//! peer leave as one super-frame, written to an AF_PACKET socket with a
//! `virtio_net_hdr` in front (`PACKET_VNET_HDR`), and the kernel (or the NIC, with TSO)
//! cuts it into frames at the device: one traversal of the stack per ~64 KiB, as UDP
//! GSO gets. AF_XDP copy mode instead builds and transmits one skb per frame.
//!
//! Measured raw on the bench's veth (`paqet-bench --only ceilings`): AF_XDP frames
//! 708 MB/s at 3.06 CPU s/GiB, these super-frames into the same AF_XDP receiver
//! 1,097 MB/s at 1.39. One stream through paqet xdp went from ~375 MB/s at ~4.9 CPU
//! s/GiB to ~445 at ~3.5 (BENCHMARKS.md). The receiving side stays AF_XDP.
//!
//! The frames go out below IP, as AF_XDP's do: no route lookup, no netfilter, no socket
//! of the kernel's TCP stack; only the device's queueing discipline, which AF_XDP
//! bypassed. Payloads are gathered from where the engine sealed them (`sendmsg` with
//! one iovec each), so userspace copies nothing. `PACKET_QDISC_BYPASS` is not used: its
//! direct transmit drops every frame that needs segmenting.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use paqet_common::wire::{EmitError, Headers, ipproto};

/// `struct virtio_net_hdr` (linux/virtio_net.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct VnetHeader {
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

const VNET_HEADER_LEN: usize = std::mem::size_of::<VnetHeader>();
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;

/// Largest super-frame the kernel takes: an IPv4 total length (or IPv6 payload
/// length) is 16 bits.
pub const MAX_SUPER_PAYLOAD: usize = 65_535 - 128;
/// Most datagrams one super-frame carries (an iovec each).
pub const MAX_SEGMENTS: usize = 64;
/// Send buffer asked for: the skbs of a few super-frames in flight on a NIC's queue.
const SEND_BUFFER: libc::c_int = 4 << 20;
/// Room for the virtio header and the largest headers.
const PREFIX_LEN: usize = VNET_HEADER_LEN + paqet_common::wire::MAX_HEADER_LEN;

#[derive(Debug, thiserror::Error)]
pub enum GsoError {
    #[error("opening an AF_PACKET socket for sending")]
    Open(#[source] io::Error),
    #[error("setting {what} on the AF_PACKET socket")]
    Option {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Why a super-frame did not leave.
#[derive(Debug)]
pub enum SendError {
    /// The device or the socket's buffer is full: dropped, KCP resends.
    Full,
    /// The headers could not be built, or the kernel refused the frame.
    Invalid(String),
}

/// An AF_PACKET socket that sends on one interface. It is never bound to a protocol,
/// so it receives nothing: each frame names its device and EtherType itself.
pub struct PacketTx {
    fd: OwnedFd,
    ifindex: u32,
}

impl PacketTx {
    pub fn open(ifindex: u32) -> Result<PacketTx, GsoError> {
        // SAFETY: a plain socket call; the descriptor is owned at once.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(GsoError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor we just opened and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_option(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1, "PACKET_VNET_HDR")?;
        // CAP_NET_ADMIN (which the xdp transport has) may exceed net.core.wmem_max; the
        // plain option is capped by it, which only means fewer frames in flight.
        if set_option(
            &fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            SEND_BUFFER,
            "SO_SNDBUFFORCE",
        )
        .is_err()
        {
            let _ = set_option(&fd, libc::SOL_SOCKET, libc::SO_SNDBUF, SEND_BUFFER, "SO_SNDBUF");
        }
        Ok(PacketTx { fd, ifindex })
    }

    /// Sends `payloads` behind `headers` as one frame, or as one super-frame the kernel
    /// segments when there are several: then every payload but the last must have the
    /// first's length, and `headers` are the first frame's (the kernel advances the TCP
    /// sequence number and the IPv4 identification from segment to segment).
    pub fn send(&self, headers: &Headers, payloads: &[&[u8]]) -> Result<(), SendError> {
        if payloads.len() > MAX_SEGMENTS {
            return Err(SendError::Invalid(format!(
                "{} payloads in one super-frame, at most {MAX_SEGMENTS}",
                payloads.len()
            )));
        }
        let total: usize = payloads.iter().map(|p| p.len()).sum();
        let mut prefix = [0u8; PREFIX_LEN];
        let header_len = headers
            .emit_offloaded(&mut prefix[VNET_HEADER_LEN..], total)
            .map_err(invalid)?;
        let vnet = vnet_header(headers, header_len, payloads).map_err(invalid)?;
        prefix[..VNET_HEADER_LEN].copy_from_slice(&vnet.to_bytes());
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_SEGMENTS + 1];
        let count = payloads.len();
        iov[0] = libc::iovec {
            iov_base: prefix.as_mut_ptr().cast(),
            iov_len: VNET_HEADER_LEN + header_len,
        };
        for (slot, p) in iov[1..].iter_mut().zip(payloads) {
            *slot = libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            };
        }
        let ethertype = if headers.src.family == 4 {
            libc::ETH_P_IP
        } else {
            libc::ETH_P_IPV6
        };
        // SAFETY: all-zero sockaddr_ll is valid; the fields set name device and EtherType.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = (ethertype as u16).to_be();
        to.sll_ifindex = self.ifindex as i32;
        // SAFETY: an all-zero msghdr is valid; it points at `to` and `iov`, which
        // outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut to as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = count + 1;
        // SAFETY: `msg` and everything it points at are valid for the call; the kernel
        // only reads the buffers.
        let rc = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::ENOBUFS | libc::EBUSY) => Err(SendError::Full),
            _ => Err(SendError::Invalid(e.to_string())),
        }
    }
}

fn invalid(e: EmitError) -> SendError {
    SendError::Invalid(format!("{e:?}"))
}

fn set_option(
    fd: &OwnedFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
    what: &'static str,
) -> Result<(), GsoError> {
    // SAFETY: a pointer to an int of the length given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(GsoError::Option {
            what,
            source: io::Error::last_os_error(),
        })
    }
}

impl VnetHeader {
    fn to_bytes(self) -> [u8; VNET_HEADER_LEN] {
        // The host's byte order: packet sockets read the legacy virtio header, which is
        // native-endian.
        let mut b = [0u8; VNET_HEADER_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// The checksum is always left to the kernel; segmentation is asked for only when
/// there is more than one payload.
fn vnet_header(headers: &Headers, header_len: usize, payloads: &[&[u8]]) -> Result<VnetHeader, EmitError> {
    let (csum_start, csum_offset) = headers.l4_checksum_at()?;
    let gso_type = match (payloads.len() > 1, headers.protocol, headers.src.family) {
        (false, _, _) => VIRTIO_NET_HDR_GSO_NONE,
        (true, ipproto::UDP, _) => VIRTIO_NET_HDR_GSO_UDP_L4,
        (true, _, 4) => VIRTIO_NET_HDR_GSO_TCPV4,
        (true, _, _) => VIRTIO_NET_HDR_GSO_TCPV6,
    };
    let gso_size = if gso_type == VIRTIO_NET_HDR_GSO_NONE {
        0
    } else {
        payloads.first().map_or(0, |p| p.len())
    };
    Ok(VnetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type,
        hdr_len: header_len as u16,
        gso_size: gso_size as u16,
        csum_start: csum_start as u16,
        csum_offset: csum_offset as u16,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use paqet_common::wire::Addr;

    fn headers(protocol: u8, v6: bool) -> Headers {
        let (src, dst) = if v6 {
            (
                Addr::v6([0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
                Addr::v6([0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]),
            )
        } else {
            (Addr::v4([198, 18, 0, 1]), Addr::v4([198, 18, 0, 2]))
        };
        Headers {
            src,
            dst,
            protocol,
            ..Headers::default()
        }
    }

    #[test]
    fn one_payload_asks_only_for_the_checksum() {
        let h = headers(ipproto::TCP, false);
        let v = vnet_header(&h, 54, &[&[0u8; 1400]]).unwrap();
        assert_eq!(
            (v.gso_type, v.gso_size, v.flags),
            (VIRTIO_NET_HDR_GSO_NONE, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM)
        );
        assert_eq!((v.csum_start, v.csum_offset), (34, 16));
    }

    #[test]
    fn several_payloads_are_segmented_by_the_first_ones_size() {
        let p = [0u8; 1400];
        let last = [0u8; 100];
        for (protocol, v6, gso, start, offset) in [
            (ipproto::TCP, false, VIRTIO_NET_HDR_GSO_TCPV4, 34, 16),
            (ipproto::TCP, true, VIRTIO_NET_HDR_GSO_TCPV6, 54, 16),
            (ipproto::UDP, false, VIRTIO_NET_HDR_GSO_UDP_L4, 34, 6),
            (ipproto::UDP, true, VIRTIO_NET_HDR_GSO_UDP_L4, 54, 6),
        ] {
            let v = vnet_header(&headers(protocol, v6), 66, &[&p, &p, &last]).unwrap();
            assert_eq!((v.gso_type, v.gso_size, v.hdr_len), (gso, 1400, 66));
            assert_eq!((v.csum_start, v.csum_offset), (start, offset));
        }
    }

    #[test]
    fn the_wire_layout_is_the_kernels() {
        let v = VnetHeader {
            flags: 1,
            gso_type: 5,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
        };
        assert_eq!(VNET_HEADER_LEN, 10);
        let b = v.to_bytes();
        assert_eq!(b[..2], [1, 5]);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 0x0304);
        assert_eq!(u16::from_ne_bytes([b[8], b[9]]), 0x0708);
    }
}
