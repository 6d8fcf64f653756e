//! Small helpers shared by the subcommands: where things are, and running commands
//! loudly (every external command is printed before it runs).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

pub fn step(msg: impl AsRef<str>) {
    eprintln!("==> {}", msg.as_ref());
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The cargo that runs us (so a `cargo +toolchain xtask` stays on that toolchain).
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// A command for that cargo, without the package variables `cargo run` gave xtask
/// (CARGO_PKG_NAME=xtask, CARGO_MANIFEST_DIR=.../xtask, ...). ring's build script asks
/// to rerun when those change, and cargo compares them with its own environment: left
/// in, every switch between `cargo xtask ...` and a plain `cargo build`/`cargo test`
/// rebuilt ring, snow and paqet-user.
pub fn cargo_cmd() -> Command {
    let mut cmd = Command::new(cargo());
    for (key, _) in std::env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        let from_cargo_run = k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                k,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_RUSTC_CURRENT_DIR"
            );
        if from_cargo_run {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// `cmd` run as root: itself when we are root, else through `sudo -E` (None: no sudo).
pub fn as_root(cmd: Command) -> Option<Command> {
    if is_root() {
        return Some(cmd);
    }
    let mut s = Command::new(which("sudo")?);
    s.arg("-E").arg(cmd.get_program());
    copy_setup(&cmd, &mut s);
    Some(s)
}

/// Arguments, environment changes and directory of `from`, onto `to`.
fn copy_setup(from: &Command, to: &mut Command) {
    to.args(from.get_args());
    for (k, v) in from.get_envs() {
        match v {
            Some(v) => to.env(k, v),
            None => to.env_remove(k),
        };
    }
    if let Some(d) = from.get_current_dir() {
        to.current_dir(d);
    }
}

pub fn cargo_home_bin() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}

/// PATH with `$CARGO_HOME/bin` appended, so a freshly installed bpf-linker is found
/// even when the shell's PATH does not list it.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(bin) = cargo_home_bin()
        && !paths.contains(&bin)
    {
        paths.push(bin);
    }
    std::env::join_paths(paths).unwrap_or_default()
}

/// Finds `program` on PATH (plus `$CARGO_HOME/bin`).
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&path_with_cargo_bin())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v
            && k != "PATH"
        {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!("   (in {})", dir.display()));
    }
    s
}

/// Runs a command with inherited stdio; a non-zero exit is an error naming the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    eprintln!("    $ {what}");
    let status = cmd.status().with_context(|| format!("could not start `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// The host build's target directory (honours CARGO_TARGET_DIR like cargo does).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { root().join(d) }
        }
        None => root().join("target"),
    }
}
