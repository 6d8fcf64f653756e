//! Server: the UDP side of the relay. Each client flow (a SOCKS association, or one
//! local source of a client's `FORWARD=udp/...`) gets its own UDP socket per address
//! family, so its targets see one stable source port, as behind a NAT.
//!
//! - **Policy per datagram**: every datagram's target (each address a name resolves to)
//!   passes the same target policy as a TCP dial; a refused one is dropped and counted.
//! - **Port-restricted filtering**: a flow takes replies only from an IP:port it has
//!   sent to (RFC 4787's "address and port-dependent filtering"); anything else reaching
//!   its socket is dropped and counted, so a flow is no open door into the client.
//! - **Bounded**: at most [`MAX_FLOWS_PER_CLIENT`] flows per client and [`MAX_FLOWS`]
//!   overall (each holds up to two sockets), [`MAX_DESTINATIONS_PER_FLOW`] destinations
//!   per flow, [`FLOW_QUEUE`] datagrams queued per flow; a flow with no datagram from
//!   its client for `UDP_TIMEOUT` (default [`FLOW_IDLE`]) ends and frees its sockets (replies alone do not keep
//!   it: a target cannot hold a flow open against its client's will).
//!
//! A name is resolved in the flow's own task, so a slow resolver stalls only that flow;
//! answers are kept for [`NAME_TTL`].

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::TargetPolicy;
use crate::engine::PeerId;
use crate::engine::frame::TargetAddr;
use crate::node::Node;
use crate::node::datagram::{Delivered, ServerDatagram};
use crate::transport::Transport;

/// A flow whose client sent nothing for this long is closed. Longer than the 30 s
/// Linux conntrack gives an unanswered UDP flow, as long as its "stream" timeout for
/// one that was answered less often than every two minutes would be too long to hold
/// sockets for: DNS, QUIC and game traffic all send more often than once a minute.
pub const FLOW_IDLE: Duration = Duration::from_secs(60);
pub const MAX_FLOWS: usize = 8192;
pub const MAX_FLOWS_PER_CLIENT: usize = 1024;
pub const MAX_DESTINATIONS_PER_FLOW: usize = 1024;
pub const FLOW_QUEUE: usize = 256;
/// How long a resolved name is reused by its flow.
pub const NAME_TTL: Duration = Duration::from_secs(30);
const NAMES_PER_FLOW: usize = 64;
/// A name that does not resolve within this time is dropped with its datagram.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often ended flows are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct UdpStats {
    pub flows_live: AtomicUsize,
    pub flows_opened: AtomicU64,
    /// Flows refused at a cap.
    pub flows_refused: AtomicU64,
    /// Datagrams sent to targets, and replies sent back to clients.
    pub datagrams_out: AtomicU64,
    pub datagrams_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Datagrams whose target the policy refused.
    pub refused_policy: AtomicU64,
    /// Datagrams whose target name did not resolve.
    pub unresolved: AtomicU64,
    /// Datagrams that arrived from an address the flow never sent to.
    pub filtered: AtomicU64,
    /// Datagrams dropped: queue full, send failed, too many destinations.
    pub dropped: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub struct UdpFlows {
    pub policy: TargetPolicy,
    pub stats: Arc<UdpStats>,
    pub idle: Duration,
}

/// Why a datagram was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramRefused {
    #[error("the target policy refuses every address of the target")]
    Policy,
    #[error("the target name did not resolve")]
    Unresolved,
    #[error("this host's addresses could not be read")]
    NoOwnAddresses,
}

/// The address to send to: the first candidate the policy allows.
pub fn choose_destination(
    policy: &TargetPolicy,
    candidates: &[SocketAddr],
    own: &[IpAddr],
) -> Result<SocketAddr, DatagramRefused> {
    if candidates.is_empty() {
        return Err(DatagramRefused::Unresolved);
    }
    candidates
        .iter()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .find(|a| policy.decide(*a, own).allowed)
        .ok_or(DatagramRefused::Policy)
}

impl UdpFlows {
    pub fn new(policy: TargetPolicy, idle: Duration) -> UdpFlows {
        UdpFlows {
            policy,
            stats: Arc::new(UdpStats::default()),
            idle,
        }
    }

    /// Routes every datagram clients send to its flow, opening flows as they appear,
    /// until the node stops.
    pub async fn serve<T: Transport>(self: Arc<Self>, node: Arc<Node<T>>, mut rx: mpsc::Receiver<ServerDatagram>) {
        let mut flows: HashMap<(PeerId, u32), mpsc::Sender<Delivered>> = HashMap::new();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                event = rx.recv() => match event {
                    None => return,
                    Some(ServerDatagram::FlowClosed { peer, flow }) => {
                        if flows.remove(&(peer, flow)).is_some() {
                            tracing::debug!(peer = format_args!("{:08x}", peer as u32), flow, "UDP flow closed by its client");
                        }
                    }
                    Some(ServerDatagram::Datagram { peer, flow, datagram }) => {
                        self.route(&node, &mut flows, peer, flow, datagram);
                    }
                },
                _ = sweep.tick() => flows.retain(|_, tx| !tx.is_closed()),
            }
        }
    }

    fn route<T: Transport>(
        self: &Arc<Self>,
        node: &Arc<Node<T>>,
        flows: &mut HashMap<(PeerId, u32), mpsc::Sender<Delivered>>,
        peer: PeerId,
        flow: u32,
        datagram: Delivered,
    ) {
        let key = (peer, flow);
        let datagram = match flows.get(&key) {
            None => datagram,
            Some(tx) => match tx.try_send(datagram) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    bump(&self.stats.dropped);
                    return;
                }
                // The flow idled out: this datagram opens it again.
                Err(mpsc::error::TrySendError::Closed(d)) => {
                    flows.remove(&key);
                    d
                }
            },
        };
        flows.retain(|_, tx| !tx.is_closed());
        let mine = flows.keys().filter(|(p, _)| *p == peer).count();
        if flows.len() >= MAX_FLOWS || mine >= MAX_FLOWS_PER_CLIENT {
            bump(&self.stats.flows_refused);
            tracing::debug!(
                peer = format_args!("{:08x}", peer as u32),
                flow,
                "UDP flow refused: too many flows"
            );
            return;
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        let _ = tx.try_send(datagram);
        flows.insert(key, tx);
        bump(&self.stats.flows_opened);
        let this = self.clone();
        let node = node.clone();
        tokio::spawn(async move {
            this.stats.flows_live.fetch_add(1, Ordering::Relaxed);
            let mut task = FlowTask {
                flows: &this,
                peer,
                flow,
                v4: None,
                v6: None,
                sent_to: HashSet::new(),
                names: HashMap::new(),
                logged_refusal: false,
            };
            if let Err(e) = task.run(&node, rx).await {
                tracing::debug!(flow, "UDP flow ended: {e}");
            }
            this.stats.flows_live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

struct FlowTask<'a> {
    flows: &'a UdpFlows,
    peer: PeerId,
    flow: u32,
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    /// Where this flow has sent: the only sources it takes replies from.
    sent_to: HashSet<(IpAddr, u16)>,
    names: HashMap<(String, u16), (Vec<SocketAddr>, Instant)>,
    logged_refusal: bool,
}

async fn recv_on(socket: Option<&UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

impl FlowTask<'_> {
    async fn run<T: Transport>(&mut self, node: &Node<T>, mut rx: mpsc::Receiver<Delivered>) -> io::Result<()> {
        let mut buf4 = vec![0u8; 1 << 16];
        let mut buf6 = vec![0u8; 1 << 16];
        let mut deadline = Instant::now() + self.flows.idle;
        loop {
            tokio::select! {
                datagram = rx.recv() => {
                    let Some(datagram) = datagram else { return Ok(()) };
                    deadline = Instant::now() + self.flows.idle;
                    self.send(&datagram).await;
                }
                received = recv_on(self.v4.as_ref(), &mut buf4) => {
                    let (n, from) = received?;
                    self.reply(node, from, &buf4[..n]);
                }
                received = recv_on(self.v6.as_ref(), &mut buf6) => {
                    let (n, from) = received?;
                    self.reply(node, from, &buf6[..n]);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    // A datagram routed here as the timer fired keeps the flow (its
                    // replies come back this way); otherwise close the channel first, so
                    // the next datagram opens a fresh flow, and still send any that
                    // slipped in before the close.
                    if let Ok(datagram) = rx.try_recv() {
                        deadline = Instant::now() + self.flows.idle;
                        self.send(&datagram).await;
                        continue;
                    }
                    rx.close();
                    while let Ok(datagram) = rx.try_recv() {
                        self.send(&datagram).await;
                    }
                    tracing::debug!(flow = self.flow, "UDP flow idle for {} s: closed", self.flows.idle.as_secs());
                    return Ok(());
                }
            }
        }
    }

    fn reply<T: Transport>(&self, node: &Node<T>, from: SocketAddr, payload: &[u8]) {
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let stats = &self.flows.stats;
        if !self.sent_to.contains(&(from.ip(), from.port())) {
            bump(&stats.filtered);
            return;
        }
        match node.send_datagram(Some(self.peer), self.flow, &TargetAddr::Ip(from), payload) {
            Ok(()) => {
                bump(&stats.datagrams_in);
                stats.bytes_in.fetch_add(payload.len() as u64, Ordering::Relaxed);
            }
            Err(_) => bump(&stats.dropped),
        }
    }

    async fn resolve(&mut self, target: &TargetAddr) -> Vec<SocketAddr> {
        let (host, port) = match target {
            TargetAddr::Ip(addr) => return vec![*addr],
            TargetAddr::Domain(host, port) => (host.clone(), *port),
        };
        let key = (host, port);
        if let Some((addrs, at)) = self.names.get(&key)
            && at.elapsed() < NAME_TTL
        {
            return addrs.clone();
        }
        let looked_up = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((key.0.clone(), port))).await;
        let addrs: Vec<SocketAddr> = match looked_up {
            Ok(Ok(addrs)) => addrs.collect(),
            _ => Vec::new(),
        };
        if self.names.len() >= NAMES_PER_FLOW {
            self.names.clear();
        }
        self.names.insert(key, (addrs.clone(), Instant::now()));
        addrs
    }

    async fn send(&mut self, datagram: &Delivered) {
        let stats = self.flows.stats.clone();
        let candidates = self.resolve(&datagram.addr).await;
        let chosen = match crate::dial::own::addresses() {
            Some(own) => choose_destination(&self.flows.policy, &candidates, &own),
            None => Err(DatagramRefused::NoOwnAddresses),
        };
        let to = match chosen {
            Ok(to) => to,
            Err(why) => {
                match why {
                    DatagramRefused::Unresolved => bump(&stats.unresolved),
                    _ => bump(&stats.refused_policy),
                }
                // Once per flow: a flow that keeps sending to a refused target must not
                // flood the log.
                if !self.logged_refusal {
                    self.logged_refusal = true;
                    tracing::info!(flow = self.flow, target = %datagram.addr, "UDP datagram refused: {why}");
                }
                return;
            }
        };
        let key = (to.ip(), to.port());
        if !self.sent_to.contains(&key) && self.sent_to.len() >= MAX_DESTINATIONS_PER_FLOW {
            bump(&stats.dropped);
            return;
        }
        let socket = match self.socket_for(to.is_ipv4()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(flow = self.flow, "cannot open a UDP socket: {e}");
                bump(&stats.dropped);
                return;
            }
        };
        match socket.send_to(&datagram.payload, to).await {
            Ok(_) => {
                self.sent_to.insert(key);
                bump(&stats.datagrams_out);
                stats
                    .bytes_out
                    .fetch_add(datagram.payload.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(flow = self.flow, %to, "UDP send failed: {e}");
                bump(&stats.dropped);
            }
        }
    }

    fn socket_for(&mut self, v4: bool) -> io::Result<&UdpSocket> {
        let slot = if v4 { &mut self.v4 } else { &mut self.v6 };
        if slot.is_none() {
            let local: SocketAddr = if v4 {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(local),
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )?;
            if !v4 {
                socket.set_only_v6(true)?;
            }
            // Bursts of replies (a 64 KiB datagram is 45 fragments on the way back,
            // but one datagram here) wait in the kernel while the engine is busy.
            let _ = socket.set_recv_buffer_size(1 << 20);
            socket.set_nonblocking(true)?;
            socket.bind(&local.into())?;
            *slot = Some(UdpSocket::from_std(socket.into())?);
        }
        slot.as_ref().ok_or_else(|| io::Error::other("socket missing"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &str, deny: &str) -> TargetPolicy {
        let rules = |s: &str| {
            s.split(',')
                .filter(|r| !r.is_empty())
                .map(|r| r.parse().unwrap())
                .collect()
        };
        TargetPolicy {
            allow: rules(allow),
            deny: rules(deny),
        }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn datagrams_pass_the_same_policy_as_dials() {
        let own: Vec<IpAddr> = vec!["198.18.0.2".parse().unwrap()];
        let p = policy("", "");
        let refused = [
            "127.0.0.1:53",
            "10.0.0.5:53",
            "169.254.169.254:80",
            "198.18.0.2:53",
            "[::1]:53",
            "[::ffff:127.0.0.1]:53",
        ];
        for a in refused {
            assert_eq!(
                choose_destination(&p, &addrs(&[a]), &own),
                Err(DatagramRefused::Policy),
                "{a}"
            );
        }
        assert_eq!(
            choose_destination(&p, &addrs(&["198.18.1.2:53"]), &own),
            Ok("198.18.1.2:53".parse().unwrap())
        );
        // A name resolving to a refused and an allowed address: the allowed one.
        assert_eq!(
            choose_destination(&p, &addrs(&["127.0.0.1:53", "198.18.1.2:53"]), &own),
            Ok("198.18.1.2:53".parse().unwrap())
        );
        assert_eq!(choose_destination(&p, &[], &own), Err(DatagramRefused::Unresolved));
        // ALLOW opens exactly one port; DENY closes a range.
        let p = policy("127.0.0.1/32:5353", "198.18.1.0/24");
        assert!(choose_destination(&p, &addrs(&["127.0.0.1:5353"]), &own).is_ok());
        assert!(choose_destination(&p, &addrs(&["127.0.0.1:5354"]), &own).is_err());
        assert!(choose_destination(&p, &addrs(&["198.18.1.2:53"]), &own).is_err());
    }
}
