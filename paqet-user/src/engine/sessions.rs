//! Handshakes, sessions and peers: connecting, answering a client, a client's new
//! address, keepalives, and forgetting a peer gone silent.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore};

use super::crypto::{self, Initiator, Responder};
use super::frame::{InitPayload, Inner, ResponsePayload};
use super::{
    DropReason, Engine, Event, HANDSHAKE_MAX_SKEW_MS, Now, PROTOCOL_VERSION, Peer, PeerId, PendingHandshake, Role,
    Session, StreamId,
};

const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);
/// Nothing sent for this long: send a keepalive so the peer knows we are alive.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Client: nothing heard for this long although we keep sending: the server has
/// probably restarted and forgotten us; handshake again.
const REHANDSHAKE_AFTER: Duration = Duration::from_secs(4);

impl Engine {
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

    pub(super) fn handle_handshake_init(&mut self, now: Now, from: SocketAddr, data: &[u8]) -> Result<(), DropReason> {
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
        self.push_transmit(from, msg);
        tracing::info!(client = %from, "client authenticated, session established");
        Ok(())
    }

    pub(super) fn handle_handshake_response(&mut self, now: Now, data: &[u8]) -> Result<(), DropReason> {
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

    /// A handshake completed: `session` becomes the peer's current one.
    fn install_session(&mut self, peer_id: PeerId, addr: SocketAddr, session: Session, now: Instant) {
        self.counters.handshakes += 1;
        self.index.insert(session.local_index, peer_id);
        let peer = self.peers.entry(peer_id).or_insert_with(|| Peer::new(addr, now));
        peer.addr = addr;
        peer.last_rx = now;
        if let Some(old) = peer.previous.take() {
            self.index.remove(&old.local_index);
        }
        peer.previous = peer.session.replace(session);
    }

    /// An authentic packet arrived: the peer is alive, and (server) may have roamed.
    /// Only the client's latest packet moves it: one overtaken on the way may come
    /// from the address the client just left (a NAT rebinding), or be a copy an
    /// on-path attacker sent on from elsewhere.
    pub(super) fn note_peer_alive(
        &mut self,
        peer_id: PeerId,
        from: SocketAddr,
        index: u32,
        newest: bool,
        now: Instant,
    ) {
        let server = matches!(self.config.role, Role::Server);
        if let Some(peer) = self.peers.get_mut(&peer_id) {
            peer.last_rx = now;
            let current = peer.session.as_ref().is_some_and(|s| s.local_index == index);
            if server && current && newest && peer.addr != from {
                tracing::info!(old = %peer.addr, new = %from, "client address changed");
                peer.addr = from;
            }
        }
    }

    pub(super) fn send_keepalive(&mut self, peer_id: PeerId) {
        let len = self.rng.random_range(0..32);
        let padding: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
        self.seal_to(peer_id, &Inner::Keepalive { padding: &padding });
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

    pub(super) fn tick_client_handshake(&mut self, now: Now) {
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
