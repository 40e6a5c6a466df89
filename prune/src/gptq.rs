//! GPTQ (Frantar et al. 2023; reference `gptq.py` `fasterquant`, llm-compressor
//! `quantize_weight`) to per-output-channel symmetric INT8, as a second rule on the OBS engine
//! SparseGPT uses.

use std::time::Instant;

use faer::{Mat, MatRef};

use crate::hessian::{Hessian, reconstruction_error};
use crate::obs::{ObsRule, factor_inverse, obs_pass};
use crate::{Error, Result, check_layer};

/// Largest INT8 code magnitude: codes are symmetric in `-127..=127` (−128 is never produced).
pub const INT8_MAX: f32 = 127.0;

/// Settings of [`gptq`]; `Default` is the reference code's (blocksize 128, percdamp 0.01, no
/// activation order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// Columns per lazy-update block.
    pub blocksize: usize,
    /// Dampening added to the Hessian's diagonal, as a fraction of its mean diagonal.
    pub percdamp: f64,
    /// Times the dampening is multiplied by 10 when the Cholesky factorisation fails.
    pub max_damp_escalations: u32,
    /// Process columns in order of decreasing `H_jj` (the reference's `act_order`).
    pub actorder: bool,
    /// Keep the sparsity mask: weights that are exactly zero on entry receive no error
    /// compensation and stay exactly zero (llm-compressor's `preserve_zeros`).
    pub keep_zeros: bool,
    /// Also compute [`QuantReport::recon_error`].
    pub compute_error: bool,
}

impl Default for GptqConfig {
    fn default() -> Self {
        GptqConfig {
            blocksize: 128,
            percdamp: 0.01,
            max_damp_escalations: 4,
            actorder: false,
            keep_zeros: true,
            compute_error: false,
        }
    }
}

/// A layer in per-output-channel symmetric INT8: `w[r][c] ≈ codes[r·cols + c] · scales[r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Layer {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Int8Layer {
    /// The dequantized weights, `code as f32 · scale` (exactly what [`gptq`] leaves in `w`).
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes.iter().enumerate().map(|(i, &q)| q as f32 * self.scales[i / self.cols]).collect()
    }

    /// Recovers the codes from dequantized weights and their scales (exact: every value is
    /// `code · scale` rounded once to f32, and `|code| ≤ 127`). Fails on a value that is not.
    pub fn from_dequantized(w: &[f32], rows: usize, cols: usize, scales: &[f32]) -> Result<Self> {
        check_layer(w, rows, cols)?;
        if scales.len() != rows {
            return Err(Error::Shape { what: "weight_scale", expected: rows, got: scales.len() });
        }
        let mut codes = Vec::with_capacity(w.len());
        for (i, &v) in w.iter().enumerate() {
            let s = scales[i / cols];
            let q = (v / s).round_ties_even();
            if !(q.abs() <= INT8_MAX && q * s == v) {
                return Err(Error::Model(format!("weight {i} ({v}) is not an INT8 code times its row's scale {s}")));
            }
            codes.push(q as i8);
        }
        Ok(Int8Layer { rows, cols, codes, scales: scales.to_vec() })
    }
}

/// Per-row scale `max|w| / 127` (at least `f32::EPSILON`, compressed-tensors' floor).
pub fn channel_scales(w: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
    check_layer(w, rows, cols)?;
    Ok(w.chunks_exact(cols)
        .map(|row| (row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / INT8_MAX).max(f32::EPSILON))
        .collect())
}

/// `clamp(round(w / s), −127, 127)`, ties to even (as `torch.round` and `numpy.round`).
fn code(w: f64, s: f64) -> f64 {
    (w / s).round_ties_even().clamp(-(INT8_MAX as f64), INT8_MAX as f64)
}

/// Round-to-nearest INT8 with the same scales as [`gptq`] (no error compensation): the baseline
/// of the ablation. `w` is replaced by its dequantized values.
pub fn rtn(w: &mut [f32], rows: usize, cols: usize) -> Result<Int8Layer> {
    let scales = channel_scales(w, rows, cols)?;
    let mut codes = Vec::with_capacity(w.len());
    for (i, v) in w.iter_mut().enumerate() {
        let s = scales[i / cols];
        let q = code(*v as f64, s as f64);
        codes.push(q as i8);
        *v = (q * s as f64) as f32;
    }
    Ok(Int8Layer { rows, cols, codes, scales })
}

/// What [`gptq`] did to one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantReport {
    /// The dampening fraction (of mean diag H) the factorisation succeeded with.
    pub damp_used: f64,
    /// `½ Σ (w − q)² / U_cc²`, the OBS estimate of the added error.
    pub obs_loss: f64,
    /// Mean over calibration tokens of `‖(W − Ŵ) x‖²`, when computed.
    pub recon_error: Option<f64>,
    pub seconds: f64,
}

/// Quantizes `w` (row-major `[rows, cols]`) with GPTQ against the layer's input Hessian `h`,
/// replacing it by the dequantized weights, and returns the codes and scales.
///
/// As llm-compressor's `quantize_weight` for a channel-wise symmetric scheme: the scales are
/// fixed first from the weights as given (`max|w_r| / 127`); then dead inputs (`H_jj == 0`) get
/// `H_jj = 1` and their weights zeroed; with `actorder` the columns are permuted by decreasing
/// `H_jj`; `percdamp · mean(diag H)` is added to the diagonal (escalated like SparseGPT's);
/// each column is quantized to `clamp(round(w / s), −127, 127) · s` when the pass reaches it and
/// its error spread over the later columns by the OBS updates. With `keep_zeros` the weights
/// that are zero on entry get no updates, so they are quantized to code 0 and the mask is kept
/// exactly.
pub fn gptq(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    h: &Hessian,
    cfg: &GptqConfig,
) -> Result<(Int8Layer, QuantReport)> {
    let start = Instant::now();
    check_layer(w, rows, cols)?;
    if cfg.blocksize == 0 {
        return Err(Error::BlockSize);
    }
    if !cfg.percdamp.is_finite() || cfg.percdamp < 0.0 {
        return Err(Error::Damp(cfg.percdamp));
    }
    if h.cols() != cols {
        return Err(Error::HessianCols { hessian: h.cols(), layer: cols });
    }
    if h.tokens() == 0 {
        return Err(Error::EmptyHessian);
    }
    let original = cfg.compute_error.then(|| w.to_vec());
    let scales = channel_scales(w, rows, cols)?;

    let mut hm = h.lower().to_owned();
    for j in 0..cols {
        if hm[(j, j)] == 0.0 {
            hm[(j, j)] = 1.0;
            for r in 0..rows {
                w[r * cols + j] = 0.0;
            }
        }
    }
    // Pass order: position p of the pass processes input perm[p].
    let mut perm: Vec<usize> = (0..cols).collect();
    if cfg.actorder {
        // Stable: equal diagonals keep their input order.
        perm.sort_by(|&a, &b| hm[(b, b)].total_cmp(&hm[(a, a)]));
        let full = |i: usize, j: usize| if i >= j { hm[(i, j)] } else { hm[(j, i)] };
        hm = Mat::from_fn(cols, cols, |i, j| if i >= j { full(perm[i], perm[j]) } else { 0.0 });
    }
    let (l, damp_used) = factor_inverse(&hm, cfg.percdamp, cfg.max_damp_escalations, "GPTQ")?;
    drop(hm);

    let mut wm = Mat::from_fn(rows, cols, |r, p| w[r * cols + perm[p]] as f64);
    let keep = cfg.keep_zeros.then(|| {
        let mut k = vec![true; rows * cols];
        for p in 0..cols {
            for r in 0..rows {
                k[p * rows + r] = wm[(r, p)] != 0.0;
            }
        }
        k
    });
    let mut rule = QuantRule { rows, perm: &perm, scales: &scales, keep, codes: vec![0i8; rows * cols], cols };
    let obs_loss = obs_pass(&mut wm, &l, cfg.blocksize, &mut rule);
    let codes = rule.codes;

    for r in 0..rows {
        for (p, &c) in perm.iter().enumerate() {
            w[r * cols + c] = wm[(r, p)] as f32;
        }
    }
    let layer = Int8Layer { rows, cols, codes, scales };
    let recon_error = match original {
        Some(orig) => Some(reconstruction_error(&orig, w, rows, cols, h)?),
        None => None,
    };
    let report =
        QuantReport { damp_used, obs_loss: obs_loss / 2.0, recon_error, seconds: start.elapsed().as_secs_f64() };
    Ok((layer, report))
}

/// GPTQ's rule on the OBS engine: a column becomes its INT8 rounding with the row's fixed scale.
struct QuantRule<'a> {
    rows: usize,
    cols: usize,
    perm: &'a [usize],
    scales: &'a [f32],
    /// Column-major in pass order: weights that are updated and quantized (the rest stay 0).
    keep: Option<Vec<bool>>,
    /// Row-major in input order.
    codes: Vec<i8>,
}

impl ObsRule for QuantRule<'_> {
    fn begin_block(&mut self, _: usize, _: usize, _: usize, _: MatRef<'_, f64>, _: MatRef<'_, f64>) {}

    fn column(&mut self, i1: usize, i: usize, wm: MatRef<'_, f64>, _: MatRef<'_, f64>, q: &mut [f64]) {
        let p = i1 + i;
        let c = self.perm[p];
        for (r, qr) in q.iter_mut().enumerate() {
            let kept = self.keep.as_ref().is_none_or(|k| k[p * self.rows + r]);
            let s = self.scales[r] as f64;
            let k = if kept { code(wm[(r, p)], s) } else { 0.0 };
            self.codes[r * self.cols + c] = k as i8;
            *qr = k * s;
        }
    }

    fn compensated(&self) -> Option<&[bool]> {
        self.keep.as_deref()
    }
}
