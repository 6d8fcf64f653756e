//! `cargo xtask setup`: everything a fresh Debian/Ubuntu machine needs to build paqet
//! and run its tests. Idempotent: each step checks first and says when it is skipped.

use crate::util::{self, step};
use anyhow::{Result, bail};
use std::process::Command;

/// rustc-web + libstd-rust-web-dev-bpf: a rustc with a prebuilt `core` for the BPF
/// target (rustup has no rust-src here, so no -Z build-std); llvm-22-dev: what
/// bpf-linker links against; the rest are what the tests and operators use.
pub const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "bpftool",
    "ethtool",
    "tcpdump",
    "iproute2",
    "curl",
    // systemd-analyze, to verify dist/paqet.service (install and the service tests).
    "systemd",
    // The firewall tests' router: nft for NAT and a strict stateful filter, conntrack
    // to make it forget flows mid-session.
    "nftables",
    "conntrack",
    // The UDP relay tests (tests/tests/udp_relay.rs): iperf3 through the forwards, dig
    // against a dnsmasq the test starts behind the server.
    "iperf3",
    "dnsutils",
    "dnsmasq-base",
    // The package test (tests/tests/package.rs): builds a minimal Debian with
    // debootstrap and boots it with systemd-nspawn to run paqet.service under a real
    // systemd; pgrep finds its PID 1.
    "debootstrap",
    "systemd-container",
    "procps",
    // Checks the package (cargo xtask deb) in the same test.
    "lintian",
    // `man -l` renders the packaged page in the same test.
    "man-db",
];

pub const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

#[derive(clap::Args)]
pub struct Args {}

fn apt_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_debian_like() -> bool {
    let Ok(os) = std::fs::read_to_string("/etc/os-release") else {
        return false;
    };
    os.lines()
        .filter(|l| l.starts_with("ID=") || l.starts_with("ID_LIKE="))
        .any(|l| l.contains("debian") || l.contains("ubuntu"))
}

fn bpf_linker_ok() -> bool {
    let Some(bin) = util::which("bpf-linker") else {
        return false;
    };
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

fn bpf_linker_command() -> String {
    format!(
        "LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --locked --version {BPF_LINKER_VERSION} \
         --no-default-features --features llvm-22"
    )
}

pub fn run(_args: &Args) -> Result<()> {
    step("setup: checking apt packages");
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !apt_installed(p)).collect();
    for p in APT_PACKAGES {
        if !missing.contains(p) {
            eprintln!("    {p}: installed, skipping");
        }
    }
    let linker_ok = bpf_linker_ok();
    // apt needs root (or sudo); bpf-linker does not, and must not get it: installed as
    // root through sudo it would land in root's ~/.cargo/bin, where this user's build
    // does not look.
    let can_apt = is_debian_like() && (util::is_root() || util::which("sudo").is_some());
    if !missing.is_empty() && !can_apt {
        let why = if !is_debian_like() {
            "this is not a Debian/Ubuntu system, so setup cannot install packages itself"
        } else {
            "setup needs root (or sudo) to install packages"
        };
        eprintln!("xtask setup: {why}. Run these commands (as root), then run setup again:");
        eprintln!("    apt-get update");
        eprintln!(
            "    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
            missing.join(" ")
        );
        if !linker_ok {
            eprintln!("    {}", bpf_linker_command());
        }
        bail!("missing prerequisites: {}", missing.join(", "));
    }
    if !missing.is_empty() {
        step(format!("setup: installing {}", missing.join(" ")));
        apt_get_install(&missing)?;
    }
    step("setup: checking bpf-linker");
    if linker_ok {
        eprintln!("    bpf-linker {BPF_LINKER_VERSION}: installed, skipping");
    } else {
        step(format!(
            "setup: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)"
        ));
        util::run(
            util::cargo_cmd()
                .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env_remove("RUSTC")
                .env_remove("RUSTC_BOOTSTRAP"),
        )?;
        if !bpf_linker_ok() {
            bail!("bpf-linker was installed but is not on PATH or $CARGO_HOME/bin");
        }
    }
    step("setup: checking the BPF target of /usr/bin/rustc");
    let sysroot = std::path::Path::new("/usr/lib/rustlib").join(crate::build::BPF_TARGET);
    if !sysroot.is_dir() {
        bail!(
            "{} is missing although libstd-rust-web-dev-bpf is installed; reinstall it",
            sysroot.display()
        );
    }
    eprintln!("    {}: present", sysroot.display());
    pip_install_missing()?;
    step("setup: done");
    Ok(())
}

/// Python modules the tests use, with the pip requirement that provides each: the
/// metrics test (tests/tests/metrics.rs) parses a scrape with the official Prometheus
/// client's parsers, so the format is checked by code no one here wrote.
pub const PIP_PACKAGES: &[(&str, &str)] = &[("prometheus_client", "prometheus-client==0.26.0")];

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the missing [`PIP_PACKAGES`] for the `python3` on PATH (the one the tests
/// run), with its own pip; Debian's python3-pip first when it has none.
fn pip_install_missing() -> Result<()> {
    step("setup: checking python modules");
    let mut missing = Vec::new();
    for (module, requirement) in PIP_PACKAGES {
        if python_has(module) {
            eprintln!("    {module}: installed, skipping");
        } else {
            missing.push(*requirement);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let has_pip = || {
        Command::new("python3")
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has_pip() {
        if !is_debian_like() {
            bail!("python3 with pip is needed to install {}", missing.join(", "));
        }
        step("setup: installing python3-pip");
        apt_get_install(&["python3-pip"])?;
    }
    step(format!("setup: installing {} with pip", missing.join(" ")));
    util::run(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(&missing)
            // Debian's own python3 refuses pip installs outside a venv (PEP 668); a test
            // tool beside the system's packages is what is wanted here. Environment
            // variables, not flags, so an older pip ignores them instead of failing.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    )?;
    for (module, _) in PIP_PACKAGES {
        if !python_has(module) {
            bail!("pip installed {module}, but python3 still cannot import it");
        }
    }
    Ok(())
}

/// Installs `pkgs` with apt when missing (for subcommands with needs of their own, such
/// as `bench`, so that plain `setup` stays as fast as the tests need it to be).
pub fn apt_install(what: &str, pkgs: &[&str]) -> Result<()> {
    step(format!("setup ({what}): checking apt packages"));
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !apt_installed(p)).collect();
    for p in pkgs {
        if !missing.contains(p) {
            eprintln!("    {p}: installed, skipping");
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_debian_like() {
        bail!("{what} needs {}: install them and run again", missing.join(", "));
    }
    step(format!("setup ({what}): installing {}", missing.join(" ")));
    apt_get_install(&missing)
}

/// `apt-get update`, then install `pkgs` without prompts or recommends; through sudo
/// when we are not root (CI is root and gets no sudo).
fn apt_get_install(pkgs: &[&str]) -> Result<()> {
    let mut update = Command::new("apt-get");
    update.arg("update").env("DEBIAN_FRONTEND", "noninteractive");
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive");
    for cmd in [update, install] {
        let Some(mut cmd) = util::as_root(cmd) else {
            bail!(
                "installing {} needs root, and there is no sudo: run as root \
                 (apt-get install -y --no-install-recommends {})",
                pkgs.join(", "),
                pkgs.join(" ")
            );
        };
        if !util::is_root() {
            step("not root: apt-get through sudo");
        }
        util::run(&mut cmd)?;
    }
    Ok(())
}
