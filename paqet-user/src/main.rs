//! The `paqet` binary: parse the command line, load the config, and run a role.

use std::process::ExitCode;

use anyhow::{Context, Result};
use base64::Engine as _;
use clap::Parser;

use paqet::cli::{Cli, Command, RunArgs};
use paqet::config::{Config, LogLevel, Role};

fn init_logging(level: LogLevel) {
    // RUST_LOG, when set, refines the configured level (e.g. `paqet=debug,kcp=warn`).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.as_str()));
    // Colours only on a terminal: under systemd the journal would store escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

fn load(args: &RunArgs, role: Option<Role>) -> Result<Config> {
    Ok(Config::load(args.config.as_deref(), &args.overrides(), role)?)
}

fn run_role(args: &RunArgs, role: Option<Role>) -> Result<()> {
    let config = load(args, role)?;
    init_logging(config.log_level);
    // Before any socket: the SOCKS port's descriptor watermark reads the raised limit.
    paqet::ops::limits::raise_open_files();
    if !paqet::ops::heap::keep_freed_memory() {
        tracing::debug!("the allocator refused its tuning; freed memory goes back to the kernel at once");
    }
    // One thread: every task shares the engine's lock and hands work to the others, so
    // a second worker mostly adds futex wake-ups and lock contention. Measured with
    // `cargo xtask bench` (BENCHMARKS.md): xdp one stream 200 → 337 MB/s, and less CPU
    // per GiB; the peer process and the kernel use the machine's other cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(paqet::roles::run(config))
}

fn genkey() {
    let mut key = [0u8; 32];
    rand::fill(&mut key);
    println!("{}", base64::engine::general_purpose::STANDARD.encode(key));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Client(args) => run_role(args, Some(Role::Client)),
        Command::Server(args) => run_role(args, Some(Role::Server)),
        Command::Run(args) => run_role(args, None),
        Command::Check(args) => paqet::ops::check::run(args),
        Command::Status(args) => paqet::ops::status::run(args),
        Command::Genkey => {
            genkey();
            Ok(())
        }
        Command::Completions { shell } => {
            paqet::ops::manual::write_completions(*shell, &mut std::io::stdout()).map_err(Into::into)
        }
        Command::Manpage => paqet::ops::manual::write_manpage(&mut std::io::stdout()).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paqet: {e:#}");
            ExitCode::FAILURE
        }
    }
}
