//! The 24-byte KCP segment header, byte-compatible with ikcp (all fields little-endian).

use super::ArqError;

pub const HEADER_LEN: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Push = 81,
    Ack = 82,
    /// Asks the peer for its window: ours saw it at zero for a while.
    WindowAsk = 83,
    /// Tells the peer our window, in answer to an ask or after draining a full queue.
    WindowTell = 84,
}

impl TryFrom<u8> for Command {
    type Error = ArqError;

    fn try_from(byte: u8) -> Result<Self, ArqError> {
        match byte {
            81 => Ok(Command::Push),
            82 => Ok(Command::Ack),
            83 => Ok(Command::WindowAsk),
            84 => Ok(Command::WindowTell),
            other => Err(ArqError::UnknownCommand(other)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub conv: u32,
    pub cmd: Command,
    /// Fragments of the same message still to come after this one.
    pub frg: u8,
    /// The sender's free receive window, in segments.
    pub wnd: u16,
    pub ts: u32,
    pub sn: u32,
    /// The sender's next expected sequence number: everything below it arrived.
    pub una: u32,
    pub len: u32,
}

fn u32_at(head: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]])
}

impl Header {
    /// Splits the first segment off `data`: its header, its payload and what follows.
    pub fn parse(data: &[u8]) -> Result<(Header, &[u8], &[u8]), ArqError> {
        let (head, rest) = data
            .split_first_chunk::<HEADER_LEN>()
            .ok_or(ArqError::TruncatedHeader(data.len()))?;
        let header = Header {
            conv: u32_at(head, 0),
            cmd: Command::try_from(head[4])?,
            frg: head[5],
            wnd: u16::from_le_bytes([head[6], head[7]]),
            ts: u32_at(head, 8),
            sn: u32_at(head, 12),
            una: u32_at(head, 16),
            len: u32_at(head, 20),
        };
        let (payload, rest) = rest
            .split_at_checked(header.len as usize)
            .ok_or(ArqError::TruncatedPayload {
                len: header.len,
                remaining: rest.len(),
            })?;
        Ok((header, payload, rest))
    }

    pub fn emit(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.conv.to_le_bytes());
        out[4] = self.cmd as u8;
        out[5] = self.frg;
        out[6..8].copy_from_slice(&self.wnd.to_le_bytes());
        out[8..12].copy_from_slice(&self.ts.to_le_bytes());
        out[12..16].copy_from_slice(&self.sn.to_le_bytes());
        out[16..20].copy_from_slice(&self.una.to_le_bytes());
        out[20..24].copy_from_slice(&self.len.to_le_bytes());
        out
    }
}

/// The segments of one datagram, each parsed and checked; stops after the first error.
pub struct Segments<'a> {
    rest: &'a [u8],
}

impl<'a> Segments<'a> {
    pub fn new(datagram: &'a [u8]) -> Self {
        Segments { rest: datagram }
    }
}

impl<'a> Iterator for Segments<'a> {
    type Item = Result<(Header, &'a [u8]), ArqError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match Header::parse(self.rest) {
            Ok((header, payload, rest)) => {
                self.rest = rest;
                Some(Ok((header, payload)))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            conv: 0x0102_0304,
            cmd: Command::Push,
            frg: 3,
            wnd: 0xbeef,
            ts: 0xdead_beef,
            sn: 7,
            una: 5,
            len: 3,
        }
    }

    fn datagram(header: &Header, payload: &[u8]) -> Vec<u8> {
        let mut out = header.emit().to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn round_trip_keeps_every_field_and_the_rest() {
        let mut bytes = datagram(&sample(), b"abc");
        bytes.extend_from_slice(b"tail");
        let (header, payload, rest) = Header::parse(&bytes).unwrap();
        assert_eq!(header, sample());
        assert_eq!(payload, b"abc");
        assert_eq!(rest, b"tail");
    }

    #[test]
    fn layout_is_little_endian_like_ikcp() {
        let bytes = sample().emit();
        assert_eq!(&bytes[0..4], &[4, 3, 2, 1]);
        assert_eq!(bytes[4], 81);
        assert_eq!(&bytes[6..8], &[0xef, 0xbe]);
        assert_eq!(&bytes[20..24], &[3, 0, 0, 0]);
    }

    #[test]
    fn truncated_header_is_rejected() {
        let bytes = datagram(&sample(), b"abc");
        for cut in 0..HEADER_LEN {
            assert!(matches!(
                Header::parse(&bytes[..cut]),
                Err(ArqError::TruncatedHeader(n)) if n == cut
            ));
        }
    }

    #[test]
    fn truncated_payload_is_rejected() {
        let bytes = datagram(&sample(), b"abc");
        assert!(matches!(
            Header::parse(&bytes[..HEADER_LEN + 2]),
            Err(ArqError::TruncatedPayload { len: 3, remaining: 2 })
        ));
        let huge = Header {
            len: u32::MAX,
            ..sample()
        };
        assert!(Header::parse(&datagram(&huge, b"abc")).is_err());
    }

    #[test]
    fn unknown_command_is_rejected() {
        let mut bytes = datagram(&sample(), b"abc");
        bytes[4] = 80;
        assert!(matches!(Header::parse(&bytes), Err(ArqError::UnknownCommand(80))));
    }

    #[test]
    fn segments_stop_at_the_first_error() {
        let mut bytes = datagram(&sample(), b"abc");
        bytes.extend_from_slice(&[1, 2, 3]);
        let parsed: Vec<_> = Segments::new(&bytes).collect();
        assert_eq!(parsed.len(), 2);
        assert!(parsed[0].is_ok());
        assert!(matches!(parsed[1], Err(ArqError::TruncatedHeader(3))));
    }
}
