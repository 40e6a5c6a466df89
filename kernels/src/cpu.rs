//! CPU capability detection and the single dispatch point for every kernel.
//!
//! Features are probed once and cached; `LACUNA_KERNEL=scalar|avx2` forces a path (tests and benches
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
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
        }
    }

    /// Every path this CPU can run, for tests that sweep them all.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        if detect_best() >= Isa::Avx2 {
            v.push(Isa::Avx2);
        }
        v
    }
}

fn detect_best() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
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
