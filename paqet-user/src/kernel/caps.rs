//! Which of the capabilities the loader needs this process lacks, read from
//! /proc/self/status, so the error names them instead of surfacing a bare EPERM.

const CAP_SYS_ADMIN: u32 = 21;
const CAP_IPC_LOCK: u32 = 14;

/// The capabilities the xdp transport needs, and what each is for (each measured: see
/// dist/paqet.service). CAP_BPF and CAP_PERFMON are implied by CAP_SYS_ADMIN.
pub const XDP_CAPS: [(&str, u32, &str); 5] = [
    ("CAP_BPF", 39, "load the XDP program and maps"),
    (
        "CAP_PERFMON",
        38,
        "the verifier accepts paqet_steer's packet-pointer arithmetic",
    ),
    ("CAP_NET_ADMIN", 12, "attach XDP"),
    ("CAP_NET_RAW", 13, "open the AF_XDP and AF_PACKET sockets"),
    ("CAP_IPC_LOCK", 14, "lock the AF_XDP UMEM beyond RLIMIT_MEMLOCK"),
];

/// What loading and attaching the program takes (the rest of [`XDP_CAPS`] is for the
/// sockets and their memory).
const ATTACH_CAPS: [&str; 3] = ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"];

/// One capability set (`key`: "CapEff:", "CapPrm:", ...) of a /proc/.../status text.
pub fn status_set(status: &str, key: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix(key))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

fn effective() -> Option<u64> {
    status_set(&std::fs::read_to_string("/proc/self/status").ok()?, "CapEff:")
}

fn has(set: u64, cap: u32) -> bool {
    set & (1u64 << cap) != 0
}

/// The capabilities of [`XDP_CAPS`] that `set` lacks. CAP_SYS_ADMIN covers BPF and
/// PERFMON on its own (older kernels and root); without CAP_PERFMON the verifier
/// refuses paqet_steer's packet-pointer arithmetic for a non-root loader ("pointer
/// arithmetic with it prohibited for !root"; measured).
fn missing_from(set: u64) -> Vec<&'static str> {
    XDP_CAPS
        .iter()
        .filter(|(name, bit, _)| {
            let implied = matches!(*name, "CAP_BPF" | "CAP_PERFMON") && has(set, CAP_SYS_ADMIN);
            !has(set, *bit) && !implied
        })
        .map(|(name, _, _)| *name)
        .collect()
}

/// The capabilities of [`XDP_CAPS`] this process lacks (all of them when its set cannot
/// be read).
pub fn missing_caps() -> Vec<&'static str> {
    missing_from(effective().unwrap_or(0))
}

/// Names of the missing capabilities for loading and attaching, or `None` when
/// everything needed is there (or the set cannot be read: then the kernel's answer is
/// the judge).
pub fn missing_for_attach() -> Option<String> {
    let missing: Vec<&str> = missing_from(effective()?)
        .into_iter()
        .filter(|name| ATTACH_CAPS.contains(name))
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Whether locked memory is free of RLIMIT_MEMLOCK (what the AF_XDP UMEM is charged to).
pub fn may_lock_memory() -> bool {
    effective().is_some_and(|s| has(s, CAP_IPC_LOCK))
}

pub fn may_mount() -> bool {
    effective().is_some_and(|s| has(s, CAP_SYS_ADMIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_implies_bpf_and_perfmon_only() {
        let all: u64 = XDP_CAPS.iter().map(|(_, bit, _)| 1u64 << bit).sum();
        assert!(missing_from(all).is_empty());
        assert_eq!(missing_from(0).len(), XDP_CAPS.len());
        let admin = (1u64 << CAP_SYS_ADMIN) | (1 << 12) | (1 << 13) | (1 << CAP_IPC_LOCK);
        assert!(missing_from(admin).is_empty());
        let raw_only = 1u64 << 13;
        assert_eq!(
            missing_from(raw_only),
            ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_IPC_LOCK"]
        );
    }
}
