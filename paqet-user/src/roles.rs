//! Starts a role from a validated [`Config`]: pick the transport, build the engine, and
//! run the edges until a signal says stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;

use crate::config::{Config, KcpMode, Role, TransportKind};
use crate::dial::Dialer;
use crate::engine::crypto::Psk;
use crate::engine::kcp::KcpProfile;
use crate::engine::{self, Engine, EngineConfig};
use crate::node::Node;
use crate::socks::SocksFrontend;
use crate::transport::Transport;
use crate::transport::udp::UdpTransport;

/// Socket buffer asked for when `UDP_BUFFER` is unset. KCP sends a whole window at
/// once; with the usual 208 KiB default most of a burst is dropped at the receiver
/// (measured: 19 MB/s and more drops than deliveries, against 84 MB/s with 4 MiB).
const DEFAULT_UDP_BUFFER: usize = 4 << 20;
/// Streams get this long to finish after SIGTERM before the relay exits anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

fn kcp_profile(mode: KcpMode) -> KcpProfile {
    match mode {
        KcpMode::Normal => KcpProfile::Normal,
        KcpMode::Fast => KcpProfile::Fast,
        KcpMode::Fast2 => KcpProfile::Fast2,
        KcpMode::Fast3 => KcpProfile::Fast3,
    }
}

fn engine_config(config: &Config, role: engine::Role) -> EngineConfig {
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    let mut ec = EngineConfig::new(role, Psk(config.key.0), seed);
    ec.kcp = kcp_profile(config.kcp_mode);
    ec.peer_timeout = config.timeout;
    ec
}

async fn resolve_remote(config: &Config) -> Result<SocketAddr> {
    let remote = config.remote_addr.as_ref().context("REMOTE_ADDR is required for a client")?;
    let mut addrs = tokio::net::lookup_host((remote.host.as_str(), remote.port))
        .await
        .with_context(|| format!("cannot resolve REMOTE_ADDR {remote}"))?;
    addrs.next().with_context(|| format!("REMOTE_ADDR {remote} resolved to no address"))
}

/// Which transport `TRANSPORT` selects here, and why (logged).
fn choose_transport(config: &Config) -> Result<TransportKind> {
    match config.transport {
        TransportKind::Udp => Ok(TransportKind::Udp),
        TransportKind::Xdp => bail!("TRANSPORT=xdp is not available in this build yet; use TRANSPORT=udp or auto"),
        TransportKind::Auto => {
            tracing::info!("TRANSPORT=auto: using udp (the xdp transport is not in this build yet)");
            Ok(TransportKind::Udp)
        }
    }
}

pub async fn run(config: Config) -> Result<()> {
    choose_transport(&config)?;
    match config.role {
        Role::Client => {
            let server = resolve_remote(&config).await?;
            let local: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
            let transport = UdpTransport::bind(local, Some(config.udp_buffer.unwrap_or(DEFAULT_UDP_BUFFER))).context("cannot open the UDP socket")?;
            run_client(config, server, transport).await
        }
        Role::Server => {
            let listen = config.listen_addr.context("LISTEN_ADDR is required for a server")?;
            let transport = UdpTransport::bind(listen, Some(config.udp_buffer.unwrap_or(DEFAULT_UDP_BUFFER))).with_context(|| format!("cannot listen on udp {listen}"))?;
            run_server(config, transport).await
        }
    }
}

async fn run_client<T: Transport>(config: Config, server: SocketAddr, transport: T) -> Result<()> {
    let listener = TcpListener::bind(config.socks_addr)
        .await
        .with_context(|| format!("cannot listen for SOCKS5 on {} (is another proxy running? `paqet check` shows who holds it)", config.socks_addr))?;
    let engine = Engine::new(engine_config(&config, engine::Role::Client { server }), std::time::Instant::now());
    let (node, _) = Node::new(engine, transport, false);
    node.with_engine(|e, now| e.connect(now));
    tracing::info!(socks = %config.socks_addr, %server, transport = node.transport().name(), kcp = ?config.kcp_mode, "paqet client running");
    let frontend = Arc::new(SocksFrontend { credentials: config.socks_auth.clone(), open_timeout: config.timeout + Duration::from_secs(5) });
    let receiver = tokio::spawn(node.clone().run_receiver());
    let timers = tokio::spawn(node.clone().run_timers());
    let accept = tokio::spawn(frontend.serve(listener, node.clone()));
    let outcome = wait_for_stop(receiver).await;
    accept.abort();
    drain(&node).await;
    timers.abort();
    outcome
}

async fn run_server<T: Transport>(config: Config, transport: T) -> Result<()> {
    let engine = Engine::new(engine_config(&config, engine::Role::Server), std::time::Instant::now());
    let (node, opened) = Node::new(engine, transport, true);
    let opened = opened.context("server node without an open-stream channel")?;
    tracing::info!(listen = ?config.listen_addr, transport = node.transport().name(), kcp = ?config.kcp_mode, "paqet server running");
    let dialer = Arc::new(Dialer { policy: config.policy.clone(), timeout: config.timeout });
    let receiver = tokio::spawn(node.clone().run_receiver());
    let timers = tokio::spawn(node.clone().run_timers());
    let dialing = tokio::spawn(dialer.serve(node.clone(), opened));
    let outcome = wait_for_stop(receiver).await;
    dialing.abort();
    drain(&node).await;
    timers.abort();
    outcome
}

/// Returns on SIGTERM/SIGINT (Ok) or when the transport fails (Err).
async fn wait_for_stop(receiver: tokio::task::JoinHandle<std::io::Result<()>>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
        r = receiver => {
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e).context("the transport failed"),
                Err(e) => Err(e).context("the receive task died"),
            };
        }
    }
    // A second signal means "now": exit without draining.
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting at once");
        std::process::exit(0);
    });
    Ok(())
}

/// Lets open streams finish, for a bounded time.
async fn drain<T: Transport>(node: &Node<T>) {
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while node.live_streams() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = node.live_streams();
    if left > 0 {
        tracing::info!(streams = left, "drain timeout; closing the remaining streams");
    }
}
