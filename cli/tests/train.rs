//! `lacuna train` end to end on a tiny random model: SIGTERM and kill -9 in the middle of a run,
//! then `--resume`, end with weights bit-identical to an uninterrupted run.
//!
//! This lives in the CLI's own tests (not `tests/it`) because it runs the `lacuna` binary, which
//! cargo builds and names (`CARGO_BIN_EXE_lacuna`) only for this package's integration tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lacuna_model::hf::{self, SaveOptions};
use lacuna_train::testing::{tiny_config, tiny_llama};

mod apply;
mod quantize;
mod s3;
mod tls;

fn lacuna() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lacuna"));
    // The same thread count for every run: the products' blocking depends on it.
    c.env("RAYON_NUM_THREADS", "2");
    c
}

/// A 2-layer, 32-wide random Llama with SmolLM2's tokenizer, half of each linear zero.
fn tiny_model(root: &Path, seed: u64) -> PathBuf {
    tiny_model_at(root, seed, 0.5)
}

/// A tiny Llama with SmolLM2's tokenizer and `sparsity` of every linear's weights zero.
fn tiny_model_at(root: &Path, seed: u64, sparsity: f64) -> PathBuf {
    let smol = lacuna_tests::smollm2();
    let mut cfg = tiny_config(smol.model.config().vocab_size, 32, 2, 4, 2, true);
    cfg.eos_token_ids = smol.model.config().eos_token_ids.clone();
    cfg.bos_token_id = smol.model.config().bos_token_id;
    let model = tiny_llama(&cfg, seed, sparsity).unwrap();
    let dir = root.join(format!("tiny-{seed}"));
    hf::save_dir(&dir, model.config(), &model.tensors(), Some(&smol.tokenizer), &SaveOptions::default()).unwrap();
    dir
}

fn corpus(root: &Path) -> (PathBuf, PathBuf) {
    let words = ["the", "sparse", "model", "learns", "again", "after", "pruning", "with", "its", "mask", "frozen"];
    let mut prose = String::new();
    for p in 0..40 {
        for s in 0..4 {
            let w: Vec<&str> = (0..9).map(|i| words[(p * 7 + s * 3 + i * 5) % words.len()]).collect();
            prose.push_str(&format!("{}. ", w.join(" ")));
        }
        prose.push_str("\n\n");
    }
    let a = root.join("prose.txt");
    std::fs::write(&a, prose).unwrap();
    let code: String = (0..30)
        .map(|i| {
            serde_json::json!({"text": format!("def f{i}(x):\n    return x * {i} + {}\n", i % 7)}).to_string() + "\n"
        })
        .collect();
    let b = root.join("code.jsonl");
    std::fs::write(&b, code).unwrap();
    (a, b)
}

fn recipe(root: &Path, prose: &Path, code: &Path) -> PathBuf {
    let r = root.join("recipe.yaml");
    std::fs::write(
        &r,
        format!(
            "data:\n  sources:\n    - {{name: 'file://{}', weight: 3}}\n    - {{name: 'file://{}', weight: 1}}\n  sequenceLength: 16\n\
             schedule: {{steps: 12, batchSize: 2, gradientAccumulation: 2, checkpointEvery: 1, evalEvery: 4, evalSequences: 2, seed: 7}}\n\
             optimizer: {{learningRate: 0.003, warmupSteps: 2}}\n",
            prose.display(),
            code.display()
        ),
    )
    .unwrap();
    r
}

fn args<'a>(model: &'a Path, recipe: &'a Path, out: &'a Path) -> Vec<&'a std::ffi::OsStr> {
    vec![
        "train".as_ref(),
        "pretrain".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--recipe".as_ref(),
        recipe.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]
}

fn checkpoint_step(out: &Path) -> Option<u64> {
    let mut p = out.to_path_buf().into_os_string();
    p.push(".checkpoint/state.json");
    let text = std::fs::read_to_string(PathBuf::from(p)).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("step")?.as_u64()
}

/// Waits until the run's checkpoint reaches `step`; the run must still be going.
fn wait_for_checkpoint(child: &mut Child, out: &Path, step: u64) {
    let t0 = Instant::now();
    while checkpoint_step(out).is_none_or(|s| s < step) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its checkpoint reached step {step}");
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint of step {step} after 5 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "the run must be interrupted mid-way");
}

fn ok(out: std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "lacuna failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn sigterm_and_kill9_then_resume_end_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = tiny_model(root, 11);
    let (prose, code) = corpus(root);
    let r = recipe(root, &prose, &code);

    let straight = root.join("straight");
    let stdout = ok(lacuna().args(args(&model, &r, &straight)).output().unwrap());
    assert!(stdout.contains("trained 12 steps"), "{stdout}");
    assert!(straight.join("model.safetensors").is_file() && root.join("straight-bitmask/config.json").is_file());

    let out = root.join("interrupted");
    // SIGTERM: the run checkpoints after its current step and exits with an error saying so.
    let mut child = lacuna()
        .args(args(&model, &r, &out))
        .args(["--throttle-ms", "150"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&mut child, &out, 3);
    let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("--resume"), "{err}");
    let at_term = checkpoint_step(&out).unwrap();
    assert!((3..12).contains(&at_term));

    // Resume, then kill -9 in the middle.
    let mut child = lacuna()
        .args(args(&model, &r, &out))
        .args(["--resume", "--throttle-ms", "150"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&mut child, &out, at_term + 3);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!out.exists(), "a killed run must not leave an output");

    let stdout = ok(lacuna().args(args(&model, &r, &out)).arg("--resume").output().unwrap());
    assert!(stdout.contains("resumed at step"), "{stdout}");
    let a = std::fs::read(straight.join("model.safetensors")).unwrap();
    let b = std::fs::read(out.join("model.safetensors")).unwrap();
    assert!(a == b, "the resumed run's weights differ from the uninterrupted run's");
    // The model did train (the weights moved) and the log has every step exactly once.
    let input = std::fs::read(model.join("model.safetensors")).unwrap();
    assert!(input != a);
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "step")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
}

#[test]
fn resuming_from_another_models_checkpoint_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (m1, m2) = (tiny_model(root, 1), tiny_model(root, 2));
    let (prose, code) = corpus(root);
    let r = recipe(root, &prose, &code);
    let out = root.join("out");
    let mut child = lacuna()
        .args(args(&m1, &r, &out))
        .args(["--throttle-ms", "200"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&mut child, &out, 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let res = lacuna().args(args(&m2, &r, &out)).arg("--resume").output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("another model"), "{err}");
    // Without --resume an existing checkpoint is not silently overwritten either.
    let res = lacuna().args(args(&m1, &r, &out)).output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("--resume"), "{err}");
}
