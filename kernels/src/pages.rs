//! 2 MiB pages for the weights a decode step streams.
//!
//! A decode step reads every weight once, a few hundred megabytes spread over hundreds of
//! matrices. On 4 KiB pages that is tens of thousands of TLB misses per token, and the
//! hardware prefetchers stop at every 4 KiB boundary; on 2 MiB pages both go away. Anonymous
//! memory is only backed by huge pages where the process asks (`madvise` is the usual system
//! setting), so the runtime asks for its weights once, after loading them.

/// Asks the kernel to back the memory of `buffers` with 2 MiB pages, collapsing pages already
/// populated in place (`MADV_COLLAPSE`, Linux 6.1+). Buffers lying close together (a loader's
/// matrices, most smaller than a huge page, allocated one after another) are advised as one span,
/// the 2 MiB-aligned pages inside it, which may include the allocator's own memory between them:
/// the advice changes no byte anywhere. Best effort: returns the bytes advised, 0 where the
/// system declined or has no such call.
pub fn prefer_huge_pages<'a>(buffers: impl IntoIterator<Item = &'a [u8]>) -> usize {
    let mut spans: Vec<(usize, usize)> = buffers
        .into_iter()
        .filter(|b| !b.is_empty())
        .map(|b| (b.as_ptr() as usize, b.as_ptr() as usize + b.len()))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 + HUGE => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged.into_iter().map(|(s, e)| advise(s.next_multiple_of(HUGE), e & !(HUGE - 1))).sum()
}

const HUGE: usize = 2 << 20;

/// Advises `[start, end)` (2 MiB-aligned) and returns its length, or 0 where the kernel refused.
fn advise(start: usize, end: usize) -> usize {
    if end <= start {
        return 0;
    }
    #[cfg(target_os = "linux")]
    {
        let (p, len) = (start as *mut libc::c_void, end - start);
        // SAFETY: the range lies inside this process's mapped memory (between bytes of live
        // buffers). Neither advice changes what any page holds: MADV_HUGEPAGE marks the range
        // eligible, MADV_COLLAPSE copies populated pages into huge ones, contents intact, while
        // other threads may keep reading them. A range with a hole in it is refused
        // (ENOMEM), never acted on outside the process's mappings.
        let ok = unsafe {
            libc::madvise(p, len, libc::MADV_HUGEPAGE) == 0 && libc::madvise(p, len, libc::MADV_COLLAPSE) == 0
        };
        if ok { len } else { 0 }
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// Asks the C allocator to keep freed memory for reuse instead of returning it to the system:
/// every buffer comes from the heap instead of a fresh mapping of its own (glibc maps buffers
/// over its threshold, at most 32 MiB, one by one and unmaps them on free), and freed heap memory
/// is not trimmed. A training step allocates and frees gigabytes of activations and gradients,
/// SmolLM2's logits and embedding gradient about 100 MiB each; each fresh mapping was
/// page-faulted in and zeroed by the kernel. The heap settles after the first step: peak
/// memory stays the same (5.13 vs 5.18 GB for a 70% SmolLM2 step, Emerald Rapids), the steps
/// take about 7% less time. Returns whether the allocator took the advice (glibc only;
/// elsewhere nothing changes).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's thresholds for later calls; no pointer is
        // passed and no allocation is touched. The values are within glibc's accepted ranges
        // (the mmap threshold at most HEAP_MAX / 2 = 32 MiB on 64-bit).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_keeps_every_byte_and_reports_whole_huge_pages_inside_the_buffers() {
        // Two buffers a loader might hold side by side, one smaller than a huge page.
        let a: Vec<u32> = (0..(3 << 20) as u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        let b: Vec<u32> = (0..1000u32).collect();
        let (ab, bb): (&[u8], &[u8]) = (bytemuck::cast_slice(&a), bytemuck::cast_slice(&b));
        let advised = prefer_huge_pages([ab, bb, &[]]);
        assert_eq!(advised % HUGE, 0, "{advised}");
        // The span advised lies within the buffers' extent (12 MiB here, plus the gap to `b`).
        let (lo, hi) = [ab, bb]
            .iter()
            .fold((usize::MAX, 0), |(lo, hi), s| (lo.min(s.as_ptr() as usize), hi.max(s.as_ptr() as usize + s.len())));
        assert!(advised <= hi - lo, "{advised} of {}", hi - lo);
        assert!(a.iter().enumerate().all(|(i, &v)| v == (i as u32).wrapping_mul(2_654_435_761)));
        assert!(b.iter().enumerate().all(|(i, &v)| v == i as u32));
        assert_eq!(prefer_huge_pages([&b"small"[..]]), 0, "nothing inside a buffer smaller than a huge page");
    }
}
