//! What a server spends on handshakes, kept small: a datagram whose length no handshake
//! has gets no Noise work at all, each source address gets a bounded rate of authentic
//! handshakes (a token bucket, charged before the Diffie-Hellman of the answer), and a
//! server answering many handshakes asks for a cookie first ([`CookieGate`]), so that
//! a key holder spoofing sources cannot make it do Diffie-Hellman for them. Sans-IO
//! like the rest: time comes in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use zeroize::Zeroizing;

use crate::engine::HANDSHAKE_MAX_SKEW_MS;
use crate::engine::crypto::TAG_LEN;
use crate::engine::crypto::cookie::{self, Cookie, MAC2_LEN};
use crate::engine::frame::{INIT_PAYLOAD_LEN, RESPONSE_PAYLOAD_LEN};

/// Random bytes after a handshake payload (both directions), so sizes vary.
pub const MAX_PADDING: usize = 16;
/// The ephemeral public key that opens every NNpsk0 message.
const EPHEMERAL_LEN: usize = 32;

/// Lengths a client's first handshake message can have (Noise message, then `mac2`).
pub const INIT_MESSAGE_LEN: RangeInclusive<usize> = EPHEMERAL_LEN + INIT_PAYLOAD_LEN + TAG_LEN + MAC2_LEN
    ..=EPHEMERAL_LEN + INIT_PAYLOAD_LEN + MAX_PADDING + TAG_LEN + MAC2_LEN;
/// Lengths a server's handshake answer can have.
pub const RESPONSE_MESSAGE_LEN: RangeInclusive<usize> =
    EPHEMERAL_LEN + RESPONSE_PAYLOAD_LEN + TAG_LEN..=EPHEMERAL_LEN + RESPONSE_PAYLOAD_LEN + MAX_PADDING + TAG_LEN;

/// Lengths a server's cookie reply can have.
pub fn cookie_reply_len() -> RangeInclusive<usize> {
    cookie::reply_len(MAX_PADDING)
}

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

/// A cookie secret lives this long (WireGuard's two minutes); the one before it is
/// still honoured, so a cookie the client just got stays good across a change.
const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(120);
/// A client uses a cookie for this long after it got it.
pub const COOKIE_FRESH_FOR: Duration = COOKIE_SECRET_LIFETIME;

/// Server: whether handshakes must bring a cookie now, and the secrets cookies come
/// from. "Under load" means more than the configured number of handshakes answered
/// with a Diffie-Hellman in the last second.
pub struct CookieGate {
    secrets: [Zeroizing<[u8; 32]>; 2],
    secret_since: Option<Instant>,
    answered: u32,
    second_started: Option<Instant>,
}

impl Default for CookieGate {
    fn default() -> CookieGate {
        CookieGate {
            secrets: [Zeroizing::new(fresh_secret()), Zeroizing::new(fresh_secret())],
            secret_since: None,
            answered: 0,
            second_started: None,
        }
    }
}

/// Cookie secrets come from the OS, not the engine's seeded generator: they must be
/// unguessable even to someone who knows how the engine was seeded.
fn fresh_secret() -> [u8; 32] {
    let mut secret = [0u8; 32];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret).is_err() {
        tracing::error!("the OS gave no random bytes for a cookie secret");
    }
    secret
}

impl CookieGate {
    /// Whether the server answered more than `allowed_per_second` handshakes in the
    /// current second.
    pub fn under_load(&mut self, now: Instant, allowed_per_second: u32) -> bool {
        self.roll_second(now);
        self.answered >= allowed_per_second
    }

    /// A handshake was answered with a Diffie-Hellman.
    pub fn note_answered(&mut self, now: Instant) {
        self.roll_second(now);
        self.answered = self.answered.saturating_add(1);
    }

    fn roll_second(&mut self, now: Instant) {
        if self
            .second_started
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1))
        {
            self.second_started = Some(now);
            self.answered = 0;
        }
    }

    fn rotate(&mut self, now: Instant) {
        match self.secret_since {
            None => self.secret_since = Some(now),
            Some(since) if now.saturating_duration_since(since) >= COOKIE_SECRET_LIFETIME => {
                self.secrets.swap(0, 1);
                self.secrets[0] = Zeroizing::new(fresh_secret());
                self.secret_since = Some(now);
            }
            Some(_) => {}
        }
    }

    /// The cookie `from` gets now.
    pub fn cookie_for(&mut self, from: SocketAddr, now: Instant) -> Cookie {
        self.rotate(now);
        cookie::cookie_for(&self.secrets[0], from)
    }

    /// Whether `mac2` proves `from` received a cookie of ours lately.
    pub fn valid_mac2(&mut self, from: SocketAddr, noise: &[u8], mac2: &[u8; MAC2_LEN], now: Instant) -> bool {
        self.rotate(now);
        self.secrets.iter().any(|secret| {
            let expected = cookie::mac2(&cookie::cookie_for(secret, from), noise);
            bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &mac2[..]))
        })
    }
}

/// Server: how long an answered handshake is remembered, so a replay of it gets no
/// reply: until it is too old to pass the clock check anyway.
const SEEN_FOR: Duration = Duration::from_millis(2 * HANDSHAKE_MAX_SKEW_MS);

/// Server: everything that decides whether a handshake gets Noise work and an answer,
/// before any connection is touched.
pub(super) struct Admission {
    /// Handshakes already answered, by ephemeral key.
    seen: HashMap<[u8; 32], Instant>,
    /// Handshakes per source, before any Diffie-Hellman.
    limiter: HandshakeLimiter,
    /// When handshakes must bring a cookie, and the cookies' secrets.
    cookie_gate: CookieGate,
    /// `EngineConfig::handshakes_before_cookies`.
    handshakes_before_cookies: u32,
}

impl Admission {
    pub fn new(handshakes_before_cookies: u32) -> Admission {
        Admission {
            seen: HashMap::new(),
            limiter: HandshakeLimiter::default(),
            cookie_gate: CookieGate::default(),
            handshakes_before_cookies,
        }
    }

    pub fn already_seen(&self, fingerprint: &[u8; 32]) -> bool {
        self.seen.contains_key(fingerprint)
    }

    pub fn remember(&mut self, fingerprint: [u8; 32], now: Instant) {
        self.seen.insert(fingerprint, now);
    }

    /// Whether the server is under load and this handshake brings no valid cookie
    /// for its source: it gets a cookie instead of a session.
    pub fn wants_cookie(&mut self, from: SocketAddr, noise: &[u8], mac2: &[u8; MAC2_LEN], now: Instant) -> bool {
        self.cookie_gate.under_load(now, self.handshakes_before_cookies)
            && !self.cookie_gate.valid_mac2(from, noise, mac2, now)
    }

    /// Whether `source` may have one more handshake answered now.
    pub fn admit(&mut self, source: IpAddr, now: Instant) -> bool {
        self.limiter.admit(source, now)
    }

    /// A handshake was answered with a Diffie-Hellman.
    pub fn note_answered(&mut self, now: Instant) {
        self.cookie_gate.note_answered(now);
    }

    /// The cookie `from` gets now.
    pub fn cookie_for(&mut self, from: SocketAddr, now: Instant) -> Cookie {
        self.cookie_gate.cookie_for(from, now)
    }

    /// Forgets quiet sources and handshakes too old to replay.
    pub fn forget_old(&mut self, now: Instant) {
        self.limiter.forget_quiet(now);
        self.seen.retain(|_, at| now.saturating_duration_since(*at) < SEEN_FOR);
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
    fn load_is_counted_per_second() {
        let mut gate = CookieGate::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!gate.under_load(t0, 3));
            gate.note_answered(t0);
        }
        assert!(gate.under_load(t0, 3));
        assert!(gate.under_load(t0 + Duration::from_millis(999), 3));
        assert!(
            !gate.under_load(t0 + Duration::from_secs(1), 3),
            "a new second starts afresh"
        );
        assert!(gate.under_load(t0, 0), "0 asks every handshake for a cookie");
    }

    #[test]
    fn a_cookie_stays_good_for_one_secret_change_and_only_for_its_address() {
        let mut gate = CookieGate::default();
        let t0 = Instant::now();
        let client: SocketAddr = "198.18.0.1:4000".parse().unwrap();
        let spoofer: SocketAddr = "198.18.0.66:4000".parse().unwrap();
        let cookie = gate.cookie_for(client, t0);
        let mac = cookie::mac2(&cookie, b"message");
        assert!(gate.valid_mac2(client, b"message", &mac, t0));
        assert!(!gate.valid_mac2(spoofer, b"message", &mac, t0), "another address");
        assert!(!gate.valid_mac2(client, b"messagE", &mac, t0), "another message");
        let later = t0 + COOKIE_SECRET_LIFETIME;
        assert!(gate.valid_mac2(client, b"message", &mac, later), "one change later");
        let much_later = later + COOKIE_SECRET_LIFETIME;
        assert!(
            !gate.valid_mac2(client, b"message", &mac, much_later),
            "two changes later"
        );
    }

    #[test]
    fn message_lengths_match_what_the_handshake_sends() {
        let psk = crate::engine::crypto::Psk([9; 32]);
        for padding in [0, MAX_PADDING] {
            let payload = vec![0u8; INIT_PAYLOAD_LEN + padding];
            let (_, msg) = crate::engine::crypto::Initiator::start(&psk, &payload).unwrap();
            assert!(
                INIT_MESSAGE_LEN.contains(&(msg.len() + MAC2_LEN)),
                "{} bytes",
                msg.len()
            );
            let responder = crate::engine::crypto::Responder::read(&psk, &msg).unwrap();
            let (_, answer) = responder.respond(&vec![0u8; RESPONSE_PAYLOAD_LEN + padding]).unwrap();
            assert!(RESPONSE_MESSAGE_LEN.contains(&answer.len()), "{} bytes", answer.len());
            let reply = crate::engine::crypto::cookie::CookieSealer::new(&psk).seal(&[0; 16], &[0; 16], [0; 12]);
            assert!(
                cookie_reply_len().contains(&(reply.len() + padding)),
                "{} bytes",
                reply.len()
            );
        }
    }
}
