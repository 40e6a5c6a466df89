//! The stages of a job resource: which `lacuna` subcommand runs which recipe, in order, and where
//! each writes. The operator runs each stage as a `batch/v1` Job; `lacuna apply` runs it as a
//! child process on one machine. Both take the plan from here, so a manifest does the same work
//! wherever it is applied.

use serde::Serialize;

use super::common::ModelUri;
use super::{FineTuneJobSpec, QuantizeJobSpec, SparsePretrainJobSpec};
use crate::RecipeError;

/// One stage of a job resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// `prune`, `pretrain`, `finetune` or `quantize`.
    pub name: &'static str,
    /// `lacuna` subcommand words (`["train", "pretrain"]`), followed by
    /// `--recipe <file> --model <input> --out <output>`.
    pub command: &'static [&'static str],
    /// The recipe, as the YAML file `lacuna` reads.
    pub recipe_yaml: String,
}

/// The file name a stage's recipe is written under.
pub fn recipe_file(stage: &Stage) -> String {
    format!("{}.yaml", stage.name)
}

/// Where stage `index` of `count` writes: the last to the resource's output, earlier ones beside
/// it in `<output>-stages/<stage>` (not inside it: the last stage replaces its output directory as
/// a whole, and an intermediate model is an input of the lineage chain that must stay).
pub fn stage_output(output_uri: &str, stage: &Stage, index: usize, count: usize) -> Result<String, RecipeError> {
    if index + 1 == count {
        return Ok(output_uri.to_owned());
    }
    let child = format!("stages/{}", stage.name);
    let beside = |base: &str| format!("{base}-{child}");
    let uri = match ModelUri::parse("spec.output.uri", output_uri)? {
        // An output at the root of a claim or bucket has nothing to stand beside: inside it is.
        ModelUri::Pvc { claim, path } if !path.is_empty() => ModelUri::Pvc { claim, path: beside(&path) },
        ModelUri::S3 { bucket, prefix } if !prefix.is_empty() => ModelUri::S3 { bucket, prefix: beside(&prefix) },
        ModelUri::File { path } if !path.trim_end_matches('/').is_empty() => {
            ModelUri::File { path: beside(path.trim_end_matches('/')) }
        }
        root => root.join(&child),
    };
    Ok(uri.to_string())
}

fn yaml<T: Serialize>(recipe: &T) -> Result<String, RecipeError> {
    serde_saphyr::to_string(recipe).map_err(|e| RecipeError::Parse(e.to_string()))
}

impl SparsePretrainJobSpec {
    /// One-shot pruning (when `pruning` is given), then sparse pretraining.
    pub fn stages(&self) -> Result<Vec<Stage>, RecipeError> {
        let mut stages = Vec::new();
        if let Some(p) = &self.pruning {
            stages.push(Stage { name: "prune", command: &["prune"], recipe_yaml: yaml(p)? });
        }
        stages.push(Stage { name: "pretrain", command: &["train", "pretrain"], recipe_yaml: yaml(&self.pretraining)? });
        Ok(stages)
    }
}

impl FineTuneJobSpec {
    pub fn stages(&self) -> Result<Vec<Stage>, RecipeError> {
        Ok(vec![Stage { name: "finetune", command: &["train", "finetune"], recipe_yaml: yaml(&self.finetuning)? }])
    }
}

impl QuantizeJobSpec {
    pub fn stages(&self) -> Result<Vec<Stage>, RecipeError> {
        Ok(vec![Stage { name: "quantize", command: &["quantize"], recipe_yaml: yaml(&self.quantization)? }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intermediate_stages_write_beside_the_output() {
        let s = Stage { name: "prune", command: &["prune"], recipe_yaml: String::new() };
        assert_eq!(stage_output("pvc://models/p50/", &s, 0, 2).unwrap(), "pvc://models/p50-stages/prune");
        assert_eq!(stage_output("s3://bucket/p50", &s, 0, 2).unwrap(), "s3://bucket/p50-stages/prune");
        assert_eq!(stage_output("file:///m/p50/", &s, 0, 2).unwrap(), "file:///m/p50-stages/prune");
        assert_eq!(stage_output("pvc://models", &s, 0, 2).unwrap(), "pvc://models/stages/prune");
        assert_eq!(stage_output("pvc://models/p50", &s, 1, 2).unwrap(), "pvc://models/p50");
        assert!(stage_output("http://x/y", &s, 0, 2).unwrap_err().to_string().contains("spec.output.uri"));
    }
}
