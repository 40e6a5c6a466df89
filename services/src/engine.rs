//! The seam between the scheduler and a model runtime.
//!
//! The scheduler owns one [`Engine`] on its own thread and drives it with three calls: `prefill`
//! (chunks of a sequence's prompt), `decode` (one token for each of many sequences) and `release`.
//! [`lacuna_model::runtime::Runtime`] implements it with batched decode steps (one pass over
//! the weights advances every running sequence) and is what `lacuna serve` runs;
//! [`LlamaEngine`] is the reference forward pass, one sequence at a time.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use anyhow::{Context, Result, bail};
use lacuna_model::config::LlamaConfig;
use lacuna_model::llama::{KvCache, Llama};

/// A sequence's id, chosen by the scheduler and unique while the sequence lives.
pub type SeqId = u64;

/// A model runtime that keeps per-sequence state (the KV cache) between calls.
///
/// Contract: the scheduler calls `prefill` one or more times for a new sequence (consecutive
/// chunks of its prompt), then `decode` with one token at a time for it, and finally `release`.
/// Positions are implicit: each call appends after what the sequence already holds. The scheduler
/// never lets a sequence exceed `config().max_position_embeddings` positions nor calls `decode`
/// for a sequence that has not been prefilled. An error fails the sequences of that call; the
/// scheduler then releases them.
pub trait Engine: Send + 'static {
    fn config(&self) -> &LlamaConfig;

    /// Appends `tokens` to sequence `seq` (creating its KV cache on first use) and returns the
    /// logits of the last position (`vocab_size` floats).
    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>>;

    /// One decode step for every `(seq, token)` pair; writes `batch.len() × vocab_size` logits
    /// into `logits` (resized as needed), row `i` for `batch[i]`.
    fn decode(&mut self, batch: &[(SeqId, u32)], logits: &mut Vec<f32>) -> Result<()>;

    /// Frees the sequence's state at once; unknown ids are ignored.
    fn release(&mut self, seq: SeqId);
}

/// The reference engine: [`Llama::forward`] per sequence with one [`KvCache`] each. Caches start
/// small and double as a sequence grows, so memory follows the tokens actually held.
pub struct LlamaEngine {
    model: Llama,
    caches: HashMap<SeqId, KvCache>,
}

/// Initial cache capacity in positions.
const MIN_CAPACITY: usize = 64;

impl LlamaEngine {
    pub fn new(model: Llama) -> Self {
        Self { model, caches: HashMap::new() }
    }

    /// Sequences currently holding a cache.
    pub fn live_sequences(&self) -> usize {
        self.caches.len()
    }

    /// Makes sure sequence `seq` has room for `extra` more positions, creating its cache when
    /// `create`, doubling it when full.
    fn reserve(&mut self, seq: SeqId, extra: usize, create: bool) -> Result<()> {
        let config = self.model.config();
        let max = config.max_position_embeddings;
        let cache = match self.caches.entry(seq) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if !create => bail!("sequence {seq} was never prefilled"),
            Entry::Vacant(e) => e.insert(KvCache::new(config, extra.max(MIN_CAPACITY).next_power_of_two().min(max))),
        };
        let need = cache.len() + extra;
        if need > max {
            bail!("sequence {seq} would hold {need} positions; the model's context is {max}");
        }
        if need > cache.capacity() {
            cache.grow(need.next_power_of_two().min(max));
        }
        Ok(())
    }
}

impl Engine for LlamaEngine {
    fn config(&self) -> &LlamaConfig {
        self.model.config()
    }

    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            bail!("prefill of sequence {seq} with no tokens");
        }
        self.reserve(seq, tokens.len(), true)?;
        let cache = self.caches.get_mut(&seq).context("the sequence's cache vanished")?;
        Ok(self.model.forward_last_logits(tokens, cache)?)
    }

    fn decode(&mut self, batch: &[(SeqId, u32)], logits: &mut Vec<f32>) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        logits.resize(batch.len() * vocab, 0.0);
        for (row, &(seq, token)) in batch.iter().enumerate() {
            self.reserve(seq, 1, false)?;
            let cache = self.caches.get_mut(&seq).context("the sequence's cache vanished")?;
            let out = self.model.forward_last_logits(&[token], cache)?;
            logits[row * vocab..(row + 1) * vocab].copy_from_slice(&out);
        }
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        self.caches.remove(&seq);
    }
}

/// The batched decode runtime: a `decode` call is one step for up to `max_batch` sequences at
/// their own positions (larger batches go in slices of `max_batch`).
impl Engine for lacuna_model::runtime::Runtime {
    fn config(&self) -> &LlamaConfig {
        lacuna_model::runtime::Runtime::config(self)
    }

    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>> {
        Ok(lacuna_model::runtime::Runtime::prefill(self, seq, tokens)?.to_vec())
    }

    fn decode(&mut self, batch: &[(SeqId, u32)], logits: &mut Vec<f32>) -> Result<()> {
        logits.clear();
        for step in batch.chunks(self.max_batch()) {
            logits.extend_from_slice(lacuna_model::runtime::Runtime::decode(self, step)?);
        }
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        lacuna_model::runtime::Runtime::release(self, seq);
    }
}
