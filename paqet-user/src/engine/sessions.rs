//! Handshakes, sessions and peers: connecting, answering a client, a client's new
//! address, keepalives, and forgetting a peer gone silent.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore};

use super::admission;
use super::crypto::{self, Initiator, Responder, cookie};
use super::frame::{InitPayload, Inner, OpenError, ResponsePayload};
use super::mux::Phase;
use super::{
    DropReason, Engine, Event, HANDSHAKE_MAX_SKEW_MS, Now, PROTOCOL_VERSION, PathId, Peer, PeerId, PendingHandshake,
    Role, Session, StreamId,
};

const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);
/// A client whose best paths went unanswered this long tries the next one beside them
/// (happy eyeballs): long enough for a handshake's round trip on any real path, short
/// enough that an application barely notices.
pub const PATH_FALLBACK_AFTER: Duration = Duration::from_secs(2);
/// No path answered for this long: the server is unreachable for now. Streams waiting
/// for it are failed and new ones fail at once, so applications hear within seconds
/// (independent of TIMEOUT, which governs the server's dials).
pub const SERVER_UNANSWERED_AFTER: Duration = Duration::from_secs(10);
/// The unreachable warning repeats this often while the condition lasts.
const UNANSWERED_REPEAT: Duration = Duration::from_secs(60);
/// While a worse path carries the session, the best one is tried again this often.
const BETTER_PATH_RETRY: Duration = Duration::from_secs(60);
/// Nothing sent for this long: send a keepalive so the peer knows we are alive.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Client: nothing heard for this long although we keep sending: the server has
/// probably restarted and forgotten us; handshake again.
const REHANDSHAKE_AFTER: Duration = Duration::from_secs(4);

/// Client: how the server has been answering.
#[derive(Debug, Default)]
pub(super) struct Reach {
    /// Since when handshakes have gone unanswered; `None` while a session answers.
    unanswered_since: Option<Instant>,
    /// Paths being tried: the first this many of `EngineConfig::paths`.
    tried: usize,
    /// Unanswered past [`SERVER_UNANSWERED_AFTER`]: new streams fail at once.
    down: bool,
    last_warning: Option<Instant>,
    /// When the best path was last tried while a worse one carried the session.
    last_upgrade_try: Option<Instant>,
}

impl Engine {
    /// Client: starts (or restarts) the handshake with the server, on every path being
    /// tried.
    pub fn connect(&mut self, now: Now) {
        self.clock = self.clock.max(now.instant);
        if !matches!(self.config.role, Role::Client { .. }) {
            return;
        }
        if self.reach.unanswered_since.is_none() {
            self.reach.unanswered_since = Some(now.instant);
            // From the best path down to the one that carries the session now: a
            // client on its fallback does not go back to a silent best path alone.
            let carrying = self
                .peers
                .get(&self.instance)
                .filter(|p| p.session.is_some())
                .and_then(|p| self.config.paths.iter().position(|&path| path == p.path));
            self.reach.tried = carrying.map_or(1, |i| i + 1);
        }
        let tried = self.reach.tried.min(self.config.paths.len());
        for i in 0..tried {
            let path = self.config.paths[i];
            self.handshake_on(now, path);
        }
    }

    /// Client: the server answers under our current session again, so no handshake is
    /// needed after all.
    fn reach_restored(&mut self) {
        if self.reach.down {
            tracing::info!("the server answers again");
        }
        self.pending.clear();
        self.reach = Reach {
            last_upgrade_try: self.reach.last_upgrade_try,
            ..Reach::default()
        };
    }

    /// Client: whether the server went unanswered so long that new streams fail at once.
    pub fn server_unanswered(&self) -> bool {
        self.reach.down
    }

    /// Client: sends a fresh handshake on `path`, replacing the one pending there.
    fn handshake_on(&mut self, now: Now, path: PathId) {
        let Role::Client { server } = self.config.role else {
            return;
        };
        let local_index = self.fresh_index();
        let init = InitPayload {
            version: PROTOCOL_VERSION,
            client_index: local_index,
            instance: self.instance,
            unix_ms: now.unix_ms,
            resume_proof: [0; 16],
        };
        self.scratch.clear();
        self.pad(admission::MAX_PADDING);
        let padding = std::mem::take(&mut self.scratch);
        let resume = self.resume.clone();
        let payload = |ephemeral: &[u8]| {
            let mut payload = Vec::with_capacity(64);
            InitPayload {
                resume_proof: resume.as_ref().map_or([0; 16], |r| crypto::resume_proof(r, ephemeral)),
                ..init
            }
            .emit(&mut payload);
            payload.extend_from_slice(&padding);
            payload
        };
        let started = Initiator::start_with(&self.config.psk, payload);
        self.scratch = padding;
        match started {
            Ok((initiator, mut msg)) => {
                let Some(cookie_binding) = cookie::binding(&msg) else {
                    tracing::error!("handshake message too short to bind a cookie reply");
                    return;
                };
                let mac2 = self.mac2_for(&msg, now.instant);
                msg.extend_from_slice(&mac2);
                self.pending.retain(|p| p.path != path);
                self.pending.push(PendingHandshake {
                    path,
                    initiator,
                    local_index,
                    sent_at: now.instant,
                    cookie_binding,
                });
                self.peers
                    .entry(self.instance)
                    .or_insert_with(|| Peer::new(server, path, now.instant))
                    .last_tx = now.instant;
                self.push_transmit(server, path, msg);
                tracing::debug!(%server, path = path.0, "handshake sent");
            }
            Err(e) => tracing::error!("cannot start handshake: {e}"),
        }
    }

    /// Client: the `mac2` field of a handshake message: under the server's fresh
    /// cookie if we have one, else random (no byte of a handshake is constant).
    fn mac2_for(&mut self, noise: &[u8], now: Instant) -> [u8; cookie::MAC2_LEN] {
        match self.cookie {
            Some((c, got)) if now.saturating_duration_since(got) < admission::COOKIE_FRESH_FOR => {
                cookie::mac2(&c, noise)
            }
            _ => self.rng.random(),
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

    pub(super) fn handle_handshake_init(
        &mut self,
        now: Now,
        path: PathId,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<(), DropReason> {
        // Cheap checks first: no Noise work for what cannot be a fresh handshake.
        if !admission::INIT_MESSAGE_LEN.contains(&data.len()) {
            return Err(DropReason::Unauthentic);
        }
        let (noise, mac2) = cookie::split_mac2(data).ok_or(DropReason::Unauthentic)?;
        let fingerprint = crypto::handshake_fingerprint(noise).ok_or(DropReason::Unauthentic)?;
        if self.seen_handshakes.contains_key(&fingerprint) {
            return Err(DropReason::StaleHandshake);
        }
        // Reading NNpsk0's first message costs a hash and an AEAD open, no
        // Diffie-Hellman: authenticate first, so that only a key holder spends a
        // source's handshake budget (a stranger spoofing a client's address cannot).
        let responder = Responder::read(&self.config.psk, noise).map_err(|_| DropReason::Unauthentic)?;
        let init = InitPayload::parse(&responder.payload).map_err(|_| DropReason::Malformed)?;
        if init.version != PROTOCOL_VERSION {
            tracing::warn!(%from, version = init.version, "client speaks another protocol version");
            return Err(DropReason::Malformed);
        }
        let from_before_start = init.unix_ms < self.config.started_unix_ms;
        if now.unix_ms.abs_diff(init.unix_ms) > HANDSHAKE_MAX_SKEW_MS || from_before_start {
            return Err(DropReason::StaleHandshake);
        }
        // After the replay and clock checks, so a replayed handshake gets no reply of
        // any kind; and the message is remembered, so a replay of this one gets none
        // either (the client answers a cookie with a new handshake).
        if self
            .cookie_gate
            .under_load(now.instant, self.config.handshakes_before_cookies)
            && !self.cookie_gate.valid_mac2(from, noise, mac2, now.instant)
        {
            self.seen_handshakes.insert(fingerprint, now.instant);
            self.send_cookie_reply(from, path, noise, now.instant);
            return Ok(());
        }
        let new_client = !self.peers.contains_key(&init.instance);
        if !self.handshake_limiter.admit(from.ip(), now.instant)
            || (new_client && self.peers.len() >= self.config.max_peers)
        {
            return Err(DropReason::RateLimited);
        }
        self.seen_handshakes.insert(fingerprint, now.instant);
        if !self.may_resume(init.instance, &fingerprint, &init.resume_proof) {
            tracing::debug!(%from, "handshake claims a live client's instance without proof; refused");
            return Err(DropReason::Unauthentic);
        }

        let local_index = self.fresh_index();
        self.scratch.clear();
        ResponsePayload {
            version: PROTOCOL_VERSION,
            server_index: local_index,
        }
        .emit(&mut self.scratch);
        self.pad(admission::MAX_PADDING);
        let (crypto, msg) = responder.respond(&self.scratch).map_err(|_| DropReason::Unauthentic)?;
        let session = Session {
            local_index,
            remote_index: init.client_index,
            crypto,
            confirmed: false,
        };
        self.install_session(init.instance, from, path, session, now.instant);
        self.cookie_gate.note_answered(now.instant);
        self.push_transmit(from, path, msg);
        tracing::info!(client = %from, "client authenticated, session established");
        Ok(())
    }

    /// Server, under load: answers a handshake with a cookie for its source address
    /// instead of a session. Smaller than the handshake it answers, so it amplifies
    /// nothing.
    fn send_cookie_reply(&mut self, from: SocketAddr, path: PathId, noise: &[u8], now: Instant) {
        let Some(binding) = cookie::binding(noise) else { return };
        let cookie = self.cookie_gate.cookie_for(from, now);
        let mut reply = self.cookie_sealer.seal(&cookie, &binding, self.rng.random());
        self.scratch.clear();
        self.pad(admission::MAX_PADDING);
        reply.extend_from_slice(&self.scratch);
        self.counters.cookies_sent += 1;
        self.push_transmit(from, path, reply);
        tracing::debug!(client = %from, "under load: asked for a cookie");
    }

    /// Client: a datagram that names no live session may be the server's answer to a
    /// pending handshake. Only one from the server's address, on a path with a handshake
    /// pending, is tried; one that does not authenticate leaves the handshake pending, so
    /// a forged reply can neither end it nor push the client to a worse path.
    pub(super) fn handle_handshake_response(
        &mut self,
        now: Now,
        path: PathId,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<(), DropReason> {
        let Role::Client { server } = self.config.role else {
            return Err(DropReason::Unauthentic);
        };
        if from != server {
            return Err(DropReason::Unauthentic);
        }
        let at = self
            .pending
            .iter()
            .position(|p| p.path == path)
            .ok_or(DropReason::Unauthentic)?;
        if admission::cookie_reply_len().contains(&data.len())
            && let Ok(cookie) = self.cookie_sealer.open(data, &self.pending[at].cookie_binding)
        {
            // The server is under load: handshake again at once, proving our address.
            self.cookie = Some((cookie, now.instant));
            tracing::debug!(path = path.0, "the server asked for a cookie");
            self.handshake_on(now, path);
            return Ok(());
        }
        if !admission::RESPONSE_MESSAGE_LEN.contains(&data.len()) {
            return Err(DropReason::Unauthentic);
        }
        let payload = self.pending[at]
            .initiator
            .read_response(data)
            .map_err(|_| DropReason::Unauthentic)?;
        let pending = self.pending.swap_remove(at);
        let crypto = pending.initiator.into_session().map_err(|_| DropReason::Unauthentic)?;
        let resp = ResponsePayload::parse(&payload).map_err(|_| DropReason::Malformed)?;
        if resp.version != PROTOCOL_VERSION {
            tracing::error!(version = resp.version, "server speaks another protocol version");
            return Err(DropReason::Malformed);
        }
        let session = Session {
            local_index: pending.local_index,
            remote_index: resp.server_index,
            crypto,
            confirmed: false,
        };
        self.resume = Some(zeroize::Zeroizing::new(*session.crypto.resume_secret()));
        self.install_session(self.instance, server, path, session, now.instant);
        self.pending.clear();
        let after_outage = self.reach.down;
        let best = self.config.paths.first().is_none_or(|&best| best == path);
        self.reach = Reach {
            last_upgrade_try: (!best).then_some(now.instant),
            ..Reach::default()
        };
        let rtt = now.instant.saturating_duration_since(pending.sent_at);
        self.events.push(Event::Connected {
            path,
            rtt,
            after_outage,
        });
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
        self.send_waiting_datagrams(now.instant);
        Ok(())
    }

    /// A handshake for an instance the server has sessions with must prove it holds the
    /// resumption secret of one of them (the latest ones are kept: answers to the
    /// client's latest handshakes may have been lost). An instance that has neither
    /// used a session nor opened a stream has nothing to take over, so a fresh client
    /// whose first answer was lost retries without a proof.
    fn may_resume(&self, instance: PeerId, ephemeral: &[u8], proof: &[u8; 16]) -> bool {
        let Some(peer) = self.peers.get(&instance) else {
            return true;
        };
        if !peer.confirmed && peer.streams.is_empty() {
            return true;
        }
        peer.resume_secrets.iter().any(|secret| {
            let expected = crypto::resume_proof(secret, ephemeral);
            bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &proof[..]))
        })
    }

    /// A handshake completed: `session` becomes the peer's current one.
    fn install_session(&mut self, peer_id: PeerId, addr: SocketAddr, path: PathId, session: Session, now: Instant) {
        self.counters.handshakes += 1;
        self.index.insert(session.local_index, peer_id);
        let peer = self.peers.entry(peer_id).or_insert_with(|| Peer::new(addr, path, now));
        peer.addr = addr;
        peer.path = path;
        peer.last_rx = now;
        if peer.resume_secrets.len() >= super::RESUME_SECRETS_KEPT {
            peer.resume_secrets.pop_front();
        }
        peer.resume_secrets
            .push_back(zeroize::Zeroizing::new(*session.crypto.resume_secret()));
        if let Some(old) = peer.previous.take() {
            self.index.remove(&old.local_index);
        }
        peer.previous = peer.session.replace(session);
    }

    /// An authentic packet arrived: the peer is alive, and (server) may have roamed to
    /// another address or path. Only the client's latest packet moves it: one overtaken
    /// on the way may come from the address the client just left (a NAT rebinding), or
    /// be a copy an on-path attacker sent on from elsewhere.
    pub(super) fn note_peer_alive(
        &mut self,
        peer_id: PeerId,
        path: PathId,
        from: SocketAddr,
        index: u32,
        newest: bool,
        now: Instant,
    ) {
        let server = matches!(self.config.role, Role::Server);
        let Some(peer) = self.peers.get_mut(&peer_id) else {
            return;
        };
        peer.last_rx = now;
        peer.confirmed = true;
        let mut current = peer.session.as_ref().is_some_and(|s| s.local_index == index);
        // Server: the client speaks under the session before the newest, which it has
        // never used: the newest one's answer did not reach the client (lost, or the
        // path it took works one way only), so go back to the session the client has.
        let newest_unused = peer.session.as_ref().is_some_and(|s| !s.confirmed);
        let under_previous = peer.previous.as_ref().is_some_and(|s| s.local_index == index);
        if server && !current && newest && under_previous && newest_unused {
            std::mem::swap(&mut peer.session, &mut peer.previous);
            tracing::debug!("the client still uses its earlier session; answering under it");
            current = true;
        }
        if let Some(session) = [peer.session.as_mut(), peer.previous.as_mut()]
            .into_iter()
            .flatten()
            .find(|s| s.local_index == index)
        {
            session.confirmed = true;
        }
        if server && current && newest && (peer.addr, peer.path) != (from, path) {
            tracing::info!(old = %peer.addr, new = %from, path = path.0, "client address changed");
            peer.addr = from;
            peer.path = path;
        }
        if !server && current && self.reach.unanswered_since.is_some() {
            // The server answers under the session we have: whatever made us handshake
            // again has passed.
            self.reach_restored();
        }
    }

    pub(super) fn send_keepalive(&mut self, peer_id: PeerId) {
        let len = self.rng.random_range(0..32);
        let padding: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
        self.seal_to(peer_id, &Inner::Keepalive { padding: &padding });
        self.counters.keepalives += 1;
    }

    pub(super) fn tick_peer(&mut self, now: Now, peer_id: PeerId) {
        let Some(peer) = self.peers.get(&peer_id) else { return };
        let silent_for = now.instant.saturating_duration_since(peer.last_rx);
        if silent_for > self.config.peer_timeout && peer.session.is_some() {
            self.drop_peer_streams(peer_id);
            if matches!(self.config.role, Role::Server) {
                self.forget_peer(peer_id);
                return;
            }
        }
        self.recover_send_backoff(peer_id, now.instant);
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

    /// Client: renews unanswered handshakes, widens the paths tried, declares the
    /// server unreachable, notices a silent one, and tries the best path again while a
    /// worse one carries the session.
    pub(super) fn tick_client_handshake(&mut self, now: Now) {
        if let Some(since) = self.reach.unanswered_since {
            self.tick_unanswered(now, now.instant.saturating_duration_since(since));
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
            return;
        }
        self.try_best_path(now);
    }

    fn tick_unanswered(&mut self, now: Now, silent: Duration) {
        let paths = self.config.paths.clone();
        if self.reach.tried < paths.len() && silent >= PATH_FALLBACK_AFTER * self.reach.tried as u32 {
            self.events.push(Event::PathFallback {
                unanswered: paths[..self.reach.tried].to_vec(),
                next: paths[self.reach.tried],
            });
            self.reach.tried += 1;
            self.connect(now);
        } else if self
            .pending
            .iter()
            .any(|p| now.instant.saturating_duration_since(p.sent_at) >= HANDSHAKE_RETRY)
            || self.pending.is_empty()
        {
            self.connect(now);
        }
        let warn_due = self
            .reach
            .last_warning
            .is_none_or(|at| now.instant.saturating_duration_since(at) >= UNANSWERED_REPEAT);
        if silent >= SERVER_UNANSWERED_AFTER && warn_due {
            self.reach.down = true;
            self.reach.last_warning = Some(now.instant);
            self.fail_streams_awaiting_reply();
            self.events.push(Event::ServerUnanswered {
                tried: paths[..self.reach.tried.min(paths.len())].to_vec(),
                silent,
            });
        }
    }

    /// The server is unreachable: streams still waiting for its answer get a failure
    /// now rather than after TIMEOUT.
    fn fail_streams_awaiting_reply(&mut self) {
        let Some(peer) = self.peers.get(&self.instance) else {
            return;
        };
        let waiting: Vec<u32> = peer
            .streams
            .iter()
            .filter(|(_, s)| s.phase == Phase::AwaitingReply)
            .map(|(&conv, _)| conv)
            .collect();
        for conv in waiting {
            let id = StreamId {
                peer: self.instance,
                conv,
            };
            self.events.push(Event::StreamReplied {
                id,
                result: Err(OpenError::GeneralFailure),
            });
            self.reset_stream(id);
        }
    }

    /// While a worse path carries the session, a handshake on the best one now and
    /// then: if it answers, the session moves there (the server keys us by instance,
    /// so streams carry on). An unanswered try is dropped, not repeated.
    fn try_best_path(&mut self, now: Now) {
        self.pending
            .retain(|p| now.instant.saturating_duration_since(p.sent_at) < HANDSHAKE_RETRY);
        let Some(&best) = self.config.paths.first() else {
            return;
        };
        let on_worse_path = self
            .peers
            .get(&self.instance)
            .is_some_and(|p| p.session.is_some() && p.path != best);
        let due = self
            .reach
            .last_upgrade_try
            .is_none_or(|at| now.instant.saturating_duration_since(at) >= BETTER_PATH_RETRY);
        if on_worse_path && due {
            self.reach.last_upgrade_try = Some(now.instant);
            self.handshake_on(now, best);
        }
    }
}
