//! Decode speed on a CUDA device: a synthetic Llama-2-7B-shaped model (random f16 weights) dense,
//! and the same weights pruned by magnitude per row to `--sparsity` (default 0.7) in bitmask form.
//! For speed only: random weights generate nothing meaningful. Prints one JSON line per model and
//! one comparing them with the byte bound (dense bytes / bitmask bytes per token).
//!
//!   cargo run --release -p lacuna-gpu --example decode_bench -- [--layers 32] [--sparsity 0.7] [--steps 64] [--batch 1]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use half::f16;
use lacuna_gpu::{Gpu, GpuLlama};
use lacuna_kernels::bitmask::BitmaskMatrix;
use lacuna_model::weights::{Data, Storage, Weight};
use lacuna_model::{Llama, LlamaConfig};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: cannot parse {v}")))
        .unwrap_or(default)
}

fn llama2_7b(layers: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 32000,
        hidden_size: 4096,
        intermediate_size: 11008,
        num_hidden_layers: layers,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        head_dim: 128,
        max_position_embeddings: 4096,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        torch_dtype: Some("float16".into()),
    }
}

/// Random N(0, 0.02)-like values (uniform with the same standard deviation), rows in parallel.
fn random_rows(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; rows * cols];
    let a = 0.02 * 3f32.sqrt();
    v.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        row.iter_mut().for_each(|x| *x = rng.random_range(-a..a));
    });
    v
}

/// Zeroes the `sparsity` share of smallest-magnitude values of every row.
fn magnitude_prune(v: &mut [f32], cols: usize, sparsity: f64) {
    let k = (cols as f64 * sparsity).round() as usize;
    v.par_chunks_mut(cols).for_each(|row| {
        if k == 0 {
            return;
        }
        let mut mags: Vec<f32> = row.iter().map(|x| x.abs()).collect();
        let (_, t, _) = mags.select_nth_unstable_by(k - 1, |a, b| a.total_cmp(b));
        let t = *t;
        let mut dropped = 0;
        for x in row.iter_mut() {
            if x.abs() <= t && dropped < k {
                *x = 0.0;
                dropped += 1;
            }
        }
    });
}

fn weight(rows: usize, cols: usize, seed: u64, sparsity: Option<f64>) -> Weight {
    let mut v = random_rows(rows, cols, seed);
    match sparsity {
        None => {
            Weight::new(vec![rows, cols], Data::F16(Storage::Owned(v.par_iter().map(|x| f16::from_f32(*x)).collect())))
        }
        Some(s) => {
            magnitude_prune(&mut v, cols, s);
            // f32 values are uploaded as f16: an f16 bitmask matrix on the device.
            let m = BitmaskMatrix::from_dense(&v, rows, cols).expect("shape");
            Weight::new(vec![rows, cols], Data::BitmaskF32(Arc::new(m)))
        }
    }
    .expect("weight")
}

fn model(c: &LlamaConfig, sparsity: Option<f64>) -> Llama {
    let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let mut t = BTreeMap::new();
    t.insert("model.embed_tokens.weight".to_owned(), weight(v, h, 1, None));
    t.insert("lm_head.weight".to_owned(), weight(v, h, 2, None));
    t.insert("model.norm.weight".to_owned(), Weight::from_f32(vec![h], vec![1.0; h]).unwrap());
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let s = 100 + i as u64 * 16;
        for (name, rows, cols, k) in [
            ("self_attn.q_proj", h, h, 0),
            ("self_attn.k_proj", h, h, 1),
            ("self_attn.v_proj", h, h, 2),
            ("self_attn.o_proj", h, h, 3),
            ("mlp.gate_proj", f, h, 4),
            ("mlp.up_proj", f, h, 5),
            ("mlp.down_proj", h, f, 6),
        ] {
            t.insert(format!("{p}.{name}.weight"), weight(rows, cols, s + k, sparsity));
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{n}.weight"), Weight::from_f32(vec![h], vec![1.0; h]).unwrap());
        }
    }
    Llama::load(c.clone(), t, Path::new("synthetic-llama-2-7b")).expect("model")
}

/// Median decode tokens per second over `rounds` runs of `steps` steps of `batch` sequences.
fn measure(g: &mut GpuLlama, batch: usize, steps: usize) -> f64 {
    let mut rates = Vec::new();
    for _round in 0..3 {
        for s in 0..batch {
            g.reset(s);
        }
        let tokens: Vec<(usize, u32)> = (0..batch).map(|s| (s, 1 + s as u32)).collect();
        g.step(&tokens).expect("warm-up step");
        g.gpu().synchronize().expect("sync");
        let t0 = Instant::now();
        for _ in 0..steps {
            g.step(&tokens).expect("step"); // downloads the logits: synchronous per step
        }
        rates.push((steps * batch) as f64 / t0.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn main() {
    let layers: usize = arg("--layers", 32);
    let sparsity: f64 = arg("--sparsity", 0.7);
    let steps: usize = arg("--steps", 64);
    let batch: usize = arg("--batch", 1);
    let c = llama2_7b(layers);
    let mut results = Vec::new();
    for (label, s) in [("dense-f16", None), ("bitmask-f16", Some(sparsity))] {
        let t0 = Instant::now();
        let m = model(&c, s);
        let built = t0.elapsed().as_secs_f64();
        let gpu = Gpu::new(0).unwrap_or_else(|e| {
            eprintln!("decode_bench: {e}");
            std::process::exit(2)
        });
        let device = gpu.name().to_owned();
        let mut g = GpuLlama::load(gpu, &m, batch, steps + 8).expect("upload");
        drop(m);
        let bytes = g.weight_bytes_per_token();
        let tps = measure(&mut g, batch, steps);
        let gbs = bytes as f64 * tps / batch as f64 / 1e9;
        println!(
            "{{\"model\":\"{label}\",\"device\":\"{device}\",\"layers\":{layers},\"batch\":{batch},\"build_seconds\":{built:.1},\
             \"weight_bytes_per_step\":{bytes},\"decode_tokens_per_second\":{tps:.2},\"weight_gb_per_second\":{gbs:.1}}}"
        );
        results.push((bytes, tps));
    }
    let (db, dt) = results[0];
    let (sb, st) = results[1];
    let speedup = st / dt;
    let bound = db as f64 / sb as f64;
    println!(
        "{{\"sparsity\":{sparsity},\"speedup\":{speedup:.3},\"byte_bound\":{bound:.3},\"fraction_of_bound\":{:.3},\
         \"paper_target_speedup\":1.7,\"target_fraction_of_bound\":0.8}}",
        speedup / bound
    );
}
