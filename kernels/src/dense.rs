//! Dense products with f32 activations and f32 / bf16 / f16 weights.
//!
//! Weights stay in their checkpoint dtype (a memory-mapped bf16 file is never widened in memory);
//! they are widened to f32 in registers (GEMV) or per cache-sized panel (GEMM).
//!
//! Layout convention everywhere: a weight is `[rows, cols]` row-major (PyTorch's `[out, in]`),
//! activations are `[n, cols]` row-major, and products are `y[n, rows] = x[n, cols] · Wᵀ`.

use std::cell::RefCell;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::{self, Isa};
use crate::{KernelError, Result};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// A weight element type the dense kernels read directly.
pub trait Element: Copy + Send + Sync + bytemuck::Pod + sealed::Sealed + 'static {
    const NAME: &'static str;
    fn to_f32(self) -> f32;
    /// `Σ w[i]·x[i]` on the given path; `w.len() == x.len()` is the caller's invariant.
    fn dot(isa: Isa, w: &[Self], x: &[f32]) -> f32;
    /// Widens `src` into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    /// `Some` when the slice already is f32 (no widening copy needed).
    fn as_f32(src: &[Self]) -> Option<&[f32]>;
}

fn dot_scalar<T: Element>(w: &[T], x: &[f32]) -> f32 {
    // Four partial sums, like the SIMD paths, so the reference is not needlessly less accurate.
    let mut acc = [0f32; 4];
    let chunks = w.len() / 4;
    for c in 0..chunks {
        for (u, a) in acc.iter_mut().enumerate() {
            *a += w[4 * c + u].to_f32() * x[4 * c + u];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for i in 4 * chunks..w.len() {
        s += w[i].to_f32() * x[i];
    }
    s
}

macro_rules! element_impl {
    ($t:ty, $name:literal, $avx2_dot:ident, $to_f32:expr, $as_f32:expr) => {
        impl Element for $t {
            const NAME: &'static str = $name;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                ($to_f32)(self)
            }
            #[inline]
            fn dot(isa: Isa, w: &[Self], x: &[f32]) -> f32 {
                debug_assert_eq!(w.len(), x.len());
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Isa::Avx2` and `Isa::Avx512` are only ever produced by `cpu` after
                    // detecting AVX2, FMA and F16C on this CPU. AVX-512 has no dense body yet.
                    Isa::Avx2 | Isa::Avx512 => unsafe { avx2::$avx2_dot(w, x) },
                    _ => dot_scalar(w, x),
                }
            }
            #[inline]
            fn as_f32(src: &[Self]) -> Option<&[f32]> {
                ($as_f32)(src)
            }
        }
    };
}

fn f32_identity(s: &[f32]) -> Option<&[f32]> {
    Some(s)
}
fn not_f32<T>(_: &[T]) -> Option<&[f32]> {
    None
}

element_impl!(f32, "f32", dot_f32, |v: f32| v, f32_identity);
element_impl!(bf16, "bf16", dot_bf16, |v: bf16| v.to_f32(), not_f32);
element_impl!(f16, "f16", dot_f16, |v: f16| v.to_f32(), not_f32);

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    // Loads of 8 consecutive elements widened to f32. Callers guarantee 8 readable elements at `p`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        // SAFETY: 8 readable f32 at `p` (caller); unaligned load.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        // SAFETY: 8 readable bf16 = 16 bytes at `p` (caller); bf16 is the top half of an f32.
        let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        // SAFETY: 8 readable f16 = 16 bytes at `p` (caller).
        let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_cvtph_ps(h)
    }

    /// Horizontal sum of 8 lanes (shared with the bitmask kernels).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Elements ahead of the current position the dot kernels prefetch (2 KiB of f32): one core
    /// cannot keep enough cache misses in flight on demand loads alone to saturate memory.
    const PREFETCH: usize = 512;
    macro_rules! dot {
        ($name:ident, $t:ty, $load:ident) => {
            /// Dot product of equally long slices.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) fn $name(w: &[$t], x: &[f32]) -> f32 {
                let n = w.len().min(x.len());
                let (wp, xp) = (w.as_ptr(), x.as_ptr());
                // 4 accumulators × 8 lanes: enough independent FMA chains to cover FMA latency
                // (4 cycles × 2 ports) on the weight stream; 8 of 16 ymm registers in use.
                let mut a0 = _mm256_setzero_ps();
                let mut a1 = _mm256_setzero_ps();
                let mut a2 = _mm256_setzero_ps();
                let mut a3 = _mm256_setzero_ps();
                let mut i = 0;
                while i + 32 <= n {
                    // The weight stream PREFETCH elements ahead (past the row end that is the next
                    // row, which is contiguous; prefetches never fault).
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH + 16) as *const i8);
                    // SAFETY: i + 32 <= n, so elements i..i+32 are in bounds of both slices.
                    unsafe {
                        a0 = _mm256_fmadd_ps($load(wp.add(i)), load_f32(xp.add(i)), a0);
                        a1 = _mm256_fmadd_ps($load(wp.add(i + 8)), load_f32(xp.add(i + 8)), a1);
                        a2 = _mm256_fmadd_ps($load(wp.add(i + 16)), load_f32(xp.add(i + 16)), a2);
                        a3 = _mm256_fmadd_ps($load(wp.add(i + 24)), load_f32(xp.add(i + 24)), a3);
                    }
                    i += 32;
                }
                while i + 8 <= n {
                    // SAFETY: i + 8 <= n.
                    unsafe {
                        a0 = _mm256_fmadd_ps($load(wp.add(i)), load_f32(xp.add(i)), a0);
                    }
                    i += 8;
                }
                let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
                while i < n {
                    s += crate::dense::Element::to_f32(w[i]) * x[i];
                    i += 1;
                }
                s
            }
        };
    }
    dot!(dot_f32, f32, load_f32);

    /// Sum of a slice read the way the dot kernels read weights (same loads, same prefetch): the
    /// bandwidth probe, so that the ceiling decode is compared with is what such a loop can reach.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn stream_sum(w: &[f32]) -> f32 {
        let (n, wp) = (w.len(), w.as_ptr());
        let (mut a0, mut a1, mut a2, mut a3) =
            (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH + 16) as *const i8);
            // SAFETY: i + 32 <= n.
            unsafe {
                a0 = _mm256_add_ps(load_f32(wp.add(i)), a0);
                a1 = _mm256_add_ps(load_f32(wp.add(i + 8)), a1);
                a2 = _mm256_add_ps(load_f32(wp.add(i + 16)), a2);
                a3 = _mm256_add_ps(load_f32(wp.add(i + 24)), a3);
            }
            i += 32;
        }
        hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + w[i..].iter().sum::<f32>()
    }
    dot!(dot_bf16, bf16, load_bf16);
    dot!(dot_f16, f16, load_f16);

    /// Batched decode: `out[r · N + i] = w[r] · x[i]` for every row of `w` (`[rows, cols]`) and
    /// the `N` activation rows of `x` (`[N, cols]`). Each 8-column block of a weight row is loaded
    /// once and multiplied into `N` accumulators (the activations stay in L1), so the weights are
    /// streamed once for the whole batch; with `N ≤ 4` two blocks are in flight (two accumulator
    /// sets) so that enough independent FMA chains cover the FMA latency.
    ///
    /// # Safety
    /// AVX2, FMA and F16C (the features `load_f32` is compiled for: with fewer, it is not inlined
    /// and every load becomes a call); `w.len() == out.len() / N · cols`, `x.len() == N · cols`,
    /// `out.len() % N == 0`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn gemv_multi_f32<const N: usize>(w: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
        let rows = out.len() / N;
        let full = cols / 8;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        for r in 0..rows {
            // SAFETY: row r < rows starts here (w is [rows, cols]).
            let wr = unsafe { wp.add(r * cols) };
            let mut a0 = [_mm256_setzero_ps(); N];
            let mut a1 = [_mm256_setzero_ps(); N];
            let mut j = 0;
            if N <= 4 {
                while j + 2 <= full {
                    let o = 8 * j;
                    _mm_prefetch::<_MM_HINT_T0>(wr.wrapping_add(o + PREFETCH) as *const i8);
                    // SAFETY: columns o .. o + 16 <= cols of row r and of every x row.
                    unsafe {
                        let (w0, w1) = (load_f32(wr.add(o)), load_f32(wr.add(o + 8)));
                        for (i, (s0, s1)) in a0.iter_mut().zip(a1.iter_mut()).enumerate() {
                            let xi = xp.add(i * cols + o);
                            *s0 = _mm256_fmadd_ps(w0, load_f32(xi), *s0);
                            *s1 = _mm256_fmadd_ps(w1, load_f32(xi.add(8)), *s1);
                        }
                    }
                    j += 2;
                }
            }
            while j < full {
                let o = 8 * j;
                if o % 16 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(wr.wrapping_add(o + PREFETCH) as *const i8);
                }
                // SAFETY: columns o .. o + 8 <= cols of row r and of every x row.
                unsafe {
                    let w0 = load_f32(wr.add(o));
                    for (i, s0) in a0.iter_mut().enumerate() {
                        *s0 = _mm256_fmadd_ps(w0, load_f32(xp.add(i * cols + o)), *s0);
                    }
                }
                j += 1;
            }
            let row = &w[r * cols..(r + 1) * cols];
            let outs = &mut out[r * N..(r + 1) * N];
            for (((o, xi), s0), s1) in outs.iter_mut().zip(x.chunks_exact(cols)).zip(a0).zip(a1) {
                let tail: f32 = row[8 * full..].iter().zip(&xi[8 * full..]).map(|(w, x)| w * x).sum();
                *o = hsum(_mm256_add_ps(s0, s1)) + tail;
            }
        }
    }

    use super::SMALL_GEMM_CHUNK_ROWS;

    /// Small-batch GEMM without packing: `out[r · n + i] = w[r] · x[i]` (`out` is `[rows, n]`) for
    /// the rows of `w` (`[rows, cols]`) and the `n` rows of `x` (`[n, cols]`). Both operands are
    /// read along their contiguous columns, so a tile of `R` weight rows × `N` activation rows keeps
    /// `R · N` independent FMA chains in registers and loads `R + N` vectors for `R · N` FMAs; the
    /// weights stream from memory once per chunk of [`SMALL_GEMM_CHUNK_ROWS`] rows and are re-read from L2 by
    /// each group of 4 activation rows (which stay in L1).
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `n >= 1`, `x.len() == n · cols`, `w.len() == out.len() / n · cols`,
    /// `out.len() % n == 0`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn gemm_f32(w: &[f32], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
        let rows = out.len() / n;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + SMALL_GEMM_CHUNK_ROWS).min(rows);
            let mut i = 0;
            while i < n {
                let g = (n - i).min(4);
                let mut r = r0;
                while r < r1 {
                    // Three weight rows per tile, single rows for the chunk's last one or two.
                    let k = if r + 3 <= r1 { 3 } else { 1 };
                    // SAFETY: rows r .. r + k <= rows and x rows i .. i + g <= n (the caller's
                    // shapes); out[(r + k') n + i + ii] < rows · n.
                    unsafe {
                        match k {
                            3 => tile_group::<3>(w, cols, x, n, r, i, g, out),
                            _ => tile_group::<1>(w, cols, x, n, r, i, g, out),
                        }
                    }
                    r += k;
                }
                i += g;
            }
            r0 = r1;
        }
    }

    /// The tile of `R` weight rows from `r` and `g` (1–4) activation rows from `i`.
    ///
    /// # Safety
    /// As [`tile`] with `N = g`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_group<const R: usize>(
        w: &[f32],
        cols: usize,
        x: &[f32],
        n: usize,
        r: usize,
        i: usize,
        g: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            match g {
                4 => tile::<R, 4>(w, cols, x, n, r, i, out),
                3 => tile::<R, 3>(w, cols, x, n, r, i, out),
                2 => tile::<R, 2>(w, cols, x, n, r, i, out),
                _ => tile::<R, 1>(w, cols, x, n, r, i, out),
            }
        }
    }

    /// One `R × N` tile of [`gemm_f32`]: weight rows `r ..`, activation rows `i ..`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `r + R` weight rows and `i + N <= n` activation rows exist; `out` is
    /// `[rows, n]`.
    #[allow(clippy::needless_range_loop)] // accumulators indexed by weight row and activation row
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile<const R: usize, const N: usize>(
        w: &[f32],
        cols: usize,
        x: &[f32],
        n: usize,
        r: usize,
        i: usize,
        out: &mut [f32],
    ) {
        let full = cols / 8;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        for j in 0..full {
            let o = 8 * j;
            let mut wv = [_mm256_setzero_ps(); R];
            for k in 0..R {
                // SAFETY: columns o .. o + 8 <= cols of weight row r + k (caller).
                wv[k] = unsafe { load_f32(wp.add((r + k) * cols + o)) };
            }
            for ii in 0..N {
                // SAFETY: columns o .. o + 8 <= cols of activation row i + ii (caller).
                let xv = unsafe { load_f32(xp.add((i + ii) * cols + o)) };
                for k in 0..R {
                    acc[k][ii] = _mm256_fmadd_ps(wv[k], xv, acc[k][ii]);
                }
            }
        }
        for k in 0..R {
            let wr = &w[(r + k) * cols + 8 * full..(r + k + 1) * cols];
            for ii in 0..N {
                let xr = &x[(i + ii) * cols + 8 * full..(i + ii + 1) * cols];
                let tail: f32 = wr.iter().zip(xr).map(|(a, b)| a * b).sum();
                out[(r + k) * n + i + ii] = hsum(acc[k][ii]) + tail;
            }
        }
    }
}

/// `Σ a[i]·b[i]` on the process's kernel path (attention scores); `None` when the lengths differ.
pub fn dot(a: &[f32], b: &[f32]) -> Option<f32> {
    (a.len() == b.len()).then(|| f32::dot(cpu::isa(), a, b))
}

/// `Σ v` streamed as the GEMV kernels stream weights (the read-bandwidth probe's loop).
pub(crate) fn stream_sum(isa: Isa, v: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2`/`Avx512` come from `cpu` only after AVX2, FMA and F16C were detected.
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::stream_sum(v) },
        _ => v.iter().sum(),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Weight rows prefetched ahead of the block being read (each block reads 4 rows at once).
    const AHEAD_ROWS: usize = 4;
    /// How far ahead of the row being read `gemv_f32_sequential` prefetches (its rows are one
    /// stream, so the distance runs on into the next rows).
    const SEQUENTIAL_AHEAD_BYTES: usize = 4096;

    /// `out[r] = w[r] · x`, one row at a time: the weights are read as one forward stream, with
    /// four accumulators over 64-column blocks (see `cpu::RowOrder` for when this beats
    /// `gemv_f32`).
    ///
    /// # Safety
    /// AVX-512F; `w.len() == out.len() · cols`, `x.len() == cols`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn gemv_f32_sequential(w: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
        let (blocks, full, rem) = (cols / 64, cols / 16, cols % 16);
        let tail = ((1u32 << rem) - 1) as u16;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let ahead = SEQUENTIAL_AHEAD_BYTES / 4;
        for (r, o) in out.iter_mut().enumerate() {
            // SAFETY: row r < out.len() starts here (w is [out.len(), cols]).
            let p = unsafe { wp.add(r * cols) };
            let mut a = [_mm512_setzero_ps(); 4];
            for b in 0..blocks {
                for (k, acc) in a.iter_mut().enumerate() {
                    let c = 64 * b + 16 * k;
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(c + ahead) as *const i8);
                    // SAFETY: columns c .. c + 16 <= cols of the row and of x.
                    unsafe { *acc = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(c)), _mm512_loadu_ps(xp.add(c)), *acc) };
                }
            }
            for j in 4 * blocks..full {
                let c = 16 * j;
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(c + ahead) as *const i8);
                // SAFETY: as above.
                unsafe { a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(c)), _mm512_loadu_ps(xp.add(c)), a[0]) };
            }
            if rem > 0 {
                let c = 16 * full;
                // SAFETY: the masked loads read only the rem < 16 columns left.
                unsafe {
                    let v = _mm512_maskz_loadu_ps(tail, p.add(c));
                    a[0] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(tail, xp.add(c)), a[0]);
                }
            }
            *o = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
        }
    }

    /// `out[r] = w[r] · x` for the rows of `w` (`[out.len(), cols]`), four rows per step: the
    /// four share each x load, their sums stay in four independent accumulators, and one call
    /// covers a whole task (a call and a horizontal sum per row cost a tenth of a 576-column row).
    ///
    /// # Safety
    /// AVX-512F; `w.len() == out.len() · cols`, `x.len() == cols`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn gemv_f32(w: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
        let (full, rem) = (cols / 16, cols % 16);
        let tail = ((1u32 << rem) - 1) as u16;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let rows = out.len();
        let mut r = 0;
        while r + 4 <= rows {
            let (mut a0, mut a1, mut a2, mut a3) =
                (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
            // SAFETY: rows r .. r + 4 < rows start at these offsets of w.
            let (p0, p1, p2, p3) = unsafe {
                let p0 = wp.add(r * cols);
                (p0, p0.add(cols), p0.add(2 * cols), p0.add(3 * cols))
            };
            let ahead = AHEAD_ROWS * cols;
            for j in 0..full {
                let o = 16 * j;
                for p in [p0, p1, p2, p3] {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead + o) as *const i8);
                }
                // SAFETY: column o + 16 <= cols of each row and of x.
                unsafe {
                    let xv = _mm512_loadu_ps(xp.add(o));
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p0.add(o)), xv, a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(p1.add(o)), xv, a1);
                    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(p2.add(o)), xv, a2);
                    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(p3.add(o)), xv, a3);
                }
            }
            if rem > 0 {
                let o = 16 * full;
                // SAFETY: the masked loads read only the rem < 16 columns left.
                unsafe {
                    let xv = _mm512_maskz_loadu_ps(tail, xp.add(o));
                    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, p0.add(o)), xv, a0);
                    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, p1.add(o)), xv, a1);
                    a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, p2.add(o)), xv, a2);
                    a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, p3.add(o)), xv, a3);
                }
            }
            out[r] = _mm512_reduce_add_ps(a0);
            out[r + 1] = _mm512_reduce_add_ps(a1);
            out[r + 2] = _mm512_reduce_add_ps(a2);
            out[r + 3] = _mm512_reduce_add_ps(a3);
            r += 4;
        }
        while r < rows {
            // SAFETY: row r < rows starts here.
            let p = unsafe { wp.add(r * cols) };
            let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for j in 0..full {
                // SAFETY: column 16 j + 16 <= cols.
                unsafe {
                    let v = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(16 * j)), _mm512_loadu_ps(xp.add(16 * j)), a);
                    (a, b) = (b, v);
                }
            }
            if rem > 0 {
                // SAFETY: masked loads of the rem columns left.
                unsafe {
                    let o = 16 * full;
                    a = _mm512_fmadd_ps(
                        _mm512_maskz_loadu_ps(tail, p.add(o)),
                        _mm512_maskz_loadu_ps(tail, xp.add(o)),
                        a,
                    );
                }
            }
            out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
            r += 1;
        }
    }
}

/// A borrowed row-major `[rows, cols]` weight matrix.
#[derive(Clone, Copy, Debug)]
pub struct DenseMatrix<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
}

impl<'a, T: Element> DenseMatrix<'a, T> {
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        let want = rows.checked_mul(cols).ok_or_else(|| KernelError::Shape(format!("[{rows}, {cols}] overflows")))?;
        if data.len() != want {
            return Err(KernelError::Shape(format!(
                "matrix [{rows}, {cols}] needs {want} elements, got {}",
                data.len()
            )));
        }
        Ok(Self { data, rows, cols })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Every element, row-major.
    pub fn data(&self) -> &'a [T] {
        self.data
    }
    pub fn row(&self, r: usize) -> &'a [T] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Up to this many activation rows the product is a (multi-)GEMV: each weight row is streamed from
/// memory once and dotted with every activation row while it sits in L1.
pub(crate) const GEMV_MAX_N: usize = 8;
/// Weight rows per GEMM panel: 64 rows × ≤ 4096 cols × 4 B ≤ 1 MiB of widened f32 per thread.
pub(crate) const PANEL_ROWS: usize = 64;

/// Up to this many activation rows (batched decode) the unpacked register-tiled GEMM
/// (`avx2::gemm_f32`) beats the packing GEMM; from 64 rows on (prefill) the gemm crate wins.
pub(crate) const SMALL_GEMM_MAX_N: usize = 32;
/// Weight rows per cache chunk of the small-batch GEMM: 48 rows of ≤ 2048 f32 columns stay in L2
/// while every group of activation rows passes over them (and non-f32 rows are produced into a
/// panel of this many rows).
pub(crate) const SMALL_GEMM_CHUNK_ROWS: usize = 48;

/// Whether an `n`-row product on `isa` takes the small-batch GEMM ([`small_gemm`]).
pub(crate) fn is_small_batch(isa: Isa, n: usize) -> bool {
    n > GEMV_MAX_N && n <= SMALL_GEMM_MAX_N && matches!(isa, Isa::Avx2 | Isa::Avx512)
}

/// Small-batch product `out[r · n + i] = w[r] · x[i]` (`w` `[rows, cols]` f32, `x` `[n, cols]`,
/// `out` `[rows, n]`) on this thread: the register-tiled AVX2 kernel, or the gemm crate on a CPU
/// without AVX2.
pub(crate) fn small_gemm(w: &[f32], cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
    assert!(
        n > 0 && x.len() == n * cols && out.len().is_multiple_of(n) && w.len() == out.len() / n * cols,
        "small_gemm: shapes checked by callers"
    );
    #[cfg(target_arch = "x86_64")]
    if cpu::supports(Isa::Avx2) {
        // SAFETY: AVX2, FMA and F16C are present (`Isa::Avx2` is only supported after detecting
        // all three); the shapes are asserted above.
        unsafe { avx2::gemm_f32(w, cols, x, n, out) };
        return;
    }
    gemm_panel(Isa::Scalar, x, n, cols, w, out.len() / n, out);
}

/// [`small_gemm`] over weight rows `r0 .. r0 + out.len() / n` that are not stored as f32: `fill(r,
/// dst)` writes dense f32 rows `r ..` into `dst` (widened or expanded), a cache chunk at a time,
/// into this thread's scratch panel, which the product then reads from L2.
pub(crate) fn small_gemm_produced(
    cols: usize,
    x: &[f32],
    n: usize,
    r0: usize,
    out: &mut [f32],
    fill: impl Fn(usize, &mut [f32]),
) {
    if cols == 0 {
        out.fill(0.0);
        return;
    }
    let rows = out.len() / n;
    with_scratch(SMALL_GEMM_CHUNK_ROWS * cols, |panel| {
        for c0 in (0..rows).step_by(SMALL_GEMM_CHUNK_ROWS) {
            let cr = SMALL_GEMM_CHUNK_ROWS.min(rows - c0);
            let dst = &mut panel[..cr * cols];
            fill(r0 + c0, dst);
            small_gemm(dst, cols, x, n, &mut out[c0 * n..(c0 + cr) * n]);
        }
    })
}

pub(crate) fn rows_per_task(rows: usize) -> usize {
    // Two tasks per thread: a thread that loses its core has its second task stolen instead of
    // stalling the others at the end of the product, while each task still streams a long
    // contiguous run of rows for the prefetchers (with 8 per thread, SmolLM2's decode streamed
    // 17.5 GB/s; with 2, 19.5).
    (rows / (cpu::threads() * 2)).clamp(8, 4096)
}

/// `y[n, rows] = x[n, cols] · Wᵀ` (overwrites `y`).
pub fn matmul<T: Element>(w: &DenseMatrix<'_, T>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    matmul_on(cpu::isa(), w, x, n, y)
}

/// [`matmul`] on an explicit path (tests and benches compare the paths).
pub fn matmul_on<T: Element>(isa: Isa, w: &DenseMatrix<'_, T>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    let (rows, cols) = (w.rows, w.cols);
    check_product(isa, rows, cols, n, x, y)?;
    if n == 0 || rows == 0 {
        return Ok(());
    }
    if n == 1 {
        let per = rows_per_task(rows);
        y.par_chunks_mut(per).enumerate().for_each(|(t, out)| rows_into(isa, w, x, 1, t * per, out));
        return Ok(());
    }
    if is_small_batch(isa, n) {
        let mut yt = vec![0f32; rows * n];
        let per = rows_per_task(rows);
        yt.par_chunks_mut(per * n).enumerate().for_each(|(t, out)| {
            let r0 = t * per;
            match T::as_f32(w.data) {
                Some(wf) => small_gemm(&wf[r0 * cols..(r0 + out.len() / n) * cols], cols, x, n, out),
                None => {
                    small_gemm_produced(cols, x, n, r0, out, |r, dst| T::widen(&w.data[r * cols..][..dst.len()], dst))
                }
            }
        });
        scatter_transposed(&yt, n, rows, y);
        return Ok(());
    }
    if n > GEMV_MAX_N
        && isa != Isa::Scalar
        && let Some(wf) = T::as_f32(w.data)
    {
        // f32 weights need no widening: one multithreaded GEMM packs the activations once instead
        // of once per panel.
        gemm_whole(isa, x, n, cols, wf, rows, y);
        return Ok(());
    }
    // Transposed output [rows, n] so that row ranges are contiguous and tasks write disjoint chunks.
    let mut yt = vec![0f32; rows * n];
    if n <= GEMV_MAX_N || isa == Isa::Scalar {
        let per = rows_per_task(rows);
        yt.par_chunks_mut(per * n).enumerate().for_each(|(t, out)| rows_into(isa, w, x, n, t * per, out));
    } else {
        yt.par_chunks_mut(PANEL_ROWS * n).enumerate().for_each(|(p, out)| {
            let r0 = p * PANEL_ROWS;
            let pr = out.len() / n;
            let src = &w.data[r0 * cols..(r0 + pr) * cols];
            with_widened(src, |panel| gemm_panel(isa, x, n, cols, panel, pr, out));
        });
    }
    scatter_transposed(&yt, n, rows, y);
    Ok(())
}

/// Rows `r0 .. r0 + out.len() / n` of the product on this thread, transposed: `out` is
/// `[rows, n]` (for `n == 1` simply the outputs). Shapes are the caller's (checked) invariant.
pub(crate) fn rows_into<T: Element>(isa: Isa, w: &DenseMatrix<'_, T>, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
    let cols = w.cols;
    #[cfg(target_arch = "x86_64")]
    if n == 1
        && isa == Isa::Avx512
        && let Some(wf) = T::as_f32(w.data)
    {
        let rows = &wf[r0 * cols..(r0 + out.len()) * cols];
        // SAFETY: AVX-512 is supported (callers check `isa`); rows is [out.len(), cols] and x
        // has cols values (the product's checked shapes).
        unsafe {
            match crate::cpu::gemv_row_order() {
                crate::cpu::RowOrder::Interleaved => avx512::gemv_f32(rows, cols, &x[..cols], out),
                crate::cpu::RowOrder::Sequential => avx512::gemv_f32_sequential(rows, cols, &x[..cols], out),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if (2..=GEMV_MAX_N).contains(&n)
        && cols > 0
        && matches!(isa, Isa::Avx2 | Isa::Avx512)
        && let Some(wf) = T::as_f32(w.data)
    {
        let rows = &wf[r0 * cols..(r0 + out.len() / n) * cols];
        let x = &x[..n * cols];
        // SAFETY: AVX2, FMA and F16C are supported (`Isa::Avx2`/`Avx512` come from `cpu` only after
        // detecting them); rows is [out.len() / n, cols], x is [n, cols], out is [rows, n].
        unsafe {
            match n {
                2 => avx2::gemv_multi_f32::<2>(rows, cols, x, out),
                3 => avx2::gemv_multi_f32::<3>(rows, cols, x, out),
                4 => avx2::gemv_multi_f32::<4>(rows, cols, x, out),
                5 => avx2::gemv_multi_f32::<5>(rows, cols, x, out),
                6 => avx2::gemv_multi_f32::<6>(rows, cols, x, out),
                7 => avx2::gemv_multi_f32::<7>(rows, cols, x, out),
                _ => avx2::gemv_multi_f32::<8>(rows, cols, x, out),
            }
        }
        return;
    }
    for (j, o) in out.chunks_mut(n).enumerate() {
        let wr = w.row(r0 + j);
        for (i, oi) in o.iter_mut().enumerate() {
            *oi = T::dot(isa, wr, &x[i * cols..(i + 1) * cols]);
        }
    }
}

/// The checks every `y[n, rows] = x[n, cols] · Wᵀ` kernel makes before touching memory: the path
/// runs on this CPU and the buffers have exactly the product's sizes (overflow-checked).
pub(crate) fn check_product(isa: Isa, rows: usize, cols: usize, n: usize, x: &[f32], y: &[f32]) -> Result<()> {
    if !cpu::supports(isa) {
        return Err(KernelError::Unsupported(format!("the {} kernels on this CPU", isa.name())));
    }
    let want_x = n.checked_mul(cols).ok_or_else(|| KernelError::Shape(format!("[{n}, {cols}] overflows")))?;
    if x.len() != want_x {
        return Err(KernelError::Shape(format!(
            "activations: expected [{n}, {cols}] = {want_x} values, got {}",
            x.len()
        )));
    }
    let want_y = n.checked_mul(rows).ok_or_else(|| KernelError::Shape(format!("[{n}, {rows}] overflows")))?;
    if y.len() != want_y {
        return Err(KernelError::Shape(format!("output: expected [{n}, {rows}] = {want_y} values, got {}", y.len())));
    }
    Ok(())
}

/// Writes `yt` (`[rows, stride]`, what row-parallel tasks produce) into `y` (`[n, rows]`,
/// `n = y.len() / rows <= stride`): `y[i, r] = yt[r · stride + i]`, in register-held blocks
/// (`crate::transpose`).
pub(crate) fn scatter_transposed(yt: &[f32], stride: usize, rows: usize, y: &mut [f32]) {
    let n = y.len() / rows.max(1);
    crate::transpose::transpose(crate::cpu::isa(), yt, rows, n, stride, y, rows, rows);
}

/// Runs `f` on this thread's reusable f32 scratch buffer, sized to `len` (a GEMM panel).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    PANEL.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.resize(len, 0.0);
        f(&mut buf)
    })
}

thread_local! {
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `src` as f32: borrowed when it already is, else widened into a per-thread buffer.
fn with_widened<T: Element, R>(src: &[T], f: impl FnOnce(&[f32]) -> R) -> R {
    if let Some(s) = T::as_f32(src) {
        return f(s);
    }
    with_scratch(src.len(), |buf| {
        T::widen(src, buf);
        f(buf)
    })
}

/// `y[i, j] = Σ_k x[i, k] · w[j, k]` over the rayon pool (`y` is `[n, rows]` row-major).
fn gemm_whole(isa: Isa, x: &[f32], n: usize, k: usize, w: &[f32], rows: usize, y: &mut [f32]) {
    gemm_xwt(isa, x, n, k, w, rows, y, false, true);
}

/// Whether the large f32 products of path `isa` run on faer rather than the gemm crate. The gemm
/// crate's AVX-512 microkernels need its `nightly` feature, so on a stable compiler it runs its
/// AVX2 (8-lane) kernels everywhere; faer (already the pruning crate's linear algebra) selects
/// 16-lane AVX-512 microkernels at run time and is about twice as fast on the AVX-512 path
/// (SmolLM2 layer shapes at n = 512, one Zen 5 core: 180–230 vs 95–115 GFLOP/s).
fn on_faer(isa: Isa) -> bool {
    isa == Isa::Avx512
}

/// `dst[i·rs + j·cs] = Σ_k a[i·ars + k·acs] · b[k·brs + j·bcs]` for `i < m`, `j < n`, `k < depth`,
/// on faer when `use_faer` or else the gemm crate, multithreaded over the rayon pool when `parallel`.
///
/// # Safety
/// Every index the three views address is in bounds of its buffer; the `dst` view addresses each
/// element at most once and aliases neither input.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    use_faer: bool,
    m: usize,
    n: usize,
    depth: usize,
    dst: *mut f32,
    (rs, cs): (isize, isize),
    a: *const f32,
    (ars, acs): (isize, isize),
    b: *const f32,
    (brs, bcs): (isize, isize),
    parallel: bool,
) {
    if use_faer {
        let par = if parallel { faer::Par::rayon(cpu::threads()) } else { faer::Par::Seq };
        // SAFETY: the caller vouches for the views (in bounds, dst injective and unaliased).
        unsafe {
            let a = faer::MatRef::from_raw_parts(a, m, depth, ars, acs);
            let b = faer::MatRef::from_raw_parts(b, depth, n, brs, bcs);
            let c = faer::MatMut::from_raw_parts_mut(dst, m, n, rs, cs);
            faer::linalg::matmul::matmul(c, faer::Accum::Replace, a, b, 1.0f32, par);
        }
        return;
    }
    let par = if parallel { gemm::Parallelism::Rayon(cpu::threads()) } else { gemm::Parallelism::None };
    // SAFETY: as above; gemm takes (col stride, row stride) pairs.
    unsafe {
        gemm::gemm(m, n, depth, dst, cs, rs, false, a, acs, ars, b, bcs, brs, 0.0f32, 1.0f32, false, false, false, par)
    }
}

/// `out[j, i] = Σ_k x[i, k] · panel[j, k]` for a panel of `pr` weight rows (out is `[pr, n]`),
/// on this thread.
pub(crate) fn gemm_panel(isa: Isa, x: &[f32], n: usize, k: usize, panel: &[f32], pr: usize, out: &mut [f32]) {
    gemm_xwt(isa, x, n, k, panel, pr, out, true, false);
}

/// `x[n, k] · w[rows, k]ᵀ` into `dst`, stored `[n, rows]` row-major or, with `transposed`,
/// `[rows, n]`.
#[allow(clippy::too_many_arguments)]
fn gemm_xwt(
    isa: Isa,
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    rows: usize,
    dst: &mut [f32],
    transposed: bool,
    parallel: bool,
) {
    assert!(x.len() == n * k && w.len() == rows * k && dst.len() == n * rows, "gemm_xwt: shapes checked by callers");
    // (row stride, col stride) of dst viewed as [n, rows].
    let dst_strides = if transposed { (1, n as isize) } else { (rows as isize, 1) };
    // SAFETY: dst viewed as [n, rows] with these strides touches indices < n·rows = dst.len() (the
    // assert above), each once; lhs is `x` as [n, k] (row stride k), rhs `w` read as [k, rows] (row
    // stride 1, col stride k), both of the asserted sizes; `dst` is a unique borrow.
    unsafe {
        gemm_raw(
            on_faer(isa),
            n,
            rows,
            k,
            dst.as_mut_ptr(),
            dst_strides,
            x.as_ptr(),
            (k as isize, 1),
            w.as_ptr(),
            (1, k as isize),
            parallel,
        )
    }
}

/// Shape and strides of a strided f32 matrix view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strided {
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Strided {
    /// A contiguous row-major `[rows, cols]` view.
    pub fn row_major(rows: usize, cols: usize) -> Self {
        Self { rows, cols, row_stride: cols, col_stride: 1 }
    }
    /// The same elements read as the transpose.
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride }
    }
    /// One past the largest index touched, or `None` on overflow; 0 for an empty view.
    fn extent(&self) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 {
            return Some(0);
        }
        (self.rows - 1)
            .checked_mul(self.row_stride)?
            .checked_add((self.cols - 1).checked_mul(self.col_stride)?)?
            .checked_add(1)
    }
    fn check(&self, len: usize, what: &str) -> Result<()> {
        match self.extent() {
            Some(e) if e <= len => Ok(()),
            _ => Err(KernelError::Shape(format!("{what}: view {self:?} exceeds a buffer of {len} values"))),
        }
    }
}

/// `c = a · b` on strided views (overwrites `c`), single-threaded: callers run independent products
/// (one per attention head) in parallel.
pub fn gemm_strided(a: &[f32], al: Strided, b: &[f32], bl: Strided, c: &mut [f32], cl: Strided) -> Result<()> {
    // The per-head attention products (64 deep) stay on the gemm crate whatever the path: faer's
    // gain is in the large weight products, and one summation order here keeps the reference
    // forward's attention identical to what the runtime's f16-cache comparison was measured with
    // (tests/it/runtime.rs: faer here moved a 2-token prefill from 1.0e-3 to 4.1e-3).
    gemm_checked(a, al, b, bl, c, cl, false, false)
}

/// `c = a · b` on strided views (overwrites `c`) for one large product over the whole thread pool,
/// on the fastest path this CPU has (faer's AVX-512 kernels where present): the training
/// linears' forward and both gradients.
pub fn gemm_large(a: &[f32], al: Strided, b: &[f32], bl: Strided, c: &mut [f32], cl: Strided) -> Result<()> {
    gemm_checked(a, al, b, bl, c, cl, on_faer(cpu::isa()), true)
}

#[allow(clippy::too_many_arguments)]
fn gemm_checked(
    a: &[f32],
    al: Strided,
    b: &[f32],
    bl: Strided,
    c: &mut [f32],
    cl: Strided,
    use_faer: bool,
    parallel: bool,
) -> Result<()> {
    if al.cols != bl.rows || cl.rows != al.rows || cl.cols != bl.cols {
        return Err(KernelError::Shape(format!(
            "gemm: [{}, {}] · [{}, {}] -> [{}, {}]",
            al.rows, al.cols, bl.rows, bl.cols, cl.rows, cl.cols
        )));
    }
    al.check(a.len(), "gemm lhs")?;
    bl.check(b.len(), "gemm rhs")?;
    cl.check(c.len(), "gemm dst")?;
    // Every destination element must be distinct or parallel writes inside gemm would race.
    let injective = (cl.col_stride >= 1 && cl.row_stride >= cl.cols * cl.col_stride)
        || (cl.row_stride >= 1 && cl.col_stride >= cl.rows * cl.row_stride)
        || cl.rows <= 1
        || cl.cols <= 1;
    if !injective {
        return Err(KernelError::Shape(format!("gemm dst: view {cl:?} overlaps itself")));
    }
    let (m, n, k) = (cl.rows, cl.cols, al.cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 || cpu::isa() == Isa::Scalar {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f32;
                for p in 0..k {
                    s += a[i * al.row_stride + p * al.col_stride] * b[p * bl.row_stride + j * bl.col_stride];
                }
                c[i * cl.row_stride + j * cl.col_stride] = s;
            }
        }
        return Ok(());
    }
    // SAFETY: all three views were checked to lie inside their slices, dst is injective (checked
    // above) and `c` is a unique borrow distinct from `a` and `b`.
    unsafe {
        gemm_raw(
            use_faer,
            m,
            n,
            k,
            c.as_mut_ptr(),
            (cl.row_stride as isize, cl.col_stride as isize),
            a.as_ptr(),
            (al.row_stride as isize, al.col_stride as isize),
            b.as_ptr(),
            (bl.row_stride as isize, bl.col_stride as isize),
            parallel,
        )
    }
    Ok(())
}

/// Plain triple loop in f64: the reference the tests hold every path to.
pub fn matmul_reference<T: Element>(w: &DenseMatrix<'_, T>, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * w.rows];
    for i in 0..n {
        for r in 0..w.rows {
            let mut s = 0f64;
            for (k, wv) in w.row(r).iter().enumerate() {
                s += wv.to_f32() as f64 * x[i * w.cols + k] as f64;
            }
            y[i * w.rows + r] = s as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn check<T: Element>(conv: impl Fn(f32) -> T) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &cols in &[0usize, 1, 7, 15, 16, 17, 63, 64, 65, 576, 1536, 4096] {
            // 200 rows: tasks of 50 rows cross the small-batch GEMM's 48-row cache chunks.
            for &rows in &[1usize, 3, 70, 200] {
                // 2..=8: multi-row GEMV; 9..=32: the small-batch GEMM (every tile remainder); 33:
                // the gemm crate.
                for &n in &[1usize, 2, 8, 9, 14, 32, 33] {
                    if rows * cols * n > 4_000_000 {
                        continue;
                    }
                    let w: Vec<T> = rand_vec(&mut rng, rows * cols).into_iter().map(&conv).collect();
                    let x = rand_vec(&mut rng, n * cols);
                    let m = DenseMatrix::new(&w, rows, cols).unwrap();
                    let want = matmul_reference(&m, &x, n);
                    for isa in Isa::available() {
                        let mut y = vec![f32::NAN; n * rows];
                        matmul_on(isa, &m, &x, n, &mut y).unwrap();
                        for (a, b) in y.iter().zip(&want) {
                            // |Σ| ≤ cols; f32 summation error grows like cols·ε.
                            let tol = 1e-5 * (cols as f32 + 1.0);
                            assert!(
                                (a - b).abs() <= tol,
                                "{} {isa:?} rows={rows} cols={cols} n={n}: {a} vs {b}",
                                T::NAME
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn f32_paths_match_reference() {
        check::<f32>(|v| v);
    }
    /// Both row orders of the AVX-512 f32 GEMV (the vendor picks one in `matmul`; this runs the
    /// other too) against the reference, over the column sweep.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn both_avx512_row_orders_match_reference() {
        if !crate::cpu::supports(Isa::Avx512) {
            eprintln!("skipped: this CPU has no AVX-512 (the AVX2 and scalar paths are tested above)");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for &cols in &[0usize, 1, 7, 15, 16, 17, 63, 64, 65, 576, 1536, 4096] {
            for &rows in &[1usize, 3, 4, 70] {
                let (w, x) = (rand_vec(&mut rng, rows * cols), rand_vec(&mut rng, cols));
                let want = matmul_reference(&DenseMatrix::new(&w, rows, cols).unwrap(), &x, 1);
                for sequential in [false, true] {
                    let mut y = vec![f32::NAN; rows];
                    // SAFETY: AVX-512 checked above; w is [rows, cols], x has cols values.
                    unsafe {
                        if sequential {
                            avx512::gemv_f32_sequential(&w, cols, &x, &mut y);
                        } else {
                            avx512::gemv_f32(&w, cols, &x, &mut y);
                        }
                    }
                    for (a, b) in y.iter().zip(&want) {
                        let tol = 1e-5 * (cols as f32 + 1.0);
                        assert!((a - b).abs() <= tol, "sequential={sequential} rows={rows} cols={cols}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_paths_match_reference() {
        check::<bf16>(bf16::from_f32);
    }
    #[test]
    fn f16_paths_match_reference() {
        check::<f16>(f16::from_f32);
    }

    #[test]
    fn shape_errors_are_reported() {
        let w = vec![0f32; 6];
        assert!(DenseMatrix::new(&w, 4, 2).is_err());
        let m = DenseMatrix::new(&w, 3, 2).unwrap();
        let mut y = vec![0f32; 3];
        assert!(matmul(&m, &[0.0; 3], 1, &mut y).is_err());
        assert!(matmul(&m, &[0.0; 2], 1, &mut [0.0; 2]).is_err());
    }

    #[test]
    fn strided_gemm_matches_naive() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (m, k, n) = (5, 9, 7);
        let a = rand_vec(&mut rng, m * k);
        let b = rand_vec(&mut rng, n * k); // stored [n, k], used transposed
        let mut c = vec![0f32; m * n];
        gemm_strided(&a, Strided::row_major(m, k), &b, Strided::row_major(n, k).t(), &mut c, Strided::row_major(m, n))
            .unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
        let bad = Strided { rows: m, cols: n, row_stride: 1, col_stride: 1 };
        assert!(gemm_strided(&a, Strided::row_major(m, k), &b, Strided::row_major(n, k).t(), &mut c, bad).is_err());
        assert!(
            gemm_strided(
                &a,
                Strided::row_major(m, k + 1),
                &b,
                Strided::row_major(n, k).t(),
                &mut c,
                Strided::row_major(m, n)
            )
            .is_err()
        );
    }

    #[test]
    fn large_gemm_matches_naive_in_every_layout_training_uses() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let (m, k, n) = (130, 70, 90);
        let a = rand_vec(&mut rng, m * k);
        let b = rand_vec(&mut rng, k * n);
        let want: Vec<f32> = (0..m * n)
            .map(|ij| (0..k).map(|p| a[ij / n * k + p] as f64 * b[p * n + ij % n] as f64).sum::<f64>() as f32)
            .collect();
        // a · b with b row-major, and with both operands stored transposed.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        for (lhs, al, rhs, bl) in [
            (&a, Strided::row_major(m, k), &b, Strided::row_major(k, n)),
            (&at, Strided::row_major(k, m).t(), &bt, Strided::row_major(n, k).t()),
        ] {
            let mut c = vec![f32::NAN; m * n];
            gemm_large(lhs, al, rhs, bl, &mut c, Strided::row_major(m, n)).unwrap();
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
        let mut c = vec![0f32; m * n];
        let e =
            gemm_large(&a, Strided::row_major(m, k), &b, Strided::row_major(n, k), &mut c, Strided::row_major(m, n));
        assert!(e.is_err());
    }
}
