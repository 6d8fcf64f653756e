//! The engine's clock: when it must run next, KCP ticks, stream timeouts and reaping.

use std::time::{Duration, Instant};

use super::frame::OpenError;
use super::mux::Phase;
use super::{Engine, Event, HANDSHAKE_MAX_SKEW_MS, Now, PeerId, Role, StreamId};

/// Late segments of a closed conversation are ignored (not answered) this long.
const TOMBSTONE_TTL: Duration = Duration::from_secs(30);
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
            self.tick_streams(now, peer_id, ms);
            self.tick_peer(now, peer_id);
        }
        if let Role::Client { .. } = self.config.role {
            self.tick_client_handshake(now);
        }
        let horizon = Duration::from_millis(2 * HANDSHAKE_MAX_SKEW_MS);
        self.handshake_limiter.forget_quiet(now.instant);
        self.seen_handshakes
            .retain(|_, at| now.instant.saturating_duration_since(*at) < horizon);
    }

    fn tick_streams(&mut self, now: Now, peer_id: PeerId, ms: u32) {
        let Some(peer) = self.peers.get_mut(&peer_id) else {
            return;
        };
        let mut dead = Vec::new();
        let mut forgotten = Vec::new();
        let mut woken = Vec::new();
        for (&conv, stream) in peer.streams.iter_mut() {
            if let Phase::Lingering { until } = stream.phase
                && now.instant >= until
            {
                forgotten.push(conv);
                continue;
            }
            let _ = stream.kcp.update(ms, &mut self.output);
            self.queued_segments += stream.kcp.wait_snd();
            let stalled = now.instant.saturating_duration_since(stream.last_activity) > self.config.peer_timeout
                && matches!(
                    stream.phase,
                    Phase::AwaitingOpen | Phase::AwaitingReply | Phase::Dialing
                );
            if stream.kcp.is_dead_link() || stalled {
                dead.push((conv, stream.phase == Phase::AwaitingReply));
            } else if stream.write_blocked && stream.writable() {
                stream.write_blocked = false;
                woken.push(conv);
            }
        }
        peer.tombstones
            .retain(|_, at| now.instant.saturating_duration_since(*at) < TOMBSTONE_TTL);
        for conv in forgotten {
            peer.streams.remove(&conv);
            peer.tombstones.insert(conv, now.instant);
            self.live_streams -= 1;
        }
        self.seal_kcp_output(peer_id);
        for conv in woken {
            self.events.push(Event::Writable(StreamId { peer: peer_id, conv }));
        }
        for (conv, awaiting_reply) in dead {
            let id = StreamId { peer: peer_id, conv };
            tracing::debug!(stream = %id, "stream timed out");
            if awaiting_reply {
                // The opener learns it was a timeout, not a refusal.
                self.events.push(Event::StreamReplied {
                    id,
                    result: Err(OpenError::TtlExpired),
                });
            }
            self.reset_stream(id);
        }
    }
}
