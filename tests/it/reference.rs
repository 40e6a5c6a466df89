//! Our f32 forward pass against an independent numpy implementation reading the same GGUF
//! (`tests/fixtures/make_reference_logits.py`): logits within 1e-3, greedy continuations equal.
//! The numpy forward applies RoPE to adjacent pairs on the GGUF's own Q/K layout, so these tests
//! also prove our un-permutation of Q/K into the Hugging Face layout.

use lacuna_model::KvCache;
use lacuna_model::generate::{GenerateParams, generate};
use lacuna_tests::{fixtures_dir, read_f32, smollm2};
use serde_json::Value;

/// Max |a − b| allowed between our logits and the reference's: both are f32 computations that
/// sum in different orders over 30 layers; the reference's own two codings differ by ~5e-5.
const LOGIT_TOL: f32 = 1e-3;
const GREEDY_TOKENS: usize = 32;

fn reference() -> Value {
    let p = fixtures_dir().join("reference_smollm2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("reference.json")).expect("valid JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn logits_match_numpy_reference() {
    let ck = smollm2();
    let r = reference();
    let cfg = ck.model.config();
    for (pi, p) in r["prompts"].as_array().expect("prompts").iter().enumerate() {
        let prompt = ids(&p["ids"]);
        let mut cache = KvCache::new(cfg, prompt.len());
        let hidden = ck.model.forward(&prompt, &mut cache).unwrap();
        let logits = ck.model.logits(&hidden, prompt.len()).unwrap();
        let v = cfg.vocab_size;
        let last = &logits[(prompt.len() - 1) * v..];
        let want = read_f32(&fixtures_dir().join("reference_smollm2").join(p["logits_last_file"].as_str().unwrap()));
        let d = max_abs_diff(last, &want);
        assert!(d <= LOGIT_TOL, "prompt {pi}: last-position logits differ by {d}");
        if let Some(f) = p["logits_all_positions_file"].as_str() {
            let all = read_f32(&fixtures_dir().join("reference_smollm2").join(f));
            let width = all.len() / prompt.len();
            for t in 0..prompt.len() {
                let d = max_abs_diff(&logits[t * v..t * v + width], &all[t * width..(t + 1) * width]);
                assert!(d <= LOGIT_TOL, "prompt {pi} position {t}: logits differ by {d}");
            }
        }
        // The per-position argmax the reference recorded.
        for (t, pos) in p["per_position"].as_array().unwrap().iter().enumerate() {
            let row = &logits[t * v..(t + 1) * v];
            let ours = lacuna_model::sampling::argmax(row);
            let theirs = pos["argmax"].as_u64().unwrap() as usize;
            // A near-tie may flip within tolerance; otherwise the argmax must agree.
            let gap = (row[ours] - row[theirs]).abs();
            assert!(ours == theirs || gap <= LOGIT_TOL, "prompt {pi} position {t}: argmax {ours} vs {theirs}");
        }
    }
}

#[test]
fn greedy_continuations_match_numpy_reference() {
    let ck = smollm2();
    let r = reference();
    for (pi, p) in r["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&p["ids"]);
        let want = ids(&p["greedy_continuation_ids"]);
        // The reference does not stop at EOS, so neither do we here.
        let params = GenerateParams { max_new_tokens: GREEDY_TOKENS, ignore_eos: true, ..Default::default() };
        let g = generate(&ck.model, &ck.tokenizer, &prompt, &params, |_| {}).unwrap();
        assert_eq!(g.ids, want[..GREEDY_TOKENS], "prompt {pi}: greedy continuation differs");
    }
}

#[test]
fn kv_cached_decode_equals_full_recompute() {
    let ck = smollm2();
    let cfg = ck.model.config();
    let prompt = ids(&reference()["prompts"][3]["ids"]);
    let mut full = KvCache::new(cfg, prompt.len());
    let h_full = ck.model.forward(&prompt, &mut full).unwrap();
    let mut inc = KvCache::new(cfg, prompt.len());
    let h = cfg.hidden_size;
    ck.model.forward(&prompt[..prompt.len() - 3], &mut inc).unwrap();
    for (i, t) in prompt[prompt.len() - 3..].iter().enumerate() {
        let hi = ck.model.forward(&[*t], &mut inc).unwrap();
        let row = prompt.len() - 3 + i;
        let d = max_abs_diff(&hi, &h_full[row * h..(row + 1) * h]);
        assert!(d < 1e-4, "position {row}: cached step differs from full recompute by {d}");
    }
    assert!(ck.model.forward(&[1], &mut inc).is_err(), "a full cache must refuse another token");
}

#[test]
fn layer_by_layer_calibration_path_equals_forward() {
    use lacuna_model::{LinearInput, LinearKind};
    let ck = smollm2();
    let cfg = ck.model.config();
    let prompt = ids(&reference()["prompts"][1]["ids"]);
    let mut cache = KvCache::new(cfg, prompt.len());
    let want = ck.model.forward(&prompt, &mut cache).unwrap();
    let mut x = ck.model.embed(&prompt).unwrap();
    let mut seen = Vec::new();
    for l in 0..ck.model.num_layers() {
        ck.model
            .layer_forward(l, &mut x, &mut |input, act| {
                let width = match input {
                    LinearInput::MlpActivation => cfg.intermediate_size,
                    LinearInput::AttentionOutput => cfg.q_dim(),
                    _ => cfg.hidden_size,
                };
                assert_eq!(act.len(), prompt.len() * width, "{input:?}");
                seen.push(input);
            })
            .unwrap();
    }
    assert_eq!(seen.len(), 4 * cfg.num_hidden_layers);
    // Every linear sublayer's input kind is observed in each layer.
    for k in LinearKind::ALL {
        assert!(seen.contains(&k.input()));
    }
    // Final norm by hand: the last layer's output, normed, must equal forward()'s output exactly.
    let h = cfg.hidden_size;
    let norm = ck.model.tensors().into_iter().find(|(n, _)| n == "model.norm.weight").unwrap().1.to_f32_vec();
    for t in 0..prompt.len() {
        let row = &x[t * h..(t + 1) * h];
        let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / h as f32 + cfg.rms_norm_eps as f32).sqrt();
        for j in 0..h {
            assert_eq!(row[j] * inv * norm[j], want[t * h + j], "token {t} dim {j}");
        }
    }
}
