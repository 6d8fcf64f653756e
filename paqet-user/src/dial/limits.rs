//! How many targets the server dials at once (resolve and connect, until the target
//! answers or TIMEOUT passes), overall and per client. Dials used to be unbounded: a key
//! holder could open streams to unanswering targets faster than TIMEOUT ended them and
//! take the server's file descriptors and DNS. Beyond a cap a stream is refused at
//! once (SOCKS reply 1) and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::engine::PeerId;

/// Dials in progress on the whole server.
pub const MAX_DIALS: usize = 1024;
/// Dials in progress for one client: a quarter of the whole, so a few clients cannot
/// starve the rest. The bench's 1,000 streams of one client open as fast as the
/// targets answer, far below this at any moment.
pub const MAX_DIALS_PER_CLIENT: usize = 256;

#[derive(Default)]
struct InFlight {
    total: usize,
    by_client: HashMap<PeerId, usize>,
}

pub struct DialLimits {
    max_total: usize,
    max_per_client: usize,
    in_flight: Mutex<InFlight>,
    /// Streams refused because a cap was reached.
    pub refused: AtomicU64,
}

impl Default for DialLimits {
    fn default() -> DialLimits {
        DialLimits::new(MAX_DIALS, MAX_DIALS_PER_CLIENT)
    }
}

/// A dial slot, given back when dropped.
pub struct DialPermit {
    limits: Arc<DialLimits>,
    client: PeerId,
}

impl DialLimits {
    pub fn new(max_total: usize, max_per_client: usize) -> DialLimits {
        DialLimits {
            max_total,
            max_per_client,
            in_flight: Mutex::new(InFlight::default()),
            refused: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, InFlight> {
        crate::sync::lock(&self.in_flight)
    }

    /// A slot for one dial of `client`, or `None` (counted) when a cap is reached.
    pub fn admit(self: &Arc<Self>, client: PeerId) -> Option<DialPermit> {
        let mut in_flight = self.lock();
        let mine = in_flight.by_client.get(&client).copied().unwrap_or(0);
        if in_flight.total >= self.max_total || mine >= self.max_per_client {
            drop(in_flight);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        in_flight.total += 1;
        *in_flight.by_client.entry(client).or_insert(0) += 1;
        Some(DialPermit {
            limits: self.clone(),
            client,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.lock().total
    }
}

impl Drop for DialPermit {
    fn drop(&mut self) {
        let mut in_flight = self.limits.lock();
        in_flight.total = in_flight.total.saturating_sub(1);
        if let Some(n) = in_flight.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                in_flight.by_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_client_and_overall_and_slots_come_back() {
        let limits = Arc::new(DialLimits::new(3, 2));
        let a1 = limits.admit(1).expect("first of client 1");
        let a2 = limits.admit(1).expect("second of client 1");
        assert!(limits.admit(1).is_none(), "a client's third dial passed its cap of 2");
        let b1 = limits.admit(2).expect("another client still gets a slot");
        assert!(limits.admit(3).is_none(), "the overall cap of 3 was passed");
        assert_eq!(limits.refused.load(Ordering::Relaxed), 2);
        drop(a1);
        assert!(limits.admit(1).is_some(), "a finished dial gives its slot back");
        drop((a2, b1));
        assert_eq!(limits.in_flight(), 0);
        assert!(limits.lock().by_client.is_empty(), "finished clients are forgotten");
    }
}
