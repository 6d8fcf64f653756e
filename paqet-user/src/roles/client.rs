//! The client role: SOCKS5 and the forwards in front, one engine behind; or, for a
//! `TRANSPORT=udp` client with `THREADS` above one, one engine per thread, each its
//! own session with its own socket (kcptun's `--conn`). A SOCKS connection goes to the
//! engine with the fewest streams and runs on its thread; the forwards use the first.
//! The server sees each engine as a client of its own, so a sharded server spreads
//! them over its engines too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use super::engines::{Engines, RelayNode};
use super::{
    Side, StopSignals, bind_metrics, engine_config, open_paths, path_datagram_size, path_ids, udp_buffer, udp_local,
};
use crate::config::{Config, TransportKind};
use crate::engine::{self, Engine};
use crate::node::Node;
use crate::socks::SocksFrontend;
use crate::transport::any::AnyTransport;
use crate::transport::udp::UdpTransport;

pub(super) async fn run(config: Config, server: SocketAddr) -> Result<()> {
    let signals = StopSignals::install()?;
    let side = Side::Client { server };
    let (paths, instance) = open_paths(&config, &side)?;
    let listener = TcpListener::bind(config.socks_addr).await.with_context(|| {
        format!(
            "cannot listen for SOCKS5 on {} (is another proxy running? `paqet check` shows who holds it)",
            config.socks_addr
        )
    })?;
    // Before privileges drop, like the SOCKS port: a forward may listen below 1024.
    let forwards = crate::node::forward::bind_all(&config.forwards).await?;
    let metrics = bind_metrics(&config).await?;
    for f in &config.forwards {
        tracing::info!(forward = %f, "forwarding");
    }
    let count = engine_count(&config);
    // Bound now, like the first: forcing their buffers needs CAP_NET_ADMIN, if held.
    let more_sockets = (1..count)
        .map(|_| UdpTransport::bind_later(udp_local(&side), Some(udp_buffer(&config))))
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot open the client's UDP sockets")?;
    let node = client_node(&config, server, paths)?;
    crate::ops::privileges::drop_after_start()?;
    connect(&node);
    let mut engines = Engines::on_main(node.clone(), Vec::new());
    for (id, socket) in (1..).zip(more_sockets) {
        let config = config.clone();
        engines.spawn_thread(
            id,
            Box::new(move || {
                let udp = socket.register().context("cannot register a UDP socket")?;
                let node = client_node(&config, server, vec![AnyTransport::Udp(udp)])?;
                connect(&node);
                Ok((node, Vec::new()))
            }),
        )?;
    }
    tracing::info!(socks = %config.socks_addr, %server, paths = %node.path_list(), threads = count,
        kcp = ?config.kcp_mode, "paqet client running");
    let frontend = Arc::new(SocksFrontend {
        credentials: config.socks_auth.clone(),
        open_timeout: config.timeout + Duration::from_secs(5),
    });
    let open_timeout = frontend.open_timeout;
    let mut listening = vec![tokio::spawn(frontend.serve(listener, engines.list().to_vec()))];
    for bound in forwards {
        listening.push(tokio::spawn(crate::node::forward::serve(
            node.clone(),
            bound,
            open_timeout,
        )));
    }
    engines.add_opening(listening);
    engines.run(signals, "client", None, instance, metrics).await
}

/// `THREADS` for a udp-only client (one by default). An xdp path carries one engine.
fn engine_count(config: &Config) -> u8 {
    let asked = config.threads.count();
    if config.transport == TransportKind::Udp || asked == 1 {
        return asked;
    }
    tracing::info!("THREADS applies to TRANSPORT=udp; this client runs one engine");
    1
}

/// An engine of the client over `paths`.
fn client_node(config: &Config, server: SocketAddr, paths: Vec<AnyTransport>) -> Result<Arc<RelayNode>> {
    let mut ec = engine_config(config, engine::Role::Client { server });
    ec.max_datagram = path_datagram_size(&paths, ec.max_datagram);
    ec.paths = path_ids(&paths)?;
    let (node, _) = Node::new(Engine::new(ec, std::time::Instant::now()), paths, false);
    Ok(node)
}

/// Starts the engine's handshake: after privileges drop, as every packet it sends.
fn connect(node: &RelayNode) {
    node.with_engine(|e, now| e.connect(now));
}
