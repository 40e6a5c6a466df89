//! The Llama as a trainable candle graph: the weights of a [`lacuna_model::Llama`] as `Var`s, a
//! forward pass over a `[batch, seq]` token batch that returns logits and, on request, every
//! decoder block's output (what SquareHead distils), and the way back to a `lacuna_model::Llama`.
//!
//! The arithmetic is the reference model's (`lacuna_model::llama`): RMSNorm
//! `x / sqrt(mean(x²) + eps) · w`, RoPE on the two halves of each head (HF `rotate_half`) with the
//! angle computed in f64, GQA by repeating each KV head over its query group, SwiGLU
//! `down(silu(gate(x)) · up(x))`, logits through `lm_head` or the tied embedding.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor, Var};
use lacuna_model::weights::Weight;
use lacuna_model::{LinearKind, Llama, LlamaConfig};

use crate::attention;
use crate::linear::{self, SparseLayout};
use crate::{Error, Result};

/// Indices into [`TrainLlama::params`] of one decoder block.
#[derive(Clone, Debug)]
struct BlockParams {
    input_norm: usize,
    /// q, k, v, o, gate, up, down (the order of [`LinearKind::ALL`]).
    linears: [usize; 7],
    post_norm: usize,
}

/// What a forward pass returns.
pub struct ForwardOut {
    /// `[batch · seq, vocab]`.
    pub logits: Tensor,
    /// Each decoder block's output (the residual stream after it), `[batch · seq, hidden]`;
    /// empty unless asked for.
    pub hidden: Vec<Tensor>,
}

pub struct TrainLlama {
    config: LlamaConfig,
    device: Device,
    /// Hugging Face names, in `Llama::tensors()` order.
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    params: Vec<Var>,
    /// Per parameter: the frozen mask it is stored under, when it holds its kept values only
    /// ([`TrainLlama::pack`]); `None` for a dense parameter.
    packed: Vec<Option<Arc<SparseLayout>>>,
    embed: usize,
    blocks: Vec<BlockParams>,
    norm: usize,
    lm_head: Option<usize>,
    inv_freq: Vec<f32>,
    /// Forward only: weights enter the graph detached (a teacher, an evaluation).
    frozen: bool,
}

impl TrainLlama {
    /// The weights of `model` (any stored dtype, dense or bitmask) as f32 `Var`s on `device`.
    pub fn from_model(model: &Llama, device: &Device) -> Result<Self> {
        let config = model.config().clone();
        let mut names = Vec::new();
        let mut shapes = Vec::new();
        let mut params = Vec::new();
        let mut index = BTreeMap::new();
        for (name, w) in model.tensors() {
            let shape = w.shape().to_vec();
            let t = Tensor::from_vec(w.to_f32_vec(), shape.as_slice(), device)?;
            index.insert(name.clone(), params.len());
            params.push(Var::from_tensor(&t)?);
            names.push(name);
            shapes.push(shape);
        }
        let idx =
            |n: &str| index.get(n).copied().ok_or_else(|| Error::Recipe(format!("the model has no tensor `{n}`")));
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for b in 0..config.num_hidden_layers {
            let p = format!("model.layers.{b}");
            let mut linears = [0usize; 7];
            for (slot, k) in linears.iter_mut().zip(LinearKind::ALL) {
                *slot = idx(&format!("{p}.{}.weight", k.hf_name()))?;
            }
            blocks.push(BlockParams {
                input_norm: idx(&format!("{p}.input_layernorm.weight"))?,
                linears,
                post_norm: idx(&format!("{p}.post_attention_layernorm.weight"))?,
            });
        }
        let lm_head = index.get("lm_head.weight").copied();
        Ok(Self {
            inv_freq: config.inv_freq(),
            embed: idx("model.embed_tokens.weight")?,
            norm: idx("model.norm.weight")?,
            config,
            device: device.clone(),
            names,
            packed: vec![None; params.len()],
            shapes,
            params,
            blocks,
            lm_head,
            frozen: false,
        })
    }

    /// The same weights in another float type (f64 for finite-difference checks).
    pub fn to_dtype(self, dtype: DType) -> Result<Self> {
        let params = self
            .params
            .iter()
            .map(|p| Var::from_tensor(&p.as_tensor().to_dtype(dtype)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { params, ..self })
    }

    /// A forward-only copy (its weights never receive gradients): a distillation teacher.
    pub fn frozen(mut self) -> Self {
        self.frozen = true;
        self
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Hugging Face names of the parameters, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }
    /// The trainable parameters: dense, or the kept values of a packed one (1-D).
    pub fn params(&self) -> &[Var] {
        &self.params
    }

    /// The layout parameter `i` is packed under, if it is.
    pub fn layout(&self, i: usize) -> Option<&Arc<SparseLayout>> {
        self.packed[i].as_ref()
    }

    /// Whether AdamW decays parameter `i` (matrices, packed or not; not norm gains).
    pub fn is_matrix(&self, i: usize) -> bool {
        self.shapes[i].len() >= 2
    }

    /// Parameter `i` as its dense tensor (a packed one expanded, zeros at pruned positions).
    pub fn dense_param(&self, i: usize) -> Result<Tensor> {
        self.dense_like(i, self.params[i].as_tensor())
    }

    /// A tensor shaped like parameter `i`'s storage (an Adam moment) as the dense tensor.
    pub fn dense_like(&self, i: usize, t: &Tensor) -> Result<Tensor> {
        match &self.packed[i] {
            Some(l) => l.expand_tensor(t),
            None => Ok(t.clone()),
        }
    }

    /// A dense tensor of parameter `i`'s shape in its storage's form (packed: its kept values;
    /// refused if a pruned entry is non-zero).
    pub fn stored_like(&self, i: usize, dense: &Tensor) -> Result<Tensor> {
        match &self.packed[i] {
            Some(l) => l.pack_tensor(dense),
            None => Ok(dense.clone()),
        }
    }

    /// Stores parameter `i` as its kept values under `keep` (the dense 0/1 mask), on the CPU,
    /// where the sparse linear runs (elsewhere it stays dense and the trainer masks it). Returns
    /// whether it is packed now. The weight must already be zero where `keep` is.
    pub fn pack(&mut self, i: usize, keep: &Tensor) -> Result<bool> {
        self.unpack(i)?;
        if !self.device.is_cpu() || !self.prunable().contains(&i) {
            return Ok(false);
        }
        let (rows, cols) = keep.dims2()?;
        let k = keep.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let layout = Arc::new(SparseLayout::from_keep(&k, rows, cols)?);
        let vals = layout.pack_tensor(self.params[i].as_tensor())?;
        self.params[i] = Var::from_tensor(&vals)?;
        self.packed[i] = Some(layout);
        Ok(true)
    }

    /// Stores parameter `i` dense again.
    pub fn unpack(&mut self, i: usize) -> Result<()> {
        if self.packed[i].is_some() {
            let dense = self.dense_param(i)?;
            self.params[i] = Var::from_tensor(&dense)?;
            self.packed[i] = None;
        }
        Ok(())
    }
    pub fn num_params(&self) -> usize {
        self.shapes.iter().map(|s| s.iter().product::<usize>()).sum()
    }

    /// Indices of the prunable linears (q/k/v/o/gate/up/down of every block).
    pub fn prunable(&self) -> Vec<usize> {
        self.blocks.iter().flat_map(|b| b.linears).collect()
    }

    fn p(&self, i: usize, frozen: bool) -> Tensor {
        let t = self.params[i].as_tensor();
        if frozen || self.frozen { t.detach() } else { t.clone() }
    }

    /// cos and sin `[seq, head_dim]` (each half repeated, for `rotate_half`).
    fn rope(&self, seq: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq * 2 * half);
        let mut sin = Vec::with_capacity(seq * 2 * half);
        for p in 0..seq {
            for _ in 0..2 {
                for f in &self.inv_freq {
                    // As the reference: the angle in f64.
                    let a = p as f64 * *f as f64;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq, 2 * half), &self.device)?,
            Tensor::from_vec(sin, (seq, 2 * half), &self.device)?,
        ))
    }

    /// Logits (and block outputs when `want_hidden`) of a `[batch, seq]` u32 token batch.
    pub fn forward(&self, ids: &Tensor, want_hidden: bool) -> Result<ForwardOut> {
        self.forward_impl(ids, want_hidden, false)
    }

    /// As [`forward`](Self::forward) with the weights detached: no graph is kept (evaluation).
    pub fn forward_no_grad(&self, ids: &Tensor, want_hidden: bool) -> Result<ForwardOut> {
        self.forward_impl(ids, want_hidden, true)
    }

    fn forward_impl(&self, ids: &Tensor, want_hidden: bool, frozen: bool) -> Result<ForwardOut> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let eps = c.rms_norm_eps;
        let embed = self.p(self.embed, frozen);
        let dt = embed.dtype();
        let mut x = embed.index_select(&ids.flatten_all()?, 0)?; // [b·t, h]
        let (cos, sin) = self.rope(t)?;
        let (cos, sin) = (cos.to_dtype(dt)?, sin.to_dtype(dt)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut hidden = Vec::new();
        for blk in &self.blocks {
            let lin = |x: &Tensor, k: usize| -> Result<Tensor> {
                let i = blk.linears[k];
                match &self.packed[i] {
                    Some(l) => linear::sparse(x, &self.p(i, frozen), l),
                    None => linear::dense(x, &self.p(i, frozen)),
                }
            };
            let xn = rms_norm(&x, &self.p(blk.input_norm, frozen), eps)?;
            let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = heads(lin(&xn, 0)?, nh)?;
            let k = heads(lin(&xn, 1)?, nkv)?;
            let v = heads(lin(&xn, 2)?, nkv)?;
            let q = apply_rope(&q, &cos, &sin)?;
            let k = apply_rope(&k, &cos, &sin)?;
            let o = attention::causal(&q, &k, &v, scale)?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
            x = (x + lin(&o, 3)?)?;
            let xn = rms_norm(&x, &self.p(blk.post_norm, frozen), eps)?;
            let act = (lin(&xn, 4)?.silu()? * lin(&xn, 5)?)?;
            x = (x + lin(&act, 6)?)?;
            if want_hidden {
                hidden.push(x.clone());
            }
        }
        let xn = rms_norm(&x, &self.p(self.norm, frozen), eps)?;
        let head = self.p(self.lm_head.unwrap_or(self.embed), frozen);
        let logits = linear::dense(&xn, &head)?;
        Ok(ForwardOut { logits, hidden })
    }

    /// The current weights as a `lacuna_model::Llama` (f32), e.g. to save or to prune.
    pub fn to_model(&self, origin: &Path) -> Result<Llama> {
        let mut tensors = BTreeMap::new();
        for (i, (name, shape)) in self.names.iter().zip(&self.shapes).enumerate() {
            let v = self.dense_param(i)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            tensors.insert(name.clone(), Weight::from_f32(shape.clone(), v)?);
        }
        Ok(Llama::load(self.config.clone(), tensors, origin)?)
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// `x · cos + rotate_half(x) · sin` for `x` `[b, heads, t, hd]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// Softmax over the last dimension from differentiable primitives (max subtracted, detached).
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dimension.
pub(crate) fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&max)?;
    let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(s.broadcast_sub(&lse)?)
}
