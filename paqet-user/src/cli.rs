//! The command line: subcommands, and one flag per paqet.conf key that overrides it.
//!
//! Flag names are the config keys in lowercase with dashes (`SOCKS_ADDR` →
//! `--socks-addr`), so `paqet::config` can name the flag a bad value came from.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "paqet",
    version,
    about = "Relay SOCKS5 streams over KCP in packets paqet builds itself, steered by XDP",
    long_about = None,
    after_help = "Settings come from /etc/flowless/paqet.conf (KEY=VALUE lines) unless --config names \
                  another file; a flag overrides the matching key."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the SOCKS5 side: accept local SOCKS5 connections and relay them to REMOTE_ADDR
    #[command(mut_arg("role", |a| a.hide(true)))]
    Client(RunArgs),
    /// Run the relay server: accept paqet clients on LISTEN_ADDR and dial their targets
    #[command(mut_arg("role", |a| a.hide(true)))]
    Server(RunArgs),
    /// Run with the role from the config (ROLE, or client if REMOTE_ADDR is set, server if LISTEN_ADDR is)
    Run(RunArgs),
    /// Troubleshoot: check the binary, capabilities, config, ports, kernel features and route to the peer
    Check(RunArgs),
    /// Show attached programs, counters and live sessions
    Status(StatusArgs),
    /// Print a new random key (base64 of 32 bytes) for KEY or KEY_FILE
    Genkey,
    /// Print the shell completion script for bash, zsh or fish
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page, paqet(1), in roff (`cargo xtask deb` installs it)
    #[command(hide = true)]
    Manpage,
}

/// Flags shared by the commands that read paqet.conf. Each is optional and, when given,
/// overrides the config key named in its help.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// Config file [default: /etc/flowless/paqet.conf, read if it exists]
    #[arg(long, short, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// ROLE: client or server (the `client` and `server` commands set it themselves)
    #[arg(long, value_name = "ROLE")]
    pub role: Option<String>,

    /// SOCKS_ADDR: where the SOCKS5 port listens [default: 127.0.0.1:1080]
    #[arg(long, value_name = "IP:PORT")]
    pub socks_addr: Option<String>,

    /// SOCKS_USER: SOCKS5 user name (needed, with --socks-pass, off loopback)
    #[arg(long, value_name = "USER")]
    pub socks_user: Option<String>,

    /// SOCKS_PASS: SOCKS5 password (visible to other users in `ps`; prefer the config file)
    #[arg(long, value_name = "PASS")]
    pub socks_pass: Option<String>,

    /// REMOTE_ADDR: the server to relay to (client), e.g. 198.18.0.2:4000
    #[arg(long, value_name = "HOST:PORT")]
    pub remote_addr: Option<String>,

    /// LISTEN_ADDR: where the server listens, e.g. 0.0.0.0:4000
    #[arg(long, value_name = "IP:PORT")]
    pub listen_addr: Option<String>,

    /// INTERFACE: network interface [default: the one routing to the peer / holding LISTEN_ADDR]
    #[arg(long, value_name = "NAME")]
    pub interface: Option<String>,

    /// TRANSPORT: auto, xdp or udp [default: auto]
    #[arg(long, value_name = "KIND")]
    pub transport: Option<String>,

    /// WIRE: what xdp frames look like on the wire: auto (client: tcp, then udp; server: both), tcp or udp [default: auto]
    #[arg(long, value_name = "SHAPE")]
    pub wire: Option<String>,

    /// XDP_MODE: auto, native or generic [default: auto]
    #[arg(long, value_name = "MODE")]
    pub xdp_mode: Option<String>,

    /// KCP_MODE: normal, fast, fast2 or fast3 [default: fast3]
    #[arg(long, value_name = "MODE")]
    pub kcp_mode: Option<String>,

    /// UDP_BUFFER: socket buffer bytes, e.g. 4M [default: the kernel's]
    #[arg(long, value_name = "BYTES")]
    pub udp_buffer: Option<String>,

    /// TIMEOUT: seconds to dial a target or wait for a silent peer [default: 30]
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<String>,

    /// UDP_TIMEOUT: seconds a server UDP flow lives without a client datagram [default: 60]
    #[arg(long, value_name = "SECONDS")]
    pub udp_timeout: Option<String>,

    /// THREADS: engines a TRANSPORT=udp relay runs, one per thread: auto (one per core, at most 8) or a number [default: server auto, client 1]
    #[arg(long, value_name = "N")]
    pub threads: Option<String>,

    /// KEY: pre-shared key, base64 of 32 bytes (visible to other users in `ps`; prefer --key-file)
    #[arg(long, value_name = "BASE64")]
    pub key: Option<String>,

    /// KEY_FILE: file holding the key (mode 0600)
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<String>,

    /// ALLOW: targets the server may dial, e.g. 198.18.0.0/15:443,[2001:2::/48]:8000-8999
    #[arg(long, value_name = "CIDRS")]
    pub allow: Option<String>,

    /// DENY: targets the server refuses, added to the defaults (loopback, own addresses, private ranges, metadata)
    #[arg(long, value_name = "CIDRS")]
    pub deny: Option<String>,

    /// FORWARD: client ports forwarded to fixed targets, e.g. tcp/127.0.0.1:2222=10.0.0.5:22,udp/127.0.0.1:5353=9.9.9.9:53 (a non-loopback listener needs !public at the end of its entry)
    #[arg(long, value_name = "ENTRIES")]
    pub forward: Option<String>,

    /// METRICS_ADDR: ip:port serving Prometheus metrics at /metrics, e.g. 127.0.0.1:9465 (off when unset; a non-loopback address needs !public at the end)
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,

    /// LOG_LEVEL: error, warn, info, debug or trace [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

impl RunArgs {
    /// The flags given, as (config key, value), for `Config::load`.
    pub fn overrides(&self) -> Vec<(&'static str, String)> {
        [
            ("ROLE", &self.role),
            ("SOCKS_ADDR", &self.socks_addr),
            ("SOCKS_USER", &self.socks_user),
            ("SOCKS_PASS", &self.socks_pass),
            ("REMOTE_ADDR", &self.remote_addr),
            ("LISTEN_ADDR", &self.listen_addr),
            ("INTERFACE", &self.interface),
            ("TRANSPORT", &self.transport),
            ("WIRE", &self.wire),
            ("XDP_MODE", &self.xdp_mode),
            ("KCP_MODE", &self.kcp_mode),
            ("UDP_BUFFER", &self.udp_buffer),
            ("TIMEOUT", &self.timeout),
            ("UDP_TIMEOUT", &self.udp_timeout),
            ("THREADS", &self.threads),
            ("KEY", &self.key),
            ("KEY_FILE", &self.key_file),
            ("ALLOW", &self.allow),
            ("DENY", &self.deny),
            ("FORWARD", &self.forward),
            ("METRICS_ADDR", &self.metrics_addr),
            ("LOG_LEVEL", &self.log_level),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.clone().map(|v| (key, v)))
        .collect()
    }
}

#[derive(Debug, Clone, Default, Args)]
pub struct StatusArgs {
    /// Print machine-readable JSON
    #[arg(long)]
    pub json: bool,

    /// Only this instance (role and interface, as under /sys/fs/bpf/paqet/), e.g. server-eth0
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,

    /// Config file, to find the instance it runs [default: /etc/flowless/paqet.conf]
    #[arg(long, short, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::config::{KEYS, flag_for_key};

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_config_key_has_its_flag() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        for key in KEYS {
            let flag = flag_for_key(key);
            assert!(
                run.get_arguments().any(|a| a.get_long() == Some(&flag[2..])),
                "no {flag} for {key}"
            );
        }
    }

    #[test]
    fn overrides_map_flags_to_keys() {
        let Cli {
            command: Command::Client(args),
        } = parse(&[
            "paqet",
            "client",
            "-c",
            "/tmp/p.conf",
            "--socks-addr",
            "127.0.0.1:2080",
            "--kcp-mode",
            "fast",
        ])
        else {
            panic!("not client")
        };
        assert_eq!(args.config, Some(PathBuf::from("/tmp/p.conf")));
        assert_eq!(
            args.overrides(),
            vec![
                ("SOCKS_ADDR", "127.0.0.1:2080".to_owned()),
                ("KCP_MODE", "fast".to_owned())
            ]
        );
        let every: Vec<String> = KEYS.iter().flat_map(|k| [flag_for_key(k), format!("v-{k}")]).collect();
        let mut argv = vec!["paqet", "run"];
        argv.extend(every.iter().map(String::as_str));
        let Cli {
            command: Command::Run(args),
        } = parse(&argv)
        else {
            panic!("not run")
        };
        let got = args.overrides();
        assert_eq!(got.len(), KEYS.len());
        assert!(got.iter().all(|(k, v)| *v == format!("v-{k}")), "{got:?}");
    }

    #[test]
    fn subcommands_and_help() {
        assert!(matches!(parse(&["paqet", "genkey"]).command, Command::Genkey));
        let Command::Status(s) = parse(&["paqet", "status", "--json", "--instance", "client-eth0"]).command else {
            panic!("not status")
        };
        assert!(s.json);
        assert_eq!(s.instance.as_deref(), Some("client-eth0"));
        let help = Cli::command().render_help().to_string();
        // Column widths follow the longest command name: match name and text per line.
        for (name, about) in [
            ("client", "Run the SOCKS5 side"),
            ("server", "Run the relay server"),
            ("run", "Run with the role from the config"),
            ("check", "Troubleshoot"),
            ("status", "Show attached programs, counters and live sessions"),
            ("genkey", "Print a new random key"),
            ("completions", "Print the shell completion script"),
        ] {
            let listed = help.lines().any(|l| {
                let l = l.trim_start();
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.trim_start().starts_with(about))
            });
            assert!(listed, "{name:?} with {about:?} missing from:\n{help}");
        }
        assert!(!help.contains("manpage"), "the manpage command is hidden:\n{help}");
        let mut cmd = Cli::command();
        let client_help = cmd.find_subcommand_mut("client").unwrap().render_help().to_string();
        assert!(
            !client_help.contains("--role") && client_help.contains("/etc/flowless/paqet.conf"),
            "{client_help}"
        );
        assert!(Cli::try_parse_from(["paqet", "client", "--bogus"]).is_err());
    }
}
