//! Model-level INT8 quantization (the last step of the Sparse Llama recipe): SmoothQuant folded
//! into the RMSNorm gains, then GPTQ (or round-to-nearest) per-output-channel INT8 weights that
//! keep the sparsity mask, sequential block by block on the same machinery as
//! [`crate::pipeline::prune_model`] (calibration windows, `Llama::layer_observe` /
//! `layer_forward`, per-block atomic checkpoints and bit-identical resume).
//!
//! For decoder block `b`, on the inputs the already-quantized blocks `0..b` produce:
//!
//! 1. one observation pass collects, for each of the block's four linear inputs, the Hessian
//!    `2/n·XᵀX` and the per-channel maxima `max|X_j|`;
//! 2. SmoothQuant (α > 0), with llm-compressor's Llama mappings (`DEFAULT_SMOOTHQUANT_MAPPINGS`:
//!    q/k/v ← input layernorm, gate/up ← post-attention layernorm; no v→o or up→down, which are
//!    AWQ's mappings, not SmoothQuant's): `s_j = max|X_j|^α / max|W_j|^(1−α)` over the layers
//!    sharing the input; the norm gain is divided by `s`, those weights' columns multiplied by it,
//!    and the Hessian rescaled to the smoothed inputs (`H_ij / s_i s_j`, exact, no second pass);
//! 3. every selected linear is quantized to per-row symmetric INT8 (scales `max|w_r|/127` of the
//!    smoothed weights), its zeros kept exactly; the dequantized weights replace it in the model;
//! 4. the samples run through the quantized block to become block `b+1`'s inputs; checkpoint.
//!
//! Kurtosis skipping (`skipByKurtosis: N`) needs every layer's score before the first block is
//! quantized: a pre-pass runs the calibration set through the float model, collecting per-channel
//! moments of every linear's input, and scores each linear by the kurtosis of its input as the
//! activation quantizer would see it (after the SmoothQuant scales those moments give); the N
//! highest stay in floating point (smoothed, which is function-preserving). Layers sharing an
//! input (q/k/v, gate/up) share a score; ties keep model order.

use std::collections::BTreeMap;
use std::time::Instant;

use lacuna_api::{QuantScheme, QuantizeRecipe, WeightRounding};
use lacuna_model::weights::Weight;
use lacuna_model::{LinearInput, LinearKind, Llama};
use serde::{Deserialize, Serialize};

use crate::gptq::{GptqConfig, Int8Layer, gptq, rtn};
use crate::pipeline::{Checkpoint, Pass, RunOptions, calibration_pass, fingerprint, input_width, linear_kind_of};
use crate::smooth::{ActStats, scale_columns, smoothing_scales};
use crate::{Error, Hessian, Result};

/// The linears SmoothQuant smooths, by the input they share.
fn smoothed_group(input: LinearInput) -> &'static [LinearKind] {
    match input {
        LinearInput::Attention => &[LinearKind::Q, LinearKind::K, LinearKind::V],
        LinearInput::Mlp => &[LinearKind::Gate, LinearKind::Up],
        LinearInput::AttentionOutput | LinearInput::MlpActivation => &[],
    }
}

const SMOOTHED_INPUTS: [LinearInput; 2] = [LinearInput::Attention, LinearInput::Mlp];
const ALL_INPUTS: [LinearInput; 4] =
    [LinearInput::Attention, LinearInput::AttentionOutput, LinearInput::Mlp, LinearInput::MlpActivation];

/// What happened to one linear layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuantLayerOutcome {
    /// Module name, `model.layers.3.mlp.down_proj`.
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    /// False for a layer kept in floating point (kurtosis skipping).
    pub quantized: bool,
    pub zeros_before: usize,
    pub zeros_after: usize,
    /// GPTQ only: the dampening fraction used and the OBS loss estimate.
    pub damp_used: Option<f64>,
    pub obs_loss: Option<f64>,
    pub seconds: f64,
}

/// One linear's kurtosis score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KurtosisScore {
    pub name: String,
    pub kurtosis: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuantizeSummary {
    pub scheme: QuantScheme,
    pub rounding: WeightRounding,
    pub smoothquant_alpha: f64,
    pub actorder: bool,
    /// Every decoder linear by decreasing input kurtosis (empty when nothing is skipped: the
    /// pre-pass that measures it only runs then).
    pub kurtosis_ranking: Vec<KurtosisScore>,
    /// Module names kept in floating point.
    pub skipped: Vec<String>,
    pub layers: Vec<QuantLayerOutcome>,
    /// Zeros over all decoder linears before and after (a kept mask makes them equal).
    pub zeros_before: usize,
    pub zeros_after: usize,
    pub seconds: f64,
    pub resumed_at_block: Option<usize>,
}

/// The quantized model's INT8 side: per-output-channel scales of every quantized linear, by
/// module name. The model itself holds the dequantized weights (`code · scale` in f32), from
/// which [`Int8Layer::from_dequantized`] recovers the codes exactly.
pub struct QuantizeOutcome {
    pub summary: QuantizeSummary,
    pub scales: BTreeMap<String, Vec<f32>>,
}

impl QuantizeOutcome {
    /// The INT8 codes and scales of every quantized linear of `model` (the model this run left).
    pub fn int8_layers(&self, model: &Llama) -> Result<Vec<(String, Int8Layer)>> {
        let mut out = Vec::with_capacity(self.scales.len());
        for (name, scales) in &self.scales {
            let (b, kind) = parse_module(name)?;
            let w = model.linear(b, kind).ok_or_else(|| Error::Model(format!("{name}: no such layer")))?;
            let [rows, cols] = w.dims2().map_err(Error::model)?;
            let layer = Int8Layer::from_dequantized(&w.to_f32_vec(), rows, cols, scales)
                .map_err(|e| Error::Model(format!("{name}: {e}")))?;
            out.push((name.clone(), layer));
        }
        Ok(out)
    }
}

fn parse_module(name: &str) -> Result<(usize, LinearKind)> {
    let bad = || Error::Model(format!("{name} is not a decoder linear's module name"));
    let rest = name.strip_prefix("model.layers.").ok_or_else(bad)?;
    let (b, _) = rest.split_once('.').ok_or_else(bad)?;
    let b: usize = b.parse().map_err(|_| bad())?;
    Ok((b, linear_kind_of(name, b).ok_or_else(bad)?))
}

/// Progress events for a bar.
pub enum QuantProgress {
    Kurtosis { block: usize, blocks: usize },
    Block { block: usize, blocks: usize },
}

/// Checks the recipe against the model before any work.
pub fn preflight(model: &Llama, recipe: &QuantizeRecipe) -> Result<()> {
    recipe.validate().map_err(|e| Error::Recipe(e.to_string()))?;
    let linears = model.num_layers() * LinearKind::ALL.len();
    if recipe.skip_by_kurtosis >= linears {
        return Err(Error::Recipe(format!(
            "skipByKurtosis: {} would leave no layer to quantize (the model has {linears} decoder linears)",
            recipe.skip_by_kurtosis
        )));
    }
    let ctx = model.config().max_position_embeddings;
    if recipe.calibration.seq_len > ctx {
        return Err(Error::Recipe(format!(
            "calibration.seqLen: {} exceeds the model's context of {ctx}",
            recipe.calibration.seq_len
        )));
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct QuantState {
    fingerprint: String,
    next_block: usize,
    kurtosis_ranking: Vec<KurtosisScore>,
    skipped: Vec<String>,
    layers: Vec<QuantLayerOutcome>,
}

/// Runs `recipe` on `model` in place: afterwards the model holds the smoothed norm gains, the
/// dequantized INT8 weights of the quantized linears and the smoothed float weights of the
/// skipped ones.
pub fn quantize_model(
    model: &mut Llama,
    recipe: &QuantizeRecipe,
    calib: &[Vec<u32>],
    opts: &RunOptions,
    progress: &mut dyn FnMut(QuantProgress),
) -> Result<QuantizeOutcome> {
    preflight(model, recipe)?;
    if calib.is_empty() {
        return Err(Error::Calibration("calibration: no samples".into()));
    }
    let t0 = Instant::now();
    let blocks = model.num_layers();
    let fp = fingerprint(model, recipe, calib)?;
    let ckpt = opts.checkpoint_dir.as_deref().map(Checkpoint::new);
    let mut scales_out: BTreeMap<String, Vec<f32>> = BTreeMap::new();

    let mut state = match ckpt.as_ref().map(|c| c.load::<QuantState>(&fp)).transpose()?.flatten() {
        Some(s) => {
            let c = ckpt.as_ref().expect("checkpoint present");
            for b in 0..s.next_block {
                restore_block(model, b, c.load_block(b)?, &mut scales_out)?;
            }
            s
        }
        None => {
            let kurtosis_ranking = if recipe.skip_by_kurtosis > 0 {
                kurtosis_ranking(model, recipe, calib, progress)?
            } else {
                Vec::new()
            };
            let skipped = kurtosis_ranking.iter().take(recipe.skip_by_kurtosis).map(|k| k.name.clone()).collect();
            QuantState { fingerprint: fp.clone(), next_block: 0, kurtosis_ranking, skipped, layers: Vec::new() }
        }
    };
    let resumed_at = (state.next_block > 0).then_some(state.next_block);

    let mut xs: Vec<Vec<f32>> = if state.next_block > 0 {
        ckpt.as_ref().expect("resumed from a checkpoint").load_activations(calib, model.config().hidden_size)?
    } else {
        calib.iter().map(|s| model.embed(s)).collect::<std::result::Result<_, _>>().map_err(Error::model)?
    };

    for b in state.next_block..blocks {
        progress(QuantProgress::Block { block: b, blocks });
        let mut hessians: BTreeMap<LinearInput, Hessian> =
            ALL_INPUTS.iter().map(|&i| (i, Hessian::new(input_width(model, i)))).collect();
        let mut acts: BTreeMap<LinearInput, ActStats> =
            SMOOTHED_INPUTS.iter().map(|&i| (i, ActStats::new(input_width(model, i)))).collect();
        calibration_pass(model, b, &mut xs, Pass::Observe, &mut |input, act| {
            if let Some(h) = hessians.get_mut(&input) {
                h.add_batch(act, act.len() / h.cols())?;
            }
            if let Some(a) = acts.get_mut(&input) {
                a.add(act)?;
            }
            Ok(())
        })?;

        let mut saved: Vec<(String, Weight)> = Vec::new();
        if recipe.smoothquant_alpha > 0.0 {
            for input in SMOOTHED_INPUTS {
                let s = smooth_block(model, b, input, &acts[&input].abs_max, recipe.smoothquant_alpha)?;
                hessians.get_mut(&input).expect("every input").divide_inputs(&s)?;
                let gain = model.norm_gain(b, input).expect("smoothed inputs have a norm").clone();
                saved.push((norm_name(b, input), gain));
            }
        }
        drop(acts);

        for kind in LinearKind::ALL {
            let t = Instant::now();
            let name = format!("model.layers.{b}.{}", kind.hf_name());
            let w = model.linear(b, kind).expect("every block has its linears");
            let [rows, cols] = w.dims2().map_err(Error::model)?;
            let mut v = w.to_f32_vec();
            let zeros_before = count_zeros(&v);
            let skip = state.skipped.contains(&name);
            let (quantized, damp_used, obs_loss) = if skip {
                (None, None, None)
            } else {
                match recipe.rounding {
                    WeightRounding::Gptq => {
                        let cfg = GptqConfig {
                            blocksize: recipe.block_size,
                            percdamp: recipe.dampening,
                            actorder: recipe.actorder,
                            keep_zeros: true,
                            ..GptqConfig::default()
                        };
                        let (layer, rep) = gptq(&mut v, rows, cols, &hessians[&kind.input()], &cfg)
                            .map_err(|e| Error::Model(format!("{name}: {e}")))?;
                        (Some(layer), Some(rep.damp_used), Some(rep.obs_loss))
                    }
                    WeightRounding::Nearest => (Some(rtn(&mut v, rows, cols)?), None, None),
                }
            };
            let new = Weight::from_f32(vec![rows, cols], v).map_err(Error::model)?;
            let zeros_after = new.count_zeros();
            model.set_linear(b, kind, new.clone()).map_err(Error::model)?;
            if let Some(layer) = &quantized {
                let s = Weight::from_f32(vec![rows, 1], layer.scales.clone()).map_err(Error::model)?;
                saved.push((format!("{name}.weight_scale"), s));
                scales_out.insert(name.clone(), layer.scales.clone());
            }
            saved.push((name.clone(), new));
            state.layers.push(QuantLayerOutcome {
                name,
                rows,
                cols,
                quantized: quantized.is_some(),
                zeros_before,
                zeros_after,
                damp_used,
                obs_loss,
                seconds: t.elapsed().as_secs_f64(),
            });
        }
        drop(hessians);
        if b + 1 < blocks {
            calibration_pass(model, b, &mut xs, Pass::Advance, &mut |_, _| Ok(()))?;
        }
        state.next_block = b + 1;
        if let Some(c) = &ckpt {
            c.save(&state, b, &saved, &xs)?;
        }
        if opts.stop_after_blocks == Some(b + 1) && b + 1 < blocks {
            return Err(Error::Interrupted { next_block: b + 1 });
        }
    }
    let zeros_before = state.layers.iter().map(|l| l.zeros_before).sum();
    let zeros_after = state.layers.iter().map(|l| l.zeros_after).sum();
    let summary = QuantizeSummary {
        scheme: recipe.scheme,
        rounding: recipe.rounding,
        smoothquant_alpha: recipe.smoothquant_alpha,
        actorder: recipe.actorder,
        kurtosis_ranking: state.kurtosis_ranking,
        skipped: state.skipped,
        layers: state.layers,
        zeros_before,
        zeros_after,
        seconds: t0.elapsed().as_secs_f64(),
        resumed_at_block: resumed_at,
    };
    Ok(QuantizeOutcome { summary, scales: scales_out })
}

fn count_zeros(v: &[f32]) -> usize {
    v.iter().filter(|&&x| x == 0.0).count()
}

fn norm_name(b: usize, input: LinearInput) -> String {
    match input {
        LinearInput::Attention => format!("model.layers.{b}.input_layernorm"),
        _ => format!("model.layers.{b}.post_attention_layernorm"),
    }
}

/// Puts a finished block's checkpointed tensors back: smoothed norm gains, linears, and the
/// scales of the quantized ones.
fn restore_block(
    model: &mut Llama,
    b: usize,
    tensors: Vec<(String, Weight)>,
    scales: &mut BTreeMap<String, Vec<f32>>,
) -> Result<()> {
    let ck = |e: lacuna_model::Error| Error::Checkpoint(e.to_string());
    for (name, w) in tensors {
        if let Some(module) = name.strip_suffix(".weight_scale") {
            scales.insert(module.to_owned(), w.to_f32_vec());
        } else if let Some(kind) = linear_kind_of(&name, b) {
            model.set_linear(b, kind, w).map_err(ck)?;
        } else if let Some(input) = SMOOTHED_INPUTS.into_iter().find(|&i| name == norm_name(b, i)) {
            model.set_norm_gain(b, input, w).map_err(ck)?;
        } else {
            return Err(Error::Checkpoint(format!("unexpected tensor {name} in block {b}")));
        }
    }
    Ok(())
}

/// Smooths the linears reading `input` of block `b` in place and returns the scales.
fn smooth_block(model: &mut Llama, b: usize, input: LinearInput, act_max: &[f32], alpha: f64) -> Result<Vec<f32>> {
    let group = smoothed_group(input);
    let ws: Vec<(Vec<f32>, usize)> = group
        .iter()
        .map(|&k| {
            let w = model.linear(b, k).expect("every block has its linears");
            (w.to_f32_vec(), w.shape()[0])
        })
        .collect();
    let refs: Vec<(&[f32], usize)> = ws.iter().map(|(w, r)| (w.as_slice(), *r)).collect();
    let s = smoothing_scales(act_max, &refs, alpha)?;
    apply_smoothing(model, b, input, &s)?;
    Ok(s)
}

/// Folds `s` into block `b`: the norm gain producing `input` divided by it, the columns of the
/// linears reading `input` multiplied by it (both kept in f32).
pub fn apply_smoothing(model: &mut Llama, b: usize, input: LinearInput, s: &[f32]) -> Result<()> {
    let gain = model.norm_gain(b, input).ok_or_else(|| Error::Model(format!("no norm produces {input:?}")))?;
    if gain.len() != s.len() {
        return Err(Error::Shape { what: "smoothing scales", expected: gain.len(), got: s.len() });
    }
    let g: Vec<f32> = gain.to_f32_vec().iter().zip(s).map(|(g, k)| g / k).collect();
    model.set_norm_gain(b, input, Weight::from_f32(vec![s.len()], g).map_err(Error::model)?).map_err(Error::model)?;
    for &k in smoothed_group(input) {
        let w = model.linear(b, k).expect("every block has its linears");
        let shape = w.shape().to_vec();
        let mut v = w.to_f32_vec();
        scale_columns(&mut v, s);
        model.set_linear(b, k, Weight::from_f32(shape, v).map_err(Error::model)?).map_err(Error::model)?;
    }
    Ok(())
}

/// The pre-pass: every decoder linear's input kurtosis on the float model, highest first.
fn kurtosis_ranking(
    model: &Llama,
    recipe: &QuantizeRecipe,
    calib: &[Vec<u32>],
    progress: &mut dyn FnMut(QuantProgress),
) -> Result<Vec<KurtosisScore>> {
    let blocks = model.num_layers();
    let mut xs: Vec<Vec<f32>> =
        calib.iter().map(|s| model.embed(s)).collect::<std::result::Result<_, _>>().map_err(Error::model)?;
    let mut scores = Vec::with_capacity(blocks * LinearKind::ALL.len());
    for b in 0..blocks {
        progress(QuantProgress::Kurtosis { block: b, blocks });
        let mut acts: BTreeMap<LinearInput, ActStats> =
            ALL_INPUTS.iter().map(|&i| (i, ActStats::new(input_width(model, i)))).collect();
        calibration_pass(model, b, &mut xs, Pass::Advance, &mut |input, act| match acts.get_mut(&input) {
            Some(a) => a.add(act),
            None => Ok(()),
        })?;
        let mut per_input = BTreeMap::new();
        for input in ALL_INPUTS {
            let a = &acts[&input];
            let group = smoothed_group(input);
            let k = if group.is_empty() || recipe.smoothquant_alpha == 0.0 {
                a.kurtosis(None)
            } else {
                let ws: Vec<(Vec<f32>, usize)> = group
                    .iter()
                    .map(|&k| {
                        let w = model.linear(b, k).expect("every block has its linears");
                        (w.to_f32_vec(), w.shape()[0])
                    })
                    .collect();
                let refs: Vec<(&[f32], usize)> = ws.iter().map(|(w, r)| (w.as_slice(), *r)).collect();
                let s = smoothing_scales(&a.abs_max, &refs, recipe.smoothquant_alpha)?;
                a.kurtosis(Some(&s))
            };
            per_input.insert(input, k);
        }
        for kind in LinearKind::ALL {
            scores.push(KurtosisScore {
                name: format!("model.layers.{b}.{}", kind.hf_name()),
                kurtosis: per_input[&kind.input()],
            });
        }
    }
    // Stable: equal scores keep model order.
    scores.sort_by(|a, b| b.kurtosis.total_cmp(&a.kurtosis));
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use lacuna_model::LlamaConfig;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A 2-layer, 32-wide random Llama (GQA 4/2), a third of every linear's weights zero.
    fn tiny() -> Llama {
        let c = LlamaConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            max_position_embeddings: 1024,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![0],
            torch_dtype: Some("float32".into()),
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut t = BTreeMap::new();
        let mut rand = |shape: Vec<usize>, around: f32, zeros: f64| {
            let n: usize = shape.iter().product();
            let v = (0..n)
                .map(|_| if rng.random::<f64>() < zeros { 0.0 } else { around + rng.random_range(-0.4f32..0.4) })
                .collect();
            Weight::from_f32(shape, v).unwrap()
        };
        t.insert("model.embed_tokens.weight".to_owned(), rand(vec![64, 32], 0.0, 0.0));
        t.insert("model.norm.weight".to_owned(), rand(vec![32], 1.0, 0.0));
        for b in 0..2 {
            let p = format!("model.layers.{b}");
            t.insert(format!("{p}.input_layernorm.weight"), rand(vec![32], 1.0, 0.0));
            t.insert(format!("{p}.post_attention_layernorm.weight"), rand(vec![32], 1.0, 0.0));
            for (k, shape) in [
                (LinearKind::Q, vec![32, 32]),
                (LinearKind::K, vec![16, 32]),
                (LinearKind::V, vec![16, 32]),
                (LinearKind::O, vec![32, 32]),
                (LinearKind::Gate, vec![64, 32]),
                (LinearKind::Up, vec![64, 32]),
                (LinearKind::Down, vec![32, 64]),
            ] {
                t.insert(format!("{p}.{}.weight", k.hf_name()), rand(shape, 0.0, 1.0 / 3.0));
            }
        }
        Llama::load(c, t, Path::new("tiny")).unwrap()
    }

    fn run(m: &Llama, tokens: &[u32]) -> Vec<f32> {
        let mut x = m.embed(tokens).unwrap();
        for b in 0..m.num_layers() {
            m.layer_forward(b, &mut x, &mut |_, _| {}).unwrap();
        }
        x
    }

    fn calib() -> Vec<Vec<u32>> {
        (0..3).map(|s| (0..24).map(|i| ((i * 7 + s * 13) % 64) as u32).collect()).collect()
    }

    #[test]
    fn smoothing_preserves_the_function() {
        let m = tiny();
        let tokens: Vec<u32> = (0..20).map(|i| (i * 5 % 64) as u32).collect();
        let reference = run(&m, &tokens);
        let mut smoothed = m.clone();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for b in 0..2 {
            for input in SMOOTHED_INPUTS {
                // Scales over four orders of magnitude, as outlier channels produce.
                let s: Vec<f32> = (0..32).map(|_| 10f32.powf(rng.random_range(-2.0f32..2.0))).collect();
                apply_smoothing(&mut smoothed, b, input, &s).unwrap();
            }
        }
        assert_ne!(
            smoothed.linear(0, LinearKind::Q).unwrap().to_f32_vec(),
            m.linear(0, LinearKind::Q).unwrap().to_f32_vec()
        );
        let out = run(&smoothed, &tokens);
        let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
        let max = out.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // f32 rounding of the rescaled gains and weights only.
        assert!(max <= 1e-5 * scale, "max |smoothed − original| = {max} (scale {scale})");
    }

    #[test]
    fn quantized_model_keeps_masks_and_resumes_bit_identically() {
        let recipe: QuantizeRecipe = lacuna_api::from_yaml("blockSize: 8\nskipByKurtosis: 3\n").unwrap();
        let calib = calib();
        let base = tiny();
        let mut whole = base.clone();
        let out = quantize_model(&mut whole, &recipe, &calib, &RunOptions::default(), &mut |_| {}).unwrap();
        let s = &out.summary;
        assert_eq!(s.layers.len(), 14);
        assert_eq!(s.skipped.len(), 3);
        assert_eq!(s.kurtosis_ranking.len(), 14);
        assert!(s.kurtosis_ranking.windows(2).all(|w| w[0].kurtosis >= w[1].kurtosis));
        assert_eq!(out.scales.len(), 11);
        for b in 0..2 {
            for k in LinearKind::ALL {
                let w0 = base.linear(b, k).unwrap().to_f32_vec();
                let w1 = whole.linear(b, k).unwrap().to_f32_vec();
                for (a, q) in w0.iter().zip(&w1) {
                    if *a == 0.0 {
                        assert_eq!(*q, 0.0, "block {b} {k:?}: a zero moved");
                    }
                }
            }
        }
        // Codes recovered from the dequantized weights are INT8 and reproduce them.
        for (name, layer) in out.int8_layers(&whole).unwrap() {
            let (b, k) = parse_module(&name).unwrap();
            assert_eq!(layer.dequantize(), whole.linear(b, k).unwrap().to_f32_vec(), "{name}");
            assert!(layer.codes.iter().all(|&c| c != i8::MIN));
        }

        let dir = std::env::temp_dir().join(format!("lacuna-quantize-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = RunOptions { checkpoint_dir: Some(dir.clone()), stop_after_blocks: Some(1) };
        let mut first = base.clone();
        let err = quantize_model(&mut first, &recipe, &calib, &opts, &mut |_| {}).err().expect("interrupted");
        assert!(matches!(err, Error::Interrupted { next_block: 1 }), "{err}");
        let mut resumed = base.clone();
        let opts = RunOptions { checkpoint_dir: Some(dir.clone()), stop_after_blocks: None };
        let out2 = quantize_model(&mut resumed, &recipe, &calib, &opts, &mut |_| {}).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(out2.summary.resumed_at_block, Some(1));
        assert_eq!(out2.scales, out.scales);
        for ((n, a), (_, b)) in whole.tensors().iter().zip(resumed.tensors().iter()) {
            assert_eq!(&*a.bytes(), &*b.bytes(), "{n} differs after resume");
        }
    }

    #[test]
    fn bad_recipes_are_refused_naming_the_field() {
        let m = tiny();
        let r: QuantizeRecipe = lacuna_api::from_yaml("skipByKurtosis: 14\n").unwrap();
        assert!(preflight(&m, &r).unwrap_err().to_string().contains("skipByKurtosis"));
        let r: QuantizeRecipe = lacuna_api::from_yaml("smoothquantAlpha: -0.1\n").unwrap();
        assert!(preflight(&m, &r).unwrap_err().to_string().contains("smoothquantAlpha"));
        let r: QuantizeRecipe = lacuna_api::from_yaml("calibration: {seqLen: 4096}\n").unwrap();
        assert!(preflight(&m, &r).unwrap_err().to_string().contains("calibration.seqLen"));
    }
}
