//! Shared helpers for Lacuna's end-to-end tests: where fixtures live and how the real reference
//! model is obtained (fetched into the cache on first use, never committed).

use std::path::PathBuf;

/// `tests/fixtures/` of this repository.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Path of SmolLM2-135M-Instruct's GGUF in the cache.
///
/// PRELIMINARY: helper C replaces this with a call into `lacuna_data` that fetches it when absent.
pub fn smollm2_gguf() -> PathBuf {
    let root = std::env::var_os("LACUNA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/lacuna"));
    let p = root.join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} missing: run `lacuna model fetch smollm2-135m`", p.display());
    p
}
