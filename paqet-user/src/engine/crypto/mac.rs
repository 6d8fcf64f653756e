//! The one keyed hash paqet derives keys and tags with: BLAKE2s-256 in its keyed mode
//! (RFC 7693), a PRF of its key. Epoch keys, index and header protection keys,
//! cookies and `mac2`, and the TCP-shaped wire's SYN tags all come from it.

use blake2::Blake2sMac256;
use blake2::digest::{KeyInit, Mac};

/// The first `T` bytes of BLAKE2s keyed with `key` over `parts`, in order (the parts
/// are hashed as one message: how they are split does not matter).
pub fn keyed_blake2s<const K: usize, const T: usize>(key: &[u8; K], parts: &[&[u8]]) -> [u8; T] {
    const {
        assert!(K >= 1 && K <= 32, "BLAKE2s takes keys of 1 to 32 bytes");
        assert!(T <= 32, "BLAKE2s-256 gives 32 bytes");
    }
    let mut mac = <Blake2sMac256 as KeyInit>::new_from_slice(key).expect("key length checked at compile time");
    for part in parts {
        mac.update(part);
    }
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; T];
    tag.copy_from_slice(&full[..T]);
    tag
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn matches_the_reference_keyed_blake2s() {
        // blake2s-kat.txt's first keyed vector, and Python's hashlib.blake2s(key=...).
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let full: [u8; 32] = keyed_blake2s(&key, &[]);
        assert_eq!(
            hex(&full),
            "48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49"
        );
        let short_key: [u8; 16] = std::array::from_fn(|i| i as u8);
        let tag: [u8; 16] = keyed_blake2s(&short_key, &[&[0], &[1, 2]]);
        assert_eq!(hex(&tag), "3c85f7a695b5d7ccce1e84f7e7c24d01");
    }
}
