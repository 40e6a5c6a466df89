//! `SparsePretrainJob`: an optional one-shot pruning stage, then sparse pretraining with the mask
//! frozen (the paper's prune → pretrain step).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{JobStatus, ModelInput, ModelOutput, RunPolicy, WorkerSpec};
use crate::{PretrainRecipe, PruneRecipe, RecipeError};

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lacuna.dev",
    version = "v1alpha1",
    kind = "SparsePretrainJob",
    namespaced,
    derive = "PartialEq",
    status = "JobStatus",
    shortname = "spj",
    category = "lacuna",
    doc = "Prunes a model one-shot (optional) and continues pretraining it with the sparsity mask frozen.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Stage", type_ = "string", json_path = ".status.stage"),
    printcolumn(name = "Sparsity", type_ = "number", json_path = ".status.output.sparsity"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SparsePretrainJobSpec {
    /// The model to prune (or, without `pruning`, an already sparse model to pretrain).
    pub model: ModelInput,
    pub output: ModelOutput,
    /// The one-shot pruning stage; omitted, the input is pretrained as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<PruneRecipe>,
    /// The sparse pretraining stage.
    pub pretraining: PretrainRecipe,
    #[serde(default)]
    pub run_policy: RunPolicy,
    #[serde(default)]
    pub worker: WorkerSpec,
}

impl SparsePretrainJobSpec {
    /// Every check the schema cannot express, with the field named from `spec`.
    pub fn validate(&self) -> Result<(), RecipeError> {
        self.model.validate("spec.model")?;
        super::common::ModelUri::parse("spec.output.uri", &self.output.uri)?;
        if let Some(p) = &self.pruning {
            p.validate().map_err(|e| e.within("spec.pruning"))?;
        }
        self.pretraining.validate().map_err(|e| e.within("spec.pretraining"))
    }
}
