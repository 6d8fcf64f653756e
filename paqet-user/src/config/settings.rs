//! paqet.conf as text: lines of KEY=VALUE, read into raw settings that remember where
//! each value came from. Typing and cross-checks happen in `Config::from_settings`.
//!
//! The syntax is the subset of shell assignment that means the same to a shell as to
//! paqet: anything a shell would expand or split (`$`, backticks, unquoted spaces,
//! `export`) is refused rather than read differently.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{ConfigError, Origin};
use super::keys::{is_secret, known_key};

#[derive(Clone)]
struct Entry {
    value: String,
    origin: Origin,
}

/// Raw settings: key → (value, origin), before validation.
#[derive(Clone, Default)]
pub struct Settings {
    entries: BTreeMap<String, Entry>,
    read_from: Option<PathBuf>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (key, entry) in &self.entries {
            let value = if is_secret(key) {
                "<redacted>"
            } else {
                entry.value.as_str()
            };
            map.entry(key, &format_args!("{value:?} ({})", entry.origin));
        }
        map.finish()
    }
}

impl Settings {
    /// Reads and parses a config file, and refuses one that holds a secret while group
    /// or others may read it.
    pub fn parse_file(path: &Path) -> Result<Settings, ConfigError> {
        let (text, mode) = read_private(path)?;
        let mut settings = Settings::parse_str(&text, &path.display().to_string())?;
        if let Some(holds) = settings.secret_held() {
            check_private(path, mode, holds)?;
        }
        settings.read_from = Some(path.to_owned());
        Ok(settings)
    }

    /// Parses config text; `origin_name` stands for the file in messages.
    pub fn parse_str(text: &str, origin_name: &str) -> Result<Settings, ConfigError> {
        let file: Arc<str> = origin_name.into();
        let mut settings = Settings::default();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, line) in text.lines().enumerate() {
            let at = Origin::Line {
                file: file.clone(),
                line: i + 1,
            };
            let Some((key, value)) = parse_line(line).map_err(|message| ConfigError::Syntax {
                at: at.clone(),
                message,
            })?
            else {
                continue;
            };
            let key = known_key(key, &at)?;
            if let Some(Entry {
                origin: Origin::Line { line: first_line, .. },
                ..
            }) = settings.entries.get(key)
            {
                return Err(ConfigError::DuplicateKey {
                    at,
                    key: key.to_owned(),
                    first_line: *first_line,
                });
            }
            settings.entries.insert(key.to_owned(), Entry { value, origin: at });
        }
        Ok(settings)
    }

    /// Sets `key` from a flag, replacing the file's value. KEY and KEY_FILE are two ways
    /// to say one thing, so a flag for either also drops the other from the file.
    pub fn set_override(&mut self, key: &str, value: String, origin: &str) {
        let alternative = match key {
            "KEY" => Some("KEY_FILE"),
            "KEY_FILE" => Some("KEY"),
            _ => None,
        };
        if let Some(other) = alternative
            && self
                .entries
                .get(other)
                .is_some_and(|e| matches!(e.origin, Origin::Line { .. }))
        {
            self.entries.remove(other);
        }
        self.entries.insert(
            key.to_owned(),
            Entry {
                value,
                origin: Origin::Flag(origin.to_owned()),
            },
        );
    }

    /// The raw value of `key` and where it came from.
    pub fn get(&self, key: &str) -> Option<(&str, &Origin)> {
        self.entries.get(key).map(|e| (e.value.as_str(), &e.origin))
    }

    /// The file these settings were read from, if any.
    pub fn read_from(&self) -> Option<&Path> {
        self.read_from.as_deref()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &str, &Origin)> {
        self.entries
            .iter()
            .map(|(k, e)| (k.as_str(), e.value.as_str(), &e.origin))
    }

    fn secret_held(&self) -> Option<&'static str> {
        if self.entries.contains_key("KEY") {
            Some("a secret key")
        } else if self.entries.contains_key("SOCKS_PASS") {
            Some("a secret (SOCKS_PASS)")
        } else {
            None
        }
    }
}

/// Reads a file together with its mode, taken from the open file so the mode checked is
/// that of the bytes read.
pub(crate) fn read_private(path: &Path) -> Result<(String, u32), ConfigError> {
    let unreadable = |error| ConfigError::Unreadable {
        path: path.to_owned(),
        error,
    };
    let mut file = File::open(path).map_err(unreadable)?;
    let mode = file.metadata().map_err(unreadable)?.permissions().mode();
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(unreadable)?;
    Ok((text, mode))
}

pub(crate) fn check_private(path: &Path, mode: u32, holds: &'static str) -> Result<(), ConfigError> {
    if mode & 0o077 == 0 {
        return Ok(());
    }
    Err(ConfigError::InsecurePermissions {
        path: path.to_owned(),
        mode: mode & 0o7777,
        holds,
    })
}

/// `Ok(None)` for blank and comment lines.
fn parse_line(line: &str) -> Result<Option<(&str, String)>, String> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    if line.starts_with("export ") || line.starts_with("export\t") {
        return Err("`export` is not supported; write KEY=VALUE without it".to_owned());
    }
    let (key, rest) = line.split_once('=').ok_or("expected KEY=VALUE, but there is no '='")?;
    if key.ends_with(char::is_whitespace) || rest.starts_with(char::is_whitespace) && !is_empty_value(rest) {
        return Err(format!("no spaces allowed around '=': write {}=VALUE", key.trim()));
    }
    check_key_chars(key)?;
    Ok(Some((key, parse_value(rest)?)))
}

fn is_empty_value(rest: &str) -> bool {
    let rest = rest.trim_start();
    rest.is_empty() || rest.starts_with('#')
}

fn check_key_chars(key: &str) -> Result<(), String> {
    let mut bytes = key.bytes();
    let ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key:?} is not a key: keys are letters, digits and '_', e.g. SOCKS_ADDR"
        ))
    }
}

/// The value after '=': quoted or bare, then nothing but an optional ` # comment`.
fn parse_value(rest: &str) -> Result<String, String> {
    if is_empty_value(rest) {
        return Ok(String::new());
    }
    let (value, tail) = match rest.chars().next() {
        Some(quote @ ('\'' | '"')) => {
            let inner = &rest[1..];
            let end = inner
                .find(quote)
                .ok_or("unterminated quote (a value must end on the line it starts)")?;
            let value = &inner[..end];
            if quote == '"' {
                check_no_expansion(value)?;
            }
            (value, &inner[end + 1..])
        }
        _ => {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            check_bare(&rest[..end])?;
            (&rest[..end], &rest[end..])
        }
    };
    // A comment needs whitespace before its '#': a shell reads `a#b` as one word.
    let tail_ok = tail.is_empty() || tail.starts_with(char::is_whitespace) && is_empty_value(tail);
    if !tail_ok {
        return Err(
            "unexpected text after the value; quote a value that holds spaces, and put \
                    a space before a trailing # comment"
                .to_owned(),
        );
    }
    Ok(value.to_owned())
}

/// A shell would expand these inside double quotes; paqet would not.
fn check_no_expansion(value: &str) -> Result<(), String> {
    match value.chars().find(|c| matches!(c, '$' | '`' | '\\')) {
        Some(c) => Err(format!(
            "{c:?} inside double quotes would be expanded by a shell but not by paqet; use single quotes for a literal value"
        )),
        None => Ok(()),
    }
}

fn check_bare(value: &str) -> Result<(), String> {
    match value.chars().find(|c| "'\"$`\\;&|<>()".contains(*c)) {
        Some(c) => Err(format!(
            "{c:?} has a special meaning in shell syntax; wrap the value in single quotes"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(line: &str) -> String {
        parse_line(line).unwrap().unwrap().1
    }

    fn syntax_error(text: &str) -> String {
        match Settings::parse_str(text, "t.conf") {
            Err(e @ ConfigError::Syntax { .. }) => e.to_string(),
            other => panic!("{text:?}: expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn quoting_and_comments() {
        assert_eq!(value("A=plain"), "plain");
        assert_eq!(value("A=plain # trailing comment"), "plain");
        assert_eq!(value("A=a#b"), "a#b");
        assert_eq!(
            value("A='single quoted # not a comment'"),
            "single quoted # not a comment"
        );
        assert_eq!(value("A=\"double quoted\" # comment"), "double quoted");
        assert_eq!(value("A='$literal\\'"), "$literal\\");
        assert_eq!(value("A="), "");
        assert_eq!(value("A=''"), "");
        assert_eq!(value("A= # nothing"), "");
        assert_eq!(value("  A=indented\t"), "indented");
        assert_eq!(parse_line("   # comment").unwrap(), None);
        assert_eq!(parse_line("").unwrap(), None);
    }

    #[test]
    fn parses_a_file_with_crlf_and_bom() {
        let s = Settings::parse_str("\u{feff}# paqet\r\nROLE=client\r\n\r\nKCP_MODE='fast3'\r\n", "t.conf").unwrap();
        assert_eq!(s.get("ROLE").map(|(v, _)| v), Some("client"));
        let (v, at) = s.get("KCP_MODE").unwrap();
        assert_eq!(v, "fast3");
        assert_eq!(at.to_string(), "t.conf:4");
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        assert!(syntax_error("ROLE=client\nSOCKS_ADDR").starts_with("t.conf:2: expected KEY=VALUE"));
        assert!(syntax_error("ROLE = client").contains("no spaces allowed around '='"));
        assert!(syntax_error("ROLE= client").contains("no spaces allowed"));
        assert!(syntax_error("export ROLE=client").contains("`export` is not supported"));
        assert!(syntax_error("SOCKS-ADDR=x").contains("keys are letters, digits and '_'"));
        assert!(syntax_error("=x").contains("is not a key"));
        assert!(syntax_error("SOCKS_PASS='abc").contains("unterminated quote"));
        assert!(syntax_error("SOCKS_PASS=\"a$b\"").contains("use single quotes"));
        assert!(syntax_error("SOCKS_PASS=a$b").contains("single quotes"));
        assert!(syntax_error("SOCKS_PASS=a b").contains("quote a value that holds spaces"));
        assert!(syntax_error("SOCKS_PASS='a'b").contains("unexpected text"));
        assert!(syntax_error("SOCKS_PASS='a'#b").contains("unexpected text"));
    }

    #[test]
    fn unknown_key_suggests_and_lists() {
        let e = Settings::parse_str("\n\nSOCKS_ADR=127.0.0.1:1080", "/etc/flowless/paqet.conf").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(
            e,
            ConfigError::UnknownKey {
                suggestion: Some("SOCKS_ADDR"),
                ..
            }
        ));
        assert!(
            msg.starts_with("/etc/flowless/paqet.conf:3: unknown key SOCKS_ADR (did you mean SOCKS_ADDR?); valid keys: ROLE, SOCKS_ADDR, "),
            "{msg}"
        );
        assert!(msg.ends_with("ALLOW, DENY, FORWARD, METRICS_ADDR, LOG_LEVEL"), "{msg}");
        let msg = Settings::parse_str("COLOUR=red", "t").unwrap_err().to_string();
        assert!(msg.starts_with("t:1: unknown key COLOUR; valid keys: ROLE,"), "{msg}");
    }

    #[test]
    fn duplicate_key_cites_both_lines() {
        let e = Settings::parse_str("KCP_MODE=fast\n# x\nKCP_MODE=fast2\n", "t.conf").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.conf:3: duplicate key KCP_MODE, already set on line 1; keep only one of the two lines"
        );
    }

    #[test]
    fn override_replaces_and_key_flags_replace_each_other() {
        let mut s = Settings::parse_str("SOCKS_ADDR=127.0.0.1:1080\nKEY_FILE=/k\n", "t").unwrap();
        s.set_override("SOCKS_ADDR", "127.0.0.1:2080".into(), "--socks-addr");
        s.set_override("KEY", "x".into(), "--key");
        assert_eq!(
            s.get("SOCKS_ADDR").unwrap(),
            ("127.0.0.1:2080", &Origin::Flag("--socks-addr".into()))
        );
        assert!(s.get("KEY_FILE").is_none());
    }

    #[test]
    fn debug_hides_secrets() {
        let s = Settings::parse_str("KEY=c2VjcmV0\nSOCKS_PASS=hunter2\nROLE=client", "t").unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("c2VjcmV0") && !dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("client"));
    }
}
