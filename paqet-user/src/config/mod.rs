//! What the user says in paqet.conf and on the command line, checked and typed.
//!
//! [`Settings`] holds the raw text with where each value came from (file line or flag);
//! [`Config::from_settings`] turns it into a [`Config`] or into a [`ConfigError`] that
//! names the place and says what would be valid. The keys and defaults are the table in
//! the README ("Configuration").

mod error;
pub mod forward;
pub(crate) mod keys;
mod policy;
mod settings;
mod values;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{ConfigError, Origin};
pub use forward::{Forward, ForwardProto};
pub use keys::{KEYS, flag_for_key};
pub use policy::{IpNet, PortRange, RuleSource, TargetPolicy, TargetRule, Verdict};
pub use settings::Settings;
pub use values::{
    Credentials, HostPort, KcpMode, Key, KeyError, LogLevel, MetricsAddr, Role, Threads, TransportKind, WireChoice,
    WireShape, XdpMode,
};

use keys::{is_secret, known_key};
use settings::{check_private, read_private};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/flowless/paqet.conf";

const DEFAULT_SOCKS_ADDR: &str = "127.0.0.1:1080";

/// A validated configuration for one role.
#[derive(Debug, Clone)]
pub struct Config {
    pub role: Role,
    pub socks_addr: SocketAddr,
    pub socks_auth: Option<Credentials>,
    /// Always set for a client.
    pub remote_addr: Option<HostPort>,
    /// Always set for a server.
    pub listen_addr: Option<SocketAddr>,
    pub interface: Option<String>,
    pub transport: TransportKind,
    pub wire: WireChoice,
    pub xdp_mode: XdpMode,
    pub kcp_mode: KcpMode,
    pub udp_buffer: Option<usize>,
    pub timeout: Duration,
    /// How long a server UDP flow lives without a datagram from its client.
    pub udp_timeout: Duration,
    /// With `TRANSPORT=udp`: how many engines the relay runs (a server's share its port,
    /// a client's are sessions of their own).
    pub threads: Threads,
    pub key: Key,
    pub policy: TargetPolicy,
    /// Client: ports forwarded to fixed targets (`FORWARD`).
    pub forwards: Vec<Forward>,
    /// Where Prometheus metrics are served (`METRICS_ADDR`); off when unset.
    pub metrics: Option<MetricsAddr>,
    pub log_level: LogLevel,
    /// Keys set for the other role, which this one does not read: one line each, for
    /// the log at start.
    pub ignored: Vec<String>,
}

impl Config {
    /// Reads `path` (or the default file, if it exists), applies `overrides` (config key,
    /// value) from flags on top, and validates. `forced_role` comes from `paqet client` /
    /// `paqet server` and must agree with any ROLE in the file.
    pub fn load(
        path: Option<&Path>,
        overrides: &[(&'static str, String)],
        forced_role: Option<Role>,
    ) -> Result<Config, ConfigError> {
        let mut settings = match path {
            Some(path) => Settings::parse_file(path)?,
            None => match Settings::parse_file(Path::new(DEFAULT_CONFIG_PATH)) {
                Err(ConfigError::Unreadable { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
                    Settings::default()
                }
                other => other?,
            },
        };
        for (key, value) in overrides {
            settings.set_override(key, value.clone(), &flag_for_key(key));
        }
        Config::from_settings(&settings, forced_role)
    }

    pub fn from_settings(s: &Settings, forced_role: Option<Role>) -> Result<Config, ConfigError> {
        // Flags reach Settings without the parser's key check.
        for (key, _, at) in s.iter() {
            known_key(key, at)?;
        }
        let role = resolve_role(s, forced_role)?;
        let config = Config {
            role,
            socks_addr: value(s, "SOCKS_ADDR", |v| values::parse_bind_addr(v, DEFAULT_SOCKS_ADDR))?
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1080))),
            socks_auth: socks_auth(s)?,
            remote_addr: value(s, "REMOTE_ADDR", values::parse_host_port)?,
            listen_addr: value(s, "LISTEN_ADDR", |v| values::parse_bind_addr(v, "0.0.0.0:4000"))?,
            interface: value(s, "INTERFACE", values::parse_interface)?,
            transport: value(s, "TRANSPORT", values::parse_transport)?.unwrap_or(TransportKind::Auto),
            wire: value(s, "WIRE", str::parse)?.unwrap_or(WireChoice::Auto),
            xdp_mode: value(s, "XDP_MODE", str::parse)?.unwrap_or(XdpMode::Auto),
            kcp_mode: value(s, "KCP_MODE", str::parse)?.unwrap_or(KcpMode::Fast3),
            udp_buffer: value(s, "UDP_BUFFER", values::parse_size)?,
            timeout: value(s, "TIMEOUT", values::parse_timeout)?.unwrap_or(Duration::from_secs(30)),
            udp_timeout: value(s, "UDP_TIMEOUT", values::parse_timeout)?.unwrap_or(crate::dial::udp::FLOW_IDLE),
            threads: value(s, "THREADS", values::parse_threads)?.unwrap_or(match role {
                // A client's engines are sessions of their own: more of them is a
                // choice (kcptun's `--conn`), not a default.
                Role::Client => Threads::Count(1),
                Role::Server => Threads::Auto,
            }),
            key: resolve_key(s)?,
            policy: TargetPolicy {
                allow: rules(s, "ALLOW")?.unwrap_or_default(),
                deny: rules(s, "DENY")?.unwrap_or_default(),
            },
            forwards: value(s, "FORWARD", forward::parse_forwards)?.unwrap_or_default(),
            metrics: value(s, "METRICS_ADDR", values::parse_metrics_addr)?,
            log_level: value(s, "LOG_LEVEL", str::parse)?.unwrap_or(LogLevel::Info),
            ignored: ignored_keys(s, role),
        };
        check_role_needs(s, &config)?;
        if role == Role::Server
            && let Some((_, at)) = s.get("FORWARD")
        {
            return Err(ConfigError::Conflict {
                message: format!(
                    "{at}: FORWARD is a client setting (the client listens and the server dials); \
                     remove it from the server's config"
                ),
            });
        }
        if role == Role::Client {
            check_socks_exposure(s, &config)?;
        }
        Ok(config)
    }
}

/// Keys only a server reads, and keys only a client reads. A config shared by both
/// roles is fine, so these are no error; but a setting that silently does nothing (a
/// client's UDP_TIMEOUT) is said at start.
const SERVER_ONLY: &[&str] = &["ALLOW", "DENY", "UDP_TIMEOUT"];
const CLIENT_ONLY: &[&str] = &["SOCKS_ADDR", "SOCKS_USER", "SOCKS_PASS"];

fn ignored_keys(s: &Settings, role: Role) -> Vec<String> {
    let (others, other_role) = match role {
        Role::Client => (SERVER_ONLY, Role::Server),
        Role::Server => (CLIENT_ONLY, Role::Client),
    };
    others
        .iter()
        .filter_map(|&key| {
            s.get(key)
                .map(|(_, at)| format!("{at}: {key} is a {other_role} setting; a {role} ignores it"))
        })
        .collect()
}

/// Parses `key` if set. Empty values are refused here, since only ALLOW/DENY give
/// emptiness a meaning (see [`rules`]).
fn value<T>(
    s: &Settings,
    key: &'static str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    Ok(value_at(s, key, parse)?.map(|(v, _)| v))
}

/// [`value`] together with where it came from.
fn value_at<T>(
    s: &Settings,
    key: &'static str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<(T, Origin)>, ConfigError> {
    let Some((text, at)) = s.get(key) else {
        return Ok(None);
    };
    let parsed = if text.is_empty() {
        Err("the value is empty; remove the line to use the default".to_owned())
    } else {
        parse(text)
    };
    parsed
        .map(|v| Some((v, at.clone())))
        .map_err(|reason| bad_value(key, text, at, reason))
}

fn rules(s: &Settings, key: &'static str) -> Result<Option<Vec<TargetRule>>, ConfigError> {
    let Some((text, at)) = s.get(key) else {
        return Ok(None);
    };
    policy::parse_rules(text)
        .map(Some)
        .map_err(|reason| bad_value(key, text, at, reason))
}

fn bad_value(key: &'static str, text: &str, at: &Origin, reason: String) -> ConfigError {
    let value = (!is_secret(key)).then(|| text.to_owned());
    ConfigError::BadValue {
        at: at.clone(),
        key,
        value,
        reason,
    }
}

/// ROLE, else `paqet client|server`, else inferred from which address is set.
fn resolve_role(s: &Settings, forced: Option<Role>) -> Result<Role, ConfigError> {
    match (value_at(s, "ROLE", str::parse::<Role>)?, forced) {
        (Some((configured, at)), Some(forced)) if configured != forced => {
            Err(ConfigError::RoleConflict { at, configured, forced })
        }
        (Some((role, _)), _) | (None, Some(role)) => Ok(role),
        (None, None) if s.get("REMOTE_ADDR").is_some() => Ok(Role::Client),
        (None, None) if s.get("LISTEN_ADDR").is_some() => Ok(Role::Server),
        (None, None) => Err(ConfigError::RoleUndetermined {
            read_from: s.read_from().map(Path::to_owned),
        }),
    }
}

/// A client needs REMOTE_ADDR, a server LISTEN_ADDR. When only the other role's address
/// is set, the role itself is the likelier mistake, so say both ways out.
fn check_role_needs(s: &Settings, config: &Config) -> Result<(), ConfigError> {
    let (needed, example, present, other_role) = match config.role {
        Role::Client if config.remote_addr.is_none() => (
            "REMOTE_ADDR",
            "198.18.0.2:4000",
            config.listen_addr.is_some(),
            Role::Server,
        ),
        Role::Server if config.listen_addr.is_none() => (
            "LISTEN_ADDR",
            "0.0.0.0:4000",
            config.remote_addr.is_some(),
            Role::Client,
        ),
        _ => return Ok(()),
    };
    // An inferred role always has its address, so the role came from ROLE or the command.
    let role_from = match s.get("ROLE") {
        Some((_, at)) => format!("ROLE={} ({at})", config.role),
        None => format!("`paqet {}`", config.role),
    };
    let set_it = format!(
        "set {needed}={example} {}, or pass {}",
        s.read_from()
            .map(|p| format!("in {}", p.display()))
            .unwrap_or_else(|| "in the config file".into()),
        flag_for_key(needed)
    );
    let other_key = if needed == "REMOTE_ADDR" {
        "LISTEN_ADDR"
    } else {
        "REMOTE_ADDR"
    };
    if present {
        return Err(ConfigError::Conflict {
            message: format!(
                "{role_from} asks for a {}, but only {other_key}, a {other_role} setting, is set: \
                 {set_it}; or run as {other_role}",
                config.role
            ),
        });
    }
    Err(ConfigError::Missing {
        key: needed,
        message: format!("a {} needs {needed} ({role_from}): {set_it}", config.role),
    })
}

/// SOCKS_USER and SOCKS_PASS only make sense together.
fn socks_auth(s: &Settings) -> Result<Option<Credentials>, ConfigError> {
    let user = value(s, "SOCKS_USER", values::parse_socks_text)?;
    let pass = value(s, "SOCKS_PASS", values::parse_socks_text)?;
    match (user, pass) {
        (Some(user), Some(pass)) => Ok(Some(Credentials { user, pass })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(half_credentials(s, "SOCKS_USER", "SOCKS_PASS")),
        (None, Some(_)) => Err(half_credentials(s, "SOCKS_PASS", "SOCKS_USER")),
    }
}

fn half_credentials(s: &Settings, set: &'static str, missing: &'static str) -> ConfigError {
    let at = s.get(set).map(|(_, at)| at.to_string()).unwrap_or_default();
    ConfigError::Missing {
        key: missing,
        message: format!("{at}: {set} is set but {missing} is not; SOCKS5 authentication needs both (or neither)"),
    }
}

fn check_socks_exposure(s: &Settings, config: &Config) -> Result<(), ConfigError> {
    // The default address is loopback, so only a SOCKS_ADDR setting can expose the port.
    match s.get("SOCKS_ADDR") {
        Some((_, at)) if config.socks_auth.is_none() && !values::is_loopback(config.socks_addr.ip()) => {
            Err(ConfigError::OpenProxy {
                at: at.clone(),
                addr: config.socks_addr,
            })
        }
        _ => Ok(()),
    }
}

/// Exactly one of KEY and KEY_FILE.
fn resolve_key(s: &Settings) -> Result<Key, ConfigError> {
    match (s.get("KEY"), s.get("KEY_FILE")) {
        (Some((_, key_at)), Some((_, file_at))) => Err(ConfigError::Conflict {
            message: format!("KEY ({key_at}) and KEY_FILE ({file_at}) are both set; keep exactly one"),
        }),
        (Some((text, at)), None) => Key::from_base64(text).map_err(|e| bad_value("KEY", text, at, e.to_string())),
        (None, Some((text, at))) => key_from_file(text, at),
        (None, None) => Err(ConfigError::Missing {
            key: "KEY",
            message: format!(
                "no key: set KEY=<base64> or KEY_FILE=<path> {}, or pass --key / --key-file; make a key with `paqet genkey`",
                s.read_from()
                    .map(|p| format!("in {}", p.display()))
                    .unwrap_or_else(|| "in the config file".into())
            ),
        }),
    }
}

fn key_from_file(text: &str, at: &Origin) -> Result<Key, ConfigError> {
    if text.is_empty() {
        return Err(bad_value(
            "KEY_FILE",
            text,
            at,
            "the value is empty; expected the path of a key file".into(),
        ));
    }
    let path = key_file_path(text, at);
    let (contents, mode) = read_private(&path)?;
    check_private(&path, mode, "a secret key")?;
    Key::from_base64(&contents).map_err(|e| {
        bad_value(
            "KEY_FILE",
            text,
            at,
            format!("{} does not hold a key: {e}", path.display()),
        )
    })
}

/// A relative KEY_FILE in a config file is relative to that file, so it does not depend
/// on the working directory the service happens to start in (`/` under systemd).
fn key_file_path(text: &str, at: &Origin) -> PathBuf {
    let path = Path::new(text);
    match at {
        Origin::Line { file, .. } if path.is_relative() => {
            Path::new(&**file).parent().unwrap_or(Path::new("")).join(path)
        }
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests;
