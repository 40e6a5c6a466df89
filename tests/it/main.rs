//! Lacuna's integration tests: one binary, one module per topic.

mod data;
mod hf;
mod reference;
