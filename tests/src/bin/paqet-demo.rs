//! `cargo xtask run` with no arguments: a whole relay on this machine. Two network
//! namespaces joined by a veth pair, an origin web server and a paqet server in one, a
//! paqet client in the other (on the xdp transport; PAQET_DEMO_TRANSPORT=udp for the
//! other), and a real 100 MiB download with curl through the SOCKS5
//! port, its hash checked and its throughput printed. Everything is removed at the end.

use anyhow::{Result, bail};

use paqet_tests::relay::{ORIGIN_IP, ORIGIN_PORT, RelayBed, RelayOptions, SOCKS_PORT};
use paqet_tests::{TwoHosts, pattern, require_root};

const DEMO_BYTES: u64 = 100 << 20;

fn main() -> Result<()> {
    if !require_root("paqet demo") {
        bail!("the demo creates network namespaces: run it as root (cargo xtask run does)");
    }
    let transport = std::env::var("PAQET_DEMO_TRANSPORT").unwrap_or_else(|_| "xdp".into());
    let transport: &'static str = if transport == "udp" { "udp" } else { "xdp" };
    println!(
        "paqet demo: client ns ({}) ⇄ veth ⇄ server ns ({}), transport {transport}",
        TwoHosts::CLIENT_IP,
        TwoHosts::SERVER_IP
    );
    let bed = RelayBed::start("demo", &RelayOptions::new(transport)?)?;
    println!(
        "  paqet server on {}:4000, origin web server on {ORIGIN_IP}:{ORIGIN_PORT} behind it, SOCKS5 on 127.0.0.1:{SOCKS_PORT} in the client ns",
        TwoHosts::SERVER_IP
    );
    println!("  downloading {} MiB with curl --socks5-hostname ...", DEMO_BYTES >> 20);
    let (hash, len, took) = bed.curl_bytes(DEMO_BYTES)?;
    let expected = pattern::sha256_hex(DEMO_BYTES, DEMO_BYTES);
    println!("  sha256 received {hash}");
    println!("  sha256 expected {expected}");
    if hash != expected {
        bail!("hash mismatch: the relay corrupted the download\n{}", bed.logs());
    }
    println!(
        "  OK: {} MiB in {:.2} s = {:.1} MB/s through paqet",
        len >> 20,
        took.as_secs_f64(),
        len as f64 / took.as_secs_f64() / 1e6
    );
    println!("paqet demo: done; namespaces and processes removed");
    Ok(())
}
