//! The Llama hyper-parameters, read from a checkpoint (HF `config.json` or GGUF metadata) and never
//! assumed: GQA, head size, RoPE base and scaling, norm epsilon, tied embeddings, special ids.

use std::path::Path;

use serde_json::{Value, json};

use crate::gguf::{GgufFile, MetaValue};
use crate::{Error, Result};

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x (`rope_type: "llama3"`): wavelength-dependent interpolation.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// Position interpolation (`rope_type: "linear"`): every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Per-frequency divisors as llama.cpp stores them (`rope_freqs.weight` in GGUF).
    Divisors(Vec<f32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Checkpoint dtype as HF names it (`float32`, `bfloat16`, `float16`), when known.
    pub torch_dtype: Option<String>,
}

impl LlamaConfig {
    /// Width of the K (and V) projections.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
    /// Width of the Q projection.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Checks the relations the forward pass relies on.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::Config { path: origin.to_path_buf(), msg });
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return bad("rms_norm_eps and rope_theta must be positive".into());
        }
        if let Some(RopeScaling::Divisors(d)) = &self.rope_scaling
            && d.len() != self.head_dim / 2
        {
            return bad(format!("rope frequency table has {} entries, expected {}", d.len(), self.head_dim / 2));
        }
        Ok(())
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them), scaling applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        let base: Vec<f64> =
            (0..half).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64)).collect();
        let scaled: Vec<f64> = match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Divisors(d)) => base.iter().zip(d).map(|(f, d)| f / *d as f64).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                // Transformers' `_compute_llama3_parameters`.
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }

    /// Reads a Hugging Face `config.json` (and `generation_config.json` beside it, for EOS ids).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| Error::Config { path: path.clone(), msg: e.to_string() })?;
        let mut cfg = Self::from_hf_value(&v, &path)?;
        let gen_path = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path) {
            let g: Value = serde_json::from_str(&text)
                .map_err(|e| Error::Config { path: gen_path.clone(), msg: e.to_string() })?;
            let eos = id_list(g.get("eos_token_id"));
            if !eos.is_empty() {
                cfg.eos_token_ids = eos;
            }
            if let Some(b) = g.get("bos_token_id").and_then(Value::as_u64) {
                cfg.bos_token_id = Some(b as u32);
            }
        }
        cfg.validate(&path)?;
        Ok(cfg)
    }

    pub fn from_hf_value(v: &Value, path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Config { path: path.to_path_buf(), msg };
        if let Some(mt) = v.get("model_type").and_then(Value::as_str)
            && !matches!(mt, "llama" | "mistral")
        {
            return Err(err(format!("model_type {mt:?} is not a Llama-architecture model")));
        }
        let req = |key: &str| -> Result<usize> {
            match v.get(key) {
                None => Err(err(format!("missing required key `{key}`"))),
                Some(x) => x
                    .as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| err(format!("`{key}` must be a non-negative integer, got {x}"))),
            }
        };
        let opt_f = |key: &str, default: f64| -> Result<f64> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_f64().ok_or_else(|| err(format!("`{key}` must be a number, got {x}"))),
            }
        };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let num_key_value_heads = match v.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => req("num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            None | Some(Value::Null) => hidden_size / num_attention_heads.max(1),
            Some(_) => req("head_dim")?,
        };
        // transformers >= 5 writes `rope_parameters` (`rope_type`, `rope_theta` and the scaling
        // fields in one object) instead of `rope_theta` + `rope_scaling`; read either.
        let rope_parameters = v.get("rope_parameters").filter(|p| !p.is_null());
        let rope_scaling = match v.get("rope_scaling").filter(|p| !p.is_null()).or(rope_parameters) {
            None | Some(Value::Null) => None,
            Some(rs) => {
                let kind = rs.get("rope_type").or_else(|| rs.get("type")).and_then(Value::as_str).unwrap_or("");
                let f =
                    |k: &str| rs.get(k).and_then(Value::as_f64).ok_or_else(|| err(format!("rope_scaling.{k} missing")));
                match kind {
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
                    }),
                    "linear" => Some(RopeScaling::Linear { factor: f("factor")? }),
                    "default" => None,
                    other => return Err(err(format!("rope_scaling type {other:?} is not supported (llama3, linear)"))),
                }
            }
        };
        Ok(Self {
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: req("max_position_embeddings")?,
            rms_norm_eps: opt_f("rms_norm_eps", 1e-6)?,
            rope_theta: match rope_parameters.and_then(|p| p.get("rope_theta")) {
                Some(t) if v.get("rope_theta").is_none_or(Value::is_null) => {
                    t.as_f64().ok_or_else(|| err(format!("`rope_parameters.rope_theta` must be a number, got {t}")))?
                }
                _ => opt_f("rope_theta", 10000.0)?,
            },
            rope_scaling,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).map(|b| b as u32),
            eos_token_ids: id_list(v.get("eos_token_id")),
            torch_dtype: v.get("torch_dtype").or_else(|| v.get("dtype")).and_then(Value::as_str).map(str::to_owned),
        })
    }

    /// Reads the `<arch>.*` keys of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.get_str("general.architecture")?.to_owned();
        if arch != "llama" {
            return Err(Error::Gguf {
                path: file.path().to_path_buf(),
                msg: format!("general.architecture is {arch:?}; only `llama` is supported"),
            });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let opt_u32 = |key: &str| file.get(key).map(|_| file.get_u32(key)).transpose();
        let opt_f32 = |key: &str| file.get(key).map(|_| file.get_f32(key)).transpose();
        let hidden_size = file.get_u32(&k("embedding_length"))? as usize;
        let heads = file.get_u32(&k("attention.head_count"))? as usize;
        let kv_heads = opt_u32(&k("attention.head_count_kv"))?.map(|v| v as usize).unwrap_or(heads);
        let head_dim = match opt_u32(&k("attention.key_length"))? {
            Some(v) => v as usize,
            None => opt_u32(&k("rope.dimension_count"))?.map(|v| v as usize).unwrap_or(hidden_size / heads.max(1)),
        };
        let vocab_size = match opt_u32(&k("vocab_size"))? {
            Some(v) => v as usize,
            None => match file.get("tokenizer.ggml.tokens") {
                Some(MetaValue::Array(a)) => a.len(),
                _ => file.tensor("token_embd.weight").map(|t| t.shape()[0]).unwrap_or(0),
            },
        };
        let rope_scaling = match file.tensor("rope_freqs.weight") {
            Some(_) => Some(RopeScaling::Divisors(file.dequantize("rope_freqs.weight")?)),
            None => match file.get(&k("rope.scaling.type")) {
                Some(MetaValue::String(t)) if t == "linear" => {
                    Some(RopeScaling::Linear { factor: file.get_f32(&k("rope.scaling.factor"))? as f64 })
                }
                Some(MetaValue::String(t)) if t == "none" => None,
                Some(MetaValue::String(t)) => {
                    return Err(Error::Gguf {
                        path: file.path().to_path_buf(),
                        msg: format!("rope scaling type {t:?} is not supported"),
                    });
                }
                _ => None,
            },
        };
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size: file.get_u32(&k("feed_forward_length"))? as usize,
            num_hidden_layers: file.get_u32(&k("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: file.get_u32(&k("context_length"))? as usize,
            rms_norm_eps: opt_f32(&k("attention.layer_norm_rms_epsilon"))?.map(f64::from).unwrap_or(1e-5),
            rope_theta: opt_f32(&k("rope.freq_base"))?.map(f64::from).unwrap_or(10000.0),
            rope_scaling,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            bos_token_id: opt_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: opt_u32("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
            torch_dtype: None,
        };
        cfg.validate(file.path())?;
        Ok(cfg)
    }

    /// The `config.json` that transformers' `LlamaForCausalLM` loads.
    pub fn to_hf_json(&self, torch_dtype: &str) -> Result<Value> {
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                       "high_freq_factor": high_freq_factor,
                       "original_max_position_embeddings": original_max_position_embeddings})
            }
            Some(RopeScaling::Divisors(_)) => {
                return Err(Error::Unsupported(
                    "a GGUF rope frequency table has no exact Hugging Face config equivalent".into(),
                ));
            }
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        Ok(json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": torch_dtype,
        }))
    }
}

fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
               "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 4096,
               "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"})
    }

    #[test]
    fn llama2_7b_config_parses_with_defaults() {
        let c = LlamaConfig::from_hf_value(&base(), Path::new("config.json")).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.rope_theta), (32, 128, 10000.0));
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![2]);
        c.validate(Path::new("x")).unwrap();
    }

    #[test]
    fn missing_key_is_named() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("intermediate_size");
        let e = LlamaConfig::from_hf_value(&v, Path::new("m/config.json")).unwrap_err().to_string();
        assert!(e.contains("m/config.json") && e.contains("intermediate_size"), "{e}");
    }

    #[test]
    fn llama3_scaling_matches_transformers() {
        // Values from transformers' `_compute_llama3_parameters` for Llama-3.1-8B (theta 5e5, head 128).
        let mut v = base();
        v["rope_theta"] = json!(500000.0);
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = LlamaConfig::from_hf_value(&v, Path::new("c")).unwrap();
        let f = c.inv_freq();
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0); // highest frequency untouched
        let unscaled_last = 1.0 / 500000f64.powf(126.0 / 128.0);
        assert!(((f[63] as f64) - unscaled_last / 8.0).abs() < 1e-12); // lowest divided by factor
        let json = c.to_hf_json("bfloat16").unwrap();
        assert_eq!(LlamaConfig::from_hf_value(&json, Path::new("c")).unwrap().rope_scaling, c.rope_scaling);
    }

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        // transformers >= 5 saves `rope_parameters` in place of `rope_theta` / `rope_scaling`.
        let mut v = base();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 100000.0});
        let c = LlamaConfig::from_hf_value(&v, Path::new("c")).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.clone()), (100000.0, None));
        v["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = LlamaConfig::from_hf_value(&v, Path::new("c")).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": "big"});
        let e = LlamaConfig::from_hf_value(&v, Path::new("c")).unwrap_err().to_string();
        assert!(e.contains("rope_parameters.rope_theta"), "{e}");
    }

    #[test]
    fn gqa_must_divide() {
        let mut v = base();
        v["num_key_value_heads"] = json!(5);
        let c = LlamaConfig::from_hf_value(&v, Path::new("c")).unwrap();
        assert!(c.validate(Path::new("c")).unwrap_err().to_string().contains("multiple"));
    }
}
