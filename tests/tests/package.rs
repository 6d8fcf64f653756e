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
        // Tests run in parallel threads of one process: each copy needs its own folder.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("paqet-pkg-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let holder = ChildGuard::spawn(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sleep", "600"])
                .stdin(Stdio::null()),
        )?;
        let s = Scratch { holder, dir };
        s.wait_for_own_namespace()?;
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

    /// Until `unshare` has run, the holder is still in this machine's mount namespace,
    /// and mounts made through it would land on the host.
    fn wait_for_own_namespace(&self) -> Result<()> {
        let ours = std::fs::read_link("/proc/self/ns/mnt")?;
        let theirs = format!("/proc/{}/ns/mnt", self.holder.id());
        for _ in 0..500 {
            if std::fs::read_link(&theirs).is_ok_and(|ns| ns != ours) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        anyhow::bail!("unshare did not make its own mount namespace within 5 s")
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

/// A fresh copy, without paqet or its user, holding the package at /tmp/paqet.deb.
fn copy_with_deb() -> Result<Scratch> {
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
    Ok(s)
}

#[test]
fn deb_installs_removes_and_purges() -> Result<()> {
    if !require_root("deb_installs_removes_and_purges") {
        return Ok(());
    }
    let s = copy_with_deb()?;

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
    // The man page and completions come from the binary's clap definitions.
    let page = s.chroot_ok(&["man", "-l", "/usr/share/man/man1/paqet.1.gz"])?;
    assert!(
        page.contains("CONFIGURATION") && page.contains("SOCKS_ADDR") && page.contains("EXIT STATUS"),
        "man -l did not render the page: {page}"
    );
    let complete = s.chroot_ok(&[
        "bash",
        "-c",
        "source /usr/share/bash-completion/completions/paqet; complete -p paqet",
    ])?;
    assert!(complete.contains("paqet"), "bash found no completion: {complete}");
    for path in [
        "/usr/share/zsh/vendor-completions/_paqet",
        "/usr/share/fish/vendor_completions.d/paqet.fish",
    ] {
        assert!(s.meta(path).is_some(), "{path} is not installed");
    }
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

/// Polls `cond` every 250 ms for at most `secs` seconds.
fn poll(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    paqet_tests::wait_for(&mut cond, std::time::Duration::from_secs(secs))
}

/// The copy booted with systemd as PID 1 (systemd-nspawn -b, private network: only lo).
struct Booted<'a> {
    _scratch: &'a Scratch,
    nspawn: ChildGuard,
}

impl Booted<'_> {
    fn pid1(&self) -> Option<String> {
        let out = Command::new("pgrep")
            .args(["-P", &self.nspawn.id().to_string()])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_string)
    }

    /// `args` run inside the container; its output (stdout) and whether it succeeded.
    fn exec(&self, args: &[&str]) -> (bool, String) {
        let Some(pid) = self.pid1() else {
            return (false, "the container has no PID 1".into());
        };
        match Command::new("nsenter")
            .args(["-t", &pid, "-m", "-u", "-i", "-n", "-p"])
            .args(args)
            .output()
        {
            Ok(o) => (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).trim().to_string(),
            ),
            Err(e) => (false, e.to_string()),
        }
    }

    fn show(&self, prop: &str) -> String {
        self.exec(&["systemctl", "show", "-p", prop, "--value", "paqet"]).1
    }
}

impl Drop for Booted<'_> {
    fn drop(&mut self) {
        let _ = self.exec(&["systemctl", "poweroff"]);
        let _ = self.nspawn.wait_exit(std::time::Duration::from_secs(20));
    }
}

#[test]
fn unit_runs_under_systemd_in_a_container_without_bpffs() -> Result<()> {
    if !require_root("unit_runs_under_systemd_in_a_container_without_bpffs") {
        return Ok(());
    }
    let s = copy_with_deb()?;
    s.chroot_ok(&["dpkg", "-i", "/tmp/paqet.deb"])?;
    let key = String::from_utf8(run_checked(Command::new(paqet_tests::paqet_bin()).arg("genkey"))?.stdout)?;
    // Keeps the file's owner and mode (postinst's): overwritten, not replaced.
    std::fs::write(
        s.reach(CONFIG),
        format!("LISTEN_ADDR=127.0.0.1:4000\nTRANSPORT=auto\nKEY={}\n", key.trim()),
    )?;
    // This machine's own tree boots here: its network waiter would hold
    // network-online.target (and so paqet) for two minutes on a network-less container,
    // and its first-boot wizard fails without a machine id.
    s.chroot_ok(&[
        "systemctl",
        "mask",
        "systemd-networkd-wait-online.service",
        "systemd-firstboot.service",
    ])?;
    s.in_ns(&format!(
        "umount {r}/proc {r}/dev {r}/tmp {r}/run; rm -f {r}/etc/machine-id",
        r = s.root().display()
    ))?;
    let name = format!("paqet-test-{}", std::process::id());
    let nspawn = ChildGuard::spawn(
        s.nsenter()
            .arg("systemd-nspawn")
            .arg("-D")
            .arg(s.root())
            .args([
                "-M",
                &name,
                "-b",
                "--private-network",
                "--console=pipe",
                "--register=no",
            ])
            .args(["--link-journal=no", "--keep-unit"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )?;
    let c = Booted { _scratch: &s, nspawn };
    let booted = poll(90, || {
        let state = c.exec(&["systemctl", "is-system-running"]).1;
        state == "running" || state == "degraded"
    });
    assert!(
        booted,
        "the container did not finish booting in 90 s: {}",
        c.exec(&["systemctl", "is-system-running"]).1
    );
    assert!(
        !Path::new(&format!("/proc/{}/root/sys/fs/bpf", c.pid1().unwrap_or_default())).exists(),
        "the container has /sys/fs/bpf: this test is about one without it"
    );

    let (started, _) = c.exec(&["systemctl", "start", "paqet"]);
    assert!(
        started,
        "systemctl start paqet failed: {}",
        c.exec(&["systemctl", "status", "--no-pager", "paqet"]).1
    );
    assert!(
        poll(20, || c.show("ActiveState") == "active"),
        "paqet.service is not active"
    );
    assert!(
        poll(20, || c
            .exec(&["journalctl", "-u", "paqet", "--no-pager"])
            .1
            .contains("paqet server running")),
        "the journal has no 'paqet server running'"
    );
    let journal = c.exec(&["journalctl", "-u", "paqet", "--no-pager"]).1;
    eprintln!("journal:\n{journal}");
    assert!(
        journal.contains("xdp unavailable") && journal.contains("using udp only"),
        "TRANSPORT=auto must say why it runs udp"
    );

    let first = c.show("MainPID");
    assert!(
        c.exec(&["systemctl", "kill", "--signal=SIGKILL", "paqet"]).0,
        "systemctl kill failed"
    );
    let restarted = poll(30, || {
        c.show("NRestarts") == "1" && c.show("ActiveState") == "active" && c.show("MainPID") != first
    });
    assert!(
        restarted,
        "no restart after SIGKILL: NRestarts={} MainPID={}",
        c.show("NRestarts"),
        c.show("MainPID")
    );

    assert!(c.exec(&["systemctl", "stop", "paqet"]).0, "systemctl stop paqet failed");
    assert_eq!(c.show("Result"), "success", "stop must end with Result=success");
    eprintln!(
        "xdp in a container: not run: the container has no /sys/fs/bpf (the case this test is for), \
         and its only interface is lo, which XDP's AF_XDP path does not serve"
    );
    Ok(())
}

#[test]
fn lintian_finds_no_errors() -> Result<()> {
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(deb())
        .output()
        .context("running lintian (`cargo xtask setup` installs it)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("lintian:\n{said}");
    assert!(
        out.status.success(),
        "lintian reports errors (or failed, {}):\n{said}",
        out.status
    );
    assert!(!said.lines().any(|l| l.starts_with("E: ")), "lintian errors:\n{said}");
    Ok(())
}
