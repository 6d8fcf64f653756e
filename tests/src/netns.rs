//! Network namespaces, veth links and child processes for end-to-end tests, each torn
//! down by `Drop` (so also when a test fails or panics).
//!
//! Everything here shells out to `ip`/`ethtool` (iproute2 and ethtool are installed by
//! `cargo xtask setup`) except [`Netns::run`], which moves one thread of the test process
//! into a namespace so the test can open sockets there itself.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// True when the test may go on. Without root: under CI a loud panic (a CI run must not
/// pass by skipping), elsewhere a loud SKIPPED line on stderr and `false`.
pub fn require_root(test_name: &str) -> bool {
    if euid() == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "\n\n!!!!!! {test_name} NEEDS ROOT and CI is set: refusing to skip. \
             Run the tests as root (cargo xtask test). !!!!!!\n"
        );
    }
    eprintln!("\n!!!!!! SKIPPED (needs root): {test_name} !!!!!!\n");
    false
}

/// Runs a command; a non-zero exit is an error carrying the command line and stderr.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("could not start {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// A network namespace created by the test (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// A new namespace named `<prefix><pid>-<n>`: unique across concurrent tests and
    /// processes. Loopback is up and IPv6 is disabled (for devices created in it later
    /// too); call [`Netns::enable_ipv6`] in tests that need it.
    pub fn new(prefix: &str) -> Result<Netns> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}{}-{n}", std::process::id());
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on, Drop removes it even if the setup below fails.
        let ns = Netns { name };
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for setns and `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Writes `/proc/sys/<key with dots as slashes>` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        // /proc/sys/net is resolved in the namespace of the thread that opens it.
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }

    /// Turns IPv6 back on (loopback and all devices, present and future).
    pub fn enable_ipv6(&self) -> Result<()> {
        self.sysctl("net.ipv6.conf.default.disable_ipv6", "0")?;
        self.sysctl("net.ipv6.conf.all.disable_ipv6", "0")
    }

    /// `ip netns exec NAME args...`; an error (with stderr) unless it exits 0.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let (program, rest) = args.split_first().context("exec needs a program")?;
        run_checked(self.command(program).args(rest))
    }

    /// A `Command` that runs `program` through `ip netns exec`. Note that this remounts
    /// /sys: a process that pins BPF objects should use [`Netns::nsenter_command`].
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A `Command` that runs `program` in this namespace's network stack only
    /// (`nsenter --net=`), keeping the host's mounts, so /sys/fs/bpf is the real one.
    pub fn nsenter_command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        c
    }

    /// Runs `f` on a thread that has entered this namespace (setns), and returns its
    /// result: sockets it opens live in the namespace. A panic in `f` is re-raised here.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        run_in(self.path(), f)
    }

    /// The MAC address of `ifname` in this namespace (through `ip`, not /sys, which
    /// shows the host from a setns'd thread).
    pub fn mac(&self, ifname: &str) -> Result<[u8; 6]> {
        let out = self.exec(&["ip", "-o", "link", "show", "dev", ifname])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let hex = text
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .with_context(|| format!("no link/ether in: {text}"))?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = hex.split(':').collect();
        if parts.len() != 6 {
            bail!("bad MAC {hex:?}");
        }
        for (m, p) in mac.iter_mut().zip(parts) {
            *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {hex:?}"))?;
        }
        Ok(mac)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also destroys its devices, and a veth's peer with it.
        match Command::new("ip").args(["netns", "del", &self.name]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

/// [`Netns::run`] by the namespace's path, for a thread that must not borrow the
/// [`Netns`] (while the test changes what holds it).
pub fn run_in<R: Send>(path: PathBuf, f: impl FnOnce() -> R + Send) -> Result<R> {
    std::thread::scope(|s| {
        let h = s.spawn(move || -> Result<R> {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            use std::os::fd::AsRawFd;
            // SAFETY: a valid namespace fd; CLONE_NEWNET only affects this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {}", path.display()));
            }
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Creates a veth pair `a_if` (in `a`) ⇄ `b_if` (in `b`), with the given addresses
/// (CIDR, e.g. `198.18.0.1/24`), both ends up, and offloads off: veth otherwise hands
/// 64 KiB GSO frames and unchecksummed packets to anything reading frames itself.
pub fn veth(a: &Netns, a_if: &str, a_cidr: &str, b: &Netns, b_if: &str, b_cidr: &str) -> Result<()> {
    for n in [a_if, b_if] {
        if n.len() > 15 {
            bail!("interface name {n:?} is longer than 15 characters");
        }
    }
    run_checked(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]))?;
    for (ns, ifname, cidr) in [(a, a_if, a_cidr), (b, b_if, b_cidr)] {
        ns.exec(&["ip", "addr", "add", cidr, "dev", ifname])?;
        ns.exec(&[
            "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off", "tx", "off",
        ])?;
        ns.exec(&["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// Interface names for a pair tagged `tag`, unique per tag and per test process:
/// paqet pins its maps by role and interface name in the one host-wide bpffs, so two
/// beds (or two test runs) that both called their interface `veth-s` would take over
/// each other's pins.
pub fn interface_names(tag: &str) -> (String, String) {
    let run = std::process::id() % 100_000;
    (format!("c{tag}{run:05}"), format!("s{tag}{run:05}"))
}

/// Two namespaces, "client" (198.18.0.1/24) and "server" (198.18.0.2/24), joined by
/// one veth pair.
#[derive(Debug)]
pub struct TwoHosts {
    pub client: Netns,
    pub server: Netns,
    pub client_if: String,
    pub server_if: String,
}

impl TwoHosts {
    pub const CLIENT_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 1);
    pub const SERVER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 2);

    /// `tag` (a few characters) goes into the namespace names, to tell tests apart.
    pub fn new(tag: &str) -> Result<TwoHosts> {
        let client = Netns::new(&format!("pq{tag}c"))?;
        let server = Netns::new(&format!("pq{tag}s"))?;
        let (client_if, server_if) = interface_names(tag);
        veth(
            &client,
            &client_if,
            "198.18.0.1/24",
            &server,
            &server_if,
            "198.18.0.2/24",
        )?;
        Ok(TwoHosts {
            client,
            server,
            client_if,
            server_if,
        })
    }

    /// Permanent neighbour entries on both sides, so no ARP ever crosses the link (for
    /// tests that count every frame).
    pub fn pin_neighbours(&self) -> Result<()> {
        let cmac = fmt_mac(self.client.mac(&self.client_if)?);
        let smac = fmt_mac(self.server.mac(&self.server_if)?);
        let (cip, sip) = (Self::CLIENT_IP.to_string(), Self::SERVER_IP.to_string());
        self.client.exec(&[
            "ip",
            "neigh",
            "replace",
            &sip,
            "lladdr",
            &smac,
            "dev",
            &self.client_if,
            "nud",
            "permanent",
        ])?;
        self.server.exec(&[
            "ip",
            "neigh",
            "replace",
            &cip,
            "lladdr",
            &cmac,
            "dev",
            &self.server_if,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }
}

/// A third namespace behind the server, reached only through it: the origin that
/// clients fetch from, off the server's own addresses (which the server's target policy
/// denies by default). A veth joins the server (198.18.1.1/24) and the origin
/// (198.18.1.2/24); the server namespace forwards (ip_forward=1) and the origin routes
/// 198.18.0.0/24 back through it. The client has no route here: only paqet reaches it.
/// Dropping it removes the namespace and the link with it.
#[derive(Debug)]
pub struct OriginHost {
    pub ns: Netns,
    /// The link's end in the server namespace.
    pub server_if: String,
    /// The link's end in the origin namespace.
    pub origin_if: String,
}

impl OriginHost {
    /// The server's address on the origin link.
    pub const ROUTER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 1, 1);
    pub const ORIGIN_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 1, 2);
    /// IPv6 on the same link, after [`OriginHost::enable_ipv6`].
    pub const ROUTER_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 1);
    pub const ORIGIN_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 2);

    /// An origin namespace behind `server`; `tag` as for [`TwoHosts::new`].
    pub fn behind(server: &Netns, tag: &str) -> Result<OriginHost> {
        let ns = Netns::new(&format!("pq{tag}o"))?;
        let run = std::process::id() % 100_000;
        let (server_if, origin_if) = (format!("r{tag}{run:05}"), format!("o{tag}{run:05}"));
        veth(
            server,
            &server_if,
            &format!("{}/24", Self::ROUTER_IP),
            &ns,
            &origin_if,
            &format!("{}/24", Self::ORIGIN_IP),
        )?;
        let origin = OriginHost {
            ns,
            server_if,
            origin_if,
        };
        // If the veth was made but this fails, the origin namespace's Drop removes both
        // ends; the server namespace keeps nothing of it.
        server.sysctl("net.ipv4.ip_forward", "1")?;
        origin.ns.exec(&[
            "ip",
            "route",
            "add",
            "198.18.0.0/24",
            "via",
            &Self::ROUTER_IP.to_string(),
        ])?;
        Ok(origin)
    }

    /// IPv6 on the origin link: `ROUTER_IP6/64` on the server's end, `ORIGIN_IP6/64` on
    /// the origin's (no duplicate address detection, so both are usable at once).
    pub fn enable_ipv6(&self, server: &Netns) -> Result<()> {
        server.enable_ipv6()?;
        self.ns.enable_ipv6()?;
        for (ns, ip, ifname) in [
            (server, Self::ROUTER_IP6, &self.server_if),
            (&self.ns, Self::ORIGIN_IP6, &self.origin_if),
        ] {
            ns.exec(&["ip", "-6", "addr", "add", &format!("{ip}/64"), "dev", ifname, "nodad"])?;
        }
        Ok(())
    }
}

pub fn fmt_mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// A child process that is killed and reaped when the guard drops.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> Result<ChildGuard> {
        Ok(ChildGuard(cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?))
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Whether the child has exited (and how), without waiting.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.0.try_wait()?)
    }

    /// Waits up to `timeout` for the child to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut status = None;
        wait_for(
            || {
                status = self.0.try_wait().ok().flatten();
                status.is_some()
            },
            timeout,
        );
        status.with_context(|| format!("pid {} still running after {timeout:?}", self.0.id()))
    }
}

/// How long a child gets to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);

impl Drop for ChildGuard {
    /// SIGTERM first, as systemd stops paqet: one killed outright cannot detach its
    /// program or remove its pins under /sys/fs/bpf/paqet, and they pile up.
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait()
            && let Ok(pid) = libc::pid_t::try_from(self.0.id())
        {
            // SAFETY: `pid` is our own unreaped child, so it names no other process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let _ = self.wait_exit(TERM_GRACE);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `cond` every 20 ms until it holds (true) or `timeout` passes (false).
pub fn wait_for(mut cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `paqet` binary under test: $PAQET_BIN, else `<workspace>/target/release/paqet`.
pub fn paqet_bin() -> PathBuf {
    let bin = match std::env::var_os("PAQET_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/paqet"),
    };
    if !bin.is_file() {
        panic!(
            "{} does not exist: run `cargo xtask build` first (or set PAQET_BIN)",
            bin.display()
        );
    }
    bin
}
