//! UDP test support: a SOCKS5 UDP ASSOCIATE client (RFC 1928 §7) that checks what it gets
//! back byte for byte, and a UDP echo server that remembers what reached it.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// The largest payload of one UDP datagram over IPv4 (65,535 − 20 − 8).
pub const MAX_UDP_PAYLOAD_V4: usize = 65_507;

/// A target as a SOCKS header names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Ip(SocketAddr),
    Name(String, u16),
}

impl Target {
    /// RSV, FRAG and the address, as the client sends it.
    pub fn header(&self, frag: u8) -> Vec<u8> {
        let mut h = vec![0, 0, frag];
        match self {
            Target::Ip(SocketAddr::V4(a)) => {
                h.push(1);
                h.extend_from_slice(&a.ip().octets());
                h.extend_from_slice(&a.port().to_be_bytes());
            }
            Target::Ip(SocketAddr::V6(a)) => {
                h.push(4);
                h.extend_from_slice(&a.ip().octets());
                h.extend_from_slice(&a.port().to_be_bytes());
            }
            Target::Name(name, port) => {
                h.push(3);
                h.push(name.len() as u8);
                h.extend_from_slice(name.as_bytes());
                h.extend_from_slice(&port.to_be_bytes());
            }
        }
        h
    }
}

/// Splits a reply datagram into its source and payload.
pub fn parse_reply(d: &[u8]) -> Result<(Target, FragAndData<'_>)> {
    if d.len() < 4 {
        bail!("reply of {} bytes has no header", d.len());
    }
    let frag = d[2];
    let (target, used) = match d[3] {
        1 if d.len() >= 10 => {
            let ip = Ipv4Addr::new(d[4], d[5], d[6], d[7]);
            (
                Target::Ip(SocketAddr::new(ip.into(), u16::from_be_bytes([d[8], d[9]]))),
                10,
            )
        }
        4 if d.len() >= 22 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&d[4..20]);
            let ip = Ipv6Addr::from(o);
            (
                Target::Ip(SocketAddr::new(ip.into(), u16::from_be_bytes([d[20], d[21]]))),
                22,
            )
        }
        3 if d.len() >= 5 && d.len() >= 7 + d[4] as usize => {
            let n = d[4] as usize;
            let name = String::from_utf8_lossy(&d[5..5 + n]).into_owned();
            (Target::Name(name, u16::from_be_bytes([d[5 + n], d[6 + n]])), 7 + n)
        }
        other => bail!("reply with address type {other} or truncated ({} bytes)", d.len()),
    };
    Ok((target, FragAndData { frag, data: &d[used..] }))
}

pub struct FragAndData<'a> {
    pub frag: u8,
    pub data: &'a [u8],
}

/// An open association: the control connection and the relay endpoint.
pub struct Association {
    pub control: TcpStream,
    /// BND.ADDR:BND.PORT from the reply.
    pub relay: SocketAddr,
    pub socket: UdpSocket,
}

/// Asks the SOCKS server at `proxy` for a UDP association, with optional credentials;
/// `Ok(Err(code))` is a refusal. The local UDP socket is bound on `local_ip`.
pub fn associate(
    proxy: SocketAddr,
    auth: Option<(&str, &str)>,
    local_ip: IpAddr,
) -> Result<std::result::Result<Association, u8>> {
    let mut s = crate::socks::greet(proxy, auth, Duration::from_secs(20))?;
    // DST.ADDR 0.0.0.0:0: the client does not know its address yet (RFC 1928 allows it).
    s.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).context("reading the SOCKS reply")?;
    let relay_ip: IpAddr = match head[3] {
        1 => {
            let mut o = [0u8; 4];
            s.read_exact(&mut o)?;
            Ipv4Addr::from(o).into()
        }
        4 => {
            let mut o = [0u8; 16];
            s.read_exact(&mut o)?;
            Ipv6Addr::from(o).into()
        }
        other => bail!("reply with address type {other}"),
    };
    let mut port = [0u8; 2];
    s.read_exact(&mut port)?;
    if head[1] != 0 {
        return Ok(Err(head[1]));
    }
    let relay = SocketAddr::new(relay_ip, u16::from_be_bytes(port));
    let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(Ok(Association {
        control: s,
        relay,
        socket,
    }))
}

impl Association {
    pub fn send(&self, target: &Target, frag: u8, payload: &[u8]) -> Result<()> {
        let mut d = target.header(frag);
        d.extend_from_slice(payload);
        self.socket.send_to(&d, self.relay).context("sending to the relay")?;
        Ok(())
    }

    /// The next reply (source, payload), or `None` after the socket's read timeout.
    pub fn recv(&self) -> Result<Option<(Target, Vec<u8>)>> {
        let mut buf = vec![0u8; 1 << 16];
        match self.socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                if from != self.relay {
                    bail!("a datagram from {from}, not the relay {}", self.relay);
                }
                let (source, rest) = parse_reply(&buf[..n])?;
                if rest.frag != 0 {
                    bail!("reply with FRAG {}", rest.frag);
                }
                Ok(Some((source, rest.data.to_vec())))
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `payload` to an echo server at `target` and waits for exactly it to come
    /// back from `expect_source`, up to `tries` times (UDP may lose a datagram; a wrong
    /// byte or source is an error at once).
    pub fn echo(&self, target: &Target, expect_source: SocketAddr, payload: &[u8], tries: usize) -> Result<()> {
        for _ in 0..tries {
            self.send(target, 0, payload)?;
            // Replies to earlier tries may still come: skip those of another length.
            for _ in 0..4 {
                match self.recv()? {
                    None => break,
                    Some((source, data)) => {
                        // Every reply, even a stale one, must come from the target.
                        if source != Target::Ip(expect_source) {
                            bail!("reply from {source:?}, expected {expect_source}");
                        }
                        // A reply to an earlier try of another size.
                        if data.len() != payload.len() {
                            continue;
                        }
                        if data != payload {
                            let at = data.iter().zip(payload).position(|(a, b)| a != b);
                            bail!("{} bytes came back different (first at {at:?})", payload.len());
                        }
                        return Ok(());
                    }
                }
            }
        }
        bail!("no echo of {} bytes to {target:?} after {tries} tries", payload.len())
    }
}

/// A UDP echo server in a namespace; remembers (bounded) what reached it. Stops on drop.
pub struct UdpEcho {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const SEEN_MAX: usize = 4096;
/// What a stranger's copy starts with.
pub const STRANGER_PREFIX: &[u8] = b"stranger:";

impl UdpEcho {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<UdpEcho> {
        Self::start_with_stranger(ns, addr, None)
    }

    /// With `stranger`: before each echo, the same bytes behind `STRANGER_PREFIX` are
    /// sent to the sender from another port of this host (`stranger`), as a third party
    /// would, which a port-restricted NAT must not let through.
    pub fn start_with_stranger(ns: &Netns, addr: SocketAddr, stranger: Option<u16>) -> Result<UdpEcho> {
        // A socket opened in the namespace stays there, whichever thread serves it.
        let socket = ns.run(|| UdpSocket::bind(addr))??;
        let other = match stranger {
            Some(port) => Some(ns.run(|| UdpSocket::bind(SocketAddr::new(addr.ip(), port)))??),
            None => None,
        };
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    if let Some(other) = &other {
                        let mut d = STRANGER_PREFIX.to_vec();
                        d.extend_from_slice(&buf[..n]);
                        let _ = other.send_to(&d, from);
                    }
                    let _ = socket.send_to(&buf[..n], from);
                    let mut seen = seen2.lock().unwrap_or_else(|p| p.into_inner());
                    if seen.len() < SEEN_MAX {
                        seen.push(buf[..n].to_vec());
                    }
                }
            }
        });
        Ok(UdpEcho {
            addr,
            stop,
            seen,
            thread: Some(thread),
        })
    }

    /// Whether a datagram with exactly this payload reached the server.
    pub fn saw(&self, payload: &[u8]) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|d| d == payload)
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Payload bytes that differ at every offset and between datagrams.
pub fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}
