//! The Debian package (`cargo xtask deb`, PAQET_DEB): installed with `dpkg -i` into a
//! throwaway copy of this machine (an overlay of / entered with chroot), then removed
//! and purged; and run as a service under a real systemd, in a minimal Debian 12 made
//! with debootstrap and booted with systemd-nspawn: started, killed, stopped, upgraded,
//! and on the xdp transport in a container allowed to load BPF. Nothing it does reaches
//! the host's root filesystem or its dpkg database (see paqet_tests::container).

use anyhow::{Context, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use paqet_tests::container::{Booted, Network, Overlay, debian_root};
use paqet_tests::relay::{ORIGIN_IP, ORIGIN_PORT, RelayBed, RelayOptions, genkey};
use paqet_tests::{TwoHosts, pattern, require_root, socks, wait_for};

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

fn user_in(s: &Overlay) -> Result<Option<(u32, u32)>> {
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

/// A fresh copy of this machine, without paqet or its user, holding the package at
/// /tmp/paqet.deb.
fn copy_with_deb() -> Result<Overlay> {
    let deb = deb();
    let s = Overlay::new(Path::new("/"))?;
    s.mount_for_chroot()?;
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

/// Polls `cond` every 20 ms for at most `secs` seconds.
fn poll(secs: u64, cond: impl FnMut() -> bool) -> bool {
    wait_for(cond, std::time::Duration::from_secs(secs))
}

/// Where the package waits in a booted copy (nspawn mounts a fresh tmpfs on /tmp).
const DEB_IN: &str = "/var/tmp/paqet.deb";

/// A copy of the cached minimal Debian holding the package at [`DEB_IN`].
fn debian_with_deb() -> Result<Overlay> {
    let s = Overlay::new(&debian_root(Path::new(env!("CARGO_TARGET_TMPDIR")))?)?;
    std::fs::copy(deb(), s.reach(DEB_IN)).context("copying the .deb into the copy")?;
    Ok(s)
}

/// `dpkg -i` under the container's systemd (so the maintainer scripts see it running),
/// with no terminal to answer a prompt; returns what dpkg printed on stderr.
fn dpkg_install(c: &Booted, deb: &str) -> Result<String> {
    let out = c.run(&["dpkg", "-i", deb])?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "dpkg -i {deb} failed: {said}");
    Ok(said)
}

/// Writes the config in place (the file keeps the owner and mode postinst gave it):
/// `lines`, then `key`.
fn write_config(s: &Overlay, lines: &str, key: &str) -> Result<String> {
    let text = format!("# edited by the test\n{lines}KEY={key}\n");
    std::fs::write(s.reach(CONFIG), &text).context("writing the config")?;
    Ok(text)
}

/// `systemctl start paqet`, then until it is active and says so in the journal.
fn start_service(c: &Booted) {
    let (started, _) = c.exec(&["systemctl", "start", "paqet"]);
    assert!(
        started,
        "systemctl start paqet failed: {}",
        c.exec(&["systemctl", "status", "--no-pager", "paqet"]).1
    );
    assert!(
        poll(20, || c.show("ActiveState") == "active"),
        "paqet.service is not active:\n{}",
        c.journal()
    );
    assert!(
        poll(20, || c.journal().contains("paqet server running")),
        "the journal has no 'paqet server running':\n{}",
        c.journal()
    );
}

#[test]
fn unit_runs_under_systemd_in_a_debian_container_without_bpffs() -> Result<()> {
    if !require_root("unit_runs_under_systemd_in_a_debian_container_without_bpffs") {
        return Ok(());
    }
    let s = debian_with_deb()?;
    let c = Booted::boot(&s, Network::Private)?;
    assert!(
        !Path::new(&format!("/proc/{}/root/sys/fs/bpf", c.pid1().unwrap_or_default())).exists(),
        "the container has /sys/fs/bpf: this test is about one without it"
    );
    let said = dpkg_install(&c, DEB_IN)?;
    assert!(
        said.contains("sets no KEY"),
        "postinst must say why the service is not started: {said}"
    );
    assert_eq!(c.show("ActiveState"), "inactive", "postinst must not start the service");
    write_config(&s, "LISTEN_ADDR=127.0.0.1:4000\nTRANSPORT=auto\n", &genkey()?)?;

    start_service(&c);
    let journal = c.journal();
    eprintln!("journal:\n{journal}");
    assert!(
        journal.contains("xdp unavailable") && journal.contains("using udp only"),
        "TRANSPORT=auto must say why it runs udp"
    );

    let first = c.show("MainPID");
    // The main process, its only one. With the default (all), systemd 252 also walks
    // the unit's cgroup, and on a cgroup-v1 host reading cgroup.procs while the killed
    // process exits sometimes fails: "Failed to send signal SIGKILL to auxiliary
    // processes: Input/output error", though the signal was sent.
    c.run_ok(&["systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", "paqet"])?;
    let restarted = poll(30, || {
        c.show("NRestarts") == "1" && c.show("ActiveState") == "active" && c.show("MainPID") != first
    });
    assert!(
        restarted,
        "no restart after SIGKILL: NRestarts={} MainPID={}",
        c.show("NRestarts"),
        c.show("MainPID")
    );

    c.run_ok(&["systemctl", "stop", "paqet"])?;
    assert_eq!(c.show("Result"), "success", "stop must end with Result=success");
    Ok(())
}

/// The newer package of an upgrade: the built one repacked with dpkg-deb under a higher
/// version, inside the container (the files are the same; dpkg still replaces each one,
/// so a process left running keeps the old, deleted binary).
fn repack_newer(c: &Booted, version: &str) -> Result<&'static str> {
    const NEXT: &str = "/var/tmp/paqet-next.deb";
    c.run_ok(&[
        "sh",
        "-c",
        &format!(
            "set -e; dpkg-deb -R {DEB_IN} /var/tmp/next; \
             sed -i 's/^Version: .*/Version: {version}/' /var/tmp/next/DEBIAN/control; \
             dpkg-deb --build --root-owner-group /var/tmp/next {NEXT}"
        ),
    ])?;
    Ok(NEXT)
}

#[test]
fn upgrade_keeps_the_config_and_restarts_the_running_service() -> Result<()> {
    if !require_root("upgrade_keeps_the_config_and_restarts_the_running_service") {
        return Ok(());
    }
    let s = debian_with_deb()?;
    let c = Booted::boot(&s, Network::Private)?;
    dpkg_install(&c, DEB_IN)?;
    let old = c.run_ok(&["dpkg-query", "-W", "-f=${Version}", "paqet"])?;
    // Keys the template has only as comments, and one changed from its default.
    let edited = write_config(
        &s,
        "LISTEN_ADDR=127.0.0.1:4000\nTRANSPORT=udp\nTIMEOUT=17\n",
        &genkey()?,
    )?;
    start_service(&c);
    let (pid, since) = (c.show("MainPID"), c.show("ExecMainStartTimestampMonotonic"));

    let new = format!("{old}+upgrade1");
    let next = repack_newer(&c, &new)?;
    let said = dpkg_install(&c, next)?;
    // dpkg's conffile question starts "Configuration file '/etc/…'".
    assert!(
        !said.contains("Configuration file"),
        "dpkg asked about the config: {said}"
    );

    assert_eq!(
        std::fs::read_to_string(s.reach(CONFIG))?,
        edited,
        "the upgrade must keep the edited config"
    );
    let conf = s.meta(CONFIG).context("the upgrade removed the config")?;
    assert_eq!(conf.mode() & 0o7777, 0o600, "mode of {CONFIG} after the upgrade");
    assert_eq!(
        Some((conf.uid(), conf.gid())),
        user_in(&s)?,
        "{CONFIG} must still belong to {USER}"
    );
    let restarted = poll(30, || {
        c.show("ActiveState") == "active"
            && !matches!(c.show("MainPID").as_str(), "0" | "")
            && c.show("MainPID") != pid
            && c.show("ExecMainStartTimestampMonotonic") != since
    });
    assert!(
        restarted,
        "the upgrade did not restart the running service (MainPID {pid} -> {}):\n{}",
        c.show("MainPID"),
        c.journal()
    );
    let exe = c.run_ok(&["readlink", &format!("/proc/{}/exe", c.show("MainPID"))])?;
    assert_eq!(
        exe.trim(),
        "/opt/flowless/bin/paqet",
        "the service must run the upgrade's binary, not the replaced one"
    );
    let status = c.run_ok(&["dpkg", "-s", "paqet"])?;
    assert!(
        status.lines().any(|l| l == format!("Version: {new}"))
            && status.lines().any(|l| l == "Status: install ok installed"),
        "dpkg -s paqet must show {new} installed:\n{status}"
    );
    Ok(())
}

/// For the failure message: the container was given all the test knows to give, so
/// the journal tells whether the unit or the host is at fault.
const XDP_IN_CONTAINER: &str = "the service did not run TRANSPORT=xdp in a container given \
     CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_IPC_LOCK (nspawn --capability), bpf() \
     through nspawn's seccomp filter (--system-call-filter=bpf) and a bpffs of its own. \
     An EPERM from bpf() or the XDP attach in the journal means this host's kernel does \
     not let a container load BPF; anything else is the unit's or paqet's fault";

#[test]
fn xdp_runs_in_a_debian_container_that_may_load_bpf() -> Result<()> {
    if !require_root("xdp_runs_in_a_debian_container_that_may_load_bpf") {
        return Ok(());
    }
    // The client side is the usual bed: the client (xdp, as root, the host's bpffs) in
    // its namespace, the origin behind the server namespace. No server there: the
    // container, booted into the server namespace, runs it as the service.
    let mut opts = RelayOptions::new("xdp")?;
    opts.start_server = false;
    let bed = RelayBed::start_on_hosts(TwoHosts::new("nx")?, "nx", &opts)?;
    let s = debian_with_deb()?;
    let c = Booted::boot(&s, Network::Bpf(&bed.hosts.server))?;
    dpkg_install(&c, DEB_IN)?;
    let iface = &bed.hosts.server_if;
    write_config(
        &s,
        &format!(
            "LISTEN_ADDR={}:{}\nINTERFACE={iface}\nTRANSPORT=xdp\nALLOW={ORIGIN_IP}/32\n",
            TwoHosts::SERVER_IP,
            paqet_tests::relay::SERVER_PORT,
        ),
        &opts.server_key,
    )?;
    let (started, _) = c.exec(&["systemctl", "start", "paqet"]);
    let running = started
        && poll(20, || {
            let j = c.journal();
            j.contains("xdp transport open") && j.contains("paqet server running")
        });
    assert!(running, "{XDP_IN_CONTAINER}; the journal:\n{}", c.journal());
    assert!(
        c.exec(&["test", "-d", &format!("/sys/fs/bpf/paqet/server-{iface}")]).0,
        "the service made no pins in the container's bpffs"
    );

    const LEN: u64 = 1 << 20;
    let proxy = bed.socks_addr();
    let (hash, len) = bed
        .hosts
        .client
        .run(|| socks::fetch_bytes(proxy, &ORIGIN_IP.to_string(), ORIGIN_PORT, LEN))?
        .with_context(|| format!("fetching through the container's xdp server:\n{}", c.journal()))?;
    assert_eq!(
        (hash, len),
        (pattern::sha256_hex(LEN, LEN), LEN),
        "the body through the container's xdp server differs"
    );

    c.run_ok(&["systemctl", "stop", "paqet"])?;
    assert_eq!(c.show("Result"), "success", "stop must end with Result=success");
    assert!(
        !c.exec(&["test", "-e", &format!("/sys/fs/bpf/paqet/server-{iface}")]).0,
        "the stopped service left its pins"
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
