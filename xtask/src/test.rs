//! `cargo xtask test`: what CI runs. Setup, build, then the whole workspace's tests in
//! release mode, against the binary just built (PAQET_BIN) and its Debian package
//! (PAQET_DEB), the library's unit tests once more with overflow checks, and the
//! bench report's unit tests.

use crate::util::{self, step};
use anyhow::Result;

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
    // tests/tests/package.rs installs the package built from this very binary.
    let deb = crate::deb::run(&crate::deb::Args {
        binary: Some(bin.clone()),
    })?;
    step(format!(
        "testing the workspace (PAQET_BIN={}, PAQET_DEB={})",
        bin.display(),
        deb.display()
    ));
    let mut cmd = util::cargo_cmd();
    cmd.current_dir(util::root())
        .args(["test", "--release", "--no-fail-fast"])
        .env("PAQET_BIN", &bin)
        .env("PAQET_DEB", &deb);
    if args.cargo_args.is_empty() {
        cmd.arg("--workspace");
    } else {
        cmd.args(&args.cargo_args);
    }
    // Two threads: the machines have two cores, and namespace tests are heavy.
    cmd.args(["--", "--test-threads=2"]);
    util::run(&mut cmd)?;
    if args.cargo_args.is_empty() {
        // Release builds wrap on overflow; the unit tests feed hostile peers' numbers
        // (timestamps, windows, counters) through the engine, and only a debug build
        // turns an overflow there into a failure.
        step("unit tests of the paqet library again, with overflow checks (debug build)");
        let mut debug = util::cargo_cmd();
        debug
            .current_dir(util::root())
            .args(["test", "-p", "paqet-user", "--lib"]);
        util::run(&mut debug)?;
        // The bench's own logic (targets, medians, tables) sits behind the tests crate's
        // `bench` feature, which the workspace run leaves off so that it never builds the
        // bench binaries; its unit tests run here, the library alone.
        step("unit tests of the bench's report (paqet-tests, feature bench, library only)");
        let mut bench = util::cargo_cmd();
        bench.current_dir(util::root()).args([
            "test",
            "--release",
            "-p",
            "paqet-tests",
            "--features",
            "bench",
            "--lib",
        ]);
        util::run(&mut bench)?;
    }
    step("all tests passed");
    Ok(())
}
