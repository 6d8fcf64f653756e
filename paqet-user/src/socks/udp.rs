//! SOCKS5 UDP ASSOCIATE (RFC 1928 §7) on the client's SOCKS port.
//!
//! The relay endpoint is a UDP socket on the IP the control connection reached (which
//! is SOCKS_ADDR's IP, or, for a SOCKS_ADDR of 0.0.0.0, the address the client used);
//! the reply's BND.ADDR names it. The association is one flow to the server and lives as
//! long as its TCP control connection. Datagrams are taken only from the control
//! connection's IP; the first one fixes the client's port (RFC 1928 lets a client send
//! 0.0.0.0:0 in its request, so the request's address cannot be relied on), and a later
//! one from the same IP moves it. A datagram with FRAG ≠ 0 is dropped and counted:
//! paqet does not implement SOCKS-level fragmentation (it carries whole datagrams up to
//! 64 KiB itself). Replies carry their true source in the header.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fast_socks5::ReplyError;
use fast_socks5::server::{Socks5ServerProtocol, states};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};

use crate::engine::datagrams::DatagramError;
use crate::engine::frame::{FrameError, TargetAddr};
use crate::node::Node;
use crate::transport::Transport;

/// RSV (2) and FRAG (1) before the address.
const PREFIX_LEN: usize = 3;
/// Bytes a relay socket or a UDP forward's listener asks the kernel to buffer: a burst
/// from a fast application waits here while the engine seals.
const SOCKET_BUFFER: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UdpAssociateError {
    #[error("cannot open the UDP relay socket on {ip}: {error}")]
    Bind { ip: IpAddr, error: io::Error },
    #[error("SOCKS reply failed: {0}")]
    Reply(#[from] fast_socks5::server::SocksServerError),
    #[error("relay socket failed: {0}")]
    Io(#[from] io::Error),
}

/// One datagram from the SOCKS client: its FRAG field, target and payload.
#[derive(Debug, PartialEq, Eq)]
pub struct UdpRequest<'a> {
    pub frag: u8,
    pub target: TargetAddr,
    pub payload: &'a [u8],
}

/// Parses `RSV(2) FRAG(1) ATYP DST.ADDR DST.PORT DATA`.
pub fn parse_udp_request(buf: &[u8]) -> Result<UdpRequest<'_>, FrameError> {
    if buf.len() < PREFIX_LEN {
        return Err(FrameError::Truncated {
            need: PREFIX_LEN,
            have: buf.len(),
        });
    }
    let frag = buf[2];
    let (target, used) = TargetAddr::parse(&buf[PREFIX_LEN..])?;
    Ok(UdpRequest {
        frag,
        target,
        payload: &buf[PREFIX_LEN + used..],
    })
}

/// Appends the header of a reply from `source` (FRAG 0).
pub fn emit_udp_header(source: &TargetAddr, out: &mut Vec<u8>) -> Result<(), FrameError> {
    out.extend_from_slice(&[0, 0, 0]);
    source.emit(out)
}

fn bind_relay(ip: IpAddr) -> io::Result<UdpSocket> {
    bind_udp(SocketAddr::new(ip, 0))
}

/// A non-blocking UDP socket on `local` with buffers for bursts of large datagrams:
/// the association's relay socket, and a UDP forward's listener.
pub(crate) fn bind_udp(local: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(local),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&local.into())?;
    UdpSocket::from_std(socket.into())
}

/// Answers a UDP ASSOCIATE request and relays until the control connection closes.
/// `local` is where the control connection arrived, `control` who made it.
pub async fn associate<T: Transport>(
    node: Arc<Node<T>>,
    proto: Socks5ServerProtocol<TcpStream, states::CommandRead>,
    local: SocketAddr,
    control: SocketAddr,
) -> Result<(), UdpAssociateError> {
    let ip = local.ip().to_canonical();
    let udp = match bind_relay(ip) {
        Ok(udp) => udp,
        Err(error) => {
            proto.reply_error(&ReplyError::GeneralFailure).await?;
            return Err(UdpAssociateError::Bind { ip, error });
        }
    };
    let Some((flow, mut replies)) = node.datagrams.register() else {
        tracing::warn!("UDP ASSOCIATE refused: the client holds the most flows it may");
        proto.reply_error(&ReplyError::GeneralFailure).await?;
        return Ok(());
    };
    let relay = udp.local_addr()?;
    let mut tcp = match proto.reply_success(relay).await {
        Ok(tcp) => tcp,
        Err(e) => {
            node.datagrams.unregister(flow);
            return Err(e.into());
        }
    };
    let entry = node
        .datagrams
        .registry
        .add("socks-udp", relay.to_string(), control.to_string());
    let counters = entry.counters.clone();
    counters.flows.store(1, Ordering::Relaxed);
    tracing::debug!(%control, %relay, flow, "UDP association open");
    let client_ip = control.ip().to_canonical();
    let mut client: Option<SocketAddr> = None;
    let mut buf = vec![0u8; 1 << 16];
    let mut out: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut control_buf = [0u8; 64];
    let outcome = loop {
        tokio::select! {
            read = tcp.read(&mut control_buf) => match read {
                // The association ends with its control connection (RFC 1928 §7);
                // anything the client sends on it means nothing.
                Ok(0) | Err(_) => break Ok(()),
                Ok(_) => {}
            },
            received = udp.recv_from(&mut buf) => {
                let (n, from) = match received {
                    Ok(r) => r,
                    Err(e) => break Err(e.into()),
                };
                if from.ip().to_canonical() != client_ip {
                    counters.drop_one();
                    continue;
                }
                match parse_udp_request(&buf[..n]) {
                    Ok(req) if req.frag == 0 => {
                        client = Some(from);
                        match node.send_datagram(None, flow, &req.target, req.payload) {
                            Ok(()) => counters.up(req.payload.len()),
                            Err(e) => {
                                counters.drop_one();
                                if !matches!(e, DatagramError::NoSession) {
                                    tracing::debug!(flow, "datagram not sent: {e}");
                                }
                            }
                        }
                    }
                    // FRAG ≠ 0 or a header that does not parse: dropped, counted.
                    _ => counters.drop_one(),
                }
            }
            reply = replies.recv() => {
                let Some(reply) = reply else { break Ok(()) };
                let Some(to) = client else {
                    counters.drop_one();
                    continue;
                };
                out.clear();
                if emit_udp_header(&reply.addr, &mut out).is_err() {
                    counters.drop_one();
                    continue;
                }
                out.extend_from_slice(&reply.payload);
                match udp.send_to(&out, to).await {
                    Ok(_) => counters.down(reply.payload.len()),
                    // Too large for the client's side (a 65,507-byte reply plus its
                    // header over IPv4), or its socket is gone: UDP loses it.
                    Err(_) => counters.drop_one(),
                }
            }
        }
    };
    tracing::debug!(%control, %relay, flow, "UDP association closed");
    node.close_flow(flow);
    drop(entry);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(target: &TargetAddr, frag: u8) -> Vec<u8> {
        let mut out = Vec::new();
        emit_udp_header(target, &mut out).unwrap();
        out[2] = frag;
        out
    }

    #[test]
    fn headers_round_trip_for_ipv4_ipv6_and_names() {
        let targets = [
            TargetAddr::Ip("198.18.1.2:53".parse().unwrap()),
            TargetAddr::Ip("[2001:2:1::2]:7".parse().unwrap()),
            TargetAddr::Domain("origin.test".into(), 9),
        ];
        for (t, len) in targets.iter().zip([10, 22, 7 + 11]) {
            let mut d = header(t, 0);
            assert_eq!(d.len(), len, "{t}");
            d.extend_from_slice(b"payload");
            let req = parse_udp_request(&d).unwrap();
            assert_eq!(
                req,
                UdpRequest {
                    frag: 0,
                    target: t.clone(),
                    payload: b"payload"
                }
            );
            // An empty payload is a datagram too.
            let bare = header(t, 0);
            assert_eq!(parse_udp_request(&bare).unwrap().payload, b"");
            // Every truncation of the header is an error, never a panic.
            for cut in 0..bare.len() {
                assert!(parse_udp_request(&bare[..cut]).is_err(), "{t} cut at {cut}");
            }
        }
    }

    #[test]
    fn frag_is_reported_so_the_relay_can_drop_it_and_bad_address_types_fail() {
        let t = TargetAddr::Ip("198.18.1.2:53".parse().unwrap());
        assert_eq!(parse_udp_request(&header(&t, 1)).unwrap().frag, 1);
        assert_eq!(parse_udp_request(&header(&t, 0x81)).unwrap().frag, 0x81);
        assert!(parse_udp_request(&[0, 0, 0, 9, 1, 2, 3, 4, 0, 53]).is_err());
        assert!(parse_udp_request(&[0, 0, 0, 3, 0, 0, 53]).is_err(), "empty name");
        assert!(
            parse_udp_request(&[0, 0, 0, 3, 5, b'a', 0, 53]).is_err(),
            "name past the end"
        );
    }
}
