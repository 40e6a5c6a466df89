//! INT8 (W8A8) products against f32 on the same shape, every INT8 path this CPU has in one run.
//!
//! - `int8_gemv`: one activation row on a `ROWS × 8192` weight, INT8 dense, INT8 bitmask at 70 %
//!   and f32 dense. `ROWS` makes the smallest (INT8 bitmask 70 %, 1/8 + 0.3 bytes a weight) at
//!   least twice the last-level cache, so every product streams from memory. Throughput is the
//!   bytes as stored (codes, or bitmask + packed codes + offsets, plus the scales), so criterion's
//!   GB/s compares directly with the read bandwidth printed first.
//! - `int8_matmul_*`: SmolLM2's up projection (1536 × 576) at n = 8, 32 and 512 (decode batch,
//!   small-batch GEMM, prefill), INT8 dense and bitmask 70 % vs f32 dense and bitmask 70 %;
//!   throughput counts 2 · rows · cols · n as elements (`Gelem/s` reads as GOP/s).
//!
//! The activation quantization is part of every INT8 product measured.
//!
//! `cargo bench -p lacuna-kernels --bench int8`; `RAYON_NUM_THREADS` sets the thread count.

mod common;

use criterion::{Criterion, Throughput};
use lacuna_kernels::bitmask::{self, BitmaskMatrix};
use lacuna_kernels::cpu::{self, Int8Isa, Isa};
use lacuna_kernels::int8::{self, Int8Bitmask, Int8Dense, Int8Matrix};
use lacuna_kernels::{dense, pages};
use rand::{Rng, SeedableRng};

const COLS: usize = 8192;

/// Rows so that an INT8 bitmask matrix at 70 % spans at least twice the last-level cache.
fn rows() -> usize {
    let llc = cpu::last_level_cache_bytes().unwrap_or(64 << 20);
    let per_row = COLS as f64 * (0.125 + 0.3);
    ((2.0 * llc as f64 / per_row).ceil() as usize).next_multiple_of(64).max(COLS)
}

/// Random non-zero codes (−128..=127) with about `sparsity` zeros.
fn codes(rng: &mut rand_chacha::ChaCha8Rng, len: usize, sparsity: f64) -> Vec<i8> {
    (0..len)
        .map(|_| {
            if rng.random_bool(sparsity) {
                0
            } else {
                match rng.random::<i8>() {
                    0 => 1,
                    v => v,
                }
            }
        })
        .collect()
}

/// The float path that goes with an INT8 one (for the f32 baseline of the same run).
fn float_isa(p: Int8Isa) -> Isa {
    match p {
        Int8Isa::Scalar => Isa::Scalar,
        Int8Isa::Avx2 | Int8Isa::AvxVnni => Isa::Avx2,
        Int8Isa::Avx512Vnni | Int8Isa::Amx => Isa::Avx512,
    }
}

fn gemv(c: &mut Criterion, paths: &[Int8Isa]) {
    let rows = rows();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
    let x: Vec<f32> = (0..COLS).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let scales: Vec<f32> = (0..rows).map(|_| rng.random_range(0.001f32..0.01)).collect();
    let dense_codes = codes(&mut rng, rows * COLS, 0.0);
    let sparse = BitmaskMatrix::from_dense(&codes(&mut rng, rows * COLS, 0.7), rows, COLS).unwrap();
    let (dm, sv) = (Int8Dense::new(&dense_codes, &scales, rows, COLS).unwrap(), sparse.view());
    let sm = Int8Bitmask::new(sv, &scales).unwrap();
    pages::prefer_huge_pages([bytemuck::cast_slice(&dense_codes[..])]);
    pages::prefer_huge_pages([sv.bitmask(), bytemuck::cast_slice(sv.values()), bytemuck::cast_slice(sv.row_offsets())]);
    let mut y = vec![0f32; rows];
    eprintln!(
        "int8_gemv: {rows} x {COLS}; INT8 dense {} MB, INT8 bitmask 70% {} MB, f32 dense {} MB",
        dm.nbytes() / 1_000_000,
        sm.nbytes() / 1_000_000,
        rows * COLS * 4 / 1_000_000
    );
    let mut g = c.benchmark_group("int8_gemv");
    for &p in paths {
        for (label, m) in [("int8_dense", Int8Matrix::Dense(dm)), ("int8_bitmask_70", Int8Matrix::Bitmask(sm))] {
            g.throughput(Throughput::Bytes(m.nbytes() as u64));
            g.bench_function(format!("{label}_{}", p.name()), |b| {
                b.iter(|| int8::matmul_on(p, &m, &x, 1, &mut y).unwrap())
            });
        }
    }
    drop(dense_codes);
    drop(sparse);
    let w: Vec<f32> = (0..rows * COLS).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    pages::prefer_huge_pages([bytemuck::cast_slice(&w[..])]);
    let fm = dense::DenseMatrix::new(&w, rows, COLS).unwrap();
    g.throughput(Throughput::Bytes((rows * COLS * 4) as u64));
    let mut seen = Vec::new();
    for &p in paths {
        let isa = float_isa(p);
        if isa == Isa::Scalar || seen.contains(&isa) {
            continue;
        }
        seen.push(isa);
        g.bench_function(format!("f32_dense_{}", isa.name()), |b| {
            b.iter(|| dense::matmul_on(isa, &fm, &x, 1, &mut y).unwrap())
        });
    }
    g.finish();
}

fn matmul(c: &mut Criterion, paths: &[Int8Isa]) {
    let (rows, cols) = (1536, 576);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let scales: Vec<f32> = (0..rows).map(|_| rng.random_range(0.001f32..0.01)).collect();
    let dc = codes(&mut rng, rows * cols, 0.0);
    let sc = BitmaskMatrix::from_dense(&codes(&mut rng, rows * cols, 0.7), rows, cols).unwrap();
    let dm = Int8Matrix::Dense(Int8Dense::new(&dc, &scales, rows, cols).unwrap());
    let sm = Int8Matrix::Bitmask(Int8Bitmask::new(sc.view(), &scales).unwrap());
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let w70: Vec<f32> = w.iter().map(|&v| if rng.random_bool(0.7) { 0.0 } else { v }).collect();
    let fm = dense::DenseMatrix::new(&w, rows, cols).unwrap();
    let fb = BitmaskMatrix::from_dense(&w70, rows, cols).unwrap();
    let fbv = fb.view();
    let mut g = c.benchmark_group("int8_matmul_up_1536x576");
    for n in [8usize, 32, 512] {
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut y = vec![0f32; n * rows];
        g.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
        let mut seen = Vec::new();
        for &p in paths {
            for (label, m) in [("int8_dense", &dm), ("int8_bitmask_70", &sm)] {
                g.bench_function(format!("{label}_{}_n{n}", p.name()), |b| {
                    b.iter(|| int8::matmul_on(p, m, &x, n, &mut y).unwrap())
                });
            }
            let isa = float_isa(p);
            if isa == Isa::Scalar || seen.contains(&isa) {
                continue;
            }
            seen.push(isa);
            g.bench_function(format!("f32_dense_{}_n{n}", isa.name()), |b| {
                b.iter(|| dense::matmul_on(isa, &fm, &x, n, &mut y).unwrap())
            });
            g.bench_function(format!("f32_bitmask_70_{}_n{n}", isa.name()), |b| {
                b.iter(|| bitmask::matmul_on(isa, &fbv, &x, n, &mut y).unwrap())
            });
        }
    }
    g.finish();
}

fn main() {
    let mut c = common::criterion(3, 10);
    eprintln!("{}", common::machine(true));
    // The SIMD paths only: the scalar reference is for tests.
    let paths: Vec<Int8Isa> = Int8Isa::available().into_iter().filter(|&p| p != Int8Isa::Scalar).collect();
    eprintln!("INT8 paths: {}", paths.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "));
    gemv(&mut c, &paths);
    matmul(&mut c, &paths);
    c.final_summary();
}
