//! The edge to the wire. Every transport moves batches of datagram payloads to and from
//! peers named by IP address and port; the engine above never knows which one runs.
//!
//! - `udp`: a plain UDP socket, no privileges (development, hosts without eBPF).
//! - `xdp`: frames built by paqet, sent through AF_XDP and steered back by `paqet_steer`.

pub mod any;
pub mod local;
pub mod netlink;
pub mod udp;
pub mod xdp;

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use crate::engine::Transmit;

/// One received datagram's slot in a [`RecvBatch`].
pub struct RecvSlot {
    pub buf: Vec<u8>,
    pub len: usize,
    pub peer: SocketAddr,
    /// How the datagram arrived, where the transport sees frames (xdp): the way back to
    /// the peer, once the engine has authenticated the payload.
    pub via: Option<Via>,
}

/// The link-layer source of a received frame and the address of ours it was sent to:
/// replies go to that next hop and leave from that address (a peer that reached one of
/// several addresses expects its answers from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Via {
    pub mac: [u8; 6],
    pub local: std::net::IpAddr,
}

impl RecvSlot {
    pub fn payload(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The datagram, mutable: the engine decrypts it where it lies.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

/// Reusable buffers for one batch of received datagrams: filled by a transport, read by
/// the engine, never reallocated.
pub struct RecvBatch {
    slots: Vec<RecvSlot>,
    filled: usize,
}

impl RecvBatch {
    pub fn new(count: usize, max_datagram: usize) -> RecvBatch {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let slots = (0..count)
            .map(|_| RecvSlot {
                buf: vec![0u8; max_datagram],
                len: 0,
                peer: unspecified,
                via: None,
            })
            .collect();
        RecvBatch { slots, filled: 0 }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// All slots, for a transport to fill; it then calls [`RecvBatch::set_filled`].
    pub fn slots_mut(&mut self) -> &mut [RecvSlot] {
        &mut self.slots
    }

    pub fn set_filled(&mut self, n: usize) {
        self.filled = n.min(self.slots.len());
    }

    /// The filled slots.
    pub fn filled(&self) -> &[RecvSlot] {
        &self.slots[..self.filled]
    }

    pub fn filled_mut(&mut self) -> &mut [RecvSlot] {
        &mut self.slots[..self.filled]
    }

    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.slots[..self.filled].iter().map(|s| (s.peer, &s.buf[..s.len]))
    }

    pub fn len(&self) -> usize {
        self.filled
    }

    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }
}

pub trait Transport: Send + Sync + 'static {
    /// A short name for logs and `paqet status`.
    fn name(&self) -> &'static str;

    /// Sends what the wire takes now. Datagrams it cannot take are dropped and counted:
    /// KCP retransmits, and a relay must not stall on a full queue (`udp` waits at most
    /// 20 ms for a full socket buffer to drain first; `xdp` never waits).
    fn send_batch(&self, batch: &[Transmit]) -> io::Result<()>;

    /// Waits until at least one datagram has arrived, then fills `batch` with as many as
    /// are ready.
    fn recv_batch<'a>(&'a self, batch: &'a mut RecvBatch) -> impl Future<Output = io::Result<()>> + Send + 'a;

    /// Fills `batch` with the datagrams already waiting, without waiting; how many.
    fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize>;

    /// Largest payload one datagram can carry on this transport.
    fn max_payload(&self) -> usize;

    /// Datagrams the kernel dropped because paqet's receive ring or socket buffer was
    /// full: invisible to KCP except as loss, so `paqet status` shows them.
    fn receive_overflows(&self) -> u64 {
        0
    }

    /// The counters of the eBPF program this transport attached (summed over CPUs), for
    /// `paqet status` and the metrics; `None` without one, or when the map cannot be read.
    fn steering_counters(&self) -> Option<paqet_common::maps::Stats> {
        None
    }

    /// The engine authenticated a datagram from `peer` that arrived `via` that path:
    /// the transport may now trust it for replies.
    fn peer_authenticated(&self, _peer: SocketAddr, _via: Option<Via>) {}
}
