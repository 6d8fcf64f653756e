//! Starts a role from a validated [`Config`]: pick the transport, build the engine, and
//! run the edges until a signal says stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;

use crate::config::{Config, KcpMode, Role, TransportKind, XdpMode};
use crate::dial::Dialer;
use crate::engine::crypto::Psk;
use crate::engine::kcp::KcpProfile;
use crate::engine::{self, Engine, EngineConfig};
use crate::kernel::AttachMode;
use crate::node::Node;
use crate::ops::live;
use crate::socks::SocksFrontend;
use crate::transport::Transport;
use crate::transport::local;
use crate::transport::udp::UdpTransport;
use crate::transport::xdp::{XdpOptions, XdpTransport};

/// Socket buffer asked for when `UDP_BUFFER` is unset. KCP sends a whole window at
/// once; with the usual 208 KiB default most of a burst is dropped at the receiver
/// (measured: 19 MB/s and more drops than deliveries, against 84 MB/s with 4 MiB), and
/// on a lossy link's bursts 4 MiB still dropped 14 % (16 MiB: 0.8 %).
const DEFAULT_UDP_BUFFER: usize = 16 << 20;
/// The drain also ends when nothing has arrived from any peer for this long.
const DRAIN_QUIET: Duration = Duration::from_secs(1);
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
    let remote = config
        .remote_addr
        .as_ref()
        .context("REMOTE_ADDR is required for a client")?;
    let mut addrs = tokio::net::lookup_host((remote.host.as_str(), remote.port))
        .await
        .with_context(|| format!("cannot resolve REMOTE_ADDR {remote}"))?;
    addrs
        .next()
        .with_context(|| format!("REMOTE_ADDR {remote} resolved to no address"))
}

/// Where this role sits: what the xdp transport needs to find its interface and address.
enum Side {
    Client { server: SocketAddr },
    Server { listen: SocketAddr },
}

/// The transport `TRANSPORT` selects, opened, with the instance name it is known by
/// (pins and live status).
enum Opened {
    Udp(UdpTransport, String),
    // Boxed: the AF_XDP rings make it far larger than a UDP socket.
    Xdp(Box<XdpTransport>, String),
}

fn role_name(side: &Side) -> &'static str {
    match side {
        Side::Client { .. } => "client",
        Side::Server { .. } => "server",
    }
}

fn xdp_options(config: &Config, side: &Side) -> Result<XdpOptions> {
    let role = role_name(side);
    let (local_ip, port, peer) = match *side {
        Side::Client { server } => (
            local::route_source(server).with_context(|| format!("no route to {server}"))?,
            0,
            Some(server),
        ),
        Side::Server { listen } => (listen.ip(), listen.port(), None),
    };
    let interface = match (&config.interface, local_ip.is_unspecified()) {
        (Some(name), _) => name.clone(),
        (None, false) => {
            local::interface_with(local_ip)?.with_context(|| format!("no interface holds {local_ip}; set INTERFACE"))?
        }
        (None, true) => bail!("LISTEN_ADDR {local_ip} names no interface; set INTERFACE or a specific address"),
    };
    let local_ip = if local_ip.is_unspecified() {
        local::address_of(&interface, local_ip.is_ipv6())?
            .with_context(|| format!("{interface} has no address of LISTEN_ADDR's family"))?
    } else {
        local_ip
    };
    let mode = match config.xdp_mode {
        XdpMode::Auto => AttachMode::Auto,
        XdpMode::Native => AttachMode::Native,
        XdpMode::Generic => AttachMode::Generic,
    };
    Ok(XdpOptions {
        instance: format!("{role}-{interface}"),
        interface,
        local: SocketAddr::new(local_ip, port),
        peer,
        wire: config.wire,
        mode,
    })
}

fn open_udp(config: &Config, side: &Side) -> Result<Opened> {
    let buffer = Some(config.udp_buffer.unwrap_or(DEFAULT_UDP_BUFFER));
    let local: SocketAddr = match *side {
        Side::Client { server } if server.is_ipv4() => ([0, 0, 0, 0], 0).into(),
        Side::Client { .. } => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        Side::Server { listen } => listen,
    };
    let transport =
        UdpTransport::bind(local, buffer).with_context(|| format!("cannot open a UDP socket on {local}"))?;
    let port = transport.local_addr().map_or(0, |a| a.port());
    Ok(Opened::Udp(transport, format!("{}-udp-{port}", role_name(side))))
}

fn open_xdp(config: &Config, side: &Side) -> Result<Opened> {
    let opts = xdp_options(config, side)?;
    let transport = XdpTransport::open(opts.clone())
        .with_context(|| format!("cannot start the xdp transport on {}", opts.interface))?;
    Ok(Opened::Xdp(Box::new(transport), opts.instance))
}

/// Opens the transport `TRANSPORT` names; `auto` tries xdp, falls back to udp, and says
/// which it took and why.
fn open_transport(config: &Config, side: &Side) -> Result<Opened> {
    match config.transport {
        TransportKind::Udp => open_udp(config, side),
        TransportKind::Xdp => open_xdp(config, side),
        TransportKind::Auto => match open_xdp(config, side) {
            Ok(opened) => {
                tracing::info!("TRANSPORT=auto: using xdp");
                Ok(opened)
            }
            Err(e) => {
                tracing::warn!("TRANSPORT=auto: xdp unavailable ({e:#}); using udp");
                open_udp(config, side)
            }
        },
    }
}

pub async fn run(config: Config) -> Result<()> {
    match config.role {
        Role::Client => {
            let server = resolve_remote(&config).await?;
            match open_transport(&config, &Side::Client { server })? {
                Opened::Udp(t, instance) => run_client(config, server, t, instance).await,
                Opened::Xdp(t, instance) => run_client(config, server, *t, instance).await,
            }
        }
        Role::Server => {
            let listen = config.listen_addr.context("LISTEN_ADDR is required for a server")?;
            match open_transport(&config, &Side::Server { listen })? {
                Opened::Udp(t, instance) => run_server(config, t, instance).await,
                Opened::Xdp(t, instance) => run_server(config, *t, instance).await,
            }
        }
    }
}

async fn run_client<T: Transport>(config: Config, server: SocketAddr, transport: T, instance: String) -> Result<()> {
    let mut signals = StopSignals::install()?;
    let listener = TcpListener::bind(config.socks_addr).await.with_context(|| {
        format!(
            "cannot listen for SOCKS5 on {} (is another proxy running? `paqet check` shows who holds it)",
            config.socks_addr
        )
    })?;
    let engine = Engine::new(
        engine_config(&config, engine::Role::Client { server }),
        std::time::Instant::now(),
    );
    let (node, _) = Node::new(engine, transport, false);
    node.with_engine(|e, now| e.connect(now));
    tracing::info!(socks = %config.socks_addr, %server, transport = node.transport().name(), kcp = ?config.kcp_mode, "paqet client running");
    let frontend = Arc::new(SocksFrontend {
        credentials: config.socks_auth.clone(),
        open_timeout: config.timeout + Duration::from_secs(5),
    });
    let receiver = tokio::spawn(node.clone().run_receiver());
    let timers = tokio::spawn(node.clone().run_timers());
    let accept = tokio::spawn(frontend.serve(listener, node.clone()));
    let live = tokio::spawn(publish_live(node.clone(), instance, "client"));
    let outcome = wait_for_stop(&mut signals, receiver).await;
    accept.abort();
    drain(&node, &mut signals).await;
    timers.abort();
    live.abort();
    outcome
}

async fn run_server<T: Transport>(config: Config, transport: T, instance: String) -> Result<()> {
    let mut signals = StopSignals::install()?;
    let engine = Engine::new(engine_config(&config, engine::Role::Server), std::time::Instant::now());
    let (node, opened) = Node::new(engine, transport, true);
    let opened = opened.context("server node without an open-stream channel")?;
    tracing::info!(listen = ?config.listen_addr, transport = node.transport().name(), kcp = ?config.kcp_mode, "paqet server running");
    let dialer = Arc::new(Dialer {
        policy: config.policy.clone(),
        timeout: config.timeout,
    });
    let receiver = tokio::spawn(node.clone().run_receiver());
    let timers = tokio::spawn(node.clone().run_timers());
    let dialing = tokio::spawn(dialer.serve(node.clone(), opened));
    let live = tokio::spawn(publish_live(node.clone(), instance, "server"));
    let outcome = wait_for_stop(&mut signals, receiver).await;
    dialing.abort();
    drain(&node, &mut signals).await;
    timers.abort();
    live.abort();
    outcome
}

/// Keeps `/run/paqet/<instance>.json` current for `paqet status`.
async fn publish_live<T: Transport>(node: Arc<Node<T>>, instance: String, role: &'static str) {
    let transport = node.transport().name();
    live::publish(instance, role, transport, move || {
        let c = node.counters();
        live::Snapshot {
            sessions: node.with_engine(|e, _| e.peer_count()),
            streams: node.live_streams(),
            datagrams_in: c.datagrams_in,
            datagrams_out: c.datagrams_out,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            dropped_unauthentic: c.dropped_unauthentic,
            dropped_replayed: c.dropped_replayed + c.dropped_stale_handshake,
            receive_overflows: node.transport().receive_overflows(),
        }
    })
    .await
}

/// SIGTERM and SIGINT, installed once at start so no signal is missed.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Returns on SIGTERM/SIGINT (Ok) or when the transport fails (Err).
async fn wait_for_stop(
    signals: &mut StopSignals,
    receiver: tokio::task::JoinHandle<std::io::Result<()>>,
) -> Result<()> {
    tokio::select! {
        name = signals.next() => {
            tracing::info!("{name}: stopping; draining streams for up to {}s", DRAIN_TIMEOUT.as_secs());
            Ok(())
        }
        r = receiver => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e).context("the transport failed"),
            Err(e) => Err(e).context("the receive task died"),
        },
    }
}

/// Lets open streams finish, for a bounded time; a second signal cuts it short. Either
/// way the caller then tears down (detach, unpin) by dropping the node.
async fn drain<T: Transport>(node: &Node<T>, signals: &mut StopSignals) {
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    let wait = async {
        // Streams whose peer has gone quiet will not finish: stop waiting for them.
        let mut heard = node.counters().datagrams_in;
        let mut last_heard = tokio::time::Instant::now();
        while node.live_streams() > 0 && tokio::time::Instant::now() < deadline && last_heard.elapsed() < DRAIN_QUIET {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now_heard = node.counters().datagrams_in;
            if now_heard != heard {
                heard = now_heard;
                last_heard = tokio::time::Instant::now();
            }
        }
    };
    tokio::select! {
        _ = wait => {}
        name = signals.next() => tracing::warn!("second signal ({name}): stopping now, without draining"),
    }
    let left = node.live_streams();
    if left > 0 {
        tracing::info!(streams = left, "closing the remaining streams");
    }
}
