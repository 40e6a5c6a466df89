//! `QuantizeJob`: SmoothQuant + GPTQ to INT8, keeping the sparsity mask.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{JobStatus, ModelInput, ModelOutput, RunPolicy, WorkerSpec};
use crate::{QuantizeRecipe, RecipeError};

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lacuna.dev",
    version = "v1alpha1",
    kind = "QuantizeJob",
    namespaced,
    derive = "PartialEq",
    status = "JobStatus",
    shortname = "qj",
    category = "lacuna",
    doc = "Quantizes a (sparse) model to INT8 weights (and activations), keeping its sparsity mask.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Sparsity", type_ = "number", json_path = ".status.output.sparsity"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuantizeJobSpec {
    pub model: ModelInput,
    pub output: ModelOutput,
    pub quantization: QuantizeRecipe,
    #[serde(default)]
    pub run_policy: RunPolicy,
    #[serde(default)]
    pub worker: WorkerSpec,
}

impl QuantizeJobSpec {
    pub fn validate(&self) -> Result<(), RecipeError> {
        self.model.validate("spec.model")?;
        super::common::ModelUri::parse("spec.output.uri", &self.output.uri)?;
        self.quantization.validate().map_err(|e| e.within("spec.quantization"))
    }
}
