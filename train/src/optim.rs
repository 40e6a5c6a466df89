//! AdamW with decoupled weight decay, linear warmup + cosine decay, global gradient-norm clipping,
//! and the frozen sparsity masks of Algorithm 1.

use candle_core::{DType, Tensor, Var};
use lacuna_api::OptimizerSpec;

use crate::llama::TrainLlama;
use crate::{Error, Result};

/// The learning rate of optimizer step `step` (0-based) of `steps`: linear warmup from
/// `lr / warmup` to `lr` over `warmupSteps`, then a cosine from `lr` down to `lr · minLrRatio`.
pub fn learning_rate(spec: &OptimizerSpec, step: u64, steps: u64) -> f64 {
    let lr = spec.learning_rate;
    let w = spec.warmup_steps;
    if step < w {
        return lr * (step + 1) as f64 / w as f64;
    }
    let span = steps.saturating_sub(w).max(1) as f64;
    let progress = ((step - w) as f64 / span).min(1.0);
    let min = lr * spec.min_lr_ratio;
    min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// One frozen mask per prunable linear: 1 where the weight may be non-zero, 0 where it is pruned.
pub struct Mask {
    /// Index into the model's parameters.
    pub param: usize,
    pub name: String,
    /// f32 0/1, the weight's shape.
    pub keep: Tensor,
    /// Pruned entries (zeros of `keep`).
    pub pruned: usize,
    pub numel: usize,
}

impl Mask {
    pub fn sparsity(&self) -> f64 {
        self.pruned as f64 / self.numel.max(1) as f64
    }
}

/// Masks from the zeros of every prunable linear of `model` (what one-shot pruning left).
pub fn masks_from_zeros(model: &TrainLlama) -> Result<Vec<Mask>> {
    model.prunable().into_iter().map(|i| mask_of(model, i)).collect()
}

/// The mask of parameter `i` from its current zeros.
pub fn mask_of(model: &TrainLlama, i: usize) -> Result<Mask> {
    let w = model.params()[i].as_tensor();
    let keep = w.ne(0f32)?.to_dtype(DType::F32)?;
    let numel = w.elem_count();
    let kept = keep.sum_all()?.to_scalar::<f32>()? as usize;
    Ok(Mask { param: i, name: model.names()[i].clone(), keep, pruned: numel - kept, numel })
}

/// Checks that given masks fit the model: one per named prunable weight, shapes equal.
pub fn check_masks(model: &TrainLlama, masks: &[Mask]) -> Result<()> {
    for m in masks {
        let shape = &model.shapes()[m.param];
        if m.keep.dims() != shape.as_slice() || model.names()[m.param] != m.name {
            return Err(Error::Mask {
                name: m.name.clone(),
                msg: format!("mask shape {:?} disagrees with the weight's {:?}", m.keep.dims(), shape),
            });
        }
    }
    Ok(())
}

/// Verifies, exactly, that every masked weight is 0 and that each layer's count of zeros is the
/// mask's (the per-layer sparsity is unchanged).
pub fn verify_sparsity(model: &TrainLlama, masks: &[Mask]) -> Result<()> {
    for m in masks {
        let w = model.params()[m.param].as_tensor();
        let zeros = w.eq(0f32)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
        let leaked = (w * (1.0 - &m.keep)?)?.ne(0f32)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
        if leaked != 0 || zeros != m.pruned {
            return Err(Error::Mask {
                name: m.name.clone(),
                msg: format!(
                    "sparsity changed: {zeros} zeros where the mask prunes {} ({leaked} pruned weights became non-zero)",
                    m.pruned
                ),
            });
        }
    }
    Ok(())
}

/// AdamW (Loshchilov & Hutter): `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `w ← w − lr·(m̂ / (√v̂ + ε) + λ·w)` with bias-corrected `m̂`, `v̂`. Weight decay applies to
/// matrices only (linears, embedding), not to norm gains.
pub struct AdamW {
    pub spec: OptimizerSpec,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Steps taken (the bias correction's t).
    pub t: u64,
    decay: Vec<bool>,
}

impl AdamW {
    pub fn new(spec: &OptimizerSpec, params: &[Var]) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        Ok(Self {
            spec: spec.clone(),
            m: params.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: params.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            t: 0,
            decay: params.iter().map(|p| p.as_tensor().rank() >= 2).collect(),
        })
    }

    /// One update of every parameter with `grads` (already masked and clipped) at `lr`.
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let s = &self.spec;
        let (b1, b2) = (s.beta1, s.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let m = (self.m[i].affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            let v = (self.v[i].affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let upd = (m.affine(1.0 / c1, 0.0)? / (v.affine(1.0 / c2, 0.0)?.sqrt()? + s.eps)?)?;
            let w = p.as_tensor();
            let decayed = if self.decay[i] && s.weight_decay > 0.0 {
                w.affine(1.0 - lr * s.weight_decay, 0.0)?
            } else {
                w.clone()
            };
            p.set(&(decayed - upd.affine(lr, 0.0)?)?)?;
            // Detached: moments built from tracked gradients would otherwise hold every step's
            // graph (and activations) alive through the chain m_t → m_{t-1} → ….
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }

    /// Checks that the moments of every pruned weight are exactly zero.
    pub fn verify_masked_moments(&self, masks: &[Mask]) -> Result<()> {
        for mk in masks {
            let pruned = (1.0 - &mk.keep)?;
            for (what, t) in [("first", &self.m[mk.param]), ("second", &self.v[mk.param])] {
                let leaked = (t * &pruned)?.ne(0f32)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
                if leaked != 0.0 {
                    return Err(Error::Mask {
                        name: mk.name.clone(),
                        msg: format!("{leaked} pruned entries have a non-zero {what} Adam moment"),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The global L2 norm of `grads`, and the factor clipping to `max_norm` applies (1 when under it
/// or when `max_norm` is 0).
pub fn clip_factor(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let mut sq = 0f64;
    for g in grads {
        sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    let factor = if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
    Ok((norm, factor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor() {
        let spec = OptimizerSpec { learning_rate: 1.0, min_lr_ratio: 0.1, warmup_steps: 4, ..Default::default() };
        assert!((learning_rate(&spec, 0, 104) - 0.25).abs() < 1e-12);
        assert!((learning_rate(&spec, 3, 104) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&spec, 4, 104) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&spec, 54, 104) - 0.55).abs() < 1e-12, "half-way is the mean of lr and floor");
        assert!((learning_rate(&spec, 104, 104) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign_plus_decay() {
        let d = candle_core::Device::Cpu;
        let p = Var::new(&[[1f32, -2.]], &d).unwrap();
        let spec = OptimizerSpec { weight_decay: 0.5, eps: 1e-12, ..Default::default() };
        let mut opt = AdamW::new(&spec, std::slice::from_ref(&p)).unwrap();
        let g = Tensor::new(&[[0.3f32, -4.]], &d).unwrap();
        opt.step(std::slice::from_ref(&p), &[g], 0.1).unwrap();
        // Step 1: m̂ = g, v̂ = g² → update sign(g); decay w·(1 − lr·λ).
        let got = p.as_tensor().to_vec2::<f32>().unwrap();
        let want = [1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1];
        for (a, b) in got[0].iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
