//! SmoothQuant (Xiao et al. 2023) scales and the activation statistics behind them and behind
//! kurtosis-based layer skipping.
//!
//! A linear layer's input `X` and weight `W` are rescaled per input channel, `X' = X·diag(s)⁻¹`,
//! `W' = W·diag(s)`, which leaves `X'W'ᵀ = XWᵀ` unchanged; the division is folded into the
//! RMSNorm gain that produces `X`, so it costs nothing at run time and moves the activation
//! outliers (which per-token INT8 handles badly) into the weights (which per-channel INT8 handles
//! well). `s_j = max|X_j|^α / max|W_j|^(1−α)`, the weight maximum taken over every layer that
//! reads the same input, as llm-compressor's `SmoothQuantModifier`.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// llm-compressor's floor on weight maxima and on scales (`MINIMUM_SMOOTHING_SCALE`).
pub const MIN_SMOOTHING_SCALE: f64 = 1e-5;

/// Per-channel statistics of one activation over the calibration tokens: the absolute maximum
/// (for SmoothQuant) and the power sums `Σx, Σx², Σx³, Σx⁴` (for the kurtosis of the activation
/// after any per-channel rescaling, without a second pass).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActStats {
    pub tokens: u64,
    pub abs_max: Vec<f32>,
    pub sums: [Vec<f64>; 4],
}

impl ActStats {
    pub fn new(cols: usize) -> Self {
        ActStats { tokens: 0, abs_max: vec![0.0; cols], sums: std::array::from_fn(|_| vec![0.0; cols]) }
    }

    pub fn cols(&self) -> usize {
        self.abs_max.len()
    }

    /// Adds tokens `x` (row-major `[m, cols]`).
    pub fn add(&mut self, x: &[f32]) -> Result<()> {
        let cols = self.cols();
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(Error::Shape { what: "activation batch", expected: cols, got: x.len() });
        }
        crate::check_finite_f32("activation batch", x)?;
        for row in x.chunks_exact(cols) {
            for (j, &v) in row.iter().enumerate() {
                self.abs_max[j] = self.abs_max[j].max(v.abs());
                let v = v as f64;
                let v2 = v * v;
                self.sums[0][j] += v;
                self.sums[1][j] += v2;
                self.sums[2][j] += v2 * v;
                self.sums[3][j] += v2 * v2;
            }
        }
        self.tokens += (x.len() / cols) as u64;
        Ok(())
    }

    /// Pearson kurtosis `E[(x−μ)⁴] / E[(x−μ)²]²` of all the activation's values (every token and
    /// channel pooled; 3 for a Gaussian), after dividing channel `j` by `scales[j]` when given.
    /// 0 when there are no values or no variance.
    pub fn kurtosis(&self, scales: Option<&[f32]>) -> f64 {
        let n = self.tokens as f64 * self.cols() as f64;
        if n == 0.0 {
            return 0.0;
        }
        let mut e = [0.0f64; 4];
        for j in 0..self.cols() {
            let inv = 1.0 / scales.map_or(1.0, |s| s[j] as f64);
            let mut p = 1.0;
            for (k, ek) in e.iter_mut().enumerate() {
                p *= inv;
                *ek += self.sums[k][j] * p;
            }
        }
        let [m, e2, e3, e4] = e.map(|v| v / n);
        let var = e2 - m * m;
        let m4 = e4 - 4.0 * m * e3 + 6.0 * m * m * e2 - 3.0 * m * m * m * m;
        if var <= 0.0 { 0.0 } else { m4 / (var * var) }
    }
}

/// SmoothQuant scales for one input shared by `weights` (each row-major `[rows, cols]`, given with
/// its row count): `s_j = max|X_j|^α / max(max_r |W_rj|, 1e-5)^(1−α)`, floored at 1e-5.
/// `α = 0` disables smoothing (all scales 1), and so does a channel never seen non-zero (nothing
/// to migrate; llm-compressor would floor its scale at 1e-5 instead).
pub fn smoothing_scales(act_abs_max: &[f32], weights: &[(&[f32], usize)], alpha: f64) -> Result<Vec<f32>> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::Recipe(format!("smoothquantAlpha {alpha} is not in [0, 1]")));
    }
    let cols = act_abs_max.len();
    let mut wmax = vec![0.0f32; cols];
    for &(w, rows) in weights {
        if w.len() != rows * cols {
            return Err(Error::Shape { what: "smoothed weight", expected: rows * cols, got: w.len() });
        }
        for row in w.chunks_exact(cols.max(1)) {
            for (m, v) in wmax.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
    }
    Ok(act_abs_max
        .iter()
        .zip(&wmax)
        .map(|(&a, &w)| {
            if alpha == 0.0 || a == 0.0 {
                return 1.0;
            }
            let w = (w as f64).max(MIN_SMOOTHING_SCALE);
            let s = (a as f64).powf(alpha) / w.powf(1.0 - alpha);
            s.max(MIN_SMOOTHING_SCALE) as f32
        })
        .collect())
}

/// `W[:, j] *= s_j` in place (row-major `[rows, s.len()]`).
pub fn scale_columns(w: &mut [f32], s: &[f32]) {
    for row in w.chunks_exact_mut(s.len()) {
        for (v, &k) in row.iter_mut().zip(s) {
            *v *= k;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kurtosis_of_known_distributions() {
        // Two-point ±1: kurtosis 1. A single spike among zeros: kurtosis n (here 8).
        let mut a = ActStats::new(2);
        a.add(&[1.0, -1.0, -1.0, 1.0]).unwrap();
        assert!((a.kurtosis(None) - 1.0).abs() < 1e-12);
        let mut b = ActStats::new(4);
        b.add(&[0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]).unwrap();
        // Pooled values {5, 0×7}: μ = 5/8, E(x−μ)⁴ / Var² = (n² − 3n + 3)/(n − 1) for one spike.
        let n = 8.0;
        assert!((b.kurtosis(None) - (n * n - 3.0 * n + 3.0) / (n - 1.0)).abs() < 1e-9, "{}", b.kurtosis(None));
        // Dividing the spike's channel by 5 does not change a one-spike shape.
        assert!((b.kurtosis(Some(&[1.0, 1.0, 1.0, 5.0])) - b.kurtosis(None)).abs() < 1e-9);
    }

    #[test]
    fn scales_follow_the_formula() {
        let act = [4.0f32, 0.0, 1.0];
        let w1 = [0.5f32, 1.0, -2.0, 0.1, 0.0, 0.0];
        let w2 = [-1.0f32, 0.0, 0.5];
        let s = smoothing_scales(&act, &[(&w1, 2), (&w2, 1)], 0.5).unwrap();
        assert!((s[0] - (4.0f32.sqrt() / 1.0f32.sqrt())).abs() < 1e-6);
        assert_eq!(s[1], 1.0, "a dead channel is not smoothed");
        assert!((s[2] - 1.0 / 2.0f32.sqrt()).abs() < 1e-6);
        assert!(smoothing_scales(&act, &[(&w1, 2)], 1.5).is_err());
        assert!(smoothing_scales(&act, &[(&w1, 2)], 0.0).unwrap().iter().all(|&v| v == 1.0));
    }
}
