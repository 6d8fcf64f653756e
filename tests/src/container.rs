//! Throwaway systems for the package tests (tests/tests/package.rs): an [`Overlay`] of a
//! root filesystem whose writes go to a tmpfs in a private mount namespace, entered with
//! chroot or booted with systemd-nspawn ([`Booted`]). The booted root is a minimal
//! Debian 12 made with debootstrap once and cached under target/ ([`debian_root`]).
//! Nothing here writes to the host's root filesystem, and every mount ends with the
//! namespace that holds it.

use anyhow::{Context, Result, bail};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::netns::{ChildGuard, Netns, run_checked, wait_for};

/// An overlay of `lower` in its own mount namespace (held open by a sleeping child):
/// it sees `lower`'s files, and every write lands in a tmpfs that goes away with it.
pub struct Overlay {
    holder: ChildGuard,
    dir: PathBuf,
}

impl Overlay {
    pub fn new(lower: &Path) -> Result<Overlay> {
        // Tests run in parallel threads of one process: each copy needs its own folder.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("paqet-pkg-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let holder = ChildGuard::spawn(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sleep", "900"])
                .stdin(Stdio::null()),
        )?;
        let o = Overlay { holder, dir };
        o.wait_for_own_namespace()?;
        let d = o.dir.display();
        o.in_ns(&format!(
            "set -e; mount -t tmpfs tmpfs {d}; mkdir {d}/u {d}/w {d}/m; \
             mount -t overlay overlay -o lowerdir={},upperdir={d}/u,workdir={d}/w {d}/m",
            lower.display()
        ))?;
        Ok(o)
    }

    /// /proc and /dev for dpkg and useradd under chroot; fresh /tmp and /run so nothing
    /// of the host's leaks in (no /run/systemd/system: the maintainer scripts must not
    /// call systemctl).
    pub fn mount_for_chroot(&self) -> Result<()> {
        self.in_ns(&format!(
            "set -e; mount --bind /proc {r}/proc; mount --bind /dev {r}/dev; \
             mount -t tmpfs tmpfs {r}/tmp; mount -t tmpfs tmpfs {r}/run",
            r = self.root().display()
        ))
        .map(drop)
    }

    /// Until `unshare` has run, the holder is still in this machine's mount namespace,
    /// and mounts made through it would land on the host.
    fn wait_for_own_namespace(&self) -> Result<()> {
        let ours = std::fs::read_link("/proc/self/ns/mnt")?;
        let theirs = format!("/proc/{}/ns/mnt", self.holder.id());
        let own = wait_for(
            || std::fs::read_link(&theirs).is_ok_and(|ns| ns != ours),
            Duration::from_secs(5),
        );
        anyhow::ensure!(own, "unshare did not make its own mount namespace within 5 s");
        Ok(())
    }

    /// Where the copy's root is, inside the holder's namespace.
    pub fn root(&self) -> PathBuf {
        self.dir.join("m")
    }

    /// `path` of the copy as this process can reach it: through the holder's
    /// /proc/PID/root, since the mounts exist only in its namespace.
    pub fn reach(&self, path: &str) -> PathBuf {
        let root = self.root();
        Path::new("/proc")
            .join(self.holder.id().to_string())
            .join("root")
            .join(root.strip_prefix("/").unwrap_or(&root))
            .join(path.trim_start_matches('/'))
    }

    /// A command that runs in the holder's mount namespace.
    pub fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.holder.id().to_string(), "-m"]);
        c
    }

    pub fn in_ns(&self, script: &str) -> Result<Output> {
        run_checked(self.nsenter().args(["sh", "-c", script]))
    }

    /// `args` run chrooted in the copy; Ok even when it fails (the caller looks).
    pub fn chroot(&self, args: &[&str]) -> Result<Output> {
        let out = self.nsenter().arg("chroot").arg(self.root()).args(args).output()?;
        echo(args, &out);
        Ok(out)
    }

    pub fn chroot_ok(&self, args: &[&str]) -> Result<String> {
        succeeded(args, self.chroot(args)?)
    }

    pub fn meta(&self, path: &str) -> Option<std::fs::Metadata> {
        self.reach(path).symlink_metadata().ok()
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        // The mounts live only in the holder's namespace: they end with it.
        let _ = self.holder.0.kill();
        let _ = self.holder.0.wait();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Prints a command run in a copy and what it said, for the test's log.
fn echo(args: &[&str], out: &Output) {
    eprintln!(
        "$ {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn succeeded(args: &[&str], out: Output) -> Result<String> {
    anyhow::ensure!(
        out.status.success(),
        "{} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What debootstrap adds to its minimal base: systemd as PID 1 and the bus systemctl
/// uses. paqet's own dependencies (libc6, libgcc-s1, passwd) are in the base already.
const DEBIAN_PACKAGES: &[&str] = &["systemd", "systemd-sysv", "dbus"];
const DEBIAN_SUITE: &str = "bookworm";
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
/// debootstrap took 47 s on an idle two-core machine, 90 to 100 s beside other builds;
/// the limit leaves room for a slow mirror.
const DEBOOTSTRAP_LIMIT: Duration = Duration::from_secs(900);

/// A minimal Debian 12 root in `cache` (under target/), built with debootstrap on first
/// use and reused after. Its folder is named by the suite and package list, so a changed
/// list builds a new one. Parallel tests (and test processes) take a lock: one builds,
/// the others wait for it.
pub fn debian_root(cache: &Path) -> Result<PathBuf> {
    let name = format!("debian-{DEBIAN_SUITE}-minbase-{}", DEBIAN_PACKAGES.join("+"));
    let root = cache.join(&name);
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let _lock = CacheLock::take(&cache.join(format!("{name}.lock")), DEBOOTSTRAP_LIMIT)?;
    // Built into a side folder and renamed when complete: a root folder is never half made.
    if root.join("etc/os-release").is_file() {
        return Ok(root);
    }
    let partial = cache.join(format!("{name}.partial"));
    remove_if_present(&partial)?;
    let started = Instant::now();
    eprintln!("debootstrap: building {} (once; later runs reuse it)", root.display());
    // Its own mount namespace: the /proc and /sys it mounts in the new root end with it,
    // even if it is killed at the time limit.
    let built = Command::new("timeout")
        .arg(DEBOOTSTRAP_LIMIT.as_secs().to_string())
        .args(["unshare", "--mount", "--propagation", "private", "debootstrap"])
        .args(["--variant=minbase", &format!("--include={}", DEBIAN_PACKAGES.join(","))])
        .arg(DEBIAN_SUITE)
        .arg(&partial)
        .arg(DEBIAN_MIRROR)
        .stdin(Stdio::null())
        .output()
        .context("running debootstrap (`cargo xtask setup` installs it)")?;
    if !built.status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        bail!(
            "debootstrap {DEBIAN_SUITE} from {DEBIAN_MIRROR} failed ({}):\n{}{}",
            built.status,
            String::from_utf8_lossy(&built.stdout),
            String::from_utf8_lossy(&built.stderr)
        );
    }
    std::fs::rename(&partial, &root).with_context(|| format!("renaming to {}", root.display()))?;
    eprintln!("debootstrap: built in {} s", started.elapsed().as_secs());
    Ok(root)
}

fn remove_if_present(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// An exclusive flock on a file, released when dropped (the descriptor closes).
struct CacheLock {
    _held: std::fs::File,
}

impl CacheLock {
    fn take(path: &Path, limit: Duration) -> Result<CacheLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        let try_lock = || unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        // Twice the build's own limit: whoever holds it is building, or gives up by then.
        anyhow::ensure!(
            wait_for(try_lock, limit * 2),
            "{} stayed locked for {} s",
            path.display(),
            (limit * 2).as_secs()
        );
        Ok(CacheLock { _held: file })
    }
}

/// How a [`Booted`] container reaches the network and the kernel.
pub enum Network<'a> {
    /// Only its own loopback; systemd-nspawn's default capabilities and system calls,
    /// so no BPF and no /sys/fs/bpf.
    Private,
    /// The test's namespace `ns`, with what loading and attaching XDP needs: CAP_BPF,
    /// CAP_PERFMON, CAP_NET_ADMIN and CAP_IPC_LOCK (nspawn's default set has none of
    /// them outside a private network), the bpf() system call (its seccomp filter
    /// refuses it otherwise) and a bpffs of its own at /sys/fs/bpf.
    Bpf(&'a Netns),
}

/// The copy booted with systemd as PID 1 (systemd-nspawn -b); powered off on drop.
pub struct Booted<'a> {
    _overlay: &'a Overlay,
    nspawn: ChildGuard,
}

impl<'a> Booted<'a> {
    /// Boots `overlay` and waits until systemd has finished starting the system.
    pub fn boot(overlay: &'a Overlay, network: Network) -> Result<Booted<'a>> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "paqet-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = overlay.nsenter();
        cmd.arg("systemd-nspawn").arg("-D").arg(overlay.root());
        cmd.args(["-M", &name, "-b", "--console=pipe", "--register=no"])
            .args(["--link-journal=no", "--keep-unit"]);
        match network {
            Network::Private => {
                cmd.arg("--private-network");
            }
            Network::Bpf(ns) => {
                // A bpffs instance of the container's own, mounted in the holder's
                // namespace: its pins end with it, apart from the host's.
                let bpf = overlay.dir.join("bpf");
                overlay.in_ns(&format!("mkdir {b} && mount -t bpf bpf {b}", b = bpf.display()))?;
                cmd.arg(format!("--network-namespace-path={}", ns.path().display()))
                    .arg("--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN,CAP_IPC_LOCK")
                    .arg("--system-call-filter=bpf")
                    .arg(format!("--bind={}:/sys/fs/bpf", bpf.display()));
            }
        }
        let nspawn = ChildGuard::spawn(cmd.stdin(Stdio::null()).stdout(Stdio::null()))?;
        let c = Booted {
            _overlay: overlay,
            nspawn,
        };
        let booted = wait_for(
            || {
                matches!(
                    c.exec(&["systemctl", "is-system-running"]).1.as_str(),
                    "running" | "degraded"
                )
            },
            Duration::from_secs(90),
        );
        anyhow::ensure!(
            booted,
            "the container did not finish booting in 90 s: {}",
            c.exec(&["systemctl", "is-system-running"]).1
        );
        Ok(c)
    }

    /// The container's PID 1 (systemd), as this machine numbers it.
    pub fn pid1(&self) -> Option<String> {
        let out = Command::new("pgrep")
            .args(["-P", &self.nspawn.id().to_string()])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_string)
    }

    fn command(&self, args: &[&str]) -> Option<Command> {
        let pid = self.pid1()?;
        let mut c = Command::new("nsenter");
        c.args(["-t", &pid, "-m", "-u", "-i", "-n", "-p"]).args(args);
        Some(c)
    }

    /// `args` run inside the container: whether it succeeded, and its stdout. Quiet:
    /// for polling.
    pub fn exec(&self, args: &[&str]) -> (bool, String) {
        let Some(mut c) = self.command(args) else {
            return (false, "the container has no PID 1".into());
        };
        match c.output() {
            Ok(o) => (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).trim().to_string(),
            ),
            Err(e) => (false, e.to_string()),
        }
    }

    /// `args` run inside the container, printed with what they said; Ok even when it
    /// fails (the caller looks).
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        let mut c = self.command(args).context("the container has no PID 1")?;
        let out = c
            .output()
            .with_context(|| format!("running {} in the container", args.join(" ")))?;
        echo(args, &out);
        Ok(out)
    }

    pub fn run_ok(&self, args: &[&str]) -> Result<String> {
        succeeded(args, self.run(args)?)
    }

    /// A property of paqet.service (`systemctl show -p PROP --value`).
    pub fn show(&self, prop: &str) -> String {
        self.exec(&["systemctl", "show", "-p", prop, "--value", "paqet"]).1
    }

    pub fn journal(&self) -> String {
        self.exec(&["journalctl", "-u", "paqet", "--no-pager"]).1
    }
}

impl Drop for Booted<'_> {
    fn drop(&mut self) {
        let _ = self.exec(&["systemctl", "poweroff"]);
        let _ = self.nspawn.wait_exit(Duration::from_secs(20));
    }
}
