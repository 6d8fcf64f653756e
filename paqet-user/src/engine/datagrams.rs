//! UDP through the relay: datagrams travel as sealed, unreliable messages in the
//! session (never through KCP's ARQ: a lost datagram stays lost, as UDP expects), cut
//! into fragments when one does not fit a packet and put back together at the other end.
//!
//! A *flow* is one UDP mapping, named by the client: a SOCKS association, or one local
//! source of a `FORWARD=udp/...` entry. Every datagram of a flow carries an address:
//! client → server the target (an IP, or a name the server resolves), server → client
//! the true source of the reply. The message that is fragmented is
//! `address (SOCKS encoding) ‖ payload`.
//!
//! Fragment (inner type 5), after the inner type byte:
//! `kind (1) = 0 ‖ flow (4) ‖ datagram id (4) ‖ index (1) ‖ count (1) ‖ bytes`;
//! flow closed: `kind (1) = 1 ‖ flow (4)`.
//!
//! Reassembly is bounded: a datagram whose fragments do not all arrive within
//! [`REASSEMBLY_TIMEOUT`] is dropped, and the bytes held for incomplete datagrams stay
//! under a cap per peer and a cap overall (the oldest incomplete datagram goes first).
//! Everything here takes bytes and the time the edge read; no sockets, no clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::frame::{FrameError, TargetAddr};
use super::{FastMap, PeerId};

/// The largest payload a datagram may have: what a UDP socket carries over IPv6
/// (65,535 − 8); IPv4's 65,507 fits.
pub const MAX_DATAGRAM_PAYLOAD: usize = 65_527;
/// An incomplete datagram is dropped this long after its first fragment arrived. UDP
/// applications retry on their own; holding fragments longer only holds memory.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes one peer's incomplete datagrams may hold (~64 of the largest datagrams).
pub const REASSEMBLY_BYTES_PER_PEER: usize = 4 << 20;
/// Bytes all incomplete datagrams may hold together.
pub const REASSEMBLY_BYTES_TOTAL: usize = 32 << 20;
/// Incomplete datagrams held at once, overall and per peer (so one peer's many small
/// incomplete datagrams cannot push out everyone else's).
pub const REASSEMBLY_MAX_PARTIALS: usize = 4096;
pub const REASSEMBLY_MAX_PARTIALS_PER_PEER: usize = 1024;
/// Client: datagrams sent while no session is up wait this long for one (a DNS query
/// sent as the client starts would otherwise be lost, and its resolver would wait
/// seconds to ask again)...
pub const WAIT_FOR_SESSION: Duration = Duration::from_secs(2);
/// ...this many of them, holding at most this many bytes; beyond that they are
/// refused as before.
pub const WAITING_MAX: usize = 64;
pub const WAITING_BYTES: usize = 256 << 10;
/// What an incomplete datagram costs besides its data: its slot per fragment, charged
/// against the caps, so 255-fragment datagrams of 1-byte fragments are no way around them.
fn partial_overhead(count: u8) -> usize {
    64 + count as usize * std::mem::size_of::<Option<Vec<u8>>>()
}

const KIND_FRAGMENT: u8 = 0;
const KIND_CLOSE: u8 = 1;
/// Bytes before a fragment's data.
pub const FRAGMENT_HEADER_LEN: usize = 11;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    #[error("datagram of {0} bytes is larger than the {MAX_DATAGRAM_PAYLOAD} bytes UDP carries")]
    TooLarge(usize),
    #[error("no session with the peer yet (and too many datagrams wait for one)")]
    NoSession,
    #[error("the path's packets are too small to carry fragments")]
    PathTooSmall,
    #[error("bad address: {0}")]
    Address(#[from] FrameError),
}

/// One datagram message inside a sealed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramFrame<'a> {
    Fragment {
        flow: u32,
        id: u32,
        index: u8,
        count: u8,
        data: &'a [u8],
    },
    /// The client ended this flow (its association closed): the server may forget it.
    Close { flow: u32 },
}

impl<'a> DatagramFrame<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<DatagramFrame<'a>, FrameError> {
        let need = |n: usize| {
            if buf.len() < n {
                Err(FrameError::Truncated {
                    need: n,
                    have: buf.len(),
                })
            } else {
                Ok(())
            }
        };
        need(5)?;
        let flow = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        match buf[0] {
            KIND_FRAGMENT => {
                need(FRAGMENT_HEADER_LEN)?;
                let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
                let (index, count) = (buf[9], buf[10]);
                if count == 0 || index >= count {
                    return Err(FrameError::Malformed("fragment index outside its count"));
                }
                Ok(DatagramFrame::Fragment {
                    flow,
                    id,
                    index,
                    count,
                    data: &buf[FRAGMENT_HEADER_LEN..],
                })
            }
            KIND_CLOSE => Ok(DatagramFrame::Close { flow }),
            other => Err(FrameError::UnknownType {
                what: "datagram frame",
                value: other,
            }),
        }
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        match *self {
            DatagramFrame::Fragment {
                flow,
                id,
                index,
                count,
                data,
            } => {
                out.push(KIND_FRAGMENT);
                out.extend_from_slice(&flow.to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
                out.push(index);
                out.push(count);
                out.extend_from_slice(data);
            }
            DatagramFrame::Close { flow } => {
                out.push(KIND_CLOSE);
                out.extend_from_slice(&flow.to_be_bytes());
            }
        }
    }
}

/// How a message of `len` bytes is cut into fragments of at most `room` bytes: the
/// fragment count, or `None` when more than 255 would be needed.
pub fn fragment_count(len: usize, room: usize) -> Option<u8> {
    if room == 0 {
        return None;
    }
    u8::try_from(len.div_ceil(room).max(1)).ok()
}

/// What arrived for the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatagramEvent {
    /// A whole datagram of `flow`: client → server `addr` is the target, server → client
    /// the reply's source.
    Datagram {
        peer: PeerId,
        flow: u32,
        addr: TargetAddr,
        payload: Vec<u8>,
    },
    /// Server: the client closed `flow`.
    FlowClosed { peer: PeerId, flow: u32 },
}

/// Counters of the datagram layer, since the engine started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DatagramCounters {
    pub sent: u64,
    pub received: u64,
    pub fragments_sent: u64,
    /// Fragments of a datagram already complete or already held.
    pub duplicate_fragments: u64,
    /// Incomplete datagrams dropped at their timeout.
    pub timed_out: u64,
    /// Incomplete datagrams dropped to stay within the memory caps.
    pub evicted: u64,
    /// Authentic datagram messages that broke the format (bad address, count mismatch).
    pub malformed: u64,
    /// Client: datagrams that waited for a session longer than [`WAIT_FOR_SESSION`].
    pub expired_waiting: u64,
}

type Key = (PeerId, u32, u32);

struct Partial {
    count: u8,
    got: u8,
    parts: Vec<Option<Vec<u8>>>,
    bytes: usize,
    started: Instant,
}

/// Puts fragmented datagrams back together, within bounded time and memory.
pub struct Reassembler {
    partials: FastMap<Key, Partial>,
    /// Keys by age (oldest first); an entry whose datagram completed is skipped later.
    order: VecDeque<(Key, Instant)>,
    bytes: usize,
    bytes_by_peer: FastMap<PeerId, usize>,
    partials_by_peer: FastMap<PeerId, usize>,
    per_peer_cap: usize,
    total_cap: usize,
    timeout: Duration,
    pub counters: DatagramCounters,
}

impl Default for Reassembler {
    fn default() -> Reassembler {
        Reassembler::new(REASSEMBLY_BYTES_PER_PEER, REASSEMBLY_BYTES_TOTAL, REASSEMBLY_TIMEOUT)
    }
}

/// Why a fragment did not complete a datagram (it may still be held).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    Waiting,
    Duplicate,
    Malformed,
}

impl Reassembler {
    pub fn new(per_peer_cap: usize, total_cap: usize, timeout: Duration) -> Reassembler {
        Reassembler {
            partials: FastMap::default(),
            order: VecDeque::new(),
            bytes: 0,
            bytes_by_peer: FastMap::default(),
            partials_by_peer: FastMap::default(),
            per_peer_cap,
            total_cap,
            timeout,
            counters: DatagramCounters::default(),
        }
    }

    /// Bytes held for incomplete datagrams now.
    pub fn held_bytes(&self) -> usize {
        self.bytes
    }

    pub fn incomplete(&self) -> usize {
        self.partials.len()
    }

    /// Takes one fragment; returns the whole message once its last fragment is in.
    pub fn input(
        &mut self,
        peer: PeerId,
        flow: u32,
        id: u32,
        (index, count): (u8, u8),
        data: &[u8],
        now: Instant,
    ) -> Result<Vec<u8>, Held> {
        self.expire(now);
        if count == 0 || index >= count {
            self.counters.malformed += 1;
            return Err(Held::Malformed);
        }
        if count == 1 {
            return Ok(data.to_vec());
        }
        // A fragment can never exceed a whole message: refuse what could only be an attempt
        // to make us hold more than a datagram.
        if data.len() > MAX_DATAGRAM_PAYLOAD + 260 {
            self.counters.malformed += 1;
            return Err(Held::Malformed);
        }
        let key = (peer, flow, id);
        if let Some(p) = self.partials.get(&key)
            && p.count != count
        {
            self.counters.malformed += 1;
            self.remove(key);
            return Err(Held::Malformed);
        }
        if !self.partials.contains_key(&key) {
            if self.partials_by_peer.get(&peer).copied().unwrap_or(0) >= REASSEMBLY_MAX_PARTIALS_PER_PEER {
                self.evict_oldest(Some(peer));
            }
            if self.partials.len() >= REASSEMBLY_MAX_PARTIALS {
                self.evict_oldest(None);
            }
            let overhead = partial_overhead(count);
            self.partials.insert(
                key,
                Partial {
                    count,
                    got: 0,
                    parts: vec![None; count as usize],
                    bytes: overhead,
                    started: now,
                },
            );
            self.bytes += overhead;
            *self.bytes_by_peer.entry(peer).or_insert(0) += overhead;
            *self.partials_by_peer.entry(peer).or_insert(0) += 1;
            self.order.push_back((key, now));
        }
        if self
            .partials
            .get(&key)
            .is_some_and(|p| p.parts[index as usize].is_some())
        {
            self.counters.duplicate_fragments += 1;
            return Err(Held::Duplicate);
        }
        // Make room: this peer's oldest first, then anyone's oldest (never this datagram
        // itself while an older one can go).
        while self.bytes_by_peer.get(&peer).copied().unwrap_or(0) + data.len() > self.per_peer_cap {
            if !self.evict_oldest_but(Some(peer), key) {
                break;
            }
        }
        while self.bytes + data.len() > self.total_cap {
            if !self.evict_oldest_but(None, key) {
                break;
            }
        }
        if self.bytes_by_peer.get(&peer).copied().unwrap_or(0) + data.len() > self.per_peer_cap
            || self.bytes + data.len() > self.total_cap
        {
            // Only this datagram is left and it does not fit: it cannot complete.
            self.remove(key);
            self.counters.evicted += 1;
            return Err(Held::Waiting);
        }
        let Some(p) = self.partials.get_mut(&key) else {
            return Err(Held::Waiting);
        };
        p.parts[index as usize] = Some(data.to_vec());
        p.got += 1;
        p.bytes += data.len();
        self.bytes += data.len();
        *self.bytes_by_peer.entry(peer).or_insert(0) += data.len();
        if p.got < p.count {
            return Err(Held::Waiting);
        }
        let mut whole = Vec::with_capacity(p.bytes);
        for part in p.parts.iter().flatten() {
            whole.extend_from_slice(part);
        }
        self.remove(key);
        Ok(whole)
    }

    /// Drops incomplete datagrams older than the timeout.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(key, started)) = self.order.front() {
            let live = self.partials.get(&key).is_some_and(|p| p.started == started);
            if !live {
                self.order.pop_front();
                continue;
            }
            if now.saturating_duration_since(started) < self.timeout {
                break;
            }
            self.order.pop_front();
            self.remove(key);
            self.counters.timed_out += 1;
        }
    }

    /// Drops the oldest incomplete datagram (of `peer`, if given); false if none.
    fn evict_oldest(&mut self, peer: Option<PeerId>) -> bool {
        self.evict_oldest_but(peer, (PeerId::MAX, u32::MAX, u32::MAX))
    }

    /// [`Self::evict_oldest`], sparing `keep`.
    fn evict_oldest_but(&mut self, peer: Option<PeerId>, keep: Key) -> bool {
        let found = self.order.iter().position(|(key, started)| {
            *key != keep
                && peer.is_none_or(|p| key.0 == p)
                && self.partials.get(key).is_some_and(|x| x.started == *started)
        });
        let Some(at) = found else { return false };
        if let Some((key, _)) = self.order.remove(at) {
            self.remove(key);
            self.counters.evicted += 1;
        }
        true
    }

    fn remove(&mut self, key: Key) {
        if let Some(p) = self.partials.remove(&key) {
            self.bytes -= p.bytes;
            if let Some(b) = self.bytes_by_peer.get_mut(&key.0) {
                *b -= p.bytes;
                if *b == 0 {
                    self.bytes_by_peer.remove(&key.0);
                }
            }
            if let Some(n) = self.partials_by_peer.get_mut(&key.0) {
                *n -= 1;
                if *n == 0 {
                    self.partials_by_peer.remove(&key.0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    /// Cuts `msg` into frames the way `send_datagram` does, each emitted and parsed back.
    fn cut(flow: u32, id: u32, msg: &[u8], room: usize) -> Vec<Vec<u8>> {
        let count = fragment_count(msg.len(), room).unwrap();
        msg.chunks(room)
            .enumerate()
            .map(|(i, data)| {
                let mut out = Vec::new();
                DatagramFrame::Fragment {
                    flow,
                    id,
                    index: i as u8,
                    count,
                    data,
                }
                .emit(&mut out);
                out
            })
            .collect()
    }

    fn feed(r: &mut Reassembler, wire: &[u8], now: Instant) -> Result<Vec<u8>, Held> {
        match DatagramFrame::parse(wire).unwrap() {
            DatagramFrame::Fragment {
                flow,
                id,
                index,
                count,
                data,
            } => r.input(7, flow, id, (index, count), data, now),
            other => panic!("{other:?}"),
        }
    }

    fn message(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn frames_round_trip_and_truncated_or_corrupt_input_is_an_error() {
        let frames = [
            DatagramFrame::Fragment {
                flow: 9,
                id: 0xdead_beef,
                index: 2,
                count: 3,
                data: b"abc",
            },
            DatagramFrame::Fragment {
                flow: 1,
                id: 0,
                index: 0,
                count: 1,
                data: b"",
            },
            DatagramFrame::Close { flow: u32::MAX },
        ];
        for f in frames {
            let mut out = Vec::new();
            f.emit(&mut out);
            assert_eq!(DatagramFrame::parse(&out).unwrap(), f);
            for cut in 0..out.len().min(FRAGMENT_HEADER_LEN) {
                if matches!(f, DatagramFrame::Close { .. }) && cut >= 5 {
                    continue;
                }
                assert!(DatagramFrame::parse(&out[..cut]).is_err(), "{f:?} cut at {cut}");
            }
        }
        // Index not below count, count zero, unknown kind.
        let bad = [
            [0, 0, 0, 0, 1, 0, 0, 0, 0, 3, 3],
            [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
            [9, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
        ];
        for b in bad {
            assert!(DatagramFrame::parse(&b).is_err(), "{b:?}");
        }
    }

    #[test]
    fn reassembles_in_any_order_and_ignores_duplicates() {
        let msg = message(65_507 + 7);
        let mut frames = cut(3, 11, &msg, 1389);
        assert_eq!(frames.len(), 48);
        frames.reverse();
        frames.swap(3, 17);
        let mut r = Reassembler::default();
        let now = t0();
        let last = frames.pop().unwrap();
        for f in &frames {
            assert_eq!(feed(&mut r, f, now), Err(Held::Waiting));
        }
        assert_eq!(feed(&mut r, &frames[5], now), Err(Held::Duplicate));
        assert_eq!(feed(&mut r, &last, now).unwrap(), msg);
        assert_eq!(r.held_bytes(), 0);
        assert_eq!(r.incomplete(), 0);
        // A late copy of a fragment of a finished datagram starts a new partial that
        // never completes and times out: it is never delivered twice.
        assert_eq!(feed(&mut r, &last, now), Err(Held::Waiting));
        r.expire(now + REASSEMBLY_TIMEOUT);
        assert_eq!(r.incomplete(), 0);
        assert_eq!(r.counters.timed_out, 1);
        assert_eq!(r.counters.duplicate_fragments, 1);
    }

    #[test]
    fn a_single_fragment_is_delivered_at_once() {
        let mut r = Reassembler::default();
        for len in [1, 2, 1389] {
            let msg = message(len);
            let frames = cut(1, len as u32, &msg, 1389);
            assert_eq!(frames.len(), 1);
            assert_eq!(feed(&mut r, &frames[0], t0()).unwrap(), msg);
        }
        assert_eq!(r.held_bytes(), 0);
    }

    #[test]
    fn a_lost_fragment_drops_the_datagram_within_the_timeout() {
        let msg = message(5000);
        let frames = cut(1, 1, &msg, 1000);
        let mut r = Reassembler::default();
        let now = t0();
        for f in &frames[..4] {
            assert_eq!(feed(&mut r, f, now), Err(Held::Waiting));
        }
        assert_eq!(r.held_bytes(), 4000 + partial_overhead(5));
        r.expire(now + REASSEMBLY_TIMEOUT - Duration::from_millis(1));
        assert_eq!(r.held_bytes(), 4000 + partial_overhead(5), "not yet");
        r.expire(now + REASSEMBLY_TIMEOUT);
        assert_eq!(r.held_bytes(), 0);
        assert_eq!(r.counters.timed_out, 1);
        // The missing fragment arriving later completes nothing.
        assert_eq!(feed(&mut r, &frames[4], now + REASSEMBLY_TIMEOUT), Err(Held::Waiting));
    }

    #[test]
    fn other_datagrams_of_the_flow_complete_beside_an_incomplete_one() {
        let mut r = Reassembler::default();
        let now = t0();
        let a = cut(1, 1, &message(3000), 1000);
        let b = cut(1, 2, &message(2500), 1000);
        feed(&mut r, &a[0], now).unwrap_err();
        feed(&mut r, &b[1], now).unwrap_err();
        feed(&mut r, &b[0], now).unwrap_err();
        assert_eq!(feed(&mut r, &b[2], now).unwrap(), message(2500));
        assert_eq!(r.incomplete(), 1);
    }

    #[test]
    fn memory_stays_within_the_caps_and_the_oldest_goes_first() {
        let mut r = Reassembler::new(10_000, 15_000, REASSEMBLY_TIMEOUT);
        let now = t0();
        // Incomplete datagrams of 1,000-byte fragments, one fragment short each.
        for id in 0..30u32 {
            let frames = cut(1, id, &message(4000), 1000);
            for f in &frames[..3] {
                let _ = feed(&mut r, f, now + Duration::from_millis(id as u64));
            }
            assert!(r.held_bytes() <= 10_000, "{}", r.held_bytes());
        }
        assert!(r.counters.evicted > 0);
        // The newest survive: the last one completes.
        let last = cut(1, 29, &message(4000), 1000);
        assert_eq!(
            feed(&mut r, &last[3], now + Duration::from_millis(30)).unwrap(),
            message(4000)
        );
        // Another peer has its own share, and the total cap holds.
        for id in 0..30u32 {
            let frames = cut(2, id, &message(4000), 1000);
            for f in &frames[..3] {
                if let DatagramFrame::Fragment {
                    flow,
                    id,
                    index,
                    count,
                    data,
                } = DatagramFrame::parse(f).unwrap()
                {
                    let _ = r.input(8, flow, id, (index, count), data, now);
                }
            }
            assert!(r.held_bytes() <= 15_000, "{}", r.held_bytes());
        }
    }

    #[test]
    fn one_peers_flood_of_tiny_incomplete_datagrams_stays_within_its_share() {
        let mut r = Reassembler::default();
        let now = t0();
        // Another peer's large datagram, one fragment short.
        let big = cut(1, 1, &message(60_000), 1389);
        for f in &big[..big.len() - 1] {
            let _ = feed(&mut r, f, now);
        }
        // 5,000 incomplete 255-fragment datagrams of one byte each from peer 9.
        for id in 0..5000u32 {
            let _ = r.input(9, 1, id, (0, 255), b"x", now);
            assert!(r.incomplete() <= 1 + REASSEMBLY_MAX_PARTIALS_PER_PEER);
            assert!(r.held_bytes() <= REASSEMBLY_BYTES_TOTAL);
        }
        assert!(*r.bytes_by_peer.get(&9).unwrap() <= REASSEMBLY_BYTES_PER_PEER);
        // Peer 7's datagram survived the flood and completes.
        assert_eq!(feed(&mut r, big.last().unwrap(), now).unwrap(), message(60_000));
    }

    #[test]
    fn a_datagram_larger_than_the_caps_is_dropped_not_held() {
        let mut r = Reassembler::new(3000, 3000, REASSEMBLY_TIMEOUT);
        let now = t0();
        let frames = cut(1, 1, &message(5000), 1000);
        for f in &frames {
            assert!(feed(&mut r, f, now).is_err());
            assert!(r.held_bytes() <= 3000);
        }
    }

    #[test]
    fn a_count_that_changes_mid_datagram_is_malformed_and_oversized_fragments_are_refused() {
        let mut r = Reassembler::default();
        let now = t0();
        assert_eq!(r.input(1, 1, 1, (0, 3), b"aa", now), Err(Held::Waiting));
        assert_eq!(r.input(1, 1, 1, (1, 4), b"bb", now), Err(Held::Malformed));
        assert_eq!(r.incomplete(), 0);
        assert_eq!(r.held_bytes(), 0);
        let huge = vec![0u8; MAX_DATAGRAM_PAYLOAD + 261];
        assert_eq!(r.input(1, 1, 2, (0, 2), &huge, now), Err(Held::Malformed));
        assert_eq!(r.input(1, 1, 3, (2, 2), b"x", now), Err(Held::Malformed));
        assert_eq!(r.held_bytes(), 0);
    }

    #[test]
    fn the_largest_datagram_needs_fewer_than_256_fragments_on_small_paths() {
        let largest = MAX_DATAGRAM_PAYLOAD + 259;
        assert!(fragment_count(largest, 1389).unwrap() < 64);
        assert!(fragment_count(largest, 300).is_some());
        assert_eq!(fragment_count(largest, 100), None);
        assert_eq!(fragment_count(0, 100), Some(1));
        assert_eq!(fragment_count(10, 0), None);
    }
}
