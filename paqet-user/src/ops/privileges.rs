//! After start: drop every capability the running relay no longer needs, in every
//! thread of the process.
//!
//! The unit grants CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_NET_RAW and CAP_IPC_LOCK to
//! load paqet_steer, attach it, open the AF_XDP and AF_PACKET sockets and register the
//! UMEM. Once the
//! paths are open and the node is built (the set of interfaces is fixed at start) none
//! of them is used again. Measured on 6.18 as the service user, with all of them
//! dropped: writing the open filter and XSK maps (bpf() on a map fd), the AF_XDP RX ring
//! and TX kick (sendto on the socket), the AF_PACKET send (sendmsg), the UDP socket, the SOCKS listener, dialing
//! targets, the next-hop lookups (`ip route get`, `ip neigh show`, netlink dumps) and
//! the teardown at SIGTERM all work: closing the bpf_link fd detaches XDP, and the pins
//! are files in a directory the service user owns (`tests/tests/service.rs` checks it).
//!
//! What may stay (only if the process holds it), and why:
//! - CAP_BPF on kernels before 6.5 when `kernel.unprivileged_bpf_disabled` is set: those
//!   kernels refuse every bpf() command without it, the map writes that keep addresses
//!   current included (6.5 moved the check into map and program creation).
//! - CAP_NET_ADMIN on kernels before 5.9: there XDP is attached through netlink (no
//!   bpf_link), and detaching at SIGTERM is a netlink request that needs it.
//! - CAP_DAC_OVERRIDE when running as root: root's pins may sit in /sys/fs/bpf/paqet
//!   owned by the service user (the unit's ExecStartPre makes it so), and removing an
//!   instance directory there needs write access to a directory root does not own.
//!   For uid 0 it adds little: the files that matter on a host are root's own.
//!
//! Capabilities are per thread: capset(2) changes only the calling thread, and by now
//! the process has others (the AF_XDP TX threads, the eBPF log pump, the next-hop
//! resolver, tokio's blocking pool), created before the drop and holding the unit's
//! set. They cannot be made to start later (attaching and opening the sockets start
//! them), and their code is not the place to know about privileges, so this module does
//! what libpsx and Go's `syscall.AllThreadsSyscall` do: a real-time signal whose handler
//! runs the same async-signal-safe system calls (prctl, capset) in each thread, repeated
//! until `/proc/self/task/*/status` shows every thread (new ones included) at the
//! target. The signal is ignored afterwards, which discards any still pending.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Every capability's name, by bit (capability.h, up to CAP_CHECKPOINT_RESTORE).
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_SETPCAP: u32 = 8;
pub(crate) const CAP_NET_ADMIN: u32 = 12;
const CAP_BPF: u32 = 39;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// How long the other threads get to run the handler (they run it as soon as they are
/// scheduled; a thread that blocks the signal never does).
const THREADS_WAIT: Duration = Duration::from_secs(3);

fn name(bit: u32) -> String {
    NAMES
        .get(bit as usize)
        .map_or_else(|| format!("capability {bit}"), |n| n.to_string())
}

fn names(set: u64) -> String {
    (0..64)
        .filter(|b| set & (1u64 << b) != 0)
        .map(name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A thread's sets, as /proc shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sets {
    inheritable: u64,
    permitted: u64,
    effective: u64,
    bounding: u64,
    ambient: u64,
}

fn parse_sets(status: &str) -> Option<Sets> {
    let field = |key: &str| crate::kernel::caps::status_set(status, key);
    Some(Sets {
        inheritable: field("CapInh:")?,
        permitted: field("CapPrm:")?,
        effective: field("CapEff:")?,
        bounding: field("CapBnd:")?,
        ambient: field("CapAmb:")?,
    })
}

fn thread_sets(tid: i32) -> Option<Sets> {
    parse_sets(&std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?)
}

fn thread_name(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn threads() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// The target every thread is brought to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    /// Stays effective and permitted; everything else goes from those, and the
    /// inheritable and ambient sets are emptied.
    keep: u64,
    /// Also lower the bounding set to `keep` (needs CAP_SETPCAP).
    bounding: bool,
}

impl Target {
    fn reached_by(&self, s: &Sets) -> bool {
        s.effective == self.keep
            && s.permitted == self.keep
            && s.inheritable == 0
            && s.ambient == 0
            && (!self.bounding || s.bounding & !self.keep == 0)
    }
}

/// What the running relay still needs, of what the process holds (see the module
/// documentation for why each one).
fn needed_after_start(held: u64, kernel: (u32, u32), unprivileged_bpf_disabled: bool, root: bool) -> u64 {
    let mut need = 0u64;
    if kernel < (6, 5) && unprivileged_bpf_disabled {
        need |= 1 << CAP_BPF;
    }
    if kernel < (5, 9) {
        need |= 1 << CAP_NET_ADMIN;
    }
    if root {
        need |= 1 << CAP_DAC_OVERRIDE;
    }
    need & held
}

fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn unprivileged_bpf_disabled() -> bool {
    // Unreadable: assume the stricter answer (most distributions set 2).
    std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").map_or(true, |s| s.trim() != "0")
}

fn reason(bit: u32) -> &'static str {
    match bit {
        CAP_BPF => "this kernel (before 6.5, unprivileged_bpf_disabled set) refuses bpf() on the open maps without it",
        CAP_NET_ADMIN => "this kernel (before 5.9) detaches XDP through netlink at SIGTERM",
        CAP_DAC_OVERRIDE => "root's pin directory may sit in /sys/fs/bpf/paqet owned by the service user",
        _ => "needed after start",
    }
}

// What the signal handler reads: set before any thread is signalled.
static KEEP: AtomicU64 = AtomicU64::new(0);
static BOUNDING: AtomicBool = AtomicBool::new(false);
static LAST_CAP: AtomicU64 = AtomicU64::new(40);
/// The first errno a thread met (0: none).
static FAILED: AtomicI32 = AtomicI32::new(0);

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Lowers the calling thread's sets to the target. Only raw system calls: it runs in
/// a signal handler.
fn lower_this_thread() -> Result<(), i32> {
    let keep = KEEP.load(Ordering::Acquire);
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EPERM);
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) } != 0 {
        return Err(errno());
    }
    if BOUNDING.load(Ordering::Acquire) {
        // Before capset: dropping from the bounding set needs CAP_SETPCAP effective.
        for bit in 0..=LAST_CAP.load(Ordering::Acquire) {
            if keep & (1u64 << bit) == 0 {
                // SAFETY: as above. EINVAL (a bit this kernel does not know) is harmless.
                let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, bit as libc::c_ulong, 0, 0, 0) };
                if rc != 0 && errno() != libc::EINVAL {
                    return Err(errno());
                }
            }
        }
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: keep as u32,
            permitted: keep as u32,
            inheritable: 0,
        },
        CapData {
            effective: (keep >> 32) as u32,
            permitted: (keep >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: a version-3 header and the two data structs that version takes.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// Clears `bit` from the calling thread's effective set only (capset is per thread):
/// for tests of what the relay meets once its capabilities are gone.
#[cfg(test)]
pub(crate) fn clear_effective_in_this_thread(bit: u32) -> std::io::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a version-3 header and the two data structs that version takes.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    data[(bit / 32) as usize].effective &= !(1 << (bit % 32));
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    // Keep the interrupted code's errno.
    // SAFETY: __errno_location is the calling thread's errno.
    let saved = unsafe { *libc::__errno_location() };
    if let Err(e) = lower_this_thread() {
        let _ = FAILED.compare_exchange(0, e, Ordering::AcqRel, Ordering::Acquire);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

fn signal_number() -> libc::c_int {
    libc::SIGRTMAX() - 3
}

fn set_action(handler: libc::sighandler_t) -> std::io::Result<libc::sighandler_t> {
    // SAFETY: a zeroed sigaction with an empty mask is valid; `old` is filled in.
    unsafe {
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = handler;
        new.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut new.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(signal_number(), &new, &mut old) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(old.sa_sigaction)
    }
}

/// Brings every other thread to the target: signal those not there (each once, and the
/// ones that appear meanwhile), until none is left or the wait is over.
fn lower_other_threads(target: Target) -> Result<usize> {
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: gettid has no arguments.
    let me = unsafe { libc::gettid() };
    let started = Instant::now();
    let mut signalled = std::collections::HashSet::new();
    loop {
        let tids = threads();
        let behind: Vec<i32> = tids
            .iter()
            .copied()
            .filter(|&t| t != me)
            .filter(|&t| thread_sets(t).is_some_and(|s| !target.reached_by(&s)))
            .collect();
        if behind.is_empty() {
            return Ok(tids.len());
        }
        let failed = FAILED.load(Ordering::Acquire);
        if failed != 0 {
            bail!(
                "a thread could not lower its capabilities: {}",
                std::io::Error::from_raw_os_error(failed)
            );
        }
        if started.elapsed() > THREADS_WAIT {
            let who: Vec<String> = behind.iter().map(|&t| format!("{t} ({})", thread_name(t))).collect();
            bail!(
                "threads {} did not drop their capabilities within {THREADS_WAIT:?}",
                who.join(", ")
            );
        }
        for tid in behind {
            if signalled.insert(tid) {
                // SAFETY: tgkill to a thread of this process; ESRCH (it just exited) is fine.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal_number()) };
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Drops, in every thread, the capabilities the running relay does not need: call once
/// the paths are open and the node is built, before serving. A process without
/// capabilities has nothing to do (a debug line says so).
pub fn drop_after_start() -> Result<()> {
    let Some(now) = thread_sets(unsafe { libc::gettid() }) else {
        bail!("cannot read this thread's capabilities from /proc/self/task");
    };
    let held = now.permitted | now.effective | now.inheritable | now.ambient;
    if held == 0 {
        tracing::debug!("no capabilities held; nothing to drop");
        return Ok(());
    }
    // SAFETY: geteuid has no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    let keep = needed_after_start(now.permitted, kernel_version(), unprivileged_bpf_disabled(), root);
    let bounding = now.effective & (1 << CAP_SETPCAP) != 0;
    let target = Target { keep, bounding };
    if let Ok(last) = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        && let Ok(last) = last.trim().parse::<u64>()
    {
        LAST_CAP.store(last.min(63), Ordering::Release);
    }
    KEEP.store(keep, Ordering::Release);
    BOUNDING.store(bounding, Ordering::Release);
    FAILED.store(0, Ordering::Release);

    let previous = set_action(on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t)?;
    if previous != libc::SIG_DFL && previous != libc::SIG_IGN {
        set_action(previous)?;
        bail!(
            "signal {} already has a handler; cannot drop capabilities in every thread",
            signal_number()
        );
    }
    let others = lower_other_threads(target);
    // This thread last: nothing above needed a capability, but an error is reported
    // with the sets as they were.
    let mine = lower_this_thread();
    // Ignoring it discards what is still pending (a thread signalled twice).
    set_action(libc::SIG_IGN)?;
    let count = others?;
    if let Err(e) = mine {
        bail!("cannot drop capabilities: {}", std::io::Error::from_raw_os_error(e));
    }
    // Threads started between the last look and this thread's drop inherited the old sets.
    let count = count.max(lower_remaining(target)?);

    let dropped = held & !keep;
    // Root holds them all: count them rather than name forty.
    let what = if dropped.count_ones() > 8 {
        format!("{} capabilities", dropped.count_ones())
    } else {
        format!("capabilities {}", names(dropped))
    };
    let bounding_note = if bounding {
        "bounding set lowered to match"
    } else {
        "bounding set as the unit left it: lowering it needs CAP_SETPCAP"
    };
    if keep == 0 {
        tracing::info!(
            threads = count,
            "dropped {what} in every thread; none remain ({bounding_note})"
        );
    } else {
        let kept: Vec<String> = (0..64)
            .filter(|b| keep & (1u64 << b) != 0)
            .map(|b| format!("{}, as {}", name(b), reason(b)))
            .collect();
        tracing::info!(
            threads = count,
            "dropped {what} in every thread; kept only {} ({bounding_note})",
            kept.join("; ")
        );
    }
    Ok(())
}

/// A last pass after this thread dropped its own: any thread still above the target
/// (spawned meanwhile by a thread that had not dropped yet) gets the signal handler
/// again for a moment.
fn lower_remaining(target: Target) -> Result<usize> {
    // SAFETY: gettid has no arguments.
    let me = unsafe { libc::gettid() };
    let tids = threads();
    let behind = tids
        .iter()
        .any(|&t| t != me && thread_sets(t).is_some_and(|s| !target.reached_by(&s)));
    if !behind {
        return Ok(tids.len());
    }
    set_action(on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t)?;
    let result = lower_other_threads(target);
    set_action(libc::SIG_IGN)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_the_unit_set() {
        assert_eq!(
            names((1 << 12) | (1 << 13) | (1 << 14) | (1 << 38) | (1 << 39)),
            "CAP_NET_ADMIN, CAP_NET_RAW, CAP_IPC_LOCK, CAP_PERFMON, CAP_BPF"
        );
    }

    #[test]
    fn nothing_stays_on_a_current_kernel() {
        let unit = (1u64 << 12) | (1 << 13) | (1 << 14) | (1 << 38) | (1 << 39);
        assert_eq!(needed_after_start(unit, (6, 18), true, false), 0);
        assert_eq!(needed_after_start(unit, (6, 5), true, false), 0);
        // Older kernels: what the running relay's system calls need there.
        assert_eq!(needed_after_start(unit, (6, 1), true, false), 1 << CAP_BPF);
        assert_eq!(needed_after_start(unit, (6, 1), false, false), 0);
        assert_eq!(
            needed_after_start(unit, (5, 4), true, false),
            (1 << CAP_BPF) | (1 << CAP_NET_ADMIN)
        );
        // Only what is held can stay.
        assert_eq!(needed_after_start(0, (5, 4), true, true), 0);
        let all = (1u64 << 41) - 1;
        assert_eq!(needed_after_start(all, (6, 18), true, true), 1 << CAP_DAC_OVERRIDE);
    }

    #[test]
    fn parses_proc_status() {
        let status = "Name:\tpaqet\nCapInh:\t0000000000000000\nCapPrm:\t000000c000007000\n\
                      CapEff:\t000000c000007000\nCapBnd:\t000000c000007000\nCapAmb:\t000000c000007000\n";
        let s = parse_sets(status).unwrap();
        assert_eq!(s.permitted, 0xc0_0000_7000);
        let target = Target {
            keep: 0,
            bounding: false,
        };
        assert!(!target.reached_by(&s));
        let dropped = Sets {
            bounding: s.bounding,
            ..Sets::default()
        };
        assert!(target.reached_by(&dropped));
        assert!(
            !Target {
                keep: 0,
                bounding: true
            }
            .reached_by(&dropped)
        );
    }
}
