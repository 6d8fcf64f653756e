//! `cargo xtask test`: what CI runs. Setup, build, then the whole workspace's tests in
//! release mode, against the binary just built (PAQET_BIN).

use crate::util::{self, step};
use anyhow::Result;
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Extra arguments for `cargo test` (before `--`), e.g. `-p paqet-tests --test xdp_steer`.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    crate::setup::run(&crate::setup::Args {})?;
    let bin = crate::build::run(&crate::build::Args {
        release: true,
        debug: false,
    })?;
    step(format!("testing the workspace (PAQET_BIN={})", bin.display()));
    let mut cmd = Command::new(util::cargo());
    cmd.current_dir(util::root())
        .args(["test", "--release", "--no-fail-fast"])
        .env("PAQET_BIN", &bin);
    if args.cargo_args.is_empty() {
        cmd.arg("--workspace");
    } else {
        cmd.args(&args.cargo_args);
    }
    // Two threads: the machines have two cores, and namespace tests are heavy.
    cmd.args(["--", "--test-threads=2"]);
    util::run(&mut cmd)?;
    step("all tests passed");
    Ok(())
}
