//! WireGuard's answer to handshake floods, for NNpsk0: a server under load does no
//! Diffie-Hellman for a handshake until its sender proves it receives at the address it
//! claims.
//!
//! WireGuard's `mac1` (a cheap check that the sender holds the key) is NNpsk0's first
//! message itself: it is sealed under the PSK, so reading it costs a hash and an AEAD
//! open. What WireGuard adds, and this module holds, is the second half:
//! - every first message ends with a `mac2` field: a MAC of the message under a cookie
//!   the server gave the client lately, or random bytes when it has none (so no byte of
//!   the message is constant);
//! - a server under load answers a handshake whose `mac2` is not valid with a *cookie
//!   reply* instead of its Noise answer: a MAC of the sender's address under a secret
//!   that changes every two minutes, sealed under a key from the PSK and bound to the
//!   message it answers. Only a key holder at that address can read it and use it.

use std::net::SocketAddr;
use std::ops::RangeInclusive;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

use super::mac::keyed_blake2s;
use super::{CryptoError, Psk, TAG_LEN};

pub const COOKIE_LEN: usize = 16;
/// The `mac2` field at the end of every first handshake message.
pub const MAC2_LEN: usize = 16;
/// A cookie reply: nonce, sealed cookie, tag, then up to `max_padding` random bytes.
pub fn reply_len(max_padding: usize) -> RangeInclusive<usize> {
    let bare = NONCE_LEN + COOKIE_LEN + TAG_LEN;
    bare..=bare + max_padding
}

pub type Cookie = [u8; COOKIE_LEN];

fn address_bytes(addr: SocketAddr) -> Vec<u8> {
    let mut bytes = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    bytes.extend_from_slice(&addr.port().to_be_bytes());
    bytes
}

/// The cookie a server hands `addr` under `secret`.
pub fn cookie_for(secret: &[u8; 32], addr: SocketAddr) -> Cookie {
    keyed_blake2s(secret, &[b"paqet cookie", &address_bytes(addr)])
}

/// The `mac2` of a first handshake message (the Noise message, without the field).
pub fn mac2(cookie: &Cookie, noise_message: &[u8]) -> [u8; MAC2_LEN] {
    keyed_blake2s(cookie, &[noise_message])
}

/// Splits a first handshake message into the Noise message and its `mac2` field.
pub fn split_mac2(message: &[u8]) -> Option<(&[u8], &[u8; MAC2_LEN])> {
    let at = message.len().checked_sub(MAC2_LEN)?;
    let (noise, mac) = message.split_at(at);
    Some((noise, mac.try_into().ok()?))
}

/// What a cookie reply is bound to: the answered message's last 16 bytes (its AEAD
/// tag), so a reply opens only for the handshake it answers.
pub fn binding(noise_message: &[u8]) -> Option<[u8; TAG_LEN]> {
    let at = noise_message.len().checked_sub(TAG_LEN)?;
    noise_message[at..].try_into().ok()
}

/// Seals and opens cookie replies under a key from the PSK.
pub struct CookieSealer(LessSafeKey);

impl CookieSealer {
    pub fn new(psk: &Psk) -> CookieSealer {
        let key = Zeroizing::new(super::epoch_keys::derive(&psk.0, b"paqet cookie reply", 0));
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key[..]).expect("ChaCha20-Poly1305 takes a 32-byte key");
        CookieSealer(LessSafeKey::new(unbound))
    }

    /// A cookie reply for the message bound by `binding`. The nonce is random: the
    /// key lives as long as the PSK, and 96 random bits do not repeat at any rate a
    /// server answers handshakes.
    pub fn seal(&self, cookie: &Cookie, binding: &[u8; TAG_LEN], nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let mut reply = Vec::with_capacity(NONCE_LEN + COOKIE_LEN + TAG_LEN);
        reply.extend_from_slice(&nonce);
        let mut sealed = cookie.to_vec();
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(binding), &mut sealed)
            .expect("a 16-byte cookie always seals");
        reply.extend_from_slice(&sealed);
        reply
    }

    /// The cookie in `reply` (padding after it is ignored), if it answers the message
    /// bound by `binding`.
    pub fn open(&self, reply: &[u8], binding: &[u8; TAG_LEN]) -> Result<Cookie, CryptoError> {
        let nonce: [u8; NONCE_LEN] = reply
            .get(..NONCE_LEN)
            .and_then(|n| n.try_into().ok())
            .ok_or(CryptoError::TooShort)?;
        let mut sealed = reply
            .get(NONCE_LEN..NONCE_LEN + COOKIE_LEN + TAG_LEN)
            .ok_or(CryptoError::TooShort)?
            .to_vec();
        let plain = self
            .0
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(binding), &mut sealed)
            .map_err(|_| CryptoError::Unauthentic)?;
        plain.try_into().map_err(|_| CryptoError::Unauthentic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_reply_opens_only_for_its_message_and_key() {
        let sealer = CookieSealer::new(&Psk([1; 32]));
        let cookie = cookie_for(&[7; 32], addr("198.18.0.1:4000"));
        let bound = [3u8; TAG_LEN];
        let reply = sealer.seal(&cookie, &bound, [9; NONCE_LEN]);
        assert!(reply_len(0).contains(&reply.len()));
        assert_eq!(sealer.open(&reply, &bound).unwrap(), cookie);
        let mut padded = reply.clone();
        padded.extend_from_slice(&[0xee; 16]);
        assert_eq!(sealer.open(&padded, &bound).unwrap(), cookie);
        assert!(
            sealer.open(&reply, &[4u8; TAG_LEN]).is_err(),
            "another message's binding"
        );
        assert!(
            CookieSealer::new(&Psk([2; 32])).open(&reply, &bound).is_err(),
            "another key"
        );
        for len in 0..reply.len() {
            assert!(sealer.open(&reply[..len], &bound).is_err(), "{len}-byte prefix opened");
        }
        let mut flipped = reply.clone();
        flipped[NONCE_LEN + 3] ^= 1;
        assert!(sealer.open(&flipped, &bound).is_err());
    }

    #[test]
    fn a_cookie_names_one_address_and_one_secret() {
        let secret = [5; 32];
        let a = cookie_for(&secret, addr("198.18.0.1:4000"));
        assert_ne!(a, cookie_for(&secret, addr("198.18.0.1:4001")));
        assert_ne!(a, cookie_for(&secret, addr("198.18.0.9:4000")));
        assert_ne!(a, cookie_for(&[6; 32], addr("198.18.0.1:4000")));
        assert_ne!(
            cookie_for(&secret, addr("[2001:2::1]:4000")),
            cookie_for(&secret, addr("[2001:2::2]:4000"))
        );
    }

    #[test]
    fn mac2_splits_off_the_end_and_covers_the_message() {
        let cookie = [8u8; COOKIE_LEN];
        let mut message = b"noise message of some length".to_vec();
        let mac = mac2(&cookie, &message);
        message.extend_from_slice(&mac);
        let (noise, field) = split_mac2(&message).unwrap();
        assert_eq!(noise, b"noise message of some length");
        assert_eq!(field, &mac);
        assert_ne!(mac2(&cookie, b"noise message of some lengtH"), mac);
        assert!(split_mac2(&[0; MAC2_LEN - 1]).is_none());
    }
}
