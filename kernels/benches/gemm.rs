//! Batched decode and prefill products on SmolLM2-135M's shapes, dense f32 vs bitmask at 50 % and 70 %:
//! `y[n, rows] = x[n, cols] · Wᵀ` for n = 8 (multi-row GEMV), 16 and 32 (the register-tiled
//! small-batch GEMM), 128 and 512 (prefill: the packing GEMM for dense weights, the
//! non-zeros-only kernel for bitmask ones on AVX-512; 512 not for the head). Throughput counts 2 · rows · cols · n flops as
//! elements, so criterion's `Gelem/s` reads as GFLOP/s.
//!
//! `cargo bench -p lacuna-kernels --bench gemm`; `LACUNA_KERNEL=scalar|avx2` picks another path,
//! `RAYON_NUM_THREADS` the thread count.

mod common;

use criterion::Throughput;
use lacuna_kernels::bitmask::{self, BitmaskMatrix};
use lacuna_kernels::dense;
use rand::{Rng, SeedableRng};

fn main() {
    let mut c = common::criterion(2, 10);
    eprintln!("{}", common::machine(false));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    // (name, rows, cols): an MLP up projection, its down projection, the tied LM head.
    for (name, rows, cols) in [("up_1536x576", 1536, 576), ("down_576x1536", 576, 1536), ("head_49152x576", 49152, 576)]
    {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut prune = |s: f64| -> Vec<f32> { w.iter().map(|&v| if rng.random_bool(s) { 0.0 } else { v }).collect() };
        let (s50, s70) = (prune(0.5), prune(0.7));
        let m = dense::DenseMatrix::new(&w, rows, cols).unwrap();
        let (b50, b70) = (
            BitmaskMatrix::from_dense(&s50, rows, cols).unwrap(),
            BitmaskMatrix::from_dense(&s70, rows, cols).unwrap(),
        );
        let (bv50, bv70) = (b50.view(), b70.view());
        let mut g = c.benchmark_group(format!("matmul_{name}"));
        for n in [8usize, 16, 32, 128, 512] {
            if n == 512 && rows > 4096 {
                continue;
            }
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut y = vec![0f32; n * rows];
            g.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
            g.bench_function(format!("dense_f32_n{n}"), |bch| bch.iter(|| dense::matmul(&m, &x, n, &mut y).unwrap()));
            g.bench_function(format!("bitmask_f32_50_n{n}"), |bch| {
                bch.iter(|| bitmask::matmul(&bv50, &x, n, &mut y).unwrap())
            });
            g.bench_function(format!("bitmask_f32_70_n{n}"), |bch| {
                bch.iter(|| bitmask::matmul(&bv70, &x, n, &mut y).unwrap())
            });
        }
        g.finish();
    }
    c.final_summary();
}
