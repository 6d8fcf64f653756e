//! The server's target policy (ALLOW / DENY): which destinations a client may reach.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// An IP network: address plus prefix length, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// `None` when the prefix is longer than the address or host bits are set.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<IpNet> {
        let net = IpNet { addr, prefix };
        (prefix <= max_prefix(addr) && net.network() == addr).then_some(net)
    }

    /// An IPv4 network also matches IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`),
    /// which reach the same host: otherwise a client could dodge `127.0.0.0/8` with one.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => masked(ip, self.prefix) == self.addr,
            _ => false,
        }
    }

    fn network(&self) -> IpAddr {
        masked(self.addr, self.prefix)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An inclusive port range; a single port has `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// One ALLOW/DENY entry: a network and, optionally, the ports it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetRule {
    pub net: IpNet,
    /// `None` covers every port.
    pub ports: Option<PortRange>,
}

impl TargetRule {
    pub fn matches(&self, target: SocketAddr) -> bool {
        self.net.contains(target.ip()) && self.ports.is_none_or(|p| p.contains(target.port()))
    }
}

impl fmt::Display for TargetRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.net.addr, self.ports) {
            (_, None) => write!(f, "{}", self.net),
            (IpAddr::V4(_), Some(p)) => write!(f, "{}:{p}", self.net),
            (IpAddr::V6(_), Some(p)) => write!(f, "[{}]:{p}", self.net),
        }
    }
}

/// Which targets the server dials for its clients.
///
/// A target is refused if any `deny` rule matches; otherwise, if `allow` is non-empty, it
/// must match an `allow` rule. Without a DENY key, `deny` is [`TargetPolicy::default_deny`];
/// a DENY key *replaces* that list (so `DENY=` with no value denies nothing), which lets an
/// operator open, say, loopback on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPolicy {
    pub allow: Vec<TargetRule>,
    pub deny: Vec<TargetRule>,
}

impl Default for TargetPolicy {
    fn default() -> Self {
        TargetPolicy {
            allow: Vec::new(),
            deny: TargetPolicy::default_deny(),
        }
    }
}

impl TargetPolicy {
    /// The server's own loopback, "this host" (`0.0.0.0/8` and `::` both reach loopback
    /// when dialed on Linux) and link-local, which holds cloud metadata at 169.254.169.254.
    pub fn default_deny() -> Vec<TargetRule> {
        const NETS: &[(&str, u8)] = &[
            ("127.0.0.0", 8),
            ("::1", 128),
            ("0.0.0.0", 8),
            ("::", 128),
            ("169.254.0.0", 16),
            ("fe80::", 10),
        ];
        NETS.iter()
            .filter_map(|(addr, prefix)| IpNet::new(addr.parse().ok()?, *prefix))
            .map(|net| TargetRule { net, ports: None })
            .collect()
    }

    pub fn permits(&self, target: SocketAddr) -> bool {
        !self.deny.iter().any(|r| r.matches(target))
            && (self.allow.is_empty() || self.allow.iter().any(|r| r.matches(target)))
    }
}

const RULE_EXAMPLE: &str = "e.g. 10.0.0.0/8, 198.18.0.2:443, 192.0.2.0/24:8000-8999 or [2001:2::/48]:443";

/// A comma-separated list; an empty value is an empty list.
pub(crate) fn parse_rules(s: &str) -> Result<Vec<TargetRule>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .enumerate()
        .map(|(i, item)| parse_rule(item.trim()).map_err(|e| format!("entry {} ({:?}): {e}", i + 1, item.trim())))
        .collect()
}

fn parse_rule(item: &str) -> Result<TargetRule, String> {
    if item.is_empty() {
        return Err(format!(
            "empty entry; expected a CIDR with an optional :port or :lo-hi, {RULE_EXAMPLE}"
        ));
    }
    let (net, ports, bracketed) = split_rule(item)?;
    let net = parse_net(net)?;
    if bracketed && net.addr.is_ipv4() {
        return Err(format!("brackets are for IPv6 only; {RULE_EXAMPLE}"));
    }
    let ports = ports.map(parse_port_range).transpose()?;
    Ok(TargetRule { net, ports })
}

/// Returns (network text, port text, whether the network was in brackets). Bare IPv6
/// takes no port: its colons would make `2001:2::1:443` ambiguous.
fn split_rule(item: &str) -> Result<(&str, Option<&str>, bool), String> {
    if let Some(rest) = item.strip_prefix('[') {
        let (net, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("missing ']'; {RULE_EXAMPLE}"))?;
        let ports = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| format!("expected ':port' after ']'; {RULE_EXAMPLE}"))?,
            ),
        };
        return Ok((net, ports, true));
    }
    if item.matches(':').count() > 1 {
        return Ok((item, None, false));
    }
    Ok(match item.split_once(':') {
        Some((net, ports)) => (net, Some(ports), false),
        None => (item, None, false),
    })
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address; {RULE_EXAMPLE}"))?;
    let prefix = match prefix {
        None => max_prefix(addr),
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max_prefix(addr))
            .ok_or_else(|| format!("prefix length {p:?} must be 0 to {}", max_prefix(addr)))?,
    };
    IpNet::new(addr, prefix).ok_or_else(|| {
        let net = IpNet {
            addr: masked(addr, prefix),
            prefix,
        };
        format!("{addr}/{prefix} has host bits set; did you mean {net}?")
    })
}

fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let hint = || format!("{s:?} is not a port or port range (443 or 8000-8999)");
    let port = |p: &str| p.parse::<u16>().map_err(|_| hint());
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => (port(s)?, port(s)?),
    };
    if lo > hi {
        return Err(format!("port range {lo}-{hi} is backwards; write {hi}-{lo}"));
    }
    Ok(PortRange { lo, hi })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn rule(s: &str) -> TargetRule {
        parse_rule(s).unwrap()
    }

    #[test]
    fn default_policy_blocks_loopback_and_metadata() {
        let p = TargetPolicy::default();
        assert_eq!(p.deny.len(), 6);
        for blocked in [
            "127.0.0.1:80",
            "169.254.169.254:80",
            "0.0.0.0:22",
            "[::1]:80",
            "[::]:80",
            "[fe80::1]:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(!p.permits(sa(blocked)), "{blocked} permitted");
        }
        for open in ["198.18.0.2:80", "[2001:2::1]:443", "[::ffff:198.18.0.2]:80"] {
            assert!(p.permits(sa(open)), "{open} refused");
        }
    }

    #[test]
    fn allow_list_restricts_and_deny_wins() {
        let p = TargetPolicy {
            allow: parse_rules("198.18.0.0/15:443, [2001:2::/48]:8000-8999").unwrap(),
            deny: parse_rules("198.18.0.9").unwrap(),
        };
        assert!(p.permits(sa("198.19.1.1:443")));
        assert!(!p.permits(sa("198.19.1.1:80")));
        assert!(!p.permits(sa("198.18.0.9:443")));
        assert!(p.permits(sa("[2001:2::5]:8500")));
        assert!(!p.permits(sa("[2001:2::5]:9000")));
        assert!(!p.permits(sa("[2001:3::5]:8500")));
        assert!(!p.permits(sa("10.0.0.1:443")));
    }

    #[test]
    fn rule_forms() {
        assert_eq!(rule("10.1.2.3").net.prefix, 32);
        assert_eq!(rule("2001:2::1").net.prefix, 128);
        assert_eq!(rule("2001:2::/48").ports, None);
        assert_eq!(rule("[2001:2::1]").ports, None);
        assert_eq!(rule("10.0.0.0/8:22").ports, Some(PortRange { lo: 22, hi: 22 }));
        assert_eq!(rule("0.0.0.0/0:1-1024").ports, Some(PortRange { lo: 1, hi: 1024 }));
        assert_eq!(rule("[2001:2::/48]:443").to_string(), "[2001:2::/48]:443");
        assert_eq!(rule("10.0.0.0/8:8000-8999").to_string(), "10.0.0.0/8:8000-8999");
        assert!(rule("::/0").matches(sa("[2001:2::1]:1")));
        assert!(!rule("10.0.0.0/8").matches(sa("[2001:2::1]:1")));
    }

    #[test]
    fn bad_rules_say_what_is_valid() {
        let err = |s| parse_rule(s).unwrap_err();
        assert!(err("10.0.0.1/8").contains("did you mean 10.0.0.0/8?"));
        assert!(err("10.0.0.0/33").contains("0 to 32"));
        assert!(err("2001:2::/129").contains("0 to 128"));
        assert!(err("example.com").contains("not an IP address"));
        assert!(err("10.0.0.0/8:99999").contains("443 or 8000-8999"));
        assert!(err("10.0.0.0/8:2000-1000").contains("write 1000-2000"));
        assert!(err("[10.0.0.1]:80").contains("IPv6 only"));
        assert!(err("[2001:2::1:80").contains("missing ']'"));
        assert!(err("[2001:2::1]80").contains("':port'"));
        let list = parse_rules("10.0.0.0/8,,1.2.3.4").unwrap_err();
        assert!(list.starts_with("entry 2"), "{list}");
        assert_eq!(parse_rules(" "), Ok(vec![]));
    }
}
