//! ikcp's simple congestion window: slow start, then additive increase; halves on fast
//! retransmit and collapses to one segment on timeout. Unused when `nc` is set.

const THRESH_INIT: u16 = 2;
const THRESH_MIN: u16 = 2;

#[derive(Debug, Clone)]
pub struct Congestion {
    pub cwnd: u16,
    ssthresh: u16,
    /// Bytes the window may cover; grows by a fraction of an MSS per ack in avoidance.
    incr: usize,
}

impl Default for Congestion {
    fn default() -> Self {
        Congestion {
            cwnd: 0,
            ssthresh: THRESH_INIT,
            incr: 0,
        }
    }
}

/// What one flush saw, for the window to react to.
#[derive(Debug, Default, Clone, Copy)]
pub struct FlushLoss {
    pub fast_retransmits: u32,
    pub timed_out: bool,
}

impl Congestion {
    /// The peer acknowledged new data.
    pub fn on_progress(&mut self, rmt_wnd: u16, mss: usize) {
        if self.cwnd >= rmt_wnd {
            return;
        }
        let mss = mss.max(1);
        if self.cwnd < self.ssthresh {
            self.cwnd += 1;
            self.incr += mss;
        } else {
            self.incr = self.incr.max(mss);
            self.incr += mss * mss / self.incr + mss / 16;
            if (self.cwnd as usize + 1) * mss <= self.incr {
                self.cwnd = self.incr.div_ceil(mss).min(u16::MAX as usize) as u16;
            }
        }
        if self.cwnd > rmt_wnd {
            self.cwnd = rmt_wnd;
            self.incr = rmt_wnd as usize * mss;
        }
    }

    /// `in_flight` is snd_nxt - snd_una, `used_wnd` the window the flush sent within.
    pub fn on_flush(&mut self, loss: FlushLoss, in_flight: u32, used_wnd: u16, resend: u32, mss: usize) {
        if loss.fast_retransmits > 0 {
            self.ssthresh = ((in_flight / 2).min(u16::MAX as u32) as u16).max(THRESH_MIN);
            self.cwnd = self.ssthresh.saturating_add(resend.min(u16::MAX as u32) as u16);
            self.incr = self.cwnd as usize * mss;
        }
        if loss.timed_out {
            self.ssthresh = (used_wnd / 2).max(THRESH_MIN);
            self.cwnd = 1;
            self.incr = mss;
        }
        if self.cwnd < 1 {
            self.cwnd = 1;
            self.incr = mss;
        }
    }
}
