//! Admission of SOCKS connections, so that strangers who connect and send nothing
//! (slowloris) cannot starve real clients or the process's file descriptors:
//!
//! - a connection must finish greeting, authentication and request within
//!   [`HANDSHAKE_TIMEOUT`], or it is closed;
//! - at most `handshake_cap` connections may be in that handshake at once (a quarter of
//!   the descriptors below the watermark, between [`MIN_UNAUTHENTICATED`] and
//!   [`MAX_UNAUTHENTICATED`]); one more arriving closes the *oldest* of them (counted as
//!   evicted). The cap follows the descriptors because a burst of real clients (a
//!   browser, a download manager, the bench's 1,000 streams) also waits in its handshake
//!   on a busy machine: 256 slots evicted real clients that had sent their greeting but
//!   not yet been read, while 4,096 idle sockets cost little where descriptors are
//!   plentiful. Refusing the newcomer instead would let an attacker who holds the
//!   slots, and reopens each one as its deadline expires (a tenth of the cap a second),
//!   lock real clients out for as long as he likes; evicting the oldest means he must
//!   open `handshake_cap` connections within one real client's handshake (a few round
//!   trips) to refuse it anything;
//! - above [`FD_WATERMARK_PERCENT`] of the soft open-file limit, new connections are
//!   closed at once (counted as shed), so the accept loop never meets EMFILE and the
//!   streams already relaying keep their descriptors.
//!
//! None of this logs per connection: one WARN summary at most every [`WARN_EVERY`],
//! and handshake timeouts alone only once [`TIMEOUTS_WORTH_A_WARNING`] have gathered
//! (one idle connection, a port probe or a browser's preconnect, is no pressure).

use crate::sync::lock;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Greeting, authentication and request must all arrive within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections ever allowed in their handshake at once.
pub const MAX_UNAUTHENTICATED: usize = 4096;
/// The fewest, however tight the open-file limit.
pub const MIN_UNAUTHENTICATED: usize = 16;
/// New connections are shed while the open descriptors are above this share of the
/// soft RLIMIT_NOFILE.
pub const FD_WATERMARK_PERCENT: u64 = 90;
/// The least time between two WARN summaries.
pub const WARN_EVERY: Duration = Duration::from_secs(10);
/// Handshake timeouts since the last summary that make one by themselves.
pub const TIMEOUTS_WORTH_A_WARNING: u64 = 32;

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
        Limits::for_limit(
            crate::ops::limits::open_files_soft_limit().unwrap_or(1024),
            crate::ops::limits::open_descriptors().unwrap_or(64),
        )
    }

    /// The defaults for a soft open-file limit and the descriptors already open.
    pub fn for_limit(fd_limit: u64, fd_baseline: u64) -> Limits {
        Limits {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_unauthenticated: handshake_cap(max_live(fd_limit, fd_baseline)),
            fd_limit,
            fd_baseline,
        }
    }

    /// Live SOCKS connections allowed before new ones are shed.
    fn max_live(&self) -> u64 {
        max_live(self.fd_limit, self.fd_baseline)
    }
}

fn max_live(fd_limit: u64, fd_baseline: u64) -> u64 {
    (fd_limit.saturating_mul(FD_WATERMARK_PERCENT) / 100).saturating_sub(fd_baseline)
}

/// Handshake slots for `max_live` SOCKS connections: a quarter of them, so that
/// strangers in their handshake can never hold the descriptors of the clients already
/// relaying, within [`MIN_UNAUTHENTICATED`]..=[`MAX_UNAUTHENTICATED`].
fn handshake_cap(max_live: u64) -> usize {
    usize::try_from(max_live / 4)
        .unwrap_or(usize::MAX)
        .clamp(MIN_UNAUTHENTICATED, MAX_UNAUTHENTICATED)
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

    /// A summary once enough handshakes have timed out since the last one.
    fn maybe_warn_of_timeouts(&self) {
        let since = self.timed_out.load(Ordering::Relaxed) - lock(&self.warned).timed_out;
        if since >= TIMEOUTS_WORTH_A_WARNING {
            self.maybe_warn();
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
        // Held here, not inside a `timeout()`, so that the socket it owns is closed only
        // after the summary is logged: whoever sees the close can already read the log.
        let mut work = std::pin::pin!(work);
        let evict = self.evict.take();
        let evicted = async move {
            // Only a send (not a dropped sender) means eviction.
            if let Some(evict) = evict
                && evict.await.is_ok()
            {
                return;
            }
            std::future::pending().await
        };
        let outcome = tokio::select! {
            // A handshake that finished as its deadline or eviction came counts as
            // finished: the work is polled first.
            biased;
            r = &mut work => r.map_err(HandshakeError::Failed),
            () = evicted => Err(HandshakeError::Evicted),
            () = tokio::time::sleep(timeout) => {
                self.gate.timed_out.fetch_add(1, Ordering::Relaxed);
                self.gate.maybe_warn_of_timeouts();
                Err(HandshakeError::TimedOut(timeout))
            }
        };
        self.leave_pending();
        outcome
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
    fn the_handshake_cap_follows_the_descriptors() {
        // systemd's default soft limit: about 225 slots, as tight as before.
        let tight = Limits::for_limit(1024, 20);
        assert_eq!(tight.max_unauthenticated, (921 - 20) / 4);
        // The unit's LimitNOFILE=65536: a burst of 1,000 clients fits with room to spare.
        assert_eq!(Limits::for_limit(65536, 20).max_unauthenticated, MAX_UNAUTHENTICATED);
        // Bounded both ways, whatever the limit.
        assert_eq!(Limits::for_limit(u64::MAX, 20).max_unauthenticated, MAX_UNAUTHENTICATED);
        assert_eq!(Limits::for_limit(40, 30).max_unauthenticated, MIN_UNAUTHENTICATED);
    }

    #[test]
    fn a_burst_of_a_thousand_clients_evicts_none_where_descriptors_are_plentiful() {
        let gate = Gate::new(Limits::for_limit(65536, 20));
        let burst: Vec<Conn> = (0..1000).map(|_| gate.admit().expect("admitted")).collect();
        let s = gate.stats();
        assert_eq!((s.unauthenticated, s.evicted, s.shed), (1000, 0, 0));
        drop(burst);
    }

    #[tokio::test]
    async fn timed_out_handshakes_are_summarised_once_enough_have_gathered() {
        let n = TIMEOUTS_WORTH_A_WARNING as usize;
        let gate = Gate::new(limits(2 * n));
        let idle = || std::future::pending::<Result<(), ()>>();
        let time_out =
            |mut conn: Conn| async move { matches!(conn.handshake(idle()).await, Err(HandshakeError::TimedOut(_))) };
        // One idle connection (a probe) is no pressure: nothing is said.
        assert!(time_out(gate.admit().unwrap()).await);
        assert!(lock(&gate.warned).at.is_none(), "one timeout made a WARN");
        // The rest time out together: one summary, counting them all.
        let mut rest = tokio::task::JoinSet::new();
        for _ in 1..n {
            rest.spawn(time_out(gate.admit().unwrap()));
        }
        while let Some(timed_out) = rest.join_next().await {
            assert!(timed_out.unwrap(), "a handshake ended otherwise");
        }
        let warned = lock(&gate.warned);
        assert_eq!((warned.timed_out, warned.evicted), (TIMEOUTS_WORTH_A_WARNING, 0));
        assert!(warned.at.is_some());
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
