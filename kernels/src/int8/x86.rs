//! The x86 INT8 kernels: one row-tiled kernel body (written once, in `kernels!`) instantiated
//! for AVX-512 VNNI, AVX-VNNI and AVX2, plus the AVX-512 prefill kernel for bitmask weights.
//!
//! The tiled kernel multiplies `R` weight rows by `M` activation rows (`M <= 8`) over whole
//! vectors of columns: each weight vector is loaded (dense) or expanded from the packed codes
//! under its mask word (bitmask) once and used for all `M` activation rows; `U` accumulator sets
//! rotate over consecutive vectors so that an accumulator's next `vpdpbusd` never waits on its
//! previous one. Batched decode (9..=32 rows) runs it per group of 8 activation rows over chunks
//! of weight rows that stay in L2.
//!
//! The u8 × s8 products (`vpdpbusd`, `vpmaddubsw`) take one unsigned operand. The two
//! formulations, each in one helper per path:
//! - VNNI (`prep_vnni`): the weight is biased to unsigned, `w ^ 0x80 = w + 128 ∈ 0..=255`,
//!   times the activation code `q ∈ −127..=127`; then `Σ (w + 128) q = Σ w q + 128 Σ q`, and
//!   `128 Σ q` is known per activation row (one subtraction per output). Zero weights (clear
//!   mask bits, padding) become 128 and multiply zero-padded codes past `cols`, so the
//!   correction over all columns is exact. `vpdpbusd` adds four products into i32 without
//!   saturation, so −128 weights are fine.
//! - AVX2 (`dot` in `avx2`): the sign trick, `|w| ∈ 0..=128` (u8; `vpabsb(−128)` is 0x80 =
//!   128) times `sign(q, w) ∈ −127..=127` (`vpsignb`; q is never −128, so negating it cannot
//!   wrap). `vpmaddubsw` adds two such products into i16: `|sum| <= 2 · 128 · 127 = 32512 <
//!   32767`, so it never saturates; `vpmaddwd` by ones widens pairs into i32.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{Int8Bitmask, Int8Matrix, QuantizedActs};
use crate::cpu;
use crate::dense;

/// How far ahead of the packed values the kernels prefetch (as the f32 bitmask GEMV).
const PREFETCH_BYTES: usize = 4096;

/// The first `len < 8` bytes at `p` as a little-endian word. Caller: `len` bytes readable.
#[inline(always)]
unsafe fn tail_word(p: *const u8, len: usize) -> u64 {
    let mut m = 0u64;
    for q in 0..len.min(8) {
        // SAFETY: q < len bytes are readable (caller).
        m |= (unsafe { *p.add(q) } as u64) << (8 * q);
    }
    m
}

macro_rules! kernels {
    ($feat:literal) => {
        /// `R` weight rows × `M` activation rows into `out` (raw sums, before any correction).
        ///
        /// # Safety
        /// The CPU has this module's features; dense: `w[r]` points at a row of `cols` codes;
        /// bitmask: `mask[r]` at a row's `cols.div_ceil(8)` mask bytes (zero padding bits) and
        /// `w[r]` at its packed codes, readable as far as `load_sparse` reads for this path;
        /// `a` at `M` activation rows `stride` apart, each `cols.next_multiple_of(VL)` codes
        /// readable (zero past `cols`).
        #[allow(clippy::needless_range_loop)] // accumulators indexed by row and activation row
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn tile<const R: usize, const M: usize, const U: usize, const SPARSE: bool>(
            w: [*const i8; R],
            mask: [*const u8; R],
            cols: usize,
            a: *const i8,
            stride: usize,
            out: &mut [[i32; M]; R],
        ) {
            let (full, rem) = (cols / VL, cols % VL);
            let mut p = w;
            // Up to four accumulator sets as separate variables: an array indexed by set was
            // kept on the stack by LLVM (a loop over sets, loads and stores around each dot).
            let (mut a0, mut a1, mut a2, mut a3) =
                ([[zero(); M]; R], [[zero(); M]; R], [[zero(); M]; R], [[zero(); M]; R]);
            let mut j = 0;
            // SAFETY (every step): vector j < full lies within every row (contract); the tail
            // step reads the last `rem` codes (dense) or mask bits (bitmask).
            unsafe {
                while j + U <= full {
                    step::<R, M, SPARSE>(&mut a0, &mut p, mask, j, VL, a, stride);
                    if U >= 2 {
                        step::<R, M, SPARSE>(&mut a1, &mut p, mask, j + 1, VL, a, stride);
                    }
                    if U >= 3 {
                        step::<R, M, SPARSE>(&mut a2, &mut p, mask, j + 2, VL, a, stride);
                    }
                    if U >= 4 {
                        step::<R, M, SPARSE>(&mut a3, &mut p, mask, j + 3, VL, a, stride);
                    }
                    j += U;
                }
                while j < full {
                    step::<R, M, SPARSE>(&mut a0, &mut p, mask, j, VL, a, stride);
                    j += 1;
                }
                if rem > 0 {
                    step::<R, M, SPARSE>(&mut a0, &mut p, mask, full, rem, a, stride);
                }
            }
            for r in 0..R {
                for i in 0..M {
                    let mut s = hsum(a0[r][i]);
                    for set in [&a1, &a2, &a3].into_iter().take(U.saturating_sub(1)) {
                        s = s.wrapping_add(hsum(set[r][i]));
                    }
                    out[r][i] = s;
                }
            }
        }

        /// Vector `j` (`len` columns, `len <= VL`) of every row of the tile into `acc`.
        ///
        /// # Safety
        /// As for `tile`; `j · VL + len <= cols`.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn step<const R: usize, const M: usize, const SPARSE: bool>(
            acc: &mut [[Acc; M]; R],
            p: &mut [*const i8; R],
            mask: [*const u8; R],
            j: usize,
            len: usize,
            a: *const i8,
            stride: usize,
        ) {
            let mut wv = [zero_v(); R];
            let mut wq = [zero_v(); R];
            for r in 0..R {
                // SAFETY: the row holds these codes / mask bytes (caller).
                let v = unsafe {
                    if SPARSE {
                        load_sparse(mask[r].add(j * (VL / 8)), len.div_ceil(8), &mut p[r])
                    } else {
                        load_dense(p[r].add(j * VL), len)
                    }
                };
                wv[r] = v;
                wq[r] = prep(v);
            }
            for i in 0..M {
                // SAFETY: activation rows hold whole vectors up to cols rounded up (caller).
                let av = unsafe { load_act(a.add(i * stride + j * VL)) };
                for r in 0..R {
                    acc[r][i] = dot(acc[r][i], wq[r], wv[r], av);
                }
            }
        }

        /// One tile at rows `r ..`: builds the row pointers, runs it, writes corrected sums into
        /// `acc` (`[rows, n]` from `r0`) at activation rows `i0 ..`.
        ///
        /// # Safety
        /// The CPU has this module's features; `dots`' contract; rows `r .. r + R` < r1.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn run<const R: usize, const M: usize, const U: usize>(
            w: &Int8Matrix<'_>,
            vals: &Vals<'_>,
            acts: &QuantizedActs,
            r0: usize,
            r: usize,
            i0: usize,
            acc: &mut [i32],
        ) {
            let (n, cols) = (acts.n, w.cols());
            // SAFETY: activation rows i0 .. i0 + M < n exist, each `stride` codes.
            let a = unsafe { acts.codes.as_ptr().add(i0 * acts.stride) };
            let mut out = [[0i32; M]; R];
            match w {
                Int8Matrix::Dense(d) => {
                    // SAFETY: rows r .. r + R hold `cols` codes each.
                    let ptrs: [*const i8; R] = std::array::from_fn(|k| unsafe { d.codes.as_ptr().add((r + k) * cols) });
                    // SAFETY: as in `tile`'s contract.
                    unsafe { tile::<R, M, U, false>(ptrs, [std::ptr::null(); R], cols, a, acts.stride, &mut out) };
                }
                Int8Matrix::Bitmask(b) => {
                    let mb = cols.div_ceil(8);
                    let masks: [*const u8; R] =
                        // SAFETY: row r + k owns mask bytes (r + k) mb .. (r + k + 1) mb.
                        std::array::from_fn(|k| unsafe { b.codes().bitmask().as_ptr().add((r + k) * mb) });
                    let ptrs: [*const i8; R] = std::array::from_fn(|k| vals.row(b, r + k));
                    // SAFETY: the view was validated and `vals` gives each row the slack this
                    // path's expansion reads.
                    unsafe { tile::<R, M, U, true>(ptrs, masks, cols, a, acts.stride, &mut out) };
                }
            }
            for k in 0..R {
                for i in 0..M {
                    let c = if CORRECT { acts.sums[i0 + i].wrapping_mul(128) } else { 0 };
                    acc[(r + k - r0) * n + i0 + i] = out[k][i].wrapping_sub(c);
                }
            }
        }

        /// `acc[(r − r0) · n + i] = Σ_c W[r, c] · q[i, c]` for rows `r0..r1`.
        ///
        /// # Safety
        /// The CPU has this module's features; the weight was validated, `acts` quantized for its
        /// columns, `r0 <= r1 <= rows`, `acc.len() == (r1 − r0) · n`.
        #[target_feature(enable = $feat)]
        pub(in crate::int8) unsafe fn dots(
            w: &Int8Matrix<'_>,
            acts: &QuantizedActs,
            r0: usize,
            r1: usize,
            acc: &mut [i32],
        ) {
            let n = acts.n;
            let vals = match w {
                Int8Matrix::Bitmask(b) => Vals::new(b, r0, r1, SLACK),
                Int8Matrix::Dense(_) => Vals::None,
            };
            let mut i0 = 0;
            while i0 < n {
                let g = (n - i0).min(8);
                let mut r = r0;
                // SAFETY (all calls): rows r .. r + R < r1 and activation rows i0 .. i0 + g < n;
                // the rest is this function's contract.
                unsafe {
                    if TILE_ROWS == 2 && g == 8 {
                        while r + 2 <= r1 {
                            run::<2, 8, 1>(w, &vals, acts, r0, r, i0, acc);
                            r += 2;
                        }
                    }
                    while r < r1 {
                        match g {
                            1 => run::<1, 1, 4>(w, &vals, acts, r0, r, i0, acc),
                            2 => run::<1, 2, 4>(w, &vals, acts, r0, r, i0, acc),
                            3 => run::<1, 3, 2>(w, &vals, acts, r0, r, i0, acc),
                            4 => run::<1, 4, 2>(w, &vals, acts, r0, r, i0, acc),
                            5 => run::<1, 5, 1>(w, &vals, acts, r0, r, i0, acc),
                            6 => run::<1, 6, 1>(w, &vals, acts, r0, r, i0, acc),
                            7 => run::<1, 7, 1>(w, &vals, acts, r0, r, i0, acc),
                            _ => run::<1, 8, 1>(w, &vals, acts, r0, r, i0, acc),
                        }
                        r += 1;
                    }
                }
                i0 += g;
            }
        }
    };
}

/// Where each row's packed codes start for a kernel that reads up to `slack` bytes past a row's
/// last code: in the matrix, or for the last rows (whose slack would run past the array) in a
/// zero-padded copy of the array's tail.
enum Vals<'a> {
    None,
    /// Rows for which `off + cols + slack > vals.len()` start at `copy[off − base]`.
    Matrix {
        vals: &'a [i8],
        offsets: &'a [i64],
        copy: Vec<i8>,
        base: usize,
        slack: usize,
    },
}

impl<'a> Vals<'a> {
    fn new(b: &Int8Bitmask<'a>, r0: usize, r1: usize, slack: usize) -> Self {
        let (vals, offsets) = (b.codes().values(), b.codes().row_offsets());
        // A row is read in place when cols + slack bytes are readable from its start.
        let direct = |off: usize| off + b.cols() + slack <= vals.len();
        let base = vals.len().saturating_sub(b.cols() + slack);
        let needs_copy = slack > 0 && r1 > r0 && !direct(offsets[r1 - 1] as usize);
        let copy = if needs_copy {
            let mut c = vals[base..].to_vec();
            c.resize(c.len() + slack, 0);
            c
        } else {
            Vec::new()
        };
        Vals::Matrix { vals, offsets, copy, base, slack: if needs_copy { slack } else { 0 } }
    }

    /// Row `r`'s first packed code (called per row and tile: inlined into the kernels).
    #[inline(always)]
    fn row(&self, b: &Int8Bitmask<'_>, r: usize) -> *const i8 {
        match self {
            Vals::None => std::ptr::null(),
            Vals::Matrix { vals, offsets, copy, base, slack } => {
                let off = offsets[r] as usize;
                if *slack > 0 && off + b.cols() + slack > vals.len() {
                    copy[off - base..].as_ptr()
                } else {
                    vals[off..].as_ptr()
                }
            }
        }
    }
}

pub(super) mod avx512 {
    //! 64 columns a vector; the bitmask word of 64 columns expands with one `vpexpandb`.
    //!
    //! The expansion is a masked load of the word's popcount codes and a register `vpexpandb`:
    //! on Zen 5 the memory form (`vpexpandb zmm{k}, [mem]`, one instruction fewer) ran the 70 %
    //! GEMV 4× slower (14.6 vs 3.6 ms on the `int8` bench's matrix, 2 threads), bound by the
    //! instruction itself rather than by memory.
    //!
    //! Instructions per 64 columns in the bitmask GEMV's inner loop (one activation row, `U = 4`
    //! sets; read off the compiled loop): mask word load, `popcnt`, `bzhi`, two `kmovq`, masked
    //! `vmovdqu8`, `vpexpandb`, `vpxorq` (+128 bias), `vpdpbusd` with the activation load folded,
    //! the pointer add, one prefetch: 11, plus per four words 5 of loop control and 2 constant
    //! reloads (LLVM's register choice), 12.75 in all — against 4 × 6.5 = 26 for the f32 kernel's four 16-column words, for four times
    //! fewer value bytes. Each further activation row adds one `vpdpbusd`.
    use super::*;

    type Acc = __m512i;
    const VL: usize = 64;
    const CORRECT: bool = true;
    /// Two weight rows per tile for 8 activation rows: 16 accumulators, 2 + 2 weight vectors
    /// and an activation vector in 32 zmm.
    const TILE_ROWS: usize = 2;
    /// `vpexpandb` reads exactly the codes it places.
    const SLACK: usize = 0;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,avx2,fma,popcnt")]
    #[inline]
    fn zero() -> __m512i {
        _mm512_setzero_si512()
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,avx2,fma,popcnt")]
    #[inline]
    fn zero_v() -> __m512i {
        _mm512_setzero_si512()
    }
    /// `len <= 64` codes at `p`, zeros above. Caller: `len` codes readable.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,avx2,fma,popcnt")]
    #[inline]
    unsafe fn load_dense(p: *const i8, len: usize) -> __m512i {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES));
        if len >= VL {
            // SAFETY: 64 codes readable (caller).
            unsafe { _mm512_loadu_si512(p as *const __m512i) }
        } else {
            // SAFETY: masked-off bytes are neither read nor faulted on.
            unsafe { _mm512_maskz_loadu_epi8(_bzhi_u64(u64::MAX, len as u32), p) }
        }
    }
    /// The 64 columns of the `nbytes` mask bytes at `mp` (8, or fewer for a row's last word),
    /// their codes expanded from `*p`, which moves past them. Caller: the bytes and as many codes
    /// as they have set bits are readable.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,avx2,fma,popcnt")]
    #[inline]
    unsafe fn load_sparse(mp: *const u8, nbytes: usize, p: &mut *const i8) -> __m512i {
        // SAFETY: nbytes mask bytes readable (caller).
        let m = unsafe { if nbytes >= 8 { (mp as *const u64).read_unaligned() } else { tail_word(mp, nbytes) } };
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES));
        let pc = m.count_ones();
        // SAFETY: the masked load reads exactly popcount(m) codes (caller).
        let v = unsafe { _mm512_maskz_loadu_epi8(_bzhi_u64(u64::MAX, pc), *p) };
        // SAFETY: within the row's codes (caller).
        *p = unsafe { p.add(pc as usize) };
        _mm512_maskz_expand_epi8(m, v)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,avx2,fma,popcnt")]
    #[inline]
    fn prep(w: __m512i) -> __m512i {
        _mm512_xor_si512(w, _mm512_set1_epi8(-128))
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,avx2,fma,popcnt")]
    #[inline]
    fn dot(acc: __m512i, wq: __m512i, _w: __m512i, a: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, wq, a)
    }
    /// Caller: 64 codes readable at `p`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,avx2,fma,popcnt")]
    #[inline]
    unsafe fn load_act(p: *const i8) -> __m512i {
        // SAFETY: caller.
        unsafe { _mm512_loadu_si512(p as *const __m512i) }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,avx2,fma,popcnt")]
    #[inline]
    fn hsum(v: __m512i) -> i32 {
        _mm512_reduce_add_epi32(v)
    }

    kernels!("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,avx2,fma,popcnt");

    /// Activation rows per prefill tile: 8 vectors of 16 i32 lanes, one lane per row.
    pub(in crate::int8) const TILE: usize = 128;
    /// Mask words (64 columns each) per column block: the block's panel, 256 columns × 128 rows,
    /// is 32 KiB and stays in L1 while every row of a task passes over it.
    const BLOCK_WORDS: usize = 4;

    /// The prefill kernel's rows `r0..r1` against one tile of packed activations:
    /// `acc[(r − r0) · TILE + i] = Σ_c (q[i, c] + 128) · W[r, c]` (raw, before correction).
    /// Only the 4-column groups with a stored code are multiplied (`vpdpbusd` adds four products,
    /// so a group is its unit): one broadcast of the group's four codes and `V` `vpdpbusd`
    /// against the panel per group.
    ///
    /// # Safety
    /// AVX-512 VNNI, VBMI2, BMI2; the view was validated; `panel` is `[stride / 4][TILE]` u32
    /// (four biased codes each) for `stride = cols.next_multiple_of(64)`; `acc.len() ==
    /// (r1 − r0) · TILE`.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,avx2,fma,popcnt")]
    unsafe fn prefill_rows<const V: usize>(w: &Int8Bitmask<'_>, r0: usize, r1: usize, panel: &[u32], acc: &mut [i32]) {
        let v = w.codes();
        let cols = v.cols();
        let mb = cols.div_ceil(8);
        let words = mb.div_ceil(8);
        let mut ptrs: Vec<*const i8> = (r0..r1).map(|r| v.values()[v.row_offsets()[r] as usize..].as_ptr()).collect();
        acc.fill(0);
        #[repr(C, align(64))]
        struct Expanded([u32; 16]);
        let mut e = Expanded([0; 16]);
        let pp = panel.as_ptr();
        for w0 in (0..words).step_by(BLOCK_WORDS) {
            let w1 = (w0 + BLOCK_WORDS).min(words);
            for (k, p) in ptrs.iter_mut().enumerate() {
                let r = r0 + k;
                let ap = acc[k * TILE..].as_mut_ptr();
                // SAFETY: acc holds TILE sums for row k.
                let mut s: [__m512i; V] =
                    std::array::from_fn(|t| unsafe { _mm512_loadu_si512(ap.add(16 * t) as *const __m512i) });
                // SAFETY: row r's mask bytes.
                let mp = unsafe { v.bitmask().as_ptr().add(r * mb) };
                for wd in w0..w1 {
                    let nbytes = (mb - 8 * wd).min(8);
                    // SAFETY: bytes 8 wd .. 8 wd + nbytes of the row.
                    let m = unsafe {
                        if nbytes == 8 {
                            (mp.add(8 * wd) as *const u64).read_unaligned()
                        } else {
                            tail_word(mp.add(8 * wd), nbytes)
                        }
                    };
                    if m == 0 {
                        continue;
                    }
                    // SAFETY: the masked load reads the popcount(m) codes of this word, which the
                    // validated row holds from *p on; the store fills the 64-byte buffer.
                    unsafe {
                        let pc = m.count_ones();
                        let codes = _mm512_maskz_loadu_epi8(_bzhi_u64(u64::MAX, pc), *p);
                        _mm512_store_si512(e.0.as_mut_ptr() as *mut __m512i, _mm512_maskz_expand_epi8(m, codes));
                        *p = p.add(pc as usize);
                    }
                    // Bit 4g set when group g (columns 4g .. 4g + 4 of the word) holds a code.
                    let t = m | (m >> 1);
                    let mut nz = (t | (t >> 2)) & 0x1111_1111_1111_1111;
                    while nz != 0 {
                        let g = nz.trailing_zeros() as usize / 4;
                        nz &= nz - 1;
                        let b = _mm512_set1_epi32(e.0[g] as i32);
                        // SAFETY: group 16 wd + g < stride / 4 of the panel, TILE lanes each.
                        let q = unsafe { pp.add((16 * wd + g) * TILE) };
                        for t in 0..V {
                            // SAFETY: as above; lanes 16 t .. 16 t + 16 < TILE.
                            let a = unsafe { _mm512_loadu_si512(q.add(16 * t) as *const __m512i) };
                            s[t] = _mm512_dpbusd_epi32(s[t], a, b);
                        }
                    }
                }
                for t in 0..V {
                    // SAFETY: as for the loads.
                    unsafe { _mm512_storeu_si512(ap.add(16 * t) as *mut __m512i, s[t]) };
                }
            }
        }
    }

    /// Row `r` of a bitmask weight expanded to dense codes: `dst` gets `cols.div_ceil(64)`
    /// whole 64-byte words (zeros at clear bits and past `cols`), one masked load and one
    /// `vpexpandb` per word. (The AMX prefill stages its weight panels with it.)
    ///
    /// # Safety
    /// AVX-512 VBMI2 and BMI2; the view was validated; `r < rows`; `dst.len() >= 64 ·
    /// cols.div_ceil(64)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,avx2,fma,popcnt")]
    pub(in crate::int8) unsafe fn expand_row(w: &Int8Bitmask<'_>, r: usize, dst: &mut [u8]) {
        let v = w.codes();
        let mb = v.cols().div_ceil(8);
        let words = mb.div_ceil(8);
        debug_assert!(r < v.rows() && dst.len() >= 64 * words);
        let mut p = v.values()[v.row_offsets()[r] as usize..].as_ptr();
        for wd in 0..words {
            // SAFETY: the row's mask bytes 8 wd .. and, the view being validated, as many codes
            // from `p` on as they have set bits; the store writes word wd of `dst` (caller).
            unsafe {
                let e = load_sparse(v.bitmask().as_ptr().add(r * mb + 8 * wd), mb - 8 * wd, &mut p);
                _mm512_storeu_si512(dst.as_mut_ptr().add(64 * wd) as *mut __m512i, e);
            }
        }
    }

    /// [`prefill_rows`] for `lanes` meaningful activation rows (the vectors past them skipped).
    ///
    /// # Safety
    /// As for `prefill_rows`; `1 <= lanes <= TILE`.
    pub(in crate::int8) unsafe fn prefill_task(
        w: &Int8Bitmask<'_>,
        r0: usize,
        r1: usize,
        panel: &[u32],
        lanes: usize,
        acc: &mut [i32],
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            match lanes.div_ceil(16) {
                1 => prefill_rows::<1>(w, r0, r1, panel, acc),
                2 => prefill_rows::<2>(w, r0, r1, panel, acc),
                3 => prefill_rows::<3>(w, r0, r1, panel, acc),
                4 => prefill_rows::<4>(w, r0, r1, panel, acc),
                5 => prefill_rows::<5>(w, r0, r1, panel, acc),
                6 => prefill_rows::<6>(w, r0, r1, panel, acc),
                7 => prefill_rows::<7>(w, r0, r1, panel, acc),
                _ => prefill_rows::<8>(w, r0, r1, panel, acc),
            }
        }
    }
}

/// Byte-granular expansion for the 256-bit paths (no `vpexpandb` without AVX-512): each mask
/// byte's codes are loaded as 8 bytes and placed by `vpshufb` from a 256-entry table.
mod expand256 {
    use super::*;

    /// Lane `k` of entry `b`: for a set bit `k`, its rank among the set bits of `b` (+ 8 in
    /// `HI`, whose codes sit in the upper half of the 16-byte register); for a clear bit 0x80,
    /// which `vpshufb` turns into a zero.
    const fn table(shift: u8) -> [[u8; 8]; 256] {
        let mut t = [[0x80u8; 8]; 256];
        let mut b = 0;
        while b < 256 {
            let (mut rank, mut k) = (0u8, 0);
            while k < 8 {
                if (b >> k) & 1 == 1 {
                    t[b][k] = rank + shift;
                    rank += 1;
                }
                k += 1;
            }
            b += 1;
        }
        t
    }
    static LO: [[u8; 8]; 256] = table(0);
    static HI: [[u8; 8]; 256] = table(8);

    /// 16 columns (mask bytes `m0`, `m1`) from the codes at `p`. Caller: 8 bytes readable at
    /// `p` and at `p + popcount(m0)`.
    #[target_feature(enable = "avx2,popcnt")]
    #[inline]
    unsafe fn expand16(m0: u8, m1: u8, p: *const i8) -> __m128i {
        // SAFETY: caller.
        let (lo, hi) = unsafe {
            ((p as *const i64).read_unaligned(), (p.add(m0.count_ones() as usize) as *const i64).read_unaligned())
        };
        let idx = _mm_set_epi64x(i64::from_le_bytes(HI[m1 as usize]), i64::from_le_bytes(LO[m0 as usize]));
        _mm_shuffle_epi8(_mm_set_epi64x(hi, lo), idx)
    }

    /// The 32 columns of mask word `m`, codes from `*p` (which moves past them). Caller: the
    /// word's codes and 8 bytes past them are readable.
    #[target_feature(enable = "avx2,popcnt")]
    #[inline]
    pub(super) unsafe fn expand32(m: u32, p: &mut *const i8) -> __m256i {
        let b = m.to_le_bytes();
        // SAFETY: the first half's codes lie within the word's, with 8 bytes of slack (caller).
        let lo = unsafe { expand16(b[0], b[1], *p) };
        // SAFETY: as above.
        let q = unsafe { p.add((m & 0xffff).count_ones() as usize) };
        // SAFETY: as above.
        let hi = unsafe { expand16(b[2], b[3], q) };
        // SAFETY: within the row's codes (caller).
        *p = unsafe { p.add(m.count_ones() as usize) };
        _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi)
    }

    /// `len <= 32` codes at `p`, zeros above. Caller: `len` codes readable.
    #[target_feature(enable = "avx2,popcnt")]
    #[inline]
    pub(super) unsafe fn load_dense(p: *const i8, len: usize) -> __m256i {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES));
        if len >= 32 {
            // SAFETY: 32 codes readable (caller).
            unsafe { _mm256_loadu_si256(p as *const __m256i) }
        } else {
            let mut buf = [0i8; 32];
            // SAFETY: len codes readable (caller), buf holds 32.
            unsafe {
                std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len.min(32));
                _mm256_loadu_si256(buf.as_ptr() as *const __m256i)
            }
        }
    }

    /// As `avx512::load_sparse` for 32 columns (`nbytes <= 4`). Caller: the mask bytes, the
    /// word's codes and 8 bytes past them are readable.
    #[target_feature(enable = "avx2,popcnt")]
    #[inline]
    pub(super) unsafe fn load_sparse(mp: *const u8, nbytes: usize, p: &mut *const i8) -> __m256i {
        // SAFETY: nbytes mask bytes readable (caller).
        let m = unsafe { if nbytes >= 4 { (mp as *const u32).read_unaligned() } else { tail_word(mp, nbytes) as u32 } };
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES));
        // SAFETY: caller.
        unsafe { expand32(m, p) }
    }

    #[target_feature(enable = "avx2,popcnt")]
    #[inline]
    pub(super) fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

pub(super) mod avxvnni {
    //! 32 columns a vector, `vpdpbusd` on 256 bits (VEX). Bitmask words expand a byte at a time
    //! (`expand256`): per 32 columns four 8-byte code loads, four table loads, four
    //! `vpunpcklqdq`, two `vpshufb`, one `vinserti128`, four `popcnt` with their byte
    //! extractions and adds: about 30 instructions (read off the compiled loop), then `vpxor` and
    //! one `vpdpbusd` per activation row, so about 65 per 64 columns. Without `vpexpandb` this
    //! path is bound by instructions, not bytes (docs/benchmarks.md, "INT8 kernels").
    use super::expand256::{hsum, load_dense, load_sparse};
    use super::*;

    type Acc = __m256i;
    const VL: usize = 32;
    const CORRECT: bool = true;
    const TILE_ROWS: usize = 1;
    const SLACK: usize = 8;

    #[target_feature(enable = "avx2,fma,popcnt,avxvnni")]
    #[inline]
    fn zero() -> __m256i {
        _mm256_setzero_si256()
    }
    #[target_feature(enable = "avx2,fma,popcnt,avxvnni")]
    #[inline]
    fn zero_v() -> __m256i {
        _mm256_setzero_si256()
    }
    #[target_feature(enable = "avx2,fma,popcnt,avxvnni")]
    #[inline]
    fn prep(w: __m256i) -> __m256i {
        _mm256_xor_si256(w, _mm256_set1_epi8(-128))
    }
    #[target_feature(enable = "avx2,fma,popcnt,avxvnni")]
    #[inline]
    fn dot(acc: __m256i, wq: __m256i, _w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, wq, a)
    }
    #[target_feature(enable = "avx2,fma,popcnt,avxvnni")]
    #[inline]
    unsafe fn load_act(p: *const i8) -> __m256i {
        // SAFETY: 32 codes readable (caller).
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }

    kernels!("avx2,fma,popcnt,avxvnni");
}

pub(super) mod avx2 {
    //! 32 columns a vector with the sign trick (see the parent module): per weight vector one
    //! `vpabsb`; per activation row `vpsignb`, `vpmaddubsw`, `vpmaddwd`, `vpaddd`.
    use super::expand256::{hsum, load_dense, load_sparse};
    use super::*;

    type Acc = __m256i;
    const VL: usize = 32;
    const CORRECT: bool = false;
    const TILE_ROWS: usize = 1;
    const SLACK: usize = 8;

    #[target_feature(enable = "avx2,fma,popcnt")]
    #[inline]
    fn zero() -> __m256i {
        _mm256_setzero_si256()
    }
    #[target_feature(enable = "avx2,fma,popcnt")]
    #[inline]
    fn zero_v() -> __m256i {
        _mm256_setzero_si256()
    }
    /// |w| as u8 (0..=128).
    #[target_feature(enable = "avx2,fma,popcnt")]
    #[inline]
    fn prep(w: __m256i) -> __m256i {
        _mm256_abs_epi8(w)
    }
    /// `acc + Σ |w| · sign(q, w)` over pairs, then quads: never saturates (module docs).
    #[target_feature(enable = "avx2,fma,popcnt")]
    #[inline]
    fn dot(acc: __m256i, wabs: __m256i, w: __m256i, a: __m256i) -> __m256i {
        let s = _mm256_sign_epi8(a, w);
        let p16 = _mm256_maddubs_epi16(wabs, s);
        _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }
    #[target_feature(enable = "avx2,fma,popcnt")]
    #[inline]
    unsafe fn load_act(p: *const i8) -> __m256i {
        // SAFETY: 32 codes readable (caller).
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }

    kernels!("avx2,fma,popcnt");
}

/// Prefill of bitmask weights on AVX-512 VNNI: `y[n, rows]` for `n > SMALL_BATCH_MAX_N`.
/// Activations are packed per tile of 128 rows as `panel[g][i]` = the four codes of row `i` at
/// columns `4g .. 4g + 4`, each + 128 (u8); tasks are (tile, row range) pairs; each dequantizes
/// its sums minus `128 · Σ_c W[r, c]` into a transposed output tile.
pub(super) fn prefill(w: &Int8Bitmask<'_>, acts: &QuantizedActs, y: &mut [f32]) {
    const TILE: usize = avx512::TILE;
    let (rows, n, stride) = (w.rows(), acts.n, acts.stride);
    let groups = stride / 4;
    let tiles = n.div_ceil(TILE);
    let mut panel = vec![0u32; tiles * groups * TILE];
    panel.par_chunks_mut(groups * TILE).enumerate().for_each(|(t, p)| {
        for i in 0..TILE {
            let row = t * TILE + i;
            for g in 0..groups {
                p[g * TILE + i] = if row < n {
                    let c = &acts.codes[row * stride + 4 * g..row * stride + 4 * g + 4];
                    u32::from_le_bytes([c[0] as u8 ^ 0x80, c[1] as u8 ^ 0x80, c[2] as u8 ^ 0x80, c[3] as u8 ^ 0x80])
                } else {
                    0x8080_8080
                };
            }
        }
    });
    // Σ_c W[r, c] per row: a row's codes are contiguous.
    let v = w.codes();
    let (vals, offs) = (v.values(), v.row_offsets());
    let row_sums: Vec<i32> = (0..rows)
        .map(|r| {
            let end = if r + 1 < rows { offs[r + 1] as usize } else { vals.len() };
            vals[offs[r] as usize..end].iter().map(|&c| c as i32).sum()
        })
        .collect();
    let tasks_per_tile = (4 * cpu::threads()).div_ceil(tiles).max(1);
    let per = rows.div_ceil(tasks_per_tile).max(8).min(rows);
    let mut yt = vec![0f32; tiles * rows * TILE];
    let (panel, row_sums, scales) = (&panel, &row_sums, w.scales());
    yt.par_chunks_mut(rows * TILE).enumerate().for_each(|(t, tile_out)| {
        let lanes = (n - t * TILE).min(TILE);
        let p = &panel[t * groups * TILE..(t + 1) * groups * TILE];
        tile_out.par_chunks_mut(per * TILE).enumerate().for_each(|(k, o)| {
            let r0 = k * per;
            let r1 = r0 + o.len() / TILE;
            let mut acc = vec![0i32; o.len()];
            // SAFETY: the Avx512Vnni path was checked supported by the caller; the view was
            // validated; the panel is [stride / 4][TILE]; acc is [r1 − r0][TILE]; 1 <= lanes.
            unsafe { avx512::prefill_task(w, r0, r1, p, lanes, &mut acc) };
            for (j, (o, a)) in o.chunks_exact_mut(TILE).zip(acc.chunks_exact(TILE)).enumerate() {
                let r = r0 + j;
                let corr = row_sums[r].wrapping_mul(128);
                for i in 0..lanes {
                    let s = a[i].wrapping_sub(corr);
                    o[i] = s as f32 * (acts.scales[t * TILE + i] * scales[r]);
                }
            }
        });
    });
    y.par_chunks_mut(TILE * rows).enumerate().for_each(|(t, yc)| {
        dense::scatter_transposed(&yt[t * rows * TILE..(t + 1) * rows * TILE], TILE, rows, yc);
    });
}

/// Per-token activation quantization ([`super::quantize_row`]) in vectors: the same f32
/// operations in the same order per value (`|x|` maximum, `v · inv + ROUND − ROUND`, clamp),
/// so the codes, scale and sum equal the scalar reference's bit for bit.
pub(super) mod quant {
    use super::*;
    use crate::int8::ROUND;

    /// Largest `|x|`, or `None` if a value is NaN or infinite.
    ///
    /// # Safety
    /// AVX-512F and BW.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(in crate::int8) unsafe fn amax_512(x: &[f32]) -> Option<f32> {
        let (abs, big) = (_mm512_set1_epi32(0x7fff_ffff), _mm512_set1_ps(f32::MAX));
        let (mut m, mut finite) = (_mm512_setzero_ps(), 0xffffu16);
        for c in x.chunks(16) {
            let k = ((1u32 << c.len()) - 1) as u16;
            // SAFETY: the masked load reads the chunk's `c.len()` values only.
            let a = _mm512_castsi512_ps(_mm512_and_si512(
                _mm512_castps_si512(unsafe { _mm512_maskz_loadu_ps(k, c.as_ptr()) }),
                abs,
            ));
            // NaN compares false (ordered), +∞ is above f32::MAX.
            finite &= _mm512_cmp_ps_mask::<_CMP_LE_OQ>(a, big) | !k;
            m = _mm512_max_ps(m, a);
        }
        (finite == 0xffff).then(|| _mm512_reduce_max_ps(m))
    }

    /// Codes of `x` times `inv` into `dst` (same length); returns their sum.
    ///
    /// # Safety
    /// AVX-512F and BW; `dst.len() == x.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(in crate::int8) unsafe fn codes_512(x: &[f32], inv: f32, dst: &mut [i8]) -> i32 {
        let (iv, r) = (_mm512_set1_ps(inv), _mm512_set1_ps(ROUND));
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        let mut sum = _mm512_setzero_si512();
        for (c, d) in x.chunks(16).zip(dst.chunks_mut(16)) {
            let k = ((1u32 << c.len()) - 1) as u16;
            // SAFETY: masked load and store of the chunk's values and codes only.
            unsafe {
                let v = _mm512_maskz_loadu_ps(k, c.as_ptr());
                let q = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v, iv), r), r);
                let q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(q), lo), hi);
                _mm512_mask_cvtepi32_storeu_epi8(d.as_mut_ptr() as *mut _, k, q);
                sum = _mm512_add_epi32(sum, q);
            }
        }
        _mm512_reduce_add_epi32(sum)
    }
}
