//! The quantization recipe (SmoothQuant + GPTQ to INT8 weights and activations, keeping the
//! sparsity mask): what a `QuantizeJob` embeds.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::RecipeError;
use crate::prune::CalibrationSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QuantScheme {
    /// INT8 weights (per output channel) and INT8 activations (per token, dynamic).
    #[default]
    W8a8,
    /// INT8 weights, activations kept in floating point.
    W8a16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuantizeRecipe {
    #[serde(default)]
    pub scheme: QuantScheme,
    /// SmoothQuant migration strength α in [0, 1]; 0 disables smoothing.
    #[serde(default = "default_alpha")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub smoothquant_alpha: f64,
    /// GPTQ dampening, as a fraction of the mean Hessian diagonal.
    #[serde(default = "default_damp")]
    pub dampening: f64,
    /// GPTQ columns per lazy-update block.
    #[serde(default = "default_block")]
    #[schemars(range(min = 1))]
    pub block_size: usize,
    /// The N linear layers whose inputs have the highest kurtosis stay unquantized.
    #[serde(default)]
    pub skip_by_kurtosis: usize,
    #[serde(default)]
    pub calibration: CalibrationSpec,
}

fn default_alpha() -> f64 {
    0.8
}
fn default_damp() -> f64 {
    0.01
}
fn default_block() -> usize {
    128
}

impl QuantizeRecipe {
    pub fn validate(&self) -> Result<(), RecipeError> {
        if !(0.0..=1.0).contains(&self.smoothquant_alpha) {
            return Err(RecipeError::invalid(
                "smoothquantAlpha",
                format!("{} is not in [0, 1]", self.smoothquant_alpha),
            ));
        }
        if !(self.dampening.is_finite() && self.dampening > 0.0) {
            return Err(RecipeError::invalid("dampening", format!("{} is not a positive number", self.dampening)));
        }
        if self.block_size == 0 {
            return Err(RecipeError::invalid("blockSize", "must be at least 1"));
        }
        Ok(())
    }
}
