//! AdamW with decoupled weight decay, linear warmup + cosine decay, global gradient-norm clipping,
//! and the frozen sparsity masks of Algorithm 1.

use candle_core::{DType, Tensor, Var};
use lacuna_api::OptimizerSpec;

use crate::linear::{is_f32_cpu, slice, slice_mut};
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
    let w = model.dense_param(i)?;
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
        // A packed weight expanded: its pruned entries are structurally zero, and a kept entry
        // that became exactly zero still changes the count.
        let w = model.dense_param(m.param)?;
        let zeros = w.eq(0f32)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
        let leaked = (&w * (1.0 - &m.keep)?)?.ne(0f32)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
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

    /// Moments for `model`'s parameters as they are stored now (decay on its matrices).
    pub fn for_model(spec: &OptimizerSpec, model: &TrainLlama) -> Result<Self> {
        let mut opt = Self::new(spec, model.params())?;
        opt.decay = (0..model.params().len()).map(|i| model.is_matrix(i)).collect();
        Ok(opt)
    }

    /// One update of every parameter with `grads` (already masked and clipped) at `lr`.
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(params, grads, 1.0, lr)
    }

    /// One update with the gradients `scale · grads` (the clipping factor, applied on the fly).
    pub fn step_scaled(&mut self, params: &[Var], grads: &[Tensor], scale: f64, lr: f64) -> Result<()> {
        self.t += 1;
        let s = &self.spec;
        let (b1, b2) = (s.beta1, s.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let decay = if self.decay[i] { s.weight_decay } else { 0.0 };
            if fused_step(p.as_tensor(), &self.m[i], &self.v[i], g, [b1, b2, c1, c2, s.eps, lr, decay, scale])? {
                continue;
            }
            let scaled;
            let g = if scale == 1.0 {
                g
            } else {
                scaled = g.affine(scale, 0.0)?;
                &scaled
            };
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
    pub fn verify_masked_moments(&self, model: &TrainLlama, masks: &[Mask]) -> Result<()> {
        for mk in masks {
            let pruned = (1.0 - &mk.keep)?;
            for (what, t) in [("first", &self.m[mk.param]), ("second", &self.v[mk.param])] {
                let t = model.dense_like(mk.param, t)?;
                let leaked = (&t * &pruned)?.ne(0f32)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
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

/// `Σ x²` in f64: f32 CPU tensors in place (chunk sums in a fixed order, whatever the threads),
/// others through tensor ops.
fn sum_squares(t: &Tensor) -> Result<f64> {
    use rayon::prelude::*;
    if is_f32_cpu(t) {
        let (st, l) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(c) = &*st {
            let parts: Vec<f64> = slice::<f32>(c, l, "gradient")?
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum())
                .collect();
            return Ok(parts.iter().sum());
        }
    }
    Ok(t.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// AdamW's update of one f32 CPU parameter in place, in two passes over memory and no allocation:
/// the moments (`m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`), then the weights
/// (`w ← w·(1 − lr·λ) − lr·(m/c₁) / (√(v/c₂) + ε)`). On a 135M-parameter model the same update as
/// tensor ops made a dozen full-size temporaries (each a fresh, page-faulted half gigabyte) and
/// took a tenth of a training step. Returns false (nothing done) for other dtypes and devices,
/// which take the tensor-op path.
fn fused_step(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, k: [f64; 8]) -> Result<bool> {
    if ![p, m, v, g].into_iter().all(is_f32_cpu) || [m, v, g].iter().any(|t| t.dims() != p.dims()) {
        return Ok(false);
    }
    let [b1, b2, c1, c2, eps, lr, decay, scale] = k;
    let scale = scale as f32;
    m.inplace_op2(g, &Moment { beta: b1 as f32, scale, square: false })?;
    v.inplace_op2(g, &Moment { beta: b2 as f32, scale, square: true })?;
    let apply = Apply {
        inv_c1: (1.0 / c1) as f32,
        inv_c2: (1.0 / c2) as f32,
        eps: eps as f32,
        lr: lr as f32,
        keep: (1.0 - lr * decay) as f32,
    };
    p.inplace_op3(m, v, &apply)?;
    Ok(true)
}

/// Elements per parallel task of the fused update.
const CHUNK: usize = 1 << 16;

/// `t ← t ⊙ keep` in place for f32 CPU tensors of one shape (a mask applied without a full-size
/// temporary); other tensors get `t ⊙ keep` as a new tensor.
pub fn mask_in_place(t: &Tensor, keep: &Tensor) -> Result<Option<Tensor>> {
    if is_f32_cpu(t) && is_f32_cpu(keep) && t.dims() == keep.dims() {
        t.inplace_op2(keep, &MaskOp)?;
        return Ok(None);
    }
    Ok(Some((t * keep)?))
}

struct MaskOp;

impl candle_core::InplaceOp2 for MaskOp {
    fn name(&self) -> &'static str {
        "mask"
    }
    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        k: &candle_core::CpuStorage,
        kl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (t, k) = (slice_mut(dst, dst_l, "masked tensor")?, slice::<f32>(k, kl, "mask")?);
        t.par_chunks_mut(CHUNK)
            .zip(k.par_chunks(CHUNK))
            .for_each(|(t, k)| t.iter_mut().zip(k).for_each(|(t, k)| *t *= k));
        Ok(())
    }
}

/// `m ← β·m + (1 − β)·(scale·g)` (or its square), in place.
struct Moment {
    beta: f32,
    scale: f32,
    square: bool,
}

impl candle_core::InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }
    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        g: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (m, g) = (slice_mut(dst, dst_l, "AdamW moment")?, slice::<f32>(g, gl, "gradient")?);
        let (b, a, k) = (self.beta, 1.0 - self.beta, self.scale);
        m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(m, g)| {
            if self.square {
                m.iter_mut().zip(g).for_each(|(m, g)| *m = b * *m + a * ((k * g) * (k * g)));
            } else {
                m.iter_mut().zip(g).for_each(|(m, g)| *m = b * *m + a * (k * g));
            }
        });
        Ok(())
    }
}

/// `w ← w·keep − lr·(m·inv_c1) / (√(v·inv_c2) + ε)`, in place.
struct Apply {
    inv_c1: f32,
    inv_c2: f32,
    eps: f32,
    lr: f32,
    keep: f32,
}

impl candle_core::InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "adamw-apply"
    }
    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        m: &candle_core::CpuStorage,
        ml: &candle_core::Layout,
        v: &candle_core::CpuStorage,
        vl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (w, m, v) = (
            slice_mut(dst, dst_l, "weight")?,
            slice::<f32>(m, ml, "AdamW moment")?,
            slice::<f32>(v, vl, "AdamW moment")?,
        );
        w.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(|((w, m), v)| {
            for ((w, m), v) in w.iter_mut().zip(m).zip(v) {
                let upd = (m * self.inv_c1) / ((v * self.inv_c2).sqrt() + self.eps);
                *w = *w * self.keep - self.lr * upd;
            }
        });
        Ok(())
    }
}

/// The global L2 norm of `grads`, and the factor clipping to `max_norm` applies (1 when under it
/// or when `max_norm` is 0).
pub fn clip_factor(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let mut sq = 0f64;
    for g in grads {
        sq += sum_squares(g)?;
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

    /// The fused in-place update equals AdamW written out in f64 over several steps, with a
    /// clipping scale, weight decay and entries whose gradient is always zero (masked).
    #[test]
    fn fused_update_equals_the_formula_over_steps() {
        let d = candle_core::Device::Cpu;
        let n = 300_000; // more than one parallel chunk
        let w0: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect();
        let p = Var::from_vec(w0.clone(), (600, 500), &d).unwrap();
        let spec = OptimizerSpec { weight_decay: 0.1, ..Default::default() };
        let mut opt = AdamW::new(&spec, std::slice::from_ref(&p)).unwrap();
        let (mut w, mut m, mut v) = (w0.iter().map(|&x| x as f64).collect::<Vec<_>>(), vec![0f64; n], vec![0f64; n]);
        for step in 1..=3 {
            let g: Vec<f32> =
                (0..n).map(|i| if i % 3 == 0 { 0.0 } else { ((i * step) % 13) as f32 / 13.0 - 0.4 }).collect();
            let (scale, lr) = (0.5, 1e-2);
            let gt = Tensor::from_vec(g.clone(), (600, 500), &d).unwrap();
            opt.step_scaled(std::slice::from_ref(&p), &[gt], scale, lr).unwrap();
            let (b1, b2, eps) = (spec.beta1, spec.beta2, spec.eps);
            let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
            for i in 0..n {
                let gi = scale * g[i] as f64;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                w[i] = w[i] * (1.0 - lr * spec.weight_decay) - lr * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
            }
        }
        let got = p.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mv = opt.m[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..n {
            assert!((got[i] as f64 - w[i]).abs() < 1e-5, "w[{i}]: {} vs {}", got[i], w[i]);
            assert!((mv[i] as f64 - m[i]).abs() < 1e-6, "m[{i}]");
            if i % 3 == 0 {
                assert_eq!(mv[i], 0.0, "a zero gradient leaves its moment exactly zero");
            }
        }
    }
}
