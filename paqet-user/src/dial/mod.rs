//! The server's edge: check the target against the policy, resolve it, connect within
//! the timeout, and relay. The policy is applied to every resolved address, so a name
//! that resolves to loopback or to the server itself is refused like the address itself;
//! the server's own addresses are re-read as they change ([`own`]).

pub mod limits;
pub mod own;
pub mod udp;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::{RuleSource, TargetPolicy};
use crate::engine::StreamId;
use crate::engine::frame::{OpenError, TargetAddr};
use crate::node::{Node, relay_stream};
use crate::transport::Transport;
use limits::{DialLimits, DialPermit};

pub struct Dialer {
    pub policy: TargetPolicy,
    pub timeout: Duration,
    pub limits: Arc<DialLimits>,
    /// Streams refused because the target policy denies every address of the target.
    pub refused_by_policy: std::sync::atomic::AtomicU64,
}

impl Dialer {
    pub fn new(policy: TargetPolicy, timeout: Duration) -> Dialer {
        Dialer {
            policy,
            timeout,
            limits: Arc::new(DialLimits::default()),
            refused_by_policy: Default::default(),
        }
    }

    /// Dials every stream clients open, until the node stops.
    pub async fn serve<T: Transport>(
        self: Arc<Self>,
        node: Arc<Node<T>>,
        mut opened: mpsc::UnboundedReceiver<(StreamId, TargetAddr)>,
    ) {
        while let Some((id, target)) = opened.recv().await {
            let Some(permit) = self.limits.admit(id.peer) else {
                tracing::debug!(stream = %id, %target, "refused: too many dials in progress");
                let _ = node.with_engine(|e, _| e.refuse_stream(id, OpenError::GeneralFailure));
                continue;
            };
            let this = self.clone();
            let node = node.clone();
            tokio::spawn(async move { this.dial_and_relay(node, id, target, permit).await });
        }
    }

    async fn dial_and_relay<T: Transport>(
        &self,
        node: Arc<Node<T>>,
        id: StreamId,
        target: TargetAddr,
        permit: DialPermit,
    ) {
        let dialled = match tokio::time::timeout(self.timeout, self.dial(&target)).await {
            Ok(result) => result,
            Err(_) => Err(OpenError::TtlExpired),
        };
        drop(permit);
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

    /// Says at start (once per server, however many engines it runs) what the policy opens that the defaults would deny (WARN), and
    /// which ALLOW entries open nothing because a deny rule is more specific (WARN).
    pub fn log_policy(&self) {
        let own = own::addresses().unwrap_or_default();
        let p = &self.policy;
        let list =
            |rules: &[crate::config::TargetRule]| rules.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",");
        tracing::info!(
            allow = %list(&p.allow),
            deny = %list(&p.deny),
            own_addresses = own.len(),
            "target policy: loopback, this host, link-local, private and shared ranges, metadata and the \
             server's own addresses are denied; the most specific rule wins"
        );
        for (allow, source, default) in p.opened_defaults(&own) {
            tracing::warn!(%allow, overrides = %default, "ALLOW opens a target that the {source} rule would refuse");
        }
        for allow in &p.allow {
            if let Some((source, deny)) = p.shadowing(allow, &own) {
                let source = match source {
                    RuleSource::Deny => "DENY".to_owned(),
                    other => other.to_string(),
                };
                tracing::warn!(%allow, %deny, "this ALLOW entry opens nothing: {source} {deny} is at least as specific");
            }
        }
    }

    async fn dial(&self, target: &TargetAddr) -> Result<TcpStream, OpenError> {
        let candidates = resolve(target).await?;
        let Some(own) = own::addresses() else {
            tracing::warn!(%target, "refused: this host's addresses could not be read");
            return Err(OpenError::NotAllowed);
        };
        let mut allowed = Vec::new();
        for addr in candidates {
            let verdict = self.policy.decide(addr, &own);
            if verdict.allowed {
                allowed.push(addr);
            } else {
                tracing::debug!(%target, %addr, rule = %verdict, "address refused by the target policy");
            }
        }
        if allowed.is_empty() {
            self.refused_by_policy
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        let dialer = Dialer::new(TargetPolicy::default(), Duration::from_secs(2));
        let by_ip = dialer.dial(&TargetAddr::Ip("127.0.0.1:9".parse().unwrap())).await;
        assert_eq!(by_ip.err(), Some(OpenError::NotAllowed));
        let by_name = dialer.dial(&TargetAddr::Domain("localhost".into(), 9)).await;
        assert_eq!(by_name.err(), Some(OpenError::NotAllowed));
    }

    fn dialer(allow: &str, deny: &str) -> Dialer {
        let rules = |s: &str| {
            s.split(',')
                .filter(|r| !r.is_empty())
                .map(|r| r.parse().unwrap())
                .collect()
        };
        Dialer::new(
            TargetPolicy {
                allow: rules(allow),
                deny: rules(deny),
            },
            Duration::from_secs(2),
        )
    }

    #[tokio::test]
    async fn closed_port_is_connection_refused_when_allowed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let dialer = dialer(&format!("127.0.0.1/32:{}", addr.port()), "");
        assert_eq!(
            dialer.dial(&TargetAddr::Ip(addr)).await.err(),
            Some(OpenError::ConnectionRefused)
        );
    }

    #[tokio::test]
    async fn an_exact_allow_reaches_a_listener_on_loopback_and_nothing_else_there() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dialer = dialer(&format!("127.0.0.1/32:{}", addr.port()), "");
        assert!(dialer.dial(&TargetAddr::Ip(addr)).await.is_ok());
        let other = TargetAddr::Ip(SocketAddr::new(addr.ip(), addr.port().wrapping_add(1).max(1)));
        assert_eq!(dialer.dial(&other).await.err(), Some(OpenError::NotAllowed));
    }

    #[tokio::test]
    async fn the_hosts_own_addresses_are_refused() {
        let own = own::addresses().expect("this host's addresses");
        assert!(
            own.iter().any(|ip| ip.is_loopback()),
            "getifaddrs lists loopback: {own:?}"
        );
        let dialer = dialer("", "");
        for ip in own.iter() {
            let target = TargetAddr::Ip(SocketAddr::new(*ip, 9));
            assert_eq!(dialer.dial(&target).await.err(), Some(OpenError::NotAllowed), "{ip}");
        }
    }
}
