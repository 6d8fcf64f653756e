//! The one way paqet takes a lock.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, carrying on past poison. A relay must not go down because one stream
/// task panicked while holding a lock, and every lock in paqet guards state that a
/// panic cannot leave half-changed: counters, queues of whole packets, ring indices that
/// advance only after their work, headers rebuilt by each call.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
