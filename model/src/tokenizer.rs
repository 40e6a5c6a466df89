//! Tokenizers: from `tokenizer.json` (Hugging Face) and from GGUF metadata (GPT-2 byte-level BPE as in
//! SmolLM2, SentencePiece-style BPE as in Llama-2), with special tokens and BOS/EOS handling.
//!
//! The GGUF path builds the `tokenizers` pipeline itself rather than going through a generic
//! converter, because the pre-tokenizer has to be the one the model was trained with: for SmolLM2
//! (`tokenizer.ggml.pre == "smollm"`) that is HF's `Digits` + `ByteLevel` without a prefix space,
//! and converters that add a prefix space turn "The" into two tokens.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use crate::gguf::{GgufFile, MetaValue};
use crate::{Error, Result};

/// The split regex of Llama-3's `tokenizer.json` (llama.cpp's `llama-bpe` pre-tokenizer).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's visible space.
const SPM_SPACE: &str = "\u{2581}";

// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A text tokenizer with the special-token facts generation needs (BOS, every EOS id, chat template).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    bos_id: Option<u32>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    unk_token: Option<String>,
    pad_token: Option<String>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
    model_max_length: Option<usize>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

/// The tokenizer facts a GGUF file stores, as plain values (llama.cpp's `tokenizer.ggml.*` keys).
#[derive(Clone, Debug, Default)]
pub(crate) struct GgufVocab {
    /// `tokenizer.ggml.model`: "gpt2" or "llama".
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub token_types: Vec<i32>,
    /// "left right" pairs, best first.
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Further ids that end a turn (`eot`, `eom`).
    pub extra_eos_ids: Vec<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
    pub model_max_length: Option<usize>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl GgufVocab {
    /// Reads the tokenizer keys of `file`; a key of the wrong type is an error naming the file.
    pub(crate) fn from_gguf(file: &GgufFile) -> Result<Self> {
        let bad = |key: &str, what: &str| Error::Gguf {
            path: file.path().to_path_buf(),
            msg: format!("metadata {key}: {what}"),
        };
        let string = |key: &str| -> Result<Option<String>> {
            match file.get(key) {
                None => Ok(None),
                Some(MetaValue::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(key, "expected a string")),
            }
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match file.get(key) {
                None => Ok(None),
                Some(v) => meta_int(v)
                    .and_then(|i| u32::try_from(i).ok())
                    .map(Some)
                    .ok_or_else(|| bad(key, "expected a token id")),
            }
        };
        let flag = |key: &str| -> Result<Option<bool>> {
            match file.get(key) {
                None => Ok(None),
                Some(MetaValue::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(bad(key, "expected a bool")),
            }
        };
        let array = |key: &str| -> Result<&[MetaValue]> {
            match file.get(key) {
                None => Ok(&[]),
                Some(MetaValue::Array(a)) => Ok(a),
                Some(_) => Err(bad(key, "expected an array")),
            }
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            array(key)?
                .iter()
                .map(|v| match v {
                    MetaValue::String(s) => Ok(s.clone()),
                    _ => Err(bad(key, "expected an array of strings")),
                })
                .collect()
        };

        let model = string("tokenizer.ggml.model")?.ok_or_else(|| bad("tokenizer.ggml.model", "missing"))?;
        let tokens = strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(bad("tokenizer.ggml.tokens", "missing or empty"));
        }
        let scores = array("tokenizer.ggml.scores")?
            .iter()
            .map(|v| match v {
                MetaValue::F32(x) => Ok(*x),
                MetaValue::F64(x) => Ok(*x as f32),
                _ => Err(bad("tokenizer.ggml.scores", "expected an array of floats")),
            })
            .collect::<Result<Vec<_>>>()?;
        let token_types = array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| {
                meta_int(v)
                    .and_then(|i| i32::try_from(i).ok())
                    .ok_or_else(|| bad("tokenizer.ggml.token_type", "expected an array of integers"))
            })
            .collect::<Result<Vec<_>>>()?;
        let extra_eos_ids =
            [id("tokenizer.ggml.eot_token_id")?, id("tokenizer.ggml.eom_token_id")?].into_iter().flatten().collect();
        let model_max_length = match string("general.architecture")? {
            Some(arch) => match file.get(&format!("{arch}.context_length")) {
                Some(v) => meta_int(v).and_then(|i| usize::try_from(i).ok()),
                None => None,
            },
            None => None,
        };
        Ok(GgufVocab {
            model,
            pre: string("tokenizer.ggml.pre")?,
            tokens,
            scores,
            token_types,
            merges: strings("tokenizer.ggml.merges")?,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            extra_eos_ids,
            unk_id: id("tokenizer.ggml.unknown_token_id")?,
            pad_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token")?,
            add_eos: flag("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix")?,
            chat_template: string("tokenizer.chat_template")?,
            model_max_length,
        })
    }
}

fn meta_int(v: &MetaValue) -> Option<i64> {
    match *v {
        MetaValue::U8(x) => Some(x.into()),
        MetaValue::I8(x) => Some(x.into()),
        MetaValue::U16(x) => Some(x.into()),
        MetaValue::I16(x) => Some(x.into()),
        MetaValue::U32(x) => Some(x.into()),
        MetaValue::I32(x) => Some(x.into()),
        MetaValue::U64(x) => i64::try_from(x).ok(),
        MetaValue::I64(x) => Some(x),
        _ => None,
    }
}

/// token → id, keeping the first id of a token that appears twice (later copies are unreachable
/// from text, as in llama.cpp).
fn vocab_map(tokens: &[String]) -> Result<HashMap<String, u32>> {
    let mut vocab = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let id = u32::try_from(i).map_err(|_| Error::Tokenizer("vocabulary larger than u32".into()))?;
        vocab.entry(t.clone()).or_insert(id);
    }
    Ok(vocab)
}

/// Merges a SentencePiece-style vocabulary implies: every split of a token into two tokens of the
/// vocabulary, best merged-token score first. This mirrors `generate_merges` in transformers
/// (`tokenization_utils_base.py`), which its GGUF and SentencePiece converters use: within a token
/// splits are ordered by (left id, right id); overall a stable sort on (score, left length, right
/// length), descending, in characters.
fn spm_merges(tokens: &[String], scores: &[f32], vocab: &HashMap<String, u32>) -> Vec<(String, String)> {
    struct Cand {
        left: String,
        right: String,
        score: f32,
        left_len: usize,
        right_len: usize,
    }
    let mut cands = Vec::new();
    // Python's dict keeps the last score of a duplicated token but the first position; visit each
    // distinct token once, at its first position.
    let mut seen = std::collections::HashSet::new();
    for (i, token) in tokens.iter().enumerate() {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let score = scores.get(i).copied().unwrap_or(0.0);
        let mut local = Vec::new();
        for (split, _) in token.char_indices().skip(1) {
            let (l, r) = token.split_at(split);
            if let (Some(&il), Some(&ir)) = (vocab.get(l), vocab.get(r)) {
                local.push((il, ir, l, r));
            }
        }
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        cands.extend(local.into_iter().map(|(_, _, l, r)| Cand {
            left: l.to_string(),
            right: r.to_string(),
            score,
            left_len: l.chars().count(),
            right_len: r.chars().count(),
        }));
    }
    // Stable, so equal keys keep their order, as Python's `sorted(..., reverse=True)` does.
    cands.sort_by(|a, b| {
        b.score.total_cmp(&a.score).then(b.left_len.cmp(&a.left_len)).then(b.right_len.cmp(&a.right_len))
    });
    cands.into_iter().map(|c| (c.left, c.right)).collect()
}

fn byte_level_pre_tokenizer(pre: Option<&str>) -> Result<(PreTokenizerWrapper, bool)> {
    // (pre-tokenizer, ignore_merges)
    Ok(match pre.unwrap_or("default") {
        "default" | "gpt-2" | "gpt2" => (ByteLevel::new(false, true, true).into(), false),
        "smollm" => (
            PreTokenizerSequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
            false,
        ),
        // Llama-3's tokenizer.json sets `ignore_merges`, and llama.cpp does the same for this type.
        "llama-bpe" | "llama3" | "llama-v3" => {
            let split = Split::new(SplitPattern::Regex(LLAMA3_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(tok_err)?;
            (PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into(), true)
        }
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF pre-tokenizer {other:?} (supported: default, gpt-2, smollm, llama-bpe, llama3)"
            )));
        }
    })
}

/// A processor that adds BOS and/or EOS around each sequence (as HF's Llama tokenizers do).
fn bos_eos_processor(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Result<Option<PostProcessorWrapper>> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some((t, id)) = bos {
        single.push(t.to_string());
        pair.push(t.to_string());
        specials.push((t.to_string(), id));
    }
    single.push("$A".to_string());
    pair.push("$A".to_string());
    if let Some((t, id)) = eos {
        single.push(t.to_string());
        pair.push(t.to_string());
        if bos.map(|(b, _)| b) != Some(t) {
            specials.push((t.to_string(), id));
        }
    }
    if let Some((t, _)) = bos {
        pair.push(format!("{t}:1"));
    }
    pair.push("$B:1".to_string());
    if let Some((t, _)) = eos {
        pair.push(format!("{t}:1"));
    }
    let template = TemplateProcessing::builder()
        .try_single(single)
        .map_err(tok_err)?
        .try_pair(pair)
        .map_err(tok_err)?
        .special_tokens(specials)
        .build()
        .map_err(tok_err)?;
    Ok(Some(template.into()))
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.model` "gpt2" or "llama").
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let vocab = GgufVocab::from_gguf(file)?;
        Self::from_gguf_vocab(vocab).map_err(|e| match e {
            Error::Tokenizer(msg) => Error::Gguf { path: file.path().to_path_buf(), msg: format!("tokenizer: {msg}") },
            other => other,
        })
    }

    /// The vectors-based constructor behind [`Tokenizer::from_gguf`].
    pub(crate) fn from_gguf_vocab(v: GgufVocab) -> Result<Self> {
        let n = v.tokens.len();
        if !v.token_types.is_empty() && v.token_types.len() != n {
            return Err(Error::Tokenizer(format!("{} token types for {n} tokens", v.token_types.len())));
        }
        for (what, id) in [("bos", v.bos_id), ("eos", v.eos_id), ("unknown", v.unk_id), ("padding", v.pad_id)]
            .into_iter()
            .chain(v.extra_eos_ids.iter().map(|&i| ("eot/eom", Some(i))))
        {
            if let Some(id) = id
                && id as usize >= n
            {
                return Err(Error::Tokenizer(format!("{what} token id {id} outside the vocabulary of {n}")));
            }
        }
        let token_str = |id: Option<u32>| id.and_then(|i| v.tokens.get(i as usize).cloned());
        let vocab = vocab_map(&v.tokens)?;

        let (mut inner, add_bos_default) = match v.model.as_str() {
            "gpt2" => {
                let merges = v
                    .merges
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| Error::Tokenizer(format!("merge {m:?} is not two space-separated tokens")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let (pre, ignore_merges) = byte_level_pre_tokenizer(v.pre.as_deref())?;
                let model = BPE::builder()
                    .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
                    .ignore_merges(ignore_merges)
                    .build()
                    .map_err(tok_err)?;
                let mut t = tokenizers::Tokenizer::new(model);
                t.with_pre_tokenizer(Some(pre));
                t.with_decoder(Some(ByteLevel::default()));
                (t, false)
            }
            "llama" => {
                if v.scores.len() != n {
                    return Err(Error::Tokenizer(format!("{} scores for {n} tokens", v.scores.len())));
                }
                let merges = spm_merges(&v.tokens, &v.scores, &vocab);
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(unk) = token_str(v.unk_id) {
                    builder = builder.unk_token(unk);
                }
                let model = builder.build().map_err(tok_err)?;
                let mut t = tokenizers::Tokenizer::new(model);
                let prefix = v.add_space_prefix.unwrap_or(true);
                let replace = Replace::new(" ", SPM_SPACE).map_err(tok_err)?;
                let normalizer: NormalizerWrapper = if prefix {
                    NormalizerSequence::new(vec![Prepend::new(SPM_SPACE.into()).into(), replace.into()]).into()
                } else {
                    replace.into()
                };
                t.with_normalizer(Some(normalizer)).map_err(tok_err)?;
                let mut decoders: Vec<DecoderWrapper> = vec![
                    Replace::new(SPM_SPACE, " ").map_err(tok_err)?.into(),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ];
                if prefix {
                    decoders.push(Strip::new(' ', 1, 0).into());
                }
                t.with_decoder(Some(DecoderSequence::new(decoders)));
                (t, true)
            }
            other => {
                return Err(Error::Unsupported(format!("GGUF tokenizer model {other:?} (supported: gpt2, llama)")));
            }
        };

        let mut added = Vec::new();
        for (token, &ty) in v.tokens.iter().zip(&v.token_types) {
            match ty {
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                    added.push(AddedToken::from(token.clone(), true).normalized(false))
                }
                TOKEN_TYPE_USER_DEFINED => added.push(AddedToken::from(token.clone(), false).normalized(false)),
                _ => {}
            }
        }
        // Added one by one would re-index the matcher each time; `add_tokens` takes them all at once.
        let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
        inner.add_special_tokens(special).map_err(tok_err)?;
        inner.add_tokens(plain).map_err(tok_err)?;

        let bos_token = token_str(v.bos_id);
        let eos_token = token_str(v.eos_id);
        let add_bos = v.add_bos.unwrap_or(add_bos_default) && v.bos_id.is_some();
        let add_eos = v.add_eos.unwrap_or(false) && v.eos_id.is_some();
        let processor = bos_eos_processor(
            bos_token.as_deref().zip(v.bos_id).filter(|_| add_bos),
            eos_token.as_deref().zip(v.eos_id).filter(|_| add_eos),
        )?;
        inner.with_post_processor(processor);

        let mut eos_ids: Vec<u32> = v.eos_id.into_iter().chain(v.extra_eos_ids.iter().copied()).collect();
        dedup_keep_order(&mut eos_ids);
        Ok(Tokenizer {
            inner,
            bos_id: v.bos_id,
            bos_token,
            eos_token,
            eos_ids,
            unk_token: token_str(v.unk_id),
            pad_token: token_str(v.pad_id),
            add_bos,
            add_eos,
            chat_template: v.chat_template,
            model_max_length: v.model_max_length,
        })
    }

    /// Loads `tokenizer.json` plus, when present, `tokenizer_config.json` (chat template, BOS/EOS
    /// tokens, `add_bos_token`/`add_eos_token`, `model_max_length`), `chat_template.jinja` and
    /// `generation_config.json` (`eos_token_id`, possibly a list).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(Error::io(&tj, std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found")));
        }
        let inner = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| Error::Config { path: tj.clone(), msg: format!("cannot load tokenizer: {e}") })?;
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let gen_config = read_json_opt(&dir.join("generation_config.json"))?;
        let cfg = |k: &str| config.as_ref().and_then(|c| c.get(k));

        let special = |k: &str| -> Option<String> {
            match cfg(k)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
                _ => None,
            }
        };
        let bos_token = special("bos_token");
        let eos_token = special("eos_token");
        let gen_ids = |k: &str| -> Vec<u32> {
            match gen_config.as_ref().and_then(|c| c.get(k)) {
                Some(Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
                Some(Value::Array(a)) => {
                    a.iter().filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect()
                }
                _ => Vec::new(),
            }
        };
        let bos_id = bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| gen_ids("bos_token_id").first().copied());
        let bos_token = bos_token.or_else(|| bos_id.and_then(|i| inner.id_to_token(i)));
        let eos_from_token = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let mut eos_ids: Vec<u32> = eos_from_token.into_iter().chain(gen_ids("eos_token_id")).collect();
        dedup_keep_order(&mut eos_ids);
        let eos_token = eos_token.or_else(|| eos_ids.first().and_then(|&i| inner.id_to_token(i)));

        let chat_jinja = dir.join("chat_template.jinja");
        let chat_template = match cfg("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the "default" one, else the first.
            Some(Value::Array(list)) => {
                let named = |name: Option<&str>| {
                    list.iter().find_map(|e| {
                        let matches = name.is_none_or(|n| e.get("name").and_then(Value::as_str) == Some(n));
                        matches.then(|| e.get("template").and_then(Value::as_str)).flatten()
                    })
                };
                named(Some("default")).or_else(|| named(None)).map(str::to_string)
            }
            _ if chat_jinja.is_file() => {
                Some(std::fs::read_to_string(&chat_jinja).map_err(|e| Error::io(&chat_jinja, e))?)
            }
            _ => None,
        };
        // transformers writes a huge sentinel when the length is unknown.
        let model_max_length = cfg("model_max_length")
            .and_then(Value::as_f64)
            .filter(|&x| x >= 1.0 && x <= f64::from(u32::MAX))
            .map(|x| x as usize);

        let mut tok = Tokenizer {
            inner,
            bos_id,
            bos_token,
            eos_token,
            eos_ids,
            unk_token: special("unk_token"),
            pad_token: special("pad_token"),
            add_bos: false,
            add_eos: false,
            chat_template,
            model_max_length,
        };
        // What the tokenizer.json's post-processor does; the config, when it says, wins (as in
        // transformers, whose Llama tokenizers rebuild the post-processor from these flags).
        let (has_bos, has_eos) = tok.detect_bos_eos()?;
        let add_bos = cfg("add_bos_token").and_then(Value::as_bool).unwrap_or(has_bos) && tok.bos_id.is_some();
        let add_eos = cfg("add_eos_token").and_then(Value::as_bool).unwrap_or(has_eos) && eos_from_token.is_some();
        if (add_bos, add_eos) != (has_bos, has_eos) {
            let processor = bos_eos_processor(
                tok.bos_token.as_deref().zip(tok.bos_id).filter(|_| add_bos),
                tok.eos_token.as_deref().zip(eos_from_token).filter(|_| add_eos),
            )?;
            tok.inner.with_post_processor(processor);
        }
        tok.add_bos = add_bos;
        tok.add_eos = add_eos;
        Ok(tok)
    }

    /// Whether encoding with special tokens adds BOS in front / EOS at the end.
    fn detect_bos_eos(&self) -> Result<(bool, bool)> {
        let with = self.inner.encode("a", true).map_err(tok_err)?;
        let without = self.inner.encode("a", false).map_err(tok_err)?;
        let (with, without) = (with.get_ids(), without.get_ids());
        let extra = with.len() > without.len();
        let bos = extra && self.bos_id.is_some() && with.first().copied() == self.bos_id;
        let eos = extra && with.last().is_some_and(|l| self.eos_ids.contains(l)) && without.last() != with.last();
        Ok((bos, eos))
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`, which
    /// transformers' `AutoTokenizer.from_pretrained(dir)` loads to the same ids.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tj = dir.join("tokenizer.json");
        let json = self.inner.to_string(true).map_err(tok_err)?;
        std::fs::write(&tj, json).map_err(|e| Error::io(&tj, e))?;

        let mut specials = serde_json::Map::new();
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("unk_token", &self.unk_token),
            ("pad_token", &self.pad_token),
        ] {
            if let Some(v) = v {
                specials.insert(k.into(), Value::String(v.clone()));
            }
        }
        let mut config = specials.clone();
        config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        config.insert("add_bos_token".into(), self.add_bos.into());
        config.insert("add_eos_token".into(), self.add_eos.into());
        // Decoding must give back the text as is.
        config.insert("clean_up_tokenization_spaces".into(), false.into());
        if let Some(t) = &self.chat_template {
            config.insert("chat_template".into(), t.clone().into());
        }
        if let Some(n) = self.model_max_length {
            config.insert("model_max_length".into(), n.into());
        }
        for (name, value) in [("tokenizer_config.json", config), ("special_tokens_map.json", specials)] {
            let path = dir.join(name);
            let text = serde_json::to_string_pretty(&Value::Object(value)).map_err(tok_err)?;
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Token ids of `text`; BOS (and EOS where the model wants it) is added iff `add_special_tokens`.
    /// Special tokens written in the text (e.g. `<|im_start|>`) map to their single ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.inner.get_vocab_size(true);
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= n || self.inner.id_to_token(i).is_none()) {
            return Err(Error::Tokenizer(format!("token id {bad} outside the vocabulary of {n}")));
        }
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Every id that ends generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Whether `encode(_, true)` adds BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The context length the tokenizer was declared for, when known.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }
}

fn dedup_keep_order(ids: &mut Vec<u32>) {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|i| seen.insert(*i));
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v = serde_json::from_str(&text)
        .map_err(|e| Error::Config { path: path.to_path_buf(), msg: format!("invalid JSON: {e}") })?;
    Ok(Some(v))
}

/// Incremental detokenizer for streaming: feed ids, get the newly completed text, never a broken
/// UTF-8 character.
///
/// It keeps a short window of ids and decodes it twice — up to the last emitted id and with the new
/// one — and emits the difference once it does not end in U+FFFD (an incomplete byte sequence).
/// Decoding a window rather than single ids keeps spaces that decoders strip at a text's start
/// (SentencePiece) and multi-token characters intact. Special tokens are skipped.
pub struct DecodeStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> DecodeStream<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        DecodeStream { tok, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Adds `id`; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = self.tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            None => full.get(prefix.len()..).unwrap_or_default().to_string(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Forget what no later decode needs.
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        Ok(new)
    }
}

/// Token types in a map, for tests that build vocabularies by hand.
#[cfg(test)]
fn types_of(n: usize, special: &std::collections::BTreeMap<usize, i32>) -> Vec<i32> {
    (0..n).map(|i| special.get(&i).copied().unwrap_or(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A tiny SentencePiece-style vocabulary: <unk>, <s>, </s>, bytes for '\n' and the two bytes
    /// of "é", then pieces whose scores fix the merge order.
    fn spm_vocab() -> GgufVocab {
        let tokens: Vec<String> = [
            "<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>", "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll",
            "▁he", "▁hell", "▁hello", "▁w", "or", "▁wor", "▁world", "lo",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let scores = vec![
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, // specials and bytes
            -100.0, -101.0, -102.0, -103.0, -104.0, -105.0, -106.0, -107.0, // single characters
            -1.0,   // ▁h
            -2.0,   // ll
            -3.0,   // ▁he
            -4.0,   // ▁hell
            -5.0,   // ▁hello
            -6.0,   // ▁w
            -7.0,   // or
            -8.0,   // ▁wor
            -9.0,   // ▁world
            -10.0,  // lo: worse than "ll", so "hello" merges "ll" first
        ];
        let mut special = BTreeMap::new();
        special.insert(0, TOKEN_TYPE_UNKNOWN);
        special.insert(1, TOKEN_TYPE_CONTROL);
        special.insert(2, TOKEN_TYPE_CONTROL);
        for b in 3..6 {
            special.insert(b, 6);
        }
        GgufVocab {
            model: "llama".into(),
            token_types: types_of(tokens.len(), &special),
            tokens,
            scores,
            bos_id: Some(1),
            eos_id: Some(2),
            unk_id: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn spm_merges_follow_scores_like_transformers() {
        let v = spm_vocab();
        let vocab = vocab_map(&v.tokens).unwrap();
        let merges = spm_merges(&v.tokens, &v.scores, &vocab);
        let pairs: Vec<(&str, &str)> = merges.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        // Derived by hand: each token's two-piece splits, best token score first.
        // Derived by hand: each token's two-piece splits, best token score first. "▁world" has no
        // split into two tokens ("ld", "▁worl", "orld" are none), so no merge makes it.
        assert_eq!(
            pairs,
            vec![
                ("▁", "h"),
                ("l", "l"),
                ("▁h", "e"),
                ("▁he", "ll"),
                ("▁hell", "o"),
                ("▁", "w"),
                ("o", "r"),
                ("▁w", "or"),
                ("l", "o"),
            ]
        );
    }

    #[test]
    fn spm_merge_ties_break_like_transformers() {
        // Equal scores: longer left piece first, then longer right piece, then vocabulary order
        // (checked against transformers' `generate_merges`).
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"].iter().map(|s| s.to_string()).collect();
        let scores = vec![0.0, 0.0, 0.0, -1.0, -1.0, -1.0];
        let vocab = vocab_map(&tokens).unwrap();
        let merges = spm_merges(&tokens, &scores, &vocab);
        let pairs: Vec<(&str, &str)> = merges.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(pairs, vec![("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]);
    }

    #[test]
    fn spm_encode_decode_by_hand() {
        let tok = Tokenizer::from_gguf_vocab(spm_vocab()).unwrap();
        assert!(tok.add_bos());
        // "hello world" → "▁hello▁world": ▁h+e → ▁he, l+l → ll, ▁he+ll → ▁hell, ▁hell+o → ▁hello;
        // ▁w, or, ▁wor; "▁worl" and "ld" are no tokens, so l and d stay single.
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![1, 18, 21, 9, 13]);
        assert_eq!(tok.encode("hello world", false).unwrap(), vec![18, 21, 9, 13]);
        // "lo" alone: the only merge is l+o.
        assert_eq!(tok.encode("lo", false).unwrap(), vec![6, 23]);
        // Unknown characters fall back to bytes when the byte exists ('\n', 'é'), else <unk>.
        assert_eq!(tok.encode("h\né", false).unwrap(), vec![14, 3, 4, 5]);
        assert_eq!(tok.encode("hz", false).unwrap(), vec![14, 0]);
        // Control tokens in text stay whole.
        assert_eq!(tok.encode("</s>", false).unwrap(), vec![2]);
        // Decoding drops the added leading space and reassembles byte tokens.
        assert_eq!(tok.decode(&[1, 18, 21, 9, 13], true).unwrap(), "hello world");
        assert_eq!(tok.decode(&[14, 3, 4, 5], true).unwrap(), "h\né");
        assert_eq!(tok.decode(&[1, 18], false).unwrap(), "<s> hello");
        assert!(tok.decode(&[999], false).is_err());
    }

    #[test]
    fn spm_without_space_prefix() {
        let mut v = spm_vocab();
        v.add_space_prefix = Some(false);
        v.add_bos = Some(false);
        let tok = Tokenizer::from_gguf_vocab(v).unwrap();
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![7, 8, 15, 10, 21, 9, 13]);
        assert_eq!(tok.decode(&[7, 8, 15, 10, 21, 9, 13], false).unwrap(), "hello world");
    }

    #[test]
    fn decode_stream_emits_whole_characters() {
        let tok = Tokenizer::from_gguf_vocab(spm_vocab()).unwrap();
        let mut s = DecodeStream::new(&tok);
        let mut out = Vec::new();
        for id in [1, 18, 21, 9, 13, 4, 5, 3] {
            out.push(s.push(id).unwrap());
        }
        assert_eq!(out, vec!["", "hello", " wor", "l", "d", "", "é", "\n"]);
    }

    #[test]
    fn unknown_model_and_pre_are_unsupported() {
        let mut v = spm_vocab();
        v.model = "bert".into();
        assert!(matches!(Tokenizer::from_gguf_vocab(v), Err(Error::Unsupported(_))));
        let mut v = spm_vocab();
        v.model = "gpt2".into();
        v.pre = Some("nonesuch".into());
        assert!(matches!(Tokenizer::from_gguf_vocab(v), Err(Error::Unsupported(_))));
    }

    #[test]
    fn bad_ids_are_errors() {
        let mut v = spm_vocab();
        v.bos_id = Some(10_000);
        assert!(matches!(Tokenizer::from_gguf_vocab(v), Err(Error::Tokenizer(_))));
        let mut v = spm_vocab();
        v.scores.pop();
        assert!(Tokenizer::from_gguf_vocab(v).is_err());
    }

    /// A byte-level vocabulary: the 256 byte symbols plus a few merges and a control token.
    fn gpt2_vocab(pre: &str) -> GgufVocab {
        let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string()];
        let alphabet = ByteLevel::alphabet();
        let mut bytes: Vec<char> = alphabet.into_iter().collect();
        bytes.sort();
        tokens.extend(bytes.iter().map(|c| c.to_string()));
        tokens.extend(["Ġt", "he", "Ġthe", "12"].iter().map(|s| s.to_string()));
        let mut special = BTreeMap::new();
        special.insert(0, TOKEN_TYPE_CONTROL);
        special.insert(1, TOKEN_TYPE_CONTROL);
        GgufVocab {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            token_types: types_of(tokens.len(), &special),
            merges: vec!["Ġ t".into(), "h e".into(), "Ġt he".into(), "1 2".into()],
            tokens,
            bos_id: Some(0),
            eos_id: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn byte_level_pre_tokenizers() {
        let smol = Tokenizer::from_gguf_vocab(gpt2_vocab("smollm")).unwrap();
        let gpt2 = Tokenizer::from_gguf_vocab(gpt2_vocab("gpt-2")).unwrap();
        let llama3 = Tokenizer::from_gguf_vocab(gpt2_vocab("llama-bpe")).unwrap();
        assert!(!smol.add_bos());
        let id = |t: &Tokenizer, s: &str| t.token_to_id(s).unwrap();
        // No prefix space: "the" is t,he — not Ġthe.
        assert_eq!(smol.encode("the", true).unwrap(), vec![id(&smol, "t"), id(&smol, "he")]);
        assert_eq!(smol.encode(" the", true).unwrap(), vec![id(&smol, "Ġthe")]);
        // Digits are split one by one only by smollm's pre-tokenizer.
        assert_eq!(smol.encode("12", false).unwrap(), vec![id(&smol, "1"), id(&smol, "2")]);
        assert_eq!(gpt2.encode("12", false).unwrap(), vec![id(&gpt2, "12")]);
        assert_eq!(llama3.encode("12", false).unwrap(), vec![id(&llama3, "12")]);
        // Control tokens written in the text map to their id.
        assert_eq!(smol.encode("<|im_start|>the", false).unwrap(), vec![1, id(&smol, "t"), id(&smol, "he")]);
        for t in [&smol, &gpt2, &llama3] {
            let text = "<|im_start|> the 12\n\té€";
            assert_eq!(t.decode(&t.encode(text, false).unwrap(), false).unwrap(), text);
        }
    }

    #[test]
    fn hf_dir_round_trip() {
        let tok = Tokenizer::from_gguf_vocab(spm_vocab()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tok.save_hf(dir.path()).unwrap();
        let back = Tokenizer::from_hf_dir(dir.path()).unwrap();
        for text in ["hello world", "h\né", "</s> hello", ""] {
            assert_eq!(back.encode(text, true).unwrap(), tok.encode(text, true).unwrap(), "{text:?}");
        }
        assert_eq!(back.bos_id(), Some(1));
        assert_eq!(back.eos_ids(), &[2]);
        assert!(back.add_bos());
        assert!(Tokenizer::from_hf_dir(&dir.path().join("nope")).is_err());
    }

    #[test]
    fn hf_dir_config_overrides_post_processor() {
        let tok = Tokenizer::from_gguf_vocab(spm_vocab()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tok.save_hf(dir.path()).unwrap();
        let cfg = dir.path().join("tokenizer_config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        v["add_bos_token"] = false.into();
        v["chat_template"] = Value::Array(vec![serde_json::json!({"name": "default", "template": "T"})]);
        std::fs::write(&cfg, v.to_string()).unwrap();
        std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [2, 0]}"#).unwrap();
        let back = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert!(!back.add_bos());
        assert_eq!(back.encode("hello", true).unwrap(), vec![18]);
        assert_eq!(back.eos_ids(), &[2, 0]);
        assert_eq!(back.chat_template(), Some("T"));
    }
}
