//! The KV cache: keys and values of every layer for the positions a sequence has seen.
//!
//! Decode attention reads all of them once per token (27 MB at 600 positions for SmolLM2 in f32,
//! a tenth of a 70 %-sparse model's weights), so the cache can hold them as f16: rounded once when
//! written, widened in registers when read (llama.cpp's default). Both forward passes, the
//! reference one in [`crate::llama`] and the batched runtime, see the same rounded values.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::config::LlamaConfig;
use crate::{Error, Result};

/// How a KV cache stores keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// Exact: what the model computed.
    #[default]
    F32,
    /// Half the bytes per position; keys and values rounded to f16 (relative error ≤ 2⁻¹¹).
    F16,
}

impl KvDtype {
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }
    /// Bytes one cached value takes.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            other => Err(Error::Invalid(format!("unknown KV cache type `{other}` (expected f32 or f16)"))),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One layer's keys and values, `[capacity, kv_dim]` each, in the cache's element type.
enum Layer {
    F32 { k: Vec<f32>, v: Vec<f32> },
    F16 { k: Vec<f16>, v: Vec<f16> },
}

/// One layer's keys and values as stored, for the attention kernels.
pub(crate) enum LayerView<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [f16], &'a [f16]),
}

impl Layer {
    fn new(dtype: KvDtype, n: usize) -> Self {
        match dtype {
            KvDtype::F32 => Layer::F32 { k: vec![0.0; n], v: vec![0.0; n] },
            KvDtype::F16 => Layer::F16 { k: vec![f16::ZERO; n], v: vec![f16::ZERO; n] },
        }
    }
    fn resize(&mut self, n: usize) {
        match self {
            Layer::F32 { k, v } => [k, v].into_iter().for_each(|r| r.resize(n, 0.0)),
            Layer::F16 { k, v } => [k, v].into_iter().for_each(|r| r.resize(n, f16::ZERO)),
        }
    }
    fn bytes(&self) -> [&[u8]; 2] {
        match self {
            Layer::F32 { k, v } => [bytemuck::cast_slice(k), bytemuck::cast_slice(v)],
            Layer::F16 { k, v } => [bytemuck::cast_slice(k), bytemuck::cast_slice(v)],
        }
    }
}

// The slice conversions of `half` take F16C's 4- and 8-lane instructions where the CPU has them
// (one value at a time, the conversions of a 512-token prefill took 5% of it).
fn to_f16(dst: &mut [f16], src: &[f32]) {
    dst.convert_from_f32_slice(src);
}

fn to_f32(dst: &mut [f32], src: &[f16]) {
    src.convert_to_f32_slice(dst);
}

/// Rounds `x` to what a cache of `dtype` returns for it, so that the reference path's attention
/// over the positions it has just written sees what a later decode step reads back.
pub(crate) fn round_through(dtype: KvDtype, x: &mut [f32]) {
    if dtype == KvDtype::F16 {
        let mut h = [f16::ZERO; 256];
        for c in x.chunks_mut(256) {
            let h = &mut h[..c.len()];
            to_f16(h, c);
            to_f32(c, h);
        }
    }
}

/// Keys and values of every layer for the positions seen so far, `[capacity, kv_dim]` per layer.
pub struct KvCache {
    layers: Vec<Layer>,
    pub(crate) len: usize,
    capacity: usize,
    kv_dim: usize,
    dtype: KvDtype,
}

impl KvCache {
    /// An f32 cache for up to `capacity` positions (allocated up front: no allocation per token).
    pub fn new(config: &LlamaConfig, capacity: usize) -> Self {
        Self::with_dtype(config, capacity, KvDtype::F32)
    }

    /// A cache of `dtype` values for up to `capacity` positions.
    pub fn with_dtype(config: &LlamaConfig, capacity: usize, dtype: KvDtype) -> Self {
        let kv_dim = config.kv_dim();
        let layers = (0..config.num_hidden_layers).map(|_| Layer::new(dtype, capacity * kv_dim)).collect();
        let cache = Self { layers, len: 0, capacity, kv_dim, dtype };
        cache.prefer_huge_pages();
        cache
    }
    /// Decode attention streams every cached position of every layer per token (tens of MB at
    /// a few hundred positions): on 2 MiB pages, as the weights are.
    fn prefer_huge_pages(&self) {
        lacuna_kernels::pages::prefer_huge_pages(self.layers.iter().flat_map(Layer::bytes));
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// Bytes decode attention reads per step with `positions` cached (keys and values, every layer).
    pub fn bytes_per_step(config: &LlamaConfig, dtype: KvDtype, positions: usize) -> usize {
        2 * config.num_hidden_layers * positions * config.kv_dim() * dtype.bytes()
    }
    /// Grows the cache to hold `capacity` positions, keeping the ones it holds (a no-op when it is
    /// already that large): a server can start a sequence small and grow it as it generates.
    pub fn grow(&mut self, capacity: usize) {
        if capacity <= self.capacity {
            return;
        }
        for layer in &mut self.layers {
            layer.resize(capacity * self.kv_dim);
        }
        self.capacity = capacity;
        self.prefer_huge_pages();
    }

    /// Checks that this cache fits a model of `config` and `n` more positions.
    pub(crate) fn check(&self, config: &LlamaConfig, n: usize) -> Result<()> {
        if self.kv_dim != config.kv_dim() || self.layers.len() != config.num_hidden_layers {
            return Err(Error::Invalid("KV cache was made for another model".into()));
        }
        if self.len + n > self.capacity {
            return Err(Error::Invalid(format!(
                "{} positions exceed the KV cache capacity of {}",
                self.len + n,
                self.capacity
            )));
        }
        Ok(())
    }

    /// Stores the key and value rows of position `pos` in layer `li` (rounded for an f16 cache).
    pub(crate) fn write(&mut self, li: usize, pos: usize, kr: &[f32], vr: &[f32]) {
        let r = pos * self.kv_dim..(pos + 1) * self.kv_dim;
        match &mut self.layers[li] {
            Layer::F32 { k, v } => {
                k[r.clone()].copy_from_slice(kr);
                v[r].copy_from_slice(vr);
            }
            Layer::F16 { k, v } => {
                to_f16(&mut k[r.clone()], kr);
                to_f16(&mut v[r], vr);
            }
        }
    }

    /// Runs `f` on layer `li`'s keys and values as f32 rows `[≥ len + n, kv_dim]`, `f` writing
    /// positions `len..len + n`: the cache itself when it is f32, else a widened copy whose new
    /// positions are stored back (rounded) afterwards. The reference forward pass runs on this.
    pub(crate) fn with_f32_layer<R>(&mut self, li: usize, n: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
        let (old, new) = (self.len * self.kv_dim, (self.len + n) * self.kv_dim);
        match &mut self.layers[li] {
            Layer::F32 { k, v } => f(k, v),
            Layer::F16 { k, v } => {
                let (mut kf, mut vf) = (vec![0f32; new], vec![0f32; new]);
                to_f32(&mut kf[..old], &k[..old]);
                to_f32(&mut vf[..old], &v[..old]);
                let r = f(&mut kf, &mut vf);
                to_f16(&mut k[old..new], &kf[old..]);
                to_f16(&mut v[old..new], &vf[old..]);
                r
            }
        }
    }

    /// Layer `li` as stored, for the attention kernels.
    pub(crate) fn layer(&self, li: usize) -> LayerView<'_> {
        match &self.layers[li] {
            Layer::F32 { k, v } => LayerView::F32(k, v),
            Layer::F16 { k, v } => LayerView::F16(k, v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 16,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            max_position_embeddings: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            rope_scaling: None,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
            torch_dtype: None,
        }
    }

    /// Values that f16 cannot hold exactly, so that rounding shows.
    fn row(seed: f32) -> Vec<f32> {
        (0..4).map(|i| seed + 0.1 + i as f32 / 3.0).collect()
    }

    #[test]
    fn f16_caches_round_once_and_f32_caches_keep_every_bit() {
        let c = config();
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut cache = KvCache::with_dtype(&c, 2, dtype);
            cache.write(1, 0, &row(1.0), &row(2.0));
            cache.len = 1;
            cache.grow(8);
            assert_eq!((cache.capacity(), cache.dtype()), (8, dtype));
            let k = cache.with_f32_layer(1, 0, |k, _| k[..4].to_vec());
            let mut want = row(1.0);
            round_through(dtype, &mut want);
            assert_eq!(k, want, "{dtype}: the row written is read back as the cache rounds it");
            assert_eq!(k == row(1.0), dtype == KvDtype::F32);
            // The reference pass writes position 1 through an f32 view; it lands in the cache.
            cache.with_f32_layer(1, 1, |kf, vf| {
                assert_eq!(&kf[..4], &want[..], "{dtype}: the f32 view holds the cached positions");
                kf[4..8].copy_from_slice(&row(3.0));
                vf[4..8].copy_from_slice(&row(4.0));
            });
            cache.len = 2;
            let v = cache.with_f32_layer(1, 0, |_, v| v[..8].to_vec());
            let mut want = row(4.0);
            round_through(dtype, &mut want);
            assert_eq!(&v[4..], &want[..]);
            match (dtype, cache.layer(1)) {
                (KvDtype::F32, LayerView::F32(k, _)) => assert_eq!(k.len(), 8 * 4),
                (KvDtype::F16, LayerView::F16(k, _)) => assert_eq!(k.len(), 8 * 4),
                _ => panic!("{dtype}: the layer view has another element type"),
            }
        }
    }

    #[test]
    fn sizes_and_names() {
        let c = config();
        assert_eq!(KvCache::bytes_per_step(&c, KvDtype::F16, 10), 2 * 2 * 10 * 4 * 2);
        assert_eq!("f16".parse::<KvDtype>().unwrap(), KvDtype::F16);
        let e = "f8".parse::<KvDtype>().unwrap_err().to_string();
        assert!(e.contains("`f8`") && e.contains("f16"), "{e}");
        let mut cache = KvCache::new(&c, 4);
        assert!(cache.check(&c, 4).is_ok());
        cache.len = 1;
        assert!(cache.check(&c, 4).unwrap_err().to_string().contains("capacity of 4"));
        let other = LlamaConfig { num_hidden_layers: 3, ..c };
        assert!(cache.check(&other, 1).unwrap_err().to_string().contains("another model"));
    }
}
