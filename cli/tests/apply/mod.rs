//! `lacuna apply` runs manifests locally as the operator runs them: a SparsePretrainJob (magnitude
//! pruning, then sparse pretraining) → a FineTuneJob `fromJob` it → a SparseInferenceService,
//! with a tampered input refused (`ChecksumMismatch`), unchanged jobs skipped, invalid manifests
//! refused with the field named, and the lineage chain printed.

use std::path::{Path, PathBuf};
use std::process::Output;

use super::{corpus, lacuna, tiny_model};

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        Env { _tmp: tmp, root }
    }

    fn apply(&self, files: &[&Path]) -> Output {
        let mut c = lacuna();
        c.arg("apply");
        for f in files {
            c.arg("-f").arg(f);
        }
        c.arg("--pvc-root")
            .arg(self.root.join("pvc"))
            .arg("--state-dir")
            .arg(self.root.join("state"))
            .env("LACUNA_LINEAGE_URL", format!("sqlite://{}?mode=rwc", self.root.join("lineage.db").display()))
            .env("LACUNA_LINEAGE_SPOOL", self.root.join("spool"))
            .env("LACUNA_CACHE", self.root.join("cache"));
        c.output().unwrap()
    }

    fn lineage_show(&self, query: &str) -> Output {
        lacuna()
            .args(["lineage", "show", query])
            .env("LACUNA_LINEAGE_URL", format!("sqlite://{}?mode=rwc", self.root.join("lineage.db").display()))
            .env("LACUNA_LINEAGE_SPOOL", self.root.join("spool"))
            .env("LACUNA_CACHE", self.root.join("cache"))
            .output()
            .unwrap()
    }

    fn status(&self, name: &str) -> serde_json::Value {
        let p = self.root.join("state/ml").join(format!("{name}.json"));
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn manifests(env: &Env, prose: &Path, code: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let dir = env.root.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let instructions = env.root.join("instructions.jsonl");
    let lines: String = (0..12)
        .map(|i| {
            serde_json::json!({"prompt": format!("add {i} and {}", i + 1), "response": format!("{}", 2 * i + 1)})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&instructions, lines).unwrap();
    let spj = dir.join("01-sparse.yaml");
    std::fs::write(
        &spj,
        format!(
            "apiVersion: lacuna.dev/v1alpha1\nkind: SparsePretrainJob\nmetadata: {{name: tiny-sparse, namespace: ml}}\nspec:\n\
             \x20 model: {{uri: 'pvc://models/base/tiny'}}\n  output: {{uri: 'pvc://models/pipeline/sparse'}}\n\
             \x20 pruning: {{method: magnitude, sparsity: 0.7}}\n\
             \x20 pretraining:\n    data:\n      sources:\n        - {{name: 'file://{}', weight: 3}}\n        - {{name: 'file://{}', weight: 1}}\n\
             \x20     sequenceLength: 16\n    schedule: {{steps: 3, batchSize: 2, evalEvery: 3, evalSequences: 2, checkpointEvery: 1}}\n\
             \x20   optimizer: {{learningRate: 0.003, warmupSteps: 1}}\n",
            prose.display(),
            code.display()
        ),
    )
    .unwrap();
    let ft = dir.join("02-finetune.yaml");
    std::fs::write(
        &ft,
        format!(
            "apiVersion: lacuna.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {{name: tiny-ft, namespace: ml}}\nspec:\n\
             \x20 model: {{fromJob: tiny-sparse}}\n  output: {{uri: 'pvc://models/pipeline/ft'}}\n\
             \x20 finetuning:\n    pathway: fromSparsePretrained\n    data: {{source: 'file://{}', maxLength: 64, evalExamples: 2}}\n\
             \x20   schedule: {{steps: 2, batchSize: 2, evalEvery: 2}}\n    optimizer: {{learningRate: 0.001}}\n",
            instructions.display()
        ),
    )
    .unwrap();
    let svc = dir.join("03-serve.yaml");
    std::fs::write(
        &svc,
        "apiVersion: lacuna.dev/v1alpha1\nkind: SparseInferenceService\nmetadata: {name: tiny-chat, namespace: ml}\n\
         spec:\n  model: {fromJob: tiny-ft}\n  backend: cpu\n  port: 8080\n",
    )
    .unwrap();
    (spj, ft, svc)
}

/// Flips the last byte of the largest file under `dir` (the weights); returns how to undo it.
fn tamper(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let target = files.pop().unwrap();
    let original = std::fs::read(&target).unwrap();
    let mut changed = original.clone();
    *changed.last_mut().unwrap() ^= 0x01;
    std::fs::write(&target, changed).unwrap();
    (target, original)
}

#[test]
fn apply_runs_the_pipeline_refuses_a_changed_input_and_prints_the_chain() {
    let env = Env::new();
    let base = tiny_model(&env.root, 5);
    let pvc_base = env.root.join("pvc/models/base/tiny");
    std::fs::create_dir_all(pvc_base.parent().unwrap()).unwrap();
    std::fs::rename(&base, &pvc_base).unwrap();
    let (prose, code) = corpus(&env.root);
    let (spj, ft, svc) = manifests(&env, &prose, &code);

    // Stage 1: prune + pretrain, each a child `lacuna` run with the pod's arguments.
    let o = env.apply(&[&spj]);
    assert!(o.status.success(), "{}", text(&o));
    let st = env.status("tiny-sparse");
    assert_eq!(st["phase"], "Succeeded", "{st}");
    let sparse = env.root.join("pvc/models/pipeline/sparse");
    let sha = lacuna_lineage::sha256_of_path(&sparse).unwrap();
    assert_eq!(st["output"]["sha256"], sha.as_str());
    assert_eq!(st["output"]["uri"], "pvc://models/pipeline/sparse");
    assert_eq!(st["stages"]["prune"]["uri"], "pvc://models/pipeline/sparse-stages/prune");
    let sparsity = st["output"]["sparsity"].as_f64().unwrap();
    assert!((sparsity - 0.7).abs() < 0.01, "{sparsity}");
    // Lineage finds the job by its name, bare or with its namespace, as the operator's records.
    for query in ["tiny-sparse", "ml/tiny-sparse"] {
        let o = env.lineage_show(query);
        let out = text(&o);
        assert!(o.status.success(), "lineage show {query}: {out}");
        assert!(out.contains("prune succeeded") && out.contains("pretrain succeeded"), "lineage show {query}: {out}");
        assert!(out.contains("ml/tiny-sparse/local"), "lineage show {query}: {out}");
    }

    // The fine-tuning job's input changes after its producer recorded it: refused, never run.
    let (file, original) = tamper(&sparse);
    let o = env.apply(&[&ft]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ChecksumMismatch"), "{}", text(&o));
    let st = env.status("tiny-ft");
    assert_eq!((st["phase"].as_str(), st["reason"].as_str()), (Some("Failed"), Some("ChecksumMismatch")), "{st}");
    assert!(!env.root.join("pvc/models/pipeline/ft").exists(), "no output from a refused input");
    std::fs::write(&file, original).unwrap();

    // The whole directory: the first job is unchanged, the rest runs, the chain is printed.
    let dir = spj.parent().unwrap();
    let o = env.apply(&[dir]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("SparsePretrainJob ml/tiny-sparse: unchanged"), "{out}");
    assert_eq!(env.status("tiny-ft")["phase"], "Succeeded");
    assert!(out.contains("SparseInferenceService ml/tiny-chat: ready; serve it with: lacuna serve --model"), "{out}");
    let chain = &out[out.find("lineage of ml/tiny-chat").expect(&out)..];
    let steps: Vec<&str> = ["prune succeeded", "pretrain succeeded", "finetune succeeded", "serve"]
        .into_iter()
        .filter(|s| chain.contains(s))
        .collect();
    assert_eq!(steps.len(), 4, "{chain}");
    let (p, t, f) = (chain.find("prune").unwrap(), chain.find("pretrain").unwrap(), chain.find("finetune").unwrap());
    assert!(p < t && t < f, "{chain}");

    // Again: nothing to do.
    let o = env.apply(&[dir]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("ml/tiny-sparse: unchanged") && out.contains("ml/tiny-ft: unchanged"), "{out}");
    let _ = svc;
}

#[test]
fn apply_refuses_an_invalid_manifest_naming_the_field() {
    let env = Env::new();
    let bad = env.root.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: lacuna.dev/v1alpha1\nkind: SparsePretrainJob\nmetadata: {name: bad}\nspec:\n\
         \x20 model: {uri: 'pvc://models/base'}\n  output: {uri: 'pvc://models/out'}\n\
         \x20 pruning: {method: magnitude, sparsity: 1.5}\n\
         \x20 pretraining: {data: {sources: [{name: wiki, weight: 1}]}, schedule: {steps: 1}}\n",
    )
    .unwrap();
    let o = env.apply(&[&bad]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.yaml") && err.contains("spec.pruning.sparsity"), "{err}");
    assert!(!env.root.join("state").exists(), "nothing ran");

    // A fromJob producer that was never applied: waits, named.
    let lone = env.root.join("lone.yaml");
    std::fs::write(
        &lone,
        "apiVersion: lacuna.dev/v1alpha1\nkind: SparseInferenceService\nmetadata: {name: lone}\n\
         spec:\n  model: {fromJob: missing}\n  backend: cpu\n  port: 8080\n",
    )
    .unwrap();
    let o = env.apply(&[&lone]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("missing") && err.contains("InputNotFound"), "{err}");
}
