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

/// Threads kernels may use: rayon's pool, which is sized from `available_parallelism` (it honours
/// cgroup CPU quotas and affinity masks) unless the CLI configured it with `--threads`.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Sustained read bandwidth of this machine in GB/s (10⁹ bytes per second): every rayon thread
/// streams its share of a `bytes`-long buffer (pass one well beyond the last-level cache, e.g.
/// 512 MiB) through a sum; the best of a few passes is reported. This is the ceiling a
/// memory-bound kernel (GEMV during decoding) can reach, so benches report their bytes per second
/// against it.
pub fn measure_read_bandwidth(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let words = (bytes / 8).max(1);
    // Filled in parallel so that first-touch places pages near the threads that will read them.
    let mut buf = vec![0u64; words];
    let per = words.div_ceil(threads() * 4).max(1);
    buf.par_chunks_mut(per).enumerate().for_each(|(t, c)| {
        for (i, w) in c.iter_mut().enumerate() {
            *w = (t * per + i) as u64;
        }
    });
    let mut best = 0f64;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        let sum = buf
            .par_chunks(per)
            .map(|c| {
                // Eight independent lanes keep the adds off the critical path so the loop is bound
                // by loads alone.
                let mut acc = [0u64; 8];
                let mut it = c.chunks_exact(8);
                for w in &mut it {
                    for (a, v) in acc.iter_mut().zip(w) {
                        *a = a.wrapping_add(*v);
                    }
                }
                it.remainder().iter().chain(&acc).fold(0u64, |s, v| s.wrapping_add(*v))
            })
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        let secs = start.elapsed().as_secs_f64();
        if secs > 0.0 {
            best = best.max((words * 8) as f64 / secs / 1e9);
        }
    }
    best
}
