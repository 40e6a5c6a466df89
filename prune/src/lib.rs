//! Layer-level one-shot pruning of linear layers.
//!
//! Every function here works on ONE linear layer: a weight `W: [rows, cols]` stored row-major in
//! f32 (PyTorch's `[out_features, in_features]`), pruned in place, plus statistics of the
//! layer's calibration inputs `X: [tokens, cols]`:
//!
//! * [`Hessian`] accumulates `H = 2/n · Σ x xᵀ` and the per-input squared norms `‖X_j‖²`;
//! * [`sparsegpt`] prunes with the OBS updates of SparseGPT (Frantar & Alistarh 2023), and
//!   [`gptq`] quantizes to per-channel INT8 with the same engine (Frantar et al. 2023): one
//!   column/block driver (`obs`), two rules;
//! * [`smooth`] computes SmoothQuant scales and activation kurtosis (Xiao et al. 2023);
//! * [`wanda`] prunes by `|W_ij|·‖X_j‖₂` (Sun et al. 2023) and [`magnitude`] by `|W_ij|`;
//! * [`owl_sparsities`] turns per-layer outlier ratios into per-layer sparsities (OWL, Yin et
//!   al. 2023).
//!
//! The model-level driver, [`pipeline`], runs a whole model block by block (sequential
//! calibration, OWL profiles, checkpoints and resume) and calls these per layer. Layers that read the same input (q/k/v; gate/up) can share one
//! [`Hessian`]; [`sparsegpt`] only reads it.
//!
//! Parallelism: the dense linear algebra runs on the current rayon pool (`faer::Par::rayon(0)`),
//! so the caller chooses the thread count by choosing the pool.

mod config;
mod gptq;
mod hessian;
mod mask;
mod obs;
pub mod owl;
pub mod pipeline;
pub mod quantize;
mod scored;
pub mod smooth;
mod sparsegpt;

pub use config::{MaskScope, Pattern, PruneConfig, PruneReport, SparseGptConfig};
pub use gptq::{GptqConfig, INT8_MAX, Int8Layer, QuantReport, channel_scales, gptq, rtn};
pub use hessian::{Hessian, reconstruction_error};
pub use owl::{outlier_ratio, owl_sparsities, owl_sparsities_from_ratios};
pub use scored::{magnitude, wanda};
pub use sparsegpt::sparsegpt;

/// Errors of the pruning algorithms: all of them describe bad arguments or numerically unusable
/// statistics; none is a bug of the caller's file handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sparsity {0} is outside [0, 1)")]
    Sparsity(f64),
    #[error("invalid N:M pattern {n}:{m}: need 0 < N < M (N = weights pruned per group of M)")]
    NmPattern { n: usize, m: usize },
    #[error("N:M pattern with M = {m} does not divide {what} = {len}")]
    NmIndivisible { m: usize, what: &'static str, len: usize },
    #[error("SparseGPT block size must be > 0")]
    BlockSize,
    #[error("dampening fraction {0} must be finite and >= 0")]
    Damp(f64),
    #[error("{what}: expected {expected} values, got {got}")]
    Shape { what: &'static str, expected: usize, got: usize },
    #[error("layer shape {rows}x{cols} has no weights")]
    EmptyLayer { rows: usize, cols: usize },
    #[error("{what} contains a non-finite value (NaN or infinity) at index {index}")]
    NonFinite { what: &'static str, index: usize },
    #[error("the Hessian has seen no calibration tokens")]
    EmptyHessian,
    #[error("Hessian has {hessian} inputs but the layer has {layer} columns")]
    HessianCols { hessian: usize, layer: usize },
    #[error(
        "Cholesky factorisation of the dampened Hessian failed at every dampening up to \
         {percdamp} x mean(diag H) ({attempts} attempts); the Hessian is not positive semi-definite"
    )]
    Cholesky { percdamp: f64, attempts: u32 },
    #[error("OWL: {0}")]
    Owl(String),
    #[error("recipe: {0}")]
    Recipe(String),
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("model: {0}")]
    Model(String),
    #[error("interrupted after finishing block {}; run again to resume", next_block - 1)]
    Interrupted { next_block: usize },
}

impl Error {
    pub(crate) fn model(e: impl std::fmt::Display) -> Self {
        Error::Model(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Fails with [`Error::NonFinite`] at the first NaN or infinity.
pub(crate) fn check_finite_f32(what: &'static str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFinite { what, index }),
        None => Ok(()),
    }
}

pub(crate) fn check_finite_f64(what: &'static str, v: &[f64]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFinite { what, index }),
        None => Ok(()),
    }
}

/// Checks `w.len() == rows * cols > 0`.
pub(crate) fn check_layer(w: &[f32], rows: usize, cols: usize) -> Result<()> {
    let expected = rows.checked_mul(cols).ok_or(Error::EmptyLayer { rows, cols })?;
    if expected == 0 {
        return Err(Error::EmptyLayer { rows, cols });
    }
    if w.len() != expected {
        return Err(Error::Shape { what: "weight", expected, got: w.len() });
    }
    check_finite_f32("weight", w)
}
