//! INT8 checkpoints (compressed-tensors `int-quantized`, dense and `sparse-bitmask` over int8):
//! writing and reading back gives the same codes and scales, the bitmask form keeps every zero,
//! the model runs them (W8A8 with its input quantized per token, in the reference forward and in
//! the decode runtime), and corrupt files are rejected with an error naming the tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lacuna_api::QuantScheme;
use lacuna_model::hf::{self, BitmaskOptions, Int8Config, Int8Sparsity, SaveOptions};
use lacuna_model::int8::{InputQuant, quantize_activations_per_token};
use lacuna_model::runtime::Runtime;
use lacuna_model::sampling::argmax;
use lacuna_model::weights::{Dtype, Weight};
use lacuna_model::{KvCache, KvDtype, LinearKind, Llama, LlamaConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype as StDtype, SafeTensors, tensor::TensorView};

fn config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 96,
        hidden_size: 32,
        intermediate_size: 72,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        max_position_embeddings: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_ids: vec![0],
        torch_dtype: Some("float32".into()),
    }
}

fn linear_shape(c: &LlamaConfig, k: LinearKind) -> Vec<usize> {
    let (h, q, kv, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    match k {
        LinearKind::Q => vec![q, h],
        LinearKind::K | LinearKind::V => vec![kv, h],
        LinearKind::O => vec![h, q],
        LinearKind::Gate | LinearKind::Up => vec![f, h],
        LinearKind::Down => vec![h, f],
    }
}

/// A random tiny Llama whose decoder linears are int8 (round to nearest), 60% zeros in layer 1's,
/// except layer 0's down projection, kept in float; and the names of the sparse int8 weights.
fn tensors() -> (Vec<(String, Weight)>, Vec<String>) {
    let c = config();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut rand = |shape: Vec<usize>, around: f32, zeros: f64| {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| if rng.random::<f64>() < zeros { 0.0 } else { around + rng.random_range(-0.4f32..0.4) })
            .collect();
        Weight::from_f32(shape, v).unwrap()
    };
    let mut t = vec![("model.embed_tokens.weight".to_owned(), rand(vec![c.vocab_size, c.hidden_size], 0.0, 0.0))];
    let mut sparse = Vec::new();
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), rand(vec![c.hidden_size], 1.0, 0.0)));
        for k in LinearKind::ALL {
            let name = format!("{p}.{}.weight", k.hf_name());
            let w = rand(linear_shape(&c, k), 0.0, if l == 1 { 0.6 } else { 0.0 });
            if l == 0 && k == LinearKind::Down {
                t.push((name, w));
                continue;
            }
            if l == 1 {
                sparse.push(name.clone());
            }
            t.push((name, w.to_dtype(Dtype::I8)));
            if k == LinearKind::O {
                // Where `Llama::tensors` puts it, so that a re-saved model has the same bytes.
                t.push((format!("{p}.post_attention_layernorm.weight"), rand(vec![c.hidden_size], 1.0, 0.0)));
            }
        }
    }
    t.push(("model.norm.weight".to_owned(), rand(vec![c.hidden_size], 1.0, 0.0)));
    t.push(("lm_head.weight".to_owned(), rand(vec![c.vocab_size, c.hidden_size], 0.0, 0.0)));
    (t, sparse)
}

fn int8_config(scheme: QuantScheme, sparse: Option<&[String]>) -> Int8Config {
    Int8Config {
        scheme,
        ignore: vec!["lm_head".into(), "model.layers.0.mlp.down_proj".into()],
        sparsity: sparse.map(|s| Int8Sparsity {
            global_sparsity: 0.6,
            structure: "unstructured".into(),
            targets: s.to_vec(),
        }),
        metadata: serde_json::json!({"kurtosis_ranking": ["model.layers.0.mlp.down_proj"]}),
    }
}

/// Writes the checkpoint; with `bitmask`, the sparse int8 weights in `sparse-bitmask` form.
fn write(dir: &Path, scheme: QuantScheme, bitmask: bool) {
    let (t, sparse) = tensors();
    let refs: Vec<(String, &Weight)> = t.iter().map(|(n, w)| (n.clone(), w)).collect();
    let qc = hf::int8_quantization_config(&int8_config(scheme, bitmask.then_some(&sparse[..])));
    let opts = SaveOptions {
        bitmask: bitmask.then(|| BitmaskOptions { targets: sparse.clone() }),
        extra_config: [("quantization_config".to_owned(), qc)].into(),
        ..Default::default()
    };
    hf::save_dir(dir, &config(), &refs, None, &opts).unwrap();
}

fn load_model(dir: &Path) -> Llama {
    Llama::load(config(), hf::load_tensors(dir).unwrap(), dir).unwrap()
}

#[test]
fn int8_round_trips_dense_and_bitmask() {
    let tmp = tempfile::tempdir().unwrap();
    let (want, sparse) = tensors();
    for bitmask in [false, true] {
        let dir = tmp.path().join(if bitmask { "bitmask" } else { "dense" });
        write(&dir, QuantScheme::W8a8, bitmask);
        let got = hf::load_tensors(&dir).unwrap();
        assert_eq!(got.len(), want.len());
        for (name, w) in &want {
            let g = &got[name];
            assert_eq!(g.shape(), w.shape(), "{name}");
            assert_eq!(g.dtype(), w.dtype(), "{name}");
            match (w.int8(), g.int8()) {
                (Some(a), Some(b)) => {
                    assert_eq!(a.codes(), b.codes(), "{name}: codes");
                    assert_eq!(a.scales(), b.scales(), "{name}: scales");
                    assert_eq!(b.input_quant(), InputQuant::Int8PerToken, "{name}");
                    let in_bitmask = bitmask && sparse.contains(name);
                    assert_eq!(b.stored_as_bitmask(), in_bitmask, "{name}");
                    // The mask is kept: every zero code is still zero, nothing else is.
                    assert_eq!(g.count_zeros(), w.count_zeros(), "{name}");
                    if sparse.contains(name) {
                        assert!(g.count_zeros() as f64 > 0.5 * g.len() as f64, "{name}");
                    }
                    assert_eq!(g.to_f32_vec(), w.to_f32_vec(), "{name}: dequantized");
                }
                (None, None) => assert!(g.bytes() == w.bytes(), "{name}"),
                _ => panic!("{name}: int8 on one side only"),
            }
        }
        // On disk: the compressed-tensors names, dtypes and shapes.
        let bytes = std::fs::read(dir.join(hf::SINGLE_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let q = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!((q.dtype(), q.shape()), (StDtype::I8, &[32usize, 32][..]));
        let s = st.tensor("model.layers.0.self_attn.q_proj.weight_scale").unwrap();
        assert_eq!((s.dtype(), s.shape()), (StDtype::F32, &[32usize, 1][..]));
        assert!(st.tensor("model.layers.0.mlp.down_proj.weight_scale").is_err(), "float layers have no scale");
        let down1 = "model.layers.1.mlp.down_proj";
        if bitmask {
            assert!(st.tensor(&format!("{down1}.weight")).is_err());
            assert_eq!(st.tensor(&format!("{down1}.compressed")).unwrap().dtype(), StDtype::I8);
            assert_eq!(st.tensor(&format!("{down1}.bitmask")).unwrap().shape(), &[32, 9]);
            assert_eq!(st.tensor(&format!("{down1}.weight_scale")).unwrap().shape(), &[32, 1]);
        } else {
            assert_eq!(st.tensor(&format!("{down1}.weight")).unwrap().dtype(), StDtype::I8);
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["torch_dtype"], "float32");
        assert_eq!(cfg["quantization_config"]["format"], "int-quantized");
        assert_eq!(cfg["quantization_config"]["sparsity_config"]["format"].as_str().is_some(), bitmask);
        // Written again from what was read: the same bytes (nothing is re-quantized).
        let again = tmp.path().join(format!("again-{bitmask}"));
        let model = load_model(&dir);
        let opts = SaveOptions {
            bitmask: bitmask.then(|| BitmaskOptions { targets: sparse.clone() }),
            extra_config: [("quantization_config".to_owned(), cfg["quantization_config"].clone())].into(),
            ..Default::default()
        };
        hf::save_dir(&again, model.config(), &model.tensors(), None, &opts).unwrap();
        assert!(std::fs::read(again.join(hf::SINGLE_FILE)).unwrap() == bytes, "re-saved file differs");
    }
}

fn logits(m: &Llama, ids: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(m.config(), ids.len());
    m.forward_last_logits(ids, &mut cache).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn the_model_runs_int8_weights_and_quantizes_w8a8_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let (w8a8, w8a16) = (tmp.path().join("w8a8"), tmp.path().join("w8a16"));
    write(&w8a8, QuantScheme::W8a8, true);
    write(&w8a16, QuantScheme::W8a16, false);
    let ids = [1u32, 5, 17, 33, 2, 90, 4];

    // W8A16 computes exactly what the dequantized float model computes.
    let a16 = load_model(&w8a16);
    let (t, _) = tensors();
    let float: BTreeMap<String, Weight> =
        t.into_iter().map(|(n, w)| (n, if w.int8().is_some() { w.to_dtype(Dtype::F32) } else { w })).collect();
    let f = Llama::load(config(), float, Path::new("float")).unwrap();
    assert_eq!(logits(&a16, &ids), logits(&f, &ids));

    // W8A8 quantizes every int8 layer's input: its logits move, a little.
    let mut a8 = load_model(&w8a8);
    let (l8, l16) = (logits(&a8, &ids), logits(&a16, &ids));
    let d = max_diff(&l8, &l16);
    assert!(d > 1e-4 && d < 0.5, "W8A8 vs W8A16 logits differ by {d}");
    // Held in the bitmask form (sparse layers) the model computes the same bits: the INT8
    // kernels sum integers, in any order, and dequantize each output once.
    // (Of the sparse int8 layers only the down projection's codes are large enough for the
    // bitmask to stream fewer bytes than the dense codes: the row offsets weigh on small ones.)
    assert!(a8.prefer_bitmask().unwrap() >= 1);
    let down1 = a8.linear(1, LinearKind::Down).unwrap();
    assert!(down1.int8().is_some() && down1.runs_bitmask(), "stays int8, runs the bitmask codes");
    assert!(!a8.linear(0, LinearKind::Q).unwrap().runs_bitmask(), "a dense layer keeps its dense codes");
    let lb = logits(&a8, &ids);
    assert_eq!(lb, l8);

    // One W8A8 product is the dequantized weight times the per-token quantized input: exactly on
    // the reference path, up to f32 rounding on the kernels.
    for w in [a8.linear(0, LinearKind::Q).unwrap(), down1] {
        let cols = w.shape()[1];
        let x: Vec<f32> = (0..3 * cols).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let mut xq = vec![0f32; x.len()];
        quantize_activations_per_token(&x, cols, &mut xq).unwrap();
        let rows = w.shape()[0];
        let (mut y, mut r, mut want) = (vec![0f32; 3 * rows], vec![0f32; 3 * rows], vec![0f32; 3 * rows]);
        w.matmul(&x, 3, &mut y).unwrap();
        w.matmul_dequantized(&x, 3, &mut r).unwrap();
        w.to_dtype(Dtype::F32).matmul(&xq, 3, &mut want).unwrap();
        assert_eq!(r, want);
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    // The decode runtime quantizes the same inputs: its logits follow the W8A8 reference, not W8A16's.
    let a8 = Arc::new(a8);
    let mut rt = Runtime::new(a8.clone(), 1, 32, KvDtype::F32).unwrap();
    rt.prefill(1, &ids[..ids.len() - 1]).unwrap();
    let lr = rt.decode(&[(1, ids[ids.len() - 1])]).unwrap().to_vec();
    assert_eq!(lr.len(), config().vocab_size);
    let (dr8, dr16) = (max_diff(&lr, &l8), max_diff(&lr, &l16));
    assert!(dr8 < 1e-3 && dr8 < dr16 / 10.0, "runtime vs W8A8 {dr8}, vs W8A16 {dr16}");
}

/// Every tensor of a file as (dtype, shape, bytes), for editing.
type Raw = BTreeMap<String, (StDtype, Vec<usize>, Vec<u8>)>;

fn rewrite(dir: &Path, edit: impl FnOnce(&mut Raw)) -> PathBuf {
    let path = dir.join(hf::SINGLE_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut raw: Raw =
        st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut raw);
    let views: Vec<(String, TensorView)> =
        raw.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

/// The error loading a copy of the checkpoint after `edit`; it must name the file.
fn load_error(bitmask: bool, edit: impl FnOnce(&mut Raw)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    write(&dir, QuantScheme::W8a8, bitmask);
    rewrite(&dir, edit);
    match hf::load_tensors(&dir).and_then(|t| Llama::load(config(), t, &dir)) {
        Ok(_) => panic!("a corrupted int8 checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

const Q: &str = "model.layers.0.self_attn.q_proj";
const DOWN1: &str = "model.layers.1.mlp.down_proj";

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn corrupt_scales_are_rejected_naming_the_tensor() {
    let scale = format!("{Q}.weight_scale");
    // Wrong shape: [rows] → [rows / 2, 2].
    let e = load_error(false, |r| r.get_mut(&scale).unwrap().1 = vec![16, 2]);
    assert!(e.contains(&scale) && e.contains("expected [32, 1]"), "{e}");
    // Wrong dtype: int64 scales.
    let e = load_error(false, |r| {
        let t = r.get_mut(&scale).unwrap();
        *t = (StDtype::I64, vec![32, 1], vec![0u8; 32 * 8]);
    });
    assert!(e.contains(&scale), "{e}");
    for (bad, what) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf"), (0.0, "0"), (-0.5, "-0.5")] {
        let e = load_error(false, |r| {
            let mut v = vec![0.01f32; 32];
            v[5] = bad;
            r.get_mut(&scale).unwrap().2 = f32_bytes(&v);
        });
        assert!(e.contains(&scale) && e.contains("row 5") && e.contains(what), "{e}");
    }
    // Missing scale.
    let e = load_error(false, |r| {
        r.remove(&scale);
    });
    assert!(e.contains(&format!("{Q}.weight")) && e.contains(&scale), "{e}");
    // A scale for a float weight.
    let e = load_error(false, |r| {
        r.insert(
            "model.layers.0.mlp.down_proj.weight_scale".into(),
            (StDtype::F32, vec![32, 1], f32_bytes(&[1.0; 32])),
        );
    });
    assert!(e.contains("model.layers.0.mlp.down_proj.weight_scale"), "{e}");
}

#[test]
fn int8_weights_of_the_wrong_shape_are_rejected_naming_the_tensor() {
    let w = format!("{Q}.weight");
    // Transposed-looking shape: the scale no longer fits the rows.
    let e = load_error(false, |r| r.get_mut(&w).unwrap().1 = vec![16, 64]);
    assert!(e.contains(&format!("{Q}.weight_scale")) && e.contains("expected [16, 1]"), "{e}");
    // Not a matrix.
    let e = load_error(false, |r| r.get_mut(&w).unwrap().1 = vec![32 * 32]);
    assert!(e.contains(&w) && e.contains("not a matrix"), "{e}");
    // A matrix of the wrong size for the model (scale adjusted so the file itself is consistent).
    let e = load_error(false, |r| {
        r.insert(w.clone(), (StDtype::I8, vec![16, 32], vec![1u8; 16 * 32]));
        r.insert(format!("{Q}.weight_scale"), (StDtype::F32, vec![16, 1], f32_bytes(&[0.1; 16])));
    });
    assert!(e.contains(&w) && e.contains("[16, 32]"), "{e}");
}

#[test]
fn inconsistent_int8_bitmask_parts_are_rejected_naming_the_tensor() {
    // A flipped bit in the last bitmask byte: popcount and stored codes disagree.
    let e = load_error(true, |r| {
        let b = &mut r.get_mut(&format!("{DOWN1}.bitmask")).unwrap().2;
        let last = b.len() - 1;
        b[last] ^= 0x01;
    });
    assert!(e.contains(DOWN1) && e.contains("set bits but"), "{e}");
    // A moved row offset.
    let e = load_error(true, |r| {
        let o = &mut r.get_mut(&format!("{DOWN1}.row_offsets")).unwrap().2;
        let v = i64::from_le_bytes(o[24..32].try_into().unwrap()) + 1;
        o[24..32].copy_from_slice(&v.to_le_bytes());
    });
    assert!(e.contains(DOWN1) && e.contains("row 3"), "{e}");
    // Scale of a bitmask int8 weight missing.
    let e = load_error(true, |r| {
        r.remove(&format!("{DOWN1}.weight_scale"));
    });
    assert!(e.contains(&format!("{DOWN1}.weight_scale")), "{e}");
}

#[test]
fn int8_config_mismatch_is_an_error_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    write(&dir, QuantScheme::W8a8, false);
    let p = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]["strategy"] = "tensor".into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = hf::load_tensors(&dir).unwrap_err().to_string();
    assert!(e.contains("config_groups.group_0.input_activations.strategy"), "{e}");
    cfg.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = hf::load_tensors(&dir).unwrap_err().to_string();
    assert!(e.contains("int8 weights"), "{e}");
}

/// Greedy decoding of `prompt` through the decode runtime (prefill, then `steps` decode steps)
/// against the reference forward with [`Llama::set_int8_reference`] (dequantized weights, inputs
/// quantized per token in f32): at every step the logits within `tol` of each other and the same
/// greedy token. Returns the largest logit difference seen.
fn runtime_follows_the_dequantized_reference(model: Llama, prompt: &[u32], steps: usize, tol: f32) -> f32 {
    let mut reference = model.clone();
    reference.set_int8_reference(true);
    let mut rt = Runtime::new(Arc::new(model), 1, 64, KvDtype::F32).unwrap();
    let mut cache = KvCache::new(reference.config(), prompt.len() + steps);
    let mut got = rt.prefill(1, prompt).unwrap().to_vec();
    let mut want = reference.forward_last_logits(prompt, &mut cache).unwrap();
    let mut worst = 0f32;
    for step in 0..=steps {
        let d = max_diff(&got, &want);
        worst = worst.max(d);
        assert!(d <= tol, "step {step}: logits differ by {d}");
        let (tok, tok_ref) = (argmax(&got), argmax(&want));
        assert_eq!(tok, tok_ref, "step {step}: greedy tokens");
        if step == steps {
            break;
        }
        got = rt.decode(&[(1, tok as u32)]).unwrap().to_vec();
        want = reference.forward_last_logits(&[tok as u32], &mut cache).unwrap();
    }
    worst
}

/// The W8A8 checkpoint (sparse layers in `sparse-bitmask` form), with layer 0's K projection in
/// float so that the q/k/v group mixes INT8 and float products.
fn w8a8_model(dir: &Path, bitmask: bool) -> Llama {
    write(dir, QuantScheme::W8a8, true);
    let mut m = load_model(dir);
    let k = m.linear(0, LinearKind::K).unwrap().to_dtype(Dtype::F32);
    m.set_linear(0, LinearKind::K, k).unwrap();
    if bitmask {
        assert!(m.prefer_bitmask().unwrap() >= 1);
        assert!(m.linear(1, LinearKind::Down).unwrap().runs_bitmask());
    }
    m
}

/// Logits may part by one activation code where f32 rounding moves a value across a rounding
/// boundary of the next layer's input quantization: 1.7e-3 at worst on this model (1e-6 where no
/// code moves). The test below checks that the tolerance separates W8A8 from W8A16 arithmetic.
const W8A8_TOL: f32 = 5e-3;

#[test]
fn w8a8_decoding_on_the_int8_kernels_follows_the_dequantized_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = [1u32, 5, 17, 33, 2, 90, 4, 61, 8, 12, 70];
    // The tolerance is tight enough to tell a product that skipped the input quantization.
    let a16 = tmp.path().join("a16");
    write(&a16, QuantScheme::W8a16, false);
    let mut reference = w8a8_model(&tmp.path().join("ref"), false);
    reference.set_int8_reference(true);
    let d16 = max_diff(&logits(&load_model(&a16), &prompt), &logits(&reference, &prompt));
    assert!(d16 > 4.0 * W8A8_TOL, "W8A16 vs W8A8 reference: {d16}");
    for bitmask in [false, true] {
        let model = w8a8_model(&tmp.path().join(format!("m{bitmask}")), bitmask);
        // The runtime streams the codes: a quarter of the f32 bytes of each int8 layer, or less.
        let q = model.linear(0, LinearKind::Q).unwrap();
        assert_eq!(q.stored_bytes(), 32 * 32 + 4 * 32);
        let down1 = model.linear(1, LinearKind::Down).unwrap();
        assert!(down1.stored_bytes() < if bitmask { 32 * 72 * 3 / 4 } else { 32 * 72 + 4 * 32 + 1 });
        let worst = runtime_follows_the_dequantized_reference(model, &prompt, 32, W8A8_TOL);
        eprintln!("bitmask {bitmask}: logits within {worst}");
    }
}

#[test]
fn an_int8_lm_head_runs_w8a8_and_follows_its_dequantized_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = [3u32, 9, 27, 81, 50, 7];
    let float_head = w8a8_model(&tmp.path().join("m"), true);
    let mut model = float_head.clone();
    model.quantize_lm_head().unwrap();
    assert!(model.has_int8_lm_head() && !float_head.has_int8_lm_head());
    // The head streams its codes and scales instead of f32 rows.
    let c = config();
    let saved = 4 * c.vocab_size * c.hidden_size - (c.vocab_size * c.hidden_size + 4 * c.vocab_size);
    assert_eq!(model.weight_bytes_per_token(), float_head.weight_bytes_per_token() - saved);
    // The checkpoint is unchanged: the float head is what it saves.
    let names = |m: &Llama| m.tensors().into_iter().map(|(n, w)| (n, w.dtype())).collect::<Vec<_>>();
    assert_eq!(names(&model), names(&float_head));
    // Its logits are the quantized head's: they move, a little.
    let (a, b) = (logits(&model, &prompt), logits(&float_head, &prompt));
    let d = max_diff(&a, &b);
    assert!(d > 1e-4 && d < 0.5, "int8 vs float head logits differ by {d}");
    let worst = runtime_follows_the_dequantized_reference(model, &prompt, 32, W8A8_TOL);
    eprintln!("int8 head: logits within {worst}");
}
