//! `cargo xtask run [-- ARGS]`: build, then run `target/release/paqet ARGS`. With no
//! ARGS, run the demo (client and server in namespaces, a real download through them).

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
        step("running the demo (paqet-tests' paqet-demo)");
        let mut cmd = Command::new(util::cargo());
        cmd.current_dir(util::root())
            .args(["run", "--release", "-p", "paqet-tests", "--bin", "paqet-demo"])
            .env("PAQET_BIN", &bin);
        return maybe_sudo(cmd);
    }
    step(format!("running {} {}", bin.display(), args.args.join(" ")));
    let mut cmd = Command::new(&bin);
    cmd.args(&args.args);
    maybe_sudo(cmd)
}

/// Runs `cmd` as is when root; otherwise through sudo when there is one, or explains
/// what to grant.
fn maybe_sudo(cmd: Command) -> Result<()> {
    let mut cmd = cmd;
    if !util::is_root() {
        let Some(sudo) = util::which("sudo") else {
            bail!(
                "not root and no sudo: run as root, or grant the binary its capabilities:\n    \
                 setcap {CAPS}+ep {}",
                util::target_dir().join("release/paqet").display()
            );
        };
        step("not root: re-running through sudo");
        let mut s = Command::new(sudo);
        s.arg("-E").arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                s.env(k, v);
            }
        }
        if let Some(d) = cmd.get_current_dir() {
            s.current_dir(d);
        }
        cmd = s;
    }
    util::run(&mut cmd)
}
