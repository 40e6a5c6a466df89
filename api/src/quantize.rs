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

/// How weights are rounded to INT8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WeightRounding {
    /// GPTQ: each column rounded in turn, its error compensated by the later columns (OBS).
    #[default]
    Gptq,
    /// Round to nearest with the same scales, no compensation (the ablation baseline).
    Nearest,
}

impl std::str::FromStr for WeightRounding {
    type Err = RecipeError;
    fn from_str(s: &str) -> Result<Self, RecipeError> {
        match s.to_ascii_lowercase().as_str() {
            "gptq" => Ok(WeightRounding::Gptq),
            "nearest" | "rtn" => Ok(WeightRounding::Nearest),
            _ => Err(RecipeError::invalid("rounding", format!("{s:?} is not gptq or nearest"))),
        }
    }
}

impl std::str::FromStr for QuantScheme {
    type Err = RecipeError;
    fn from_str(s: &str) -> Result<Self, RecipeError> {
        match s.to_ascii_lowercase().as_str() {
            "w8a8" => Ok(QuantScheme::W8a8),
            "w8a16" => Ok(QuantScheme::W8a16),
            _ => Err(RecipeError::invalid("scheme", format!("{s:?} is not w8a8 or w8a16"))),
        }
    }
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
    /// GPTQ (default) or round-to-nearest.
    #[serde(default)]
    pub rounding: WeightRounding,
    /// GPTQ activation order: columns processed by decreasing Hessian diagonal.
    #[serde(default)]
    pub actorder: bool,
    /// GPTQ columns per lazy-update block.
    #[serde(default = "default_block")]
    #[schemars(range(min = 1))]
    pub block_size: usize,
    /// The N linear layers whose inputs have the highest kurtosis stay unquantized.
    #[serde(default)]
    pub skip_by_kurtosis: usize,
    #[serde(default)]
    pub calibration: CalibrationSpec,
    /// Seed of the calibration windows.
    #[serde(default)]
    pub seed: u64,
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
        if self.calibration.samples == 0 || self.calibration.seq_len == 0 {
            return Err(RecipeError::invalid("calibration", "needs at least one sample of at least one token"));
        }
        if self.block_size == 0 {
            return Err(RecipeError::invalid("blockSize", "must be at least 1"));
        }
        Ok(())
    }
}
