//! Session keys from a pre-shared key, and the sealing of every data packet.
//!
//! The handshake is Noise `NNpsk0` (through `snow`): both sides contribute a fresh
//! ephemeral key, the PSK authenticates both, and the client's first message is already
//! encrypted under the PSK, so a responder learns nothing — and spends no Diffie-Hellman —
//! before the sender has proven it holds the key. Data packets are sealed with the
//! session's ChaCha20-Poly1305 keys under counter nonces (never reused: keys are fresh per
//! session, counters only grow), checked against a sliding replay window, and their
//! counter is masked QUIC-style so no cleartext byte is constant or predictable.

use aes::Aes256;
use aes::cipher::{BlockEncrypt, KeyInit};
use blake2::{Blake2s256, Digest};
use snow::{HandshakeState, StatelessTransportState};

use super::frame::{DATA_HEADER_LEN, DataHeader};

const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Every data packet costs this much beyond its plaintext.
pub const SEAL_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;
/// The header mask is drawn from one AES block of ciphertext; the tag alone has it.
const HP_SAMPLE_LEN: usize = 16;
const _: () = assert!(HP_SAMPLE_LEN <= TAG_LEN);
const MAX_HANDSHAKE_LEN: usize = 512;

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

/// The 32-byte pre-shared key.
#[derive(Clone)]
pub struct Psk(pub [u8; 32]);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

fn builder(psk: &Psk) -> Result<snow::Builder<'_>, CryptoError> {
    let params = NOISE_PARAMS.parse().map_err(CryptoError::Handshake)?;
    Ok(snow::Builder::new(params).psk(0, &psk.0)?)
}

/// The client's half-done handshake, waiting for the server's response.
pub struct Initiator {
    state: HandshakeState,
}

impl Initiator {
    /// Starts a handshake; returns the state and the first message to send.
    pub fn start(psk: &Psk, payload: &[u8]) -> Result<(Initiator, Vec<u8>), CryptoError> {
        let mut state = builder(psk)?.build_initiator()?;
        let mut msg = vec![0u8; MAX_HANDSHAKE_LEN];
        let len = state.write_message(payload, &mut msg)?;
        msg.truncate(len);
        Ok((Initiator { state }, msg))
    }

    /// Reads the server's response; on success the session keys and its payload.
    pub fn finish(mut self, response: &[u8]) -> Result<(SessionCrypto, Vec<u8>), CryptoError> {
        let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
        let len = self.state.read_message(response, &mut payload)?;
        payload.truncate(len);
        Ok((SessionCrypto::from_handshake(self.state)?, payload))
    }
}

/// The server's side: authenticates a first message and answers it.
pub struct Responder {
    state: HandshakeState,
    pub payload: Vec<u8>,
}

impl Responder {
    /// Authenticates the client's first message. Cheap for garbage: NNpsk0's first
    /// message needs no Diffie-Hellman, only hashing and one AEAD open.
    pub fn read(psk: &Psk, message: &[u8]) -> Result<Responder, CryptoError> {
        let mut state = builder(psk)?.build_responder()?;
        let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
        let len = state.read_message(message, &mut payload)?;
        payload.truncate(len);
        Ok(Responder { state, payload })
    }

    pub fn respond(mut self, payload: &[u8]) -> Result<(SessionCrypto, Vec<u8>), CryptoError> {
        let mut msg = vec![0u8; MAX_HANDSHAKE_LEN];
        let len = self.state.write_message(payload, &mut msg)?;
        msg.truncate(len);
        Ok((SessionCrypto::from_handshake(self.state)?, msg))
    }
}

/// The ephemeral public key that opens a handshake message; the server remembers
/// recent ones to refuse a replayed handshake.
pub fn handshake_fingerprint(message: &[u8]) -> Option<[u8; 32]> {
    message.get(..32).and_then(|b| b.try_into().ok())
}

/// Per-session keys and nonce state for both directions.
pub struct SessionCrypto {
    transport: StatelessTransportState,
    send_counter: u64,
    replay: ReplayWindow,
    hp_send: Aes256,
    hp_recv: Aes256,
}

fn derive_hp_key(handshake_hash: &[u8], label: &[u8]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(b"paqet header protection ");
    h.update(label);
    h.update(handshake_hash);
    h.finalize().into()
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
    fn from_handshake(state: HandshakeState) -> Result<SessionCrypto, CryptoError> {
        let hash = state.get_handshake_hash().to_vec();
        let initiator = state.is_initiator();
        let (i2r, r2i) = (derive_hp_key(&hash, b"i2r"), derive_hp_key(&hash, b"r2i"));
        let (hp_send, hp_recv) = if initiator { (i2r, r2i) } else { (r2i, i2r) };
        let (hp_send, hp_recv) = (Aes256::new(&hp_send.into()), Aes256::new(&hp_recv.into()));
        Ok(SessionCrypto {
            transport: state.into_stateless_transport_mode()?,
            send_counter: 0,
            replay: ReplayWindow::default(),
            hp_send,
            hp_recv,
        })
    }

    /// Appends `header ‖ ciphertext ‖ tag` for `plaintext` to `out`.
    pub fn seal(&mut self, receiver_index: u32, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let counter = self.send_counter;
        self.send_counter = counter.checked_add(1).ok_or(CryptoError::CounterExhausted)?;
        let start = out.len();
        out.resize(start + DATA_HEADER_LEN + plaintext.len() + TAG_LEN, 0);
        let (header, body) = out[start..].split_at_mut(DATA_HEADER_LEN);
        let len = self.transport.write_message(counter, plaintext, body)?;
        debug_assert_eq!(len, body.len());
        let mask = counter_mask(&self.hp_send, body);
        DataHeader {
            receiver_index,
            masked_counter: counter ^ mask,
        }
        .emit(header);
        Ok(())
    }

    /// Authenticates and decrypts a whole data packet into `out`; returns the plaintext.
    pub fn open<'o>(&mut self, packet: &[u8], out: &'o mut [u8]) -> Result<&'o [u8], CryptoError> {
        let header = DataHeader::parse(packet).map_err(|_| CryptoError::TooShort)?;
        let body = &packet[DATA_HEADER_LEN..];
        if body.len() < TAG_LEN {
            return Err(CryptoError::TooShort);
        }
        let counter = header.masked_counter ^ counter_mask(&self.hp_recv, body);
        if !self.replay.may_accept(counter) {
            return Err(CryptoError::Replayed(counter));
        }
        let len = self
            .transport
            .read_message(counter, body, out)
            .map_err(|_| CryptoError::Unauthentic)?;
        self.replay.accept(counter);
        Ok(&out[..len])
    }
}

/// Sliding window over the highest counters seen, as WireGuard keeps one: a counter is
/// accepted once, and not at all when it is more than the window behind the newest.
#[derive(Default)]
pub struct ReplayWindow {
    /// One past the highest accepted counter (0: nothing accepted yet).
    next: u64,
    bits: [u64; REPLAY_WORDS],
}

const REPLAY_WORDS: usize = 32;
const REPLAY_WINDOW: u64 = (REPLAY_WORDS * 64) as u64;

impl ReplayWindow {
    pub fn may_accept(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        if self.next - counter > REPLAY_WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] & (1 << bit) == 0
    }

    /// Records `counter`; call only after `may_accept` and a successful authentication.
    pub fn accept(&mut self, counter: u64) {
        if counter >= self.next {
            self.clear_range(self.next, counter);
            self.next = counter + 1;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= 1 << bit;
    }

    /// Forgets the slots that the window slides over, so they can be filled afresh.
    fn clear_range(&mut self, from: u64, to_inclusive: u64) {
        if to_inclusive - from >= REPLAY_WINDOW {
            self.bits = [0; REPLAY_WORDS];
            return;
        }
        for c in from..=to_inclusive {
            let (word, bit) = Self::slot(c);
            self.bits[word] &= !(1 << bit);
        }
    }

    fn slot(counter: u64) -> (usize, u32) {
        let idx = counter % REPLAY_WINDOW;
        ((idx / 64) as usize, (idx % 64) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(psk_i: &Psk, psk_r: &Psk) -> Result<(SessionCrypto, SessionCrypto), CryptoError> {
        let (init, msg1) = Initiator::start(psk_i, b"hello")?;
        let responder = Responder::read(psk_r, &msg1)?;
        assert_eq!(responder.payload, b"hello");
        let (server, msg2) = responder.respond(b"welcome")?;
        let (client, payload) = init.finish(&msg2)?;
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
        let mut out = [0u8; 64];
        assert_eq!(s.open(&wire, &mut out).unwrap(), b"ping");
        let mut back = Vec::new();
        s.seal(9, b"pong", &mut back).unwrap();
        assert_eq!(c.open(&back, &mut out).unwrap(), b"pong");
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
        let mut out = [0u8; 64];
        assert!(s.open(&wire, &mut out).is_ok());
        assert!(matches!(s.open(&wire, &mut out), Err(CryptoError::Replayed(0))));
        let mut tampered = Vec::new();
        c.seal(1, b"twice", &mut tampered).unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(s.open(&tampered, &mut out).is_err());
        assert!(s.open(&tampered[..5], &mut out).is_err());
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
    fn replay_window_accepts_out_of_order_once() {
        let mut w = ReplayWindow::default();
        for c in [5u64, 3, 4, 0, 2000, 100] {
            assert!(w.may_accept(c), "{c}");
            w.accept(c);
            assert!(!w.may_accept(c), "{c} twice");
        }
        assert!(w.may_accept(1));
        w.accept(5000);
        assert!(!w.may_accept(100), "far behind the window");
        assert!(w.may_accept(4999));
        w.accept(4999);
        assert!(!w.may_accept(4999));
    }
}
