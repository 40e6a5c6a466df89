//! `lacuna quantize` end to end on a tiny random model with half of each linear zero: the
//! compressed-tensors output keeps the mask, an interrupted run resumes bit-identically, bad input
//! fails naming the field, and `lacuna apply` runs a QuantizeJob and serves its output.

use std::path::{Path, PathBuf};
use std::process::Output;

use lacuna_model::checkpoint::Checkpoint;
use lacuna_model::{LinearKind, Llama};

use super::{corpus, lacuna, tiny_model, tiny_model_at};

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn quantize(root: &Path, args: &[&str]) -> Output {
    lacuna()
        .arg("quantize")
        .args(args)
        .env("LACUNA_LINEAGE_URL", "off")
        .env("LACUNA_CACHE", root.join("cache"))
        .output()
        .unwrap()
}

fn recipe(root: &Path, name: &str, prose: &Path, skip: usize) -> PathBuf {
    let p = root.join(name);
    std::fs::write(
        &p,
        format!(
            "scheme: w8a8\nsmoothquantAlpha: 0.8\nskipByKurtosis: {skip}\nblockSize: 8\n\
             calibration: {{dataset: 'file://{}', samples: 4, seqLen: 16}}\n",
            prose.display()
        ),
    )
    .unwrap();
    p
}

fn linears(m: &Llama) -> Vec<(String, Vec<f32>)> {
    let mut v = Vec::new();
    for b in 0..m.num_layers() {
        for k in LinearKind::ALL {
            v.push((format!("{b}.{}", k.hf_name()), m.linear(b, k).unwrap().to_f32_vec()));
        }
    }
    v
}

fn weight_files(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn quantize_keeps_the_mask_resumes_bit_identically_and_names_bad_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // 70% sparse, the paper's quantized model.
    let base = tiny_model_at(root, 31, 0.7);
    let (prose, _) = corpus(root);
    let r = recipe(root, "q.yaml", &prose, 2);

    let out = root.join("w8a8");
    let o = quantize(
        root,
        &["--model", base.to_str().unwrap(), "--recipe", r.to_str().unwrap(), "--out", out.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("stay in floating point"), "{stdout}");

    // compressed-tensors' config: int-quantized, W8A8 per-token input, lm_head and the two
    // highest-kurtosis layers ignored, the ranking recorded.
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(qc["format"], "int-quantized", "{qc}");
    let ignore: Vec<&str> = qc["ignore"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(ignore.len(), 3, "{ignore:?}");
    assert!(ignore.contains(&"lm_head"), "{ignore:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("lacuna_quantize.json")).unwrap()).unwrap();
    let ranking = report["summary"]["kurtosis_ranking"].as_array().unwrap();
    assert_eq!(ranking.len(), 2 * 7);
    for (i, k) in ranking.iter().take(2).enumerate() {
        assert!(ignore.contains(&k["name"].as_str().unwrap()), "ranked {i}: {k}");
    }
    assert!(root.join("w8a8-bitmask").join("config.json").exists(), "a sparse input also gets the bitmask form");

    // Every zero of the input is still zero; every quantized layer holds int8 codes.
    let before = Checkpoint::open(&base).unwrap();
    let after = Checkpoint::open(&out).unwrap();
    let mut int8 = 0;
    for (b, k) in (0..2).flat_map(|b| LinearKind::ALL.map(|k| (b, k))) {
        int8 += usize::from(after.model.linear(b, k).unwrap().int8().is_some());
    }
    assert_eq!(int8, 14 - 2);
    let (mut zeros_before, mut newly_zero, mut total) = (0, 0, 0);
    for ((name, w0), (_, w1)) in linears(&before.model).iter().zip(linears(&after.model).iter()) {
        for (i, (a, b)) in w0.iter().zip(w1).enumerate() {
            if *a == 0.0 {
                assert_eq!(*b, 0.0, "{name}[{i}] was zero");
            }
            zeros_before += usize::from(*a == 0.0);
            newly_zero += usize::from(*a != 0.0 && *b == 0.0);
        }
        total += w0.len();
    }
    // The 70% mask: error compensation never revives a pruned weight, and a kept weight becomes
    // zero only when its code rounds to 0 (rare: the row's scale is its largest |w| / 127).
    let sparsity = zeros_before as f64 / total as f64;
    assert!((0.69..0.71).contains(&sparsity), "input sparsity {sparsity}");
    assert!(newly_zero * 100 < total, "{newly_zero} of {total} kept weights rounded to zero");
    // The bitmask form stores exactly the non-zero codes of the dense int8 form.
    let packed = Checkpoint::open(&root.join("w8a8-bitmask")).unwrap();
    for ((name, w1), (_, w2)) in linears(&after.model).iter().zip(linears(&packed.model).iter()) {
        assert_eq!(w1, w2, "{name}: bitmask form differs from the dense int8 form");
    }

    // Interrupted after block 1, then resumed: byte-identical weights.
    let out2 = root.join("w8a8-resumed");
    let args = ["--model", base.to_str().unwrap(), "--recipe", r.to_str().unwrap(), "--out", out2.to_str().unwrap()];
    let o = quantize(root, &[&args[..], &["--stop-after-blocks", "1"]].concat());
    assert!(!o.status.success() && text(&o).contains("interrupted after finishing block 0"), "{}", text(&o));
    let o = quantize(root, &args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("resumed at block 1"), "{}", text(&o));
    assert_eq!(weight_files(&out), weight_files(&out2), "resumed run differs");

    // Bad input, each refused naming what is wrong, nothing written.
    let bad = |name: &str, skip: usize, model: &Path, want: &str| {
        let r = recipe(root, &format!("{name}.yaml"), &prose, skip);
        let dest = root.join(name);
        let o = quantize(
            root,
            &["--model", model.to_str().unwrap(), "--recipe", r.to_str().unwrap(), "--out", dest.to_str().unwrap()],
        );
        assert!(!o.status.success(), "{name}: {}", text(&o));
        assert!(text(&o).contains(want), "{name}: wanted {want:?} in {}", text(&o));
        assert!(!dest.exists(), "{name}: output written");
    };
    let alpha = root.join("alpha.yaml");
    std::fs::write(&alpha, "smoothquantAlpha: 1.5\n").unwrap();
    let o =
        quantize(root, &["--model", base.to_str().unwrap(), "--recipe", alpha.to_str().unwrap(), "--out", "unused"]);
    assert!(!o.status.success() && text(&o).contains("smoothquantAlpha"), "{}", text(&o));
    bad("skip-all", 14, &base, "skipByKurtosis");
    bad("requant", 2, &out, "already quantized");
    let long = root.join("long.yaml");
    std::fs::write(
        &long,
        format!("calibration: {{dataset: 'file://{}', samples: 2, seqLen: 2000}}\n", prose.display()),
    )
    .unwrap();
    let dest = root.join("too-short");
    let o = quantize(
        root,
        &["--model", base.to_str().unwrap(), "--recipe", long.to_str().unwrap(), "--out", dest.to_str().unwrap()],
    );
    assert!(!o.status.success() && text(&o).contains("calibration.seqLen"), "{}", text(&o));
    assert!(!dest.exists());
}

#[test]
fn apply_runs_a_quantize_job_and_serves_its_output() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let base = tiny_model(root, 32);
    let pvc_base = root.join("pvc/models/base/tiny");
    std::fs::create_dir_all(pvc_base.parent().unwrap()).unwrap();
    std::fs::rename(&base, &pvc_base).unwrap();
    let (prose, _) = corpus(root);
    let dir = root.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("01-quantize.yaml"),
        format!(
            "apiVersion: lacuna.dev/v1alpha1\nkind: QuantizeJob\nmetadata: {{name: tiny-w8a8, namespace: ml}}\nspec:\n\
             \x20 model: {{uri: 'pvc://models/base/tiny'}}\n  output: {{uri: 'pvc://models/pipeline/w8a8'}}\n\
             \x20 quantization:\n    scheme: w8a8\n    blockSize: 8\n\
             \x20   calibration: {{dataset: 'file://{}', samples: 4, seqLen: 16}}\n",
            prose.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("02-serve.yaml"),
        "apiVersion: lacuna.dev/v1alpha1\nkind: SparseInferenceService\nmetadata: {name: tiny-chat, namespace: ml}\n\
         spec:\n  model: {fromJob: tiny-w8a8}\n  backend: cpu\n  port: 8080\n",
    )
    .unwrap();
    let db = format!("sqlite://{}?mode=rwc", root.join("lineage.db").display());
    let o = lacuna()
        .args(["apply", "-f"])
        .arg(&dir)
        .arg("--pvc-root")
        .arg(root.join("pvc"))
        .arg("--state-dir")
        .arg(root.join("state"))
        .env("LACUNA_LINEAGE_URL", &db)
        .env("LACUNA_LINEAGE_SPOOL", root.join("spool"))
        .env("LACUNA_CACHE", root.join("cache"))
        .output()
        .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("state/ml/tiny-w8a8.json")).unwrap()).unwrap();
    assert_eq!(st["phase"], "Succeeded", "{st}");
    let w8a8 = root.join("pvc/models/pipeline/w8a8");
    assert_eq!(st["output"]["sha256"], lacuna_lineage::sha256_of_path(&w8a8).unwrap().as_str());
    assert!(out.contains("SparseInferenceService ml/tiny-chat: ready"), "{out}");
    let chain = &out[out.find("lineage of ml/tiny-chat").expect(&out)..];
    assert!(chain.contains("quantize succeeded") && chain.contains("serve"), "{chain}");
}
