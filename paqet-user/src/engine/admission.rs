//! What a server spends on handshakes, kept small: a datagram whose length no handshake
//! has gets no Noise work at all, and each source address gets a bounded rate of
//! authentic handshakes (a token bucket, charged before the Diffie-Hellman of the
//! answer). Sans-IO like the rest: time comes in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use super::crypto::TAG_LEN;
use super::frame::{INIT_PAYLOAD_LEN, RESPONSE_PAYLOAD_LEN};

/// Random bytes after a handshake payload (both directions), so sizes vary.
pub const MAX_PADDING: usize = 16;
/// The ephemeral public key that opens every NNpsk0 message.
const EPHEMERAL_LEN: usize = 32;

/// Lengths a client's first handshake message can have.
pub const INIT_MESSAGE_LEN: RangeInclusive<usize> =
    EPHEMERAL_LEN + INIT_PAYLOAD_LEN + TAG_LEN..=EPHEMERAL_LEN + INIT_PAYLOAD_LEN + MAX_PADDING + TAG_LEN;
/// Lengths a server's handshake answer can have.
pub const RESPONSE_MESSAGE_LEN: RangeInclusive<usize> =
    EPHEMERAL_LEN + RESPONSE_PAYLOAD_LEN + TAG_LEN..=EPHEMERAL_LEN + RESPONSE_PAYLOAD_LEN + MAX_PADDING + TAG_LEN;

/// Handshakes a source may send in a burst; a client sends one a second while it
/// waits, more only across restarts.
const BURST: f64 = 8.0;
const PER_SECOND: f64 = 4.0;
/// Sources remembered at once. Past it the table starts afresh: a flood from many
/// sources costs a lookup each (and a clear per this many), never unbounded memory or
/// a scan per packet.
const MAX_SOURCES: usize = 4096;
/// A source quiet this long has a full bucket again and is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(10);

struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Default)]
pub struct HandshakeLimiter {
    buckets: HashMap<IpAddr, Bucket>,
}

impl HandshakeLimiter {
    /// Whether `source` may have one more handshake tried now.
    pub fn admit(&mut self, source: IpAddr, now: Instant) -> bool {
        if !self.buckets.contains_key(&source) && self.buckets.len() >= MAX_SOURCES {
            self.buckets.clear();
        }
        let bucket = self.buckets.entry(source).or_insert(Bucket {
            tokens: BURST,
            last: now,
        });
        let refill = now.saturating_duration_since(bucket.last).as_secs_f64() * PER_SECOND;
        bucket.tokens = (bucket.tokens + refill).min(BURST);
        bucket.last = now;
        if bucket.tokens < 1.0 {
            return false;
        }
        bucket.tokens -= 1.0;
        true
    }

    pub fn forget_quiet(&mut self, now: Instant) {
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < FORGET_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_a_burst_then_its_rate_and_others_are_not_affected() {
        let mut limiter = HandshakeLimiter::default();
        let t0 = Instant::now();
        let flood: IpAddr = "198.18.0.66".parse().unwrap();
        let admitted = (0..100).filter(|_| limiter.admit(flood, t0)).count();
        assert_eq!(admitted, BURST as usize);
        assert!(
            limiter.admit("198.18.0.1".parse().unwrap(), t0),
            "another source was starved"
        );
        let later = t0 + Duration::from_secs(1);
        let admitted = (0..100).filter(|_| limiter.admit(flood, later)).count();
        assert_eq!(admitted, PER_SECOND as usize);
    }

    #[test]
    fn memory_stays_bounded_under_forged_sources() {
        let mut limiter = HandshakeLimiter::default();
        let t0 = Instant::now();
        for i in 0..(3 * MAX_SOURCES as u32) {
            let ip = IpAddr::from((0xc612_0000u32 + i).to_be_bytes());
            limiter.admit(ip, t0 + Duration::from_micros(i as u64));
        }
        assert!(limiter.buckets.len() <= MAX_SOURCES);
    }

    #[test]
    fn message_lengths_match_what_the_handshake_sends() {
        let psk = super::super::crypto::Psk([9; 32]);
        for padding in [0, MAX_PADDING] {
            let payload = vec![0u8; INIT_PAYLOAD_LEN + padding];
            let (_, msg) = super::super::crypto::Initiator::start(&psk, &payload).unwrap();
            assert!(INIT_MESSAGE_LEN.contains(&msg.len()), "{} bytes", msg.len());
            let responder = super::super::crypto::Responder::read(&psk, &msg).unwrap();
            let (_, answer) = responder.respond(&vec![0u8; RESPONSE_PAYLOAD_LEN + padding]).unwrap();
            assert!(RESPONSE_MESSAGE_LEN.contains(&answer.len()), "{} bytes", answer.len());
        }
    }
}
