//! `cargo xtask run [-- ARGS]`: setup, build, then run `target/release/paqet ARGS`. With
//! no ARGS, run the demo (client and server in namespaces, a real download through them).
//!
//! Only what needs root runs as root (through sudo when we are not): apt-get inside
//! setup, and the final program. Builds stay with the user, so target/ does not fill
//! with root-owned files and bpf-linker lands in the user's ~/.cargo/bin.

use crate::util::{self, step};
use anyhow::{Result, bail};
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Arguments for `paqet`; none runs the demo.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// What paqet needs when it is not root (the xdp transport; see the README).
pub const CAPS: &str = "cap_bpf,cap_perfmon,cap_net_admin,cap_net_raw,cap_ipc_lock";

pub fn run(args: &Args) -> Result<()> {
    // As `cargo xtask test` does: a fresh machine needs nothing but this command.
    crate::setup::run(&crate::setup::Args {})?;
    let bin = crate::build::run(&crate::build::Args {
        release: true,
        debug: false,
    })?;
    if args.args.is_empty() {
        let demo = util::root().join("tests/src/bin/paqet-demo.rs");
        if !demo.is_file() {
            bail!(
                "the demo ({}) does not exist yet; pass arguments for paqet instead",
                demo.display()
            );
        }
        // --bins: the demo starts paqet-origin from its own directory, and
        // `cargo run --bin paqet-demo` would build the demo alone. Same profile and
        // features as the build above, so only paqet-tests itself compiles here.
        step("building the demo (paqet-tests' binaries, release)");
        util::run(util::cargo_cmd().current_dir(util::root()).args([
            "build",
            "--release",
            "-p",
            "paqet-tests",
            "--bins",
        ]))?;
        step("running the demo (paqet-demo)");
        let mut cmd = Command::new(util::target_dir().join("release/paqet-demo"));
        cmd.env("PAQET_BIN", &bin);
        return run_as_root(cmd);
    }
    step(format!("running {} {}", bin.display(), args.args.join(" ")));
    let mut cmd = Command::new(&bin);
    cmd.args(&args.args);
    run_as_root(cmd)
}

/// Runs `cmd` as root (through sudo when we are not), or explains what to grant.
fn run_as_root(cmd: Command) -> Result<()> {
    let Some(mut cmd) = util::as_root(cmd) else {
        bail!(
            "not root and no sudo: run as root, or grant the binary its capabilities:\n    \
             setcap {CAPS}+ep {}",
            util::target_dir().join("release/paqet").display()
        );
    };
    if !util::is_root() {
        step("not root: running through sudo");
    }
    util::run(&mut cmd)
}
