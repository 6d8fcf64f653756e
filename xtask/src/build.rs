//! `cargo xtask build`: the eBPF object first (Debian's rustc, which ships `core` for
//! bpfel-unknown-none; bpf-linker; BTF), then `paqet-user`, whose build script embeds it.

use crate::util::{self, step};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;

/// The rustc that has a prebuilt `core` for the BPF target (package rustc-web).
pub const BPF_RUSTC: &str = "/usr/bin/rustc";
pub const BPF_TARGET: &str = "bpfel-unknown-none";

#[derive(clap::Args)]
pub struct Args {
    /// Build the release profile (the default; accepted for clarity).
    #[arg(long, conflicts_with = "debug")]
    pub release: bool,
    /// Build the debug profile of paqet-user instead (the eBPF object is always release:
    /// unoptimised BPF code does not pass the verifier).
    #[arg(long)]
    pub debug: bool,
}

/// Where the eBPF build leaves its object; paqet-user/build.rs looks in the same place.
pub fn ebpf_object() -> PathBuf {
    util::root()
        .join("paqet-ebpf/target")
        .join(BPF_TARGET)
        .join("release/paqet-ebpf")
}

pub fn build_ebpf() -> Result<PathBuf> {
    step("building the eBPF object (paqet-ebpf, bpfel-unknown-none, release)");
    if !std::path::Path::new(BPF_RUSTC).is_file() {
        bail!("{BPF_RUSTC} is missing (Debian package rustc-web); run `cargo xtask setup`");
    }
    if util::which("bpf-linker").is_none() {
        bail!("bpf-linker is not installed; run `cargo xtask setup`");
    }
    let mut cmd = util::cargo_cmd();
    cmd.current_dir(util::root().join("paqet-ebpf"))
        .args(["build", "--release", "--locked", "--target", BPF_TARGET])
        .env("RUSTC", BPF_RUSTC)
        // Debian's rustc is a stable build; the BPF target's `core` needs unstable flags.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", util::path_with_cargo_bin());
    // Settings meant for the host build must not leak into the BPF one.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTC",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    util::run(&mut cmd)?;
    let obj = ebpf_object();
    if !obj.is_file() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    Ok(obj)
}

/// Builds everything; returns the path of the `paqet` binary.
pub fn run(args: &Args) -> Result<PathBuf> {
    let obj = build_ebpf()?;
    let profile = if args.debug { "debug" } else { "release" };
    step(format!("building paqet-user ({profile}), embedding {}", obj.display()));
    let mut cmd = util::cargo_cmd();
    cmd.current_dir(util::root()).args(["build", "-p", "paqet-user"]);
    if !args.debug {
        cmd.arg("--release");
    }
    // paqet-user/build.rs finds the object at this same default path; not passing
    // PAQET_EBPF_OBJECT keeps a later plain `cargo build` from rerunning the script.
    util::run(&mut cmd)?;
    let bin = util::target_dir().join(profile).join("paqet");
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    step(format!("built {}", bin.display()));
    bin.canonicalize()
        .with_context(|| format!("resolving {}", bin.display()))
}
