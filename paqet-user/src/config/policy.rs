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

    /// Whether every address of `other` is in this network (same family).
    pub fn covers(&self, other: &IpNet) -> bool {
        other.addr.is_ipv4() == self.addr.is_ipv4() && other.prefix >= self.prefix && self.contains(other.addr)
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

/// Why a rule is in the policy: a built-in default, the host's own address, or a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleSource {
    /// A built-in default deny rule; the text says what it covers ("loopback").
    Default(&'static str),
    /// One of the server's own addresses (a /32 or /128, read from the host).
    OwnAddress,
    Deny,
    Allow,
}

impl RuleSource {
    pub fn denies(self) -> bool {
        self != RuleSource::Allow
    }
}

impl fmt::Display for RuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleSource::Default(what) => write!(f, "default deny ({what})"),
            RuleSource::OwnAddress => write!(f, "default deny (the server's own address)"),
            RuleSource::Deny => write!(f, "DENY"),
            RuleSource::Allow => write!(f, "ALLOW"),
        }
    }
}

/// The rule that decided a target, or none (an address no rule covers is open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub rule: Option<(RuleSource, TargetRule)>,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            Some((source, rule)) => write!(f, "{source} {rule}"),
            None => write!(f, "no rule (open)"),
        }
    }
}

/// Which targets the server dials for its clients.
///
/// Three sources of rules: the built-in defaults ([`TargetPolicy::default_deny`]: loopback,
/// private ranges, metadata, ...) together with a /32 or /128 for each of the server's own
/// addresses (passed in at each check, since they change), the DENY key, and the ALLOW key.
/// Of all the rules that match a target, the most specific one decides: the longer prefix;
/// at an equal prefix, a rule with ports; at an exact tie, a deny. A target no rule matches
/// is open. So `deny` adds to the defaults, an ALLOW entry opens exactly what it names
/// (`198.18.0.2/32:8080`, even on the server itself), and an allow-list is
/// `DENY=0.0.0.0/0,::/0` plus ALLOW entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    pub allow: Vec<TargetRule>,
    /// The DENY key's rules, on top of the defaults.
    pub deny: Vec<TargetRule>,
}

/// The built-in deny rules, with what each covers. The metadata addresses are listed on
/// their own although some lie inside a wider default: as /32 and /128 rules they stay
/// closed when an operator opens the wider range (`ALLOW=100.64.0.0/10`).
const DEFAULT_DENY: &[(&str, u8, &str)] = &[
    ("127.0.0.0", 8, "loopback"),
    ("::1", 128, "loopback"),
    // "This host": 0.0.0.0/8 and :: both reach loopback when dialed on Linux.
    ("0.0.0.0", 8, "this host"),
    ("::", 128, "this host"),
    ("169.254.0.0", 16, "link-local"),
    ("fe80::", 10, "link-local"),
    ("10.0.0.0", 8, "private"),
    ("172.16.0.0", 12, "private"),
    ("192.168.0.0", 16, "private"),
    ("100.64.0.0", 10, "shared address space"),
    ("fc00::", 7, "unique local"),
    ("169.254.169.254", 32, "cloud metadata"),
    ("fd00:ec2::254", 128, "cloud metadata"),
    ("100.100.100.200", 32, "cloud metadata"),
];

/// Orders matching rules: the greatest is the one that decides.
fn specificity(source: RuleSource, rule: &TargetRule) -> (u8, bool, bool) {
    (rule.net.prefix, rule.ports.is_some(), source.denies())
}

impl TargetPolicy {
    /// The built-in deny rules, without the server's own addresses (see [`TargetPolicy`]).
    pub fn default_deny() -> Vec<TargetRule> {
        default_rules().map(|(_, rule)| rule).collect()
    }

    /// Whether the server may dial `target`, given the host's addresses `own`.
    pub fn permits(&self, target: SocketAddr, own: &[IpAddr]) -> bool {
        self.decide(target, own).allowed
    }

    /// The rule that decides `target` (the most specific match), given the host's
    /// addresses `own`.
    pub fn decide(&self, target: SocketAddr, own: &[IpAddr]) -> Verdict {
        // An IPv4-mapped IPv6 target reaches the IPv4 host: judge it as that address, so
        // `::ffff:127.0.0.1` is loopback and a /32 ALLOW is as specific for both forms.
        let target = SocketAddr::new(target.ip().to_canonical(), target.port());
        let decisive = self
            .rules(own)
            .filter(|(_, rule)| rule.matches(target))
            .max_by_key(|(source, rule)| specificity(*source, rule));
        Verdict {
            allowed: decisive.is_none_or(|(source, _)| !source.denies()),
            rule: decisive,
        }
    }

    /// Every rule: defaults, own addresses, DENY, ALLOW.
    fn rules<'a>(&'a self, own: &'a [IpAddr]) -> impl Iterator<Item = (RuleSource, TargetRule)> + 'a {
        default_rules()
            .chain(own_rules(own))
            .chain(self.deny.iter().map(|r| (RuleSource::Deny, *r)))
            .chain(self.allow.iter().map(|r| (RuleSource::Allow, *r)))
    }

    /// What the ALLOW entries open that the defaults (with the host's addresses `own`)
    /// would deny, for the log at start: (the ALLOW rule, the default it overrides). An
    /// ALLOW rule overrides a default it lies within and beats on specificity, unless
    /// another rule shadows it (see [`TargetPolicy::shadowing`]).
    pub fn opened_defaults(&self, own: &[IpAddr]) -> Vec<(TargetRule, RuleSource, TargetRule)> {
        let mut opened = Vec::new();
        for allow in self.allow.iter().filter(|a| self.shadowing(a, own).is_none()) {
            for (source, default) in default_rules().chain(own_rules(own)) {
                if default.net.covers(&allow.net)
                    && specificity(RuleSource::Allow, allow) > specificity(source, &default)
                {
                    opened.push((*allow, source, default));
                }
            }
        }
        opened
    }

    /// A deny rule that covers every target of `allow` and is at least as specific, so
    /// that `allow` opens nothing (`ALLOW=10.0.0.0/8` against the default `10.0.0.0/8`).
    pub fn shadowing(&self, allow: &TargetRule, own: &[IpAddr]) -> Option<(RuleSource, TargetRule)> {
        self.rules(own).find(|(source, deny)| {
            let ports_covered = match (deny.ports, allow.ports) {
                (None, _) => true,
                (Some(d), Some(a)) => d.lo <= a.lo && a.hi <= d.hi,
                (Some(_), None) => false,
            };
            source.denies()
                && deny.net.covers(&allow.net)
                && ports_covered
                && specificity(*source, deny) > specificity(RuleSource::Allow, allow)
        })
    }
}

fn default_rules() -> impl Iterator<Item = (RuleSource, TargetRule)> {
    DEFAULT_DENY.iter().filter_map(|(addr, prefix, what)| {
        let net = IpNet::new(addr.parse().ok()?, *prefix)?;
        Some((RuleSource::Default(what), TargetRule { net, ports: None }))
    })
}

fn own_rules(own: &[IpAddr]) -> impl Iterator<Item = (RuleSource, TargetRule)> + '_ {
    own.iter().filter_map(|ip| {
        let ip = ip.to_canonical();
        let net = IpNet::new(ip, max_prefix(ip))?;
        Some((RuleSource::OwnAddress, TargetRule { net, ports: None }))
    })
}

impl std::str::FromStr for TargetRule {
    type Err = String;

    /// One ALLOW/DENY entry, as in the config (`10.0.0.0/8:22`, `[2001:2::/48]:443`).
    fn from_str(s: &str) -> Result<TargetRule, String> {
        parse_rule(s.trim())
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

    /// The addresses a test pretends the server holds.
    const OWN: &[&str] = &["198.18.0.2", "2001:2::2", "203.0.113.7"];

    fn own() -> Vec<IpAddr> {
        OWN.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn policy(allow: &str, deny: &str) -> TargetPolicy {
        TargetPolicy {
            allow: parse_rules(allow).unwrap(),
            deny: parse_rules(deny).unwrap(),
        }
    }

    fn permits(p: &TargetPolicy, target: &str) -> bool {
        p.permits(sa(target), &own())
    }

    #[test]
    fn default_policy_denies_loopback_private_shared_link_local_and_metadata() {
        let p = TargetPolicy::default();
        for blocked in [
            "127.0.0.1:80",
            "127.255.0.9:80",
            "0.0.0.0:22",
            "0.1.2.3:22",
            "[::1]:80",
            "[::]:80",
            "169.254.1.1:80",
            "[fe80::1]:80",
            "10.1.2.3:80",
            "172.16.0.1:80",
            "172.31.255.254:80",
            "192.168.1.1:80",
            "100.64.0.1:80",
            "100.127.255.254:80",
            "[fc00::1]:80",
            "[fd12:3456::1]:80",
            "169.254.169.254:80",
            "[fd00:ec2::254]:80",
            "100.100.100.200:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:10.0.0.1]:80",
            "[::ffff:169.254.169.254]:80",
        ] {
            assert!(!permits(&p, blocked), "{blocked} permitted");
        }
        // The test range (198.18.0.0/15) and public addresses stay open, and so do the
        // neighbours of the private ranges.
        for open in [
            "198.18.0.1:80",
            "198.19.1.1:443",
            "[2001:2::1]:443",
            "[::ffff:198.18.0.1]:80",
            "172.32.0.1:80",
            "172.15.255.255:80",
            "100.128.0.1:80",
            "11.0.0.1:80",
            "[fe00::1]:80",
            "1.1.1.1:53",
        ] {
            assert!(permits(&p, open), "{open} refused");
        }
    }

    #[test]
    fn the_servers_own_addresses_are_denied_on_every_port() {
        let p = TargetPolicy::default();
        for target in [
            "198.18.0.2:8080",
            "198.18.0.2:1",
            "[2001:2::2]:443",
            "203.0.113.7:22",
            "[::ffff:198.18.0.2]:80",
        ] {
            assert!(!permits(&p, target), "own address {target} permitted");
            assert_eq!(
                p.decide(sa(target), &own()).rule.map(|r| r.0),
                Some(RuleSource::OwnAddress)
            );
        }
        // Only the address itself, not its subnet; and without the host's list, nothing.
        assert!(permits(&p, "198.18.0.3:8080"));
        assert!(p.permits(sa("198.18.0.2:8080"), &[]));
    }

    #[test]
    fn deny_adds_to_the_defaults() {
        let p = policy("", "10.0.0.0/8, 198.18.5.0/24:22");
        assert!(!permits(&p, "127.0.0.1:80"), "DENY must not re-open loopback");
        assert!(!permits(&p, "169.254.169.254:80"), "DENY must not re-open metadata");
        assert!(!permits(&p, "198.18.0.2:80"), "DENY must not re-open the server itself");
        assert!(!permits(&p, "198.18.5.9:22"));
        assert!(permits(&p, "198.18.5.9:23"));
        assert!(permits(&p, "198.18.0.1:80"));
    }

    #[test]
    fn an_exact_allow_opens_exactly_that_service_even_on_the_server_itself() {
        let p = policy("198.18.0.2/32:8080", "");
        assert!(permits(&p, "198.18.0.2:8080"));
        assert!(permits(&p, "[::ffff:198.18.0.2]:8080"));
        assert!(!permits(&p, "198.18.0.2:8081"), "only the named port");
        assert!(!permits(&p, "198.18.0.2:22"));
        let v = p.decide(sa("198.18.0.2:8080"), &own());
        assert_eq!(v.rule, Some((RuleSource::Allow, rule("198.18.0.2/32:8080"))));
    }

    #[test]
    fn a_longer_prefix_wins_over_a_shorter_one() {
        // ALLOW inside a default: opens that part only.
        let p = policy("10.1.0.0/16", "");
        assert!(permits(&p, "10.1.2.3:80"));
        assert!(!permits(&p, "10.2.0.1:80"));
        // DENY inside an ALLOW: closes that part again.
        let p = policy("10.0.0.0/9", "10.1.2.0/24");
        assert!(permits(&p, "10.1.3.1:80"));
        assert!(!permits(&p, "10.1.2.1:80"));
        // A wide ALLOW does not open a narrower default inside it.
        let p = policy("0.0.0.0/0, ::/0", "");
        assert!(!permits(&p, "127.0.0.1:80"));
        assert!(!permits(&p, "10.0.0.1:80"));
        assert!(!permits(&p, "198.18.0.2:80"), "own address /32 beats ALLOW /0");
        assert!(!permits(&p, "[fd00:ec2::254]:80"));
        // Opening a whole default range keeps the metadata /32 inside it closed.
        let p = policy("169.254.128.0/17, 100.96.0.0/11", "");
        assert!(permits(&p, "169.254.200.1:80"));
        assert!(permits(&p, "100.100.1.1:80"));
        assert!(!permits(&p, "169.254.169.254:80"));
        assert!(!permits(&p, "100.100.100.200:80"));
    }

    #[test]
    fn at_an_equal_prefix_a_rule_with_a_port_wins() {
        let p = policy("10.0.0.0/8:443", "");
        assert!(permits(&p, "10.9.9.9:443"));
        assert!(!permits(&p, "10.9.9.9:80"));
        let p = policy("198.18.0.0/24", "198.18.0.0/24:22-25");
        assert!(!permits(&p, "198.18.0.7:22"));
        assert!(permits(&p, "198.18.0.7:80"));
    }

    #[test]
    fn deny_wins_an_exact_tie() {
        // Same prefix, both without ports: the default (a deny) wins.
        let p = policy("10.0.0.0/8, 127.0.0.0/8, 198.18.0.2/32", "");
        assert!(!permits(&p, "10.0.0.1:80"));
        assert!(!permits(&p, "127.0.0.1:80"));
        assert!(!permits(&p, "198.18.0.2:80"));
        // Same prefix, both with ports: DENY wins.
        let p = policy("198.18.0.0/24:80", "198.18.0.0/24:80");
        assert!(!permits(&p, "198.18.0.5:80"));
        // Whatever the order they are written in.
        let p = policy("198.18.0.0/24:80-90", "198.18.0.0/24:80");
        assert!(!permits(&p, "198.18.0.5:80"));
        assert!(permits(&p, "198.18.0.5:81"));
    }

    #[test]
    fn an_allow_list_is_deny_everything_plus_allow_entries() {
        let p = policy(
            "198.18.0.0/15:443, [2001:2::/48]:8000-8999, 198.18.0.2/32:8080",
            "0.0.0.0/0, ::/0",
        );
        assert!(permits(&p, "198.19.1.1:443"));
        assert!(!permits(&p, "198.19.1.1:80"));
        assert!(permits(&p, "[2001:2::5]:8500"));
        assert!(!permits(&p, "[2001:2::5]:9000"));
        assert!(!permits(&p, "[2001:3::5]:8500"));
        assert!(!permits(&p, "1.1.1.1:443"));
        assert!(!permits(&p, "[::ffff:1.1.1.1]:443"));
        assert!(permits(&p, "198.18.0.2:8080"));
        assert!(
            !permits(&p, "198.18.0.2:443"),
            "the server's own address beats ALLOW /15"
        );
        assert!(!permits(&p, "10.0.0.1:443"));
    }

    #[test]
    fn what_allow_opens_of_the_defaults_is_reported() {
        let own = own();
        let p = policy(
            "198.18.0.2/32:8080, 10.1.0.0/16, 10.0.0.0/8, 169.254.169.254/32, 1.1.1.1",
            "",
        );
        let opened: Vec<String> = p
            .opened_defaults(&own)
            .iter()
            .map(|(allow, source, default)| format!("{allow} > {source} {default}"))
            .collect();
        assert_eq!(
            opened,
            [
                "198.18.0.2/32:8080 > default deny (the server's own address) 198.18.0.2/32",
                "10.1.0.0/16 > default deny (private) 10.0.0.0/8",
            ]
        );
        assert_eq!(
            p.shadowing(&rule("10.0.0.0/8"), &own),
            Some((RuleSource::Default("private"), rule("10.0.0.0/8")))
        );
        assert_eq!(
            p.shadowing(&rule("169.254.169.254/32"), &own).map(|s| s.0),
            Some(RuleSource::Default("cloud metadata"))
        );
        assert_eq!(p.shadowing(&rule("10.1.0.0/16"), &own), None);
        assert!(TargetPolicy::default().opened_defaults(&own).is_empty());
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
