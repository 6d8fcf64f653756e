//! The server's own addresses, for the target policy's default deny: every address on
//! every interface, re-read from the kernel (getifaddrs) when the list is older than
//! [`MAX_AGE`], so an address added while paqet runs is closed within that time.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::transport::local;

/// How stale the list may be. Reading it is one netlink dump, cheap next to a TCP
/// connect, but a burst of dials shares one read.
pub const MAX_AGE: Duration = Duration::from_secs(1);

struct Cache {
    read_at: Instant,
    addrs: Arc<Vec<IpAddr>>,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

/// The host's addresses, at most [`MAX_AGE`] old. `None` when they have never been
/// readable: the caller must then refuse, since it cannot tell the host from a target.
/// When a re-read fails, the last list stands (and the failure is logged).
pub fn addresses() -> Option<Arc<Vec<IpAddr>>> {
    let mut cache = crate::sync::lock(&CACHE);
    if let Some(c) = cache.as_ref()
        && c.read_at.elapsed() < MAX_AGE
    {
        return Some(c.addrs.clone());
    }
    match local::addresses() {
        Ok(list) => {
            let mut addrs: Vec<IpAddr> = list.into_iter().map(|(_, ip)| ip).collect();
            addrs.sort();
            addrs.dedup();
            let addrs = Arc::new(addrs);
            *cache = Some(Cache {
                read_at: Instant::now(),
                addrs: addrs.clone(),
            });
            Some(addrs)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read this host's addresses for the target policy");
            cache.as_mut().map(|c| {
                // Try again at the next dial after MAX_AGE, not at every one.
                c.read_at = Instant::now();
                c.addrs.clone()
            })
        }
    }
}
