//! Relayed UDP at the endpoint: a datagram's fragments sealed for its peer, fragments
//! in to the reassembler, and what arrived out to the edge. The wire format and the
//! reassembler are [`crate::engine::datagrams`].

use std::time::Instant;

use crate::engine::datagrams::{
    DatagramCounters, DatagramError, DatagramEvent, DatagramFrame, FRAGMENT_HEADER_LEN, MAX_DATAGRAM_PAYLOAD,
    Reassembler, fragment_count,
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
        let room = self.fragment_room();
        let Some(connection) = self.peers.get_mut(&peer).filter(|c| c.has_session()) else {
            return Err(DatagramError::NoSession);
        };
        let mut message = std::mem::take(&mut self.datagrams.message);
        message.clear();
        let emitted = addr.emit(&mut message);
        if let Err(e) = emitted {
            self.datagrams.message = message;
            return Err(e.into());
        }
        message.extend_from_slice(payload);
        let Some(count) = fragment_count(message.len(), room) else {
            self.datagrams.message = message;
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
        self.datagrams.message = message;
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
