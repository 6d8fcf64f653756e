//! Drives the sans-IO engine with tokio: the transport's datagrams in, the clock, and
//! the TCP connections of the edges (SOCKS on the client, dialled targets on the server).
//!
//! One lock guards the engine; every call into it drains the engine's datagrams and
//! events before the lock is released, sends the datagrams as one batch, and wakes the
//! stream tasks the events name.

mod busy_poll;
pub mod datagram;
pub mod forward;
mod relay;
mod shard_links;

pub use relay::relay_stream;
pub use shard_links::ShardLinks;

use crate::sync::lock;
use busy_poll::PathPolls;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::engine::frame::{OpenError, TargetAddr};
use crate::engine::mux::StreamError;
use crate::engine::shards::Handoff;
use crate::engine::{Counters, Engine, Event, FastMap, Now, PathId, StreamId, Transmit};
use crate::transport::{RecvBatch, Transport};

const RECV_BATCH: usize = 64;
/// How often authentication failures are summarised in the log (never per packet: a
/// scan must not flood the journal).
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// How often receive overflows are checked and, if significant, reported to the peers
/// (see `engine::backoff`).
const OVERFLOW_CHECK_EVERY: Duration = Duration::from_millis(100);

/// The overflow and arrival counters at the last check.
struct OverflowWatch {
    at: Instant,
    overflows: u64,
    received: u64,
}

impl OverflowWatch {
    fn new(overflows: u64, received: u64) -> OverflowWatch {
        OverflowWatch {
            at: Instant::now(),
            overflows,
            received,
        }
    }

    /// Overflows and arrivals since the last check, once a check is due and something
    /// overflowed.
    fn since_last(&mut self, overflows: u64, received: u64) -> Option<(u64, u64)> {
        if self.at.elapsed() < OVERFLOW_CHECK_EVERY {
            return None;
        }
        let delta = (
            overflows.saturating_sub(self.overflows),
            received.saturating_sub(self.received),
        );
        *self = OverflowWatch::new(overflows, received);
        (delta.0 > 0).then_some(delta)
    }
}

/// Where a client learns the server's answer to a stream it opened.
pub type ReplyReceiver = oneshot::Receiver<Result<(), OpenError>>;

/// Wakes one stream's tasks when the engine has something for them.
#[derive(Default)]
pub struct StreamWaker {
    pub readable: Notify,
    pub writable: Notify,
    closed: AtomicBool,
    reply: Mutex<Option<oneshot::Sender<Result<(), OpenError>>>>,
}

impl StreamWaker {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// A node and the runtime that drives it: where the tasks of its streams belong, so a
/// stream's copying runs on its engine's thread.
pub struct Runner<T: Transport> {
    pub node: Arc<Node<T>>,
    pub runtime: tokio::runtime::Handle,
}

impl<T: Transport> Clone for Runner<T> {
    fn clone(&self) -> Self {
        Runner {
            node: self.node.clone(),
            runtime: self.runtime.clone(),
        }
    }
}

impl<T: Transport> Runner<T> {
    /// The runner of `runners` with the fewest open streams: where a new one goes.
    /// Ties go to the first from `turn` on, so a burst of connections accepted before
    /// any of their streams opened still spreads.
    pub fn least_busy(runners: &[Runner<T>], turn: usize) -> Option<&Runner<T>> {
        let n = runners.len();
        (0..n)
            .filter_map(|i| runners.get((turn + i) % n))
            .min_by_key(|r| r.node.live_streams())
    }
}

pub struct Node<T: Transport> {
    engine: Mutex<Engine>,
    /// The transports, indexed by the engine's [`PathId`].
    paths: Vec<T>,
    wakers: Mutex<FastMap<StreamId, Arc<StreamWaker>>>,
    /// Server: streams that clients asked for, to be dialled.
    opened: Option<mpsc::UnboundedSender<(StreamId, TargetAddr)>>,
    timer: Notify,
    /// Datagrams already sent, whose buffers the next engine call recycles.
    spent: Mutex<Vec<Transmit>>,
    /// Per path: whether its receiver polls.
    busy_poll: PathPolls,
    /// Per path: wakes its sleeping receiver when a datagram goes out there, so it
    /// polls for the answer.
    sent: Vec<Notify>,
    /// Per path: datagrams received, against which its receive overflows are judged.
    received: Vec<AtomicU64>,
    /// Relayed UDP datagrams, to the flows that own them.
    pub datagrams: datagram::DatagramRouter,
    /// Sharded server: the way to the other shards.
    shard_links: Option<ShardLinks>,
    /// Sharded server: datagrams for another shard dropped, its inbox full.
    handoffs_dropped: AtomicU64,
}

pub fn now() -> Now {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Now {
        instant: Instant::now(),
        unix_ms,
    }
}

impl<T: Transport> Node<T> {
    /// A server node also returns the receiver of the streams clients open. `paths[i]`
    /// carries the engine's `PathId(i)`.
    pub fn new(
        engine: Engine,
        paths: Vec<T>,
        server: bool,
    ) -> (Arc<Self>, Option<mpsc::UnboundedReceiver<(StreamId, TargetAddr)>>) {
        Node::build(engine, paths, server, None)
    }

    /// One shard of a sharded server (see `engine::shards`).
    pub fn shard(
        engine: Engine,
        paths: Vec<T>,
        links: ShardLinks,
    ) -> (Arc<Self>, Option<mpsc::UnboundedReceiver<(StreamId, TargetAddr)>>) {
        Node::build(engine, paths, true, Some(links))
    }

    fn build(
        engine: Engine,
        paths: Vec<T>,
        server: bool,
        shard_links: Option<ShardLinks>,
    ) -> (Arc<Self>, Option<mpsc::UnboundedReceiver<(StreamId, TargetAddr)>>) {
        let (tx, rx) = if server {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let sent = paths.iter().map(|_| Notify::new()).collect();
        let received = paths.iter().map(|_| AtomicU64::new(0)).collect();
        let busy_poll = PathPolls::new(paths.len(), Instant::now());
        let node = Node {
            engine: Mutex::new(engine),
            paths,
            wakers: Mutex::new(FastMap::default()),
            opened: tx,
            timer: Notify::new(),
            spent: Mutex::new(Vec::new()),
            busy_poll,
            sent,
            received,
            datagrams: datagram::DatagramRouter::new(server),
            shard_links,
            handoffs_dropped: AtomicU64::new(0),
        };
        (Arc::new(node), rx)
    }

    pub fn paths(&self) -> &[T] {
        &self.paths
    }

    /// The name of a path for logs, e.g. "xdp/tcp on eth0" or "udp".
    pub fn path_name(&self, path: PathId) -> String {
        self.paths
            .get(path.0 as usize)
            .map_or_else(|| format!("path {}", path.0), |t| t.name().to_string())
    }

    /// Every path's name, best first: "xdp/tcp, udp".
    pub fn path_list(&self) -> String {
        let names: Vec<&str> = self.paths.iter().map(|t| t.name()).collect();
        names.join(", ")
    }

    fn path_names(&self, paths: &[PathId]) -> String {
        let names: Vec<String> = paths.iter().map(|&p| self.path_name(p)).collect();
        names.join(", ")
    }

    pub fn counters(&self) -> Counters {
        lock(&self.engine).counters()
    }

    pub fn live_streams(&self) -> usize {
        lock(&self.engine).live_streams()
    }

    pub fn read_buffer_len(&self) -> usize {
        lock(&self.engine).read_buffer_len()
    }

    /// Runs `f` on the engine, then sends what it queued and dispatches its events.
    pub fn with_engine<R>(&self, f: impl FnOnce(&mut Engine, Now) -> R) -> R {
        // Last call's sent datagrams: their buffers go back to the engine for reuse.
        let mut transmits: Vec<Transmit> = std::mem::take(&mut *lock(&self.spent));
        let mut events = Vec::new();
        let mut datagrams = Vec::new();
        let mut handoffs = Vec::new();
        let result = {
            let mut engine = lock(&self.engine);
            engine.recycle(&mut transmits);
            let r = f(&mut engine, now());
            engine.drain_transmits(&mut transmits);
            engine.drain_events(&mut events);
            engine.drain_datagrams(&mut datagrams);
            if self.shard_links.is_some() {
                engine.drain_handoffs(&mut handoffs);
            }
            if engine.take_timer_moved() {
                self.timer.notify_one();
            }
            r
        };
        if !transmits.is_empty() {
            self.send_by_path(&transmits);
        }
        for event in events {
            self.dispatch(event);
        }
        for datagram in datagrams {
            self.datagrams.deliver(datagram);
        }
        self.hand_off(handoffs);
        if !transmits.is_empty() {
            let mut spent = lock(&self.spent);
            if spent.is_empty() {
                *spent = transmits;
            }
        }
        result
    }

    fn hand_off(&self, handoffs: Vec<Handoff>) {
        let Some(links) = &self.shard_links else { return };
        for handoff in handoffs {
            if !links.post(handoff) {
                self.handoffs_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Hands each run of datagrams for one path to that path's transport in one batch
    /// (the engine mostly answers one peer on one path, so usually one run).
    fn send_by_path(&self, transmits: &[Transmit]) {
        for run in transmits.chunk_by(|a, b| a.path == b.path) {
            let path = run[0].path;
            let Some(transport) = self.paths.get(path.0 as usize) else {
                tracing::error!(path = path.0, "the engine named a path this node does not have");
                continue;
            };
            if let Err(e) = transport.send_batch(run) {
                tracing::warn!("send failed on {}: {e}", transport.name());
            }
            self.record_activity(path, run.iter().map(|t| t.payload.len()).sum());
            self.sent[path.0 as usize].notify_one();
        }
    }

    fn waker(&self, id: StreamId) -> Option<Arc<StreamWaker>> {
        lock(&self.wakers).get(&id).cloned()
    }

    fn dispatch(&self, event: Event) {
        match event {
            Event::Connected {
                path,
                rtt,
                after_outage,
            } => {
                let path = self.path_name(path);
                if after_outage {
                    tracing::info!(%path, rtt_ms = rtt.as_millis() as u64, "the server answers again");
                } else {
                    tracing::info!(%path, rtt_ms = rtt.as_millis() as u64, "session established");
                }
            }
            Event::PathFallback { unanswered, next } => tracing::warn!(
                "no answer from the server over {} within {} s; also trying {}",
                self.path_names(&unanswered),
                crate::engine::PATH_FALLBACK_AFTER.as_secs() * unanswered.len() as u64,
                self.path_name(next)
            ),
            Event::ServerUnanswered { tried, silent } => self.warn_unanswered(&tried, silent),
            Event::StreamOpened { id, target } => {
                lock(&self.wakers).insert(id, Arc::new(StreamWaker::default()));
                if let Some(tx) = &self.opened {
                    let _ = tx.send((id, target));
                }
            }
            Event::StreamReplied { id, result } => {
                if let Some(w) = self.waker(id)
                    && let Some(reply) = lock(&w.reply).take()
                {
                    let _ = reply.send(result);
                }
            }
            Event::Readable(id) => {
                if let Some(w) = self.waker(id) {
                    w.readable.notify_one();
                }
            }
            Event::Writable(id) => {
                if let Some(w) = self.waker(id) {
                    w.writable.notify_one();
                }
            }
            Event::StreamClosed(id) => {
                if let Some(w) = lock(&self.wakers).remove(&id) {
                    w.closed.store(true, Ordering::Release);
                    w.readable.notify_one();
                    w.writable.notify_one();
                    // Dropping an unanswered reply tells the opener the stream failed.
                    lock(&w.reply).take();
                }
            }
        }
    }

    fn warn_unanswered(&self, tried: &[PathId], silent: Duration) {
        let server = lock(&self.engine).server_addr();
        let server = server.map_or_else(|| "?".to_string(), |s| s.to_string());
        tracing::warn!(
            "the server {server} has not answered for {} s over {}; SOCKS requests fail until it does. \
             Likely causes: the server is not running or listens elsewhere, its KEY differs from this one, \
             or a firewall drops the port on the way. `paqet check` on this host probes each path.",
            silent.as_secs(),
            self.path_names(tried)
        );
    }

    /// Client: opens a stream; the receiver yields the server's answer.
    pub fn open_stream(&self, target: &TargetAddr) -> Result<(StreamId, Arc<StreamWaker>, ReplyReceiver), StreamError> {
        let (tx, rx) = oneshot::channel();
        let waker = Arc::new(StreamWaker {
            reply: Mutex::new(Some(tx)),
            ..StreamWaker::default()
        });
        let id = self.with_engine(|engine, now| {
            let id = engine.open_stream(now, target)?;
            // Registered under the engine lock, so no event for this stream can be missed.
            lock(&self.wakers).insert(id, waker.clone());
            Ok::<_, StreamError>(id)
        })?;
        self.timer.notify_one();
        Ok((id, waker, rx))
    }

    /// Server: the waker registered when the stream was opened.
    pub fn stream_waker(&self, id: StreamId) -> Option<Arc<StreamWaker>> {
        self.waker(id)
    }

    /// Sends one relayed UDP datagram of `flow` (a client passes `peer: None`).
    pub fn send_datagram(
        &self,
        peer: Option<crate::engine::PeerId>,
        flow: u32,
        addr: &TargetAddr,
        payload: &[u8],
    ) -> Result<(), crate::engine::datagrams::DatagramError> {
        self.with_engine(|e, _| e.send_datagram(peer, flow, addr, payload))
    }

    /// Client: `flow` ended; the server frees it now.
    pub fn close_flow(&self, flow: u32) {
        self.datagrams.unregister(flow);
        self.with_engine(|e, _| e.close_datagram_flow(flow));
    }

    pub fn datagram_counters(&self) -> crate::engine::datagrams::DatagramCounters {
        lock(&self.engine).datagram_counters()
    }

    pub fn reset_stream(&self, id: StreamId) {
        self.with_engine(|e, _| e.reset_stream(id));
    }

    fn record_activity(&self, path: PathId, bytes: usize) {
        self.busy_poll.record(path, Instant::now(), bytes);
    }

    fn should_poll(&self, path: PathId) -> bool {
        self.busy_poll.should_poll(path, Instant::now())
    }

    /// Runs one receiver per path until one of them fails.
    pub async fn run_receivers(self: Arc<Self>) -> io::Result<()> {
        let mut receivers = tokio::task::JoinSet::new();
        for i in 0..self.paths.len() {
            receivers.spawn(self.clone().run_receiver(PathId(i as u8)));
        }
        if let Some(inbox) = self.shard_links.as_ref().and_then(ShardLinks::take_inbox) {
            receivers.spawn(self.clone().run_inbox(inbox));
        }
        match receivers.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(io::Error::other(e)),
            None => Ok(()),
        }
    }

    /// Reads datagrams until the transport fails: polls for a while after activity (see
    /// [`busy_poll`]), sleeps on the transport's readiness otherwise.
    pub async fn run_receiver(self: Arc<Self>, path: PathId) -> io::Result<()> {
        let transport = &self.paths[path.0 as usize];
        let max = transport.max_payload().max(2048);
        let mut batch = RecvBatch::new(RECV_BATCH, max);
        loop {
            if transport.try_recv_batch(&mut batch)? > 0 {
                self.handle_batch(path, &mut batch);
                // A steady flow never leaves the ring empty: the stream tasks on this
                // thread run when tokio's budget (128 units) is spent. Yielding every
                // few batches instead halved one-stream xdp throughput: the RX ring
                // overflowed while the receiver waited its turn, and KCP retransmitted.
                tokio::task::consume_budget().await;
                continue;
            }
            if self.should_poll(path) {
                // Yielding also polls the runtime's sockets without blocking; the
                // thread yield lets a thread waiting for this CPU (the peer process,
                // the application) run first.
                std::thread::yield_now();
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                received = transport.recv_batch(&mut batch) => {
                    received?;
                    self.handle_batch(path, &mut batch);
                }
                _ = self.sent[path.0 as usize].notified() => {}
            }
        }
    }

    /// Sharded server: takes the datagrams other shards received for this one's clients.
    async fn run_inbox(self: Arc<Self>, mut inbox: mpsc::Receiver<Handoff>) -> io::Result<()> {
        let mut handoffs = Vec::with_capacity(RECV_BATCH);
        while inbox.recv_many(&mut handoffs, RECV_BATCH).await > 0 {
            self.with_engine(|engine, now| {
                for mut h in handoffs.drain(..) {
                    let _ = engine.handle_datagram(now, h.path, h.from, &mut h.datagram);
                }
            });
        }
        // Every shard holds a sender to every inbox, this one's own included.
        Err(io::Error::other("a shard's inbox closed"))
    }

    fn handle_batch(&self, path: PathId, batch: &mut RecvBatch) {
        let transport = &self.paths[path.0 as usize];
        self.received[path.0 as usize].fetch_add(batch.filled().len() as u64, Ordering::Relaxed);
        let mut authentic_bytes = 0;
        self.with_engine(|engine, now| {
            // A batch mostly comes from one peer over one path: tell the transport
            // once per change, not once per datagram (it takes a lock).
            let mut confirmed = None;
            for slot in batch.filled_mut() {
                let authentic = engine.handle_datagram(now, path, slot.peer, slot.payload_mut()).is_ok();
                if authentic {
                    authentic_bytes += slot.len;
                }
                let path = (slot.peer, slot.via);
                // Before the replies go out: they may need the path just proven.
                if authentic && slot.via.is_some() && confirmed != Some(path) {
                    transport.peer_authenticated(slot.peer, slot.via);
                    confirmed = Some(path);
                }
            }
        });
        // Garbage must not keep the receiver polling: only authentic traffic counts.
        if authentic_bytes > 0 {
            self.record_activity(path, authentic_bytes);
        }
    }

    /// Runs the engine's timers forever.
    pub async fn run_timers(self: Arc<Self>) {
        let mut last_report = Instant::now();
        let mut reported = Counters::default();
        let mut overflows: Vec<OverflowWatch> = self
            .paths
            .iter()
            .map(|p| OverflowWatch::new(p.receive_overflows(), 0))
            .collect();
        loop {
            let deadline = lock(&self.engine).poll_timeout();
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = self.timer.notified() => {}
            }
            self.with_engine(|engine, now| {
                if engine.poll_timeout() <= now.instant {
                    engine.handle_timeout(now);
                }
            });
            self.report_overflows(&mut overflows);
            if last_report.elapsed() >= DROP_REPORT_EVERY {
                reported = self.report_drops(reported);
                last_report = Instant::now();
            }
        }
    }

    /// Judges each path's receive overflows against that path's own arrivals, so a busy
    /// path's traffic does not hide another's overflowing ring.
    fn report_overflows(&self, watches: &mut [OverflowWatch]) {
        let paths = self.paths.iter().zip(&self.received).zip(watches);
        for (i, ((transport, received), watch)) in paths.enumerate() {
            if let Some((dropped, received)) =
                watch.since_last(transport.receive_overflows(), received.load(Ordering::Relaxed))
            {
                let path = crate::engine::PathId(i as u8);
                self.with_engine(|engine, _| engine.receive_overflowed(path, dropped, received));
            }
        }
    }

    /// Datagrams dropped for a full receive buffer or ring, on every path (and, sharded,
    /// for another shard's full inbox).
    pub fn receive_overflows(&self) -> u64 {
        let paths: u64 = self.paths.iter().map(|p| p.receive_overflows()).sum();
        paths + self.handoffs_dropped.load(Ordering::Relaxed)
    }

    /// The eBPF steering programs' counters, summed over the paths that attached one.
    pub fn steering_counters(&self) -> Option<paqet_common::maps::Stats> {
        self.paths
            .iter()
            .filter_map(|p| p.steering_counters())
            .reduce(|mut total, s| {
                total.accumulate(&s);
                total
            })
    }

    fn report_drops(&self, before: Counters) -> Counters {
        let now = self.counters();
        let unauthentic = now.dropped_unauthentic - before.dropped_unauthentic;
        let replayed = now.dropped_replayed - before.dropped_replayed + now.dropped_stale_handshake
            - before.dropped_stale_handshake;
        let refused_streams = now.refused_streams - before.refused_streams;
        if refused_streams > 0 {
            tracing::warn!(
                refused_streams,
                "streams refused in the last {}s: a client held the most streams a session may have",
                DROP_REPORT_EVERY.as_secs()
            );
        }
        let cookies = now.cookies_sent - before.cookies_sent;
        if cookies > 0 {
            tracing::info!(
                cookies,
                "under load: handshakes answered with a cookie (a proof of the source address) instead of a \
                 session in the last {}s",
                DROP_REPORT_EVERY.as_secs()
            );
        }
        let rate_limited = now.dropped_rate_limited - before.dropped_rate_limited;
        if unauthentic + replayed + rate_limited > 0 {
            tracing::warn!(
                unauthentic,
                replayed,
                rate_limited,
                "dropped datagrams that failed authentication, were replays, or were handshakes past a source's \
                 rate (wrong key, scan, or attack) in the last {}s",
                DROP_REPORT_EVERY.as_secs()
            );
        }
        now
    }
}
