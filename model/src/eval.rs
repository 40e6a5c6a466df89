//! Perplexity as the SparseGPT and Wanda papers measure it: the token stream is cut into
//! non-overlapping segments of `seq_len`, each is run from an empty cache, and
//! ppl = exp(mean negative log-likelihood over every predicted token).

use std::time::Instant;

use serde::Serialize;

use crate::llama::{KvCache, Llama};
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct PerplexityReport {
    pub perplexity: f64,
    pub mean_nll: f64,
    pub segments: usize,
    pub seq_len: usize,
    /// Tokens whose probability was scored: `segments · (seq_len − 1)`.
    pub tokens_evaluated: usize,
    pub seconds: f64,
}

/// Rows of logits computed at once, bounding memory to `CHUNK · vocab` floats.
const CHUNK: usize = 128;

pub fn perplexity(
    model: &Llama,
    ids: &[u32],
    seq_len: usize,
    max_segments: Option<usize>,
    mut progress: impl FnMut(usize, usize),
) -> Result<PerplexityReport> {
    let cfg = model.config();
    if seq_len < 2 {
        return Err(Error::Invalid(format!("seq_len must be at least 2, got {seq_len}")));
    }
    if seq_len > cfg.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "seq_len {seq_len} exceeds the model's context of {}",
            cfg.max_position_embeddings
        )));
    }
    let available = ids.len() / seq_len;
    let segments = max_segments.map_or(available, |m| m.min(available));
    if segments == 0 {
        return Err(Error::Invalid(format!("the text has {} tokens, fewer than one segment of {seq_len}", ids.len())));
    }
    let t0 = Instant::now();
    let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let mut cache = KvCache::new(cfg, seq_len);
    let mut nll = 0f64;
    for s in 0..segments {
        progress(s, segments);
        let seg = &ids[s * seq_len..(s + 1) * seq_len];
        cache.clear();
        let hidden = model.forward(seg, &mut cache)?;
        for start in (0..seq_len - 1).step_by(CHUNK) {
            let rows = CHUNK.min(seq_len - 1 - start);
            let logits = model.logits(&hidden[start * h..(start + rows) * h], rows)?;
            for r in 0..rows {
                nll += token_nll(&logits[r * vocab..(r + 1) * vocab], seg[start + r + 1] as usize);
            }
        }
    }
    progress(segments, segments);
    let tokens_evaluated = segments * (seq_len - 1);
    let mean_nll = nll / tokens_evaluated as f64;
    Ok(PerplexityReport {
        perplexity: mean_nll.exp(),
        mean_nll,
        segments,
        seq_len,
        tokens_evaluated,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// −log softmax(logits)[target], in f64 (log-sum-exp with the max factored out).
pub fn token_nll(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
    let lse = logits.iter().map(|v| (*v as f64 - max).exp()).sum::<f64>().ln() + max;
    lse - logits[target] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_uniform_is_log_vocab() {
        let l = vec![3.0f32; 50];
        assert!((token_nll(&l, 7) - (50f64).ln()).abs() < 1e-12);
        let mut l = vec![0f32; 4];
        l[2] = 100.0;
        assert!(token_nll(&l, 2) < 1e-30_f64.max(1e-12));
    }
}
