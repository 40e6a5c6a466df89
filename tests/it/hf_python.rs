//! Hugging Face directories written by Lacuna, checked by Hugging Face's own Python tooling
//! (`tests/fixtures/check_hf_dir.py`): transformers loads the config, generation config and
//! tokenizer; safetensors loads every shard; the tensors are LlamaForCausalLM's state dict; and a
//! numpy forward in the HF layout over them reproduces the independent reference logits.
//!
//! Needs python3 with `tests/fixtures/requirements.txt`; without them these tests fail, never skip.

use std::path::Path;
use std::process::Command;

use lacuna_model::hf::{self, SaveOptions};
use lacuna_model::weights::Dtype;
use lacuna_tests::{fixtures_dir, smollm2};

const INSTALL: &str = "python3 -m pip install -r tests/fixtures/requirements.txt";
/// check_hf_dir.py's exit status when a package is missing.
const MISSING_PACKAGE: i32 = 3;

/// Writes SmolLM2 with `opts` into a tempdir, runs the checker on it, and returns its summary.
fn write_and_check(opts: SaveOptions) -> String {
    let ck = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2-hf");
    hf::save_dir(&dir, ck.model.config(), &ck.model.tensors(), Some(&ck.tokenizer), &opts).unwrap();
    run_checker(&dir)
}

fn run_checker(dir: &Path) -> String {
    let script = fixtures_dir().join("check_hf_dir.py");
    let out = match Command::new("python3").arg(&script).arg(dir).env("HF_HUB_OFFLINE", "1").output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run python3 ({e}): install Python 3, then `{INSTALL}`"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(MISSING_PACKAGE) {
        panic!("check_hf_dir.py lacks a Python package; run `{INSTALL}`\n{stderr}");
    }
    assert!(
        out.status.success(),
        "check_hf_dir.py rejected {}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        dir.display(),
        out.status
    );
    eprintln!("{stdout}");
    stdout
}

/// The `max logit error` the checker printed.
fn max_logit_error(summary: &str) -> f64 {
    let line = summary
        .lines()
        .find(|l| l.contains("max logit error"))
        .unwrap_or_else(|| panic!("no error line in:\n{summary}"));
    let value = line.split("max logit error ").nth(1).and_then(|s| s.split_whitespace().next());
    value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("cannot read the error in {line:?}"))
}

#[test]
fn sharded_f32_directory_is_what_transformers_expects() {
    // 200 MB shards put SmolLM2's 538 MB into several files, so the index is checked too.
    let summary = write_and_check(SaveOptions { max_shard_bytes: 200_000_000, ..Default::default() });
    assert!(summary.contains("shards + index"), "expected a sharded directory:\n{summary}");
    assert!(summary.contains(", F32:"), "{summary}");
    let err = max_logit_error(&summary);
    assert!(err <= 1e-3, "f32 logits off by {err}");
}

#[test]
fn bf16_directory_is_what_transformers_expects() {
    let summary = write_and_check(SaveOptions { dtype: Some(Dtype::BF16), ..Default::default() });
    assert!(summary.contains("single model.safetensors"), "{summary}");
    assert!(summary.contains(", BF16:"), "{summary}");
    let err = max_logit_error(&summary);
    assert!(err < 1.5, "bf16 logits off by {err}");
}

/// safetensors writes shards through a 0600 temp file; a checkpoint others cannot read is no use to a
/// server running as another user, so shards must be as readable as the JSON files beside them.
#[cfg(unix)]
#[test]
fn shards_are_as_readable_as_the_config() {
    use std::os::unix::fs::PermissionsExt;
    let ck = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("modes");
    let tensors = ck.model.tensors();
    // Two small tensors are enough to make two shards.
    let few: Vec<_> = tensors.into_iter().filter(|(n, _)| n.ends_with("layernorm.weight")).take(2).collect();
    let opts = SaveOptions { max_shard_bytes: 1, ..Default::default() };
    hf::save_dir(&dir, ck.model.config(), &few, None, &opts).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let config_mode = mode(&dir.join("config.json"));
    let shards = hf::shard_files(&dir).unwrap();
    assert_eq!(shards.len(), 2, "{shards:?}");
    for shard in shards {
        assert_eq!(mode(&shard), config_mode, "{}", shard.display());
    }
}

/// transformers' own `LlamaForCausalLM` (torch, in the compressed-tensors virtualenv) loads the
/// sharded directory unchanged and reproduces the independent reference logits.
#[test]
fn transformers_llama_loads_the_directory_and_reproduces_reference_logits() {
    let ck = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2-hf");
    let opts = SaveOptions { max_shard_bytes: 200_000_000, ..Default::default() };
    hf::save_dir(&dir, ck.model.config(), &ck.model.tensors(), Some(&ck.tokenizer), &opts).unwrap();
    let python = lacuna_tests::torch_python();
    let script = fixtures_dir().join("check_hf_transformers.py");
    let out =
        Command::new(&python).arg(&script).arg(&dir).env("HF_HUB_OFFLINE", "1").output().unwrap_or_else(|e| {
            panic!("cannot run {} ({e}): run {}", python.display(), lacuna_tests::torch_python_hint())
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(MISSING_PACKAGE) {
        panic!("{} lacks a package; run {}\n{stderr}", python.display(), lacuna_tests::torch_python_hint());
    }
    assert!(out.status.success(), "transformers rejected {}: {}\n{stdout}\n{stderr}", dir.display(), out.status);
    assert!(max_logit_error(&stdout) < 1e-3, "{stdout}");
}
