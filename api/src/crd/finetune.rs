//! `FineTuneJob`: sparse fine-tuning (one of the paper's four pathways), optionally distilled from a
//! dense teacher.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{JobStatus, ModelInput, ModelOutput, RunPolicy, WorkerSpec};
use crate::{FinetuneRecipe, RecipeError};

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lacuna.dev",
    version = "v1alpha1",
    kind = "FineTuneJob",
    namespaced,
    derive = "PartialEq",
    status = "JobStatus",
    shortname = "ftj",
    category = "lacuna",
    doc = "Fine-tunes a (sparse) model on instruction data, keeping its sparsity mask.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Sparsity", type_ = "number", json_path = ".status.output.sparsity"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FineTuneJobSpec {
    pub model: ModelInput,
    pub output: ModelOutput,
    pub finetuning: FinetuneRecipe,
    #[serde(default)]
    pub run_policy: RunPolicy,
    #[serde(default)]
    pub worker: WorkerSpec,
}

impl FineTuneJobSpec {
    pub fn validate(&self) -> Result<(), RecipeError> {
        self.model.validate("spec.model")?;
        super::common::ModelUri::parse("spec.output.uri", &self.output.uri)?;
        self.finetuning.validate().map_err(|e| e.within("spec.finetuning"))
    }
}
