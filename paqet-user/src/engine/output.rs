//! Sealed datagrams out, and when: at once, or, for a flush that carries only a few
//! ACKs, a moment later together with more. The sealing itself is the connection's
//! ([`Connection::seal`](super::connection::Connection::seal)); this is the endpoint's
//! routing to it and its schedule.

use std::time::Duration;

use super::frame::Inner;
use super::{Engine, PeerId, StreamId, Transmit};

/// A receiver that owes only ACKs sends them once this many are due, or after
/// [`ACK_DELAY`]: during a download it acknowledged every input batch, one ACK datagram
/// per ~8 data datagrams, and each cost both relays a datagram's full path. (TCP's
/// delayed ACK and QUIC's ACK frequency do the same.)
const ACKS_PER_DATAGRAM: usize = 32;
/// Far below any RTO (≥ 30 ms in the fast modes); the sender's RTT samples grow by at
/// most this much.
pub(super) const ACK_DELAY: Duration = Duration::from_millis(1);

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
        if let Some(connection) = self.peers.get_mut(&id.peer) {
            connection.flush_stream(id.conv, self.clock, &mut self.out);
        }
    }

    /// Hands back the buffers of datagrams the edge has sent, for the next ones.
    pub fn recycle(&mut self, spent: &mut Vec<Transmit>) {
        self.out.recycle(spent);
    }

    /// Seals `inner` under the peer's current session (see [`Connection::seal`]).
    ///
    /// [`Connection::seal`]: super::connection::Connection::seal
    pub(super) fn seal_to(&mut self, peer_id: PeerId, inner: &Inner<'_>) {
        if let Some(connection) = self.peers.get_mut(&peer_id) {
            connection.seal(inner, self.clock, &mut self.out);
        }
    }
}
