//! Causal grouped-query attention as one custom op with its backward pass.
//!
//! Composed from candle primitives, a 512-token step built and freed a dozen `[heads, t, t]`
//! tensors per layer (scores, scaled, masked, max, shifted, exponentials, sums, probabilities and
//! as many again in the backward pass), each a separate pass over memory, and materialised the
//! key and value heads repeated over their query groups. This op does per head: `S = scale · Q Kᵀ`
//! (one GEMM), the causal softmax row by row in place (positions after the query are never
//! exponentiated), `O = P V`; it keeps `P` for the backward pass, which is
//!
//! - `dV = Pᵀ dO`, `dP = dO Vᵀ`,
//! - `dS = P ⊙ (dP − rowsum(P ⊙ dP))` on and below the diagonal,
//! - `dQ = scale · dS K`, `dK = scale · dSᵀ Q`,
//!
//! with `dK`, `dV` summed over the query heads that share a KV head. Heads run in parallel, each
//! product on one thread (`dense::gemm_strided`, the per-head GEMM of the inference path).
//!
//! f32 on the CPU; other dtypes and devices (the f64 finite-difference tests) take the composed
//! reference, [`reference`].

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use lacuna_kernels::dense::{Strided, gemm_strided};
use rayon::prelude::*;

use crate::Result;
use crate::linear::slice;

/// `softmax(scale · Q Kᵀ + causal mask) · V` for `q` `[b, heads, t, hd]` and `k`, `v`
/// `[b, kv_heads, t, hd]` (each KV head serving `heads / kv_heads` consecutive query heads);
/// returns `[b, heads, t, hd]`.
pub fn causal(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && t.rank() == 4;
    if [q, k, v].into_iter().all(f32_cpu) {
        let op = Attention { scale: scale as f32, probs: Mutex::new(Vec::new()) };
        return Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?);
    }
    reference(q, k, v, scale)
}

/// The same attention composed from candle's differentiable primitives.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, nh, t, _) = q.dims4()?;
    let nkv = k.dim(1)?;
    let (k, v) = (repeat_kv(k, nh / nkv)?, repeat_kv(v, nh / nkv)?);
    let mask = causal_mask(t, q.device())?.to_dtype(q.dtype())?;
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
    let probs = crate::llama::softmax_last(&scores)?;
    Ok(probs.matmul(&v)?)
}

/// Each KV head repeated over its group of `n_rep` query heads: `[b, kv, t, hd]` → `[b, kv·n_rep, t, hd]`.
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, kv, n_rep, t, hd))?.contiguous()?.reshape((b, kv * n_rep, t, hd))?)
}

/// `[t, t]`: 0 on and below the diagonal, −∞ above.
fn causal_mask(t: usize, device: &candle_core::Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Tensor::from_vec(m, (t, t), device)?)
}

struct Attention {
    scale: f32,
    /// `P` of every head, `[b · heads, t, t]`, kept by the forward pass for the backward one.
    probs: Mutex<Vec<f32>>,
}

/// The backward pass's op: `(dO, Q, K)` in, `V` and `P` held; returns `[dQ | dK | dV]` flat
/// (one op computes all three from the same `dS`).
struct AttentionGrad {
    scale: f32,
    v: Vec<f32>,
    probs: Vec<f32>,
    kv_heads: usize,
}

fn dims(l: &Layout, what: &str) -> candle_core::Result<[usize; 4]> {
    match l.dims() {
        &[b, h, t, d] => Ok([b, h, t, d]),
        d => Err(candle_core::Error::Msg(format!("attention: {what} has shape {d:?}, [b, heads, t, hd] expected"))),
    }
}

fn gemm(a: &[f32], al: Strided, b: &[f32], bl: Strided, c: &mut [f32], cl: Strided) {
    gemm_strided(a, al, b, bl, c, cl).expect("attention: shapes checked by the op");
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [b, nh, t, hd] = dims(l1, "q")?;
        let kd = dims(l2, "k")?;
        if kd != dims(l3, "v")? || kd[0] != b || kd[2] != t || kd[3] != hd || kd[1] == 0 || nh % kd[1] != 0 {
            return Err(candle_core::Error::Msg(format!(
                "attention: q {:?}, k {:?}, v {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )));
        }
        let nkv = kd[1];
        let (q, k, v) = (
            slice::<f32>(s1, l1, "attention: q")?,
            slice::<f32>(s2, l2, "attention: k")?,
            slice::<f32>(s3, l3, "attention: v")?,
        );
        let mut out = vec![0f32; b * nh * t * hd];
        let mut probs = vec![0f32; b * nh * t * t];
        let rm = Strided::row_major;
        out.par_chunks_mut(t * hd).zip(probs.par_chunks_mut(t * t)).enumerate().for_each(|(bh, (o, p))| {
            let (bi, h) = (bh / nh, bh % nh);
            let g = bi * nkv + h / (nh / nkv);
            let (qh, kg, vg) = (&q[bh * t * hd..][..t * hd], &k[g * t * hd..][..t * hd], &v[g * t * hd..][..t * hd]);
            gemm(qh, rm(t, hd), kg, rm(t, hd).t(), p, rm(t, t));
            for (i, row) in p.chunks_exact_mut(t).enumerate() {
                let (live, dead) = row.split_at_mut(i + 1);
                let max = live.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * self.scale;
                let mut sum = 0f32;
                for x in live.iter_mut() {
                    *x = (*x * self.scale - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                live.iter_mut().for_each(|x| *x *= inv);
                dead.fill(0.0);
            }
            gemm(p, rm(t, t), vg, rm(t, hd), o, rm(t, hd));
        });
        *self.probs.lock().expect("attention: poisoned") = probs;
        Ok((CpuStorage::F32(out), Shape::from((b, nh, t, hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = std::mem::take(&mut *self.probs.lock().expect("attention: poisoned"));
        if probs.is_empty() {
            return Err(candle_core::Error::Msg("attention: backward ran twice or before the forward pass".into()));
        }
        let (b, nh, t, hd) = q.dims4()?;
        let nkv = k.dim(1)?;
        let op = AttentionGrad { scale: self.scale, v: v.flatten_all()?.to_vec1::<f32>()?, probs, kv_heads: nkv };
        let all = grad.contiguous()?.apply_op3_no_bwd(&q.contiguous()?, &k.contiguous()?, &op)?;
        let (nq, nk) = (b * nh * t * hd, b * nkv * t * hd);
        let dq = all.narrow(0, 0, nq)?.reshape((b, nh, t, hd))?;
        let dk = all.narrow(0, nq, nk)?.reshape((b, nkv, t, hd))?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape((b, nkv, t, hd))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "causal-attention-grad"
    }

    /// `dO` and `Q` `[b, heads, t, hd]`, `K` `[b, kv_heads, t, hd]`.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [b, nh, t, hd] = dims(l1, "dO")?;
        let nkv = self.kv_heads;
        let (nq, nk) = (b * nh * t * hd, b * nkv * t * hd);
        let (dout, q, k) = (
            slice::<f32>(s1, l1, "attention: dO")?,
            slice::<f32>(s2, l2, "attention: q")?,
            slice::<f32>(s3, l3, "attention: k")?,
        );
        if q.len() != nq || k.len() != nk || self.v.len() != nk || self.probs.len() != b * nh * t * t {
            return Err(candle_core::Error::Msg("attention: backward operands disagree with the forward pass".into()));
        }
        let rm = Strided::row_major;
        let rep = nh / nkv;
        // Per query head: dQ, and its contributions to its KV head's dK and dV.
        let mut dq = vec![0f32; nq];
        let mut dk_h = vec![0f32; b * nh * t * hd];
        let mut dv_h = vec![0f32; b * nh * t * hd];
        dq.par_chunks_mut(t * hd)
            .zip(dk_h.par_chunks_mut(t * hd))
            .zip(dv_h.par_chunks_mut(t * hd))
            .enumerate()
            .for_each(|(bh, ((dqh, dkh), dvh))| {
                let (bi, h) = (bh / nh, bh % nh);
                let g = bi * nkv + h / rep;
                let (qh, kg, vg) =
                    (&q[bh * t * hd..][..t * hd], &k[g * t * hd..][..t * hd], &self.v[g * t * hd..][..t * hd]);
                let (p, doh) = (&self.probs[bh * t * t..][..t * t], &dout[bh * t * hd..][..t * hd]);
                // dV_h = Pᵀ dO
                gemm(p, rm(t, t).t(), doh, rm(t, hd), dvh, rm(t, hd));
                // dP = dO Vᵀ, then dS in place (scaled).
                let mut ds = vec![0f32; t * t];
                gemm(doh, rm(t, hd), vg, rm(t, hd).t(), &mut ds, rm(t, t));
                for (i, (row, prow)) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
                    let dot: f32 = row[..=i].iter().zip(&prow[..=i]).map(|(d, p)| d * p).sum();
                    for (d, p) in row[..=i].iter_mut().zip(&prow[..=i]) {
                        *d = self.scale * p * (*d - dot);
                    }
                    row[i + 1..].fill(0.0);
                }
                // dQ = dS K, dK_h = dSᵀ Q
                gemm(&ds, rm(t, t), kg, rm(t, hd), dqh, rm(t, hd));
                gemm(&ds, rm(t, t).t(), qh, rm(t, hd), dkh, rm(t, hd));
            });
        // Sum each KV head's contributions over its query heads, in head order.
        let mut out = dq;
        out.resize(nq + 2 * nk, 0.0);
        let (_, kv) = out.split_at_mut(nq);
        let (dk, dv) = kv.split_at_mut(nk);
        for (dst, src) in [(dk, &dk_h), (dv, &dv_h)] {
            dst.par_chunks_mut(t * hd).enumerate().for_each(|(bg, d)| {
                let (bi, g) = (bg / nkv, bg % nkv);
                for r in 0..rep {
                    let h = bi * nh + g * rep + r;
                    d.iter_mut().zip(&src[h * t * hd..][..t * hd]).for_each(|(d, s)| *d += s);
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from(nq + 2 * nk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The fused op's output and gradients equal the composed reference's, for GQA (2 query heads
    /// per KV head) and a batch of 2.
    #[test]
    fn fused_attention_equals_the_composed_reference_and_its_gradients() {
        let d = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (b, nh, nkv, t, hd) = (2usize, 4usize, 2usize, 37usize, 16usize);
        let mut var = |h: usize| {
            let v: Vec<f32> = (0..b * h * t * hd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            Var::from_vec(v, (b, h, t, hd), &d).unwrap()
        };
        let (q, k, v) = (var(nh), var(nkv), var(nkv));
        let g: Vec<f32> = (0..b * nh * t * hd).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let g = Tensor::from_vec(g, (b, nh, t, hd), &d).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let want = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
        let got = causal(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
        let gw = (&want * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (&got * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a.len(), b.len(), "{what}");
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()) * 4.0, "{what}[{i}]: {x} vs {y}");
            }
        };
        close(&got, &want, "o");
        for (p, what) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
            close(gg.get(p.as_tensor()).unwrap(), gw.get(p.as_tensor()).unwrap(), what);
        }
        // f64 takes the reference.
        let q64 = q.as_tensor().to_dtype(DType::F64).unwrap();
        let o64 = causal(
            &q64,
            &k.as_tensor().to_dtype(DType::F64).unwrap(),
            &v.as_tensor().to_dtype(DType::F64).unwrap(),
            scale,
        )
        .unwrap();
        close(&o64.to_dtype(DType::F32).unwrap(), &want, "o (f64)");
    }
}
