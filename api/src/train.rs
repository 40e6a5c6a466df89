//! Training recipes: what `lacuna train pretrain` / `lacuna train finetune` read and what the
//! `SparsePretrainJob` and `FineTuneJob` custom resources embed.
//!
//! The model a recipe trains is not part of it: the CLI takes it as `--model`, a job as its input
//! (another job's output or a URI). A recipe says how to train, never what.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::RecipeError;
use crate::prune::PruneRecipe;

/// One named text source of a training mixture and its sampling weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataSource {
    /// A corpus Lacuna fetches (`wiki`, `sotu`, `python`, `humaneval`) or a local text / JSONL file
    /// (`file:///path`).
    pub name: String,
    /// Relative sampling weight; weights are normalised over the mixture.
    #[schemars(range(min = 0.0))]
    pub weight: f64,
}

/// A weighted mixture of sources, tokenized and packed into fixed-length sequences separated by EOS
/// (the shape of the paper's Table 5: prose sources plus a Python code source).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataMixture {
    pub sources: Vec<DataSource>,
    /// Tokens per packed training sequence.
    #[serde(default = "default_seq_len")]
    pub sequence_length: usize,
}

fn default_seq_len() -> usize {
    512
}

/// AdamW with decoupled weight decay under linear warmup and cosine decay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OptimizerSpec {
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// The cosine schedule ends at `learningRate × minLrRatio`.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMaximum" = true))]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMaximum" = true))]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
}

fn default_lr() -> f64 {
    1e-4
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_weight_decay() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self {
            learning_rate: default_lr(),
            min_lr_ratio: default_min_lr_ratio(),
            warmup_steps: 0,
            weight_decay: default_weight_decay(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            grad_clip: default_clip(),
        }
    }
}

/// Numeric type of the trained weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TrainDtype {
    #[default]
    F32,
    Bf16,
}

/// Steps, batch and checkpoint cadence shared by both kinds of training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingSchedule {
    /// Optimizer steps.
    #[schemars(range(min = 1))]
    pub steps: u64,
    /// Sequences per micro-batch.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1))]
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1))]
    pub gradient_accumulation: usize,
    #[serde(default)]
    pub dtype: TrainDtype,
    /// Recompute each block's activations in backward instead of keeping them (less memory).
    #[serde(default)]
    pub recompute_activations: bool,
    /// Write a resumable checkpoint every N optimizer steps (and on SIGTERM); 0: only at the end.
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Held-out perplexity every N steps; 0: only at the start and the end.
    #[serde(default)]
    pub eval_every: u64,
    /// Held-out sequences per evaluation.
    #[serde(default = "default_eval_sequences")]
    pub eval_sequences: usize,
    #[serde(default)]
    pub seed: u64,
}

fn default_one() -> usize {
    1
}
fn default_eval_sequences() -> usize {
    16
}

/// Continue pretraining a pruned model with its mask frozen (Algorithm 1 of Sparse Llama:
/// gradients ⊙ M after backward, weights ⊙ M after each optimizer step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PretrainRecipe {
    pub data: DataMixture,
    pub schedule: TrainingSchedule,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
}

/// The paper's four ways to a sparse fine-tuned model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Pathway {
    /// Fine-tune the dense model, then prune it one-shot.
    DenseThenOneShot,
    /// Prune gradually while fine-tuning, from dense to the target.
    PruneDuringFinetune,
    /// Fine-tune a one-shot pruned model with its mask frozen.
    FromOneShot,
    /// Fine-tune a sparse-pretrained model with its mask frozen.
    FromSparsePretrained,
}

/// Instruction data: JSONL with `prompt`/`response` or `messages` (rendered by the chat template);
/// the loss covers response tokens only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstructionData {
    /// `file:///path.jsonl`, or a corpus Lacuna fetches (`humaneval`).
    pub source: String,
    #[serde(default = "default_seq_len")]
    pub max_length: usize,
    /// Examples held out for evaluation.
    #[serde(default = "default_eval_sequences")]
    pub eval_examples: usize,
}

/// SquareHead per-layer distillation (Kurtic et al. 2023) from a dense teacher, run forward-only in
/// the same process: Σ over blocks ‖h_t − h_s‖² / ‖h_t‖², plus an optional KL on the logits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Distillation {
    /// The dense teacher: a model name Lacuna fetches, or a URI / path.
    pub teacher: String,
    /// Weight of the SquareHead term.
    #[serde(default = "default_unit")]
    pub squarehead_weight: f64,
    /// Weight of the task (cross-entropy) term.
    #[serde(default = "default_unit")]
    pub task_weight: f64,
    /// Weight of KL(teacher ‖ student) on the logits; 0 disables it.
    #[serde(default)]
    pub kl_weight: f64,
    #[serde(default = "default_unit")]
    pub temperature: f64,
}

fn default_unit() -> f64 {
    1.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FinetuneRecipe {
    pub pathway: Pathway,
    pub data: InstructionData,
    pub schedule: TrainingSchedule,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub distillation: Option<Distillation>,
    /// The pruning that `denseThenOneShot` applies after fine-tuning, or whose sparsity
    /// `pruneDuringFinetune` reaches gradually.
    #[serde(default)]
    pub pruning: Option<PruneRecipe>,
}

fn positive(field: &str, v: f64) -> Result<(), RecipeError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(RecipeError::invalid(field, format!("{v} is not a positive number")))
    }
}

impl DataMixture {
    pub fn validate(&self) -> Result<(), RecipeError> {
        if self.sources.is_empty() {
            return Err(RecipeError::invalid("data.sources", "the mixture has no source"));
        }
        for (i, s) in self.sources.iter().enumerate() {
            if s.name.trim().is_empty() {
                return Err(RecipeError::invalid(&format!("data.sources[{i}].name"), "empty source name"));
            }
            if !s.weight.is_finite() || s.weight < 0.0 {
                return Err(RecipeError::invalid(
                    &format!("data.sources[{i}].weight"),
                    format!("{} is not a finite non-negative weight", s.weight),
                ));
            }
        }
        let total: f64 = self.sources.iter().map(|s| s.weight).sum();
        if total <= 0.0 {
            return Err(RecipeError::invalid("data.sources", "weights must sum to a positive number"));
        }
        if self.sequence_length < 2 {
            return Err(RecipeError::invalid("data.sequenceLength", "must be at least 2 tokens"));
        }
        Ok(())
    }

    /// Each source's share of the mixture (weights normalised to sum to 1).
    pub fn shares(&self) -> Vec<f64> {
        let total: f64 = self.sources.iter().map(|s| s.weight).sum();
        self.sources.iter().map(|s| s.weight / total).collect()
    }
}

impl OptimizerSpec {
    pub fn validate(&self) -> Result<(), RecipeError> {
        positive("optimizer.learningRate", self.learning_rate)?;
        positive("optimizer.eps", self.eps)?;
        for (field, v) in [("optimizer.beta1", self.beta1), ("optimizer.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(RecipeError::invalid(field, format!("{v} is not in [0, 1)")));
            }
        }
        for (field, v) in [("optimizer.minLrRatio", self.min_lr_ratio)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(RecipeError::invalid(field, format!("{v} is not in [0, 1]")));
            }
        }
        for (field, v) in [("optimizer.weightDecay", self.weight_decay), ("optimizer.gradClip", self.grad_clip)] {
            if !v.is_finite() || v < 0.0 {
                return Err(RecipeError::invalid(field, format!("{v} is not a finite non-negative number")));
            }
        }
        Ok(())
    }
}

impl TrainingSchedule {
    pub fn validate(&self) -> Result<(), RecipeError> {
        if self.steps == 0 {
            return Err(RecipeError::invalid("schedule.steps", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(RecipeError::invalid("schedule.batchSize", "must be at least 1"));
        }
        if self.gradient_accumulation == 0 {
            return Err(RecipeError::invalid("schedule.gradientAccumulation", "must be at least 1"));
        }
        Ok(())
    }
}

impl PretrainRecipe {
    pub fn validate(&self) -> Result<(), RecipeError> {
        self.data.validate()?;
        self.schedule.validate()?;
        self.optimizer.validate()?;
        if self.optimizer.warmup_steps > self.schedule.steps {
            return Err(RecipeError::invalid("optimizer.warmupSteps", "longer than schedule.steps"));
        }
        Ok(())
    }
}

impl FinetuneRecipe {
    pub fn validate(&self) -> Result<(), RecipeError> {
        if self.data.source.trim().is_empty() {
            return Err(RecipeError::invalid("data.source", "empty"));
        }
        if self.data.max_length < 2 {
            return Err(RecipeError::invalid("data.maxLength", "must be at least 2 tokens"));
        }
        self.schedule.validate()?;
        self.optimizer.validate()?;
        if let Some(d) = &self.distillation {
            if d.teacher.trim().is_empty() {
                return Err(RecipeError::invalid("distillation.teacher", "empty"));
            }
            positive("distillation.temperature", d.temperature)?;
            for (field, v) in [
                ("distillation.squareheadWeight", d.squarehead_weight),
                ("distillation.taskWeight", d.task_weight),
                ("distillation.klWeight", d.kl_weight),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return Err(RecipeError::invalid(field, format!("{v} is not a finite non-negative weight")));
                }
            }
        }
        match (self.pathway, &self.pruning) {
            (Pathway::DenseThenOneShot | Pathway::PruneDuringFinetune, None) => {
                return Err(RecipeError::invalid("pruning", "this pathway prunes: give the pruning recipe"));
            }
            (_, Some(p)) => p.validate().map_err(|e| match e {
                RecipeError::Invalid { field, msg } => RecipeError::Invalid { field: format!("pruning.{field}"), msg },
                other => other,
            })?,
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::from_yaml;

    #[test]
    fn pretrain_recipe_parses_with_defaults_and_validates() {
        let r: PretrainRecipe = from_yaml(
            "data:\n  sources:\n    - {name: wiki, weight: 3}\n    - {name: python, weight: 1}\nschedule:\n  steps: 10\n",
        )
        .unwrap();
        r.validate().unwrap();
        assert_eq!(r.data.sequence_length, 512);
        assert_eq!(r.data.shares(), vec![0.75, 0.25]);
        assert_eq!(r.optimizer, OptimizerSpec::default());
    }

    #[test]
    fn zero_weights_and_unknown_keys_are_refused_naming_the_field() {
        let r: PretrainRecipe =
            from_yaml("data:\n  sources:\n    - {name: wiki, weight: 0}\nschedule: {steps: 1}\n").unwrap();
        assert!(matches!(r.validate(), Err(RecipeError::Invalid { field, .. }) if field == "data.sources"));
        assert!(from_yaml::<PretrainRecipe>("data: {sources: []}\nschedule: {steps: 1}\nlr: 3\n").is_err());
    }

    #[test]
    fn pruning_pathways_need_a_pruning_recipe() {
        let r: FinetuneRecipe =
            from_yaml("pathway: denseThenOneShot\ndata: {source: 'file:///x.jsonl'}\nschedule: {steps: 5}\n").unwrap();
        assert!(matches!(r.validate(), Err(RecipeError::Invalid { field, .. }) if field == "pruning"));
    }
}
