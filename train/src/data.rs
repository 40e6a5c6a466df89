//! Training data: the weighted pretraining mixture and instruction examples.
//!
//! **Mixture.** Each source's train documents are visited in a seeded permutation, tokenized on
//! demand with the model's tokenizer and followed by EOS, forming one endless token stream per
//! source (it wraps around, counting epochs). A packed training sequence is `seqLen + 1`
//! consecutive tokens of one source's stream (inputs are the first `seqLen`, targets the last);
//! the source of each sequence is drawn by weight from a ChaCha8 RNG seeded by the recipe. The
//! cursor — each source's (document, offset, epoch) and the RNG's word position — is what a
//! checkpoint stores; restoring it continues the exact same sequence of batches.
//!
//! **Sources.** `wiki`, `sotu`, `python`, `humaneval`: the train and held-out splits of
//! `lacuna_data` (fetched on first use). `file:///path`: a `.jsonl` file (one document per line,
//! its `text`) or a text file (documents separated by blank lines); every tenth document is held
//! out (all of them are when the file has fewer than two).
//!
//! **Instructions.** JSONL lines with `prompt`/`response` or `messages` (`[{role, content}]`,
//! the last one the assistant's), rendered by the model's chat template; the loss weights cover
//! the response tokens only (for `messages`, the last assistant turn). Without a template the text
//! is `prompt + "\n" + response` followed by EOS.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lacuna_data::{Cache, DatasetName, Split};
use lacuna_model::chat::{ChatMessage, ChatTemplate};
use lacuna_model::tokenizer::Tokenizer;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One batch: `ids` `[batch, seq]` u32, `targets` `[batch·seq]` u32, `weights` `[batch·seq]` f32.
pub struct Batch {
    pub ids: Tensor,
    pub targets: Tensor,
    pub weights: Tensor,
    /// Tokens that count in the loss.
    pub tokens: usize,
}

/// A named source's documents.
pub struct TextSource {
    pub name: String,
    pub train: Vec<String>,
    pub heldout: Vec<String>,
}

fn src_err(name: &str, msg: impl Into<String>) -> Error {
    Error::Source { source_name: name.to_owned(), msg: msg.into() }
}

/// A local path from a `file://` URI (or a plain path).
pub fn file_path(uri: &str) -> PathBuf {
    PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri))
}

fn read_documents(name: &str, path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| src_err(name, format!("cannot read {}: {e}", path.display())))?;
    let docs: Vec<String> = if path.extension().is_some_and(|e| e == "jsonl") {
        let mut v = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let j: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| src_err(name, format!("{} line {}: {e}", path.display(), i + 1)))?;
            let t = j
                .get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(|| src_err(name, format!("{} line {}: no string field `text`", path.display(), i + 1)))?;
            v.push(t.to_owned());
        }
        v
    } else {
        text.split("\n\n").map(str::trim).filter(|d| !d.is_empty()).map(str::to_owned).collect()
    };
    Ok(docs)
}

/// Loads one mixture source (fetching a known corpus into `cache` if needed). An empty or
/// missing source is an error naming it.
pub fn load_source(cache: Option<&Cache>, name: &str, progress: &dyn Fn(&str)) -> Result<TextSource> {
    let (train, heldout) = if name.starts_with("file://") || Path::new(name).is_absolute() {
        let path = file_path(name);
        if !path.exists() {
            return Err(src_err(name, format!("{} does not exist", path.display())));
        }
        let docs = read_documents(name, &path)?;
        if docs.len() < 2 {
            (docs.clone(), docs)
        } else {
            let mut train = Vec::new();
            let mut held = Vec::new();
            for (i, d) in docs.into_iter().enumerate() {
                if i % 10 == 9 { held.push(d) } else { train.push(d) }
            }
            (train, held)
        }
    } else {
        let ds: DatasetName = name.parse().map_err(|e: lacuna_data::Error| src_err(name, e.to_string()))?;
        let cache = cache.ok_or_else(|| src_err(name, "no cache directory to fetch the corpus into"))?;
        lacuna_data::fetch_dataset(cache, ds, progress)?;
        let text = |docs: Vec<lacuna_data::Document>| docs.into_iter().map(|d| d.text).collect::<Vec<_>>();
        (
            text(lacuna_data::load_split(cache, ds, Split::Train)?),
            text(lacuna_data::load_split(cache, ds, Split::Heldout)?),
        )
    };
    if train.iter().all(|d| d.trim().is_empty()) {
        return Err(src_err(name, "the source is empty (no training text)"));
    }
    Ok(TextSource { name: name.to_owned(), train, heldout })
}

/// Where one source's stream stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCursor {
    /// Position in the source's document permutation.
    pub doc: usize,
    /// Tokens of that document already taken.
    pub offset: usize,
    /// Completed passes over the source.
    pub epoch: u64,
}

/// The whole mixture's position: what a checkpoint stores.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixtureCursor {
    pub sources: Vec<SourceCursor>,
    /// The source-choosing RNG's word position (a decimal u128).
    pub rng_word_pos: String,
}

struct Stream {
    name: String,
    docs: Vec<String>,
    order: Vec<usize>,
    cur: SourceCursor,
    /// Tokens (+ EOS) of `order[cur.doc]`, when tokenized.
    buf: Option<Vec<u32>>,
}

impl Stream {
    fn take(&mut self, tok: &Tokenizer, eos: u32, n: usize, out: &mut Vec<u32>) -> Result<()> {
        let mut guard = 0usize;
        while n > 0 && out.len() < n {
            if self.buf.is_none() {
                let text = &self.docs[self.order[self.cur.doc]];
                let mut t = tok.encode(text, false)?;
                t.push(eos);
                self.buf = Some(t);
            }
            let buf = self.buf.as_ref().expect("just filled");
            let take = (n - out.len()).min(buf.len().saturating_sub(self.cur.offset));
            out.extend_from_slice(&buf[self.cur.offset..self.cur.offset + take]);
            self.cur.offset += take;
            if self.cur.offset >= buf.len() {
                self.buf = None;
                self.cur.offset = 0;
                self.cur.doc += 1;
                if self.cur.doc == self.docs.len() {
                    self.cur.doc = 0;
                    self.cur.epoch += 1;
                    guard += 1;
                    if guard > 1_000_000 {
                        return Err(src_err(&self.name, "no tokens"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The packed, weighted pretraining mixture.
pub struct Mixture {
    streams: Vec<Stream>,
    shares: Vec<f64>,
    rng: ChaCha8Rng,
    seq_len: usize,
    eos: u32,
}

/// The EOS id packing separates documents with.
pub fn eos_of(tok: &Tokenizer) -> Result<u32> {
    tok.eos_ids().first().copied().ok_or_else(|| Error::Recipe("the tokenizer has no EOS token to pack with".into()))
}

impl Mixture {
    /// `sources` in the recipe's order with their weights (validated: finite, ≥ 0, positive sum).
    pub fn new(sources: &[(TextSource, f64)], tok: &Tokenizer, seq_len: usize, seed: u64) -> Result<Self> {
        let total: f64 = sources.iter().map(|(_, w)| *w).sum();
        if sources.is_empty()
            || !(total.is_finite() && total > 0.0)
            || sources.iter().any(|(_, w)| w.is_nan() || *w < 0.0)
        {
            return Err(Error::Recipe(
                "data.sources: weights must be non-negative and sum to a positive number".into(),
            ));
        }
        let streams = sources
            .iter()
            .enumerate()
            .map(|(i, (s, _))| {
                let mut order: Vec<usize> = (0..s.train.len()).collect();
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0000_0000_0000 ^ (i as u64 + 1));
                order.shuffle(&mut rng);
                Stream { name: s.name.clone(), docs: s.train.clone(), order, cur: SourceCursor::default(), buf: None }
            })
            .collect();
        Ok(Self {
            streams,
            shares: sources.iter().map(|(_, w)| w / total).collect(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            seq_len,
            eos: eos_of(tok)?,
        })
    }

    /// `seqLen + 1` tokens of one source, drawn by weight.
    pub fn next_sequence(&mut self, tok: &Tokenizer) -> Result<(usize, Vec<u32>)> {
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        let mut pick = self.shares.iter().rposition(|s| *s > 0.0).unwrap_or(0);
        for (i, s) in self.shares.iter().enumerate() {
            acc += s;
            if u < acc && *s > 0.0 {
                pick = i;
                break;
            }
        }
        let mut out = Vec::with_capacity(self.seq_len + 1);
        self.streams[pick].take(tok, self.eos, self.seq_len + 1, &mut out)?;
        Ok((pick, out))
    }

    /// A batch of `batch` packed sequences.
    pub fn next_batch(&mut self, tok: &Tokenizer, batch: usize, device: &Device) -> Result<Batch> {
        let mut ids = Vec::with_capacity(batch * self.seq_len);
        let mut targets = Vec::with_capacity(batch * self.seq_len);
        for _ in 0..batch {
            let (_, s) = self.next_sequence(tok)?;
            ids.extend_from_slice(&s[..self.seq_len]);
            targets.extend_from_slice(&s[1..]);
        }
        let n = targets.len();
        Ok(Batch {
            ids: Tensor::from_vec(ids, (batch, self.seq_len), device)?,
            targets: Tensor::from_vec(targets, n, device)?,
            weights: Tensor::ones(n, candle_core::DType::F32, device)?,
            tokens: n,
        })
    }

    pub fn cursor(&self) -> MixtureCursor {
        MixtureCursor {
            sources: self.streams.iter().map(|s| s.cur.clone()).collect(),
            rng_word_pos: self.rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&mut self, c: &MixtureCursor) -> Result<()> {
        if c.sources.len() != self.streams.len() {
            return Err(Error::Recipe(format!(
                "the checkpoint's data cursor has {} sources, the recipe {}",
                c.sources.len(),
                self.streams.len()
            )));
        }
        for (s, sc) in self.streams.iter_mut().zip(&c.sources) {
            if sc.doc >= s.docs.len() {
                return Err(src_err(&s.name, "the checkpoint's cursor is past the source's end"));
            }
            s.cur = sc.clone();
            s.buf = None;
        }
        let pos: u128 = c.rng_word_pos.parse().map_err(|_| Error::Recipe("bad RNG position in checkpoint".into()))?;
        self.rng.set_word_pos(pos);
        Ok(())
    }
}

/// Held-out windows (`seqLen + 1` tokens) for perplexity: `count` of them shared over the
/// positive-weight sources by weight (at least one each), non-overlapping, from the start of each
/// source's held-out documents joined by EOS. Returns `(source index, window)`.
pub fn heldout_windows(
    sources: &[(TextSource, f64)],
    tok: &Tokenizer,
    seq_len: usize,
    count: usize,
) -> Result<Vec<(usize, Vec<u32>)>> {
    let eos = eos_of(tok)?;
    let total: f64 = sources.iter().map(|(_, w)| *w).sum();
    let mut out = Vec::new();
    for (i, (s, w)) in sources.iter().enumerate() {
        if *w <= 0.0 {
            continue;
        }
        let want = ((count as f64 * w / total).round() as usize).max(1);
        let need = want * (seq_len + 1);
        let mut stream = Vec::with_capacity(need);
        for d in &s.heldout {
            if stream.len() >= need {
                break;
            }
            stream.extend(tok.encode(d, false)?);
            stream.push(eos);
        }
        if stream.len() < seq_len + 1 {
            return Err(src_err(
                &s.name,
                format!("the held-out text has {} tokens, fewer than one sequence of {}", stream.len(), seq_len + 1),
            ));
        }
        for c in stream.chunks_exact(seq_len + 1).take(want) {
            out.push((i, c.to_vec()));
        }
    }
    Ok(out)
}

/// One instruction example: `tokens`, and per target position (`tokens.len() − 1`) whether it
/// counts in the loss (response tokens only).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Renders and tokenizes `(prompt messages, response)`.
fn render_example(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    context: &[ChatMessage],
    response: &str,
    max_len: usize,
) -> Result<Option<Example>> {
    let (prefix, full) = match template {
        Some(t) => {
            let mut all = context.to_vec();
            all.push(ChatMessage::new("assistant", response));
            (t.render(context, true)?, t.render(&all, false)?)
        }
        None => {
            let p: String = context.iter().map(|m| format!("{}\n", m.content)).collect();
            (p.clone(), format!("{p}{response}"))
        }
    };
    let n_prefix = tok.encode(&prefix, false)?.len();
    let mut tokens = tok.encode(&full, false)?;
    if template.is_none() {
        tokens.push(eos_of(tok)?);
    }
    tokens.truncate(max_len);
    if tokens.len() < 2 || n_prefix >= tokens.len() {
        return Ok(None);
    }
    let weights = (1..tokens.len()).map(|i| if i >= n_prefix { 1.0 } else { 0.0 }).collect();
    Ok(Some(Example { tokens, weights }))
}

/// Loads instruction examples from `source` (`file:///x.jsonl` or `humaneval`: prompt → canonical
/// solution), truncated to `max_len` tokens; examples with no response token left are dropped.
pub fn load_instructions(
    cache: Option<&Cache>,
    source: &str,
    tok: &Tokenizer,
    max_len: usize,
    progress: &dyn Fn(&str),
) -> Result<Vec<Example>> {
    let template = tok.chat_template().map(|_| ChatTemplate::from_tokenizer(tok)).transpose()?;
    let mut out = Vec::new();
    if source == "humaneval" {
        let cache = cache.ok_or_else(|| src_err(source, "no cache directory to fetch the corpus into"))?;
        lacuna_data::fetch_dataset(cache, DatasetName::HumanEval, progress)?;
        for split in [Split::Train, Split::Calibration, Split::Heldout] {
            for d in lacuna_data::load_split(cache, DatasetName::HumanEval, split)? {
                let prompt = d.fields.get("prompt").and_then(|p| p.as_str()).unwrap_or_default().to_owned();
                let response = d.text.strip_prefix(prompt.as_str()).unwrap_or(&d.text).to_owned();
                let ctx = [ChatMessage::new("user", prompt)];
                out.extend(render_example(tok, template.as_ref(), &ctx, &response, max_len)?);
            }
        }
    } else {
        let path = file_path(source);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| src_err(source, format!("cannot read {}: {e}", path.display())))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = |msg: String| src_err(source, format!("line {}: {msg}", i + 1));
            let j: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let (ctx, response) = if let Some(msgs) = j.get("messages") {
                let msgs: Vec<ChatMessage> = serde_json::from_value(msgs.clone())
                    .map_err(|e| bad(format!("`messages` must be a list of {{role, content}}: {e}")))?;
                match msgs.split_last() {
                    Some((last, ctx)) if last.role == "assistant" && !ctx.is_empty() => {
                        (ctx.to_vec(), last.content.clone())
                    }
                    _ => return Err(bad("`messages` must end with an assistant turn after a prompt".into())),
                }
            } else {
                let field = |k: &str| {
                    j.get(k).and_then(|v| v.as_str()).map(str::to_owned).ok_or_else(|| bad(format!("no string `{k}`")))
                };
                (vec![ChatMessage::new("user", field("prompt")?)], field("response")?)
            };
            out.extend(render_example(tok, template.as_ref(), &ctx, &response, max_len)?);
        }
    }
    if out.is_empty() {
        return Err(src_err(source, "no instruction example with a response token"));
    }
    Ok(out)
}

/// Instruction examples in a seeded order per epoch; the cursor is `(epoch, position)`.
pub struct InstructionStream {
    examples: Vec<Example>,
    seed: u64,
    pub cursor: (u64, usize),
    order: Vec<usize>,
    pad: u32,
}

impl InstructionStream {
    pub fn new(examples: Vec<Example>, seed: u64, pad: u32) -> Self {
        let mut s = Self { examples, seed, cursor: (0, 0), order: Vec::new(), pad };
        s.reorder();
        s
    }

    fn reorder(&mut self) {
        self.order = (0..self.examples.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(self.cursor.0));
        self.order.shuffle(&mut rng);
    }

    pub fn restore(&mut self, cursor: (u64, usize)) -> Result<()> {
        if cursor.1 >= self.examples.len() {
            return Err(Error::Recipe("the checkpoint's instruction cursor is past the data's end".into()));
        }
        self.cursor = cursor;
        self.reorder();
        Ok(())
    }

    /// `batch` examples, right-padded to the longest (padding has weight 0).
    pub fn next_batch(&mut self, batch: usize, device: &Device) -> Result<Batch> {
        let mut picked = Vec::with_capacity(batch);
        for _ in 0..batch {
            picked.push(self.order[self.cursor.1]);
            self.cursor.1 += 1;
            if self.cursor.1 == self.examples.len() {
                self.cursor = (self.cursor.0 + 1, 0);
                self.reorder();
            }
        }
        batch_of(picked.iter().map(|&i| &self.examples[i]), self.pad, device)
    }
}

/// Right-pads examples into one batch.
pub fn batch_of<'a>(examples: impl Iterator<Item = &'a Example> + Clone, pad: u32, device: &Device) -> Result<Batch> {
    let t = examples.clone().map(|e| e.tokens.len() - 1).max().unwrap_or(1);
    let (mut ids, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    let mut b = 0;
    for e in examples {
        let n = e.tokens.len() - 1;
        ids.extend_from_slice(&e.tokens[..n]);
        ids.extend(std::iter::repeat_n(pad, t - n));
        targets.extend_from_slice(&e.tokens[1..]);
        targets.extend(std::iter::repeat_n(pad, t - n));
        weights.extend_from_slice(&e.weights);
        weights.extend(std::iter::repeat_n(0f32, t - n));
        b += 1;
    }
    let tokens = weights.iter().filter(|w| **w > 0.0).count();
    let n = targets.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        targets: Tensor::from_vec(targets, n, device)?,
        weights: Tensor::from_vec(weights, n, device)?,
        tokens,
    })
}
