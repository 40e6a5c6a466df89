//! Llama-family models for Lacuna: checkpoint I/O (GGUF and Hugging Face safetensors), tokenizers
//! and chat templates, the reference forward pass with a KV cache, generation and evaluation.
//!
//! Data flow: [`checkpoint::Checkpoint::open`] detects the format, reads the [`config`], builds
//! the [`tokenizer`] and the [`llama::Llama`] from [`weights`] (memory-mapped where the file
//! allows); [`generate`] and [`eval`] drive the forward pass; [`hf::save_dir`] writes a checkpoint.

pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod inspect;
pub mod int8;
pub mod kv;
pub mod llama;
pub mod runtime;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use checkpoint::{Checkpoint, Format, Kernels};
pub use config::LlamaConfig;
pub use kv::{KvCache, KvDtype};
pub use llama::{LinearInput, LinearKind, Llama};

use std::path::PathBuf;

/// Errors at this crate's edge. Every variant that concerns a file names it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: invalid GGUF: {msg}", path.display())]
    Gguf { path: PathBuf, msg: String },
    #[error("{}: invalid safetensors: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },
    #[error("{}: invalid model config: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("{0}")]
    Invalid(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Kernel(#[from] lacuna_kernels::KernelError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
