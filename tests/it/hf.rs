//! Hugging Face directories: GGUF → HF → load gives identical logits; sharding; bad input.

use std::collections::BTreeMap;
use std::path::Path;

use lacuna_model::hf::{self, SaveOptions};
use lacuna_model::weights::Dtype;
use lacuna_model::{Checkpoint, KvCache};
use lacuna_tests::smollm2;

fn last_logits(ck: &Checkpoint, ids: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(ck.model.config(), ids.len());
    ck.model.forward_last_logits(ids, &mut cache).unwrap()
}

fn save(ck: &Checkpoint, dir: &Path, opts: SaveOptions) {
    hf::save_dir(dir, ck.model.config(), &ck.model.tensors(), Some(&ck.tokenizer), &opts).unwrap();
}

const PROMPT: &str = "The quick brown fox jumps over the lazy dog, and then";

#[test]
fn gguf_to_hf_round_trip_gives_identical_logits() {
    let src = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2-hf");
    // Small shards force the sharded layout with an index.
    save(src, &dir, SaveOptions { max_shard_bytes: 200_000_000, ..Default::default() });
    assert!(dir.join(hf::INDEX_FILE).is_file(), "expected a sharded checkpoint");
    let shards = hf::shard_files(&dir).unwrap();
    assert!(shards.len() >= 2, "{shards:?}");
    let back = Checkpoint::open(&dir).unwrap();
    let mut cfg = back.model.config().clone();
    assert_eq!(cfg.torch_dtype.take().as_deref(), Some("float32"));
    assert_eq!(&cfg, src.model.config());
    let ids = src.tokenizer.encode(PROMPT, true).unwrap();
    assert_eq!(back.tokenizer.encode(PROMPT, true).unwrap(), ids);
    assert_eq!(last_logits(&back, &ids), last_logits(src, &ids), "logits must be bit-identical");
    // Tensors are served from the file maps, not copied.
    assert!(back.model.tensors().iter().all(|(_, w)| w.is_mapped()));
    // No temporary directory is left beside the output.
    let leftovers: Vec<_> =
        std::fs::read_dir(tmp.path()).unwrap().flatten().filter(|e| e.file_name() != "smollm2-hf").collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bf16_checkpoint_stays_bf16_and_stays_close() {
    let src = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bf16");
    save(src, &dir, SaveOptions { dtype: Some(Dtype::BF16), ..Default::default() });
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let back = Checkpoint::open(&dir).unwrap();
    assert!(back.model.tensors().iter().all(|(_, w)| w.dtype() == Dtype::BF16));
    let ids = src.tokenizer.encode(PROMPT, true).unwrap();
    let (a, b) = (last_logits(&back, &ids), last_logits(src, &ids));
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    // bf16 keeps 8 mantissa bits: logits move by a fraction of a unit, not more.
    assert!(d < 1.5, "bf16 logits drift by {d}");
    assert_eq!(lacuna_model::sampling::argmax(&a), lacuna_model::sampling::argmax(&b));
}

#[test]
fn existing_output_is_not_overwritten_without_consent() {
    let src = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "x").unwrap();
    let err = hf::save_dir(&dir, src.model.config(), &src.model.tensors(), None, &SaveOptions::default()).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(dir.join("keep.txt").exists());
}

/// A tiny valid HF directory (2-layer random Llama) for the bad-input tests.
fn tiny_dir(root: &Path) -> std::path::PathBuf {
    let src = smollm2();
    let dir = root.join("tiny");
    let mut cfg = src.model.config().clone();
    cfg.num_hidden_layers = 1;
    let keep: BTreeMap<String, &lacuna_model::weights::Weight> = src
        .model
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("model.layers.") || n.starts_with("model.layers.0."))
        .collect();
    let tensors: Vec<(String, &lacuna_model::weights::Weight)> = keep.into_iter().collect();
    hf::save_dir(
        &dir,
        &cfg,
        &tensors,
        Some(&src.tokenizer),
        &SaveOptions { max_shard_bytes: 30_000_000, ..Default::default() },
    )
    .unwrap();
    Checkpoint::open(&dir).expect("the tiny directory itself is valid");
    dir
}

#[test]
fn bad_hf_inputs_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_dir(tmp.path());
    let err = |d: &Path| match Checkpoint::open(d) {
        Ok(_) => panic!("{} should not load", d.display()),
        Err(e) => e.to_string(),
    };

    // A shard listed in the index is missing.
    let d1 = tmp.path().join("missing-shard");
    copy_dir(&dir, &d1);
    let shards = hf::shard_files(&d1).unwrap();
    std::fs::remove_file(&shards[1]).unwrap();
    let e = err(&d1);
    let shard_name = shards[1].file_name().unwrap().to_string_lossy().to_string();
    assert!(e.contains(hf::INDEX_FILE) && e.contains(&shard_name) && e.contains("missing"), "{e}");

    // A safetensors header whose offsets run past the end of the file.
    let d2 = tmp.path().join("bad-offsets");
    copy_dir(&dir, &d2);
    let shard = hf::shard_files(&d2).unwrap()[0].clone();
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1000]).unwrap();
    let e = err(&d2);
    assert!(
        e.contains(&shard.file_name().unwrap().to_string_lossy().to_string()) && e.contains("invalid safetensors"),
        "{e}"
    );

    // A config missing a required key.
    let d3 = tmp.path().join("bad-config");
    copy_dir(&dir, &d3);
    let cfg_path = d3.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = err(&d3);
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");

    // A config that disagrees with the tensors.
    let d4 = tmp.path().join("wrong-shape");
    copy_dir(&dir, &d4);
    let cfg_path = d4.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(1000);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = err(&d4);
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("shape"), "{e}");

    // A directory that is not a checkpoint at all.
    let e = err(tmp.path());
    assert!(e.contains("config.json"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
