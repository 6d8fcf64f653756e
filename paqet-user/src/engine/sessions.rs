//! Handshakes, sessions and peers: connecting, answering a client, a client's new
//! address, keepalives, and forgetting a peer gone silent.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore};

use super::admission;
use super::connection::{Connection, Session};
use super::crypto::{self, Initiator, Responder, cookie};
use super::frame::{InitPayload, ResponsePayload};
use super::{
    DropReason, Engine, Event, HANDSHAKE_MAX_SKEW_MS, Now, PROTOCOL_VERSION, PathId, PeerId, PendingHandshake, Role,
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
                .filter(|c| c.has_session())
                .and_then(|c| self.config.paths.iter().position(|&path| path == c.path));
            self.reach.tried = carrying.map_or(1, |i| i + 1);
        }
        let tried = self.reach.tried.min(self.config.paths.len());
        for i in 0..tried {
            let path = self.config.paths[i];
            self.handshake_on(now, path);
        }
    }

    /// Client: the server answers under our current session: whatever made us
    /// handshake again has passed, and no handshake is needed after all.
    pub(super) fn server_answers(&mut self) {
        if self.reach.unanswered_since.is_none() {
            return;
        }
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
                if let Some(connection) = self.connection_to_server(path, now.instant) {
                    connection.last_tx = now.instant;
                }
                self.out.push_transmit(server, path, msg);
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
        let may_resume = self
            .peers
            .get(&init.instance)
            .is_none_or(|c| c.may_resume(&fingerprint, &init.resume_proof));
        if !may_resume {
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
        self.out.push_transmit(from, path, msg);
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
        self.out.push_transmit(from, path, reply);
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
        self.out.events.push(Event::Connected {
            path,
            rtt,
            after_outage,
        });
        if let Some(connection) = self.peers.get_mut(&self.instance) {
            connection.flush_streams(self.clock, &mut self.out);
        }
        Ok(())
    }

    /// A handshake completed: `session` becomes the peer's current one.
    fn install_session(&mut self, peer_id: PeerId, addr: SocketAddr, path: PathId, session: Session, now: Instant) {
        self.counters.handshakes += 1;
        self.index.insert(session.local_index, peer_id);
        let max_streams = self.config.max_streams_per_peer;
        let connection = self
            .peers
            .entry(peer_id)
            .or_insert_with(|| Connection::new(peer_id, addr, path, max_streams, now));
        if let Some(retired) = connection.install(session, addr, path, now) {
            self.index.remove(&retired);
        }
    }

    /// Client: the connection to the server, made on first use.
    pub(super) fn connection_to_server(&mut self, path: PathId, now: Instant) -> Option<&mut Connection> {
        let Role::Client { server } = self.config.role else {
            return None;
        };
        let (id, max_streams) = (self.instance, self.config.max_streams_per_peer);
        Some(
            self.peers
                .entry(id)
                .or_insert_with(|| Connection::new(id, server, path, max_streams, now)),
        )
    }

    pub(super) fn send_keepalive(&mut self, peer_id: PeerId) {
        if let Some(connection) = self.peers.get_mut(&peer_id) {
            connection.send_keepalive(&mut self.rng, self.clock, &mut self.out);
        }
    }

    /// A peer silent past the timeout loses its streams (a server forgets it too); one
    /// that stopped overflowing gets its windows back; a client keeps its session warm.
    pub(super) fn tick_peer(&mut self, now: Now, peer_id: PeerId) {
        let server = matches!(self.config.role, Role::Server);
        let window = self.window_share();
        let Some(connection) = self.peers.get_mut(&peer_id) else {
            return;
        };
        if connection.timed_out(now.instant, self.config.peer_timeout) {
            self.live_streams -= connection.drop_streams(&mut self.out);
            if server {
                self.forget_peer(peer_id);
                return;
            }
        }
        connection.recover_backoff(window, now.instant);
        if !server && connection.keepalive_due(now.instant) {
            connection.send_keepalive(&mut self.rng, self.clock, &mut self.out);
        }
    }

    fn forget_peer(&mut self, peer_id: PeerId) {
        if let Some(connection) = self.peers.remove(&peer_id) {
            for index in connection.session_indices() {
                self.index.remove(&index);
            }
            tracing::info!(client = %connection.addr, "client silent too long; session forgotten");
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
        let Some(connection) = self.peers.get(&self.instance) else {
            return;
        };
        let silent = connection.silent_for(now.instant);
        if connection.has_session() && silent >= REHANDSHAKE_AFTER && connection.last_tx > connection.last_rx {
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
            self.out.events.push(Event::PathFallback {
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
            self.out.events.push(Event::ServerUnanswered {
                tried: paths[..self.reach.tried.min(paths.len())].to_vec(),
                silent,
            });
        }
    }

    /// The server is unreachable: streams still waiting for its answer get a failure
    /// now rather than after TIMEOUT.
    fn fail_streams_awaiting_reply(&mut self) {
        if let Some(connection) = self.peers.get_mut(&self.instance) {
            self.live_streams -= connection.fail_streams_awaiting_reply(self.clock, &mut self.out);
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
            .is_some_and(|c| c.has_session() && c.path != best);
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
