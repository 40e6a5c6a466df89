//! Decode attention for one head: a single query over the cached keys and values of its KV head.
//!
//! At a few hundred positions this is a few percent of a dense decode step but a sixth of a
//! 70 %-sparse one, whose weights stream twice as fast: with a scalar `exp` and a generic GEMM
//! per head it cost more than the sparse model's attention-free layers saved. The AVX-512 body
//! dots each key in 16-lane FMAs with the group's queries and accumulators in registers (head and
//! chunk counts are compile-time constants), takes `exp` as a degree-6 polynomial of `2^f` scaled
//! by `vscalefps`, and accumulates values in registers. A cache can be split into position
//! ranges, one task each, whose partial softmaxes [`merge_partials`] combines.

use crate::cpu::{self, Isa};
use crate::{KernelError, Result};

/// What a KV cache stores: `f32`, or `f16` (half the bytes a decode step streams per position;
/// values are rounded once when written and widened in registers when read, as llama.cpp's
/// default cache does).
pub trait CacheValue: Copy + Default + Send + Sync + 'static + sealed::Sealed {
    /// Whether this is the 16-bit type (the SIMD bodies widen it with `vcvtph2ps`).
    const HALF: bool;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

impl CacheValue for f32 {
    const HALF: bool = false;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl CacheValue for half::f16 {
    const HALF: bool = true;
    #[inline]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

/// Cached keys or values of one KV head: rows `0..len` of a `[positions, stride]` cache, the
/// head's `head_dim` columns starting at `offset`.
#[derive(Clone, Copy, Debug)]
pub struct HeadCache<'a, T = f32> {
    pub data: &'a [T],
    pub stride: usize,
    pub offset: usize,
    pub len: usize,
}

impl<T: CacheValue> HeadCache<'_, T> {
    pub(crate) fn check(&self, hd: usize, what: &str) -> Result<()> {
        let need = if self.len == 0 { 0 } else { (self.len - 1) * self.stride + self.offset + hd };
        if self.data.len() < need || (self.len > 1 && self.stride < self.offset + hd) {
            return Err(KernelError::Shape(format!(
                "{what}: {} positions of stride {} at column {} need {need} values, got {}",
                self.len,
                self.stride,
                self.offset,
                self.data.len()
            )));
        }
        Ok(())
    }
    pub(crate) fn row(&self, t: usize, hd: usize) -> &[T] {
        &self.data[t * self.stride + self.offset..][..hd]
    }
}

/// `out_j = softmax(scale · K q_j) · V` for the `heads` queries `q_j` that share one KV head
/// (grouped-query attention), over `k.len` positions: `q` and `out` are `[heads, head_dim]`,
/// `scores` is scratch of at least `heads · k.len` values. Reading each key and value once for
/// the whole group is what makes this cheaper than one call per head.
///
/// `stats` (`2 · heads` values) receives each head's largest scaled score and its sum of
/// `exp(score − max)`: what [`merge_partials`] needs to combine the results of several position
/// ranges of one cache (split across threads) into the softmax over all of them.
#[allow(clippy::too_many_arguments)]
pub fn decode_group<T: CacheValue>(
    q: &[f32],
    heads: usize,
    k: HeadCache<'_, T>,
    v: HeadCache<'_, T>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
    stats: &mut [f32],
) -> Result<()> {
    decode_group_on(cpu::isa(), q, heads, k, v, scale, scores, out, stats)
}

/// Combines the partial results of [`decode_group`] over disjoint position ranges of one cache
/// into the attention over all of them, `out` (`[heads · hd]`). `partials` holds one part per
/// range, each `heads · hd` outputs followed by its `2 · heads` stats; a range without positions
/// is given as outputs 0, max −∞ and sum 0.
pub fn merge_partials(partials: &[f32], heads: usize, out: &mut [f32]) -> Result<()> {
    let width = out.len() + 2 * heads;
    if heads == 0 || !out.len().is_multiple_of(heads) || partials.is_empty() || !partials.len().is_multiple_of(width) {
        return Err(KernelError::Shape(format!(
            "attention merge: {} partial values for {heads} heads of output {}",
            partials.len(),
            out.len()
        )));
    }
    let hd = out.len() / heads;
    let stat = |p: &[f32], h: usize| (p[heads * hd + 2 * h], p[heads * hd + 2 * h + 1]);
    for h in 0..heads {
        let m = partials.chunks_exact(width).map(|p| stat(p, h).0).fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[h * hd..(h + 1) * hd];
        o.fill(0.0);
        if m == f32::NEG_INFINITY {
            continue;
        }
        // Each range's weight is its share of the sum of exponentials over all ranges.
        let total: f32 = partials.chunks_exact(width).map(|p| stat(p, h)).map(|(pm, ps)| ps * (pm - m).exp()).sum();
        for p in partials.chunks_exact(width) {
            let (pm, ps) = stat(p, h);
            if ps > 0.0 {
                let f = ps * (pm - m).exp() / total;
                for (a, b) in o.iter_mut().zip(&p[h * hd..(h + 1) * hd]) {
                    *a += f * b;
                }
            }
        }
    }
    Ok(())
}

/// [`decode_group`] on an explicit path.
#[allow(clippy::too_many_arguments)]
pub fn decode_group_on<T: CacheValue>(
    isa: Isa,
    q: &[f32],
    heads: usize,
    k: HeadCache<'_, T>,
    v: HeadCache<'_, T>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
    stats: &mut [f32],
) -> Result<()> {
    if heads == 0 || !q.len().is_multiple_of(heads) || stats.len() != 2 * heads {
        return Err(KernelError::Shape(format!(
            "attention: {} query values and {} stats for {heads} heads",
            q.len(),
            stats.len()
        )));
    }
    let hd = q.len() / heads;
    let len = k.len;
    if out.len() != q.len() || k.len != v.len || scores.len() < heads * len || len == 0 {
        return Err(KernelError::Shape(format!(
            "attention: {heads} heads of {hd}, output {}, {} keys, {} values, {} score slots",
            out.len(),
            k.len,
            v.len,
            scores.len()
        )));
    }
    if !cpu::supports(isa) {
        return Err(KernelError::Unsupported(format!("the {} kernels on this CPU", isa.name())));
    }
    k.check(hd, "keys")?;
    v.check(hd, "values")?;
    let scores = &mut scores[..heads * len];
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa` is supported (checked), and AVX2 comes with AVX-512 here; q, out, stats
        // and scores have the sizes checked above; every key/value row read lies within the
        // checked extents. Each body declines (false) shapes it was not compiled for.
        let done = unsafe {
            (isa == Isa::Avx512 && avx512::decode_group(q, heads, k, v, scale, scores, out, stats))
                || (isa >= Isa::Avx2 && avx2::decode_group(q, heads, k, v, scale, scores, out, stats))
        };
        if done {
            return Ok(());
        }
    }
    for (((qh, sc), oh), st) in q
        .chunks_exact(hd)
        .zip(scores.chunks_exact_mut(len))
        .zip(out.chunks_exact_mut(hd))
        .zip(stats.chunks_exact_mut(2))
    {
        let (max, sum) = decode_head_scalar(qh, k, v, scale, sc, oh);
        st.copy_from_slice(&[max, sum]);
    }
    Ok(())
}

/// One head; returns its largest scaled score and sum of exponentials.
fn decode_head_scalar<T: CacheValue>(
    q: &[f32],
    k: HeadCache<'_, T>,
    v: HeadCache<'_, T>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) -> (f32, f32) {
    let hd = q.len();
    for (t, s) in scores.iter_mut().enumerate() {
        *s = q.iter().zip(k.row(t, hd)).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale;
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (t, s) in scores.iter_mut().enumerate() {
        *s /= sum;
        for (o, x) in out.iter_mut().zip(v.row(t, hd)) {
            *o += *s * x.to_f32();
        }
    }
    (max, sum)
}

/// Cache rows the SIMD bodies prefetch ahead of the one being read.
#[cfg(target_arch = "x86_64")]
const AHEAD: usize = 8;

/// 2^f on |f| ≤ 1/2 as a degree-6 polynomial (lowest power first): the Taylor coefficients of
/// e^z in z = f ln 2 folded into f. Relative error below 2e-7; the SIMD bodies' `exp`.
#[cfg(target_arch = "x86_64")]
const EXP2_COEFFS: [f32; 7] =
    [1.0, std::f32::consts::LN_2, 0.240_226_5, 0.055_504_11, 0.009_618_129, 0.001_333_355_8, 0.000_154_035_3];

/// The shapes the SIMD bodies are compiled for: head_dim 64 (SmolLM2, Llama-3.2-1B) and 128
/// (Llama-2/3), 1–4 query heads per KV head. Calls `$group::<H, {hd / $lanes}>(args)` for the
/// matching shape, or makes the enclosing function return false (the portable path runs).
#[cfg(target_arch = "x86_64")]
macro_rules! simd_shapes {
    ($group:ident, $lanes:literal, $heads:expr, $hd:expr, ($($arg:expr),*)) => {
        match ($heads, $hd) {
            (1, 64) => $group::<1, { 64 / $lanes }, _>($($arg),*),
            (2, 64) => $group::<2, { 64 / $lanes }, _>($($arg),*),
            (3, 64) => $group::<3, { 64 / $lanes }, _>($($arg),*),
            (4, 64) => $group::<4, { 64 / $lanes }, _>($($arg),*),
            (1, 128) => $group::<1, { 128 / $lanes }, _>($($arg),*),
            (2, 128) => $group::<2, { 128 / $lanes }, _>($($arg),*),
            (3, 128) => $group::<3, { 128 / $lanes }, _>($($arg),*),
            (4, 128) => $group::<4, { 128 / $lanes }, _>($($arg),*),
            _ => return false,
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{AHEAD, CacheValue, HeadCache};
    use std::arch::x86_64::*;

    /// 16 cached values from `p`, widened to f32.
    ///
    /// # Safety
    /// AVX-512F; 16 values readable at `p`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<T: CacheValue>(p: *const T) -> __m512 {
        // SAFETY: 16 values of T (f16 or f32, as HALF says) at p (contract).
        unsafe { if T::HALF { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) } else { _mm512_loadu_ps(p.cast()) } }
    }

    /// e^x for 16 lanes: x·log2(e) = n + f with |f| ≤ 1/2, 2^f by a degree-6 polynomial
    /// (relative error below 2e-7 on the range), times 2^n by `vscalefps` (which also flushes
    /// very negative inputs to 0 instead of producing garbage exponents).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) fn exp16(x: __m512) -> __m512 {
        let y = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
        let f = _mm512_sub_ps(y, n);
        let c = super::EXP2_COEFFS;
        let mut p = _mm512_set1_ps(c[6]);
        for &ci in c[..6].iter().rev() {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(ci));
        }
        _mm512_scalef_ps(p, n)
    }

    /// Runs the kernel for `heads` query heads of `hd` columns if a compiled shape fits them
    /// (returns false otherwise, for the caller's portable path). Head and chunk counts are
    /// compile-time constants so that queries and accumulators live in registers and the
    /// per-position loops unroll: with run-time counts LLVM kept the accumulators on the stack,
    /// and attention over 600 positions cost a fifth of a 70 %-sparse decode step.
    ///
    /// # Safety
    /// AVX-512F; `q.len() == out.len() == heads · hd`; `scores.len() >= heads · len` with
    /// `len == k.len == v.len >= 1`; `stats.len() == 2 · heads`; every row `t < len` of `k` and
    /// `v` holds hd values at its offset.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn decode_group<T: CacheValue>(
        q: &[f32],
        heads: usize,
        k: HeadCache<'_, T>,
        v: HeadCache<'_, T>,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
        stats: &mut [f32],
    ) -> bool {
        // SAFETY: the instance called matches `heads` and `hd` (caller's contract otherwise).
        unsafe { simd_shapes!(group, 16, heads, q.len() / heads, (q, k, v, scale, scores, out, stats)) };
        true
    }

    /// `H` query heads of `16 C` columns.
    ///
    /// # Safety
    /// As [`decode_group`], with `heads == H` and `hd == 16 C`.
    #[allow(clippy::needless_range_loop)] // register arrays indexed by head and chunk
    #[target_feature(enable = "avx512f")]
    unsafe fn group<const H: usize, const C: usize, T: CacheValue>(
        q: &[f32],
        k: HeadCache<'_, T>,
        v: HeadCache<'_, T>,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
        stats: &mut [f32],
    ) {
        let len = k.len;
        // Chunks of 16 values per 64-byte cache line (one prefetch each).
        let line = if T::HALF { 2 } else { 1 };
        let mut qv = [[_mm512_setzero_ps(); C]; H];
        for h in 0..H {
            for c in 0..C {
                // SAFETY: q holds H · 16 C values.
                qv[h][c] =
                    _mm512_mul_ps(unsafe { _mm512_loadu_ps(q.as_ptr().add(16 * (h * C + c))) }, _mm512_set1_ps(scale));
            }
        }
        let sp = scores.as_mut_ptr();
        let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); H];
        for t in 0..len {
            // SAFETY: row t < len holds 16 C values at its offset (contract).
            let kp = unsafe { k.data.as_ptr().add(t * k.stride + k.offset) };
            // Rows sit a cache stride apart (the other KV heads in between): prefetch a few rows
            // ahead, every line of the row (prefetches never fault).
            for c in (0..C).step_by(line) {
                _mm_prefetch::<_MM_HINT_T0>(kp.wrapping_add(AHEAD * k.stride + 16 * c) as *const i8);
            }
            let mut acc = [_mm512_setzero_ps(); H];
            for c in 0..C {
                // SAFETY: chunk c < C of the row.
                let kv = unsafe { load16(kp.add(16 * c)) };
                for h in 0..H {
                    acc[h] = _mm512_fmadd_ps(qv[h][c], kv, acc[h]);
                }
            }
            for h in 0..H {
                let s = _mm512_set1_ps(_mm512_reduce_add_ps(acc[h]));
                max[h] = _mm512_max_ps(max[h], s);
                // SAFETY: h · len + t < H · len <= scores.len().
                unsafe { _mm_store_ss(sp.add(h * len + t), _mm512_castps512_ps128(s)) };
            }
        }
        for h in 0..H {
            let row = &mut scores[h * len..(h + 1) * len];
            let (vmax, mut vsum) = (max[h], _mm512_setzero_ps());
            let mut it = row.chunks_exact_mut(16);
            for ch in &mut it {
                // SAFETY: 16 scores at ch.
                unsafe {
                    let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(ch.as_ptr()), vmax));
                    _mm512_storeu_ps(ch.as_mut_ptr(), e);
                    vsum = _mm512_add_ps(vsum, e);
                }
            }
            let rest = it.into_remainder();
            if !rest.is_empty() {
                let m = ((1u32 << rest.len()) - 1) as u16;
                // SAFETY: the masked load and store touch only the rest.len() < 16 scores left.
                unsafe {
                    let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, rest.as_ptr()), vmax));
                    _mm512_mask_storeu_ps(rest.as_mut_ptr(), m, e);
                    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
                }
            }
            let sum = _mm512_reduce_add_ps(vsum);
            stats[2 * h] = _mm512_reduce_max_ps(vmax);
            stats[2 * h + 1] = sum;
            // Probabilities in place, so that the value pass broadcasts each straight from memory.
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|p| *p *= inv);
        }
        let mut acc = [[_mm512_setzero_ps(); C]; H];
        for t in 0..len {
            // SAFETY: row t < len of v holds 16 C values at its offset (contract).
            let vp = unsafe { v.data.as_ptr().add(t * v.stride + v.offset) };
            for c in (0..C).step_by(line) {
                _mm_prefetch::<_MM_HINT_T0>(vp.wrapping_add(AHEAD * v.stride + 16 * c) as *const i8);
            }
            let mut p = [_mm512_setzero_ps(); H];
            for h in 0..H {
                // SAFETY: h · len + t < scores.len().
                p[h] = _mm512_set1_ps(unsafe { *sp.add(h * len + t) });
            }
            for c in 0..C {
                // SAFETY: chunk c < C of the row.
                let vv = unsafe { load16(vp.add(16 * c)) };
                for h in 0..H {
                    acc[h][c] = _mm512_fmadd_ps(p[h], vv, acc[h][c]);
                }
            }
        }
        for h in 0..H {
            for c in 0..C {
                // SAFETY: out has H · 16 C values.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * (h * C + c)), acc[h][c]) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! 8 lanes, 16 registers: the queries are read from L1 rather than held, and the value pass
    //! runs one head at a time over the range's rows (which stay in L1/L2 between heads).
    use super::{AHEAD, CacheValue, HeadCache};
    use std::arch::x86_64::*;

    /// 8 cached values from `p`, widened to f32.
    ///
    /// # Safety
    /// AVX2 and F16C; 8 values readable at `p`.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn load8<T: CacheValue>(p: *const T) -> __m256 {
        // SAFETY: 8 values of T (f16 or f32, as HALF says) at p (contract).
        unsafe { if T::HALF { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) } else { _mm256_loadu_ps(p.cast()) } }
    }

    /// e^x for 8 lanes: as the AVX-512 body's `exp16`, with 2^n built in the exponent field (x
    /// clamped to −87 ..= 88: below, e^x is under f32's normal range and the result is 0 to
    /// within 1e-38; above, it would overflow the exponent field, and e^88 = 1.65e38 stands in).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let y = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
        let f = _mm256_sub_ps(y, n);
        let c = super::EXP2_COEFFS;
        let mut p = _mm256_set1_ps(c[6]);
        for &ci in c[..6].iter().rev() {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(ci));
        }
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// As the AVX-512 body's `decode_group`: runs a compiled shape or returns false.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; the contract of the AVX-512 body.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn decode_group<T: CacheValue>(
        q: &[f32],
        heads: usize,
        k: HeadCache<'_, T>,
        v: HeadCache<'_, T>,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
        stats: &mut [f32],
    ) -> bool {
        // SAFETY: the instance called matches `heads` and `hd` (caller's contract otherwise).
        unsafe { simd_shapes!(group, 8, heads, q.len() / heads, (q, k, v, scale, scores, out, stats)) };
        true
    }

    /// `H` query heads of `8 C` columns (`C` a multiple of 8).
    ///
    /// # Safety
    /// As [`decode_group`], with `heads == H` and `hd == 8 C`.
    #[allow(clippy::needless_range_loop)] // register arrays indexed by head and chunk
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group<const H: usize, const C: usize, T: CacheValue>(
        q: &[f32],
        k: HeadCache<'_, T>,
        v: HeadCache<'_, T>,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
        stats: &mut [f32],
    ) {
        let (len, qp, sp) = (k.len, q.as_ptr(), scores.as_mut_ptr());
        // Chunks of 8 values per 64-byte cache line (one prefetch each).
        let line = if T::HALF { 4 } else { 2 };
        let mut max = [f32::NEG_INFINITY; H];
        for t in 0..len {
            // SAFETY: row t < len holds 8 C values at its offset (contract).
            let kp = unsafe { k.data.as_ptr().add(t * k.stride + k.offset) };
            for c in (0..C).step_by(line) {
                _mm_prefetch::<_MM_HINT_T0>(kp.wrapping_add(AHEAD * k.stride + 8 * c) as *const i8);
            }
            let mut acc = [_mm256_setzero_ps(); H];
            for c in 0..C {
                // SAFETY: chunk c < C of the row; q holds H · 8 C values.
                unsafe {
                    let kv = load8(kp.add(8 * c));
                    for h in 0..H {
                        acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(8 * (h * C + c))), kv, acc[h]);
                    }
                }
            }
            for h in 0..H {
                let s = hsum(acc[h]) * scale;
                max[h] = max[h].max(s);
                // SAFETY: h · len + t < H · len <= scores.len().
                unsafe { *sp.add(h * len + t) = s };
            }
        }
        for h in 0..H {
            let row = &mut scores[h * len..(h + 1) * len];
            let (vmax, mut vsum) = (_mm256_set1_ps(max[h]), _mm256_setzero_ps());
            let mut it = row.chunks_exact_mut(8);
            for ch in &mut it {
                // SAFETY: 8 scores at ch.
                unsafe {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(ch.as_ptr()), vmax));
                    _mm256_storeu_ps(ch.as_mut_ptr(), e);
                    vsum = _mm256_add_ps(vsum, e);
                }
            }
            let mut sum = hsum(vsum);
            for p in it.into_remainder() {
                *p = (*p - max[h]).exp();
                sum += *p;
            }
            stats[2 * h] = max[h];
            stats[2 * h + 1] = sum;
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|p| *p *= inv);
        }
        for h in 0..H {
            for cb in (0..C).step_by(8) {
                let mut acc = [_mm256_setzero_ps(); 8];
                for t in 0..len {
                    // SAFETY: row t < len of v holds 8 C values at its offset (contract); columns
                    // 8 (cb + c) < 8 C; h · len + t < scores.len().
                    unsafe {
                        let vp = v.data.as_ptr().add(t * v.stride + v.offset + 8 * cb);
                        if h == 0 && cb == 0 {
                            for c in (0..C).step_by(line) {
                                _mm_prefetch::<_MM_HINT_T0>(vp.wrapping_add(AHEAD * v.stride + 8 * c) as *const i8);
                            }
                        }
                        let p = _mm256_broadcast_ss(&*sp.add(h * len + t));
                        for c in 0..8 {
                            acc[c] = _mm256_fmadd_ps(p, load8(vp.add(8 * c)), acc[c]);
                        }
                    }
                }
                for c in 0..8 {
                    // SAFETY: out has H · 8 C values.
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * (h * C + cb + c)), acc[c]) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use rand::{Rng, SeedableRng};

    /// Every path, on f32 and on f16 caches holding the same values (drawn as f16), against the
    /// scalar path on the f32 one.
    #[test]
    fn every_path_matches_the_scalar_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut draw = |n: usize, r: f32| -> (Vec<f32>, Vec<f16>) {
            let h: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.random_range(-r..r))).collect();
            (h.iter().map(|x| x.to_f32()).collect(), h)
        };
        for (hd, stride, offset, heads) in [
            (64usize, 192usize, 128usize, 3usize),
            (64, 192, 0, 1),
            (16, 16, 0, 2),
            (48, 100, 7, 1),
            (8, 24, 8, 4),
            (128, 128, 0, 2),
        ] {
            for len in [1usize, 2, 15, 16, 17, 300] {
                let ((k, k16), (v, v16)) = (draw(len * stride, 3.0), draw(len * stride, 1.0));
                let q = draw(heads * hd, 1.0).0;
                let view = |data| HeadCache { data, stride, offset, len };
                let mut want = vec![0f32; q.len()];
                let mut stats = vec![0f32; 2 * heads];
                let mut scores = vec![0f32; heads * len + 3];
                decode_group_on(Isa::Scalar, &q, heads, view(&k), view(&v), 0.125, &mut scores, &mut want, &mut stats)
                    .unwrap();
                for isa in Isa::available() {
                    for half in [false, true] {
                        let mut got = vec![f32::NAN; q.len()];
                        let mut got_stats = vec![f32::NAN; 2 * heads];
                        let (o, st, sc) = (&mut got, &mut got_stats, &mut scores);
                        if half {
                            let view = |data| HeadCache { data, stride, offset, len };
                            decode_group_on(isa, &q, heads, view(&k16), view(&v16), 0.125, sc, o, st).unwrap();
                        } else {
                            decode_group_on(isa, &q, heads, view(&k), view(&v), 0.125, sc, o, st).unwrap();
                        }
                        for (g, w) in got.iter().zip(&want) {
                            assert!((g - w).abs() <= 2e-5, "{isa:?} f16={half} hd={hd} len={len}: {g} vs {w}");
                        }
                        for (g, w) in got_stats.iter().zip(&stats) {
                            let ok = (g - w).abs() <= 1e-5 * (1.0 + w.abs());
                            assert!(ok, "{isa:?} f16={half} stats hd={hd} len={len}: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn short_caches_and_buffers_are_refused() {
        let k = vec![0f32; 100];
        let kc = HeadCache { data: &k, stride: 64, offset: 0, len: 2 };
        let st = &mut [0.0; 2];
        let err = decode_group(&[0.0; 64], 1, kc, kc, 1.0, &mut [0.0; 2], &mut [0.0; 64], st).unwrap_err().to_string();
        assert!(err.contains("keys"), "{err}");
        let kc = HeadCache { data: &k, stride: 64, offset: 0, len: 1 };
        assert!(decode_group(&[0.0; 64], 1, kc, kc, 1.0, &mut [], &mut [0.0; 64], st).is_err());
        assert!(decode_group(&[0.0; 64], 3, kc, kc, 1.0, &mut [0.0; 3], &mut [0.0; 64], st).is_err());
        assert!(decode_group(&[0.0; 64], 1, kc, kc, 1.0, &mut [0.0; 1], &mut [0.0; 64], &mut [0.0; 3]).is_err());
        assert!(merge_partials(&[0.0; 64], 1, &mut [0.0; 64]).is_err());
    }

    #[test]
    fn position_ranges_merge_into_the_attention_over_all_of_them() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (hd, stride, heads, len) = (64usize, 192usize, 3usize, 577usize);
        let k: Vec<f32> = (0..len * stride).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let v: Vec<f32> = (0..len * stride).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let q: Vec<f32> = (0..heads * hd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let cache =
            |data: &[f32], start: usize, end: usize| -> Vec<f32> { data[start * stride..end * stride].to_vec() };
        let mut want = vec![0f32; heads * hd];
        let whole = HeadCache { data: &k, stride, offset: 64, len };
        let whole_v = HeadCache { data: &v, stride, offset: 64, len };
        decode_group_on(
            Isa::Scalar,
            &q,
            heads,
            whole,
            whole_v,
            0.125,
            &mut vec![0f32; heads * len],
            &mut want,
            &mut [0f32; 6],
        )
        .unwrap();
        for isa in Isa::available() {
            // Uneven ranges, one of them empty (a thread with nothing to do for this sequence).
            let cuts = [0usize, 100, 100, 350, 577];
            let width = heads * hd + 2 * heads;
            let mut partials = vec![f32::NAN; (cuts.len() - 1) * width];
            for (p, part) in partials.chunks_exact_mut(width).enumerate() {
                let (a, b) = (cuts[p], cuts[p + 1]);
                let (o, st) = part.split_at_mut(heads * hd);
                if a == b {
                    o.fill(0.0);
                    for h in 0..heads {
                        st[2 * h..2 * h + 2].copy_from_slice(&[f32::NEG_INFINITY, 0.0]);
                    }
                    continue;
                }
                let (kc, vc) = (cache(&k, a, b), cache(&v, a, b));
                let view = |d| HeadCache { data: d, stride, offset: 64, len: b - a };
                decode_group_on(isa, &q, heads, view(&kc), view(&vc), 0.125, &mut vec![0f32; heads * (b - a)], o, st)
                    .unwrap();
            }
            let mut got = vec![f32::NAN; heads * hd];
            merge_partials(&partials, heads, &mut got).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 2e-5, "{isa:?}: {g} vs {w}");
            }
        }
    }
}
