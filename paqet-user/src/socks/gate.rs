//! Admission of SOCKS connections, so that strangers who connect and send nothing
//! (slowloris) cannot starve real clients or the process's file descriptors:
//!
//! - a connection must finish greeting, authentication and request within
//!   [`HANDSHAKE_TIMEOUT`], or it is closed;
//! - at most [`MAX_UNAUTHENTICATED`] connections may be in that handshake at once; one
//!   more arriving closes the *oldest* of them (counted as evicted). Refusing the newcomer
//!   instead would let an attacker who holds the slots, and reopens each one as its
//!   deadline expires (26 connections a second), lock real clients out for as long as
//!   he likes; evicting the oldest means he must open `MAX_UNAUTHENTICATED` connections
//!   within one real client's handshake (a few round trips) to refuse it anything;
//! - above [`FD_WATERMARK_PERCENT`] of the soft open-file limit, new connections are
//!   closed at once (counted as shed), so the accept loop never meets EMFILE and the
//!   streams already relaying keep their descriptors.
//!
//! None of this logs per connection: one WARN summary at most every [`WARN_EVERY`].

use crate::sync::lock;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Greeting, authentication and request must all arrive within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections allowed in their handshake at once (the oldest is closed beyond it).
pub const MAX_UNAUTHENTICATED: usize = 256;
/// New connections are shed while the open descriptors are above this share of the
/// soft RLIMIT_NOFILE.
pub const FD_WATERMARK_PERCENT: u64 = 90;
/// The least time between two WARN summaries.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub max_unauthenticated: usize,
    /// The soft RLIMIT_NOFILE when serving began.
    pub fd_limit: u64,
    /// Descriptors open when serving began (everything that is not a SOCKS connection:
    /// the client opens no descriptor per stream, so these plus the live SOCKS
    /// connections are all the process holds).
    pub fd_baseline: u64,
}

impl Limits {
    /// The defaults above, with this process's open-file limit and descriptors.
    pub fn for_this_process() -> Limits {
        Limits {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_unauthenticated: MAX_UNAUTHENTICATED,
            fd_limit: crate::ops::limits::open_files_soft_limit().unwrap_or(1024),
            fd_baseline: crate::ops::limits::open_descriptors().unwrap_or(64),
        }
    }

    /// Live SOCKS connections allowed before new ones are shed.
    fn max_live(&self) -> u64 {
        (self.fd_limit * FD_WATERMARK_PERCENT / 100).saturating_sub(self.fd_baseline)
    }
}

/// Counters since the process started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GateStats {
    /// SOCKS connections open now (handshaking or relaying).
    pub live: u64,
    /// Connections in their handshake now.
    pub unauthenticated: u64,
    /// Oldest handshakes closed to make room (beyond `max_unauthenticated`).
    pub evicted: u64,
    /// New connections closed at once above the descriptor watermark.
    pub shed: u64,
    /// Handshakes closed at their deadline.
    pub timed_out: u64,
    /// accept() failures (EMFILE and friends).
    pub accept_errors: u64,
}

pub struct Gate {
    limits: Limits,
    /// Handshaking connections, oldest first; sending on the channel evicts one.
    pending: Mutex<Pending>,
    live: AtomicU64,
    evicted: AtomicU64,
    shed: AtomicU64,
    timed_out: AtomicU64,
    accept_errors: AtomicU64,
    warned: Mutex<Warned>,
}

#[derive(Default)]
struct Pending {
    next_id: u64,
    by_age: BTreeMap<u64, oneshot::Sender<()>>,
}

/// What the last WARN summary reported, so the next one says what happened since.
#[derive(Default)]
struct Warned {
    at: Option<Instant>,
    evicted: u64,
    shed: u64,
    timed_out: u64,
    accept_errors: u64,
}

/// Why a handshake did not finish.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError<E> {
    #[error("handshake not finished within {0:?}; closed")]
    TimedOut(Duration),
    #[error("handshake closed to make room for a newer connection")]
    Evicted,
    #[error(transparent)]
    Failed(E),
}

/// One admitted SOCKS connection; counted as live until dropped.
pub struct Conn {
    gate: Arc<Gate>,
    id: u64,
    evict: Option<oneshot::Receiver<()>>,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            pending: Mutex::new(Pending::default()),
            live: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            warned: Mutex::new(Warned::default()),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Admits a connection just accepted, or `None`: close it at once (shed).
    pub fn admit(self: &Arc<Self>) -> Option<Conn> {
        if self.live.load(Ordering::Relaxed) >= self.limits.max_live() {
            self.shed.fetch_add(1, Ordering::Relaxed);
            self.maybe_warn();
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let evicted = {
            let mut pending = lock(&self.pending);
            let mut evicted = 0;
            while pending.by_age.len() >= self.limits.max_unauthenticated.max(1) {
                match pending.by_age.pop_first() {
                    // The receiver may already be gone (its handshake just ended).
                    Some((_, oldest)) => evicted += u64::from(oldest.send(()).is_ok()),
                    None => break,
                }
            }
            let id = pending.next_id;
            pending.next_id += 1;
            pending.by_age.insert(id, tx);
            self.live.fetch_add(1, Ordering::Relaxed);
            (evicted, id)
        };
        let (evicted, id) = evicted;
        if evicted > 0 {
            self.evicted.fetch_add(evicted, Ordering::Relaxed);
            self.maybe_warn();
        }
        Some(Conn {
            gate: self.clone(),
            id,
            evict: Some(rx),
        })
    }

    /// accept() failed: counted, and summarised like the rest.
    pub fn accept_failed(&self, e: &std::io::Error) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("SOCKS accept failed: {e}");
        self.maybe_warn();
    }

    pub fn stats(&self) -> GateStats {
        GateStats {
            live: self.live.load(Ordering::Relaxed),
            unauthenticated: lock(&self.pending).by_age.len() as u64,
            evicted: self.evicted.load(Ordering::Relaxed),
            shed: self.shed.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
        }
    }

    /// One WARN with what happened since the last one, at most every WARN_EVERY.
    fn maybe_warn(&self) {
        let now = Instant::now();
        let mut warned = lock(&self.warned);
        if warned.at.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            return;
        }
        let s = self.stats_without_pending();
        tracing::warn!(
            evicted = s.evicted - warned.evicted,
            shed = s.shed - warned.shed,
            timed_out = s.timed_out - warned.timed_out,
            accept_errors = s.accept_errors - warned.accept_errors,
            live = s.live,
            max_unauthenticated = self.limits.max_unauthenticated,
            max_live = self.limits.max_live(),
            "SOCKS port under pressure (idle or slow handshakes?): connections closed since the last report"
        );
        *warned = Warned {
            at: Some(now),
            evicted: s.evicted,
            shed: s.shed,
            timed_out: s.timed_out,
            accept_errors: s.accept_errors,
        };
    }

    fn stats_without_pending(&self) -> GateStats {
        GateStats {
            live: self.live.load(Ordering::Relaxed),
            unauthenticated: 0,
            evicted: self.evicted.load(Ordering::Relaxed),
            shed: self.shed.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
        }
    }
}

impl Conn {
    /// Runs the handshake under the deadline and eviction; afterwards (whatever the
    /// outcome) this connection no longer holds a handshake slot. Dropping the future
    /// drops the socket it owns: a timed-out or evicted connection is closed.
    pub async fn handshake<R, E>(&mut self, work: impl Future<Output = Result<R, E>>) -> Result<R, HandshakeError<E>> {
        let timeout = self.gate.limits.handshake_timeout;
        let outcome = match self.evict.take() {
            Some(evict) => tokio::select! {
                r = tokio::time::timeout(timeout, work) => r,
                // Only a send (not a dropped sender) means eviction.
                Ok(()) = evict => {
                    self.leave_pending();
                    return Err(HandshakeError::Evicted);
                }
            },
            None => tokio::time::timeout(timeout, work).await,
        };
        self.leave_pending();
        match outcome {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(HandshakeError::Failed(e)),
            Err(_) => {
                self.gate.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(HandshakeError::TimedOut(timeout))
            }
        }
    }

    fn leave_pending(&mut self) {
        lock(&self.gate.pending).by_age.remove(&self.id);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.leave_pending();
        self.gate.live.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time (tokio's paused clock needs its test-util feature): short deadlines.
    const SHORT: Duration = Duration::from_millis(200);

    fn limits(max_unauthenticated: usize) -> Limits {
        Limits {
            handshake_timeout: SHORT,
            max_unauthenticated,
            fd_limit: 1 << 20,
            fd_baseline: 10,
        }
    }

    #[tokio::test]
    async fn an_idle_handshake_is_closed_at_the_deadline() {
        let gate = Gate::new(limits(4));
        let mut conn = gate.admit().unwrap();
        let started = Instant::now();
        let never = std::future::pending::<Result<(), ()>>();
        let r = conn.handshake(never).await;
        assert!(matches!(r, Err(HandshakeError::TimedOut(d)) if d == SHORT));
        let took = started.elapsed();
        assert!(took >= SHORT && took < SHORT * 10, "{took:?}");
        let s = gate.stats();
        assert_eq!((s.timed_out, s.unauthenticated, s.live), (1, 0, 1));
        drop(conn);
        assert_eq!(gate.stats().live, 0);
    }

    #[tokio::test]
    async fn a_finished_handshake_frees_its_slot_but_stays_live() {
        let gate = Gate::new(limits(1));
        let mut a = gate.admit().unwrap();
        assert_eq!(a.handshake(async { Ok::<_, ()>(7) }).await.unwrap(), 7);
        // The slot is free: a newcomer evicts nobody, and `a` (relaying) is not evicted.
        let _b = gate.admit().unwrap();
        let s = gate.stats();
        assert_eq!((s.live, s.unauthenticated, s.evicted), (2, 1, 0));
    }

    #[tokio::test]
    async fn beyond_the_cap_the_oldest_handshake_is_closed_and_counted() {
        let gate = Gate::new(Limits {
            handshake_timeout: Duration::from_secs(30),
            ..limits(3)
        });
        let mut conns: Vec<Conn> = (0..3).map(|_| gate.admit().unwrap()).collect();
        assert_eq!(gate.stats().evicted, 0);
        let mut newest = gate.admit().unwrap();
        let s = gate.stats();
        assert_eq!((s.evicted, s.unauthenticated, s.live), (1, 3, 4));
        // The oldest learns at once (no waiting for its deadline).
        let started = Instant::now();
        let r = conns[0].handshake(std::future::pending::<Result<(), ()>>()).await;
        assert!(matches!(r, Err(HandshakeError::Evicted)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // The others and the newcomer are untouched.
        for c in conns.iter_mut().skip(1).chain(std::iter::once(&mut newest)) {
            assert_eq!(c.handshake(async { Ok::<_, ()>(()) }).await.unwrap(), ());
        }
        // 1000 more arrivals never hold more than the cap.
        let extra: Vec<Conn> = (0..1000).map(|_| gate.admit().unwrap()).collect();
        let s = gate.stats();
        assert_eq!(s.unauthenticated, 3);
        assert_eq!(s.evicted, 1 + 997);
        drop(extra);
        drop(conns);
        drop(newest);
        assert_eq!(gate.stats().live, 0);
        assert_eq!(gate.stats().unauthenticated, 0);
    }

    #[test]
    fn above_the_descriptor_watermark_new_connections_are_shed() {
        // 90 % of 100 is 90; 80 descriptors are the process's own: 10 connections fit.
        let gate = Gate::new(Limits {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_unauthenticated: 1000,
            fd_limit: 100,
            fd_baseline: 80,
        });
        let held: Vec<Conn> = (0..10).map(|_| gate.admit().expect("below the watermark")).collect();
        assert!(gate.admit().is_none());
        assert!(gate.admit().is_none());
        assert_eq!(gate.stats().shed, 2);
        assert_eq!(
            gate.stats().evicted,
            0,
            "shedding closes the newcomer, not the live ones"
        );
        drop(held);
        assert!(gate.admit().is_some(), "admits again once connections close");
    }

    #[test]
    fn warnings_are_summaries_not_one_per_connection() {
        let gate = Gate::new(limits(1));
        let _held: Vec<Conn> = (0..500).map(|_| gate.admit().unwrap()).collect();
        // The first eviction reported; the 498 after it within WARN_EVERY are not.
        let warned = lock(&gate.warned);
        assert_eq!(warned.evicted, 1);
        assert!(warned.at.is_some());
    }
}
