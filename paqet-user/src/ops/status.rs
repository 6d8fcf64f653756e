//! `paqet status`: the instances pinned under /sys/fs/bpf/paqet, what is attached where,
//! and their counters, as text or `--json`.
//!
//! Everything here comes from the kernel, not from the running process: the instance's
//! pinned stats map (counters), the loaded `paqet_steer` programs that use that map
//! (program ids), and, when the interface is in this network namespace, its XDP
//! attachment (mode). A pin directory whose map no loaded program uses is stale (left
//! by a `kill -9`; the next start of that instance replaces it).

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::live;

use crate::cli::StatusArgs;
use crate::kernel::{PIN_ROOT, instance_owners, read_pinned_stats};

fn instances(only: Option<&str>) -> Result<Vec<String>> {
    if let Some(name) = only {
        return Ok(vec![name.to_string()]);
    }
    let dir = match std::fs::read_dir(PIN_ROOT) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {PIN_ROOT}")),
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// The XDP mode and program id on `interface`, when it exists in this network namespace
/// (asked over rtnetlink; with programs in several modes at once, the first of native,
/// generic, offload).
fn xdp_attachment(interface: &str) -> Option<(String, u32)> {
    use crate::transport::netlink;
    let index = netlink::ifindex(interface).ok()?;
    let (mode, id) = netlink::link_xdp(index).ok()?.into_iter().next()?;
    Some((mode.name().to_string(), id))
}

fn describe(name: &str) -> Result<Value> {
    let stats = read_pinned_stats(name).with_context(|| format!("instance {name}"))?;
    let pin_dir = std::path::Path::new(PIN_ROOT).join(name);
    let (role, interface) = name.split_once('-').unwrap_or(("", name));
    // Without CAP_SYS_ADMIN, and outside the instance's network namespace, its
    // liveness cannot be told: say so rather than call it stale.
    let (running, programs, unknown) = match instance_owners(name, interface) {
        Ok(programs) => (json!(!programs.is_empty()), programs, Value::Null),
        Err(e) => (Value::Null, Vec::new(), json!(format!("{:#}", anyhow::Error::from(e)))),
    };
    let attachment = xdp_attachment(interface).filter(|(_, id)| programs.contains(id));
    Ok(json!({
        "instance": name,
        "role": role,
        "interface": interface,
        "pins": pin_dir.display().to_string(),
        "running": running,
        "running_unknown": unknown,
        "program_ids": programs,
        "mode": attachment.as_ref().map(|(m, _)| m.clone()),
        "seen": stats.seen,
        "matched": stats.matched,
        "passed": stats.passed,
        "redirected": stats.redirected,
        "no_socket": stats.no_socket,
        "malformed": stats.malformed,
    }))
}

/// An instance without pins (the udp transport) is described by its live state alone.
fn describe_unpinned(name: &str) -> Value {
    let (role, _) = name.split_once('-').unwrap_or(("", name));
    json!({ "instance": name, "role": role, "interface": null, "pins": null, "running": true, "program_ids": [] })
}

pub fn run(args: &StatusArgs) -> Result<()> {
    let mut names = instances(args.instance.as_deref())?;
    if args.instance.is_none() {
        for name in live::instances() {
            if !names.contains(&name) && live::read(&name).is_some() {
                names.push(name);
            }
        }
    }
    let mut all = Vec::new();
    for name in &names {
        let mut v = if std::path::Path::new(PIN_ROOT).join(name).exists() {
            describe(name)?
        } else {
            describe_unpinned(name)
        };
        v["live"] = live::read(name).unwrap_or(Value::Null);
        all.push(v);
    }
    if args.json {
        println!("{}", Value::Array(all));
        return Ok(());
    }
    if all.is_empty() {
        println!("no paqet instance is attached (nothing pinned under {PIN_ROOT})");
        return Ok(());
    }
    for v in all {
        let ids: Vec<String> = v["program_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| i.to_string())
            .collect();
        let live_transport = v["live"]["transport"].as_str().unwrap_or("");
        let state = if v["pins"].is_null() && live_transport.contains("xdp") {
            // The process says it steers with XDP, so its pins exist where it made them:
            // this mount namespace (e.g. under `ip netns exec`) just cannot see them.
            format!(
                "xdp transport; its pins are not visible from this mount namespace \
                 (run `paqet status` where {PIN_ROOT} is the host's, e.g. via `nsenter --net=`)"
            )
        } else if v["pins"].is_null() {
            "no XDP program (udp transport)".to_string()
        } else if v["running"].as_bool() == Some(true) {
            format!(
                "paqet_steer id {} on {} ({})",
                ids.join(","),
                v["interface"].as_str().unwrap_or(""),
                v["mode"]
                    .as_str()
                    .unwrap_or("mode not visible from this network namespace")
            )
        } else if v["running"].is_null() {
            format!(
                "running or not, cannot tell from here: {}",
                v["running_unknown"].as_str().unwrap_or("")
            )
        } else {
            "STALE: no loaded program uses these pins (the process was killed; the next start replaces them)"
                .to_string()
        };
        println!("{}: {state}", v["instance"].as_str().unwrap_or(""));
        if !v["pins"].is_null() {
            println!(
                "  seen {} matched {} redirected {} passed {} no_socket {} malformed {}",
                v["seen"], v["matched"], v["redirected"], v["passed"], v["no_socket"], v["malformed"]
            );
        }
        if let Some(pins) = v["pins"].as_str() {
            println!("  pins {pins}");
        }
        let live = &v["live"];
        if live.is_null() {
            println!(
                "  live: not published (process not running, or no writable {})",
                live::RUN_DIR
            );
        } else {
            println!(
                "  live: pid {} transport {} sessions {} streams {} in {} out {}, dropped unauthentic {} replayed {}, receive overflows {}",
                live["pid"],
                live_transport,
                live["sessions"],
                live["streams"],
                human_rate(&live["bytes_in_per_s"]),
                human_rate(&live["bytes_out_per_s"]),
                live["dropped_unauthentic"],
                live["dropped_replayed"],
                live["receive_overflows"]
            );
            // A relay with one engine (every client, most servers) has nothing to say here.
            let engines = match live["engines"].as_u64() {
                Some(n) if n > 1 => format!(", engines {n} (datagrams handed between them {})", live["handed_off"]),
                _ => String::new(),
            };
            println!(
                "  handshakes {}, refused by policy {}, resident memory {:.1} MiB{engines}",
                live["handshakes"],
                live["dropped_policy"],
                live["rss_bytes"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 20),
            );
            let paths: Vec<String> = live["paths"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{} {}", p["name"].as_str().unwrap_or("?"), p["sessions"]))
                .collect();
            if !paths.is_empty() {
                println!("  sessions per path: {}", paths.join(", "));
            }
            for line in udp_lines(&live["udp"]) {
                println!("  {line}");
            }
        }
    }
    Ok(())
}

/// Relayed UDP, as `udp_json` in roles.rs publishes it: one line of totals, then one
/// per association or forward (client) or the flows' counters (server).
fn udp_lines(udp: &Value) -> Vec<String> {
    if udp.is_null() {
        return Vec::new();
    }
    let mut lines = vec![format!(
        "udp: datagrams sent {} received {}, reassembly timed out {} evicted {}, dropped (queue full) {}, expired before the session {}",
        udp["datagrams_sent"],
        udp["datagrams_received"],
        udp["reassembly_timed_out"],
        udp["reassembly_evicted"],
        udp["dropped_queue_full"],
        udp["expired_before_session"]
    )];
    for a in udp["associations"].as_array().into_iter().flatten() {
        lines.push(format!(
            "{} {} <-> {}: flows {} up {} ({} B) down {} ({} B) dropped {}",
            a["kind"].as_str().unwrap_or("?"),
            a["local"].as_str().unwrap_or("?"),
            a["peer"].as_str().unwrap_or("?"),
            a["flows"],
            a["up"],
            a["bytes_up"],
            a["down"],
            a["bytes_down"],
            a["dropped"]
        ));
    }
    let f = &udp["flows"];
    if !f.is_null() {
        lines.push(format!(
            "udp flows: live {} opened {} refused {}; to targets {} from targets {}; refused by policy {} unresolved {} filtered {} dropped {}",
            f["live"],
            f["opened"],
            f["refused"],
            f["to_targets"],
            f["from_targets"],
            f["refused_by_policy"],
            f["unresolved"],
            f["filtered"],
            f["dropped"]
        ));
    }
    lines
}

/// Bytes per second as people read them: "414 MB/s", "12.3 kB/s", "0 B/s" (decimal
/// units, as network rates are quoted; `--json` keeps the exact number).
fn human_rate(v: &Value) -> String {
    let bytes = v.as_f64().unwrap_or(0.0);
    let units = [("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)];
    match units.iter().find(|(_, scale)| bytes >= *scale) {
        Some((unit, scale)) if bytes / scale >= 100.0 => format!("{:.0} {unit}", bytes / scale),
        Some((unit, scale)) => format!("{:.1} {unit}", bytes / scale),
        None => format!("{bytes:.0} B/s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_people_quote_them() {
        let cases = [
            (414_398_763.0, "414 MB/s"),
            (12_345.0, "12.3 kB/s"),
            (1_500_000_000.0, "1.5 GB/s"),
            (999.0, "999 B/s"),
            (0.0, "0 B/s"),
        ];
        for (bytes, text) in cases {
            assert_eq!(human_rate(&serde_json::json!(bytes)), text);
        }
        assert_eq!(human_rate(&Value::Null), "0 B/s");
    }
}
