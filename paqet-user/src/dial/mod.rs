//! The server's edge: check the target against the policy, resolve it, connect within
//! the timeout, and relay. The policy is applied to every resolved address, so a name
//! that resolves to loopback is refused like the address itself.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::TargetPolicy;
use crate::engine::StreamId;
use crate::engine::frame::{OpenError, TargetAddr};
use crate::node::{Node, relay_stream};
use crate::transport::Transport;

pub struct Dialer {
    pub policy: TargetPolicy,
    pub timeout: Duration,
}

impl Dialer {
    /// Dials every stream clients open, until the node stops.
    pub async fn serve<T: Transport>(
        self: Arc<Self>,
        node: Arc<Node<T>>,
        mut opened: mpsc::UnboundedReceiver<(StreamId, TargetAddr)>,
    ) {
        while let Some((id, target)) = opened.recv().await {
            let this = self.clone();
            let node = node.clone();
            tokio::spawn(async move { this.dial_and_relay(node, id, target).await });
        }
    }

    async fn dial_and_relay<T: Transport>(&self, node: Arc<Node<T>>, id: StreamId, target: TargetAddr) {
        let dialled = match tokio::time::timeout(self.timeout, self.dial(&target)).await {
            Ok(result) => result,
            Err(_) => Err(OpenError::TtlExpired),
        };
        let Some(waker) = node.stream_waker(id) else { return };
        match dialled {
            Ok(tcp) => {
                if node.with_engine(|e, _| e.accept_stream(id)).is_err() {
                    return;
                }
                tracing::debug!(stream = %id, %target, "target connected");
                relay_stream(node, id, waker, tcp).await;
            }
            Err(why) => {
                tracing::info!(stream = %id, %target, ?why, "target refused");
                let _ = node.with_engine(|e, _| e.refuse_stream(id, why));
            }
        }
    }

    async fn dial(&self, target: &TargetAddr) -> Result<TcpStream, OpenError> {
        let candidates = resolve(target).await?;
        let allowed: Vec<SocketAddr> = candidates.iter().copied().filter(|a| self.policy.permits(*a)).collect();
        if allowed.is_empty() {
            return Err(OpenError::NotAllowed);
        }
        let mut last = OpenError::HostUnreachable;
        for addr in allowed {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = open_error_for(&e),
            }
        }
        Err(last)
    }
}

async fn resolve(target: &TargetAddr) -> Result<Vec<SocketAddr>, OpenError> {
    match target {
        TargetAddr::Ip(addr) => Ok(vec![*addr]),
        TargetAddr::Domain(host, port) => match tokio::net::lookup_host((host.as_str(), *port)).await {
            Ok(addrs) => Ok(addrs.collect()),
            Err(_) => Err(OpenError::HostUnreachable),
        },
    }
}

fn open_error_for(e: &io::Error) -> OpenError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => OpenError::ConnectionRefused,
        io::ErrorKind::NetworkUnreachable => OpenError::NetworkUnreachable,
        io::ErrorKind::HostUnreachable => OpenError::HostUnreachable,
        io::ErrorKind::TimedOut => OpenError::TtlExpired,
        _ => OpenError::GeneralFailure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn policy_refuses_loopback_even_by_name() {
        let dialer = Dialer {
            policy: TargetPolicy::default(),
            timeout: Duration::from_secs(2),
        };
        let by_ip = dialer.dial(&TargetAddr::Ip("127.0.0.1:9".parse().unwrap())).await;
        assert_eq!(by_ip.err(), Some(OpenError::NotAllowed));
        let by_name = dialer.dial(&TargetAddr::Domain("localhost".into(), 9)).await;
        assert_eq!(by_name.err(), Some(OpenError::NotAllowed));
    }

    #[tokio::test]
    async fn closed_port_is_connection_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let dialer = Dialer {
            policy: TargetPolicy {
                allow: vec![],
                deny: vec![],
            },
            timeout: Duration::from_secs(2),
        };
        assert_eq!(
            dialer.dial(&TargetAddr::Ip(addr)).await.err(),
            Some(OpenError::ConnectionRefused)
        );
    }
}
