//! The receive side's record of which packet counters it has already accepted.

/// Sliding window over the highest counters seen, as WireGuard keeps one: a counter is
/// accepted once, and not at all when it is more than the window behind the newest.
#[derive(Default)]
pub struct ReplayWindow {
    /// One past the highest accepted counter (0: nothing accepted yet).
    next: u64,
    bits: [u64; REPLAY_WORDS],
}

const REPLAY_WORDS: usize = 32;
const REPLAY_WINDOW: u64 = (REPLAY_WORDS * 64) as u64;

impl ReplayWindow {
    pub fn may_accept(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        if self.next - counter > REPLAY_WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] & (1 << bit) == 0
    }

    /// Records `counter`; call only after `may_accept` and a successful authentication.
    /// True if it is the highest counter yet: the sender's latest packet, not a late one.
    pub fn accept(&mut self, counter: u64) -> bool {
        let newest = counter >= self.next;
        if newest {
            self.clear_range(self.next, counter);
            self.next = counter + 1;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= 1 << bit;
        newest
    }

    /// Forgets the slots that the window slides over, so they can be filled afresh.
    fn clear_range(&mut self, from: u64, to_inclusive: u64) {
        if to_inclusive - from >= REPLAY_WINDOW {
            self.bits = [0; REPLAY_WORDS];
            return;
        }
        for c in from..=to_inclusive {
            let (word, bit) = Self::slot(c);
            self.bits[word] &= !(1 << bit);
        }
    }

    fn slot(counter: u64) -> (usize, u32) {
        let idx = counter % REPLAY_WINDOW;
        ((idx / 64) as usize, (idx % 64) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window_accepts_out_of_order_once() {
        let mut w = ReplayWindow::default();
        for (c, newest) in [
            (5u64, true),
            (3, false),
            (4, false),
            (0, false),
            (2000, true),
            (100, false),
        ] {
            assert!(w.may_accept(c), "{c}");
            assert_eq!(w.accept(c), newest, "{c}");
            assert!(!w.may_accept(c), "{c} twice");
        }
        assert!(w.may_accept(1));
        assert!(w.accept(5000));
        assert!(!w.may_accept(100), "far behind the window");
        assert!(w.may_accept(4999));
        assert!(!w.accept(4999));
        assert!(!w.may_accept(4999));
    }
}
