//! The origin server's deterministic content: any byte of any body can be recomputed
//! from its seed and offset, so a test knows the right hash without storing the data.

use sha2::{Digest, Sha256};

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fills `buf` with the body bytes `offset..offset + buf.len()` of body `seed`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        *b = (splitmix64(seed ^ (pos / 8).wrapping_mul(0x1000_0000_01B3)) >> (8 * (pos % 8))) as u8;
    }
}

/// The sha256 of the first `len` bytes of body `seed`, as lowercase hex.
pub fn sha256_hex(seed: u64, len: u64) -> String {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        fill(seed, done, &mut buf[..n]);
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    hex(&hasher.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_offset_independent() {
        let mut whole = vec![0u8; 100];
        fill(7, 0, &mut whole);
        let mut tail = vec![0u8; 37];
        fill(7, 63, &mut tail);
        assert_eq!(&whole[63..], &tail[..]);
        let mut other = vec![0u8; 100];
        fill(8, 0, &mut other);
        assert_ne!(whole, other);
    }
}
