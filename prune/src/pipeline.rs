//! Model-level one-shot pruning, sequential block by block as SparseGPT's `llama_sequential` and
//! Wanda's `prune_wanda`: the calibration inputs of decoder block b are the outputs of blocks
//! 0..b already pruned. Only one block's activations and statistics are alive beyond the weights:
//!
//! peak ≈ weights + samples·seq_len·hidden·4 B (block inputs) + Σ_inputs cols²·8 B (one block's
//! Hessians, SparseGPT) + one sample's layer scratch.
//!
//! A run checkpoints after every block (the pruned block's weights and the next block's inputs,
//! written atomically); started again with the same model, recipe and calibration it resumes
//! from the last finished block and ends with bit-identical weights.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lacuna_api::{PruneMethod, PruneRecipe, SparsityProfile, SparsityStructure};
use lacuna_model::weights::Weight;
use lacuna_model::{LinearInput, LinearKind, Llama};
use rand::{Rng, SeedableRng};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Hessian, Pattern, PruneConfig, Result, SparseGptConfig};

/// Draws `samples` windows of `seq_len` tokens, seeded, from a token stream (the calibration
/// split's documents joined by EOS), as SparseGPT samples random windows of its calibration text.
pub fn calibration_windows(stream: &[u32], samples: usize, seq_len: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    if stream.len() < seq_len {
        return Err(Error::Calibration(format!(
            "the calibration text has {} tokens, fewer than one window of {seq_len}",
            stream.len()
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Ok((0..samples)
        .map(|_| {
            let start = rng.random_range(0..=stream.len() - seq_len);
            stream[start..start + seq_len].to_vec()
        })
        .collect())
}

/// What happened to one linear layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerOutcome {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub target: f64,
    pub sparsity: f64,
    pub damp_used: Option<f64>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PruneSummary {
    pub method: PruneMethod,
    pub target_sparsity: f64,
    /// Per decoder block (OWL varies them; uniform repeats the target).
    pub block_targets: Vec<f64>,
    pub layers: Vec<LayerOutcome>,
    /// Zeros over all pruned layers' weights.
    pub sparsity: f64,
    pub seconds: f64,
    /// Block the run resumed at, if it continued a checkpoint.
    pub resumed_at_block: Option<usize>,
}

/// Progress events for a bar.
pub enum Progress {
    Owl { block: usize, blocks: usize },
    Block { block: usize, blocks: usize },
}

/// Options that do not change the result.
#[derive(Default)]
pub struct RunOptions {
    /// Checkpoint directory; a compatible checkpoint there is resumed.
    pub checkpoint_dir: Option<PathBuf>,
    /// Stop (after checkpointing) once this many blocks are done: an interruption, for tests.
    pub stop_after_blocks: Option<usize>,
}

/// Everything a resumed run must agree on (model weights, recipe, calibration windows).
pub(crate) fn fingerprint(model: &Llama, recipe: &impl Serialize, calib: &[Vec<u32>]) -> Result<String> {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(recipe).map_err(|e| Error::Calibration(e.to_string()))?);
    for s in calib {
        for t in s {
            h.update(t.to_le_bytes());
        }
        h.update([0xff]);
    }
    for (name, w) in model.tensors() {
        h.update(name.as_bytes());
        h.update(&*w.bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// The decoder-layer linears the recipe selects, `(block, kind, name)`.
pub fn selected_layers(model: &Llama, recipe: &PruneRecipe) -> Vec<(usize, LinearKind, String)> {
    let mut v = Vec::new();
    for b in 0..model.num_layers() {
        for k in LinearKind::ALL {
            let name = format!("model.layers.{b}.{}", k.hf_name());
            if recipe.selects(&name) {
                v.push((b, k, name));
            }
        }
    }
    v
}

/// Checks the recipe against the model and calibration before any work: layer selection,
/// context length, N:M divisibility.
pub fn preflight(model: &Llama, recipe: &PruneRecipe) -> Result<()> {
    recipe.validate().map_err(|e| Error::Recipe(e.to_string()))?;
    let sel = selected_layers(model, recipe);
    if sel.is_empty() {
        return Err(Error::Recipe(format!(
            "targets {:?} (minus ignore {:?}) match no layer of the model",
            recipe.targets, recipe.ignore
        )));
    }
    let ctx = model.config().max_position_embeddings;
    if recipe.method != PruneMethod::Magnitude && recipe.calibration.seq_len > ctx {
        return Err(Error::Recipe(format!(
            "calibration.seqLen {} exceeds the model's context of {ctx}",
            recipe.calibration.seq_len
        )));
    }
    if let SparsityStructure::NM { m, .. } = recipe.structure {
        for (b, k, name) in &sel {
            let cols = model.linear(*b, *k).map(|w| w.shape()[1]).unwrap_or(0);
            if !cols.is_multiple_of(m) {
                return Err(Error::Recipe(format!("{name} has {cols} inputs, not a multiple of M = {m}")));
            }
        }
    }
    Ok(())
}

/// Column sums of squares of a layer input (what Wanda and OWL need; a full Hessian is not).
struct ColNorms {
    sq: Vec<f64>,
}

impl ColNorms {
    fn add(&mut self, x: &[f32]) {
        let c = self.sq.len();
        for row in x.chunks(c) {
            for (s, v) in self.sq.iter_mut().zip(row) {
                *s += (*v as f64) * (*v as f64);
            }
        }
    }
}

enum Stats {
    Hessian(Hessian),
    Norms(ColNorms),
}

pub(crate) fn input_width(model: &Llama, input: LinearInput) -> usize {
    let c = model.config();
    match input {
        LinearInput::Attention | LinearInput::Mlp => c.hidden_size,
        LinearInput::AttentionOutput => c.q_dim(),
        LinearInput::MlpActivation => c.intermediate_size,
    }
}

fn pattern(recipe: &PruneRecipe, target: f64) -> Pattern {
    match recipe.structure {
        SparsityStructure::Unstructured => Pattern::Unstructured(target),
        SparsityStructure::NM { n, m } => Pattern::NM { n, m },
    }
}

/// What a calibration pass does with block `b`'s samples.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Pass {
    /// Statistics only: each sample runs through a copy (the down projection's output is not
    /// computed) and stays the block's input.
    Observe,
    /// Each sample becomes the block's output (the next block's input).
    Advance,
}

/// Runs block `b` over every calibration sample and hands each linear's input to `visit`. The
/// first error `visit` returns is returned once the pass is over.
pub(crate) fn calibration_pass(
    model: &Llama,
    b: usize,
    xs: &mut [Vec<f32>],
    pass: Pass,
    visit: &mut dyn FnMut(LinearInput, &[f32]) -> Result<()>,
) -> Result<()> {
    let mut err = None;
    let mut observe = |input: LinearInput, act: &[f32]| {
        if let Err(e) = visit(input, act) {
            err.get_or_insert(e);
        }
    };
    for x in xs.iter_mut() {
        match pass {
            Pass::Observe => model.layer_observe(b, &mut x.clone(), &mut observe),
            Pass::Advance => model.layer_forward(b, x, &mut observe),
        }
        .map_err(Error::model)?;
    }
    err.map_or(Ok(()), Err)
}

/// Runs `recipe` on `model` in place.
pub fn prune_model(
    model: &mut Llama,
    recipe: &PruneRecipe,
    calib: &[Vec<u32>],
    opts: &RunOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<PruneSummary> {
    preflight(model, recipe)?;
    let t0 = Instant::now();
    let blocks = model.num_layers();
    let target = recipe.target_sparsity();
    let selected = selected_layers(model, recipe);
    let needs_data = recipe.method != PruneMethod::Magnitude;
    if needs_data && calib.is_empty() {
        return Err(Error::Calibration("no calibration samples".into()));
    }
    let fp = fingerprint(model, recipe, calib)?;
    let ckpt = opts.checkpoint_dir.as_deref().map(Checkpoint::new);

    let mut state = match ckpt.as_ref().map(|c| c.load::<State>(&fp)).transpose()?.flatten() {
        Some(s) => {
            // Re-apply the finished blocks' weights.
            let c = ckpt.as_ref().expect("checkpoint present");
            for b in 0..s.next_block {
                for (name, w) in c.load_block(b)? {
                    let kind = linear_kind_of(&name, b)
                        .ok_or_else(|| Error::Checkpoint(format!("unexpected tensor {name} in block {b}")))?;
                    model.set_linear(b, kind, w).map_err(|e| Error::Checkpoint(e.to_string()))?;
                }
            }
            s
        }
        None => {
            let block_targets = match recipe.profile {
                SparsityProfile::Uniform => vec![target; blocks],
                SparsityProfile::Owl => owl_targets(model, recipe, calib, progress)?,
            };
            State { fingerprint: fp.clone(), next_block: 0, block_targets, layers: Vec::new(), resumed_at: None }
        }
    };
    let resumed_at = (state.next_block > 0).then_some(state.next_block);

    // Block inputs: embeddings, or the checkpointed outputs of the last finished block.
    let mut xs: Vec<Vec<f32>> = if !needs_data {
        Vec::new()
    } else if state.next_block > 0 {
        ckpt.as_ref().expect("resumed from a checkpoint").load_activations(calib, model.config().hidden_size)?
    } else {
        calib.iter().map(|s| model.embed(s)).collect::<std::result::Result<_, _>>().map_err(Error::model)?
    };

    for b in state.next_block..blocks {
        progress(Progress::Block { block: b, blocks });
        let in_block: Vec<&(usize, LinearKind, String)> = selected.iter().filter(|(lb, _, _)| *lb == b).collect();
        let mut stats: BTreeMap<LinearInput, Stats> = BTreeMap::new();
        if needs_data && !in_block.is_empty() {
            for (_, k, _) in &in_block {
                let width = input_width(model, k.input());
                stats.entry(k.input()).or_insert_with(|| match recipe.method {
                    PruneMethod::Sparsegpt => Stats::Hessian(Hessian::new(width)),
                    _ => Stats::Norms(ColNorms { sq: vec![0.0; width] }),
                });
            }
            // Statistics only: the block's output comes from the pruned weights below.
            calibration_pass(model, b, &mut xs, Pass::Observe, &mut |input, act| match stats.get_mut(&input) {
                Some(Stats::Hessian(h)) => h.add_batch(act, act.len() / h.cols()),
                Some(Stats::Norms(n)) => {
                    n.add(act);
                    Ok(())
                }
                None => Ok(()),
            })?;
        }
        let block_target = state.block_targets[b];
        let mut pruned = Vec::new();
        for (_, kind, name) in &in_block {
            let t = Instant::now();
            let orig = model.linear(b, *kind).expect("selected layer exists").clone();
            let [rows, cols] = orig.dims2().map_err(Error::model)?;
            let mut w = orig.to_f32_vec();
            let pat = pattern(recipe, block_target);
            let report = match (recipe.method, stats.get(&kind.input())) {
                (PruneMethod::Sparsegpt, Some(Stats::Hessian(h))) => {
                    let cfg = SparseGptConfig {
                        pattern: pat,
                        keep_zeros: true,
                        blocksize: recipe.sparsegpt.blocksize,
                        percdamp: recipe.sparsegpt.dampening,
                        mask_scope: recipe.sparsegpt.mask_scope,
                        ..SparseGptConfig::default()
                    };
                    crate::sparsegpt(&mut w, rows, cols, h, &cfg)?
                }
                (PruneMethod::Wanda, Some(Stats::Norms(n))) => {
                    crate::wanda(&mut w, rows, cols, &n.sq, &PruneConfig { pattern: pat, keep_zeros: true })?
                }
                (PruneMethod::Magnitude, _) => {
                    crate::magnitude(&mut w, rows, cols, &PruneConfig { pattern: pat, keep_zeros: true })?
                }
                _ => return Err(Error::Calibration(format!("{name}: no calibration statistics"))),
            };
            let new = Weight::from_f32(vec![rows, cols], w).map_err(Error::model)?.to_dtype(orig.dtype());
            model.set_linear(b, *kind, new.clone()).map_err(Error::model)?;
            state.layers.push(LayerOutcome {
                name: name.clone(),
                rows,
                cols,
                target: pat.sparsity(),
                sparsity: new.count_zeros() as f64 / (rows * cols) as f64,
                damp_used: report.damp_used,
                seconds: t.elapsed().as_secs_f64(),
            });
            pruned.push((name.clone(), new));
        }
        drop(stats);
        if needs_data && b + 1 < blocks {
            calibration_pass(model, b, &mut xs, Pass::Advance, &mut |_, _| Ok(()))?;
        }
        state.next_block = b + 1;
        if let Some(c) = &ckpt {
            c.save(&state, b, &pruned, &xs)?;
        }
        if opts.stop_after_blocks == Some(b + 1) && b + 1 < blocks {
            return Err(Error::Interrupted { next_block: b + 1 });
        }
    }
    let (zeros, total) = state.layers.iter().fold((0f64, 0f64), |(z, n), l| {
        let cnt = (l.rows * l.cols) as f64;
        (z + l.sparsity * cnt, n + cnt)
    });
    Ok(PruneSummary {
        method: recipe.method,
        target_sparsity: target,
        block_targets: state.block_targets,
        layers: state.layers,
        sparsity: if total > 0.0 { zeros / total } else { 0.0 },
        seconds: t0.elapsed().as_secs_f64(),
        resumed_at_block: resumed_at,
    })
}

/// OWL per-block sparsities from the dense model: one calibration pass collecting input norms,
/// Wanda scores of every selected layer pooled per block, outlier ratios → sparsities.
fn owl_targets(
    model: &Llama,
    recipe: &PruneRecipe,
    calib: &[Vec<u32>],
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<f64>> {
    let blocks = model.num_layers();
    let selected = selected_layers(model, recipe);
    let mut xs: Vec<Vec<f32>> =
        calib.iter().map(|s| model.embed(s)).collect::<std::result::Result<_, _>>().map_err(Error::model)?;
    let mut ratios = Vec::with_capacity(blocks);
    for b in 0..blocks {
        progress(Progress::Owl { block: b, blocks });
        let mut norms: BTreeMap<LinearInput, ColNorms> = BTreeMap::new();
        for k in LinearKind::ALL {
            norms.entry(k.input()).or_insert_with(|| ColNorms { sq: vec![0.0; input_width(model, k.input())] });
        }
        calibration_pass(model, b, &mut xs, Pass::Advance, &mut |input, act| {
            if let Some(n) = norms.get_mut(&input) {
                n.add(act)
            }
            Ok(())
        })?;
        let mut scores: Vec<Vec<f32>> = Vec::new();
        for (_, k, _) in selected.iter().filter(|(lb, _, _)| *lb == b) {
            let w = model.linear(b, *k).expect("selected").to_f32_vec();
            let n = &norms[&k.input()].sq;
            let cols = n.len();
            scores.push(w.iter().enumerate().map(|(i, v)| v.abs() * (n[i % cols].sqrt() as f32)).collect());
        }
        let refs: Vec<&[f32]> = scores.iter().map(|s| s.as_slice()).collect();
        // A block with nothing selected keeps the target (ratio = mean of the others below).
        ratios.push(if refs.is_empty() { None } else { Some(crate::owl::outlier_ratio(&refs, recipe.owl.m)?) });
    }
    let known: Vec<f64> = ratios.iter().flatten().copied().collect();
    let mean = known.iter().sum::<f64>() / known.len().max(1) as f64;
    let filled: Vec<f64> = ratios.into_iter().map(|r| r.unwrap_or(mean)).collect();
    crate::owl::owl_sparsities_from_ratios(&filled, recipe.target_sparsity(), recipe.owl.lambda)
}

/// The linear a checkpointed tensor of block `b` is, by its module name
/// (`model.layers.{b}.self_attn.q_proj`).
pub(crate) fn linear_kind_of(name: &str, b: usize) -> Option<LinearKind> {
    let rest = name.strip_prefix(&format!("model.layers.{b}."))?;
    LinearKind::ALL.into_iter().find(|k| rest == k.hf_name())
}

#[derive(Serialize, Deserialize)]
struct State {
    fingerprint: String,
    next_block: usize,
    block_targets: Vec<f64>,
    layers: Vec<LayerOutcome>,
    resumed_at: Option<usize>,
}

/// `state.json`, `block-NNN.safetensors` (a finished block's new tensors) and
/// `activations.f32` (inputs of the next block), each written atomically; `state.json` last.
/// The state is the driver's own (pruning's or quantization's), with a `fingerprint` field.
pub(crate) struct Checkpoint {
    dir: PathBuf,
}

/// What every driver's state carries.
#[derive(Deserialize)]
struct StateHeader {
    fingerprint: String,
}

fn atomic_write(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let io = |e: std::io::Error| Error::Checkpoint(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    write(&mut f).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

impl Checkpoint {
    pub(crate) fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    pub(crate) fn load<S: DeserializeOwned>(&self, fingerprint: &str) -> Result<Option<S>> {
        let p = self.dir.join("state.json");
        let Ok(text) = std::fs::read_to_string(&p) else { return Ok(None) };
        let bad = |e: serde_json::Error| Error::Checkpoint(format!("{}: {e}", p.display()));
        let h: StateHeader = serde_json::from_str(&text).map_err(bad)?;
        if h.fingerprint != fingerprint {
            return Err(Error::Checkpoint(format!(
                "{} belongs to another model, recipe or calibration set; remove it or use another checkpoint directory",
                self.dir.display()
            )));
        }
        Ok(Some(serde_json::from_str(&text).map_err(bad)?))
    }

    pub(crate) fn save(
        &self,
        state: &impl Serialize,
        block: usize,
        weights: &[(String, Weight)],
        xs: &[Vec<f32>],
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::Checkpoint(format!("{}: {e}", self.dir.display())))?;
        let block_path = self.dir.join(format!("block-{block:03}.safetensors"));
        let bytes =
            lacuna_model::hf::serialize_tensors(weights.iter().map(|(n, w)| (n.as_str(), w))).map_err(Error::model)?;
        atomic_write(&block_path, |f| f.write_all(&bytes))?;
        atomic_write(&self.dir.join("activations.f32"), |f| {
            let mut w = std::io::BufWriter::new(f);
            for x in xs {
                w.write_all(bytemuck_f32(x))?;
            }
            w.flush()
        })?;
        let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Checkpoint(e.to_string()))?;
        atomic_write(&self.dir.join("state.json"), |f| f.write_all(&json))
    }

    pub(crate) fn load_block(&self, block: usize) -> Result<Vec<(String, Weight)>> {
        let p = self.dir.join(format!("block-{block:03}.safetensors"));
        lacuna_model::hf::read_tensors_file(&p).map_err(Error::model)
    }

    pub(crate) fn load_activations(&self, calib: &[Vec<u32>], hidden: usize) -> Result<Vec<Vec<f32>>> {
        let p = self.dir.join("activations.f32");
        let bytes = std::fs::read(&p).map_err(|e| Error::Checkpoint(format!("{}: {e}", p.display())))?;
        let want: usize = calib.iter().map(|s| s.len() * hidden * 4).sum();
        if bytes.len() != want {
            return Err(Error::Checkpoint(format!("{}: {} bytes, expected {want}", p.display(), bytes.len())));
        }
        let mut out = Vec::with_capacity(calib.len());
        let mut off = 0;
        for s in calib {
            let n = s.len() * hidden * 4;
            out.push(
                bytes[off..off + n].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            );
            off += n;
        }
        Ok(out)
    }
}

fn bytemuck_f32(x: &[f32]) -> &[u8] {
    bytemuck::cast_slice(x)
}
