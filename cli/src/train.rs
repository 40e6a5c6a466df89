//! `lacuna train pretrain|finetune`: sparse pretraining and (distilled) sparse fine-tuning from a
//! recipe, checkpointed every `checkpointEvery` steps and on SIGTERM, resumable with `--resume`,
//! writing a Hugging Face directory (and its `-bitmask` form) and a metrics JSONL log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lacuna_api::{FinetuneRecipe, Pathway, PretrainRecipe, PruneMethod};
use lacuna_data::Cache;
use lacuna_model::hf::{self, SaveOptions};
use lacuna_model::{Checkpoint, LinearKind, Llama};
use lacuna_train::trainer::{self, Event, TrainSummary};
use lacuna_train::{RunOptions, data};

use crate::commands::{open_model, print_json};
use crate::resolve::{sibling, spinner};

#[derive(Subcommand)]
pub enum TrainCmd {
    /// Continue pretraining a pruned model with its mask frozen, on a weighted data mixture.
    Pretrain(TrainArgs),
    /// Fine-tune on instruction data along one of the four pathways, optionally distilling
    /// (SquareHead) from a dense teacher.
    Finetune(TrainArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// Model: a GGUF file, a Hugging Face directory, or a known name.
    #[arg(long)]
    pub model: String,
    /// Recipe (YAML): `PretrainRecipe` or `FinetuneRecipe`.
    #[arg(long)]
    pub recipe: PathBuf,
    /// Output directory (Hugging Face layout).
    #[arg(long)]
    pub out: PathBuf,
    /// The same model in the compressed-tensors `sparse-bitmask` layout (default: `<out>-bitmask`).
    #[arg(long)]
    pub bitmask_out: Option<PathBuf>,
    /// Checkpoint directory (default: `<out>.checkpoint`).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue the run whose checkpoint is in the checkpoint directory.
    #[arg(long)]
    pub resume: bool,
    /// Metrics log, one JSON object per line (default: `<out>.metrics.jsonl`).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Masks to freeze instead of the input's zeros (safetensors, one tensor per weight name).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Replace the output directories if they exist.
    #[arg(long)]
    pub overwrite: bool,
    /// Run masked layers as dense products multiplied by the mask (the reference) instead of the
    /// sparse kernels over their kept values; for comparisons.
    #[arg(long)]
    pub masked_dense: bool,
    /// Sleep this long after each step (tests interrupt runs at a known pace).
    #[arg(long, hide = true, default_value_t = 0)]
    pub throttle_ms: u64,
    #[arg(long)]
    pub json: bool,
}

fn read_recipe<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    lacuna_api::from_yaml(&text).with_context(|| format!("recipe {}", p.display()))
}

pub fn run(cmd: TrainCmd) -> Result<()> {
    match cmd {
        TrainCmd::Pretrain(a) => pretrain(a),
        TrainCmd::Finetune(a) => finetune(a),
    }
}

/// Output paths, refused early if they exist.
struct Outputs {
    /// Where the model goes: `out` itself, or an `s3://` prefix `out` is uploaded to.
    target: crate::objects::Output,
    out: PathBuf,
    bitmask: PathBuf,
    checkpoint: PathBuf,
    metrics: PathBuf,
}

fn outputs(a: &TrainArgs) -> Result<Outputs> {
    let target = crate::objects::Output::new(&a.out)?;
    let out = target.local.clone();
    let o = Outputs {
        bitmask: a.bitmask_out.clone().unwrap_or_else(|| sibling(&out, "-bitmask")),
        checkpoint: a.checkpoint_dir.clone().unwrap_or_else(|| sibling(&out, ".checkpoint")),
        metrics: a.metrics.clone().unwrap_or_else(|| sibling(&out, ".metrics.jsonl")),
        target,
        out,
    };
    for p in [&o.out, &o.bitmask] {
        if p.exists() && !a.overwrite {
            bail!("{} already exists (pass --overwrite to replace it)", p.display());
        }
    }
    Ok(o)
}

/// The progress bar and the JSONL log, fed by training events.
struct Reporter {
    pb: ProgressBar,
    log: std::fs::File,
    path: PathBuf,
}

impl Reporter {
    fn new(steps: u64, path: &Path, resume: bool) -> Result<Self> {
        let pb = ProgressBar::new(steps);
        pb.set_style(ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} steps  {elapsed} (eta {eta})")?);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(resume)
            .write(true)
            .truncate(!resume)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { pb, log, path: path.to_path_buf() })
    }

    fn event(&mut self, e: Event) -> Result<()> {
        match &e {
            Event::Start { step, resumed: true, .. } => {
                // Drop the records of steps the interrupted run did after its last checkpoint.
                let text = std::fs::read_to_string(&self.path).unwrap_or_default();
                let kept: String = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<serde_json::Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                            .is_none_or(|s| s <= *step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                std::fs::write(&self.path, kept).with_context(|| format!("rewriting {}", self.path.display()))?;
                self.pb.set_position(*step);
            }
            Event::Step(m) => {
                self.pb.set_position(m.step);
                self.pb.set_message(format!(
                    "loss {:.4}  {:.0} tok/s  mask {:.1}%",
                    m.loss,
                    m.tokens_per_s,
                    100.0 * m.mask_seconds / m.seconds
                ));
            }
            Event::Eval(r) => self.pb.println(format!("step {}: held-out perplexity {:.3}", r.step, r.perplexity)),
            Event::Pruned { step, sparsity } => {
                self.pb.println(format!("step {step}: pruned to {:.2}% sparsity", 100.0 * sparsity))
            }
            _ => {}
        }
        let line = serde_json::to_string(&e)?;
        writeln!(self.log, "{line}").and_then(|_| self.log.flush())?;
        Ok(())
    }
}

fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&flag)).context("installing the SIGTERM handler")?;
    }
    Ok(flag)
}

/// Writes the trained model (and its bitmask form) and the run's report.
/// Writes the outputs and returns the sparsity over the layers that have zeros (`None`: dense).
fn write_outputs(
    a: &TrainArgs,
    o: &Outputs,
    model: &Llama,
    ck: &Checkpoint,
    report: serde_json::Value,
) -> Result<Option<f64>> {
    let pb = spinner(&format!("writing {}", o.out.display()));
    let tensors = model.tensors();
    hf::save_dir(
        &o.out,
        model.config(),
        &tensors,
        Some(&ck.tokenizer),
        &SaveOptions { overwrite: a.overwrite, ..Default::default() },
    )
    .with_context(|| format!("writing {}", o.out.display()))?;
    let mut targets = Vec::new();
    let (mut zeros, mut total) = (0usize, 0usize);
    for b in 0..model.num_layers() {
        for k in LinearKind::ALL {
            if let Some(w) = model.linear(b, k) {
                let z = w.count_zeros();
                if z > 0 {
                    targets.push(format!("model.layers.{b}.{}.weight", k.hf_name()));
                    zeros += z;
                    total += w.len();
                }
            }
        }
    }
    if !targets.is_empty() {
        pb.set_message(format!("writing {}", o.bitmask.display()));
        let qc = hf::sparse_bitmask_quantization_config(
            zeros as f64 / total as f64,
            "unstructured",
            &[r"^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj$".to_owned()],
            &["lm_head".to_owned()],
        );
        let opts = SaveOptions {
            overwrite: a.overwrite,
            bitmask: Some(hf::BitmaskOptions { targets }),
            extra_config: [("quantization_config".to_owned(), qc)].into(),
            ..Default::default()
        };
        hf::save_dir(&o.bitmask, model.config(), &tensors, Some(&ck.tokenizer), &opts)
            .with_context(|| format!("writing {}", o.bitmask.display()))?;
    }
    pb.finish_and_clear();
    std::fs::write(o.out.join("lacuna_train.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::copy(&o.metrics, o.out.join("metrics.jsonl"))
        .with_context(|| format!("copying {}", o.metrics.display()))?;
    if o.checkpoint.exists() {
        std::fs::remove_dir_all(&o.checkpoint).with_context(|| format!("removing {}", o.checkpoint.display()))?;
    }
    Ok((total > 0).then(|| zeros as f64 / total as f64))
}

/// Tells lineage and the stage's runner (the Job's termination message, `lacuna apply`) what the
/// run produced.
fn report_outputs(
    a: &TrainArgs,
    o: &Outputs,
    ck: &Checkpoint,
    kind: lacuna_lineage::ExecutionKind,
    recipe: serde_json::Value,
    sparsity: Option<f64>,
    s: &TrainSummary,
) -> Result<()> {
    let mut metrics = std::collections::BTreeMap::new();
    if let Some(e) = &s.eval_after {
        metrics.insert("perplexity".to_owned(), e.perplexity);
    }
    if let Some(e) = &s.eval_before {
        metrics.insert("perplexity_before".to_owned(), e.perplexity);
    }
    metrics.insert("tokens_per_s".to_owned(), s.tokens_per_s);
    let mut outputs = vec![o.out.as_path()];
    if sparsity.is_some() {
        outputs.push(o.bitmask.as_path());
    }
    crate::lineage::report_run(&crate::lineage::StageRun {
        kind,
        model: &ck.path,
        recipe_file: Some(&a.recipe),
        recipe,
        outputs,
        sparsity,
        quantization: None,
        metrics: metrics.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect(),
        message: format!("{kind} for {} steps", s.steps),
    });
    o.target.publish(sparsity.is_some().then_some(o.bitmask.as_path()))?;
    crate::stage::report_success(&o.target, sparsity, metrics)
}

fn finish(a: &TrainArgs, o: &Outputs, s: &TrainSummary, report: &serde_json::Value) -> Result<()> {
    if a.json {
        return print_json(report);
    }
    let ppl =
        |r: &Option<trainer::EvalReport>| r.as_ref().map(|r| format!("{:.3}", r.perplexity)).unwrap_or("-".into());
    println!(
        "trained {} steps{} at {:.0} tokens/s ({} layers on the sparse kernels, AdamW state {:.0} MiB, masks {:.2}% of step time), held-out perplexity {} → {}, sparsity {:.2}% unchanged → {}",
        s.steps,
        s.resumed_at.map(|b| format!(" (resumed at step {b})")).unwrap_or_default(),
        s.tokens_per_s,
        s.packed_layers,
        s.optimizer_bytes as f64 / (1 << 20) as f64,
        100.0 * s.mask_share,
        ppl(&s.eval_before),
        ppl(&s.eval_after),
        100.0 * s.global_sparsity,
        o.out.display()
    );
    Ok(())
}

fn interrupted(o: &Outputs, s: &TrainSummary) -> anyhow::Error {
    anyhow::anyhow!(
        "interrupted after step {}: checkpoint in {}; run the same command with --resume to continue",
        s.steps,
        o.checkpoint.display()
    )
}

fn pretrain(a: TrainArgs) -> Result<()> {
    let recipe: PretrainRecipe = read_recipe(&a.recipe)?;
    recipe.validate().with_context(|| format!("recipe {}", a.recipe.display()))?;
    let o = outputs(&a)?;
    let ck = crate::stage::open_input_model(&a.model)?;
    let cache = Cache::from_env().ok();
    let mut sources = Vec::new();
    for s in &recipe.data.sources {
        let pb = spinner(&format!("loading {}", s.name));
        sources.push(data::load_source(cache.as_ref(), &s.name, &|m| pb.set_message(m.to_owned()))?);
        pb.finish_and_clear();
    }
    let stop = stop_flag()?;
    let opts = RunOptions {
        checkpoint_dir: Some(o.checkpoint.clone()),
        resume: a.resume,
        stop: Some(&*stop),
        throttle_ms: a.throttle_ms,
        masks: a.mask.clone(),
        masked_dense: a.masked_dense,
        ..Default::default()
    };
    let mut rep = Reporter::new(recipe.schedule.steps, &o.metrics, a.resume)?;
    let mut err = None;
    let res = trainer::pretrain(&ck.model, &ck.tokenizer, &recipe, sources, &opts, &mut |e| {
        if let Err(e) = rep.event(e) {
            err.get_or_insert(e);
        }
    });
    rep.pb.finish_and_clear();
    let (model, summary) = res?;
    if let Some(e) = err {
        return Err(e);
    }
    if summary.interrupted {
        return Err(interrupted(&o, &summary));
    }
    let llama = model.to_model(&ck.path)?;
    let report = serde_json::json!({"kind": "pretrain", "model": ck.path, "recipe": recipe, "summary": summary});
    let sparsity = write_outputs(&a, &o, &llama, &ck, report.clone())?;
    let kind = lacuna_lineage::ExecutionKind::Pretrain;
    report_outputs(&a, &o, &ck, kind, serde_json::to_value(&recipe)?, sparsity, &summary)?;
    finish(&a, &o, &summary, &report)
}

/// Calibration windows of a pruning recipe, built as `lacuna prune` builds them.
fn calibration(recipe: &lacuna_api::PruneRecipe, ck: &Checkpoint) -> Result<Vec<Vec<u32>>> {
    if recipe.method == PruneMethod::Magnitude {
        return Ok(Vec::new());
    }
    crate::prune::calibration_windows(ck, &recipe.calibration, recipe.seed).context("pruning.calibration")
}

fn finetune(a: TrainArgs) -> Result<()> {
    let recipe: FinetuneRecipe = read_recipe(&a.recipe)?;
    recipe.validate().with_context(|| format!("recipe {}", a.recipe.display()))?;
    let o = outputs(&a)?;
    let ck = crate::stage::open_input_model(&a.model)?;
    let cache = Cache::from_env().ok();
    let pb = spinner(&format!("loading {}", recipe.data.source));
    let examples =
        data::load_instructions(cache.as_ref(), &recipe.data.source, &ck.tokenizer, recipe.data.max_length, &|m| {
            pb.set_message(m.to_owned())
        })?;
    pb.finish_and_clear();
    let teacher = match &recipe.distillation {
        Some(d) => Some(open_model(&d.teacher).context("distillation.teacher")?),
        None => None,
    };
    let pad = ck.tokenizer.eos_ids().first().copied().unwrap_or(0);
    let stop = stop_flag()?;
    let opts = RunOptions {
        checkpoint_dir: Some(o.checkpoint.clone()),
        resume: a.resume,
        stop: Some(&*stop),
        throttle_ms: a.throttle_ms,
        masks: a.mask.clone(),
        masked_dense: a.masked_dense,
        ..Default::default()
    };
    let mut rep = Reporter::new(recipe.schedule.steps, &o.metrics, a.resume)?;
    let mut err = None;
    let res =
        trainer::finetune(&ck.model, &recipe, examples, teacher.as_ref().map(|t| &t.model), pad, &opts, &mut |e| {
            if let Err(e) = rep.event(e) {
                err.get_or_insert(e);
            }
        });
    rep.pb.finish_and_clear();
    let (model, summary) = res?;
    if let Some(e) = err {
        return Err(e);
    }
    if summary.interrupted {
        return Err(interrupted(&o, &summary));
    }
    let mut llama = model.to_model(&ck.path)?;
    let mut pruned = None;
    if recipe.pathway == Pathway::DenseThenOneShot {
        let p = recipe.pruning.as_ref().context("pruning")?;
        let calib = calibration(p, &ck)?;
        let pb = spinner(&format!("one-shot pruning ({:?})", p.method));
        pruned = Some(trainer::one_shot_after(&mut llama, p, &calib)?);
        pb.finish_and_clear();
    }
    let report = serde_json::json!({
        "kind": "finetune", "model": ck.path, "recipe": recipe, "summary": summary, "one_shot_after": pruned,
    });
    let sparsity = write_outputs(&a, &o, &llama, &ck, report.clone())?;
    let kind = lacuna_lineage::ExecutionKind::Finetune;
    report_outputs(&a, &o, &ck, kind, serde_json::to_value(&recipe)?, sparsity, &summary)?;
    finish(&a, &o, &summary, &report)
}
