//! Sealed datagrams out, and when: at once, or, for a flush that carries only a few
//! ACKs, a moment later together with more. The sealing itself is the connection's
//! ([`Connection::seal`](crate::engine::connection::Connection::seal)); this is the endpoint's
//! routing to it and its schedule.

use std::time::Duration;

use crate::engine::frame::Inner;
use crate::engine::shards::Handoff;
use crate::engine::{Engine, Event, PeerId, StreamId, Transmit};

/// A receiver that owes only ACKs sends them once this many are due, or after
/// [`ACK_DELAY`]: during a download it acknowledged every input batch, one ACK datagram
/// per ~8 data datagrams, and each cost both relays a datagram's full path. (TCP's
/// delayed ACK and QUIC's ACK frequency do the same.)
const ACKS_PER_DATAGRAM: usize = 32;
/// Far below any RTO (≥ 30 ms in the fast modes); the sender's RTT samples grow by at
/// most this much.
pub(in crate::engine) const ACK_DELAY: Duration = Duration::from_millis(1);

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

    /// Whether some ACKs wait for `ack_deadline` (the tests wait for none).
    #[cfg(test)]
    pub(in crate::engine) fn acks_delayed(&self) -> bool {
        self.ack_deadline.is_some()
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

    /// Takes every queued datagram at once, for a batched send.
    pub fn drain_transmits(&mut self, into: &mut Vec<Transmit>) {
        for id in std::mem::take(&mut self.unflushed) {
            if !self.delay_acks(id) {
                self.flush_stream(id);
            }
            self.wake_writer_if_room(id);
        }
        into.append(&mut self.out.transmits);
    }

    /// Sharded server: the datagrams that belong to other shards' clients.
    pub fn drain_handoffs(&mut self, into: &mut Vec<Handoff>) {
        into.append(&mut self.out.handoffs);
    }

    pub fn drain_events(&mut self, into: &mut Vec<Event>) {
        // A run of datagrams for one stream wakes its reader once, not once each (a
        // wake-up left over from an interleaved run is harmless: one Notify permit).
        self.out.events.dedup();
        into.append(&mut self.out.events);
    }

    /// True once after a call made [`poll_timeout`](Self::poll_timeout) earlier than the
    /// edge's timer may be set for.
    pub fn take_timer_moved(&mut self) -> bool {
        std::mem::take(&mut self.timer_moved)
    }

    /// Hands back the buffers of datagrams the edge has sent, for the next ones.
    pub fn recycle(&mut self, spent: &mut Vec<Transmit>) {
        self.out.recycle(spent);
    }

    /// Seals `inner` under the peer's current session (see [`Connection::seal`]).
    ///
    /// [`Connection::seal`]: crate::engine::connection::Connection::seal
    pub(super) fn seal_to(&mut self, peer_id: PeerId, inner: &Inner<'_>) {
        if let Some(connection) = self.peers.get_mut(&peer_id) {
            connection.seal(inner, self.clock, &mut self.out);
        }
    }
}
