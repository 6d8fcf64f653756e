//! Checks that every transport must pass, written once and run by each transport's
//! test file against its own bed.

use crate::relay::{ORIGIN_NAME, ORIGIN_PORT, RelayBed};
use crate::{pattern, socks};

/// 200 streams at once, sizes from 0 bytes to 1.5 MB; every body arrives exact.
pub fn two_hundred_concurrent_streams(bed: &RelayBed) {
    let proxy = bed.socks_addr();
    let sizes: Vec<u64> = (0..200u64)
        .map(|i| [0, 1, 1000, 70_000, 300_000, 1_500_000][(i % 6) as usize] + i)
        .collect();
    let results = bed
        .hosts
        .client
        .run(|| {
            std::thread::scope(|s| {
                let handles: Vec<_> = sizes
                    .iter()
                    .map(|&len| s.spawn(move || (len, socks::fetch_bytes(proxy, ORIGIN_NAME, ORIGIN_PORT, len))))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("fetch thread panicked"))
                    .collect::<Vec<_>>()
            })
        })
        .expect("entering the client namespace");
    for (len, result) in results {
        let (hash, got) = result.unwrap_or_else(|e| panic!("stream of {len} bytes failed: {e:#}\n{}", bed.logs()));
        assert_eq!(got, len);
        assert_eq!(hash, pattern::sha256_hex(len, len), "stream of {len} bytes corrupted");
    }
}

/// Downloads `len` bytes with curl and checks the sha256; returns MB/s (for the log).
pub fn curl_download_is_exact(bed: &RelayBed, len: u64) -> f64 {
    let (hash, got, took) = bed.curl_bytes(len).expect("curl through the relay");
    assert_eq!(hash, pattern::sha256_hex(len, len), "{}", bed.logs());
    got as f64 / took.as_secs_f64() / 1e6
}
