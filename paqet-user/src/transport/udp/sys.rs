//! The kernel's shapes for the UDP transport: socket addresses, message headers, the
//! two control messages of UDP segmentation offload, and the system calls that use them.

use std::io;
use std::mem::{MaybeUninit, zeroed};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ptr;

/// A socket address in the form the kernel reads and writes.
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) union RawAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl RawAddr {
    pub(super) fn zeroed() -> RawAddr {
        // SAFETY: all-zero is a valid sockaddr of either family (and of none: AF_UNSPEC).
        unsafe { zeroed() }
    }
}

pub(super) fn to_raw(addr: SocketAddr) -> (RawAddr, libc::socklen_t) {
    let mut raw = RawAddr::zeroed();
    match addr {
        SocketAddr::V4(a) => {
            raw.v4 = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            (raw, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            raw.v6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            (raw, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

pub(super) fn from_raw(raw: &RawAddr) -> Option<SocketAddr> {
    // SAFETY: the family field overlaps in both variants and the kernel filled it.
    unsafe {
        match raw.v4.sin_family as libc::c_int {
            libc::AF_INET => {
                let a = raw.v4;
                let ip = a.sin_addr.s_addr.to_ne_bytes().into();
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 => {
                let a = raw.v6;
                Some(SocketAddr::V6(SocketAddrV6::new(
                    a.sin6_addr.s6_addr.into(),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// Room for one control message carrying a `u16` or an `int`, aligned as a `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(super) struct CmsgBuf([u8; 32]);

// SAFETY: CMSG_SPACE only computes a size.
const _: () = assert!(unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) } as usize <= size_of::<CmsgBuf>());

impl CmsgBuf {
    pub(super) const ZERO: CmsgBuf = CmsgBuf([0; 32]);
}

/// One message header for `sendmmsg`/`recvmmsg`: one address, `iovlen` buffers starting at
/// `iov`, and optionally a control buffer. The pointers must stay valid until the system
/// call that reads the header has returned.
pub(super) fn message(
    name: *mut RawAddr,
    namelen: libc::socklen_t,
    iov: *mut libc::iovec,
    iovlen: usize,
    control: Option<&mut CmsgBuf>,
) -> libc::mmsghdr {
    // SAFETY: an all-zero msghdr is valid (no name, no buffers, no control).
    let mut hdr: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    hdr.msg_name = name.cast();
    hdr.msg_namelen = namelen;
    hdr.msg_iov = iov;
    hdr.msg_iovlen = iovlen as _;
    if let Some(control) = control {
        hdr.msg_control = (control as *mut CmsgBuf).cast();
        hdr.msg_controllen = size_of::<CmsgBuf>() as _;
    }
    libc::mmsghdr {
        msg_hdr: hdr,
        msg_len: 0,
    }
}

/// Makes `msg` a UDP GSO send: the kernel cuts its payload into datagrams of `size` bytes
/// (the last may be shorter). `msg` must have a control buffer from [`message`].
pub(super) fn set_segment_size(msg: &mut libc::mmsghdr, size: u16) {
    let hdr = &mut msg.msg_hdr;
    // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
    let (space, len) = unsafe { (libc::CMSG_SPACE(2), libc::CMSG_LEN(2)) };
    debug_assert!(!hdr.msg_control.is_null());
    hdr.msg_controllen = space as _;
    // SAFETY: msg_control points to a CmsgBuf (see `message`), larger than `space`, so the
    // first header is non-null and its data (two bytes) lies inside the buffer.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(hdr);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = len as _;
        ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size);
    }
}

/// The segment size of a received UDP GRO message: each datagram but the last of the
/// coalesced payload has this length. `None` when the kernel did not coalesce.
pub(super) fn gro_segment_size(msg: &libc::mmsghdr) -> Option<usize> {
    let hdr = &msg.msg_hdr;
    if hdr.msg_control.is_null() {
        return None;
    }
    // SAFETY: after recvmmsg, msg_control points to our CmsgBuf and msg_controllen says how
    // much of it the kernel filled, so the CMSG_* walk stays inside it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                let size = ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return usize::try_from(size).ok().filter(|&s| s > 0);
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    None
}

/// Sets a SOL_UDP integer option.
pub(super) fn set_udp_option(fd: i32, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_int_option(fd, libc::SOL_UDP, name, value)
}

/// Sets both socket buffers past `net.core.[rw]mem_max`, which only CAP_NET_ADMIN may.
pub(super) fn force_buffers(fd: i32, bytes: libc::c_int) -> io::Result<()> {
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)?;
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes)
}

/// Datagrams the kernel dropped for this socket, most for a full receive buffer
/// (`sk_drops`, from SO_MEMINFO).
pub(super) fn socket_drops(fd: i32) -> io::Result<u64> {
    let mut info = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes, and the kernel writes at most that.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let drops = info.get(libc::SK_MEMINFO_DROPS as usize).copied().unwrap_or(0);
    Ok(u64::from(drops))
}

fn set_int_option(fd: i32, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value is a live c_int of the length given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives up to `msgs.len()` datagrams without waiting; how many.
pub(super) fn recvmmsg(fd: i32, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    // SAFETY: every header describes buffers, addresses and control space that outlive the
    // call (the caller built them with `message` from memory it holds).
    let got = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            msgs.len() as u32,
            libc::MSG_DONTWAIT,
            ptr::null_mut(),
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(got as usize)
}

/// Sends up to `msgs.len()` messages without waiting; how many the kernel took. An error
/// means the first message failed (a later failure ends the call early instead).
pub(super) fn sendmmsg(fd: i32, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    // SAFETY: as in `recvmmsg`; the kernel only reads the payloads.
    let sent = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Waits up to `ms` for the socket to accept more data.
pub(super) fn wait_writable(fd: i32, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLOUT != 0
}
