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

    /// The peer reported an overflow: halve the windows, unless they were halved a
    /// moment ago or are already cut as far as they go. Returns the new cut, if any.
    pub fn cut(&mut self, now: Instant) -> Option<u8> {
        if self.changed.is_some_and(|at| now.saturating_duration_since(at) < STEP) || self.shift >= MAX_SHIFT {
            return None;
        }
        self.shift += 1;
        self.changed = Some(now);
        Some(self.shift)
    }

    /// Doubles cut windows back after a quiet [`RECOVERY`]; true if it did.
    pub fn recover(&mut self, now: Instant) -> bool {
        if self.shift == 0
            || self
                .changed
                .is_some_and(|at| now.saturating_duration_since(at) < RECOVERY)
        {
            return false;
        }
        self.shift -= 1;
        self.changed = Some(now);
        true
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
        let dropped = u32::try_from(dropped).unwrap_or(u32::MAX);
        let recent = self
            .peers
            .values_mut()
            .filter(|c| c.has_session() && c.silent_for(now) < RECENT);
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
