//! Streams as the edge sees them: open, accept or refuse, write, read, finish, reset.

use std::time::{Duration, Instant};

use crate::engine::frame::{OpenError, StreamMsg, TargetAddr};
use crate::engine::kcp;
use crate::engine::mux::{self, MIN_WINDOW, Phase, ReadOutcome, Stream, StreamError};
use crate::engine::{Engine, Event, Now, Role, StreamId};

/// After both FINs, acknowledge the peer's retransmissions this long before forgetting.
pub(in crate::engine) const LINGER: Duration = Duration::from_secs(2);

impl Engine {
    /// Client: opens a stream to `target`. Data may be written once `StreamReplied`
    /// says the server connected it.
    pub fn open_stream(&mut self, now: Now, target: &TargetAddr) -> Result<StreamId, StreamError> {
        self.clock = self.clock.max(now.instant);
        if !matches!(self.config.role, Role::Client { .. }) {
            return Err(StreamError::Closed);
        }
        if self.server_unanswered() {
            return Err(StreamError::ServerUnanswered);
        }
        if !self.client.handshake_pending() && !self.is_connected() {
            self.connect(now);
        }
        let conv = self.next_conv;
        self.next_conv = self.next_conv.wrapping_add(1).max(1);
        let peer_id = self.instance;
        let mut stream = self.new_stream(conv, Phase::AwaitingReply, now.instant);
        let mut scratch = std::mem::take(&mut self.scratch);
        let sent = stream.send_msg(&StreamMsg::Open(target.clone()), &mut scratch);
        self.scratch = scratch;
        sent?;
        let best_path = self.config.paths.first().copied().unwrap_or_default();
        self.connection_to_server(best_path, now.instant);
        let id = StreamId { peer: peer_id, conv };
        self.add_stream(id, stream);
        self.flush_stream(id);
        Ok(id)
    }

    pub(super) fn new_stream(&self, conv: u32, phase: Phase, now: Instant) -> Stream {
        let window = mux::window_for(
            self.live_streams + 1,
            self.config.window_budget,
            self.mss(),
            MIN_WINDOW,
            self.config.max_window,
        );
        let kcp = kcp::new_conversation(conv, self.config.kcp.tuning(), self.kcp_mtu(), window, self.ms(now));
        Stream::new(kcp, phase, now)
    }

    /// Gives every stream its share of the window budget, after the count changed.
    pub(super) fn rebalance_windows(&mut self) {
        let window = mux::window_for(
            self.live_streams,
            self.config.window_budget,
            self.mss(),
            MIN_WINDOW,
            self.config.max_window,
        );
        // Streams are made with the window of their moment, and only opens rebalance:
        // when the share did not change there is nothing to visit (a thousand opens
        // used to visit every stream each, O(n²)).
        if self.stream_window == Some(window) {
            return;
        }
        self.stream_window = Some(window);
        for connection in self.peers.values_mut() {
            connection.set_windows(window);
        }
    }

    /// Every stream's share of the window budget (before a peer's backoff cuts it).
    pub(super) fn window_share(&self) -> u16 {
        self.stream_window.unwrap_or(self.config.max_window)
    }

    /// A new stream joins its peer's connection and the global count.
    pub(super) fn add_stream(&mut self, id: StreamId, stream: Stream) {
        let window = self.window_share();
        let Some(connection) = self.peers.get_mut(&id.peer) else {
            return;
        };
        connection.insert_stream(id.conv, stream, window);
        self.live_streams += 1;
        self.rebalance_windows();
    }

    /// Server: the target is connected; data may flow.
    pub fn accept_stream(&mut self, id: StreamId) -> Result<(), StreamError> {
        self.reply(id, Ok(()))
    }

    /// Server: the target could not be connected; the client hears why.
    pub fn refuse_stream(&mut self, id: StreamId, why: OpenError) -> Result<(), StreamError> {
        self.reply(id, Err(why))?;
        // The reply travels reliably; the stream then closes like a finished one.
        if let Some(stream) = self.stream_mut(id) {
            stream.sent_fin = true;
            stream.recv_fin = true;
        }
        Ok(())
    }

    fn reply(&mut self, id: StreamId, result: Result<(), OpenError>) -> Result<(), StreamError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let stream = self.stream_mut(id).ok_or(StreamError::Closed)?;
        if stream.phase != Phase::Dialing {
            self.scratch = scratch;
            return Err(StreamError::NotOpen);
        }
        stream.phase = Phase::Open;
        let sent = stream.send_msg(&StreamMsg::Reply(result), &mut scratch);
        self.scratch = scratch;
        sent?;
        self.flush_stream(id);
        Ok(())
    }

    pub(in crate::engine) fn stream_mut(&mut self, id: StreamId) -> Option<&mut Stream> {
        self.peers.get_mut(&id.peer)?.stream_mut(id.conv)
    }

    /// Queues stream bytes; returns how many were taken (0: wait for `Writable`).
    pub fn stream_write(&mut self, now: Now, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        self.clock = self.clock.max(now.instant);
        let chunk = self.max_write_chunk();
        let budget = self.send_budget_segments();
        let mut queued = self.queued_segments;
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| {
            let stream = self.stream_mut(id).ok_or(StreamError::Closed)?;
            if stream.phase != Phase::Open {
                return Err(StreamError::NotOpen);
            }
            if stream.sent_fin {
                return Err(StreamError::Finished);
            }
            let mut taken = 0;
            while taken < data.len() && stream.writable() && queued < budget {
                let end = (taken + chunk).min(data.len());
                let before = stream.kcp.wait_snd();
                stream.send_msg(&StreamMsg::Data(&data[taken..end]), &mut scratch)?;
                queued += stream.kcp.wait_snd().saturating_sub(before);
                taken = end;
            }
            stream.write_blocked = taken < data.len();
            stream.last_activity = now.instant;
            Ok(taken)
        })();
        self.queued_segments = queued;
        self.scratch = scratch;
        if result.is_ok() {
            self.flush_stream(id);
            // The flush may have sent what stopped the writer (the unsent cap).
            self.wake_writer_if_room(id);
        }
        result
    }

    /// Only when the write would take something: a writer woken while the streams'
    /// shared budget is spent takes nothing and blocks again, and with this called
    /// after every write it would spin (the next tick recounts the budget).
    pub(super) fn wake_writer_if_room(&mut self, id: StreamId) {
        let budget_left = self.queued_segments < self.send_budget_segments();
        if let Some(stream) = self.stream_mut(id)
            && budget_left
            && stream.write_blocked
            && stream.writable()
        {
            stream.write_blocked = false;
            self.out.events.push(Event::Writable(id));
        }
    }

    /// Reads the stream's next data into `buf` (at least `read_buffer_len` bytes): as
    /// many whole messages as fit, back to back, so the edge writes them to TCP in one
    /// call rather than one per message. A FIN after some data is reported next call.
    pub fn stream_read(&mut self, id: StreamId, buf: &mut [u8]) -> Result<ReadOutcome, StreamError> {
        let message_room = self.read_buffer_len();
        debug_assert!(buf.len() >= message_room, "stream_read needs read_buffer_len bytes");
        let stream = self.stream_mut(id).ok_or(StreamError::Closed)?;
        if stream.recv_fin {
            return Ok(ReadOutcome::Fin);
        }
        if stream.phase != Phase::Open {
            return Ok(ReadOutcome::WouldBlock);
        }
        let outcome = if std::mem::take(&mut stream.fin_unreported) {
            stream.recv_fin = true;
            ReadOutcome::Fin
        } else {
            match stream.gather_data(buf, message_room) {
                Ok(outcome) => outcome,
                Err(_) => return Err(self.protocol_violation(id)),
            }
        };
        if outcome != ReadOutcome::WouldBlock {
            // Reading may reopen the receive window: tell the peer soon, and finish a
            // stream whose last FIN this was.
            self.flush_stream(id);
            self.close_if_done(id, None);
        }
        Ok(outcome)
    }

    fn protocol_violation(&mut self, id: StreamId) -> StreamError {
        tracing::debug!(stream = %id, "protocol violation on stream; resetting");
        self.reset_stream(id);
        StreamError::Closed
    }

    /// Half-closes our direction: the peer reads `Fin` after the data already written.
    pub fn stream_finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| {
            let stream = self.stream_mut(id).ok_or(StreamError::Closed)?;
            if stream.sent_fin {
                return Ok(());
            }
            stream.sent_fin = true;
            stream.send_msg(&StreamMsg::Fin, &mut scratch)
        })();
        self.scratch = scratch;
        self.flush_stream(id);
        result
    }

    /// Drops the stream at once and tells the peer to drop it too.
    pub fn reset_stream(&mut self, id: StreamId) {
        let Some(connection) = self.peers.get_mut(&id.peer) else {
            return;
        };
        if connection.reset_stream(id.conv, self.clock, &mut self.out) {
            self.live_streams -= 1;
        }
    }

    /// Moves a stream whose both directions are done to lingering, and reports it closed.
    pub(super) fn close_if_done(&mut self, id: StreamId, now: Option<Instant>) {
        let Some(stream) = self.stream_mut(id) else { return };
        if matches!(stream.phase, Phase::Lingering { .. }) || !stream.fully_closed() {
            return;
        }
        let base = now.unwrap_or(stream.last_activity);
        stream.phase = Phase::Lingering { until: base + LINGER };
        self.out.events.push(Event::StreamClosed(id));
    }
}
