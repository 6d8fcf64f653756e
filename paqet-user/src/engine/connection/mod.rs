//! One peer, as the endpoint holds it: its sessions (the current one and the one
//! before the last handshake), the resumption secrets a server keeps for it, its
//! streams and their tombstones, how far its send windows are cut, and its own limits.
//! What only concerns this peer is done here, with its own session; what it sends goes
//! to the endpoint's [`Outbox`], and the endpoint keeps the counts that span peers.

mod backoff;
mod streams;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;
use rand::rngs::StdRng;
use zeroize::Zeroizing;

use super::crypto::{self, CryptoError, Opened, SessionCrypto};
use super::frame::Inner;
use super::mux::Stream;
use super::outbox::Outbox;
use super::{FastMap, PathId, PeerId};
use backoff::SendBackoff;

/// Resumption secrets a server keeps per client: its sessions of the last half minute
/// or so (one handshake a second while answers are lost), so a client whose answers
/// went missing still proves itself with the session it last had.
const RESUME_SECRETS_KEPT: usize = 32;
/// Nothing sent, or nothing heard, for this long: send a keepalive (at most one per
/// interval), which the server answers. The second half matters to a client that only
/// sends (an upload of datagrams): the server has nothing of its own to say, and without
/// its answers the client would take it for gone after a few seconds.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

pub(super) struct Session {
    pub local_index: u32,
    pub remote_index: u32,
    pub crypto: SessionCrypto,
    /// An authentic packet under it arrived: the peer has it.
    pub confirmed: bool,
}

pub(super) struct Connection {
    id: PeerId,
    pub addr: SocketAddr,
    pub path: PathId,
    /// How far our send windows to this peer are cut after it reported overflows.
    backoff: SendBackoff,
    session: Option<Session>,
    /// The session before the last re-handshake: packets already in flight under it
    /// still open until the peer switches over.
    previous: Option<Session>,
    /// Server: the resumption secrets of this client's latest sessions, newest last.
    resume_secrets: VecDeque<Zeroizing<[u8; 32]>>,
    /// Server: an authentic packet of this client arrived under some session.
    confirmed: bool,
    streams: FastMap<u32, Stream>,
    tombstones: HashMap<u32, Instant>,
    /// Server: streams this client may hold at once; more are refused as they open.
    max_streams: usize,
    pub last_rx: Instant,
    pub last_tx: Instant,
    last_keepalive: Instant,
}

impl Connection {
    pub fn new(id: PeerId, addr: SocketAddr, path: PathId, max_streams: usize, now: Instant) -> Connection {
        Connection {
            id,
            addr,
            path,
            backoff: SendBackoff::default(),
            session: None,
            previous: None,
            resume_secrets: VecDeque::new(),
            confirmed: false,
            streams: FastMap::default(),
            tombstones: HashMap::new(),
            max_streams,
            last_rx: now,
            last_tx: now,
            last_keepalive: now,
        }
    }

    pub fn has_session(&self) -> bool {
        self.session.is_some()
    }

    /// A handshake completed: `session` becomes the current one, the current one the
    /// previous. Returns the local index of the session that is retired for good.
    pub fn install(&mut self, session: Session, addr: SocketAddr, path: PathId, now: Instant) -> Option<u32> {
        self.addr = addr;
        self.path = path;
        self.last_rx = now;
        if self.resume_secrets.len() >= RESUME_SECRETS_KEPT {
            self.resume_secrets.pop_front();
        }
        self.resume_secrets
            .push_back(Zeroizing::new(*session.crypto.resume_secret()));
        let retired = self.previous.take().map(|old| old.local_index);
        self.previous = self.session.replace(session);
        retired
    }

    /// The local indices of both sessions, for the endpoint to stop routing them.
    pub fn session_indices(&self) -> impl Iterator<Item = u32> + '_ {
        [&self.session, &self.previous]
            .into_iter()
            .flatten()
            .map(|s| s.local_index)
    }

    fn session_by_index(&mut self, index: u32) -> Option<&mut Session> {
        [self.session.as_mut(), self.previous.as_mut()]
            .into_iter()
            .flatten()
            .find(|s| s.local_index == index)
    }

    /// Decrypts a data packet in place, under whichever of our sessions it names.
    pub fn open<'d>(&mut self, index: u32, data: &'d mut [u8]) -> Result<Opened<'d>, CryptoError> {
        self.session_by_index(index)
            .ok_or(CryptoError::Unauthentic)?
            .crypto
            .open_in_place(data)
    }

    /// Seals `inner` under the current session, or drops it if there is none yet (KCP
    /// retransmits once the session is up).
    pub fn seal(&mut self, inner: &Inner<'_>, now: Instant, out: &mut Outbox) {
        let Some(session) = self.session.as_mut() else { return };
        let mut packet = out.buffer();
        // Emitted straight into the datagram: every copy of a payload costs ~2 % of a
        // busy relay.
        match session
            .crypto
            .seal_with(session.remote_index, &mut packet, |plain| inner.emit(plain))
        {
            Ok(()) => {
                self.last_tx = now;
                out.push_transmit(self.addr, self.path, packet);
            }
            Err(e) => tracing::warn!("cannot seal packet: {e}"),
        }
    }

    /// Seals the KCP packets a flush or tick left in the outbox, for this peer.
    pub fn seal_kcp_packets(&mut self, now: Instant, out: &mut Outbox) {
        if out.kcp_packets.is_empty() {
            return;
        }
        let mut packets = std::mem::take(&mut out.kcp_packets);
        for packet in packets.iter() {
            self.seal(&Inner::Kcp(packet), now, out);
        }
        packets.clear();
        out.kcp_packets = packets;
    }

    /// An authentic packet arrived under the session `index` names: the peer is alive,
    /// and (server) may have roamed to another address or path. Only the client's
    /// latest packet moves it: one overtaken on the way may come from the address the
    /// client just left (a NAT rebinding), or be a copy an on-path attacker sent on from
    /// elsewhere. Returns whether the packet came under the current session.
    pub fn note_alive(
        &mut self,
        (path, from): (PathId, SocketAddr),
        index: u32,
        newest: bool,
        server: bool,
        now: Instant,
    ) -> bool {
        self.last_rx = now;
        self.confirmed = true;
        let mut current = self.session.as_ref().is_some_and(|s| s.local_index == index);
        // Server: the client speaks under the session before the newest, which it has
        // never used: the newest one's answer did not reach the client (lost, or the
        // path it took works one way only), so go back to the session the client has.
        let newest_unused = self.session.as_ref().is_some_and(|s| !s.confirmed);
        let under_previous = self.previous.as_ref().is_some_and(|s| s.local_index == index);
        if server && !current && newest && under_previous && newest_unused {
            std::mem::swap(&mut self.session, &mut self.previous);
            tracing::debug!("the client still uses its earlier session; answering under it");
            current = true;
        }
        if let Some(session) = self.session_by_index(index) {
            session.confirmed = true;
        }
        if server && current && newest && (self.addr, self.path) != (from, path) {
            tracing::info!(old = %self.addr, new = %from, path = path.0, "client address changed");
            self.addr = from;
            self.path = path;
        }
        current
    }

    /// A handshake for this client's instance must prove it holds the resumption secret
    /// of one of its sessions (the latest ones are kept: answers to the client's latest
    /// handshakes may have been lost). A client that has neither used a session nor
    /// opened a stream has nothing to take over, so a fresh client whose first answer
    /// was lost retries without a proof.
    pub fn may_resume(&self, ephemeral: &[u8], proof: &[u8; 16]) -> bool {
        if !self.confirmed && self.streams.is_empty() {
            return true;
        }
        self.resume_secrets.iter().any(|secret| {
            let expected = crypto::resume_proof(secret, ephemeral);
            bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &proof[..]))
        })
    }

    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_rx)
    }

    /// Whether a session's peer has been silent longer than `timeout`.
    pub fn timed_out(&self, now: Instant, timeout: Duration) -> bool {
        self.has_session() && self.silent_for(now) > timeout
    }

    pub fn keepalive_due(&self, now: Instant) -> bool {
        let quiet = |since: Instant| now.saturating_duration_since(since) >= KEEPALIVE_INTERVAL;
        self.has_session() && quiet(self.last_keepalive) && (quiet(self.last_tx) || quiet(self.last_rx))
    }

    pub fn send_keepalive(&mut self, rng: &mut StdRng, now: Instant, out: &mut Outbox) {
        self.last_keepalive = now;
        let len = rng.random_range(0..32);
        let padding: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        self.seal(&Inner::Keepalive { padding: &padding }, now, out);
    }

    /// The peer's receive buffer overflowed with what we sent: cut our send windows
    /// (`window` is every stream's share before the cut). Returns the new cut, if any.
    pub fn on_overflow(&mut self, window: u16, now: Instant) -> Option<u8> {
        let shift = self.backoff.cut(now)?;
        self.apply_backoff(window);
        Some(shift)
    }

    /// Widens a cut send window again after a quiet spell.
    pub fn recover_backoff(&mut self, window: u16, now: Instant) {
        if self.backoff.recover(now) {
            self.apply_backoff(window);
        }
    }

    /// Gives each stream its share of the window, cut by the backoff.
    fn apply_backoff(&mut self, window: u16) {
        let send = self.backoff.window(window);
        for stream in self.streams.values_mut() {
            stream.kcp.set_wndsize(send, 0);
        }
    }

    /// Gives every stream `window` to receive and its cut share to send.
    pub fn set_windows(&mut self, window: u16) {
        let send = self.backoff.window(window);
        for stream in self.streams.values_mut() {
            stream.kcp.set_wndsize(send, window);
        }
    }
}
