//! bpffs and the pin directory of one instance: `/sys/fs/bpf/paqet/<instance>/`.

use super::KernelError;
use paqet_common::Stats;
use paqet_common::maps::PIN_STATS;
use std::ffi::CString;
use std::path::{Path, PathBuf};

pub const BPFFS: &str = "/sys/fs/bpf";
/// Parent of every instance's pin directory.
pub const PIN_ROOT: &str = "/sys/fs/bpf/paqet";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Where an instance's maps are pinned. The name must be a valid instance name.
pub fn pin_dir(instance: &str) -> Result<PathBuf, KernelError> {
    let ok = !instance.is_empty()
        && instance.len() <= 64
        && instance != "."
        && instance != ".."
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(KernelError::InvalidInstance {
            name: instance.to_string(),
        });
    }
    Ok(Path::new(PIN_ROOT).join(instance))
}

pub fn is_bpffs(path: &str) -> bool {
    let Ok(c) = CString::new(path) else {
        return false;
    };
    // SAFETY: c is a valid NUL-terminated path; st is plain data the kernel fills.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Mounts bpffs at /sys/fs/bpf when it is not there, as systemd does at boot on
/// ordinary hosts. Only root may; anyone else gets the command to run.
pub fn ensure_bpffs() -> Result<(), KernelError> {
    if is_bpffs(BPFFS) {
        return Ok(());
    }
    if !super::caps::may_mount() {
        return Err(KernelError::BpffsNeedsRoot);
    }
    let (src, dst, fs) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: constant NUL-terminated strings, no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(KernelError::MountBpffs(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted the BPF filesystem at {BPFFS} (it was not mounted)");
    Ok(())
}

/// Ids of the loaded `paqet_steer` programs that use the stats map pinned in `dir`:
/// its owner is alive while there are any (bpffs holds no files to write a pid in).
pub fn programs_using(dir: &Path) -> Result<Vec<u32>, KernelError> {
    let pin = dir.join(PIN_STATS);
    let map = aya::maps::MapData::from_pin(&pin).map_err(|source| KernelError::Map {
        map: paqet_common::maps::STATS_MAP,
        op: "opening the pin",
        source,
    })?;
    let map_id = map
        .info()
        .map_err(|source| KernelError::Map {
            map: paqet_common::maps::STATS_MAP,
            op: "reading the map's info",
            source,
        })?
        .id();
    Ok(aya::programs::loaded_programs()
        .flatten()
        .filter(|prog| prog.name_as_str() == Some(paqet_common::maps::PROGRAM_NAME))
        .filter(|prog| prog.map_ids().ok().flatten().is_some_and(|m| m.contains(&map_id)))
        .map(|prog| prog.id())
        .collect())
}

/// Another live instance steering on `interface` (instances are named
/// `<role>-<interface>`), with the programs that use its pins.
pub fn live_instance_on(interface: &str, except: &str) -> Option<(String, Vec<u32>)> {
    let names = ["client", "server"].map(|role| format!("{role}-{interface}"));
    std::fs::read_dir(PIN_ROOT)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| names.contains(name) && name != except)
        .find_map(|name| {
            let programs = programs_using(&Path::new(PIN_ROOT).join(&name)).ok()?;
            (!programs.is_empty()).then_some((name, programs))
        })
}

/// Creates an empty pin directory for `instance`, replacing pins left by a process of
/// the same instance that did not exit cleanly (kill -9, crash). Pins a loaded program
/// still uses belong to a live paqet and are never removed.
pub fn fresh_pin_dir(instance: &str) -> Result<PathBuf, KernelError> {
    let dir = pin_dir(instance)?;
    let programs = if dir.join(PIN_STATS).exists() {
        programs_using(&dir).unwrap_or_default()
    } else {
        Vec::new()
    };
    if !programs.is_empty() {
        return Err(KernelError::InstanceRunning {
            instance: instance.to_string(),
            path: dir,
            programs,
        });
    }
    if dir.exists() {
        tracing::warn!(
            "replacing stale pins at {} (left by an earlier paqet {instance} that did not exit cleanly)",
            dir.display()
        );
        remove_pin_dir(&dir)?;
    }
    std::fs::create_dir_all(&dir).map_err(|source| KernelError::Io {
        what: "creating pin directory",
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// Removes an instance's pins (files, then the directory; bpffs has no recursive
/// delete of its own, and pins are only ever flat files here).
pub fn remove_pin_dir(dir: &Path) -> Result<(), KernelError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(KernelError::Io {
            what: "removing pins",
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Reads the counters of a running instance from its pinned stats map, without owning
/// (or even seeing) the program: what `paqet status` shows.
pub fn read_pinned_stats(instance: &str) -> Result<Stats, KernelError> {
    let path = pin_dir(instance)?.join(PIN_STATS);
    if !path.exists() {
        return Err(KernelError::NotPinned {
            instance: instance.to_string(),
            path,
        });
    }
    let data = aya::maps::MapData::from_pin(&path).map_err(|source| KernelError::Map {
        map: paqet_common::maps::STATS_MAP,
        op: "opening the pin",
        source,
    })?;
    let map = aya::maps::Map::from_map_data(data).map_err(|source| KernelError::Map {
        map: paqet_common::maps::STATS_MAP,
        op: "opening the pin",
        source,
    })?;
    let array = aya::maps::PerCpuArray::<_, Stats>::try_from(map).map_err(|source| KernelError::Map {
        map: paqet_common::maps::STATS_MAP,
        op: "opening the pin",
        source,
    })?;
    super::sum_stats(&array)
}
