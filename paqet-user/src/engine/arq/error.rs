//! What can go wrong in a conversation, kept apart so callers can tell "nothing yet" from failures.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum ArqError {
    #[error("invalid mtu {0}: must be at least 50 and larger than the segment header")]
    InvalidMtu(usize),
    #[error("segment for conversation {found}, expected {expected}")]
    ConvMismatch { expected: u32, found: u32 },
    #[error("truncated segment header: {0} bytes left")]
    TruncatedHeader(usize),
    #[error("segment announces {len} payload bytes, {remaining} left")]
    TruncatedPayload { len: u32, remaining: usize },
    #[error("unknown segment command {0}")]
    UnknownCommand(u8),
    #[error("message needs {fragments} fragments, more than the window or 255 allow")]
    MessageTooBig { fragments: usize },
    #[error("no message received")]
    RecvQueueEmpty,
    #[error("the next message still misses fragments")]
    ExpectingFragment,
    #[error("message of {need} bytes does not fit a {have}-byte buffer")]
    BufferTooSmall { need: usize, have: usize },
    #[error("output: {0}")]
    Output(#[from] io::Error),
}
