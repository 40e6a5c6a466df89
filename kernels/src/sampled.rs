//! The sampled product of sparse training: the weight gradient of a bitmask-sparse linear at its
//! stored positions only.
//!
//! For `y[n, rows] = x[n, cols] · Wᵀ` with `W` sparse under a frozen mask, the gradient of a loss
//! with respect to a stored weight `(r, c)` is `Σ_t dy[t, r] · x[t, c]`: one dot product over the
//! batch's tokens per stored weight (a *sampled dense–dense* product, SDDMM). Pruned positions are
//! never computed, so the work is `2 · nnz · n` flops, `1 − s` of the dense `dyᵀ · x`.
//!
//! Layout and loop order: `x` and `dy` are transposed (`xᵀ[c]`, `dyᵀ[r]`: one row of tokens
//! each, zero-padded to whole vectors, rows one cache line more than that apart), so each stored
//! weight is a dot product of two contiguous rows. Tokens go in passes of 512 and columns in
//! blocks of 32 (one mask word per row); every row of the task passes over a block. A row's set
//! bits in a block go eight at a time: per vector of tokens one load of `dyᵀ[r]` shared by the
//! eight, one load of each `xᵀ[c_j]` and one FMA into its own accumulator; the eight
//! accumulators end in one transposed reduction (24 shuffles and adds) and one vector add to
//! the eight outputs, which are adjacent. The rest of the block's bits (up to seven) take one
//! call with eight or more chains and a horizontal sum each.
//!
//! Where the time goes (Emerald Rapids, `perf`): the inner loop is nine loads and eight FMAs per
//! vector of tokens, bound by the two loads a cycle; the transposes take about a sixth (vector
//! 16 × 16 blocks, `crate::transpose`). Measured speed-ups are in docs/training.md.
//!
//! Each output is one task's sum in a fixed order: the result does not depend on the number of
//! threads.

use rayon::prelude::*;

use crate::bitmask::BitmaskView;
use crate::cpu::{self, Isa};
use crate::prefill;
use crate::{KernelError, Result};

/// `out[k] = Σ_t dy[t, r_k] · x[t, c_k]` for every stored entry `k` of `w` (row-major, the order
/// of `w.values()`, which are not read): `x` is `[n, cols]`, `dy` `[n, rows]`, `out` `nnz` long.
pub fn sampled_matmul(w: &BitmaskView<'_, f32>, x: &[f32], dy: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
    sampled_matmul_on(cpu::isa(), w, x, dy, n, out)
}

/// [`sampled_matmul`] on an explicit path (`Isa::Scalar` is the reference).
pub fn sampled_matmul_on(
    isa: Isa,
    w: &BitmaskView<'_, f32>,
    x: &[f32],
    dy: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    let (rows, cols) = (w.rows(), w.cols());
    if !cpu::supports(isa) {
        return Err(KernelError::Unsupported(format!("the {} kernels on this CPU", isa.name())));
    }
    if x.len() != n * cols || dy.len() != n * rows || out.len() != w.nnz() {
        return Err(KernelError::Shape(format!(
            "sampled product of a [{rows}, {cols}] mask over {n} tokens needs x of {} values, dy of {} and out of {}; got {}, {} and {}",
            n * cols,
            n * rows,
            w.nnz(),
            x.len(),
            dy.len(),
            out.len()
        )));
    }
    out.fill(0.0);
    if n == 0 || out.is_empty() {
        return Ok(());
    }
    if !prefill::supported(isa) {
        scalar(w, x, dy, n, out);
        return Ok(());
    }
    let lanes = if isa == Isa::Avx512 { 16 } else { 8 };
    let tokens = n.next_multiple_of(lanes);
    // Row stride: one cache line past the tokens, so that rows are not a power of two of bytes
    // apart (at n = 512 the 16 rows of a block fell into the same L1 sets and evicted each other).
    let len = tokens + 16;
    // The transposed operands live in this thread's buffers between calls (fresh megabytes per
    // call were page-faulted in every time); a nested call on this thread gets fresh ones.
    crate::scratch::with_local(&SCRATCH, |(xbuf, gbuf)| product(isa, w, x, dy, n, tokens, len, out, xbuf, gbuf));
    Ok(())
}

thread_local! {
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

#[allow(clippy::too_many_arguments)]
fn product(
    isa: Isa,
    w: &BitmaskView<'_, f32>,
    x: &[f32],
    dy: &[f32],
    n: usize,
    tokens: usize,
    len: usize,
    out: &mut [f32],
    xbuf: &mut Vec<f32>,
    gbuf: &mut Vec<f32>,
) {
    let (rows, cols) = (w.rows(), w.cols());
    let xt = prefill::aligned(xbuf, cols * len);
    let gt = prefill::aligned(gbuf, rows * len);
    transpose(isa, x, n, cols, len, xt);
    transpose(isa, dy, n, rows, len, gt);
    let (xt, gt) = (&*xt, &*gt);
    let bounds = prefill::balanced_rows(w, 4 * cpu::threads());
    // Each task owns the outputs of its rows: values offsets[r0] .. offsets[r1].
    let offsets = w.row_offsets();
    let start = |r: usize| if r == rows { w.nnz() } else { offsets[r] as usize };
    let mut parts = Vec::with_capacity(bounds.len());
    let mut rest = out;
    for r in bounds.windows(2) {
        let (o, tail) = std::mem::take(&mut rest).split_at_mut(start(r[1]) - start(r[0]));
        parts.push((r[0], r[1], o));
        rest = tail;
    }
    parts
        .into_par_iter()
        .for_each(|(r0, r1, o)| rows_task(isa, w, r0, r1, xt, &gt[r0 * len..r1 * len], tokens, len, o));
}

/// `t[c · len + i] = a[i, c]` for `a` `[n, cols]`, zeros for `i` in `n..len`; over the pool,
/// 16 rows of `t` per task.
fn transpose(isa: Isa, a: &[f32], n: usize, cols: usize, len: usize, t: &mut [f32]) {
    const COLS: usize = 16;
    t.par_chunks_mut(COLS * len).enumerate().for_each(|(k, dst)| {
        let c0 = k * COLS;
        let w = dst.len() / len;
        crate::transpose::transpose(isa, &a[c0.min(a.len())..], n, w, cols, dst, len, len);
    });
}

/// The reference: one f32 dot product per stored entry, tokens in order.
fn scalar(w: &BitmaskView<'_, f32>, x: &[f32], dy: &[f32], n: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let mb = cols.div_ceil(8);
    let mut k = 0;
    for r in 0..rows {
        for c in 0..cols {
            if w.bitmask()[r * mb + c / 8] >> (c % 8) & 1 == 1 {
                out[k] = (0..n).map(|t| dy[t * rows + r] * x[t * cols + c]).sum();
                k += 1;
            }
        }
    }
}

/// The outputs `o` of rows `r0..r1`: `gt` is those rows of `dyᵀ`, `xt` all of `xᵀ`, rows `len`
/// apart holding `tokens` tokens (zero padding past `n`).
#[allow(clippy::too_many_arguments)]
fn rows_task(
    isa: Isa,
    w: &BitmaskView<'_, f32>,
    r0: usize,
    r1: usize,
    xt: &[f32],
    gt: &[f32],
    tokens: usize,
    len: usize,
    o: &mut [f32],
) {
    let cols = w.cols();
    let mb = cols.div_ceil(8);
    let mask = &w.bitmask()[r0 * mb..r1 * mb];
    let base = w.row_offsets().get(r0).map_or(0, |&v| v as usize);
    let offsets: Vec<usize> = w.row_offsets()[r0..r1].iter().map(|&v| v as usize - base).collect();
    assert!(xt.len() == cols * len && gt.len() == (r1 - r0) * len && tokens <= len, "sampled rows_task: shapes");
    assert!(offsets.last().is_none_or(|&l| l <= o.len()), "sampled rows_task: outputs");
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa` is available and one of the two kernels' (checked by the caller through
        // `cpu::supports` and `prefill::supported`); the view was validated, so each row's set
        // bits count its outputs from its offset on, all within `o` (the caller split the
        // outputs at the rows' offsets); the transposed rows have the asserted lengths, and
        // `len` is a whole number of vectors (the caller rounded it up).
        unsafe {
            if isa == Isa::Avx512 {
                avx512::rows_task(mask, &offsets, cols, xt, gt, tokens, len, o)
            } else {
                avx2::rows_task(mask, &offsets, cols, xt, gt, tokens, len, o)
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (mask, offsets, xt, gt, o, tokens, len);
        unreachable!("`prefill::supported` holds on x86_64 only");
    }
}

macro_rules! kernel {
    ($isa:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident, $fma:ident, $reduce:path, $reduce8:path) => {
        #[cfg(target_arch = "x86_64")]
        mod $isa {
            #[allow(unused_imports)]
            use std::arch::x86_64::*;

            const LANES: usize = $lanes;
            /// Tokens per pass and columns per block (one 32-bit mask word of each row), the
            /// best of passes of 128–512 and blocks of 8–64 on Emerald Rapids at n = 512: longer
            /// passes and wider blocks mean fewer reductions and fuller groups of eight. A
            /// block of `xᵀ` (64 KiB) is more than L1 holds, yet forcing every group onto the
            /// same eight rows, certain to be in L1, did not change the time.
            const SPAN: usize = 512;
            const COLS: usize = 32;

            /// Eight dot products of `g` with the `xt` rows `c` over `span` tokens, added to
            /// `out[0..8]`: one load of `g` per eight FMAs, eight independent chains, and one
            /// transposed reduction of the eight accumulators into a vector of eight sums.
            ///
            /// # Safety
            /// The instruction set is available; `g` and each `xt` row `c[j]` hold `span` values,
            /// `span` a multiple of LANES; `out` holds 8 values.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn dots8(g: *const f32, xt: *const f32, c: &[usize; 8], len: usize, span: usize, out: *mut f32) {
                let mut acc = [$zero(); 8];
                // SAFETY: rows c[j] of xt (contract).
                let xp: [*const f32; 8] = std::array::from_fn(|j| unsafe { xt.add(c[j] * len) });
                let mut t = 0;
                while t < span {
                    // SAFETY: t + LANES <= span within g and each row.
                    unsafe {
                        let gv = $load(g.add(t));
                        for j in 0..8 {
                            acc[j] = $fma(gv, $load(xp[j].add(t)), acc[j]);
                        }
                    }
                    t += LANES;
                }
                // SAFETY: out holds 8 values (contract).
                unsafe {
                    let sums = $reduce8(acc);
                    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), sums));
                }
            }

            /// `J` dot products of `g` with the `xt` rows `c` (rows `len` apart), over `span`
            /// tokens, added to `out`: the rest of a row's block after its groups of eight.
            ///
            /// # Safety
            /// As [`dots8`], `out` holding `J` values.
            #[inline]
            #[target_feature(enable = $features)]
            #[allow(clippy::needless_range_loop)] // accumulators indexed by entry
            unsafe fn dots<const J: usize, const S: usize>(
                g: *const f32,
                xt: *const f32,
                c: &[usize; J],
                len: usize,
                span: usize,
                out: *mut f32,
            ) {
                // S sets of accumulators taking alternate vectors: J · S independent chains.
                let mut acc = [[$zero(); J]; S];
                // SAFETY: rows c[j] of xt (contract).
                let xp: [*const f32; J] = std::array::from_fn(|j| unsafe { xt.add(c[j] * len) });
                let mut t = 0;
                while t + S * LANES <= span {
                    for s in 0..S {
                        // SAFETY: t + (s + 1)·LANES <= span within g and each row.
                        unsafe {
                            let gv = $load(g.add(t + s * LANES));
                            for j in 0..J {
                                acc[s][j] = $fma(gv, $load(xp[j].add(t + s * LANES)), acc[s][j]);
                            }
                        }
                    }
                    t += S * LANES;
                }
                while t < span {
                    // SAFETY: t + LANES <= span (span a multiple of LANES).
                    unsafe {
                        let gv = $load(g.add(t));
                        for j in 0..J {
                            acc[0][j] = $fma(gv, $load(xp[j].add(t)), acc[0][j]);
                        }
                    }
                    t += LANES;
                }
                for j in 0..J {
                    let mut sum = 0f32;
                    for s in 0..S {
                        sum += $reduce(acc[s][j]);
                    }
                    // SAFETY: out holds J values (contract).
                    unsafe { *out.add(j) += sum };
                }
            }

            /// The last `k < 8` columns `p` of a row, as [`dots`].
            ///
            /// # Safety
            /// As [`dots`], `out` holding `k` values.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn rest(
                g: *const f32,
                x0: *const f32,
                p: &[usize; 8],
                k: u8,
                len: usize,
                span: usize,
                out: *mut f32,
            ) {
                let c = |j: usize| p[j];
                // SAFETY: the contract, passed on.
                unsafe {
                    match k {
                        7 => dots::<7, 1>(g, x0, &std::array::from_fn(c), len, span, out),
                        6 => dots::<6, 1>(g, x0, &std::array::from_fn(c), len, span, out),
                        5 => dots::<5, 2>(g, x0, &std::array::from_fn(c), len, span, out),
                        4 => dots::<4, 2>(g, x0, &std::array::from_fn(c), len, span, out),
                        3 => dots::<3, 2>(g, x0, &std::array::from_fn(c), len, span, out),
                        2 => dots::<2, 4>(g, x0, &std::array::from_fn(c), len, span, out),
                        1 => dots::<1, 4>(g, x0, &[p[0]], len, span, out),
                        _ => {}
                    }
                }
            }

            /// The outputs of `offsets.len()` rows.
            ///
            /// # Safety
            /// The instruction set is available; `mask` is `offsets.len() · cols.div_ceil(8)` bytes
            /// with zero padding bits; row `r`'s outputs `o[offsets[r]..]` are at least as many as
            /// its set bits; `xt.len() == cols · len`, `gt.len() == offsets.len() · len` (rows
            /// `len` apart), `tokens <= len` a multiple of LANES.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn rows_task(
                mask: &[u8],
                offsets: &[usize],
                cols: usize,
                xt: &[f32],
                gt: &[f32],
                tokens: usize,
                len: usize,
                o: &mut [f32],
            ) {
                o.fill(0.0);
                let mb = cols.div_ceil(8);
                let (mp, op, xp) = (mask.as_ptr(), o.as_mut_ptr(), xt.as_ptr());
                let mut cursor = vec![0; offsets.len()];
                for t0 in (0..tokens).step_by(SPAN) {
                    let span = (tokens - t0).min(SPAN);
                    cursor.copy_from_slice(offsets);
                    // SAFETY: t0 < tokens <= len: within every row of xt.
                    let x0 = unsafe { xp.add(t0) };
                    for c0 in (0..cols).step_by(COLS) {
                        let width = (cols - c0).min(COLS);
                        for (r, cur) in cursor.iter_mut().enumerate() {
                            // SAFETY: the block's mask bytes lie within row r's mb bytes.
                            let mut bits = unsafe {
                                let at = mp.add(r * mb + c0 / 8);
                                let mut m = 0u64;
                                for b in 0..width.div_ceil(8) {
                                    m |= (*at.add(b) as u64) << (8 * b);
                                }
                                m
                            };
                            if bits == 0 {
                                continue;
                            }
                            // SAFETY: row r of gt has len values, t0 < len; the row's outputs
                            // from its cursor on are within o (contract).
                            let (g, out) = unsafe { (gt.as_ptr().add(r * len + t0), op.add(*cur)) };
                            let mut left = bits.count_ones() as usize;
                            let mut next = || {
                                let c = c0 + bits.trailing_zeros() as usize;
                                bits &= bits - 1;
                                c
                            };
                            let mut done = 0;
                            while left >= 8 {
                                let c: [usize; 8] = std::array::from_fn(|_| next());
                                // SAFETY: columns c < cols (set bits of row r's block); eight of
                                // the row's outputs remain at `out + done`.
                                unsafe { dots8(g, x0, &c, len, span, out.add(done)) };
                                (done, left) = (done + 8, left - 8);
                            }
                            let p: [usize; 8] = std::array::from_fn(|j| if j < left { next() } else { 0 });
                            // SAFETY: as above, `left` outputs remain.
                            unsafe { rest(g, x0, &p, left as u8, len, span, out.add(done)) };
                            *cur += done + left;
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod reduce {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn sum512(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn sum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// The sums of eight vectors, as one vector: 24 shuffles and adds for the eight.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn sums8_512(a: [__m512; 8]) -> __m256 {
        // Pairs: [a(l0 + l2), a(l1 + l3), b(l0 + l2), b(l1 + l3)] (128-bit lanes l).
        let pair = |a, b| _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
        let (s0, s1, s2, s3) = (pair(a[0], a[1]), pair(a[2], a[3]), pair(a[4], a[5]), pair(a[6], a[7]));
        // Lane k: four partial sums of vector k (c0: vectors 0..4, c1: 4..8).
        let quad = |s, t| _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(s, t), _mm512_shuffle_f32x4::<0xDD>(s, t));
        let (c0, c1) = (quad(s0, s1), quad(s2, s3));
        // Lane k: [p0 + p1, p2 + p3, q0 + q1, q2 + q3], then [P, P, Q, Q] (P vector k, Q 4 + k).
        let e = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(c0, c1), _mm512_shuffle_ps::<0xDD>(c0, c1));
        let f = _mm512_add_ps(e, _mm512_permute_ps::<0xB1>(e));
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, f))
    }

    /// The sums of eight vectors, as one vector (a tree of horizontal adds).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn sums8_256(a: [__m256; 8]) -> __m256 {
        let (h01, h23) = (_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let (h45, h67) = (_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        let (lo, hi) = (_mm256_hadd_ps(h01, h23), _mm256_hadd_ps(h45, h67));
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(lo, hi), _mm256_permute2f128_ps::<0x31>(lo, hi))
    }
}

kernel!(
    avx512,
    "avx512f,avx512bw,avx512vl,avx2,fma,popcnt,bmi1",
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_fmadd_ps,
    super::reduce::sum512,
    super::reduce::sums8_512
);
kernel!(
    avx2,
    "avx2,fma,popcnt,bmi1",
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_fmadd_ps,
    super::reduce::sum256,
    super::reduce::sums8_256
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmask::BitmaskMatrix;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn case(rows: usize, cols: usize, n: usize, sparsity: f64, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| if rng.random::<f64>() < sparsity { 0.0 } else { rng.random_range(-1.0f32..1.0) })
            .collect();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let dy: Vec<f32> = (0..n * rows).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let m = BitmaskMatrix::from_dense(&w, rows, cols).unwrap();
        let v = m.view();
        let mut want = vec![0f32; v.nnz()];
        sampled_matmul_on(Isa::Scalar, &v, &x, &dy, n, &mut want).unwrap();
        // The reference against the definition in f64 (sum of |products| bounds the rounding).
        let mb = cols.div_ceil(8);
        let mut k = 0;
        for r in 0..rows {
            for c in 0..cols {
                if m.bitmask()[r * mb + c / 8] >> (c % 8) & 1 == 1 {
                    let exact: f64 = (0..n).map(|t| dy[t * rows + r] as f64 * x[t * cols + c] as f64).sum();
                    let scale: f64 = (0..n).map(|t| (dy[t * rows + r] as f64 * x[t * cols + c] as f64).abs()).sum();
                    assert!((want[k] as f64 - exact).abs() <= 1e-5 * scale + 1e-30, "scalar ({r}, {c})");
                    k += 1;
                }
            }
        }
        assert_eq!(k, v.nnz());
        for isa in Isa::available() {
            let mut got = vec![f32::NAN; v.nnz()];
            sampled_matmul_on(isa, &v, &x, &dy, n, &mut got).unwrap();
            for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 2e-5 * (n as f32).sqrt() * (1.0 + b.abs()),
                    "{} entry {k}: {a} vs {b}",
                    isa.name()
                );
            }
            // Deterministic: the same result again (another task split would give it too).
            let mut again = vec![0f32; v.nnz()];
            sampled_matmul_on(isa, &v, &x, &dy, n, &mut again).unwrap();
            assert_eq!(got, again, "{}", isa.name());
        }
    }

    #[test]
    fn sampled_product_equals_the_reference_over_shapes() {
        // Tokens: below a vector, between, whole tiles and a partial last tile; columns not a
        // multiple of 64 or 8; sparsities from dense to nearly empty.
        for (i, &(rows, cols, n, s)) in [
            (1, 1, 1, 0.0),
            (3, 7, 5, 0.3),
            (17, 70, 33, 0.5),
            (64, 64, 128, 0.7),
            (40, 130, 200, 0.9),
            (33, 200, 300, 0.0),
            (9, 576, 129, 0.7),
            (20, 100, 600, 0.5),
            (12, 64, 1030, 0.2),
        ]
        .iter()
        .enumerate()
        {
            case(rows, cols, n, s, i as u64);
        }
    }

    #[test]
    fn sampled_product_refuses_wrong_shapes() {
        let m = BitmaskMatrix::from_dense(&[1f32, 0., 2., 3.], 2, 2).unwrap();
        let mut out = vec![0f32; 3];
        let e = sampled_matmul(&m.view(), &[0.; 4], &[0.; 3], 2, &mut out).unwrap_err();
        assert!(e.to_string().contains("dy of 4"), "{e}");
        let e = sampled_matmul(&m.view(), &[0.; 4], &[0.; 4], 2, &mut out[..2]).unwrap_err();
        assert!(e.to_string().contains("out of 3"), "{e}");
    }
}
