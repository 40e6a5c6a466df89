//! Lineage: where every Lacuna model came from.
//!
//! A [`LineageStore`] records, in the ML-Metadata shape, **artifacts** (models, datasets, recipes:
//! uri, sha256, sparsity, quantization, metrics), **executions** (prune, pretrain, finetune,
//! quantize, serve, delete: spec hash, state, timings, the resource that ran it) and the input and
//! output **events** between them, in PostgreSQL (clusters) or SQLite (the embedded default), chosen
//! by URL. [`LineageStore::chain`] walks input edges back to the root: base → pruned 50% →
//! sparse-pretrained → pruned 70% → … → served.
//!
//! Every write is idempotent (ids are digests of each row's idempotency key: uri + sha256 for an
//! artifact, resource + spec hash for an execution) and transactional (an execution and its events
//! commit together). When the database is unreachable a write is appended, fsynced, to a spool in a
//! local directory and replayed in order on the next successful connection or [`LineageStore::flush`]:
//! an outage delays a record, never loses it.
//!
//! ```no_run
//! # async fn run() -> Result<(), lacuna_lineage::LineageError> {
//! use lacuna_lineage::*;
//! let store = LineageStore::connect("sqlite:///var/lib/lacuna/lineage.db?mode=rwc").await?;
//! let base = store.record_artifact(&NewArtifact::new(ArtifactKind::Model, "file:///models/base", "ab".repeat(32))).await?;
//! let job = NewExecution::new(ExecutionKind::Prune, "9f…", kubernetes_resource("ml", "prune-50", "uid-1"));
//! let run = store.start_execution(&job, &[base]).await?;
//! let mut out = NewArtifact::new(ArtifactKind::Model, "pvc://models/pruned-50", "cd".repeat(32));
//! out.sparsity = Some(0.5);
//! let out = store.record_artifact(&out).await?;
//! store.finish_execution(&run, ExecutionState::Succeeded, &[out], None).await?;
//! for link in store.chain("prune-50").await? { /* root first */ }
//! # Ok(()) }
//! ```

mod hash;
mod model;
mod outbox;
mod store;
mod time;

use std::path::PathBuf;

pub use hash::sha256_of_path;
pub use model::{
    Artifact, ArtifactId, ArtifactKind, ChainLink, Execution, ExecutionId, ExecutionKind, ExecutionState, FlushReport,
    NewArtifact, NewExecution, file_uri, kubernetes_resource, local_resource,
};
pub use store::{LineageOptions, LineageStore, sqlite_url};
pub use time::format_timestamp;

/// Environment variable naming the resource a stage runs for (`namespace/name/uid`, see
/// [`kubernetes_resource`]): set by `lacuna apply` (and usable in pods) so that a stage run records
/// the same identity the operator records, and `lacuna lineage show NAME` finds it by the job's
/// name. Without it a stage records [`local_resource`] of its output.
pub const RESOURCE_ENV: &str = "LACUNA_RESOURCE";

/// The uid part of the resources `lacuna apply` runs (no API server assigns one on a single machine).
pub const LOCAL_UID: &str = "local";

/// Environment variable naming the spool directory (default `$LACUNA_CACHE/lineage-spool`).
pub const SPOOL_DIR_ENV: &str = "LACUNA_LINEAGE_SPOOL";

/// Everything the lineage store can fail with. Database URLs in messages have their password
/// replaced.
#[derive(Debug, thiserror::Error)]
pub enum LineageError {
    #[error("lineage database URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("lineage database {url} is unreachable: {reason}")]
    Unavailable { url: String, reason: String },
    #[error("lineage database {url}: {source}")]
    Database {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("lineage database {url}: migrations: {source}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("invalid lineage record: {field} {reason}")]
    InvalidInput { field: &'static str, reason: String },
    #[error("unknown artifact id {0} (record an artifact before naming it as an input or output)")]
    UnknownArtifact(String),
    #[error("unknown execution id {0} (start an execution before finishing it)")]
    UnknownExecution(ExecutionId),
    #[error("nothing in lineage database {url} matches {query:?} (an artifact id, uri, sha256 prefix or job name)")]
    NotFound { url: String, query: String },
    #[error("{query:?} is ambiguous in the lineage database; it matches: {candidates}")]
    Ambiguous { query: String, candidates: String },
    #[error("lineage database holds a value it cannot read: {0}")]
    Corrupt(String),
    #[error("lineage spool {path}: {source}")]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding a lineage record: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("creating {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hashing {path}: {source}")]
    Hash {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
