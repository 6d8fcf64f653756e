//! The typed values of paqet.conf and how each is read from text.
//!
//! Parsers return `Err(reason)` where `reason` says what would be valid; the caller
//! adds the key, the value and where it came from.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;

use super::forward::{PUBLIC_SUFFIX, strip_public};
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};

/// A closed set of lowercase words, matched case-insensitively.
macro_rules! choice_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            /// What would have been valid.
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str().eq_ignore_ascii_case(s))
                    .ok_or_else(|| format!("expected one of {}", one_of(Self::ALL)))
            }
        }
    };
}

fn one_of<T: fmt::Display>(all: &[T]) -> String {
    all.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

choice_enum!(Role { Client = "client", Server = "server" });

choice_enum!(
    /// How frames reach the wire. `raw` (AF_PACKET) is reserved and refused until it exists.
    TransportKind { Auto = "auto", Xdp = "xdp", Udp = "udp" }
);

choice_enum!(
    /// What `xdp`/`raw` frames look like on the wire.
    WireShape { Tcp = "tcp", Udp = "udp" }
);

choice_enum!(
    /// `WIRE`: a wire shape, or `auto`: a client tries the TCP-shaped wire first and
    /// falls back to UDP, a server serves both (under `TRANSPORT=auto`).
    WireChoice { Auto = "auto", Tcp = "tcp", Udp = "udp" }
);

impl WireChoice {
    /// The shape of the frames xdp builds: `auto` means TCP-shaped there (the wire
    /// that passes UDP-hostile networks; UDP comes from the kernel's socket beside it).
    pub fn xdp_shape(self) -> WireShape {
        match self {
            WireChoice::Auto | WireChoice::Tcp => WireShape::Tcp,
            WireChoice::Udp => WireShape::Udp,
        }
    }
}

choice_enum!(XdpMode { Auto = "auto", Native = "native", Generic = "generic" });

choice_enum!(
    /// kcptun's parameter sets.
    KcpMode { Normal = "normal", Fast = "fast", Fast2 = "fast2", Fast3 = "fast3" }
);

choice_enum!(LogLevel { Error = "error", Warn = "warn", Info = "info", Debug = "debug", Trace = "trace" });

impl LogLevel {
    pub fn to_tracing(self) -> tracing::Level {
        match self {
            LogLevel::Error => tracing::Level::ERROR,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Trace => tracing::Level::TRACE,
        }
    }
}

pub(crate) fn parse_transport(s: &str) -> Result<TransportKind, String> {
    if s.eq_ignore_ascii_case("raw") {
        return Err("raw is not implemented yet, use auto, xdp or udp".to_owned());
    }
    s.parse()
}

/// The pre-shared key. Its bytes never appear in `Debug` output, and are wiped from
/// memory when dropped.
#[derive(Clone, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct Key(pub [u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64 ({0}); make a key with `paqet genkey`")]
    Base64(String),
    #[error("decodes to {0} bytes, a key is exactly 32 bytes (44 base64 characters); make one with `paqet genkey`")]
    Length(usize),
}

/// Standard alphabet; padding optional, because a key pasted without its `=` is still
/// unambiguous.
const KEY_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl Key {
    pub fn from_base64(text: &str) -> Result<Key, KeyError> {
        let bytes = KEY_BASE64
            .decode(text.trim())
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(Key(bytes))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// SOCKS5 username/password (RFC 1929). The password never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub pass: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("pass", &"<redacted>")
            .finish()
    }
}

/// RFC 1929 carries each field with a one-byte length.
pub(crate) fn parse_socks_text(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 255 {
        return Err(format!("must be 1 to 255 bytes (the SOCKS5 limit), got {}", s.len()));
    }
    Ok(s.to_owned())
}

/// A peer given as a name or an IP literal; names are resolved later, by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// A DNS name or an IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

const HOST_PORT_EXAMPLE: &str = "e.g. 198.18.0.2:4000, relay.example.com:4000 or [2001:2::2]:4000";

pub(crate) fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("missing ']' after the IPv6 address; expected host:port, {HOST_PORT_EXAMPLE}"))?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| format!("{host:?} inside [] is not an IPv6 address; {HOST_PORT_EXAMPLE}"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| format!("expected host:port, {HOST_PORT_EXAMPLE}"))?;
        (host, port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("no port; expected host:port, {HOST_PORT_EXAMPLE}"))?;
        if host.contains(':') {
            return Err(format!("an IPv6 address needs brackets: [{host}]:{port}"));
        }
        if host.parse::<Ipv4Addr>().is_err() {
            check_hostname(host)?;
        }
        (host, port)
    };
    Ok(HostPort {
        host: host.to_owned(),
        port: parse_port(port)?,
    })
}

fn check_hostname(host: &str) -> Result<(), String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{host:?} is neither an IP address nor a host name; {HOST_PORT_EXAMPLE}"
        ));
    }
    // The resolver reads "10.1" or "1.2.3" as an IPv4 address in shorthand; no real
    // name ends in an all-digit label, so this is a mistyped address.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("{host:?} is not a complete IPv4 address; {HOST_PORT_EXAMPLE}"));
    }
    Ok(())
}

const PORT_ZERO: &str = "port 0 cannot be used here; pick a port from 1 to 65535";

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err(PORT_ZERO.to_owned()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("{s:?} is not a port (1 to 65535)")),
    }
}

/// An address to bind: an IP literal, never a name (a name could resolve to anything).
pub(crate) fn parse_bind_addr(s: &str, example: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("expected ip:port with an IP address, e.g. {example} (IPv6 in brackets)"))?;
    if addr.port() == 0 {
        return Err(PORT_ZERO.to_owned());
    }
    Ok(addr)
}

/// `METRICS_ADDR`: where the Prometheus metrics are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr {
    pub addr: SocketAddr,
    /// Listens off loopback (the value said `!public`).
    pub public: bool,
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if self.public {
            f.write_str(PUBLIC_SUFFIX)?;
        }
        Ok(())
    }
}

/// Off loopback only with `!public` at the end, as a FORWARD listener: the page has no
/// credentials, and tells whoever reaches it how busy the relay is and what it runs on.
pub(crate) fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    let (text, public) = strip_public(s);
    let addr = parse_bind_addr(text, "127.0.0.1:9465")?;
    if !public && !is_loopback(addr.ip()) {
        return Err(format!(
            "{addr} is not a loopback address, so anyone who reaches it could read the relay's counters \
             (no credentials are asked); end the value with {PUBLIC_SUFFIX} to mean it (e.g. \
             0.0.0.0:9465{PUBLIC_SUFFIX}), or listen on 127.0.0.1"
        ));
    }
    Ok(MetricsAddr { addr, public })
}

/// Whether binding here keeps the SOCKS port off the network.
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Linux interface names: 1–15 bytes, no '/', no whitespace (see dev_valid_name()).
pub(crate) fn parse_interface(s: &str) -> Result<String, String> {
    let ok = (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && !s.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace());
    if ok {
        Ok(s.to_owned())
    } else {
        Err("expected an interface name of 1 to 15 characters without '/', ':' or spaces, e.g. eth0".to_owned())
    }
}

/// SO_SNDBUF/SO_RCVBUF take a C int, so anything above i32::MAX cannot be asked for.
pub(crate) fn parse_size(s: &str) -> Result<usize, String> {
    const HINT: &str =
        "expected bytes as a whole number, optionally with K, M or G (powers of 1024), e.g. 4M or 4194304";
    let (digits, multiplier) = match s.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&s[..i], 1u64 << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&s[..i], 1 << 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HINT.to_owned());
    }
    let bytes = digits.parse::<u64>().ok().and_then(|n| n.checked_mul(multiplier));
    match bytes {
        Some(0) => Err(format!("must be more than 0; {HINT}")),
        Some(n) if n <= i32::MAX as u64 => usize::try_from(n).map_err(|_| HINT.to_owned()),
        _ => Err("must be at most 2147483647 bytes (just under 2G), the most the kernel accepts".to_owned()),
    }
}

/// How many engines a `TRANSPORT=udp` server runs, one per thread (`THREADS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One per core, up to [`AUTO_THREADS_MAX`].
    Auto,
    Count(u8),
}

/// `auto` stops here: past eight engines a server gains little on these workloads
/// while each one keeps a lone stream's window of memory (see `engine::shards`).
pub const AUTO_THREADS_MAX: usize = 8;
const MAX_THREADS: u8 = 64;

impl Threads {
    /// The number of engines this machine gets.
    pub fn count(self) -> u8 {
        match self {
            Threads::Count(n) => n,
            Threads::Auto => {
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                u8::try_from(cores.min(AUTO_THREADS_MAX)).unwrap_or(1)
            }
        }
    }
}

pub(crate) fn parse_threads(s: &str) -> Result<Threads, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Threads::Auto);
    }
    match s.parse::<u8>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(Threads::Count(n)),
        _ => Err(format!(
            "expected auto (one per core, at most {AUTO_THREADS_MAX}) or a number from 1 to {MAX_THREADS}, e.g. 4"
        )),
    }
}

/// Capped at a day: longer is never meant, and a huge value would overflow deadlines.
pub(crate) fn parse_timeout(s: &str) -> Result<Duration, String> {
    const MAX: u64 = 86_400;
    match s.parse::<u64>() {
        Ok(secs) if (1..=MAX).contains(&secs) => Ok(Duration::from_secs(secs)),
        _ => Err(format!("expected whole seconds from 1 to {MAX}, e.g. 30")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_case_insensitive_and_list_alternatives() {
        assert_eq!("FAST3".parse::<KcpMode>(), Ok(KcpMode::Fast3));
        assert_eq!("generic".parse::<XdpMode>(), Ok(XdpMode::Generic));
        assert_eq!(
            "verbose".parse::<LogLevel>(),
            Err("expected one of error, warn, info, debug, trace".into())
        );
        assert_eq!("both".parse::<Role>(), Err("expected one of client, server".into()));
        assert_eq!("quic".parse::<WireShape>(), Err("expected one of tcp, udp".into()));
        assert_eq!(
            "quic".parse::<WireChoice>(),
            Err("expected one of auto, tcp, udp".into())
        );
        assert_eq!(
            "AUTO".parse::<WireChoice>().map(WireChoice::xdp_shape),
            Ok(WireShape::Tcp)
        );
        assert_eq!(
            "udp".parse::<WireChoice>().map(WireChoice::xdp_shape),
            Ok(WireShape::Udp)
        );
        assert_eq!(LogLevel::Debug.to_tracing(), tracing::Level::DEBUG);
    }

    #[test]
    fn raw_transport_is_reserved() {
        assert_eq!(parse_transport("udp"), Ok(TransportKind::Udp));
        assert_eq!(
            parse_transport("raw"),
            Err("raw is not implemented yet, use auto, xdp or udp".into())
        );
        assert!(parse_transport("tcp").unwrap_err().contains("auto, xdp, udp"));
    }

    #[test]
    fn key_round_trip_and_errors() {
        let key = Key([7; 32]);
        let text = key.to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(Key::from_base64(&text).unwrap().0, [7; 32]);
        assert_eq!(Key::from_base64(text.trim_end_matches('=')).unwrap().0, [7; 32]);
        assert_eq!(Key::from_base64("AAAA").unwrap_err(), KeyError::Length(3));
        assert!(matches!(Key::from_base64("not base64!"), Err(KeyError::Base64(_))));
        assert_eq!(format!("{key:?}"), "Key(<redacted>)");
    }

    #[test]
    fn credentials_debug_hides_password() {
        let c = Credentials {
            user: "u".into(),
            pass: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn host_port_forms() {
        let hp = |s| parse_host_port(s);
        assert_eq!(
            hp("198.18.0.2:4000"),
            Ok(HostPort {
                host: "198.18.0.2".into(),
                port: 4000
            })
        );
        assert_eq!(hp("relay.example.com:4000").unwrap().host, "relay.example.com");
        let v6 = hp("[2001:2::2]:4000").unwrap();
        assert_eq!(v6.host, "2001:2::2");
        assert_eq!(v6.to_string(), "[2001:2::2]:4000");
        assert!(hp("2001:2::2:4000").unwrap_err().contains("needs brackets"));
        assert!(hp("198.18.0.2").unwrap_err().contains("no port"));
        assert!(hp("198.18.0:4000").unwrap_err().contains("not a complete IPv4"));
        assert!(hp("bad_host!:1").unwrap_err().contains("e.g. 198.18.0.2:4000"));
        assert!(hp("host:0").unwrap_err().contains("port 0"));
        assert!(hp("host:70000").unwrap_err().contains("not a port"));
        assert!(hp("[::1:4000").unwrap_err().contains("missing ']'"));
    }

    #[test]
    fn bind_addresses_are_ip_literals() {
        assert_eq!(
            parse_bind_addr("[::1]:1080", "x").unwrap(),
            "[::1]:1080".parse().unwrap()
        );
        assert!(
            parse_bind_addr("localhost:1080", "127.0.0.1:1080")
                .unwrap_err()
                .contains("e.g. 127.0.0.1:1080")
        );
        assert!(parse_bind_addr("127.0.0.1:0", "x").unwrap_err().contains("port 0"));
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("0.0.0.0".parse().unwrap()));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("65536"), Ok(65536));
        for bad in ["", "M", "4MB", "-1", "1.5M", "0", "4 M"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("2G").unwrap_err().contains("at most"));
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("30"), Ok(Duration::from_secs(30)));
        for bad in ["0", "-1", "30s", "1.5", "86401", ""] {
            assert!(parse_timeout(bad).unwrap_err().contains("e.g. 30"), "{bad:?} accepted");
        }
    }

    #[test]
    fn interfaces() {
        assert_eq!(parse_interface("eth0"), Ok("eth0".into()));
        for bad in ["", "a/b", "sixteen_chars_xx", "a b", ".."] {
            assert!(parse_interface(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn socks_text_limits() {
        assert!(parse_socks_text("").is_err());
        assert!(parse_socks_text(&"x".repeat(256)).is_err());
        assert_eq!(parse_socks_text("alice"), Ok("alice".into()));
    }
}
