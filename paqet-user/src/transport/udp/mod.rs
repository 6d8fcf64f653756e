//! The unprivileged transport: one UDP socket, batched with `recvmmsg`/`sendmmsg` so a
//! batch of datagrams costs one system call each way, and with Linux's UDP segmentation
//! offloads so a run of datagrams to one peer costs the kernel about one datagram's work:
//! GSO on send (`send.rs`), GRO on receive (`recv.rs`). Both fall back to one datagram
//! per message where the kernel or the path will not have them.

mod recv;
mod send;
mod sys;

use crate::sync::lock;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use self::recv::RecvState;
use self::send::{SendState, Sent};
use super::{RecvBatch, Transport};
use crate::engine::Transmit;

/// Keeps every datagram under the smallest common path MTU (IPv6 1280 would be safer but
/// halves throughput; the engine's 1432-byte datagrams fit 1500-byte links).
const MAX_PAYLOAD: usize = 1432;

pub struct UdpTransport {
    socket: UdpSocket,
    /// Datagrams dropped because the socket's send buffer was full.
    pub send_dropped: AtomicU64,
    /// Whether sends use UDP GSO: cleared for good the first time the kernel refuses it.
    gso: AtomicBool,
    /// Scratch reused by every call, so the hot path allocates nothing. The runtime is
    /// single-threaded: the locks are never contended. Boxed, as the xdp transport's
    /// rings are, to keep the transport itself small.
    send: Box<Mutex<SendState>>,
    recv: Box<Mutex<RecvState>>,
}

/// A bound socket not yet tied to a runtime: tokio registers a socket with the
/// reactor of the runtime it is created in, and only that runtime wakes its readers.
pub struct BoundUdp {
    socket: std::net::UdpSocket,
    gro: bool,
    /// Its buffers were forced past `net.core.rmem_max`.
    forced: bool,
}

impl BoundUdp {
    fn bind(local: SocketAddr, buffer: Option<usize>, gro: bool, reuse_port: bool) -> io::Result<BoundUdp> {
        let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
        let mut forced = false;
        if let Some(bytes) = buffer {
            // Past net.core.rmem_max (often 208 KiB or 4 MiB) only with CAP_NET_ADMIN,
            // which the service has; anyone else gets what the kernel clamps to.
            forced = libc::c_int::try_from(bytes).is_ok_and(|b| sys::force_buffers(socket.as_raw_fd(), b).is_ok());
            if !forced {
                socket.set_recv_buffer_size(bytes)?;
                socket.set_send_buffer_size(bytes)?;
            }
        }
        socket.set_nonblocking(true)?;
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        socket.bind(&local.into())?;
        // A kernel without UDP_GRO (before 5.0) delivers datagrams one by one, as asked.
        let gro = gro && sys::set_udp_option(socket.as_raw_fd(), libc::UDP_GRO, 1).is_ok();
        tracing::debug!(gro, "UDP receive offload");
        Ok(BoundUdp {
            socket: socket.into(),
            gro,
            forced,
        })
    }

    /// What the kernel granted of `requested` bytes, once for `sockets` alike.
    fn log_buffers(&self, requested: usize, sockets: u8) -> io::Result<()> {
        let socket = socket2::SockRef::from(&self.socket);
        tracing::info!(
            requested,
            forced = self.forced,
            recv_granted = socket.recv_buffer_size()?,
            send_granted = socket.send_buffer_size()?,
            sockets,
            "UDP socket buffers"
        );
        Ok(())
    }

    /// Ties the socket to the runtime this runs in.
    pub fn register(self) -> io::Result<UdpTransport> {
        Ok(UdpTransport {
            socket: UdpSocket::from_std(self.socket)?,
            send_dropped: AtomicU64::new(0),
            gso: AtomicBool::new(true),
            send: Box::new(Mutex::new(SendState::new())),
            recv: Box::new(Mutex::new(RecvState::new(self.gro))),
        })
    }
}

impl UdpTransport {
    /// Binds `local` (port 0 for a client). `buffer` asks for socket buffers of that size;
    /// the kernel may clamp it, so what it granted is logged.
    pub fn bind(local: SocketAddr, buffer: Option<usize>) -> io::Result<UdpTransport> {
        UdpTransport::open(local, buffer, true)
    }

    /// As [`UdpTransport::bind`]; `gro` says whether to ask for receive coalescing.
    fn open(local: SocketAddr, buffer: Option<usize>, gro: bool) -> io::Result<UdpTransport> {
        let bound = BoundUdp::bind(local, buffer, gro, false)?;
        if let Some(requested) = buffer {
            bound.log_buffers(requested, 1)?;
        }
        bound.register()
    }

    /// As [`UdpTransport::bind`], for a runtime on another thread to register (a
    /// client's engines beyond its first); the first socket's log line stands for it.
    pub fn bind_later(local: SocketAddr, buffer: Option<usize>) -> io::Result<BoundUdp> {
        BoundUdp::bind(local, buffer, true, false)
    }

    /// `count` sockets on `local` (SO_REUSEPORT), among which the kernel spreads
    /// datagrams by their addresses: one per engine of a sharded server. Each is
    /// registered by the thread whose runtime will drive it. Refused, as a plain bind
    /// would be, when anything already holds the port: a second relay started on it
    /// would otherwise join the group and take a share of the clients.
    pub fn bind_shared(local: SocketAddr, buffer: Option<usize>, count: u8) -> io::Result<Vec<BoundUdp>> {
        drop(BoundUdp::bind(local, None, false, false)?);
        let group = (0..count)
            .map(|_| BoundUdp::bind(local, buffer, true, true))
            .collect::<io::Result<Vec<_>>>()?;
        if let (Some(requested), Some(first)) = (buffer, group.first()) {
            first.log_buffers(requested, count)?;
        }
        Ok(group)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn gso_refused(&self, error: &io::Error) {
        if self.gso.swap(false, Ordering::Relaxed) {
            tracing::info!(%error, "the kernel refused UDP GSO; sending one datagram per message from now on");
        }
    }

    fn recv_pending(&self) -> bool {
        lock(&self.recv).has_pending()
    }

    fn fill(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        lock(&self.recv).fill(self.socket.as_raw_fd(), batch)
    }
}

impl Transport for UdpTransport {
    fn name(&self) -> &'static str {
        "udp"
    }

    fn send_batch(&self, batch: &[Transmit]) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        let mut send = lock(&self.send);
        let mut rest = batch;
        while !rest.is_empty() {
            let covered = send.prepare(rest, self.gso.load(Ordering::Relaxed));
            match send.transmit(fd)? {
                Sent::All { dropped } => {
                    self.send_dropped.fetch_add(dropped as u64, Ordering::Relaxed);
                    rest = &rest[covered..];
                }
                // What the refused message held goes again, one datagram per message.
                Sent::GsoRefused { resume, error } => {
                    self.gso_refused(&error);
                    rest = &rest[resume..];
                }
            }
        }
        Ok(())
    }

    fn receive_overflows(&self) -> u64 {
        sys::socket_drops(self.socket.as_raw_fd()).unwrap_or(0)
    }

    async fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<()> {
        loop {
            // Datagrams of an earlier coalesced receive wait here, not in the socket, so
            // readiness would not announce them.
            if self.recv_pending() && self.try_recv_batch(batch)? > 0 {
                return Ok(());
            }
            self.socket.readable().await?;
            match self.socket.try_io(Interest::READABLE, || self.fill(batch)) {
                Ok(0) => continue,
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.set_filled(0);
        match self.fill(batch) {
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
    use std::time::Duration;

    use super::*;

    fn open(gro: bool) -> UdpTransport {
        UdpTransport::open("127.0.0.1:0".parse().unwrap(), Some(1 << 22), gro).unwrap()
    }

    #[test]
    fn a_shared_port_is_refused_when_anything_holds_it_already() {
        let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap();
        let refused = UdpTransport::bind_shared(port, None, 2).map(|_| ());
        assert_eq!(refused.map_err(|e| e.kind()), Err(io::ErrorKind::AddrInUse));
        drop(held);
        let group = UdpTransport::bind_shared(port, None, 3).unwrap();
        assert_eq!(group.len(), 3);
        // A second relay on the port must not join the group and take a share of it.
        let second = UdpTransport::bind_shared(port, None, 2).map(|_| ());
        assert_eq!(second.map_err(|e| e.kind()), Err(io::ErrorKind::AddrInUse));
    }

    /// A payload naming its datagram, so one cut, merged, reordered or sent to the wrong
    /// peer does not compare equal.
    fn payload(seq: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (seq * 31 + j * 7 + j / 251) as u8).collect()
    }

    fn transmits(runs: &[(SocketAddr, &[usize])]) -> Vec<Transmit> {
        let lens = runs
            .iter()
            .flat_map(|&(peer, lens)| lens.iter().map(move |&len| (peer, len)));
        lens.enumerate()
            .map(|(seq, (peer, len))| Transmit {
                peer,
                path: crate::engine::PathId(0),
                payload: payload(seq, len),
            })
            .collect()
    }

    /// What `to` should receive of `batch`, from `from`, in order.
    fn expected(batch: &[Transmit], from: SocketAddr, to: SocketAddr) -> Vec<(SocketAddr, Vec<u8>)> {
        batch
            .iter()
            .filter(|t| t.peer == to)
            .map(|t| (from, t.payload.clone()))
            .collect()
    }

    /// Receives on `rx` in batches of `slots` until `count` datagrams have arrived, then
    /// checks that nothing more came.
    async fn receive(rx: &UdpTransport, count: usize, slots: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        let mut batch = RecvBatch::new(slots, 2048);
        while got.len() < count {
            tokio::time::timeout(Duration::from_secs(5), rx.recv_batch(&mut batch))
                .await
                .expect("datagrams missing")
                .unwrap();
            got.extend(batch.iter().map(|(peer, bytes)| (peer, bytes.to_vec())));
        }
        assert_eq!(rx.try_recv_batch(&mut batch).unwrap(), 0, "more datagrams than sent");
        got
    }

    #[tokio::test]
    async fn batch_roundtrip_over_loopback() {
        let a = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let b = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), Some(1 << 20)).unwrap();
        let to = b.local_addr().unwrap();
        let batch: Vec<Transmit> = (0..10u8)
            .map(|i| Transmit {
                peer: to,
                path: crate::engine::PathId(0),
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

    #[tokio::test]
    async fn mixed_batches_roundtrip_with_and_without_offloads() {
        for (gso, gro) in [(true, true), (true, false), (false, true), (false, false)] {
            let tx = open(true);
            tx.gso.store(gso, Ordering::Relaxed);
            let (p_rx, q_rx) = (open(gro), open(gro));
            let (p, q) = (p_rx.local_addr().unwrap(), q_rx.local_addr().unwrap());
            let mut full_then_short = vec![1432; 50];
            full_then_short.push(5);
            let batch = transmits(&[
                (p, &[1432; 10]),
                (p, &[700]),
                (q, &[1432; 3]),
                (p, &[1]),
                (q, &[1000; 100]),
                (p, &[1200, 1200, 1200, 1200, 1300, 1200]),
                (p, &[0]),
                (q, &[1432, 1432]),
                (p, &full_then_short),
            ]);
            tx.send_batch(&batch).unwrap();
            assert_eq!(tx.gso.load(Ordering::Relaxed), gso, "loopback refused GSO");
            assert_eq!(tx.send_dropped.load(Ordering::Relaxed), 0);
            let from = tx.local_addr().unwrap();
            for (rx, to) in [(&p_rx, p), (&q_rx, q)] {
                let want = expected(&batch, from, to);
                let got = receive(rx, want.len(), 8).await;
                assert!(got == want, "gso {gso}, gro {gro}: datagrams differ");
                // On loopback a GSO message reaches a GRO socket still whole.
                let coalesced = lock(&rx.recv).coalesced;
                assert_eq!(coalesced > 0, gso && gro, "gso {gso}, gro {gro}: {coalesced} coalesced");
            }
        }
    }

    #[tokio::test]
    async fn a_run_longer_than_the_batch_loses_nothing() {
        let (tx, rx) = (open(true), open(true));
        let to = rx.local_addr().unwrap();
        let batch = transmits(&[(to, &[1432; 300])]);
        tx.send_batch(&batch).unwrap();
        let mut slots = RecvBatch::new(8, 2048);
        tokio::time::timeout(Duration::from_secs(5), rx.recv_batch(&mut slots))
            .await
            .expect("datagrams missing")
            .unwrap();
        assert_eq!(slots.len(), 8);
        assert!(rx.recv_pending(), "one coalesced receive should outlast the batch");
        let mut got: Vec<_> = slots.iter().map(|(peer, bytes)| (peer, bytes.to_vec())).collect();
        got.extend(receive(&rx, batch.len() - got.len(), 8).await);
        assert!(
            got == expected(&batch, tx.local_addr().unwrap(), to),
            "datagrams differ"
        );
    }

    #[tokio::test]
    async fn refused_gso_falls_back_and_loses_nothing() {
        let (tx, rx) = (open(true), open(true));
        // With UDP checksums off (SO_NO_CHECK, 11 in asm-generic/socket.h) the kernel
        // refuses every GSO send with EINVAL.
        let one: libc::c_int = 1;
        // SAFETY: a live c_int option value of the length given.
        let r = unsafe {
            libc::setsockopt(
                tx.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                11,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_NO_CHECK: {}", io::Error::last_os_error());
        let to = rx.local_addr().unwrap();
        let batch = transmits(&[(to, &[1432; 100]), (to, &[3])]);
        tx.send_batch(&batch).unwrap();
        assert!(!tx.gso.load(Ordering::Relaxed), "GSO should have been refused");
        let got = receive(&rx, batch.len(), 64).await;
        assert!(
            got == expected(&batch, tx.local_addr().unwrap(), to),
            "datagrams differ"
        );
        assert_eq!(lock(&rx.recv).coalesced, 0);
    }

    #[tokio::test]
    async fn a_full_receive_buffer_is_counted_as_overflow() {
        let rx = UdpTransport::open("127.0.0.1:0".parse().unwrap(), Some(4096), false).unwrap();
        assert_eq!(rx.receive_overflows(), 0);
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        // Nobody reads: a 4 KiB buffer holds a few of these, the rest overflow.
        for _ in 0..200 {
            tx.send_to(&[0x5a; 1000], to).unwrap();
        }
        assert!(rx.receive_overflows() > 100, "{} overflows", rx.receive_overflows());
    }
}
