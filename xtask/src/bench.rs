//! `cargo xtask bench`: builds a release, then runs `paqet-bench` (tests/src/bin), which
//! measures paqet over `xdp` and `udp` side by side with the raw AF_XDP and UDP packet
//! ceilings, kcptun and direct TCP, prints the table and writes `docs/bench/` (results.md,
//! results.tsv, PNG charts). Not part of `cargo xtask test`. Needs root.
//!
//! The bench's own packages (kcptun and microsocks as the peers, fonts-dejavu-core for
//! the charts' text, iperf3, nginx-light for the real-client row) are installed here,
//! not by `cargo xtask setup`, so setting up for the tests does not pay for them.

use crate::util::{self, step};
use anyhow::{Result, bail};
use std::process::Command;

pub const BENCH_APT_PACKAGES: &[&str] = &["kcptun", "microsocks", "fonts-dejavu-core", "iperf3"];
/// Packages whose install would start a system service (nginx on the host's port 80):
/// installed with services kept from starting; the bench runs its own nginx in a
/// namespace.
pub const BENCH_SERVICE_PACKAGES: &[&str] = &["nginx-light"];
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

#[derive(clap::Args)]
pub struct Args {
    /// Small sizes (a smoke run of about a minute) instead of the full run (~10 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Only these sections (comma-separated): ceilings, paqet-xdp, paqet-udp, kcptun, tcp,
    /// lossy, udp, real.
    #[arg(long)]
    pub only: Option<String>,
    /// Where results.md, results.tsv and the charts go (default: docs/bench).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    if !util::is_root() {
        bail!("the bench needs root (network namespaces, XDP): run it as root");
    }
    crate::setup::run(&crate::setup::Args {})?;
    crate::setup::apt_install("bench", BENCH_APT_PACKAGES)?;
    install_without_starting(BENCH_SERVICE_PACKAGES)?;
    let bin = crate::build::run(&crate::build::Args {
        release: true,
        debug: false,
    })?;
    step("building the bench binaries (paqet-tests, feature bench)");
    util::run(util::cargo_cmd().current_dir(util::root()).args([
        "build",
        "--release",
        "-p",
        "paqet-tests",
        "--features",
        "bench",
        "--bins",
    ]))?;
    let out = args.out.clone().unwrap_or_else(|| util::root().join("docs/bench"));
    step(format!(
        "running the bench{} (results in {})",
        if args.quick { " (--quick)" } else { "" },
        out.display()
    ));
    let mut cmd = Command::new(util::target_dir().join("release/paqet-bench"));
    cmd.env("PAQET_BIN", &bin).arg("--out").arg(&out);
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(only) = &args.only {
        cmd.args(["--only", only]);
    }
    util::run(&mut cmd)
}

/// Installs `pkgs` with Debian's policy-rc.d saying no to every service start, unless
/// the machine already has a policy (containers usually do): what the bench needs of
/// them, it starts itself.
fn install_without_starting(pkgs: &[&str]) -> Result<()> {
    let policy = std::path::Path::new(POLICY_RC_D);
    let ours = !policy.exists();
    if ours {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            policy,
            "#!/bin/sh\n# written by cargo xtask bench for one apt-get install\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let installed = crate::setup::apt_install("bench", pkgs);
    if ours {
        std::fs::remove_file(policy)?;
    }
    installed
}
