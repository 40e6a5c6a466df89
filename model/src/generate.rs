//! Autoregressive generation on the reference model: prefill, then one token at a time through the
//! KV cache, stopping at EOS, a stop string or the token budget; text is streamed as it completes.

use std::time::Instant;

use serde::Serialize;

use crate::kv::{KvCache, KvDtype};
use crate::llama::Llama;
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
    /// How the KV cache stores keys and values (f32: exact; f16: as the inference service's
    /// default, for comparing with it).
    pub kv_cache: KvDtype,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            kv_cache: KvDtype::F32,
        }
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
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    let ctx = model.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty".into()));
    }
    if prompt.len() >= ctx {
        return Err(Error::Invalid(format!("the prompt has {} tokens; the context holds {ctx}", prompt.len())));
    }
    let budget = params.max_new_tokens.min(ctx - prompt.len());
    let mut cache = KvCache::with_dtype(model.config(), prompt.len() + budget, params.kv_cache);
    sample_loop(tok, prompt, budget, params, |tokens| model.forward_last_logits(tokens, &mut cache), on_text)
}

/// The generation loop every engine shares: `feed(tokens)` appends tokens to the engine's
/// sequence and returns the last position's logits — the whole prompt first, then each sampled
/// token — until EOS (unless ignored), a stop string, or `budget` new tokens; text is streamed to
/// `on_text` as soon as it can no longer be part of a stop string.
pub fn sample_loop<E: From<Error>>(
    tok: &Tokenizer,
    prompt: &[u32],
    budget: usize,
    params: &GenerateParams,
    mut feed: impl FnMut(&[u32]) -> std::result::Result<Vec<f32>, E>,
    mut on_text: impl FnMut(&str),
) -> std::result::Result<Generation, E> {
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let t0 = Instant::now();
    let mut logits = feed(prompt)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();

    let mut text = StopText::new(tok, &params.stop);
    let mut ids = Vec::new();
    let mut finish = FinishReason::Length;
    while ids.len() < budget {
        let next = sampler.sample(&logits);
        if !params.ignore_eos && tok.eos_ids().contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        ids.push(next);
        let step = text.push(next)?;
        if !step.text.is_empty() {
            on_text(&step.text);
        }
        if step.stopped {
            finish = FinishReason::Stop;
            break;
        }
        if ids.len() == budget {
            break;
        }
        logits = feed(&[next])?;
    }
    let rest = text.finish();
    if !rest.is_empty() {
        on_text(&rest);
    }
    let text = text.into_text();
    Ok(Generation {
        ids,
        text,
        finish_reason: finish,
        prompt_tokens: prompt.len(),
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
    })
}

/// What one token added to a [`StopText`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text that can no longer turn out to be part of a stop string (possibly empty).
    pub text: String,
    /// A stop string appeared: the generation ends, the stop string and anything after it dropped.
    pub stopped: bool,
}

/// The text of a generation as tokens arrive: detokenized incrementally, cut before the first
/// stop string, and released only once it cannot grow into one (the longest stop string, less one
/// byte, is held back). [`generate`] and the inference service share it.
pub struct StopText<'a> {
    stream: DecodeStream<'a>,
    stop: Vec<String>,
    hold: usize,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl<'a> StopText<'a> {
    pub fn new(tok: &'a Tokenizer, stop: &[String]) -> Self {
        let stop: Vec<String> = stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        let hold = stop.iter().map(|s| s.len()).max().unwrap_or(0).saturating_sub(1);
        Self { stream: DecodeStream::new(tok), stop, hold, text: String::new(), emitted: 0, stopped: false }
    }

    /// Adds generated token `id`. After a stop, further tokens add nothing.
    pub fn push(&mut self, id: u32) -> Result<StopStep> {
        if self.stopped {
            return Ok(StopStep { text: String::new(), stopped: true });
        }
        self.text.push_str(&self.stream.push(id)?);
        if let Some(cut) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(cut);
            self.stopped = true;
            let out = self.text.get(self.emitted..).unwrap_or_default().to_owned();
            self.emitted = self.text.len();
            return Ok(StopStep { text: out, stopped: true });
        }
        // Hold back what could still grow into a stop string.
        let mut safe = self.text.len().saturating_sub(self.hold).max(self.emitted);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        let mut out = String::new();
        if safe > self.emitted {
            out.push_str(&self.text[self.emitted..safe]);
            self.emitted = safe;
        }
        Ok(StopStep { text: out, stopped: false })
    }

    /// Releases what is held back; call once generation has ended.
    pub fn finish(&mut self) -> String {
        let out = self.text.get(self.emitted..).unwrap_or_default().to_owned();
        self.emitted = self.text.len();
        out
    }

    /// The whole text so far (stop string excluded).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn into_text(self) -> String {
        self.text
    }
}
