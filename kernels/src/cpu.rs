//! CPU capability detection and the single dispatch point for every kernel.
//!
//! Features are probed once and cached; `LACUNA_KERNEL=scalar|avx2|avxvnni|avx512|avx512vnni` forces a path (tests and
//! benches use it to exercise each one; `avxvnni` runs the float kernels on AVX2 and the INT8 ones on AVX-VNNI;
//! `avx512vnni` keeps the INT8 products off AMX tiles on a CPU that has them). Forcing a path the CPU lacks falls back to the best available one
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
            Some("avxvnni") if best >= Isa::Avx2 && has_avx_vnni() => Isa::Avx2,
            Some("avx512") | Some("avx512vnni") if best >= Isa::Avx512 => Isa::Avx512,
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

/// The integer dot-product instructions the INT8 kernels ([`crate::int8`]) run on, a refinement
/// of [`Isa`]: the same `LACUNA_KERNEL` value picks both (`avx2` is plain AVX2 for INT8 too, even
/// on a CPU with AVX-VNNI, so that the `vpmaddubsw` path can be forced and measured).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Int8Isa {
    /// Portable Rust; the reference every other INT8 path equals bit for bit.
    Scalar,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`, 32 columns a vector.
    Avx2,
    /// AVX-VNNI (VEX `vpdpbusd` on 256 bits: Alder Lake, Sapphire Rapids, Zen 5).
    AvxVnni,
    /// AVX-512 VNNI `vpdpbusd` with VBMI2 `vpexpandb` and BMI2 (Ice Lake, Zen 4 and later).
    Avx512Vnni,
    /// `Avx512Vnni`, with the products of many activation rows (prefill) on AMX-INT8 tiles
    /// (`tdpbssd`: Sapphire Rapids and later Xeons), where the OS grants the tile state.
    Amx,
}

impl Int8Isa {
    pub fn name(self) -> &'static str {
        match self {
            Int8Isa::Scalar => "scalar",
            Int8Isa::Avx2 => "avx2",
            Int8Isa::AvxVnni => "avxvnni",
            Int8Isa::Avx512Vnni => "avx512vnni",
            Int8Isa::Amx => "amx",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Int8Isa::Scalar => true,
            Int8Isa::Avx2 => supports(Isa::Avx2),
            Int8Isa::AvxVnni => supports(Isa::Avx2) && has_avx_vnni(),
            Int8Isa::Avx512Vnni => supports(Isa::Avx512) && has_avx512_vnni(),
            Int8Isa::Amx => Int8Isa::Avx512Vnni.supported() && has_amx_int8(),
        }
    }

    /// Every INT8 path this CPU can run, for tests that sweep them all.
    pub fn available() -> Vec<Int8Isa> {
        [Int8Isa::Scalar, Int8Isa::Avx2, Int8Isa::AvxVnni, Int8Isa::Avx512Vnni, Int8Isa::Amx]
            .into_iter()
            .filter(|p| p.supported())
            .collect()
    }

    /// The best INT8 path within the float level `isa` (plain AVX2 below AVX-512, see the type).
    fn best_within(isa: Isa) -> Int8Isa {
        match isa {
            Isa::Scalar => Int8Isa::Scalar,
            Isa::Avx2 => Int8Isa::Avx2,
            Isa::Avx512 if Int8Isa::Amx.supported() => Int8Isa::Amx,
            Isa::Avx512 if Int8Isa::Avx512Vnni.supported() => Int8Isa::Avx512Vnni,
            Isa::Avx512 if Int8Isa::AvxVnni.supported() => Int8Isa::AvxVnni,
            Isa::Avx512 => Int8Isa::Avx2,
        }
    }
}

fn has_avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vbmi2")
            && std::is_x86_feature_detected!("bmi2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AMX-INT8 tiles usable by this process: the CPU has them (CPUID leaf 7: AMX-TILE and AMX-INT8)
/// and Linux grants the tile data state on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, once, for
/// the whole process). Elsewhere, and where the request fails (an old kernel, a seccomp filter),
/// false: the products stay on AVX-512 VNNI.
fn has_amx_int8() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let (tile, int8) = ((leaf7.edx >> 24) & 1 == 1, (leaf7.edx >> 25) & 1 == 1);
            if !(tile && int8) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments; it changes only which state
            // components this process may use.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

/// The INT8 path this process takes: the best the CPU has, unless `LACUNA_KERNEL` says otherwise
/// (`avxvnni` forces AVX-VNNI; `avx2` plain AVX2; `avx512` the best INT8 path on AVX-512, AMX
/// included; `avx512vnni` AVX-512 VNNI without AMX).
pub fn int8_isa() -> Int8Isa {
    static INT8: OnceLock<Int8Isa> = OnceLock::new();
    *INT8.get_or_init(|| {
        let isa = isa();
        let forced = std::env::var("LACUNA_KERNEL").ok();
        match forced.as_deref() {
            Some("avxvnni") if Int8Isa::AvxVnni.supported() => Int8Isa::AvxVnni,
            Some("avx512vnni") if Int8Isa::Avx512Vnni.supported() => Int8Isa::Avx512Vnni,
            None | Some("") | Some("auto") => {
                // Below AVX-512 a CPU may still have AVX-VNNI (Alder Lake).
                let best = Int8Isa::best_within(isa);
                if best == Int8Isa::Avx2 && Int8Isa::AvxVnni.supported() { Int8Isa::AvxVnni } else { best }
            }
            _ => Int8Isa::best_within(isa),
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
