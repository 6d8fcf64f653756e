//! The endpoint: what spans peers. It routes each datagram to its connection by the
//! session index it names, admits and answers handshakes, holds the global limits
//! (peers, the window budget shared by all streams, queued segments) and schedules
//! output. Its state is [`Engine`], below; its work is in the files beside, by side:
//! `input` (datagrams in), `handshakes` (server: admission and answers), `admission`
//! (the handshake limiter and cookies), `client` (handshakes with the server, paths,
//! reachability), `streams` (the edge's stream calls and the window budget),
//! `peers` (per-peer ticks, forgetting, overflow reports), `output` (flushes and
//! delayed ACKs) and `timers`.

pub(super) mod admission;
mod client;
mod datagrams;
mod handshakes;
mod input;
mod output;
mod peers;
mod streams;
mod timers;

pub use client::{PATH_FALLBACK_AFTER, SERVER_UNANSWERED_AFTER};
#[cfg(test)]
pub(super) use {output::ACK_DELAY, streams::LINGER};

use std::net::SocketAddr;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::connection::Connection;
use super::crypto::{self, IndexMask, SEAL_OVERHEAD};
use super::outbox::Outbox;
use super::{Counters, EngineConfig, FastMap, KCP_HEADER_LEN, PathLoad, PeerId, Role, StreamId, mux};
use admission::Admission;
use client::ClientState;

/// The endpoint, and the facade the edge calls (the name `Engine` stays: the edge, the
/// tests and the fuzz targets call it by that name). Per-peer state lives in each
/// `Connection`; what is here spans peers.
pub struct Engine {
    /// Readable by the engine's tests, which change a limit in place.
    pub(in crate::engine) config: EngineConfig,
    rng: StdRng,
    epoch: Instant,
    /// The latest time the edge told us; for the calls that need no fresh reading.
    clock: Instant,
    last_tick: Instant,

    // Routing.
    peers: FastMap<PeerId, Connection>,
    /// Local session index → peer, for both current and previous sessions.
    index: FastMap<u32, PeerId>,
    /// Unmasks the index a data packet names (it is masked under the PSK).
    index_mask: IndexMask,

    // Handshakes.
    /// Our own instance id (client) — the server's peer key for us.
    instance: PeerId,
    /// Client: its handshakes with the server, and how the server answers.
    client: ClientState,
    /// Server: whether a handshake gets an answer.
    admission: Admission,
    /// Seals (server) and opens (client) cookie replies.
    cookie_sealer: crypto::cookie::CookieSealer,

    // Global limits (with `EngineConfig::max_peers` and `window_budget`).
    live_streams: usize,
    /// Segments queued or in flight in all streams' send sides: exact after each tick,
    /// and only ever over-estimated between ticks (writes add, acknowledgements are
    /// counted at the next tick). Writers wait while it exceeds the send half of the
    /// window budget, so streams that opened with a large window (before the others
    /// came) cannot together queue more than the budget.
    queued_segments: usize,
    /// The window `rebalance_windows` last gave every stream.
    stream_window: Option<u16>,
    /// Client: the conversation number of the next stream it opens.
    next_conv: u32,

    // Output, and the buffers reused for it.
    out: Outbox,
    /// Streams that took input since the last drain and owe the peer an acknowledgement.
    unflushed: Vec<StreamId>,
    /// Streams whose few ACKs wait for more, or for `ack_deadline`.
    delayed_acks: Vec<StreamId>,
    ack_deadline: Option<Instant>,
    /// Set when `ack_deadline` is armed: the edge's timer must look again.
    timer_moved: bool,
    scratch: Vec<u8>,
    /// A stream's first (control) message is read here.
    control_buf: Vec<u8>,

    counters: Counters,
    /// Relayed UDP: reassembly and what arrived (`datagrams`).
    datagrams: datagrams::Datagrams,
}

impl Engine {
    pub fn new(config: EngineConfig, now: Instant) -> Engine {
        let index_mask = IndexMask::new(&config.psk);
        let cookie_sealer = crypto::cookie::CookieSealer::new(&config.psk);
        let out = Outbox::new(config.max_datagram);
        let admission = Admission::new(config.handshakes_before_cookies);
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
            index_mask,
            client: ClientState::default(),
            admission,
            cookie_sealer,
            out,
            next_conv,
            last_tick: now,
            scratch: Vec::with_capacity(64 * 1024),
            control_buf: Vec::new(),
            unflushed: Vec::new(),
            delayed_acks: Vec::new(),
            ack_deadline: None,
            timer_moved: false,
            counters: Counters::default(),
            live_streams: 0,
            queued_segments: 0,
            stream_window: None,
            clock: now,
            datagrams: datagrams::Datagrams::default(),
        };
        engine.control_buf = vec![0u8; engine.read_buffer_len()];
        engine
    }

    pub fn counters(&self) -> Counters {
        Counters {
            datagrams_out: self.out.datagrams_out,
            bytes_out: self.out.bytes_out,
            ..self.counters
        }
    }

    pub fn live_streams(&self) -> usize {
        self.live_streams
    }

    pub fn peer_count(&self) -> usize {
        self.peers.values().filter(|c| c.has_session()).count()
    }

    /// Sessions answered, and their streams, on each of `paths` paths (index = `PathId`).
    pub fn load_per_path(&self, paths: usize) -> Vec<PathLoad> {
        let mut counts = vec![PathLoad::default(); paths];
        for connection in self.peers.values().filter(|c| c.has_session()) {
            if let Some(n) = counts.get_mut(connection.path.0 as usize) {
                n.sessions += 1;
                n.streams += connection.stream_count();
            }
        }
        counts
    }

    /// Client: the server's address.
    pub fn server_addr(&self) -> Option<SocketAddr> {
        match self.config.role {
            Role::Client { server } => Some(server),
            Role::Server => None,
        }
    }

    /// Client: whether a session with the server is established.
    pub fn is_connected(&self) -> bool {
        self.peers.get(&self.instance).is_some_and(|c| c.has_session())
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
}
