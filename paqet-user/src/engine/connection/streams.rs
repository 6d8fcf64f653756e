//! A connection's streams: lookups, its per-peer cap, tombstones of closed
//! conversations, resets, and the KCP clock of each stream.

use std::time::{Duration, Instant};

use super::super::frame::{Inner, OpenError};
use super::super::mux::{Phase, Stream};
use super::super::outbox::Outbox;
use super::super::{Event, StreamId};
use super::Connection;

/// Closed or refused conversations remembered per peer (each for 30 s).
const MAX_TOMBSTONES: usize = 4096;
/// Late segments of a closed conversation are ignored (not answered) this long.
const TOMBSTONE_TTL: Duration = Duration::from_secs(30);

/// What a tick did to a connection's streams, for the endpoint's global counts.
pub(in crate::engine) struct StreamsTick {
    /// Segments queued or in flight in the streams' send sides.
    pub queued_segments: usize,
    /// Streams gone: lingered out, dead or stalled.
    pub closed: usize,
}

impl Connection {
    fn stream_id(&self, conv: u32) -> StreamId {
        StreamId { peer: self.id, conv }
    }

    pub fn stream_mut(&mut self, conv: u32) -> Option<&mut Stream> {
        self.streams.get_mut(&conv)
    }

    pub fn has_stream(&self, conv: u32) -> bool {
        self.streams.contains_key(&conv)
    }

    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Server: whether this client may open one more stream.
    pub fn has_room_for_stream(&self) -> bool {
        self.streams.len() < self.max_streams
    }

    /// Adds a stream made with the full send window of the moment (`window`), cut at
    /// once if this peer reported overflows.
    pub fn insert_stream(&mut self, conv: u32, stream: Stream, window: u16) {
        self.streams.insert(conv, stream);
        if self.backoff.shift > 0 {
            self.apply_backoff(window);
        }
    }

    pub fn is_tombstoned(&self, conv: u32) -> bool {
        self.tombstones.contains_key(&conv)
    }

    /// Tells the peer to drop a conversation we do not know. Each answer costs a
    /// tombstone for 30 s: past the cap a flood of made-up conversations gets no answer
    /// and takes no memory.
    pub fn refuse_unknown(&mut self, conv: u32, now: Instant, out: &mut Outbox) {
        if self.tombstones.len() >= MAX_TOMBSTONES {
            return;
        }
        self.seal(&Inner::Reset { conv }, now, out);
        self.tombstones.insert(conv, now);
    }

    /// Drops the stream at once and tells the peer to drop it too; false if there was
    /// no such stream.
    pub fn reset_stream(&mut self, conv: u32, now: Instant, out: &mut Outbox) -> bool {
        if self.streams.remove(&conv).is_none() {
            return false;
        }
        out.events.push(Event::StreamClosed(self.stream_id(conv)));
        // Anything KCP of this stream had queued is moot now.
        out.kcp_packets.clear();
        self.seal(&Inner::Reset { conv }, now, out);
        self.tombstones.insert(conv, now);
        true
    }

    /// The peer reset a stream; false if there was no such stream.
    pub fn on_peer_reset(&mut self, conv: u32, now: Instant, out: &mut Outbox) -> bool {
        if self.streams.remove(&conv).is_none() {
            return false;
        }
        self.tombstones.insert(conv, now);
        let id = self.stream_id(conv);
        out.events.push(Event::StreamClosed(id));
        tracing::debug!(stream = %id, "peer reset stream");
        true
    }

    /// The peer is gone: its streams close without a word to it. Returns how many.
    pub fn drop_streams(&mut self, out: &mut Outbox) -> usize {
        let count = self.streams.len();
        if count > 0 {
            tracing::info!(streams = count, "peer silent too long; dropping its streams");
        }
        let peer = self.id;
        out.events.extend(
            self.streams
                .drain()
                .map(|(conv, _)| Event::StreamClosed(StreamId { peer, conv })),
        );
        count
    }

    /// Sends whatever KCP of this stream has ready.
    pub fn flush_stream(&mut self, conv: u32, now: Instant, out: &mut Outbox) {
        if let Some(stream) = self.streams.get_mut(&conv) {
            let _ = stream.kcp.flush(&mut out.kcp_packets);
        }
        self.seal_kcp_packets(now, out);
    }

    /// Sends what every stream has ready: streams opened while the session was not up
    /// had their KCP output dropped.
    pub fn flush_streams(&mut self, now: Instant, out: &mut Outbox) {
        let convs: Vec<u32> = self.streams.keys().copied().collect();
        for conv in convs {
            self.flush_stream(conv, now, out);
        }
    }

    /// Client: the server is unreachable; streams still waiting for its answer get a
    /// failure now rather than after TIMEOUT. Returns how many closed.
    pub fn fail_streams_awaiting_reply(&mut self, now: Instant, out: &mut Outbox) -> usize {
        let waiting: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| s.phase == Phase::AwaitingReply)
            .map(|(&conv, _)| conv)
            .collect();
        let mut closed = 0;
        for conv in waiting {
            out.events.push(Event::StreamReplied {
                id: self.stream_id(conv),
                result: Err(OpenError::GeneralFailure),
            });
            closed += usize::from(self.reset_stream(conv, now, out));
        }
        closed
    }

    /// Runs the streams' KCP clocks (`ms`), forgets lingered streams and old tombstones,
    /// wakes writers with room, and resets streams whose link died or whose opening
    /// stalled longer than `stall_after`.
    pub fn tick_streams(&mut self, now: Instant, ms: u32, stall_after: Duration, out: &mut Outbox) -> StreamsTick {
        let mut queued_segments = 0;
        let mut dead = Vec::new();
        let mut forgotten = Vec::new();
        let mut woken = Vec::new();
        for (&conv, stream) in self.streams.iter_mut() {
            if let Phase::Lingering { until } = stream.phase
                && now >= until
            {
                forgotten.push(conv);
                continue;
            }
            let _ = stream.kcp.update(ms, &mut out.kcp_packets);
            queued_segments += stream.kcp.wait_snd();
            let stalled = now.saturating_duration_since(stream.last_activity) > stall_after
                && matches!(
                    stream.phase,
                    Phase::AwaitingOpen | Phase::AwaitingReply | Phase::Dialing
                );
            if stream.kcp.is_dead_link() || stalled {
                dead.push((conv, stream.phase == Phase::AwaitingReply));
            } else if stream.write_blocked && stream.writable() {
                stream.write_blocked = false;
                woken.push(conv);
            }
        }
        self.tombstones
            .retain(|_, at| now.saturating_duration_since(*at) < TOMBSTONE_TTL);
        for &conv in &forgotten {
            self.streams.remove(&conv);
            self.tombstones.insert(conv, now);
        }
        self.seal_kcp_packets(now, out);
        for conv in woken {
            out.events.push(Event::Writable(self.stream_id(conv)));
        }
        let reset = self.reset_dead(dead, now, out);
        StreamsTick {
            queued_segments,
            closed: forgotten.len() + reset,
        }
    }

    /// Resets streams that timed out; the opener of one still awaiting its reply learns
    /// it was a timeout, not a refusal. Returns how many closed.
    fn reset_dead(&mut self, dead: Vec<(u32, bool)>, now: Instant, out: &mut Outbox) -> usize {
        let mut closed = 0;
        for (conv, awaiting_reply) in dead {
            let id = self.stream_id(conv);
            tracing::debug!(stream = %id, "stream timed out");
            if awaiting_reply {
                out.events.push(Event::StreamReplied {
                    id,
                    result: Err(OpenError::TtlExpired),
                });
            }
            closed += usize::from(self.reset_stream(conv, now, out));
        }
        closed
    }
}
