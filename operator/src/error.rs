//! The operator's errors, each with a fixed metric label.

use kube::runtime::finalizer::Error as FinalizerError;
use lacuna_api::RecipeError;

use crate::lineage::LineageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("lineage store: {0}")]
    Lineage(#[from] LineageError),
    #[error("{kind} {name} has no namespace")]
    MissingNamespace { kind: &'static str, name: String },
    #[error("{kind} {name} has no uid to own its children by")]
    MissingUid { kind: &'static str, name: String },
    #[error("cannot serialize a recipe: {0}")]
    Serialize(String),
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] RecipeError),
}

impl Error {
    /// The `error` label of the failure counter: one fixed string per variant.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(e) => match e.as_ref() {
                // The reconcile's own error, not the wrapper's.
                FinalizerError::ApplyFailed(inner) | FinalizerError::CleanupFailed(inner) => inner.metric_label(),
                _ => "finalizer",
            },
            Error::Lineage(_) => "lineage",
            Error::MissingNamespace { .. } => "missing_namespace",
            Error::MissingUid { .. } => "missing_uid",
            Error::Serialize(_) => "serialize",
            Error::InvalidSpec(_) => "invalid_spec",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
