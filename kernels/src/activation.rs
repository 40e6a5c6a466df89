//! Element-wise functions of the forward pass over whole rows: the softmax of prefill attention
//! and SwiGLU's `silu(gate) · up`, on the vector `exp` of the decode attention (16 lanes on
//! AVX-512, 8 on AVX2, relative error below 2e-7), with a scalar reference.
//!
//! A 512-token prefill of SmolLM2 takes 35 M exponentials in the softmaxes and 24 M in the
//! SwiGLUs; libm's scalar `expf` spent more time on them than the INT8 products on their
//! multiply-adds.

use crate::cpu::{self, Isa};
use crate::{KernelError, Result};

/// `row ← softmax(row · scale)` (`scale > 0`), on the process's path.
pub fn softmax_scaled(row: &mut [f32], scale: f32) {
    softmax_scaled_on(cpu::isa(), row, scale)
}

/// [`softmax_scaled`] on an explicit path (a path the CPU lacks runs the scalar reference).
pub fn softmax_scaled_on(isa: Isa, row: &mut [f32], scale: f32) {
    if row.is_empty() {
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (checked); the body reads and writes `row` only.
        Isa::Avx512 if cpu::supports(isa) => unsafe { x86::softmax_512(row, scale) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA are present (checked).
        Isa::Avx2 | Isa::Avx512 if cpu::supports(Isa::Avx2) => unsafe { x86::softmax_256(row, scale) },
        _ => {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) * scale;
            let inv = 1.0 / exp_shifted_scalar(row, scale, max);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

/// `v ← e^(v · scale − max)` over `row`, returning the sum.
fn exp_shifted_scalar(row: &mut [f32], scale: f32, max: f32) -> f32 {
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v * scale - max).exp();
        sum += *v;
    }
    sum
}

/// `gate ← gate · sigmoid(gate) · up`, on the process's path.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) -> Result<()> {
    silu_mul_on(cpu::isa(), gate, up)
}

/// [`silu_mul`] on an explicit path (a path the CPU lacks runs the scalar reference).
pub fn silu_mul_on(isa: Isa, gate: &mut [f32], up: &[f32]) -> Result<()> {
    if gate.len() != up.len() {
        return Err(KernelError::Shape(format!("silu_mul: gate of {} values, up of {}", gate.len(), up.len())));
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (checked); equal lengths (checked).
        Isa::Avx512 if cpu::supports(isa) => unsafe { x86::silu_mul_512(gate, up) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA are present (checked); equal lengths (checked).
        Isa::Avx2 | Isa::Avx512 if cpu::supports(Isa::Avx2) => unsafe { x86::silu_mul_256(gate, up) },
        _ => silu_mul_scalar(gate, up),
    }
    Ok(())
}

fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::attention::avx2::exp8;
    use crate::attention::avx512::exp16;

    /// The softmax of `row · scale` in place: the maximum, the shifted exponentials and their
    /// sum, the normalisation, each pass in vectors.
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_512(row: &mut [f32], scale: f32) {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            // SAFETY: 16 values in the chunk.
            m = _mm512_max_ps(m, unsafe { _mm512_loadu_ps(c.as_ptr()) });
        }
        let max = chunks.remainder().iter().fold(_mm512_reduce_max_ps(m), |m, v| m.max(*v)) * scale;
        // SAFETY: AVX-512F (caller).
        let inv = _mm512_set1_ps(1.0 / unsafe { exp_shifted_512(row, scale, max) });
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: 16 values in the chunk.
            unsafe { _mm512_storeu_ps(c.as_mut_ptr(), _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), inv)) };
        }
        let inv = _mm512_cvtss_f32(inv);
        for v in chunks.into_remainder() {
            *v *= inv;
        }
    }

    /// [`softmax_512`] on 8 lanes.
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_256(row: &mut [f32], scale: f32) {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            // SAFETY: 8 values in the chunk.
            m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats of storage.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, v| m.max(*v)) * scale;
        // SAFETY: AVX2 and FMA (caller).
        let inv = 1.0 / unsafe { exp_shifted_256(row, scale, max) };
        let iv = _mm256_set1_ps(inv);
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: 8 values in the chunk.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), iv)) };
        }
        for v in chunks.into_remainder() {
            *v *= inv;
        }
    }

    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted_512(row: &mut [f32], scale: f32, max: f32) -> f32 {
        let (s, m) = (_mm512_set1_ps(scale), _mm512_set1_ps(max));
        let mut acc = _mm512_setzero_ps();
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: 16 values in the chunk.
            unsafe {
                let e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(c.as_ptr()), s, m));
                _mm512_storeu_ps(c.as_mut_ptr(), e);
                acc = _mm512_add_ps(acc, e);
            }
        }
        _mm512_reduce_add_ps(acc) + super::exp_shifted_scalar(chunks.into_remainder(), scale, max)
    }

    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_256(row: &mut [f32], scale: f32, max: f32) -> f32 {
        let (s, m) = (_mm256_set1_ps(scale), _mm256_set1_ps(max));
        let mut acc = _mm256_setzero_ps();
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: 8 values in the chunk.
            unsafe {
                let e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(c.as_ptr()), s, m));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                acc = _mm256_add_ps(acc, e);
            }
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats of storage.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().sum::<f32>() + super::exp_shifted_scalar(chunks.into_remainder(), scale, max)
    }

    /// # Safety
    /// AVX-512F; `gate.len() == up.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul_512(gate: &mut [f32], up: &[f32]) {
        let mut g = gate.chunks_exact_mut(16);
        let mut u = up.chunks_exact(16);
        let one = _mm512_set1_ps(1.0);
        for (gc, uc) in (&mut g).zip(&mut u) {
            // SAFETY: 16 values in each chunk.
            unsafe {
                let x = _mm512_loadu_ps(gc.as_ptr());
                let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
                let y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(uc.as_ptr()));
                _mm512_storeu_ps(gc.as_mut_ptr(), y);
            }
        }
        super::silu_mul_scalar(g.into_remainder(), u.remainder());
    }

    /// # Safety
    /// AVX2 and FMA; `gate.len() == up.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul_256(gate: &mut [f32], up: &[f32]) {
        let mut g = gate.chunks_exact_mut(8);
        let mut u = up.chunks_exact(8);
        let one = _mm256_set1_ps(1.0);
        for (gc, uc) in (&mut g).zip(&mut u) {
            // SAFETY: 8 values in each chunk.
            unsafe {
                let x = _mm256_loadu_ps(gc.as_ptr());
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let y = _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(uc.as_ptr()));
                _mm256_storeu_ps(gc.as_mut_ptr(), y);
            }
        }
        super::silu_mul_scalar(g.into_remainder(), u.remainder());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn close(a: f32, b: f32, rel: f32) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-30) || (a - b).abs() < 1e-37
    }

    #[test]
    fn every_path_follows_the_scalar_reference_within_the_exp_error() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &len in &[1usize, 7, 8, 15, 16, 17, 31, 100, 513] {
            let x: Vec<f32> = (0..len).map(|_| rng.random_range(-30.0f32..30.0)).collect();
            let up: Vec<f32> = (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let mut want = x.clone();
            softmax_scaled_on(Isa::Scalar, &mut want, 0.125);
            let mut want_silu = x.clone();
            silu_mul_on(Isa::Scalar, &mut want_silu, &up).unwrap();
            for isa in Isa::available() {
                let mut got = x.clone();
                softmax_scaled_on(isa, &mut got, 0.125);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(close(*g, *w, 2e-6), "softmax {isa:?} len {len} [{i}]: {g} vs {w}");
                }
                let mut got = x.clone();
                silu_mul_on(isa, &mut got, &up).unwrap();
                for (i, (g, w)) in got.iter().zip(&want_silu).enumerate() {
                    assert!(close(*g, *w, 2e-6), "silu {isa:?} len {len} [{i}]: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn extremes_give_zeros_and_identities_not_nan() {
        for isa in Isa::available() {
            // Very negative gates give −0 · up, very positive ones the gate itself.
            let mut g = vec![-200.0f32, 200.0, -90.0, 90.0, 0.0, -1e30, 1e30, 3.0];
            silu_mul_on(isa, &mut g, &[1.0; 8]).unwrap();
            // (AVX2 clamps e^x at e^88, so its "zeros" are below 1e-8 rather than exact.)
            assert!(g.iter().all(|v| v.is_finite()), "{isa:?} {g:?}");
            assert!(g[0].abs() < 1e-30 && g[5].abs() < 1e-8 && g[4] == 0.0, "{isa:?} {g:?}");
            assert_eq!((g[1], g[6]), (200.0, 1e30), "{isa:?}");
            assert!(g[2].abs() < 1e-30 && close(g[3], 90.0, 1e-6), "{isa:?} {g:?}");
            // A row with one dominant score puts all the weight there.
            let mut s: Vec<f32> = (0..20).map(|i| if i == 13 { 1000.0 } else { -1000.0 }).collect();
            softmax_scaled_on(isa, &mut s, 1.0);
            assert!(s.iter().enumerate().all(|(i, &v)| if i == 13 { v == 1.0 } else { v < 1e-37 }), "{isa:?} {s:?}");
        }
        assert!(silu_mul(&mut [1.0; 3], &[1.0; 2]).unwrap_err().to_string().contains("silu_mul"));
    }
}
