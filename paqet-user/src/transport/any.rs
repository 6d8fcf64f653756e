//! One transport of whichever kind: a node's paths may mix them (a server under
//! `TRANSPORT=auto` serves the TCP-shaped wire through AF_XDP and UDP through the
//! kernel's socket on the same port; a client keeps udp beside xdp to fall back to).

use std::io;
use std::net::SocketAddr;

use super::udp::UdpTransport;
use super::xdp::{WireShape, XdpTransport};
use super::{RecvBatch, Transport, Via};
use crate::engine::Transmit;

pub enum AnyTransport {
    Udp(UdpTransport),
    // Boxed: the AF_XDP rings make it far larger than a UDP socket.
    Xdp(Box<XdpTransport>),
}

impl Transport for AnyTransport {
    fn name(&self) -> &'static str {
        match self {
            AnyTransport::Udp(_) => "udp",
            AnyTransport::Xdp(t) => match t.wire() {
                WireShape::Tcp => "xdp/tcp",
                WireShape::Udp => "xdp/udp",
            },
        }
    }

    fn send_batch(&self, batch: &[Transmit]) -> io::Result<()> {
        match self {
            AnyTransport::Udp(t) => t.send_batch(batch),
            AnyTransport::Xdp(t) => t.send_batch(batch),
        }
    }

    async fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<()> {
        match self {
            AnyTransport::Udp(t) => t.recv_batch(batch).await,
            AnyTransport::Xdp(t) => t.recv_batch(batch).await,
        }
    }

    fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        match self {
            AnyTransport::Udp(t) => t.try_recv_batch(batch),
            AnyTransport::Xdp(t) => t.try_recv_batch(batch),
        }
    }

    fn max_payload(&self) -> usize {
        match self {
            AnyTransport::Udp(t) => t.max_payload(),
            AnyTransport::Xdp(t) => t.max_payload(),
        }
    }

    fn receive_overflows(&self) -> u64 {
        match self {
            AnyTransport::Udp(t) => t.receive_overflows(),
            AnyTransport::Xdp(t) => t.receive_overflows(),
        }
    }

    fn steering_counters(&self) -> Option<paqet_common::maps::Stats> {
        match self {
            AnyTransport::Udp(t) => t.steering_counters(),
            AnyTransport::Xdp(t) => t.steering_counters(),
        }
    }

    fn peer_authenticated(&self, peer: SocketAddr, via: Option<Via>) {
        match self {
            AnyTransport::Udp(t) => t.peer_authenticated(peer, via),
            AnyTransport::Xdp(t) => t.peer_authenticated(peer, via),
        }
    }
}
