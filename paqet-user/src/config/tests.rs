//! Config::from_settings / Config::load: every error kind end to end, defaults, precedence.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

const KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn settings(text: &str) -> Settings {
    Settings::parse_str(text, "t.conf").unwrap()
}

fn config(text: &str) -> Result<Config, ConfigError> {
    Config::from_settings(&settings(text), None)
}

fn err(text: &str) -> String {
    config(text).unwrap_err().to_string()
}

fn client(extra: &str) -> String {
    format!("REMOTE_ADDR=198.18.0.2:4000\nKEY={KEY_B64}\n{extra}")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("paqet-config-test-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn seed_example_plus_key_is_a_client_with_defaults() {
    let c = config(&format!(
        "SOCKS_ADDR=127.0.0.1:1080\nREMOTE_ADDR=198.18.0.2:4000\nKCP_MODE=fast3\nKEY={KEY_B64}\n"
    ))
    .unwrap();
    assert_eq!(c.role, Role::Client);
    assert_eq!(c.socks_addr, sa("127.0.0.1:1080"));
    assert_eq!(
        c.remote_addr,
        Some(HostPort {
            host: "198.18.0.2".into(),
            port: 4000
        })
    );
    assert_eq!(c.kcp_mode, KcpMode::Fast3);
    assert_eq!(c.key.0[31], 31);
    assert_eq!(
        (c.transport, c.wire, c.xdp_mode, c.log_level),
        (TransportKind::Auto, WireChoice::Auto, XdpMode::Auto, LogLevel::Info)
    );
    assert_eq!(c.timeout, Duration::from_secs(30));
    assert_eq!(
        (
            c.socks_auth.as_ref(),
            c.listen_addr,
            c.interface.as_deref(),
            c.udp_buffer
        ),
        (None, None, None, None)
    );
    assert_eq!(c.policy, TargetPolicy::default());
}

#[test]
fn every_key_parses() {
    let c = config(&format!(
        "ROLE=server\nSOCKS_ADDR=0.0.0.0:1081\nSOCKS_USER=alice\nSOCKS_PASS='p$ss word'\nLISTEN_ADDR=[::]:4000\n\
         INTERFACE=eth0\nTRANSPORT=udp\nWIRE=udp\nXDP_MODE=generic\nKCP_MODE=normal\nUDP_BUFFER=4M\nTIMEOUT=5\n\
         KEY=\"{KEY_B64}\"\nALLOW=198.18.0.0/15:80,[2001:2::/48]:443\nDENY=10.0.0.0/8:1-1024\nLOG_LEVEL=debug\n"
    ))
    .unwrap();
    assert_eq!(c.role, Role::Server);
    assert_eq!(c.listen_addr, Some(sa("[::]:4000")));
    assert_eq!(
        c.socks_auth,
        Some(Credentials {
            user: "alice".into(),
            pass: "p$ss word".into()
        })
    );
    assert_eq!(c.interface.as_deref(), Some("eth0"));
    assert_eq!(
        (c.transport, c.wire, c.xdp_mode, c.kcp_mode),
        (TransportKind::Udp, WireChoice::Udp, XdpMode::Generic, KcpMode::Normal)
    );
    assert_eq!(c.udp_buffer, Some(4 << 20));
    assert_eq!(c.timeout, Duration::from_secs(5));
    assert_eq!(c.log_level, LogLevel::Debug);
    assert_eq!(c.policy.allow.len(), 2);
    assert_eq!(c.policy.deny.len(), 1);
    assert!(!c.policy.permits(sa("127.0.0.1:80"), &[]), "loopback stays denied");
    assert!(!c.policy.permits(sa("10.0.0.1:22"), &[]));
    assert!(c.policy.permits(sa("198.18.0.1:80"), &[]));
}

fn server(extra: &str) -> Config {
    config(&format!("LISTEN_ADDR=0.0.0.0:4000\nKEY={KEY_B64}\n{extra}")).unwrap()
}

#[test]
fn deny_adds_to_the_default_list_instead_of_replacing_it() {
    let c = server("DENY=10.0.0.0/8\n");
    assert_eq!(c.policy.deny.len(), 1, "DENY holds only its own entries");
    for still_denied in [
        "127.0.0.1:80",
        "[::1]:80",
        "169.254.169.254:80",
        "192.168.0.1:80",
        "10.0.0.1:80",
    ] {
        assert!(
            !c.policy.permits(sa(still_denied), &[]),
            "{still_denied} re-opened by DENY"
        );
    }
    assert!(c.policy.permits(sa("198.18.0.1:80"), &[]));
}

#[test]
fn empty_deny_denies_only_the_defaults() {
    let c = server("DENY=\n");
    assert!(c.policy.deny.is_empty());
    assert!(!c.policy.permits(sa("127.0.0.1:80"), &[]));
    assert!(c.policy.permits(sa("198.18.0.1:80"), &[]));
}

#[test]
fn allow_opens_exactly_a_service_on_the_server_and_allow_lists_need_deny_all() {
    let own: Vec<std::net::IpAddr> = vec!["198.18.0.2".parse().unwrap()];
    let c = server("ALLOW=198.18.0.2/32:8080\n");
    assert!(c.policy.permits(sa("198.18.0.2:8080"), &own));
    assert!(!c.policy.permits(sa("198.18.0.2:8081"), &own));
    assert!(
        c.policy.permits(sa("1.1.1.1:443"), &own),
        "ALLOW alone is no allow-list"
    );
    let c = server("DENY=0.0.0.0/0,::/0\nALLOW=198.18.0.0/15:443\n");
    assert!(c.policy.permits(sa("198.19.0.1:443"), &own));
    assert!(!c.policy.permits(sa("1.1.1.1:443"), &own));
    assert!(!c.policy.permits(sa("[2001:2::1]:443"), &own));
    assert!(
        !c.policy.permits(sa("198.18.0.2:443"), &own),
        "own address beats ALLOW /15"
    );
}

#[test]
fn bad_values_name_line_key_and_what_is_valid() {
    let cases: &[(&str, &str)] = &[
        (
            "ROLE=both",
            "t.conf:3: ROLE=\"both\" is not valid: expected one of client, server",
        ),
        (
            "TRANSPORT=raw",
            "t.conf:3: TRANSPORT=\"raw\" is not valid: raw is not implemented yet, use auto, xdp or udp",
        ),
        ("TRANSPORT=tcp", "expected one of auto, xdp, udp"),
        (
            "WIRE=icmp",
            "t.conf:3: WIRE=\"icmp\" is not valid: expected one of auto, tcp, udp",
        ),
        ("XDP_MODE=offload", "expected one of auto, native, generic"),
        (
            "KCP_MODE=turbo",
            "KCP_MODE=\"turbo\" is not valid: expected one of normal, fast, fast2, fast3",
        ),
        ("LOG_LEVEL=loud", "expected one of error, warn, info, debug, trace"),
        ("UDP_BUFFER=4MB", "e.g. 4M or 4194304"),
        (
            "TIMEOUT=0",
            "TIMEOUT=\"0\" is not valid: expected whole seconds from 1 to 86400, e.g. 30",
        ),
        ("TIMEOUT=", "the value is empty; remove the line to use the default"),
        ("SOCKS_ADDR=localhost:1080", "e.g. 127.0.0.1:1080"),
        ("LISTEN_ADDR=4000", "e.g. 0.0.0.0:4000"),
        ("INTERFACE=a/b", "e.g. eth0"),
        (
            "ALLOW=10.0.0.1/8",
            "ALLOW=\"10.0.0.1/8\" is not valid: entry 1 (\"10.0.0.1/8\"): 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?",
        ),
        ("DENY=10.0.0.0/8:80-70", "write 70-80"),
        ("DENY=[2001:2::/48]:x", "443 or 8000-8999"),
        ("SOCKS_USER=", "the value is empty"),
    ];
    for (line, expected) in cases {
        let msg = err(&client(line));
        assert!(msg.contains(expected), "{line}: {msg}");
    }
    let msg = err("REMOTE_ADDR=2001:2::2:4000\nKEY=x");
    assert!(
        msg.starts_with("t.conf:1: REMOTE_ADDR=") && msg.contains("[2001:2::2]:4000"),
        "{msg}"
    );
}

#[test]
fn bad_keys_are_reported_without_echoing_them() {
    let msg = err("REMOTE_ADDR=198.18.0.2:4000\nKEY=c2VjcmV0LXRvby1zaG9ydA==");
    assert_eq!(
        msg,
        "t.conf:2: KEY is not valid: decodes to 16 bytes, a key is exactly 32 bytes (44 base64 characters); make one with `paqet genkey`"
    );
    let msg = err("REMOTE_ADDR=198.18.0.2:4000\nKEY=hunter2!!");
    assert!(
        msg.starts_with("t.conf:2: KEY is not valid: not valid base64") && !msg.contains("hunter2"),
        "{msg}"
    );
    let msg = err(&client("SOCKS_USER=a\nSOCKS_PASS=''"));
    assert!(msg.starts_with("t.conf:4: SOCKS_PASS is not valid"), "{msg}");
}

#[test]
fn missing_key_and_key_conflict() {
    let msg = err("REMOTE_ADDR=198.18.0.2:4000");
    assert!(matches!(
        config("REMOTE_ADDR=198.18.0.2:4000"),
        Err(ConfigError::Missing { key: "KEY", .. })
    ));
    assert!(
        msg.contains("set KEY=<base64> or KEY_FILE=<path>") && msg.contains("paqet genkey"),
        "{msg}"
    );
    let msg = err(&client("KEY_FILE=/etc/flowless/paqet.key"));
    assert_eq!(
        msg,
        "KEY (t.conf:2) and KEY_FILE (t.conf:3) are both set; keep exactly one"
    );
}

#[test]
fn missing_address_for_the_role() {
    let e = config(&format!("ROLE=client\nKEY={KEY_B64}")).unwrap_err();
    assert!(matches!(e, ConfigError::Missing { key: "REMOTE_ADDR", .. }));
    assert!(
        e.to_string().contains("set REMOTE_ADDR=198.18.0.2:4000") && e.to_string().contains("--remote-addr"),
        "{e}"
    );
    let e = Config::from_settings(&settings(&format!("KEY={KEY_B64}")), Some(Role::Server)).unwrap_err();
    assert!(matches!(e, ConfigError::Missing { key: "LISTEN_ADDR", .. }), "{e}");
    assert!(e.to_string().contains("`paqet server`"), "{e}");
}

#[test]
fn role_with_only_the_other_roles_address_is_a_conflict() {
    let msg = err(&format!("ROLE=server\nREMOTE_ADDR=198.18.0.2:4000\nKEY={KEY_B64}"));
    assert!(
        msg.starts_with("ROLE=server (t.conf:1) asks for a server, but only REMOTE_ADDR, a client setting, is set"),
        "{msg}"
    );
    assert!(msg.contains("set LISTEN_ADDR=0.0.0.0:4000"), "{msg}");
}

#[test]
fn role_is_inferred_or_undeterminable() {
    assert_eq!(
        config(&format!("LISTEN_ADDR=0.0.0.0:4000\nKEY={KEY_B64}"))
            .unwrap()
            .role,
        Role::Server
    );
    let e = config(&format!("KEY={KEY_B64}")).unwrap_err();
    assert!(matches!(e, ConfigError::RoleUndetermined { .. }));
    assert!(
        e.to_string()
            .contains("set REMOTE_ADDR (client) or LISTEN_ADDR (server)"),
        "{e}"
    );
}

#[test]
fn forced_role_must_agree_with_role() {
    let s = settings(&format!("ROLE=server\nLISTEN_ADDR=0.0.0.0:4000\nKEY={KEY_B64}"));
    let e = Config::from_settings(&s, Some(Role::Client)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "t.conf:1 says ROLE=server but the command is `paqet client`; change ROLE, or run `paqet server` (or `paqet run`)"
    );
    assert_eq!(
        Config::from_settings(&s, Some(Role::Server)).unwrap().role,
        Role::Server
    );
    // Without ROLE the command decides, even against the addresses set.
    let s = settings(&format!(
        "LISTEN_ADDR=0.0.0.0:4000\nREMOTE_ADDR=198.18.0.2:4000\nKEY={KEY_B64}"
    ));
    assert_eq!(
        Config::from_settings(&s, Some(Role::Server)).unwrap().role,
        Role::Server
    );
}

#[test]
fn socks_credentials_come_in_pairs() {
    let e = config(&client("SOCKS_USER=alice")).unwrap_err();
    assert!(matches!(e, ConfigError::Missing { key: "SOCKS_PASS", .. }));
    assert_eq!(
        e.to_string(),
        "t.conf:3: SOCKS_USER is set but SOCKS_PASS is not; SOCKS5 authentication needs both (or neither)"
    );
    assert!(matches!(
        config(&client("SOCKS_PASS=x")),
        Err(ConfigError::Missing { key: "SOCKS_USER", .. })
    ));
}

#[test]
fn open_socks_port_is_refused() {
    let msg = err(&client("SOCKS_ADDR=0.0.0.0:1080"));
    assert!(
        msg.starts_with("t.conf:3: SOCKS_ADDR=0.0.0.0:1080 is not a loopback address"),
        "{msg}"
    );
    assert!(
        msg.contains("set SOCKS_USER and SOCKS_PASS, or bind to loopback, e.g. SOCKS_ADDR=127.0.0.1:1080"),
        "{msg}"
    );
    assert!(config(&client("SOCKS_ADDR=0.0.0.0:1080\nSOCKS_USER=a\nSOCKS_PASS=b")).is_ok());
    assert!(config(&client("SOCKS_ADDR=[::1]:1080")).is_ok());
    // A server never opens the SOCKS port, so its SOCKS_ADDR is not a hole.
    assert!(
        config(&format!(
            "LISTEN_ADDR=0.0.0.0:4000\nKEY={KEY_B64}\nSOCKS_ADDR=0.0.0.0:1080"
        ))
        .is_ok()
    );
}

#[test]
fn flags_beat_the_file_and_are_named_in_errors() {
    let dir = TempDir::new();
    let path = dir.file("paqet.conf", &client("SOCKS_ADDR=127.0.0.1:1080\nKCP_MODE=fast"), 0o600);
    let overrides = [
        ("SOCKS_ADDR", "127.0.0.1:2080".to_owned()),
        ("KCP_MODE", "fast2".to_owned()),
    ];
    let c = Config::load(Some(&path), &overrides, None).unwrap();
    assert_eq!(c.socks_addr, sa("127.0.0.1:2080"));
    assert_eq!(c.kcp_mode, KcpMode::Fast2);

    let e = Config::load(Some(&path), &[("TIMEOUT", "soon".to_owned())], None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--timeout: TIMEOUT=\"soon\" is not valid: expected whole seconds from 1 to 86400, e.g. 30"
    );
    let e = Config::load(Some(&path), &[("ROLE", "server".to_owned())], Some(Role::Client)).unwrap_err();
    assert!(e.to_string().starts_with("--role says ROLE=server"), "{e}");
    let e = Config::load(Some(&path), &[("SOCKS_ADR", "x".to_owned())], None).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("--socks-adr: unknown key SOCKS_ADR (did you mean SOCKS_ADDR?)"),
        "{e}"
    );
    // A key flag replaces a file's KEY_FILE instead of conflicting with it.
    let keyed = dir.file(
        "keyed.conf",
        "REMOTE_ADDR=198.18.0.2:4000\nKEY_FILE=/nonexistent\n",
        0o644,
    );
    assert!(Config::load(Some(&keyed), &[("KEY", KEY_B64.to_owned())], None).is_ok());
}

#[test]
fn flags_alone_make_a_config() {
    let overrides = [
        ("REMOTE_ADDR", "198.18.0.2:4000".to_owned()),
        ("KEY", KEY_B64.to_owned()),
    ];
    let mut s = Settings::default();
    for (k, v) in &overrides {
        s.set_override(k, v.clone(), &flag_for_key(k));
    }
    assert_eq!(Config::from_settings(&s, None).unwrap().role, Role::Client);
}

#[test]
fn explicit_missing_file_is_an_error() {
    let dir = TempDir::new();
    let path = dir.0.join("absent.conf");
    let e = Config::load(Some(&path), &[], None).unwrap_err();
    assert!(matches!(e, ConfigError::Unreadable { .. }));
    assert!(
        e.to_string().starts_with(&format!("cannot read {}: ", path.display())),
        "{e}"
    );
}

#[test]
fn secrets_in_group_readable_files_are_refused() {
    let dir = TempDir::new();
    let path = dir.file("paqet.conf", &client(""), 0o644);
    let e = Settings::parse_file(&path).unwrap_err();
    let p = path.display();
    assert_eq!(
        e.to_string(),
        format!("{p} is readable by group or others (mode 0644) and holds a secret key; fix it with: chmod 600 {p}")
    );
    let path = dir.file("pass.conf", "SOCKS_USER=a\nSOCKS_PASS=b\n", 0o640);
    assert!(matches!(
        Settings::parse_file(&path),
        Err(ConfigError::InsecurePermissions { mode: 0o640, .. })
    ));

    let path = dir.file("private.conf", &client(""), 0o600);
    assert!(Config::load(Some(&path), &[], None).is_ok());
    let path = dir.file("public.conf", "REMOTE_ADDR=198.18.0.2:4000\n", 0o644);
    assert_eq!(Settings::parse_file(&path).unwrap().read_from(), Some(path.as_path()));
}

#[test]
fn key_file_is_read_checked_and_relative_to_the_config() {
    let dir = TempDir::new();
    dir.file("paqet.key", &format!("{KEY_B64}\n"), 0o600);
    let conf = dir.file("paqet.conf", "REMOTE_ADDR=198.18.0.2:4000\nKEY_FILE=paqet.key\n", 0o644);
    assert_eq!(Config::load(Some(&conf), &[], None).unwrap().key.0[1], 1);

    let key = dir.file("open.key", KEY_B64, 0o644);
    let e = Config::load(Some(&conf), &[("KEY_FILE", key.display().to_string())], None).unwrap_err();
    assert!(matches!(e, ConfigError::InsecurePermissions { .. }), "{e}");
    assert!(e.to_string().ends_with(&format!("chmod 600 {}", key.display())), "{e}");

    let short = dir.file("short.key", "AAAA", 0o600);
    let e = Config::load(Some(&conf), &[("KEY_FILE", short.display().to_string())], None).unwrap_err();
    assert!(
        e.to_string().starts_with("--key-file: KEY_FILE=") && e.to_string().contains("decodes to 3 bytes"),
        "{e}"
    );

    let e = Config::load(
        Some(&conf),
        &[("KEY_FILE", dir.0.join("none.key").display().to_string())],
        None,
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::Unreadable { .. }), "{e}");
}

#[test]
fn keys_of_the_other_role_are_named_as_ignored() {
    let c = config(&format!(
        "REMOTE_ADDR=198.18.0.2:4000\nKEY={KEY_B64}\nUDP_TIMEOUT=5\nDENY=198.18.0.0/15\n"
    ))
    .unwrap();
    assert_eq!(c.role, Role::Client);
    assert_eq!(c.ignored.len(), 2, "{:?}", c.ignored);
    assert!(
        c.ignored
            .iter()
            .any(|l| l.contains("UDP_TIMEOUT is a server setting; a client ignores it")),
        "{:?}",
        c.ignored
    );
    assert!(server("SOCKS_USER=u\nSOCKS_PASS=p\n").ignored.len() == 2);
    assert!(server("").ignored.is_empty());
}

#[test]
fn udp_timeout_defaults_to_a_minute_and_takes_whole_seconds() {
    assert_eq!(server("").udp_timeout, Duration::from_secs(60));
    assert_eq!(server("UDP_TIMEOUT=2\n").udp_timeout, Duration::from_secs(2));
    let err = config(&format!("LISTEN_ADDR=0.0.0.0:4000\nKEY={KEY_B64}\nUDP_TIMEOUT=2s\n")).unwrap_err();
    assert!(err.to_string().contains("UDP_TIMEOUT"), "{err}");
}

#[test]
fn threads_defaults_to_one_engine_per_core_on_a_server_and_one_on_a_client() {
    use crate::config::Threads;
    assert_eq!(server("").threads, Threads::Auto);
    assert!((1..=crate::config::values::AUTO_THREADS_MAX as u8).contains(&Threads::Auto.count()));
    assert_eq!(server("THREADS=3\n").threads, Threads::Count(3));
    assert_eq!(server("THREADS=AUTO\n").threads, Threads::Auto);
    for bad in ["0", "65", "two", "-1"] {
        let err = config(&format!("LISTEN_ADDR=0.0.0.0:4000\nKEY={KEY_B64}\nTHREADS={bad}\n")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(".conf:3: THREADS") && text.contains("expected auto"),
            "{text}"
        );
    }
    assert_eq!(
        config(&client("")).unwrap().threads,
        Threads::Count(1),
        "a client runs one engine unless asked"
    );
    assert_eq!(config(&client("THREADS=4")).unwrap().threads, Threads::Count(4));
}

#[test]
fn metrics_addr_is_off_by_default_and_loopback_unless_public() {
    assert_eq!(config(&client("")).unwrap().metrics, None);
    let on = config(&client("METRICS_ADDR=127.0.0.1:9465")).unwrap().metrics.unwrap();
    assert_eq!((on.addr, on.public), (sa("127.0.0.1:9465"), false));
    let v6 = config(&client("METRICS_ADDR=[::1]:9465")).unwrap().metrics.unwrap();
    assert_eq!(v6.addr, sa("[::1]:9465"));
    let public = server("METRICS_ADDR=0.0.0.0:9465!public").metrics.unwrap();
    assert_eq!((public.addr, public.public), (sa("0.0.0.0:9465"), true));
    assert_eq!(public.to_string(), "0.0.0.0:9465!public");
}

#[test]
fn bad_metrics_addr_is_a_clear_config_error() {
    let cases: &[(&str, &str)] = &[
        (
            "METRICS_ADDR=0.0.0.0:9465",
            "t.conf:3: METRICS_ADDR=\"0.0.0.0:9465\" is not valid: 0.0.0.0:9465 is not a loopback address",
        ),
        ("METRICS_ADDR=198.18.0.1:9465", "end the value with !public to mean it"),
        ("METRICS_ADDR=localhost:9465", "e.g. 127.0.0.1:9465"),
        ("METRICS_ADDR=127.0.0.1:0", "port 0 cannot be used here"),
        ("METRICS_ADDR=9465", "expected ip:port"),
        ("METRICS_ADDR=127.0.0.1:9465!pub", "expected ip:port"),
        ("METRICS_ADDR=", "the value is empty"),
    ];
    for (line, expected) in cases {
        let msg = err(&client(line));
        assert!(msg.contains(expected), "{line}: {msg}");
    }
}
