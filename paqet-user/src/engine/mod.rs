//! The sans-IO relay core: streams ⇄ KCP conversations ⇄ sealed datagrams.
//!
//! Like quinn-proto, the engine opens no sockets and reads no clock: the edge hands it
//! datagrams, stream bytes and the time, and takes back datagrams to send ([`Transmit`]),
//! [`Event`]s and the next deadline. The same engine runs on every transport and in
//! unit tests over an in-memory lossy link.
//!
//! Peers and sessions: a client has one peer (the server). A server keys peers by the
//! client's *instance* (a random id the client picks at start), so a client that
//! re-handshakes after a network outage keeps its streams, while a restarted client is a
//! new peer. Sessions carry the keys; each side names its session by a random index that
//! the other side puts in front of every data packet.

pub mod arq;
pub mod crypto;
pub mod frame;
pub mod kcp;
pub mod mux;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crypto::{CryptoError, Initiator, Psk, Responder, SEAL_OVERHEAD, SessionCrypto};
use frame::{DataHeader, InitPayload, Inner, OpenError, ResponsePayload, StreamMsg, TargetAddr};
use kcp::{KcpProfile, OutputQueue};
use mux::{Control, Phase, ReadOutcome, Stream, StreamError};

/// For the maps looked up once per datagram (see Cargo.toml).
pub type FastMap<K, V> = foldhash::HashMap<K, V>;

/// Bumped whenever the wire format changes; travels inside the handshake.
pub const PROTOCOL_VERSION: u8 = 3;
/// How far a client's clock may be from the server's before its handshake is refused.
const HANDSHAKE_MAX_SKEW_MS: u64 = 120_000;
const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);
/// Nothing sent for this long: send a keepalive so the peer knows we are alive.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Client: nothing heard for this long although we keep sending: the server has
/// probably restarted and forgotten us; handshake again.
const REHANDSHAKE_AFTER: Duration = Duration::from_secs(4);
/// After both FINs, acknowledge the peer's retransmissions this long before forgetting.
const LINGER: Duration = Duration::from_secs(2);
/// Late segments of a closed conversation are ignored (not answered) this long.
const TOMBSTONE_TTL: Duration = Duration::from_secs(30);
/// Housekeeping cadence when no stream needs KCP ticks.
const IDLE_TICK: Duration = Duration::from_millis(250);
/// A receiver that owes only ACKs sends them once this many are due, or after
/// [`ACK_DELAY`]: during a download it acknowledged every input batch, one ACK datagram
/// per ~8 data datagrams, and each cost both relays a datagram's full path. (TCP's
/// delayed ACK and QUIC's ACK frequency do the same.)
const ACKS_PER_DATAGRAM: usize = 32;
/// Far below any RTO (≥ 30 ms in the fast modes); the sender's RTT samples grow by at
/// most this much.
const ACK_DELAY: Duration = Duration::from_millis(1);
const MIN_WINDOW: u16 = 32;
/// Sent datagrams' buffers kept for reuse (at most this many, ~1.4 KiB each).
const MAX_SPARE_BUFFERS: usize = 1024;
const KCP_CMD_PUSH: u8 = 81;
const KCP_HEADER_LEN: usize = 24;

/// The client process's identity towards the server (random per start).
pub type PeerId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    pub peer: PeerId,
    pub conv: u32,
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}/{}", self.peer as u32, self.conv)
    }
}

#[derive(Debug, Clone)]
pub enum Role {
    Client { server: SocketAddr },
    Server,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub role: Role,
    pub psk: Psk,
    pub kcp: KcpProfile,
    /// A peer silent this long is gone (the config's `TIMEOUT`).
    pub peer_timeout: Duration,
    /// Largest datagram payload the transport carries.
    pub max_datagram: usize,
    /// Memory that all streams' KCP windows together may use.
    pub window_budget: usize,
    /// A lone stream's window, in segments. 16384 (~22 MiB) carries ~80 MB/s over a
    /// 40 ms, 1 %-loss path, where 4096 capped near 46 MB/s: a lost segment holds the
    /// window's left edge for a retransmission round trip. 32768 bought nothing more and
    /// cost CPU (measured with the `kcp` crate, before `arq`). BENCHMARKS.md.
    pub max_window: u16,
    /// Seeds session indices, instance ids and padding (never key material: snow draws
    /// ephemeral keys from the OS).
    pub seed: [u8; 32],
}

impl EngineConfig {
    pub fn new(role: Role, psk: Psk, seed: [u8; 32]) -> EngineConfig {
        EngineConfig {
            role,
            psk,
            kcp: KcpProfile::Fast3,
            peer_timeout: Duration::from_secs(30),
            max_datagram: 1432,
            window_budget: 96 << 20,
            max_window: 16384,
            seed,
        }
    }
}

/// The time, as the edge read it: a monotonic instant for timers and the wall clock for
/// the handshake's freshness check.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub unix_ms: u64,
}

#[derive(Debug)]
pub struct Transmit {
    pub peer: SocketAddr,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Client: a session with the server is up.
    Connected,
    /// Server: a client asks for `target`; answer with `accept_stream` or `refuse_stream`.
    StreamOpened {
        id: StreamId,
        target: TargetAddr,
    },
    /// Client: the server's answer to `open_stream`.
    StreamReplied {
        id: StreamId,
        result: Result<(), OpenError>,
    },
    Readable(StreamId),
    Writable(StreamId),
    /// The stream is gone from the engine (finished both ways, reset, or its peer lost).
    StreamClosed(StreamId),
}

/// Why a datagram was dropped; counted by the edge, never answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Neither a live session's packet nor a valid handshake (wrong key, garbage, scan).
    Unauthentic,
    Replayed,
    /// Authentic but stale or repeated handshake.
    StaleHandshake,
    /// Authentic packet whose content breaks the protocol.
    Malformed,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped_unauthentic: u64,
    pub dropped_replayed: u64,
    pub dropped_stale_handshake: u64,
    pub dropped_malformed: u64,
    pub handshakes: u64,
}

struct Session {
    local_index: u32,
    remote_index: u32,
    crypto: SessionCrypto,
}

struct Peer {
    addr: SocketAddr,
    session: Option<Session>,
    /// The session before the last re-handshake: packets already in flight under it
    /// still open until the peer switches over.
    previous: Option<Session>,
    streams: FastMap<u32, Stream>,
    tombstones: HashMap<u32, Instant>,
    last_rx: Instant,
    last_tx: Instant,
}

impl Peer {
    fn new(addr: SocketAddr, now: Instant) -> Peer {
        Peer {
            addr,
            session: None,
            previous: None,
            streams: FastMap::default(),
            tombstones: HashMap::new(),
            last_rx: now,
            last_tx: now,
        }
    }
}

struct PendingHandshake {
    initiator: Initiator,
    local_index: u32,
    sent_at: Instant,
}

pub struct Engine {
    config: EngineConfig,
    rng: StdRng,
    epoch: Instant,
    /// Our own instance id (client) — the server's peer key for us.
    instance: PeerId,
    peers: FastMap<PeerId, Peer>,
    /// Local session index → peer, for both current and previous sessions.
    index: FastMap<u32, PeerId>,
    pending: Option<PendingHandshake>,
    /// Server: handshakes already answered, by ephemeral key, until they are too old to
    /// pass the clock check anyway.
    seen_handshakes: HashMap<[u8; 32], Instant>,
    output: OutputQueue,
    transmits: Vec<Transmit>,
    events: Vec<Event>,
    next_conv: u32,
    last_tick: Instant,
    scratch: Vec<u8>,
    /// Buffers of sent datagrams, reused for the next ones (no allocation per datagram).
    spare: Vec<Vec<u8>>,
    /// A stream's first (control) message is read here.
    control_buf: Vec<u8>,
    /// Streams that took input since the last drain and owe the peer an acknowledgement.
    unflushed: Vec<StreamId>,
    /// Streams whose few ACKs wait for more, or for `ack_deadline`.
    delayed_acks: Vec<StreamId>,
    ack_deadline: Option<Instant>,
    /// Set when `ack_deadline` is armed: the edge's timer must look again.
    timer_moved: bool,
    counters: Counters,
    live_streams: usize,
    /// Segments queued or in flight in all streams' send sides: exact after each tick,
    /// and only ever over-estimated between ticks (writes add, acknowledgements are
    /// counted at the next tick). Writers wait while it exceeds the send half of the
    /// window budget, so streams that opened with a large window (before the others
    /// came) cannot together queue more than the budget.
    queued_segments: usize,
    /// The latest time the edge told us; for the calls that need no fresh reading.
    clock: Instant,
}

impl Engine {
    pub fn new(config: EngineConfig, now: Instant) -> Engine {
        let mut rng = StdRng::from_seed(config.seed);
        let instance = rng.next_u64();
        let next_conv = rng.random_range(1..1 << 24);
        let mut engine = Engine {
            config,
            rng,
            epoch: now,
            instance,
            peers: FastMap::default(),
            index: FastMap::default(),
            pending: None,
            seen_handshakes: HashMap::new(),
            output: OutputQueue::default(),
            transmits: Vec::new(),
            events: Vec::new(),
            next_conv,
            last_tick: now,
            scratch: Vec::with_capacity(64 * 1024),
            spare: Vec::new(),
            control_buf: Vec::new(),
            unflushed: Vec::new(),
            delayed_acks: Vec::new(),
            ack_deadline: None,
            timer_moved: false,
            counters: Counters::default(),
            live_streams: 0,
            queued_segments: 0,
            clock: now,
        };
        engine.control_buf = vec![0u8; engine.read_buffer_len()];
        engine
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn live_streams(&self) -> usize {
        self.live_streams
    }

    pub fn peer_count(&self) -> usize {
        self.peers.values().filter(|p| p.session.is_some()).count()
    }

    /// Client: whether a session with the server is established.
    pub fn is_connected(&self) -> bool {
        self.peers.get(&self.instance).is_some_and(|p| p.session.is_some())
    }

    fn kcp_mtu(&self) -> usize {
        self.config.max_datagram - SEAL_OVERHEAD - 1
    }

    pub fn mss(&self) -> usize {
        self.kcp_mtu() - KCP_HEADER_LEN
    }

    /// A buffer size that holds any message `stream_read` can return.
    pub fn read_buffer_len(&self) -> usize {
        mux::read_buffer_len(self.mss())
    }

    /// The send half of the window budget, in segments (`mux::window_for` splits the
    /// same budget between both directions).
    fn send_budget_segments(&self) -> usize {
        self.config.window_budget / (2 * self.mss())
    }

    pub fn max_write_chunk(&self) -> usize {
        mux::max_data_per_message(self.mss())
    }

    fn ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }

    /// Takes every queued datagram at once, for a batched send.
    pub fn drain_transmits(&mut self, into: &mut Vec<Transmit>) {
        for id in std::mem::take(&mut self.unflushed) {
            if !self.delay_acks(id) {
                self.flush_stream(id);
            }
            self.wake_writer_if_room(id);
        }
        into.append(&mut self.transmits);
    }

    pub fn drain_events(&mut self, into: &mut Vec<Event>) {
        // A run of datagrams for one stream wakes its reader once, not once each (a
        // wake-up left over from an interleaved run is harmless: one Notify permit).
        self.events.dedup();
        into.append(&mut self.events);
    }

    /// When `handle_timeout` must next run.
    pub fn poll_timeout(&self) -> Instant {
        let tick = self.next_tick();
        self.ack_deadline.map_or(tick, |d| d.min(tick))
    }

    fn next_tick(&self) -> Instant {
        let tick = if self.live_streams > 0 {
            Duration::from_millis(self.config.kcp.tuning().interval_ms as u64)
        } else {
            IDLE_TICK
        };
        self.last_tick + tick
    }

    /// True once after a call made [`poll_timeout`](Self::poll_timeout) earlier than the
    /// edge's timer may be set for.
    pub fn take_timer_moved(&mut self) -> bool {
        std::mem::take(&mut self.timer_moved)
    }

    // ---------------------------------------------------------------- client side

    /// Client: starts (or restarts) the handshake with the server.
    pub fn connect(&mut self, now: Now) {
        self.clock = self.clock.max(now.instant);
        let Role::Client { server } = self.config.role else {
            return;
        };
        let local_index = self.fresh_index();
        let payload = InitPayload {
            version: PROTOCOL_VERSION,
            client_index: local_index,
            instance: self.instance,
            unix_ms: now.unix_ms,
        };
        self.scratch.clear();
        payload.emit(&mut self.scratch);
        self.pad(16);
        match Initiator::start(&self.config.psk, &self.scratch) {
            Ok((initiator, msg)) => {
                self.pending = Some(PendingHandshake {
                    initiator,
                    local_index,
                    sent_at: now.instant,
                });
                self.peers
                    .entry(self.instance)
                    .or_insert_with(|| Peer::new(server, now.instant))
                    .last_tx = now.instant;
                self.push_transmit(server, msg);
                tracing::debug!(%server, "handshake sent");
            }
            Err(e) => tracing::error!("cannot start handshake: {e}"),
        }
    }

    /// Appends up to `max` random padding bytes to the scratch buffer, so handshake
    /// sizes do not identify paqet.
    fn pad(&mut self, max: usize) {
        let len = self.rng.random_range(0..=max);
        for _ in 0..len {
            self.scratch.push(self.rng.random());
        }
    }

    fn fresh_index(&mut self) -> u32 {
        loop {
            let idx = self.rng.next_u32();
            if idx != 0 && !self.index.contains_key(&idx) {
                return idx;
            }
        }
    }

    /// Client: opens a stream to `target`. Data may be written once `StreamReplied`
    /// says the server connected it.
    pub fn open_stream(&mut self, now: Now, target: &TargetAddr) -> Result<StreamId, StreamError> {
        self.clock = self.clock.max(now.instant);
        let Role::Client { server } = self.config.role else {
            return Err(StreamError::Closed);
        };
        if self.pending.is_none() && !self.is_connected() {
            self.connect(now);
        }
        let conv = self.next_conv;
        self.next_conv = self.next_conv.wrapping_add(1).max(1);
        let peer_id = self.instance;
        let mut stream = self.new_stream(conv, Phase::AwaitingReply, now.instant);
        let mut scratch = std::mem::take(&mut self.scratch);
        let sent = stream.send_msg(&StreamMsg::Open(target.clone()), &mut scratch);
        self.scratch = scratch;
        sent?;
        let peer = self
            .peers
            .entry(peer_id)
            .or_insert_with(|| Peer::new(server, now.instant));
        peer.streams.insert(conv, stream);
        self.live_streams += 1;
        self.rebalance_windows();
        let id = StreamId { peer: peer_id, conv };
        self.flush_stream(id);
        Ok(id)
    }

    fn new_stream(&self, conv: u32, phase: Phase, now: Instant) -> Stream {
        let window = mux::window_for(
            self.live_streams + 1,
            self.config.window_budget,
            self.mss(),
            MIN_WINDOW,
            self.config.max_window,
        );
        let kcp = kcp::new_conversation(
            conv,
            self.output.clone(),
            self.config.kcp.tuning(),
            self.kcp_mtu(),
            window,
            self.ms(now),
        );
        Stream::new(kcp, phase, now)
    }

    /// Gives every stream its share of the window budget, after the count changed.
    fn rebalance_windows(&mut self) {
        let window = mux::window_for(
            self.live_streams,
            self.config.window_budget,
            self.mss(),
            MIN_WINDOW,
            self.config.max_window,
        );
        for peer in self.peers.values_mut() {
            for stream in peer.streams.values_mut() {
                if stream.kcp.snd_wnd() != window {
                    stream.kcp.set_wndsize(window, window);
                }
            }
        }
    }

    // ---------------------------------------------------------------- server side

    /// Server: the target is connected; data may flow.
    pub fn accept_stream(&mut self, id: StreamId) -> Result<(), StreamError> {
        self.reply(id, Ok(()))
    }

    /// Server: the target could not be connected; the client hears why.
    pub fn refuse_stream(&mut self, id: StreamId, why: OpenError) -> Result<(), StreamError> {
        self.reply(id, Err(why))?;
        // The reply travels reliably; the stream then closes like a finished one.
        if let Some(stream) = self.stream_mut(id) {
            stream.sent_fin = true;
            stream.recv_fin = true;
        }
        Ok(())
    }

    fn reply(&mut self, id: StreamId, result: Result<(), OpenError>) -> Result<(), StreamError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let stream = self.stream_mut(id).ok_or(StreamError::Closed)?;
        if stream.phase != Phase::Dialing {
            self.scratch = scratch;
            return Err(StreamError::NotOpen);
        }
        stream.phase = Phase::Open;
        let sent = stream.send_msg(&StreamMsg::Reply(result), &mut scratch);
        self.scratch = scratch;
        sent?;
        self.flush_stream(id);
        Ok(())
    }

    // ---------------------------------------------------------------- stream I/O

    fn stream_mut(&mut self, id: StreamId) -> Option<&mut Stream> {
        self.peers.get_mut(&id.peer)?.streams.get_mut(&id.conv)
    }

    /// Queues stream bytes; returns how many were taken (0: wait for `Writable`).
    pub fn stream_write(&mut self, now: Now, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        self.clock = self.clock.max(now.instant);
        let chunk = self.max_write_chunk();
        let budget = self.send_budget_segments();
        let mut queued = self.queued_segments;
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| {
            let stream = self.stream_mut(id).ok_or(StreamError::Closed)?;
            if stream.phase != Phase::Open {
                return Err(StreamError::NotOpen);
            }
            if stream.sent_fin {
                return Err(StreamError::Finished);
            }
            let mut taken = 0;
            while taken < data.len() && stream.writable() && queued < budget {
                let end = (taken + chunk).min(data.len());
                let before = stream.kcp.wait_snd();
                stream.send_msg(&StreamMsg::Data(&data[taken..end]), &mut scratch)?;
                queued += stream.kcp.wait_snd().saturating_sub(before);
                taken = end;
            }
            stream.write_blocked = taken < data.len();
            stream.last_activity = now.instant;
            Ok(taken)
        })();
        self.queued_segments = queued;
        self.scratch = scratch;
        if result.is_ok() {
            self.flush_stream(id);
            // The flush may have sent what stopped the writer (the unsent cap).
            self.wake_writer_if_room(id);
        }
        result
    }

    /// Only when the write would take something: a writer woken while the streams'
    /// shared budget is spent takes nothing and blocks again, and with this called
    /// after every write it would spin (the next tick recounts the budget).
    fn wake_writer_if_room(&mut self, id: StreamId) {
        let budget_left = self.queued_segments < self.send_budget_segments();
        if let Some(stream) = self.stream_mut(id)
            && budget_left
            && stream.write_blocked
            && stream.writable()
        {
            stream.write_blocked = false;
            self.events.push(Event::Writable(id));
        }
    }

    /// Reads the stream's next data into `buf` (at least `read_buffer_len` bytes): as
    /// many whole messages as fit, back to back, so the edge writes them to TCP in one
    /// call rather than one per message. A FIN after some data is reported next call.
    pub fn stream_read(&mut self, id: StreamId, buf: &mut [u8]) -> Result<ReadOutcome, StreamError> {
        let message_room = self.read_buffer_len();
        debug_assert!(buf.len() >= message_room, "stream_read needs read_buffer_len bytes");
        let stream = self.stream_mut(id).ok_or(StreamError::Closed)?;
        if stream.recv_fin {
            return Ok(ReadOutcome::Fin);
        }
        if stream.phase != Phase::Open {
            return Ok(ReadOutcome::WouldBlock);
        }
        let outcome = if std::mem::take(&mut stream.fin_unreported) {
            stream.recv_fin = true;
            ReadOutcome::Fin
        } else {
            match stream.gather_data(buf, message_room) {
                Ok(outcome) => outcome,
                Err(_) => return Err(self.protocol_violation(id)),
            }
        };
        if outcome != ReadOutcome::WouldBlock {
            // Reading may reopen the receive window: tell the peer soon, and finish a
            // stream whose last FIN this was.
            self.flush_stream(id);
            self.close_if_done(id, None);
        }
        Ok(outcome)
    }

    fn protocol_violation(&mut self, id: StreamId) -> StreamError {
        tracing::debug!(stream = %id, "protocol violation on stream; resetting");
        self.reset_stream(id);
        StreamError::Closed
    }

    /// Half-closes our direction: the peer reads `Fin` after the data already written.
    pub fn stream_finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| {
            let stream = self.stream_mut(id).ok_or(StreamError::Closed)?;
            if stream.sent_fin {
                return Ok(());
            }
            stream.sent_fin = true;
            stream.send_msg(&StreamMsg::Fin, &mut scratch)
        })();
        self.scratch = scratch;
        self.flush_stream(id);
        result
    }

    /// Drops the stream at once and tells the peer to drop it too.
    pub fn reset_stream(&mut self, id: StreamId) {
        let Some(peer) = self.peers.get_mut(&id.peer) else {
            return;
        };
        if peer.streams.remove(&id.conv).is_none() {
            return;
        }
        self.live_streams -= 1;
        self.events.push(Event::StreamClosed(id));
        // Anything KCP of this stream had queued is moot now.
        self.output.restore(self.output.take());
        self.seal_to(id.peer, &Inner::Reset { conv: id.conv });
        let now = self.clock;
        if let Some(peer) = self.peers.get_mut(&id.peer) {
            peer.tombstones.insert(id.conv, now);
        }
    }

    /// Moves a stream whose both directions are done to lingering, and reports it closed.
    fn close_if_done(&mut self, id: StreamId, now: Option<Instant>) {
        let Some(stream) = self.stream_mut(id) else { return };
        if matches!(stream.phase, Phase::Lingering { .. }) || !stream.fully_closed() {
            return;
        }
        let base = now.unwrap_or(stream.last_activity);
        stream.phase = Phase::Lingering { until: base + LINGER };
        self.events.push(Event::StreamClosed(id));
    }

    /// Holds back a flush that would only send a few ACKs; true if it did.
    fn delay_acks(&mut self, id: StreamId) -> bool {
        let owed = self.stream_mut(id).and_then(|s| s.kcp.only_acks_owed());
        if !owed.is_some_and(|n| n > 0 && n < ACKS_PER_DATAGRAM) {
            return false;
        }
        // Unchecked for repeats: a stream listed twice is flushed twice, the second time
        // with nothing to send, which costs less than searching the list per datagram
        // batch with a thousand streams.
        self.delayed_acks.push(id);
        if self.ack_deadline.is_none() {
            self.ack_deadline = Some(self.clock + ACK_DELAY);
            self.timer_moved = true;
        }
        true
    }

    fn flush_delayed_acks(&mut self) {
        self.ack_deadline = None;
        for id in std::mem::take(&mut self.delayed_acks) {
            self.flush_stream(id);
        }
    }

    /// Sends whatever KCP of this stream has ready, sealed for its peer.
    fn flush_stream(&mut self, id: StreamId) {
        if let Some(stream) = self.stream_mut(id) {
            let _ = stream.kcp.flush();
        }
        self.seal_kcp_output(id.peer);
    }

    fn seal_kcp_output(&mut self, peer_id: PeerId) {
        if self.output.is_empty() {
            return;
        }
        let packets = self.output.take();
        for packet in packets.iter() {
            self.seal_to(peer_id, &Inner::Kcp(packet));
        }
        self.output.restore(packets);
    }

    /// Hands back the buffers of datagrams the edge has sent, for the next ones.
    pub fn recycle(&mut self, spent: &mut Vec<Transmit>) {
        for t in spent.drain(..) {
            if self.spare.len() < MAX_SPARE_BUFFERS {
                self.spare.push(t.payload);
            }
        }
    }

    /// Seals `inner` under the peer's session, or drops it if there is none yet (KCP
    /// retransmits once the session is up).
    fn seal_to(&mut self, peer_id: PeerId, inner: &Inner<'_>) {
        let Some(peer) = self.peers.get_mut(&peer_id) else {
            return;
        };
        let Some(session) = peer.session.as_mut() else { return };
        let mut packet = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.config.max_datagram));
        packet.clear();
        // Emitted straight into the datagram: every copy of a payload costs ~2 % of a
        // busy relay.
        match session
            .crypto
            .seal_with(session.remote_index, &mut packet, |plain| inner.emit(plain))
        {
            Ok(()) => {
                peer.last_tx = self.clock;
                let addr = peer.addr;
                self.push_transmit(addr, packet);
            }
            Err(e) => tracing::warn!("cannot seal packet: {e}"),
        }
    }

    fn push_transmit(&mut self, peer: SocketAddr, payload: Vec<u8>) {
        self.counters.datagrams_out += 1;
        self.counters.bytes_out += payload.len() as u64;
        self.transmits.push(Transmit { peer, payload });
    }

    // ---------------------------------------------------------------- input

    /// Handles one datagram from the wire. Anything that does not authenticate is
    /// dropped silently (and counted): to a scanner the port looks filtered. A data
    /// packet is decrypted where it lies, so `data` is spent afterwards.
    pub fn handle_datagram(&mut self, now: Now, from: SocketAddr, data: &mut [u8]) -> Result<(), DropReason> {
        self.clock = self.clock.max(now.instant);
        self.counters.datagrams_in += 1;
        self.counters.bytes_in += data.len() as u64;
        let result = self.dispatch_datagram(now, from, data);
        if let Err(reason) = result {
            match reason {
                DropReason::Unauthentic => self.counters.dropped_unauthentic += 1,
                DropReason::Replayed => self.counters.dropped_replayed += 1,
                DropReason::StaleHandshake => self.counters.dropped_stale_handshake += 1,
                DropReason::Malformed => self.counters.dropped_malformed += 1,
            }
        }
        result
    }

    fn dispatch_datagram(&mut self, now: Now, from: SocketAddr, data: &mut [u8]) -> Result<(), DropReason> {
        if let Ok(header) = DataHeader::parse(data)
            && let Some(&peer_id) = self.index.get(&header.receiver_index)
        {
            return self.handle_data(now, from, peer_id, header.receiver_index, data);
        }
        match self.config.role {
            Role::Server => self.handle_handshake_init(now, from, data),
            Role::Client { .. } => self.handle_handshake_response(now, data),
        }
    }

    fn handle_data(
        &mut self,
        now: Now,
        from: SocketAddr,
        peer_id: PeerId,
        index: u32,
        data: &mut [u8],
    ) -> Result<(), DropReason> {
        match self.open_with(peer_id, index, data) {
            Ok(plain) => {
                self.note_peer_alive(peer_id, from, index, now.instant);
                self.handle_inner(now, peer_id, plain)
            }
            Err(CryptoError::Replayed(_)) => Err(DropReason::Replayed),
            Err(_) => Err(DropReason::Unauthentic),
        }
    }

    fn open_with<'d>(&mut self, peer_id: PeerId, index: u32, data: &'d mut [u8]) -> Result<&'d [u8], CryptoError> {
        let peer = self.peers.get_mut(&peer_id).ok_or(CryptoError::Unauthentic)?;
        let session = [peer.session.as_mut(), peer.previous.as_mut()]
            .into_iter()
            .flatten()
            .find(|s| s.local_index == index)
            .ok_or(CryptoError::Unauthentic)?;
        session.crypto.open_in_place(data)
    }

    /// An authentic packet arrived: the peer is alive, and (server) may have roamed.
    fn note_peer_alive(&mut self, peer_id: PeerId, from: SocketAddr, index: u32, now: Instant) {
        let server = matches!(self.config.role, Role::Server);
        if let Some(peer) = self.peers.get_mut(&peer_id) {
            peer.last_rx = now;
            let current = peer.session.as_ref().is_some_and(|s| s.local_index == index);
            if server && current && peer.addr != from {
                tracing::info!(old = %peer.addr, new = %from, "client address changed");
                peer.addr = from;
            }
        }
    }

    fn handle_inner(&mut self, now: Now, peer_id: PeerId, plain: &[u8]) -> Result<(), DropReason> {
        match Inner::parse(plain).map_err(|_| DropReason::Malformed)? {
            Inner::Kcp(segments) => self.handle_kcp(now, peer_id, segments),
            Inner::Reset { conv } => {
                let id = StreamId { peer: peer_id, conv };
                if let Some(peer) = self.peers.get_mut(&peer_id)
                    && peer.streams.remove(&conv).is_some()
                {
                    peer.tombstones.insert(conv, now.instant);
                    self.live_streams -= 1;
                    self.events.push(Event::StreamClosed(id));
                    tracing::debug!(stream = %id, "peer reset stream");
                }
                Ok(())
            }
            Inner::Keepalive { .. } => {
                if matches!(self.config.role, Role::Server) {
                    self.send_keepalive(peer_id);
                }
                Ok(())
            }
        }
    }

    fn send_keepalive(&mut self, peer_id: PeerId) {
        let len = self.rng.random_range(0..32);
        let padding: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
        self.seal_to(peer_id, &Inner::Keepalive { padding: &padding });
    }

    fn handle_kcp(&mut self, now: Now, peer_id: PeerId, segments: &[u8]) -> Result<(), DropReason> {
        if segments.len() < KCP_HEADER_LEN {
            return Err(DropReason::Malformed);
        }
        let conv = arq::get_conv(segments);
        let id = StreamId { peer: peer_id, conv };
        let known = self.peers.get(&peer_id).is_some_and(|p| p.streams.contains_key(&conv));
        if !known && !self.adopt_conversation(now, id, segments) {
            return Ok(());
        }
        let stream = self.stream_mut(id).ok_or(DropReason::Malformed)?;
        if stream.kcp.input(segments).is_err() {
            return Err(DropReason::Malformed);
        }
        stream.last_activity = now.instant;
        self.after_input(now, id);
        Ok(())
    }

    /// A conversation we don't know: a new stream (server, first data segment), late
    /// segments of a closed one (ignored), or one the peer thinks is alive but we lost
    /// (e.g. after a restart): tell the peer to drop it.
    fn adopt_conversation(&mut self, now: Now, id: StreamId, segments: &[u8]) -> bool {
        let Some(peer) = self.peers.get(&id.peer) else {
            return false;
        };
        if peer.tombstones.contains_key(&id.conv) {
            return false;
        }
        let is_push = segments[4] == KCP_CMD_PUSH;
        if matches!(self.config.role, Role::Server) && is_push && id.conv != 0 {
            let stream = self.new_stream(id.conv, Phase::AwaitingOpen, now.instant);
            if let Some(peer) = self.peers.get_mut(&id.peer) {
                peer.streams.insert(id.conv, stream);
                self.live_streams += 1;
                self.rebalance_windows();
                return true;
            }
            return false;
        }
        self.seal_to(id.peer, &Inner::Reset { conv: id.conv });
        if let Some(peer) = self.peers.get_mut(&id.peer) {
            peer.tombstones.insert(id.conv, now.instant);
        }
        false
    }

    /// After KCP took input: deliver control messages and wake readers and writers. The
    /// acknowledgement goes out when the edge drains transmits, once per batch of input
    /// rather than once per datagram.
    fn after_input(&mut self, now: Now, id: StreamId) {
        if !self.unflushed.contains(&id) {
            self.unflushed.push(id);
        }
        let mut buf = std::mem::take(&mut self.control_buf);
        let control = match self.stream_mut(id) {
            Some(s) if matches!(s.phase, Phase::AwaitingOpen | Phase::AwaitingReply) => s.take_control(&mut buf),
            _ => Ok(None),
        };
        self.control_buf = buf;
        match control {
            Ok(Some(Control::Open(target))) => {
                if let Some(s) = self.stream_mut(id) {
                    s.phase = Phase::Dialing;
                }
                self.events.push(Event::StreamOpened { id, target });
            }
            Ok(Some(Control::Reply(result))) => {
                if let Some(s) = self.stream_mut(id) {
                    s.phase = Phase::Open;
                    if result.is_err() {
                        s.sent_fin = true;
                        s.recv_fin = true;
                    }
                }
                self.events.push(Event::StreamReplied { id, result });
            }
            Ok(None) => {}
            Err(_) => {
                self.reset_stream(id);
                return;
            }
        }
        let Some(stream) = self.stream_mut(id) else { return };
        if stream.phase == Phase::Open && stream.has_message() {
            self.events.push(Event::Readable(id));
        }
        // Writers are woken in `drain_transmits`, once the flush has taken what the
        // acknowledgements made room for.
        self.close_if_done(id, Some(now.instant));
    }

    fn handle_handshake_init(&mut self, now: Now, from: SocketAddr, data: &[u8]) -> Result<(), DropReason> {
        let responder = Responder::read(&self.config.psk, data).map_err(|_| DropReason::Unauthentic)?;
        let init = InitPayload::parse(&responder.payload).map_err(|_| DropReason::Malformed)?;
        if init.version != PROTOCOL_VERSION {
            tracing::warn!(%from, version = init.version, "client speaks another protocol version");
            return Err(DropReason::Malformed);
        }
        let fingerprint = crypto::handshake_fingerprint(data).ok_or(DropReason::Unauthentic)?;
        if now.unix_ms.abs_diff(init.unix_ms) > HANDSHAKE_MAX_SKEW_MS || self.seen_handshakes.contains_key(&fingerprint)
        {
            return Err(DropReason::StaleHandshake);
        }
        self.seen_handshakes.insert(fingerprint, now.instant);

        let local_index = self.fresh_index();
        self.scratch.clear();
        ResponsePayload {
            version: PROTOCOL_VERSION,
            server_index: local_index,
        }
        .emit(&mut self.scratch);
        self.pad(16);
        let (crypto, msg) = responder.respond(&self.scratch).map_err(|_| DropReason::Unauthentic)?;
        let session = Session {
            local_index,
            remote_index: init.client_index,
            crypto,
        };
        self.install_session(init.instance, from, session, now.instant);
        self.counters.handshakes += 1;
        self.push_transmit(from, msg);
        tracing::info!(client = %from, "client authenticated, session established");
        Ok(())
    }

    fn handle_handshake_response(&mut self, now: Now, data: &[u8]) -> Result<(), DropReason> {
        let Role::Client { server } = self.config.role else {
            return Err(DropReason::Unauthentic);
        };
        let pending = self.pending.take().ok_or(DropReason::Unauthentic)?;
        let local_index = pending.local_index;
        let sent_at = pending.sent_at;
        // A failed read consumes the handshake state; the retry timer starts a new one.
        let (crypto, payload) = match pending.initiator.finish(data) {
            Ok(done) => done,
            Err(_) => return Err(DropReason::Unauthentic),
        };
        let resp = ResponsePayload::parse(&payload).map_err(|_| DropReason::Malformed)?;
        if resp.version != PROTOCOL_VERSION {
            tracing::error!(version = resp.version, "server speaks another protocol version");
            return Err(DropReason::Malformed);
        }
        let session = Session {
            local_index,
            remote_index: resp.server_index,
            crypto,
        };
        self.install_session(self.instance, server, session, now.instant);
        self.counters.handshakes += 1;
        self.events.push(Event::Connected);
        tracing::info!(%server, rtt_ms = now.instant.saturating_duration_since(sent_at).as_millis() as u64, "session established");
        // Streams opened while we waited: their KCP output was dropped; send it now.
        let convs: Vec<u32> = self
            .peers
            .get(&self.instance)
            .map(|p| p.streams.keys().copied().collect())
            .unwrap_or_default();
        for conv in convs {
            self.flush_stream(StreamId {
                peer: self.instance,
                conv,
            });
        }
        Ok(())
    }

    fn install_session(&mut self, peer_id: PeerId, addr: SocketAddr, session: Session, now: Instant) {
        self.index.insert(session.local_index, peer_id);
        let peer = self.peers.entry(peer_id).or_insert_with(|| Peer::new(addr, now));
        peer.addr = addr;
        peer.last_rx = now;
        if let Some(old) = peer.previous.take() {
            self.index.remove(&old.local_index);
        }
        peer.previous = peer.session.replace(session);
    }

    // ---------------------------------------------------------------- timers

    /// Runs KCP's clock, retransmits, keepalives, handshake retries and reaping.
    pub fn handle_timeout(&mut self, now: Now) {
        self.clock = self.clock.max(now.instant);
        if self.ack_deadline.is_some_and(|d| d <= now.instant) {
            self.flush_delayed_acks();
        }
        if now.instant < self.next_tick() {
            return;
        }
        self.last_tick = now.instant;
        let ms = self.ms(now.instant);
        let peer_ids: Vec<PeerId> = self.peers.keys().copied().collect();
        self.queued_segments = 0;
        for peer_id in peer_ids {
            self.tick_streams(now, peer_id, ms);
            self.tick_peer(now, peer_id);
        }
        if let Role::Client { .. } = self.config.role {
            self.tick_client_handshake(now);
        }
        let horizon = Duration::from_millis(2 * HANDSHAKE_MAX_SKEW_MS);
        self.seen_handshakes
            .retain(|_, at| now.instant.saturating_duration_since(*at) < horizon);
    }

    fn tick_streams(&mut self, now: Now, peer_id: PeerId, ms: u32) {
        let Some(peer) = self.peers.get_mut(&peer_id) else {
            return;
        };
        let mut dead = Vec::new();
        let mut forgotten = Vec::new();
        let mut woken = Vec::new();
        for (&conv, stream) in peer.streams.iter_mut() {
            if let Phase::Lingering { until } = stream.phase
                && now.instant >= until
            {
                forgotten.push(conv);
                continue;
            }
            let _ = stream.kcp.update(ms);
            self.queued_segments += stream.kcp.wait_snd();
            let stalled = now.instant.saturating_duration_since(stream.last_activity) > self.config.peer_timeout
                && matches!(
                    stream.phase,
                    Phase::AwaitingOpen | Phase::AwaitingReply | Phase::Dialing
                );
            if stream.kcp.is_dead_link() || stalled {
                dead.push((conv, stream.phase == Phase::AwaitingReply));
            } else if stream.write_blocked && stream.writable() {
                stream.write_blocked = false;
                woken.push(conv);
            }
        }
        peer.tombstones
            .retain(|_, at| now.instant.saturating_duration_since(*at) < TOMBSTONE_TTL);
        for conv in forgotten {
            peer.streams.remove(&conv);
            peer.tombstones.insert(conv, now.instant);
            self.live_streams -= 1;
        }
        self.seal_kcp_output(peer_id);
        for conv in woken {
            self.events.push(Event::Writable(StreamId { peer: peer_id, conv }));
        }
        for (conv, awaiting_reply) in dead {
            let id = StreamId { peer: peer_id, conv };
            tracing::debug!(stream = %id, "stream timed out");
            if awaiting_reply {
                // The opener learns it was a timeout, not a refusal.
                self.events.push(Event::StreamReplied {
                    id,
                    result: Err(OpenError::TtlExpired),
                });
            }
            self.reset_stream(id);
        }
    }

    fn tick_peer(&mut self, now: Now, peer_id: PeerId) {
        let Some(peer) = self.peers.get(&peer_id) else { return };
        let silent_for = now.instant.saturating_duration_since(peer.last_rx);
        if silent_for > self.config.peer_timeout && peer.session.is_some() {
            self.drop_peer_streams(peer_id);
            if matches!(self.config.role, Role::Server) {
                self.forget_peer(peer_id);
                return;
            }
        }
        let Some(peer) = self.peers.get(&peer_id) else { return };
        let idle = now.instant.saturating_duration_since(peer.last_tx) >= KEEPALIVE_INTERVAL;
        if peer.session.is_some() && idle && matches!(self.config.role, Role::Client { .. }) {
            self.send_keepalive(peer_id);
        }
    }

    fn drop_peer_streams(&mut self, peer_id: PeerId) {
        let Some(peer) = self.peers.get_mut(&peer_id) else {
            return;
        };
        let convs: Vec<u32> = peer.streams.drain().map(|(c, _)| c).collect();
        self.live_streams -= convs.len();
        if !convs.is_empty() {
            tracing::info!(streams = convs.len(), "peer silent too long; dropping its streams");
        }
        for conv in convs {
            self.events.push(Event::StreamClosed(StreamId { peer: peer_id, conv }));
        }
    }

    fn forget_peer(&mut self, peer_id: PeerId) {
        if let Some(peer) = self.peers.remove(&peer_id) {
            for s in [peer.session, peer.previous].into_iter().flatten() {
                self.index.remove(&s.local_index);
            }
            tracing::info!(client = %peer.addr, "client silent too long; session forgotten");
        }
    }

    fn tick_client_handshake(&mut self, now: Now) {
        if let Some(p) = &self.pending {
            if now.instant.saturating_duration_since(p.sent_at) >= HANDSHAKE_RETRY {
                self.connect(now);
            }
            return;
        }
        let Some(peer) = self.peers.get(&self.instance) else {
            return;
        };
        let silent = now.instant.saturating_duration_since(peer.last_rx);
        if peer.session.is_some() && silent >= REHANDSHAKE_AFTER && peer.last_tx > peer.last_rx {
            tracing::info!(
                silent_ms = silent.as_millis() as u64,
                "server silent; handshaking again"
            );
            self.connect(now);
        }
    }
}

#[cfg(test)]
mod tests;
