//! Resumable training checkpoints, written atomically.
//!
//! A checkpoint is a directory: `state.json` (step, the input model's fingerprint, the recipe's
//! hash, the data cursor, the optimizer's step count) and `tensors.safetensors` (`param.<name>`
//! weights, `adam_m.<name>` / `adam_v.<name>` moments, `mask.<name>` u8 masks). It is written
//! under `<dir>.tmp`, every file fsynced, then renamed into place (the previous one moved aside
//! to `<dir>.old` and removed after); a crash between the renames leaves `<dir>.old`, which
//! [`read_state`] falls back to.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lacuna_model::Llama;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::llama::TrainLlama;
use crate::optim::{AdamW, Mask};
use crate::{Error, Result};

pub const STATE_FILE: &str = "state.json";
pub const TENSORS_FILE: &str = "tensors.safetensors";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// `pretrain` or `finetune`.
    pub kind: String,
    /// Optimizer steps completed.
    pub step: u64,
    /// [`model_fingerprint`] of the model the run started from.
    pub model_fingerprint: String,
    /// SHA-256 of the recipe's JSON.
    pub recipe_sha256: String,
    /// AdamW's bias-correction step count.
    pub adam_t: u64,
    /// The data cursor (mixture or instruction stream).
    pub cursor: serde_json::Value,
}

/// SHA-256 over the model's config, tensor names, shapes and weight bytes.
pub fn model_fingerprint(model: &Llama) -> String {
    let mut h = Sha256::new();
    h.update(format!("{:?}", model.config()).as_bytes());
    for (name, w) in model.tensors() {
        h.update(name.as_bytes());
        h.update(format!("{:?}", w.shape()).as_bytes());
        h.update(&*w.bytes());
    }
    hex::encode(h.finalize())
}

pub fn recipe_sha256<T: Serialize>(recipe: &T) -> String {
    let bytes = serde_json::to_vec(recipe).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

fn sibling(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.to_path_buf().into_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn ck_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), msg: msg.into() }
}

/// Writes a checkpoint of `model`, `opt` and `masks` with `state` to `dir`, atomically.
pub fn save(dir: &Path, state: &State, model: &TrainLlama, opt: &AdamW, masks: &[Mask]) -> Result<()> {
    let tmp = sibling(dir, ".tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, name) in model.names().iter().enumerate() {
        // Dense, whatever the storage: a checkpoint reads the same with or without packing.
        tensors.insert(format!("param.{name}"), model.dense_param(i)?);
        tensors.insert(format!("adam_m.{name}"), model.dense_like(i, &opt.m[i])?);
        tensors.insert(format!("adam_v.{name}"), model.dense_like(i, &opt.v[i])?);
    }
    for m in masks {
        tensors.insert(format!("mask.{}", m.name), m.keep.to_dtype(DType::U8)?);
    }
    let tpath = tmp.join(TENSORS_FILE);
    candle_core::safetensors::save(&tensors, &tpath)?;
    let spath = tmp.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(state).map_err(|e| ck_err(dir, e.to_string()))?;
    std::fs::write(&spath, json).map_err(|e| Error::io(&spath, e))?;
    for p in [&tpath, &spath, &tmp] {
        File::open(p).and_then(|f| f.sync_all()).map_err(|e| Error::io(p, e))?;
    }
    let old = sibling(dir, ".old");
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(d) = File::open(parent)
    {
        let _ = d.sync_all();
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// The directory holding the latest complete checkpoint (`dir`, or `<dir>.old` after a crash
/// between the two renames), if any.
pub fn locate(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), sibling(dir, ".old")].into_iter().find(|d| d.join(STATE_FILE).is_file())
}

/// Reads a checkpoint's `state.json` and checks it belongs to this model and recipe.
pub fn read_state(dir: &Path, kind: &str, fingerprint: &str, recipe_sha: &str) -> Result<(PathBuf, State)> {
    let found = locate(dir).ok_or_else(|| ck_err(dir, "no checkpoint here to resume"))?;
    let spath = found.join(STATE_FILE);
    let text = std::fs::read_to_string(&spath).map_err(|e| Error::io(&spath, e))?;
    let state: State = serde_json::from_str(&text).map_err(|e| ck_err(&spath, format!("unreadable state: {e}")))?;
    if state.format != FORMAT {
        return Err(ck_err(&found, format!("format {} (this build reads {FORMAT})", state.format)));
    }
    if state.kind != kind {
        return Err(ck_err(&found, format!("is a {} checkpoint, this is a {kind} run", state.kind)));
    }
    if state.model_fingerprint != fingerprint {
        return Err(ck_err(
            &found,
            format!(
                "was written for another model (fingerprint {}…, this model's is {}…): resume with the model it started from",
                &state.model_fingerprint[..12.min(state.model_fingerprint.len())],
                &fingerprint[..12.min(fingerprint.len())]
            ),
        ));
    }
    if state.recipe_sha256 != recipe_sha {
        return Err(ck_err(&found, "was written with a different recipe: resume with the same recipe"));
    }
    Ok((found, state))
}

/// Loads the tensors of checkpoint `dir` into `model`, `opt` and `masks` (masks replaced by the
/// checkpoint's, checked against the weights' shapes).
pub fn restore(dir: &Path, device: &Device, model: &TrainLlama, opt: &mut AdamW, masks: &mut Vec<Mask>) -> Result<()> {
    let tpath = dir.join(TENSORS_FILE);
    let mut t = candle_core::safetensors::load(&tpath, device)?;
    let mut get = |key: String, shape: &[usize]| -> Result<Tensor> {
        let v = t.remove(&key).ok_or_else(|| ck_err(&tpath, format!("no tensor `{key}`")))?;
        if v.dims() != shape {
            return Err(ck_err(&tpath, format!("`{key}` has shape {:?}, the model's is {shape:?}", v.dims())));
        }
        Ok(v)
    };
    for (i, name) in model.names().iter().enumerate() {
        let shape = &model.shapes()[i];
        model.params()[i].set(&model.stored_like(i, &get(format!("param.{name}"), shape)?)?)?;
        opt.m[i] = model.stored_like(i, &get(format!("adam_m.{name}"), shape)?)?;
        opt.v[i] = model.stored_like(i, &get(format!("adam_v.{name}"), shape)?)?;
    }
    let mut restored = Vec::new();
    for i in model.prunable() {
        let name = &model.names()[i];
        if let Some(k) = t.remove(&format!("mask.{name}")) {
            if k.dims() != model.shapes()[i].as_slice() {
                return Err(Error::Mask {
                    name: name.clone(),
                    msg: format!(
                        "checkpoint mask shape {:?} disagrees with the weight's {:?}",
                        k.dims(),
                        model.shapes()[i]
                    ),
                });
            }
            let keep = k.to_dtype(DType::F32)?;
            let numel = keep.elem_count();
            let kept = keep.sum_all()?.to_scalar::<f32>()? as usize;
            restored.push(Mask { param: i, name: name.clone(), keep, pruned: numel - kept, numel });
        }
    }
    *masks = restored;
    Ok(())
}
