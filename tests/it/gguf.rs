//! GGUF reading and GGML dequantization against gguf-py (tests/fixtures/make_ggml_fixture.py):
//! a small fixture with one tensor per supported type, slices of the real SmolLM2 GGUF, and
//! corrupted copies of the fixture that must fail with a message naming the file and the problem.

use std::path::{Path, PathBuf};

use lacuna_kernels::ggml::GgmlType;
use lacuna_model::Error;
use lacuna_model::gguf::{GgufFile, MetaValue};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixture() -> PathBuf {
    lacuna_tests::fixtures_dir().join("ggml_types.gguf")
}

fn expected() -> Value {
    let p = lacuna_tests::fixtures_dir().join("ggml_expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn expected_values(entry: &Value) -> Vec<f32> {
    let bytes = std::fs::read(lacuna_tests::fixtures_dir().join("ggml_expected.f32.bin")).unwrap();
    let (off, n) = (entry["offset"].as_u64().unwrap() as usize, entry["count"].as_u64().unwrap() as usize);
    bytes[off * 4..(off + n) * 4].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn shape_of(entry: &Value) -> Vec<usize> {
    entry["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

/// The typed JSON the fixture script wrote (`{"type": "u32", "value": ...}`) as a MetaValue.
fn meta_from_json(v: &Value) -> MetaValue {
    let x = &v["value"];
    let int = || x.as_i64().unwrap();
    match v["type"].as_str().unwrap() {
        "u8" => MetaValue::U8(int() as u8),
        "i8" => MetaValue::I8(int() as i8),
        "u16" => MetaValue::U16(int() as u16),
        "i16" => MetaValue::I16(int() as i16),
        "u32" => MetaValue::U32(int() as u32),
        "i32" => MetaValue::I32(int() as i32),
        "u64" => MetaValue::U64(x.as_u64().unwrap()),
        "i64" => MetaValue::I64(int()),
        "f32" => MetaValue::F32(x.as_f64().unwrap() as f32),
        "f64" => MetaValue::F64(x.as_f64().unwrap()),
        "bool" => MetaValue::Bool(x.as_bool().unwrap()),
        "string" => MetaValue::String(x.as_str().unwrap().to_owned()),
        "array" => MetaValue::Array(x.as_array().unwrap().iter().map(meta_from_json).collect()),
        t => panic!("unknown type {t} in fixture JSON"),
    }
}

/// Positions where `got` and `want` differ bitwise (so -0.0 vs 0.0 counts as a difference).
fn bit_mismatches(got: &[f32], want: &[f32]) -> Vec<(usize, f32, f32)> {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
        .map(|(i, (g, w))| (i, *g, *w))
        .collect()
}

#[test]
fn fixture_metadata_equals_what_gguf_py_wrote() {
    let f = GgufFile::open(fixture()).unwrap();
    assert_eq!(f.version(), 3);
    let exp = expected();
    let meta = exp["metadata"].as_object().unwrap();
    for (k, v) in meta {
        assert_eq!(f.get(k), Some(&meta_from_json(v)), "metadata key {k}");
    }
    assert_eq!(f.metadata().len(), meta.len(), "keys: {:?}", f.metadata().keys().collect::<Vec<_>>());

    assert_eq!(f.get_u32("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_u32("test.u8").unwrap(), 200);
    assert_eq!(f.get_u32("test.u16").unwrap(), 60000);
    assert_eq!(f.get_f32("test.f32").unwrap(), 1e-5);
    assert_eq!(f.get_f32("test.f64").unwrap(), 0.1f32);
    assert_eq!(f.get_str("test.string").unwrap(), "héllo, GGUF ✓");
    let path = fixture().display().to_string();
    for (key, problem) in [
        ("test.i8", "does not fit in u32"),
        ("test.u64", "does not fit in u32"),
        ("test.string", "expected an integer"),
        ("no.such.key", "missing metadata key"),
    ] {
        let e = f.get_u32(key).unwrap_err().to_string();
        assert!(e.contains(&path) && e.contains(key) && e.contains(problem), "{e}");
    }
    let e = f.get_str("test.bool").unwrap_err().to_string();
    assert!(e.contains("test.bool") && e.contains("expected a string"), "{e}");
    let e = f.get_f32("test.i32").unwrap_err().to_string();
    assert!(e.contains("test.i32") && e.contains("expected a float"), "{e}");
}

#[test]
fn fixture_dequantizes_bit_exactly_like_gguf_py() {
    let f = GgufFile::open(fixture()).unwrap();
    let exp = expected();
    let entries = exp["tensors"].as_array().unwrap();
    assert_eq!(f.tensors().len(), entries.len());
    let mut types = Vec::new();
    for e in entries {
        let name = e["name"].as_str().unwrap();
        let info = f.tensor(name).unwrap_or_else(|| panic!("tensor {name} missing"));
        assert_eq!(info.ty.name(), e["type"].as_str().unwrap(), "{name}");
        assert_eq!(info.shape(), shape_of(e), "{name}");
        assert_eq!(f.tensor_bytes(info).len(), info.ty.row_bytes(info.n_elements()).unwrap());
        let got = f.dequantize(name).unwrap();
        let bad = bit_mismatches(&got, &expected_values(e));
        assert!(
            bad.is_empty(),
            "{name} ({}): {} of {} differ, first {:?}",
            info.ty,
            bad.len(),
            got.len(),
            &bad[..bad.len().min(5)]
        );
        types.push(info.ty);
    }
    use GgmlType::*;
    for ty in [F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K] {
        assert!(types.contains(&ty), "fixture lacks a {ty} tensor");
    }
    // GGML dims are reversed relative to the row-major shape.
    assert_eq!(f.tensor("q8_0_3d").unwrap().dims, [32, 3, 2]);
    let e = f.dequantize("nope").unwrap_err().to_string();
    assert!(e.contains("no tensor named 'nope'"), "{e}");
}

#[test]
fn smollm2_gguf_structure() {
    let exp = expected();
    let model = &exp["model"];
    let path = lacuna_tests::smollm2_gguf();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        model["file_size"].as_u64().unwrap(),
        "not the file the fixture was made from"
    );
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!((emb.ty, emb.shape()), (GgmlType::Q8_0, vec![49152, 576]));
    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.ty, q.shape()), (GgmlType::Q4_1, vec![576, 576]));
    assert_eq!(f.tensor("blk.0.attn_norm.weight").unwrap().ty, GgmlType::F32);
    match f.get("tokenizer.ggml.tokens") {
        Some(MetaValue::Array(t)) => assert_eq!(t.len(), 49152),
        other => panic!("tokenizer.ggml.tokens: {other:?}"),
    }
}

#[test]
fn smollm2_dequantizes_like_gguf_py() {
    let exp = expected();
    let f = GgufFile::open(lacuna_tests::smollm2_gguf()).unwrap();
    let entries = exp["model"]["tensors"].as_array().unwrap();
    assert!(entries.iter().any(|e| e["type"] == "Q4_1") && entries.iter().any(|e| e["type"] == "Q8_0"));
    for e in entries {
        let name = e["name"].as_str().unwrap();
        let info = f.tensor(name).unwrap();
        assert_eq!(info.shape(), shape_of(e), "{name}");
        let got = f.dequantize(name).unwrap();
        let want = expected_values(e);
        let bad = bit_mismatches(&got[..want.len()], &want);
        assert!(bad.is_empty(), "{name}: first rows differ at {:?}", &bad[..bad.len().min(5)]);
        let bytes: Vec<u8> = got.iter().flat_map(|x| x.to_le_bytes()).collect();
        let sum: f64 = got.iter().map(|&x| x as f64).sum();
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            e["sha256_f32le"].as_str().unwrap(),
            "{name}: whole tensor differs (sum {sum} vs gguf-py {})",
            e["sum"]
        );
    }
}

// ---- corrupted copies of the fixture ----

fn corrupt(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(fixture()).unwrap();
    edit(&mut bytes);
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Open must fail with an `Error::Gguf` whose message names the file; returns the message.
fn open_err(path: &Path) -> String {
    match GgufFile::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e @ Error::Gguf { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "message does not name the file: {msg}");
            msg
        }
        Err(e) => panic!("expected Error::Gguf, got {e:?}"),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    let mut hits = hay.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i);
    let first = hits.next().unwrap_or_else(|| panic!("{:?} not in fixture", String::from_utf8_lossy(needle)));
    assert!(hits.next().is_none(), "{:?} occurs twice", String::from_utf8_lossy(needle));
    first
}

/// Offset of the GGUF string `s` (its u64 length prefix included).
fn find_gguf_string(hay: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend(s.as_bytes());
    find(hay, &needle)
}

#[test]
fn truncated_inside_tensor_data() {
    let dir = tempfile::tempdir().unwrap();
    let exp = expected();
    let last = exp["tensors"].as_array().unwrap().last().unwrap()["name"].as_str().unwrap().to_owned();
    // The last tensor (6 Q8_0 blocks, 204 bytes) is followed by padding to 64; cut into its data.
    let p = corrupt(dir.path(), "cut_data.gguf", |b| b.truncate(b.len() - 100));
    let msg = open_err(&p);
    assert!(msg.contains(&format!("tensor '{last}'")) && msg.contains("runs past the end of the file"), "{msg}");
}

#[test]
fn truncated_inside_header() {
    let dir = tempfile::tempdir().unwrap();
    // Inside the tensor infos: right after the name of tensor "q4_k".
    let p = corrupt(dir.path(), "cut_infos.gguf", |b| {
        let at = find_gguf_string(b, "q4_k") + 8 + 4 + 6;
        b.truncate(at);
    });
    let msg = open_err(&p);
    assert!(msg.contains("tensor 'q4_k'") && msg.contains("runs past the end of the file"), "{msg}");
    // Inside the fixed header, and an empty file.
    for len in [10, 0] {
        let p = corrupt(dir.path(), &format!("cut_{len}.gguf"), |b| b.truncate(len));
        let msg = open_err(&p);
        assert!(msg.contains("runs past the end of the file"), "{msg}");
    }
}

#[test]
fn wrong_magic() {
    let dir = tempfile::tempdir().unwrap();
    let p = corrupt(dir.path(), "magic.gguf", |b| b[..4].copy_from_slice(b"GGML"));
    let msg = open_err(&p);
    assert!(msg.contains("not a GGUF file") && msg.contains("GGML"), "{msg}");
}

#[test]
fn unsupported_version() {
    let dir = tempfile::tempdir().unwrap();
    for v in [1u32, 4] {
        let p = corrupt(dir.path(), &format!("v{v}.gguf"), |b| b[4..8].copy_from_slice(&v.to_le_bytes()));
        let msg = open_err(&p);
        assert!(msg.contains(&format!("unsupported GGUF version {v}")), "{msg}");
    }
}

#[test]
fn version_2_is_read_like_3() {
    let dir = tempfile::tempdir().unwrap();
    let p = corrupt(dir.path(), "v2.gguf", |b| b[4..8].copy_from_slice(&2u32.to_le_bytes()));
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version(), 2);
    let orig = GgufFile::open(fixture()).unwrap();
    assert_eq!(f.metadata(), orig.metadata());
    assert_eq!(f.dequantize("q6_k").unwrap(), orig.dequantize("q6_k").unwrap());
}

#[test]
fn string_length_past_eof() {
    let dir = tempfile::tempdir().unwrap();
    let p = corrupt(dir.path(), "strlen.gguf", |b| {
        let at = find_gguf_string(b, "héllo, GGUF ✓");
        let huge = b.len() as u64 + 1;
        b[at..at + 8].copy_from_slice(&huge.to_le_bytes());
    });
    let msg = open_err(&p);
    assert!(
        msg.contains("'test.string'") && msg.contains("string length") && msg.contains("past the end of the file"),
        "{msg}"
    );
}

#[test]
fn tensor_extent_past_eof() {
    let dir = tempfile::tempdir().unwrap();
    let p = corrupt(dir.path(), "offset.gguf", |b| {
        // Tensor info of "q6_k": name, u32 n_dims (2), 2 × u64 dims, u32 type, u64 offset.
        let at = find_gguf_string(b, "q6_k") + 8 + 4 + 4 + 16 + 4;
        let past = (b.len() as u64).div_ceil(64) * 64;
        b[at..at + 8].copy_from_slice(&past.to_le_bytes());
    });
    let msg = open_err(&p);
    assert!(msg.contains("tensor 'q6_k'") && msg.contains("runs past the end of the file"), "{msg}");
}

#[test]
fn unknown_tensor_type_and_misaligned_offset() {
    let dir = tempfile::tempdir().unwrap();
    let ty_at = |b: &[u8]| find_gguf_string(b, "q6_k") + 8 + 4 + 4 + 16;
    let p = corrupt(dir.path(), "type.gguf", |b| {
        let at = ty_at(b);
        b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    });
    let msg = open_err(&p);
    assert!(msg.contains("tensor 'q6_k'") && msg.contains("unknown GGML tensor type 99"), "{msg}");
    let p = corrupt(dir.path(), "align.gguf", |b| {
        let at = ty_at(b) + 4;
        let off = u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) + 32;
        b[at..at + 8].copy_from_slice(&off.to_le_bytes());
    });
    let msg = open_err(&p);
    assert!(msg.contains("tensor 'q6_k'") && msg.contains("not a multiple of the alignment 64"), "{msg}");
}

#[test]
fn no_panic_on_any_truncation_or_header_byte_flip() {
    let dir = tempfile::tempdir().unwrap();
    let orig = std::fs::read(fixture()).unwrap();
    let p = dir.path().join("mangled.gguf");
    let try_open = |bytes: &[u8]| {
        std::fs::write(&p, bytes).unwrap();
        if let Ok(f) = GgufFile::open(&p) {
            for t in f.tensors() {
                let _ = f.dequantize(&t.name);
            }
        } else {
            open_err(&p);
        }
    };
    for len in (0..orig.len()).step_by(5) {
        try_open(&orig[..len]);
    }
    // Deterministic pseudo-random single-byte changes inside the header (metadata + tensor infos).
    let header_len = find_gguf_string(&orig, "q8_0_3d") + 64;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..3000 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let at = (state >> 33) as usize % header_len;
        let mut bytes = orig.clone();
        bytes[at] ^= 1 << ((state >> 20) % 8) as u8 | (state >> 40) as u8;
        try_open(&bytes);
    }
}
