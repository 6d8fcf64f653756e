//! `paqet status`: the instances pinned under /sys/fs/bpf/paqet and their counters.

use anyhow::{Context, Result};

use crate::cli::StatusArgs;
use crate::kernel::{PIN_ROOT, read_pinned_stats};

fn instances(only: Option<&str>) -> Result<Vec<String>> {
    if let Some(name) = only {
        return Ok(vec![name.to_string()]);
    }
    let dir = match std::fs::read_dir(PIN_ROOT) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {PIN_ROOT}")),
    };
    let mut names: Vec<String> = dir.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    Ok(names)
}

pub fn run(args: &StatusArgs) -> Result<()> {
    let names = instances(args.instance.as_deref())?;
    if names.is_empty() && !args.json {
        println!("no paqet instance is attached (nothing pinned under {PIN_ROOT})");
        return Ok(());
    }
    let mut json = Vec::new();
    for name in names {
        let stats = read_pinned_stats(&name).with_context(|| format!("instance {name}"))?;
        if args.json {
            json.push(format!(
                "{{\"instance\":\"{name}\",\"seen\":{},\"matched\":{},\"passed\":{},\"redirected\":{},\"no_socket\":{},\"malformed\":{}}}",
                stats.seen, stats.matched, stats.passed, stats.redirected, stats.no_socket, stats.malformed
            ));
        } else {
            println!(
                "{name}: seen {} matched {} redirected {} passed {} no_socket {} malformed {}",
                stats.seen, stats.matched, stats.redirected, stats.passed, stats.no_socket, stats.malformed
            );
        }
    }
    if args.json {
        println!("[{}]", json.join(","));
    }
    Ok(())
}
