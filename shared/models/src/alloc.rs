//! The process's allocator, tuned for tensors.
//!
//! glibc's malloc serves blocks above its mmap threshold with `mmap` and gives them back with
//! `munmap` when freed, and trims the heap's free top. A training step allocates and frees the
//! same multi-megabyte activations and gradients every step, so each step page-faults them in
//! again (and every `munmap` is a TLB shootdown on every core): on the 2-core development VM that
//! was half the time of a MiniLM-L2 training step (11 vs 23 pairs/s, docs/perf.md). Keeping freed
//! memory in the heap for reuse fixes it; the process keeps its peak footprint instead.

/// Makes glibc keep freed memory for reuse (mmap threshold and trim threshold at 1 GiB, 64 MiB of
/// top padding). Every binary that runs models calls it first. Skipped when
/// `DISTILL_KEEP_FREED_MEMORY=0` or when the user tunes malloc through its own environment
/// variables. Returns whether it applied the settings (false off glibc).
pub fn keep_freed_memory() -> bool {
    if std::env::var("DISTILL_KEEP_FREED_MEMORY").is_ok_and(|v| v == "0")
        || std::env::vars().any(|(k, _)| k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES")
    {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const BIG: i32 = 1 << 30;
        // SAFETY: mallopt only changes allocator parameters; it is called before other threads
        // allocate (first thing in main), and glibc takes its own lock anyway.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, BIG) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, BIG) == 1
                && libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings() {
        if std::env::vars()
            .any(|(k, _)| k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES" || k == "DISTILL_KEEP_FREED_MEMORY")
        {
            return;
        }
        assert!(super::keep_freed_memory());
        // Big blocks still allocate, are written and freed.
        let v = vec![1u8; 64 << 20];
        assert_eq!(v.iter().map(|&x| x as usize).sum::<usize>(), 64 << 20);
    }
}
