//! Session keys from a pre-shared key, and the sealing of every data packet.
//!
//! A Noise `NNpsk0` handshake ([`handshake`]) gives each direction a secret. Data
//! packets are sealed with AES-256-GCM under counter nonces (never reused: secrets are
//! fresh per session, counters only grow, and each epoch of counters has its own key,
//! [`epoch_keys`]), checked against a sliding replay window ([`replay`]), and their
//! counter is masked QUIC-style so no cleartext byte is constant or predictable.

pub mod cookie;
mod epoch_keys;
mod handshake;
pub mod mac;
mod replay;

use aes::Aes256;
use aes::cipher::{BlockEncrypt, KeyInit};
use snow::HandshakeState;

use super::frame::{DATA_HEADER_LEN, DataHeader};
use epoch_keys::{OpenKeys, SealKeys};
pub use handshake::{Initiator, Responder, handshake_fingerprint, resume_proof};
use replay::ReplayWindow;

/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Every data packet costs this much beyond its plaintext.
pub const SEAL_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;
/// The header mask is drawn from one AES block of ciphertext; the tag alone has it.
const HP_SAMPLE_LEN: usize = 16;
const _: () = assert!(HP_SAMPLE_LEN <= TAG_LEN);

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("noise handshake failed: {0}")]
    Handshake(#[from] snow::Error),
    #[error("packet failed authentication")]
    Unauthentic,
    #[error("packet too short to be sealed")]
    TooShort,
    #[error("replayed or too old packet (counter {0})")]
    Replayed(u64),
    #[error("send counter exhausted; the session must be renewed")]
    CounterExhausted,
}

/// The 32-byte pre-shared key, wiped from memory when dropped.
#[derive(Clone, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct Psk(pub [u8; 32]);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

/// The key the xdp transport tags its SYNs with (the TCP-shaped wire's handshake, which
/// the server answers only when the tag proves the pre-shared key): its own label, so it
/// reveals nothing about any other key drawn from the pre-shared key.
pub fn syn_tag_key(psk: &Psk) -> zeroize::Zeroizing<[u8; 32]> {
    zeroize::Zeroizing::new(epoch_keys::derive(&psk.0, b"paqet tcp syn tag", 0))
}

/// Masks the receiver index of every data packet, so that no byte of a packet is
/// constant across a session. The key comes from the pre-shared key, not the session:
/// the receiver must unmask the index to find the session at all. The mask is AES of
/// the same ciphertext sample the counter's mask is drawn from, under its own key.
#[derive(Clone)]
pub struct IndexMask(Aes256);

impl IndexMask {
    pub fn new(psk: &Psk) -> IndexMask {
        IndexMask(Aes256::new(
            &epoch_keys::derive(&psk.0, b"paqet index protection", 0).into(),
        ))
    }

    fn mask(&self, body: &[u8]) -> Option<u32> {
        let sample = body.get(..HP_SAMPLE_LEN)?;
        let mut block = aes::Block::default();
        block.copy_from_slice(sample);
        self.0.encrypt_block(&mut block);
        Some(u32::from_be_bytes([block[0], block[1], block[2], block[3]]))
    }

    /// The receiver index a data packet names, or `None` if it is too short to be one.
    pub fn unmask(&self, packet: &[u8]) -> Option<u32> {
        let header = DataHeader::parse(packet).ok()?;
        Some(header.receiver_index ^ self.mask(packet.get(DATA_HEADER_LEN..)?)?)
    }
}

/// Per-session keys and nonce state for both directions.
pub struct SessionCrypto {
    seal_keys: SealKeys,
    open_keys: OpenKeys,
    send_counter: u64,
    replay: ReplayWindow,
    hp_send: Aes256,
    hp_recv: Aes256,
    /// What a later handshake of the same client proves it knows ([`resume_proof`]).
    resume: [u8; 32],
    index_mask: IndexMask,
}

fn header_protection(direction_secret: &[u8; 32]) -> Aes256 {
    Aes256::new(&epoch_keys::derive(direction_secret, b"paqet header protection", 0).into())
}

/// The counter's mask: AES of a ciphertext sample under the header-protection key, as
/// QUIC's AES header protection draws it. One AES-NI block per packet; a ChaCha20 block
/// (with its per-packet key setup) cost ~5 % of a relay's CPU.
fn counter_mask(hp: &Aes256, ciphertext: &[u8]) -> u64 {
    let mut block = aes::Block::default();
    block.copy_from_slice(&ciphertext[..HP_SAMPLE_LEN]);
    hp.encrypt_block(&mut block);
    let mut mask = [0u8; 8];
    mask.copy_from_slice(&block[..8]);
    u64::from_be_bytes(mask)
}

impl SessionCrypto {
    fn from_handshake(state: HandshakeState, index_mask: IndexMask) -> Result<SessionCrypto, CryptoError> {
        let (send, recv, resume) = handshake::split(state)?;
        Ok(SessionCrypto {
            resume,
            index_mask,
            hp_send: header_protection(&send),
            hp_recv: header_protection(&recv),
            seal_keys: SealKeys::new(send),
            open_keys: OpenKeys::new(recv),
            send_counter: 0,
            replay: ReplayWindow::default(),
        })
    }

    pub fn resume_secret(&self) -> &[u8; 32] {
        &self.resume
    }
}

impl Drop for SessionCrypto {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.resume);
    }
}

impl SessionCrypto {
    /// Appends `header ‖ ciphertext ‖ tag` for `plaintext` to `out`.
    pub fn seal(&mut self, receiver_index: u32, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.seal_with(receiver_index, out, |buf| buf.extend_from_slice(plaintext))
    }

    /// As [`SessionCrypto::seal`], with the plaintext appended by `write_plaintext`
    /// right where it is then encrypted in place.
    pub fn seal_with(
        &mut self,
        receiver_index: u32,
        out: &mut Vec<u8>,
        write_plaintext: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), CryptoError> {
        let counter = self.send_counter;
        self.send_counter = counter.checked_add(1).ok_or(CryptoError::CounterExhausted)?;
        let start = out.len();
        out.resize(start + DATA_HEADER_LEN, 0);
        write_plaintext(out);
        let tag = self
            .seal_keys
            .seal_in_place(counter, &mut out[start + DATA_HEADER_LEN..])?;
        out.extend_from_slice(&tag);
        let (header, body) = out[start..].split_at_mut(DATA_HEADER_LEN);
        let mask = counter_mask(&self.hp_send, body);
        let index_mask = self.index_mask.mask(body).ok_or(CryptoError::TooShort)?;
        DataHeader {
            receiver_index: receiver_index ^ index_mask,
            masked_counter: counter ^ mask,
        }
        .emit(header);
        Ok(())
    }

    /// Authenticates and decrypts a whole data packet where it lies; the plaintext is a
    /// slice of `packet`. Opening in place saves a copy of every datagram; the packet's
    /// bytes are spent either way.
    pub fn open_in_place<'p>(&mut self, packet: &'p mut [u8]) -> Result<Opened<'p>, CryptoError> {
        let header = DataHeader::parse(packet).map_err(|_| CryptoError::TooShort)?;
        let body = &mut packet[DATA_HEADER_LEN..];
        if body.len() < TAG_LEN {
            return Err(CryptoError::TooShort);
        }
        let counter = header.masked_counter ^ counter_mask(&self.hp_recv, body);
        if !self.replay.may_accept(counter) {
            return Err(CryptoError::Replayed(counter));
        }
        let plaintext = self.open_keys.open_in_place(counter, body)?;
        let newest = self.replay.accept(counter);
        Ok(Opened { plaintext, newest })
    }
}

/// An authentic data packet's plaintext.
pub struct Opened<'p> {
    pub plaintext: &'p [u8],
    /// It carries the highest counter this session has seen: the peer's latest packet,
    /// not one that was overtaken on the way.
    pub newest: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(psk_i: &Psk, psk_r: &Psk) -> Result<(SessionCrypto, SessionCrypto), CryptoError> {
        let (mut init, msg1) = Initiator::start(psk_i, b"hello")?;
        let responder = Responder::read(psk_r, &msg1)?;
        assert_eq!(responder.payload, b"hello");
        let (server, msg2) = responder.respond(b"welcome")?;
        let payload = init.read_response(&msg2)?;
        let client = init.into_session()?;
        assert_eq!(payload, b"welcome");
        Ok((client, server))
    }

    #[test]
    fn seal_open_both_directions() {
        let psk = Psk([7; 32]);
        let (mut c, mut s) = pair(&psk, &psk).unwrap();
        let mut wire = Vec::new();
        c.seal(42, b"ping", &mut wire).unwrap();
        assert_eq!(wire.len(), 4 + SEAL_OVERHEAD);
        assert_eq!(s.open_in_place(&mut wire).unwrap().plaintext, b"ping");
        let mut back = Vec::new();
        s.seal(9, b"pong", &mut back).unwrap();
        assert_eq!(c.open_in_place(&mut back).unwrap().plaintext, b"pong");
    }

    #[test]
    fn a_forged_packet_does_not_burn_its_counter() {
        let psk = Psk([4; 32]);
        let (mut c, mut s) = pair(&psk, &psk).unwrap();
        let mut wire = Vec::new();
        c.seal(1, &[0xab; 100], &mut wire).unwrap();
        let mut forged = wire.clone();
        forged[DATA_HEADER_LEN] ^= 1;
        assert!(matches!(s.open_in_place(&mut forged), Err(CryptoError::Unauthentic)));
        // Refused before the replay window saw it: the genuine packet still opens.
        assert_eq!(s.open_in_place(&mut wire).unwrap().plaintext, &[0xab; 100][..]);
    }

    #[test]
    fn wrong_psk_fails_at_the_first_message() {
        let (_, msg1) = Initiator::start(&Psk([1; 32]), b"x").unwrap();
        assert!(Responder::read(&Psk([2; 32]), &msg1).is_err());
    }

    #[test]
    fn replay_and_tamper_are_refused() {
        let psk = Psk([3; 32]);
        let (mut c, mut s) = pair(&psk, &psk).unwrap();
        let mut wire = Vec::new();
        c.seal(1, b"once", &mut wire).unwrap();
        assert!(s.open_in_place(&mut wire.clone()).is_ok());
        assert!(matches!(s.open_in_place(&mut wire), Err(CryptoError::Replayed(0))));
        let mut tampered = Vec::new();
        c.seal(1, b"twice", &mut tampered).unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(s.open_in_place(&mut tampered.clone()).is_err());
        assert!(s.open_in_place(&mut tampered[..5]).is_err());
    }

    #[test]
    fn header_counter_is_masked() {
        let psk = Psk([5; 32]);
        let (mut c, _) = pair(&psk, &psk).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        c.seal(1, b"same", &mut a).unwrap();
        c.seal(1, b"same", &mut b).unwrap();
        // Counters 0 and 1 would share seven zero bytes in the clear.
        assert_ne!(a[4..11], b[4..11]);
        assert_ne!(a[4..12], [0u8; 8]);
    }

    #[test]
    fn receiver_index_is_masked_and_unmasked_with_the_psk() {
        let psk = Psk([6; 32]);
        let (mut c, _) = pair(&psk, &psk).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        c.seal(0x1234_5678, b"same", &mut a).unwrap();
        c.seal(0x1234_5678, b"same", &mut b).unwrap();
        assert_ne!(a[..4], b[..4], "the index is constant across packets");
        assert_ne!(a[..4], 0x1234_5678u32.to_be_bytes());
        let mask = IndexMask::new(&psk);
        assert_eq!(mask.unmask(&a), Some(0x1234_5678));
        assert_eq!(mask.unmask(&b), Some(0x1234_5678));
        assert_ne!(IndexMask::new(&Psk([7; 32])).unmask(&a), Some(0x1234_5678));
        assert_eq!(mask.unmask(&a[..DATA_HEADER_LEN + 3]), None);
    }
}
