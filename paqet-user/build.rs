//! Embeds the eBPF object that `cargo xtask build` produces.
//!
//! The object is built by a different rustc (Debian's, for bpfel-unknown-none), so
//! cargo cannot build it as an ordinary dependency; this script only finds it, copies it
//! into OUT_DIR, and tells the crate where it is (env PAQET_EBPF_OBJ_PATH, read by
//! `include_bytes_aligned!` in `paqet::kernel`).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=PAQET_EBPF_OBJECT");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let obj = match std::env::var_os("PAQET_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => manifest.join("../paqet-ebpf/target/bpfel-unknown-none/release/paqet-ebpf"),
    };
    println!("cargo:rerun-if-changed={}", obj.display());
    if !obj.is_file() {
        eprintln!();
        eprintln!("error: the eBPF object {} does not exist.", obj.display());
        eprintln!("       paqet embeds its XDP program; build everything with:");
        eprintln!();
        eprintln!("           cargo xtask build");
        eprintln!();
        eprintln!("       (first time on this machine: `cargo xtask setup`, as root)");
        println!(
            "cargo:warning=missing eBPF object {}: run `cargo xtask build` (and `cargo xtask setup` once)",
            obj.display()
        );
        std::process::exit(1);
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("paqet-ebpf.o");
    if let Err(e) = std::fs::copy(&obj, &out) {
        eprintln!("error: copying {} to {}: {e}", obj.display(), out.display());
        std::process::exit(1);
    }
    println!("cargo:rustc-env=PAQET_EBPF_OBJ_PATH={}", out.display());
}
