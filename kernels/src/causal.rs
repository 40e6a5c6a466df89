//! Prefill attention: one query head over its KV head for a block of consecutive queries, each
//! seeing the positions up to its own (causal), in f32.
//!
//! Scores `S = Q Kᵀ` and outputs `O = P V` are two small products per block (64 deep for
//! SmolLM2 and Llama-3.2's heads). On the gemm crate (8-lane kernels, packing per call) they
//! ran at about half of one AVX2 core's peak and took a third of a 512-token INT8 prefill. The
//! AVX-512 body here keeps register tiles for both: `S` in 8 query rows × 32 keys (16
//! accumulators, keys transposed once per block so that 16 keys are one load), `O` in 4 rows ×
//! 64 values (16 accumulators, value rows loaded as they are); a row block stops at the last
//! key its queries see. The softmax between them is [`crate::activation::softmax_scaled`].
//! Other head sizes and CPUs without AVX-512 are told so (`Ok(false)`) and keep their GEMM.

use std::cell::RefCell;

use crate::attention::HeadCache;
use crate::cpu::{self, Isa};
use crate::{KernelError, Result};

/// The head size the AVX-512 body is compiled for.
pub const HEAD_DIM: usize = 64;

/// One head's block of queries and the cached positions they attend to: query `i` is
/// `q[i · q_stride ..][..64]` for `i < rows` and sees positions `0..=first + i` of `k` and `v`
/// (which hold at least `first + rows`); scores are scaled by `scale`.
#[derive(Clone, Copy, Debug)]
pub struct Block<'a> {
    pub q: &'a [f32],
    pub q_stride: usize,
    pub rows: usize,
    pub first: usize,
    pub k: HeadCache<'a, f32>,
    pub v: HeadCache<'a, f32>,
    pub scale: f32,
}

/// `out[i] = softmax(scale · K q_i over the positions query i sees) · V` for the block's
/// queries, `out` `[rows, 64]`. Returns `Ok(false)`, touching nothing, where this CPU or head
/// size has no kernel here (the caller runs its own product).
pub fn causal_block(b: &Block<'_>, out: &mut [f32]) -> Result<bool> {
    causal_block_on(cpu::isa(), b, out)
}

/// [`causal_block`] on an explicit path (tests compare it with the scalar reference).
pub fn causal_block_on(isa: Isa, b: &Block<'_>, out: &mut [f32]) -> Result<bool> {
    let &Block { q, q_stride, rows, first, k, v, .. } = b;
    let hd = HEAD_DIM;
    let seen = first + rows;
    if rows == 0 {
        return Ok(true);
    }
    if out.len() != rows * hd || q_stride < hd || q.len() < (rows - 1) * q_stride + hd || k.len < seen || v.len < seen {
        return Err(KernelError::Shape(format!(
            "causal attention block: {rows} queries of stride {q_stride} ({} values), keys {} and values {} for {seen} positions, output {}",
            q.len(),
            k.len,
            v.len,
            out.len()
        )));
    }
    k.check(hd, "keys")?;
    v.check(hd, "values")?;
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if cpu::supports(isa) => {
            // SAFETY: AVX-512F is present (checked); the shapes were checked above.
            crate::scratch::with_local(&SCRATCH, |s| unsafe { x86::block(s, b, out) });
            Ok(true)
        }
        Isa::Scalar => {
            reference(b, out);
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The reference: one query at a time, scores, softmax, weighted sum.
fn reference(b: &Block<'_>, out: &mut [f32]) {
    let &Block { q, q_stride, rows, first, k, v, scale } = b;
    let hd = HEAD_DIM;
    for i in 0..rows {
        let qi = &q[i * q_stride..i * q_stride + hd];
        let visible = first + i + 1;
        let mut s: Vec<f32> = (0..visible).map(|t| k.row(t, hd).iter().zip(qi).map(|(a, b)| a * b).sum()).collect();
        crate::activation::softmax_scaled_on(Isa::Scalar, &mut s, scale);
        let o = &mut out[i * hd..(i + 1) * hd];
        o.fill(0.0);
        for (t, &p) in s.iter().enumerate() {
            for (o, x) in o.iter_mut().zip(v.row(t, hd)) {
                *o += p * x;
            }
        }
    }
}

/// A thread's buffers: the block's queries (rows padded to 8), its keys transposed (`[64][seen
/// rounded up to 32]`) and its probabilities (`[rows padded to 8][seen rounded up to 32]`).
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    kt: Vec<f32>,
    p: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// # Safety
    /// AVX-512F; the shapes checked by `causal_block_on`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(s: &mut Scratch, b: &Block<'_>, out: &mut [f32]) {
        let &Block { q, q_stride, rows, first, k, v, scale } = b;
        let hd = HEAD_DIM;
        let seen = first + rows;
        let (sp, rp) = (seen.next_multiple_of(32), rows.next_multiple_of(8));
        s.q.clear();
        s.q.resize(rp * hd, 0.0);
        for i in 0..rows {
            s.q[i * hd..(i + 1) * hd].copy_from_slice(&q[i * q_stride..i * q_stride + hd]);
        }
        if s.kt.len() < hd * sp {
            s.kt.resize(hd * sp, 0.0);
        }
        crate::transpose::transpose(Isa::Avx512, &k.data[k.offset..], seen, hd, k.stride, &mut s.kt, sp, sp);
        if s.p.len() < rp * sp {
            s.p.resize(rp * sp, 0.0);
        }
        let (qp, kt, p) = (s.q.as_ptr(), s.kt.as_ptr(), s.p.as_mut_ptr());
        for i0 in (0..rp).step_by(8) {
            // Keys the block's last query sees, in whole 32-key tiles.
            let keys = (first + i0 + 8).min(seen).next_multiple_of(32);
            for j0 in (0..keys).step_by(32) {
                // SAFETY: rows i0 .. i0 + 8 of the padded queries; keys j0 .. j0 + 32 < sp of
                // every transposed row; the tile of `p` lies inside its rp × sp.
                unsafe { scores(qp.add(i0 * hd), kt.add(j0), sp, p.add(i0 * sp + j0), sp) };
            }
        }
        for i in 0..rp {
            let row = &mut s.p[i * sp..i * sp + seen];
            if i < rows {
                let visible = first + i + 1;
                crate::activation::softmax_scaled_on(Isa::Avx512, &mut row[..visible], scale);
                row[visible..].fill(0.0);
            } else {
                row.fill(0.0);
            }
        }
        let mut o = [0f32; 4 * HEAD_DIM];
        for i0 in (0..rp).step_by(4) {
            let keys = (first + i0 + 4).min(seen);
            // SAFETY: rows i0 .. i0 + 4 of `p` hold `keys <= seen` probabilities each; value
            // rows 0 .. keys hold 64 values at their offset (checked); `o` holds 4 × 64.
            unsafe {
                values(p.add(i0 * sp), sp, v.data.as_ptr().add(v.offset), v.stride, keys, o.as_mut_ptr());
            }
            for r in 0..4.min(rows.saturating_sub(i0)) {
                out[(i0 + r) * hd..(i0 + r + 1) * hd].copy_from_slice(&o[r * hd..(r + 1) * hd]);
            }
        }
    }

    /// `c[r][j] = Σ_d q[r][d] · kt[d][j]` for 8 query rows (64 values each, contiguous) and 32
    /// keys.
    ///
    /// # Safety
    /// AVX-512F; 8 × 64 values at `q`; 32 values at `kt + d · kt_stride` for d < 64; 32
    /// writable at `c + r · c_stride` for r < 8.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn scores(q: *const f32, kt: *const f32, kt_stride: usize, c: *mut f32, c_stride: usize) {
        let mut acc = [[_mm512_setzero_ps(); 2]; 8];
        for d in 0..HEAD_DIM {
            // SAFETY: the caller's contract.
            unsafe {
                let k0 = _mm512_loadu_ps(kt.add(d * kt_stride));
                let k1 = _mm512_loadu_ps(kt.add(d * kt_stride + 16));
                for (r, a) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*q.add(r * HEAD_DIM + d));
                    a[0] = _mm512_fmadd_ps(x, k0, a[0]);
                    a[1] = _mm512_fmadd_ps(x, k1, a[1]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: as above.
            unsafe {
                _mm512_storeu_ps(c.add(r * c_stride), a[0]);
                _mm512_storeu_ps(c.add(r * c_stride + 16), a[1]);
            }
        }
    }

    /// `o[r][..] = Σ_{t < keys} p[r][t] · v[t][..]` for 4 rows of probabilities and 64-value
    /// rows of `v`, into `o` (`[4][64]`).
    ///
    /// # Safety
    /// AVX-512F; `keys` values at `p + r · p_stride` for r < 4; 64 at `v + t · v_stride` for
    /// t < keys; 256 writable at `o`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn values(p: *const f32, p_stride: usize, v: *const f32, v_stride: usize, keys: usize, o: *mut f32) {
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        for t in 0..keys {
            // SAFETY: the caller's contract.
            unsafe {
                let vr = v.add(t * v_stride);
                let x = [
                    _mm512_loadu_ps(vr),
                    _mm512_loadu_ps(vr.add(16)),
                    _mm512_loadu_ps(vr.add(32)),
                    _mm512_loadu_ps(vr.add(48)),
                ];
                for (r, a) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*p.add(r * p_stride + t));
                    for c in 0..4 {
                        a[c] = _mm512_fmadd_ps(w, x[c], a[c]);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (c, &x) in a.iter().enumerate() {
                // SAFETY: as above.
                unsafe { _mm512_storeu_ps(o.add(r * HEAD_DIM + 16 * c), x) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_simd_block_follows_the_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (kvd, qd) = (3 * HEAD_DIM, 5 * HEAD_DIM);
        for &(first, rows) in &[(0usize, 1usize), (0, 7), (0, 64), (5, 3), (64, 64), (100, 33), (447, 65)] {
            let seen = first + rows;
            let kc: Vec<f32> = (0..seen * kvd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let vc: Vec<f32> = (0..seen * kvd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let q: Vec<f32> = (0..rows * qd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            fn cache(data: &[f32], kvd: usize, len: usize) -> HeadCache<'_, f32> {
                HeadCache { data, stride: kvd, offset: HEAD_DIM, len }
            }
            let qh = &q[2 * HEAD_DIM..];
            let mut want = vec![0f32; rows * HEAD_DIM];
            let b = Block {
                q: qh,
                q_stride: qd,
                rows,
                first,
                k: cache(&kc, kvd, seen),
                v: cache(&vc, kvd, seen),
                scale: 0.125,
            };
            assert!(causal_block_on(Isa::Scalar, &b, &mut want).unwrap());
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; rows * HEAD_DIM];
                if !causal_block_on(isa, &b, &mut got).unwrap() {
                    eprintln!("causal attention: no {isa:?} body (the caller's GEMM runs)");
                    continue;
                }
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{isa:?} first {first} rows {rows} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn short_caches_and_outputs_are_errors_naming_them() {
        let kc = vec![0f32; 10 * HEAD_DIM];
        let cache = HeadCache { data: &kc, stride: HEAD_DIM, offset: 0, len: 10 };
        let q = vec![0f32; 4 * HEAD_DIM];
        let mut out = vec![0f32; 4 * HEAD_DIM];
        let b = |first| Block { q: &q, q_stride: HEAD_DIM, rows: 4, first, k: cache, v: cache, scale: 1.0 };
        let e = causal_block(&b(7), &mut out).unwrap_err().to_string();
        assert!(e.contains("11 positions"), "{e}");
        let e = causal_block(&b(2), &mut out[..10]).unwrap_err().to_string();
        assert!(e.contains("output 10"), "{e}");
    }
}
