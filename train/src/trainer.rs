//! The training loop shared by sparse pretraining and fine-tuning.
//!
//! One optimizer step: `gradientAccumulation` micro-batches, each forward + backward of
//! `loss / accumulation`, gradients summed; then **gradients ⊙ M** for every masked layer, the
//! global-norm clip, AdamW, and **weights ⊙ M** (Algorithm 1). Masked gradients are exactly 0, so
//! the moments of masked entries stay exactly 0 (checked at every checkpoint and at the end, with
//! the per-layer sparsity).
//!
//! On the CPU a masked layer is stored as its kept values ([`crate::linear`]): its products
//! multiply the kept weights only, its gradient and moments exist at kept positions only, and the
//! two masking steps have nothing left to do. [`RunOptions::masked_dense`] keeps the dense,
//! multiplied-by-the-mask reference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor};
use lacuna_api::{
    Distillation, FinetuneRecipe, OptimizerSpec, Pathway, PretrainRecipe, PruneRecipe, SparsityStructure, TrainDtype,
    TrainingSchedule,
};
use lacuna_model::Llama;
use lacuna_model::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, State};
use crate::data::{self, Batch, Example, InstructionStream, Mixture, MixtureCursor, TextSource};
use crate::llama::TrainLlama;
use crate::loss;
use crate::optim::{self, AdamW, Mask};
use crate::{Error, Result};

/// What a run reports as it goes.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start { step: u64, steps: u64, params: usize, masked_layers: usize, resumed: bool },
    Step(StepMetrics),
    Eval(EvalReport),
    Checkpoint { step: u64, path: PathBuf },
    Pruned { step: u64, sparsity: f64 },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps completed (1-based).
    pub step: u64,
    pub loss: f64,
    pub task_loss: f64,
    pub squarehead: Option<f64>,
    pub kl: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    /// Input tokens of the step (all micro-batches).
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub seconds: f64,
    /// Time spent applying the masks (gradients and weights).
    pub mask_seconds: f64,
    /// Where the step's time went: forward passes and losses, backward passes (gradients
    /// summed), the optimizer update (masks, clipping, AdamW).
    #[serde(default)]
    pub forward_seconds: f64,
    #[serde(default)]
    pub backward_seconds: f64,
    #[serde(default)]
    pub update_seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub step: u64,
    pub perplexity: f64,
    pub nll: f64,
    pub tokens: usize,
    /// Per source (pretraining) perplexity.
    pub per_source: BTreeMap<String, f64>,
}

/// Options that do not change the result.
pub struct RunOptions<'a> {
    pub device: Device,
    /// Where checkpoints go (none: no checkpoints, nothing to resume).
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from the checkpoint in `checkpoint_dir`.
    pub resume: bool,
    /// Set (e.g. on SIGTERM) to checkpoint after the current step and return.
    pub stop: Option<&'a AtomicBool>,
    /// Sleep after each step (tests interrupt a run at a known pace).
    pub throttle_ms: u64,
    /// Masks given explicitly (instead of the input's zeros): safetensors with one tensor per
    /// weight name, non-zero = kept.
    pub masks: Option<PathBuf>,
    /// Run the masked layers as dense products with the gradients and weights multiplied by the
    /// mask (the reference path, and the only one off the CPU) instead of the sparse linear over
    /// their kept values ([`crate::linear`]). The two differ in f32 rounding only; a run resumes
    /// bit-identically on the path it started on.
    pub masked_dense: bool,
}

impl Default for RunOptions<'_> {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            checkpoint_dir: None,
            resume: false,
            stop: None,
            throttle_ms: 0,
            masks: None,
            masked_dense: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerSparsity {
    pub name: String,
    pub sparsity: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: u64,
    /// The step the run resumed at, if it continued a checkpoint.
    pub resumed_at: Option<u64>,
    /// Stopped early (SIGTERM) after checkpointing.
    pub interrupted: bool,
    pub eval_before: Option<EvalReport>,
    pub eval_after: Option<EvalReport>,
    /// Per masked layer, verified unchanged at every checkpoint and at the end.
    pub sparsity: Vec<LayerSparsity>,
    pub global_sparsity: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    /// Share of step time spent applying the masks.
    pub mask_share: f64,
    pub seconds: f64,
    /// Masked layers stored as their kept values and run on the sparse kernels.
    #[serde(default)]
    pub packed_layers: usize,
    /// Bytes of the AdamW moments as stored (packed layers: kept entries only).
    #[serde(default)]
    pub optimizer_bytes: u64,
}

/// Batches of one kind of data, with a serialisable cursor.
trait Feed {
    fn next_batch(&mut self, batch: usize, device: &Device) -> Result<Batch>;
    fn cursor(&self) -> Result<serde_json::Value>;
    fn restore(&mut self, v: &serde_json::Value) -> Result<()>;
}

struct MixtureFeed<'a> {
    mix: Mixture,
    tok: &'a Tokenizer,
}

impl Feed for MixtureFeed<'_> {
    fn next_batch(&mut self, batch: usize, device: &Device) -> Result<Batch> {
        self.mix.next_batch(self.tok, batch, device)
    }
    fn cursor(&self) -> Result<serde_json::Value> {
        serde_json::to_value(self.mix.cursor()).map_err(|e| Error::Recipe(e.to_string()))
    }
    fn restore(&mut self, v: &serde_json::Value) -> Result<()> {
        let c: MixtureCursor =
            serde_json::from_value(v.clone()).map_err(|e| Error::Recipe(format!("checkpoint data cursor: {e}")))?;
        self.mix.restore(&c)
    }
}

impl Feed for InstructionStream {
    fn next_batch(&mut self, batch: usize, device: &Device) -> Result<Batch> {
        InstructionStream::next_batch(self, batch, device)
    }
    fn cursor(&self) -> Result<serde_json::Value> {
        Ok(serde_json::json!([self.cursor.0, self.cursor.1]))
    }
    fn restore(&mut self, v: &serde_json::Value) -> Result<()> {
        let c: (u64, usize) =
            serde_json::from_value(v.clone()).map_err(|e| Error::Recipe(format!("checkpoint data cursor: {e}")))?;
        InstructionStream::restore(self, c)
    }
}

fn check_schedule(s: &TrainingSchedule) -> Result<()> {
    if s.dtype == TrainDtype::Bf16 {
        return Err(Error::Unsupported("schedule.dtype: bf16 training (use f32)".into()));
    }
    if s.recompute_activations {
        return Err(Error::Unsupported("schedule.recomputeActivations (activation recomputation)".into()));
    }
    Ok(())
}

/// Masks from an explicit file, checked against the model's weights.
fn masks_from_file(model: &TrainLlama, path: &Path, device: &Device) -> Result<Vec<Mask>> {
    let t = candle_core::safetensors::load(path, device)?;
    let mut out = Vec::new();
    for i in model.prunable() {
        let name = &model.names()[i];
        let Some(k) = t.get(name).or_else(|| t.get(&format!("mask.{name}"))) else { continue };
        if k.dims() != model.shapes()[i].as_slice() {
            return Err(Error::Mask {
                name: name.clone(),
                msg: format!(
                    "{}: mask shape {:?} disagrees with the weight's {:?}",
                    path.display(),
                    k.dims(),
                    model.shapes()[i]
                ),
            });
        }
        let keep = k.ne(0f32)?.to_dtype(candle_core::DType::F32)?;
        let numel = keep.elem_count();
        let kept = keep.sum_all()?.to_scalar::<f32>()? as usize;
        // The given mask prunes: zero the weights it removes now.
        let p = &model.params()[i];
        p.set(&(p.as_tensor() * &keep)?)?;
        out.push(Mask { param: i, name: name.clone(), keep, pruned: numel - kept, numel });
    }
    if out.is_empty() {
        return Err(Error::Mask { name: path.display().to_string(), msg: "holds no mask of a prunable weight".into() });
    }
    let extra: Vec<&String> = t
        .keys()
        .filter(|k| !model.names().iter().any(|n| *k == n || k.strip_prefix("mask.") == Some(n.as_str())))
        .collect();
    if let Some(k) = extra.first() {
        return Err(Error::Mask {
            name: (*k).clone(),
            msg: format!("{}: no such weight in the model", path.display()),
        });
    }
    Ok(out)
}

/// Perplexity of `model` over `windows` (`(group, tokens)`; each scored on all but its first token).
fn perplexity(model: &TrainLlama, windows: &[(String, Vec<u32>)], step: u64) -> Result<EvalReport> {
    let dev = model.device();
    let mut per: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (group, w) in windows {
        let n = w.len() - 1;
        let ids = Tensor::from_vec(w[..n].to_vec(), (1, n), dev)?;
        let targets = Tensor::from_vec(w[1..].to_vec(), n, dev)?;
        let weights = Tensor::ones(n, candle_core::DType::F32, dev)?;
        let out = model.forward_no_grad(&ids, false)?;
        let l = loss::cross_entropy(&out.logits, &targets, &weights)?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        let e = per.entry(group.clone()).or_default();
        e.0 += l * n as f64;
        e.1 += n;
    }
    report(per, step)
}

fn report(per: BTreeMap<String, (f64, usize)>, step: u64) -> Result<EvalReport> {
    let (nll, tokens) = per.values().fold((0.0, 0usize), |(a, b), (l, n)| (a + l, b + n));
    if tokens == 0 {
        return Err(Error::Recipe("nothing to evaluate on".into()));
    }
    let nll = nll / tokens as f64;
    Ok(EvalReport {
        step,
        perplexity: nll.exp(),
        nll,
        tokens,
        per_source: per.into_iter().map(|(k, (l, n))| (k, (l / n.max(1) as f64).exp())).collect(),
    })
}

/// Response-token perplexity over held-out instruction examples.
fn example_perplexity(model: &TrainLlama, examples: &[Example], step: u64) -> Result<EvalReport> {
    let dev = model.device();
    let (mut nll, mut tokens) = (0f64, 0usize);
    for e in examples {
        let b = data::batch_of(std::iter::once(e), 0, dev)?;
        let out = model.forward_no_grad(&b.ids, false)?;
        let l = loss::cross_entropy(&out.logits, &b.targets, &b.weights)?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        nll += l * b.tokens as f64;
        tokens += b.tokens;
    }
    report(BTreeMap::from([("responses".to_owned(), (nll, tokens))]), step)
}

/// Gradual pruning during fine-tuning: at each stage step, magnitude-prune every selected layer
/// (existing zeros kept) to the stage's sparsity and freeze the new mask.
struct PrunePlan {
    recipe: PruneRecipe,
    /// `(step, sparsity)`, ascending.
    stages: Vec<(u64, f64)>,
}

impl PrunePlan {
    /// Four stages over the first three quarters of training, on the cubic schedule of Zhu &
    /// Gupta (2017): `s_i = s · (1 − (1 − i/4)³)`; the last quarter trains at the target.
    fn new(recipe: &PruneRecipe, steps: u64) -> Self {
        let target = recipe.target_sparsity();
        let n = 4u64;
        let stages = (1..=n)
            .map(|i| {
                let at = (i - 1) * (steps * 3 / 4) / n;
                let frac = i as f64 / n as f64;
                (at, target * (1.0 - (1.0 - frac).powi(3)))
            })
            .collect();
        Self { recipe: recipe.clone(), stages }
    }

    fn apply(
        &self,
        step: u64,
        model: &mut TrainLlama,
        masks: &mut Vec<Mask>,
        opt: &mut AdamW,
        sparse: bool,
    ) -> Result<Option<f64>> {
        let Some(&(_, sparsity)) = self.stages.iter().find(|(s, _)| *s == step) else { return Ok(None) };
        let pattern = match self.recipe.structure {
            SparsityStructure::NM { n, m } => lacuna_prune::Pattern::NM { n, m },
            SparsityStructure::Unstructured => lacuna_prune::Pattern::Unstructured(sparsity),
        };
        let cfg = lacuna_prune::PruneConfig { pattern, keep_zeros: true };
        let (mut zeros, mut total) = (0usize, 0usize);
        for i in model.prunable() {
            let name = &model.names()[i];
            if !self.recipe.selects(name.strip_suffix(".weight").unwrap_or(name)) {
                continue;
            }
            unpack_layer(model, opt, i)?;
            let p = &model.params()[i];
            let (rows, cols) = p.as_tensor().dims2()?;
            let mut w = p.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            lacuna_prune::magnitude(&mut w, rows, cols, &cfg)?;
            p.set(&Tensor::from_vec(w, (rows, cols), model.device())?)?;
            let mk = optim::mask_of(model, i)?;
            opt.m[i] = (&opt.m[i] * &mk.keep)?;
            opt.v[i] = (&opt.v[i] * &mk.keep)?;
            if sparse {
                pack_layer(model, opt, &mk)?;
            }
            zeros += mk.pruned;
            total += mk.numel;
            masks.retain(|m| m.param != i);
            masks.push(mk);
        }
        masks.sort_by_key(|m| m.param);
        Ok(Some(zeros as f64 / total.max(1) as f64))
    }
}

struct Teacher<'a> {
    model: &'a TrainLlama,
    spec: &'a Distillation,
}

struct Job<'a> {
    kind: &'static str,
    schedule: &'a TrainingSchedule,
    optimizer: &'a OptimizerSpec,
    fingerprint: String,
    recipe_sha: String,
    teacher: Option<Teacher<'a>>,
    prune: Option<PrunePlan>,
}

/// The sparsity from which a masked layer is stored as its kept values and multiplied by the
/// sparse kernels. Below it the three sparse products together are no faster than the dense ones
/// (`cargo bench -p lacuna-kernels --bench train`: about 1.1× at 50 %, 1.5× at 70 %), so the
/// layer runs dense with the masks applied (a dequantized GGUF has a few percent of exact zeros
/// in every layer: those stay dense).
pub const PACK_MIN_SPARSITY: f64 = 0.45;

/// Stores the layer of `mask` (weights and both moments) as its kept values when it is sparse
/// enough ([`PACK_MIN_SPARSITY`]) and the sparse linear runs where it is (the CPU).
fn pack_layer(model: &mut TrainLlama, opt: &mut AdamW, mask: &Mask) -> Result<()> {
    let i = mask.param;
    if mask.sparsity() >= PACK_MIN_SPARSITY && model.pack(i, &mask.keep)? {
        opt.m[i] = model.stored_like(i, &opt.m[i])?;
        opt.v[i] = model.stored_like(i, &opt.v[i])?;
    }
    Ok(())
}

/// Stores layer `i` (weights and both moments) dense again.
fn unpack_layer(model: &mut TrainLlama, opt: &mut AdamW, i: usize) -> Result<()> {
    if model.layout(i).is_some() {
        opt.m[i] = model.dense_like(i, &opt.m[i])?;
        opt.v[i] = model.dense_like(i, &opt.v[i])?;
        model.unpack(i)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    job: Job<'_>,
    model: &mut TrainLlama,
    mut masks: Vec<Mask>,
    feed: &mut dyn Feed,
    eval: &dyn Fn(&TrainLlama, u64) -> Result<EvalReport>,
    opts: &RunOptions<'_>,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    let t_run = Instant::now();
    let s = job.schedule;
    let mut opt = AdamW::for_model(job.optimizer, model)?;
    let mut step = 0u64;
    let mut resumed_at = None;
    if let Some(dir) = &opts.checkpoint_dir {
        if opts.resume {
            let (found, state) = checkpoint::read_state(dir, job.kind, &job.fingerprint, &job.recipe_sha)?;
            checkpoint::restore(&found, model.device(), model, &mut opt, &mut masks)?;
            feed.restore(&state.cursor)?;
            opt.t = state.adam_t;
            step = state.step;
            resumed_at = Some(step);
            optim::verify_sparsity(model, &masks)?;
            opt.verify_masked_moments(model, &masks)?;
        } else if let Some(found) = checkpoint::locate(dir) {
            return Err(Error::Checkpoint {
                path: found,
                msg: "a checkpoint of an earlier run is here: pass --resume to continue it, or remove it".into(),
            });
        }
    } else if opts.resume {
        return Err(Error::Recipe("--resume needs a checkpoint directory".into()));
    }
    optim::check_masks(model, &masks)?;
    let sparse = !opts.masked_dense;
    if sparse {
        for m in &masks {
            pack_layer(model, &mut opt, m)?;
        }
    }
    on_event(Event::Start {
        step,
        steps: s.steps,
        params: model.num_params(),
        masked_layers: masks.len(),
        resumed: resumed_at.is_some(),
    });
    let eval_before = if resumed_at.is_none() {
        let r = eval(model, 0)?;
        on_event(Event::Eval(r.clone()));
        Some(r)
    } else {
        None
    };

    let device = model.device().clone();
    let accum = s.gradient_accumulation;
    let (mut tokens_total, mut secs_total, mut mask_total) = (0usize, 0f64, 0f64);
    let mut interrupted = false;
    let save =
        |model: &TrainLlama, step: u64, opt: &AdamW, masks: &[Mask], feed: &dyn Feed| -> Result<Option<PathBuf>> {
            let Some(dir) = &opts.checkpoint_dir else { return Ok(None) };
            optim::verify_sparsity(model, masks)?;
            opt.verify_masked_moments(model, masks)?;
            let state = State {
                format: 1,
                kind: job.kind.to_owned(),
                step,
                model_fingerprint: job.fingerprint.clone(),
                recipe_sha256: job.recipe_sha.clone(),
                adam_t: opt.t,
                cursor: feed.cursor()?,
            };
            checkpoint::save(dir, &state, model, opt, masks)?;
            Ok(Some(dir.clone()))
        };

    while step < s.steps {
        if opts.stop.is_some_and(|f| f.load(Ordering::SeqCst)) {
            if let Some(p) = save(model, step, &opt, &masks, feed)? {
                on_event(Event::Checkpoint { step, path: p });
            }
            interrupted = true;
            break;
        }
        if let Some(plan) = &job.prune
            && let Some(sp) = plan.apply(step, model, &mut masks, &mut opt, sparse)?
        {
            on_event(Event::Pruned { step, sparsity: sp });
        }
        let t0 = Instant::now();
        let mut grads: Vec<Option<Tensor>> = vec![None; model.params().len()];
        let (mut task_sum, mut sh_sum, mut kl_sum, mut loss_sum) = (0f64, 0f64, 0f64, 0f64);
        let mut tokens = 0usize;
        let (mut forward_secs, mut backward_secs) = (0f64, 0f64);
        for _ in 0..accum {
            let b = feed.next_batch(s.batch_size, &device)?;
            tokens += b.ids.elem_count();
            let want_hidden = job.teacher.as_ref().is_some_and(|t| t.spec.squarehead_weight > 0.0);
            let tf = Instant::now();
            let out = model.forward(&b.ids, want_hidden)?;
            let task = loss::cross_entropy(&out.logits, &b.targets, &b.weights)?;
            let total = match &job.teacher {
                None => task.clone(),
                Some(t) => {
                    let tout = t.model.forward_no_grad(&b.ids, want_hidden)?;
                    // SquareHead and KL over every real token (padding has weight 0).
                    let real = b.ids.flatten_all()?.ones_like()?.to_dtype(candle_core::DType::F32)?;
                    let real = pad_weights(&b, &real)?;
                    let mut l = (&task * t.spec.task_weight)?;
                    if want_hidden {
                        let sh = loss::squarehead(&out.hidden, &tout.hidden, &real)?;
                        sh_sum += sh.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                        l = (l + (sh * t.spec.squarehead_weight)?)?;
                    }
                    if t.spec.kl_weight > 0.0 {
                        let kl = loss::kl_div(&out.logits, &tout.logits, &real, t.spec.temperature)?;
                        kl_sum += kl.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                        l = (l + (kl * t.spec.kl_weight)?)?;
                    }
                    l
                }
            };
            task_sum += task.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            loss_sum += total.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            let tb = Instant::now();
            forward_secs += (tb - tf).as_secs_f64();
            let gs = (total / accum as f64)?.backward()?;
            for (g, p) in grads.iter_mut().zip(model.params()) {
                if let Some(new) = gs.get(p.as_tensor()) {
                    // Detached: a gradient computed from the graph records the ops that made it,
                    // and the Adam moments built from it would keep every step's activations
                    // alive (memory grew by gigabytes per step).
                    let new = new.detach();
                    *g = Some(match g.take() {
                        None => new,
                        Some(acc) => (acc + new)?,
                    });
                }
            }
            backward_secs += tb.elapsed().as_secs_f64();
        }
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(model.params())
            .map(|(g, p)| g.map_or_else(|| p.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        let lr = optim::learning_rate(job.optimizer, step, s.steps);
        let tu = Instant::now();
        let up = masked_update(model, &masks, &mut opt, grads, lr)?;
        let update_secs = tu.elapsed().as_secs_f64();
        let (grad_norm, mask_secs) = (up.grad_norm, up.mask_seconds);
        step += 1;
        let secs = t0.elapsed().as_secs_f64();
        let n = accum as f64;
        let loss = loss_sum / n;
        if !loss.is_finite() {
            return Err(Error::Diverged { step, loss });
        }
        tokens_total += tokens;
        secs_total += secs;
        mask_total += mask_secs;
        on_event(Event::Step(StepMetrics {
            step,
            loss,
            task_loss: task_sum / n,
            squarehead: job.teacher.as_ref().filter(|t| t.spec.squarehead_weight > 0.0).map(|_| sh_sum / n),
            kl: job.teacher.as_ref().filter(|t| t.spec.kl_weight > 0.0).map(|_| kl_sum / n),
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / secs,
            seconds: secs,
            mask_seconds: mask_secs,
            forward_seconds: forward_secs,
            backward_seconds: backward_secs,
            update_seconds: update_secs,
        }));
        if s.checkpoint_every > 0
            && step.is_multiple_of(s.checkpoint_every)
            && step < s.steps
            && let Some(p) = save(model, step, &opt, &masks, feed)?
        {
            on_event(Event::Checkpoint { step, path: p });
        }
        if s.eval_every > 0 && step.is_multiple_of(s.eval_every) && step < s.steps {
            on_event(Event::Eval(eval(model, step)?));
        }
        if opts.throttle_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(opts.throttle_ms));
        }
    }
    optim::verify_sparsity(model, &masks)?;
    opt.verify_masked_moments(model, &masks)?;
    let eval_after = if interrupted {
        None
    } else {
        let r = eval(model, step)?;
        on_event(Event::Eval(r.clone()));
        Some(r)
    };
    let (z, t) = masks.iter().fold((0usize, 0usize), |(z, t), m| (z + m.pruned, t + m.numel));
    Ok(TrainSummary {
        steps: step,
        resumed_at,
        interrupted,
        eval_before,
        eval_after,
        sparsity: masks.iter().map(|m| LayerSparsity { name: m.name.clone(), sparsity: m.sparsity() }).collect(),
        global_sparsity: z as f64 / t.max(1) as f64,
        tokens: tokens_total,
        tokens_per_s: tokens_total as f64 / secs_total.max(1e-9),
        mask_share: mask_total / secs_total.max(1e-9),
        seconds: t_run.elapsed().as_secs_f64(),
        packed_layers: (0..model.params().len()).filter(|&i| model.layout(i).is_some()).count(),
        optimizer_bytes: opt.m.iter().chain(&opt.v).map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum(),
    })
}

/// What [`masked_update`] did.
pub struct Update {
    /// The gradients, masked (the clipping factor is applied inside the optimizer's update).
    pub grads: Vec<Tensor>,
    /// Global norm before clipping (after masking).
    pub grad_norm: f64,
    /// The factor clipping scaled the gradients by (1: none).
    pub clip: f64,
    /// Time spent applying the masks.
    pub mask_seconds: f64,
}

/// One optimizer step under frozen masks (Algorithm 1): gradients ⊙ M, global-norm clip, AdamW
/// at `lr`, weights ⊙ M.
pub fn masked_update(
    model: &TrainLlama,
    masks: &[Mask],
    opt: &mut AdamW,
    mut grads: Vec<Tensor>,
    lr: f64,
) -> Result<Update> {
    let tm = Instant::now();
    // A packed layer's gradient exists at its kept positions only: nothing to mask.
    for m in masks.iter().filter(|m| model.layout(m.param).is_none()) {
        if let Some(g) = optim::mask_in_place(&grads[m.param], &m.keep)? {
            grads[m.param] = g;
        }
    }
    let mut mask_seconds = tm.elapsed().as_secs_f64();
    let (grad_norm, factor) = optim::clip_factor(&grads, opt.spec.grad_clip)?;
    opt.step_scaled(model.params(), &grads, factor, lr)?;
    let tm = Instant::now();
    for m in masks.iter().filter(|m| model.layout(m.param).is_none()) {
        let p = &model.params()[m.param];
        if let Some(w) = optim::mask_in_place(p.as_tensor(), &m.keep)? {
            p.set(&w)?;
        }
    }
    mask_seconds += tm.elapsed().as_secs_f64();
    Ok(Update { grads, grad_norm, clip: factor, mask_seconds })
}

/// 1 for real tokens, 0 for the padding of a right-padded batch: a position is padding when it
/// and every later one of its row carry loss weight 0 beyond the row's last weighted target.
fn pad_weights(b: &Batch, ones: &Tensor) -> Result<Tensor> {
    let (rows, t) = b.ids.dims2()?;
    let w = b.weights.to_vec1::<f32>()?;
    let mut out = vec![0f32; rows * t];
    for r in 0..rows {
        let row = &w[r * t..(r + 1) * t];
        let last = row.iter().rposition(|x| *x > 0.0).map_or(t, |p| p + 1);
        for x in &mut out[r * t..r * t + last] {
            *x = 1.0;
        }
    }
    Ok(Tensor::from_vec(out, ones.dims(), ones.device())?)
}

fn initial_masks(model: &TrainLlama, opts: &RunOptions<'_>) -> Result<Vec<Mask>> {
    match &opts.masks {
        Some(p) => masks_from_file(model, p, &opts.device),
        None => Ok(optim::masks_from_zeros(model)?.into_iter().filter(|m| m.pruned > 0).collect()),
    }
}

/// Sparse pretraining (Algorithm 1) of `input` on `sources` (the recipe's, loaded, in order).
/// Returns the trained model and the run's summary.
pub fn pretrain(
    input: &Llama,
    tok: &Tokenizer,
    recipe: &PretrainRecipe,
    sources: Vec<TextSource>,
    opts: &RunOptions<'_>,
    on_event: &mut dyn FnMut(Event),
) -> Result<(TrainLlama, TrainSummary)> {
    recipe.validate().map_err(|e| Error::Recipe(e.to_string()))?;
    check_schedule(&recipe.schedule)?;
    let seq = recipe.data.sequence_length;
    if seq > input.config().max_position_embeddings {
        return Err(Error::Recipe(format!(
            "data.sequenceLength {seq} exceeds the model's context of {}",
            input.config().max_position_embeddings
        )));
    }
    if sources.len() != recipe.data.sources.len() {
        return Err(Error::Recipe("the loaded sources do not match the recipe's".into()));
    }
    let weighted: Vec<(TextSource, f64)> =
        sources.into_iter().zip(&recipe.data.sources).map(|(s, d)| (s, d.weight)).collect();
    let windows: Vec<(String, Vec<u32>)> =
        data::heldout_windows(&weighted, tok, seq, recipe.schedule.eval_sequences.max(1))?
            .into_iter()
            .map(|(i, w)| (weighted[i].0.name.clone(), w))
            .collect();
    let mix = Mixture::new(&weighted, tok, seq, recipe.schedule.seed)?;
    let mut model = TrainLlama::from_model(input, &opts.device)?;
    let masks = initial_masks(&model, opts)?;
    let job = Job {
        kind: "pretrain",
        schedule: &recipe.schedule,
        optimizer: &recipe.optimizer,
        fingerprint: checkpoint::model_fingerprint(input),
        recipe_sha: checkpoint::recipe_sha256(recipe),
        teacher: None,
        prune: None,
    };
    let mut feed = MixtureFeed { mix, tok };
    let eval = |m: &TrainLlama, step: u64| perplexity(m, &windows, step);
    let summary = run(job, &mut model, masks, &mut feed, &eval, opts, on_event)?;
    Ok((model, summary))
}

/// Fine-tuning on instruction `examples` along the recipe's pathway, distilling from `teacher`
/// when the recipe asks. `denseThenOneShot`'s pruning after training is [`one_shot_after`]'s.
pub fn finetune(
    input: &Llama,
    recipe: &FinetuneRecipe,
    examples: Vec<Example>,
    teacher: Option<&Llama>,
    pad: u32,
    opts: &RunOptions<'_>,
    on_event: &mut dyn FnMut(Event),
) -> Result<(TrainLlama, TrainSummary)> {
    recipe.validate().map_err(|e| Error::Recipe(e.to_string()))?;
    check_schedule(&recipe.schedule)?;
    let n_eval = recipe.data.eval_examples.min(examples.len() / 2);
    if examples.len() - n_eval == 0 {
        return Err(Error::Recipe("data.source: no instruction example left to train on".into()));
    }
    let (train, held) = examples.split_at(examples.len() - n_eval);
    let held = if held.is_empty() { train.to_vec() } else { held.to_vec() };
    let mut model = TrainLlama::from_model(input, &opts.device)?;
    let masks = match recipe.pathway {
        Pathway::FromOneShot | Pathway::FromSparsePretrained => {
            let m = initial_masks(&model, opts)?;
            if m.is_empty() {
                return Err(Error::Recipe(format!(
                    "pathway {:?} fine-tunes a sparse model with its mask frozen, but the input has no zero in any prunable layer",
                    recipe.pathway
                )));
            }
            m
        }
        Pathway::DenseThenOneShot | Pathway::PruneDuringFinetune => Vec::new(),
    };
    let teacher_model = match (&recipe.distillation, teacher) {
        (Some(_), None) => return Err(Error::Recipe("distillation: the teacher model was not given".into())),
        (Some(_), Some(t)) => {
            let (a, b) = (t.config(), input.config());
            if a.num_hidden_layers != b.num_hidden_layers
                || a.hidden_size != b.hidden_size
                || a.vocab_size != b.vocab_size
            {
                return Err(Error::Recipe(format!(
                    "distillation.teacher: {} blocks × {} hidden × {} vocab, the student {} × {} × {}",
                    a.num_hidden_layers, a.hidden_size, a.vocab_size, b.num_hidden_layers, b.hidden_size, b.vocab_size
                )));
            }
            Some(TrainLlama::from_model(t, &opts.device)?.frozen())
        }
        (None, _) => None,
    };
    let prune = match recipe.pathway {
        Pathway::PruneDuringFinetune => {
            let p = recipe.pruning.as_ref().ok_or_else(|| Error::Recipe("pruning: missing".into()))?;
            Some(PrunePlan::new(p, recipe.schedule.steps))
        }
        _ => None,
    };
    let job = Job {
        kind: "finetune",
        schedule: &recipe.schedule,
        optimizer: &recipe.optimizer,
        fingerprint: checkpoint::model_fingerprint(input),
        recipe_sha: checkpoint::recipe_sha256(recipe),
        teacher: teacher_model.as_ref().zip(recipe.distillation.as_ref()).map(|(model, spec)| Teacher { model, spec }),
        prune,
    };
    let mut feed = InstructionStream::new(train.to_vec(), recipe.schedule.seed, pad);
    let eval = |m: &TrainLlama, step: u64| example_perplexity(m, &held, step);
    let summary = run(job, &mut model, masks, &mut feed, &eval, opts, on_event)?;
    Ok((model, summary))
}

/// `denseThenOneShot`'s last step: one-shot pruning of the fine-tuned model with the recipe's
/// pruning recipe (`lacuna_prune`'s pipeline; `calib` as `lacuna prune` builds it).
pub fn one_shot_after(
    model: &mut Llama,
    recipe: &PruneRecipe,
    calib: &[Vec<u32>],
) -> Result<lacuna_prune::pipeline::PruneSummary> {
    let opts = lacuna_prune::pipeline::RunOptions::default();
    Ok(lacuna_prune::pipeline::prune_model(model, recipe, calib, &opts, &mut |_| {})?)
}
