//! The server's side of the endpoint: admitting a client's handshake (cheap checks,
//! replay and clock checks, cookies under load, the per-source rate and the peer cap),
//! answering it, and installing a completed handshake's session in its connection.

use std::net::SocketAddr;
use std::time::Instant;

use rand::{Rng, RngCore};

use crate::engine::connection::{Connection, Session};
use crate::engine::crypto::{self, Responder, cookie};
use crate::engine::frame::{InitPayload, ResponsePayload};
use crate::engine::{DropReason, Engine, HANDSHAKE_MAX_SKEW_MS, Now, PROTOCOL_VERSION, PathId, PeerId};

use super::admission;
use super::input::Dispatched;

impl Engine {
    /// Appends up to `max` random padding bytes to the scratch buffer, so handshake
    /// sizes do not identify paqet.
    pub(super) fn pad(&mut self, max: usize) {
        let len = self.rng.random_range(0..=max);
        for _ in 0..len {
            self.scratch.push(self.rng.random());
        }
    }

    /// A session index no session of this engine (or, sharded, of any shard) holds;
    /// a shard claims it at once, so two shards cannot pick the same one.
    pub(super) fn fresh_index(&mut self) -> u32 {
        loop {
            let idx = self.rng.next_u32();
            if idx == 0 || self.index.contains_key(&idx) {
                continue;
            }
            if self.config.shard.as_ref().is_none_or(|s| s.claim_session(idx)) {
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
    ) -> Result<Dispatched, DropReason> {
        // Cheap checks first: no Noise work for what cannot be a fresh handshake.
        if !admission::INIT_MESSAGE_LEN.contains(&data.len()) {
            return Err(DropReason::Unauthentic);
        }
        let (noise, mac2) = cookie::split_mac2(data).ok_or(DropReason::Unauthentic)?;
        let fingerprint = crypto::handshake_fingerprint(noise).ok_or(DropReason::Unauthentic)?;
        if self.admission.already_seen(&fingerprint) {
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
        // A client that holds a session on another shard is resuming there: its new
        // address hashed here. That shard judges it (cookies, replays, its proof).
        if let Some(owner) = self
            .config
            .shard
            .as_ref()
            .and_then(|s| s.foreign_instance(init.instance))
        {
            self.hand_off(owner, path, from, data);
            return Ok(Dispatched::HandedOff);
        }
        // After the replay and clock checks, so a replayed handshake gets no reply of
        // any kind; and the message is remembered, so a replay of this one gets none
        // either (the client answers a cookie with a new handshake).
        if self.admission.wants_cookie(from, noise, mac2, now.instant) {
            self.admission.remember(fingerprint, now.instant);
            self.send_cookie_reply(from, path, noise, now.instant);
            return Ok(Dispatched::Here);
        }
        let new_client = !self.peers.contains_key(&init.instance);
        if !self.admission.admit(from.ip(), now.instant) || (new_client && self.peers.len() >= self.config.max_peers) {
            return Err(DropReason::RateLimited);
        }
        self.admission.remember(fingerprint, now.instant);
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
        let (crypto, msg) = match responder.respond(&self.scratch) {
            Ok(answer) => answer,
            Err(_) => {
                if let Some(shard) = &self.config.shard {
                    shard.release(None, &[local_index]);
                }
                return Err(DropReason::Unauthentic);
            }
        };
        let session = Session {
            local_index,
            remote_index: init.client_index,
            crypto,
            confirmed: false,
        };
        self.install_session(init.instance, from, path, session, now.instant);
        self.admission.note_answered(now.instant);
        self.out.push_transmit(from, path, msg);
        tracing::info!(client = %from, "client authenticated, session established");
        Ok(Dispatched::Here)
    }

    /// Server, under load: answers a handshake with a cookie for its source address
    /// instead of a session. Smaller than the handshake it answers, so it amplifies
    /// nothing.
    fn send_cookie_reply(&mut self, from: SocketAddr, path: PathId, noise: &[u8], now: Instant) {
        let Some(binding) = cookie::binding(noise) else { return };
        let cookie = self.admission.cookie_for(from, now);
        let mut reply = self.cookie_sealer.seal(&cookie, &binding, self.rng.random());
        self.scratch.clear();
        self.pad(admission::MAX_PADDING);
        reply.extend_from_slice(&self.scratch);
        self.counters.cookies_sent += 1;
        self.out.push_transmit(from, path, reply);
        tracing::debug!(client = %from, "under load: asked for a cookie");
    }

    /// A handshake completed: `session` becomes the peer's current one.
    pub(super) fn install_session(
        &mut self,
        peer_id: PeerId,
        addr: SocketAddr,
        path: PathId,
        session: Session,
        now: Instant,
    ) {
        self.counters.handshakes += 1;
        self.index.insert(session.local_index, peer_id);
        if let Some(shard) = &self.config.shard {
            shard.claim_instance(peer_id);
        }
        let max_streams = self.config.max_streams_per_peer;
        let connection = self
            .peers
            .entry(peer_id)
            .or_insert_with(|| Connection::new(peer_id, addr, path, max_streams, now));
        if let Some(retired) = connection.install(session, addr, path, now) {
            self.index.remove(&retired);
            if let Some(shard) = &self.config.shard {
                shard.release(None, &[retired]);
            }
        }
    }
}
