//! What the operator tells the lineage store: an execution per job stage (started, succeeded with
//! its output artifact, failed) and the deletion of a resource.
//!
//! The store behind this trait is the `lacuna-lineage` crate (SQLite or PostgreSQL); the operator
//! only needs these four calls. Every call is keyed by the execution (resource uid, stage and
//! `batch/v1` Job name), so the store can treat a repeated call as a no-op: a reconcile that
//! records and then fails before its status patch records again on the retry, never loses a record.

use std::sync::Mutex;

use async_trait::async_trait;
use lacuna_api::crd::{OutputArtifact, ResolvedInput};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LineageError(pub String);

/// One run of one stage of a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Execution {
    /// `SparsePretrainJob`, `FineTuneJob`, `QuantizeJob` or `SparseInferenceService`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `prune`, `pretrain`, `finetune`, `quantize` or `serve`.
    pub stage: String,
    /// The `batch/v1` Job (or Deployment) that runs it; its name carries the spec hash.
    pub workload: String,
    pub input: Option<ResolvedInput>,
}

/// A resource that was deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[async_trait]
pub trait LineageRecorder: Send + Sync {
    async fn execution_started(&self, execution: &Execution) -> Result<(), LineageError>;
    async fn execution_succeeded(&self, execution: &Execution, output: &OutputArtifact) -> Result<(), LineageError>;
    async fn execution_failed(&self, execution: &Execution, reason: &str, message: &str) -> Result<(), LineageError>;
    async fn resource_deleted(&self, resource: &ResourceRef) -> Result<(), LineageError>;
}

/// One call the recorder received.
#[derive(Clone, Debug, PartialEq)]
pub enum LineageEvent {
    Started(Execution),
    Succeeded(Execution, OutputArtifact),
    Failed(Execution, String, String),
    Deleted(ResourceRef),
}

/// Keeps the calls in memory (tests, and an operator run without a store).
#[derive(Debug, Default)]
pub struct InMemoryLineage {
    events: Mutex<Vec<LineageEvent>>,
    /// When set, every call fails (a lineage outage).
    fail: Mutex<bool>,
}

impl InMemoryLineage {
    pub fn events(&self) -> Vec<LineageEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    pub fn set_failing(&self, failing: bool) {
        if let Ok(mut f) = self.fail.lock() {
            *f = failing;
        }
    }

    fn push(&self, e: LineageEvent) -> Result<(), LineageError> {
        if self.fail.lock().map(|f| *f).unwrap_or(false) {
            return Err(LineageError("lineage store unavailable".into()));
        }
        let mut events = self.events.lock().map_err(|_| LineageError("poisoned".into()))?;
        if !events.contains(&e) {
            events.push(e);
        }
        Ok(())
    }
}

#[async_trait]
impl LineageRecorder for InMemoryLineage {
    async fn execution_started(&self, execution: &Execution) -> Result<(), LineageError> {
        self.push(LineageEvent::Started(execution.clone()))
    }
    async fn execution_succeeded(&self, execution: &Execution, output: &OutputArtifact) -> Result<(), LineageError> {
        self.push(LineageEvent::Succeeded(execution.clone(), output.clone()))
    }
    async fn execution_failed(&self, execution: &Execution, reason: &str, message: &str) -> Result<(), LineageError> {
        self.push(LineageEvent::Failed(execution.clone(), reason.to_owned(), message.to_owned()))
    }
    async fn resource_deleted(&self, resource: &ResourceRef) -> Result<(), LineageError> {
        self.push(LineageEvent::Deleted(resource.clone()))
    }
}
