//! What a running paqet publishes about itself for `paqet status`: sessions, streams
//! and throughput, in `/run/paqet/<instance>.json`, rewritten every second (write, then
//! rename, so a reader never sees half a file) and removed at exit.
//!
//! The same [`Source`] feeds the Prometheus metrics (`ops::metrics`), so the status
//! file and a scrape never count differently.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use paqet_common::maps::Stats;
use serde_json::{Value, json};

use crate::engine::PathLoad;
use crate::sync::lock;

pub const RUN_DIR: &str = "/run/paqet";
const EVERY: Duration = Duration::from_secs(1);

/// One reading of the relay's own counters.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub sessions: usize,
    /// Sessions and their streams on each path, by the path's name ("xdp/tcp", "udp"),
    /// best first.
    pub paths: Vec<(String, PathLoad)>,
    pub streams: usize,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Handshakes completed (client: answers taken; server: sessions opened).
    pub handshakes: u64,
    /// Keepalives sent: session upkeep, which an idle client pays.
    pub keepalives: u64,
    pub dropped_unauthentic: u64,
    pub dropped_replayed: u64,
    /// Server: streams, and relayed UDP datagrams (each one), refused by the target policy.
    pub dropped_policy: u64,
    /// Datagrams the kernel dropped for a full receive ring or socket buffer.
    pub receive_overflows: u64,
    /// The eBPF steering program's counters, when a path attached it.
    pub steering: Option<Stats>,
    /// Engines serving (a sharded server runs several, see `engine::shards`).
    pub engines: usize,
    /// Sharded server: datagrams that reached another engine than their client's, whose
    /// address had changed, and were handed to it.
    pub handed_off: u64,
    /// The process's resident memory.
    pub rss_bytes: u64,
    /// Relayed UDP: counters, and the client's associations and forwards or the
    /// server's flows (see `roles::udp_json`).
    pub udp: Value,
}

/// What a running relay is and how to read its counters now: shared by the status
/// publisher and the metrics server.
#[derive(Clone)]
pub struct Source {
    pub role: &'static str,
    /// The paths' names, best first: "xdp/tcp, udp".
    pub transport: String,
    read: Arc<dyn Fn() -> Snapshot + Send + Sync>,
    /// The latest reading, for [`recent`](Self::recent).
    latest: Arc<Mutex<Option<(Instant, Snapshot)>>>,
}

impl Source {
    pub fn new(role: &'static str, transport: String, read: impl Fn() -> Snapshot + Send + Sync + 'static) -> Source {
        Source {
            role,
            transport,
            read: Arc::new(read),
            latest: Arc::default(),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = (self.read)();
        *lock(&self.latest) = Some((Instant::now(), now.clone()));
        now
    }

    /// A reading at most `max_age` old: a reading takes the engine's lock, and whoever
    /// can reach the metrics port may ask as often as it likes.
    pub fn recent(&self, max_age: Duration) -> Snapshot {
        let cached = lock(&self.latest).clone();
        match cached {
            Some((at, snapshot)) if at.elapsed() <= max_age => snapshot,
            _ => self.snapshot(),
        }
    }
}

/// Resident memory of this process, from /proc/self/statm (in pages); 0 if unreadable.
pub fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages.saturating_mul(u64::try_from(page).unwrap_or(4096))
}

fn steering_json(s: &Stats) -> Value {
    json!({
        "seen": s.seen,
        "matched": s.matched,
        "passed": s.passed,
        "redirected": s.redirected,
        "no_socket": s.no_socket,
        "malformed": s.malformed,
    })
}

pub fn state_path(instance: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{instance}.json"))
}

fn render(role: &str, transport: &str, now: &Snapshot, before: &Snapshot, secs: f64) -> Value {
    let paths: Vec<Value> = now
        .paths
        .iter()
        .map(|(name, load)| json!({ "name": name, "sessions": load.sessions, "streams": load.streams }))
        .collect();
    let rate = |a: u64, b: u64| ((a.saturating_sub(b)) as f64 / secs).round() as u64;
    json!({
        "pid": std::process::id(),
        "role": role,
        "transport": transport,
        "updated_unix": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "sessions": now.sessions,
        "paths": paths,
        "streams": now.streams,
        "datagrams_in": now.datagrams_in,
        "datagrams_out": now.datagrams_out,
        "bytes_in": now.bytes_in,
        "bytes_out": now.bytes_out,
        "bytes_in_per_s": rate(now.bytes_in, before.bytes_in),
        "bytes_out_per_s": rate(now.bytes_out, before.bytes_out),
        "handshakes": now.handshakes,
        "keepalives": now.keepalives,
        "dropped_unauthentic": now.dropped_unauthentic,
        "dropped_replayed": now.dropped_replayed,
        "dropped_policy": now.dropped_policy,
        "receive_overflows": now.receive_overflows,
        "steering": now.steering.as_ref().map(steering_json),
        "engines": now.engines,
        "handed_off": now.handed_off,
        "rss_bytes": now.rss_bytes,
        "udp": now.udp,
    })
}

/// The temporary file is this process's own: two relays that share an instance name
/// (one port in two network namespaces) each renaming one shared `.tmp` made the slower
/// one's rename fail, and it stopped publishing.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Publishes `snapshot()` every second until the task is dropped. Without a writable
/// /run/paqet (e.g. an unprivileged run without the unit's RuntimeDirectory) it says so
/// once and stops: the relay itself does not depend on it.
pub async fn publish(instance: String, source: Source) {
    let (role, transport) = (source.role, source.transport.as_str());
    let snapshot = || source.snapshot();
    let path = state_path(&instance);
    if let Err(e) = std::fs::create_dir_all(RUN_DIR) {
        tracing::info!("not publishing live status: cannot create {RUN_DIR}: {e}");
        return;
    }
    let _cleanup = RemoveOnDrop(path.clone());
    let mut before = snapshot();
    // At once, so `paqet status` and `paqet check` see a relay from its first moment.
    if let Err(e) = write_atomically(&path, &render(role, transport, &before, &before, 1.0).to_string()) {
        tracing::info!("not publishing live status: cannot write {}: {e}", path.display());
        return;
    }
    let mut ticker = tokio::time::interval(EVERY);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let now = snapshot();
        let text = render(role, transport, &now, &before, EVERY.as_secs_f64()).to_string();
        if let Err(e) = write_atomically(&path, &text) {
            tracing::info!("not publishing live status: cannot write {}: {e}", path.display());
            return;
        }
        before = now;
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The live state of `instance`, if its process is running and publishing.
pub fn read(instance: &str) -> Option<Value> {
    let v: Value = serde_json::from_slice(&std::fs::read(state_path(instance)).ok()?).ok()?;
    let pid = v.get("pid")?.as_u64()?;
    // A file left by a killed process is not live.
    Path::new(&format!("/proc/{pid}")).exists().then_some(v)
}

/// Instances that publish live state (including those without pins: the udp transport).
pub fn instances() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(RUN_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".json").map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_the_difference() {
        let before = Snapshot {
            bytes_in: 1000,
            bytes_out: 0,
            ..Snapshot::default()
        };
        let now = Snapshot {
            sessions: 2,
            paths: vec![
                (
                    "xdp/tcp".into(),
                    PathLoad {
                        sessions: 1,
                        streams: 4,
                    },
                ),
                (
                    "udp".into(),
                    PathLoad {
                        sessions: 1,
                        streams: 1,
                    },
                ),
            ],
            streams: 5,
            bytes_in: 3000,
            bytes_out: 500,
            ..Snapshot::default()
        };
        let v = render("server", "xdp", &now, &before, 2.0);
        assert_eq!(v["bytes_in_per_s"], 1000.0);
        assert_eq!(v["bytes_out_per_s"], 250.0);
        assert_eq!(v["sessions"], 2);
        assert_eq!(v["streams"], 5);
        assert_eq!(v["paths"][1]["name"], "udp");
        assert_eq!(v["paths"][1]["sessions"], 1);
        assert_eq!(v["paths"][0]["streams"], 4);
        assert_eq!(v["bytes_in"], 3000);
        assert!(v["steering"].is_null());
    }
}
