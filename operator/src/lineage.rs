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

/// The recorder a deployed operator uses: the `lacuna-lineage` store (PostgreSQL in a cluster,
/// SQLite for trials), whose writes spool to an fsynced outbox while the database is away.
pub struct StoreLineage {
    store: std::sync::Arc<lacuna_lineage::LineageStore>,
}

impl StoreLineage {
    pub fn new(store: std::sync::Arc<lacuna_lineage::LineageStore>) -> StoreLineage {
        StoreLineage { store }
    }

    /// The store's execution for one stage run: keyed by the resource (`namespace/name/uid`) and
    /// the stage's workload, whose name carries the hash of the spec and input.
    fn new_execution(execution: &Execution) -> Result<lacuna_lineage::NewExecution, LineageError> {
        let kind: lacuna_lineage::ExecutionKind = execution.stage.parse().map_err(to_error)?;
        let resource = lacuna_lineage::kubernetes_resource(&execution.namespace, &execution.name, &execution.uid);
        Ok(lacuna_lineage::NewExecution::new(kind, execution.workload.clone(), resource))
    }
}

fn to_error(e: lacuna_lineage::LineageError) -> LineageError {
    LineageError(e.to_string())
}

/// A model artifact as the store keeps it; `None` when its checksum is unknown (the store keys
/// artifacts by uri and content).
fn model_artifact(
    uri: &str,
    sha256: Option<&str>,
    sparsity: Option<f64>,
    metrics: &std::collections::BTreeMap<String, f64>,
) -> Option<lacuna_lineage::NewArtifact> {
    let mut artifact = lacuna_lineage::NewArtifact::new(lacuna_lineage::ArtifactKind::Model, uri, sha256?);
    artifact.sparsity = sparsity;
    artifact.metrics = metrics.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
    Some(artifact)
}

#[async_trait]
impl LineageRecorder for StoreLineage {
    async fn execution_started(&self, execution: &Execution) -> Result<(), LineageError> {
        let run = Self::new_execution(execution)?;
        let mut inputs = Vec::new();
        if let Some(input) = &execution.input
            && let Some(artifact) = model_artifact(&input.uri, input.sha256.as_deref(), None, &Default::default())
        {
            inputs.push(self.store.record_artifact(&artifact).await.map_err(to_error)?);
        }
        self.store.start_execution(&run, &inputs).await.map_err(to_error)?;
        Ok(())
    }

    async fn execution_succeeded(&self, execution: &Execution, output: &OutputArtifact) -> Result<(), LineageError> {
        let run = Self::new_execution(execution)?;
        // Started first (a no-op when it was): an operator restarted between the two still links
        // the output to its input.
        self.execution_started(execution).await?;
        let mut outputs = Vec::new();
        if let Some(artifact) = model_artifact(&output.uri, output.sha256.as_deref(), output.sparsity, &output.metrics)
        {
            outputs.push(self.store.record_artifact(&artifact).await.map_err(to_error)?);
        }
        let state = lacuna_lineage::ExecutionState::Succeeded;
        self.store.finish_execution(&run.id(), state, &outputs, None).await.map_err(to_error)
    }

    async fn execution_failed(&self, execution: &Execution, reason: &str, message: &str) -> Result<(), LineageError> {
        let run = Self::new_execution(execution)?;
        self.execution_started(execution).await?;
        let message = format!("{reason}: {message}");
        let state = lacuna_lineage::ExecutionState::Failed;
        self.store.finish_execution(&run.id(), state, &[], Some(&message)).await.map_err(to_error)
    }

    async fn resource_deleted(&self, resource: &ResourceRef) -> Result<(), LineageError> {
        let key = lacuna_lineage::kubernetes_resource(&resource.namespace, &resource.name, &resource.uid);
        self.store.record_deletion(&key).await.map_err(to_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use lacuna_lineage::{ExecutionKind, ExecutionState, LineageOptions, LineageStore};

    use super::*;

    fn execution(stage: &str, workload: &str, input: Option<ResolvedInput>) -> Execution {
        Execution {
            kind: "SparsePretrainJob".into(),
            namespace: "ml".into(),
            name: "smollm2-sparse50".into(),
            uid: "uid-1".into(),
            stage: stage.into(),
            workload: workload.into(),
            input,
        }
    }

    fn output(uri: &str, sha: char, sparsity: f64) -> OutputArtifact {
        OutputArtifact {
            uri: uri.into(),
            sha256: Some(sha.to_string().repeat(64)),
            sparsity: Some(sparsity),
            metrics: [("perplexity".to_owned(), 21.5)].into(),
        }
    }

    /// The operator's calls land in a real (SQLite) store as a chain base → pruned → pretrained,
    /// a repeated call changes nothing, a failure keeps its reason, and a deletion is recorded.
    #[tokio::test]
    async fn store_recorder_builds_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let url = lacuna_lineage::sqlite_url(&dir.path().join("lineage.db"));
        let options = LineageOptions { spool_dir: Some(dir.path().join("spool")), ..Default::default() };
        let store = Arc::new(LineageStore::connect_with(&url, options).await.unwrap());
        let rec = StoreLineage::new(store.clone());

        let base = ResolvedInput { uri: "pvc://models/base".into(), sha256: Some("a".repeat(64)), from_job: None };
        let prune = execution("prune", "smollm2-sparse50-prune-1a2b", Some(base));
        let pruned = output("pvc://models/out/stages/prune", 'b', 0.5);
        rec.execution_started(&prune).await.unwrap();
        rec.execution_succeeded(&prune, &pruned).await.unwrap();
        rec.execution_succeeded(&prune, &pruned).await.unwrap();
        let from_prune = ResolvedInput { uri: pruned.uri.clone(), sha256: pruned.sha256.clone(), from_job: None };
        let pretrain = execution("pretrain", "smollm2-sparse50-pretrain-3c4d", Some(from_prune));
        rec.execution_succeeded(&pretrain, &output("pvc://models/out", 'c', 0.5)).await.unwrap();

        let chain = store.chain("pvc://models/out").await.unwrap();
        let uris: Vec<_> = chain.iter().map(|l| l.artifact.as_ref().map(|a| a.uri.as_str())).collect();
        assert_eq!(uris, [Some("pvc://models/base"), Some("pvc://models/out/stages/prune"), Some("pvc://models/out")]);
        let kinds: Vec<_> = chain.iter().map(|l| l.execution.as_ref().map(|e| e.kind)).collect();
        assert_eq!(kinds, [None, Some(ExecutionKind::Prune), Some(ExecutionKind::Pretrain)]);
        let last = chain[2].artifact.as_ref().unwrap();
        assert_eq!((last.sparsity, last.metrics["perplexity"].as_f64()), (Some(0.5), Some(21.5)));
        let run = chain[2].execution.as_ref().unwrap();
        assert_eq!((run.state, run.resource.as_str()), (ExecutionState::Succeeded, "ml/smollm2-sparse50/uid-1"));

        let failed = execution("pretrain", "smollm2-sparse50-pretrain-5e6f", None);
        rec.execution_failed(&failed, "ChecksumMismatch", "input changed").await.unwrap();
        let id = lacuna_lineage::NewExecution::new(
            ExecutionKind::Pretrain,
            "smollm2-sparse50-pretrain-5e6f",
            "ml/smollm2-sparse50/uid-1",
        )
        .id();
        let e = store.execution(&id).await.unwrap().unwrap();
        assert_eq!((e.state, e.message.as_deref()), (ExecutionState::Failed, Some("ChecksumMismatch: input changed")));

        let gone = ResourceRef {
            kind: "SparsePretrainJob".into(),
            namespace: "ml".into(),
            name: "smollm2-sparse50".into(),
            uid: "uid-1".into(),
        };
        rec.resource_deleted(&gone).await.unwrap();
        let e = store.execution(&chain[2].execution.as_ref().unwrap().id).await.unwrap().unwrap();
        assert!(e.resource_deleted_at.is_some(), "{e:?}");
        assert_eq!(store.pending().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn unknown_stage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let url = lacuna_lineage::sqlite_url(&dir.path().join("lineage.db"));
        let options = LineageOptions { spool_dir: Some(dir.path().join("spool")), ..Default::default() };
        let rec = StoreLineage::new(Arc::new(LineageStore::connect_with(&url, options).await.unwrap()));
        let e = rec.execution_started(&execution("distill", "w", None)).await.unwrap_err();
        assert!(e.0.contains("distill"), "{e}");
    }
}
