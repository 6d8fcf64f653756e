//! Where the engine's relayed UDP datagrams go once they are whole: on a client, to the
//! association or forward that owns the flow; on a server, to the UDP flows of `dial::udp`.
//!
//! Every queue here is bounded twice: in datagrams per queue and, shared by all queues,
//! in bytes ([`QUEUED_BYTES_MAX`]), so a burst of 64 KiB datagrams towards a slow
//! consumer cannot hold more than that much memory. Beyond either, a datagram is dropped
//! and counted: UDP may lose datagrams, and senders expect it.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::engine::datagrams::DatagramEvent;
use crate::engine::frame::TargetAddr;
use crate::engine::{FastMap, PeerId};
use crate::sync::lock;

/// Datagrams one flow's queue holds (client) before more are dropped.
pub const FLOW_QUEUE: usize = 512;
/// Datagrams the server's queue towards its UDP flows holds.
pub const SERVER_QUEUE: usize = 8192;
/// Bytes all queued datagrams may hold together.
pub const QUEUED_BYTES_MAX: usize = 32 << 20;
/// Flows (associations and forward mappings) a client holds at once.
pub const MAX_CLIENT_FLOWS: usize = 4096;

/// One datagram handed to a consumer; its bytes count against the shared budget until
/// it is dropped.
#[derive(Debug)]
pub struct Delivered {
    pub addr: TargetAddr,
    pub payload: Vec<u8>,
    budget: Arc<AtomicUsize>,
}

impl Drop for Delivered {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.payload.len(), Ordering::Relaxed);
    }
}

/// A server-side datagram event, with its bytes counted like [`Delivered`].
#[derive(Debug)]
pub enum ServerDatagram {
    Datagram {
        peer: PeerId,
        flow: u32,
        datagram: Delivered,
    },
    FlowClosed {
        peer: PeerId,
        flow: u32,
    },
}

#[derive(Debug, Default)]
pub struct RouterStats {
    pub delivered: AtomicU64,
    /// Dropped because a queue or the byte budget was full.
    pub dropped_full: AtomicU64,
    /// Client: arrived for a flow that has ended.
    pub dropped_no_flow: AtomicU64,
}

pub struct DatagramRouter {
    /// Client: the live associations and forwards, for `paqet status`.
    pub registry: UdpRegistry,
    flows: Mutex<FastMap<u32, mpsc::Sender<Delivered>>>,
    server: Option<mpsc::Sender<ServerDatagram>>,
    server_rx: Mutex<Option<mpsc::Receiver<ServerDatagram>>>,
    next_flow: AtomicU32,
    budget: Arc<AtomicUsize>,
    pub stats: RouterStats,
}

impl DatagramRouter {
    pub fn new(server: bool) -> DatagramRouter {
        let (tx, rx) = if server {
            let (tx, rx) = mpsc::channel(SERVER_QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        DatagramRouter {
            registry: UdpRegistry::default(),
            flows: Mutex::new(FastMap::default()),
            server: tx,
            server_rx: Mutex::new(rx),
            // Random start: a restarted client does not reuse the flow numbers the
            // server may still hold for its previous instance (a new instance is a new
            // peer there anyway; this only makes logs less confusing).
            next_flow: AtomicU32::new(rand::random::<u32>() | 1),
            budget: Arc::new(AtomicUsize::new(0)),
            stats: RouterStats::default(),
        }
    }

    /// Server: the receiver of every datagram event (taken once).
    pub fn take_server_receiver(&self) -> Option<mpsc::Receiver<ServerDatagram>> {
        lock(&self.server_rx).take()
    }

    /// Client: a new flow and the queue its replies arrive on; `None` at the cap.
    pub fn register(&self) -> Option<(u32, mpsc::Receiver<Delivered>)> {
        let mut flows = lock(&self.flows);
        if flows.len() >= MAX_CLIENT_FLOWS {
            return None;
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        loop {
            let flow = self.next_flow.fetch_add(1, Ordering::Relaxed);
            if flow != 0 && !flows.contains_key(&flow) {
                flows.insert(flow, tx);
                return Some((flow, rx));
            }
        }
    }

    pub fn unregister(&self, flow: u32) {
        lock(&self.flows).remove(&flow);
    }

    pub fn live_flows(&self) -> usize {
        lock(&self.flows).len()
    }

    /// Bytes of datagrams queued towards consumers now.
    pub fn queued_bytes(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }

    fn charge(&self, addr: TargetAddr, payload: Vec<u8>) -> Option<Delivered> {
        let len = payload.len();
        let before = self.budget.fetch_add(len, Ordering::Relaxed);
        let datagram = Delivered {
            addr,
            payload,
            budget: self.budget.clone(),
        };
        if before + len > QUEUED_BYTES_MAX {
            self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(datagram)
    }

    /// Hands what the engine reassembled to its consumer, or drops it (counted).
    pub fn deliver(&self, event: DatagramEvent) {
        match (event, &self.server) {
            (
                DatagramEvent::Datagram {
                    peer,
                    flow,
                    addr,
                    payload,
                },
                Some(server),
            ) => {
                let Some(datagram) = self.charge(addr, payload) else {
                    return;
                };
                let sent = server.try_send(ServerDatagram::Datagram { peer, flow, datagram });
                self.count(sent.is_ok());
            }
            (DatagramEvent::FlowClosed { peer, flow }, Some(server)) => {
                let _ = server.try_send(ServerDatagram::FlowClosed { peer, flow });
            }
            (
                DatagramEvent::Datagram {
                    flow, addr, payload, ..
                },
                None,
            ) => {
                let Some(tx) = lock(&self.flows).get(&flow).cloned() else {
                    self.stats.dropped_no_flow.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let Some(datagram) = self.charge(addr, payload) else {
                    return;
                };
                self.count(tx.try_send(datagram).is_ok());
            }
            (DatagramEvent::FlowClosed { .. }, None) => {}
        }
    }

    fn count(&self, ok: bool) {
        if ok {
            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counters of one association or forward.
#[derive(Debug, Default)]
pub struct FlowCounters {
    /// Datagrams (or, for a TCP forward, connections) from the application to the relay.
    pub up: AtomicU64,
    pub down: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Dropped: FRAG ≠ 0, a source other than the control connection's IP, a malformed
    /// header, no session, a full queue.
    pub dropped: AtomicU64,
    /// Flows (UDP forward: local sources; SOCKS: 1) live now.
    pub flows: AtomicUsize,
}

impl FlowCounters {
    pub fn up(&self, bytes: usize) {
        self.up.fetch_add(1, Ordering::Relaxed);
        self.bytes_up.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn down(&self, bytes: usize) {
        self.down.fetch_add(1, Ordering::Relaxed);
        self.bytes_down.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// What `paqet status` lists: `kind` is "socks-udp", "forward-tcp" or "forward-udp";
/// `local` the listener or relay address; `peer` the SOCKS client or the forward's target.
#[derive(Debug)]
pub struct UdpEntry {
    pub kind: &'static str,
    pub local: String,
    pub peer: String,
    pub counters: Arc<FlowCounters>,
}

#[derive(Debug, Default)]
pub struct UdpRegistry {
    entries: Mutex<std::collections::BTreeMap<u64, Arc<UdpEntry>>>,
    next: AtomicU64,
}

/// Keeps an entry listed while it lives.
pub struct Registered<'a> {
    registry: &'a UdpRegistry,
    id: u64,
    pub counters: Arc<FlowCounters>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.registry.entries).remove(&self.id);
    }
}

impl UdpRegistry {
    pub fn add(&self, kind: &'static str, local: String, peer: String) -> Registered<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let counters = Arc::new(FlowCounters::default());
        let entry = Arc::new(UdpEntry {
            kind,
            local,
            peer,
            counters: counters.clone(),
        });
        lock(&self.entries).insert(id, entry);
        Registered {
            registry: self,
            id,
            counters,
        }
    }

    /// Every live entry as JSON, for the live status file.
    pub fn to_json(&self) -> Vec<serde_json::Value> {
        let entries: Vec<Arc<UdpEntry>> = lock(&self.entries).values().cloned().collect();
        entries
            .iter()
            .map(|e| {
                let c = &e.counters;
                serde_json::json!({
                    "kind": e.kind,
                    "local": e.local,
                    "peer": e.peer,
                    "flows": c.flows.load(Ordering::Relaxed),
                    "up": c.up.load(Ordering::Relaxed),
                    "down": c.down.load(Ordering::Relaxed),
                    "bytes_up": c.bytes_up.load(Ordering::Relaxed),
                    "bytes_down": c.bytes_down.load(Ordering::Relaxed),
                    "dropped": c.dropped.load(Ordering::Relaxed),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(flow: u32, len: usize) -> DatagramEvent {
        DatagramEvent::Datagram {
            peer: 1,
            flow,
            addr: TargetAddr::Ip("198.18.1.2:53".parse().unwrap()),
            payload: vec![7; len],
        }
    }

    #[test]
    fn a_flow_gets_its_own_datagrams_and_a_full_queue_drops_and_counts() {
        let router = DatagramRouter::new(false);
        let (a, mut rx_a) = router.register().unwrap();
        let (b, mut rx_b) = router.register().unwrap();
        assert_ne!(a, b);
        router.deliver(datagram(a, 3));
        router.deliver(datagram(b, 4));
        router.deliver(datagram(a ^ b ^ 0xffff, 4));
        assert_eq!(rx_a.try_recv().unwrap().payload.len(), 3);
        assert_eq!(rx_b.try_recv().unwrap().payload.len(), 4);
        assert_eq!(router.stats.dropped_no_flow.load(Ordering::Relaxed), 1);
        for _ in 0..FLOW_QUEUE + 5 {
            router.deliver(datagram(a, 1));
        }
        assert_eq!(router.stats.dropped_full.load(Ordering::Relaxed), 5);
        assert_eq!(router.queued_bytes(), FLOW_QUEUE);
        while rx_a.try_recv().is_ok() {}
        assert_eq!(router.queued_bytes(), 0, "taken datagrams give their bytes back");
        router.unregister(a);
        router.deliver(datagram(a, 1));
        assert_eq!(router.stats.dropped_no_flow.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn queued_bytes_stay_within_the_budget() {
        let router = DatagramRouter::new(true);
        let mut rx = router.take_server_receiver().unwrap();
        let big = 65_507;
        for _ in 0..2 * QUEUED_BYTES_MAX / big {
            router.deliver(datagram(1, big));
        }
        assert!(router.queued_bytes() <= QUEUED_BYTES_MAX);
        assert!(router.stats.dropped_full.load(Ordering::Relaxed) > 0);
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, QUEUED_BYTES_MAX / big);
        assert_eq!(router.queued_bytes(), 0);
    }
}
