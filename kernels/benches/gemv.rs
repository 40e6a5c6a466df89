//! GEMV (one activation row, i.e. one decoded token) on a `ROWS × 8192` weight, dense vs
//! bitmask-sparse. `ROWS` is chosen so that even the smallest matrix (bf16 at 70 % sparsity) is
//! at least twice the last-level cache: every product streams from memory. Throughput is the
//! weight bytes one product reads (bitmask + packed values for sparse), so criterion's GB/s
//! compares directly with the machine's read bandwidth printed first (same loads and prefetch).
//!
//! `cargo bench -p lacuna-kernels --bench gemv`; `LACUNA_KERNEL=avx2|scalar` picks another path,
//! `RAYON_NUM_THREADS` the thread count.

mod common;

use criterion::{Criterion, Throughput};
use half::bf16;
use lacuna_kernels::bitmask::{self, BitmaskMatrix, BitmaskValue};
use lacuna_kernels::{cpu, dense, pages};
use rand::{Rng, SeedableRng};

const N: usize = 8192;

/// Rows so that a bf16 matrix at 70 % sparsity (1/8 + 0.3 × 2 bytes per weight) spans at least
/// twice the last-level cache (and never fewer than 8192).
fn rows() -> usize {
    let llc = cpu::last_level_cache_bytes().unwrap_or(64 << 20);
    let per_row = N as f64 * (0.125 + 0.3 * 2.0);
    ((2.0 * llc as f64 / per_row).ceil() as usize).next_multiple_of(64).max(N)
}

/// Random weights with about `sparsity` zeros; never exactly zero elsewhere.
fn weights(rows: usize, sparsity: f64, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..rows * N).map(|_| if rng.random_bool(sparsity) { 0.0 } else { rng.random_range(0.01f32..1.0) }).collect()
}

fn bench_sparse<T: BitmaskValue + bytemuck::Pod>(c: &mut Criterion, m: &BitmaskMatrix<T>, x: &[f32], label: &str) {
    let v = m.view();
    // On 2 MiB pages, as the runtime keeps the weights it streams.
    pages::prefer_huge_pages([v.bitmask(), bytemuck::cast_slice(v.values()), bytemuck::cast_slice(v.row_offsets())]);
    let mut y = vec![0f32; v.rows()];
    let mut g = c.benchmark_group("gemv");
    g.throughput(Throughput::Bytes(v.nbytes() as u64));
    g.bench_function(label, |b| b.iter(|| bitmask::matmul(&v, x, 1, &mut y).unwrap()));
    g.finish();
}

fn bench_dense<T: dense::Element + bytemuck::Pod>(c: &mut Criterion, w: &[T], x: &[f32], label: &str) {
    let rows = w.len() / N;
    let m = dense::DenseMatrix::new(w, rows, N).unwrap();
    pages::prefer_huge_pages([bytemuck::cast_slice(w)]);
    let mut y = vec![0f32; rows];
    let mut g = c.benchmark_group("gemv");
    g.throughput(Throughput::Bytes(std::mem::size_of_val(w) as u64));
    g.bench_function(label, |b| b.iter(|| dense::matmul(&m, x, 1, &mut y).unwrap()));
    g.finish();
}

fn main() {
    let mut c = common::criterion(3, 20);
    let rows = rows();
    eprintln!("{}, weights {rows} x {N}", common::machine(true));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..N).map(|_| rng.random_range(-1.0f32..1.0)).collect();

    let w = weights(rows, 0.0, 2);
    bench_dense(&mut c, &w, &x, "dense_f32");
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    drop(w);
    bench_dense(&mut c, &wb, &x, "dense_bf16");
    drop(wb);
    for (s, pct) in [(0.5, 50), (0.7, 70)] {
        let w = weights(rows, s, 3);
        let m = BitmaskMatrix::from_dense(&w, rows, N).unwrap();
        bench_sparse(&mut c, &m, &x, &format!("bitmask_f32_{pct}"));
        drop(m);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        drop(w);
        let m = BitmaskMatrix::from_dense(&wb, rows, N).unwrap();
        bench_sparse(&mut c, &m, &x, &format!("bitmask_bf16_{pct}"));
    }
    c.final_summary();
}
