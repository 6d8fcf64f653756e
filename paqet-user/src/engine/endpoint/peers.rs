//! The endpoint's view across its connections: each peer's tick (timeout, window
//! recovery, keepalive), forgetting a silent client, and receive-buffer overflows, which
//! concern the peers that sent lately.

use std::time::{Duration, Instant};

use crate::engine::frame::Inner;
use crate::engine::{Engine, Now, PathId, PeerId, Role};

/// Peers heard from this recently sent what overflowed (a server tells those).
const RECENT: Duration = Duration::from_secs(1);
/// Overflows below this share of what arrived are left to KCP: the xdp ring drops
/// ~0.5 % on a busy two-core machine and halving windows for that would cost more
/// than the retransmissions.
const SIGNIFICANT_PERCENT: u64 = 5;

impl Engine {
    pub(super) fn send_keepalive(&mut self, peer_id: PeerId) {
        if let Some(connection) = self.peers.get_mut(&peer_id) {
            connection.send_keepalive(&mut self.rng, self.clock, &mut self.out);
            self.counters.keepalives += 1;
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
            self.send_keepalive(peer_id);
        }
    }

    fn forget_peer(&mut self, peer_id: PeerId) {
        if let Some(connection) = self.peers.remove(&peer_id) {
            let indices: Vec<u32> = connection.session_indices().collect();
            for index in &indices {
                self.index.remove(index);
            }
            if let Some(shard) = &self.config.shard {
                shard.release(Some(peer_id), &indices);
            }
            tracing::info!(client = %connection.addr, "client silent too long; session forgotten");
        }
    }

    /// The edge saw `dropped` datagrams lost to `path`'s full receive buffer while
    /// `received` arrived there: if that is significant, tell the peers on that path
    /// that sent them to slow down (a peer on another path did not fill it).
    pub fn receive_overflowed(&mut self, path: PathId, dropped: u64, received: u64) {
        if dropped == 0 || dropped * 100 < received * SIGNIFICANT_PERCENT {
            return;
        }
        let now = self.clock;
        let dropped = u32::try_from(dropped).unwrap_or(u32::MAX);
        let recent = self
            .peers
            .values_mut()
            .filter(|c| c.path == path && c.has_session() && c.silent_for(now) < RECENT);
        for connection in recent {
            connection.seal(&Inner::Overflow { dropped }, now, &mut self.out);
        }
    }

    /// The peer's receive buffer overflowed with what we sent: halve our send windows.
    pub(super) fn on_peer_overflow(&mut self, peer_id: PeerId, now: Instant) {
        let window = self.window_share();
        let Some(connection) = self.peers.get_mut(&peer_id) else {
            return;
        };
        let Some(shift) = connection.on_overflow(window, now) else {
            return;
        };
        if matches!(self.config.role, Role::Client { .. }) || shift == 1 {
            tracing::info!(shift, "the peer's receive buffer overflows; sending less");
        }
    }
}
