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
    let mut back = Checkpoint::open(&dir).unwrap();
    let mut cfg = back.model.config().clone();
    assert_eq!(cfg.torch_dtype.take().as_deref(), Some("float32"));
    assert_eq!(&cfg, src.model.config());
    let ids = src.tokenizer.encode(PROMPT, true).unwrap();
    assert_eq!(back.tokenizer.encode(PROMPT, true).unwrap(), ids);
    assert_eq!(last_logits(&back, &ids), last_logits(src, &ids), "logits must be bit-identical");
    // Tensors are served from the file maps, not copied.
    assert!(back.model.tensors().iter().all(|(_, w)| w.is_mapped()));
    // What a decode step streams (the linears and the tied LM head) can be copied out of the
    // maps, for huge pages: the same bytes, the same logits; the norms stay mapped.
    let streamed = |name: &str| name.ends_with("proj.weight") || name == "model.embed_tokens.weight";
    let expected: usize = back.model.tensors().iter().filter(|(n, _)| streamed(n)).map(|(_, w)| w.nbytes()).sum();
    assert_eq!(back.model.copy_mapped_weights(), expected);
    for (name, w) in back.model.tensors() {
        assert_eq!(w.is_mapped(), !streamed(&name), "{name}");
    }
    assert_eq!(back.model.copy_mapped_weights(), 0, "a second call copies nothing");
    assert_eq!(last_logits(&back, &ids), last_logits(src, &ids), "logits must be bit-identical after the copy");
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

/// A copy of a valid tiny directory, and the error opening it gives after `corrupt`.
fn open_corrupted(name: &str, corrupt: impl FnOnce(&Path)) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_dir(tmp.path());
    let d = tmp.path().join(name);
    copy_dir(&dir, &d);
    corrupt(&d);
    let e = match Checkpoint::open(&d) {
        Ok(_) => panic!("{} should not load", d.display()),
        Err(e) => e.to_string(),
    };
    (tmp, d, e)
}

fn edit_config(d: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = d.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&p, cfg.to_string()).unwrap();
}

#[test]
fn missing_shard_is_named() {
    let mut shard = String::new();
    let (_t, _d, e) = open_corrupted("missing-shard", |d| {
        let shards = hf::shard_files(d).unwrap();
        shard = shards[1].file_name().unwrap().to_string_lossy().to_string();
        std::fs::remove_file(&shards[1]).unwrap();
    });
    assert!(e.contains(hf::INDEX_FILE) && e.contains(&shard) && e.contains("missing"), "{e}");
}

#[test]
fn safetensors_offsets_past_the_file_are_named() {
    let mut shard = String::new();
    let (_t, _d, e) = open_corrupted("bad-offsets", |d| {
        let p = hf::shard_files(d).unwrap()[0].clone();
        shard = p.file_name().unwrap().to_string_lossy().to_string();
        let bytes = std::fs::read(&p).unwrap();
        // The header still promises the full data section; the file now ends 1000 bytes early.
        std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    });
    assert!(e.contains(&shard) && e.contains("invalid safetensors"), "{e}");
}

#[test]
fn config_missing_a_required_key_is_named() {
    let (_t, _d, e) = open_corrupted("bad-config", |d| {
        edit_config(d, |c| {
            c.as_object_mut().unwrap().remove("hidden_size");
        })
    });
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");
}

#[test]
fn config_disagreeing_with_the_tensors_is_named() {
    let (_t, _d, e) =
        open_corrupted("wrong-shape", |d| edit_config(d, |c| c["intermediate_size"] = serde_json::json!(1000)));
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("shape"), "{e}");
}

#[test]
fn a_directory_without_a_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Checkpoint::open(tmp.path()).err().expect("an empty directory is no checkpoint").to_string();
    assert!(e.contains("config.json"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
