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
/// Any failure to tell is an error, never an empty list: callers remove pins nobody
/// uses, and a live instance's must survive a failed query.
fn programs_using(dir: &Path) -> Result<Vec<u32>, KernelError> {
    let pin = dir.join(PIN_STATS);
    let map_error = |op| {
        move |source| KernelError::Map {
            map: paqet_common::maps::STATS_MAP,
            op,
            source,
        }
    };
    let map = aya::maps::MapData::from_pin(&pin).map_err(map_error("opening the pin"))?;
    let map_id = map.info().map_err(map_error("reading the map's info"))?.id();
    let mut ids = Vec::new();
    for prog in aya::programs::loaded_programs() {
        let prog = match prog {
            Ok(p) => p,
            // Unloaded between listing and opening: not an owner.
            Err(aya::programs::ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                continue;
            }
            Err(e) => return Err(KernelError::ProgramInfo(e)),
        };
        if prog.name_as_str() != Some(paqet_common::maps::PROGRAM_NAME) {
            continue;
        }
        let maps = prog.map_ids().map_err(KernelError::ProgramInfo)?;
        if maps.is_some_and(|m| m.contains(&map_id)) {
            ids.push(prog.id());
        }
    }
    Ok(ids)
}

/// The programs using the pins in `dir` (none when it holds no stats pin), or why
/// that cannot be told, said the way a user acts on.
///
/// Listing loaded programs needs CAP_SYS_ADMIN, which the service does not have.
/// Without it the answer comes from `interface`, the one the pins steer: the
/// attachment is a BPF link owned by the process, so the kernel detaches it when its
/// owner dies, and an interface that still carries an XDP program has a live owner.
fn owners(instance: &str, dir: &Path, interface: &str) -> Result<Vec<u32>, KernelError> {
    let unknown = |source| KernelError::PinOwnerUnknown {
        instance: instance.to_string(),
        path: dir.to_path_buf(),
        source: Box::new(source),
    };
    let pinned = dir.join(PIN_STATS).try_exists().map_err(|source| {
        unknown(KernelError::Io {
            what: "looking for pins in",
            path: dir.to_path_buf(),
            source,
        })
    })?;
    if !pinned {
        return Ok(Vec::new());
    }
    match programs_using(dir) {
        Err(e) if lacks_sys_admin(&e) => attached_programs(interface).map_err(unknown),
        other => other.map_err(unknown),
    }
}

fn lacks_sys_admin(e: &KernelError) -> bool {
    matches!(e, KernelError::ProgramInfo(aya::programs::ProgramError::SyscallError(s))
        if s.io_error.raw_os_error() == Some(libc::EPERM))
}

/// The XDP programs attached to `interface`, asked over rtnetlink (no capability
/// needed). An interface this network namespace does not have is an error, not
/// "none": the instance may run in another namespace.
fn attached_programs(interface: &str) -> Result<Vec<u32>, KernelError> {
    use crate::transport::netlink;
    let asking = |source| KernelError::Io {
        what: "asking rtnetlink which XDP program is attached to",
        path: PathBuf::from(interface),
        source,
    };
    let index = netlink::ifindex(interface).map_err(asking)?;
    let attached = netlink::link_xdp(index).map_err(asking)?;
    Ok(attached.into_iter().map(|(_, id)| id).collect())
}

/// Whether the paqet that made `instance`'s pins (steering `interface`) still runs:
/// `Ok(programs)`, empty when it is gone.
pub fn instance_owners(instance: &str, interface: &str) -> Result<Vec<u32>, KernelError> {
    owners(instance, &pin_dir(instance)?, interface)
}

/// Another live instance steering on `interface` (instances are named
/// `<role>-<interface>`), with the programs that use its pins. An instance whose
/// liveness cannot be told is an error: it may be live.
pub fn live_instance_on(interface: &str, except: &str) -> Result<Option<(String, Vec<u32>)>, KernelError> {
    live_instance_in(Path::new(PIN_ROOT), interface, except)
}

fn live_instance_in(root: &Path, interface: &str, except: &str) -> Result<Option<(String, Vec<u32>)>, KernelError> {
    let names = ["client", "server"].map(|role| format!("{role}-{interface}"));
    for name in names.iter().filter(|n| *n != except) {
        let programs = owners(name, &root.join(name), interface)?;
        if !programs.is_empty() {
            return Ok(Some((name.clone(), programs)));
        }
    }
    Ok(None)
}

/// Creates an empty pin directory for `instance`, replacing pins left by a process of
/// the same instance that did not exit cleanly (kill -9, crash). Pins a loaded program
/// still uses belong to a live paqet and are never removed, nor are pins whose owner
/// cannot be told.
pub fn fresh_pin_dir(instance: &str, interface: &str) -> Result<PathBuf, KernelError> {
    let dir = pin_dir(instance)?;
    fresh_dir(instance, &dir, interface)?;
    Ok(dir)
}

fn fresh_dir(instance: &str, dir: &Path, interface: &str) -> Result<(), KernelError> {
    let programs = owners(instance, dir, interface)?;
    if !programs.is_empty() {
        return Err(KernelError::InstanceRunning {
            instance: instance.to_string(),
            path: dir.to_path_buf(),
            programs,
        });
    }
    if dir.exists() {
        tracing::warn!(
            "replacing stale pins at {} (left by an earlier paqet {instance} that did not exit cleanly)",
            dir.display()
        );
        remove_pin_dir(dir)?;
    }
    std::fs::create_dir_all(dir).map_err(|source| KernelError::Io {
        what: "creating pin directory",
        path: dir.to_path_buf(),
        source,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch pin root in /tmp holding `files` under `instance`, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str, instance: &str, files: &[&str]) -> Scratch {
            let root = std::env::temp_dir().join(format!("paqet-pins-{tag}-{}", std::process::id()));
            let dir = root.join(instance);
            std::fs::create_dir_all(&dir).unwrap();
            for f in files {
                std::fs::write(dir.join(f), b"a plain file, not a BPF pin").unwrap();
            }
            Scratch(root)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn pins_whose_owner_cannot_be_told_are_left_alone() {
        let scratch = Scratch::new("unknown", "server-eth9", &[PIN_STATS]);
        let dir = scratch.0.join("server-eth9");
        // Opening a plain file as a map fails, as a failed query of the kernel would.
        let fresh = fresh_dir("server-eth9", &dir, "eth9");
        assert!(matches!(fresh, Err(KernelError::PinOwnerUnknown { .. })), "{fresh:?}");
        assert!(dir.join(PIN_STATS).exists(), "pins that may be live were removed");
        let message = fresh.unwrap_err().to_string();
        assert!(
            message.contains(&format!("rm -r {}", dir.display())) && message.contains("paqet status"),
            "{message}"
        );
        let taken = live_instance_in(&scratch.0, "eth9", "client-eth9");
        assert!(matches!(taken, Err(KernelError::PinOwnerUnknown { .. })), "{taken:?}");
    }

    #[test]
    fn pins_without_a_stats_map_are_replaced() {
        let scratch = Scratch::new("stale", "server-eth9", &["filter"]);
        let dir = scratch.0.join("server-eth9");
        fresh_dir("server-eth9", &dir, "eth9").unwrap();
        assert!(dir.is_dir() && !dir.join("filter").exists(), "stale pins stay");
        assert!(live_instance_in(&scratch.0, "eth9", "client-eth9").unwrap().is_none());
        assert!(
            live_instance_in(&scratch.0, "eth9", "server-eth9").unwrap().is_none(),
            "the instance itself is not another"
        );
    }
}
