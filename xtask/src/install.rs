//! `cargo xtask install` / `cargo xtask uninstall`: paqet as a system service.
//!
//! install: build (release), put the binary at /opt/flowless/bin/paqet, create the
//! system user and group `flowless-paqet`, write /etc/flowless/paqet.conf from
//! dist/paqet.conf only when it is absent (never overwritten; 0600, owned by
//! flowless-paqet: it will hold the key), install /etc/systemd/system/paqet.service,
//! verify it with `systemd-analyze verify`, and `systemctl daemon-reload` when systemd
//! is running. uninstall: remove the binary and the unit; the config and the user stay
//! unless `--purge`.
//!
//! `--destdir DIR` stages everything under DIR instead of / (packaging, tests); the
//! user is still created on the host, since the config must be owned by it.

use crate::util::{self, step};
use anyhow::{Context, Result, bail};
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const USER: &str = "flowless-paqet";
pub const BIN: &str = "/opt/flowless/bin/paqet";
pub const CONFIG: &str = "/etc/flowless/paqet.conf";
pub const UNIT: &str = "/etc/systemd/system/paqet.service";

#[derive(clap::Args)]
pub struct Args {
    /// Install this binary instead of building one.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Stage the files under DIR instead of / (the user is still created on this host).
    #[arg(long, value_name = "DIR")]
    pub destdir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct UninstallArgs {
    /// Also remove /etc/flowless/paqet.conf and the flowless-paqet user.
    #[arg(long)]
    pub purge: bool,
    /// Remove from the staging root DIR instead of / (see install --destdir).
    #[arg(long, value_name = "DIR")]
    pub destdir: Option<PathBuf>,
}

fn under(destdir: &Option<PathBuf>, path: &str) -> PathBuf {
    match destdir {
        Some(d) => d.join(path.trim_start_matches('/')),
        None => PathBuf::from(path),
    }
}

/// systemd is the init system when /run/systemd/system exists (what sd_booted checks).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is NUL-terminated; getpwnam returns null or a pointer to static data
    // that we copy out of at once (xtask is single-threaded here).
    unsafe {
        let pw = libc::getpwnam(c.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    }
}

fn nologin() -> &'static str {
    ["/usr/sbin/nologin", "/sbin/nologin"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("/bin/false")
}

/// Creates the system user and group (no login shell, no home) unless they exist.
pub fn ensure_user() -> Result<(u32, u32)> {
    if let Some(ids) = user_ids(USER) {
        eprintln!("    user {USER} exists (uid {}, gid {}), keeping it", ids.0, ids.1);
        return Ok(ids);
    }
    util::run(Command::new("useradd").args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        nologin(),
        "--comment",
        "paqet relay",
        USER,
    ]))?;
    user_ids(USER).with_context(|| format!("useradd succeeded but {USER} is unknown"))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).with_context(|| format!("chown {}", path.display()))
}

/// Copies `src` to `dst` through a temporary file and a rename, so a running binary is
/// replaced rather than overwritten (which would fail with ETXTBSY).
fn install_file(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    let dir = dst.parent().context("destination has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.new",
        dst.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::copy(src, &tmp).with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, dst).with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    eprintln!("    installed {} (mode {mode:o})", dst.display());
    Ok(())
}

/// `binary` when given, else a fresh release build (install and deb ship either).
pub fn given_or_built(binary: &Option<PathBuf>) -> Result<PathBuf> {
    match binary {
        Some(b) => Ok(b.clone()),
        None => crate::build::run(&crate::build::Args {
            release: true,
            debug: false,
        }),
    }
}

fn dist(name: &str) -> PathBuf {
    util::root().join("dist").join(name)
}

pub fn run(args: &Args) -> Result<()> {
    if !util::is_root() {
        bail!("install writes /opt, /etc and creates a system user: run it as root");
    }
    let built = given_or_built(&args.binary)?;
    step(format!("install: binary {BIN}"));
    install_file(&built, &under(&args.destdir, BIN), 0o755)?;

    step(format!("install: system user and group {USER}"));
    let (uid, gid) = ensure_user()?;

    step(format!("install: config {CONFIG}"));
    let config = under(&args.destdir, CONFIG);
    if config.exists() {
        let mode = std::fs::metadata(&config)?.permissions().mode() & 0o777;
        eprintln!("    {} exists: keeping it (never overwritten)", config.display());
        if mode & 0o077 != 0 {
            eprintln!(
                "    warning: it is readable by group or others (mode {mode:o}); paqet refuses a key in such a file: chmod 600 {}",
                config.display()
            );
        }
    } else {
        let dir = config.parent().context("config path has no parent")?;
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        install_file(&dist("paqet.conf"), &config, 0o600)?;
        chown(&config, uid, gid)?;
        eprintln!("    owned by {USER}; edit it (see its comments), then `paqet check --config {CONFIG}`");
    }

    step(format!("install: unit {UNIT}"));
    let unit = under(&args.destdir, UNIT);
    install_file(&dist("paqet.service"), &unit, 0o644)?;
    verify_unit(&unit, &under(&args.destdir, BIN))?;

    if args.destdir.is_none() && systemd_running() {
        util::run(Command::new("systemctl").arg("daemon-reload"))?;
        step("install: done; start it with `systemctl enable --now paqet`, logs: `journalctl -u paqet`");
    } else if args.destdir.is_some() {
        step("install: staged; systemd not touched");
    } else {
        step(
            "install: systemd is not running on this machine (no /run/systemd/system): skipped \
             `systemctl daemon-reload`; run the service by hand as the unit does, or reboot into systemd",
        );
    }
    Ok(())
}

/// `systemd-analyze verify` needs the ExecStart binary to exist: when the unit's binary
/// is staged elsewhere (destdir), verify a copy pointing at the staged one.
pub fn verify_unit(unit: &Path, bin: &Path) -> Result<()> {
    let Some(analyze) = util::which("systemd-analyze") else {
        eprintln!(
            "    systemd-analyze not found (package systemd; `cargo xtask setup` installs it): not verifying the unit"
        );
        return Ok(());
    };
    let text = std::fs::read_to_string(unit)?;
    let target = if bin == Path::new(BIN) {
        unit.to_path_buf()
    } else {
        let dir = std::env::temp_dir().join(format!("paqet-verify-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let copy = dir.join("paqet.service");
        std::fs::write(&copy, text.replace(BIN, &bin.to_string_lossy()))?;
        copy
    };
    eprintln!("    $ {} verify {}", analyze.display(), target.display());
    let out = Command::new(&analyze).arg("verify").arg(&target).output()?;
    if target != unit {
        let _ = std::fs::remove_dir_all(target.parent().unwrap_or(&target));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stderr.trim().is_empty() {
        bail!(
            "systemd-analyze verify {} failed ({}): {}",
            unit.display(),
            out.status,
            stderr.trim()
        );
    }
    eprintln!("    unit verified");
    Ok(())
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            eprintln!("    removed {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("    {} is not there, skipping", path.display());
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

pub fn uninstall(args: &UninstallArgs) -> Result<()> {
    if !util::is_root() {
        bail!("uninstall removes files from /opt and /etc: run it as root");
    }
    let live = args.destdir.is_none() && systemd_running();
    if live {
        step("uninstall: stopping and disabling paqet.service");
        // Not installed or not running is fine: ignore the exit status.
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "paqet.service"])
            .status();
    } else if args.destdir.is_none() {
        step("uninstall: systemd is not running: nothing to stop or disable (stop a hand-started paqet with SIGTERM)");
    }
    step("uninstall: binary and unit");
    remove(&under(&args.destdir, BIN))?;
    let bin_dir = under(&args.destdir, "/opt/flowless/bin");
    let _ = std::fs::remove_dir(&bin_dir).and_then(|_| std::fs::remove_dir(under(&args.destdir, "/opt/flowless")));
    remove(&under(&args.destdir, UNIT))?;
    if live {
        util::run(Command::new("systemctl").arg("daemon-reload"))?;
    }
    let config = under(&args.destdir, CONFIG);
    if args.purge {
        step("uninstall --purge: config and user");
        remove(&config)?;
        let _ = std::fs::remove_dir(under(&args.destdir, "/etc/flowless"));
        if user_ids(USER).is_some() {
            util::run(Command::new("userdel").arg(USER))?;
        }
    } else if config.exists() {
        step(format!(
            "uninstall: keeping {} and the user {USER} (--purge removes them)",
            config.display()
        ));
    }
    step("uninstall: done");
    Ok(())
}
