//! Autoregressive generation on the reference model: prefill, then one token at a time through the
//! KV cache, stopping at EOS, a stop string or the token budget; text is streamed as it completes.

use std::time::Instant;

use serde::Serialize;

use crate::llama::{KvCache, Llama};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{DecodeStream, Tokenizer};
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these (not included in the text).
    pub stop: Vec<String>,
    /// Keep going past EOS (benchmarks and reference comparisons).
    pub ignore_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self { max_new_tokens: 128, sampling: SamplingParams::default(), stop: Vec::new(), ignore_eos: false }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// Token budget or context length reached.
    Length,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Generates a continuation of `prompt` (token ids). `on_text` receives text as soon as it can no
/// longer turn out to be part of a stop string.
pub fn generate(
    model: &Llama,
    tok: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let ctx = model.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty".into()));
    }
    if prompt.len() >= ctx {
        return Err(Error::Invalid(format!("the prompt has {} tokens; the context holds {ctx}", prompt.len())));
    }
    let budget = params.max_new_tokens.min(ctx - prompt.len());
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let mut cache = KvCache::new(model.config(), prompt.len() + budget);
    let t0 = Instant::now();
    let mut logits = model.forward_last_logits(prompt, &mut cache)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();

    let hold = params.stop.iter().map(|s| s.len()).max().unwrap_or(0).saturating_sub(1);
    let mut stream = DecodeStream::new(tok);
    let (mut ids, mut text, mut emitted) = (Vec::new(), String::new(), 0usize);
    let mut finish = FinishReason::Length;
    while ids.len() < budget {
        let next = sampler.sample(&logits);
        if !params.ignore_eos && tok.eos_ids().contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        ids.push(next);
        text.push_str(&stream.push(next)?);
        if let Some(cut) = params.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
            finish = FinishReason::Stop;
            break;
        }
        // Hold back what could still grow into a stop string.
        let mut safe = text.len().saturating_sub(hold).max(emitted);
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe > emitted {
            on_text(&text[emitted..safe]);
            emitted = safe;
        }
        if ids.len() == budget {
            break;
        }
        logits = model.forward_last_logits(&[next], &mut cache)?;
    }
    if text.len() > emitted {
        on_text(&text[emitted..]);
    }
    Ok(Generation {
        ids,
        text,
        finish_reason: finish,
        prompt_tokens: prompt.len(),
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
    })
}
