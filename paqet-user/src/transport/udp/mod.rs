//! The unprivileged transport: one UDP socket, batched with `recvmmsg`/`sendmmsg` so a
//! batch of datagrams costs one system call each way.

use std::future::Future;
use std::io;
use std::mem::{MaybeUninit, zeroed};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::{RecvBatch, Transport};
use crate::engine::Transmit;

/// Keeps every datagram under the smallest common path MTU (IPv6 1280 would be safer but
/// halves throughput; the engine's 1432-byte datagrams fit 1500-byte links).
const MAX_PAYLOAD: usize = 1432;
const SEND_BATCH: usize = 64;
/// Longest a full send buffer may hold up a batch before the rest is dropped.
const SEND_WAIT_MS: i32 = 20;

pub struct UdpTransport {
    socket: UdpSocket,
    /// Datagrams dropped because the socket's send buffer was full.
    pub send_dropped: AtomicU64,
}

impl UdpTransport {
    /// Binds `local` (port 0 for a client). `buffer` asks for socket buffers of that size;
    /// the kernel may clamp it, so what it granted is logged.
    pub fn bind(local: SocketAddr, buffer: Option<usize>) -> io::Result<UdpTransport> {
        let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
        if let Some(bytes) = buffer {
            socket.set_recv_buffer_size(bytes)?;
            socket.set_send_buffer_size(bytes)?;
            tracing::info!(
                requested = bytes,
                recv_granted = socket.recv_buffer_size()?,
                send_granted = socket.send_buffer_size()?,
                "UDP socket buffers"
            );
        }
        socket.set_nonblocking(true)?;
        socket.bind(&local.into())?;
        let socket = UdpSocket::from_std(socket.into())?;
        Ok(UdpTransport {
            socket,
            send_dropped: AtomicU64::new(0),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

/// A socket address in the form the kernel reads and writes.
#[derive(Clone, Copy)]
#[repr(C)]
union RawAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

fn to_raw(addr: SocketAddr) -> (RawAddr, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr of either family.
    let mut raw: RawAddr = unsafe { zeroed() };
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

fn from_raw(raw: &RawAddr) -> Option<SocketAddr> {
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

fn recvmmsg(fd: i32, batch: &mut RecvBatch) -> io::Result<usize> {
    let n = batch.capacity();
    let slots = batch.slots_mut();
    let mut iovs: Vec<libc::iovec> = slots
        .iter_mut()
        .map(|s| libc::iovec {
            iov_base: s.buf.as_mut_ptr().cast(),
            iov_len: s.buf.len(),
        })
        .collect();
    // SAFETY: zeroed sockaddr storage is valid; the kernel writes at most msg_namelen.
    let mut addrs: Vec<RawAddr> = vec![unsafe { zeroed() }; n];
    let mut msgs: Vec<libc::mmsghdr> = (0..n)
        .map(|i| {
            // SAFETY: an all-zero msghdr is valid; the pointers are filled in below.
            let mut hdr: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            hdr.msg_name = (&mut addrs[i] as *mut RawAddr).cast();
            hdr.msg_namelen = size_of::<RawAddr>() as libc::socklen_t;
            hdr.msg_iov = &mut iovs[i];
            hdr.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            }
        })
        .collect();
    // SAFETY: msgs, iovs and addrs outlive the call and describe valid buffers.
    let got = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            n as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = got as usize;
    let mut filled = 0;
    for i in 0..got {
        let Some(peer) = from_raw(&addrs[i]) else { continue };
        let len = msgs[i].msg_len as usize;
        let slots = batch.slots_mut();
        if filled != i {
            slots.swap(filled, i);
        }
        slots[filled].len = len;
        slots[filled].peer = peer;
        filled += 1;
    }
    batch.set_filled(filled);
    Ok(filled)
}

fn sendmmsg(fd: i32, batch: &[Transmit]) -> io::Result<usize> {
    let mut addrs: Vec<(RawAddr, libc::socklen_t)> = batch.iter().map(|t| to_raw(t.peer)).collect();
    let mut iovs: Vec<libc::iovec> = batch
        .iter()
        .map(|t| libc::iovec {
            iov_base: t.payload.as_ptr() as *mut _,
            iov_len: t.payload.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..batch.len())
        .map(|i| {
            // SAFETY: as in recvmmsg.
            let mut hdr: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            hdr.msg_name = (&mut addrs[i].0 as *mut RawAddr).cast();
            hdr.msg_namelen = addrs[i].1;
            hdr.msg_iov = &mut iovs[i];
            hdr.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            }
        })
        .collect();
    // SAFETY: every pointer refers to memory alive for the duration of the call.
    let sent = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Waits up to `ms` for the socket to accept more data.
fn wait_writable(fd: i32, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLOUT != 0
}

impl Transport for UdpTransport {
    fn name(&self) -> &'static str {
        "udp"
    }

    fn send_batch(&self, batch: &[Transmit]) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        for chunk in batch.chunks(SEND_BATCH) {
            let mut done = 0;
            while done < chunk.len() {
                match sendmmsg(fd, &chunk[done..]) {
                    Ok(n) => done += n.max(1),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // The send buffer is full. KCP bursts a whole window at once, and
                        // the kernel caps SO_SNDBUF without CAP_NET_ADMIN, so wait briefly
                        // for room rather than drop what would only be retransmitted.
                        if !wait_writable(fd, SEND_WAIT_MS) {
                            self.send_dropped
                                .fetch_add((chunk.len() - done) as u64, Ordering::Relaxed);
                            break;
                        }
                    }
                    // A peer's ICMP error surfaces here on the next call; skip that datagram.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => done += 1,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn recv_batch<'a>(&'a self, batch: &'a mut RecvBatch) -> impl Future<Output = io::Result<()>> + Send + 'a {
        async move {
            loop {
                self.socket.readable().await?;
                let fd = self.socket.as_raw_fd();
                match self.socket.try_io(Interest::READABLE, || recvmmsg(fd, batch)) {
                    Ok(0) => continue,
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.set_filled(0);
        match recvmmsg(self.socket.as_raw_fd(), batch) {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused) => Ok(0),
            r => r,
        }
    }

    fn max_payload(&self) -> usize {
        MAX_PAYLOAD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batch_roundtrip_over_loopback() {
        let a = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let b = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), Some(1 << 20)).unwrap();
        let to = b.local_addr().unwrap();
        let batch: Vec<Transmit> = (0..10u8)
            .map(|i| Transmit {
                peer: to,
                payload: vec![i; 100 + i as usize],
            })
            .collect();
        a.send_batch(&batch).unwrap();
        let mut got = Vec::new();
        let mut rb = RecvBatch::new(4, 2048);
        while got.len() < 10 {
            tokio::time::timeout(std::time::Duration::from_secs(5), b.recv_batch(&mut rb))
                .await
                .unwrap()
                .unwrap();
            for (peer, bytes) in rb.iter() {
                assert_eq!(peer, a.local_addr().unwrap());
                got.push(bytes.to_vec());
            }
        }
        let expected: Vec<Vec<u8>> = batch.into_iter().map(|t| t.payload).collect();
        assert_eq!(got, expected);
    }
}
