//! Streams over KCP: one conversation per SOCKS connection, so loss on one stream never
//! stalls another. Flow control is KCP's own window plus a cap on what a writer may
//! queue, so a slow reader never makes paqet buffer without bound.

use std::time::Instant;

use super::arq::ArqError;
use super::frame::{FrameError, OpenError, StreamMsg, TargetAddr};
use super::kcp::Conversation;

/// Segments a stream may hold queued but unsent. Refilled from TCP whenever a flush
/// takes some, so it only has to cover one turn of the writer.
pub const MAX_UNSENT_SEGMENTS: usize = 512;
/// The smallest window a stream gets, however many share the budget or however far a
/// peer's backoff cuts it.
pub const MIN_WINDOW: u16 = 32;

/// Largest stream message payload: exactly eight full KCP segments with its type byte.
pub fn max_data_per_message(mss: usize) -> usize {
    mss * 8 - super::frame::DATA_MSG_OVERHEAD
}

/// Big enough for any stream message a well-behaved peer sends (at most eight
/// segments); a bigger one is a protocol violation and resets the stream.
pub fn read_buffer_len(mss: usize) -> usize {
    mss * 8
}

/// Where a stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Client: `Open` sent, waiting for the server's `Reply`.
    AwaitingReply,
    /// Server: conversation seen, waiting for the client's `Open` message.
    AwaitingOpen,
    /// Server: `Open` received and reported; the edge is dialling the target.
    Dialing,
    /// Data flows.
    Open,
    /// Both sides sent `Fin` and all our data is acknowledged; kept a little longer only
    /// to acknowledge the peer's retransmissions, then forgotten.
    Lingering { until: Instant },
}

pub struct Stream {
    pub kcp: Conversation,
    pub phase: Phase,
    pub sent_fin: bool,
    pub recv_fin: bool,
    /// The peer's FIN was taken from KCP behind data and is reported by the next read;
    /// until then the stream counts as still receiving (so it cannot be retired while
    /// the reader is still writing the data before it).
    pub fin_unreported: bool,
    /// A writer was told to wait; tell it when the queue drains.
    pub write_blocked: bool,
    pub last_activity: Instant,
}

/// What `Engine::stream_read` found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Stream data is in `buf[range]`.
    Data(std::ops::Range<usize>),
    /// The peer will send nothing more.
    Fin,
    /// Nothing yet: wait for a `Readable` event.
    WouldBlock,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("no such stream (closed or reset)")]
    Closed,
    #[error("stream is not open for data yet")]
    NotOpen,
    #[error("stream already finished writing")]
    Finished,
    #[error("peer violated the stream protocol: {0}")]
    Protocol(#[from] FrameError),
    #[error("target name too long")]
    BadTarget,
    #[error("the server has not answered for a while")]
    ServerUnanswered,
}

/// The first message a stream receives, decoded by the engine rather than the edge.
pub enum Control {
    Open(TargetAddr),
    Reply(Result<(), OpenError>),
}

impl Stream {
    pub fn new(kcp: Conversation, phase: Phase, now: Instant) -> Stream {
        Stream {
            kcp,
            phase,
            sent_fin: false,
            recv_fin: false,
            fin_unreported: false,
            write_blocked: false,
            last_activity: now,
        }
    }

    /// Whether a writer may queue more: while KCP's send window has room and few
    /// segments wait unsent. A lone stream's window is 16,384 segments (22 MB): when the
    /// peer's reader lags and its window closes, the sender used to take a whole window
    /// more from TCP and hold it; now TCP's own flow control pushes back instead.
    pub fn writable(&self) -> bool {
        self.kcp.wait_snd() < self.kcp.snd_wnd() as usize && self.kcp.unsent() < MAX_UNSENT_SEGMENTS
    }

    pub fn has_message(&self) -> bool {
        self.kcp.peeksize().is_ok()
    }

    /// Sends one message; the caller sizes it to at most [`max_data_per_message`].
    pub fn send_msg(&mut self, msg: &StreamMsg<'_>, scratch: &mut Vec<u8>) -> Result<(), StreamError> {
        scratch.clear();
        let data = msg.emit_head(scratch)?;
        // The data goes into its segments in one copy: joining it to the head first was
        // a second copy of every byte a stream sends.
        self.kcp
            .send_joined(scratch, data)
            .map_err(|_| StreamError::BadTarget)?;
        Ok(())
    }

    /// The next whole message into `buf`, its length; `None` while none has arrived.
    fn recv_message(&mut self, buf: &mut [u8]) -> Result<Option<usize>, StreamError> {
        match self.kcp.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(ArqError::RecvQueueEmpty | ArqError::ExpectingFragment) => Ok(None),
            // Larger than any message we send: the peer breaks the protocol.
            Err(_) => Err(StreamError::Protocol(FrameError::Malformed("oversized stream message"))),
        }
    }

    /// Reads the stream's first message, which must be the control message its phase expects.
    pub fn take_control(&mut self, buf: &mut [u8]) -> Result<Option<Control>, StreamError> {
        let Some(n) = self.recv_message(buf)? else {
            return Ok(None);
        };
        match StreamMsg::parse(&buf[..n])? {
            StreamMsg::Open(target) if self.phase == Phase::AwaitingOpen => Ok(Some(Control::Open(target))),
            StreamMsg::Reply(result) if self.phase == Phase::AwaitingReply => Ok(Some(Control::Reply(result))),
            _ => Err(StreamError::Protocol(FrameError::Malformed(
                "unexpected first stream message",
            ))),
        }
    }

    /// Receives whole data messages into `buf` while another one surely fits (each at
    /// most `message_room` bytes): their data back to back in `buf[1..end]`, or a FIN.
    /// An error is a protocol violation.
    ///
    /// Each next message is received over the last gathered byte (its type byte lands
    /// there, then the byte is put back), so the data of all messages ends up contiguous
    /// without a copy. A FIN behind data stays unreported until the next read.
    pub fn gather_data(&mut self, buf: &mut [u8], message_room: usize) -> Result<ReadOutcome, StreamError> {
        let mut end = 0usize;
        loop {
            let at = end.saturating_sub(1);
            if buf.len() - at < message_room {
                break;
            }
            let kept = buf[at];
            let Some(n) = self.recv_message(&mut buf[at..at + message_room])? else {
                break;
            };
            let is_data = match StreamMsg::parse(&buf[at..at + n])? {
                StreamMsg::Data(_) => true,
                StreamMsg::Fin => false,
                _ => {
                    return Err(StreamError::Protocol(FrameError::Malformed(
                        "control message on an open stream",
                    )));
                }
            };
            if end > 0 {
                buf[at] = kept;
            }
            if !is_data {
                if end == 0 {
                    self.recv_fin = true;
                    return Ok(ReadOutcome::Fin);
                }
                self.fin_unreported = true;
                break;
            }
            end = at + n;
        }
        Ok(if end == 0 {
            ReadOutcome::WouldBlock
        } else {
            ReadOutcome::Data(1..end)
        })
    }

    /// Both directions finished and everything we sent is acknowledged.
    pub fn fully_closed(&self) -> bool {
        self.sent_fin && self.recv_fin && self.kcp.wait_snd() == 0
    }
}

/// Splits the relay's memory budget across the live streams: many streams get small
/// windows, a lone stream a large one. Each stream can hold a send and a receive window.
pub fn window_for(streams: usize, budget_bytes: usize, mss: usize, min: u16, max: u16) -> u16 {
    let per_stream = budget_bytes / streams.max(1) / (2 * mss.max(1));
    per_stream.clamp(min as usize, max as usize) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_shrinks_with_streams_within_bounds() {
        let budget = 96 << 20;
        assert_eq!(window_for(1, budget, 1376, 32, 1024), 1024);
        let w1000 = window_for(1000, budget, 1376, 32, 1024);
        assert!((32..64).contains(&w1000), "{w1000}");
        // 1000 streams × both windows × mss stays inside the budget.
        assert!(1000 * 2 * w1000 as usize * 1376 <= budget);
        assert_eq!(window_for(1_000_000, budget, 1376, 32, 1024), 32);
    }

    #[test]
    fn message_size_fits_eight_segments() {
        assert_eq!(max_data_per_message(1000) + 1, 8000);
    }
}
