//! The Llama decoder on a CUDA device: weights uploaded once in their stored format (f16/bf16
//! dense or bitmask; f32 rounded to f16), an f16 KV cache per sequence slot, and a decode step that
//! advances a batch of sequences by one token each, streaming every weight once for the batch.
//! Prompts run through the same step one token at a time (decode is what this backend serves;
//! a GEMM prefill is the next step, docs/gpu.md). Sampling stays on the CPU.

use cudarc::driver::CudaSlice;
use lacuna_model::generate::{GenerateParams, Generation};
use lacuna_model::tokenizer::Tokenizer;
use lacuna_model::weights::Weight;
use lacuna_model::{Llama, LlamaConfig};

use crate::device::{Gpu, GpuMatrix, KvLayer};
use crate::launch::{self, pack};
use crate::{GpuError, Result};

struct Layer {
    input_norm: CudaSlice<f32>,
    post_norm: CudaSlice<f32>,
    q: GpuMatrix,
    k: GpuMatrix,
    v: GpuMatrix,
    o: GpuMatrix,
    gate: GpuMatrix,
    up: GpuMatrix,
    down: GpuMatrix,
}

/// Activations of one step, sized for `slots` sequences.
struct Scratch {
    x: CudaSlice<f32>,
    h: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    o: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    logits: CudaSlice<f32>,
}

/// The decoder on a GPU with `slots` sequence slots of up to `capacity` positions each.
pub struct GpuLlama {
    gpu: Gpu,
    config: LlamaConfig,
    embed: GpuMatrix,
    lm_head: Option<GpuMatrix>,
    layers: Vec<Layer>,
    norm: CudaSlice<f32>,
    inv_freq: CudaSlice<f32>,
    kv: Vec<KvLayer>,
    lens: Vec<usize>,
    capacity: usize,
    scratch: Scratch,
    weight_bytes: usize,
}

fn find<'a>(tensors: &'a [(String, &'a Weight)], name: &str) -> Result<&'a Weight> {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, w)| *w)
        .ok_or_else(|| GpuError::Unsupported(format!("the model has no tensor {name}")))
}

impl GpuLlama {
    /// Uploads `model` to `gpu` with `slots` sequence slots of `capacity` positions.
    pub fn load(gpu: Gpu, model: &Llama, slots: usize, capacity: usize) -> Result<GpuLlama> {
        let c = model.config().clone();
        if slots == 0 || capacity == 0 {
            return Err(GpuError::Shape(format!("{slots} slots of {capacity} positions")));
        }
        let max = launch::max_attention_len(c.head_dim);
        if capacity > max {
            return Err(GpuError::Unsupported(format!(
                "a context of {capacity} positions: decode attention holds at most {max} at head_dim {}",
                c.head_dim
            )));
        }
        let tensors = model.tensors();
        let up = |name: &str| -> Result<GpuMatrix> { gpu.upload_matrix(&pack(find(&tensors, name)?)?) };
        let norm = |name: &str| -> Result<CudaSlice<f32>> { gpu.upload(&find(&tensors, name)?.to_f32_vec()) };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                post_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                q: up(&format!("{p}.self_attn.q_proj.weight"))?,
                k: up(&format!("{p}.self_attn.k_proj.weight"))?,
                v: up(&format!("{p}.self_attn.v_proj.weight"))?,
                o: up(&format!("{p}.self_attn.o_proj.weight"))?,
                gate: up(&format!("{p}.mlp.gate_proj.weight"))?,
                up: up(&format!("{p}.mlp.up_proj.weight"))?,
                down: up(&format!("{p}.mlp.down_proj.weight"))?,
            });
        }
        let embed = up("model.embed_tokens.weight")?;
        if embed.is_bitmask() {
            return Err(GpuError::Unsupported("a bitmask embedding table".into()));
        }
        let lm_head = match tensors.iter().any(|(n, _)| n == "lm_head.weight") {
            true => Some(up("lm_head.weight")?),
            false => None,
        };
        let kv = (0..c.num_hidden_layers)
            .map(|_| gpu.kv_layer(slots, capacity, c.kv_dim(), c.head_dim))
            .collect::<Result<Vec<_>>>()?;
        let s = slots;
        let scratch = Scratch {
            x: gpu.zeros(s * c.hidden_size)?,
            h: gpu.zeros(s * c.hidden_size)?,
            q: gpu.zeros(s * c.q_dim())?,
            k: gpu.zeros(s * c.kv_dim())?,
            v: gpu.zeros(s * c.kv_dim())?,
            attn: gpu.zeros(s * c.q_dim())?,
            o: gpu.zeros(s * c.hidden_size)?,
            gate: gpu.zeros(s * c.intermediate_size)?,
            up: gpu.zeros(s * c.intermediate_size)?,
            logits: gpu.zeros(s * c.vocab_size)?,
        };
        let weight_bytes = lm_head.as_ref().unwrap_or(&embed).nbytes()
            + layers
                .iter()
                .map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].iter().map(|m| m.nbytes()).sum::<usize>())
                .sum::<usize>();
        Ok(GpuLlama {
            norm: norm("model.norm.weight")?,
            inv_freq: gpu.upload(&c.inv_freq())?,
            gpu,
            config: c,
            embed,
            lm_head,
            layers,
            kv,
            lens: vec![0; slots],
            capacity,
            scratch,
            weight_bytes,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
    pub fn slots(&self) -> usize {
        self.lens.len()
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Weight bytes one decode step streams (every decoder linear as uploaded, and the LM head).
    pub fn weight_bytes_per_token(&self) -> usize {
        self.weight_bytes
    }
    /// Positions cached for `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }
    /// Forgets `slot`'s sequence.
    pub fn reset(&mut self, slot: usize) {
        self.lens[slot] = 0;
    }

    /// Advances each `(slot, token)` by one position and returns the logits `[batch, vocab]`.
    /// Slots must be distinct; each slot's sequence continues from its cached positions.
    pub fn step(&mut self, batch: &[(usize, u32)]) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = batch.len();
        if n == 0 || n > self.slots() {
            return Err(GpuError::Shape(format!("a step of {n} sequences on {} slots", self.slots())));
        }
        let mut seen = vec![false; self.slots()];
        for &(slot, token) in batch {
            if slot >= self.slots() || std::mem::replace(&mut seen[slot], true) {
                return Err(GpuError::Shape(format!("slot {slot} is out of range or repeated in one step")));
            }
            if self.lens[slot] >= self.capacity {
                return Err(GpuError::Shape(format!("slot {slot} is full ({} positions)", self.capacity)));
            }
            if token as usize >= c.vocab_size {
                return Err(GpuError::Shape(format!("token id {token} is outside the vocabulary of {}", c.vocab_size)));
            }
        }
        let g = &self.gpu;
        let tokens = g.upload(&batch.iter().map(|b| b.1).collect::<Vec<u32>>())?;
        let slots = g.upload(&batch.iter().map(|b| b.0 as i32).collect::<Vec<i32>>())?;
        let pos = g.upload(&batch.iter().map(|b| self.lens[b.0] as i32).collect::<Vec<i32>>())?;
        let lens = g.upload(&batch.iter().map(|b| self.lens[b.0] as i32 + 1).collect::<Vec<i32>>())?;
        let max_len = batch.iter().map(|b| self.lens[b.0] + 1).max().unwrap_or(1);
        let eps = c.rms_norm_eps as f32;
        let (h, im) = (c.hidden_size, c.intermediate_size);
        let s = &mut self.scratch;

        g.embed(&self.embed, &tokens, n, &mut s.x)?;
        for (layer, kv) in self.layers.iter().zip(self.kv.iter_mut()) {
            g.rms_norm(&s.x, &layer.input_norm, eps, n, &mut s.h)?;
            g.matmul(&layer.q, &s.h, n, &mut s.q)?;
            g.matmul(&layer.k, &s.h, n, &mut s.k)?;
            g.matmul(&layer.v, &s.h, n, &mut s.v)?;
            g.rope(&mut s.q, &pos, &self.inv_freq, n, c.num_attention_heads)?;
            g.rope(&mut s.k, &pos, &self.inv_freq, n, c.num_key_value_heads)?;
            g.kv_append(&s.k, &s.v, kv, &slots, &pos, n)?;
            g.attention(&s.q, kv, &slots, &lens, n, c.num_attention_heads, max_len, &mut s.attn)?;
            g.matmul(&layer.o, &s.attn, n, &mut s.o)?;
            g.add_into(&mut s.x, &s.o, n * h)?;
            g.rms_norm(&s.x, &layer.post_norm, eps, n, &mut s.h)?;
            g.matmul(&layer.gate, &s.h, n, &mut s.gate)?;
            g.matmul(&layer.up, &s.h, n, &mut s.up)?;
            g.swiglu(&mut s.gate, &s.up, n * im)?;
            g.matmul(&layer.down, &s.gate, n, &mut s.o)?;
            g.add_into(&mut s.x, &s.o, n * h)?;
        }
        g.rms_norm(&s.x, &self.norm, eps, n, &mut s.h)?;
        g.matmul(self.lm_head.as_ref().unwrap_or(&self.embed), &s.h, n, &mut s.logits)?;
        let mut logits = g.download(&s.logits)?;
        logits.truncate(n * c.vocab_size);
        for &(slot, _) in batch {
            self.lens[slot] += 1;
        }
        Ok(logits)
    }

    /// Runs `tokens` through `slot` one position at a time; returns the last position's logits.
    pub fn prefill(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        for &t in tokens {
            logits = self.step(&[(slot, t)])?;
        }
        if logits.is_empty() {
            return Err(GpuError::Shape("no tokens to run".into()));
        }
        Ok(logits)
    }

    /// `lacuna generate` on the GPU: the CPU engine's generation loop (sampler, EOS, stop
    /// strings, budget) over this decoder, in slot 0.
    pub fn generate(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(GpuError::Shape("the prompt is empty".into()));
        }
        if prompt.len() >= self.capacity {
            return Err(GpuError::Shape(format!(
                "the prompt has {} tokens; the context holds {}",
                prompt.len(),
                self.capacity
            )));
        }
        let budget = params.max_new_tokens.min(self.capacity - prompt.len());
        self.reset(0);
        lacuna_model::generate::sample_loop(tok, prompt, budget, params, |tokens| self.prefill(0, tokens), on_text)
    }
}
