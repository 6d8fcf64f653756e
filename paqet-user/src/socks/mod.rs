//! The client's edge: the SOCKS5 front end (fast-socks5). CONNECT and UDP ASSOCIATE
//! (`udp`); targets travel to the server unresolved (socks5h semantics), and the
//! server's answer becomes the SOCKS reply code.
//!
//! Hardened against strangers on the port (see `gate` and `auth`): a handshake must
//! finish within 10 s, at most a quarter of the descriptors below the watermark (16 to
//! 4,096) may be pending at once (the oldest is closed beyond),
//! new connections are shed above 90 % of the open-file limit, credentials are compared
//! as fixed-size digests, and repeated failures from one source wait longer for their
//! answer.

pub mod auth;
pub mod gate;
pub mod udp;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use fast_socks5::server::{
    AuthMethodSuccessState, PasswordAuthentication, Socks5ServerProtocol, SocksServerError, states,
};
use fast_socks5::util::target_addr::TargetAddr as SocksTarget;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Credentials;
use crate::engine::frame::{OpenError, TargetAddr};
use crate::node::{Node, Runner, relay_stream};
use crate::transport::Transport;

use self::auth::{FailureThrottle, Verifier};
use self::gate::{Conn, Gate, HandshakeError, Limits};

#[derive(Debug, thiserror::Error)]
pub enum SocksError {
    #[error("SOCKS negotiation failed: {0}")]
    Protocol(#[from] SocksServerError),
    #[error("SOCKS {0}")]
    Handshake(#[from] HandshakeError<SocksServerError>),
    #[error("UDP ASSOCIATE: {0}")]
    Udp(#[from] udp::UdpAssociateError),
}

pub struct SocksFrontend {
    pub credentials: Option<Credentials>,
    /// How long to wait for the server's answer before replying "TTL expired" (timeout).
    pub open_timeout: Duration,
}

/// Greeting, method choice, authentication (when configured) and the request: what a
/// connection must finish before it counts as a client.
pub struct Handshaker {
    verifier: Option<Verifier>,
    throttle: FailureThrottle,
}

/// A finished handshake: the protocol state to reply on, the command and its target.
pub type Request<S> = (Socks5ServerProtocol<S, states::CommandRead>, Socks5Command, SocksTarget);

impl Handshaker {
    pub fn new(credentials: Option<&Credentials>) -> Handshaker {
        Handshaker {
            verifier: credentials.map(Verifier::new),
            throttle: FailureThrottle::default(),
        }
    }

    pub async fn handshake<S>(&self, sock: S, peer: IpAddr) -> Result<Request<S>, SocksServerError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let proto = match &self.verifier {
            None => Socks5ServerProtocol::accept_no_auth(sock).await?,
            Some(verifier) => {
                let (user, pass, auth) = Socks5ServerProtocol::start(sock)
                    .negotiate_auth(&[PasswordAuthentication])
                    .await?
                    .read_username_password()
                    .await?;
                if verifier.matches(&user, &pass) {
                    self.throttle.succeeded(peer);
                    auth.accept().await?.finish_auth()
                } else {
                    // Guessing from one source gets slower and slower (bounded by the
                    // handshake deadline, which still closes the connection).
                    let delay = self.throttle.failed(peer, tokio::time::Instant::now().into_std());
                    tracing::debug!(%peer, ?delay, "SOCKS authentication failed");
                    tokio::time::sleep(delay).await;
                    auth.reject().await?;
                    return Err(SocksServerError::AuthenticationRejected);
                }
            }
        };
        proto.read_command().await
    }
}

/// Accepts connections and hands each admitted one to `handler` on its own task;
/// connections the gate refuses are closed at once. Runs until the task is dropped.
pub async fn accept_loop<H, F>(listener: TcpListener, gate: Arc<Gate>, handler: H)
where
    H: Fn(TcpStream, SocketAddr, Conn) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => match gate.admit() {
                Some(conn) => {
                    tokio::spawn(handler(sock, peer, conn));
                }
                None => drop(sock),
            },
            Err(e) => {
                // EMFILE and friends are transient; back off instead of spinning.
                gate.accept_failed(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl SocksFrontend {
    /// Accepts SOCKS clients until the listener fails or the task is dropped. Each
    /// connection goes to the engine with the fewest streams, and runs on its runtime.
    pub async fn serve<T: Transport>(self: Arc<Self>, listener: TcpListener, engines: Vec<Runner<T>>) {
        let limits = Limits::for_this_process();
        tracing::debug!(
            handshake_timeout = ?limits.handshake_timeout,
            max_unauthenticated = limits.max_unauthenticated,
            fd_limit = limits.fd_limit,
            fd_baseline = limits.fd_baseline,
            "SOCKS limits"
        );
        let gate = Gate::new(limits);
        let handshaker = Arc::new(Handshaker::new(self.credentials.as_ref()));
        let turns = std::sync::atomic::AtomicUsize::new(0);
        accept_loop(listener, gate, move |sock, peer, conn| {
            let this = self.clone();
            let turn = turns.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let engine = Runner::least_busy(&engines, turn).cloned();
            let handshaker = handshaker.clone();
            async move {
                let Some(engine) = engine else { return };
                let served = async move |sock: TcpStream| {
                    if let Err(e) = this.handle(sock, peer, conn, &handshaker, &engine.node).await {
                        tracing::debug!(%peer, "SOCKS client: {e}");
                    }
                };
                // Already on the engine's runtime (the only one, unless THREADS): serve here.
                if engine.runtime.id() == tokio::runtime::Handle::current().id() {
                    return served(sock).await;
                }
                // The socket moves to the engine's runtime: tokio ties it to the one
                // that registered it.
                let sock = match sock.into_std() {
                    Ok(sock) => sock,
                    Err(e) => return tracing::debug!(%peer, "SOCKS client: {e}"),
                };
                let runtime = engine.runtime.clone();
                runtime.spawn(async move {
                    match TcpStream::from_std(sock) {
                        Ok(sock) => served(sock).await,
                        Err(e) => tracing::debug!(%peer, "SOCKS client: {e}"),
                    }
                });
            }
        })
        .await
    }

    async fn handle<T: Transport>(
        &self,
        sock: TcpStream,
        peer: SocketAddr,
        mut conn: Conn,
        handshaker: &Handshaker,
        node: &Arc<Node<T>>,
    ) -> Result<(), SocksError> {
        let _ = sock.set_nodelay(true);
        // Where the client reached us: the UDP relay of an association listens there.
        let local = sock.local_addr().ok();
        let (proto, command, target) = conn.handshake(handshaker.handshake(sock, peer.ip())).await?;
        if command == Socks5Command::UDPAssociate
            && let Some(local) = local
        {
            // Held as a live connection until the association ends with it.
            udp::associate(node.clone(), proto, local, peer).await?;
            return Ok(());
        }
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

/// Both fields are always compared in full, as fixed-size digests, so timing reveals
/// neither a match nor a length.
pub fn credentials_match(expected: &Credentials, user: &str, pass: &str) -> bool {
    Verifier::new(expected).matches(user, pass)
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

    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn alice() -> Credentials {
        Credentials {
            user: "alice".into(),
            pass: "s3cret".into(),
        }
    }

    /// A SOCKS5 greeting with username/password auth and a CONNECT to example.test:80.
    fn client_bytes(user: &str, pass: &str) -> Vec<u8> {
        let mut b = vec![5, 1, 2, 1, user.len() as u8];
        b.extend_from_slice(user.as_bytes());
        b.push(pass.len() as u8);
        b.extend_from_slice(pass.as_bytes());
        b.extend_from_slice(&[5, 1, 0, 3, 12]);
        b.extend_from_slice(b"example.test");
        b.extend_from_slice(&80u16.to_be_bytes());
        b
    }

    fn peer() -> IpAddr {
        "198.18.0.1".parse().unwrap()
    }

    fn limits(handshake_timeout: Duration, max_unauthenticated: usize) -> Limits {
        Limits {
            handshake_timeout,
            max_unauthenticated,
            fd_limit: 1 << 20,
            fd_baseline: 16,
        }
    }

    // Real time (tokio's paused clock needs its test-util feature): short deadlines.
    const SHORT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_silent_connection_is_closed_at_the_handshake_deadline() {
        let gate = Gate::new(limits(SHORT, 8));
        let hs = Handshaker::new(Some(&alice()));
        let (mut client, server) = tokio::io::duplex(1024);
        let mut conn = gate.admit().unwrap();
        let started = Instant::now();
        let r = conn.handshake(hs.handshake(server, peer())).await;
        assert!(matches!(r, Err(HandshakeError::TimedOut(_))), "{:?}", r.err());
        let took = started.elapsed();
        assert!(took >= SHORT && took < SHORT * 10, "{took:?}");
        // The server's end was dropped: the client reads end of stream.
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        assert_eq!(gate.stats().timed_out, 1);
    }

    #[tokio::test]
    async fn a_trickling_connection_is_closed_at_the_same_deadline() {
        // A byte every 50 ms never extends the deadline: it covers the whole handshake.
        let gate = Gate::new(limits(SHORT, 8));
        let hs = Handshaker::new(Some(&alice()));
        let (mut client, server) = tokio::io::duplex(1024);
        let bytes = client_bytes("alice", "s3cret");
        let trickle = tokio::spawn(async move {
            for b in bytes {
                if client.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut conn = gate.admit().unwrap();
        let started = Instant::now();
        let r = conn.handshake(hs.handshake(server, peer())).await;
        assert!(matches!(r, Err(HandshakeError::TimedOut(_))), "{:?}", r.err());
        let took = started.elapsed();
        assert!(took >= SHORT && took < SHORT * 10, "{took:?}");
        trickle.abort();
    }

    #[tokio::test]
    async fn a_prompt_client_finishes_and_a_wrong_password_waits_for_its_answer() {
        let gate = Gate::new(limits(gate::HANDSHAKE_TIMEOUT, 8));
        let hs = Handshaker::new(Some(&alice()));

        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(&client_bytes("alice", "s3cret")).await.unwrap();
        let mut conn = gate.admit().unwrap();
        let (_proto, command, target) = conn.handshake(hs.handshake(server, peer())).await.unwrap();
        assert_eq!(command, Socks5Command::TCPConnect);
        assert!(matches!(target, SocksTarget::Domain(ref h, 80) if h == "example.test"));

        for expected in [auth::BASE_FAILURE_DELAY, auth::BASE_FAILURE_DELAY * 2] {
            let (mut client, server) = tokio::io::duplex(1024);
            client.write_all(&client_bytes("alice", "guess")).await.unwrap();
            let mut conn = gate.admit().unwrap();
            let started = Instant::now();
            let r = conn.handshake(hs.handshake(server, peer())).await;
            assert!(matches!(
                r,
                Err(HandshakeError::Failed(SocksServerError::AuthenticationRejected))
            ));
            let took = started.elapsed();
            assert!(took >= expected && took < expected + Duration::from_secs(1), "{took:?}");
            let mut reply = [0u8; 4];
            client.read_exact(&mut reply).await.unwrap();
            assert_eq!(reply, [5, 2, 1, 0xff], "method choice, then the auth failure");
        }
    }

    /// The whole loop on a real socket: idle strangers far beyond the cap, then a real
    /// client who still gets its reply at once.
    #[tokio::test]
    async fn idle_connections_beyond_the_cap_do_not_lock_out_a_real_client() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Gate::new(limits(Duration::from_secs(30), 16));
        let hs = Arc::new(Handshaker::new(Some(&alice())));
        let served = tokio::spawn(accept_loop(listener, gate.clone(), move |sock, peer, mut conn| {
            let hs = hs.clone();
            async move {
                if let Ok((proto, _, _)) = conn.handshake(hs.handshake(sock, peer.ip())).await {
                    let _ = proto.reply_error(&ReplyError::ConnectionNotAllowed).await;
                }
            }
        }));
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Wait (bounded) until the loop has admitted them all.
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.stats().evicted < 200 - 16 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(gate.stats().evicted, 200 - 16);
        assert_eq!(gate.stats().unauthenticated, 16);

        let started = Instant::now();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(&client_bytes("alice", "s3cret")).await.unwrap();
        let mut reply = [0u8; 4 + 10];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut reply))
            .await
            .expect("the real client is answered")
            .unwrap();
        assert_eq!(&reply[..4], &[5, 2, 1, 0], "method chosen, password accepted");
        assert_eq!(reply[4..6], [5, 2], "its request answered (connection not allowed)");
        assert!(started.elapsed() < Duration::from_secs(2));
        // The oldest idle ones were closed: they read end of stream (bounded wait).
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0))), "{n:?}");
        served.abort();
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_by_the_loop_after_a_short_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Gate::new(limits(Duration::from_millis(300), 16));
        let hs = Arc::new(Handshaker::new(None));
        let served = tokio::spawn(accept_loop(listener, gate.clone(), move |sock, peer, mut conn| {
            let hs = hs.clone();
            async move {
                let _ = conn.handshake(hs.handshake(sock, peer.ip())).await;
            }
        }));
        let started = Instant::now();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0))), "{n:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(gate.stats().timed_out, 1);
        assert_eq!(gate.stats().live, 0);
        served.abort();
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
