//! A whole relay on one machine: client and server namespaces joined by a veth pair, a
//! paqet server in the server namespace, an origin web server in a third namespace behind
//! it ([`OriginHost`]: off the server's own addresses, which its target policy denies),
//! a paqet client in the client namespace with its SOCKS5 port on the client's loopback.
//! Used by the tests and by `cargo xtask run`'s demo; everything is torn down on drop.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::linkem::{EmulatedLink, Impairment, hosts_through_emulator};
use crate::netns::{ChildGuard, Netns, OriginHost, TwoHosts, paqet_bin, wait_for};

pub const SERVER_PORT: u16 = 4000;
pub const ORIGIN_PORT: u16 = 8080;
/// Where the origin listens (in its own namespace, behind the server).
pub const ORIGIN_IP: std::net::Ipv4Addr = OriginHost::ORIGIN_IP;
pub const SOCKS_PORT: u16 = 1080;
/// The origin's name, resolvable only in the server namespace (through its hosts file),
/// so a fetch by name proves the server resolves it (socks5h).
pub const ORIGIN_NAME: &str = "origin.test";

pub struct RelayOptions {
    pub transport: &'static str,
    pub client_key: String,
    pub server_key: String,
    pub timeout_secs: u32,
    /// Extra `KEY=VALUE` lines for the server's paqet.conf.
    pub server_extra: Vec<String>,
    /// Extra `KEY=VALUE` lines for the client's paqet.conf.
    pub client_extra: Vec<String>,
    /// Configs exactly as a user writes them (server, client), instead of the bed's own
    /// lines: only `KEY=` is added. For the README's and the seed's examples.
    pub as_written: Option<(String, String)>,
    /// Words run before the paqet binary (e.g. `setpriv ...` to drop capabilities).
    pub server_prefix: Vec<String>,
    pub client_prefix: Vec<String>,
    /// False: no paqet server runs at all (a client facing silence).
    pub start_server: bool,
}

/// A fresh random key, from `paqet genkey`.
pub fn genkey() -> Result<String> {
    let out = Command::new(paqet_bin())
        .arg("genkey")
        .output()
        .context("running paqet genkey")?;
    if !out.status.success() {
        bail!("paqet genkey failed");
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

impl RelayOptions {
    pub fn new(transport: &'static str) -> Result<RelayOptions> {
        let key = genkey()?;
        Ok(RelayOptions {
            transport,
            client_key: key.clone(),
            server_key: key,
            timeout_secs: 10,
            server_extra: Vec::new(),
            client_extra: Vec::new(),
            as_written: None,
            server_prefix: Vec::new(),
            client_prefix: Vec::new(),
            start_server: true,
        })
    }
}

/// Temporary files (configs, logs, the hosts file) removed on drop.
struct Scratch {
    dir: PathBuf,
    hosts_dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.hosts_dir);
    }
}

pub struct RelayBed {
    // Field order is drop order: processes first, then namespaces, then files.
    pub client: ChildGuard,
    pub server: ChildGuard,
    pub origin: ChildGuard,
    /// The origin's namespace and its link to the server.
    pub origin_host: OriginHost,
    pub hosts: TwoHosts,
    pub link: Option<EmulatedLink>,
    scratch: Scratch,
    transport: &'static str,
    client_prefix: Vec<String>,
}

/// A binary of this crate (origin, link emulator), found next to the running test or
/// demo in target/<profile>/.
pub fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(|p| {
        if p.ends_with("deps") {
            p.parent().unwrap_or(p).to_path_buf()
        } else {
            p.to_path_buf()
        }
    });
    dir.unwrap_or_default().join(name)
}

/// A private paqet.conf: the bed's lines, then the test's extra `KEY=VALUE` lines.
fn write_conf(path: &PathBuf, lines: &str, extra: &[String]) -> Result<()> {
    let mut text = format!("# written by the test bed\n{lines}");
    for line in extra {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

impl RelayBed {
    pub fn start(tag: &str, opts: &RelayOptions) -> Result<RelayBed> {
        Self::start_on(TwoHosts::new(tag)?, None, tag, opts)
    }

    /// The same relay, through the link emulator.
    pub fn start_through(tag: &str, opts: &RelayOptions, imp: Impairment) -> Result<RelayBed> {
        let (hosts, link) = hosts_through_emulator(tag, imp)?;
        Self::start_on(hosts, Some(link), tag, opts)
    }

    /// The same relay on hosts the caller joined (e.g. through a router); the configs
    /// usually come from `opts.as_written`, since the addresses are the caller's.
    pub fn start_on_hosts(hosts: TwoHosts, tag: &str, opts: &RelayOptions) -> Result<RelayBed> {
        Self::start_on(hosts, None, tag, opts)
    }

    fn start_on(hosts: TwoHosts, link: Option<EmulatedLink>, tag: &str, opts: &RelayOptions) -> Result<RelayBed> {
        let origin_host = OriginHost::behind(&hosts.server, tag)?;
        let dir = std::env::temp_dir().join(format!("paqet-bed-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        // `ip netns exec` bind-mounts this file over /etc/hosts inside the namespace.
        let hosts_dir = PathBuf::from("/etc/netns").join(hosts.server.name());
        std::fs::create_dir_all(&hosts_dir)?;
        let scratch = Scratch {
            dir: dir.clone(),
            hosts_dir: hosts_dir.clone(),
        };
        std::fs::write(
            hosts_dir.join("hosts"),
            format!("127.0.0.1 localhost\n{ORIGIN_IP} {ORIGIN_NAME}\n"),
        )?;

        let origin_addr = format!("{ORIGIN_IP}:{ORIGIN_PORT}");
        let origin = ChildGuard::spawn(
            origin_host
                .ns
                .command(&sibling_bin("paqet-origin").to_string_lossy())
                .arg(&origin_addr)
                .stdin(Stdio::null()),
        )?;

        let common = |key: &str| {
            format!(
                "KEY={key}\nTRANSPORT={}\nTIMEOUT={}\nLOG_LEVEL=debug\n",
                opts.transport, opts.timeout_secs
            )
        };
        let (server_lines, client_lines) = match &opts.as_written {
            Some((server, client)) => (
                format!("{server}\nKEY={}\n", opts.server_key),
                format!("{client}\nKEY={}\n", opts.client_key),
            ),
            None => (
                format!(
                    "LISTEN_ADDR={}:{SERVER_PORT}\n{}",
                    TwoHosts::SERVER_IP,
                    common(&opts.server_key)
                ),
                format!(
                    "SOCKS_ADDR=127.0.0.1:{SOCKS_PORT}\nREMOTE_ADDR={}:{SERVER_PORT}\nKCP_MODE=fast3\n{}",
                    TwoHosts::SERVER_IP,
                    common(&opts.client_key)
                ),
            ),
        };
        let server_conf = dir.join("server.conf");
        write_conf(&server_conf, &server_lines, &opts.server_extra)?;
        chown_for(&opts.server_prefix, &server_conf)?;
        let server = if opts.start_server {
            spawn_paqet(
                &hosts.server,
                opts.transport,
                &opts.server_prefix,
                "server",
                &server_conf,
                &dir.join("server.log"),
            )?
        } else {
            ChildGuard::spawn(Command::new("true").stdin(Stdio::null()))?
        };

        let client_conf = dir.join("client.conf");
        write_conf(&client_conf, &client_lines, &opts.client_extra)?;
        chown_for(&opts.client_prefix, &client_conf)?;
        let client = spawn_paqet(
            &hosts.client,
            opts.transport,
            &opts.client_prefix,
            "client",
            &client_conf,
            &dir.join("client.log"),
        )?;

        let bed = RelayBed {
            client,
            server,
            origin,
            origin_host,
            hosts,
            link,
            scratch,
            transport: opts.transport,
            client_prefix: opts.client_prefix.clone(),
        };
        bed.wait_ready()?;
        Ok(bed)
    }

    /// Waits until the SOCKS port accepts connections and the origin does from the
    /// server namespace (so the link and routes to it work).
    fn wait_ready(&self) -> Result<()> {
        let socks = self.socks_addr();
        let origin: SocketAddr = (ORIGIN_IP, ORIGIN_PORT).into();
        let ready = self
            .hosts
            .client
            .run(|| wait_for(|| std::net::TcpStream::connect(socks).is_ok(), Duration::from_secs(20)))?
            && self
                .hosts
                .server
                .run(|| wait_for(|| std::net::TcpStream::connect(origin).is_ok(), Duration::from_secs(20)))?;
        if !ready {
            bail!("relay did not come up:\n{}", self.logs());
        }
        Ok(())
    }

    /// Stops the paqet client and starts it again with the same config (a new
    /// instance: it handshakes afresh). Its log is appended to.
    pub fn restart_client(&mut self) -> Result<()> {
        let placeholder = ChildGuard::spawn(Command::new("true").stdin(Stdio::null()))?;
        drop(std::mem::replace(&mut self.client, placeholder));
        let conf = self.scratch.dir.join("client.conf");
        self.client = spawn_paqet(
            &self.hosts.client,
            self.transport,
            &self.client_prefix,
            "client",
            &conf,
            &self.scratch.dir.join("client.log"),
        )?;
        self.wait_ready()
    }

    /// `n` more clients beside the bed's own, each with the same config on its own SOCKS
    /// port (1081, 1082, …), ready to serve; with their SOCKS addresses. Each is a
    /// session of its own at the server: what a server does with several clients.
    /// Only for the udp transport: xdp clients in one namespace would share an interface.
    pub fn start_more_clients(&self, n: u16) -> Result<Vec<(ChildGuard, SocketAddr)>> {
        if self.transport != "udp" {
            bail!(
                "more clients in one namespace need the udp transport, not {}",
                self.transport
            );
        }
        let conf = std::fs::read_to_string(self.scratch.dir.join("client.conf"))?;
        let mut clients = Vec::new();
        for i in 1..=n {
            let socks = SocketAddr::from(([127, 0, 0, 1], SOCKS_PORT + i));
            let own: String = conf
                .lines()
                .map(|l| {
                    if l.starts_with("SOCKS_ADDR=") {
                        format!("SOCKS_ADDR={socks}\n")
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            let path = self.scratch.dir.join(format!("client-{i}.conf"));
            write_conf(&path, &own, &[])?;
            chown_for(&self.client_prefix, &path)?;
            let child = spawn_paqet(
                &self.hosts.client,
                self.transport,
                &self.client_prefix,
                "client",
                &path,
                &self.scratch.dir.join(format!("client-{i}.log")),
            )?;
            clients.push((child, socks));
        }
        for (i, (_, socks)) in (1..).zip(&clients) {
            let socks = *socks;
            let up = self
                .hosts
                .client
                .run(|| wait_for(|| std::net::TcpStream::connect(socks).is_ok(), Duration::from_secs(20)))?;
            if !up {
                bail!(
                    "the client on {socks} did not come up:\n{}",
                    self.log_of(&format!("client-{i}"))
                );
            }
        }
        Ok(clients)
    }

    pub fn socks_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], SOCKS_PORT).into()
    }

    /// Runs `paqet ARGS --config <the client's config>` in the client namespace, as the
    /// client runs, and returns its output (e.g. `paqet check`).
    pub fn run_client_command(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = paqet_in(&self.hosts.client, self.transport, &self.client_prefix)?;
        cmd.args(args)
            .arg("--config")
            .arg(self.scratch.dir.join("client.conf"))
            .stdin(Stdio::null());
        cmd.output().context("running paqet in the client namespace")
    }

    /// Both paqet logs, for failure messages.
    pub fn logs(&self) -> String {
        both_logs(&self.log_of("server"), &self.log_of("client"), 60)
    }

    pub fn log_of(&self, role: &str) -> String {
        std::fs::read_to_string(self.scratch.dir.join(format!("{role}.log"))).unwrap_or_default()
    }

    /// Downloads `len` bytes with real curl through the SOCKS port (by name, so the
    /// server resolves it); returns the body's sha256 (hex), the bytes curl received and
    /// curl's own transfer time. The body goes to a file and is hashed afterwards: hashed
    /// through a pipe, sha256sum held curl back and the time measured the hash, not paqet.
    pub fn curl_bytes(&self, len: u64) -> Result<(String, u64, Duration)> {
        self.curl_bytes_via(self.socks_addr(), len)
    }

    /// [`RelayBed::curl_bytes`] through the SOCKS port `socks` (one of
    /// [`RelayBed::start_more_clients`]'s).
    pub fn curl_bytes_via(&self, socks: SocketAddr, len: u64) -> Result<(String, u64, Duration)> {
        let url = format!("http://{ORIGIN_NAME}:{ORIGIN_PORT}/bytes/{len}");
        let socks = socks.to_string();
        static DOWNLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = DOWNLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = self.scratch.dir.join(format!("curl-body-{n}"));
        let out = self
            .hosts
            .client
            .command("curl")
            .args(["-sS", "--fail", "--max-time", "300", "--socks5-hostname", &socks, "-o"])
            .arg(&body)
            .args(["-w", "%{size_download} %{time_total}", &url])
            .output()
            .context("running curl")?;
        let hashed = sha256_of_file(&body);
        let _ = std::fs::remove_file(&body);
        if !out.status.success() || !String::from_utf8_lossy(&out.stderr).trim().is_empty() {
            bail!("curl failed: {}\n{}", String::from_utf8_lossy(&out.stderr), self.logs());
        }
        let written = String::from_utf8_lossy(&out.stdout);
        let mut fields = written.split_whitespace();
        let (Some(size), Some(secs)) = (
            fields.next().and_then(|v| v.parse::<u64>().ok()),
            fields.next().and_then(|v| v.parse::<f64>().ok()),
        ) else {
            bail!("curl's -w output is not \"size time\": {written:?}");
        };
        Ok((hashed?, size, Duration::from_secs_f64(secs)))
    }

    /// Connections the origin has open right now (asked directly from the server
    /// namespace, not through paqet).
    pub fn origin_open_connections(&self) -> Result<u32> {
        let origin: SocketAddr = (ORIGIN_IP, ORIGIN_PORT).into();
        self.hosts.server.run(|| -> Result<u32> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(origin)?;
            s.write_all(b"GET /open HTTP/1.1\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let body = text.rsplit("\r\n\r\n").next().unwrap_or_default();
            Ok(body.trim().parse()?)
        })?
    }
}

/// The user a config must belong to for a process started with `prefix`: paqet refuses
/// a key file that another user could read, and reads it as whoever `--reuid` names.
fn chown_for(prefix: &[String], conf: &PathBuf) -> Result<()> {
    let reuid = prefix
        .iter()
        .position(|w| w == "--reuid")
        .and_then(|i| prefix.get(i + 1));
    if let Some(user) = reuid {
        crate::netns::run_checked(Command::new("chown").arg(user).arg(conf))?;
    }
    Ok(())
}

/// Starts paqet in `ns`, with `prefix` (e.g. setpriv) before the binary.
fn spawn_paqet(
    ns: &Netns,
    transport: &str,
    prefix: &[String],
    role: &str,
    conf: &PathBuf,
    log: &PathBuf,
) -> Result<ChildGuard> {
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err_file = log_file.try_clone()?;
    let mut cmd = paqet_in(ns, transport, prefix)?;
    cmd.arg(role)
        .arg("--config")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file);
    ChildGuard::spawn(&mut cmd)
}

/// A command that runs paqet in `ns` (arguments to be added), with `prefix` before it.
fn paqet_in(ns: &Netns, transport: &str, prefix: &[String]) -> Result<Command> {
    let bin = paqet_bin();
    let cmd = if transport != "udp" {
        // The xdp transport (also under auto) pins maps in /sys/fs/bpf, which `ip netns exec` would hide
        // (it remounts /sys). So: enter only the network namespace, and give the process
        // a private mount namespace in which the namespace's hosts file is /etc/hosts.
        ensure_bpffs()?;
        let hosts = PathBuf::from("/etc/netns").join(ns.name()).join("hosts");
        let mut c = ns.nsenter_command("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"]);
        c.arg(r#"[ -f "$0" ] && mount --bind "$0" /etc/hosts; shift; exec "$@""#);
        c.arg(&hosts).arg("paqet").args(prefix).arg(&bin);
        c
    } else if let Some((first, rest)) = prefix.split_first() {
        let mut c = ns.command(first);
        c.args(rest).arg(&bin);
        c
    } else {
        ns.command(&bin.to_string_lossy())
    };
    Ok(cmd)
}

/// Mounts bpffs on the host when it is not, so pins made inside a test's private mount
/// namespace land in the host's bpffs, where bpftool and `paqet status` look.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    crate::netns::run_checked(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    Ok(())
}

/// The last `lines` lines of a server's and a client's log, for failure messages.
pub fn both_logs(server: &str, client: &str, lines: usize) -> String {
    let tail = |log: &str| {
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    };
    format!(
        "--- server.log ---\n{}\n--- client.log ---\n{}",
        tail(server),
        tail(client)
    )
}

/// The sha256 (hex) of a file's bytes.
fn sha256_of_file(path: &std::path::Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(crate::pattern::hex(&hasher.finalize()))
}
