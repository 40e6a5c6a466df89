//! Sparse pretraining and SquareHead-distilled sparse fine-tuning (Sparse Llama, Algorithm 1).
//!
//! # Why candle
//!
//! The autograd is [candle](https://github.com/huggingface/candle): a maintained, pure-Rust tensor
//! library whose CPU backend (gemm-based, no BLAS to install) runs in CI as it is, whose CUDA
//! backend is one cargo feature away (`--features cuda` here forwards to `candle-core/cuda`), and
//! whose reverse-mode autodiff (`Tensor::backward` → `GradStore`) covers every op a Llama needs.
//! burn would add a backend-generic layer Lacuna does not need, tch a libtorch install.
//! Only `candle-core` is used: the model is written from its differentiable primitives
//! (candle-nn's fused softmax / RMSNorm kernels have no backward pass).
//!
//! # Pieces
//!
//! - [`llama::TrainLlama`]: the Llama (RMSNorm, RoPE in HF `rotate_half` layout, GQA, SwiGLU, tied
//!   embeddings) as candle `Var`s, forward with optional per-block hidden states for SquareHead.
//! - [`loss`]: causal-LM cross-entropy with a per-token weight (response-only loss), SquareHead,
//!   KL at a temperature.
//! - [`optim`]: AdamW with decoupled weight decay, warmup + cosine, global-norm clipping, and the
//!   frozen masks of Algorithm 1 (gradients ⊙ M after backward, weights ⊙ M after each step).
//! - [`data`]: the weighted pretraining mixture packed into fixed-length sequences with EOS
//!   separators, and instruction JSONL; both with serialisable cursors.
//! - [`checkpoint`]: atomic, resumable checkpoints (weights, masks, moments, RNG, cursor, step).
//! - [`trainer`]: the training loop of both `pretrain` and `finetune`.
//!
//! Training is deterministic: the same model, recipe and thread count give bit-identical weights,
//! and a run resumed from a checkpoint ends bit-identical to an uninterrupted one.

pub mod attention;
pub mod checkpoint;
pub mod data;
pub mod linear;
pub mod llama;
pub mod loss;
pub mod optim;
pub mod testing;
pub mod trainer;

use std::path::PathBuf;

pub use llama::TrainLlama;
pub use trainer::{Event, RunOptions, TrainSummary};

/// Errors at this crate's edge; each names the input concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] lacuna_model::Error),
    #[error(transparent)]
    Data(#[from] lacuna_data::Error),
    #[error(transparent)]
    Prune(#[from] lacuna_prune::Error),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("recipe: {0}")]
    Recipe(String),
    #[error("data source {source_name}: {msg}")]
    Source { source_name: String, msg: String },
    #[error("mask of {name}: {msg}")]
    Mask { name: String, msg: String },
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{0} is not supported yet")]
    Unsupported(String),
    #[error("training diverged at step {step}: the loss is {loss}")]
    Diverged { step: u64, loss: f64 },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
