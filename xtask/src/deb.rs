//! `cargo xtask deb`: paqet as a Debian package, target/debian/paqet_VERSION_ARCH.deb.
//!
//! Written with `dpkg-deb --build --root-owner-group` from a tree staged under
//! target/debian/: dpkg-deb is on every Debian machine already, needs nothing compiled
//! (cargo-deb would be a `cargo install` of several minutes on two cores) and puts
//! exactly the files staged here into the package, owned by root.
//!
//! Contents: /opt/flowless/bin/paqet (stripped) with /usr/bin/paqet linking to it,
//! /lib/systemd/system/paqet.service, /etc/flowless/paqet.conf as a conffile (mode
//! 0600; postinst gives it to flowless-paqet) and the maintainer scripts of
//! dist/debian/ (user and group, config owner, upgrade restart, purge).

use crate::install::{BIN, CONFIG};
use crate::util::{self, step};
use anyhow::{Context, Result, bail};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const UNIT: &str = "/lib/systemd/system/paqet.service";
const MAINTAINER_SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];

#[derive(clap::Args)]
pub struct Args {
    /// Package this binary instead of building one.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

/// Builds (unless `--binary`), stages and packages; returns the .deb's path.
pub fn run(args: &Args) -> Result<PathBuf> {
    let built = crate::install::given_or_built(&args.binary)?;
    let out = util::target_dir().join("debian");
    let tree = out.join("paqet");
    step(format!("deb: staging {}", tree.display()));
    match std::fs::remove_dir_all(&tree) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tree.display())),
    }
    stage(&tree, &built)?;
    let deb = out.join(format!("paqet_{}_{}.deb", version(), arch()?));
    step(format!("deb: writing {}", deb.display()));
    util::run(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group"])
            .arg(&tree)
            .arg(&deb),
    )?;
    step(format!("deb: done; install it with `apt install {}`", deb.display()));
    Ok(deb)
}

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn arch() -> Result<String> {
    let out = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context("running dpkg --print-architecture (is this Debian?)")?;
    if !out.status.success() {
        bail!("dpkg --print-architecture failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn put(tree: &Path, path: &str, contents: &[u8], mode: u32) -> Result<()> {
    let dst = tree.join(path.trim_start_matches('/'));
    let dir = dst.parent().context("staged path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(&dst, contents).with_context(|| format!("writing {}", dst.display()))?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", dst.display()))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

const MANPAGE: &str = "/usr/share/man/man1/paqet.1";
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "/usr/share/bash-completion/completions/paqet"),
    ("zsh", "/usr/share/zsh/vendor-completions/_paqet"),
    ("fish", "/usr/share/fish/vendor_completions.d/paqet.fish"),
];

fn stage(tree: &Path, binary: &Path) -> Result<()> {
    let dist = util::root().join("dist");
    put(tree, BIN, &read(binary)?, 0o755)?;
    // The release profile keeps line tables (debug = 1) for backtraces in development;
    // the package ships the binary stripped as dh_strip would (40 MB → a few).
    util::run(
        Command::new("strip")
            .args([
                "--remove-section=.comment",
                "--remove-section=.note",
                "--strip-unneeded",
            ])
            .arg(tree.join(BIN.trim_start_matches('/'))),
    )?;
    let usr_bin = tree.join("usr/bin");
    std::fs::create_dir_all(&usr_bin)?;
    std::os::unix::fs::symlink(BIN, usr_bin.join("paqet")).context("symlinking /usr/bin/paqet")?;
    put(tree, UNIT, &read(&dist.join("paqet.service"))?, 0o644)?;
    put(tree, CONFIG, &read(&dist.join("paqet.conf"))?, 0o600)?;
    stage_manual(tree, binary)?;
    put(tree, "/usr/share/doc/paqet/copyright", copyright().as_bytes(), 0o644)?;
    put(tree, "/usr/share/doc/paqet/changelog", changelog().as_bytes(), 0o644)?;
    util::run(
        Command::new("gzip")
            .args(["-9nf"])
            .arg(tree.join("usr/share/doc/paqet/changelog")),
    )?;
    put(
        tree,
        "/usr/share/lintian/overrides/paqet",
        &read(&dist.join("debian/lintian-overrides"))?,
        0o644,
    )?;
    for script in MAINTAINER_SCRIPTS {
        put(
            tree,
            &format!("DEBIAN/{script}"),
            &read(&dist.join("debian").join(script))?,
            0o755,
        )?;
    }
    put(tree, "DEBIAN/conffiles", format!("{CONFIG}\n").as_bytes(), 0o644)?;
    put(tree, "DEBIAN/control", control(tree, binary)?.as_bytes(), 0o644)?;
    directories_0755(tree)
}

/// Directories are made with the builder's umask (027 would give dpkg-deb a DEBIAN/ it
/// refuses, and the package directories other users cannot enter): set them as Debian
/// ships them.
fn directories_0755(dir: &Path) -> Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", dir.display()))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            directories_0755(&entry.path())?;
        }
    }
    Ok(())
}

/// The newest glibc symbol version the binary links against: the libc6 it needs (what
/// dpkg-shlibdeps would find, without a debian/ source tree).
fn glibc_floor(binary: &Path) -> Result<String> {
    let out = Command::new("objdump")
        .arg("-T")
        .arg(binary)
        .output()
        .context("running objdump -T (binutils)")?;
    if !out.status.success() {
        bail!("objdump -T {} failed ({})", binary.display(), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let parts: Option<Vec<u32>> = v.split('.').map(|p| p.parse().ok()).collect();
            parts.map(|p| (p, v.to_owned()))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, v)| v)
        .with_context(|| format!("{} names no GLIBC_ symbol version", binary.display()))
}

/// The man page and the completions, printed by the binary itself from its clap
/// definitions (`paqet manpage`, `paqet completions SHELL`).
fn stage_manual(tree: &Path, binary: &Path) -> Result<()> {
    put(tree, MANPAGE, &printed_by(binary, &["manpage"])?, 0o644)?;
    util::run(
        Command::new("gzip")
            .args(["-9nf"])
            .arg(tree.join(MANPAGE.trim_start_matches('/'))),
    )?;
    for (shell, path) in COMPLETIONS {
        put(tree, path, &printed_by(binary, &["completions", shell])?, 0o644)?;
    }
    Ok(())
}

fn printed_by(binary: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(binary)
        .args(args)
        .output()
        .with_context(|| format!("running {} {}", binary.display(), args.join(" ")))?;
    anyhow::ensure!(
        out.status.success(),
        "{} {} failed: {}",
        binary.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn copyright() -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: paqet\nSource: {}\n\nFiles: *\nCopyright: 2026 flowless\nLicense: {}\n",
        env!("CARGO_PKG_REPOSITORY"),
        env!("CARGO_PKG_LICENSE")
    )
}

/// A native package's changelog: one entry for the version being built.
fn changelog() -> String {
    format!(
        "paqet ({}) unstable; urgency=medium\n\n  * Built by cargo xtask deb.\n\n \
         -- flowless <paqet@example.invalid>  Sat, 05 Dec 2026 00:00:00 +0000\n",
        version()
    )
}

/// Installed-Size is in KiB, of everything outside DEBIAN/.
fn installed_kib(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        if meta.is_dir() {
            if entry.file_name() != "DEBIAN" {
                total += installed_kib(&entry.path())?;
            }
        } else {
            total += meta.len().div_ceil(1024);
        }
    }
    Ok(total)
}

fn control(tree: &Path, binary: &Path) -> Result<String> {
    let glibc = glibc_floor(binary)?;
    Ok(format!(
        "Package: paqet\n\
         Version: {}\n\
         Architecture: {}\n\
         Maintainer: flowless <paqet@example.invalid>\n\
         Installed-Size: {}\n\
         Depends: libc6 (>= {glibc}), libgcc-s1, passwd\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: {}\n\
         Description: SOCKS5 over KCP relay with an XDP/AF_XDP transport\n \
         paqet relays TCP connections and UDP datagrams from a local SOCKS5 port\n \
         (or fixed forwards) to a paqet server over KCP, steered by XDP where the\n \
         host allows it and over plain UDP elsewhere. Runs as the systemd service\n \
         paqet.service; the configuration is /etc/flowless/paqet.conf.\n",
        version(),
        arch()?,
        installed_kib(tree)?,
        env!("CARGO_PKG_REPOSITORY"),
    ))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

    use super::*;

    #[test]
    fn staged_directories_get_0755_whatever_the_umask() {
        let root = std::env::temp_dir().join(format!("paqet-deb-dirs-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("DEBIAN/x"))
            .unwrap();
        std::fs::write(root.join("DEBIAN/control"), "x").unwrap();
        std::fs::set_permissions(root.join("DEBIAN/control"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let result = directories_0755(&root);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let modes = (
            mode(&root),
            mode(&root.join("DEBIAN")),
            mode(&root.join("DEBIAN/x")),
            mode(&root.join("DEBIAN/control")),
        );
        std::fs::remove_dir_all(&root).unwrap();
        result.unwrap();
        assert_eq!(modes, (0o755, 0o755, 0o755, 0o600), "directories 0755, files untouched");
    }

    #[test]
    fn the_libc_dependency_is_the_newest_glibc_symbol_version_linked() {
        let this_test = std::env::current_exe().unwrap();
        let v = glibc_floor(&this_test).unwrap();
        let parts: Vec<u32> = v.split('.').map(|p| p.parse().unwrap()).collect();
        assert!(parts[0] == 2 && parts.len() >= 2, "{v}");
    }
}
