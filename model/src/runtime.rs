//! The decode runtime: what `lacuna bench` and the inference service run.
//!
//! One model, shared read-only; a KV cache per live sequence, taken from a pool and returned to
//! it, so that caches are allocated once per slot, not per request (they double when a sequence
//! outgrows them, up to `max_context`); and every activation buffer sized at construction for
//! the largest batch, so that a decode step allocates nothing.
//!
//! A decode step advances up to `max_batch` sequences by one token each, every sequence at its
//! own position: the weights are streamed once per step for the whole batch (the kernels dot each
//! weight row with every sequence's activations while it sits in L1), which is what makes
//! batching pay on a memory-bound machine. Products that read the same activations (q/k/v,
//! gate/up) run as one parallel region on the kernels' decode team ([`matmul_many`], whose
//! helpers stay awake between the ~150 regions of a step); RoPE tables are computed once per step,
//! not per layer. Prefill (many tokens of one sequence) is compute-bound and runs the reference
//! forward pass, whose products are GEMMs.
//!
//! Each layer runs on its weights as the checkpoint stored them: bitmask where
//! [`Llama::prefer_bitmask`] found it streams fewer bytes, dense elsewhere. W8A8 layers run on
//! the INT8 kernels: a group's shared input is quantized per token once (into the group's
//! [`Scratch`]) and every INT8 product of the group reads those codes, in the same region as any
//! float product beside it (a layer that kurtosis kept in float); W8A16 layers through their
//! dequantized f32 form (see [`crate::int8`]).

use std::collections::HashMap;
use std::sync::Arc;

use lacuna_kernels::attention::{self, CacheValue, HeadCache};
use lacuna_kernels::matrix::{Product, Scratch, matmul_many};
use lacuna_kernels::team::Team;

use crate::config::LlamaConfig;
use crate::kv::{KvCache, KvDtype, LayerView};
use crate::llama::{Llama, add_into, apply_rope, rms_norm};
use crate::{Error, Result};

/// Positions a new sequence's cache holds before it first grows.
const INITIAL_POSITIONS: usize = 256;

/// Activations of one decode step, `[max_batch, width]` each.
struct Buffers {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Attention scores: each attention task's `[group, positions]` (see [`attend`]).
    scores: Vec<f32>,
    /// Attention tasks' partial results (see [`attention::merge_partials`]).
    partials: Vec<f32>,
    /// Transposed outputs of batched products and the INT8 form of a W8A8 group's input (see
    /// [`matmul_many`]).
    scratch: Scratch,
    /// Cache slot and position of each batch row.
    slots: Vec<usize>,
    pos: Vec<usize>,
}

pub struct Runtime {
    model: Arc<Llama>,
    max_batch: usize,
    max_context: usize,
    kv: KvDtype,
    /// Live sequences → their slot in `caches`.
    seqs: HashMap<u64, usize>,
    caches: Vec<KvCache>,
    free: Vec<usize>,
    b: Buffers,
}

impl Runtime {
    /// A runtime decoding up to `max_batch` sequences per step, each up to `max_context`
    /// positions (at most the model's own context), caching keys and values as `kv`.
    pub fn new(mut model: Arc<Llama>, max_batch: usize, max_context: usize, kv: KvDtype) -> Result<Self> {
        // A decode step streams every weight, best from 2 MiB pages (below), which a file
        // mapping cannot have: weights still mapped are copied into memory first, when the model
        // is not shared yet (as when a server or `lacuna bench` starts).
        match Arc::get_mut(&mut model) {
            Some(m) => {
                let copied = m.copy_mapped_weights();
                if copied > 0 {
                    tracing::debug!("{} MiB of mapped weights copied into memory", copied >> 20);
                }
            }
            None => tracing::debug!("the model is shared: its mapped weights stay mapped"),
        }
        let c = model.config();
        if max_batch == 0 {
            return Err(Error::Invalid("max_batch must be at least 1".into()));
        }
        if max_context == 0 || max_context > c.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "max_context {max_context} must be in 1..={} (the model's context)",
                c.max_position_embeddings
            )));
        }
        let (bh, bq, bkv, bf) =
            (max_batch * c.hidden_size, max_batch * c.q_dim(), max_batch * c.kv_dim(), max_batch * c.intermediate_size);
        let half = c.head_dim / 2;
        let b = Buffers {
            x: vec![0.0; bh],
            h: vec![0.0; bh],
            q: vec![0.0; bq],
            k: vec![0.0; bkv],
            v: vec![0.0; bkv],
            attn: vec![0.0; bq],
            o: vec![0.0; bh],
            gate: vec![0.0; bf],
            up: vec![0.0; bf],
            logits: vec![0.0; max_batch * c.vocab_size],
            cos: vec![0.0; max_batch * half],
            sin: vec![0.0; max_batch * half],
            scores: vec![0.0; max_batch * c.num_attention_heads * (max_context + MAX_SPLIT)],
            partials: vec![0.0; max_batch * MAX_SPLIT * (c.q_dim() + 2 * c.num_attention_heads)],
            scratch: Scratch::with_capacity(
                max_batch * (c.vocab_size.max(c.q_dim() + 2 * c.kv_dim()).max(2 * c.intermediate_size)),
            ),
            slots: Vec::with_capacity(max_batch),
            pos: Vec::with_capacity(max_batch),
        };
        // Every decode step streams these: on 2 MiB pages it does without a TLB miss every 4 KiB.
        let mut buffers = Vec::new();
        for w in model.layers.iter().flat_map(|l| l.linears()).chain([model.lm_head()]) {
            buffers.extend(w.matrix()?.buffers());
        }
        let huge = lacuna_kernels::pages::prefer_huge_pages(buffers);
        tracing::debug!("{} MiB of weights on huge pages", huge >> 20);
        Ok(Self { model, max_batch, max_context, kv, seqs: HashMap::new(), caches: Vec::new(), free: Vec::new(), b })
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }
    pub fn config(&self) -> &LlamaConfig {
        self.model.config()
    }
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
    pub fn max_context(&self) -> usize {
        self.max_context
    }
    /// Positions sequence `seq` holds, if it is live.
    pub fn seq_len(&self, seq: u64) -> Option<usize> {
        self.seqs.get(&seq).map(|&s| self.caches[s].len())
    }
    /// Live sequences.
    pub fn active(&self) -> usize {
        self.seqs.len()
    }

    fn slot(&mut self, seq: u64) -> usize {
        if let Some(&s) = self.seqs.get(&seq) {
            return s;
        }
        let s = self.free.pop().unwrap_or_else(|| {
            // Caches start small and double as their sequence grows (up to `max_context`), so
            // memory follows the tokens held, not the longest context allowed.
            self.caches.push(KvCache::with_dtype(
                self.model.config(),
                INITIAL_POSITIONS.min(self.max_context),
                self.kv,
            ));
            self.caches.len() - 1
        });
        self.caches[s].clear();
        self.seqs.insert(seq, s);
        s
    }

    /// Appends `tokens` to sequence `seq` (starting it if new) and returns the logits of the
    /// last one (`[vocab]`). Long prompts may come in chunks: each call continues the sequence.
    pub fn prefill(&mut self, seq: u64, tokens: &[u32]) -> Result<&[f32]> {
        if tokens.is_empty() {
            return Err(Error::Invalid("prefill of no tokens".into()));
        }
        let s = self.slot(seq);
        let len = self.caches[s].len();
        if len + tokens.len() > self.max_context {
            return Err(Error::Invalid(format!(
                "sequence {seq}: {} positions exceed the context of {}",
                len + tokens.len(),
                self.max_context
            )));
        }
        self.caches[s].grow((len + tokens.len()).max(INITIAL_POSITIONS).min(self.max_context));
        let logits = self.model.forward_last_logits(tokens, &mut self.caches[s])?;
        let vocab = self.config().vocab_size;
        self.b.logits[..vocab].copy_from_slice(&logits);
        Ok(&self.b.logits[..vocab])
    }

    /// Ends sequence `seq` and returns its cache to the pool (unknown ids are ignored).
    pub fn release(&mut self, seq: u64) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.free.push(s);
        }
    }

    /// One decode step: feeds each `(sequence, token)` pair at the sequence's next position and
    /// returns the logits, `[batch.len(), vocab]`, row `i` for `batch[i]`.
    pub fn decode(&mut self, batch: &[(u64, u32)]) -> Result<&[f32]> {
        let n = self.step(batch)?;
        let vocab = self.config().vocab_size;
        Ok(&self.b.logits[..n * vocab])
    }

    fn step(&mut self, batch: &[(u64, u32)]) -> Result<usize> {
        let n = batch.len();
        let model = Arc::clone(&self.model);
        let c = model.config();
        if n == 0 || n > self.max_batch {
            return Err(Error::Invalid(format!("a decode step takes 1..={} sequences, got {n}", self.max_batch)));
        }
        let b = &mut self.b;
        b.slots.clear();
        b.pos.clear();
        for (i, &(seq, tok)) in batch.iter().enumerate() {
            let &s = self.seqs.get(&seq).ok_or_else(|| Error::Invalid(format!("sequence {seq} was not prefilled")))?;
            if b.slots.contains(&s) {
                return Err(Error::Invalid(format!("sequence {seq} appears twice in one decode step")));
            }
            let pos = self.caches[s].len();
            if pos < self.max_context {
                // Amortised: allocates only when the cache doubles.
                self.caches[s].grow((pos + 1).next_power_of_two().min(self.max_context));
            }
            if pos >= self.max_context {
                return Err(Error::Invalid(format!("sequence {seq} is full ({} positions)", self.max_context)));
            }
            if tok as usize >= c.vocab_size {
                return Err(Error::Invalid(format!("token id {tok} is outside the vocabulary of {}", c.vocab_size)));
            }
            let h = c.hidden_size;
            model.embed_tokens.row_into(tok as usize, &mut b.x[i * h..(i + 1) * h])?;
            b.slots.push(s);
            b.pos.push(pos);
        }
        // RoPE angles of every row's position, once for all layers (in f64: positions reach 10⁵).
        let half = c.head_dim / 2;
        for (i, &p) in b.pos.iter().enumerate() {
            for (j, f) in model.inv_freq.iter().enumerate() {
                let a = p as f64 * *f as f64;
                b.cos[i * half + j] = a.cos() as f32;
                b.sin[i * half + j] = a.sin() as f32;
            }
        }
        let (hs, qd, kvd, fd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let eps = c.rms_norm_eps as f32;
        for (li, layer) in model.layers.iter().enumerate() {
            let x = &mut b.x[..n * hs];
            let h = &mut b.h[..n * hs];
            rms_norm(x, &layer.input_layernorm.w, eps, h);
            let (q, k, v) = (&mut b.q[..n * qd], &mut b.k[..n * kvd], &mut b.v[..n * kvd]);
            matmul_many(
                &mut [
                    Product { w: layer.q_proj.matrix()?, y: q },
                    Product { w: layer.k_proj.matrix()?, y: k },
                    Product { w: layer.v_proj.matrix()?, y: v },
                ],
                h,
                n,
                &mut b.scratch,
            )?;
            apply_rope(q, c.num_attention_heads, c.head_dim, &b.cos, &b.sin);
            apply_rope(k, c.num_key_value_heads, c.head_dim, &b.cos, &b.sin);
            for (i, (&s, &p)) in b.slots.iter().zip(&b.pos).enumerate() {
                self.caches[s].write(li, p, &k[i * kvd..(i + 1) * kvd], &v[i * kvd..(i + 1) * kvd]);
            }
            attend(
                c,
                &self.caches,
                li,
                &b.slots,
                &b.pos,
                q,
                &mut b.attn[..n * qd],
                &mut b.scores,
                &mut b.partials,
                self.max_context,
            );
            let o = &mut b.o[..n * hs];
            matmul_many(&mut [Product { w: layer.o_proj.matrix()?, y: o }], &b.attn[..n * qd], n, &mut b.scratch)?;
            add_into(x, o);
            rms_norm(x, &layer.post_attention_layernorm.w, eps, h);
            let (gate, up) = (&mut b.gate[..n * fd], &mut b.up[..n * fd]);
            matmul_many(
                &mut [Product { w: layer.gate_proj.matrix()?, y: gate }, Product { w: layer.up_proj.matrix()?, y: up }],
                h,
                n,
                &mut b.scratch,
            )?;
            lacuna_kernels::activation::silu_mul(gate, up)?;
            matmul_many(&mut [Product { w: layer.down_proj.matrix()?, y: o }], gate, n, &mut b.scratch)?;
            add_into(x, o);
        }
        for &s in &b.slots {
            self.caches[s].len += 1;
        }
        let h = &mut b.h[..n * hs];
        rms_norm(&b.x[..n * hs], &model.norm.w, eps, h);
        let logits = &mut b.logits[..n * c.vocab_size];
        matmul_many(&mut [Product { w: model.lm_head().matrix()?, y: logits }], h, n, &mut b.scratch)?;
        Ok(n)
    }
}

/// One KV head's columns (`offset..`) of a layer's `kv_dim`-wide rows, positions `a..b`.
fn view_of<T: CacheValue>(rows: &[T], kv_dim: usize, offset: usize, a: usize, b: usize) -> HeadCache<'_, T> {
    HeadCache { data: &rows[a * kv_dim..], stride: kv_dim, offset, len: b - a }
}

/// Positions per attention task: long enough to amortise a task, short enough that one
/// sequence's cache spreads over every thread (3 KV heads alone would leave one of two threads
/// idle a third of the time).
const SPLIT_POSITIONS: usize = 128;
/// Position ranges a sequence's attention is split into at most.
const MAX_SPLIT: usize = 8;

/// Decode attention: each batch row's query (its new position `pos[i]`, already in the cache)
/// over positions `0..=pos[i]` of its own sequence. One task per (sequence, KV head, range of
/// positions): the query heads that share a KV head read its keys and values once, and the ranges'
/// partial softmaxes are merged afterwards, so the cache streams on every thread at once.
#[allow(clippy::too_many_arguments)]
fn attend(
    c: &LlamaConfig,
    caches: &[KvCache],
    li: usize,
    slots: &[usize],
    pos: &[usize],
    q: &[f32],
    attn: &mut [f32],
    scores: &mut [f32],
    partials: &mut [f32],
    max_context: usize,
) {
    let (hd, nh, kvd, kvh) = (c.head_dim, c.num_attention_heads, c.kv_dim(), c.num_key_value_heads);
    let group = nh / kvh;
    let scale = 1.0 / (hd as f32).sqrt();
    // Below ~64k multiply-adds a region costs more than it saves: one task per head, on this thread.
    let serial = pos.iter().map(|p| (p + 1) * 2 * hd * nh).sum::<usize>() < 1 << 16;
    let longest = pos.iter().max().map_or(0, |p| p + 1);
    let split = if serial { 1 } else { longest.div_ceil(SPLIT_POSITIONS).clamp(1, MAX_SPLIT) };
    let width = group * hd + 2 * group;
    let cap = group * max_context.div_ceil(split);
    let tasks = pos.len() * kvh * split;
    let one = |idx: usize, part: &mut [f32], sc: &mut [f32]| {
        let (i, g, r) = (idx / (kvh * split), idx / split % kvh, idx % split);
        let total = pos[i] + 1;
        let per = total.div_ceil(split);
        let (a, b) = ((r * per).min(total), ((r + 1) * per).min(total));
        let (out, stats) = part.split_at_mut(group * hd);
        if a == b {
            out.fill(0.0);
            stats.chunks_exact_mut(2).for_each(|s| s.copy_from_slice(&[f32::NEG_INFINITY, 0.0]));
            return;
        }
        let qg = &q[i * nh * hd + g * group * hd..][..group * hd];
        let sc = &mut sc[..group * (b - a)];
        let ok = match caches[slots[i]].layer(li) {
            LayerView::F32(k, v) => {
                let view = |d| view_of(d, kvd, g * hd, a, b);
                attention::decode_group(qg, group, view(k), view(v), scale, sc, out, stats)
            }
            LayerView::F16(k, v) => {
                let view = |d| view_of(d, kvd, g * hd, a, b);
                attention::decode_group(qg, group, view(k), view(v), scale, sc, out, stats)
            }
        };
        if ok.is_err() {
            // Unreachable with the buffers sized in `new`; poison rather than panic.
            out.fill(f32::NAN);
        }
    };
    let (parts, scores) = (&mut partials[..tasks * width], &mut scores[..tasks * cap]);
    if serial {
        for (idx, (part, s)) in parts.chunks_exact_mut(width).zip(scores.chunks_exact_mut(cap)).enumerate() {
            one(idx, part, s);
        }
    } else {
        Team::global().for_each_chunk_pair(parts, width, scores, cap, &one);
    }
    for (o, p) in attn.chunks_exact_mut(group * hd).zip(parts.chunks_exact(split * width)) {
        if split == 1 {
            // One range: its softmax is already over every position.
            o.copy_from_slice(&p[..group * hd]);
        } else if attention::merge_partials(p, group, o).is_err() {
            o.fill(f32::NAN);
        }
    }
}
