//! The engine's clock: when it must run next, KCP ticks, stream timeouts and reaping.

use std::time::{Duration, Instant};

use crate::engine::{Engine, Now, PeerId, Role};

/// Housekeeping cadence when no stream needs KCP ticks.
const IDLE_TICK: Duration = Duration::from_millis(250);

impl Engine {
    /// When `handle_timeout` must next run.
    pub fn poll_timeout(&self) -> Instant {
        let tick = self.next_tick();
        self.ack_deadline.map_or(tick, |d| d.min(tick))
    }

    fn next_tick(&self) -> Instant {
        let tick = if self.live_streams > 0 {
            Duration::from_millis(self.config.kcp.tuning().interval_ms as u64)
        } else {
            IDLE_TICK
        };
        self.last_tick + tick
    }

    /// Runs KCP's clock, retransmits, keepalives, handshake retries and reaping.
    pub fn handle_timeout(&mut self, now: Now) {
        self.clock = self.clock.max(now.instant);
        if self.ack_deadline.is_some_and(|d| d <= now.instant) {
            self.flush_delayed_acks();
        }
        if now.instant < self.next_tick() {
            return;
        }
        self.last_tick = now.instant;
        self.expire_datagrams(now.instant);
        let ms = self.ms(now.instant);
        let peer_ids: Vec<PeerId> = self.peers.keys().copied().collect();
        self.queued_segments = 0;
        for peer_id in peer_ids {
            self.tick_streams(now.instant, peer_id, ms);
            self.tick_peer(now, peer_id);
        }
        if let Role::Client { .. } = self.config.role {
            self.tick_client_handshake(now);
        }
        self.admission.forget_old(now.instant);
    }

    fn tick_streams(&mut self, now: Instant, peer_id: PeerId, ms: u32) {
        let Some(connection) = self.peers.get_mut(&peer_id) else {
            return;
        };
        let tick = connection.tick_streams(now, ms, self.config.peer_timeout, &mut self.out);
        self.queued_segments += tick.queued_segments;
        self.live_streams -= tick.closed;
    }
}
