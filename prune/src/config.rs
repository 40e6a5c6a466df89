//! Pruning targets, algorithm settings and the per-layer report.

use crate::{Error, Result};

/// Which weights a pass must zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// Unstructured: the given fraction of weights (per row for Wanda and row-scoped SparseGPT,
    /// per column block for block-scoped SparseGPT, per layer for magnitude), exactly
    /// `round(sparsity · count)` of them.
    Unstructured(f64),
    /// N:M semi-structured: `n` weights pruned in every group of `m` consecutive inputs of a row,
    /// following the reference code's `prunen`/`prunem` (2:4 prunes 2 of every 4).
    NM { n: usize, m: usize },
}

impl Pattern {
    /// The fraction of weights this pattern prunes.
    pub fn sparsity(&self) -> f64 {
        match *self {
            Pattern::Unstructured(s) => s,
            Pattern::NM { n, m } => n as f64 / m as f64,
        }
    }

    pub(crate) fn validate(&self, cols: usize) -> Result<()> {
        match *self {
            Pattern::Unstructured(s) => {
                if !(0.0..1.0).contains(&s) {
                    return Err(Error::Sparsity(s));
                }
            }
            Pattern::NM { n, m } => {
                if n == 0 || n >= m {
                    return Err(Error::NmPattern { n, m });
                }
                if !cols.is_multiple_of(m) {
                    return Err(Error::NmIndivisible { m, what: "the layer's column count", len: cols });
                }
            }
        }
        Ok(())
    }
}

/// Settings of [`crate::wanda`] and [`crate::magnitude`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneConfig {
    pub pattern: Pattern,
    /// Iterative mode: weights that are already exactly zero stay zero and count as pruned
    /// first, so the mask only grows (e.g. 50% → 70%). Off, zeros are just the lowest scores.
    pub keep_zeros: bool,
}

impl PruneConfig {
    pub fn unstructured(sparsity: f64) -> Self {
        PruneConfig { pattern: Pattern::Unstructured(sparsity), keep_zeros: false }
    }

    pub fn nm(n: usize, m: usize) -> Self {
        PruneConfig { pattern: Pattern::NM { n, m }, keep_zeros: false }
    }
}

/// Over which weights SparseGPT's unstructured mask ranks the saliency `w² / U_cc²` (see
/// [`crate::sparsegpt`]): the recipe's type, used as is.
pub use lacuna_api::MaskScope;

/// Settings of [`crate::sparsegpt`]; `Default` is the reference code's (blocksize 128,
/// percdamp 0.01, one mask threshold per block).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparseGptConfig {
    pub pattern: Pattern,
    /// Iterative mode, as in [`PruneConfig::keep_zeros`].
    pub keep_zeros: bool,
    /// Columns per lazy-update block; also the granularity of the adaptive mask. Must be a
    /// multiple of M in N:M mode so that groups never straddle blocks.
    pub blocksize: usize,
    /// Dampening added to the Hessian's diagonal, as a fraction of its mean diagonal.
    pub percdamp: f64,
    /// Unstructured only: one mask threshold per column block, or per row within each block.
    pub mask_scope: MaskScope,
    /// How many times the dampening is multiplied by 10 (with a warning) when the Cholesky
    /// factorisation fails, before giving up with [`Error::Cholesky`]. A zero `percdamp`
    /// escalates to [`MIN_ESCALATED_DAMP`] first.
    pub max_damp_escalations: u32,
    /// Also compute [`PruneReport::recon_error`] (costs one rows × cols² product).
    pub compute_error: bool,
}

/// The first dampening tried after a failure when `percdamp` was 0 (ten times zero is zero).
pub(crate) const MIN_ESCALATED_DAMP: f64 = 1e-6;

impl Default for SparseGptConfig {
    fn default() -> Self {
        SparseGptConfig {
            pattern: Pattern::Unstructured(0.5),
            keep_zeros: false,
            blocksize: 128,
            percdamp: 0.01,
            mask_scope: MaskScope::Block,
            max_damp_escalations: 4,
            compute_error: false,
        }
    }
}

impl SparseGptConfig {
    pub(crate) fn validate(&self, cols: usize) -> Result<()> {
        self.pattern.validate(cols)?;
        if self.blocksize == 0 {
            return Err(Error::BlockSize);
        }
        if let Pattern::NM { m, .. } = self.pattern
            && !self.blocksize.is_multiple_of(m)
        {
            return Err(Error::NmIndivisible { m, what: "the block size", len: self.blocksize });
        }
        if !self.percdamp.is_finite() || self.percdamp < 0.0 {
            return Err(Error::Damp(self.percdamp));
        }
        Ok(())
    }
}

/// What one pruning pass did to one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct PruneReport {
    /// Weights that are exactly zero after the pass (including any that were zero before).
    pub zeros: usize,
    /// `zeros / (rows · cols)`.
    pub sparsity: f64,
    /// SparseGPT only: the dampening fraction (of mean diag H) the factorisation succeeded with.
    pub damp_used: Option<f64>,
    /// SparseGPT only: the reference code's `Losses` summed, `½ Σ (w − q)² / U_cc²` with `w` the
    /// weight when its column is reached and `U` the Cholesky factor of `H⁻¹` (the OBS estimate of
    /// the added error, in the Hessian's scale).
    pub obs_loss: Option<f64>,
    /// Mean over calibration tokens of `‖(W − Ŵ) x‖²`, when computed (see
    /// [`crate::reconstruction_error`]).
    pub recon_error: Option<f64>,
    pub seconds: f64,
}

impl PruneReport {
    pub(crate) fn new(w: &[f32], seconds: f64) -> Self {
        let zeros = w.iter().filter(|&&x| x == 0.0).count();
        PruneReport {
            zeros,
            sparsity: zeros as f64 / w.len().max(1) as f64,
            damp_used: None,
            obs_loss: None,
            recon_error: None,
            seconds,
        }
    }
}
