//! The Debian package (`cargo xtask deb`, PAQET_DEB): installed with `dpkg -i` into a
//! throwaway copy of this machine (a private mount namespace holding an overlay of /
//! whose writes go to a tmpfs, entered with chroot), then removed and purged. Nothing
//! it does reaches the host's root filesystem or its dpkg database.

use anyhow::{Context, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use paqet_tests::{ChildGuard, require_root, run_checked};

const USER: &str = "flowless-paqet";
const CONFIG: &str = "/etc/flowless/paqet.conf";

fn deb() -> PathBuf {
    let Some(p) = std::env::var_os("PAQET_DEB") else {
        panic!("PAQET_DEB is not set: `cargo xtask test` builds the package and sets it (or run `cargo xtask deb`)");
    };
    let p = PathBuf::from(p);
    assert!(
        p.is_file(),
        "PAQET_DEB={} does not exist: run `cargo xtask deb`",
        p.display()
    );
    p
}

/// An overlay of / in its own mount namespace (held open by a sleeping child): the
/// chroot sees this machine's files, and every write lands in a tmpfs that goes away
/// with the namespace.
struct Scratch {
    holder: ChildGuard,
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("paqet-pkg-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let holder = ChildGuard::spawn(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sleep", "600"])
                .stdin(Stdio::null()),
        )?;
        let s = Scratch { holder, dir };
        let d = s.dir.display();
        // /proc and /dev for dpkg and useradd; fresh /tmp and /run so nothing of the
        // host's leaks in (no /run/systemd/system: the scripts must not call systemctl).
        s.in_ns(&format!(
            "set -e; mount -t tmpfs tmpfs {d}; mkdir {d}/u {d}/w {d}/m; \
             mount -t overlay overlay -o lowerdir=/,upperdir={d}/u,workdir={d}/w {d}/m; \
             mount --bind /proc {d}/m/proc; mount --bind /dev {d}/m/dev; \
             mount -t tmpfs tmpfs {d}/m/tmp; mount -t tmpfs tmpfs {d}/m/run"
        ))?;
        Ok(s)
    }

    fn root(&self) -> PathBuf {
        self.dir.join("m")
    }

    /// `path` of the copy as this process can reach it: through the holder's
    /// /proc/PID/root, since the mounts exist only in its namespace.
    fn reach(&self, path: &str) -> PathBuf {
        Path::new("/proc")
            .join(self.holder.id().to_string())
            .join("root")
            .join(self.root().strip_prefix("/").unwrap_or(&self.root()))
            .join(path.trim_start_matches('/'))
    }

    fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.holder.id().to_string(), "-m"]);
        c
    }

    fn in_ns(&self, script: &str) -> Result<Output> {
        run_checked(self.nsenter().args(["sh", "-c", script]))
    }

    /// `args` run chrooted in the copy; Ok even when it fails (the caller looks).
    fn chroot(&self, args: &[&str]) -> Result<Output> {
        let out = self.nsenter().arg("chroot").arg(self.root()).args(args).output()?;
        eprintln!(
            "$ {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    fn chroot_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.chroot(args)?;
        anyhow::ensure!(out.status.success(), "{} failed ({})", args.join(" "), out.status);
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn meta(&self, path: &str) -> Option<std::fs::Metadata> {
        self.reach(path).symlink_metadata().ok()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // The mounts live only in the holder's namespace: they end with it.
        let _ = self.holder.0.kill();
        let _ = self.holder.0.wait();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn user_in(s: &Scratch) -> Result<Option<(u32, u32)>> {
    let out = s.chroot(&["getent", "passwd", USER])?;
    if !out.status.success() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let f: Vec<&str> = line.trim().split(':').collect();
    let uid = f.get(2).context("getent: no uid")?.parse()?;
    let gid = f.get(3).context("getent: no gid")?.parse()?;
    Ok(Some((uid, gid)))
}

#[test]
fn deb_installs_removes_and_purges() -> Result<()> {
    if !require_root("deb_installs_removes_and_purges") {
        return Ok(());
    }
    let deb = deb();
    let s = Scratch::new()?;
    // The host may have the user (the service tests make it): the copy must not, so
    // that postinst is seen creating it.
    if user_in(&s)?.is_some() {
        s.chroot_ok(&["userdel", USER])?;
    }
    assert!(
        !s.chroot(&["dpkg-query", "-W", "paqet"])?.status.success(),
        "this machine has a paqet package installed: the test needs it without"
    );
    std::fs::copy(&deb, s.reach("/tmp/paqet.deb")).context("copying the .deb into the copy")?;

    let out = s.chroot(&["dpkg", "-i", "/tmp/paqet.deb"])?;
    assert!(out.status.success(), "dpkg -i failed");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("sets no KEY"),
        "postinst must say why the service is not started: {said}"
    );

    for (path, mode) in [
        ("/opt/flowless/bin/paqet", 0o755),
        ("/lib/systemd/system/paqet.service", 0o644),
        (CONFIG, 0o600),
    ] {
        let m = s.meta(path).with_context(|| format!("{path} is not installed"))?;
        assert_eq!(m.mode() & 0o7777, mode, "mode of {path}");
    }
    let link = s.meta("/usr/bin/paqet").context("/usr/bin/paqet is not installed")?;
    assert!(link.file_type().is_symlink(), "/usr/bin/paqet must be a symlink");
    let (uid, gid) = user_in(&s)?.context("postinst did not create the user")?;
    let conf = s.meta(CONFIG).context("config missing")?;
    assert_eq!((conf.uid(), conf.gid()), (uid, gid), "the config must belong to {USER}");
    let shell = s.chroot_ok(&["getent", "passwd", USER])?;
    assert!(
        shell.trim().ends_with("nologin"),
        "{USER} must have no login shell: {shell}"
    );
    s.chroot_ok(&["/usr/bin/paqet", "--version"])?;
    let verify = s.chroot(&["systemd-analyze", "verify", "/lib/systemd/system/paqet.service"])?;
    assert!(
        verify.status.success(),
        "systemd-analyze verify failed on the installed unit"
    );
    assert!(
        String::from_utf8_lossy(&verify.stderr).trim().is_empty(),
        "systemd-analyze verify complained"
    );
    assert!(
        s.chroot(&["dpkg-query", "-W", "-f=${Conffiles}", "paqet"])?
            .stdout
            .windows(CONFIG.len())
            .any(|w| w == CONFIG.as_bytes()),
        "{CONFIG} must be a conffile"
    );

    s.chroot_ok(&["dpkg", "-r", "paqet"])?;
    assert!(s.meta("/opt/flowless/bin/paqet").is_none(), "dpkg -r left the binary");
    assert!(
        s.meta("/lib/systemd/system/paqet.service").is_none(),
        "dpkg -r left the unit"
    );
    assert!(s.meta(CONFIG).is_some(), "dpkg -r must keep the config");
    assert!(user_in(&s)?.is_some(), "dpkg -r must keep the user");

    s.chroot_ok(&["dpkg", "-P", "paqet"])?;
    assert!(s.meta(CONFIG).is_none(), "dpkg -P must remove the config");
    assert!(s.meta("/etc/flowless").is_none(), "dpkg -P must remove /etc/flowless");
    assert!(user_in(&s)?.is_none(), "dpkg -P must remove the user");
    assert!(
        !s.chroot(&["dpkg-query", "-W", "paqet"])?.status.success()
            || s.chroot_ok(&["dpkg-query", "-W", "-f=${Status}", "paqet"])?
                .contains("not-installed"),
        "dpkg -P must leave no trace in dpkg's database"
    );
    Ok(())
}
