//! Batched decode and prefill products on SmolLM2-135M's shapes, dense f32 vs bitmask at 70 %:
//! `y[n, rows] = x[n, cols] · Wᵀ` for n = 8 (multi-row GEMV), 16 and 32 (the register-tiled
//! small-batch GEMM), 128 (the packing GEMM). Throughput counts 2 · rows · cols · n flops as
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
        let sparse: Vec<f32> = w.iter().map(|&v| if rng.random_bool(0.7) { 0.0 } else { v }).collect();
        let m = dense::DenseMatrix::new(&w, rows, cols).unwrap();
        let b = BitmaskMatrix::from_dense(&sparse, rows, cols).unwrap();
        let bv = b.view();
        let mut g = c.benchmark_group(format!("matmul_{name}"));
        for n in [8usize, 16, 32, 128] {
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut y = vec![0f32; n * rows];
            g.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
            g.bench_function(format!("dense_f32_n{n}"), |bch| bch.iter(|| dense::matmul(&m, &x, n, &mut y).unwrap()));
            g.bench_function(format!("bitmask_f32_70_n{n}"), |bch| {
                bch.iter(|| bitmask::matmul(&bv, &x, n, &mut y).unwrap())
            });
        }
        g.finish();
    }
    c.final_summary();
}
