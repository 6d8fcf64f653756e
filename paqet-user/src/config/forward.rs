//! `FORWARD`: ports the client forwards to fixed targets through the server, without
//! SOCKS. Comma-separated entries, each `PROTO/LISTEN=TARGET`:
//!
//! - `PROTO` is `tcp` (a CONNECT without the SOCKS handshake) or `udp` (each local
//!   source address gets its own flow, so replies find their sender);
//! - `LISTEN` is `ip:port` (IPv6 in brackets). It must be a loopback address unless the
//!   entry ends in `!public`: a forward has no credentials, so anyone who reaches a
//!   public listener uses the relay (and the server's network) as this client;
//! - `TARGET` is `host:port`, resolved by the server as for CONNECT.
//!
//! `FORWARD=tcp/127.0.0.1:2222=10.0.0.5:22,udp/127.0.0.1:5353=9.9.9.9:53,tcp/0.0.0.0:8080=web.internal:80!public`

use std::net::SocketAddr;

use super::values::{HostPort, is_loopback, parse_host_port};

/// The opt-in, at the end of an entry, for a listener off loopback.
pub const PUBLIC_SUFFIX: &str = "!public";
const EXAMPLE: &str = "tcp/127.0.0.1:2222=10.0.0.5:22 or udp/127.0.0.1:5353=9.9.9.9:53";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardProto {
    Tcp,
    Udp,
}

impl std::fmt::Display for ForwardProto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForwardProto::Tcp => "tcp",
            ForwardProto::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub proto: ForwardProto,
    pub listen: SocketAddr,
    pub target: HostPort,
    /// Listens off loopback (the entry said `!public`).
    pub public: bool,
}

impl std::fmt::Display for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}={}", self.proto, self.listen, self.target)?;
        if self.public {
            f.write_str(PUBLIC_SUFFIX)?;
        }
        Ok(())
    }
}

/// Parses the whole value; the error names the entry and what would be valid.
pub fn parse_forwards(text: &str) -> Result<Vec<Forward>, String> {
    let mut out: Vec<Forward> = Vec::new();
    for (i, raw) in text.split(',').enumerate() {
        let entry = raw.trim();
        let at = |why: String| format!("entry {} ({entry:?}): {why}", i + 1);
        if entry.is_empty() {
            return Err(at(format!(
                "empty entry; entries are separated by single commas, e.g. {EXAMPLE}"
            )));
        }
        let forward = parse_entry(entry).map_err(at)?;
        if let Some(first) = out
            .iter()
            .position(|f| f.proto == forward.proto && f.listen == forward.listen)
        {
            return Err(at(format!(
                "{}/{} is already forwarded by entry {}; each listener may appear once",
                forward.proto,
                forward.listen,
                first + 1
            )));
        }
        out.push(forward);
    }
    Ok(out)
}

/// Splits the `!public` opt-in off `text` (FORWARD entries and METRICS_ADDR use it).
pub(crate) fn strip_public(text: &str) -> (&str, bool) {
    match text.strip_suffix(PUBLIC_SUFFIX) {
        Some(rest) => (rest, true),
        None => (text, false),
    }
}

fn parse_entry(entry: &str) -> Result<Forward, String> {
    let (entry, public) = strip_public(entry);
    let (proto, rest) = entry
        .split_once('/')
        .ok_or_else(|| format!("expected PROTO/LISTEN=TARGET, e.g. {EXAMPLE}"))?;
    let proto = match proto {
        "tcp" => ForwardProto::Tcp,
        "udp" => ForwardProto::Udp,
        other => return Err(format!("protocol {other:?} is neither tcp nor udp; e.g. {EXAMPLE}")),
    };
    let (listen, target) = rest
        .split_once('=')
        .ok_or_else(|| format!("no '=' between LISTEN and TARGET; e.g. {EXAMPLE}"))?;
    let listen: SocketAddr = listen.parse().map_err(|_| {
        format!("LISTEN {listen:?} is not ip:port with an IP address (IPv6 in brackets), e.g. 127.0.0.1:2222")
    })?;
    if listen.port() == 0 {
        return Err("LISTEN needs a port other than 0".to_owned());
    }
    if !public && !is_loopback(listen.ip()) {
        return Err(format!(
            "LISTEN {listen} is not a loopback address, so anyone who reaches it could use this relay \
             (a forward asks for no credentials); end the entry with {PUBLIC_SUFFIX} to mean it, or listen \
             on 127.0.0.1"
        ));
    }
    let target = parse_host_port(target).map_err(|why| format!("TARGET {target:?}: {why}"))?;
    if target.port == 0 {
        return Err("TARGET needs a port other than 0".to_owned());
    }
    Ok(Forward {
        proto,
        listen,
        target,
        public,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_examples_parse() {
        let f = parse_forwards(
            "tcp/127.0.0.1:2222=10.0.0.5:22, udp/127.0.0.1:5353=9.9.9.9:53,tcp/[::1]:80=web.test:8080,\
             udp/0.0.0.0:53=[2001:2::1]:53!public",
        )
        .unwrap();
        assert_eq!(f.len(), 4);
        assert_eq!(f[0].proto, ForwardProto::Tcp);
        assert_eq!(f[0].listen, "127.0.0.1:2222".parse().unwrap());
        assert_eq!(f[0].target.to_string(), "10.0.0.5:22");
        assert_eq!(f[1].proto, ForwardProto::Udp);
        assert_eq!(f[2].target.host, "web.test");
        assert!(f[3].public);
        assert_eq!(f[3].target.host, "2001:2::1");
        assert_eq!(f[3].to_string(), "udp/0.0.0.0:53=[2001:2::1]:53!public");
    }

    #[test]
    fn errors_name_the_entry_and_what_is_valid() {
        let cases = [
            (
                "tcp/127.0.0.1:1=a:1,,udp/127.0.0.1:2=b:2",
                "entry 2",
                "separated by single commas",
            ),
            ("sctp/127.0.0.1:1=a:1", "entry 1", "neither tcp nor udp"),
            ("tcp127.0.0.1:1=a:1", "entry 1", "PROTO/LISTEN=TARGET"),
            ("tcp/127.0.0.1:1", "entry 1", "no '='"),
            ("tcp/localhost:1=a:1", "entry 1", "not ip:port"),
            ("tcp/127.0.0.1:0=a:1", "entry 1", "port other than 0"),
            ("tcp/0.0.0.0:22=a:1", "entry 1", "!public"),
            ("udp/198.18.0.1:53=a:1", "entry 1", "not a loopback"),
            ("tcp/127.0.0.1:1=a", "entry 1", "TARGET \"a\""),
            ("tcp/127.0.0.1:1=a:0", "entry 1", "TARGET \"a:0\""),
            (
                "tcp/127.0.0.1:1=a:1,tcp/127.0.0.1:1=b:2",
                "entry 2",
                "already forwarded by entry 1",
            ),
            ("tcp/127.0.0.1:1=a:1!publik", "entry 1", "TARGET"),
        ];
        for (text, entry, hint) in cases {
            let e = parse_forwards(text).unwrap_err();
            assert!(e.starts_with(entry), "{text}: {e}");
            assert!(e.contains(hint), "{text}: {e}");
        }
        // Through the config: the file, the line, the key and the value are named.
        let text = "REMOTE_ADDR=198.18.0.2:4000\nKEY=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n\
                    FORWARD=tcp/0.0.0.0:2222=10.0.0.5:22\n";
        let settings = crate::config::Settings::parse_str(text, "/etc/flowless/paqet.conf").unwrap();
        let e = crate::config::Config::from_settings(&settings, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/flowless/paqet.conf:3: FORWARD=\"tcp/0.0.0.0:2222=10.0.0.5:22\" is not valid: entry 1"),
            "{e}"
        );
        assert!(e.contains("!public"), "{e}");
        let server = "LISTEN_ADDR=0.0.0.0:4000\nKEY=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n\
                      FORWARD=tcp/127.0.0.1:2222=10.0.0.5:22\n";
        let settings = crate::config::Settings::parse_str(server, "s.conf").unwrap();
        let e = crate::config::Config::from_settings(&settings, None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("s.conf:3: FORWARD is a client setting"), "{e}");
        // The same port over both protocols is two listeners.
        assert_eq!(
            parse_forwards("tcp/127.0.0.1:53=a:53,udp/127.0.0.1:53=a:53")
                .unwrap()
                .len(),
            2
        );
    }
}
