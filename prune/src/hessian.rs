//! Calibration statistics of one layer's inputs.

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};

use crate::{Error, Result, check_finite_f32, check_layer};

/// Running `H = 2/n · Σ_t x_t x_tᵀ` over the `n` calibration tokens seen so far (`x_t` one row of
/// the layer's input), plus the exact per-input squared norms `‖X_j‖² = Σ_t x_tj²`.
///
/// Each batch updates `H ← H·n/(n+m) + 2/(n+m) · XᵀX`, the update of the SparseGPT reference
/// (`H *= n/(n+m); x *= sqrt(2/(n+m)); H += x xᵀ`) with the scaling applied after the product
/// instead of before (one rounding fewer). Unlike the reference, `n` counts tokens, not
/// sequences: the two differ by a constant factor, to which SparseGPT, Wanda and OWL are all
/// invariant.
///
/// Precision: each batch's `XᵀX` is an f32 product (the activations are f32 anyway; a batch sums
/// at most a few thousand terms, relative error ~1e-6), while `H` itself is kept in f64 because it
/// is rescaled and summed over hundreds of batches, which in f32 drifts by ~1e-5 relative and
/// would then be amplified by the Cholesky factorisation of a badly conditioned matrix.
///
/// Only the lower triangle is computed and stored (`H` is symmetric): half the flops.
pub struct Hessian {
    cols: usize,
    tokens: u64,
    /// Lower triangle valid, column-major `cols × cols`.
    h: Mat<f64>,
    sq_norms: Vec<f64>,
    /// Reused `XᵀX` buffer (lower triangle).
    gram: Mat<f32>,
}

impl std::fmt::Debug for Hessian {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hessian").field("cols", &self.cols).field("tokens", &self.tokens).finish()
    }
}

impl Hessian {
    /// An empty accumulator for a layer with `cols` inputs.
    pub fn new(cols: usize) -> Self {
        Hessian { cols, tokens: 0, h: Mat::zeros(cols, cols), sq_norms: vec![0.0; cols], gram: Mat::zeros(0, 0) }
    }

    /// A Hessian from a saved dense matrix (row-major `cols × cols`, symmetric; only its lower
    /// triangle is read) that stands for `tokens` tokens. The squared norms are recovered from
    /// the diagonal as `n/2 · H_jj`.
    pub fn from_dense(cols: usize, tokens: u64, h: &[f64]) -> Result<Self> {
        let expected = cols.saturating_mul(cols);
        if h.len() != expected {
            return Err(Error::Shape { what: "Hessian matrix", expected, got: h.len() });
        }
        crate::check_finite_f64("Hessian matrix", h)?;
        let m = Mat::from_fn(cols, cols, |i, j| if i >= j { h[i * cols + j] } else { 0.0 });
        let sq_norms = (0..cols).map(|j| m[(j, j)] * tokens as f64 / 2.0).collect();
        Ok(Hessian { cols, tokens, h: m, sq_norms, gram: Mat::zeros(0, 0) })
    }

    /// Adds a batch of `m` tokens, `x` row-major `[m, cols]`.
    pub fn add_batch(&mut self, x: &[f32], m: usize) -> Result<()> {
        let expected = m.saturating_mul(self.cols);
        if x.len() != expected {
            return Err(Error::Shape { what: "calibration batch", expected, got: x.len() });
        }
        if m == 0 {
            return Ok(());
        }
        check_finite_f32("calibration batch", x)?;
        let cols = self.cols;
        if self.gram.nrows() != cols {
            self.gram = Mat::zeros(cols, cols);
        }
        // Row-major [m, cols] is column-major [cols, m], i.e. Xᵀ.
        let xt = MatRef::from_column_major_slice(x, cols, m);
        triangular::matmul(
            self.gram.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Replace,
            xt,
            BlockStructure::Rectangular,
            xt.transpose(),
            BlockStructure::Rectangular,
            1.0f32,
            Par::rayon(0),
        );
        let n = self.tokens as f64;
        let total = n + m as f64;
        let keep = n / total;
        let add = 2.0 / total;
        for j in 0..cols {
            let hcol = self.h.col_as_slice_mut(j);
            let gcol = self.gram.col_as_slice(j);
            for i in j..cols {
                hcol[i] = hcol[i] * keep + add * gcol[i] as f64;
            }
        }
        // The norms are summed from the data itself in f64 (cheap next to the product), so
        // Wanda's scores do not inherit the f32 rounding of the Gram matrix.
        for row in x.chunks_exact(cols) {
            for (s, &v) in self.sq_norms.iter_mut().zip(row) {
                *s += v as f64 * v as f64;
            }
        }
        self.tokens += m as u64;
        Ok(())
    }

    /// The statistics of the inputs divided per channel by `s` (`x'_j = x_j / s_j`, SmoothQuant):
    /// `H'_ij = H_ij / (s_i s_j)`, `‖X'_j‖² = ‖X_j‖² / s_j²`, without another calibration pass.
    pub fn divide_inputs(&mut self, s: &[f32]) -> Result<()> {
        if s.len() != self.cols {
            return Err(Error::Shape { what: "input scales", expected: self.cols, got: s.len() });
        }
        crate::check_finite_f32("input scales", s)?;
        if let Some(j) = s.iter().position(|&v| v <= 0.0) {
            return Err(Error::NonFinite { what: "input scales (must be > 0)", index: j });
        }
        for j in 0..self.cols {
            let sj = s[j] as f64;
            let hcol = self.h.col_as_slice_mut(j);
            for i in j..self.cols {
                hcol[i] /= s[i] as f64 * sj;
            }
            self.sq_norms[j] /= sj * sj;
        }
        Ok(())
    }

    /// Number of inputs (the layer's columns).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Calibration tokens seen.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// `H_ij` (symmetric). Panics if `i` or `j` is not below [`Hessian::cols`], like slice indexing.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        if i >= j { self.h[(i, j)] } else { self.h[(j, i)] }
    }

    /// The full symmetric matrix, row-major `cols × cols`.
    pub fn to_dense(&self) -> Vec<f64> {
        let c = self.cols;
        let mut out = vec![0.0; c * c];
        for i in 0..c {
            for j in 0..c {
                out[i * c + j] = self.get(i, j);
            }
        }
        out
    }

    /// Per-input squared norms `‖X_j‖² = Σ_t x_tj²` over all tokens, summed in f64 directly from
    /// the data. Equal to `n/2 · H_jj` up to rounding. Wanda's reference keeps
    /// `scaler_row = Σ x² / nsamples` (sequences); the constant factor does not change its
    /// per-row ranking nor OWL's outlier ratios.
    pub fn col_sq_norms(&self) -> &[f64] {
        &self.sq_norms
    }

    /// The lower triangle (column-major faer matrix) for the algorithms.
    pub(crate) fn lower(&self) -> MatRef<'_, f64> {
        self.h.as_ref()
    }
}

/// Mean over calibration tokens of the squared output error, `‖(W − Ŵ) Xᵀ‖²_F / n`, computed
/// from the Hessian as `½ Σ_r δ_r H δ_rᵀ` with `δ = W − Ŵ` (exact since `H = 2/n · XᵀX`).
pub fn reconstruction_error(original: &[f32], pruned: &[f32], rows: usize, cols: usize, h: &Hessian) -> Result<f64> {
    check_layer(original, rows, cols)?;
    check_layer(pruned, rows, cols)?;
    if h.cols != cols {
        return Err(Error::HessianCols { hessian: h.cols, layer: cols });
    }
    // Column-major rows × cols.
    let delta = Mat::from_fn(rows, cols, |r, c| original[r * cols + c] as f64 - pruned[r * cols + c] as f64);
    let full = Mat::from_fn(cols, cols, |i, j| h.get(i, j));
    let mut dh = Mat::<f64>::zeros(rows, cols);
    faer::linalg::matmul::matmul(dh.as_mut(), Accum::Replace, delta.as_ref(), full.as_ref(), 1.0, Par::rayon(0));
    let mut total = 0.0;
    for c in 0..cols {
        let a = delta.col_as_slice(c);
        let b = dh.col_as_slice(c);
        total += a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    }
    Ok(total / 2.0)
}
