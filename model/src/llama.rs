//! The Llama architecture: loading from HF-named tensors and the reference forward pass with a
//! KV cache. Weight names mirror Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`);
//! GGUF files are translated to those names (and Q/K un-permuted) once, in `load`.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use lacuna_kernels::attention::HeadCache;
use lacuna_kernels::causal;
use lacuna_kernels::dense::{Strided, gemm_strided};
use lacuna_kernels::matrix::{Product, Scratch, matmul_many};

use crate::config::LlamaConfig;
use crate::kv::round_through;
pub use crate::kv::{KvCache, KvDtype};
use crate::weights::Weight;
use crate::{Error, Result};

/// An RMSNorm weight, kept both as stored (for saving) and widened (for compute).
#[derive(Clone)]
pub(crate) struct Norm {
    weight: Weight,
    pub(crate) w: Vec<f32>,
}

impl Norm {
    fn new(weight: Weight) -> Self {
        let w = weight.to_f32_vec();
        Self { weight, w }
    }
}

#[derive(Clone)]
pub(crate) struct DecoderLayer {
    pub(crate) input_layernorm: Norm,
    pub(crate) q_proj: Weight,
    pub(crate) k_proj: Weight,
    pub(crate) v_proj: Weight,
    pub(crate) o_proj: Weight,
    pub(crate) post_attention_layernorm: Norm,
    pub(crate) gate_proj: Weight,
    pub(crate) up_proj: Weight,
    pub(crate) down_proj: Weight,
}

impl DecoderLayer {
    pub(crate) fn linears(&self) -> [&Weight; 7] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj, &self.gate_proj, &self.up_proj, &self.down_proj]
    }
    fn linears_mut(&mut self) -> [&mut Weight; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

/// Cloning shares memory-mapped weights and copies owned ones.
#[derive(Clone)]
pub struct Llama {
    config: LlamaConfig,
    pub(crate) embed_tokens: Weight,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: Norm,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<Weight>,
    /// The output projection quantized to W8A8 by [`Llama::quantize_lm_head`]: logits run on it
    /// (the embedding lookup keeps the float table, and checkpoints save the float head).
    int8_head: Option<Weight>,
    /// W8A8 products of the reference forward through their dequantized f32 form on inputs
    /// quantized in f32 (see [`Llama::set_int8_reference`]).
    int8_reference: bool,
    pub(crate) inv_freq: Vec<f32>,
}

/// The seven linear sublayers of a decoder layer, by their Hugging Face names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    pub const ALL: [LinearKind; 7] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// `self_attn.q_proj`, `mlp.down_proj`, ...
    pub fn hf_name(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
    }

    /// Which activation feeds this sublayer (Q/K/V share one, as do gate/up).
    pub fn input(self) -> LinearInput {
        match self {
            LinearKind::Q | LinearKind::K | LinearKind::V => LinearInput::Attention,
            LinearKind::O => LinearInput::AttentionOutput,
            LinearKind::Gate | LinearKind::Up => LinearInput::Mlp,
            LinearKind::Down => LinearInput::MlpActivation,
        }
    }
}

/// The four distinct activations that feed a decoder layer's linear sublayers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearInput {
    /// Normed residual stream into Q/K/V.
    Attention,
    /// Attention heads' output into O.
    AttentionOutput,
    /// Normed residual stream into gate/up.
    Mlp,
    /// `silu(gate) · up` into down.
    MlpActivation,
}

/// Per-call buffers of one layer step, reused across layers.
struct LayerScratch {
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// The products' own scratch (see [`matmul_many`]).
    products: Scratch,
    /// RoPE tables (`[n, head_dim / 2]`) of positions `rope_from ..`, computed once for every
    /// layer of a forward (`None` until then).
    rope_from: Option<usize>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl LayerScratch {
    fn new(c: &LlamaConfig, n: usize) -> Self {
        Self {
            h: vec![0f32; n * c.hidden_size],
            q: vec![0f32; n * c.q_dim()],
            k: vec![0f32; n * c.kv_dim()],
            v: vec![0f32; n * c.kv_dim()],
            o: vec![0f32; n * c.hidden_size],
            gate: vec![0f32; n * c.intermediate_size],
            up: vec![0f32; n * c.intermediate_size],
            products: Scratch::new(),
            rope_from: None,
            cos: Vec::new(),
            sin: Vec::new(),
        }
    }
}

/// Maps a GGUF (llama.cpp) tensor name to its Hugging Face name.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_owned());
    }
    let rest = name.strip_prefix("blk.")?;
    let (idx, tail) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let hf = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{idx}.{hf}"))
}

/// Undoes llama.cpp's Q/K row permutation (its converter interleaves the two rotary halves of each
/// head so that RoPE rotates adjacent pairs): row `h·d + 2i + j` of the GGUF tensor is row
/// `h·d + j·d/2 + i` of the Hugging Face one.
pub fn unpermute_qk<T: Copy>(rows_data: &[T], rows: usize, cols: usize, n_head: usize) -> Result<Vec<T>> {
    if n_head == 0
        || !rows.is_multiple_of(n_head)
        || !(rows / n_head).is_multiple_of(2)
        || rows_data.len() != rows * cols
    {
        return Err(Error::Invalid(format!("cannot un-permute a [{rows}, {cols}] Q/K weight over {n_head} heads")));
    }
    let d = rows / n_head;
    let mut out = Vec::with_capacity(rows_data.len());
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..d / 2 {
                let src = h * d + 2 * i + j;
                out.extend_from_slice(&rows_data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

fn take(tensors: &mut BTreeMap<String, Weight>, name: &str, shape: &[usize], origin: &Path) -> Result<Weight> {
    let w = tensors.remove(name).ok_or_else(|| Error::Config {
        path: origin.to_path_buf(),
        msg: format!("checkpoint has no tensor `{name}`"),
    })?;
    if w.shape() != shape {
        return Err(Error::Config {
            path: origin.to_path_buf(),
            msg: format!("tensor `{name}` has shape {:?}, the config implies {shape:?}", w.shape()),
        });
    }
    Ok(w)
}

impl Llama {
    /// Builds the model from tensors named as in Hugging Face checkpoints. Shapes are checked
    /// against `config`; `origin` names the checkpoint in errors.
    pub fn load(config: LlamaConfig, mut tensors: BTreeMap<String, Weight>, origin: &Path) -> Result<Self> {
        config.validate(origin)?;
        let c = &config;
        let (h, q, kv, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let t = &mut tensors;
        let embed_tokens = take(t, "model.embed_tokens.weight", &[c.vocab_size, h], origin)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: Norm::new(take(t, &format!("{p}.input_layernorm.weight"), &[h], origin)?),
                q_proj: take(t, &format!("{p}.self_attn.q_proj.weight"), &[q, h], origin)?,
                k_proj: take(t, &format!("{p}.self_attn.k_proj.weight"), &[kv, h], origin)?,
                v_proj: take(t, &format!("{p}.self_attn.v_proj.weight"), &[kv, h], origin)?,
                o_proj: take(t, &format!("{p}.self_attn.o_proj.weight"), &[h, q], origin)?,
                post_attention_layernorm: Norm::new(take(
                    t,
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                    origin,
                )?),
                gate_proj: take(t, &format!("{p}.mlp.gate_proj.weight"), &[f, h], origin)?,
                up_proj: take(t, &format!("{p}.mlp.up_proj.weight"), &[f, h], origin)?,
                down_proj: take(t, &format!("{p}.mlp.down_proj.weight"), &[h, f], origin)?,
            });
        }
        let norm = Norm::new(take(t, "model.norm.weight", &[h], origin)?);
        let lm_head = if t.contains_key("lm_head.weight") {
            let w = take(t, "lm_head.weight", &[c.vocab_size, h], origin)?;
            // A file may carry a copy of the embedding even when tied; it then is redundant.
            if c.tie_word_embeddings { None } else { Some(w) }
        } else {
            None
        };
        for leftover in t.keys() {
            tracing::debug!("ignoring tensor {leftover} of {}", origin.display());
        }
        let mut config = config;
        config.tie_word_embeddings = lm_head.is_none();
        let inv_freq = config.inv_freq();
        Ok(Self { config, embed_tokens, layers, norm, lm_head, int8_head: None, int8_reference: false, inv_freq })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Every tensor under its Hugging Face name, in checkpoint order (what `save` writes).
    pub fn tensors(&self) -> Vec<(String, &Weight)> {
        let mut v = vec![("model.embed_tokens.weight".to_owned(), &self.embed_tokens)];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.input_layernorm.weight"), &l.input_layernorm.weight));
            v.push((format!("{p}.self_attn.q_proj.weight"), &l.q_proj));
            v.push((format!("{p}.self_attn.k_proj.weight"), &l.k_proj));
            v.push((format!("{p}.self_attn.v_proj.weight"), &l.v_proj));
            v.push((format!("{p}.self_attn.o_proj.weight"), &l.o_proj));
            v.push((format!("{p}.post_attention_layernorm.weight"), &l.post_attention_layernorm.weight));
            v.push((format!("{p}.mlp.gate_proj.weight"), &l.gate_proj));
            v.push((format!("{p}.mlp.up_proj.weight"), &l.up_proj));
            v.push((format!("{p}.mlp.down_proj.weight"), &l.down_proj));
        }
        v.push(("model.norm.weight".to_owned(), &self.norm.weight));
        if let Some(w) = &self.lm_head {
            v.push(("lm_head.weight".to_owned(), w));
        }
        v
    }

    /// Runs `tokens` (positions `cache.len()..`) through the model, appending to the cache, and
    /// returns the final-normed hidden states `[tokens.len(), hidden]`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = tokens.len();
        cache.check(c, n)?;
        let (pos0, dtype) = (cache.len, cache.dtype());
        let mut x = self.embed(tokens)?;
        let mut scratch = LayerScratch::new(c, n);
        for li in 0..self.layers.len() {
            cache.with_f32_layer(li, n, |k, v| {
                self.layer_step(li, &mut x, n, pos0, dtype, k, v, &mut scratch, true, &mut |_, _| {})
            })?;
        }
        cache.len = pos0 + n;
        let mut out = vec![0f32; n * c.hidden_size];
        rms_norm(&x, &self.norm.w, c.rms_norm_eps as f32, &mut out);
        Ok(out)
    }

    /// Embedding rows of `tokens`, `[n, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let mut x = vec![0f32; tokens.len() * h];
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= vocab {
                return Err(Error::Invalid(format!("token id {t} is outside the vocabulary of {vocab}")));
            }
            self.embed_tokens.row_into(t as usize, &mut x[i * h..(i + 1) * h])?;
        }
        Ok(x)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Runs decoder layer `layer` over one sequence `x` (`[seq, hidden]`, positions `0..seq`, no
    /// cache) in place, reporting the input of every linear sublayer to `observe` before it is
    /// used. Calibration (pruning, quantization) is built on this.
    pub fn layer_forward(
        &self,
        layer: usize,
        x: &mut [f32],
        observe: &mut dyn FnMut(LinearInput, &[f32]),
    ) -> Result<()> {
        self.layer_calibrate(layer, x, true, observe)
    }

    /// What [`Llama::layer_forward`] reports to `observe`, for calibration statistics alone: the
    /// run stops once the down projection's input is reported, skipping that product (a quarter
    /// of a Llama layer's weights) and leaving `x` holding an intermediate state, not the
    /// layer's output.
    pub fn layer_observe(
        &self,
        layer: usize,
        x: &mut [f32],
        observe: &mut dyn FnMut(LinearInput, &[f32]),
    ) -> Result<()> {
        self.layer_calibrate(layer, x, false, observe)
    }

    fn layer_calibrate(
        &self,
        layer: usize,
        x: &mut [f32],
        down: bool,
        observe: &mut dyn FnMut(LinearInput, &[f32]),
    ) -> Result<()> {
        let c = &self.config;
        if layer >= self.layers.len() || !x.len().is_multiple_of(c.hidden_size) {
            return Err(Error::Invalid(format!(
                "layer {layer} of {} over {} values of width {}",
                self.layers.len(),
                x.len(),
                c.hidden_size
            )));
        }
        let n = x.len() / c.hidden_size;
        let mut k = vec![0f32; n * c.kv_dim()];
        let mut v = vec![0f32; n * c.kv_dim()];
        let mut scratch = LayerScratch::new(c, n);
        self.layer_step(layer, x, n, 0, KvDtype::F32, &mut k, &mut v, &mut scratch, down, observe)
    }

    /// The weight of one linear sublayer.
    pub fn linear(&self, layer: usize, kind: LinearKind) -> Option<&Weight> {
        let l = self.layers.get(layer)?;
        Some(match kind {
            LinearKind::Q => &l.q_proj,
            LinearKind::K => &l.k_proj,
            LinearKind::V => &l.v_proj,
            LinearKind::O => &l.o_proj,
            LinearKind::Gate => &l.gate_proj,
            LinearKind::Up => &l.up_proj,
            LinearKind::Down => &l.down_proj,
        })
    }

    /// Replaces the weight of one linear sublayer (same shape).
    pub fn set_linear(&mut self, layer: usize, kind: LinearKind, w: Weight) -> Result<()> {
        let n = self.layers.len();
        let l = self.layers.get_mut(layer).ok_or_else(|| Error::Invalid(format!("layer {layer} of {n}")))?;
        let slot = match kind {
            LinearKind::Q => &mut l.q_proj,
            LinearKind::K => &mut l.k_proj,
            LinearKind::V => &mut l.v_proj,
            LinearKind::O => &mut l.o_proj,
            LinearKind::Gate => &mut l.gate_proj,
            LinearKind::Up => &mut l.up_proj,
            LinearKind::Down => &mut l.down_proj,
        };
        if slot.shape() != w.shape() {
            return Err(Error::Invalid(format!(
                "layer {layer} {}: new weight {:?} does not match {:?}",
                kind.hf_name(),
                w.shape(),
                slot.shape()
            )));
        }
        *slot = w;
        Ok(())
    }

    /// The RMSNorm gain that produces `input` (the input layernorm for Q/K/V, the
    /// post-attention layernorm for gate/up); `None` for inputs no norm produces.
    pub fn norm_gain(&self, layer: usize, input: LinearInput) -> Option<&Weight> {
        let l = self.layers.get(layer)?;
        match input {
            LinearInput::Attention => Some(&l.input_layernorm.weight),
            LinearInput::Mlp => Some(&l.post_attention_layernorm.weight),
            LinearInput::AttentionOutput | LinearInput::MlpActivation => None,
        }
    }

    /// Replaces the RMSNorm gain that produces `input` (same shape); SmoothQuant folds its
    /// scales into it.
    pub fn set_norm_gain(&mut self, layer: usize, input: LinearInput, w: Weight) -> Result<()> {
        let n = self.layers.len();
        let l = self.layers.get_mut(layer).ok_or_else(|| Error::Invalid(format!("layer {layer} of {n}")))?;
        let slot = match input {
            LinearInput::Attention => &mut l.input_layernorm,
            LinearInput::Mlp => &mut l.post_attention_layernorm,
            other => return Err(Error::Invalid(format!("no norm produces the {other:?} input"))),
        };
        if slot.weight.shape() != w.shape() {
            return Err(Error::Invalid(format!(
                "layer {layer} {input:?} norm: new gain {:?} does not match {:?}",
                w.shape(),
                slot.weight.shape()
            )));
        }
        *slot = Norm::new(w);
        Ok(())
    }

    /// Stores every decoder linear in `sparse-bitmask` form where that streams at most
    /// [`crate::weights::BITMASK_MAX_BYTE_RATIO`] of its dense bytes, and densifies the bitmask
    /// ones where it does not; returns how many are bitmask afterwards.
    pub fn prefer_bitmask(&mut self) -> Result<usize> {
        let mut n = 0;
        for l in &mut self.layers {
            for w in l.linears_mut() {
                match w.to_bitmask_if_smaller()? {
                    Some(b) => {
                        *w = b;
                        n += 1;
                    }
                    None if w.runs_bitmask() => *w = w.densify(),
                    None => {}
                }
            }
        }
        Ok(n)
    }

    /// Every weight dense (the reference path).
    pub fn densify(&mut self) {
        for l in &mut self.layers {
            for w in l.linears_mut() {
                if w.runs_bitmask() {
                    *w = w.densify();
                }
            }
        }
    }

    /// Runs the logits on a W8A8 copy of the output projection (the tied embedding or
    /// `lm_head`): each row rounded to nearest on its own scale `max|row| / 127`, the final hidden
    /// states quantized per token, the product on the INT8 kernels. The embedding lookup keeps
    /// the float table and [`Llama::tensors`] the float head, so a saved model is unchanged; the
    /// copy adds `vocab · hidden` bytes (and a scale per row) to memory and streams a quarter of
    /// an f32 head's bytes per token.
    pub fn quantize_lm_head(&mut self) -> Result<()> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let [rows, cols] = head.dims2()?;
        let m = crate::int8::Int8Matrix::round_to_nearest(&head.to_f32_vec(), rows, cols)
            .with_input_quant(crate::int8::InputQuant::Int8PerToken);
        self.int8_head = Some(Weight::from_int8_matrix(m)?);
        Ok(())
    }

    /// Whether any decoder linear is a W8A8 layer (its input quantized per token).
    pub fn has_w8a8_layers(&self) -> bool {
        self.layers.iter().flat_map(|l| l.linears()).any(|w| w.quantizes_input())
    }

    /// Whether the logits run on a W8A8 head ([`Llama::quantize_lm_head`]).
    pub fn has_int8_lm_head(&self) -> bool {
        self.int8_head.is_some()
    }

    /// With `on`, the reference forward ([`Llama::forward`], [`Llama::logits`]) runs every W8A8
    /// product as [`Weight::matmul_dequantized`]: the dequantized f32 weights times inputs
    /// quantized per token in f32. That is the oracle tests hold the INT8 kernels to; the decode
    /// runtime always runs the kernels.
    pub fn set_int8_reference(&mut self, on: bool) {
        self.int8_reference = on;
    }

    /// `y = x · wᵀ` of one linear sublayer of the reference forward.
    fn product(&self, w: &Weight, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        if self.int8_reference { w.matmul_dequantized(x, n, y) } else { w.matmul(x, n, y) }
    }

    /// Bytes of weights one decode step streams: every decoder linear as stored and the LM head.
    pub fn weight_bytes_per_token(&self) -> usize {
        let head = self.lm_head().stored_bytes();
        head + self.layers.iter().flat_map(|l| l.linears()).map(|w| w.stored_bytes()).sum::<usize>()
    }

    /// One decoder layer over `n` new positions starting at `pos0`, keys/values written into
    /// `kc`/`vc` (`[≥ pos0 + n, kv_dim]`) as a cache of `kv` returns them. Without `down` it
    /// returns right after reporting the down projection's input (calibration statistics only).
    #[allow(clippy::too_many_arguments)]
    fn layer_step(
        &self,
        li: usize,
        x: &mut [f32],
        n: usize,
        pos0: usize,
        kv: KvDtype,
        kc: &mut [f32],
        vc: &mut [f32],
        s: &mut LayerScratch,
        down: bool,
        observe: &mut dyn FnMut(LinearInput, &[f32]),
    ) -> Result<()> {
        let c = &self.config;
        let layer = &self.layers[li];
        let eps = c.rms_norm_eps as f32;
        if s.rope_from != Some(pos0) || s.cos.len() != n * (c.head_dim / 2) {
            (s.cos, s.sin) = self.rope_tables(pos0, n);
            s.rope_from = Some(pos0);
        }
        rms_norm(x, &layer.input_layernorm.w, eps, &mut s.h);
        observe(LinearInput::Attention, &s.h);
        if self.int8_reference {
            self.product(&layer.q_proj, &s.h, n, &mut s.q)?;
            self.product(&layer.k_proj, &s.h, n, &mut s.k)?;
            self.product(&layer.v_proj, &s.h, n, &mut s.v)?;
        } else {
            // One group: a W8A8 input is quantized once for the three.
            let group = &mut [
                Product { w: layer.q_proj.matrix()?, y: &mut s.q },
                Product { w: layer.k_proj.matrix()?, y: &mut s.k },
                Product { w: layer.v_proj.matrix()?, y: &mut s.v },
            ];
            matmul_many(group, &s.h, n, &mut s.products)?;
        }
        apply_rope(&mut s.q, c.num_attention_heads, c.head_dim, &s.cos, &s.sin);
        apply_rope(&mut s.k, c.num_key_value_heads, c.head_dim, &s.cos, &s.sin);
        round_through(kv, &mut s.k);
        round_through(kv, &mut s.v);
        let kvd = c.kv_dim();
        kc[pos0 * kvd..(pos0 + n) * kvd].copy_from_slice(&s.k);
        vc[pos0 * kvd..(pos0 + n) * kvd].copy_from_slice(&s.v);
        let attn = self.attention(&s.q, kc, vc, pos0, n)?;
        observe(LinearInput::AttentionOutput, &attn);
        self.product(&layer.o_proj, &attn, n, &mut s.o)?;
        add_into(x, &s.o);

        rms_norm(x, &layer.post_attention_layernorm.w, eps, &mut s.h);
        observe(LinearInput::Mlp, &s.h);
        if self.int8_reference {
            self.product(&layer.gate_proj, &s.h, n, &mut s.gate)?;
            self.product(&layer.up_proj, &s.h, n, &mut s.up)?;
        } else {
            let group = &mut [
                Product { w: layer.gate_proj.matrix()?, y: &mut s.gate },
                Product { w: layer.up_proj.matrix()?, y: &mut s.up },
            ];
            matmul_many(group, &s.h, n, &mut s.products)?;
        }
        lacuna_kernels::activation::silu_mul(&mut s.gate, &s.up)?;
        observe(LinearInput::MlpActivation, &s.gate);
        if !down {
            return Ok(());
        }
        self.product(&layer.down_proj, &s.gate, n, &mut s.o)?;
        add_into(x, &s.o);
        Ok(())
    }

    /// Copies every weight a decode step streams (the decoder linears and the LM head) out of
    /// the checkpoint's file mapping into process memory; returns the bytes copied.
    ///
    /// Mapped weights live in the page cache on 4 KiB pages, which the kernel will not back with
    /// huge pages: a decode step over them takes a TLB miss every 4 KiB and the hardware
    /// prefetchers stop at each page boundary. In process memory they go on 2 MiB pages (see
    /// `lacuna_kernels::pages`). Measured on a dense W8A8 SmolLM2, whose int8 codes are mapped
    /// (docs/benchmarks.md). Costs one copy at load, and the page cache's copy stays until the
    /// system reclaims it.
    pub fn copy_mapped_weights(&mut self) -> usize {
        let mut bytes = 0;
        for layer in &mut self.layers {
            for w in layer.linears_mut() {
                bytes += w.copy_mapped_into_memory();
            }
        }
        match (&mut self.int8_head, &mut self.lm_head) {
            (Some(h), _) | (None, Some(h)) => bytes += h.copy_mapped_into_memory(),
            (None, None) => bytes += self.embed_tokens.copy_mapped_into_memory(),
        }
        bytes
    }

    /// The output projection logits run on: the W8A8 head of [`Llama::quantize_lm_head`], else
    /// `lm_head`, else the (tied) embedding.
    pub(crate) fn lm_head(&self) -> &Weight {
        self.int8_head.as_ref().or(self.lm_head.as_ref()).unwrap_or(&self.embed_tokens)
    }

    /// Logits `[n, vocab]` of final-normed hidden states `[n, hidden]`.
    pub fn logits(&self, hidden: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n * self.config.vocab_size];
        self.product(self.lm_head(), hidden, n, &mut out)?;
        Ok(out)
    }

    /// Forward `tokens` and return the logits of the last one.
    pub fn forward_last_logits(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let hs = self.forward(tokens, cache)?;
        let h = self.config.hidden_size;
        match tokens.len() {
            0 => Err(Error::Invalid("no tokens to run".into())),
            n => self.logits(&hs[(n - 1) * h..], 1),
        }
    }

    /// cos/sin of `pos · inv_freq` for positions `pos0..pos0+n`, `[n, head_dim/2]` each.
    fn rope_tables(&self, pos0: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in pos0..pos0 + n {
            for f in &self.inv_freq {
                // The angle in f64: positions reach 10⁵ and f32 would lose the phase.
                let a = p as f64 * *f as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (cos, sin)
    }

    /// Causal GQA attention of `n` new queries over `pos0 + n` cached positions, `[n, q_dim]`.
    ///
    /// One task per (head, block of [`QUERY_BLOCK`] queries): a block's queries see only the
    /// positions up to its last one, so the products stop there (half the multiply-adds of a
    /// full square at `pos0 = 0`), and the tasks are many and small enough for every thread.
    fn attention(&self, q: &[f32], kc: &[f32], vc: &[f32], pos0: usize, n: usize) -> Result<Vec<f32>> {
        let c = &self.config;
        let (hd, nh, kvd, qd) = (c.head_dim, c.num_attention_heads, c.kv_dim(), c.q_dim());
        let group = nh / c.num_key_value_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let blocks = n.div_ceil(QUERY_BLOCK);
        let outs: Vec<Result<Vec<f32>>> = (0..nh * blocks)
            .into_par_iter()
            .map(|task| {
                // The longest blocks (the last queries, which see the most keys) first, so that
                // the threads do not end on one long task each.
                let (head, b) = (task / blocks, blocks - 1 - task % blocks);
                let (i0, i1) = (b * QUERY_BLOCK, ((b + 1) * QUERY_BLOCK).min(n));
                let (rows, seen) = (i1 - i0, pos0 + i1);
                let g = head / group;
                let qh = Strided { rows, cols: hd, row_stride: qd, col_stride: 1 };
                let kh = Strided { rows: seen, cols: hd, row_stride: kvd, col_stride: 1 };
                let mut out = vec![0f32; rows * hd];
                let cache = |data| HeadCache { data, stride: kvd, offset: g * hd, len: seen };
                let qs = &q[i0 * qd + head * hd..];
                let block =
                    causal::Block { q: qs, q_stride: qd, rows, first: pos0 + i0, k: cache(kc), v: cache(vc), scale };
                if hd == causal::HEAD_DIM && causal::causal_block(&block, &mut out)? {
                    return Ok(out);
                }
                let mut scores = vec![0f32; rows * seen];
                gemm_strided(qs, qh, &kc[g * hd..], kh.t(), &mut scores, Strided::row_major(rows, seen))?;
                for (i, row) in scores.chunks_mut(seen).enumerate() {
                    let visible = pos0 + i0 + i + 1;
                    lacuna_kernels::activation::softmax_scaled(&mut row[..visible], scale);
                    row[visible..].fill(0.0);
                }
                gemm_strided(
                    &scores,
                    Strided::row_major(rows, seen),
                    &vc[g * hd..],
                    kh,
                    &mut out,
                    Strided::row_major(rows, hd),
                )?;
                Ok(out)
            })
            .collect();
        let mut attn = vec![0f32; n * qd];
        for (task, r) in outs.into_iter().enumerate() {
            let (head, b) = (task / blocks, blocks - 1 - task % blocks);
            let out = r?;
            for (i, o) in out.chunks_exact(hd).enumerate() {
                let row = b * QUERY_BLOCK + i;
                attn[row * qd + head * hd..row * qd + (head + 1) * hd].copy_from_slice(o);
            }
        }
        Ok(attn)
    }
}

/// Queries per task of the prefill attention.
const QUERY_BLOCK: usize = 64;

/// `out = x / sqrt(mean(x²) + eps) · w`, row by row (rows in parallel for a prefill).
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    let row = |(xr, or): (&[f32], &mut [f32])| {
        // One sequential sum: the summation order every reference of this norm uses.
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    };
    if x.len() >= PARALLEL_ROWS * d {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).with_min_len(PARALLEL_ROWS / 2).for_each(row);
    } else {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(row);
    }
}

/// Rows from which the element-wise steps of a layer run on every thread (a prefill).
const PARALLEL_ROWS: usize = 64;

/// Rotates the two halves of every head (Hugging Face's `rotate_half` convention).
pub(crate) fn apply_rope(x: &mut [f32], n_head: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    let row = |(t, row): (usize, &mut [f32])| {
        let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
        for head in row.chunks_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * c[i] - x1 * s[i];
                b[i] = x1 * c[i] + x0 * s[i];
            }
        }
    };
    let width = n_head * hd;
    if x.len() >= PARALLEL_ROWS * width {
        x.par_chunks_mut(width).enumerate().with_min_len(PARALLEL_ROWS / 2).for_each(row);
    } else {
        x.chunks_mut(width).enumerate().for_each(row);
    }
}

pub(crate) fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, d, cols) = (3, 8, 2);
        let rows = n_head * d;
        let hf: Vec<usize> = (0..rows * cols).collect();
        let mut gguf = vec![0; rows * cols];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let (src, dst) = (h * d + j * d / 2 + i, h * d + 2 * i + j);
                    gguf[dst * cols..(dst + 1) * cols].copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_qk(&gguf, rows, cols, n_head).unwrap(), hf);
        assert!(unpermute_qk(&gguf, rows, cols, 5).is_err());
    }

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(gguf_to_hf_name("blk.12.attn_k.weight").unwrap(), "model.layers.12.self_attn.k_proj.weight");
        assert_eq!(gguf_to_hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert!(gguf_to_hf_name("blk.x.attn_k.weight").is_none());
        assert!(gguf_to_hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut r = vec![1.0, 2.0, 3.0, 1000.0];
        lacuna_kernels::activation::softmax_scaled(&mut r, 0.5);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(r[3] > 0.99);
    }
}
