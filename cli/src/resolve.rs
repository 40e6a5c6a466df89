//! Turning command-line names into files: a model name or path, a corpus name or text file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use lacuna_data::{Cache, DatasetName, Split};

pub fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template"));
    pb.set_message(msg.to_owned());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

/// A model argument: an existing path (GGUF file or HF directory), or a known model name that is
/// fetched into the cache on first use.
/// `p` with `suffix` appended to its last component: a stage's side outputs (`-bitmask`,
/// `.checkpoint`, `.metrics.jsonl`) live beside its output.
pub fn sibling(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub fn model_path(arg: &str) -> Result<PathBuf> {
    if let Some(uri) = crate::objects::S3Uri::parse(arg) {
        let uri = uri?;
        let pb = spinner(&format!("downloading {uri}"));
        let dir = crate::objects::fetch(&uri)?;
        pb.finish_and_clear();
        return Ok(dir);
    }
    let p = Path::new(arg);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if lacuna_data::known_models().contains(&arg) {
        let cache = Cache::from_env()?;
        let pb = spinner(&format!("fetching {arg}"));
        let m = lacuna_data::fetch_model(&cache, arg, &|s| pb.set_message(s.to_owned()))
            .with_context(|| format!("fetching model {arg}"))?;
        pb.finish_and_clear();
        return Ok(m.path);
    }
    bail!("{arg}: no such file or directory, and not a known model ({})", lacuna_data::known_models().join(", "))
}

/// A text argument: a corpus name (its split, fetched on first use) or a text file.
pub fn text(arg: &str, split: Split) -> Result<(String, usize)> {
    if let Ok(name) = arg.parse::<DatasetName>() {
        let cache = Cache::from_env()?;
        let pb = spinner(&format!("fetching {arg}"));
        lacuna_data::fetch_dataset(&cache, name, &|s| pb.set_message(s.to_owned()))
            .with_context(|| format!("fetching dataset {arg}"))?;
        pb.finish_and_clear();
        let docs = lacuna_data::load_split(&cache, name, split)?;
        let n = docs.len();
        // Documents joined by a blank line, as wikitext-style evaluations do.
        let text = docs.into_iter().map(|d| d.text).collect::<Vec<_>>().join("\n\n");
        return Ok((text, n));
    }
    let p = Path::new(arg);
    if p.is_file() {
        let t = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        return Ok((t, 1));
    }
    bail!("{arg}: not a corpus name (wiki, sotu, python, humaneval) nor a readable text file")
}
