//! When the receiver should poll the transport instead of sleeping on it.
//!
//! Waking an idle CPU costs tens of µs on these VMs, several times a round trip's
//! work, so a relay that has just sent or received keeps polling for a while: a reply
//! usually comes within it. A bulk flow gains nothing from that (its next datagram is
//! already on the way) and the polling would take CPU from the peer process and the
//! kernel, so polling stops while the relay moves more than [`BULK_BYTES_PER_WINDOW`].
//!
//! Each path judges its own traffic ([`PathPolls`]): with xdp and udp side by side, a
//! flow on one must not keep the other's receiver spinning on an empty socket.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::engine::PathId;
use crate::sync::lock;

/// How long after the last datagram in or out the receiver keeps polling.
pub const POLL_FOR: Duration = Duration::from_micros(200);
/// The span over which the relay's rate is judged.
const WINDOW: Duration = Duration::from_millis(1);
/// 32 KiB per ms, ~32 MB/s: above an interactive flow, far below a download.
const BULK_BYTES_PER_WINDOW: u64 = 32 * 1024;

#[derive(Debug)]
pub struct BusyPoll {
    last_active: Option<Instant>,
    window_start: Instant,
    window_bytes: u64,
    bulk: bool,
}

impl BusyPoll {
    pub fn new(now: Instant) -> BusyPoll {
        BusyPoll {
            last_active: None,
            window_start: now,
            window_bytes: 0,
            bulk: false,
        }
    }

    /// Datagrams carrying `bytes` went out or came in.
    pub fn record(&mut self, now: Instant, bytes: usize) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= WINDOW {
            // A window that ended long ago says nothing about the last one.
            self.bulk = elapsed < 2 * WINDOW && self.window_bytes >= BULK_BYTES_PER_WINDOW;
            self.window_start = now;
            self.window_bytes = 0;
        }
        self.window_bytes += bytes as u64;
        self.last_active = Some(now);
    }

    pub fn should_poll(&self, now: Instant) -> bool {
        !self.bulk
            && self
                .last_active
                .is_some_and(|t| now.saturating_duration_since(t) < POLL_FOR)
    }
}

/// One [`BusyPoll`] per path, indexed by [`PathId`].
#[derive(Debug)]
pub struct PathPolls(Vec<Mutex<BusyPoll>>);

impl PathPolls {
    pub fn new(paths: usize, now: Instant) -> PathPolls {
        PathPolls((0..paths).map(|_| Mutex::new(BusyPoll::new(now))).collect())
    }

    /// Datagrams carrying `bytes` went out or came in on `path`.
    pub fn record(&self, path: PathId, now: Instant, bytes: usize) {
        if let Some(p) = self.0.get(usize::from(path.0)) {
            lock(p).record(now, bytes);
        }
    }

    /// Whether `path`'s receiver should poll rather than sleep.
    pub fn should_poll(&self, path: PathId, now: Instant) -> bool {
        self.0
            .get(usize::from(path.0))
            .is_some_and(|p| lock(p).should_poll(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn polls_only_shortly_after_activity() {
        let t0 = Instant::now();
        let mut p = BusyPoll::new(t0);
        assert!(!p.should_poll(t0), "an idle relay must sleep");
        p.record(t0, 100);
        assert!(p.should_poll(t0 + POLL_FOR / 2));
        assert!(!p.should_poll(t0 + POLL_FOR));
    }

    #[test]
    fn a_bulk_flow_stops_polling_and_a_quiet_one_resumes_it() {
        let t0 = Instant::now();
        let mut p = BusyPoll::new(t0);
        p.record(t0, BULK_BYTES_PER_WINDOW as usize);
        p.record(t0 + MS, 1400);
        assert!(!p.should_poll(t0 + MS), "a window over the bulk rate stops polling");
        // The window after carried little: polling resumes.
        p.record(t0 + 2 * MS, 64);
        assert!(p.should_poll(t0 + 2 * MS));
    }

    #[test]
    fn a_bulk_window_long_past_does_not_count() {
        let t0 = Instant::now();
        let mut p = BusyPoll::new(t0);
        p.record(t0, 10 * BULK_BYTES_PER_WINDOW as usize);
        let later = t0 + 50 * MS;
        p.record(later, 64);
        assert!(p.should_poll(later));
    }

    #[test]
    fn a_path_polls_after_its_own_traffic_only() {
        let t0 = Instant::now();
        let paths = PathPolls::new(2, t0);
        paths.record(PathId(0), t0, 100);
        assert!(paths.should_poll(PathId(0), t0));
        assert!(!paths.should_poll(PathId(1), t0), "the idle path's receiver must sleep");
        // A bulk flow on one path does not stop the other's polling either.
        paths.record(PathId(1), t0, 64);
        paths.record(PathId(0), t0, BULK_BYTES_PER_WINDOW as usize);
        paths.record(PathId(0), t0 + MS, 1400);
        paths.record(PathId(1), t0 + MS, 64);
        assert!(!paths.should_poll(PathId(0), t0 + MS));
        assert!(paths.should_poll(PathId(1), t0 + MS));
        assert!(!paths.should_poll(PathId(2), t0), "no such path");
    }
}
