//! Which of the capabilities the loader needs this process lacks, read from
//! /proc/self/status, so the error names them instead of surfacing a bare EPERM.

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const CAP_IPC_LOCK: u32 = 14;

fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

fn has(set: u64, cap: u32) -> bool {
    set & (1u64 << cap) != 0
}

/// Names of the missing capabilities, or `None` when everything needed is there (or
/// the set cannot be read: then the kernel's answer is the judge).
pub fn missing_for_attach() -> Option<String> {
    let set = effective()?;
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN covers BPF on its own (older kernels and root).
    if !has(set, CAP_BPF) && !has(set, CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(set, CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    // Without it the verifier refuses paqet_steer's packet-pointer arithmetic for a
    // non-root loader ("pointer arithmetic with it prohibited for !root"; measured).
    if !has(set, CAP_PERFMON) && !has(set, CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() {
        None
    } else {
        Some(missing.join(", "))
    }
}

/// Whether locked memory is free of RLIMIT_MEMLOCK (what the AF_XDP UMEM is charged to).
pub fn may_lock_memory() -> bool {
    effective().is_some_and(|s| has(s, CAP_IPC_LOCK))
}

pub fn may_mount() -> bool {
    effective().is_some_and(|s| has(s, CAP_SYS_ADMIN))
}
