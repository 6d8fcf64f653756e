//! paqet run the way `dist/paqet.service` runs it, without systemd as PID 1: as the
//! system user `flowless-paqet`, with only the unit's ambient capabilities (setpriv),
//! no new privileges, after the unit's `ExecStartPre=` commands, entered into a test
//! network namespace with `nsenter --net` so /sys/fs/bpf is the host's.
//!
//! [`ServiceBed`] is a relay made of such processes: an origin web server and a paqet
//! server in one namespace, a paqet client in the other, both on the xdp transport.
//! Interface names are unique per bed (pins are keyed by role and interface name, and
//! every bed lives in the host's one bpffs). Drop kills the processes, removes the pins
//! they may have left (kill -9) and the namespaces.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{ChildGuard, Netns, paqet_bin, run_checked, veth, wait_for};

pub const USER: &str = "flowless-paqet";
pub const SERVER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 1);
pub const SERVER_PORT: u16 = 4000;
pub const ORIGIN_PORT: u16 = 8080;
pub const SOCKS_PORT: u16 = 1080;
pub const PIN_ROOT: &str = "/sys/fs/bpf/paqet";

/// The unit file as shipped.
pub fn unit_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/paqet.service")
}

pub fn unit_text() -> Result<String> {
    std::fs::read_to_string(unit_path()).with_context(|| format!("reading {}", unit_path().display()))
}

/// Values of `key=` lines in the unit (in order).
pub fn unit_values(text: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
        .collect()
}

/// The unit's AmbientCapabilities, as setpriv's names (`bpf`, `net_admin`, ...).
pub fn unit_caps() -> Result<Vec<String>> {
    let text = unit_text()?;
    let ambient = unit_values(&text, "AmbientCapabilities");
    let caps: Vec<String> = ambient
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect();
    if caps.is_empty() {
        bail!("the unit has no AmbientCapabilities=");
    }
    Ok(caps)
}

/// `-all,+a,+b`: setpriv's syntax for exactly these capabilities.
pub fn cap_list(caps: &[String]) -> String {
    let mut s = String::from("-all");
    for c in caps {
        s.push_str(",+");
        s.push_str(c);
    }
    s
}

/// uid and gid of `name`, through getent (no libc passwd parsing in tests).
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let out = Command::new("getent").args(["passwd", name]).output().ok()?;
    let line = String::from_utf8(out.stdout).ok()?;
    let f: Vec<&str> = line.trim().split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// Creates the service user as `cargo xtask install` does, when it is missing. Tests
/// run in parallel: they take turns here, and a useradd that lost a race with another
/// process (the user exists now) is no failure.
pub fn ensure_user() -> Result<(u32, u32)> {
    static TURN: Mutex<()> = Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ids) = user_ids(USER) {
        return Ok(ids);
    }
    let added = run_checked(Command::new("useradd").args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        USER,
    ]));
    match (user_ids(USER), added) {
        (Some(ids), _) => Ok(ids),
        (None, Err(e)) => Err(e),
        (None, Ok(_)) => bail!("useradd succeeded but the user {USER} is unknown"),
    }
}

/// Runs the unit's `ExecStartPre=` commands as root, as systemd would (their `+`
/// prefix means "with full privileges").
pub fn run_exec_start_pre() -> Result<()> {
    let text = unit_text()?;
    for line in unit_values(&text, "ExecStartPre") {
        let cmd = line.trim_start_matches(['+', '-', '!', '@', ':']);
        run_checked(Command::new("sh").arg("-c").arg(cmd)).with_context(|| format!("ExecStartPre={line}"))?;
    }
    Ok(())
}

/// A command that runs `bin args...` in `ns` as the unit would: the service user,
/// `caps` as ambient, inheritable and bounding set, no new privileges. `prefix` goes
/// between nsenter and setpriv (e.g. `prlimit --memlock=...`).
pub fn as_service(ns: &Netns, caps: &[String], prefix: &[&str], bin: &Path) -> Command {
    let list = cap_list(caps);
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", ns.path().display())).arg("--");
    c.args(prefix);
    c.args(["setpriv", "--reuid", USER, "--regid", USER, "--init-groups"]);
    c.arg(format!("--inh-caps={list}"))
        .arg(format!("--ambient-caps={list}"))
        .arg(format!("--bounding-set={list}"))
        .args(["--no-new-privs", "--"])
        .arg(bin);
    c
}

static BEDS: AtomicU32 = AtomicU32::new(0);

pub struct ServiceBed {
    pub client: Option<ChildGuard>,
    pub server: Option<ChildGuard>,
    pub origin: Option<ChildGuard>,
    pub cns: Netns,
    pub sns: Netns,
    pub client_if: String,
    pub server_if: String,
    pub caps: Vec<String>,
    /// The "installed" binary: a copy of the one under test (as /opt/flowless/bin/paqet).
    pub bin: PathBuf,
    pub dir: PathBuf,
}

fn origin_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(|p| {
        if p.ends_with("deps") {
            p.parent().unwrap_or(p).to_path_buf()
        } else {
            p.to_path_buf()
        }
    });
    dir.unwrap_or_default().join("paqet-origin")
}

impl ServiceBed {
    /// Namespaces, origin, configs; no paqet yet (see [`ServiceBed::start`]).
    pub fn new(tag: &str) -> Result<ServiceBed> {
        let (uid, gid) = ensure_user()?;
        // Every bed starts from the host the unit prepares before its first start:
        // `paqet check` inspects exactly that (bpffs, /sys/fs/bpf/paqet owned by the
        // user), and root-run tests elsewhere leave /sys/fs/bpf/paqet owned by root.
        run_exec_start_pre()?;
        let caps = unit_caps()?;
        let n = BEDS.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let cns = Netns::new(&format!("pq{tag}c"))?;
        let sns = Netns::new(&format!("pq{tag}s"))?;
        let (client_if, server_if) = (format!("sv{id}c"), format!("sv{id}s"));
        let dir = std::env::temp_dir().join(format!("paqet-svc-{id}-{tag}"));
        let mut bed = ServiceBed {
            client: None,
            server: None,
            origin: None,
            cns,
            sns,
            client_if,
            server_if,
            caps,
            bin: dir.join("opt/flowless/bin/paqet"),
            dir: dir.clone(),
        };
        veth(
            &bed.cns,
            &bed.client_if,
            "198.18.0.1/24",
            &bed.sns,
            &bed.server_if,
            "198.18.0.2/24",
        )?;
        std::fs::create_dir_all(bed.bin.parent().unwrap())?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::copy(paqet_bin(), &bed.bin)?;
        std::fs::set_permissions(&bed.bin, std::fs::Permissions::from_mode(0o755))?;

        let key = crate::relay::genkey()?;
        let server_conf = format!(
            "LISTEN_ADDR={SERVER_IP}:{SERVER_PORT}\nKEY={key}\nTRANSPORT=xdp\nTIMEOUT=10\nALLOW={SERVER_IP}/32:{ORIGIN_PORT}\n"
        );
        let client_conf = format!(
            "SOCKS_ADDR=127.0.0.1:{SOCKS_PORT}\nREMOTE_ADDR={SERVER_IP}:{SERVER_PORT}\nKCP_MODE=fast3\nKEY={key}\nTRANSPORT=xdp\nTIMEOUT=10\n"
        );
        for (name, text) in [("server.conf", server_conf), ("client.conf", client_conf)] {
            let path = dir.join(name);
            std::fs::write(&path, text)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        let origin_addr = format!("{SERVER_IP}:{ORIGIN_PORT}");
        bed.origin = Some(ChildGuard::spawn(
            bed.sns
                .command(&origin_bin().to_string_lossy())
                .arg(&origin_addr)
                .stdin(Stdio::null()),
        )?);
        Ok(bed)
    }

    /// A bed with server and client running and the SOCKS port up.
    pub fn start(tag: &str) -> Result<ServiceBed> {
        let mut bed = ServiceBed::new(tag)?;
        bed.start_role("server")?;
        bed.start_role("client")?;
        bed.wait_ready()?;
        Ok(bed)
    }

    pub fn conf(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}.conf"))
    }

    pub fn log_path(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}.log"))
    }

    pub fn ns(&self, role: &str) -> &Netns {
        if role == "server" { &self.sns } else { &self.cns }
    }

    pub fn interface(&self, role: &str) -> &str {
        if role == "server" {
            &self.server_if
        } else {
            &self.client_if
        }
    }

    /// `/sys/fs/bpf/paqet/<role>-<interface>`.
    pub fn pin_dir(&self, role: &str) -> PathBuf {
        Path::new(PIN_ROOT).join(format!("{role}-{}", self.interface(role)))
    }

    /// Starts `paqet run --config <role>.conf` as the unit would (after its
    /// ExecStartPre), logging (appending) to `<role>.log`.
    pub fn start_role(&mut self, role: &str) -> Result<()> {
        run_exec_start_pre()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(role))?;
        let err = log.try_clone()?;
        let mut cmd = as_service(self.ns(role), &self.caps, &[], &self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(self.conf(role))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        let child = ChildGuard::spawn(&mut cmd)?;
        match role {
            "server" => self.server = Some(child),
            _ => self.client = Some(child),
        }
        Ok(())
    }

    pub fn child(&mut self, role: &str) -> Option<&mut ChildGuard> {
        if role == "server" {
            self.server.as_mut()
        } else {
            self.client.as_mut()
        }
    }

    /// The pid of paqet itself (nsenter and setpriv exec, so it is the child's pid).
    pub fn pid(&mut self, role: &str) -> Option<u32> {
        self.child(role).map(|c| c.id())
    }

    pub fn socks_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], SOCKS_PORT).into()
    }

    /// Waits until the SOCKS port accepts, the origin answers and the server's pins are
    /// there.
    pub fn wait_ready(&self) -> Result<()> {
        let socks = self.socks_addr();
        let origin: SocketAddr = (SERVER_IP, ORIGIN_PORT).into();
        let ok = self
            .cns
            .run(|| wait_for(|| std::net::TcpStream::connect(socks).is_ok(), Duration::from_secs(20)))?
            && self
                .sns
                .run(|| wait_for(|| std::net::TcpStream::connect(origin).is_ok(), Duration::from_secs(20)))?
            && wait_for(
                || self.pin_dir("server").join("stats").exists(),
                Duration::from_secs(10),
            );
        if !ok {
            bail!("the service bed did not come up:\n{}", self.logs());
        }
        Ok(())
    }

    pub fn log_of(&self, role: &str) -> String {
        std::fs::read_to_string(self.log_path(role)).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        crate::relay::both_logs(&self.log_of("server"), &self.log_of("client"), 40)
    }

    /// A curl through the SOCKS port, by address, hashing the body: `bash -c` with
    /// pipefail, so a failed curl is a failed command. Not waited for.
    pub fn curl_command(&self, len: u64, extra: &str) -> Command {
        let url = format!("http://{SERVER_IP}:{ORIGIN_PORT}/bytes/{len}");
        let mut c = self.cns.command("bash");
        c.args([
            "-o",
            "pipefail",
            "-c",
            &format!(
                "curl -sS --fail --max-time 120 {extra} --socks5-hostname {} {url} | sha256sum",
                self.socks_addr()
            ),
        ]);
        c
    }

    /// Downloads `len` bytes through the relay and returns the body's sha256.
    pub fn curl_sha256(&self, len: u64) -> Result<String> {
        let out = self.curl_command(len, "").output().context("running curl")?;
        if !out.status.success() {
            bail!(
                "curl failed ({}): {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    /// Sends `sig` to a role's paqet.
    pub fn signal(&mut self, role: &str, sig: libc::c_int) -> Result<()> {
        let pid = self.pid(role).context("role not running")?;
        // SAFETY: plain kill(2) on a child we spawned and have not reaped.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill");
        }
        Ok(())
    }

    /// Waits (bounded) for a role's paqet to exit; returns its status and how long it took.
    pub fn wait_exit(&mut self, role: &str, timeout: Duration) -> Result<(std::process::ExitStatus, Duration)> {
        let started = Instant::now();
        let child = self.child(role).context("role not running")?;
        while started.elapsed() < timeout {
            if let Some(status) = child.try_wait()? {
                let took = started.elapsed();
                if role == "server" {
                    self.server = None
                } else {
                    self.client = None
                }
                return Ok((status, took));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("paqet {role} did not exit within {timeout:?}:\n{}", self.logs())
    }

    /// The XDP program id attached to a role's interface, from `ip -d link` in its
    /// namespace (None: nothing attached).
    pub fn xdp_prog_id(&self, role: &str) -> Result<Option<u32>> {
        let out = self
            .ns(role)
            .exec(&["ip", "-d", "-j", "link", "show", "dev", self.interface(role)])?;
        let text = String::from_utf8_lossy(&out.stdout);
        // {"xdp":{"mode":1,"prog":{"id":123,...}}} or "attached_progs"/"prog" variants:
        // find the first "id": after "xdp".
        let Some(at) = text.find("\"xdp\"") else {
            return Ok(None);
        };
        let rest = &text[at..];
        let Some(id_at) = rest.find("\"id\":") else {
            return Ok(None);
        };
        let digits: String = rest[id_at + 5..].chars().take_while(|c| c.is_ascii_digit()).collect();
        Ok(digits.parse().ok())
    }

    /// Whether the kernel still has a program with this id.
    pub fn prog_exists(id: u32) -> Result<bool> {
        Ok(bpftool(&["prog", "show", "id", &id.to_string()])?.status.success())
    }
}

/// Runs bpftool; its absence is an error, not an answer (a check that no program is
/// left must not pass because bpftool could not look).
pub fn bpftool(args: &[&str]) -> Result<std::process::Output> {
    Command::new("bpftool")
        .args(args)
        .output()
        .context("running bpftool (package bpftool: `cargo xtask setup` installs it)")
}

impl Drop for ServiceBed {
    fn drop(&mut self) {
        self.client = None;
        self.server = None;
        self.origin = None;
        for role in ["client", "server"] {
            let _ = std::fs::remove_dir_all(self.pin_dir(role));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
