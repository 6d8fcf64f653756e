//! The server role: one engine on the main thread; or, for a `TRANSPORT=udp` server
//! with `THREADS` above one, one engine per thread, each with its own socket on the
//! port (see `engine::shards`). Every engine shares the dialer, the UDP flows' counters
//! and the live status.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::engines::{Engines, Opening, RelayNode};
use super::{
    ServerCounters, Side, StopSignals, bind_metrics, engine_config, open_paths, path_datagram_size, path_ids,
    udp_buffer, udp_instance,
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

type Opened = mpsc::UnboundedReceiver<(StreamId, TargetAddr)>;

/// `started_unix_ms` was read before the paths opened: a handshake made for this run is
/// stamped after it, a replay from an earlier run before it.
pub(super) async fn run(config: Config, listen: SocketAddr, started_unix_ms: u64) -> Result<()> {
    let signals = StopSignals::install()?;
    let shards = shard_count(&config);
    let (first, more, instance) = if shards > 1 {
        let sockets = UdpTransport::bind_shared(listen, Some(udp_buffer(&config)), shards)
            .with_context(|| format!("cannot open {shards} UDP sockets on {listen} (THREADS={shards})"))?;
        let mut shards = Shard::split(shards)
            .into_iter()
            .zip(ShardLinks::connect(shards))
            .zip(sockets);
        let ((shard, links), socket) = shards.next().context("a sharded server without shards")?;
        let first = start_shard(&config, started_unix_ms, shard, links, socket)?;
        (first, shards.collect(), udp_instance(&config, &Side::Server { listen }))
    } else {
        let (paths, instance) = open_paths(&config, &Side::Server { listen })?;
        let engine = Engine::new(
            server_engine(&config, started_unix_ms, &paths)?,
            std::time::Instant::now(),
        );
        let (node, opened) = Node::new(engine, paths, true);
        let opened = opened.context("server node without an open-stream channel")?;
        ((node, opened), Vec::new(), instance)
    };
    let metrics = bind_metrics(&config).await?;
    // Engine threads start after this, with the lowered sets: every socket is bound by
    // now (a port below 1024 needs a capability).
    crate::ops::privileges::drop_after_start()?;
    let shared = Shared::new(&config);
    let (node, opened) = first;
    let opening = shared.serve(&node, opened)?;
    let mut engines = Engines::on_main(node, opening);
    for ((shard, links), socket) in more {
        let (config, shared) = (config.clone(), shared.clone());
        let id = shard.id;
        engines.spawn_thread(
            id,
            Box::new(move || {
                let (node, opened) = start_shard(&config, started_unix_ms, shard, links, socket)?;
                let opening = shared.serve(&node, opened)?;
                Ok((node, opening))
            }),
        )?;
    }
    let node = &engines.list()[0].node;
    if shards > 1 {
        tracing::info!(listen = ?config.listen_addr, paths = %node.path_list(), threads = shards, kcp = ?config.kcp_mode,
            "paqet server running: one engine per thread, clients spread over them by address");
    } else {
        tracing::info!(listen = ?config.listen_addr, paths = %node.path_list(), kcp = ?config.kcp_mode, "paqet server running");
    }
    let counters = shared.counters();
    engines.run(signals, "server", Some(counters), instance, metrics).await
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

/// One shard's node over its socket, registered with the runtime this runs in.
fn start_shard(
    config: &Config,
    started_unix_ms: u64,
    shard: Shard,
    links: ShardLinks,
    socket: BoundUdp,
) -> Result<(Arc<RelayNode>, Opened)> {
    let paths = vec![AnyTransport::Udp(
        socket.register().context("cannot register a shard's UDP socket")?,
    )];
    let ec = server_engine(config, started_unix_ms, &paths)?.for_shard(shard);
    let (node, opened) = Node::shard(Engine::new(ec, std::time::Instant::now()), paths, links);
    Ok((node, opened.context("server node without an open-stream channel")?))
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

    /// Dials the streams and relays the UDP flows `node`'s clients open, on the
    /// runtime this runs in.
    fn serve(&self, node: &Arc<RelayNode>, opened: Opened) -> Result<Opening> {
        let datagrams = node
            .datagrams
            .take_server_receiver()
            .context("server node without a datagram channel")?;
        Ok(vec![
            tokio::spawn(self.dialer.clone().serve(node.clone(), opened)),
            tokio::spawn(self.udp_flows.clone().serve(node.clone(), datagrams)),
        ])
    }

    fn counters(&self) -> ServerCounters {
        ServerCounters {
            dialer: self.dialer.clone(),
            udp: self.udp_flows.stats.clone(),
        }
    }
}
