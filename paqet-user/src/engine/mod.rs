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
//!
//! The layout follows quinn-proto's split. The *endpoint* ([`Engine`], in
//! `endpoint/`) is what spans peers: it routes each datagram to its connection by the
//! session index it names, admits and answers handshakes (`admission`, `handshakes`;
//! the client's side in `client`), holds the global limits (peers, the window budget
//! all streams share, queued segments) and schedules output. A *connection*
//! (`connection/`, one per peer) holds that peer's current and previous sessions, its
//! resumption secrets, its streams and their tombstones, its send-window backoff and
//! its stream cap, and opens and seals with its own session. Both write what they send
//! to the `outbox` (datagrams, events, reused buffers), a field apart, so a
//! connection can send while the endpoint holds its other state. This file holds the
//! public types; `frame`, `crypto`, `arq`, `kcp`, `mux` and `datagrams` are the pure
//! layers both use.

pub mod arq;
mod connection;
pub mod crypto;
pub mod datagrams;
mod endpoint;
pub mod frame;
pub mod kcp;
pub mod mux;
mod outbox;
pub mod shards;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crypto::Psk;
pub use endpoint::{Engine, PATH_FALLBACK_AFTER, SERVER_UNANSWERED_AFTER};
use frame::{OpenError, TargetAddr};
use kcp::KcpProfile;

/// For the maps looked up once per datagram (see Cargo.toml).
pub type FastMap<K, V> = foldhash::HashMap<K, V>;

/// Bumped whenever the wire format changes; travels inside the handshake.
pub const PROTOCOL_VERSION: u8 = 5;
/// How far a client's clock may be from the server's before its handshake is refused.
const HANDSHAKE_MAX_SKEW_MS: u64 = 120_000;
const KCP_HEADER_LEN: usize = 24;

/// The client process's identity towards the server (random per start).
pub type PeerId = u64;

/// Which way a datagram travels: one of the edge's transports (and its wire and
/// interface). The edge numbers its paths and tells the engine which one each datagram
/// came in on; the engine answers a peer on the path of its latest authentic packet,
/// and a client tries its paths in the order [`EngineConfig::paths`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PathId(pub u8);

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
    /// Client: the paths to the server, best first. The first is tried alone; when it
    /// goes unanswered for [`PATH_FALLBACK_AFTER`], the
    /// next ones are tried beside it, and the best is tried again now and then while a
    /// worse one carries the session.
    pub paths: Vec<PathId>,
    /// Server: the wall clock (ms) when it started. A handshake stamped earlier was
    /// made for an earlier run, whose answered handshakes this one no longer remembers
    /// (nothing is kept on disk): refused, so a replay from before a restart gets
    /// nothing. 0 turns the check off.
    pub started_unix_ms: u64,
    /// Server: streams one client may hold at once; more are reset as they open. Each
    /// costs at least a 128-segment receive window, so this bounds what one key holder
    /// can make the server keep.
    pub max_streams_per_peer: usize,
    /// Server: clients (instances) held at once; a handshake from a new one beyond it
    /// is dropped and counted. Each holds keys, streams and tombstones, and a key
    /// holder could otherwise make new ones as fast as it can handshake.
    pub max_peers: usize,
    /// Server: handshakes answered per second (each costs a Diffie-Hellman) beyond
    /// which a handshake must bring a cookie proving its source address, as WireGuard
    /// asks under load. 0 asks every handshake.
    pub handshakes_before_cookies: u32,
    /// Server: which of the engines that share its port this one is (see `shards`);
    /// `None` for the only one.
    pub shard: Option<shards::Shard>,
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
            paths: vec![PathId(0)],
            started_unix_ms: 0,
            max_streams_per_peer: 4096,
            max_peers: 4096,
            handshakes_before_cookies: 256,
            shard: None,
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
    pub path: PathId,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Client: a session with the server is up, over `path`.
    Connected {
        path: PathId,
        rtt: Duration,
        after_outage: bool,
    },
    /// Client: the best paths went unanswered; the next one is tried beside them.
    PathFallback {
        unanswered: Vec<PathId>,
        next: PathId,
    },
    /// Client: no path has answered a handshake for `silent`; streams waiting for the
    /// server were failed and new ones fail at once until it answers. Repeats at a calm
    /// interval while it lasts.
    ServerUnanswered {
        tried: Vec<PathId>,
        silent: Duration,
    },
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
    /// A handshake from a source that sent too many of them lately, or from a new
    /// client while the server holds as many clients as it may.
    RateLimited,
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
    pub dropped_rate_limited: u64,
    /// Streams a client opened beyond `max_streams_per_peer`, reset at once.
    pub refused_streams: u64,
    pub handshakes: u64,
    /// Sealed keepalives sent: by a client that sent or heard nothing for a second, and
    /// by the server in answer.
    pub keepalives: u64,
    /// Server: handshakes answered with a cookie instead of a session, under load.
    pub cookies_sent: u64,
    /// Sharded server: datagrams that reached this shard but belong to another's
    /// client (whose address changed), handed over to it.
    pub handed_off: u64,
}

/// What one path carries: see [`Engine::load_per_path`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathLoad {
    pub sessions: usize,
    pub streams: usize,
}

#[cfg(test)]
mod tests;
