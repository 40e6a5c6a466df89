//! Tiny random Llamas for tests (of this crate and of the workspace's integration tests).

use std::collections::BTreeMap;
use std::path::Path;

use lacuna_model::weights::Weight;
use lacuna_model::{LinearKind, Llama, LlamaConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Result;

/// A Llama config of the given size (RoPE θ 10⁴, no scaling, eps 1e-5).
pub fn tiny_config(
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    tied: bool,
) -> LlamaConfig {
    LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: 2 * hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: hidden / heads,
        max_position_embeddings: 2048,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_ids: vec![0],
        torch_dtype: Some("float32".into()),
    }
}

/// Random weights for `config` (N(0, 0.2²)-ish uniform, norm gains around 1), seeded; each
/// prunable linear gets `sparsity` of its entries set to exactly zero (random positions).
pub fn tiny_llama(config: &LlamaConfig, seed: u64, sparsity: f64) -> Result<Llama> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c = config;
    let (h, q, kv, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let mut t = BTreeMap::new();
    let rand = |shape: Vec<usize>, prune: f64, around: f32, rng: &mut ChaCha8Rng| -> Result<Weight> {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| if rng.random::<f64>() < prune { 0.0 } else { around + rng.random_range(-0.35f32..0.35) })
            .collect();
        Ok(Weight::from_f32(shape, v)?)
    };
    t.insert("model.embed_tokens.weight".to_owned(), rand(vec![c.vocab_size, h], 0.0, 0.0, &mut rng)?);
    for b in 0..c.num_hidden_layers {
        let p = format!("model.layers.{b}");
        t.insert(format!("{p}.input_layernorm.weight"), rand(vec![h], 0.0, 1.0, &mut rng)?);
        t.insert(format!("{p}.post_attention_layernorm.weight"), rand(vec![h], 0.0, 1.0, &mut rng)?);
        for k in LinearKind::ALL {
            let shape = match k {
                LinearKind::Q => vec![q, h],
                LinearKind::K | LinearKind::V => vec![kv, h],
                LinearKind::O => vec![h, q],
                LinearKind::Gate | LinearKind::Up => vec![f, h],
                LinearKind::Down => vec![h, f],
            };
            t.insert(format!("{p}.{}.weight", k.hf_name()), rand(shape, sparsity, 0.0, &mut rng)?);
        }
    }
    t.insert("model.norm.weight".to_owned(), rand(vec![h], 0.0, 1.0, &mut rng)?);
    if !c.tie_word_embeddings {
        t.insert("lm_head.weight".to_owned(), rand(vec![c.vocab_size, h], 0.0, 0.0, &mut rng)?);
    }
    Ok(Llama::load(config.clone(), t, Path::new("tiny"))?)
}
