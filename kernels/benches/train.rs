//! The three products of a training step's linear, `y = x · Wᵀ`, its input gradient `dx = dy · W`
//! and its weight gradient, on SmolLM2-135M's decoder shapes at n = 512 tokens: dense (the large
//! GEMM the trainer's dense linear runs, `dense::gemm_large`) vs bitmask-sparse at 50 % and 70 %
//! (the non-zeros-only prefill product forward and over `Wᵀ`, and the sampled product for the
//! weight gradient at the kept positions only).
//!
//! Prints, from one run, the median time of each product and the sparse/dense speed-up next to
//! the one the flops allow (`1 / (1 − s)`), per shape and for one whole decoder block (q, k, v, o,
//! gate, up, down).
//!
//! `cargo bench -p lacuna-kernels --bench train`; `RAYON_NUM_THREADS` sets the thread count.

#[allow(dead_code)] // `common::criterion`: this bench times its three products itself, for one table of ratios
mod common;

use std::time::Instant;

use lacuna_kernels::bitmask::{self, BitmaskMatrix};
use lacuna_kernels::dense::{self, Strided};
use lacuna_kernels::sampled;
use rand::{Rng, SeedableRng};

/// Median seconds of `reps` runs of `f` after one warm-up run.
fn median(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn main() {
    eprintln!("{}", common::machine(false));
    let n = 512;
    let reps = 9;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    // (name, rows, cols, count per block)
    let shapes = [
        ("q/o 576x576", 576, 576, 2),
        ("k/v 192x576", 192, 576, 2),
        ("gate/up 1536x576", 1536, 576, 2),
        ("down 576x1536", 576, 1536, 1),
    ];
    println!("| shape | product | dense ms | 50% ms | 50% speed-up | 70% ms | 70% speed-up |");
    println!("|---|---|---|---|---|---|---|");
    // Block totals: [dense, 50, 70] per product.
    let mut block = [[0f64; 3]; 3];
    for (name, rows, cols, count) in shapes {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let dy: Vec<f32> = (0..n * rows).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let (mut y, mut dx, mut dw) = (vec![0f32; n * rows], vec![0f32; n * cols], vec![0f32; rows * cols]);
        let rm = Strided::row_major;
        let dense_t = [
            median(reps, || dense::gemm_large(&x, rm(n, cols), &w, rm(rows, cols).t(), &mut y, rm(n, rows)).unwrap()),
            median(reps, || dense::gemm_large(&dy, rm(n, rows), &w, rm(rows, cols), &mut dx, rm(n, cols)).unwrap()),
            median(reps, || dense::gemm_large(&dy, rm(n, rows).t(), &x, rm(n, cols), &mut dw, rm(rows, cols)).unwrap()),
        ];
        let mut sparse_t = Vec::new();
        for s in [0.5, 0.7] {
            let ws: Vec<f32> = w.iter().map(|&v| if rng.random_bool(s) { 0.0 } else { v }).collect();
            let wt: Vec<f32> = (0..rows * cols).map(|i| ws[(i % rows) * cols + i / rows]).collect();
            let (m, mt) = (
                BitmaskMatrix::from_dense(&ws, rows, cols).unwrap(),
                BitmaskMatrix::from_dense(&wt, cols, rows).unwrap(),
            );
            let (v, vt) = (m.view(), mt.view());
            let mut g = vec![0f32; v.nnz()];
            sparse_t.push([
                median(reps, || bitmask::matmul(&v, &x, n, &mut y).unwrap()),
                median(reps, || bitmask::matmul(&vt, &dy, n, &mut dx).unwrap()),
                median(reps, || sampled::sampled_matmul(&v, &x, &dy, n, &mut g).unwrap()),
            ]);
        }
        for (p, what) in ["forward", "input gradient", "weight gradient"].iter().enumerate() {
            let (d, a, b) = (dense_t[p], sparse_t[0][p], sparse_t[1][p]);
            println!(
                "| {name} | {what} | {:.3} | {:.3} | {:.2}x | {:.3} | {:.2}x |",
                d * 1e3,
                a * 1e3,
                d / a,
                b * 1e3,
                d / b
            );
            block[p][0] += count as f64 * d;
            block[p][1] += count as f64 * a;
            block[p][2] += count as f64 * b;
        }
    }
    let total: [f64; 3] = [0, 1, 2].map(|k| block.iter().map(|b| b[k]).sum());
    for (p, what) in ["forward", "input gradient", "weight gradient"].iter().enumerate() {
        let b = block[p];
        println!(
            "| one block | {what} | {:.3} | {:.3} | {:.2}x | {:.3} | {:.2}x |",
            b[0] * 1e3,
            b[1] * 1e3,
            b[0] / b[1],
            b[2] * 1e3,
            b[0] / b[2]
        );
    }
    println!(
        "| one block | all three | {:.3} | {:.3} | {:.2}x (flops allow 2.00x: {:.2} of it) | {:.3} | {:.2}x (flops allow 3.33x: {:.2} of it) |",
        total[0] * 1e3,
        total[1] * 1e3,
        total[0] / total[1],
        total[0] / total[1] / 2.0,
        total[2] * 1e3,
        total[0] / total[2],
        total[0] / total[2] / (1.0 / 0.3)
    );
    // GFLOP/s of the dense block: 3 products of 2·rows·cols·n flops each.
    let dense_flops: f64 = shapes.iter().map(|&(_, r, c, k)| (3 * 2 * r * c * n * k) as f64).sum();
    println!("\ndense block: {:.0} GFLOP/s over the three products", dense_flops / total[0] / 1e9);
}
