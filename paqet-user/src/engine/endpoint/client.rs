//! The client's side of the endpoint: handshakes with the server on each of its
//! paths, their answers (a session or a cookie), falling back to worse paths and back
//! to the best one, and telling the edge when the server goes unanswered.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;
use zeroize::Zeroizing;

use crate::engine::connection::{Connection, Session};
use crate::engine::crypto::{self, Initiator, TAG_LEN, cookie};
use crate::engine::frame::{InitPayload, ResponsePayload};
use crate::engine::{DropReason, Engine, Event, Now, PROTOCOL_VERSION, PathId, Role};

use super::admission;

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
struct Reach {
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

/// A handshake sent on one path, waiting for the server's answer.
struct PendingHandshake {
    path: PathId,
    initiator: Initiator,
    local_index: u32,
    sent_at: Instant,
    /// What the server's cookie reply to this handshake is bound to.
    cookie_binding: [u8; TAG_LEN],
}

/// Client: what it keeps about its handshakes with the server.
#[derive(Default)]
pub(super) struct ClientState {
    /// At most one handshake waiting for an answer per path.
    pending: Vec<PendingHandshake>,
    /// How the server has been answering.
    reach: Reach,
    /// The resumption secret of the latest session, proven in the next handshake so
    /// the server moves our streams to it (and nobody else's).
    resume: Option<Zeroizing<[u8; 32]>>,
    /// The server's latest cookie, and when it came.
    cookie: Option<(cookie::Cookie, Instant)>,
}

impl ClientState {
    pub fn handshake_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

impl Engine {
    /// Client: starts (or restarts) the handshake with the server, on every path being
    /// tried.
    pub fn connect(&mut self, now: Now) {
        self.clock = self.clock.max(now.instant);
        if !matches!(self.config.role, Role::Client { .. }) {
            return;
        }
        if self.client.reach.unanswered_since.is_none() {
            self.client.reach.unanswered_since = Some(now.instant);
            // From the best path down to the one that carries the session now: a
            // client on its fallback does not go back to a silent best path alone.
            let carrying = self
                .peers
                .get(&self.instance)
                .filter(|c| c.has_session())
                .and_then(|c| self.config.paths.iter().position(|&path| path == c.path));
            self.client.reach.tried = carrying.map_or(1, |i| i + 1);
        }
        let tried = self.client.reach.tried.min(self.config.paths.len());
        for i in 0..tried {
            let path = self.config.paths[i];
            self.handshake_on(now, path);
        }
    }

    /// Client: the server answers under our current session: whatever made us
    /// handshake again has passed, and no handshake is needed after all.
    pub(super) fn server_answers(&mut self) {
        if self.client.reach.unanswered_since.is_none() {
            return;
        }
        if self.client.reach.down {
            tracing::info!("the server answers again");
        }
        self.client.pending.clear();
        self.client.reach = Reach {
            last_upgrade_try: self.client.reach.last_upgrade_try,
            ..Reach::default()
        };
    }

    /// Client: whether the server went unanswered so long that new streams fail at once.
    pub fn server_unanswered(&self) -> bool {
        self.client.reach.down
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
        let resume = self.client.resume.clone();
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
                self.client.pending.retain(|p| p.path != path);
                self.client.pending.push(PendingHandshake {
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
        match self.client.cookie {
            Some((c, got)) if now.saturating_duration_since(got) < admission::COOKIE_FRESH_FOR => {
                cookie::mac2(&c, noise)
            }
            _ => self.rng.random(),
        }
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
            .client
            .pending
            .iter()
            .position(|p| p.path == path)
            .ok_or(DropReason::Unauthentic)?;
        if admission::cookie_reply_len().contains(&data.len())
            && let Ok(cookie) = self.cookie_sealer.open(data, &self.client.pending[at].cookie_binding)
        {
            // The server is under load: handshake again at once, proving our address.
            self.client.cookie = Some((cookie, now.instant));
            tracing::debug!(path = path.0, "the server asked for a cookie");
            self.handshake_on(now, path);
            return Ok(());
        }
        if !admission::RESPONSE_MESSAGE_LEN.contains(&data.len()) {
            return Err(DropReason::Unauthentic);
        }
        let payload = self.client.pending[at]
            .initiator
            .read_response(data)
            .map_err(|_| DropReason::Unauthentic)?;
        let pending = self.client.pending.swap_remove(at);
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
        self.client.resume = Some(Zeroizing::new(*session.crypto.resume_secret()));
        self.install_session(self.instance, server, path, session, now.instant);
        self.client.pending.clear();
        let after_outage = self.client.reach.down;
        let best = self.config.paths.first().is_none_or(|&best| best == path);
        self.client.reach = Reach {
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
        self.send_waiting_datagrams(now.instant);
        Ok(())
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

    /// Client: renews unanswered handshakes, widens the paths tried, declares the
    /// server unreachable, notices a silent one, and tries the best path again while a
    /// worse one carries the session.
    pub(super) fn tick_client_handshake(&mut self, now: Now) {
        if let Some(since) = self.client.reach.unanswered_since {
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
        if self.client.reach.tried < paths.len() && silent >= PATH_FALLBACK_AFTER * self.client.reach.tried as u32 {
            self.out.events.push(Event::PathFallback {
                unanswered: paths[..self.client.reach.tried].to_vec(),
                next: paths[self.client.reach.tried],
            });
            self.client.reach.tried += 1;
            self.connect(now);
        } else if self
            .client
            .pending
            .iter()
            .any(|p| now.instant.saturating_duration_since(p.sent_at) >= HANDSHAKE_RETRY)
            || self.client.pending.is_empty()
        {
            self.connect(now);
        }
        let warn_due = self
            .client
            .reach
            .last_warning
            .is_none_or(|at| now.instant.saturating_duration_since(at) >= UNANSWERED_REPEAT);
        if silent >= SERVER_UNANSWERED_AFTER && warn_due {
            self.client.reach.down = true;
            self.client.reach.last_warning = Some(now.instant);
            self.fail_streams_awaiting_reply();
            self.out.events.push(Event::ServerUnanswered {
                tried: paths[..self.client.reach.tried.min(paths.len())].to_vec(),
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
        self.client
            .pending
            .retain(|p| now.instant.saturating_duration_since(p.sent_at) < HANDSHAKE_RETRY);
        let Some(&best) = self.config.paths.first() else {
            return;
        };
        let on_worse_path = self
            .peers
            .get(&self.instance)
            .is_some_and(|c| c.has_session() && c.path != best);
        let due = self
            .client
            .reach
            .last_upgrade_try
            .is_none_or(|at| now.instant.saturating_duration_since(at) >= BETTER_PATH_RETRY);
        if on_worse_path && due {
            self.client.reach.last_upgrade_try = Some(now.instant);
            self.handshake_on(now, best);
        }
    }
}
