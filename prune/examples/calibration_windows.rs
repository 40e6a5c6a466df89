//! Writes the calibration windows (token ids) that `lacuna prune` draws for a model, a
//! calibration spec and a seed, as JSON, so that another implementation (llm-compressor, see
//! `scripts/llmcompressor/`) can be calibrated on exactly the same tokens:
//!
//! ```sh
//! cargo build --release -p lacuna-prune --example calibration_windows
//! calibration_windows --model smollm2-135m --calibration wiki:128x512 --seed 0 --out windows.json
//! ```
//!
//! The windows are built as `lacuna prune` (cli/src/prune.rs) builds them: each corpus's
//! calibration split, documents tokenized without special tokens and joined by the first EOS id
//! into one stream, corpus `i` drawn with seed `seed + i` by [`pipeline::calibration_windows`].
//! Output: `{"model", "calibration", "seed", "eos_id", "windows": [[id, ...], ...]}`, written to
//! a temporary name and renamed when complete.

use std::error::Error;
use std::io::Write;
use std::path::{Path, PathBuf};

use lacuna_api::CalibrationSpec;
use lacuna_data::{Cache, DatasetName, Split};
use lacuna_model::Checkpoint;
use lacuna_prune::pipeline;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

struct Args {
    model: String,
    calibration: CalibrationSpec,
    seed: u64,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut model = "smollm2-135m".to_owned();
    let mut calibration: CalibrationSpec = "wiki:128x512".parse()?;
    let mut seed = 0u64;
    let mut out = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model = value()?,
            "--calibration" => calibration = value()?.parse().map_err(|e| format!("--calibration: {e}"))?,
            "--seed" => seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--out" => out = Some(PathBuf::from(value()?)),
            other => {
                return Err(format!(
                    "unknown argument {other:?} (usage: --model MODEL --calibration DATASET:NxLEN --seed S --out FILE)"
                )
                .into());
            }
        }
    }
    Ok(Args { model, calibration, seed, out: out.ok_or("--out FILE is required")? })
}

/// A path as given, or a known model name fetched into the cache (as `lacuna prune --model`).
fn model_path(cache: &Cache, arg: &str) -> Result<PathBuf> {
    let p = Path::new(arg);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if lacuna_data::known_models().contains(&arg) {
        return Ok(lacuna_data::fetch_model(cache, arg, &|_| {})?.path);
    }
    Err(format!("--model {arg}: no such file or directory, and not a known model").into())
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let cache = Cache::from_env()?;
    let path = model_path(&cache, &a.model)?;
    let ck = Checkpoint::open(&path).map_err(|e| format!("loading model {}: {e}", path.display()))?;
    let sep = ck.tokenizer.eos_ids().first().copied();

    let spec = &a.calibration;
    let mut windows = Vec::new();
    for (i, (corpus, samples)) in spec.datasets().into_iter().zip(spec.samples_per_dataset()).enumerate() {
        let name: DatasetName = corpus.parse().map_err(|e| format!("calibration dataset {corpus:?}: {e}"))?;
        lacuna_data::fetch_dataset(&cache, name, &|_| {})?;
        let mut stream = Vec::new();
        for d in lacuna_data::load_split(&cache, name, Split::Calibration)? {
            stream.extend(ck.tokenizer.encode(&d.text, false)?);
            stream.extend(sep);
        }
        windows.extend(pipeline::calibration_windows(&stream, samples, spec.seq_len, a.seed.wrapping_add(i as u64))?);
    }

    let doc = serde_json::json!({
        "model": path,
        "calibration": format!("{}:{}x{}", spec.dataset, spec.samples, spec.seq_len),
        "seed": a.seed,
        "eos_id": sep,
        "windows": windows,
    });
    let tmp = a.out.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(&serde_json::to_vec(&doc)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    println!("{} windows of {} tokens → {}", windows.len(), spec.seq_len, a.out.display());
    Ok(())
}
