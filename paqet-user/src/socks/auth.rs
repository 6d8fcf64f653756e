//! SOCKS username/password checks that leak nothing through timing, and a brake on
//! guessing: repeated failures from one source wait longer and longer for their answer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blake2::{Blake2s256, Digest};
use subtle::ConstantTimeEq;

use crate::config::Credentials;

/// The first failure from a source waits this long for its reply; each further one
/// doubles it, up to [`MAX_FAILURE_DELAY`].
pub const BASE_FAILURE_DELAY: Duration = Duration::from_millis(250);
pub const MAX_FAILURE_DELAY: Duration = Duration::from_secs(4);
/// A source without a failure for this long starts afresh.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Sources remembered at most (about 100 KiB); beyond, the stalest is forgotten.
pub const MAX_TRACKED_SOURCES: usize = 4096;

/// The configured credentials as fixed-size digests: a comparison always looks at 32
/// bytes per field, whatever the lengths of the candidate and of the secret.
pub struct Verifier {
    user: [u8; 32],
    pass: [u8; 32],
}

/// A field's digest; the field's name goes in first, so a user name never matches as
/// a password.
fn digest(field: &[u8], value: &[u8]) -> [u8; 32] {
    Blake2s256::new()
        .chain_update(field)
        .chain_update([0])
        .chain_update(value)
        .finalize()
        .into()
}

impl Verifier {
    pub fn new(expected: &Credentials) -> Verifier {
        Verifier {
            user: digest(b"user", expected.user.as_bytes()),
            pass: digest(b"pass", expected.pass.as_bytes()),
        }
    }

    /// Both fields are hashed and compared in full, in constant time.
    pub fn matches(&self, user: &str, pass: &str) -> bool {
        let user_ok = self.user.ct_eq(&digest(b"user", user.as_bytes()));
        let pass_ok = self.pass.ct_eq(&digest(b"pass", pass.as_bytes()));
        (user_ok & pass_ok).into()
    }
}

/// Failures per source (an IPv4 address, or an IPv6 /64: one host usually holds a
/// whole /64), with bounded memory.
#[derive(Default)]
pub struct FailureThrottle {
    sources: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// The delay before the reply to the `count`th failure in a row.
pub fn delay_for(count: u32) -> Duration {
    let doublings = count.saturating_sub(1).min(16);
    BASE_FAILURE_DELAY
        .saturating_mul(1u32 << doublings)
        .min(MAX_FAILURE_DELAY)
}

impl FailureThrottle {
    /// Records a failure from `ip` at `now`; returns how long to wait before replying.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> Duration {
        let key = source_of(ip);
        let mut sources = crate::sync::lock(&self.sources);
        if !sources.contains_key(&key) && sources.len() >= MAX_TRACKED_SOURCES {
            sources.retain(|_, f| now.saturating_duration_since(f.last) < FORGET_AFTER);
            if sources.len() >= MAX_TRACKED_SOURCES {
                let stalest = sources.iter().min_by_key(|(_, f)| f.last).map(|(k, _)| *k);
                if let Some(k) = stalest {
                    sources.remove(&k);
                }
            }
        }
        let entry = sources.entry(key).or_insert(Failures { count: 0, last: now });
        if now.saturating_duration_since(entry.last) >= FORGET_AFTER {
            entry.count = 0;
        }
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        delay_for(entry.count)
    }

    /// A success from `ip`: its failures are forgotten.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut sources = crate::sync::lock(&self.sources);
        sources.remove(&source_of(ip));
    }

    pub fn tracked(&self) -> usize {
        crate::sync::lock(&self.sources).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, pass: &str) -> Credentials {
        Credentials {
            user: user.into(),
            pass: pass.into(),
        }
    }

    #[test]
    fn credentials_compare_both_fields() {
        let v = Verifier::new(&creds("alice", "s3cret"));
        assert!(v.matches("alice", "s3cret"));
        assert!(!v.matches("alice", "s3cret!"));
        assert!(!v.matches("alice", "s3cre"));
        assert!(!v.matches("bob", "s3cret"));
        assert!(!v.matches("", ""));
        assert!(!v.matches("s3cret", "alice"));
        // Moving a byte between the fields changes nothing.
        assert!(!Verifier::new(&creds("ab", "c")).matches("a", "bc"));
    }

    #[test]
    fn the_compare_is_over_fixed_size_digests_whatever_the_lengths() {
        // subtle's ct_eq returns early on slices of different lengths, which would tell
        // a prober the secret's length; digests are always 32 bytes on both sides.
        let secret = "x".repeat(255);
        let v = Verifier::new(&creds("u", &secret));
        for len in [0usize, 1, 31, 32, 33, 254, 255, 256, 4096] {
            let candidate = "x".repeat(len);
            let d = digest(b"pass", candidate.as_bytes());
            assert_eq!(d.len(), v.pass.len());
            assert_eq!(v.matches("u", &candidate), len == 255);
        }
    }

    #[test]
    fn repeated_failures_from_one_source_wait_longer_up_to_a_cap() {
        let t = FailureThrottle::default();
        let ip: IpAddr = "198.18.0.1".parse().unwrap();
        let now = Instant::now();
        let delays: Vec<Duration> = (0..8).map(|_| t.failed(ip, now)).collect();
        assert_eq!(delays[0], BASE_FAILURE_DELAY);
        assert_eq!(delays[1], BASE_FAILURE_DELAY * 2);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*delays.last().unwrap(), MAX_FAILURE_DELAY);
        assert!(MAX_FAILURE_DELAY < super::super::gate::HANDSHAKE_TIMEOUT);
        // Another source is not slowed by this one's failures.
        assert_eq!(t.failed("198.18.0.9".parse().unwrap(), now), BASE_FAILURE_DELAY);
        // The same IPv4 written as IPv4-mapped IPv6 is the same source.
        assert_eq!(t.failed("::ffff:198.18.0.1".parse().unwrap(), now), MAX_FAILURE_DELAY);
        // One IPv6 /64 is one source.
        t.failed("2001:db8::1".parse().unwrap(), now);
        assert_eq!(t.failed("2001:db8::2:3".parse().unwrap(), now), BASE_FAILURE_DELAY * 2);
        // A success forgets; so does a long quiet.
        t.succeeded(ip);
        assert_eq!(t.failed(ip, now), BASE_FAILURE_DELAY);
        assert_eq!(t.failed(ip, now + FORGET_AFTER), BASE_FAILURE_DELAY);
    }

    #[test]
    fn memory_is_bounded_under_many_sources() {
        let t = FailureThrottle::default();
        let now = Instant::now();
        for i in 0..(MAX_TRACKED_SOURCES as u32 * 3) {
            let ip = IpAddr::V4((0x0a00_0000 + i).into());
            t.failed(ip, now + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(t.tracked(), MAX_TRACKED_SOURCES);
    }
}
