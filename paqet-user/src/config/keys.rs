//! The names paqet.conf accepts, and how each maps to its command-line flag.

use super::error::{ConfigError, Origin};

/// Every key paqet.conf accepts, in the order of the README's table.
pub const KEYS: &[&str] = &[
    "ROLE",
    "SOCKS_ADDR",
    "SOCKS_USER",
    "SOCKS_PASS",
    "REMOTE_ADDR",
    "LISTEN_ADDR",
    "INTERFACE",
    "TRANSPORT",
    "WIRE",
    "XDP_MODE",
    "KCP_MODE",
    "UDP_BUFFER",
    "TIMEOUT",
    "UDP_TIMEOUT",
    "THREADS",
    "KEY",
    "KEY_FILE",
    "ALLOW",
    "DENY",
    "FORWARD",
    "METRICS_ADDR",
    "LOG_LEVEL",
];

/// Keys whose values must never be echoed in messages or debug output.
pub(crate) fn is_secret(key: &str) -> bool {
    matches!(key, "KEY" | "SOCKS_PASS")
}

/// The flag that overrides `key`: `SOCKS_ADDR` → `--socks-addr`. `paqet::cli` derives its
/// flag names from field names the same way, and a test holds the two together.
pub fn flag_for_key(key: &str) -> String {
    format!("--{}", key.to_ascii_lowercase().replace('_', "-"))
}

/// Returns the canonical spelling of a known key, or an error that suggests the closest one.
pub(crate) fn known_key(key: &str, at: &Origin) -> Result<&'static str, ConfigError> {
    KEYS.iter()
        .copied()
        .find(|k| *k == key)
        .ok_or_else(|| ConfigError::UnknownKey {
            at: at.clone(),
            key: key.to_owned(),
            suggestion: closest_key(key),
        })
}

fn closest_key(key: &str) -> Option<&'static str> {
    let upper = key.to_ascii_uppercase();
    // Short keys get one typo, longer ones proportionally more, so `KEY` does not
    // "suggest" unrelated three-letter words.
    let budget = (upper.len() / 4).max(1);
    KEYS.iter()
        .map(|k| (edit_distance(&upper, k), *k))
        .filter(|(d, _)| *d <= budget)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over bytes (keys are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_keys_only() {
        assert_eq!(closest_key("SOCKS_ADR"), Some("SOCKS_ADDR"));
        assert_eq!(closest_key("socks_addr"), Some("SOCKS_ADDR"));
        assert_eq!(closest_key("KCPMODE"), Some("KCP_MODE"));
        assert_eq!(closest_key("KEYS"), Some("KEY"));
        assert_eq!(closest_key("PASSWORD"), None);
    }

    #[test]
    fn flags_follow_keys() {
        assert_eq!(flag_for_key("SOCKS_ADDR"), "--socks-addr");
        assert_eq!(flag_for_key("KEY"), "--key");
    }
}
