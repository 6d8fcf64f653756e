//! A home router between client and server: the client sits on a LAN (198.19.0.0/24,
//! IPv6 2001:2:0:1::/64) behind a router namespace that forwards to the server's link
//! (198.18.0.0/24, 2001:2::/64) through nftables with what strict middleboxes do:
//!
//! - IPv4 source NAT (masquerade) on the way out; IPv6 routed without NAT;
//! - a stateful forward filter, policy drop: only flows opened from the LAN, and their
//!   answers, pass (`ct state established,related`, `iifname LAN ct state new`);
//! - conntrack as strict as Linux gets: `nf_conntrack_tcp_loose=0` (a TCP flow must
//!   begin with a SYN), `nf_conntrack_tcp_be_liberal=0` (every segment's sequence and
//!   acknowledgement numbers are checked against the windows it tracks), and
//!   `ct state invalid` dropped and counted in the named counter `invalid`.
//!
//! The conntrack sysctls are per network namespace on the kernels this runs on; the
//! router checks that setting them left the host's values alone.
//!
//! The hosts come back as a [`TwoHosts`] (client and server namespaces) for the relay
//! bed; the router namespace lives in [`Router`], which the test keeps until the bed is
//! gone. Dropping either removes its namespaces and with them every link.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, TwoHosts, run_checked, veth};

pub const CLIENT_LAN_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
pub const ROUTER_LAN_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The router's address on the server's link: what the server sees the client as.
pub const ROUTER_WAN_IP: Ipv4Addr = TwoHosts::CLIENT_IP;
pub const SERVER_IP: Ipv4Addr = TwoHosts::SERVER_IP;
/// The public address [`Router::change_public_address`] moves to.
pub const ROUTER_WAN_IP2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const CLIENT_LAN_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);
pub const ROUTER_LAN_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);
pub const ROUTER_WAN_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);

/// The nftables table the router's rules live in.
const TABLE: &str = "paqet_fw";

/// The router namespace; dropping it removes it and both of its links.
#[derive(Debug)]
pub struct Router {
    pub ns: Netns,
    pub lan_if: String,
    pub wan_if: String,
    scratch: PathBuf,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.scratch);
    }
}

/// Client and server with a strict NAT router between them. With `ipv6` both ends
/// also get IPv6 addresses on their links (and routes through the router).
pub fn behind_router(tag: &str, ipv6: bool) -> Result<(TwoHosts, Router)> {
    let client = Netns::new(&format!("pq{tag}c"))?;
    let server = Netns::new(&format!("pq{tag}s"))?;
    let ns = Netns::new(&format!("pq{tag}r"))?;
    let run = std::process::id() % 100_000;
    let (client_if, server_if) = crate::netns::interface_names(tag);
    let (lan_if, wan_if) = (format!("l{tag}{run:05}"), format!("w{tag}{run:05}"));
    let router = Router {
        ns,
        lan_if,
        wan_if,
        scratch: std::env::temp_dir().join(format!("paqet-router-{}-{tag}.nft", std::process::id())),
    };
    if ipv6 {
        for n in [&client, &server, &router.ns] {
            n.enable_ipv6()?;
            // No router advertisements or autoconfiguration: addresses are the test's.
            n.sysctl("net.ipv6.conf.all.accept_ra", "0")?;
            n.sysctl("net.ipv6.conf.default.accept_ra", "0")?;
        }
    }
    veth(
        &client,
        &client_if,
        &format!("{CLIENT_LAN_IP}/24"),
        &router.ns,
        &router.lan_if,
        &format!("{ROUTER_LAN_IP}/24"),
    )?;
    veth(
        &router.ns,
        &router.wan_if,
        &format!("{ROUTER_WAN_IP}/24"),
        &server,
        &server_if,
        &format!("{SERVER_IP}/24"),
    )?;
    client.exec(&["ip", "route", "add", "default", "via", &ROUTER_LAN_IP.to_string()])?;
    router.ns.sysctl("net.ipv4.ip_forward", "1")?;
    if ipv6 {
        for (n, ifname, ip) in [
            (&client, &client_if, CLIENT_LAN_IP6),
            (&router.ns, &router.lan_if, ROUTER_LAN_IP6),
            (&router.ns, &router.wan_if, ROUTER_WAN_IP6),
            (&server, &server_if, SERVER_IP6),
        ] {
            n.exec(&["ip", "-6", "addr", "add", &format!("{ip}/64"), "dev", ifname, "nodad"])?;
        }
        router.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        client.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            &ROUTER_LAN_IP6.to_string(),
        ])?;
        server.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "2001:2:0:1::/64",
            "via",
            &ROUTER_WAN_IP6.to_string(),
        ])?;
    }
    router.install_firewall()?;
    let hosts = TwoHosts {
        client,
        server,
        client_if,
        server_if,
    };
    Ok((hosts, router))
}

/// The host's value of a sysctl (the test process's own namespace).
fn host_sysctl(key: &str) -> Option<String> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

impl Router {
    fn install_firewall(&self) -> Result<()> {
        let (lan, wan) = (&self.lan_if, &self.wan_if);
        let rules = format!(
            "table inet {TABLE} {{
  counter invalid {{ }}
  counter relay_out {{ }}
  counter relay_in {{ }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state invalid counter name \"invalid\" drop
    iifname \"{lan}\" meta l4proto {{ tcp, udp }} th dport 4000 counter name \"relay_out\"
    iifname \"{wan}\" meta l4proto {{ tcp, udp }} th sport 4000 counter name \"relay_in\"
    ct state established,related accept
    iifname \"{lan}\" oifname \"{wan}\" ct state new accept
  }}
}}
table ip {TABLE}_nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{wan}\" masquerade
  }}
}}
"
        );
        std::fs::write(&self.scratch, rules).with_context(|| format!("writing {}", self.scratch.display()))?;
        let path = self.scratch.to_string_lossy().into_owned();
        self.ns.exec(&["nft", "-f", &path])?;
        // conntrack's sysctls appear in a namespace once conntrack runs there (the rules
        // above start it); they must be the namespace's own, not the host's.
        let keys = [
            ("net.netfilter.nf_conntrack_tcp_loose", "0"),
            ("net.netfilter.nf_conntrack_tcp_be_liberal", "0"),
        ];
        for (key, value) in keys {
            let host_before = host_sysctl(key);
            self.ns.sysctl(key, value)?;
            let here = self.sysctl_value(key)?;
            if here != value {
                bail!("{key} reads {here} in the router after writing {value}");
            }
            if host_sysctl(key) != host_before {
                bail!("{key} is not per network namespace here: setting it in the router changed the host's");
            }
        }
        Ok(())
    }

    /// A sysctl's value inside the router.
    pub fn sysctl_value(&self, key: &str) -> Result<String> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        Ok(self.ns.run(|| std::fs::read_to_string(&path))??.trim().to_string())
    }

    fn counter(&self, name: &str) -> Result<(u64, u64)> {
        let out = self.ns.exec(&["nft", "list", "counter", "inet", TABLE, name])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |what: &str| -> Result<u64> {
            let mut words = text.split_whitespace();
            words
                .find(|w| *w == what)
                .and_then(|_| words.next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {what} in: {text}"))
        };
        Ok((field("packets")?, field("bytes")?))
    }

    /// Packets the filter dropped as `ct state invalid`.
    pub fn invalid_drops(&self) -> Result<u64> {
        Ok(self.counter("invalid")?.0)
    }

    /// Packets to the server's port (LAN to WAN) and from it (WAN to LAN) that reached
    /// the filter.
    pub fn relay_packets(&self) -> Result<(u64, u64)> {
        Ok((self.counter("relay_out")?.0, self.counter("relay_in")?.0))
    }

    /// `conntrack -F`: the router forgets every flow (as a reboot would).
    pub fn forget_flows(&self) -> Result<()> {
        self.ns.exec(&["conntrack", "-F"])?;
        Ok(())
    }

    /// The router's TCP flows as `conntrack -L` prints them.
    pub fn tcp_flows(&self) -> Result<String> {
        let out = self.ns.command("conntrack").args(["-L", "-p", "tcp"]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Established TCP flows expire after `secs` idle (the default is five days).
    pub fn set_established_timeout(&self, secs: u32) -> Result<()> {
        self.ns
            .sysctl("net.netfilter.nf_conntrack_tcp_timeout_established", &secs.to_string())
    }

    /// The NAT's public address changes (as after a DHCP renewal): the router takes
    /// [`ROUTER_WAN_IP2`] beside its address, source-NATs to it from now on, and forgets
    /// every flow.
    pub fn change_public_address(&self) -> Result<()> {
        let wan = self.wan_if.as_str();
        self.ns
            .exec(&["ip", "addr", "add", &format!("{ROUTER_WAN_IP2}/24"), "dev", wan])?;
        let chain = ["ip", &format!("{TABLE}_nat"), "postrouting"];
        let mut flush = self.ns.command("nft");
        flush.arg("flush").arg("chain").args(chain);
        run_checked(&mut flush)?;
        let mut snat = self.ns.command("nft");
        snat.arg("add").arg("rule").args(chain);
        snat.args(["oifname", wan, "snat", "to", &ROUTER_WAN_IP2.to_string()]);
        run_checked(&mut snat)?;
        self.forget_flows()
    }

    /// The NAT maps the client's UDP to `port` on its public address from now on (other
    /// traffic masquerades as before), and forgets every flow: the server sees the
    /// client come from a new source port (a NAT rebinding).
    pub fn rebind_udp_to_port(&self, port: u16) -> Result<()> {
        let chain = ["ip", &format!("{TABLE}_nat"), "postrouting"];
        let mut flush = self.ns.command("nft");
        flush.arg("flush").arg("chain").args(chain);
        run_checked(&mut flush)?;
        let wan = self.wan_if.as_str();
        let to = format!("{ROUTER_WAN_IP}:{port}");
        for rule in [
            &["oifname", wan, "meta", "l4proto", "udp", "snat", "to", &to][..],
            &["oifname", wan, "masquerade"][..],
        ] {
            let mut add = self.ns.command("nft");
            add.arg("add").arg("rule").args(chain).args(rule);
            run_checked(&mut add)?;
        }
        self.forget_flows()
    }

    /// Drops every UDP datagram it would forward (a network that blocks UDP).
    pub fn drop_udp(&self) -> Result<()> {
        self.insert_rule("meta l4proto udp drop")
    }

    /// Drops every TCP segment to or from the server's port (a network that blocks
    /// the fake TCP).
    pub fn drop_tcp_to_port(&self, port: u16) -> Result<()> {
        self.insert_rule(&format!("tcp dport {port} drop"))?;
        self.insert_rule(&format!("tcp sport {port} drop"))
    }

    fn insert_rule(&self, rule: &str) -> Result<()> {
        let mut cmd = self.ns.command("nft");
        cmd.args(["insert", "rule", "inet", TABLE, "forward"]);
        cmd.args(rule.split_whitespace());
        run_checked(&mut cmd)?;
        Ok(())
    }
}

/// The server's address of a family, as clients dial it.
pub fn server_ip(ipv6: bool) -> IpAddr {
    if ipv6 { SERVER_IP6.into() } else { SERVER_IP.into() }
}

/// `nft` and `conntrack` exist (installed by `cargo xtask setup`).
pub fn tools_present() -> Result<()> {
    for tool in ["nft", "conntrack"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!("{tool} is missing: run `cargo xtask setup` (it installs nftables and conntrack)");
        }
    }
    Ok(())
}
