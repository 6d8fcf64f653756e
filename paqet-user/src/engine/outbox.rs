//! What the engine owes the edge — sealed datagrams and events — and the buffers reused
//! to make them. The endpoint and every [`Connection`](super::connection::Connection)
//! write here, so a connection can send while the endpoint's other state is borrowed.

use std::net::SocketAddr;

use super::kcp::OutputPackets;
use super::shards::Handoff;
use super::{Event, PathId, Transmit};

/// Sent datagrams' buffers kept for reuse (at most this many, ~1.4 KiB each).
const MAX_SPARE_BUFFERS: usize = 1024;

#[derive(Default)]
pub(super) struct Outbox {
    pub transmits: Vec<Transmit>,
    pub events: Vec<Event>,
    /// Datagrams for the shards that own them.
    pub handoffs: Vec<Handoff>,
    /// Where KCP writes a flush's packets before they are sealed.
    pub kcp_packets: OutputPackets,
    /// Buffers of sent datagrams, reused for the next ones (no allocation per datagram).
    spare: Vec<Vec<u8>>,
    /// Capacity of a fresh datagram buffer.
    max_datagram: usize,
    pub datagrams_out: u64,
    pub bytes_out: u64,
}

impl Outbox {
    pub fn new(max_datagram: usize) -> Outbox {
        Outbox {
            max_datagram,
            ..Outbox::default()
        }
    }

    /// An empty buffer for the next datagram.
    pub fn buffer(&mut self) -> Vec<u8> {
        let mut packet = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.max_datagram));
        packet.clear();
        packet
    }

    /// Takes back the buffers of datagrams the edge has sent.
    pub fn recycle(&mut self, spent: &mut Vec<Transmit>) {
        for t in spent.drain(..) {
            if self.spare.len() < MAX_SPARE_BUFFERS {
                self.spare.push(t.payload);
            }
        }
    }

    pub fn push_transmit(&mut self, peer: SocketAddr, path: PathId, payload: Vec<u8>) {
        self.datagrams_out += 1;
        self.bytes_out += payload.len() as u64;
        self.transmits.push(Transmit { peer, path, payload });
    }
}
