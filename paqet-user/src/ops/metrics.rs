//! `METRICS_ADDR`: the relay's counters as Prometheus text (OpenMetrics), at
//! `GET /metrics`, read from the same [`live::Source`] as `paqet status`.
//!
//! The server is deliberately tiny: one request per connection, at most
//! [`MAX_CONNECTIONS`] at once and [`MAX_PER_SOURCE`] from one address (more are closed
//! at once), each with [`HEAD_DEADLINE`] to send its request and [`DEADLINE`] in all,
//! and a request head of at most [`MAX_REQUEST`] bytes. A slow or silent client holds
//! one slot for a second, never the relay: the counters it reads are at most
//! [`MAX_AGE`] old, so scraping in a loop does not reach the engine more often than that.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::live::{Snapshot, Source};
use crate::sync::lock;

/// Scrapes served at once; Prometheus sends one at a time per target.
const MAX_CONNECTIONS: usize = 4;
/// Connections from one address at once, so one client cannot hold every slot.
const MAX_PER_SOURCE: usize = 2;
/// Time a connection gets to send its request (a scraper sends it at once).
const HEAD_DEADLINE: Duration = Duration::from_secs(1);
/// Time a connection gets for its whole request and answer.
const DEADLINE: Duration = Duration::from_secs(5);
/// How old the counters a scrape reads may be.
const MAX_AGE: Duration = Duration::from_millis(100);
/// A request head larger than this is not a scrape.
const MAX_REQUEST: usize = 4096;
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Answers scrapes until the task is dropped (which ends the connections too).
pub async fn serve(listener: TcpListener, source: Source) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_source: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (conn, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like pass; do not spin on them.
                tracing::debug!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: too many connections; closed");
            continue;
        };
        let Some(source_slot) = SourceSlot::take(&per_source, peer.ip()) else {
            tracing::debug!(%peer, "metrics: too many connections from this address; closed");
            continue;
        };
        let source = source.clone();
        connections.spawn(async move {
            if tokio::time::timeout(DEADLINE, answer(conn, &source)).await.is_err() {
                tracing::debug!(%peer, "metrics: connection timed out");
            }
            drop((slot, source_slot));
        });
    }
}

/// One of [`MAX_PER_SOURCE`] connections of an address, given back on drop.
struct SourceSlot {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl SourceSlot {
    fn take(held: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<SourceSlot> {
        let mut map = lock(held);
        let n = map.entry(ip).or_default();
        if *n >= MAX_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot { held: held.clone(), ip })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = lock(&self.held);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn answer(mut conn: TcpStream, source: &Source) {
    let Ok(Some(head)) = tokio::time::timeout(HEAD_DEADLINE, read_head(&mut conn)).await else {
        return;
    };
    let response = match route(&head) {
        Route::Metrics => match render(source.role, &source.transport, &source.recent(MAX_AGE)) {
            Ok(body) => response("200 OK", CONTENT_TYPE, &body),
            Err(_) => response("500 Internal Server Error", "text/plain", "cannot encode the metrics\n"),
        },
        Route::NotFound => response("404 Not Found", "text/plain", "only GET /metrics is served here\n"),
    };
    let _ = conn.write_all(response.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// The request up to its blank line, or `None` if the client closed first or sent
/// more than [`MAX_REQUEST`] bytes without one.
async fn read_head(conn: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
}

fn route(head: &str) -> Route {
    let mut words = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (words.next(), words.next().unwrap_or(""));
    // Prometheus may add a query string; the page has no parameters.
    let path = target.split('?').next().unwrap_or("");
    if method == Some("GET") && path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

type Labels = Vec<(&'static str, String)>;

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

/// Gauges hold an i64; counts this large do not happen, but must not wrap negative.
fn level(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// "xdp/tcp" runs on the xdp transport; "udp" on udp.
fn path_labels(path: &str) -> Labels {
    let transport = path.split('/').next().unwrap_or(path);
    vec![("transport", transport.to_owned()), ("path", path.to_owned())]
}

/// The page for one snapshot. Counter names get `_total` from the encoder.
pub fn render(role: &'static str, transport: &str, s: &Snapshot) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    r.register(
        "paqet_relay",
        "This relay's role and its paths, best first",
        Info::new(vec![("role", role.to_owned()), ("transports", transport.to_owned())]),
    );
    let sessions = Family::<Labels, Gauge>::default();
    let streams = Family::<Labels, Gauge>::default();
    for (path, load) in &s.paths {
        sessions.get_or_create(&path_labels(path)).set(level(load.sessions));
        streams.get_or_create(&path_labels(path)).set(level(load.streams));
    }
    r.register(
        "paqet_sessions",
        "Sessions with an answered handshake, by path",
        sessions,
    );
    r.register("paqet_streams", "Streams open in those sessions, by path", streams);
    counter(
        &mut r,
        "paqet_bytes_in",
        "Bytes of tunnel datagrams received",
        s.bytes_in,
    );
    counter(&mut r, "paqet_bytes_out", "Bytes of tunnel datagrams sent", s.bytes_out);
    counter(&mut r, "paqet_packets_in", "Tunnel datagrams received", s.datagrams_in);
    counter(&mut r, "paqet_packets_out", "Tunnel datagrams sent", s.datagrams_out);
    counter(&mut r, "paqet_handshakes", "Handshakes completed", s.handshakes);
    counter(
        &mut r,
        "paqet_keepalives",
        "Keepalives sent (an idle client's upkeep)",
        s.keepalives,
    );
    counter(
        &mut r,
        "paqet_handed_off",
        "Datagrams that reached another engine than their client's (its address changed) and were handed to it",
        s.handed_off,
    );
    let dropped = Family::<Labels, Counter>::default();
    for (reason, n) in [
        ("authentication", s.dropped_unauthentic),
        ("replay", s.dropped_replayed),
        ("policy", s.dropped_policy),
        ("overflow", s.receive_overflows),
    ] {
        dropped.get_or_create(&vec![("reason", reason.to_owned())]).inc_by(n);
    }
    r.register(
        "paqet_dropped",
        "Datagrams dropped as unauthentic or replayed, streams and relayed UDP datagrams refused by the target policy, \
         datagrams the kernel dropped for a full receive ring or buffer",
        dropped,
    );
    if let Some(x) = &s.steering {
        for (name, help, n) in [
            ("paqet_xdp_seen", "Frames paqet_steer ran on", x.seen),
            (
                "paqet_xdp_matched",
                "Frames that matched paqet_steer's filter",
                x.matched,
            ),
            ("paqet_xdp_passed", "Frames paqet_steer passed to the kernel", x.passed),
            (
                "paqet_xdp_redirected",
                "Frames paqet_steer redirected to an AF_XDP socket",
                x.redirected,
            ),
            (
                "paqet_xdp_no_socket",
                "Matched frames passed for want of a socket on their queue",
                x.no_socket,
            ),
            (
                "paqet_xdp_malformed",
                "Frames with truncated or inconsistent headers",
                x.malformed,
            ),
        ] {
            counter(&mut r, name, help, n);
        }
    }
    let rss = Gauge::<i64>::default();
    rss.set(i64::try_from(s.rss_bytes).unwrap_or(i64::MAX));
    r.register("process_resident_memory_bytes", "Resident memory size in bytes", rss);
    let mut text = String::new();
    encode(&mut text, &r)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::PathLoad;

    fn sample<'a>(text: &'a str, name_and_labels: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
    }

    #[test]
    fn renders_every_counter_with_its_labels() {
        let s = Snapshot {
            sessions: 1,
            paths: vec![
                (
                    "xdp/tcp".into(),
                    PathLoad {
                        sessions: 1,
                        streams: 3,
                    },
                ),
                ("udp".into(), PathLoad::default()),
            ],
            streams: 3,
            bytes_in: 123_456,
            bytes_out: 789,
            datagrams_in: 100,
            datagrams_out: 7,
            handshakes: 2,
            keepalives: 4,
            dropped_unauthentic: 5,
            dropped_replayed: 6,
            dropped_policy: 8,
            receive_overflows: 9,
            handed_off: 10,
            steering: Some(paqet_common::maps::Stats {
                seen: 1000,
                redirected: 900,
                ..Default::default()
            }),
            rss_bytes: 4096,
            ..Snapshot::default()
        };
        let text = render("server", "xdp/tcp, udp", &s).unwrap();
        let expect = [
            ("paqet_relay_info{role=\"server\",transports=\"xdp/tcp, udp\"}", "1"),
            ("paqet_sessions{transport=\"xdp\",path=\"xdp/tcp\"}", "1"),
            ("paqet_streams{transport=\"xdp\",path=\"xdp/tcp\"}", "3"),
            ("paqet_sessions{transport=\"udp\",path=\"udp\"}", "0"),
            ("paqet_bytes_in_total", "123456"),
            ("paqet_bytes_out_total", "789"),
            ("paqet_packets_in_total", "100"),
            ("paqet_packets_out_total", "7"),
            ("paqet_handshakes_total", "2"),
            ("paqet_keepalives_total", "4"),
            ("paqet_handed_off_total", "10"),
            ("paqet_dropped_total{reason=\"authentication\"}", "5"),
            ("paqet_dropped_total{reason=\"replay\"}", "6"),
            ("paqet_dropped_total{reason=\"policy\"}", "8"),
            ("paqet_dropped_total{reason=\"overflow\"}", "9"),
            ("paqet_xdp_seen_total", "1000"),
            ("paqet_xdp_redirected_total", "900"),
            ("process_resident_memory_bytes", "4096"),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        assert!(text.contains("# TYPE paqet_bytes_in counter"), "{text}");
        assert!(text.contains("# TYPE paqet_sessions gauge"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn without_steering_there_are_no_xdp_counters() {
        let text = render("client", "udp", &Snapshot::default()).unwrap();
        assert!(!text.contains("paqet_xdp_"), "{text}");
        assert_eq!(sample(&text, "paqet_bytes_in_total"), Some("0"));
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Route::Metrics);
        assert_eq!(route("GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Route::Metrics);
        for other in [
            "GET / HTTP/1.1\r\n\r\n",
            "POST /metrics HTTP/1.1\r\n\r\n",
            "GET /metricsx HTTP/1.1\r\n\r\n",
            "HEAD /metrics HTTP/1.1\r\n\r\n",
            "",
        ] {
            assert_eq!(route(other), Route::NotFound, "{other:?}");
        }
    }
}
