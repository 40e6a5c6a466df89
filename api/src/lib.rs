//! Types shared by the CLI, the pods and the operator: one source of truth for every recipe, with
//! serde for YAML/JSON and schemars for the schemas the CRDs embed.
//!
//! Field names are camelCase (Kubernetes convention); unknown keys are rejected so that a typo in a
//! recipe is an error before any work starts, never a silently ignored setting.

pub mod crd;
pub mod prune;
pub mod quantize;
pub mod tls;
pub mod train;

pub use prune::{
    CalibrationSpec, MaskScope, OwlParams, PruneMethod, PruneRecipe, SparseGptParams, SparsityProfile,
    SparsityStructure,
};
pub use quantize::{QuantScheme, QuantizeRecipe, WeightRounding};
pub use train::{
    DataMixture, DataSource, Distillation, FinetuneRecipe, InstructionData, OptimizerSpec, Pathway, PretrainRecipe,
    TrainDtype, TrainingSchedule,
};

/// A recipe that cannot run, with the offending field named.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RecipeError {
    #[error("{field}: {msg}")]
    Invalid { field: String, msg: String },
    #[error("recipe is not valid YAML for this schema: {0}")]
    Parse(String),
}

impl RecipeError {
    pub(crate) fn invalid(field: &str, msg: impl Into<String>) -> Self {
        RecipeError::Invalid { field: field.to_owned(), msg: msg.into() }
    }

    /// The same error with its field placed under `parent` (`sparsity` → `spec.pruning.sparsity`).
    pub fn within(self, parent: &str) -> Self {
        match self {
            RecipeError::Invalid { field, msg } => RecipeError::Invalid { field: format!("{parent}.{field}"), msg },
            other => other,
        }
    }
}

/// Parses a YAML (or JSON) recipe document.
pub fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, RecipeError> {
    serde_saphyr::from_str(text).map_err(|e| RecipeError::Parse(e.to_string()))
}
