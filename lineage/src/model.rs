//! What the store records and returns: artifacts, executions, their ids and the links of a chain.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::LineageError;

/// Id of an artifact: a digest of its idempotency key (uri + sha256), known before any database
/// has seen it, so spooled records can name each other.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ArtifactId(String);

/// Id of an execution: a digest of its idempotency key (resource + spec hash).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExecutionId(String);

/// 128 bits of SHA-256 over the tagged key parts, NUL-separated (no part contains NUL in practice,
/// and the tag keeps artifact and execution ids apart).
fn key_digest(tag: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(tag.as_bytes());
    for p in parts {
        h.update([0u8]);
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

impl ArtifactId {
    /// The id of the artifact with this uri and content digest.
    pub fn for_key(uri: &str, sha256: &str) -> ArtifactId {
        ArtifactId(key_digest("artifact", &[uri, sha256]))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub(crate) fn from_db(s: String) -> ArtifactId {
        ArtifactId(s)
    }
}

impl ExecutionId {
    /// The id of the execution of this spec by this resource.
    pub fn for_key(resource: &str, spec_hash: &str) -> ExecutionId {
        ExecutionId(key_digest("execution", &[resource, spec_hash]))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub(crate) fn from_db(s: String) -> ExecutionId {
        ExecutionId(s)
    }
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// The text stored in the database (and printed).
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = LineageError;
            fn from_str(s: &str) -> Result<Self, LineageError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(LineageError::InvalidInput {
                        field: stringify!($name),
                        reason: format!("{s:?} is not one of {}", [$($text),+].join(", ")),
                    }),
                }
            }
        }
    };
}

text_enum!(
    /// What an artifact is.
    ArtifactKind { Model = "model", Dataset = "dataset", Recipe = "recipe" }
);

text_enum!(
    /// What an execution did.
    ExecutionKind {
        Prune = "prune",
        Pretrain = "pretrain",
        Finetune = "finetune",
        Quantize = "quantize",
        Serve = "serve",
        /// The resource was deleted (recorded by the operator's finalizer).
        Delete = "delete",
    }
);

text_enum!(
    /// Where an execution is.
    ExecutionState { Running = "running", Succeeded = "succeeded", Failed = "failed", Cancelled = "cancelled" }
);

impl ExecutionState {
    /// Succeeded, failed or cancelled: the states `finish_execution` accepts.
    pub fn is_terminal(self) -> bool {
        self != ExecutionState::Running
    }
}

/// An artifact to record: content at a place.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewArtifact {
    /// Where it lives: `file:///…`, `pvc://claim/path`, `s3://bucket/prefix`, …
    pub uri: String,
    /// Lowercase hex SHA-256 of the content ([`crate::sha256_of_path`] for files and directories).
    pub sha256: String,
    pub kind: ArtifactKind,
    /// Fraction of zero weights over the pruned layers, in [0, 1].
    pub sparsity: Option<f64>,
    /// Quantization scheme (`int8`, `w8a8`, …), if any.
    pub quantization: Option<String>,
    /// Measurements (a JSON object: `{"perplexity": 21.4}`); merged into a known artifact's.
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

impl NewArtifact {
    /// A model, dataset or recipe with no sparsity, quantization or metrics yet.
    pub fn new(kind: ArtifactKind, uri: impl Into<String>, sha256: impl Into<String>) -> NewArtifact {
        NewArtifact {
            uri: uri.into(),
            sha256: sha256.into(),
            kind,
            sparsity: None,
            quantization: None,
            metrics: Default::default(),
        }
    }

    pub fn id(&self) -> ArtifactId {
        ArtifactId::for_key(&self.uri, &self.sha256)
    }

    pub(crate) fn validate(&self) -> Result<(), LineageError> {
        if self.uri.trim().is_empty() {
            return Err(invalid("uri", "is empty".to_owned()));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(invalid("sha256", format!("{:?} is not 64 lowercase hex digits", self.sha256)));
        }
        if let Some(s) = self.sparsity
            && !(0.0..=1.0).contains(&s)
        {
            return Err(invalid("sparsity", format!("{s} is outside [0, 1]")));
        }
        Ok(())
    }
}

/// An execution to start: a spec run by a resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewExecution {
    pub kind: ExecutionKind,
    /// Digest of the spec or recipe that ran (hex SHA-256 of its canonical JSON, say).
    pub spec_hash: String,
    /// `namespace/name/uid` ([`kubernetes_resource`]) or `local:<path>` ([`local_resource`]).
    pub resource: String,
}

impl NewExecution {
    pub fn new(kind: ExecutionKind, spec_hash: impl Into<String>, resource: impl Into<String>) -> NewExecution {
        NewExecution { kind, spec_hash: spec_hash.into(), resource: resource.into() }
    }

    pub fn id(&self) -> ExecutionId {
        ExecutionId::for_key(&self.resource, &self.spec_hash)
    }

    pub(crate) fn validate(&self) -> Result<(), LineageError> {
        if self.spec_hash.trim().is_empty() {
            return Err(invalid("spec_hash", "is empty".to_owned()));
        }
        validate_resource(&self.resource)
    }
}

pub(crate) fn validate_resource(resource: &str) -> Result<(), LineageError> {
    if resource.trim().is_empty() {
        return Err(invalid("resource", "is empty".to_owned()));
    }
    Ok(())
}

pub(crate) fn invalid(field: &'static str, reason: String) -> LineageError {
    LineageError::InvalidInput { field, reason }
}

/// The resource string of a Kubernetes object: `namespace/name/uid` (the uid tells a re-created
/// object from the one it replaced).
pub fn kubernetes_resource(namespace: &str, name: &str, uid: &str) -> String {
    format!("{namespace}/{name}/{uid}")
}

/// The resource string of a local run writing to `path` (made absolute when it can be).
pub fn local_resource(path: &Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!("local:{}", abs.display())
}

/// A `file://` URI for a local path (made absolute when it can be).
pub fn file_uri(path: &Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match url::Url::from_file_path(&abs) {
        Ok(u) => u.to_string(),
        Err(()) => format!("file://{}", abs.display()),
    }
}

/// A recorded artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    pub id: ArtifactId,
    pub uri: String,
    pub sha256: String,
    pub kind: ArtifactKind,
    pub sparsity: Option<f64>,
    pub quantization: Option<String>,
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

/// A recorded execution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    pub id: ExecutionId,
    pub kind: ExecutionKind,
    pub spec_hash: String,
    pub state: ExecutionState,
    /// Milliseconds since the Unix epoch.
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub resource: String,
    pub message: Option<String>,
    /// When the resource that ran it was deleted, if it was.
    pub resource_deleted_at: Option<i64>,
}

/// One step of a chain: the execution that produced an artifact, and the artifact.
///
/// The first link of a chain is its root (an artifact nothing recorded produced, e.g. a downloaded
/// base model: `execution` is `None`); a last link with `artifact: None` is an execution that
/// produced no model (serving, say).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChainLink {
    pub execution: Option<Execution>,
    pub artifact: Option<Artifact>,
    /// The execution's other inputs (its recipe, datasets), besides the model the chain follows.
    pub side_inputs: Vec<Artifact>,
    /// What else the execution produced (the bitmask form next to the dense one, say).
    pub other_outputs: Vec<Artifact>,
}

/// What a flush of the outbox did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushReport {
    /// Records written to the database.
    pub replayed: usize,
    /// Records the database refused (kept in the rejected file beside the spool, never dropped).
    pub rejected: usize,
    /// Records still waiting (the database went away during the flush).
    pub pending: usize,
}
