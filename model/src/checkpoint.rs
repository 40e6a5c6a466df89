//! Opening a model from disk: a GGUF file or a Hugging Face directory, detected by content.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use lacuna_kernels::ggml::GgmlType;

use crate::config::LlamaConfig;
use crate::gguf::GgufFile;
use crate::hf;
use crate::llama::{Llama, gguf_to_hf_name, unpermute_qk};
use crate::tokenizer::Tokenizer;
use crate::weights::{Data, Storage, Weight};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Gguf,
    HfDir,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Gguf => "gguf",
            Format::HfDir => "hf",
        }
    }
}

/// Tells a GGUF file from a Hugging Face directory, with an error naming what is wrong.
pub fn detect(path: &Path) -> Result<Format> {
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(Format::HfDir);
        }
        return Err(Error::Config { path: path.to_path_buf(), msg: "directory has no config.json".into() });
    }
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    match f.read_exact(&mut magic) {
        Ok(()) if &magic == b"GGUF" => Ok(Format::Gguf),
        Ok(()) => Err(Error::Gguf {
            path: path.to_path_buf(),
            msg: format!("not a GGUF file (magic {magic:02x?}) nor a Hugging Face directory"),
        }),
        Err(e) => Err(Error::Gguf { path: path.to_path_buf(), msg: format!("too short to be a model file: {e}") }),
    }
}

/// A loaded model with its tokenizer.
pub struct Checkpoint {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub format: Format,
    pub path: PathBuf,
}

/// How a checkpoint's weights are held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Sparse enough linear layers in `sparse-bitmask` form (what the engine serves).
    #[default]
    Auto,
    /// Every weight dense (the reference path).
    Dense,
}

impl Checkpoint {
    /// Opens with [`Kernels::Auto`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, Kernels::Auto)
    }

    pub fn open_with(path: &Path, kernels: Kernels) -> Result<Self> {
        let mut ck = Self::open_dense_or_stored(path)?;
        match kernels {
            Kernels::Auto => {
                ck.model.prefer_bitmask()?;
            }
            Kernels::Dense => ck.model.densify(),
        }
        Ok(ck)
    }

    fn open_dense_or_stored(path: &Path) -> Result<Self> {
        let format = detect(path)?;
        let (model, tokenizer) = match format {
            Format::Gguf => {
                let file = GgufFile::open(path)?;
                let config = LlamaConfig::from_gguf(&file)?;
                let tokenizer = Tokenizer::from_gguf(&file)?;
                let tensors = gguf_tensors(&file, &config)?;
                (Llama::load(config, tensors, path)?, tokenizer)
            }
            Format::HfDir => {
                let config = LlamaConfig::from_hf_dir(path)?;
                let tokenizer = Tokenizer::from_hf_dir(path)?;
                let tensors = hf::load_tensors(path)?;
                (Llama::load(config, tensors, path)?, tokenizer)
            }
        };
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(Error::Config {
                path: path.to_path_buf(),
                msg: format!(
                    "tokenizer has {} tokens but the model's vocabulary is {}",
                    tokenizer.vocab_size(),
                    model.config().vocab_size
                ),
            });
        }
        Ok(Self { model, tokenizer, format, path: path.to_path_buf() })
    }
}

/// Every GGUF tensor under its Hugging Face name, in the HF layout (Q/K un-permuted). Float tensors
/// keep their dtype; block-quantized ones are dequantized to f32.
pub fn gguf_tensors(file: &GgufFile, config: &LlamaConfig) -> Result<BTreeMap<String, Weight>> {
    let mut out = BTreeMap::new();
    for info in file.tensors() {
        let Some(name) = gguf_to_hf_name(&info.name) else {
            tracing::debug!("ignoring GGUF tensor {}", info.name);
            continue;
        };
        let shape = info.shape();
        let heads = if name.ends_with("self_attn.q_proj.weight") {
            Some(config.num_attention_heads)
        } else if name.ends_with("self_attn.k_proj.weight") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        let bytes = file.tensor_bytes(info);
        let data = match info.ty {
            GgmlType::F16 => Data::F16(Storage::Owned(bytemuck::pod_collect_to_vec::<u8, f16>(bytes))),
            GgmlType::BF16 => Data::BF16(Storage::Owned(bytemuck::pod_collect_to_vec::<u8, bf16>(bytes))),
            _ => Data::F32(Storage::Owned(file.dequantize(&info.name)?)),
        };
        let data = match (heads, &shape[..]) {
            (Some(nh), [rows, cols]) => {
                let err =
                    |e: Error| Error::Gguf { path: file.path().to_path_buf(), msg: format!("{}: {e}", info.name) };
                match data {
                    Data::F32(s) => {
                        Data::F32(Storage::Owned(unpermute_qk(s.as_slice(), *rows, *cols, nh).map_err(err)?))
                    }
                    Data::F16(s) => {
                        Data::F16(Storage::Owned(unpermute_qk(s.as_slice(), *rows, *cols, nh).map_err(err)?))
                    }
                    Data::BF16(s) => {
                        Data::BF16(Storage::Owned(unpermute_qk(s.as_slice(), *rows, *cols, nh).map_err(err)?))
                    }
                    other => other,
                }
            }
            _ => data,
        };
        let w = Weight::new(shape, data)
            .map_err(|e| Error::Gguf { path: file.path().to_path_buf(), msg: format!("{}: {e}", info.name) })?;
        out.insert(name, w);
    }
    Ok(out)
}
