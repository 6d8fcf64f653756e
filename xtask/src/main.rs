//! `cargo xtask`: the developer and operator entry points of paqet.
//!
//! Each subcommand lives in its own module so new ones (bench, install, fuzz, ...) are
//! one file and one enum arm.

mod bench;
mod build;
mod deb;
mod fuzz;
mod install;
mod run;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "paqet's build, run and test entry points"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing paqet needs (apt packages, bpf-linker).
    Setup(setup::Args),
    /// Build the eBPF object, then the `paqet` binary that embeds it.
    Build(build::Args),
    /// Build, then run `target/release/paqet ARGS`; with no ARGS, run the demo.
    Run(run::Args),
    /// Setup, build, then run the whole test suite (as CI does).
    Test(test::Args),
    /// Build, then install paqet as a service (/opt/flowless/bin/paqet, user flowless-paqet, paqet.service).
    Install(install::Args),
    /// Build, then write the Debian package target/debian/paqet_VERSION_ARCH.deb.
    Deb(deb::Args),
    /// Benchmarks: paqet (xdp, udp) beside the raw ceilings, kcptun and TCP (needs root).
    Bench(bench::Args),
    /// Remove the installed binary and unit (the config and user stay unless --purge).
    Uninstall(install::UninstallArgs),
    /// Run the cargo-fuzz targets (fuzz/) for a bounded time each; fails on a crash.
    Fuzz(fuzz::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(a) => setup::run(&a),
        Command::Build(a) => build::run(&a).map(|_| ()),
        Command::Run(a) => run::run(&a),
        Command::Test(a) => test::run(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Fuzz(a) => fuzz::run(&a),
        Command::Install(a) => install::run(&a),
        Command::Deb(a) => deb::run(&a).map(|_| ()),
        Command::Uninstall(a) => install::uninstall(&a),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}
