//! compressed-tensors `sparse-bitmask` checkpoints: Lacuna loads the bitmask form and the dense form
//! of a pruned SmolLM2 to identical weights, the bitmask form is smaller, and the compressed-tensors
//! Python library itself (`tests/fixtures/check_compressed_tensors.py`, at the last release that
//! still has the sparse-bitmask compressor) decompresses it to the dense form and compresses the
//! dense form back to the same bytes. Corrupted index parts are rejected at load.
//!
//! INT8 (`int-quantized`, dense and `sparse-bitmask` over int8, W8A8 and W8A16): the library
//! parses our `quantization_config`, decompresses our files to the same dequantized tensors, and
//! compresses those back to our bytes; what it writes itself Lacuna reads to the same codes, scales
//! and logits.
//!
//! Needs the virtualenv of `tests/fixtures/requirements-compressed-tensors.txt` at
//! `${LACUNA_CACHE:-$HOME/.cache/lacuna}/venvs/compressed-tensors` (`.ci/run` creates it); without
//! it these tests fail with the command that creates it, never skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use lacuna_api::QuantScheme;
use lacuna_model::hf::{self, BitmaskOptions, Int8Config, Int8Sparsity, SaveOptions};
use lacuna_model::weights::{Dtype, Weight};
use lacuna_model::{Checkpoint, KvCache, LlamaConfig};
use lacuna_prune::{PruneConfig, magnitude};
use lacuna_tests::{fixtures_dir, smollm2};

/// check_compressed_tensors.py's exit status when a package is missing.
const MISSING_PACKAGE: i32 = 3;
/// The recipe defaults (`lacuna_api::DEFAULT_TARGETS`, ignore `lm_head`), as `lacuna prune` writes them.
const TARGETS: &str = r"^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj$";
const PROMPT: &str = "The quick brown fox jumps over the lazy dog, and then";

/// A pruned copy of SmolLM2: every decoder linear pruned by magnitude with `cfg`, in `dtype`.
/// Returns the tensors and the layer names that were pruned.
fn pruned_smollm2(cfg: &PruneConfig, dtype: Dtype) -> (Vec<(String, Weight)>, Vec<String>) {
    let mut layers = Vec::new();
    let tensors = smollm2()
        .model
        .tensors()
        .into_iter()
        .map(|(name, w)| {
            let w = w.to_dtype(dtype);
            let Some(layer) = name.strip_suffix(".weight").filter(|l| is_target(l)) else { return (name, w) };
            let [rows, cols] = w.dims2().unwrap();
            // bf16 → f32 is exact and the pruned values are copies, so converting back is exact too.
            let mut v = w.to_f32_vec();
            magnitude(&mut v, rows, cols, cfg).unwrap();
            layers.push(layer.to_owned());
            (name, Weight::from_f32(vec![rows, cols], v).unwrap().to_dtype(dtype))
        })
        .collect();
    (tensors, layers)
}

fn is_target(layer: &str) -> bool {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(TARGETS).unwrap()).is_match(layer)
}

fn zeros_fraction(tensors: &[(String, Weight)], layers: &[String]) -> f64 {
    let (mut z, mut n) = (0usize, 0usize);
    for (name, w) in tensors {
        if layers.iter().any(|l| name.strip_suffix(".weight") == Some(l)) {
            z += w.count_zeros();
            n += w.len();
        }
    }
    z as f64 / n as f64
}

/// Writes the dense and the bitmask forms as `lacuna prune` does (ignoring `ignore` in the
/// config); returns their paths.
fn write_both(
    root: &Path,
    cfg: &LlamaConfig,
    tensors: &[(String, Weight)],
    layers: &[String],
    structure: &str,
    ignore: &str,
) -> (PathBuf, PathBuf) {
    let tok = &smollm2().tokenizer;
    let refs: Vec<(String, &Weight)> = tensors.iter().map(|(n, w)| (n.clone(), w)).collect();
    let dense = root.join("dense");
    hf::save_dir(&dense, cfg, &refs, Some(tok), &SaveOptions::default()).unwrap();
    let bitmask = root.join("bitmask");
    let qc = hf::sparse_bitmask_quantization_config(
        zeros_fraction(tensors, layers),
        structure,
        &[TARGETS.to_owned()],
        &[ignore.to_owned()],
    );
    let opts = SaveOptions {
        bitmask: Some(BitmaskOptions { targets: layers.iter().map(|l| format!("{l}.weight")).collect() }),
        extra_config: [("quantization_config".to_owned(), qc)].into(),
        ..Default::default()
    };
    hf::save_dir(&bitmask, cfg, &refs, Some(tok), &opts).unwrap();
    (dense, bitmask)
}

fn safetensors_bytes(dir: &Path) -> u64 {
    hf::shard_files(dir).unwrap().iter().map(|p| std::fs::metadata(p).unwrap().len()).sum()
}

fn last_logits(ck: &Checkpoint, ids: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(ck.model.config(), ids.len());
    ck.model.forward_last_logits(ids, &mut cache).unwrap()
}

/// Lacuna's own checks: both forms load to bit-identical tensors and logits, the bitmask one is smaller.
fn lacuna_loads_both_identically(dense: &Path, bitmask: &Path, tensors: &[(String, Weight)], layers: &[String]) {
    let d = Checkpoint::open(dense).unwrap();
    let b = Checkpoint::open(bitmask).unwrap();
    let (td, tb) = (d.model.tensors(), b.model.tensors());
    assert_eq!(td.len(), tb.len());
    assert_eq!(td.len(), tensors.len());
    for (((nd, wd), (nb, wb)), (n, w)) in td.iter().zip(&tb).zip(tensors) {
        assert_eq!((nd, nb), (n, n));
        assert_eq!(wb.shape(), w.shape(), "{n}");
        assert_eq!(wb.dtype(), w.dtype(), "{n}");
        assert!(wd.bytes() == w.bytes(), "{n}: dense form differs from what was saved");
        assert!(wb.bytes() == w.bytes(), "{n}: bitmask form differs from what was saved");
    }
    // The compressed layers really are compressed on disk, and really sparse.
    let names = read_names(bitmask);
    for l in layers {
        assert!(names.contains(&format!("{l}.bitmask")) && !names.contains(&format!("{l}.weight")), "{l}");
    }
    assert!(names.contains(&"model.embed_tokens.weight".to_owned()));
    let ids = d.tokenizer.encode(PROMPT, true).unwrap();
    let (ld, lb) = (last_logits(&d, &ids), last_logits(&b, &ids));
    assert!(ld.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()), "logits must be bit-identical");
    let (sd, sb) = (safetensors_bytes(dense), safetensors_bytes(bitmask));
    assert!(sb < sd, "bitmask form ({sb} bytes) is not smaller than the dense one ({sd} bytes)");
    eprintln!("safetensors bytes: dense {sd}, bitmask {sb} ({:.1}%)", 100.0 * sb as f64 / sd as f64);
}

/// Tensor names in a directory's safetensors headers.
fn read_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for path in hf::shard_files(dir).unwrap() {
        let (header, _) = read_header(&std::fs::read(&path).unwrap());
        out.extend(header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned());
    }
    out
}

/// A safetensors file's JSON header and the offset of its data section.
fn read_header(bytes: &[u8]) -> (serde_json::Value, usize) {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + header_len]).unwrap(), 8 + header_len)
}

/// Runs the checker; returns whether it passed, its stdout and its stderr.
fn python_check(bitmask: &Path, dense: &Path) -> (bool, String, String) {
    python_check_writing(bitmask, dense, None)
}

/// The checker, also writing the library's own compression of `dense` into `library_out`.
fn python_check_writing(bitmask: &Path, dense: &Path, library_out: Option<&Path>) -> (bool, String, String) {
    let python = lacuna_tests::torch_python();
    let script = fixtures_dir().join("check_compressed_tensors.py");
    let mut cmd = Command::new(&python);
    cmd.arg(&script).arg(bitmask).arg(dense).env("HF_HUB_OFFLINE", "1");
    if let Some(out) = library_out {
        cmd.arg(out);
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run {} ({e}): create the virtualenv with `{}`",
            python.display(),
            lacuna_tests::torch_python_hint()
        ),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.code() == Some(MISSING_PACKAGE) {
        panic!("{} lacks a Python package; run `{}`\n{stderr}", python.display(), lacuna_tests::torch_python_hint());
    }
    (out.status.success(), stdout, stderr)
}

fn run_python_check(bitmask: &Path, dense: &Path) -> String {
    let (ok, stdout, stderr) = python_check(bitmask, dense);
    assert!(
        ok,
        "compressed-tensors rejected {} against {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        bitmask.display(),
        dense.display(),
    );
    eprintln!("{stdout}");
    assert!(stdout.lines().any(|l| l == "OK"), "{stdout}");
    stdout
}

/// The checker must fail on `bitmask` with a message containing `expect`.
fn python_check_fails(bitmask: &Path, dense: &Path, expect: &str) {
    let (ok, stdout, stderr) = python_check(bitmask, dense);
    assert!(!ok, "the checker accepted {}:\n{stdout}", bitmask.display());
    assert!(stderr.contains(expect), "expected {expect:?} in the checker's error:\n{stderr}");
}

#[test]
fn unstructured_f32_bitmask_matches_dense_and_compressed_tensors() {
    let (tensors, layers) = pruned_smollm2(&PruneConfig::unstructured(0.5), Dtype::F32);
    assert_eq!(layers.len(), 30 * 7);
    let zf = zeros_fraction(&tensors, &layers);
    assert!((zf - 0.5).abs() < 1e-3, "{zf}");
    let tmp = tempfile::tempdir().unwrap();
    let (dense, bitmask) =
        write_both(tmp.path(), smollm2().model.config(), &tensors, &layers, "unstructured", "lm_head");
    lacuna_loads_both_identically(&dense, &bitmask, &tensors, &layers);
    let summary = run_python_check(&bitmask, &dense);
    assert!(summary.contains("210 compressed layers (torch.float32"), "{summary}");
}

#[test]
fn two_four_bf16_bitmask_matches_dense_and_compressed_tensors() {
    let (tensors, layers) = pruned_smollm2(&PruneConfig::nm(2, 4), Dtype::BF16);
    assert!(tensors.iter().all(|(_, w)| w.dtype() == Dtype::BF16));
    // Every group of four inputs of every pruned row keeps at most two weights.
    for (name, w) in &tensors {
        if !layers.iter().any(|l| name.strip_suffix(".weight") == Some(l)) {
            continue;
        }
        let v = w.to_f32_vec();
        assert!(v.chunks_exact(4).all(|g| g.iter().filter(|x| **x != 0.0).count() <= 2), "{name}");
    }
    let tmp = tempfile::tempdir().unwrap();
    // compressed-tensors' notation: two kept in every four.
    let (dense, bitmask) = write_both(tmp.path(), smollm2().model.config(), &tensors, &layers, "2:4", "lm_head");
    lacuna_loads_both_identically(&dense, &bitmask, &tensors, &layers);
    let summary = run_python_check(&bitmask, &dense);
    assert!(summary.contains("210 compressed layers (torch.bfloat16"), "{summary}");
}

/// A two-layer SmolLM2 (50% magnitude-pruned) in both forms: `(dense dir, bitmask dir, bitmask file)`.
fn small_pair(root: &Path, ignore: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ck = smollm2();
    let mut cfg = ck.model.config().clone();
    cfg.num_hidden_layers = 2;
    let keep = |n: &str| {
        !n.starts_with("model.layers.") || n.starts_with("model.layers.0.") || n.starts_with("model.layers.1.")
    };
    let mut layers = Vec::new();
    let tensors: Vec<(String, Weight)> = ck
        .model
        .tensors()
        .into_iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, w)| {
            let Some(l) = n.strip_suffix(".weight").filter(|l| is_target(l)) else { return (n, w.clone()) };
            let [rows, cols] = w.dims2().unwrap();
            let mut v = w.to_f32_vec();
            magnitude(&mut v, rows, cols, &PruneConfig::unstructured(0.5)).unwrap();
            layers.push(l.to_owned());
            (n, Weight::from_f32(vec![rows, cols], v).unwrap())
        })
        .collect();
    assert_eq!(layers.len(), 14);
    let (dense, bitmask) = write_both(root, &cfg, &tensors, &layers, "unstructured", ignore);
    Checkpoint::open(&bitmask).expect("the uncorrupted directory loads");
    let file = bitmask.join(hf::SINGLE_FILE);
    assert!(file.is_file());
    (dense, bitmask, file)
}

fn edit_file(file: &Path, edit: impl Fn(&mut [u8])) {
    let mut bytes = std::fs::read(file).unwrap();
    edit(&mut bytes);
    std::fs::write(file, &bytes).unwrap();
}

/// Byte range of tensor `name`'s data in a safetensors file.
fn data_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let (header, data) = read_header(bytes);
    let offs = &header[name]["data_offsets"];
    let (a, b) = (offs[0].as_u64().unwrap() as usize, offs[1].as_u64().unwrap() as usize);
    data + a..data + b
}

fn corrupt_and_load(edit: impl Fn(&mut [u8])) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, file) = small_pair(tmp.path(), "lm_head");
    edit_file(&file, edit);
    let err = match Checkpoint::open(&dir) {
        Ok(_) => panic!("a corrupted bitmask directory loaded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&file.display().to_string()), "the error must name the file: {err}");
    err
}

const LAYER: &str = "model.layers.1.mlp.down_proj";

#[test]
fn changed_row_offset_is_rejected_naming_file_and_tensor() {
    let err = corrupt_and_load(|bytes| {
        let r = data_range(bytes, &format!("{LAYER}.row_offsets"));
        // Row 3's offset, one value later than its predecessors' bitmask allows.
        let at = r.start + 3 * 8;
        let v = i64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) + 1;
        bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
    });
    assert!(err.contains(LAYER), "the error must name the tensor: {err}");
    assert!(err.contains("row 3"), "{err}");
}

#[test]
fn flipped_bitmask_bit_is_rejected_naming_file_and_tensor() {
    let err = corrupt_and_load(|bytes| {
        let r = data_range(bytes, &format!("{LAYER}.bitmask"));
        // The last byte: the popcount no longer matches the stored values (no later row to hide it).
        bytes[r.end - 1] ^= 0x01;
    });
    assert!(err.contains(LAYER), "the error must name the tensor: {err}");
    assert!(err.contains("set bits but"), "{err}");
}

#[test]
fn quantization_config_targets_search_like_the_recipe() {
    let qc = hf::sparse_bitmask_quantization_config(0.5, "2:4", &[TARGETS.to_owned()], &["lm_head".to_owned()]);
    assert_eq!(qc["quant_method"], "compressed-tensors");
    let sc = &qc["sparsity_config"];
    assert_eq!(sc["format"], "sparse-bitmask");
    assert_eq!(sc["sparsity_structure"], "2:4");
    assert_eq!(sc["targets"][0], format!("re:.*?(?:{TARGETS})"));
    assert_eq!(sc["ignore"][0], "re:.*?(?:lm_head)");
}

/// The checker is not vacuous: a changed stored value (index parts intact, so Lacuna loads it) and
/// a config whose targets/ignore do not select the compressed layers are both caught.
#[test]
fn python_check_catches_a_changed_value_and_wrong_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let (dense, bitmask, file) = small_pair(&tmp.path().join("value"), "lm_head");
    run_python_check(&bitmask, &dense);
    edit_file(&file, |bytes| {
        let r = data_range(bytes, &format!("{LAYER}.compressed"));
        // The sign bit of the first stored f32 (little-endian: its fourth byte).
        bytes[r.start + 3] ^= 0x80;
    });
    Checkpoint::open(&bitmask).expect("index parts are intact");
    python_check_fails(&bitmask, &dense, &format!("decompress: {LAYER}.weight: bytes differ"));

    let (dense, bitmask, _) = small_pair(&tmp.path().join("targets"), "down_proj");
    python_check_fails(&bitmask, &dense, "select 12 layers in the library but 14 are compressed");
}

/// A two-layer SmolLM2 with INT8 decoder linears (round to nearest per output channel) except
/// layer 1's down projection (kept in float, as a kurtosis-skipped layer is); with `sparse`, 50%
/// magnitude-pruned first and the int8 weights stored in `sparse-bitmask` form. Writes the int8
/// checkpoint and the dequantized f32 one; returns their paths and the int8 tensors.
fn int8_pair(root: &Path, scheme: QuantScheme, sparse: bool) -> (PathBuf, PathBuf, Vec<(String, Weight)>) {
    const FLOAT_LAYER: &str = "model.layers.1.mlp.down_proj";
    let ck = smollm2();
    let mut cfg = ck.model.config().clone();
    cfg.num_hidden_layers = 2;
    let keep = |n: &str| {
        !n.starts_with("model.layers.") || n.starts_with("model.layers.0.") || n.starts_with("model.layers.1.")
    };
    let mut targets = Vec::new();
    let tensors: Vec<(String, Weight)> = ck
        .model
        .tensors()
        .into_iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, w)| {
            let Some(l) = n.strip_suffix(".weight").filter(|l| is_target(l)) else { return (n, w.clone()) };
            let [rows, cols] = w.dims2().unwrap();
            let mut v = w.to_f32_vec();
            if sparse {
                magnitude(&mut v, rows, cols, &PruneConfig::unstructured(0.5)).unwrap();
            }
            let w = Weight::from_f32(vec![rows, cols], v).unwrap();
            if l == FLOAT_LAYER {
                return (n, w);
            }
            targets.push(n.clone());
            (n, w.to_dtype(Dtype::I8))
        })
        .collect();
    assert_eq!(targets.len(), 13);
    let zeros: usize = tensors.iter().filter(|(n, _)| targets.contains(n)).map(|(_, w)| w.count_zeros()).sum();
    let total: usize = tensors.iter().filter(|(n, _)| targets.contains(n)).map(|(_, w)| w.len()).sum();
    let qc = hf::int8_quantization_config(&Int8Config {
        scheme,
        ignore: vec!["lm_head".into(), FLOAT_LAYER.into()],
        sparsity: sparse.then(|| Int8Sparsity {
            global_sparsity: zeros as f64 / total as f64,
            structure: "unstructured".into(),
            targets: targets.clone(),
        }),
        metadata: serde_json::json!({"skipped_by_kurtosis": [FLOAT_LAYER]}),
    });
    let tok = &ck.tokenizer;
    let int8 = root.join("int8");
    let refs: Vec<(String, &Weight)> = tensors.iter().map(|(n, w)| (n.clone(), w)).collect();
    let opts = SaveOptions {
        bitmask: sparse.then(|| BitmaskOptions { targets: targets.clone() }),
        extra_config: [("quantization_config".to_owned(), qc)].into(),
        ..Default::default()
    };
    hf::save_dir(&int8, &cfg, &refs, Some(tok), &opts).unwrap();
    let dequantized: Vec<(String, Weight)> = tensors.iter().map(|(n, w)| (n.clone(), w.to_dtype(Dtype::F32))).collect();
    let refs: Vec<(String, &Weight)> = dequantized.iter().map(|(n, w)| (n.clone(), w)).collect();
    let dense = root.join("dequantized");
    hf::save_dir(&dense, &cfg, &refs, Some(tok), &SaveOptions::default()).unwrap();
    (int8, dense, tensors)
}

/// Our int8 files against compressed-tensors both ways: the library reads ours (config,
/// decompression, compression back to our bytes), and Lacuna reads the library's.
fn int8_interop(scheme: QuantScheme, sparse: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let (int8, dense, tensors) = int8_pair(tmp.path(), scheme, sparse);
    let library = tmp.path().join("library");
    let (ok, stdout, stderr) = python_check_writing(&int8, &dense, Some(&library));
    assert!(ok, "compressed-tensors rejected {}\nstdout:\n{stdout}\nstderr:\n{stderr}", int8.display());
    eprintln!("{stdout}");
    let scheme_name = if scheme == QuantScheme::W8a8 { "W8A8" } else { "W8A16" };
    assert!(stdout.contains(&format!("13 int8 layers ({scheme_name}, ['torch.int8'])")), "{stdout}");
    assert_eq!(stdout.contains("sparse-bitmask over int8"), sparse, "{stdout}");

    // Lacuna reads what the library wrote: the same codes, scales and stored form, and the model
    // computes the same logits from it as from ours.
    let ours = hf::load_tensors(&int8).unwrap();
    let theirs = hf::load_tensors(&library).unwrap();
    assert_eq!(ours.len(), tensors.len());
    assert_eq!(theirs.len(), tensors.len());
    for (name, w) in &tensors {
        let (a, b) = (&ours[name], &theirs[name]);
        match w.int8() {
            Some(m) => {
                let (a, b) = (a.int8().expect("int8"), b.int8().expect("int8"));
                assert_eq!(a.codes(), m.codes(), "{name}: our codes");
                assert_eq!(b.codes(), m.codes(), "{name}: the library's codes");
                assert_eq!(b.scales(), m.scales(), "{name}: the library's scales");
                assert_eq!(b.stored_as_bitmask(), sparse, "{name}");
                assert_eq!(b.input_quant(), a.input_quant(), "{name}");
            }
            None => assert!(b.bytes() == w.bytes() && a.bytes() == w.bytes(), "{name}"),
        }
    }
    let (mut c_ours, c_theirs) = (Checkpoint::open(&int8).unwrap(), Checkpoint::open(&library).unwrap());
    let ids = c_ours.tokenizer.encode(PROMPT, true).unwrap();
    let (lo, lt) = (last_logits(&c_ours, &ids), last_logits(&c_theirs, &ids));
    assert!(lo.iter().zip(&lt).all(|(x, y)| x.to_bits() == y.to_bits()), "logits must be bit-identical");

    // What the runtime does before decoding: the codes W8A8 products read leave the file map
    // (dense codes; bitmask codes are decoded into memory at load anyway), with the same logits.
    let mapped_int8 =
        |ck: &Checkpoint| ck.model.tensors().iter().filter(|(_, w)| w.int8().is_some_and(|m| m.is_mapped())).count();
    let before = mapped_int8(&c_ours);
    c_ours.model.copy_mapped_weights();
    if scheme == QuantScheme::W8a8 && !sparse {
        assert!(before > 0, "the dense W8A8 codes load mapped");
        assert_eq!(mapped_int8(&c_ours), 0, "every W8A8 code matrix is copied");
    }
    let lc = last_logits(&c_ours, &ids);
    assert!(lc.iter().zip(&lt).all(|(x, y)| x.to_bits() == y.to_bits()), "logits after the copy");
}

#[test]
fn int8_w8a8_dense_matches_compressed_tensors_both_ways() {
    int8_interop(QuantScheme::W8a8, false);
}

#[test]
fn int8_w8a8_sparse_bitmask_matches_compressed_tensors_both_ways() {
    int8_interop(QuantScheme::W8a8, true);
}

#[test]
fn int8_w8a16_dense_matches_compressed_tensors_both_ways() {
    int8_interop(QuantScheme::W8a16, false);
}

/// The int8 checker is not vacuous: a changed scale (the file still loads) is caught.
#[test]
fn python_check_catches_a_changed_int8_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let (int8, dense, _) = int8_pair(tmp.path(), QuantScheme::W8a8, true);
    edit_file(&int8.join(hf::SINGLE_FILE), |bytes| {
        let r = data_range(bytes, "model.layers.0.self_attn.k_proj.weight_scale");
        // The low mantissa bit of the first scale: still finite and positive.
        bytes[r.start] ^= 0x01;
    });
    Checkpoint::open(&int8).expect("a changed scale is still a valid checkpoint");
    python_check_fails(&int8, &dense, "decompress: model.layers.0.self_attn.k_proj.weight: bytes differ");
}
