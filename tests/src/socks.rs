//! A minimal blocking SOCKS5 client (RFC 1928/1929), so tests can see the exact reply
//! code paqet sends, which curl only paraphrases.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub const REPLY_SUCCEEDED: u8 = 0;
pub const REPLY_GENERAL_FAILURE: u8 = 1;
pub const REPLY_NOT_ALLOWED: u8 = 2;
pub const REPLY_CONNECTION_REFUSED: u8 = 5;
pub const REPLY_TTL_EXPIRED: u8 = 6;
pub const REPLY_COMMAND_NOT_SUPPORTED: u8 = 7;

/// Connects to the SOCKS port and gets through the greeting (and login, with `auth`);
/// the stream is ready for a request. Reads time out after `read_timeout`.
pub fn greet(proxy: SocketAddr, auth: Option<(&str, &str)>, read_timeout: Duration) -> Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(5)).context("connecting to the SOCKS port")?;
    s.set_read_timeout(Some(read_timeout))?;
    let method = if auth.is_some() { 2u8 } else { 0u8 };
    s.write_all(&[5, 1, method])?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).context("reading the method choice")?;
    if choice[1] != method {
        bail!("proxy refused auth method {method}: chose {}", choice[1]);
    }
    if let Some((user, pass)) = auth {
        let mut msg = vec![1, user.len() as u8];
        msg.extend_from_slice(user.as_bytes());
        msg.push(pass.len() as u8);
        msg.extend_from_slice(pass.as_bytes());
        s.write_all(&msg)?;
        let mut status = [0u8; 2];
        s.read_exact(&mut status)?;
        if status[1] != 0 {
            bail!("authentication failed");
        }
    }
    Ok(s)
}

/// Connects through the proxy. `Ok(Err(code))` is a SOCKS refusal with its reply code.
pub fn connect(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
    cmd: u8,
) -> Result<std::result::Result<TcpStream, u8>> {
    let mut s = greet(proxy, auth, Duration::from_secs(60))?;
    let mut req = vec![5, cmd, 0];
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            req.push(1);
            req.extend_from_slice(&ip.octets());
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            req.push(4);
            req.extend_from_slice(&ip.octets());
        }
        Err(_) => {
            req.push(3);
            req.push(host.len() as u8);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).context("reading the SOCKS reply")?;
    let addr_len = match head[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)?;
            l[0] as usize
        }
        other => bail!("bad address type {other} in reply"),
    };
    let mut rest = vec![0u8; addr_len + 2];
    s.read_exact(&mut rest)?;
    if head[1] != REPLY_SUCCEEDED {
        return Ok(Err(head[1]));
    }
    Ok(Ok(s))
}

/// `GET /bytes/len` through the proxy; returns the body's sha256 (hex) and length.
pub fn fetch_bytes(proxy: SocketAddr, host: &str, port: u16, len: u64) -> Result<(String, u64)> {
    fetch_bytes_auth(proxy, host, port, len, None)
}

/// [`fetch_bytes`] with username/password authentication.
pub fn fetch_bytes_auth(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    len: u64,
    auth: Option<(&str, &str)>,
) -> Result<(String, u64)> {
    use sha2::{Digest, Sha256};
    let mut s = match connect(proxy, host, port, auth, 1)? {
        Ok(s) => s,
        Err(code) => bail!("SOCKS refused with reply code {code}"),
    };
    write!(
        s,
        "GET /bytes/{len} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).context("reading the response")?;
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end")?
        + 4;
    let body = &all[split..];
    Ok((crate::pattern::hex(&Sha256::digest(body)), body.len() as u64))
}
