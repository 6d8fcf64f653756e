//! The TCP-shaped wire's flows, as a pure state machine: header fields and a clock in,
//! the numbers and options of the next segment (and control segments to send) out.
//! No sockets, no clock reads, no randomness of its own (a seeded generator).
//!
//! Why it exists: a stateful firewall with strict conntrack (`nf_conntrack_tcp_loose=0`,
//! `nf_conntrack_tcp_be_liberal=0`) drops every segment of a flow that did not begin
//! with a SYN, and every segment whose numbers fall outside the windows it tracks. So
//! each flow opens like TCP and keeps TCP's bookkeeping:
//!
//! - **Handshake.** The client sends SYN (MSS, SACK-permitted, timestamps, window scale,
//!   in Linux's order), the server SYN-ACK (the same options), the client ACK. Data
//!   waiting for the handshake is held (a few datagrams) and sent right after the ACK.
//! - **Numbers** a window-tracking conntrack accepts (`tcp_in_window`): the sequence
//!   advances by each payload and never goes back; the ACK is the end of the newest data
//!   the peer really sent (never more); a datagram that would end past the peer's last
//!   ACK plus its advertised window waits (a few hundred at most, then they are
//!   dropped and the ARQ above retransmits) for the peer's next segment instead of
//!   being sent out of window. Both SYNs carry a window scale, so scaling is in effect
//!   for both sides, as conntrack requires.
//! - **Keyed SYN.** The server answers a SYN only when it proves the key: its TSval is
//!   the sender's Unix time in ms plus an offset keyed by the destination port (a
//!   constant offset per destination, as Linux's per-host timestamp offsets look), and
//!   its ISN is a keyed tag over the destination port and that TSval. The server checks
//!   the tag and that the time is within [`SYN_MAX_SKEW_MS`] of its own, and remembers
//!   every SYN it answered for twice that long: a replayed SYN gets nothing (unless it
//!   is a retransmission of the SYN of a handshake still in progress, which gets the
//!   same SYN-ACK again, as TCP would). Anything else gets no answer at all: to a
//!   scanner the port is silent. The source address and port are *not* covered: a NAT
//!   rewrites them and the client cannot know the result; the replay record is global
//!   instead, so a captured SYN is worth nothing from any address. Nor is the server's
//!   address: behind a 1:1 NAT (cloud instances) the server sees another address than
//!   the client sent to.
//! - **Re-open.** A client that has sent for [`REOPEN_AFTER`] without hearing anything
//!   (the router forgot the flow, rebooted, or changed the public address) opens the
//!   flow again with a fresh SYN; the server accepts a fresh SYN for a flow it has and
//!   starts that flow over. Sessions above keep their streams: the engine roams them.
//! - **Never RST, never FIN.** Nothing here ever sets either flag; segments that carry
//!   them are dropped.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use paqet_common::wire::{TcpOptionBytes, TcpOptions, tcpopt};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::engine::FastMap;
use crate::engine::crypto::mac::keyed_blake2s;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// Window scale both sides announce. With [`DATA_WINDOW`] it allows 32 MiB in flight
/// between two ACKs the peer sends, which an ARQ sending a large window at 500 MB/s
/// needs; Linux hosts with large receive buffers announce 9 or 10 too.
pub const WINDOW_SCALE: u8 = 9;
/// The window in SYN and SYN-ACK (never scaled there): what Linux sends for a
/// 1460-byte MSS.
pub const SYN_WINDOW: u16 = 64240;
/// The window in every other segment, shifted by [`WINDOW_SCALE`] at the peer.
pub const DATA_WINDOW: u16 = u16::MAX;
/// Bytes of options on every data segment: NOP, NOP, timestamps (as Linux sends them).
pub const DATA_OPTIONS_LEN: usize = 12;
/// A SYN's TSval may be this far from the server's clock (ms), as the engine allows for
/// its handshakes.
pub const SYN_MAX_SKEW_MS: u32 = 120_000;
/// SYNs answered are remembered this long: past it their time is out of the skew anyway.
const SEEN_SYN_KEPT: Duration = Duration::from_millis(2 * SYN_MAX_SKEW_MS as u64);
/// At most this many SYNs remembered. Only authentic ones are, so only a key holder
/// can fill it; when full, the oldest is forgotten, which its time check still covers
/// unless the server's clock jumps.
const SEEN_SYNS_MAX: usize = 1 << 16;
/// An unanswered SYN is sent again (the same segment, as TCP retransmits) this often,
/// when there is something to send.
const SYN_RETRY: Duration = Duration::from_secs(1);
/// After this long unanswered (one retransmission), a fresh SYN instead: a server that
/// (re)started after the first one was stamped refuses it, as a possible replay from
/// before its start.
const SYN_REFRESH: Duration = Duration::from_secs(2);
/// Client: sending this long without hearing anything re-opens the flow. Idle sessions
/// exchange a keepalive and its answer every second, so a live path is never silent
/// this long; the engine's own re-handshake comes after 4 s, so the flow is open again
/// by then.
pub const REOPEN_AFTER: Duration = Duration::from_secs(3);
/// A receiver that got this many bytes since it last sent a segment sends a bare ACK:
/// a flow whose traffic goes one way (an upload of datagrams the other side never
/// answers) would otherwise close the sender's window after 32 MiB, and a conntrack
/// that tracks windows calls what follows invalid. Real TCP ACKs every other segment;
/// one ACK per MiB keeps well inside the window at a few dozen segments a second.
const ACK_EVERY_BYTES: u32 = 1 << 20;
/// ...or when data that arrived this long ago is still unacknowledged as more arrives,
/// so a slow one-way flow is acknowledged too. (Decided as data arrives, not by a
/// timer: what the engine answers at once, a keepalive, costs no bare ACK.)
const ACK_EVERY: Duration = Duration::from_millis(200);
/// Server: at most this many flows. Only SYNs that prove the key make one, so only a
/// key holder could make more; a SYN beyond it is refused (unless it starts an
/// existing flow over) until idle flows are pruned.
const MAX_FLOWS: usize = 1 << 16;
/// Datagrams held per flow while its handshake runs: an ARQ's first burst (at most
/// ~370 KiB per flow, and a server holds only for flows whose SYN proved the key).
const HELD_MAX: usize = 256;

/// Which end of the flows this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Opens flows to servers.
    Client,
    /// Answers SYNs to `port` (the destination port the tags cover).
    Server { port: u16 },
}

/// The options a segment carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Options {
    /// SYN and SYN-ACK: MSS, SACK-permitted, timestamps, NOP, window scale.
    Syn { mss: u16, tsval: u32, tsecr: u32 },
    /// Everything else: NOP, NOP, timestamps.
    Timestamps { tsval: u32, tsecr: u32 },
}

/// The TCP header fields of one segment to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub options: Options,
}

impl Segment {
    pub fn option_bytes(&self) -> TcpOptionBytes {
        let mut o = TcpOptionBytes::default();
        let ts = |b: &mut [u8], tsval: u32, tsecr: u32| {
            b[0] = tcpopt::TIMESTAMPS;
            b[1] = 10;
            b[2..6].copy_from_slice(&tsval.to_be_bytes());
            b[6..10].copy_from_slice(&tsecr.to_be_bytes());
        };
        match self.options {
            Options::Syn { mss, tsval, tsecr } => {
                let b = &mut o.bytes;
                b[0] = tcpopt::MSS;
                b[1] = 4;
                b[2..4].copy_from_slice(&mss.to_be_bytes());
                b[4] = tcpopt::SACK_PERMITTED;
                b[5] = 2;
                ts(&mut b[6..16], tsval, tsecr);
                b[16] = tcpopt::NOP;
                b[17] = tcpopt::WINDOW_SCALE;
                b[18] = 3;
                b[19] = WINDOW_SCALE;
                o.len = 20;
            }
            Options::Timestamps { tsval, tsecr } => {
                o.bytes[0] = tcpopt::NOP;
                o.bytes[1] = tcpopt::NOP;
                ts(&mut o.bytes[2..12], tsval, tsecr);
                o.len = DATA_OPTIONS_LEN as u8;
            }
        }
        o
    }
}

/// A segment the transport sends by itself (handshake segments, held data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Control {
    pub peer: SocketAddr,
    pub seg: Segment,
    pub payload: Vec<u8>,
}

/// What a received segment's TCP header says.
#[derive(Clone, Copy, Debug, Default)]
pub struct Received {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub options: TcpOptions,
    pub payload_len: usize,
}

/// What to do with a received segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxVerdict {
    /// Hand the payload to the engine.
    Deliver,
    /// A handshake segment, taken by the flow; nothing to deliver.
    Consumed,
    Drop(RxDrop),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxDrop {
    /// Not part of a flow we have (and not a SYN that proves the key).
    NoFlow,
    /// A SYN without the key's tag.
    Unauthentic,
    /// A SYN whose time is too far from ours.
    Stale,
    /// A SYN answered before.
    Replayed,
    /// RST, FIN, or flags no segment of ours carries at this point.
    Unexpected,
    /// Server: as many flows as it keeps.
    Full,
}

/// What to do with a datagram the engine sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxVerdict {
    Send(Segment),
    /// Kept in the flow until its handshake completes (then in [`Flows::take_control`]).
    Held,
    Drop(TxDrop),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxDrop {
    /// Server: no flow to this peer (it never sent a SYN that proved the key).
    NoFlow,
    /// It would end past the peer's window.
    Window,
    /// The handshake is taking long and enough is held already.
    HeldFull,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Client: SYN sent (`syn` is it, to send again as is).
    SynSent {
        syn: Segment,
        first_sent: Instant,
        last_sent: Instant,
    },
    /// Server: SYN-ACK sent (`synack` is it, for a retransmitted SYN of the same ISN).
    SynReceived {
        irs: u32,
        synack: Segment,
    },
    Established,
}

#[derive(Debug)]
struct Flow {
    state: State,
    /// Our initial sequence number.
    iss: u32,
    /// Sequence number of our next byte.
    snd_nxt: u32,
    /// The peer's highest ACK.
    snd_una: u32,
    /// The peer's last window, in bytes (scaled).
    snd_wnd: u32,
    /// The shift the peer's windows take (0 until its SYN says).
    peer_scale: u8,
    /// What we acknowledge: the end of the newest data the peer sent.
    rcv_nxt: u32,
    /// `rcv_nxt` as the last segment we sent carried it.
    rcv_acked: u32,
    /// Since when data beyond `rcv_acked` has waited for our next segment.
    owed_since: Option<Instant>,
    /// We sent a segment after our SYN (or SYN-ACK): the peer knows our scaled window,
    /// not only the SYN's 64240 bytes.
    window_announced: bool,
    /// The peer's newest TSval, echoed as TSecr.
    ts_recent: u32,
    /// Our TSval is the flow clock (ms) plus this.
    ts_offset: u32,
    last_rx: Instant,
    last_tx: Instant,
    /// Client: since when we have sent without hearing anything back.
    unanswered_since: Option<Instant>,
    /// Datagrams waiting for the handshake or for the peer's window, in order.
    held: VecDeque<Vec<u8>>,
}

impl Flow {
    /// A flow whose first sequence number is `iss`, before anything from the peer.
    fn new(state: State, iss: u32, now: Instant) -> Flow {
        Flow {
            state,
            iss,
            snd_nxt: iss.wrapping_add(1),
            snd_una: iss.wrapping_add(1),
            snd_wnd: 0,
            peer_scale: 0,
            rcv_nxt: 0,
            rcv_acked: 0,
            owed_since: None,
            window_announced: false,
            ts_recent: 0,
            ts_offset: 0,
            last_rx: now,
            last_tx: now,
            unanswered_since: None,
            held: VecDeque::new(),
        }
    }

    fn tsval(&self, clock_ms: u32) -> u32 {
        clock_ms.wrapping_add(self.ts_offset)
    }

    /// Whether `len` more bytes fit the peer's window.
    fn fits(&self, len: usize) -> bool {
        self.snd_nxt.wrapping_add(len as u32).wrapping_sub(self.snd_una) <= self.snd_wnd
    }

    /// Sends held datagrams, in order, while the peer's window takes them.
    fn flush_held(&mut self, peer: SocketAddr, control: &mut Vec<Control>, clock_ms: u32, now: Instant) {
        while let Some(len) = self.held.front().map(Vec::len) {
            if !self.fits(len) {
                break;
            }
            let seg = self.data_segment(clock_ms);
            self.snd_nxt = self.snd_nxt.wrapping_add(len as u32);
            self.last_tx = now;
            if let Some(payload) = self.held.pop_front() {
                control.push(Control { peer, seg, payload });
            }
        }
    }

    /// The header of our next segment after the handshake (data, or a bare ACK with
    /// its flags changed): it acknowledges all the peer sent and announces our window.
    fn data_segment(&mut self, clock_ms: u32) -> Segment {
        self.rcv_acked = self.rcv_nxt;
        self.owed_since = None;
        self.window_announced = true;
        Segment {
            seq: self.snd_nxt,
            ack: self.rcv_nxt,
            flags: PSH | ACK,
            window: DATA_WINDOW,
            options: Options::Timestamps {
                tsval: self.tsval(clock_ms),
                tsecr: self.ts_recent,
            },
        }
    }

    /// Whether data received since our last segment must be acknowledged now, by a bare
    /// ACK, because nothing of ours is going that way to carry it: at once while the
    /// peer knows only our SYN's window, then per [`ACK_EVERY_BYTES`] or [`ACK_EVERY`].
    fn owes_bare_ack(&mut self, now: Instant) -> bool {
        let owed = self.rcv_nxt.wrapping_sub(self.rcv_acked);
        if owed == 0 {
            return false;
        }
        let since = *self.owed_since.get_or_insert(now);
        !self.window_announced || owed >= ACK_EVERY_BYTES || now.saturating_duration_since(since) >= ACK_EVERY
    }

    fn bare_ack(&mut self, peer: SocketAddr, control: &mut Vec<Control>, clock_ms: u32, now: Instant) {
        let mut seg = self.data_segment(clock_ms);
        seg.flags = ACK;
        self.last_tx = now;
        control.push(Control {
            peer,
            seg,
            payload: Vec::new(),
        });
    }
}

/// `a` is after `b` in sequence space (RFC 1982).
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The key the SYN tags are made with (from the pre-shared key, see
/// `engine::crypto::syn_tag_key`).
#[derive(Clone)]
pub struct SynKey(zeroize::Zeroizing<[u8; 32]>);

impl SynKey {
    pub fn new(key: [u8; 32]) -> SynKey {
        SynKey(zeroize::Zeroizing::new(key))
    }

    fn tag(&self, label: &[u8], port: u16, value: u32) -> u32 {
        u32::from_be_bytes(keyed_blake2s(
            &self.0,
            &[label, &port.to_be_bytes(), &value.to_be_bytes()],
        ))
    }

    /// What a SYN to `port` sent at `unix_ms` carries: (ISN, TSval). For tools and
    /// tests that must show a keyed SYN is answered where a replayed one is not.
    pub fn syn_numbers(&self, port: u16, unix_ms: u64) -> (u32, u32) {
        let tsval = (unix_ms as u32).wrapping_add(self.ts_offset(port));
        (self.isn(port, tsval), tsval)
    }

    /// The TSval offset for SYNs to `port`.
    fn ts_offset(&self, port: u16) -> u32 {
        self.tag(b"paqet syn tsval offset", port, 0)
    }

    /// The ISN a SYN to `port` with `tsval` must carry.
    fn isn(&self, port: u16, tsval: u32) -> u32 {
        self.tag(b"paqet syn isn", port, tsval)
    }
}

impl std::fmt::Debug for SynKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SynKey(..)")
    }
}

/// Counters of what the flows did, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub opened: u64,
    pub reopened: u64,
    pub syns_answered: u64,
    pub syns_refused: u64,
    pub dropped_window: u64,
    /// ACKs without data, for traffic that went one way.
    pub bare_acks: u64,
}

/// All flows of one transport.
pub struct Flows {
    side: Side,
    key: SynKey,
    /// The MSS we announce.
    mss: u16,
    flows: FastMap<SocketAddr, Flow>,
    /// Server: SYNs answered, (ISN, TSval), and when.
    seen: HashMap<(u32, u32), Instant>,
    seen_order: VecDeque<((u32, u32), Instant)>,
    control: Vec<Control>,
    /// The flow clock's zero.
    origin: Instant,
    /// Server: the wall clock (ms) when it started. A SYN stamped earlier may be a
    /// replay of one answered by an earlier run, whose answered SYNs this one does not
    /// remember (nothing is kept on disk): refused, as the engine refuses such
    /// handshakes. 0 turns the check off.
    started_unix_ms: u64,
    rng: StdRng,
    pub counters: FlowCounters,
}

impl Flows {
    pub fn new(side: Side, key: SynKey, mss: u16, origin: Instant, started_unix_ms: u64, seed: [u8; 32]) -> Flows {
        Flows {
            side,
            key,
            mss,
            flows: FastMap::default(),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            control: Vec::new(),
            origin,
            started_unix_ms,
            rng: StdRng::from_seed(seed),
            counters: FlowCounters::default(),
        }
    }

    fn clock_ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.origin).as_millis() as u32
    }

    /// Segments to send now that no datagram of the engine asked for (SYN, SYN-ACK,
    /// ACK, data held during a handshake), in order.
    pub fn take_control(&mut self) -> Vec<Control> {
        std::mem::take(&mut self.control)
    }

    pub fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    /// Whether the flow to `peer` is established (tests, status).
    pub fn is_established(&self, peer: SocketAddr) -> bool {
        self.flows.get(&peer).is_some_and(|f| f.state == State::Established)
    }

    /// The header of the next segment carrying `payload` to `peer`.
    pub fn on_send(&mut self, peer: SocketAddr, payload: &[u8], now: Instant, unix_ms: u64) -> TxVerdict {
        let clock = self.clock_ms(now);
        let client = self.side == Side::Client;
        let Some(state) = self.flows.get(&peer).map(|f| f.state) else {
            if !client {
                return TxVerdict::Drop(TxDrop::NoFlow);
            }
            self.counters.opened += 1;
            tracing::debug!(%peer, "opening the TCP-shaped flow");
            self.open(peer, now, unix_ms);
            return self.hold(peer, payload);
        };
        match state {
            State::SynSent {
                syn,
                first_sent,
                last_sent,
            } => {
                if now.saturating_duration_since(first_sent) >= SYN_REFRESH {
                    self.open(peer, now, unix_ms);
                } else if now.saturating_duration_since(last_sent) >= SYN_RETRY {
                    if let Some(flow) = self.flows.get_mut(&peer) {
                        flow.state = State::SynSent {
                            syn,
                            first_sent,
                            last_sent: now,
                        };
                    }
                    self.control.push(Control {
                        peer,
                        seg: syn,
                        payload: Vec::new(),
                    });
                }
                self.hold(peer, payload)
            }
            State::SynReceived { .. } => self.hold(peer, payload),
            State::Established => {
                let silent = self
                    .flows
                    .get(&peer)
                    .and_then(|f| f.unanswered_since)
                    .is_some_and(|since| now.saturating_duration_since(since) >= REOPEN_AFTER);
                if client && silent {
                    self.counters.reopened += 1;
                    tracing::info!(
                        %peer,
                        "the server has not answered on the TCP-shaped flow for {}s (a middlebox may have \
                         forgotten it); opening it again",
                        REOPEN_AFTER.as_secs()
                    );
                    self.open(peer, now, unix_ms);
                    return self.hold(peer, payload);
                }
                let Some(flow) = self.flows.get_mut(&peer) else {
                    return TxVerdict::Drop(TxDrop::NoFlow);
                };
                // Past the peer's window (or behind datagrams that are): wait for its
                // next segment to open the window.
                if !flow.held.is_empty() || !flow.fits(payload.len()) {
                    if flow.held.len() >= HELD_MAX {
                        self.counters.dropped_window += 1;
                        return TxVerdict::Drop(TxDrop::Window);
                    }
                    flow.held.push_back(payload.to_vec());
                    return TxVerdict::Held;
                }
                let seg = flow.data_segment(clock);
                flow.snd_nxt = flow.snd_nxt.wrapping_add(payload.len() as u32);
                flow.last_tx = now;
                if client && flow.unanswered_since.is_none() {
                    flow.unanswered_since = Some(now);
                }
                TxVerdict::Send(seg)
            }
        }
    }

    fn hold(&mut self, peer: SocketAddr, payload: &[u8]) -> TxVerdict {
        let Some(flow) = self.flows.get_mut(&peer) else {
            return TxVerdict::Drop(TxDrop::NoFlow);
        };
        if flow.held.len() >= HELD_MAX {
            return TxVerdict::Drop(TxDrop::HeldFull);
        }
        flow.held.push_back(payload.to_vec());
        TxVerdict::Held
    }

    /// Client: a fresh SYN to `peer` (replacing any flow there), queued as control.
    fn open(&mut self, peer: SocketAddr, now: Instant, unix_ms: u64) {
        let clock = self.clock_ms(now);
        let port = peer.port();
        let offset = self.key.ts_offset(port);
        // A middlebox that still tracks the previous flow in SYN_SENT or SYN_RECV takes
        // a new SYN only if its sequence number is after the old one's (Linux's
        // `tcp_in_window` re-initialises then, and calls anything else invalid). The
        // ISN is a tag, not a choice, but the TSval may move by a few milliseconds:
        // each step is an even chance, so 64 steps fail once in 2^64.
        let previous = self.flows.get(&peer).map(|f| f.snd_nxt);
        let mut tsval = (unix_ms as u32).wrapping_add(offset);
        let mut iss = self.key.isn(port, tsval);
        for _ in 0..64 {
            if previous.is_none_or(|p| after(iss, p)) {
                break;
            }
            tsval = tsval.wrapping_add(1);
            iss = self.key.isn(port, tsval);
        }
        let syn = Segment {
            seq: iss,
            ack: 0,
            flags: SYN,
            window: SYN_WINDOW,
            options: Options::Syn {
                mss: self.mss,
                tsval,
                tsecr: 0,
            },
        };
        let held = self.flows.remove(&peer).map(|f| f.held).unwrap_or_default();
        let state = State::SynSent {
            syn,
            first_sent: now,
            last_sent: now,
        };
        self.flows.insert(
            peer,
            Flow {
                // Later TSvals go on from the SYN's at one per millisecond.
                ts_offset: tsval.wrapping_sub(clock),
                held,
                ..Flow::new(state, iss, now)
            },
        );
        self.control.push(Control {
            peer,
            seg: syn,
            payload: Vec::new(),
        });
    }

    /// A segment from `peer`: whether its payload goes to the engine.
    pub fn on_receive(&mut self, peer: SocketAddr, rx: &Received, now: Instant, unix_ms: u64) -> RxVerdict {
        if rx.flags & (RST | FIN) != 0 {
            return RxVerdict::Drop(RxDrop::Unexpected);
        }
        if rx.flags & SYN != 0 {
            return match (self.side, rx.flags & ACK != 0) {
                (Side::Server { port }, false) => self.on_syn(peer, port, rx, now, unix_ms),
                (Side::Client, true) => self.on_syn_ack(peer, rx, now),
                _ => RxVerdict::Drop(RxDrop::Unexpected),
            };
        }
        if rx.flags & ACK == 0 {
            return RxVerdict::Drop(RxDrop::Unexpected);
        }
        let clock = self.clock_ms(now);
        let Some(flow) = self.flows.get_mut(&peer) else {
            return RxVerdict::Drop(RxDrop::NoFlow);
        };
        match flow.state {
            State::SynSent { .. } => return RxVerdict::Drop(RxDrop::Unexpected),
            State::SynReceived { .. } => {
                // The client's ACK (or data that overtook it) acknowledges our SYN-ACK.
                if rx.ack != flow.iss.wrapping_add(1) {
                    return RxVerdict::Drop(RxDrop::Unexpected);
                }
                flow.state = State::Established;
            }
            State::Established => {}
        }
        flow.last_rx = now;
        flow.unanswered_since = None;
        let end = rx.seq.wrapping_add(rx.payload_len as u32);
        if after(end, flow.rcv_nxt) {
            flow.rcv_nxt = end;
        }
        // Only ACKs of what we sent: a forged or stale one must not open the window.
        if after(rx.ack, flow.snd_una) && !after(rx.ack, flow.snd_nxt) {
            flow.snd_una = rx.ack;
        }
        flow.snd_wnd = u32::from(rx.window) << flow.peer_scale;
        if let Some((tsval, _)) = rx.options.timestamps
            && !after(flow.ts_recent, tsval)
        {
            flow.ts_recent = tsval;
        }
        flow.flush_held(peer, &mut self.control, clock, now);
        if flow.owes_bare_ack(now) {
            flow.bare_ack(peer, &mut self.control, clock, now);
            self.counters.bare_acks += 1;
        }
        if rx.payload_len > 0 {
            RxVerdict::Deliver
        } else {
            RxVerdict::Consumed
        }
    }

    /// Server: a SYN. Answered only if it proves the key, is fresh, and is new (or the
    /// retransmission of the SYN of a handshake in progress).
    fn on_syn(&mut self, peer: SocketAddr, port: u16, rx: &Received, now: Instant, unix_ms: u64) -> RxVerdict {
        let verdict = self.check_syn(peer, port, rx, now, unix_ms);
        match verdict {
            RxVerdict::Consumed => {
                self.counters.syns_answered += 1;
                tracing::debug!(%peer, "keyed SYN answered");
            }
            _ => self.counters.syns_refused += 1,
        }
        verdict
    }

    /// Whether a SYN sent at `sent_ms` (the low 32 bits of Unix ms) predates this
    /// server's start. Only asked while the start is recent: later, any SYN from before
    /// it fails the skew check anyway, and the 32-bit difference stays meaningful.
    fn stamped_before_start(&self, sent_ms: u32, unix_ms: u64) -> bool {
        let recent = unix_ms.saturating_sub(self.started_unix_ms) <= 2 * u64::from(SYN_MAX_SKEW_MS);
        self.started_unix_ms != 0 && recent && (sent_ms.wrapping_sub(self.started_unix_ms as u32) as i32) < 0
    }

    fn check_syn(&mut self, peer: SocketAddr, port: u16, rx: &Received, now: Instant, unix_ms: u64) -> RxVerdict {
        let Some((tsval, _)) = rx.options.timestamps else {
            return RxVerdict::Drop(RxDrop::Unauthentic);
        };
        if rx.payload_len != 0 || self.key.isn(port, tsval) != rx.seq {
            return RxVerdict::Drop(RxDrop::Unauthentic);
        }
        let sent_ms = tsval.wrapping_sub(self.key.ts_offset(port));
        if sent_ms.wrapping_sub(unix_ms as u32).wrapping_add(SYN_MAX_SKEW_MS) > 2 * SYN_MAX_SKEW_MS
            || self.stamped_before_start(sent_ms, unix_ms)
        {
            return RxVerdict::Drop(RxDrop::Stale);
        }
        self.forget_old_syns(now);
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&peer) {
            tracing::debug!(%peer, "{MAX_FLOWS} TCP-shaped flows already; SYN refused");
            return RxVerdict::Drop(RxDrop::Full);
        }
        if self.seen.contains_key(&(rx.seq, tsval)) {
            // The same SYN again: a retransmission while our SYN-ACK is unanswered gets
            // it again; anything later is a replay.
            return match self.flows.get(&peer).map(|f| f.state) {
                Some(State::SynReceived { irs, synack }) if irs == rx.seq => {
                    self.control.push(Control {
                        peer,
                        seg: synack,
                        payload: Vec::new(),
                    });
                    RxVerdict::Consumed
                }
                _ => RxVerdict::Drop(RxDrop::Replayed),
            };
        }
        if self.seen.len() >= SEEN_SYNS_MAX
            && let Some((old, _)) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.seen.insert((rx.seq, tsval), now);
        self.seen_order.push_back(((rx.seq, tsval), now));

        let clock = self.clock_ms(now);
        let iss = self.rng.next_u32();
        let ts_offset = self.rng.next_u32();
        let synack = Segment {
            seq: iss,
            ack: rx.seq.wrapping_add(1),
            flags: SYN | ACK,
            window: SYN_WINDOW,
            options: Options::Syn {
                mss: self.mss,
                tsval: clock.wrapping_add(ts_offset),
                tsecr: tsval,
            },
        };
        if self.flows.remove(&peer).is_some() {
            tracing::debug!(%peer, "a fresh SYN for a flow we have: starting it over");
        }
        self.flows.insert(
            peer,
            Flow {
                // A SYN's window is never scaled.
                snd_wnd: u32::from(rx.window),
                peer_scale: rx.options.window_scale.unwrap_or(0).min(14),
                rcv_nxt: rx.seq.wrapping_add(1),
                rcv_acked: rx.seq.wrapping_add(1),
                ts_recent: tsval,
                ts_offset,
                ..Flow::new(State::SynReceived { irs: rx.seq, synack }, iss, now)
            },
        );
        self.control.push(Control {
            peer,
            seg: synack,
            payload: Vec::new(),
        });
        RxVerdict::Consumed
    }

    /// Client: the server's SYN-ACK. It must acknowledge our SYN; then we ACK and send
    /// what was held.
    fn on_syn_ack(&mut self, peer: SocketAddr, rx: &Received, now: Instant) -> RxVerdict {
        let clock = self.clock_ms(now);
        let Some(flow) = self.flows.get_mut(&peer) else {
            return RxVerdict::Drop(RxDrop::NoFlow);
        };
        if rx.ack != flow.iss.wrapping_add(1) {
            return RxVerdict::Drop(RxDrop::Unexpected);
        }
        let tsval = rx.options.timestamps.map_or(0, |(v, _)| v);
        match flow.state {
            State::SynSent { .. } => {}
            // Our ACK was lost and the server answered a retransmitted SYN: ACK again.
            State::Established if flow.rcv_nxt == rx.seq.wrapping_add(1) => {
                let mut seg = flow.data_segment(clock);
                seg.flags = ACK;
                self.control.push(Control {
                    peer,
                    seg,
                    payload: Vec::new(),
                });
                return RxVerdict::Consumed;
            }
            _ => return RxVerdict::Drop(RxDrop::Unexpected),
        }
        flow.state = State::Established;
        flow.rcv_nxt = rx.seq.wrapping_add(1);
        flow.rcv_acked = flow.rcv_nxt;
        flow.snd_una = rx.ack;
        flow.snd_wnd = u32::from(rx.window);
        flow.peer_scale = rx.options.window_scale.unwrap_or(0).min(14);
        flow.ts_recent = tsval;
        flow.last_rx = now;
        flow.unanswered_since = None;
        let mut ack = flow.data_segment(clock);
        ack.flags = ACK;
        self.control.push(Control {
            peer,
            seg: ack,
            payload: Vec::new(),
        });
        // What the server's SYN window (64240 bytes, unscaled) does not take waits for
        // its first scaled window.
        flow.flush_held(peer, &mut self.control, clock, now);
        tracing::debug!(%peer, "TCP-shaped flow established");
        RxVerdict::Consumed
    }

    fn forget_old_syns(&mut self, now: Instant) {
        while let Some(&(key, at)) = self.seen_order.front() {
            if now.saturating_duration_since(at) < SEEN_SYN_KEPT {
                break;
            }
            self.seen_order.pop_front();
            self.seen.remove(&key);
        }
    }

    /// Forgets flows with no traffic either way for `idle`.
    pub fn prune(&mut self, now: Instant, idle: Duration) {
        self.flows.retain(|_, f| {
            let last = f.last_rx.max(f.last_tx);
            now.saturating_duration_since(last) < idle
        });
        self.forget_old_syns(now);
    }
}

#[cfg(test)]
mod tests;
