//! One handle over every stored weight format, and products that share one input computed in
//! one parallel region.
//!
//! Decoding runs seven products per layer; run one at a time, the threads meet at the end of
//! each (q, then k, then v …) and the slower one's tail idles the other. [`matmul_many`] runs
//! the products that read the same activations (q/k/v; gate/up) as one set of row-range tasks
//! on the decode [`Team`], so there is one region per group instead of one per product, and
//! tasks are claimed one by one, so a thread that loses its core stalls nobody.
//!
//! An INT8 weight ([`Matrix::Int8`]) is a W8A8 product: its input is quantized per token
//! ([`int8::QuantizedActs`]) and the product runs on the INT8 kernels. A group quantizes its
//! shared input once, whatever number of INT8 products it holds, and runs their rows in the
//! same region as its float ones.

use half::{bf16, f16};

use crate::bitmask::{self, BitmaskView};
use crate::cpu::{self, Int8Isa, Isa};
use crate::dense::{self, DenseMatrix};
use crate::int8::{self, Int8Matrix, QuantizedActs};
use crate::team::Team;
use crate::{KernelError, Result};

/// A borrowed weight matrix in any stored format.
#[derive(Clone, Copy, Debug)]
pub enum Matrix<'a> {
    F32(DenseMatrix<'a, f32>),
    F16(DenseMatrix<'a, f16>),
    Bf16(DenseMatrix<'a, bf16>),
    BitmaskF32(BitmaskView<'a, f32>),
    BitmaskBf16(BitmaskView<'a, bf16>),
    /// INT8 codes with a scale per row (dense or bitmask), multiplied with per-token INT8
    /// activations (W8A8): products quantize their f32 input first.
    Int8(Int8Matrix<'a>),
}

impl<'a> Matrix<'a> {
    /// The stored buffers' bytes (one for a dense float matrix; mask, values and offsets for a
    /// bitmask one; codes and scales, and the mask and offsets of a bitmask one, for INT8), for
    /// memory advice such as [`crate::pages::prefer_huge_pages`].
    pub fn buffers(&self) -> [&'a [u8]; 4] {
        fn b<T: bytemuck::Pod>(v: &[T]) -> &[u8] {
            bytemuck::cast_slice(v)
        }
        match self {
            Matrix::F32(m) => [b(m.data()), &[], &[], &[]],
            Matrix::F16(m) => [b(m.data()), &[], &[], &[]],
            Matrix::Bf16(m) => [b(m.data()), &[], &[], &[]],
            Matrix::BitmaskF32(m) => [m.bitmask(), b(m.values()), b(m.row_offsets()), &[]],
            Matrix::BitmaskBf16(m) => [m.bitmask(), b(m.values()), b(m.row_offsets()), &[]],
            Matrix::Int8(Int8Matrix::Dense(m)) => [b(m.codes()), b(m.scales()), &[], &[]],
            Matrix::Int8(Int8Matrix::Bitmask(m)) => {
                let v = m.codes();
                [v.bitmask(), b(v.values()), b(v.row_offsets()), b(m.scales())]
            }
        }
    }

    /// Whether products with this matrix quantize their input to INT8 first.
    pub fn is_int8(&self) -> bool {
        matches!(self, Matrix::Int8(_))
    }
}

impl Matrix<'_> {
    pub fn rows(&self) -> usize {
        match self {
            Matrix::F32(m) => m.rows(),
            Matrix::F16(m) => m.rows(),
            Matrix::Bf16(m) => m.rows(),
            Matrix::BitmaskF32(m) => m.rows(),
            Matrix::BitmaskBf16(m) => m.rows(),
            Matrix::Int8(m) => m.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Matrix::F32(m) => m.cols(),
            Matrix::F16(m) => m.cols(),
            Matrix::Bf16(m) => m.cols(),
            Matrix::BitmaskF32(m) => m.cols(),
            Matrix::BitmaskBf16(m) => m.cols(),
            Matrix::Int8(m) => m.cols(),
        }
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ` on the process's kernel paths (an INT8 matrix quantizes
    /// `x` per token first).
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        self.matmul_on(cpu::isa(), cpu::int8_isa(), x, n, y)
    }

    /// [`Matrix::matmul`] on explicit paths: float formats on `isa`, INT8 on `int8`.
    pub fn matmul_on(&self, isa: Isa, int8: Int8Isa, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        match self {
            Matrix::F32(m) => dense::matmul_on(isa, m, x, n, y),
            Matrix::F16(m) => dense::matmul_on(isa, m, x, n, y),
            Matrix::Bf16(m) => dense::matmul_on(isa, m, x, n, y),
            Matrix::BitmaskF32(m) => bitmask::matmul_on(isa, m, x, n, y),
            Matrix::BitmaskBf16(m) => bitmask::matmul_on(isa, m, x, n, y),
            Matrix::Int8(m) => int8::matmul_on(int8, m, x, n, y),
        }
    }

    /// Rows `r0 .. r0 + out.len() / n` into `out` (`[rows, n]`) on this thread; an INT8 matrix
    /// reads `acts` (the group's input, quantized), the others `x`.
    #[allow(clippy::too_many_arguments)]
    fn rows_into(
        &self,
        isa: Isa,
        int8_isa: Int8Isa,
        x: &[f32],
        acts: &QuantizedActs,
        n: usize,
        r0: usize,
        out: &mut [f32],
    ) {
        match self {
            Matrix::F32(m) => dense::rows_into(isa, m, x, n, r0, out),
            Matrix::F16(m) => dense::rows_into(isa, m, x, n, r0, out),
            Matrix::Bf16(m) => dense::rows_into(isa, m, x, n, r0, out),
            Matrix::BitmaskF32(m) => bitmask::rows_into(isa, m, x, n, r0, out),
            Matrix::BitmaskBf16(m) => bitmask::rows_into(isa, m, x, n, r0, out),
            Matrix::Int8(m) => int8::rows_into(int8_isa, m, acts, r0, out),
        }
    }
}

/// What a [`matmul_many`] caller keeps between calls so that a group allocates nothing once the
/// buffers have grown: the transposed outputs of a batched group and the quantized input of its
/// INT8 products.
#[derive(Clone, Debug, Default)]
pub struct Scratch {
    yt: Vec<f32>,
    acts: QuantizedActs,
}

impl Scratch {
    pub fn new() -> Self {
        Self::default()
    }
    /// Room for `outputs` transposed output values up front.
    pub fn with_capacity(outputs: usize) -> Self {
        Self { yt: Vec::with_capacity(outputs), acts: QuantizedActs::new() }
    }
}

/// One product of a [`matmul_many`] group: `y[n, rows] = x · wᵀ`.
pub struct Product<'w, 'y> {
    pub w: Matrix<'w>,
    pub y: &'y mut [f32],
}

/// Every product of `group` over the same activations `x` (`[n, cols]`), in one parallel
/// region. `scratch` holds the transposed outputs when `n > 1` and the quantized input of INT8
/// products; it grows once and is reused, so a caller that keeps it allocates nothing per call.
/// Beyond 8 activation rows (prefill) the products are compute-bound and run one after another,
/// each on every thread (INT8 ones still on the input quantized once).
pub fn matmul_many(group: &mut [Product<'_, '_>], x: &[f32], n: usize, scratch: &mut Scratch) -> Result<()> {
    matmul_many_on(cpu::isa(), cpu::int8_isa(), group, x, n, scratch)
}

/// [`matmul_many`] on explicit paths: float formats on `isa`, INT8 ones on `int8_isa`.
pub fn matmul_many_on(
    isa: Isa,
    int8_isa: Int8Isa,
    group: &mut [Product<'_, '_>],
    x: &[f32],
    n: usize,
    scratch: &mut Scratch,
) -> Result<()> {
    for p in group.iter() {
        dense::check_product(isa, p.w.rows(), p.w.cols(), n, x, p.y)
            .map_err(|e| KernelError::Shape(format!("product of a group: {e}")))?;
    }
    if n == 0 || group.is_empty() {
        return Ok(());
    }
    let Scratch { yt: scratch, acts } = scratch;
    if let Some(p) = group.iter().find(|p| p.w.is_int8()) {
        if !int8_isa.supported() {
            return Err(KernelError::Unsupported(format!("the {} INT8 kernels on this CPU", int8_isa.name())));
        }
        // Every product has `x.len() / n` columns (checked above): one quantization serves all.
        acts.quantize(x, n, p.w.cols())?;
    }
    if n > dense::GEMV_MAX_N {
        for p in group.iter_mut() {
            match &p.w {
                Matrix::Int8(w) => int8::matmul_quantized_on(int8_isa, w, acts, p.y)?,
                w => w.matmul_on(isa, int8_isa, x, n, p.y)?,
            }
        }
        return Ok(());
    }
    if group.len() > MAX_GROUP {
        return Err(KernelError::Shape(format!("a group holds at most {MAX_GROUP} products, got {}", group.len())));
    }
    let total: usize = group.iter().map(|p| p.w.rows() * n).sum();
    if n > 1 && scratch.len() < total {
        scratch.resize(total, 0.0);
    }
    let acts = &*acts;
    // Each product's output (transposed `[rows, n]` in `scratch` when n > 1) and where its rows
    // start among the group's rows.
    let mut parts = [None; MAX_GROUP];
    let mut bounds = [0usize; MAX_GROUP];
    let (mut units, mut offset) = (0, 0);
    for ((slot, bound), p) in parts.iter_mut().zip(bounds.iter_mut()).zip(group.iter_mut()) {
        let rows = p.w.rows();
        let out = if n == 1 { p.y.as_mut_ptr() } else { scratch[offset..].as_mut_ptr() };
        offset += rows * n;
        *slot = Some(Part { w: p.w, out: OutPtr(out), first: units });
        units += rows;
        *bound = units;
    }
    let parts = &parts[..group.len()];
    Team::global().run_ranges(units, &bounds[..group.len()], MIN_ROWS, &|range: std::ops::Range<usize>| {
        // The product holding this range (ranges never cross a product boundary).
        let Some(part) = parts.iter().flatten().rev().find(|p| p.first <= range.start) else { return };
        let (r0, r1) = (range.start - part.first, range.end - part.first);
        // SAFETY: `out` addresses `rows · n` floats (a checked output, or its share of `scratch`,
        // which was sized to the total); this range alone writes rows r0..r1 of this product; the
        // buffers outlive `run_ranges`, which returns only after every range finished.
        let out = unsafe { std::slice::from_raw_parts_mut(part.out.0.add(r0 * n), (r1 - r0) * n) };
        part.w.rows_into(isa, int8_isa, x, acts, n, r0, out);
    });
    if n > 1 {
        let mut rest = &scratch[..total];
        for p in group.iter_mut() {
            let (yt, tail) = rest.split_at(p.w.rows() * n);
            dense::scatter_transposed(yt, n, p.w.rows(), p.y);
            rest = tail;
        }
    }
    Ok(())
}

/// Products per [`matmul_many`] group (q/k/v is the largest Llama needs).
pub const MAX_GROUP: usize = 4;
const _: () = assert!(MAX_GROUP <= crate::team::MAX_PARTS);

/// The smallest range of rows a thread claims: the team hands out shrinking shares of what is
/// left (long contiguous streams first, a short tail last), down to this.
const MIN_ROWS: usize = 8;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint row ranges through it (see `matmul_many_on`).
unsafe impl Sync for OutPtr {}
// SAFETY: as above.
unsafe impl Send for OutPtr {}

#[derive(Clone, Copy)]
struct Part<'w> {
    w: Matrix<'w>,
    out: OutPtr,
    first: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmask::BitmaskMatrix;
    use rand::{Rng, SeedableRng};

    #[test]
    fn a_group_equals_its_products_one_by_one_on_every_path() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let cols = 65;
        let mk = |rng: &mut rand_chacha::ChaCha8Rng, rows: usize, s: f64| -> Vec<f32> {
            (0..rows * cols).map(|_| if rng.random_bool(s) { 0.0 } else { rng.random_range(-1.0f32..1.0) }).collect()
        };
        let (a, b, c) = (mk(&mut rng, 40, 0.0), mk(&mut rng, 17, 0.7), mk(&mut rng, 9, 0.5));
        let bm = BitmaskMatrix::from_dense(&b, 17, cols).unwrap();
        let cb: Vec<bf16> = c.iter().map(|&v| bf16::from_f32(v)).collect();
        let cm = BitmaskMatrix::from_dense(&cb, 9, cols).unwrap();
        let mats = [
            Matrix::F32(DenseMatrix::new(&a, 40, cols).unwrap()),
            Matrix::BitmaskF32(bm.view()),
            Matrix::BitmaskBf16(cm.view()),
        ];
        let mut scratch = Scratch::new();
        for isa in Isa::available() {
            for n in [1usize, 3, 8, 12] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let mut ys: Vec<Vec<f32>> = mats.iter().map(|m| vec![f32::NAN; n * m.rows()]).collect();
                let mut group: Vec<Product> =
                    mats.iter().zip(ys.iter_mut()).map(|(w, y)| Product { w: *w, y: y.as_mut_slice() }).collect();
                matmul_many_on(isa, Int8Isa::Scalar, &mut group, &x, n, &mut scratch).unwrap();
                for (m, y) in mats.iter().zip(&ys) {
                    let mut want = vec![0f32; n * m.rows()];
                    m.matmul_on(Isa::Scalar, Int8Isa::Scalar, &x, n, &mut want).unwrap();
                    for (g, w) in y.iter().zip(&want) {
                        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{isa:?} n={n}: {g} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_wrong_output_size_is_an_error_naming_it() {
        let w = vec![1f32; 6];
        let x = vec![1f32; 3];
        let mut y = vec![0f32; 3];
        let mut group = [Product { w: Matrix::F32(DenseMatrix::new(&w, 2, 3).unwrap()), y: &mut y }];
        let e = matmul_many(&mut group, &x, 1, &mut Scratch::new()).unwrap_err().to_string();
        assert!(e.contains("output"), "{e}");
    }

    /// INT8 codes `[rows, cols]` over the whole −128..=127 with about `zeros` of them zero.
    fn codes(rng: &mut rand_chacha::ChaCha8Rng, rows: usize, cols: usize, zeros: f64) -> Vec<i8> {
        (0..rows * cols).map(|_| if rng.random_bool(zeros) { 0 } else { rng.random::<i8>() }).collect()
    }

    #[test]
    fn a_group_mixing_int8_and_float_products_equals_them_one_by_one_on_every_path() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
        let cols = 129;
        let (rd, rb, rf) = (40, 23, 17);
        let dc = codes(&mut rng, rd, cols, 0.0);
        let bc = codes(&mut rng, rb, cols, 0.7);
        let ds: Vec<f32> = (0..rd).map(|_| rng.random_range(0.001f32..0.05)).collect();
        let bs: Vec<f32> = (0..rb).map(|_| rng.random_range(0.001f32..0.05)).collect();
        let bm = BitmaskMatrix::from_dense(&bc, rb, cols).unwrap();
        let f: Vec<f32> = (0..rf * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        // The float product between the INT8 ones: its rows share the region with theirs.
        let mats = [
            Matrix::Int8(Int8Matrix::Dense(int8::Int8Dense::new(&dc, &ds, rd, cols).unwrap())),
            Matrix::F32(DenseMatrix::new(&f, rf, cols).unwrap()),
            Matrix::Int8(Int8Matrix::Bitmask(int8::Int8Bitmask::new(bm.view(), &bs).unwrap())),
        ];
        let mut scratch = Scratch::new();
        for isa in Isa::available() {
            for i8isa in Int8Isa::available() {
                for n in [1usize, 3, 8, 12, 40] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                    let mut ys: Vec<Vec<f32>> = mats.iter().map(|m| vec![f32::NAN; n * m.rows()]).collect();
                    let mut group: Vec<Product> =
                        mats.iter().zip(ys.iter_mut()).map(|(w, y)| Product { w: *w, y: y.as_mut_slice() }).collect();
                    matmul_many_on(isa, i8isa, &mut group, &x, n, &mut scratch).unwrap();
                    for (m, y) in mats.iter().zip(&ys) {
                        let mut want = vec![0f32; n * m.rows()];
                        m.matmul_on(Isa::Scalar, Int8Isa::Scalar, &x, n, &mut want).unwrap();
                        if m.is_int8() {
                            // Integer sums and one shared dequantize: the same bits on every path.
                            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                            assert_eq!(bits(y), bits(&want), "{isa:?} {i8isa:?} n={n}");
                        } else {
                            for (g, w) in y.iter().zip(&want) {
                                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{isa:?} n={n}: {g} vs {w}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_int8_group_reports_non_finite_activations() {
        let w = vec![1i8; 6];
        let s = [0.5f32; 2];
        let mut y = vec![0f32; 2];
        let mut group =
            [Product { w: Matrix::Int8(Int8Matrix::Dense(int8::Int8Dense::new(&w, &s, 2, 3).unwrap())), y: &mut y }];
        let e = matmul_many(&mut group, &[1.0, f32::NAN, 0.0], 1, &mut Scratch::new()).unwrap_err().to_string();
        assert!(e.contains("NaN"), "{e}");
    }
}
