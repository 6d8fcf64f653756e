//! Datagrams in: authenticate, find the session and the stream, hand KCP its input,
//! and deliver a stream's control messages.

use std::net::SocketAddr;

use crate::engine::crypto::CryptoError;
use crate::engine::frame::Inner;
use crate::engine::mux::{Control, Phase};
use crate::engine::shards::Handoff;
use crate::engine::{DropReason, Engine, Event, KCP_HEADER_LEN, Now, PathId, PeerId, Role, StreamId, arq};

impl Engine {
    /// Handles one datagram from the wire. Anything that does not authenticate is
    /// dropped silently (and counted): to a scanner the port looks filtered. A data
    /// packet is decrypted where it lies, so `data` is spent afterwards. On a sharded
    /// server, a datagram of another shard's client is handed to it instead
    /// ([`Engine::drain_handoffs`]) and counted there.
    pub fn handle_datagram(
        &mut self,
        now: Now,
        path: PathId,
        from: SocketAddr,
        data: &mut [u8],
    ) -> Result<(), DropReason> {
        self.clock = self.clock.max(now.instant);
        let result = self.dispatch_datagram(now, path, from, data);
        if result == Ok(Dispatched::HandedOff) {
            self.counters.handed_off += 1;
            return Ok(());
        }
        self.counters.datagrams_in += 1;
        self.counters.bytes_in += data.len() as u64;
        if let Err(reason) = result {
            match reason {
                DropReason::Unauthentic => self.counters.dropped_unauthentic += 1,
                DropReason::Replayed => self.counters.dropped_replayed += 1,
                DropReason::StaleHandshake => self.counters.dropped_stale_handshake += 1,
                DropReason::Malformed => self.counters.dropped_malformed += 1,
                DropReason::RateLimited => self.counters.dropped_rate_limited += 1,
            }
        }
        result.map(|_| ())
    }

    fn dispatch_datagram(
        &mut self,
        now: Now,
        path: PathId,
        from: SocketAddr,
        data: &mut [u8],
    ) -> Result<Dispatched, DropReason> {
        if let Some(index) = self.index_mask.unmask(data) {
            if let Some(&peer_id) = self.index.get(&index) {
                return self
                    .handle_data(now, (path, from), peer_id, index, data)
                    .map(|()| Dispatched::Here);
            }
            if let Some(owner) = self.config.shard.as_ref().and_then(|s| s.foreign_session(index)) {
                self.hand_off(owner, path, from, data);
                return Ok(Dispatched::HandedOff);
            }
        }
        match self.config.role {
            Role::Server => self.handle_handshake_init(now, path, from, data),
            Role::Client { .. } => self
                .handle_handshake_response(now, path, from, data)
                .map(|()| Dispatched::Here),
        }
    }

    pub(super) fn hand_off(&mut self, shard: u8, path: PathId, from: SocketAddr, data: &[u8]) {
        self.out.handoffs.push(Handoff {
            shard,
            path,
            from,
            datagram: data.to_vec(),
        });
    }

    /// A data packet under one of `peer_id`'s sessions (`index`): open it under that
    /// session, note the peer alive, and act on what it carries.
    fn handle_data(
        &mut self,
        now: Now,
        source: (PathId, SocketAddr),
        peer_id: PeerId,
        index: u32,
        data: &mut [u8],
    ) -> Result<(), DropReason> {
        let server = matches!(self.config.role, Role::Server);
        let connection = self.peers.get_mut(&peer_id).ok_or(DropReason::Unauthentic)?;
        let opened = match connection.open(index, data) {
            Ok(opened) => opened,
            Err(CryptoError::Replayed(_)) => return Err(DropReason::Replayed),
            Err(_) => return Err(DropReason::Unauthentic),
        };
        let current = connection.note_alive(source, index, opened.newest, server, now.instant);
        if !server && current {
            self.server_answers();
        }
        self.handle_inner(now, peer_id, opened.plaintext)
    }

    fn handle_inner(&mut self, now: Now, peer_id: PeerId, plain: &[u8]) -> Result<(), DropReason> {
        match Inner::parse(plain).map_err(|_| DropReason::Malformed)? {
            Inner::Kcp(segments) => self.handle_kcp(now, peer_id, segments),
            Inner::Reset { conv } => {
                if let Some(connection) = self.peers.get_mut(&peer_id)
                    && connection.on_peer_reset(conv, now.instant, &mut self.out)
                {
                    self.live_streams -= 1;
                }
                Ok(())
            }
            Inner::Overflow { dropped } => {
                tracing::debug!(dropped, "the peer's receive buffer overflowed");
                self.on_peer_overflow(peer_id, now.instant);
                Ok(())
            }
            Inner::Datagram(frame) => {
                self.handle_datagram_frame(now.instant, peer_id, frame);
                Ok(())
            }
            Inner::Keepalive { .. } => {
                if matches!(self.config.role, Role::Server) {
                    self.send_keepalive(peer_id);
                }
                Ok(())
            }
        }
    }

    fn handle_kcp(&mut self, now: Now, peer_id: PeerId, segments: &[u8]) -> Result<(), DropReason> {
        if segments.len() < KCP_HEADER_LEN {
            return Err(DropReason::Malformed);
        }
        let conv = arq::get_conv(segments);
        let id = StreamId { peer: peer_id, conv };
        let known = self.peers.get(&peer_id).is_some_and(|c| c.has_stream(conv));
        if !known && !self.adopt_conversation(now, id, segments) {
            return Ok(());
        }
        let stream = self.stream_mut(id).ok_or(DropReason::Malformed)?;
        if stream.kcp.input(segments).is_err() {
            return Err(DropReason::Malformed);
        }
        stream.last_activity = now.instant;
        self.after_input(now, id);
        Ok(())
    }

    /// A conversation we don't know: a new stream (server: its first segment, the Open
    /// message at sn 0), late segments of a closed one (ignored), or one the peer thinks
    /// is alive but we lost (e.g. after a restart: its segments are past sn 0): tell the
    /// peer to drop it at once, rather than adopt a stream that will never see its Open
    /// and stall until TIMEOUT.
    fn adopt_conversation(&mut self, now: Now, id: StreamId, segments: &[u8]) -> bool {
        let Some(connection) = self.peers.get(&id.peer) else {
            return false;
        };
        if connection.is_tombstoned(id.conv) {
            return false;
        }
        let opens = matches!(self.config.role, Role::Server) && arq::opens_conversation(segments) && id.conv != 0;
        if opens && connection.has_room_for_stream() {
            let stream = self.new_stream(id.conv, Phase::AwaitingOpen, now.instant);
            self.add_stream(id, stream);
            return true;
        }
        if opens {
            self.counters.refused_streams += 1;
            tracing::debug!(stream = %id, "refused: the client has the most streams a session may have");
        }
        if let Some(connection) = self.peers.get_mut(&id.peer) {
            connection.refuse_unknown(id.conv, now.instant, &mut self.out);
        }
        false
    }

    /// After KCP took input: deliver control messages and wake readers and writers. The
    /// acknowledgement goes out when the edge drains transmits, once per batch of input
    /// rather than once per datagram.
    fn after_input(&mut self, now: Now, id: StreamId) {
        if !self.unflushed.contains(&id) {
            self.unflushed.push(id);
        }
        let mut buf = std::mem::take(&mut self.control_buf);
        let control = match self.stream_mut(id) {
            Some(s) if matches!(s.phase, Phase::AwaitingOpen | Phase::AwaitingReply) => s.take_control(&mut buf),
            _ => Ok(None),
        };
        self.control_buf = buf;
        match control {
            Ok(Some(Control::Open(target))) => {
                if let Some(s) = self.stream_mut(id) {
                    s.phase = Phase::Dialing;
                }
                self.out.events.push(Event::StreamOpened { id, target });
            }
            Ok(Some(Control::Reply(result))) => {
                if let Some(s) = self.stream_mut(id) {
                    s.phase = Phase::Open;
                    if result.is_err() {
                        s.sent_fin = true;
                        s.recv_fin = true;
                    }
                }
                self.out.events.push(Event::StreamReplied { id, result });
            }
            Ok(None) => {}
            Err(_) => {
                self.reset_stream(id);
                return;
            }
        }
        let Some(stream) = self.stream_mut(id) else { return };
        if stream.phase == Phase::Open && stream.has_message() {
            self.out.events.push(Event::Readable(id));
        }
        // Writers are woken in `drain_transmits`, once the flush has taken what the
        // acknowledgements made room for.
        self.close_if_done(id, Some(now.instant));
    }
}

/// Where a datagram went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dispatched {
    Here,
    /// To the shard that holds its client.
    HandedOff,
}
