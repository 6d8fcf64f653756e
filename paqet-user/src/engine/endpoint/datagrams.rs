//! Relayed UDP at the endpoint: a datagram's fragments sealed for its peer, fragments
//! in to the reassembler, and what arrived out to the edge. The wire format and the
//! reassembler are [`crate::engine::datagrams`].

use std::time::Instant;

use crate::engine::datagrams::{
    DatagramCounters, DatagramError, DatagramEvent, DatagramFrame, FRAGMENT_HEADER_LEN, MAX_DATAGRAM_PAYLOAD,
    Reassembler, WAIT_FOR_SESSION, WAITING_BYTES, WAITING_MAX, fragment_count,
};
use crate::engine::frame::{Inner, TargetAddr};
use crate::engine::{Engine, PeerId, Role};

/// The engine's datagram state: the reassembler, the next datagram id, and what
/// arrived for the edge.
#[derive(Default)]
pub(super) struct Datagrams {
    reassembler: Reassembler,
    next_id: u32,
    inbox: Vec<DatagramEvent>,
    message: Vec<u8>,
    /// Client: encoded messages (address ‖ payload) waiting for a session.
    waiting: Vec<Waiting>,
    waiting_bytes: usize,
}

struct Waiting {
    since: Instant,
    flow: u32,
    message: Vec<u8>,
}

impl Engine {
    /// Room for fragment data in one sealed packet.
    fn fragment_room(&self) -> usize {
        self.config
            .max_datagram
            .saturating_sub(crate::engine::crypto::SEAL_OVERHEAD + 1 + FRAGMENT_HEADER_LEN)
    }

    /// Sends one datagram of `flow` to `peer` (a client passes `None`: its server), with
    /// its address (client: the target; server: the reply's source), as one or more
    /// sealed packets. Unreliable: nothing is retransmitted.
    pub fn send_datagram(
        &mut self,
        peer: Option<PeerId>,
        flow: u32,
        addr: &TargetAddr,
        payload: &[u8],
    ) -> Result<(), DatagramError> {
        if payload.len() > MAX_DATAGRAM_PAYLOAD {
            return Err(DatagramError::TooLarge(payload.len()));
        }
        let peer = self.datagram_peer(peer);
        let mut message = std::mem::take(&mut self.datagrams.message);
        message.clear();
        let result = match addr.emit(&mut message) {
            Err(e) => Err(e.into()),
            Ok(()) => {
                message.extend_from_slice(payload);
                if self.peers.get(&peer).is_some_and(|c| c.has_session()) {
                    self.send_message(peer, flow, &message)
                } else {
                    self.wait_for_session(flow, &message)
                }
            }
        };
        self.datagrams.message = message;
        result
    }

    /// A client keeps a few datagrams until its session is up; a server has nobody to
    /// send to until its client handshakes.
    fn wait_for_session(&mut self, flow: u32, message: &[u8]) -> Result<(), DatagramError> {
        let d = &mut self.datagrams;
        let full = d.waiting.len() >= WAITING_MAX || d.waiting_bytes + message.len() > WAITING_BYTES;
        if matches!(self.config.role, Role::Server) || full {
            return Err(DatagramError::NoSession);
        }
        d.waiting_bytes += message.len();
        d.waiting.push(Waiting {
            since: self.clock,
            flow,
            message: message.to_vec(),
        });
        Ok(())
    }

    /// Client: the session is up; what waited for it goes now, unless it waited too long.
    pub(super) fn send_waiting_datagrams(&mut self, now: Instant) {
        let peer = self.datagram_peer(None);
        self.datagrams.waiting_bytes = 0;
        for w in std::mem::take(&mut self.datagrams.waiting) {
            if now.saturating_duration_since(w.since) > WAIT_FOR_SESSION {
                self.datagrams.reassembler.counters.expired_waiting += 1;
            } else if let Err(e) = self.send_message(peer, w.flow, &w.message) {
                tracing::debug!(
                    flow = w.flow,
                    "a datagram that waited for the session was not sent: {e}"
                );
            }
        }
    }

    /// One encoded datagram (address ‖ payload) as sealed fragments, to a peer with a
    /// session.
    fn send_message(&mut self, peer: PeerId, flow: u32, message: &[u8]) -> Result<(), DatagramError> {
        let room = self.fragment_room();
        let Some(connection) = self.peers.get_mut(&peer).filter(|c| c.has_session()) else {
            return Err(DatagramError::NoSession);
        };
        let Some(count) = fragment_count(message.len(), room) else {
            return Err(DatagramError::PathTooSmall);
        };
        let id = self.datagrams.next_id;
        self.datagrams.next_id = id.wrapping_add(1);
        for (index, data) in message.chunks(room).enumerate() {
            let frame = DatagramFrame::Fragment {
                flow,
                id,
                index: index as u8,
                count,
                data,
            };
            connection.seal(&Inner::Datagram(frame), self.clock, &mut self.out);
            self.datagrams.reassembler.counters.fragments_sent += 1;
        }
        self.datagrams.reassembler.counters.sent += 1;
        Ok(())
    }

    /// Client: tells the server that `flow` has ended, so it frees its socket now rather
    /// than at the idle timeout.
    pub fn close_datagram_flow(&mut self, flow: u32) {
        let peer = self.datagram_peer(None);
        self.seal_to(peer, &Inner::Datagram(DatagramFrame::Close { flow }));
    }

    fn datagram_peer(&self, peer: Option<PeerId>) -> PeerId {
        // A client's only peer, the server, is keyed by the client's own instance.
        peer.unwrap_or(self.instance)
    }

    /// An authentic datagram message from `peer`.
    pub(super) fn handle_datagram_frame(&mut self, now: Instant, peer: PeerId, frame: DatagramFrame<'_>) {
        match frame {
            DatagramFrame::Close { flow } => {
                if matches!(self.config.role, Role::Server) {
                    self.datagrams.inbox.push(DatagramEvent::FlowClosed { peer, flow });
                }
            }
            DatagramFrame::Fragment {
                flow,
                id,
                index,
                count,
                data,
            } => {
                let Ok(message) = self
                    .datagrams
                    .reassembler
                    .input(peer, flow, id, (index, count), data, now)
                else {
                    return;
                };
                match TargetAddr::parse(&message) {
                    Ok((addr, used)) => {
                        let payload = message[used..].to_vec();
                        self.datagrams.reassembler.counters.received += 1;
                        self.datagrams.inbox.push(DatagramEvent::Datagram {
                            peer,
                            flow,
                            addr,
                            payload,
                        });
                    }
                    Err(_) => self.datagrams.reassembler.counters.malformed += 1,
                }
            }
        }
    }

    /// Drops incomplete datagrams past their time (from the engine's timer).
    pub(super) fn expire_datagrams(&mut self, now: Instant) {
        self.datagrams.reassembler.expire(now);
    }

    /// Takes what arrived since the last call.
    pub fn drain_datagrams(&mut self, into: &mut Vec<DatagramEvent>) {
        into.append(&mut self.datagrams.inbox);
    }

    pub fn datagram_counters(&self) -> DatagramCounters {
        self.datagrams.reassembler.counters
    }

    /// Bytes held for incomplete datagrams now.
    pub fn reassembly_bytes(&self) -> usize {
        self.datagrams.reassembler.held_bytes()
    }
}
