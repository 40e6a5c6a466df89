//! The Llama architecture: loading from HF-named tensors and the reference forward pass with a
//! KV cache. Weight names mirror Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`);
//! GGUF files are translated to those names (and Q/K un-permuted) once, in `load`.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use lacuna_kernels::dense::{Strided, gemm_strided};

use crate::config::LlamaConfig;
use crate::weights::Weight;
use crate::{Error, Result};

/// An RMSNorm weight, kept both as stored (for saving) and widened (for compute).
struct Norm {
    weight: Weight,
    w: Vec<f32>,
}

impl Norm {
    fn new(weight: Weight) -> Self {
        let w = weight.to_f32_vec();
        Self { weight, w }
    }
}

struct DecoderLayer {
    input_layernorm: Norm,
    q_proj: Weight,
    k_proj: Weight,
    v_proj: Weight,
    o_proj: Weight,
    post_attention_layernorm: Norm,
    gate_proj: Weight,
    up_proj: Weight,
    down_proj: Weight,
}

pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Weight,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<Weight>,
    inv_freq: Vec<f32>,
}

/// Keys and values of every layer for the positions seen so far, `[capacity, kv_dim]` per layer.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    kv_dim: usize,
}

impl KvCache {
    /// A cache for up to `capacity` positions (allocated up front: no allocation per token).
    pub fn new(config: &LlamaConfig, capacity: usize) -> Self {
        let kv_dim = config.kv_dim();
        let layer = || vec![0f32; capacity * kv_dim];
        Self {
            k: (0..config.num_hidden_layers).map(|_| layer()).collect(),
            v: (0..config.num_hidden_layers).map(|_| layer()).collect(),
            len: 0,
            capacity,
            kv_dim,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn clear(&mut self) {
        self.len = 0;
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
        Ok(Self { config, embed_tokens, layers, norm, lm_head, inv_freq })
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
        let (n, h) = (tokens.len(), c.hidden_size);
        let pos0 = cache.len;
        if pos0 + n > cache.capacity {
            return Err(Error::Invalid(format!(
                "{} positions exceed the KV cache capacity of {}",
                pos0 + n,
                cache.capacity
            )));
        }
        if cache.kv_dim != c.kv_dim() || cache.k.len() != self.layers.len() {
            return Err(Error::Invalid("KV cache was made for another model".into()));
        }
        let mut x = vec![0f32; n * h];
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= c.vocab_size {
                return Err(Error::Invalid(format!("token id {t} is outside the vocabulary of {}", c.vocab_size)));
            }
            self.embed_tokens.row_into(t as usize, &mut x[i * h..(i + 1) * h])?;
        }
        let (cos, sin) = self.rope_tables(pos0, n);
        let mut hbuf = vec![0f32; n * h];
        let mut q = vec![0f32; n * c.q_dim()];
        let mut k = vec![0f32; n * c.kv_dim()];
        let mut v = vec![0f32; n * c.kv_dim()];
        let mut o = vec![0f32; n * h];
        let mut gate = vec![0f32; n * c.intermediate_size];
        let mut up = vec![0f32; n * c.intermediate_size];
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.input_layernorm.w, c.rms_norm_eps as f32, &mut hbuf);
            layer.q_proj.matmul(&hbuf, n, &mut q)?;
            layer.k_proj.matmul(&hbuf, n, &mut k)?;
            layer.v_proj.matmul(&hbuf, n, &mut v)?;
            apply_rope(&mut q, c.num_attention_heads, c.head_dim, &cos, &sin);
            apply_rope(&mut k, c.num_key_value_heads, c.head_dim, &cos, &sin);
            let kv = c.kv_dim();
            cache.k[li][pos0 * kv..(pos0 + n) * kv].copy_from_slice(&k);
            cache.v[li][pos0 * kv..(pos0 + n) * kv].copy_from_slice(&v);
            let attn = self.attention(&q, &cache.k[li], &cache.v[li], pos0, n)?;
            layer.o_proj.matmul(&attn, n, &mut o)?;
            add_into(&mut x, &o);

            rms_norm(&x, &layer.post_attention_layernorm.w, c.rms_norm_eps as f32, &mut hbuf);
            layer.gate_proj.matmul(&hbuf, n, &mut gate)?;
            layer.up_proj.matmul(&hbuf, n, &mut up)?;
            silu_mul(&mut gate, &up);
            layer.down_proj.matmul(&gate, n, &mut o)?;
            add_into(&mut x, &o);
        }
        cache.len = pos0 + n;
        rms_norm(&x, &self.norm.w, c.rms_norm_eps as f32, &mut hbuf);
        Ok(hbuf)
    }

    /// Logits `[n, vocab]` of final-normed hidden states `[n, hidden]`.
    pub fn logits(&self, hidden: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n * self.config.vocab_size];
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens).matmul(hidden, n, &mut out)?;
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
    fn attention(&self, q: &[f32], kc: &[f32], vc: &[f32], pos0: usize, n: usize) -> Result<Vec<f32>> {
        let c = &self.config;
        let (hd, nh, kvd) = (c.head_dim, c.num_attention_heads, c.kv_dim());
        let group = nh / c.num_key_value_heads;
        let total = pos0 + n;
        let scale = 1.0 / (hd as f32).sqrt();
        let heads: Vec<Result<Vec<f32>>> = (0..nh)
            .into_par_iter()
            .map(|head| {
                let g = head / group;
                let qh = Strided { rows: n, cols: hd, row_stride: c.q_dim(), col_stride: 1 };
                let kh = Strided { rows: total, cols: hd, row_stride: kvd, col_stride: 1 };
                let mut scores = vec![0f32; n * total];
                gemm_strided(&q[head * hd..], qh, &kc[g * hd..], kh.t(), &mut scores, Strided::row_major(n, total))?;
                for (i, row) in scores.chunks_mut(total).enumerate() {
                    let visible = pos0 + i + 1;
                    softmax_scaled(&mut row[..visible], scale);
                    row[visible..].fill(0.0);
                }
                let mut out = vec![0f32; n * hd];
                gemm_strided(
                    &scores,
                    Strided::row_major(n, total),
                    &vc[g * hd..],
                    kh,
                    &mut out,
                    Strided::row_major(n, hd),
                )?;
                Ok(out)
            })
            .collect();
        let mut attn = vec![0f32; n * c.q_dim()];
        for (head, r) in heads.into_iter().enumerate() {
            let out = r?;
            for i in 0..n {
                attn[i * c.q_dim() + head * hd..i * c.q_dim() + (head + 1) * hd]
                    .copy_from_slice(&out[i * hd..(i + 1) * hd]);
            }
        }
        Ok(attn)
    }
}

/// `out = x / sqrt(mean(x²) + eps) · w`, row by row.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks(d).zip(out.chunks_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// Rotates the two halves of every head (Hugging Face's `rotate_half` convention).
fn apply_rope(x: &mut [f32], n_head: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for (t, row) in x.chunks_mut(n_head * hd).enumerate() {
        let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
        for head in row.chunks_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * c[i] - x1 * s[i];
                b[i] = x1 * c[i] + x0 * s[i];
            }
        }
    }
}

fn softmax_scaled(row: &mut [f32], scale: f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) * scale;
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v * scale - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
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
        softmax_scaled(&mut r, 0.5);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(r[3] > 0.99);
    }
}
