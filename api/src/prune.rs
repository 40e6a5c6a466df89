//! The one-shot pruning recipe: what `lacuna prune` runs and what a `SparsePretrainJob`'s pruning
//! stage embeds.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::RecipeError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PruneMethod {
    /// Frantar & Alistarh 2023: OBS updates from calibration Hessians.
    Sparsegpt,
    /// Sun et al. 2023: |W|·‖X‖ per output row, no weight update.
    Wanda,
    /// |W| per layer.
    Magnitude,
}

impl FromStr for PruneMethod {
    type Err = RecipeError;
    fn from_str(s: &str) -> Result<Self, RecipeError> {
        match s {
            "sparsegpt" => Ok(Self::Sparsegpt),
            "wanda" => Ok(Self::Wanda),
            "magnitude" => Ok(Self::Magnitude),
            _ => Err(RecipeError::invalid("method", format!("{s:?} is not one of sparsegpt, wanda, magnitude"))),
        }
    }
}

/// How the target sparsity is spread over layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SparsityProfile {
    /// Every layer at the target sparsity.
    #[default]
    Uniform,
    /// Outlier-weighted layerwise sparsity (Yin et al. 2023): layers with more activation
    /// outliers are pruned less; the mean stays at the target.
    Owl,
}

impl FromStr for SparsityProfile {
    type Err = RecipeError;
    fn from_str(s: &str) -> Result<Self, RecipeError> {
        match s {
            "uniform" => Ok(Self::Uniform),
            "owl" => Ok(Self::Owl),
            _ => Err(RecipeError::invalid("profile", format!("{s:?} is not one of uniform, owl"))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OwlParams {
    /// A score is an outlier above `m` × the layer's mean score.
    #[serde(default = "default_owl_m")]
    pub m: f64,
    /// Layer sparsities range over target ± lambda.
    #[serde(default = "default_owl_lambda")]
    pub lambda: f64,
}

fn default_owl_m() -> f64 {
    5.0
}
fn default_owl_lambda() -> f64 {
    0.08
}

impl Default for OwlParams {
    fn default() -> Self {
        Self { m: default_owl_m(), lambda: default_owl_lambda() }
    }
}

/// Unstructured, or N:M as SparseGPT and Wanda write it: N zeros in every group of M consecutive
/// inputs of a row (2:4 — the pattern sparse tensor cores run — is 50%).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SparsityStructure {
    #[default]
    Unstructured,
    /// `n` pruned in every `m`.
    NM { n: usize, m: usize },
}

impl SparsityStructure {
    /// The sparsity this structure implies, if it fixes one.
    pub fn implied_sparsity(&self) -> Option<f64> {
        match self {
            Self::Unstructured => None,
            Self::NM { n, m } => Some(*n as f64 / *m as f64),
        }
    }
}

impl fmt::Display for SparsityStructure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unstructured => f.write_str("unstructured"),
            Self::NM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

impl FromStr for SparsityStructure {
    type Err = RecipeError;
    fn from_str(s: &str) -> Result<Self, RecipeError> {
        if s == "unstructured" {
            return Ok(Self::Unstructured);
        }
        let bad = || {
            RecipeError::invalid(
                "structure",
                format!("{s:?} is neither `unstructured` nor N:M with 0 < N < M (e.g. 2:4)"),
            )
        };
        let (n, m) = s.split_once(':').ok_or_else(bad)?;
        let (n, m): (usize, usize) = (n.trim().parse().map_err(|_| bad())?, m.trim().parse().map_err(|_| bad())?);
        if n == 0 || n >= m {
            return Err(bad());
        }
        Ok(Self::NM { n, m })
    }
}

impl Serialize for SparsityStructure {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SparsityStructure {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for SparsityStructure {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SparsityStructure".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^(unstructured|[1-9][0-9]*:[1-9][0-9]*)$",
            "description": "`unstructured`, or N:M — N zeros in every group of M consecutive inputs (e.g. 2:4)"
        })
    }
}

/// Calibration data: samples of `seq_len` tokens from corpora's calibration splits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalibrationSpec {
    /// A corpus, or several joined by `+` (`wiki+python`): the samples are then split evenly
    /// between them, so a model meant for prose and code is calibrated on both.
    #[serde(default = "default_dataset")]
    pub dataset: String,
    #[serde(default = "default_samples")]
    pub samples: usize,
    #[serde(default = "default_seq_len")]
    #[schemars(range(min = 2))]
    pub seq_len: usize,
}

fn default_dataset() -> String {
    "wiki".into()
}
fn default_samples() -> usize {
    128
}
fn default_seq_len() -> usize {
    512
}

impl Default for CalibrationSpec {
    fn default() -> Self {
        Self { dataset: default_dataset(), samples: default_samples(), seq_len: default_seq_len() }
    }
}

impl CalibrationSpec {
    /// The corpora named by `dataset`.
    pub fn datasets(&self) -> Vec<&str> {
        self.dataset.split('+').map(str::trim).collect()
    }

    /// How many of the samples come from each corpus (evenly, the first ones taking the remainder).
    pub fn samples_per_dataset(&self) -> Vec<usize> {
        let k = self.datasets().len().max(1);
        (0..k).map(|i| self.samples / k + usize::from(i < self.samples % k)).collect()
    }
}

impl FromStr for CalibrationSpec {
    type Err = RecipeError;
    /// `wiki:128x512` (dataset:samples x seq_len).
    fn from_str(s: &str) -> Result<Self, RecipeError> {
        let bad =
            || RecipeError::invalid("calibration", format!("{s:?} is not DATASET:SAMPLESxSEQ_LEN (e.g. wiki:128x512)"));
        let (d, rest) = s.split_once(':').ok_or_else(bad)?;
        let (n, l) = rest.split_once('x').ok_or_else(bad)?;
        Ok(Self {
            dataset: d.to_owned(),
            samples: n.parse().map_err(|_| bad())?,
            seq_len: l.parse().map_err(|_| bad())?,
        })
    }
}

/// Over which weights SparseGPT ranks its saliencies `w² / U_cc²` (`U` the Cholesky factor of
/// `H⁻¹`) when choosing an unstructured mask (N:M always chooses within each group of M of a row).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MaskScope {
    /// One threshold over each whole column block, all rows at once: the published SparseGPT
    /// (and llm-compressor). Rows end with different sparsities, the rows whose weights matter
    /// keeping more (docs/pruning.md has the measured comparison with `row`).
    #[default]
    Block,
    /// Each row prunes exactly its share of every block: every row ends with exactly the target
    /// sparsity (row-balanced formats, even per-row work), at some accuracy cost.
    Row,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SparseGptParams {
    /// Columns per adaptive-mask block.
    #[serde(default = "default_blocksize")]
    #[schemars(range(min = 1))]
    pub blocksize: usize,
    /// Added to the Hessian diagonal as this fraction of its mean (escalated if Cholesky fails).
    #[serde(default = "default_dampening")]
    #[schemars(range(min = 0.0))]
    pub dampening: f64,
    /// Unstructured masks: `block` (one threshold per column block, as published) or `row`
    /// (exact per-row sparsity).
    #[serde(default)]
    pub mask_scope: MaskScope,
}

fn default_blocksize() -> usize {
    128
}
fn default_dampening() -> f64 {
    0.01
}

impl Default for SparseGptParams {
    fn default() -> Self {
        Self { blocksize: default_blocksize(), dampening: default_dampening(), mask_scope: MaskScope::Block }
    }
}

/// Linear weights of the decoder layers (the LM head and embeddings are left dense by default).
pub const DEFAULT_TARGETS: &str = r"^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj$";

fn default_targets() -> Vec<String> {
    vec![DEFAULT_TARGETS.to_owned()]
}
fn default_ignore() -> Vec<String> {
    vec!["lm_head".to_owned()]
}

/// A one-shot pruning run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PruneRecipe {
    pub method: PruneMethod,
    /// Fraction of each target weight set to zero, in [0, 1). For N:M, implied when omitted.
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMaximum" = true))]
    pub sparsity: Option<f64>,
    #[serde(default)]
    pub profile: SparsityProfile,
    #[serde(default)]
    pub owl: OwlParams,
    #[serde(default)]
    pub structure: SparsityStructure,
    #[serde(default)]
    pub calibration: CalibrationSpec,
    #[serde(default)]
    pub seed: u64,
    /// Regexes over layer names (`model.layers.3.mlp.down_proj`); a layer is pruned when one
    /// matches and no `ignore` regex does.
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    #[serde(default = "default_ignore")]
    pub ignore: Vec<String>,
    #[serde(default)]
    pub sparsegpt: SparseGptParams,
}

impl PruneRecipe {
    /// The target sparsity: given, or implied by N:M.
    pub fn target_sparsity(&self) -> f64 {
        self.sparsity.or(self.structure.implied_sparsity()).unwrap_or(0.0)
    }

    /// Every check that needs no model or data: ranges, N:M, regex syntax.
    pub fn validate(&self) -> Result<(), RecipeError> {
        let s = match (self.sparsity, self.structure.implied_sparsity()) {
            (None, None) => return Err(RecipeError::invalid("sparsity", "required for unstructured pruning")),
            (Some(s), Some(i)) if (s - i).abs() > 1e-12 => {
                return Err(RecipeError::invalid(
                    "sparsity",
                    format!("{s} contradicts structure {} (which implies {i})", self.structure),
                ));
            }
            (Some(s), _) | (None, Some(s)) => s,
        };
        if !(0.0..1.0).contains(&s) {
            return Err(RecipeError::invalid("sparsity", format!("{s} is outside [0, 1)")));
        }
        if self.profile == SparsityProfile::Owl {
            if matches!(self.structure, SparsityStructure::NM { .. }) {
                return Err(RecipeError::invalid("profile", "owl varies sparsity per layer, which N:M cannot"));
            }
            if self.owl.m.is_nan() || self.owl.m <= 0.0 {
                return Err(RecipeError::invalid("owl.m", format!("{} must be positive", self.owl.m)));
            }
            if !(self.owl.lambda >= 0.0 && s - self.owl.lambda >= 0.0 && s + self.owl.lambda < 1.0) {
                return Err(RecipeError::invalid(
                    "owl.lambda",
                    format!("{} must keep target ± lambda inside [0, 1) (target {s})", self.owl.lambda),
                ));
            }
        }
        if self.calibration.samples == 0 && self.method != PruneMethod::Magnitude {
            return Err(RecipeError::invalid("calibration.samples", "must be positive"));
        }
        if self.calibration.datasets().iter().any(|d| d.is_empty()) {
            return Err(RecipeError::invalid(
                "calibration.dataset",
                format!("{:?} has an empty corpus name", self.calibration.dataset),
            ));
        }
        if self.calibration.seq_len < 2 {
            return Err(RecipeError::invalid("calibration.seqLen", "must be at least 2"));
        }
        if self.sparsegpt.blocksize == 0 {
            return Err(RecipeError::invalid("sparsegpt.blocksize", "must be positive"));
        }
        if self.sparsegpt.dampening.is_nan() || self.sparsegpt.dampening < 0.0 {
            return Err(RecipeError::invalid("sparsegpt.dampening", "must be ≥ 0"));
        }
        if self.targets.is_empty() {
            return Err(RecipeError::invalid("targets", "at least one regex is needed"));
        }
        for (field, list) in [("targets", &self.targets), ("ignore", &self.ignore)] {
            for r in list {
                regex::Regex::new(r).map_err(|e| RecipeError::invalid(field, format!("{r:?}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Whether a layer (HF name without `.weight`) is pruned by this recipe.
    pub fn selects(&self, layer: &str) -> bool {
        let any = |l: &[String]| l.iter().any(|r| regex::Regex::new(r).map(|re| re.is_match(layer)).unwrap_or(false));
        any(&self.targets) && !any(&self.ignore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<PruneRecipe, RecipeError> {
        let r: PruneRecipe = crate::from_yaml(y)?;
        r.validate()?;
        Ok(r)
    }

    #[test]
    fn minimal_recipe_gets_paper_defaults() {
        let r = parse("method: sparsegpt\nsparsity: 0.5\n").unwrap();
        assert_eq!(r.calibration, CalibrationSpec { dataset: "wiki".into(), samples: 128, seq_len: 512 });
        assert_eq!(r.sparsegpt.blocksize, 128);
        assert_eq!(r.sparsegpt.mask_scope, MaskScope::Block);
        assert!(r.selects("model.layers.3.mlp.down_proj"));
        assert!(!r.selects("lm_head"));
        assert!(!r.selects("model.embed_tokens"));
    }

    #[test]
    fn structure_round_trips_and_implies_sparsity() {
        let r = parse("method: wanda\nstructure: \"2:4\"\n").unwrap();
        assert_eq!(r.structure, SparsityStructure::NM { n: 2, m: 4 });
        assert_eq!(r.target_sparsity(), 0.5);
        let back: PruneRecipe = crate::from_yaml(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn bad_recipes_name_the_field() {
        let cases = [
            ("method: sparsegpt\nsparsity: 1.0\n", "sparsity"),
            ("method: sparsegpt\nsparsity: -0.1\n", "sparsity"),
            ("method: sparsegpt\nstructure: \"4:2\"\n", "structure"),
            ("method: sparsegpt\nstructure: \"0:4\"\n", "structure"),
            ("method: sparsegpt\nsparsity: 0.7\nstructure: \"2:4\"\n", "sparsity"),
            ("method: sparsegpt\nsparsity: 0.5\ntargets: [\"(\"]\n", "targets"),
            ("method: sparsegpt\nsparsity: 0.5\nsparsitty: 0.7\n", "sparsitty"),
            ("method: obs\nsparsity: 0.5\n", "obs"),
            ("method: sparsegpt\nsparsity: 0.5\ncalibration: {seqLen: 1}\n", "seqLen"),
            ("method: sparsegpt\nsparsity: 0.05\nprofile: owl\n", "owl.lambda"),
            ("method: sparsegpt\nsparsity: 0.5\nsparsegpt: {maskScope: column}\n", "column"),
            ("method: sparsegpt\nsparsity: 0.5\nsparsegpt: {mask_scope: row}\n", "mask_scope"),
        ];
        for (y, needle) in cases {
            let e = parse(y).expect_err(y).to_string();
            assert!(e.contains(needle), "{y:?}: {e}");
        }
    }

    #[test]
    fn mask_scope_round_trips() {
        let r = parse("method: sparsegpt\nsparsity: 0.7\nsparsegpt: {maskScope: row}\n").unwrap();
        assert_eq!(r.sparsegpt.mask_scope, MaskScope::Row);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["sparsegpt"]["maskScope"], "row");
    }

    #[test]
    fn calibration_flag_form() {
        assert_eq!(
            "sotu:64x256".parse::<CalibrationSpec>().unwrap(),
            CalibrationSpec { dataset: "sotu".into(), samples: 64, seq_len: 256 }
        );
        assert!("wiki:128".parse::<CalibrationSpec>().is_err());
        let mix = "wiki+python:5x64".parse::<CalibrationSpec>().unwrap();
        assert_eq!(mix.datasets(), ["wiki", "python"]);
        assert_eq!(mix.samples_per_dataset(), [3, 2]);
    }

    #[test]
    fn schema_constrains_structure() {
        let schema = serde_json::to_value(schemars::schema_for!(PruneRecipe)).unwrap();
        let text = schema.to_string();
        assert!(text.contains("unstructured|"), "{text}");
        assert_eq!(schema["additionalProperties"], false);
    }
}
