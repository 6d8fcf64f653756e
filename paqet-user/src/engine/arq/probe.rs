//! Window probing: when the peer advertises a zero window we stop sending, so nothing would
//! ever tell us it opened again; ask periodically (ikcp's IKCP_ASK_SEND / IKCP_ASK_TELL).

use super::timediff;

const PROBE_INIT: u32 = 7_000;
const PROBE_LIMIT: u32 = 120_000;

#[derive(Debug, Default, Clone)]
pub struct WindowProbe {
    /// Send a window ask on the next flush.
    pub ask: bool,
    /// Send our window on the next flush.
    pub tell: bool,
    next_at: u32,
    wait: u32,
}

impl WindowProbe {
    /// Schedules an ask while the peer's window stays closed, backing off up to two minutes.
    pub fn schedule(&mut self, rmt_wnd: u16, now: u32) {
        if rmt_wnd != 0 {
            self.wait = 0;
            self.next_at = 0;
            return;
        }
        if self.wait == 0 {
            self.wait = PROBE_INIT;
            self.next_at = now.wrapping_add(self.wait);
        } else if timediff(now, self.next_at) >= 0 {
            self.wait = self.wait.max(PROBE_INIT);
            self.wait = (self.wait + self.wait / 2).min(PROBE_LIMIT);
            self.next_at = now.wrapping_add(self.wait);
            self.ask = true;
        }
    }
}
