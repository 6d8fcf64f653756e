//! A receiver whose own socket (or AF_XDP ring) overflows tells its peer, and the peer
//! sends less until it stops. KCP cannot tell such drops from path loss, and fast3
//! ignores path loss by design (kcptun's `nc`), so without this a sender kept bursting a
//! whole window into a buffer that held a few datagrams, and a download with the seed's
//! `UDP_BUFFER=8192` crawled at 56–88 KB/s.
//!
//! The sender halves its streams' send windows (at most once per [`STEP`], down to
//! 1/64 and never below [`MIN_WINDOW`](super::streams::MIN_WINDOW)) on each report and
//! doubles them back once a [`RECOVERY`] passes without one. Only the peer that
//! reported slows down; path loss still changes nothing.

use std::time::{Duration, Instant};

use super::frame::Inner;
use super::streams::MIN_WINDOW;
use super::{Engine, PeerId, Role};

/// Reports closer together than this count as one (a burst overflows for a while).
const STEP: Duration = Duration::from_millis(100);
/// A report-free spell this long doubles the windows back.
const RECOVERY: Duration = Duration::from_secs(1);
/// At most 1/64 of the window.
const MAX_SHIFT: u8 = 6;
/// Peers heard from this recently sent what overflowed (a server tells those).
const RECENT: Duration = Duration::from_secs(1);
/// Overflows below this share of what arrived are left to KCP: the xdp ring drops
/// ~0.5 % on a busy two-core machine and halving windows for that would cost more
/// than the retransmissions.
const SIGNIFICANT_PERCENT: u64 = 5;

/// How far a peer's send windows are cut, and since when.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct SendBackoff {
    pub shift: u8,
    pub changed: Option<Instant>,
}

impl SendBackoff {
    pub fn window(&self, window: u16) -> u16 {
        (window >> self.shift).max(MIN_WINDOW.min(window))
    }
}

impl Engine {
    /// The edge saw `dropped` datagrams lost to a full receive buffer while `received`
    /// arrived: if that is significant, tell the peers that sent them to slow down.
    pub fn receive_overflowed(&mut self, dropped: u64, received: u64) {
        if dropped == 0 || dropped * 100 < received * SIGNIFICANT_PERCENT {
            return;
        }
        let now = self.clock;
        let recent: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.session.is_some() && now.saturating_duration_since(p.last_rx) < RECENT)
            .map(|(&id, _)| id)
            .collect();
        let dropped = u32::try_from(dropped).unwrap_or(u32::MAX);
        for peer in recent {
            self.seal_to(peer, &Inner::Overflow { dropped });
        }
    }

    /// The peer's receive buffer overflowed with what we sent: halve our send windows.
    pub(super) fn on_peer_overflow(&mut self, peer_id: PeerId, now: Instant) {
        let Some(peer) = self.peers.get_mut(&peer_id) else {
            return;
        };
        let b = &mut peer.backoff;
        if b.changed.is_some_and(|at| now.saturating_duration_since(at) < STEP) || b.shift >= MAX_SHIFT {
            return;
        }
        b.shift += 1;
        b.changed = Some(now);
        let shift = b.shift;
        if matches!(self.config.role, Role::Client { .. }) || shift == 1 {
            tracing::info!(shift, "the peer's receive buffer overflows; sending less");
        }
        self.apply_send_backoff(peer_id);
    }

    /// Doubles a backed-off peer's windows back after a quiet [`RECOVERY`].
    pub(super) fn recover_send_backoff(&mut self, peer_id: PeerId, now: Instant) {
        let Some(peer) = self.peers.get_mut(&peer_id) else {
            return;
        };
        let b = &mut peer.backoff;
        if b.shift == 0 || b.changed.is_some_and(|at| now.saturating_duration_since(at) < RECOVERY) {
            return;
        }
        b.shift -= 1;
        b.changed = Some(now);
        self.apply_send_backoff(peer_id);
    }

    /// Gives each of the peer's streams its share of the window, cut by the backoff.
    pub(super) fn apply_send_backoff(&mut self, peer_id: PeerId) {
        let window = self.stream_window.unwrap_or(self.config.max_window);
        let Some(peer) = self.peers.get_mut(&peer_id) else {
            return;
        };
        let send = peer.backoff.window(window);
        for stream in peer.streams.values_mut() {
            stream.kcp.set_wndsize(send, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_cut_by_powers_of_two_but_never_below_the_floor() {
        let mut b = SendBackoff::default();
        assert_eq!(b.window(16384), 16384);
        b.shift = 3;
        assert_eq!(b.window(16384), 2048);
        b.shift = MAX_SHIFT;
        assert_eq!(b.window(1024), MIN_WINDOW);
        assert_eq!(b.window(16), 16, "a window already under the floor is left alone");
    }
}
