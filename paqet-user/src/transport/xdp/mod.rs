//! The `xdp` transport: paqet builds whole frames (Ethernet, IPv4/IPv6, a TCP-shaped or
//! UDP header) and sends them below IP; `paqet_steer` redirects the peer's frames into
//! AF_XDP sockets before the kernel's stack sees them, so the kernel sends no RST or
//! ICMP error and keeps no state for paqet's traffic.
//!
//! ```text
//!  send_batch ─▶ runs of equal datagrams ─▶ headers ─▶ AF_PACKET + virtio_net_hdr ─▶ GSO ─▶ wire
//!     (without AF_PACKET: headers + checksums ─▶ UMEM frame ─▶ TX ring ─▶ TX thread's kick)
//!  wire ─▶ paqet_steer (filter match) ─▶ XSKMAP[rx queue] ─▶ RX ring ─▶ parse_frame ─▶ RecvBatch
//! ```
//!
//! One AF_XDP socket per RX queue of the interface (a frame for paqet on a queue with no
//! socket would reach the kernel). Frames leave as super-frames the kernel segments
//! ([`gso`]); where that socket cannot be opened, through queue 0's AF_XDP socket,
//! one frame at a time. The next hop's MAC
//! comes from received frames (server) or the kernel's route and neighbour tables
//! (see [`neigh`]); a send to a peer with no known MAC is dropped and counted while a
//! background thread resolves it (KCP retransmits).
//!
//! `XdpTransport::open` must run inside a tokio runtime (readiness of the sockets comes
//! from tokio's reactor) and on a thread in the interface's network namespace.

mod emit;
pub mod gso;
mod iface;
mod locals;
mod neigh;
mod peers;
pub mod tcp_flow;
mod tx_kicker;
mod xsk;

pub use emit::EmitError;
pub use locals::Follow;
pub use neigh::NeighError;
pub use xsk::{FRAME_SIZE, UMEM_FRAMES, XskError};

pub use crate::config::WireShape;
pub use crate::kernel::AttachMode;

use crate::sync::lock;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Instant;

use paqet_common::Stats;
use paqet_common::maps::{FilterConfig, Protocol};
use paqet_common::wire::{Addr, parse_frame, parse_tcp_options};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{RecvBatch, Transport, Via};
use crate::engine::Transmit;
use crate::kernel::{AttachOptions, AttachedMode, KernelError, Steering};
use peers::Peers;
use tcp_flow::{Control, Flows, Received, RxVerdict, SynKey, TxVerdict};

/// Most frames one `send_batch` queues per TX ring pass.
const TX_CHUNK: usize = 256;

#[derive(Clone, Debug)]
pub struct XdpOptions {
    /// Interface in the current network namespace.
    pub interface: String,
    /// Pin directory name, e.g. `server-veth0`.
    pub instance: String,
    /// The address paqet uses on this interface. Port 0 (a client) picks a free port.
    pub local: SocketAddr,
    /// A server on `[::]`: its address of the other family on this interface, so one
    /// program serves both families.
    pub local_other_family: Option<IpAddr>,
    /// Whether `local` (and `local_other_family`) stay as given or follow the
    /// interface's addresses while the transport runs.
    pub follow: Follow,
    /// Client: the server (only its frames are taken). Server: `None` (any peer).
    pub peer: Option<SocketAddr>,
    pub wire: WireShape,
    pub mode: AttachMode,
    /// The key SYNs of the TCP-shaped wire are tagged with
    /// (`engine::crypto::syn_tag_key`): a server answers only SYNs that carry it.
    pub syn_key: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("the xdp transport needs a specific local address, not {0}")]
    UnspecifiedLocal(SocketAddr),
    #[error("local address {local} and peer {peer} are of different address families")]
    FamilyMismatch { local: SocketAddr, peer: SocketAddr },
    #[error("XdpTransport::open must be called inside a tokio runtime")]
    NoRuntime,
    #[error("reading {what} of interface {interface}")]
    Interface {
        interface: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reserving a local port on {0}")]
    PortReservation(SocketAddr, #[source] io::Error),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Socket(#[from] XskError),
    #[error("registering an AF_XDP socket with tokio")]
    Reactor(#[source] io::Error),
    #[error("starting the next-hop resolver thread")]
    Resolver(#[source] io::Error),
    #[error("following the addresses of interface {interface}")]
    Addresses {
        interface: String,
        #[source]
        source: io::Error,
    },
}

/// Counters for `paqet status`: free-running, read with `Relaxed` loads.
#[derive(Debug, Default)]
pub struct XdpCounters {
    /// Frames handed to the engine.
    pub rx_frames: AtomicU64,
    /// Frames taken from the RX ring but not handed on: outer headers that do not parse
    /// or are not paqet's, an empty payload (a relay datagram is never empty), or a
    /// payload larger than the receive buffer.
    pub rx_dropped_malformed: AtomicU64,
    pub tx_frames: AtomicU64,
    /// Datagrams dropped because the TX ring or the UMEM had no free frame.
    pub tx_dropped_full: AtomicU64,
    /// Datagrams dropped because the peer's next-hop MAC is not known yet.
    pub tx_dropped_no_neighbour: AtomicU64,
    /// Datagrams that cannot be sent at all: larger than `max_payload`, or to a peer of
    /// the other address family.
    pub tx_dropped_invalid: AtomicU64,
    /// TCP-shaped wire: datagrams held while their flow's handshake runs (sent after it).
    pub tx_held: AtomicU64,
    /// TCP-shaped wire: datagrams dropped by their flow (no flow to that peer, past the
    /// peer's window, too many held).
    pub tx_dropped_flow: AtomicU64,
    /// TCP-shaped wire: handshake segments (no payload) sent and received.
    pub tx_control: AtomicU64,
    pub rx_control: AtomicU64,
    /// TCP-shaped wire: frames no flow takes (no flow, a SYN without the key, a
    /// replayed SYN, RST or FIN): dropped without an answer.
    pub rx_dropped_flow: AtomicU64,
}

/// A copy of [`XdpCounters`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpCountersSnapshot {
    pub rx_frames: u64,
    pub rx_dropped_malformed: u64,
    pub tx_frames: u64,
    pub tx_dropped_full: u64,
    pub tx_dropped_no_neighbour: u64,
    pub tx_dropped_invalid: u64,
    pub tx_held: u64,
    pub tx_dropped_flow: u64,
    pub tx_control: u64,
    pub rx_control: u64,
    pub rx_dropped_flow: u64,
}

impl XdpCounters {
    pub fn snapshot(&self) -> XdpCountersSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        XdpCountersSnapshot {
            rx_frames: r(&self.rx_frames),
            rx_dropped_malformed: r(&self.rx_dropped_malformed),
            tx_frames: r(&self.tx_frames),
            tx_dropped_full: r(&self.tx_dropped_full),
            tx_dropped_no_neighbour: r(&self.tx_dropped_no_neighbour),
            tx_dropped_invalid: r(&self.tx_dropped_invalid),
            tx_held: r(&self.tx_held),
            tx_dropped_flow: r(&self.tx_dropped_flow),
            tx_control: r(&self.tx_control),
            rx_control: r(&self.rx_control),
            rx_dropped_flow: r(&self.rx_dropped_flow),
        }
    }
}

/// What one send counted, for the transport's counters.
#[derive(Default)]
struct SendTally {
    sent: usize,
    full: usize,
    invalid: usize,
    no_neighbour: usize,
    held: usize,
    dropped_flow: usize,
}

/// Where one datagram's frame goes, and its TCP header on the TCP-shaped wire.
#[derive(Clone, Copy)]
struct Route {
    peer: SocketAddr,
    src: SocketAddr,
    dst_mac: [u8; 6],
    tcp: Option<tcp_flow::Segment>,
}

/// Datagrams gathered into one super-frame: to one peer, all of the first one's size
/// but the last, and on the TCP-shaped wire with the sequence numbers and fields the
/// kernel's segmentation gives each segment from the first one's header.
#[derive(Default)]
struct SuperFrame<'a> {
    route: Option<Route>,
    segment_len: usize,
    total: usize,
    next_seq: u32,
    /// A shorter datagram ends a run: segmentation cuts equal pieces.
    closed: bool,
    payloads: Vec<&'a [u8]>,
}

impl<'a> SuperFrame<'a> {
    fn start(&mut self, route: Route, len: usize) {
        self.route = Some(route);
        self.segment_len = len;
        self.total = 0;
        self.closed = false;
        self.next_seq = route.tcp.map_or(0, |t| t.seq);
    }

    fn takes(&self, route: &Route, len: usize) -> bool {
        let Some(first) = &self.route else { return false };
        let same_header = match (first.tcp, route.tcp) {
            (None, None) => true,
            (Some(f), Some(t)) => {
                t.seq == self.next_seq && (t.ack, t.flags, t.window, t.options) == (f.ack, f.flags, f.window, f.options)
            }
            _ => false,
        };
        !self.closed
            && same_header
            && (route.peer, route.src, route.dst_mac) == (first.peer, first.src, first.dst_mac)
            && len > 0
            && len <= self.segment_len
            && self.payloads.len() < gso::MAX_SEGMENTS
            && self.total + len <= gso::MAX_SUPER_PAYLOAD
    }

    fn push(&mut self, payload: &'a [u8]) {
        self.closed = payload.len() < self.segment_len;
        self.total += payload.len();
        self.next_seq = self.next_seq.wrapping_add(payload.len() as u32);
        self.payloads.push(payload);
    }
}

/// One RX queue's socket, with its tokio registration.
struct Queue {
    xsk: xsk::Xsk,
    ready: AsyncFd<s2n_quic_xdp::socket::Fd>,
}

pub struct XdpTransport {
    // Drop order: the threads first, then the sockets (after `Drop::drop` unregistered
    // them), then the steering handle, which detaches and unpins.
    _addresses: Option<locals::Watcher>,
    resolver: neigh::Resolver,
    /// Where frames leave when it could be opened: super-frames the kernel segments
    /// (see [`gso`]). Without it they leave through queue 0's AF_XDP TX ring.
    packet_tx: Option<gso::PacketTx>,
    queues: Vec<Queue>,
    steering: Steering,
    peers: Arc<Mutex<Peers>>,
    counters: XdpCounters,
    local: SocketAddr,
    src_mac: [u8; 6],
    wire: WireShape,
    learn_macs: bool,
    max_payload: usize,
    ip_id: std::sync::atomic::AtomicU16,
    /// Rotates which queue `recv_batch` drains first, so one busy queue cannot starve
    /// the others.
    next_rx: AtomicU64,
    /// Keeps a picked client port taken in the kernel, so no kernel socket gets it.
    _port_reservation: Option<socket2::Socket>,
}

impl XdpTransport {
    pub fn open(opts: XdpOptions) -> Result<XdpTransport, XdpError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(XdpError::NoRuntime);
        }
        if opts.local.ip().is_unspecified() {
            return Err(XdpError::UnspecifiedLocal(opts.local));
        }
        if let Some(peer) = opts.peer
            && peer.is_ipv4() != opts.local.is_ipv4()
        {
            return Err(XdpError::FamilyMismatch {
                local: opts.local,
                peer,
            });
        }
        let info = iface::query(&opts.interface).map_err(|source| XdpError::Interface {
            interface: opts.interface.clone(),
            what: "MAC, MTU and queues",
            source,
        })?;
        let (local, reservation) = pick_local(opts.local, opts.wire)?;

        let protocol = match opts.wire {
            WireShape::Tcp => Protocol::Tcp,
            WireShape::Udp => Protocol::Udp,
        };
        let local_other = opts.local_other_family.filter(|ip| ip.is_ipv4() != local.is_ipv4());
        let mut filter = FilterConfig::new(protocol, local.port()).with_redirect(true);
        if let Some(peer) = opts.peer {
            filter = filter.with_peer(Addr::from(peer.ip()), peer.port());
        }
        let locals = locals::Locals::new(filter, [Some(local.ip()), local_other].into_iter().flatten().collect());
        // Sizes for IPv6's larger header wherever an IPv6 address may be steered, now
        // or once the interface gains one.
        let ipv6 = local.is_ipv6() || local_other.is_some() || opts.follow == Follow::Interface { v6: true };
        let mut steering = Steering::attach(AttachOptions {
            interface: opts.interface.clone(),
            instance: opts.instance.clone(),
            mode: opts.mode,
            filter: *locals.filter(),
        })?;
        let packet_tx = gso::PacketTx::open(steering.ifindex())
            .map_err(|e| {
                tracing::warn!(
                    "frames leave one at a time through AF_XDP: {}",
                    crate::kernel::error_chain(&e)
                )
            })
            .ok();
        let queues = open_queues(&mut steering, &info, packet_tx.is_none())?;

        let mut peers = Peers::default();
        peers.locals = locals;
        if opts.wire == WireShape::Tcp {
            let side = match opts.peer {
                Some(_) => tcp_flow::Side::Client,
                None => tcp_flow::Side::Server { port: local.port() },
            };
            let mss = mss(info.mtu, ipv6);
            peers.tcp = Some(Flows::new(
                side,
                SynKey::new(opts.syn_key),
                mss,
                Instant::now(),
                // This run's start, for the server's refusal of SYNs stamped earlier.
                crate::node::now().unix_ms,
                rand::random(),
            ));
        }
        let peers = Arc::new(Mutex::new(peers));
        let resolver = neigh::Resolver::spawn(opts.interface.clone(), peers.clone()).map_err(XdpError::Resolver)?;
        let addresses = locals::Watcher::spawn(
            opts.follow,
            &opts.interface,
            steering.ifindex(),
            peers.clone(),
            steering.filter_writer()?,
        )
        .map_err(|source| XdpError::Addresses {
            interface: opts.interface.clone(),
            source,
        })?;
        if let Some(peer) = opts.peer {
            resolve_at_open(&peers, peer.ip(), &opts.interface);
        }

        // Both families share the datagram size: the IPv6 header's, the larger.
        let max_payload = max_payload(info.mtu, ipv6, opts.wire);
        tracing::info!(
            interface = %opts.interface,
            %local,
            peer = ?opts.peer,
            wire = %opts.wire,
            xdp = steering.mode().as_str(),
            queues = queues.len(),
            zero_copy = queues.iter().all(|q| q.xsk.zero_copy()),
            segmentation = packet_tx.is_some(),
            max_payload,
            "xdp transport open"
        );
        Ok(XdpTransport {
            _addresses: addresses,
            resolver,
            packet_tx,
            queues,
            steering,
            peers,
            counters: XdpCounters::default(),
            local,
            src_mac: info.mac,
            wire: opts.wire,
            learn_macs: opts.peer.is_none(),
            max_payload,
            ip_id: std::sync::atomic::AtomicU16::new(rand::random()),
            next_rx: AtomicU64::new(0),
            _port_reservation: reservation,
        })
    }

    /// The address paqet was opened on (with the picked port when opened with port 0);
    /// the addresses it steers may have followed the interface since.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address our frames to `peer` leave from, if we have one of its family.
    fn source_for(&self, peers: &Peers, peer: &SocketAddr) -> Option<SocketAddr> {
        peers
            .source_for(peer.ip())
            .map(|ip| SocketAddr::new(ip, self.local.port()))
    }

    pub fn counters(&self) -> &XdpCounters {
        &self.counters
    }

    /// `paqet_steer`'s counters (summed over CPUs).
    pub fn steering_stats(&self) -> Result<Stats, KernelError> {
        self.steering.stats()
    }

    pub fn attached_mode(&self) -> AttachedMode {
        self.steering.mode()
    }

    /// Frames the kernel dropped for the sockets (RX ring full, no fill frames...),
    /// summed over queues: (rx_dropped, rx_ring_full, rx_fill_ring_empty).
    pub fn socket_drops(&self) -> (u64, u64, u64) {
        self.queues
            .iter()
            .filter_map(|q| q.xsk.statistics().ok())
            .fold((0, 0, 0), |acc, s| {
                (
                    acc.0 + s.rx_dropped,
                    acc.1 + s.rx_ring_full,
                    acc.2 + s.rx_fill_ring_empty_descriptors,
                )
            })
    }

    fn peers(&self) -> MutexGuard<'_, Peers> {
        // Plain data behind the lock: a panic elsewhere does not make it unusable.
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(c: &AtomicU64, n: usize) {
        if n > 0 {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Asks the resolver for the MACs of `ips`, once each until it answers.
    fn request_resolution(&self, ips: &[IpAddr]) {
        for &ip in ips {
            if self.peers().start_resolving(ip) && !self.resolver.request(ip) {
                self.peers().done_resolving(ip);
            }
        }
    }

    fn send_chunk(&self, chunk: &[Transmit], missing: &mut Vec<IpAddr>) {
        let now = Instant::now();
        let unix_ms = unix_ms();
        let mut peers = self.peers();
        let mut tally = SendTally::default();
        match &self.packet_tx {
            Some(packet_tx) => {
                let mut run = SuperFrame {
                    payloads: Vec::with_capacity(gso::MAX_SEGMENTS),
                    ..SuperFrame::default()
                };
                for t in chunk {
                    let Some(route) = self.route(&mut peers, t, now, unix_ms, &mut tally, missing) else {
                        continue;
                    };
                    if !run.takes(&route, t.payload.len()) {
                        self.send_super_frame(packet_tx, &mut run, &mut tally);
                        run.start(route, t.payload.len());
                    }
                    run.push(&t.payload);
                }
                self.send_super_frame(packet_tx, &mut run, &mut tally);
            }
            None => {
                let Some(q) = self.queues.first() else { return };
                let mut tx = lock(&q.xsk.tx);
                let (queued, processed) = q.xsk.send(&mut tx, chunk.len(), |i, frame| {
                    let t = &chunk[i];
                    let r = self.route(&mut peers, t, now, unix_ms, &mut tally, missing)?;
                    let n = self.build(frame, r.dst_mac, r.src, t.peer, r.tcp, &t.payload);
                    tally.invalid += usize::from(n.is_none());
                    n
                });
                tally.sent += queued;
                tally.full += chunk.len() - processed;
            }
        }
        Self::count(&self.counters.tx_frames, tally.sent);
        Self::count(&self.counters.tx_dropped_full, tally.full);
        Self::count(&self.counters.tx_dropped_invalid, tally.invalid);
        Self::count(&self.counters.tx_dropped_no_neighbour, tally.no_neighbour);
        Self::count(&self.counters.tx_held, tally.held);
        Self::count(&self.counters.tx_dropped_flow, tally.dropped_flow);
        self.send_control(&mut peers, now);
    }

    /// Where one datagram goes and the TCP header it gets, or `None` (counted in
    /// `tally`) when it cannot leave now.
    fn route(
        &self,
        peers: &mut Peers,
        t: &Transmit,
        now: Instant,
        unix_ms: u64,
        tally: &mut SendTally,
        missing: &mut Vec<IpAddr>,
    ) -> Option<Route> {
        let Some(src) = self
            .source_for(peers, &t.peer)
            .filter(|_| t.payload.len() <= self.max_payload)
        else {
            tally.invalid += 1;
            return None;
        };
        let Some(dst_mac) = peers.mac(t.peer.ip(), now) else {
            tally.no_neighbour += 1;
            if !missing.contains(&t.peer.ip()) {
                missing.push(t.peer.ip());
            }
            return None;
        };
        let tcp = match peers.tcp.as_mut().map(|f| f.on_send(t.peer, &t.payload, now, unix_ms)) {
            None => None,
            Some(TxVerdict::Send(seg)) => Some(seg),
            Some(TxVerdict::Held) => {
                tally.held += 1;
                return None;
            }
            Some(TxVerdict::Drop(why)) => {
                tracing::trace!(peer = %t.peer, ?why, "datagram dropped by its TCP-shaped flow");
                tally.dropped_flow += 1;
                return None;
            }
        };
        Some(Route {
            peer: t.peer,
            src,
            dst_mac,
            tcp,
        })
    }

    /// Sends the run gathered so far as one (super-)frame and empties it.
    fn send_super_frame(&self, packet_tx: &gso::PacketTx, run: &mut SuperFrame<'_>, tally: &mut SendTally) {
        if let Some(route) = run.route.take() {
            self.send_packets(packet_tx, &route, &run.payloads, tally);
        }
        run.payloads.clear();
    }

    /// Sends `payloads` to `route` as one frame, or one super-frame the kernel segments.
    fn send_packets(&self, packet_tx: &gso::PacketTx, route: &Route, payloads: &[&[u8]], tally: &mut SendTally) {
        let count = payloads.len();
        let headers = emit::headers(&emit::Frame {
            src_mac: self.src_mac,
            dst_mac: route.dst_mac,
            src: route.src,
            dst: route.peer,
            wire: self.wire,
            tcp: route.tcp,
            ip_id: self.ip_id.fetch_add(count as u16, Ordering::Relaxed),
            payload: &[],
        });
        match packet_tx.send(&headers, payloads) {
            Ok(()) => tally.sent += count,
            Err(gso::SendError::Full) => tally.full += count,
            Err(gso::SendError::Invalid(why)) => {
                tracing::debug!(peer = %route.peer, "cannot send a frame: {why}");
                tally.invalid += count;
            }
        }
    }

    /// Writes one frame into `frame`: its length, or `None` (logged) if it cannot be
    /// built.
    fn build(
        &self,
        frame: &mut [u8],
        dst_mac: [u8; 6],
        src: SocketAddr,
        dst: SocketAddr,
        tcp: Option<tcp_flow::Segment>,
        payload: &[u8],
    ) -> Option<usize> {
        let f = emit::Frame {
            src_mac: self.src_mac,
            dst_mac,
            src,
            dst,
            wire: self.wire,
            tcp,
            ip_id: self.ip_id.fetch_add(1, Ordering::Relaxed),
            payload,
        };
        emit::emit(frame, &f)
            .map_err(|e| tracing::debug!("cannot build a frame: {e:?}"))
            .ok()
    }

    /// Sends what the TCP-shaped flows queued by themselves: SYN, SYN-ACK, ACK, and the
    /// datagrams held during a handshake. Called with the peers locked, after a send or
    /// a drain.
    fn send_control(&self, peers: &mut Peers, now: Instant) {
        let Some(controls) = peers.tcp.as_mut().filter(|f| f.has_control()).map(Flows::take_control) else {
            return;
        };
        if let Some(packet_tx) = &self.packet_tx {
            return self.send_control_packets(packet_tx, peers, &controls, now);
        }
        let Some(q) = self.queues.first() else { return };
        let mut tx = lock(&q.xsk.tx);
        let mut failed = 0usize;
        let mut data = 0usize;
        let (queued, processed) = q.xsk.send(&mut tx, controls.len(), |i, frame| {
            let Control { peer, seg, payload } = &controls[i];
            let (Some(src), Some(dst_mac)) = (self.source_for(peers, peer), peers.mac(peer.ip(), now)) else {
                failed += 1;
                return None;
            };
            let n = self.build(frame, dst_mac, src, *peer, Some(*seg), payload);
            failed += usize::from(n.is_none());
            data += usize::from(n.is_some() && !payload.is_empty());
            n
        });
        drop(tx);
        // A lost handshake segment is sent again by the flow (SYN) or answered again
        // (SYN-ACK for a retransmitted SYN), so a full ring only delays.
        // Held datagrams count as data frames, handshake segments as control.
        let data = data.min(queued);
        Self::count(&self.counters.tx_frames, data);
        Self::count(&self.counters.tx_control, queued - data);
        Self::count(&self.counters.tx_dropped_invalid, failed);
        Self::count(&self.counters.tx_dropped_full, controls.len() - processed);
    }

    /// [`Self::send_control`] through the AF_PACKET socket, so that handshake segments
    /// and data leave by one path, in order.
    fn send_control_packets(&self, packet_tx: &gso::PacketTx, peers: &mut Peers, controls: &[Control], now: Instant) {
        let mut tally = SendTally::default();
        let mut data = 0usize;
        for Control { peer, seg, payload } in controls {
            let (Some(src), Some(dst_mac)) = (self.source_for(peers, peer), peers.mac(peer.ip(), now)) else {
                tally.invalid += 1;
                continue;
            };
            let route = Route {
                peer: *peer,
                src,
                dst_mac,
                tcp: Some(*seg),
            };
            let sent = tally.sent;
            self.send_packets(packet_tx, &route, &[payload], &mut tally);
            data += usize::from(tally.sent > sent && !payload.is_empty());
        }
        Self::count(&self.counters.tx_frames, data);
        Self::count(&self.counters.tx_control, tally.sent - data);
        Self::count(&self.counters.tx_dropped_invalid, tally.invalid);
        Self::count(&self.counters.tx_dropped_full, tally.full);
    }

    /// Drains ready frames of all queues into `batch`; returns how many were filled.
    fn drain(&self, batch: &mut RecvBatch) -> usize {
        let n = self.queues.len();
        let start = self.next_rx.fetch_add(1, Ordering::Relaxed) as usize;
        let cap = batch.capacity();
        let slots = batch.slots_mut();
        let mut filled = 0usize;
        let mut malformed = 0usize;
        let mut control = 0usize;
        let mut refused = 0usize;
        let now = Instant::now();
        let unix_ms = unix_ms();
        let mut peers = self.peers();
        for k in 0..n {
            if filled == cap {
                break;
            }
            let q = &self.queues[(start + k) % n];
            let mut rx = lock(&q.xsk.rx);
            q.xsk.drain_rx(&mut rx, (cap - filled) as u32, |frame| {
                let slot = &mut slots[filled];
                let accepted = frame
                    .ok_or(Rejected::Malformed)
                    .and_then(|f| self.accept(f, &mut peers, now, unix_ms, &mut slot.buf));
                match accepted {
                    Ok((peer, len, via)) => {
                        slot.peer = peer;
                        slot.len = len;
                        slot.via = Some(via);
                        filled += 1;
                    }
                    Err(Rejected::Malformed) => malformed += 1,
                    Err(Rejected::Control) => control += 1,
                    Err(Rejected::Flow) => refused += 1,
                }
            });
        }
        // Handshake answers go out at once, with the peers still locked so that no
        // datagram of the engine can overtake them.
        self.send_control(&mut peers, now);
        drop(peers);
        batch.set_filled(filled);
        Self::count(&self.counters.rx_frames, filled);
        Self::count(&self.counters.rx_dropped_malformed, malformed);
        Self::count(&self.counters.rx_control, control);
        Self::count(&self.counters.rx_dropped_flow, refused);
        filled
    }

    /// Checks one received frame and copies its payload into `buf`: the sender and the
    /// payload length, or why not. Checksums are not checked: a veth peer hands over
    /// frames whose checksums were never filled in, and the AEAD above authenticates
    /// every payload anyway. On the TCP-shaped wire the frame's flow decides first:
    /// handshake segments stay here, and frames of no flow are dropped unanswered.
    fn accept(
        &self,
        frame: &[u8],
        peers: &mut Peers,
        now: Instant,
        unix_ms: u64,
        buf: &mut [u8],
    ) -> Result<(SocketAddr, usize, Via), Rejected> {
        let s = parse_frame(frame).map_err(|_| Rejected::Malformed)?;
        // The program may still have steered it by the previous set of addresses.
        if !peers.locals.filter().matches(&s) {
            return Err(Rejected::Malformed);
        }
        let via = Via {
            mac: s.src_mac,
            local: s.dst.to_ip().ok_or(Rejected::Malformed)?,
        };
        let peer = SocketAddr::new(s.src.to_ip().ok_or(Rejected::Malformed)?, s.src_port);
        let payload = frame
            .get(s.payload_offset as usize..)
            .and_then(|p| p.get(..s.payload_len as usize))
            .ok_or(Rejected::Malformed)?;
        if let Some(flows) = peers.tcp.as_mut() {
            let options = frame
                .get(s.l4_offset as usize + paqet_common::wire::TCP_MIN_HEADER_LEN..s.payload_offset as usize)
                .map(parse_tcp_options)
                .ok_or(Rejected::Malformed)?
                .map_err(|_| Rejected::Malformed)?;
            let rx = Received {
                seq: s.tcp_seq,
                ack: s.tcp_ack,
                flags: s.tcp_flags,
                window: s.tcp_window,
                options,
                payload_len: payload.len(),
            };
            match flows.on_receive(peer, &rx, now, unix_ms) {
                RxVerdict::Deliver => {}
                RxVerdict::Consumed => {
                    // A server answers a SYN only when it proves the key and is new, so
                    // its source MAC is as trustworthy as an authenticated payload's:
                    // the SYN-ACK goes back the way the SYN came.
                    if self.learn_macs && rx.flags & tcp_flow::SYN != 0 {
                        peers.learn(peer.ip(), via, now);
                    }
                    return Err(Rejected::Control);
                }
                RxVerdict::Drop(why) => {
                    tracing::trace!(%peer, ?why, "frame dropped by the TCP-shaped flows");
                    return Err(Rejected::Flow);
                }
            }
        }
        if payload.is_empty() || payload.len() > buf.len() {
            return Err(Rejected::Malformed);
        }
        buf[..payload.len()].copy_from_slice(payload);
        // The way back is only learned once the engine has authenticated the payload
        // (`peer_authenticated`): any host on the link can forge a frame's source.
        Ok((peer, payload.len(), via))
    }

    /// Resolves once any queue's socket is readable and its RX ring really has frames.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(move |cx| {
            for q in &self.queues {
                // Twice: after clearing a stale readiness the second poll registers
                // the waker (or finds a new edge).
                for _ in 0..2 {
                    match q.ready.poll_read_ready(cx) {
                        Poll::Ready(Ok(mut guard)) => {
                            if xsk::Xsk::rx_pending(&mut lock(&q.xsk.rx)) {
                                return Poll::Ready(Ok(()));
                            }
                            guard.clear_ready();
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => break,
                    }
                }
            }
            Poll::Pending
        })
    }
}

/// Why a received frame is not handed to the engine.
enum Rejected {
    Malformed,
    /// A handshake segment the flow took.
    Control,
    /// A frame no flow takes.
    Flow,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The MSS a SYN announces: what a TCP header without options leaves of the MTU.
fn mss(mtu: u32, ipv6: bool) -> u16 {
    let ip = if ipv6 {
        paqet_common::wire::IPV6_HEADER_LEN
    } else {
        paqet_common::wire::IPV4_MIN_HEADER_LEN
    };
    u16::try_from((mtu as usize).saturating_sub(ip + paqet_common::wire::TCP_MIN_HEADER_LEN)).unwrap_or(u16::MAX)
}

/// Binds a kernel socket to pick a free port when `local` has port 0, and keeps it as
/// a reservation.
fn pick_local(local: SocketAddr, wire: WireShape) -> Result<(SocketAddr, Option<socket2::Socket>), XdpError> {
    if local.port() != 0 {
        return Ok((local, None));
    }
    let (ty, proto) = match wire {
        WireShape::Tcp => (socket2::Type::STREAM, socket2::Protocol::TCP),
        WireShape::Udp => (socket2::Type::DGRAM, socket2::Protocol::UDP),
    };
    let err = |e| XdpError::PortReservation(local, e);
    let sock = socket2::Socket::new(socket2::Domain::for_address(local), ty, Some(proto)).map_err(err)?;
    sock.bind(&local.into()).map_err(err)?;
    let picked = sock
        .local_addr()
        .map_err(err)?
        .as_socket()
        .ok_or_else(|| err(io::Error::other("bound address is not an IP address")))?;
    Ok((picked, Some(sock)))
}

fn open_queues(steering: &mut Steering, info: &iface::InterfaceInfo, tx_thread: bool) -> Result<Vec<Queue>, XdpError> {
    let count = info.rx_queues.min(paqet_common::maps::MAX_QUEUES);
    if info.rx_queues > count {
        tracing::warn!(
            queues = info.rx_queues,
            "only the first {count} RX queues get an AF_XDP socket; paqet's frames on the others reach the kernel"
        );
    }
    let budget = if crate::kernel::caps::may_lock_memory() {
        xsk::UMEM_FRAMES_LOCKED
    } else {
        xsk::UMEM_FRAMES
    };
    let frames = xsk::frames_per_queue(budget, count);
    let try_zero_copy = steering.mode() == AttachedMode::Native;
    let mut queues = Vec::with_capacity(count as usize);
    for queue in 0..count {
        let mut xsk = match xsk::Xsk::open(steering.ifindex(), queue, frames, try_zero_copy) {
            Ok(x) => x,
            // Queue 0 must work; a later one failing means the driver reported more
            // queues than it lets us bind, and the ones we have still carry traffic.
            Err(e) if queue > 0 => {
                tracing::warn!(
                    queue,
                    "no AF_XDP socket on this queue: {}",
                    crate::kernel::error_chain(&e)
                );
                break;
            }
            Err(e) => return Err(e.into()),
        };
        // SAFETY: the clone shares the socket's descriptor, which closes only when its
        // last clone drops; the AsyncFd holds one, so the fd stays open and the same.
        let ready = unsafe { AsyncFd::register_with_interest(xsk.fd().clone(), Interest::READABLE) }
            .map_err(|e| XdpError::Reactor(e.into()))?;
        // All frames leave through queue 0's socket.
        if queue == 0
            && tx_thread
            && let Err(e) = xsk.start_tx_thread()
        {
            tracing::warn!("no AF_XDP TX thread ({e}); the engine's thread transmits");
        }
        steering.register_xsk(queue, &xsk)?;
        tracing::debug!(queue, zero_copy = xsk.zero_copy(), frames, "AF_XDP socket registered");
        queues.push(Queue { xsk, ready });
    }
    Ok(queues)
}

/// Resolves the server's next hop before the first send, so the handshake is not
/// dropped; on failure the resolver thread keeps trying on demand.
fn resolve_at_open(peers: &Mutex<Peers>, peer: IpAddr, interface: &str) {
    match neigh::resolve(peer, interface, neigh::RESOLVE_WAIT) {
        Ok(mac) => {
            tracing::info!(%peer, mac = %iface::fmt_mac(mac), "next hop resolved");
            lock(peers).set_from_kernel(peer, mac, Instant::now());
        }
        Err(e) => tracing::warn!(%peer, "next hop not resolved yet: {}", crate::kernel::error_chain(&e)),
    }
}

/// The largest payload whose frame fits both the MTU and a UMEM frame.
fn max_payload(mtu: u32, ipv6: bool, wire: WireShape) -> usize {
    let l2 = paqet_common::wire::ETH_HEADER_LEN;
    let headers = emit::header_len(ipv6, wire);
    let by_mtu = (mtu as usize + l2).saturating_sub(headers);
    let by_frame = xsk::MAX_FRAME.saturating_sub(headers);
    by_mtu.min(by_frame)
}

impl Drop for XdpTransport {
    fn drop(&mut self) {
        for q in &self.queues {
            if let Err(e) = self.steering.unregister_xsk(q.xsk.queue()) {
                tracing::debug!(queue = q.xsk.queue(), "unregistering the AF_XDP socket: {e}");
            }
        }
        let c = self.counters.snapshot();
        tracing::info!(?c, "xdp transport closed");
    }
}

impl XdpTransport {
    /// The shape of the frames this transport sends and steers.
    pub fn wire(&self) -> WireShape {
        self.wire
    }
}

impl Transport for XdpTransport {
    fn name(&self) -> &'static str {
        "xdp"
    }

    fn receive_overflows(&self) -> u64 {
        let (dropped, ring_full, _fill_empty) = self.socket_drops();
        dropped + ring_full
    }

    fn steering_counters(&self) -> Option<Stats> {
        self.steering_stats()
            .inspect_err(|e| tracing::debug!("cannot read paqet_steer's counters: {e}"))
            .ok()
    }

    fn peer_authenticated(&self, peer: SocketAddr, via: Option<Via>) {
        if let (true, Some(via)) = (self.learn_macs, via) {
            self.peers().learn(peer.ip(), via, Instant::now());
        }
    }

    fn send_batch(&self, batch: &[Transmit]) -> io::Result<()> {
        let mut missing = Vec::new();
        for chunk in batch.chunks(TX_CHUNK) {
            self.send_chunk(chunk, &mut missing);
        }
        if !missing.is_empty() {
            self.request_resolution(&missing);
        }
        Ok(())
    }

    async fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<()> {
        loop {
            if self.drain(batch) > 0 {
                return Ok(());
            }
            self.readable().await?;
        }
    }

    fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        Ok(self.drain(batch))
    }

    fn max_payload(&self) -> usize {
        self.max_payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_payload_respects_mtu_and_frame() {
        // TCP-shaped frames carry timestamps (12 bytes of options) in every segment.
        assert_eq!(max_payload(1500, false, WireShape::Tcp), 1448);
        assert_eq!(max_payload(1500, false, WireShape::Udp), 1472);
        // Less than the engine's default 1432-byte datagram: the path's size must win.
        assert_eq!(max_payload(1500, true, WireShape::Tcp), 1428);
        assert_eq!(mss(1500, false), 1460);
        assert_eq!(mss(1500, true), 1440);
        // A jumbo MTU is capped by the UMEM frame.
        assert_eq!(max_payload(9000, false, WireShape::Udp), xsk::MAX_FRAME - 42);
    }
}
