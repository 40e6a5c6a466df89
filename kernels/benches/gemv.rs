//! GEMV (one activation row, i.e. one decoded token) on an 8192 × 8192 weight, larger than the
//! last-level cache, dense vs bitmask-sparse. Throughput is the weight bytes one product reads,
//! so criterion's GB/s compares directly with the machine's read bandwidth printed first.
//!
//! `cargo bench -p lacuna-kernels --bench gemv`; `LACUNA_KERNEL=avx2|scalar` picks another path,
//! `RAYON_NUM_THREADS` the thread count.

use std::time::Duration;

use criterion::{Criterion, Throughput};
use half::bf16;
use lacuna_kernels::bitmask::{self, BitmaskMatrix, BitmaskValue};
use lacuna_kernels::{cpu, dense};
use rand::{Rng, SeedableRng};

const N: usize = 8192;

/// Random weights with about `sparsity` zeros; never exactly zero elsewhere.
fn weights(sparsity: f64, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..N * N).map(|_| if rng.random_bool(sparsity) { 0.0 } else { rng.random_range(0.01f32..1.0) }).collect()
}

fn bench_sparse<T: BitmaskValue>(c: &mut Criterion, m: &BitmaskMatrix<T>, x: &[f32], label: &str) {
    let v = m.view();
    let mut y = vec![0f32; N];
    let mut g = c.benchmark_group("gemv_8192");
    g.throughput(Throughput::Bytes(v.nbytes() as u64));
    g.bench_function(label, |b| b.iter(|| bitmask::matmul(&v, x, 1, &mut y).unwrap()));
    g.finish();
}

fn bench_dense<T: dense::Element>(c: &mut Criterion, w: &[T], x: &[f32], label: &str) {
    let m = dense::DenseMatrix::new(w, N, N).unwrap();
    let mut y = vec![0f32; N];
    let mut g = c.benchmark_group("gemv_8192");
    g.throughput(Throughput::Bytes(std::mem::size_of_val(w) as u64));
    g.bench_function(label, |b| b.iter(|| dense::matmul(&m, x, 1, &mut y).unwrap()));
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .configure_from_args();
    eprintln!(
        "kernel {}, {} threads, read bandwidth {:.1} GB/s",
        cpu::isa().name(),
        cpu::threads(),
        cpu::measure_read_bandwidth(1 << 30)
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..N).map(|_| rng.random_range(-1.0f32..1.0)).collect();

    let w = weights(0.0, 2);
    bench_dense(&mut c, &w, &x, "dense_f32");
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    drop(w);
    bench_dense(&mut c, &wb, &x, "dense_bf16");
    drop(wb);
    for (s, pct) in [(0.5, 50), (0.7, 70)] {
        let w = weights(s, 3);
        let m = BitmaskMatrix::from_dense(&w, N, N).unwrap();
        bench_sparse(&mut c, &m, &x, &format!("bitmask_f32_{pct}"));
        drop(m);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        drop(w);
        let m = BitmaskMatrix::from_dense(&wb, N, N).unwrap();
        bench_sparse(&mut c, &m, &x, &format!("bitmask_bf16_{pct}"));
    }
    c.final_summary();
}
