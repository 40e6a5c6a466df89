//! CPU capability detection and the single dispatch point for every kernel.
//!
//! Features are probed once and cached; `LACUNA_KERNEL=scalar|avx2|avx512` forces a path (tests and benches
//! use it to exercise each one). Forcing a path the CPU lacks falls back to the best available one
//! with a warning on stderr, never to an illegal instruction.

use std::sync::OnceLock;

/// An instruction-set level a kernel is written for, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust; also the reference every other path is tested against.
    Scalar,
    /// AVX2 + FMA + F16C (Haswell and later, Zen and later).
    Avx2,
    /// Everything in `Avx2` plus AVX-512 F + BW + VL (Skylake-X and later, Zen 4 and later).
    /// Kernels without an AVX-512 body of their own run their AVX2 body on this level.
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Every path this CPU can run, for tests that sweep them all.
    pub fn available() -> Vec<Isa> {
        let best = detect_best();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= best).collect()
    }
}

/// Whether this CPU can run `isa` (safe entry points taking an explicit `Isa` check this).
pub fn supports(isa: Isa) -> bool {
    isa <= detect_best()
}

fn detect_best() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
                && std::is_x86_feature_detected!("popcnt")
            {
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    return Isa::Avx512;
                }
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    })
}

/// The path kernels take in this process: the best the CPU has, unless `LACUNA_KERNEL` says otherwise.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detect_best();
        match std::env::var("LACUNA_KERNEL").ok().as_deref() {
            None | Some("") | Some("auto") => best,
            Some("scalar") => Isa::Scalar,
            Some("avx2") if best >= Isa::Avx2 => Isa::Avx2,
            Some("avx512") if best >= Isa::Avx512 => Isa::Avx512,
            Some(other) => {
                eprintln!(
                    "warning: LACUNA_KERNEL={other} is unknown or unsupported on this CPU; using {}",
                    best.name()
                );
                best
            }
        }
    })
}

/// How the AVX-512 dense f32 GEMV walks its rows: `Interleaved` reads four rows side by side
/// (they share each activation load; 90 % of the bandwidth on Intel Emerald Rapids), `Sequential`
/// one row at a time, a single forward stream per core. On AMD Zen 4 four interleaved row streams
/// defeat the prefetchers: 15 GB/s where one stream reads 24 (2 cores, SmolLM2's shapes, one
/// run). Picked by vendor; `LACUNA_GEMV_ROWS=interleaved|sequential` forces either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOrder {
    Interleaved,
    Sequential,
}

pub fn gemv_row_order() -> RowOrder {
    static ORDER: OnceLock<RowOrder> = OnceLock::new();
    *ORDER.get_or_init(|| match std::env::var("LACUNA_GEMV_ROWS").ok().as_deref() {
        Some("interleaved") => RowOrder::Interleaved,
        Some("sequential") => RowOrder::Sequential,
        _ if vendor_is_amd() => RowOrder::Sequential,
        _ => RowOrder::Interleaved,
    })
}

fn vendor_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // The vendor string is leaf 0's EBX, EDX, ECX.
        let r = std::arch::x86_64::__cpuid(0);
        let mut v = [0u8; 12];
        for (i, w) in [r.ebx, r.edx, r.ecx].into_iter().enumerate() {
            v[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        &v == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Threads kernels may use: rayon's pool, which is sized from `available_parallelism` (it honours
/// cgroup CPU quotas and affinity masks) unless the CLI configured it with `--threads`.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Size of the last-level cache in bytes (Linux sysfs), if the system says: benches size their
/// buffers beyond it so that they measure memory, not cache.
pub fn last_level_cache_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| {
        let p = e.ok()?.path();
        let level: u32 = std::fs::read_to_string(p.join("level")).ok()?.trim().parse().ok()?;
        let size = std::fs::read_to_string(p.join("size")).ok()?;
        let size = size.trim();
        let bytes = match size.strip_suffix('K') {
            Some(k) => k.parse::<usize>().ok()? << 10,
            None => match size.strip_suffix('M') {
                Some(m) => m.parse::<usize>().ok()? << 20,
                None => size.parse().ok()?,
            },
        };
        Some((level, bytes))
    })
    .max()
    .map(|(_, bytes)| bytes)
}

/// A buffer size that measures memory rather than cache: 4 × the last-level cache, at least
/// 512 MiB, at most 2 GiB.
pub fn beyond_cache_bytes() -> usize {
    last_level_cache_bytes().map_or(512 << 20, |llc| (4 * llc).clamp(512 << 20, 2 << 30))
}

/// Sustained read bandwidth of this machine in GB/s (10⁹ bytes per second): every rayon thread
/// streams its share of a `bytes`-long buffer (pass [`beyond_cache_bytes`]) through a sum with the
/// loads and prefetches of the GEMV kernels; the best of a few passes is reported. This is the ceiling a
/// memory-bound kernel (GEMV during decoding) can reach, so benches report their bytes per second
/// against it.
pub fn measure_read_bandwidth(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let len = (bytes / 4).max(1);
    // Filled in parallel so that first-touch places pages near the threads that will read them.
    let mut buf = vec![0f32; len];
    // On the pages the runtime gives the weights it streams (see `pages`).
    crate::pages::prefer_huge_pages([bytemuck::cast_slice(&buf[..])]);
    let per = len.div_ceil(threads() * 4).max(1);
    buf.par_chunks_mut(per).enumerate().for_each(|(t, c)| {
        for (i, w) in c.iter_mut().enumerate() {
            *w = ((t * per + i) % 7) as f32;
        }
    });
    let isa = isa();
    let mut best = 0f64;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        let sum: f32 = buf.par_chunks(per).map(|c| crate::dense::stream_sum(isa, c)).sum();
        std::hint::black_box(sum);
        let secs = start.elapsed().as_secs_f64();
        if secs > 0.0 {
            best = best.max((len * 4) as f64 / secs / 1e9);
        }
    }
    best
}
