//! The C allocator's give-back policy. A relay frees and allocates a window of segment
//! buffers many times a second. glibc by default hands the top of its heap back to the
//! kernel once 128 KiB of it is free, so every acknowledged window was returned and the
//! next one faulted its pages in again, zeroed: 4–7 % of a relay's CPU in `clear_page`
//! (profile in BENCHMARKS.md). Keeping up to [`TRIM_THRESHOLD`] of freed heap
//! took one xdp stream ~5 % faster at ~5 % less CPU per GiB, with the same peak RSS.

/// Free heap kept before glibc trims it.
const TRIM_THRESHOLD: i32 = 64 << 20;
/// Extra heap requested each time the heap grows, so a growing window asks less often.
const TOP_PAD: i32 = 16 << 20;
/// Allocations from this size on get their own mapping. Setting the trim threshold turns
/// off glibc's own raising of this bound, so it is set to where glibc would raise it.
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Applies the policy above; false when the allocator refused a setting (or is not
/// glibc's), which costs speed only.
pub fn keep_freed_memory() -> bool {
    #[cfg(target_env = "gnu")]
    {
        [
            (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (libc::M_TOP_PAD, TOP_PAD),
            (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ]
        .into_iter()
        // SAFETY: mallopt only records tuning values, under the allocator's own lock.
        .all(|(param, value)| unsafe { libc::mallopt(param, value) } == 1)
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

#[cfg(all(test, target_env = "gnu"))]
mod tests {
    #[test]
    fn glibc_takes_every_setting() {
        assert!(super::keep_freed_memory());
    }
}
