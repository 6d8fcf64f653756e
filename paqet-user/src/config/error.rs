//! What can go wrong between paqet.conf (or a flag) and a valid [`Config`](super::Config).
//!
//! Every message names where the offending value came from (`file:line`, or the flag)
//! and what would have been accepted, so the operator can fix it without the docs.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::keys::KEYS;
use super::values::Role;

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line of a config file (or of text handed to `Settings::parse_str`).
    Line { file: Arc<str>, line: usize },
    /// A command-line flag such as `--socks-addr`.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Line { file, line } => write!(f, "{file}:{line}"),
            Origin::Flag(flag) => f.write_str(flag),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{at}: {message}")]
    Syntax { at: Origin, message: String },

    #[error("{at}: unknown key {key}{}; valid keys: {}", did_you_mean(*.suggestion), valid_keys())]
    UnknownKey {
        at: Origin,
        key: String,
        suggestion: Option<&'static str>,
    },

    #[error("{at}: duplicate key {key}, already set on line {first_line}; keep only one of the two lines")]
    DuplicateKey { at: Origin, key: String, first_line: usize },

    /// `value` is `None` for secrets, which never appear in messages.
    #[error("{at}: {} is not valid: {reason}", shown(.key, .value.as_deref()))]
    BadValue {
        at: Origin,
        key: &'static str,
        value: Option<String>,
        reason: String,
    },

    #[error("{message}")]
    Missing { key: &'static str, message: String },

    #[error("{message}")]
    Conflict { message: String },

    #[error(
        "cannot tell whether to run as client or server: set REMOTE_ADDR (client) or \
         LISTEN_ADDR (server), or ROLE=client|server, {}; or run `paqet client` / `paqet server`",
        where_to_set(.read_from.as_ref())
    )]
    RoleUndetermined { read_from: Option<PathBuf> },

    #[error(
        "{at} says ROLE={configured} but the command is `paqet {forced}`; \
         change ROLE, or run `paqet {configured}` (or `paqet run`)"
    )]
    RoleConflict { at: Origin, configured: Role, forced: Role },

    #[error(
        "{at}: SOCKS_ADDR={addr} is not a loopback address and no SOCKS_USER/SOCKS_PASS is set, \
         so anyone who can reach it could use this relay (an open proxy); set SOCKS_USER and \
         SOCKS_PASS, or bind to loopback, e.g. SOCKS_ADDR=127.0.0.1:{}", .addr.port()
    )]
    OpenProxy { at: Origin, addr: SocketAddr },

    #[error("cannot read {}: {error}", .path.display())]
    Unreadable { path: PathBuf, error: io::Error },

    #[error(
        "{} is readable by group or others (mode {:04o}) and holds {holds}; fix it with: chmod 600 {}",
        .path.display(), .mode, .path.display()
    )]
    InsecurePermissions {
        path: PathBuf,
        mode: u32,
        holds: &'static str,
    },
}

fn did_you_mean(suggestion: Option<&'static str>) -> String {
    suggestion.map(|s| format!(" (did you mean {s}?)")).unwrap_or_default()
}

fn valid_keys() -> String {
    KEYS.join(", ")
}

fn shown(key: &str, value: Option<&str>) -> String {
    match value {
        Some(value) => format!("{key}={value:?}"),
        None => key.to_owned(),
    }
}

fn where_to_set(read_from: Option<&PathBuf>) -> String {
    match read_from {
        Some(path) => format!("in {} or with a flag (--remote-addr, --listen-addr)", path.display()),
        None => format!(
            "in a config file (none was read; the default is {}) or with a flag \
             (--remote-addr, --listen-addr)",
            super::DEFAULT_CONFIG_PATH
        ),
    }
}
