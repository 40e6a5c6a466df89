//! Lacuna's weight formats and compute kernels.
//!
//! Model code calls the safe, shape-checked operations exported here and never reaches into a
//! kernel's internals. `unsafe` lives only inside this crate, each block with a `// SAFETY:` line.
//! CPU features are detected once ([`cpu::isa`]) and every kernel dispatches on that one value.

pub mod activation;
pub mod attention;
pub mod bitmask;
pub mod causal;
pub mod cpu;
pub mod dense;
pub mod ggml;
pub mod int8;
pub mod matrix;
pub mod mmap;
pub mod pages;
mod prefill;
pub mod sampled;
mod scratch;
pub mod team;
mod transpose;

/// Errors raised by kernels and format conversions: always a caller's shape or data problem.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("malformed {format} data: {msg}")]
    Format { format: &'static str, msg: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;
