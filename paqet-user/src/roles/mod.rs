//! Starts a role from a validated [`Config`]: pick the transport, build the engine, and
//! run the edges until a signal says stop.

mod client;
mod engines;
mod server;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;

use crate::config::{Config, KcpMode, Role, TransportKind, WireChoice, XdpMode};
use crate::dial::Dialer;
use crate::engine::crypto::Psk;
use crate::engine::kcp::KcpProfile;
use crate::engine::{self, EngineConfig, PathId};
use crate::kernel::AttachMode;
use crate::node::Node;
use crate::ops::live;
use crate::transport::Transport;
use crate::transport::any::AnyTransport;
use crate::transport::local;
use crate::transport::udp::UdpTransport;
use crate::transport::xdp::{Follow, XdpOptions, XdpTransport};

/// Socket buffer asked for when `UDP_BUFFER` is unset. KCP sends a whole window at
/// once; with the usual 208 KiB default most of a burst is dropped at the receiver
/// (measured: 19 MB/s and more drops than deliveries, against 84 MB/s with 4 MiB), and
/// on a lossy link's bursts 4 MiB still dropped 14 % (16 MiB: 0.8 %).
const DEFAULT_UDP_BUFFER: usize = 16 << 20;
/// `UDP_BUFFER` is a floor, not a cap: smaller values are raised to this, with a WARN.
/// The seed suggests 4096 and 8192, which hold three to six datagrams: KCP's bursts
/// overflowed them and a download crawled at 56–88 KB/s. 4 MiB carried 84 MB/s in the
/// measurement above.
const MIN_UDP_BUFFER: usize = 4 << 20;
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

pub(crate) fn engine_config(config: &Config, role: engine::Role) -> EngineConfig {
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    let mut ec = EngineConfig::new(role, Psk(config.key.0), seed);
    ec.kcp = kcp_profile(config.kcp_mode);
    ec.peer_timeout = config.timeout;
    ec
}

pub(crate) async fn resolve_remote(config: &Config) -> Result<SocketAddr> {
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

fn role_name(side: &Side) -> &'static str {
    match side {
        Side::Client { .. } => "client",
        Side::Server { .. } => "server",
    }
}

fn attach_mode(config: &Config) -> AttachMode {
    match config.xdp_mode {
        XdpMode::Auto => AttachMode::Auto,
        XdpMode::Native => AttachMode::Native,
        XdpMode::Generic => AttachMode::Generic,
    }
}

/// Where the xdp transport steers: one interface per path, with the local address and,
/// for a server on `[::]`, the address of the other family there.
struct XdpSite {
    interface: String,
    ip: IpAddr,
    other_family: Option<IpAddr>,
}

impl XdpSite {
    fn single(interface: String, ip: IpAddr) -> XdpSite {
        XdpSite {
            interface,
            ip,
            other_family: None,
        }
    }
}

/// A client uses the interface that routes to the server. A server uses the interface
/// holding LISTEN_ADDR's address; for an unspecified LISTEN_ADDR the one INTERFACE
/// names, or else every interface that holds an address at start (loopback and links
/// without an Ethernet header excepted): `0.0.0.0` IPv4 addresses, `[::]` both families,
/// as a dual-stack socket on `[::]` does.
fn xdp_sites(config: &Config, side: &Side) -> Result<Vec<XdpSite>> {
    match *side {
        Side::Client { server } => {
            let ip = local::route_source(server).with_context(|| format!("no route to {server}"))?;
            let interface = match &config.interface {
                Some(name) => name.clone(),
                None => {
                    local::interface_with(ip)?.with_context(|| format!("no interface holds {ip}; set INTERFACE"))?
                }
            };
            Ok(vec![XdpSite::single(interface, ip)])
        }
        Side::Server { listen } if !listen.ip().is_unspecified() => {
            let ip = listen.ip();
            let interface = match &config.interface {
                Some(name) => name.clone(),
                None => {
                    local::interface_with(ip)?.with_context(|| format!("no interface holds {ip}; set INTERFACE"))?
                }
            };
            Ok(vec![XdpSite::single(interface, ip)])
        }
        Side::Server { listen } => {
            let both = listen.is_ipv6();
            let names = match &config.interface {
                Some(name) => vec![name.clone()],
                None => {
                    let mut names: Vec<String> = Vec::new();
                    let families = if both { &[false, true][..] } else { &[false][..] };
                    for &v6 in families {
                        for (name, _) in local::steerable_interfaces(v6)? {
                            if !names.contains(&name) {
                                names.push(name);
                            }
                        }
                    }
                    names
                }
            };
            let mut sites = Vec::new();
            for interface in names {
                let v4 = local::address_of(&interface, false)?;
                let v6 = if both {
                    local::address_of(&interface, true)?
                } else {
                    None
                };
                // One program per interface: IPv6 first when it has both, IPv4 beside it.
                match (v6, v4) {
                    (Some(ip), other_family) => sites.push(XdpSite {
                        interface,
                        ip,
                        other_family,
                    }),
                    (None, Some(ip)) => sites.push(XdpSite::single(interface, ip)),
                    (None, None) => {
                        tracing::warn!(%interface, "no address for LISTEN_ADDR {listen} there; not steering on it")
                    }
                }
            }
            if sites.is_empty() {
                bail!("no interface other than loopback holds an address for LISTEN_ADDR {listen}; set INTERFACE");
            }
            Ok(sites)
        }
    }
}

/// The socket buffer size to ask for: `UDP_BUFFER`, raised to the floor.
fn udp_buffer(config: &Config) -> usize {
    let asked = config.udp_buffer.unwrap_or(DEFAULT_UDP_BUFFER);
    if asked < MIN_UDP_BUFFER {
        tracing::warn!(
            "UDP_BUFFER={asked} is too small for KCP's bursts (most datagrams would be dropped); \
             using {MIN_UDP_BUFFER} bytes, the smallest paqet uses"
        );
    }
    asked.max(MIN_UDP_BUFFER)
}

/// Where a udp path binds: a client any port of the server's family, a server its
/// LISTEN_ADDR.
fn udp_local(side: &Side) -> SocketAddr {
    match *side {
        Side::Client { server } if server.is_ipv4() => ([0, 0, 0, 0], 0).into(),
        Side::Client { .. } => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        Side::Server { listen } => listen,
    }
}

fn open_udp(config: &Config, side: &Side) -> Result<AnyTransport> {
    let buffer = Some(udp_buffer(config));
    let local = udp_local(side);
    let transport =
        UdpTransport::bind(local, buffer).with_context(|| format!("cannot open a UDP socket on {local}"))?;
    Ok(AnyTransport::Udp(transport))
}

/// A client sends from whatever address its route to the server picks; a server on an
/// unspecified LISTEN_ADDR serves every address its interfaces hold, as a socket bound
/// there would; a specific LISTEN_ADDR is kept as the user gave it.
fn follow(side: &Side) -> Follow {
    match *side {
        Side::Client { server } => Follow::RouteTo(server),
        Side::Server { listen } if listen.ip().is_unspecified() => Follow::Interface { v6: listen.is_ipv6() },
        Side::Server { .. } => Follow::Fixed,
    }
}

/// One xdp path per site, each its own instance (pins, live status).
fn open_xdp(config: &Config, side: &Side) -> Result<Vec<(AnyTransport, String)>> {
    let (port, peer) = match *side {
        Side::Client { server } => (0, Some(server)),
        Side::Server { listen } => (listen.port(), None),
    };
    let mut opened = Vec::new();
    for site in xdp_sites(config, side)? {
        let opts = XdpOptions {
            instance: format!("{}-{}", role_name(side), site.interface),
            interface: site.interface,
            local: SocketAddr::new(site.ip, port),
            local_other_family: site.other_family,
            follow: follow(side),
            peer,
            wire: config.wire.xdp_shape(),
            mode: attach_mode(config),
            syn_key: *crate::engine::crypto::syn_tag_key(&Psk(config.key.0)),
        };
        let transport = XdpTransport::open(opts.clone())
            .with_context(|| format!("cannot start the xdp transport on {}", opts.interface))?;
        opened.push((AnyTransport::Xdp(Box::new(transport)), opts.instance));
    }
    Ok(opened)
}

/// The paths `TRANSPORT` and `WIRE` allow, opened, best first, with the instance
/// name the node publishes its live status under.
///
/// `auto` opens xdp where this process can (the TCP-shaped wire passes networks that
/// drop UDP) and udp beside it: a client tries xdp first and falls back to udp when
/// the server does not answer there (it may be a udp-only server, or the TCP wire may be
/// filtered); a server serves both on its port, so every client reaches it. XDP steers
/// only the TCP-shaped frames, so the kernel's UDP socket on the same port still gets
/// the UDP ones. An explicit value is kept as given.
fn open_paths(config: &Config, side: &Side) -> Result<(Vec<AnyTransport>, String)> {
    match config.transport {
        TransportKind::Udp => {
            let udp = open_udp(config, side)?;
            Ok((vec![udp], udp_instance(config, side)))
        }
        TransportKind::Xdp => {
            if config.wire == WireChoice::Auto {
                tracing::info!(
                    "WIRE=auto with TRANSPORT=xdp: TCP-shaped frames (xdp carries one wire per interface; \
                     TRANSPORT=auto also {} udp beside it)",
                    if matches!(side, Side::Client { .. }) {
                        "falls back to"
                    } else {
                        "serves"
                    }
                );
            }
            let opened = open_xdp(config, side)?;
            let instance = opened[0].1.clone();
            Ok((opened.into_iter().map(|(t, _)| t).collect(), instance))
        }
        TransportKind::Auto => {
            let mut paths = Vec::new();
            let mut instance = udp_instance(config, side);
            match open_xdp(config, side) {
                Ok(opened) => {
                    instance = opened[0].1.clone();
                    paths.extend(opened.into_iter().map(|(t, _)| t));
                }
                Err(e) => tracing::warn!("TRANSPORT=auto: xdp unavailable ({e:#}); using udp only"),
            }
            // A server's xdp on the UDP-shaped wire takes that port's UDP frames itself.
            let udp_free = matches!(side, Side::Client { .. }) || config.wire != WireChoice::Udp || paths.is_empty();
            if udp_free {
                paths.push(open_udp(config, side)?);
            }
            let names: Vec<&str> = paths.iter().map(|p| p.name()).collect();
            tracing::info!("TRANSPORT=auto: paths {}", names.join(", "));
            if config.wire == WireChoice::Auto && paths.len() > 1 {
                match side {
                    Side::Client { .. } => tracing::info!(
                        "WIRE=auto: trying the TCP-shaped wire first (it passes networks that drop UDP), \
                         udp if it gets no answer (networks that drop the fake TCP)"
                    ),
                    Side::Server { .. } => tracing::info!(
                        "WIRE=auto: serving the TCP-shaped wire and udp on port {}",
                        udp_port(side)
                    ),
                }
            }

            Ok((paths, instance))
        }
    }
}

/// A client's paths to `server`, best first, as `TRANSPORT` allows (what `paqet
/// check` probes one by one).
pub(crate) fn open_client_paths(config: &Config, server: SocketAddr) -> Result<Vec<AnyTransport>> {
    Ok(open_paths(config, &Side::Client { server })?.0)
}

/// The pin instance a client's xdp path uses towards `server`, if it can tell.
pub(crate) fn client_xdp_instance(config: &Config, server: SocketAddr) -> Option<String> {
    let side = Side::Client { server };
    let site = xdp_sites(config, &side).ok()?.into_iter().next()?;
    Some(format!("{}-{}", role_name(&side), site.interface))
}

/// The name a udp-only relay publishes its status under: its port, which no other
/// relay on the host holds (a client's UDP socket has an ephemeral one: its SOCKS port).
fn udp_instance(config: &Config, side: &Side) -> String {
    match *side {
        Side::Client { .. } => format!("client-udp-{}", config.socks_addr.port()),
        Side::Server { listen } => format!("server-udp-{}", listen.port()),
    }
}

fn udp_port(side: &Side) -> u16 {
    match *side {
        Side::Client { .. } => 0,
        Side::Server { listen } => listen.port(),
    }
}

pub async fn run(config: Config) -> Result<()> {
    for line in &config.ignored {
        tracing::warn!("{line}");
    }
    match config.role {
        Role::Client => {
            let server = resolve_remote(&config).await?;
            client::run(config, server).await
        }
        Role::Server => {
            // Before the paths open (attaching XDP takes a while): a handshake made for
            // this run is stamped after this, a replay from an earlier run before it.
            let started_unix_ms = crate::node::now().unix_ms;
            let listen = config.listen_addr.context("LISTEN_ADDR is required for a server")?;
            server::run(config, listen, started_unix_ms).await
        }
    }
}

/// The largest datagram every path carries: a session may move between paths.
pub(crate) fn path_datagram_size(paths: &[AnyTransport], default: usize) -> usize {
    paths.iter().map(|p| p.max_payload()).fold(default, usize::min)
}

fn path_ids(paths: &[AnyTransport]) -> Result<Vec<PathId>> {
    if paths.len() > usize::from(u8::MAX) + 1 {
        bail!(
            "{} paths (one per interface); set INTERFACE to the one clients reach",
            paths.len()
        );
    }
    Ok((0..paths.len())
        .filter_map(|i| u8::try_from(i).ok().map(PathId))
        .collect())
}

/// Binds `METRICS_ADDR`, when set: before privileges drop, like the SOCKS port.
async fn bind_metrics(config: &Config) -> Result<Option<TcpListener>> {
    let Some(metrics) = config.metrics else {
        return Ok(None);
    };
    let listener = crate::ops::metrics::bind(metrics.addr)
        .await
        .context("METRICS_ADDR (is another exporter on that port? `ss -ltnp` shows who holds it)")?;
    tracing::info!(%metrics, "serving Prometheus metrics at /metrics");
    Ok(Some(listener))
}

/// Keeps `/run/paqet/<instance>.json` current for `paqet status`, and answers scrapes
/// when `metrics` is bound: both from `source`.
fn report(source: live::Source, instance: String, metrics: Option<TcpListener>) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(listener) = metrics {
        tasks.spawn(crate::ops::metrics::serve(listener, source.clone()));
    }
    tasks.spawn(live::publish(instance, source));
    tasks
}

/// What only a server counts, beside its node.
struct ServerCounters {
    dialer: Arc<Dialer>,
    udp: Arc<crate::dial::udp::UdpStats>,
}

/// The one place the relay's counters are read, for `paqet status` and the metrics:
/// summed over the nodes (one, or a sharded server's engines).
fn live_source<T: Transport>(
    nodes: Vec<Arc<Node<T>>>,
    role: &'static str,
    server: Option<ServerCounters>,
) -> live::Source {
    let transport = nodes.first().map(|n| n.path_list()).unwrap_or_default();
    live::Source::new(role, transport, move || snapshot(&nodes, server.as_ref()))
}

fn snapshot<T: Transport>(nodes: &[Arc<Node<T>>], server: Option<&ServerCounters>) -> live::Snapshot {
    use std::sync::atomic::Ordering::Relaxed;
    let counters: Vec<engine::Counters> = nodes.iter().map(|n| n.counters()).collect();
    let sum = |field: fn(&engine::Counters) -> u64| counters.iter().map(field).sum::<u64>();
    let path_names: Vec<String> = nodes.first().map_or_else(Vec::new, |n| {
        (0..n.paths().len()).map(|i| n.path_name(PathId(i as u8))).collect()
    });
    let mut loads = vec![engine::PathLoad::default(); path_names.len()];
    for node in nodes {
        for (total, load) in loads
            .iter_mut()
            .zip(node.with_engine(|e, _| e.load_per_path(path_names.len())))
        {
            total.sessions += load.sessions;
            total.streams += load.streams;
        }
    }
    live::Snapshot {
        udp: udp_json(nodes, server.map(|s| &*s.udp)),
        sessions: nodes.iter().map(|n| n.with_engine(|e, _| e.peer_count())).sum(),
        paths: path_names.into_iter().zip(loads).collect(),
        streams: nodes.iter().map(|n| n.live_streams()).sum(),
        datagrams_in: sum(|c| c.datagrams_in),
        datagrams_out: sum(|c| c.datagrams_out),
        bytes_in: sum(|c| c.bytes_in),
        bytes_out: sum(|c| c.bytes_out),
        handshakes: sum(|c| c.handshakes),
        keepalives: sum(|c| c.keepalives),
        dropped_unauthentic: sum(|c| c.dropped_unauthentic),
        dropped_replayed: sum(|c| c.dropped_replayed + c.dropped_stale_handshake),
        dropped_policy: server.map_or(0, |s| {
            s.dialer.refused_by_policy.load(Relaxed) + s.udp.refused_policy.load(Relaxed)
        }),
        receive_overflows: nodes.iter().map(|n| n.receive_overflows()).sum(),
        steering: nodes
            .iter()
            .filter_map(|n| n.steering_counters())
            .reduce(|mut total, s| {
                total.accumulate(&s);
                total
            }),
        engines: nodes.len(),
        handed_off: sum(|c| c.handed_off),
        rss_bytes: live::resident_bytes(),
    }
}

/// The UDP part of the live status: the datagram layer's counters, and the client's
/// associations and forwards or the server's flows.
fn udp_json<T: Transport>(nodes: &[Arc<Node<T>>], server: Option<&crate::dial::udp::UdpStats>) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let layer: Vec<_> = nodes.iter().map(|n| n.datagram_counters()).collect();
    let sum = |field: fn(&crate::engine::datagrams::DatagramCounters) -> u64| layer.iter().map(field).sum::<u64>();
    let routed = |field: fn(&crate::node::datagram::RouterStats) -> &std::sync::atomic::AtomicU64| {
        nodes
            .iter()
            .map(|n| field(&n.datagrams.stats).load(Relaxed))
            .sum::<u64>()
    };
    let mut v = serde_json::json!({
        "datagrams_sent": sum(|d| d.sent),
        "datagrams_received": sum(|d| d.received),
        "reassembly_timed_out": sum(|d| d.timed_out),
        "reassembly_evicted": sum(|d| d.evicted),
        "expired_before_session": sum(|d| d.expired_waiting),
        "dropped_queue_full": routed(|r| &r.dropped_full),
        "dropped_no_flow": routed(|r| &r.dropped_no_flow),
    });
    match server {
        None => {
            let associations = nodes.iter().flat_map(|n| n.datagrams.registry.to_json()).collect();
            v["associations"] = serde_json::Value::Array(associations);
        }
        Some(s) => {
            v["flows"] = serde_json::json!({
                "live": s.flows_live.load(Relaxed),
                "opened": s.flows_opened.load(Relaxed),
                "refused": s.flows_refused.load(Relaxed),
                "to_targets": s.datagrams_out.load(Relaxed),
                "from_targets": s.datagrams_in.load(Relaxed),
                "bytes_to_targets": s.bytes_out.load(Relaxed),
                "bytes_from_targets": s.bytes_in.load(Relaxed),
                "refused_by_policy": s.refused_policy.load(Relaxed),
                "unresolved": s.unresolved.load(Relaxed),
                "filtered": s.filtered.load(Relaxed),
                "dropped": s.dropped.load(Relaxed),
            })
        }
    }
    v
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
async fn wait_for_stop(signals: &mut StopSignals, transport_failed: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::select! {
        name = signals.next() => {
            tracing::info!("{name}: stopping; draining streams for up to {}s", DRAIN_TIMEOUT.as_secs());
            Ok(())
        }
        outcome = transport_failed => outcome,
    }
}

/// How a node's receivers ended.
async fn receiver_outcome(receiver: &mut tokio::task::JoinHandle<std::io::Result<()>>) -> Result<()> {
    match receiver.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e).context("the transport failed"),
        Err(e) => Err(e).context("the receive task died"),
    }
}

/// Lets open streams finish, for a bounded time; a second signal cuts it short. Either
/// way the caller then tears down (detach, unpin) by dropping the nodes.
async fn drain<T: Transport>(nodes: &[Arc<Node<T>>], signals: &mut StopSignals) {
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    let live_streams = || nodes.iter().map(|n| n.live_streams()).sum::<usize>();
    let heard = || nodes.iter().map(|n| n.counters().datagrams_in).sum::<u64>();
    let wait = async {
        // Streams whose peer has gone quiet will not finish: stop waiting for them.
        let mut last = heard();
        let mut last_heard = tokio::time::Instant::now();
        while live_streams() > 0 && tokio::time::Instant::now() < deadline && last_heard.elapsed() < DRAIN_QUIET {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now_heard = heard();
            if now_heard != last {
                last = now_heard;
                last_heard = tokio::time::Instant::now();
            }
        }
    };
    tokio::select! {
        _ = wait => {}
        name = signals.next() => tracing::warn!("second signal ({name}): stopping now, without draining"),
    }
    let left = live_streams();
    if left > 0 {
        tracing::info!(streams = left, "closing the remaining streams");
    }
}
