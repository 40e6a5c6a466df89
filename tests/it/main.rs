//! Lacuna's integration tests: one binary, one module per topic.

mod compressed_tensors;
mod data;
mod gguf;
mod hf;
mod hf_python;
mod lineage;
mod prune;
mod prune_model;
mod reference;
mod runtime;
mod serve;
mod tokenizer;
mod train;
