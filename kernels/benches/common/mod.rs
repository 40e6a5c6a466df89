//! Setup shared by the kernel benches.

use std::time::Duration;

use criterion::Criterion;
use lacuna_kernels::cpu;

/// Criterion with a one-second warm-up, `secs` of measurement and `samples` samples (command-line
/// options override them).
pub fn criterion(secs: u64, samples: usize) -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(secs))
        .sample_size(samples)
        .configure_from_args()
}

/// The line a bench prints first: kernel path, threads, last-level cache and, for benches that
/// report GB/s, the read bandwidth measured now (their ceiling).
pub fn machine(bandwidth: bool) -> String {
    let mut line = format!(
        "kernel {}, {} threads, last-level cache {} MiB",
        cpu::isa().name(),
        cpu::threads(),
        cpu::last_level_cache_bytes().unwrap_or(0) >> 20
    );
    if bandwidth {
        line += &format!(", read bandwidth {:.1} GB/s", cpu::measure_read_bandwidth(cpu::beyond_cache_bytes()));
    }
    line
}
