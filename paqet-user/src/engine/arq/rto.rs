//! Retransmission timeout from smoothed RTT samples, the way ikcp computes it (RFC 6298 shape).

/// Before any sample: ikcp's default.
const RTO_INITIAL: u32 = 200;
const RTO_MAX: u32 = 60_000;
/// Minimum RTO with nodelay (ikcp's IKCP_RTO_NDL) and without (IKCP_RTO_MIN).
pub const RTO_MIN_NODELAY: u32 = 30;
pub const RTO_MIN_NORMAL: u32 = 100;

#[derive(Debug, Clone)]
pub struct RttEstimator {
    srtt: u32,
    rttval: u32,
    rto: u32,
    pub min_rto: u32,
}

impl Default for RttEstimator {
    fn default() -> Self {
        RttEstimator {
            srtt: 0,
            rttval: 0,
            rto: RTO_INITIAL,
            min_rto: RTO_MIN_NORMAL,
        }
    }
}

impl RttEstimator {
    pub fn rto(&self) -> u32 {
        self.rto
    }

    /// `interval` floors the variance term: a peer acks at most once per flush interval.
    pub fn sample(&mut self, rtt: u32, interval: u32) {
        // The timestamp is the peer's echo: a hostile or broken one can claim any RTT, and
        // one beyond the largest RTO says nothing more (and would overflow the averages).
        let rtt = rtt.min(RTO_MAX);
        if self.srtt == 0 {
            self.srtt = rtt;
            self.rttval = rtt / 2;
        } else {
            let delta = rtt.abs_diff(self.srtt);
            self.rttval = (3 * self.rttval + delta) / 4;
            self.srtt = ((7 * self.srtt + rtt) / 8).max(1);
        }
        let rto = self.srtt.saturating_add(interval.max(self.rttval.saturating_mul(4)));
        self.rto = rto.clamp(self.min_rto, RTO_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sample_sets_srtt_and_rto() {
        let mut e = RttEstimator::default();
        e.sample(100, 10);
        // srtt 100 + max(10, 4 * 50)
        assert_eq!(e.rto(), 300);
    }

    #[test]
    fn rto_is_clamped() {
        let mut e = RttEstimator {
            min_rto: RTO_MIN_NODELAY,
            ..RttEstimator::default()
        };
        e.sample(0, 10);
        assert_eq!(e.rto(), RTO_MIN_NODELAY);
        e.sample(u32::MAX / 16, 10);
        assert_eq!(e.rto(), RTO_MAX);
    }

    #[test]
    fn absurd_samples_saturate_instead_of_overflowing() {
        let mut e = RttEstimator::default();
        for rtt in [i32::MAX as u32, u32::MAX, 5, i32::MAX as u32] {
            e.sample(rtt, 10);
            assert!((RTO_MIN_NORMAL..=RTO_MAX).contains(&e.rto()), "{}", e.rto());
        }
    }
}
