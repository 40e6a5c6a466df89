//! Lacuna's Kubernetes operator: reconciles the `lacuna.dev` resources (SparsePretrainJob,
//! FineTuneJob, QuantizeJob, SparseInferenceService) into Jobs, Deployments, Services and
//! autoscalers, mirrors their progress into status, and records lineage.

pub mod context;
pub mod controller;
pub mod error;
pub mod inference;
pub mod input;
pub mod jobs;
pub mod lineage;
pub mod metrics;
pub mod resources;
pub mod server;
pub mod status;
pub mod telemetry;

#[cfg(test)]
mod chart_tests;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;

pub use context::{Context, FIELD_MANAGER, FINALIZER, OperatorConfig};
pub use error::{Error, Result};
pub use lineage::{InMemoryLineage, LineageRecorder, StoreLineage};
