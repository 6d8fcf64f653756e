//! `METRICS_ADDR`: scrapes of both relays around a known download, parsed by the
//! official Prometheus client's parsers (Python `prometheus_client`, installed by
//! `cargo xtask setup`), not by anything in this repository.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use paqet_tests::netns::Netns;
use paqet_tests::relay::{RelayBed, RelayOptions};
use paqet_tests::{require_root, scenarios, socks, wait_for};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const METRICS: &str = "127.0.0.1:9465";

/// A plain HTTP/1.1 request to the metrics port in `ns`: (status line, headers, body).
fn http_get(ns: &Netns, path: &str) -> (String, String, String) {
    let addr: SocketAddr = METRICS.parse().unwrap();
    let raw = ns
        .run(|| -> std::io::Result<Vec<u8>> {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(conn, "GET {path} HTTP/1.1\r\nHost: {METRICS}\r\nAccept: */*\r\n\r\n")?;
            let mut raw = Vec::new();
            conn.read_to_end(&mut raw)?;
            Ok(raw)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("GET {path} from {}: {e}", ns.name()));
    let text = String::from_utf8(raw).expect("the answer is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP head");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

/// One scrape, parsed: every sample as (name, labels) → value, and each family's type.
struct Scrape {
    samples: HashMap<(String, Vec<(String, String)>), f64>,
    types: HashMap<String, String>,
    text: String,
}

impl Scrape {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut key: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        key.sort();
        *self
            .samples
            .get(&(name.to_owned(), key))
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{}", self.text))
    }

    /// The sum over every label set of `name` (e.g. sessions over all paths).
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }
}

/// Parses with `prometheus_client.parser` (the Prometheus text format) for the values
/// and with its strict OpenMetrics parser for the types (the page says it is
/// OpenMetrics, and the plain parser leaves `_total` counters untyped).
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
text = sys.stdin.read()
samples = [[s.name, sorted(s.labels.items()), s.value]
           for f in text_string_to_metric_families(text) for s in f.samples]
types = {f.name: f.type for f in openmetrics(text)}
print(json.dumps({"samples": samples, "types": types}))
"#;

fn parse(text: &str) -> Scrape {
    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (cargo xtask setup installs prometheus_client for it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse the page: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let samples = v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let labels = s[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|kv| (kv[0].as_str().unwrap().to_owned(), kv[1].as_str().unwrap().to_owned()))
                .collect();
            ((s[0].as_str().unwrap().to_owned(), labels), s[2].as_f64().unwrap())
        })
        .collect();
    let types = v["types"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, t)| (k.clone(), t.as_str().unwrap().to_owned()))
        .collect();
    Scrape {
        samples,
        types,
        text: text.to_owned(),
    }
}

fn scrape(ns: &Netns) -> Scrape {
    let (status, headers, body) = http_get(ns, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(
        headers.contains("Content-Type: application/openmetrics-text"),
        "{headers}"
    );
    parse(&body)
}

/// `paqet status --json` for one instance: its live part.
fn live_status(instance: &str) -> Value {
    let out = Command::new(paqet_tests::paqet_bin())
        .args(["status", "--json", "--instance", instance])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    all[0]["live"].clone()
}

#[test]
fn scrapes_parse_and_move_with_a_download() {
    if !require_root("scrapes_parse_and_move_with_a_download") {
        return;
    }
    let mut opts = RelayOptions::new("xdp").unwrap();
    opts.client_extra.push(format!("METRICS_ADDR={METRICS}"));
    opts.server_extra.push(format!("METRICS_ADDR={METRICS}"));
    let bed = RelayBed::start("m1", &opts).unwrap();
    let (client_ns, server_ns) = (&bed.hosts.client, &bed.hosts.server);
    let len = 8 * MIB;

    // The first download brings the session up; the second is the measured one.
    scenarios::curl_download_is_exact(&bed, MIB);
    let before = (scrape(client_ns), scrape(server_ns));
    scenarios::curl_download_is_exact(&bed, len);
    let after = (scrape(client_ns), scrape(server_ns));

    for (role, s) in [("client", &after.0), ("server", &after.1)] {
        for (family, kind) in [
            ("paqet_bytes_in", "counter"),
            ("paqet_packets_out", "counter"),
            ("paqet_dropped", "counter"),
            ("paqet_xdp_redirected", "counter"),
            ("paqet_sessions", "gauge"),
            ("paqet_streams", "gauge"),
            ("process_resident_memory_bytes", "gauge"),
            ("paqet_relay", "info"),
        ] {
            assert_eq!(
                s.types.get(family).map(String::as_str),
                Some(kind),
                "{role}: {family}\n{}",
                s.text
            );
        }
        assert_eq!(s.sum("paqet_sessions"), 1.0, "{role}\n{}", s.text);
        assert_eq!(
            s.value("paqet_sessions", &[("transport", "xdp"), ("path", "xdp/tcp")]),
            1.0,
            "{role}"
        );
        assert!(s.value("process_resident_memory_bytes", &[]) > 0.0, "{role}");
        assert!(s.value("paqet_handshakes_total", &[]) >= 1.0, "{role}");
        for reason in ["authentication", "replay", "policy", "overflow"] {
            s.value("paqet_dropped_total", &[("reason", reason)]);
        }
        assert_eq!(
            s.value("paqet_relay_info", &[("role", role), ("transports", "xdp/tcp")]),
            1.0
        );
    }
    let grew = |b: &Scrape, a: &Scrape, name: &str| a.value(name, &[]) - b.value(name, &[]);
    // The download flows server → client: at least its bytes, plus headers and framing.
    let client_in = grew(&before.0, &after.0, "paqet_bytes_in_total");
    let server_out = grew(&before.1, &after.1, "paqet_bytes_out_total");
    assert!(
        client_in >= len as f64,
        "client bytes in grew by {client_in}, less than {len}"
    );
    assert!(
        server_out >= len as f64,
        "server bytes out grew by {server_out}, less than {len}"
    );
    // Every datagram the client took arrived through paqet_steer's redirect.
    let packets_in = grew(&before.0, &after.0, "paqet_packets_in_total");
    let redirected = grew(&before.0, &after.0, "paqet_xdp_redirected_total");
    assert!(packets_in > 0.0, "client packets in did not move");
    assert!(
        redirected >= packets_in,
        "paqet_steer redirected {redirected} frames but the client took {packets_in} datagrams"
    );

    // `paqet status --json` reads the same counter: once its file has caught up with
    // the download, it lies between the scrape before plus the download and a scrape
    // after it.
    let instance = format!("client-{}", bed.hosts.client_if);
    let floor = before.0.value("paqet_bytes_in_total", &[]) + len as f64;
    let mut live = Value::Null;
    let caught_up = wait_for(
        || {
            live = live_status(&instance);
            live["bytes_in"].as_f64().is_some_and(|b| b >= floor)
        },
        Duration::from_secs(10),
    );
    assert!(caught_up, "status never showed {floor} bytes in: {live}");
    let later = scrape(client_ns);
    let status_bytes = live["bytes_in"].as_f64().unwrap();
    assert!(
        status_bytes <= later.value("paqet_bytes_in_total", &[]),
        "status shows {status_bytes} bytes in, more than a later scrape"
    );
    assert!(live["rss_bytes"].as_u64().is_some_and(|r| r > 0), "{live}");
    assert!(live["steering"]["redirected"].as_u64().is_some_and(|r| r > 0), "{live}");

    // A CONNECT to the server's loopback, which its target policy denies, is one more
    // policy drop on the server.
    let policy = [("reason", "policy")];
    let refusals = || scrape(server_ns).value("paqet_dropped_total", &policy);
    let first = refusals();
    let proxy = bed.socks_addr();
    let refused = client_ns
        .run(|| socks::connect(proxy, "127.0.0.1", 22, None, 1))
        .unwrap()
        .unwrap();
    assert!(
        refused.is_err(),
        "the policy let a CONNECT to the server's loopback through"
    );
    assert_eq!(refusals(), first + 1.0);
}

#[test]
fn only_get_metrics_is_served_and_a_silent_client_is_cut_off() {
    if !require_root("only_get_metrics_is_served_and_a_silent_client_is_cut_off") {
        return;
    }
    let mut opts = RelayOptions::new("udp").unwrap();
    opts.client_extra.push(format!("METRICS_ADDR={METRICS}"));
    let bed = RelayBed::start("m2", &opts).unwrap();
    let ns = &bed.hosts.client;
    for path in ["/", "/metrics/x", "/favicon.ico"] {
        let (status, _, _) = http_get(ns, path);
        assert_eq!(status, "HTTP/1.1 404 Not Found", "GET {path}");
    }
    // A connection that never sends its request is closed by the server's deadline,
    // and scrapes go on meanwhile.
    let addr: SocketAddr = METRICS.parse().unwrap();
    let closed = ns
        .run(|| {
            let mut idle = TcpStream::connect(addr).unwrap();
            idle.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            // The client handshakes at start; the SOCKS port is up before that ends.
            let mut s = scrape(ns);
            wait_for(
                || {
                    s = scrape(ns);
                    s.sum("paqet_sessions") == 1.0
                },
                Duration::from_secs(10),
            );
            assert_eq!(
                s.value("paqet_sessions", &[("transport", "udp"), ("path", "udp")]),
                1.0,
                "{}",
                s.text
            );
            let mut buf = [0u8; 16];
            match idle.read(&mut buf) {
                Ok(0) => true,
                Ok(n) => panic!("the server answered {n} bytes to no request"),
                // Our read timeout: the server still holds the connection.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => false,
                // A reset: the server let go too.
                Err(_) => true,
            }
        })
        .unwrap();
    assert!(closed, "the server kept a silent connection open for 30 s");
}

/// A connection to the metrics port from `source` (any 127/8 address is loopback's).
fn connect_from(source: [u8; 4]) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from((source, 0)).into())?;
    s.connect_timeout(&METRICS.parse::<SocketAddr>().unwrap().into(), Duration::from_secs(5))?;
    Ok(s.into())
}

#[test]
fn silent_connections_from_one_address_leave_the_scraper_room() {
    if !require_root("silent_connections_from_one_address_leave_the_scraper_room") {
        return;
    }
    let mut opts = RelayOptions::new("udp").unwrap();
    opts.client_extra.push(format!("METRICS_ADDR={METRICS}"));
    let bed = RelayBed::start("m3", &opts).unwrap();
    let ns = &bed.hosts.client;
    // As many silent connections as the server serves at once, all from one address:
    // the scraper, from another, must still be answered while they wait.
    let answered = ns
        .run(|| {
            let silent: Vec<TcpStream> = (0..4).map(|_| connect_from([127, 0, 0, 2]).unwrap()).collect();
            let mut scraper = connect_from([127, 0, 0, 1]).unwrap();
            scraper.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(scraper, "GET /metrics HTTP/1.1\r\nHost: {METRICS}\r\n\r\n").unwrap();
            let mut raw = Vec::new();
            let answer = scraper
                .read_to_end(&mut raw)
                .map(|_| String::from_utf8_lossy(&raw).into_owned());
            drop(silent);
            answer
        })
        .unwrap();
    match answered {
        Ok(text) => assert!(text.starts_with("HTTP/1.1 200 OK"), "the scrape got: {text:?}"),
        Err(e) => panic!("the scrape got no answer while silent connections held the port: {e}"),
    }
}

#[test]
fn a_public_metrics_addr_needs_the_opt_in() {
    // Bounded, in case the check were gone and the client ran.
    let out = Command::new("timeout")
        .arg("20")
        .arg(paqet_tests::paqet_bin())
        .args([
            "client",
            "--remote-addr",
            "198.18.0.2:4000",
            "--key",
            &paqet_tests::relay::genkey().unwrap(),
        ])
        .args(["--metrics-addr", "0.0.0.0:9465", "--config", "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "paqet started with a public METRICS_ADDR: {err}");
    assert!(
        err.contains("--metrics-addr") && err.contains("not a loopback address") && err.contains("!public"),
        "{err}"
    );
}
