//! The server role: one engine on the main thread; or, for a `TRANSPORT=udp` server
//! with `THREADS` above one, one engine per thread, each with its own socket on the
//! port (see `engine::shards`). Every engine shares the dialer, the UDP flows' counters
//! and the live status.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{
    Side, StopSignals, bind_metrics, drain, engine_config, live_source, open_paths, path_datagram_size, path_ids,
    receiver_outcome, report, udp_buffer, udp_instance, wait_for_stop,
};
use crate::config::{Config, Threads, TransportKind};
use crate::dial::Dialer;
use crate::dial::udp::UdpFlows;
use crate::engine::frame::TargetAddr;
use crate::engine::shards::Shard;
use crate::engine::{self, Engine, EngineConfig, StreamId};
use crate::node::{Node, ShardLinks};
use crate::transport::any::AnyTransport;
use crate::transport::udp::{BoundUdp, UdpTransport};

type ServerNode = Node<AnyTransport>;
type Opened = mpsc::UnboundedReceiver<(StreamId, TargetAddr)>;

/// `started_unix_ms` was read before the paths opened: a handshake made for this run is
/// stamped after it, a replay from an earlier run before it.
pub(super) async fn run(config: Config, listen: SocketAddr, started_unix_ms: u64) -> Result<()> {
    let shards = shard_count(&config);
    if shards > 1 {
        let sockets = UdpTransport::bind_shared(listen, Some(udp_buffer(&config)), shards)
            .with_context(|| format!("cannot open {shards} UDP sockets on {listen} (THREADS={shards})"))?;
        let instance = udp_instance(&config, &Side::Server { listen });
        return run_sharded(config, sockets, instance, started_unix_ms).await;
    }
    let (paths, instance) = open_paths(&config, &Side::Server { listen })?;
    run_single(config, paths, instance, started_unix_ms).await
}

/// How many engines: `THREADS` for a udp-only server. The xdp transport steers one
/// AF_XDP socket per interface into one engine, so `auto` and `xdp` keep one.
fn shard_count(config: &Config) -> u8 {
    if config.transport == TransportKind::Udp {
        return config.threads.count();
    }
    if matches!(config.threads, Threads::Count(n) if n > 1) {
        tracing::info!("THREADS applies to TRANSPORT=udp; this server runs one engine");
    }
    1
}

fn server_engine(config: &Config, started_unix_ms: u64, paths: &[AnyTransport]) -> Result<EngineConfig> {
    let mut ec = engine_config(config, engine::Role::Server);
    ec.started_unix_ms = started_unix_ms;
    ec.max_datagram = path_datagram_size(paths, ec.max_datagram);
    ec.paths = path_ids(paths)?;
    Ok(ec)
}

/// What every engine of the server shares.
#[derive(Clone)]
struct Shared {
    dialer: Arc<Dialer>,
    udp_flows: Arc<UdpFlows>,
}

impl Shared {
    fn new(config: &Config) -> Shared {
        let dialer = Arc::new(Dialer::new(config.policy.clone(), config.timeout));
        dialer.log_policy();
        Shared {
            dialer,
            udp_flows: Arc::new(UdpFlows::new(config.policy.clone(), config.udp_timeout)),
        }
    }

    fn counters(&self) -> super::ServerCounters {
        super::ServerCounters {
            dialer: self.dialer.clone(),
            udp: self.udp_flows.stats.clone(),
        }
    }
}

/// The tasks serving one engine, on the runtime that spawned them.
struct EngineTasks {
    receiver: JoinHandle<io::Result<()>>,
    timers: JoinHandle<()>,
    dialing: JoinHandle<()>,
    relaying_udp: JoinHandle<()>,
}

impl EngineTasks {
    fn spawn(node: &Arc<ServerNode>, opened: Opened, shared: &Shared) -> Result<EngineTasks> {
        let datagrams = node
            .datagrams
            .take_server_receiver()
            .context("server node without a datagram channel")?;
        Ok(EngineTasks {
            receiver: tokio::spawn(node.clone().run_receivers()),
            timers: tokio::spawn(node.clone().run_timers()),
            dialing: tokio::spawn(shared.dialer.clone().serve(node.clone(), opened)),
            relaying_udp: tokio::spawn(shared.udp_flows.clone().serve(node.clone(), datagrams)),
        })
    }

    /// No new streams or flows; open ones go on while the relay drains.
    fn stop_opening(&self) {
        self.dialing.abort();
        self.relaying_udp.abort();
    }
}

async fn run_single(config: Config, paths: Vec<AnyTransport>, instance: String, started_unix_ms: u64) -> Result<()> {
    let mut signals = StopSignals::install()?;
    let engine = Engine::new(
        server_engine(&config, started_unix_ms, &paths)?,
        std::time::Instant::now(),
    );
    let (node, opened) = Node::new(engine, paths, true);
    let metrics = bind_metrics(&config).await?;
    crate::ops::privileges::drop_after_start()?;
    let opened = opened.context("server node without an open-stream channel")?;
    tracing::info!(listen = ?config.listen_addr, paths = %node.path_list(), kcp = ?config.kcp_mode, "paqet server running");
    let shared = Shared::new(&config);
    let mut tasks = EngineTasks::spawn(&node, opened, &shared)?;
    let nodes = vec![node];
    let mut reporting = report(
        live_source(nodes.clone(), "server", Some(shared.counters())),
        instance,
        metrics,
    );
    let outcome = wait_for_stop(&mut signals, receiver_outcome(&mut tasks.receiver)).await;
    tasks.stop_opening();
    drain(&nodes, &mut signals).await;
    tasks.timers.abort();
    reporting.abort_all();
    outcome
}

/// Shard 0 runs on this thread's runtime, the others each on a thread of their own.
/// Every socket was bound before privileges drop (a port below 1024 needs a capability).
async fn run_sharded(config: Config, sockets: Vec<BoundUdp>, instance: String, started_unix_ms: u64) -> Result<()> {
    let mut signals = StopSignals::install()?;
    let count = u8::try_from(sockets.len()).context("more shards than a shard id holds")?;
    let mut shards = Shard::split(count)
        .into_iter()
        .zip(ShardLinks::connect(count))
        .zip(sockets);
    let ((shard, links), socket) = shards.next().context("a sharded server without shards")?;
    let (node, opened) = start_shard(&config, started_unix_ms, shard, links, socket)?;
    let metrics = bind_metrics(&config).await?;
    crate::ops::privileges::drop_after_start()?;
    let shared = Shared::new(&config);
    let (stop, stopped) = watch::channel(false);
    let (failed, mut failures) = mpsc::unbounded_channel();
    let mut nodes = vec![node.clone()];
    for ((shard, links), socket) in shards {
        let thread = ShardThread {
            config: config.clone(),
            started_unix_ms,
            shard,
            links,
            socket,
            shared: shared.clone(),
            stopped: stopped.clone(),
            failed: failed.clone(),
        };
        nodes.push(thread.spawn()?);
    }
    let mut tasks = EngineTasks::spawn(&node, opened, &shared)?;
    tracing::info!(listen = ?config.listen_addr, paths = %node.path_list(), threads = count, kcp = ?config.kcp_mode,
        "paqet server running: one engine per thread, clients spread over them by address");
    let mut reporting = report(
        live_source(nodes.clone(), "server", Some(shared.counters())),
        instance,
        metrics,
    );
    let transport_failed = async {
        tokio::select! {
            outcome = receiver_outcome(&mut tasks.receiver) => outcome,
            Some(e) = failures.recv() => Err(e),
        }
    };
    let outcome = wait_for_stop(&mut signals, transport_failed).await;
    tasks.stop_opening();
    let _ = stop.send(true);
    drain(&nodes, &mut signals).await;
    tasks.timers.abort();
    reporting.abort_all();
    outcome
}

/// One shard's node over its socket, registered with the runtime this runs in.
fn start_shard(
    config: &Config,
    started_unix_ms: u64,
    shard: Shard,
    links: ShardLinks,
    socket: BoundUdp,
) -> Result<(Arc<ServerNode>, Opened)> {
    let paths = vec![AnyTransport::Udp(
        socket.register().context("cannot register a shard's UDP socket")?,
    )];
    let ec = server_engine(config, started_unix_ms, &paths)?.for_shard(shard);
    let (node, opened) = Node::shard(Engine::new(ec, std::time::Instant::now()), paths, links);
    Ok((node, opened.context("server node without an open-stream channel")?))
}

/// A shard other than the first, and what its thread needs.
struct ShardThread {
    config: Config,
    started_unix_ms: u64,
    shard: Shard,
    links: ShardLinks,
    socket: BoundUdp,
    shared: Shared,
    stopped: watch::Receiver<bool>,
    failed: mpsc::UnboundedSender<anyhow::Error>,
}

impl ShardThread {
    /// Starts the thread and returns its node once it serves.
    fn spawn(self) -> Result<Arc<ServerNode>> {
        let id = self.shard.id;
        let (started, node) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("paqet-shard-{id}"))
            .spawn(move || self.run(started))
            .with_context(|| format!("cannot start engine thread {id}"))?;
        node.recv()
            .map_err(|_| anyhow!("engine thread {id} ended before it served"))?
    }

    /// Serves until the relay stops opening streams, then keeps relaying the open ones
    /// while the main thread drains; the process ends it. A failure before it serves
    /// goes to the starter, one after it to the main thread, which stops the relay.
    fn run(self, started: std::sync::mpsc::SyncSender<Result<Arc<ServerNode>>>) {
        let ShardThread {
            config,
            started_unix_ms,
            shard,
            links,
            socket,
            shared,
            mut stopped,
            failed,
        } = self;
        let id = shard.id;
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = started.send(Err(
                    anyhow!(e).context(format!("cannot start engine thread {id}'s runtime"))
                ));
                return;
            }
        };
        runtime.block_on(async move {
            let serving = start_shard(&config, started_unix_ms, shard, links, socket)
                .and_then(|(node, opened)| Ok((EngineTasks::spawn(&node, opened, &shared)?, node)));
            let mut tasks = match serving {
                Ok((tasks, node)) => {
                    let _ = started.send(Ok(node));
                    tasks
                }
                Err(e) => {
                    let _ = started.send(Err(e.context(format!("engine thread {id}"))));
                    return;
                }
            };
            tokio::select! {
                outcome = receiver_outcome(&mut tasks.receiver) => {
                    let e = outcome.err().unwrap_or_else(|| anyhow!("its receivers ended"));
                    let _ = failed.send(e.context(format!("engine thread {id}")));
                    return;
                }
                _ = stopped.changed() => tasks.stop_opening(),
            }
            std::future::pending::<()>().await;
        });
    }
}
