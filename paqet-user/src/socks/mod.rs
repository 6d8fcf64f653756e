//! The client's edge: the SOCKS5 front end (fast-socks5). CONNECT only; targets travel
//! to the server unresolved (socks5h semantics), and the server's answer becomes the
//! SOCKS reply code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fast_socks5::server::{Socks5ServerProtocol, SocksServerError};
use fast_socks5::util::target_addr::TargetAddr as SocksTarget;
use fast_socks5::{ReplyError, Socks5Command};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};

use crate::config::Credentials;
use crate::engine::frame::{OpenError, TargetAddr};
use crate::node::{Node, relay_stream};
use crate::transport::Transport;

#[derive(Debug, thiserror::Error)]
pub enum SocksError {
    #[error("SOCKS negotiation failed: {0}")]
    Protocol(#[from] SocksServerError),
}

pub struct SocksFrontend {
    pub credentials: Option<Credentials>,
    /// How long to wait for the server's answer before replying "TTL expired" (timeout).
    pub open_timeout: Duration,
}

impl SocksFrontend {
    /// Accepts SOCKS clients until the listener fails or the task is dropped.
    pub async fn serve<T: Transport>(self: Arc<Self>, listener: TcpListener, node: Arc<Node<T>>) {
        loop {
            match listener.accept().await {
                Ok((sock, peer)) => {
                    let this = self.clone();
                    let node = node.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.handle(sock, &node).await {
                            tracing::debug!(%peer, "SOCKS client: {e}");
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends are transient; back off instead of spinning.
                    tracing::warn!("SOCKS accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn handle<T: Transport>(&self, sock: TcpStream, node: &Arc<Node<T>>) -> Result<(), SocksError> {
        let _ = sock.set_nodelay(true);
        let proto = match &self.credentials {
            None => Socks5ServerProtocol::accept_no_auth(sock).await?,
            Some(creds) => {
                let check = |user: String, pass: String| credentials_match(creds, &user, &pass);
                Socks5ServerProtocol::accept_password_auth(sock, check).await?.0
            }
        };
        let (proto, command, target) = proto.read_command().await?;
        if command != Socks5Command::TCPConnect {
            proto.reply_error(&ReplyError::CommandNotSupported).await?;
            return Ok(());
        }
        let target = match target {
            SocksTarget::Ip(addr) => TargetAddr::Ip(addr),
            SocksTarget::Domain(host, port) => TargetAddr::Domain(host, port),
        };
        let (id, waker, reply) = match node.open_stream(&target) {
            Ok(opened) => opened,
            Err(e) => {
                // The server is known to be unreachable (or the stream could not be
                // queued): the application hears at once, not after a timeout.
                tracing::debug!(%target, "stream not opened: {e}");
                proto.reply_error(&ReplyError::GeneralFailure).await?;
                return Ok(());
            }
        };
        let answer = tokio::time::timeout(self.open_timeout, reply).await;
        let error = match answer {
            Ok(Ok(Ok(()))) => {
                let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
                let tcp = proto.reply_success(unspecified).await?;
                tracing::debug!(stream = %id, %target, "stream open");
                relay_stream(node.clone(), id, waker, tcp).await;
                return Ok(());
            }
            Ok(Ok(Err(why))) => reply_for(why),
            // The stream closed without an answer (reset, or the server went away).
            Ok(Err(_)) => ReplyError::GeneralFailure,
            Err(_) => {
                node.reset_stream(id);
                ReplyError::TtlExpired
            }
        };
        tracing::debug!(stream = %id, %target, ?error, "stream refused");
        proto.reply_error(&error).await?;
        Ok(())
    }
}

/// Both fields are always compared, in constant time, so timing reveals nothing.
fn credentials_match(expected: &Credentials, user: &str, pass: &str) -> bool {
    let user_ok = expected.user.as_bytes().ct_eq(user.as_bytes());
    let pass_ok = expected.pass.as_bytes().ct_eq(pass.as_bytes());
    (user_ok & pass_ok).into()
}

pub fn reply_for(why: OpenError) -> ReplyError {
    match why {
        OpenError::GeneralFailure => ReplyError::GeneralFailure,
        OpenError::NotAllowed => ReplyError::ConnectionNotAllowed,
        OpenError::NetworkUnreachable => ReplyError::NetworkUnreachable,
        OpenError::HostUnreachable => ReplyError::HostUnreachable,
        OpenError::ConnectionRefused => ReplyError::ConnectionRefused,
        OpenError::TtlExpired => ReplyError::TtlExpired,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_compare_both_fields() {
        let c = Credentials {
            user: "alice".into(),
            pass: "s3cret".into(),
        };
        assert!(credentials_match(&c, "alice", "s3cret"));
        assert!(!credentials_match(&c, "alice", "s3cret!"));
        assert!(!credentials_match(&c, "bob", "s3cret"));
        assert!(!credentials_match(&c, "", ""));
    }

    #[test]
    fn every_open_error_has_its_own_reply() {
        use OpenError::*;
        let all = [
            GeneralFailure,
            NotAllowed,
            NetworkUnreachable,
            HostUnreachable,
            ConnectionRefused,
            TtlExpired,
        ];
        let codes: std::collections::HashSet<String> = all.iter().map(|e| format!("{:?}", reply_for(*e))).collect();
        assert_eq!(codes.len(), all.len());
    }
}
