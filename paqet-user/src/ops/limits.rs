//! Process limits: the soft open-file limit is raised to the hard one at start (as Go's
//! runtime does), so a busy client is bounded by what the administrator allows
//! (`LimitNOFILE=` in the unit), not by the historical soft default of 1,024.

/// The soft RLIMIT_NOFILE now.
pub fn open_files_soft_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    Some(lim.rlim_cur)
}

/// Descriptors this process holds now (entries of /proc/self/fd, less the one reading it).
pub fn open_descriptors() -> Option<u64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (before, after). Never
/// fails the start: a limit that cannot be raised is logged at debug and kept.
pub fn raise_open_files() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::debug!("getrlimit(RLIMIT_NOFILE) failed: {}", std::io::Error::last_os_error());
        return (0, 0);
    }
    let before = lim.rlim_cur;
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        // The kernel refuses an infinite NOFILE; its ceiling is fs.nr_open.
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(lim.rlim_cur);
    }
    if lim.rlim_cur >= target {
        tracing::debug!(
            soft = before,
            hard = lim.rlim_max,
            "open-file limit already at its maximum"
        );
        return (before, before);
    }
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: a plain setrlimit with a struct we own; raising soft up to hard needs no
    // privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::debug!(
            soft = before,
            wanted = target,
            "cannot raise the open-file limit: {}",
            std::io::Error::last_os_error()
        );
        return (before, before);
    }
    let after = open_files_soft_limit().unwrap_or(before);
    tracing::debug!(
        before,
        after,
        hard = lim.rlim_max,
        "open-file soft limit raised to the hard limit"
    );
    (before, after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit_and_is_idempotent() {
        let (_, after) = raise_open_files();
        assert_eq!(open_files_soft_limit(), Some(after));
        let (again_before, again_after) = raise_open_files();
        assert_eq!((again_before, again_after), (after, after));
        assert!(open_descriptors().is_some_and(|n| n >= 3));
    }
}
