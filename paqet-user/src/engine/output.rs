//! KCP output to sealed datagrams, and when: at once, or, for a flush that carries
//! only a few ACKs, a moment later together with more.

use std::net::SocketAddr;
use std::time::Duration;

use super::frame::Inner;
use super::{Engine, PathId, PeerId, StreamId, Transmit};

/// A receiver that owes only ACKs sends them once this many are due, or after
/// [`ACK_DELAY`]: during a download it acknowledged every input batch, one ACK datagram
/// per ~8 data datagrams, and each cost both relays a datagram's full path. (TCP's
/// delayed ACK and QUIC's ACK frequency do the same.)
const ACKS_PER_DATAGRAM: usize = 32;
/// Far below any RTO (≥ 30 ms in the fast modes); the sender's RTT samples grow by at
/// most this much.
pub(super) const ACK_DELAY: Duration = Duration::from_millis(1);
/// Sent datagrams' buffers kept for reuse (at most this many, ~1.4 KiB each).
const MAX_SPARE_BUFFERS: usize = 1024;

impl Engine {
    /// Holds back a flush that would only send a few ACKs; true if it did.
    pub(super) fn delay_acks(&mut self, id: StreamId) -> bool {
        let owed = self.stream_mut(id).and_then(|s| s.kcp.only_acks_owed());
        if !owed.is_some_and(|n| n > 0 && n < ACKS_PER_DATAGRAM) {
            return false;
        }
        // Unchecked for repeats: a stream listed twice is flushed twice, the second time
        // with nothing to send, which costs less than searching the list per datagram
        // batch with a thousand streams.
        self.delayed_acks.push(id);
        if self.ack_deadline.is_none() {
            self.ack_deadline = Some(self.clock + ACK_DELAY);
            self.timer_moved = true;
        }
        true
    }

    pub(super) fn flush_delayed_acks(&mut self) {
        self.ack_deadline = None;
        for id in std::mem::take(&mut self.delayed_acks) {
            self.flush_stream(id);
        }
    }

    /// Sends whatever KCP of this stream has ready, sealed for its peer.
    pub(super) fn flush_stream(&mut self, id: StreamId) {
        let stream = self.peers.get_mut(&id.peer).and_then(|p| p.streams.get_mut(&id.conv));
        if let Some(stream) = stream {
            let _ = stream.kcp.flush(&mut self.output);
        }
        self.seal_kcp_output(id.peer);
    }

    pub(super) fn seal_kcp_output(&mut self, peer_id: PeerId) {
        if self.output.is_empty() {
            return;
        }
        let mut packets = std::mem::take(&mut self.output);
        for packet in packets.iter() {
            self.seal_to(peer_id, &Inner::Kcp(packet));
        }
        packets.clear();
        self.output = packets;
    }

    /// Hands back the buffers of datagrams the edge has sent, for the next ones.
    pub fn recycle(&mut self, spent: &mut Vec<Transmit>) {
        for t in spent.drain(..) {
            if self.spare.len() < MAX_SPARE_BUFFERS {
                self.spare.push(t.payload);
            }
        }
    }

    /// Seals `inner` under the peer's session, or drops it if there is none yet (KCP
    /// retransmits once the session is up).
    pub(super) fn seal_to(&mut self, peer_id: PeerId, inner: &Inner<'_>) {
        let Some(peer) = self.peers.get_mut(&peer_id) else {
            return;
        };
        let Some(session) = peer.session.as_mut() else { return };
        let mut packet = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.config.max_datagram));
        packet.clear();
        // Emitted straight into the datagram: every copy of a payload costs ~2 % of a
        // busy relay.
        match session
            .crypto
            .seal_with(session.remote_index, &mut packet, |plain| inner.emit(plain))
        {
            Ok(()) => {
                peer.last_tx = self.clock;
                let (addr, path) = (peer.addr, peer.path);
                self.push_transmit(addr, path, packet);
            }
            Err(e) => tracing::warn!("cannot seal packet: {e}"),
        }
    }

    pub(super) fn push_transmit(&mut self, peer: SocketAddr, path: PathId, payload: Vec<u8>) {
        self.counters.datagrams_out += 1;
        self.counters.bytes_out += payload.len() as u64;
        self.transmits.push(Transmit { peer, path, payload });
    }
}
