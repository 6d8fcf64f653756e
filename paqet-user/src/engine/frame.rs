//! The relay's wire format above the outer UDP/TCP header, as parse/emit pairs.
//!
//! Three layers, outermost first:
//! - [`DataHeader`]: the 12 bytes before a session's AEAD ciphertext (receiver index and
//!   a header-protected counter). Handshake messages have no header of their own: they are
//!   recognised by *not* naming a live session (see `engine::Engine::handle_datagram`).
//! - [`Inner`]: the plaintext of one sealed packet: KCP segments, a stream reset, or a
//!   keepalive.
//! - [`StreamMsg`]: one KCP message on a stream: open, reply, data, fin.
//!
//! Everything here is a pure function of bytes; truncated and corrupt input yields
//! [`FrameError`], never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Length of the cleartext header in front of a data packet's ciphertext.
pub const DATA_HEADER_LEN: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("unknown {what} type {value}")]
    UnknownType { what: &'static str, value: u8 },
    #[error("malformed {0}")]
    Malformed(&'static str),
}

fn need(buf: &[u8], n: usize) -> Result<(), FrameError> {
    if buf.len() < n {
        return Err(FrameError::Truncated {
            need: n,
            have: buf.len(),
        });
    }
    Ok(())
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Cleartext prefix of a data packet: which session it belongs to and its (masked) nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub receiver_index: u32,
    pub masked_counter: u64,
}

impl DataHeader {
    pub fn parse(buf: &[u8]) -> Result<DataHeader, FrameError> {
        need(buf, DATA_HEADER_LEN)?;
        Ok(DataHeader {
            receiver_index: be_u32(&buf[0..4]),
            masked_counter: be_u64(&buf[4..12]),
        })
    }

    pub fn emit(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.receiver_index.to_be_bytes());
        out[4..12].copy_from_slice(&self.masked_counter.to_be_bytes());
    }
}

/// Plaintext of one sealed packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inner<'a> {
    /// One or more KCP segments of one conversation, exactly as KCP emitted them.
    Kcp(&'a [u8]),
    /// The sender has dropped this conversation; the receiver should too.
    Reset { conv: u32 },
    /// Keeps the session alive and proves the peer still knows it; the padding hides size.
    Keepalive { padding: &'a [u8] },
    /// The sender's receive buffer dropped this many datagrams lately: send less.
    Overflow { dropped: u32 },
    /// A fragment of a relayed UDP datagram, or the end of a flow (`engine::datagrams`).
    Datagram(super::datagrams::DatagramFrame<'a>),
}

const INNER_KCP: u8 = 1;
const INNER_RESET: u8 = 2;
const INNER_KEEPALIVE: u8 = 3;
const INNER_OVERFLOW: u8 = 4;
const INNER_DATAGRAM: u8 = 5;

impl<'a> Inner<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<Inner<'a>, FrameError> {
        need(buf, 1)?;
        let body = &buf[1..];
        match buf[0] {
            INNER_KCP => Ok(Inner::Kcp(body)),
            INNER_RESET => {
                need(body, 4)?;
                Ok(Inner::Reset { conv: be_u32(body) })
            }
            INNER_KEEPALIVE => Ok(Inner::Keepalive { padding: body }),
            INNER_OVERFLOW => {
                need(body, 4)?;
                Ok(Inner::Overflow { dropped: be_u32(body) })
            }
            INNER_DATAGRAM => Ok(Inner::Datagram(super::datagrams::DatagramFrame::parse(body)?)),
            other => Err(FrameError::UnknownType {
                what: "inner frame",
                value: other,
            }),
        }
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        match self {
            Inner::Kcp(segments) => {
                out.push(INNER_KCP);
                out.extend_from_slice(segments);
            }
            Inner::Reset { conv } => {
                out.push(INNER_RESET);
                out.extend_from_slice(&conv.to_be_bytes());
            }
            Inner::Keepalive { padding } => {
                out.push(INNER_KEEPALIVE);
                out.extend_from_slice(padding);
            }
            Inner::Overflow { dropped } => {
                out.push(INNER_OVERFLOW);
                out.extend_from_slice(&dropped.to_be_bytes());
            }
            Inner::Datagram(frame) => {
                out.push(INNER_DATAGRAM);
                frame.emit(out);
            }
        }
    }
}

/// Where a stream should be connected, as the SOCKS client named it. Domain names travel
/// unresolved so the server resolves them (socks5h semantics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetAddr {
    Ip(SocketAddr),
    Domain(String, u16),
}

impl std::fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetAddr::Ip(addr) => write!(f, "{addr}"),
            TargetAddr::Domain(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

impl TargetAddr {
    /// Parses the SOCKS-style address encoding; returns the address and bytes consumed.
    pub fn parse(buf: &[u8]) -> Result<(TargetAddr, usize), FrameError> {
        need(buf, 1)?;
        match buf[0] {
            ATYP_V4 => {
                need(buf, 7)?;
                let ip = Ipv4Addr::new(buf[1], buf[2], buf[3], buf[4]);
                Ok((TargetAddr::Ip(SocketAddr::new(ip.into(), be_u16(&buf[5..7]))), 7))
            }
            ATYP_V6 => {
                need(buf, 19)?;
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&buf[1..17]);
                let ip = Ipv6Addr::from(octets);
                Ok((TargetAddr::Ip(SocketAddr::new(ip.into(), be_u16(&buf[17..19]))), 19))
            }
            ATYP_DOMAIN => {
                need(buf, 2)?;
                let len = buf[1] as usize;
                need(buf, 2 + len + 2)?;
                let host = std::str::from_utf8(&buf[2..2 + len])
                    .map_err(|_| FrameError::Malformed("domain name is not UTF-8"))?;
                if host.is_empty() {
                    return Err(FrameError::Malformed("empty domain name"));
                }
                let port = be_u16(&buf[2 + len..4 + len]);
                Ok((TargetAddr::Domain(host.to_owned(), port), 4 + len))
            }
            other => Err(FrameError::UnknownType {
                what: "address",
                value: other,
            }),
        }
    }

    /// Appends the encoding. Domain names longer than 255 bytes cannot be expressed
    /// (SOCKS has the same limit), so they are refused before they get here.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        match self {
            TargetAddr::Ip(SocketAddr::V4(a)) => {
                out.push(ATYP_V4);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
            TargetAddr::Ip(SocketAddr::V6(a)) => {
                out.push(ATYP_V6);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
            TargetAddr::Domain(host, port) => {
                let len =
                    u8::try_from(host.len()).map_err(|_| FrameError::Malformed("domain name longer than 255 bytes"))?;
                out.push(ATYP_DOMAIN);
                out.push(len);
                out.extend_from_slice(host.as_bytes());
                out.extend_from_slice(&port.to_be_bytes());
            }
        }
        Ok(())
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            TargetAddr::Ip(a) => Some(a.ip()),
            TargetAddr::Domain(..) => None,
        }
    }
}

/// Why the server could not connect a stream; maps one to one onto SOCKS5 reply codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpenError {
    GeneralFailure = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
}

impl OpenError {
    fn from_u8(v: u8) -> Result<OpenError, FrameError> {
        Ok(match v {
            1 => OpenError::GeneralFailure,
            2 => OpenError::NotAllowed,
            3 => OpenError::NetworkUnreachable,
            4 => OpenError::HostUnreachable,
            5 => OpenError::ConnectionRefused,
            6 => OpenError::TtlExpired,
            other => {
                return Err(FrameError::UnknownType {
                    what: "open error",
                    value: other,
                });
            }
        })
    }
}

/// One KCP message of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMsg<'a> {
    /// First message from the client: connect to this target.
    Open(TargetAddr),
    /// The server's answer to `Open`.
    Reply(Result<(), OpenError>),
    Data(&'a [u8]),
    /// The sender will send no more data (TCP half-close).
    Fin,
}

const MSG_OPEN: u8 = 1;
const MSG_REPLY: u8 = 2;
const MSG_DATA: u8 = 3;
const MSG_FIN: u8 = 4;

/// Bytes a `StreamMsg::Data` adds in front of its payload.
pub const DATA_MSG_OVERHEAD: usize = 1;

impl<'a> StreamMsg<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<StreamMsg<'a>, FrameError> {
        need(buf, 1)?;
        let body = &buf[1..];
        match buf[0] {
            MSG_OPEN => {
                let (addr, used) = TargetAddr::parse(body)?;
                if used != body.len() {
                    return Err(FrameError::Malformed("trailing bytes after open"));
                }
                Ok(StreamMsg::Open(addr))
            }
            MSG_REPLY => {
                need(body, 1)?;
                match body[0] {
                    0 => Ok(StreamMsg::Reply(Ok(()))),
                    code => Ok(StreamMsg::Reply(Err(OpenError::from_u8(code)?))),
                }
            }
            MSG_DATA => Ok(StreamMsg::Data(body)),
            MSG_FIN => Ok(StreamMsg::Fin),
            other => Err(FrameError::UnknownType {
                what: "stream message",
                value: other,
            }),
        }
    }

    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let body = self.emit_head(out)?;
        out.extend_from_slice(body);
        Ok(())
    }

    /// Emits the message up to its data into `out` and returns the data, for a writer
    /// that copies both straight to where the message goes (the data can be large).
    pub fn emit_head(&self, out: &mut Vec<u8>) -> Result<&'a [u8], FrameError> {
        match self {
            StreamMsg::Open(addr) => {
                out.push(MSG_OPEN);
                addr.emit(out)?;
            }
            StreamMsg::Reply(result) => {
                out.push(MSG_REPLY);
                out.push(match result {
                    Ok(()) => 0,
                    Err(e) => *e as u8,
                });
            }
            StreamMsg::Data(bytes) => {
                out.push(MSG_DATA);
                return Ok(bytes);
            }
            StreamMsg::Fin => out.push(MSG_FIN),
        }
        Ok(&[])
    }
}

/// Payload of the client's handshake message (encrypted by the handshake itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitPayload {
    pub version: u8,
    /// The index the server must put on packets to this client.
    pub client_index: u32,
    /// Identifies the client process across re-handshakes, so streams survive them.
    pub instance: u64,
    /// Client's wall clock; the server refuses stale or replayed handshakes with it.
    pub unix_ms: u64,
    /// Zero for a new instance; else `crypto::resume_proof` of the client's latest
    /// session with this server, which the server demands before it moves the
    /// instance's streams to the new session.
    pub resume_proof: [u8; 16],
}

/// Payload of the server's handshake response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsePayload {
    pub version: u8,
    /// The index the client must put on packets to this server.
    pub server_index: u32,
}

pub const INIT_PAYLOAD_LEN: usize = 1 + 4 + 8 + 8 + 16;
pub const RESPONSE_PAYLOAD_LEN: usize = 1 + 4;

impl InitPayload {
    /// Parses the fixed fields; anything after them is padding.
    pub fn parse(buf: &[u8]) -> Result<InitPayload, FrameError> {
        need(buf, INIT_PAYLOAD_LEN)?;
        Ok(InitPayload {
            version: buf[0],
            client_index: be_u32(&buf[1..5]),
            instance: be_u64(&buf[5..13]),
            unix_ms: be_u64(&buf[13..21]),
            resume_proof: buf[21..37]
                .try_into()
                .map_err(|_| FrameError::Malformed("resume proof"))?,
        })
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        out.push(self.version);
        out.extend_from_slice(&self.client_index.to_be_bytes());
        out.extend_from_slice(&self.instance.to_be_bytes());
        out.extend_from_slice(&self.unix_ms.to_be_bytes());
        out.extend_from_slice(&self.resume_proof);
    }
}

impl ResponsePayload {
    pub fn parse(buf: &[u8]) -> Result<ResponsePayload, FrameError> {
        need(buf, RESPONSE_PAYLOAD_LEN)?;
        Ok(ResponsePayload {
            version: buf[0],
            server_index: be_u32(&buf[1..5]),
        })
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        out.push(self.version);
        out.extend_from_slice(&self.server_index.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_prefix_fails<T: std::fmt::Debug>(full: &[u8], parse: impl Fn(&[u8]) -> Result<T, FrameError>) {
        for len in 0..full.len() {
            assert!(
                parse(&full[..len]).is_err(),
                "prefix of {len} bytes parsed: {:?}",
                parse(&full[..len])
            );
        }
    }

    #[test]
    fn data_header_roundtrip_and_truncation() {
        let h = DataHeader {
            receiver_index: 0xdead_beef,
            masked_counter: 0x0102_0304_0506_0708,
        };
        let mut buf = [0u8; DATA_HEADER_LEN];
        h.emit(&mut buf);
        assert_eq!(DataHeader::parse(&buf), Ok(h));
        every_prefix_fails(&buf, DataHeader::parse);
    }

    #[test]
    fn inner_roundtrip() {
        for inner in [
            Inner::Kcp(b"segments"),
            Inner::Reset { conv: 77 },
            Inner::Keepalive { padding: b"xyz" },
            Inner::Overflow { dropped: 123_456 },
        ] {
            let mut out = Vec::new();
            inner.emit(&mut out);
            assert_eq!(Inner::parse(&out), Ok(inner));
        }
    }

    #[test]
    fn inner_rejects_unknown_and_truncated() {
        assert_eq!(Inner::parse(&[]), Err(FrameError::Truncated { need: 1, have: 0 }));
        assert_eq!(
            Inner::parse(&[9]),
            Err(FrameError::UnknownType {
                what: "inner frame",
                value: 9
            })
        );
        assert!(Inner::parse(&[INNER_RESET, 0, 0]).is_err());
    }

    #[test]
    fn target_addr_roundtrip_all_kinds() {
        let addrs = [
            TargetAddr::Ip("198.18.0.2:80".parse().unwrap()),
            TargetAddr::Ip("[2001:2::1]:443".parse().unwrap()),
            TargetAddr::Domain("origin.test".into(), 8080),
        ];
        for addr in addrs {
            let mut out = Vec::new();
            addr.emit(&mut out).unwrap();
            assert_eq!(TargetAddr::parse(&out), Ok((addr.clone(), out.len())));
            every_prefix_fails(&out, TargetAddr::parse);
        }
    }

    #[test]
    fn target_addr_rejects_bad_domains() {
        assert!(TargetAddr::parse(&[ATYP_DOMAIN, 0, 0, 80]).is_err(), "empty name");
        assert!(
            TargetAddr::parse(&[ATYP_DOMAIN, 2, 0xff, 0xfe, 0, 80]).is_err(),
            "not UTF-8"
        );
        assert!(TargetAddr::parse(&[7, 1, 2, 3]).is_err(), "unknown address type");
        let long = TargetAddr::Domain("a".repeat(256), 1);
        assert!(long.emit(&mut Vec::new()).is_err());
    }

    #[test]
    fn stream_msg_roundtrip() {
        let msgs = [
            StreamMsg::Open(TargetAddr::Domain("origin.test".into(), 80)),
            StreamMsg::Reply(Ok(())),
            StreamMsg::Reply(Err(OpenError::ConnectionRefused)),
            StreamMsg::Reply(Err(OpenError::NotAllowed)),
            StreamMsg::Data(b"hello"),
            StreamMsg::Fin,
        ];
        for msg in msgs {
            let mut out = Vec::new();
            msg.emit(&mut out).unwrap();
            assert_eq!(StreamMsg::parse(&out), Ok(msg));
        }
    }

    #[test]
    fn stream_msg_rejects_corrupt() {
        assert!(StreamMsg::parse(&[]).is_err());
        assert!(StreamMsg::parse(&[MSG_REPLY]).is_err());
        assert!(StreamMsg::parse(&[MSG_REPLY, 99]).is_err());
        assert!(
            StreamMsg::parse(&[MSG_OPEN, ATYP_V4, 1, 2, 3, 4, 0, 80, 0]).is_err(),
            "trailing byte"
        );
        assert!(StreamMsg::parse(&[200]).is_err());
    }

    #[test]
    fn handshake_payloads_roundtrip_and_truncation() {
        let init = InitPayload {
            version: 1,
            client_index: 5,
            instance: 6,
            unix_ms: 7,
            resume_proof: [8; 16],
        };
        let mut out = Vec::new();
        init.emit(&mut out);
        assert_eq!(InitPayload::parse(&out), Ok(init));
        every_prefix_fails(&out, InitPayload::parse);

        let resp = ResponsePayload {
            version: 1,
            server_index: 9,
        };
        let mut out = Vec::new();
        resp.emit(&mut out);
        assert_eq!(ResponsePayload::parse(&out), Ok(resp));
        every_prefix_fails(&out, ResponsePayload::parse);
    }
}
