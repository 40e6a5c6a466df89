//! What a checkpoint holds: every tensor's dtype and shape, and sparsity per layer and overall.

use std::path::Path;

use serde::Serialize;

use crate::checkpoint::{Format, detect, gguf_tensors};
use crate::config::LlamaConfig;
use crate::gguf::GgufFile;
use crate::hf;
use crate::weights::Weight;
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct TensorStat {
    pub name: String,
    /// Storage type in the file (`Q4_1`, `bf16`, `int8`, ...).
    pub dtype: String,
    /// How the file stores it: `float`, `bitmask` (sparse-bitmask float), `int8` or `bitmask-int8`.
    pub format: String,
    pub shape: Vec<usize>,
    pub numel: usize,
    pub zeros: usize,
    pub sparsity: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerStat {
    pub layer: usize,
    /// The formats of its linear weights (see [`TensorStat::format`]), `+`-joined when mixed.
    pub format: String,
    pub numel: usize,
    pub zeros: usize,
    pub sparsity: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    pub format: String,
    pub parameters: usize,
    /// Over the linear weights of the decoder layers (what pruning targets).
    pub decoder_linear_sparsity: f64,
    /// Over every parameter.
    pub global_sparsity: f64,
    pub layers: Vec<LayerStat>,
    pub tensors: Vec<TensorStat>,
}

fn ratio(z: usize, n: usize) -> f64 {
    if n == 0 { 0.0 } else { z as f64 / n as f64 }
}

/// How `w` was stored: `float`, `bitmask`, `int8` or `bitmask-int8`.
pub fn storage_format(w: &Weight) -> &'static str {
    match (w.int8(), w.is_bitmask()) {
        (Some(m), _) if m.stored_as_bitmask() => "bitmask-int8",
        (Some(_), _) => "int8",
        (None, true) => "bitmask",
        (None, false) => "float",
    }
}

/// Layer index of an HF name `model.layers.N.…`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

pub fn inspect(path: &Path) -> Result<InspectReport> {
    let format = detect(path)?;
    // (HF name, stored dtype, weight)
    let (tensors, dtypes): (Vec<(String, Weight)>, Vec<String>) = match format {
        Format::Gguf => {
            let file = GgufFile::open(path)?;
            let cfg = LlamaConfig::from_gguf(&file)?;
            let by_name = gguf_tensors(&file, &cfg)?;
            let mut dt = Vec::new();
            let mut ts = Vec::new();
            for info in file.tensors() {
                if let Some(hf) = crate::llama::gguf_to_hf_name(&info.name)
                    && let Some(w) = by_name.get(&hf)
                {
                    dt.push(info.ty.name().to_owned());
                    ts.push((hf, w.clone()));
                }
            }
            (ts, dt)
        }
        Format::HfDir => {
            let ts: Vec<_> = hf::load_tensors(path)?.into_iter().collect();
            let dt = ts.iter().map(|(_, w)| w.dtype().name().to_owned()).collect();
            (ts, dt)
        }
    };
    if tensors.is_empty() {
        return Err(Error::Invalid(format!("{}: no tensors", path.display())));
    }
    let mut stats = Vec::new();
    let mut layers: Vec<LayerStat> = Vec::new();
    let (mut all_n, mut all_z, mut lin_n, mut lin_z) = (0, 0, 0, 0);
    for ((name, w), dtype) in tensors.iter().zip(dtypes) {
        let (n, z) = (w.len(), w.count_zeros());
        all_n += n;
        all_z += z;
        if let Some(l) = layer_of(name)
            && w.shape().len() == 2
        {
            lin_n += n;
            lin_z += z;
            if layers.len() <= l {
                layers.resize_with(l + 1, || LayerStat {
                    layer: 0,
                    format: String::new(),
                    numel: 0,
                    zeros: 0,
                    sparsity: 0.0,
                });
            }
            let s = &mut layers[l];
            s.layer = l;
            let f = storage_format(w);
            if !s.format.split('+').any(|x| x == f) {
                if !s.format.is_empty() {
                    s.format.push('+');
                }
                s.format.push_str(f);
            }
            s.numel += n;
            s.zeros += z;
        }
        stats.push(TensorStat {
            name: name.clone(),
            dtype,
            format: storage_format(w).to_owned(),
            shape: w.shape().to_vec(),
            numel: n,
            zeros: z,
            sparsity: ratio(z, n),
        });
    }
    for l in &mut layers {
        l.sparsity = ratio(l.zeros, l.numel);
    }
    Ok(InspectReport {
        format: format.name().to_owned(),
        parameters: all_n,
        decoder_linear_sparsity: ratio(lin_z, lin_n),
        global_sparsity: ratio(all_z, all_n),
        layers,
        tensors: stats,
    })
}
