//! The client's port forwards (`FORWARD`): fixed targets through the server, no SOCKS.
//!
//! - `tcp/LISTEN=TARGET`: each accepted connection is a stream opened to TARGET, exactly
//!   as a SOCKS CONNECT would open it (the server resolves and checks the target), then
//!   relayed. A refused or failed open closes the connection.
//! - `udp/LISTEN=TARGET`: each local source address (ip:port) gets its own flow, so the
//!   server gives it its own socket and the replies come back to that source alone. A
//!   source that sends nothing for [`SOURCE_IDLE`] is forgotten (its flow closed on the
//!   server too); at most [`MAX_SOURCES`] sources per forward are mapped at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Node;
use super::datagram::{Delivered, FlowCounters};
use super::relay_stream;
use crate::config::{Forward, ForwardProto, HostPort};
use crate::engine::frame::TargetAddr;
use crate::transport::Transport;

/// A UDP forward's source that sent nothing this long loses its flow. As long as the
/// server's idle time, so both ends forget a quiet source together.
pub const SOURCE_IDLE: Duration = crate::dial::udp::FLOW_IDLE;
/// Local sources one UDP forward maps at once.
pub const MAX_SOURCES: usize = 1024;

pub fn target_of(host: &HostPort) -> TargetAddr {
    match host.host.parse::<std::net::IpAddr>() {
        Ok(ip) => TargetAddr::Ip(SocketAddr::new(ip, host.port)),
        Err(_) => TargetAddr::Domain(host.host.clone(), host.port),
    }
}

/// A bound forward, ready to serve.
pub enum Bound {
    Tcp(TcpListener, Forward),
    Udp(UdpSocket, Forward),
}

/// Binds every forward's listener (at start, so a port in use stops the client with a
/// clear error rather than later in silence).
pub async fn bind_all(forwards: &[Forward]) -> std::io::Result<Vec<Bound>> {
    let mut bound = Vec::new();
    for f in forwards {
        let with = |e: std::io::Error| std::io::Error::new(e.kind(), format!("FORWARD {f}: cannot listen: {e}"));
        match f.proto {
            ForwardProto::Tcp => bound.push(Bound::Tcp(TcpListener::bind(f.listen).await.map_err(with)?, f.clone())),
            ForwardProto::Udp => bound.push(Bound::Udp(
                crate::socks::udp::bind_udp(f.listen).map_err(with)?,
                f.clone(),
            )),
        }
    }
    Ok(bound)
}

/// Serves one bound forward until the task is dropped.
pub async fn serve<T: Transport>(node: Arc<Node<T>>, bound: Bound, open_timeout: Duration) {
    match bound {
        Bound::Tcp(listener, f) => serve_tcp(node, listener, f, open_timeout).await,
        Bound::Udp(socket, f) => serve_udp(node, Arc::new(socket), f).await,
    }
}

async fn serve_tcp<T: Transport>(node: Arc<Node<T>>, listener: TcpListener, f: Forward, open_timeout: Duration) {
    let target = target_of(&f.target);
    let entry = node
        .datagrams
        .registry
        .add("forward-tcp", f.listen.to_string(), f.target.to_string());
    let counters = entry.counters.clone();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(forward = %f, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        counters.up(0);
        let node = node.clone();
        let target = target.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            counters.flows.fetch_add(1, Ordering::Relaxed);
            let opened = node.open_stream(&target);
            match opened {
                Ok((id, waker, reply)) => match tokio::time::timeout(open_timeout, reply).await {
                    Ok(Ok(Ok(()))) => {
                        tracing::debug!(stream = %id, %peer, %target, "forward stream open");
                        relay_stream(node, id, waker, tcp).await;
                    }
                    Ok(Ok(Err(why))) => {
                        counters.drop_one();
                        tracing::info!(%peer, %target, ?why, "forward: the server refused the target");
                    }
                    Ok(Err(_)) => counters.drop_one(),
                    Err(_) => {
                        counters.drop_one();
                        node.reset_stream(id);
                    }
                },
                Err(e) => {
                    counters.drop_one();
                    tracing::debug!(%target, "forward stream not opened: {e}");
                }
            }
            counters.flows.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One local source's flow, as the forward's receive loop sees it.
struct Source {
    flow: u32,
    last_sent: Instant,
    reply_task: tokio::task::JoinHandle<()>,
}

async fn serve_udp<T: Transport>(node: Arc<Node<T>>, socket: Arc<UdpSocket>, f: Forward) {
    let target = target_of(&f.target);
    let entry = node
        .datagrams
        .registry
        .add("forward-udp", f.listen.to_string(), f.target.to_string());
    let counters = entry.counters.clone();
    let mut sources: HashMap<SocketAddr, Source> = HashMap::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (n, from) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(forward = %f, "receive failed: {e}");
                        continue;
                    }
                };
                let now = Instant::now();
                if !sources.contains_key(&from) {
                    forget_idle(&node, &mut sources, now);
                    if sources.len() >= MAX_SOURCES {
                        counters.drop_one();
                        continue;
                    }
                    let Some((flow, replies)) = node.datagrams.register() else {
                        counters.drop_one();
                        continue;
                    };
                    let reply_task = tokio::spawn(send_replies(socket.clone(), from, replies, counters.clone()));
                    sources.insert(from, Source { flow, last_sent: now, reply_task });
                    counters.flows.store(sources.len(), Ordering::Relaxed);
                }
                let Some(source) = sources.get_mut(&from) else { continue };
                source.last_sent = now;
                match node.send_datagram(None, source.flow, &target, &buf[..n]) {
                    Ok(()) => counters.up(n),
                    Err(_) => counters.drop_one(),
                }
            }
            _ = sweep.tick() => {
                forget_idle(&node, &mut sources, Instant::now());
                counters.flows.store(sources.len(), Ordering::Relaxed);
            }
        }
    }
}

fn forget_idle<T: Transport>(node: &Node<T>, sources: &mut HashMap<SocketAddr, Source>, now: Instant) {
    sources.retain(|_, s| {
        let live = now.saturating_duration_since(s.last_sent) < SOURCE_IDLE;
        if !live {
            s.reply_task.abort();
            node.close_flow(s.flow);
        }
        live
    });
}

/// Sends a source's replies back to it from the forward's socket.
async fn send_replies(
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    mut replies: mpsc::Receiver<Delivered>,
    counters: Arc<FlowCounters>,
) {
    while let Some(reply) = replies.recv().await {
        match socket.send_to(&reply.payload, to).await {
            Ok(_) => counters.down(reply.payload.len()),
            Err(_) => counters.drop_one(),
        }
    }
}
