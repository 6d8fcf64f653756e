//! A receiver whose own socket (or AF_XDP ring) overflows tells its peer, and the peer
//! sends less until it stops. KCP cannot tell such drops from path loss, and fast3
//! ignores path loss by design (kcptun's `nc`), so without this a sender kept bursting a
//! whole window into a buffer that held a few datagrams, and a download with the seed's
//! `UDP_BUFFER=8192` crawled at 56–88 KB/s.
//!
//! The sender halves its streams' send windows (at most once per [`STEP`], down to
//! 1/64 and never below [`MIN_WINDOW`](crate::engine::mux::MIN_WINDOW)) on each report and
//! doubles them back once a [`RECOVERY`] passes without one. Only the peer that
//! reported slows down; path loss still changes nothing.

use std::time::{Duration, Instant};

use crate::engine::mux::MIN_WINDOW;

/// Reports closer together than this count as one (a burst overflows for a while).
const STEP: Duration = Duration::from_millis(100);
/// A report-free spell this long doubles the windows back.
const RECOVERY: Duration = Duration::from_secs(1);
/// At most 1/64 of the window.
const MAX_SHIFT: u8 = 6;

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
