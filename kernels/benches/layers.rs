//! One decode step's weight products on a SmolLM2-135M-shaped stack (30 layers of q/k/v, o,
//! gate/up, down; the 49152 × 576 LM head), grouped as the runtime groups them
//! (`matmul_many`), one activation row: dense f32 against bitmask f32 at 50 % and 70 %
//! sparsity. Unlike the `gemv` bench's one large matrix, this is what decoding streams: hundreds
//! of small matrices (0.1–3.5 MB) with a parallel region each. Throughput counts the bytes a
//! step reads (bitmask + packed values for sparse), to compare with the read bandwidth printed
//! first, and `sparse ÷ dense` time with the byte ratio.
//!
//! `cargo bench -p lacuna-kernels --bench layers`.

mod common;

use criterion::Throughput;
use lacuna_kernels::bitmask::BitmaskMatrix;
use lacuna_kernels::dense::DenseMatrix;
use lacuna_kernels::matrix::{Matrix, Product, Scratch, matmul_many};
use lacuna_kernels::pages;
use rand::{Rng, SeedableRng};

const LAYERS: usize = 30;
const HIDDEN: usize = 576;
const KV: usize = 192;
const FFN: usize = 1536;
const VOCAB: usize = 49152;
/// Shapes of a layer's products in runtime order, grouped by the activations they read.
const GROUPS: [&[(usize, usize)]; 4] = [
    &[(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN)],
    &[(HIDDEN, HIDDEN)],
    &[(FFN, HIDDEN), (FFN, HIDDEN)],
    &[(HIDDEN, FFN)],
];

enum Stored {
    Dense(Vec<f32>, usize, usize),
    Bitmask(BitmaskMatrix<f32>),
}

impl Stored {
    fn matrix(&self) -> Matrix<'_> {
        match self {
            Stored::Dense(w, r, c) => Matrix::F32(DenseMatrix::new(w, *r, *c).unwrap()),
            Stored::Bitmask(m) => Matrix::BitmaskF32(m.view()),
        }
    }
}

fn weights(rng: &mut rand_chacha::ChaCha8Rng, rows: usize, cols: usize, sparsity: f64) -> Vec<f32> {
    (0..rows * cols).map(|_| if rng.random_bool(sparsity) { 0.0 } else { rng.random_range(0.01f32..1.0) }).collect()
}

/// The stack's matrices in step order (layers' groups, then the head, which stays dense).
fn stack(sparsity: f64) -> Vec<Vec<Stored>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut groups = Vec::new();
    for _ in 0..LAYERS {
        for g in GROUPS {
            groups.push(
                g.iter()
                    .map(|&(r, c)| {
                        let w = weights(&mut rng, r, c, sparsity);
                        if sparsity == 0.0 {
                            Stored::Dense(w, r, c)
                        } else {
                            Stored::Bitmask(BitmaskMatrix::from_dense(&w, r, c).unwrap())
                        }
                    })
                    .collect(),
            );
        }
    }
    groups.push(vec![Stored::Dense(weights(&mut rng, VOCAB, HIDDEN, 0.0), VOCAB, HIDDEN)]);
    groups
}

fn main() {
    let mut c = common::criterion(4, 20);
    eprintln!("{}", common::machine(true));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..FFN).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    // Every model's matrices live at once, as in `lacuna bench`: together they exceed any cache.
    let models: Vec<(String, Vec<Vec<Stored>>)> =
        [(0.0, "dense_f32"), (0.5, "bitmask_f32_50"), (0.7, "bitmask_f32_70")]
            .map(|(s, l)| (l.to_owned(), stack(s)))
            .into();
    let mut y = vec![0f32; VOCAB];
    let mut scratch = Scratch::new();
    for (label, groups) in &models {
        let mats: Vec<Vec<Matrix>> = groups.iter().map(|g| g.iter().map(Stored::matrix).collect()).collect();
        pages::prefer_huge_pages(mats.iter().flatten().flat_map(|m| m.buffers()));
        let bytes: usize = mats.iter().flatten().flat_map(|m| m.buffers()).map(|b| b.len()).sum();
        let mut g = c.benchmark_group("decode_step");
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(label, |b| {
            b.iter(|| {
                for group in &mats {
                    let mut outs: Vec<&mut [f32]> = Vec::with_capacity(group.len());
                    let mut rest = y.as_mut_slice();
                    for m in group {
                        let (a, tail) = rest.split_at_mut(m.rows());
                        outs.push(a);
                        rest = tail;
                    }
                    let mut products: Vec<Product> =
                        group.iter().zip(outs).map(|(w, y)| Product { w: *w, y }).collect();
                    matmul_many(&mut products, &x[..group[0].cols()], 1, &mut scratch).unwrap();
                }
            })
        });
        g.finish();
    }
    c.final_summary();
}
