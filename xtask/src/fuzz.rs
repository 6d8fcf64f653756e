//! `cargo xtask fuzz`: runs paqet's cargo-fuzz targets (fuzz/), each for a bounded time.
//!
//! Installs cargo-fuzz when missing, then `RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET --
//! -max_total_time=N` per target from `fuzz/` (libFuzzer with ASan on the stable
//! toolchain). Before each run the target writes its seed inputs into its corpus
//! directory (PAQET_FUZZ_SEEDS). Fails if any target crashes; the crashing input is in
//! fuzz/artifacts/TARGET/.

use crate::util::{self, step};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Instant;

/// Every fuzz target, in the order they run.
pub const TARGETS: &[&str] = &["packet_decoder", "socks_request", "arq_input"];
/// Builds on rustc 1.95 with `--locked`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(clap::Args)]
pub struct Args {
    /// Run only this target (default: every target).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
}

/// One target's run, for the summary.
pub struct Outcome {
    pub target: String,
    pub crashed: bool,
    pub execs: Option<u64>,
    pub seconds: f64,
}

pub fn run(args: &Args) -> Result<()> {
    let targets: Vec<&str> = match &args.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    let outcomes = run_targets(&targets, args.seconds)?;
    report(&outcomes)
}

/// Prints one line per target; an error if any crashed.
pub fn report(outcomes: &[Outcome]) -> Result<()> {
    step("fuzz summary");
    for o in outcomes {
        let execs = o.execs.map_or("?".to_string(), |n| n.to_string());
        let verdict = if o.crashed { "CRASHED" } else { "ok" };
        eprintln!(
            "    {:<16} {verdict:<8} {execs} executions in {:.0} s",
            o.target, o.seconds
        );
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crashed)
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz target(s) crashed: {}; the inputs are in fuzz/artifacts/<target>/, reproduce with \
             `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <input>`",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// Installs cargo-fuzz if needed and runs each target for `seconds`.
pub fn run_targets(targets: &[&str], seconds: u64) -> Result<Vec<Outcome>> {
    ensure_cargo_fuzz()?;
    ensure_ebpf_object()?;
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(run_one(target, seconds)?);
    }
    Ok(outcomes)
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = util::cargo_cmd()
        .args(["fuzz", "--version"])
        .env("PATH", util::path_with_cargo_bin())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        return Ok(());
    }
    step(format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install, about a minute)"
    ));
    util::run(util::cargo_cmd().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))
}

/// paqet-user embeds the eBPF object, so the fuzz build needs it too.
fn ensure_ebpf_object() -> Result<()> {
    if crate::build::ebpf_object().is_file() {
        return Ok(());
    }
    crate::build::build_ebpf().map(|_| ())
}

fn run_one(target: &str, seconds: u64) -> Result<Outcome> {
    let dir = util::root().join("fuzz");
    let corpus = dir.join("corpus").join(target);
    step(format!(
        "fuzzing {target} for {seconds} s (the first run builds it with ASan: minutes)"
    ));
    let mut cmd = util::cargo_cmd();
    cmd.current_dir(&dir)
        .args(["fuzz", "run", target, "--"])
        .arg(format!("-max_total_time={seconds}"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PAQET_FUZZ_SEEDS", &corpus)
        .env("PATH", util::path_with_cargo_bin())
        .stderr(Stdio::piped());
    eprintln!(
        "    $ RUSTC_BOOTSTRAP=1 PAQET_FUZZ_SEEDS={} cargo fuzz run {target} -- -max_total_time={seconds}   (in {})",
        corpus.display(),
        dir.display()
    );
    let started = Instant::now();
    let mut child = cmd.spawn().context("could not start `cargo fuzz`")?;
    let stderr = child.stderr.take().context("no stderr")?;
    // Pass libFuzzer's output through, minus the line-per-new-input noise, and keep the
    // execution count of its final "Done N runs in S second(s)" line.
    let mut execs = None;
    let mut fuzzing_since = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        if line.starts_with("INFO: seed corpus") {
            fuzzing_since = Some(Instant::now());
        }
        if let Some(rest) = line.strip_prefix("Done ")
            && let Some(n) = rest.split_whitespace().next()
        {
            execs = n.parse().ok();
        }
        // libFuzzer's per-input lines: "#1234\tNEW    cov: ..." (a tab after the count).
        let noisy = line.starts_with('#')
            && line
                .split_whitespace()
                .nth(1)
                .is_some_and(|word| ["NEW", "REDUCE", "pulse"].contains(&word));
        if !noisy {
            eprintln!("{line}");
        }
    }
    let status = child.wait()?;
    let seconds = fuzzing_since.unwrap_or(started).elapsed().as_secs_f64();
    Ok(Outcome {
        target: target.to_string(),
        crashed: !status.success(),
        execs,
        seconds,
    })
}
