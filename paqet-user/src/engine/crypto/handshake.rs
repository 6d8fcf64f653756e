//! The Noise `NNpsk0` handshake (through `snow`) that opens every session.
//!
//! Both sides contribute a fresh ephemeral key, the PSK authenticates both, and the
//! client's first message is already encrypted under the PSK, so a responder learns
//! nothing — and spends no Diffie-Hellman — before the sender has proven it holds the key.

use snow::HandshakeState;

use super::{CryptoError, IndexMask, Psk, SessionCrypto};

const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
const MAX_HANDSHAKE_LEN: usize = 512;

fn builder(psk: &Psk) -> Result<snow::Builder<'_>, CryptoError> {
    let params = NOISE_PARAMS.parse().map_err(CryptoError::Handshake)?;
    Ok(snow::Builder::new(params).psk(0, &psk.0)?)
}

/// The client's half-done handshake, waiting for the server's response.
pub struct Initiator {
    state: HandshakeState,
    index_mask: IndexMask,
}

impl Initiator {
    /// Starts a handshake; returns the state and the first message to send.
    pub fn start(psk: &Psk, payload: &[u8]) -> Result<(Initiator, Vec<u8>), CryptoError> {
        Initiator::start_with(psk, |_| payload.to_vec())
    }

    /// As [`Initiator::start`], with the payload made from this handshake's ephemeral
    /// public key, so it can carry a proof bound to this handshake alone
    /// ([`resume_proof`]).
    pub fn start_with(psk: &Psk, payload: impl FnOnce(&[u8]) -> Vec<u8>) -> Result<(Initiator, Vec<u8>), CryptoError> {
        // A fresh ephemeral from snow's OS-backed RNG, as `build_initiator` would draw
        // itself; snow's "fixed ephemeral" (named for test vectors) only lets us know its
        // public half before the message is written.
        let ephemeral = builder(psk)?.generate_keypair()?;
        let mut state = builder(psk)?
            .fixed_ephemeral_key_for_testing_only(&ephemeral.private)
            .build_initiator()?;
        let payload = payload(&ephemeral.public);
        let mut msg = vec![0u8; MAX_HANDSHAKE_LEN];
        let len = state.write_message(&payload, &mut msg)?;
        msg.truncate(len);
        Ok((
            Initiator {
                state,
                index_mask: IndexMask::new(psk),
            },
            msg,
        ))
    }

    /// Reads a datagram that may be the server's response; on success its payload,
    /// after which [`Initiator::into_session`] gives the keys. A datagram that does not
    /// authenticate leaves the handshake as it was (snow restores its state on a failed
    /// read), so a forged reply cannot cancel a pending handshake.
    pub fn read_response(&mut self, response: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
        let len = self.state.read_message(response, &mut payload)?;
        payload.truncate(len);
        Ok(payload)
    }

    pub fn into_session(self) -> Result<SessionCrypto, CryptoError> {
        SessionCrypto::from_handshake(self.state, self.index_mask)
    }
}

/// The server's side: authenticates a first message and answers it.
pub struct Responder {
    state: HandshakeState,
    index_mask: IndexMask,
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
        Ok(Responder {
            state,
            index_mask: IndexMask::new(psk),
            payload,
        })
    }

    pub fn respond(mut self, payload: &[u8]) -> Result<(SessionCrypto, Vec<u8>), CryptoError> {
        let mut msg = vec![0u8; MAX_HANDSHAKE_LEN];
        let len = self.state.write_message(payload, &mut msg)?;
        msg.truncate(len);
        Ok((SessionCrypto::from_handshake(self.state, self.index_mask)?, msg))
    }
}

/// The ephemeral public key that opens a handshake message; the server remembers
/// recent ones to refuse a replayed handshake.
pub fn handshake_fingerprint(message: &[u8]) -> Option<[u8; 32]> {
    message.get(..32).and_then(|b| b.try_into().ok())
}

/// Proves, inside a new handshake, that the client holds the secret of a session the
/// server still has with its instance: a keyed hash of the handshake's ephemeral key.
/// Another key holder who saw the client's handshake learns its instance, but cannot
/// make this for an ephemeral of its own, so it cannot re-point the client's streams.
pub fn resume_proof(resume: &[u8; 32], ephemeral: &[u8]) -> [u8; 16] {
    let label = [&b"paqet resume proof"[..], ephemeral].concat();
    let mut proof = [0u8; 16];
    proof.copy_from_slice(&super::epoch_keys::derive(resume, &label, 0)[..16]);
    proof
}

/// (sending, receiving, resumption): the two directions' secrets and the session's
/// resumption secret (the same on both sides).
pub(super) type SessionSecrets = ([u8; 32], [u8; 32], [u8; 32]);

/// The secrets of a finished handshake.
pub(super) fn split(mut state: HandshakeState) -> Result<SessionSecrets, CryptoError> {
    if !state.is_handshake_finished() {
        return Err(CryptoError::Handshake(snow::Error::State(
            snow::error::StateProblem::HandshakeNotFinished,
        )));
    }
    let (initiator_to_responder, responder_to_initiator) = state.dangerously_get_raw_split();
    let resume = super::epoch_keys::derive(&initiator_to_responder, b"paqet resumption", 0);
    Ok(if state.is_initiator() {
        (initiator_to_responder, responder_to_initiator, resume)
    } else {
        (responder_to_initiator, initiator_to_responder, resume)
    })
}
