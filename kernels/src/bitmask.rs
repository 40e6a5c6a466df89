//! Bitmask-sparse weights (the compressed-tensors `sparse-bitmask` layout) and their products.
//!
//! A `[rows, cols]` weight is stored as
//! - `bitmask`: `[rows, ceil(cols / 8)]` bytes; bit `c % 8` of byte `c / 8` of a row (least
//!   significant bit first, numpy's `packbits(bitorder="little")`) says whether column `c` holds a
//!   stored value; every row is padded to whole bytes on its own and padding bits are zero;
//! - `values`: the stored values in row-major order;
//! - `row_offsets`: `rows` entries, where each row's values start in `values`.
//!
//! Decoding streams every weight once per token, so it is bound by memory bandwidth: this layout
//! costs `1/8 + (1 - s) · size_of::<T>()` bytes per weight at sparsity `s`, and the kernels expand
//! the packed values back into SIMD registers under the mask so that time follows those bytes.
//!
//! Products use the dense convention: `y[n, rows] = x[n, cols] · Wᵀ` with f32 activations.

use half::bf16;
use rayon::prelude::*;

use crate::cpu::{self, Isa};
use crate::dense;
use crate::prefill;
use crate::{KernelError, Result};

const FORMAT: &str = "sparse-bitmask";

fn format_err(msg: String) -> KernelError {
    KernelError::Format { format: FORMAT, msg }
}

mod sealed {
    use crate::cpu::Isa;

    pub trait Sealed: Sized {
        /// `out[r, i] = Σ_c W[r, c] · x[i, c]` for a block of `offsets.len()` rows and
        /// `n = out.len() / offsets.len()` activation rows (`out` is `[rows, n]`).
        ///
        /// # Safety
        /// `isa` is supported by this CPU; `mask` is `offsets.len() · cols.div_ceil(8)` bytes whose
        /// padding bits are zero; every offset is in `0..=vals.len()` and `vals[offsets[r]..]`
        /// holds at least as many values as row `r` of `mask` has set bits; `x.len() == n · cols`;
        /// `1 <= n <= 8`.
        unsafe fn gemv_block(
            isa: Isa,
            mask: &[u8],
            vals: &[Self],
            offsets: &[i64],
            cols: usize,
            x: &[f32],
            out: &mut [f32],
        );
        /// Writes the dense f32 row into `dst` (`dst.len() == cols`).
        ///
        /// # Safety
        /// `isa` is supported by this CPU; `mask` is `cols.div_ceil(8)` bytes whose padding bits
        /// are zero; `vals` holds at least as many values as `mask` has set bits.
        unsafe fn expand_row(isa: Isa, mask: &[u8], vals: &[Self], cols: usize, dst: &mut [f32]);
    }
}

/// A value type a bitmask matrix stores (f32, bf16, and i8 codes of INT8 weights).
pub trait BitmaskValue: Copy + Send + Sync + PartialEq + std::fmt::Debug + bytemuck::Pod + sealed::Sealed {
    const NAME: &'static str;
    const ZERO: Self;
    /// Whether `from_dense` keeps the value: compressed-tensors stores `v != 0`, so ±0 are dropped.
    fn is_stored(self) -> bool;
    fn to_f32(self) -> f32;
}

impl BitmaskValue for f32 {
    const NAME: &'static str = "f32";
    const ZERO: Self = 0.0;
    #[inline]
    fn is_stored(self) -> bool {
        self != 0.0
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
}

impl BitmaskValue for bf16 {
    const NAME: &'static str = "bf16";
    const ZERO: Self = bf16::ZERO;
    #[inline]
    fn is_stored(self) -> bool {
        // NaN != 0 holds, so NaNs are stored like any other non-zero.
        self.to_bits() & 0x7fff != 0
    }
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// INT8 codes: the `sparse-bitmask` compression of an `int-quantized` weight. The INT8 kernels
/// ([`crate::int8`]) multiply them with their scales; the f32 products here treat the codes as
/// plain numbers on the reference path (a correct, slow fallback, not a decode path).
impl BitmaskValue for i8 {
    const NAME: &'static str = "i8";
    const ZERO: Self = 0;
    #[inline]
    fn is_stored(self) -> bool {
        self != 0
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

impl sealed::Sealed for i8 {
    unsafe fn gemv_block(_: Isa, mask: &[u8], vals: &[i8], offsets: &[i64], cols: usize, x: &[f32], out: &mut [f32]) {
        gemv_block_scalar(mask, vals, offsets, cols, x, out)
    }
    unsafe fn expand_row(_: Isa, mask: &[u8], vals: &[i8], _: usize, dst: &mut [f32]) {
        expand_row_scalar(mask, vals, dst)
    }
}

macro_rules! sealed_impl {
    ($t:ty, $avx2_gemv:ident, $avx2_expand:ident, $avx512_gemv:ident, $avx512_expand:ident) => {
        impl sealed::Sealed for $t {
            #[inline]
            unsafe fn gemv_block(
                isa: Isa,
                mask: &[u8],
                vals: &[Self],
                offsets: &[i64],
                cols: usize,
                x: &[f32],
                out: &mut [f32],
            ) {
                let n = if offsets.is_empty() { 1 } else { out.len() / offsets.len() };
                let a = (mask, vals, offsets, cols, x, out);
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the caller's contract is the kernels' contract; `isa` is supported.
                    // Accumulator sets per N: enough independent FMA chains per 16-column word
                    // (4 for N <= 2, 2 for N <= 4; from N = 5 the N FMAs cover FMA latency).
                    Isa::Avx512 => unsafe {
                        match n {
                            1 => avx512::$avx512_gemv::<1, 4>(a.0, a.1, a.2, a.3, a.4, a.5),
                            2 => avx512::$avx512_gemv::<2, 4>(a.0, a.1, a.2, a.3, a.4, a.5),
                            3 => avx512::$avx512_gemv::<3, 2>(a.0, a.1, a.2, a.3, a.4, a.5),
                            4 => avx512::$avx512_gemv::<4, 2>(a.0, a.1, a.2, a.3, a.4, a.5),
                            5 => avx512::$avx512_gemv::<5, 1>(a.0, a.1, a.2, a.3, a.4, a.5),
                            6 => avx512::$avx512_gemv::<6, 1>(a.0, a.1, a.2, a.3, a.4, a.5),
                            7 => avx512::$avx512_gemv::<7, 1>(a.0, a.1, a.2, a.3, a.4, a.5),
                            _ => avx512::$avx512_gemv::<8, 1>(a.0, a.1, a.2, a.3, a.4, a.5),
                        }
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above; accumulator sets as on AVX-512 (`U · N + 3 <= 16` ymm).
                    Isa::Avx2 => unsafe {
                        match n {
                            1 => avx2::$avx2_gemv::<1, 4>(a.0, a.1, a.2, a.3, a.4, a.5),
                            2 => avx2::$avx2_gemv::<2, 4>(a.0, a.1, a.2, a.3, a.4, a.5),
                            3 => avx2::$avx2_gemv::<3, 2>(a.0, a.1, a.2, a.3, a.4, a.5),
                            4 => avx2::$avx2_gemv::<4, 2>(a.0, a.1, a.2, a.3, a.4, a.5),
                            5 => avx2::$avx2_gemv::<5, 1>(a.0, a.1, a.2, a.3, a.4, a.5),
                            6 => avx2::$avx2_gemv::<6, 1>(a.0, a.1, a.2, a.3, a.4, a.5),
                            7 => avx2::$avx2_gemv::<7, 1>(a.0, a.1, a.2, a.3, a.4, a.5),
                            _ => avx2::$avx2_gemv::<8, 1>(a.0, a.1, a.2, a.3, a.4, a.5),
                        }
                    },
                    _ => gemv_block_scalar(a.0, a.1, a.2, a.3, a.4, a.5),
                }
            }
            #[inline]
            unsafe fn expand_row(isa: Isa, mask: &[u8], vals: &[Self], cols: usize, dst: &mut [f32]) {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the caller's contract is the kernel's contract; `isa` is supported.
                    Isa::Avx512 => unsafe { avx512::$avx512_expand(mask, vals, cols, dst) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    Isa::Avx2 => unsafe { avx2::$avx2_expand(mask, vals, cols, dst) },
                    _ => expand_row_scalar(mask, vals, dst),
                }
            }
        }
    };
}

sealed_impl!(f32, gemv_f32, expand_f32, gemv_f32, expand_f32);
sealed_impl!(bf16, gemv_bf16, expand_bf16, gemv_bf16_any, expand_bf16);

/// The reference path over a block of rows (any `n`).
fn gemv_block_scalar<T: BitmaskValue>(
    mask: &[u8],
    vals: &[T],
    offsets: &[i64],
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) {
    let (rows, mb) = (offsets.len(), cols.div_ceil(8));
    if rows == 0 {
        return;
    }
    let n = out.len() / rows;
    for (r, o) in out.chunks_exact_mut(n.max(1)).enumerate().take(rows) {
        let start = usize::try_from(offsets[r]).unwrap_or(usize::MAX).min(vals.len());
        gemv_row_scalar(&mask[r * mb..(r + 1) * mb], &vals[start..], cols, x, o);
    }
}

/// The reference path: walks the set bits one by one.
fn gemv_row_scalar<T: BitmaskValue>(mask: &[u8], vals: &[T], cols: usize, x: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    let mut vals = vals.iter();
    for (b, &m) in mask.iter().enumerate() {
        let mut bits = m;
        while bits != 0 {
            let c = b * 8 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let Some(w) = vals.next() else { return };
            let w = w.to_f32();
            for (i, o) in out.iter_mut().enumerate() {
                *o += w * x[i * cols + c];
            }
        }
    }
}

fn expand_row_scalar<T: BitmaskValue>(mask: &[u8], vals: &[T], dst: &mut [f32]) {
    dst.fill(0.0);
    let mut vals = vals.iter();
    for (b, &m) in mask.iter().enumerate() {
        let mut bits = m;
        while bits != 0 {
            let c = b * 8 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let (Some(v), Some(d)) = (vals.next(), dst.get_mut(c)) {
                *d = v.to_f32();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! 8 lanes per mask byte. f32: a masked load of the byte's popcount values (lanes past them
    //! read as zero) and a cross-lane `vpermps` from a 256-entry table that sends each value to
    //! its column and every clear column to lane 7, which is zero unless all 8 bits are set.
    //! bf16: the low nibble's values widened into the low 128 bits and the high nibble's into the
    //! high 128 bits, placed by an in-lane `vpermilps` and zeroed under the clear bits by a blend
    //! (no masked 16-bit load in AVX2). One row at a time, consecutive bytes rotating over
    //! accumulator sets, the packed values prefetched ahead: the structure of the AVX-512 kernel.
    //! (On the 2-vCPU Zen 3 VM of docs/benchmarks.md the variants tried — blend after `vpermps`,
    //! nibble halves, four rows interleaved, gathering the activations instead of expanding the
    //! weights — all ran within the machine's ±30% noise of each other in cache.)
    use half::bf16;
    use std::arch::x86_64::*;

    /// Lane `k` of entry `b`: for a set bit `k`, its rank among the set bits of its nibble of `b`
    /// (lanes 0–3 the low nibble, 4–7 the high one); for a clear bit, `i32::MIN`. `vpermilps`
    /// reads only an index's low 2 bits and `vblendvps` its sign bit, so one entry both places the
    /// values and selects the lanes to zero.
    #[repr(C, align(32))]
    struct PlaceTable([[i32; 8]; 256]);
    static PLACE: PlaceTable = {
        let mut t = [[0i32; 8]; 256];
        let mut b = 0;
        while b < 256 {
            let mut k = 0;
            while k < 8 {
                let half = k / 4 * 4;
                let below = (b >> half) & ((1 << (k - half)) - 1);
                t[b][k] = if (b >> k) & 1 == 1 { (below as u32).count_ones() as i32 } else { i32::MIN };
                k += 1;
            }
            b += 1;
        }
        PlaceTable(t)
    };
    /// Lane `k` of entry `b`: for a set bit `k`, its rank among the set bits of `b`; for a clear
    /// bit, 7 (a lane the masked load left zero whenever a bit is clear).
    #[repr(C, align(32))]
    struct SpreadTable([[i32; 8]; 256]);
    static SPREAD: SpreadTable = {
        let mut t = [[7i32; 8]; 256];
        let mut b = 0;
        while b < 256 {
            let (mut rank, mut k) = (0, 0);
            while k < 8 {
                if (b >> k) & 1 == 1 {
                    t[b][k] = rank;
                    rank += 1;
                }
                k += 1;
            }
            b += 1;
        }
        SpreadTable(t)
    };
    /// Loading 8 lanes at `8 - k` gives a mask of the first `k` lanes.
    static FIRST: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    /// How far ahead of the packed values the kernels prefetch (as the dense GEMV).
    const PREFETCH_BYTES: usize = 2048;

    #[target_feature(enable = "avx2,fma,f16c,popcnt")]
    #[inline]
    fn first_lanes(k: usize) -> __m256i {
        debug_assert!(k <= 8);
        // SAFETY: k <= 8, so lanes 8-k .. 16-k lie inside FIRST.
        unsafe { _mm256_loadu_si256(FIRST.as_ptr().add(8 - k.min(8)) as *const __m256i) }
    }

    /// Byte `m`'s values (the low nibble's in lanes 0–3, the high nibble's in 4–7) moved to their
    /// columns, zeros elsewhere.
    #[target_feature(enable = "avx2,fma,f16c,popcnt")]
    #[inline]
    fn place(v: __m256, m: u8) -> __m256 {
        // SAFETY: `m` indexes the 256-entry table; each entry is 32 aligned bytes.
        let idx = unsafe { _mm256_load_si256(PLACE.0.as_ptr().add(m as usize) as *const __m256i) };
        _mm256_blendv_ps(_mm256_permutevar_ps(v, idx), _mm256_setzero_ps(), _mm256_castsi256_ps(idx))
    }

    /// The dense 8 columns of mask byte `m` whose values start at `p`. Caller: unless `CHECKED`,
    /// 8 values are readable at `p`; if `CHECKED`, popcount(m) are (and only those are read).
    #[target_feature(enable = "avx2,fma,f16c,popcnt")]
    #[inline]
    unsafe fn byte_f32<const CHECKED: bool>(m: u8, p: *const f32) -> __m256 {
        let pc = m.count_ones() as usize;
        // SAFETY: lanes past `pc` are masked off and VMASKMOVPS does not touch (or fault on) them.
        let v = unsafe { _mm256_maskload_ps(p, first_lanes(pc)) };
        // SAFETY: `m` indexes the 256-entry table; each entry is 32 aligned bytes.
        let idx = unsafe { _mm256_load_si256(SPREAD.0.as_ptr().add(m as usize) as *const __m256i) };
        _mm256_permutevar8x32_ps(v, idx)
    }
    #[target_feature(enable = "avx2,fma,f16c,popcnt")]
    #[inline]
    unsafe fn byte_bf16<const CHECKED: bool>(m: u8, p: *const bf16) -> __m256 {
        let lo = (m & 15).count_ones() as usize;
        let h = if CHECKED {
            let hi = (m >> 4).count_ones() as usize;
            let mut buf = [0u16; 8];
            // SAFETY: lo + hi = popcount(m) values are readable at p (caller); buf holds 4 + 4.
            unsafe {
                std::ptr::copy_nonoverlapping(p as *const u16, buf.as_mut_ptr(), lo);
                std::ptr::copy_nonoverlapping((p as *const u16).add(lo), buf.as_mut_ptr().add(4), hi);
                _mm_loadu_si128(buf.as_ptr() as *const __m128i)
            }
        } else {
            // SAFETY: lo <= 4, so both 4-value (8-byte) loads lie within the 8 readable values.
            unsafe {
                let a = _mm_loadl_epi64(p as *const __m128i);
                let b = _mm_loadl_epi64(p.add(lo) as *const __m128i);
                _mm_unpacklo_epi64(a, b)
            }
        };
        // bf16 is the top half of an f32.
        place(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h))), m)
    }

    use crate::dense::avx2::hsum;

    macro_rules! kernels {
        ($t:ty, $byte:ident, $gemv:ident, $row:ident, $expand:ident) => {
            /// A block's rows against `N` activation rows, one row at a time (see [`$row`]).
            ///
            /// # Safety
            /// The contract of `Sealed::gemv_block` with `out.len() == offsets.len() * N`.
            #[target_feature(enable = "avx2,fma,f16c,popcnt")]
            pub(super) unsafe fn $gemv<const N: usize, const U: usize>(
                mask: &[u8],
                vals: &[$t],
                offsets: &[i64],
                cols: usize,
                x: &[f32],
                out: &mut [f32],
            ) {
                let mb = cols.div_ceil(8);
                for (r, &offset) in offsets.iter().enumerate() {
                    let offset = offset as usize;
                    let row_mask = &mask[r * mb..(r + 1) * mb];
                    let o = &mut out[r * N..(r + 1) * N];
                    // Whole-vector loads read at most 8 values past the row's last one: every row
                    // but the matrix's last few has them; those take masked loads.
                    // SAFETY: the contract of `gemv_block` for this one row.
                    unsafe {
                        if vals.len() - offset >= cols + 8 {
                            $row::<N, U, false>(row_mask, vals[offset..].as_ptr(), cols, x, o)
                        } else {
                            $row::<N, U, true>(row_mask, vals[offset..].as_ptr(), cols, x, o)
                        }
                    }
                }
            }

            /// One row against `N` activation rows with its mask byte, value pointer and
            /// accumulators in registers. Consecutive bytes rotate over `U` sets of `N`
            /// accumulators so that an accumulator's next FMA never waits on its previous one
            /// (`U · N + 3 <= 16` ymm).
            ///
            /// # Safety
            /// AVX2, FMA, F16C, POPCNT; `mask` is the row's `cols.div_ceil(8)` bytes with zero
            /// padding bits; the row's values start at `p` and, unless `CHECKED`, `cols + 8`
            /// values are readable from `p` (else exactly as many as the row has);
            /// `x.len() == N · cols`, `out.len() == N`.
            #[allow(clippy::needless_range_loop)] // accumulators indexed by activation row
            #[target_feature(enable = "avx2,fma,f16c,popcnt")]
            #[inline]
            unsafe fn $row<const N: usize, const U: usize, const CHECKED: bool>(
                mask: &[u8],
                mut p: *const $t,
                cols: usize,
                x: &[f32],
                out: &mut [f32],
            ) {
                let (full, rem) = (cols / 8, cols % 8);
                let (mp, xp) = (mask.as_ptr(), x.as_ptr());
                let zero = _mm256_setzero_ps();
                let (mut a0, mut a1, mut a2, mut a3) = ([zero; N], [zero; N], [zero; N], [zero; N]);
                let mut j = 0;
                // One mask byte into accumulator set `$acc`.
                macro_rules! byte {
                    ($acc:ident) => {
                        // SAFETY: byte j < full <= mask.len(); the set bits read so far count the
                        // values consumed, so p stays within the row's values and, unchecked,
                        // 8 values are readable at p (caller); x row i has cols >= 8 (j + 1).
                        unsafe {
                            let m = *mp.add(j);
                            let w = $byte::<CHECKED>(m, p);
                            p = p.add(m.count_ones() as usize);
                            for i in 0..N {
                                let xv = _mm256_loadu_ps(xp.add(i * cols + 8 * j));
                                $acc[i] = _mm256_fmadd_ps(w, xv, $acc[i]);
                            }
                        }
                        j += 1;
                    };
                }
                while j + 4 <= full {
                    // The row's packed values ahead (prefetches never fault).
                    _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH_BYTES));
                    byte!(a0);
                    if U >= 2 {
                        byte!(a1);
                    } else {
                        byte!(a0);
                    }
                    if U >= 3 {
                        byte!(a2);
                    } else {
                        byte!(a0);
                    }
                    if U >= 4 {
                        byte!(a3);
                    } else if U >= 2 {
                        byte!(a1);
                    } else {
                        byte!(a0);
                    }
                }
                while j < full {
                    byte!(a0);
                }
                if rem > 0 {
                    // SAFETY: byte `full` exists; its padding bits are zero so its set bits are
                    // the row's remaining values (a checked load reads only those); the masked
                    // x load reads only the `rem` columns left in each x row.
                    unsafe {
                        let w = $byte::<true>(*mp.add(full), p);
                        for i in 0..N {
                            let xv = _mm256_maskload_ps(xp.add(i * cols + 8 * full), first_lanes(rem));
                            a0[i] = _mm256_fmadd_ps(w, xv, a0[i]);
                        }
                    }
                }
                for i in 0..N {
                    out[i] = hsum(_mm256_add_ps(_mm256_add_ps(a0[i], a1[i]), _mm256_add_ps(a2[i], a3[i])));
                }
            }

            /// # Safety
            /// The contract of `Sealed::expand_row`.
            #[target_feature(enable = "avx2,fma,f16c,popcnt")]
            pub(super) unsafe fn $expand(mask: &[u8], vals: &[$t], cols: usize, dst: &mut [f32]) {
                let full = cols / 8;
                let (mp, dp) = (mask.as_ptr(), dst.as_mut_ptr());
                let mut p = vals.as_ptr();
                let mut avail = vals.len();
                for j in 0..full {
                    // SAFETY: as in the product (pc <= avail values are readable at p, 8 when the
                    // unchecked load is taken); dst has cols >= 8 (j + 1) slots.
                    unsafe {
                        let m = *mp.add(j);
                        let pc = m.count_ones() as usize;
                        let w = if avail >= 8 { $byte::<false>(m, p) } else { $byte::<true>(m, p) };
                        _mm256_storeu_ps(dp.add(8 * j), w);
                        p = p.add(pc);
                        avail -= pc;
                    }
                }
                let rem = cols - 8 * full;
                if rem > 0 {
                    // SAFETY: byte `full` exists; the masked store writes the `rem` slots left.
                    unsafe {
                        let w = $byte::<true>(*mp.add(full), p);
                        _mm256_maskstore_ps(dp.add(8 * full), first_lanes(rem), w);
                    }
                }
            }
        };
    }
    kernels!(f32, byte_f32, gemv_f32, row_f32, expand_f32);
    kernels!(bf16, byte_bf16, gemv_bf16, row_bf16, expand_bf16);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! 16 lanes per 16-bit mask word. f32: `vexpandps` from memory (a load and one shuffle on
    //! Intel cores); bf16: a masked load of the word's values widened to f32, then a register
    //! `vexpandps`; on VBMI2 CPUs bf16 goes through `gemv_bf16_vbmi2` (32 columns per step).
    //!
    //! Measured on an Emerald Rapids core pair (f32, 91840 × 8192, twice the LLC): at 70 %
    //! sparsity the memory-form expand streamed 22.8 GiB/s with a 2 KiB prefetch distance, the
    //! masked load + register expand 18.6 GiB/s (its two extra mask moves compete with the expand
    //! for the shuffle port); without software prefetch both stayed near 15. (An earlier Zen 4
    //! measurement in cache, one thread, favoured the register form: 1.4 vs 2.4 ns a word.)
    use half::bf16;
    use std::arch::x86_64::*;

    /// How far ahead of the packed values the kernels prefetch: on a memory-bound GEMV one core
    /// cannot keep enough misses in flight on demand loads alone. One row's values are a single
    /// stream (the dense GEMV reads four rows side by side on Intel, each 2 KiB ahead), so it
    /// looks further: on Emerald Rapids, SmolLM2 at 70 % decoded at 0.82–0.83 of the byte ratio
    /// with 2 KiB (two `lacuna bench` runs) and 0.82–0.87 with 4 KiB (three runs; the host's
    /// bandwidth moved from 24 to 31 GB/s between them, so the gain is within its noise).
    const PREFETCH_BYTES: usize = 4096;

    #[inline(always)]
    fn first_lanes(k: usize) -> u16 {
        ((1u32 << k.min(16)) - 1) as u16
    }

    /// The first `pc` values at `p` widened to f32 in lanes 0..pc, zeros above.
    /// Caller: `pc <= 16` values are readable at `p`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
    #[inline]
    unsafe fn load_f32(p: *const f32, pc: usize) -> __m512 {
        // SAFETY: masked-off lanes are neither read nor faulted on (AVX-512 fault suppression).
        unsafe { _mm512_maskz_loadu_ps(first_lanes(pc), p) }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
    #[inline]
    unsafe fn load_bf16(p: *const bf16, pc: usize) -> __m512 {
        // SAFETY: as for f32, on 16-bit lanes (AVX512BW + VL).
        let h = unsafe { _mm256_maskz_loadu_epi16(first_lanes(pc), p as *const i16) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// One 16-column word of f32 weights: `vexpandps` from memory, which on Intel cores is a load
    /// plus one shuffle (the masked load + register expand costs two more mask moves on the
    /// shuffle port, which bounds the loop at 70 % sparsity).
    ///
    /// # Safety
    /// popcount(m) values are readable at `p`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
    #[inline]
    unsafe fn word_f32(m: u16, p: *const f32) -> __m512 {
        // SAFETY: expand-load reads exactly popcount(m) consecutive values (caller).
        unsafe { _mm512_maskz_expandloadu_ps(m, p) }
    }
    /// One 16-column word of bf16 weights: masked load of its values, widened, then expanded.
    ///
    /// # Safety
    /// popcount(m) values are readable at `p`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
    #[inline]
    unsafe fn word_bf16(m: u16, p: *const bf16) -> __m512 {
        // SAFETY: the masked load reads popcount(m) values (caller).
        _mm512_maskz_expand_ps(m, unsafe { load_bf16(p, m.count_ones() as usize) })
    }

    macro_rules! kernels {
        ($t:ty, $load:ident, $word:ident, $gemv:ident, $expand:ident) => {
            /// A block's rows against `N` activation rows, one row at a time with its mask word,
            /// packed-value pointer and accumulators in registers. Consecutive 16-column words
            /// rotate over `U` sets of `N` accumulators so that an accumulator's next FMA never
            /// waits on its previous one: a single FMA chain per accumulator bounds the loop by
            /// FMA latency (4 cycles a word), far below memory speed. `U · N + 2 ≤ 32` zmm.
            ///
            /// (Rows are not interleaved: with several rows' pointers in arrays, LLVM kept them
            /// and the expanded words on the stack, and the loop ran at half the bandwidth.)
            ///
            /// # Safety
            /// The contract of `Sealed::gemv_block` with `out.len() == offsets.len() * N`.
            #[allow(clippy::needless_range_loop)] // accumulators indexed by activation row
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
            pub(super) unsafe fn $gemv<const N: usize, const U: usize>(
                mask: &[u8],
                vals: &[$t],
                offsets: &[i64],
                cols: usize,
                x: &[f32],
                out: &mut [f32],
            ) {
                let (mb, full, rem) = (cols.div_ceil(8), cols / 16, cols % 16);
                let xp = x.as_ptr();
                for (r, &offset) in offsets.iter().enumerate() {
                    // SAFETY: row r owns mask bytes r mb .. (r + 1) mb; its offset lies within
                    // vals (contract).
                    let mp = unsafe { mask.as_ptr().add(r * mb) };
                    // SAFETY: as above.
                    let mut p = unsafe { vals.as_ptr().add(offset as usize) };
                    let zero = _mm512_setzero_ps();
                    let (mut a0, mut a1, mut a2, mut a3) = ([zero; N], [zero; N], [zero; N], [zero; N]);
                    let mut j = 0;
                    // One 16-column word into accumulator set `$acc`.
                    macro_rules! word {
                        ($acc:ident) => {
                            // SAFETY: bytes 2j, 2j + 1 < 2 full <= mb of row r; the set bits read
                            // so far count the values consumed, which the contract bounds by what
                            // vals holds from the row's offset on; x row i has cols >= 16 (j + 1).
                            unsafe {
                                let m = (mp.add(2 * j) as *const u16).read_unaligned();
                                // The row's packed values ahead (prefetches never fault).
                                _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH_BYTES));
                                let w = $word(m, p);
                                p = p.add(m.count_ones() as usize);
                                for i in 0..N {
                                    let xv = _mm512_loadu_ps(xp.add(i * cols + 16 * j));
                                    $acc[i] = _mm512_fmadd_ps(w, xv, $acc[i]);
                                }
                            }
                            j += 1;
                        };
                    }
                    // Word `k` of a 4-word group whose 64 mask bits are `mm`, its values `at`
                    // past the group's first, into accumulator set `$acc`.
                    macro_rules! group_word {
                        ($acc:ident, $mm:expr, $k:literal, $at:expr) => {
                            // SAFETY: as in `word!`: the group's words 4 ⌊j/4⌋.. < full; `$at`
                            // counts the group's values before word k, so the word's values lie
                            // where the row's set bits so far say (within vals by the contract).
                            unsafe {
                                let m = ($mm >> (16 * $k)) as u16;
                                let q = p.add($at);
                                _mm_prefetch::<_MM_HINT_T0>((q as *const i8).wrapping_add(PREFETCH_BYTES));
                                let w = $word(m, q);
                                for i in 0..N {
                                    let xv = _mm512_loadu_ps(xp.add(i * cols + 16 * (j + $k)));
                                    $acc[i] = _mm512_fmadd_ps(w, xv, $acc[i]);
                                }
                            }
                        };
                    }
                    // Four words per 64-bit mask load: each word's values start at a popcount of
                    // the group's bits before it, and the pointer advances once per group. A
                    // pointer bumped word by word (load, popcount, add) chains the words one
                    // after another: on Zen 4 that chain bounded a 70 %-sparse row at 1.8 ns a
                    // word, 11 GB/s per core even from cache; grouped, 0.9 ns.
                    while j + 4 <= full {
                        // SAFETY: bytes 2j .. 2j + 8 <= 2 full <= mb of row r.
                        let mm = unsafe { (mp.add(2 * j) as *const u64).read_unaligned() };
                        let c1 = (mm & 0xFFFF).count_ones() as usize;
                        let c2 = (mm & 0xFFFF_FFFF).count_ones() as usize;
                        let c3 = (mm & 0xFFFF_FFFF_FFFF).count_ones() as usize;
                        group_word!(a0, mm, 0, 0);
                        if U >= 2 {
                            group_word!(a1, mm, 1, c1);
                        } else {
                            group_word!(a0, mm, 1, c1);
                        }
                        if U >= 3 {
                            group_word!(a2, mm, 2, c2);
                        } else {
                            group_word!(a0, mm, 2, c2);
                        }
                        if U >= 4 {
                            group_word!(a3, mm, 3, c3);
                        } else if U >= 2 {
                            group_word!(a1, mm, 3, c3);
                        } else {
                            group_word!(a0, mm, 3, c3);
                        }
                        // SAFETY: the group's values end within vals (as above).
                        p = unsafe { p.add(mm.count_ones() as usize) };
                        j += 4;
                    }
                    while j < full {
                        word!(a0);
                    }
                    if rem > 0 {
                        // SAFETY: the row has 2 full + 1 (rem <= 8) or + 2 bytes; padding bits
                        // are zero so the word's set bits are the row's remaining values; the
                        // masked x load reads only the `rem` columns left in each x row.
                        unsafe {
                            let lo = *mp.add(2 * full) as u16;
                            let hi = if rem > 8 { *mp.add(2 * full + 1) as u16 } else { 0 };
                            let m = lo | (hi << 8);
                            let w = _mm512_maskz_expand_ps(m, $load(p, m.count_ones() as usize));
                            for i in 0..N {
                                let xv = _mm512_maskz_loadu_ps(first_lanes(rem), xp.add(i * cols + 16 * full));
                                a0[i] = _mm512_fmadd_ps(w, xv, a0[i]);
                            }
                        }
                    }
                    for i in 0..N {
                        let s = _mm512_add_ps(_mm512_add_ps(a0[i], a1[i]), _mm512_add_ps(a2[i], a3[i]));
                        out[r * N + i] = _mm512_reduce_add_ps(s);
                    }
                }
            }

            /// # Safety
            /// The contract of `Sealed::expand_row`.
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
            pub(super) unsafe fn $expand(mask: &[u8], vals: &[$t], cols: usize, dst: &mut [f32]) {
                let full = cols / 16;
                let (mp, dp) = (mask.as_ptr(), dst.as_mut_ptr());
                let mut p = vals.as_ptr();
                for j in 0..full {
                    // SAFETY: as in the product; dst has cols >= 16 (j + 1) slots.
                    unsafe {
                        let m = (mp.add(2 * j) as *const u16).read_unaligned();
                        let pc = m.count_ones() as usize;
                        _mm512_storeu_ps(dp.add(16 * j), _mm512_maskz_expand_ps(m, $load(p, pc)));
                        p = p.add(pc);
                    }
                }
                let rem = cols - 16 * full;
                if rem > 0 {
                    // SAFETY: as in the product's tail; the masked store writes the `rem` slots left.
                    unsafe {
                        let lo = *mp.add(2 * full) as u16;
                        let hi = if rem > 8 { *mp.add(2 * full + 1) as u16 } else { 0 };
                        let m = lo | (hi << 8);
                        let w = _mm512_maskz_expand_ps(m, $load(p, m.count_ones() as usize));
                        _mm512_mask_storeu_ps(dp.add(16 * full), first_lanes(rem), w);
                    }
                }
            }
        };
    }
    kernels!(f32, load_f32, word_f32, gemv_f32, expand_f32);
    kernels!(bf16, load_bf16, word_bf16, gemv_bf16, expand_bf16);

    /// The first `len < 4` bytes at `p` as a little-endian word. Caller: `len` bytes readable.
    #[inline(always)]
    unsafe fn tail_word(p: *const u8, len: usize) -> u32 {
        let mut m = 0u32;
        for q in 0..len.min(4) {
            // SAFETY: q < len bytes are readable (caller).
            m |= (unsafe { *p.add(q) } as u32) << (8 * q);
        }
        m
    }

    /// Expands the popcount(m) bf16 values at `p` to the 32 columns of `m`, as f32 in unpack
    /// order (see `gemv_bf16_vbmi2`). Caller: popcount(m) values readable at `p`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt")]
    #[inline]
    unsafe fn expand32(m: u32, p: *const bf16) -> (__m512, __m512) {
        let first = ((1u64 << m.count_ones()) - 1) as u32;
        // SAFETY: the masked load reads the popcount(m) values the caller vouches for.
        let v = unsafe { _mm512_maskz_loadu_epi16(first, p as *const i16) };
        let e = _mm512_maskz_expand_epi16(m, v);
        let zero = _mm512_setzero_si512();
        (_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, e)), _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, e)))
    }

    fn has_vbmi2() -> bool {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| std::is_x86_feature_detected!("avx512vbmi2"))
    }

    /// bf16 blocks: the VBMI2 kernel where the CPU has it (Ice Lake, Zen 4 and later), else the
    /// 16-lane one. `U` is the caller's choice of accumulator sets for the 16-lane kernel.
    ///
    /// # Safety
    /// The contract of `Sealed::gemv_block` with `out.len() == offsets.len() * N`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
    pub(super) unsafe fn gemv_bf16_any<const N: usize, const U: usize>(
        mask: &[u8],
        vals: &[bf16],
        offsets: &[i64],
        cols: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        if !has_vbmi2() {
            // SAFETY: same contract.
            return unsafe { gemv_bf16::<N, U>(mask, vals, offsets, cols, x, out) };
        }
        // SAFETY: same contract; AVX512-VBMI2 was detected. Two accumulator sets while their
        // 4 N accumulators, 2 expanded halves and 2 x vectors fit 32 zmm registers.
        unsafe {
            match N {
                1 => gemv_bf16_vbmi2::<1, 2>(mask, vals, offsets, cols, x, out),
                2 => gemv_bf16_vbmi2::<2, 2>(mask, vals, offsets, cols, x, out),
                3 => gemv_bf16_vbmi2::<3, 2>(mask, vals, offsets, cols, x, out),
                4 => gemv_bf16_vbmi2::<4, 1>(mask, vals, offsets, cols, x, out),
                5 => gemv_bf16_vbmi2::<5, 1>(mask, vals, offsets, cols, x, out),
                6 => gemv_bf16_vbmi2::<6, 1>(mask, vals, offsets, cols, x, out),
                7 => gemv_bf16_vbmi2::<7, 1>(mask, vals, offsets, cols, x, out),
                _ => gemv_bf16_vbmi2::<8, 1>(mask, vals, offsets, cols, x, out),
            }
        }
    }

    /// 32 bf16 columns per 32-bit mask word with half the instructions of the 16-lane kernel
    /// (bf16 values are so small that instructions, not bytes, bound that one): one masked load
    /// of the word's values, one `vpexpandw` putting each at its column, and two unpacks with
    /// zero that turn the 32 bf16 into two f32 vectors. The unpacks work within 128-bit lanes, so
    /// columns come out permuted; `x` is permuted the same way once per block instead.
    ///
    /// # Safety
    /// The contract of `Sealed::gemv_block` with `out.len() == offsets.len() * N`, and the CPU
    /// has AVX512-VBMI2.
    #[allow(clippy::needless_range_loop)] // parallel arrays indexed by the same row
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt")]
    unsafe fn gemv_bf16_vbmi2<const N: usize, const U: usize>(
        mask: &[u8],
        vals: &[bf16],
        offsets: &[i64],
        cols: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        let mb = cols.div_ceil(8);
        let chunks = cols.div_ceil(32);
        let c32 = chunks * 32;
        // x in unpack order, zero-padded to whole chunks: within chunk b, the low vector's lane
        // 4L + t holds column 32b + 8L + t and the high vector's column 32b + 8L + 4 + t.
        // Per-thread buffer, reused: decode allocates nothing per product.
        XS.with_borrow_mut(|xs| {
            xs.clear();
            xs.resize(N * c32, 0.0);
            for i in 0..N {
                for b in 0..chunks {
                    for l in 0..16 {
                        let (lane, t) = (l / 4, l % 4);
                        for (h, half) in [0usize, 4].into_iter().enumerate() {
                            let c = 32 * b + 8 * lane + half + t;
                            if c < cols {
                                xs[i * c32 + 32 * b + 16 * h + l] = x[i * cols + c];
                            }
                        }
                    }
                }
            }
            let xp = xs.as_ptr();
            // Whole 4-byte mask words, then the row's last partial word if any.
            let whole = mb / 4;
            for (r, &offset) in offsets.iter().enumerate() {
                // SAFETY: row r owns mask bytes r mb .. (r + 1) mb; its offset lies within vals.
                let mp = unsafe { mask.as_ptr().add(r * mb) };
                // SAFETY: as above.
                let mut p = unsafe { vals.as_ptr().add(offset as usize) };
                let zero = _mm512_setzero_ps();
                // Two accumulator sets (lo/hi halves each) alternating over chunks when `U >= 2`.
                let (mut lo0, mut hi0, mut lo1, mut hi1) = ([zero; N], [zero; N], [zero; N], [zero; N]);
                macro_rules! chunk {
                    ($b:expr, $lo:ident, $hi:ident) => {
                        let b = $b;
                        // SAFETY: bytes 4b .. 4b + 4 <= mb for b < whole, else only bytes below mb
                        // are read; padding bits are zero, so the set bits read so far count the
                        // values consumed, bounded by what vals holds from the row's offset on
                        // (contract); xs is [N, c32] and 32 (b + 1) <= c32.
                        unsafe {
                            let m = if b < whole {
                                (mp.add(4 * b) as *const u32).read_unaligned()
                            } else {
                                tail_word(mp.add(4 * b), mb - 4 * b)
                            };
                            _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH_BYTES));
                            let (wl, wh) = expand32(m, p);
                            p = p.add(m.count_ones() as usize);
                            for i in 0..N {
                                let xl = _mm512_loadu_ps(xp.add(i * c32 + 32 * b));
                                let xh = _mm512_loadu_ps(xp.add(i * c32 + 32 * b + 16));
                                $lo[i] = _mm512_fmadd_ps(wl, xl, $lo[i]);
                                $hi[i] = _mm512_fmadd_ps(wh, xh, $hi[i]);
                            }
                        }
                    };
                }
                let mut b = 0;
                while b + 2 <= chunks {
                    chunk!(b, lo0, hi0);
                    if U >= 2 {
                        chunk!(b + 1, lo1, hi1);
                    } else {
                        chunk!(b + 1, lo0, hi0);
                    }
                    b += 2;
                }
                if b < chunks {
                    chunk!(b, lo0, hi0);
                }
                for i in 0..N {
                    let s = _mm512_add_ps(_mm512_add_ps(lo0[i], hi0[i]), _mm512_add_ps(lo1[i], hi1[i]));
                    out[r * N + i] = _mm512_reduce_add_ps(s);
                }
            }
        });
    }

    thread_local! {
        static XS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
}

fn popcount(bytes: &[u8]) -> usize {
    let mut chunks = bytes.chunks_exact(8);
    let mut n = 0usize;
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        n += u64::from_le_bytes(w).count_ones() as usize;
    }
    n + chunks.remainder().iter().map(|b| b.count_ones() as usize).sum::<usize>()
}

/// Checks every invariant the kernels rely on; afterwards no access can go out of bounds.
fn validate(rows: usize, cols: usize, bitmask: &[u8], n_values: usize, row_offsets: &[i64]) -> Result<()> {
    let mb = cols.div_ceil(8);
    rows.checked_mul(cols).ok_or_else(|| format_err(format!("shape [{rows}, {cols}] overflows")))?;
    let want = rows * mb;
    if bitmask.len() != want {
        return Err(format_err(format!(
            "bitmask of [{rows}, {cols}] needs {rows} × {mb} = {want} bytes, got {}",
            bitmask.len()
        )));
    }
    if row_offsets.len() != rows {
        return Err(format_err(format!("{} row offsets for {rows} rows", row_offsets.len())));
    }
    let pad: u8 = if cols.is_multiple_of(8) { 0 } else { !((1u8 << (cols % 8)) - 1) };
    let mut expect = 0usize;
    let mut prev = 0i64;
    for (r, (row, &off)) in bitmask.chunks_exact(mb.max(1)).zip(row_offsets).enumerate() {
        if off < prev {
            return Err(format_err(format!("row offsets decrease at row {r}: {off} after {prev}")));
        }
        if usize::try_from(off).ok() != Some(expect) {
            return Err(format_err(format!(
                "row {r} starts at value {off}, but the rows before it hold {expect} values (by their bitmask)"
            )));
        }
        if row.last().is_some_and(|b| b & pad != 0) {
            return Err(format_err(format!("row {r}: padding bits past column {cols} are set")));
        }
        expect += popcount(row);
        prev = off;
    }
    if mb == 0 && rows > 0 {
        // No columns: `chunks_exact(1)` above saw no bytes, so only the offsets remain to check.
        if let Some((r, off)) = row_offsets.iter().enumerate().find(|(_, o)| **o != 0) {
            return Err(format_err(format!("row {r} of a matrix without columns starts at value {off}")));
        }
    }
    if expect != n_values {
        return Err(format_err(format!("the bitmask has {expect} set bits but {n_values} values are stored")));
    }
    Ok(())
}

/// A borrowed, validated bitmask matrix: what the kernels run on. Build one over memory-mapped
/// checkpoint tensors with [`BitmaskView::new`], or borrow an owned [`BitmaskMatrix`].
#[derive(Clone, Copy, Debug)]
pub struct BitmaskView<'a, T> {
    rows: usize,
    cols: usize,
    bitmask: &'a [u8],
    values: &'a [T],
    row_offsets: &'a [i64],
}

impl<'a, T: BitmaskValue> BitmaskView<'a, T> {
    /// Validates the parts (see the module docs for the layout) and borrows them.
    pub fn new(rows: usize, cols: usize, bitmask: &'a [u8], values: &'a [T], row_offsets: &'a [i64]) -> Result<Self> {
        validate(rows, cols, bitmask, values.len(), row_offsets)?;
        Ok(Self { rows, cols, bitmask, values, row_offsets })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }
    pub fn bitmask(&self) -> &'a [u8] {
        self.bitmask
    }
    pub fn values(&self) -> &'a [T] {
        self.values
    }
    pub fn row_offsets(&self) -> &'a [i64] {
        self.row_offsets
    }
    /// Stored (non-zero) values.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }
    /// Bytes one full pass over the weight streams: bitmask, values and row offsets.
    pub fn nbytes(&self) -> usize {
        self.bitmask.len() + std::mem::size_of_val(self.values) + std::mem::size_of_val(self.row_offsets)
    }
    /// Fraction of entries not stored (0 for an empty matrix).
    pub fn sparsity(&self) -> f64 {
        let total = self.rows * self.cols;
        if total == 0 { 0.0 } else { 1.0 - self.values.len() as f64 / total as f64 }
    }
    fn mask_bytes(&self) -> usize {
        self.cols.div_ceil(8)
    }
    /// Row `r`'s mask and the values from its first one to the end of the array (kernels may
    /// read whole vectors past a row's own values, never past the array).
    fn row_parts(&self, r: usize) -> (&'a [u8], &'a [T]) {
        let mb = self.mask_bytes();
        // Validated: offsets are in 0..=values.len().
        let off = self.row_offsets[r] as usize;
        (&self.bitmask[r * mb..(r + 1) * mb], &self.values[off..])
    }
    /// The dense row-major `[rows, cols]` matrix.
    pub fn to_dense(&self) -> Vec<T> {
        let mut out = vec![T::ZERO; self.rows * self.cols];
        if self.cols == 0 {
            return out;
        }
        for (r, dst) in out.chunks_exact_mut(self.cols).enumerate() {
            let (mask, vals) = self.row_parts(r);
            let mut vals = vals.iter();
            for (c, d) in dst.iter_mut().enumerate() {
                if mask[c / 8] >> (c % 8) & 1 == 1
                    && let Some(v) = vals.next()
                {
                    *d = *v;
                }
            }
        }
        out
    }
}

/// An owned bitmask matrix; [`BitmaskMatrix::view`] lends it to the kernels.
#[derive(Clone, Debug, PartialEq)]
pub struct BitmaskMatrix<T> {
    rows: usize,
    cols: usize,
    bitmask: Vec<u8>,
    values: Vec<T>,
    row_offsets: Vec<i64>,
}

impl<T: BitmaskValue> BitmaskMatrix<T> {
    /// Compresses a dense row-major `[rows, cols]` matrix, keeping every value that is not ±0.
    pub fn from_dense(dense: &[T], rows: usize, cols: usize) -> Result<Self> {
        let total = rows.checked_mul(cols).ok_or_else(|| KernelError::Shape(format!("[{rows}, {cols}] overflows")))?;
        if dense.len() != total {
            return Err(KernelError::Shape(format!(
                "matrix [{rows}, {cols}] needs {total} elements, got {}",
                dense.len()
            )));
        }
        let mb = cols.div_ceil(8);
        let mut bitmask = vec![0u8; rows * mb];
        let mut values = Vec::new();
        let mut row_offsets = Vec::with_capacity(rows);
        for r in 0..rows {
            row_offsets.push(values.len() as i64);
            let src = &dense[r * cols..(r + 1) * cols];
            let dst = &mut bitmask[r * mb..(r + 1) * mb];
            for (c, &v) in src.iter().enumerate() {
                if v.is_stored() {
                    dst[c / 8] |= 1 << (c % 8);
                    values.push(v);
                }
            }
        }
        Ok(Self { rows, cols, bitmask, values, row_offsets })
    }

    /// Takes ownership of the parts after checking them like [`BitmaskView::new`].
    pub fn from_parts(
        rows: usize,
        cols: usize,
        bitmask: Vec<u8>,
        values: Vec<T>,
        row_offsets: Vec<i64>,
    ) -> Result<Self> {
        validate(rows, cols, &bitmask, values.len(), &row_offsets)?;
        Ok(Self { rows, cols, bitmask, values, row_offsets })
    }

    pub fn view(&self) -> BitmaskView<'_, T> {
        BitmaskView {
            rows: self.rows,
            cols: self.cols,
            bitmask: &self.bitmask,
            values: &self.values,
            row_offsets: &self.row_offsets,
        }
    }
    /// `(bitmask, values, row_offsets)`.
    pub fn into_parts(self) -> (Vec<u8>, Vec<T>, Vec<i64>) {
        (self.bitmask, self.values, self.row_offsets)
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn bitmask(&self) -> &[u8] {
        &self.bitmask
    }
    pub fn values(&self) -> &[T] {
        &self.values
    }
    pub fn row_offsets(&self) -> &[i64] {
        &self.row_offsets
    }
    pub fn nnz(&self) -> usize {
        self.values.len()
    }
    pub fn nbytes(&self) -> usize {
        self.view().nbytes()
    }
    pub fn sparsity(&self) -> f64 {
        self.view().sparsity()
    }
    pub fn to_dense(&self) -> Vec<T> {
        self.view().to_dense()
    }
}

/// `y[n, rows] = x[n, cols] · Wᵀ` (overwrites `y`).
pub fn matmul<T: BitmaskValue>(w: &BitmaskView<'_, T>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    matmul_on(cpu::isa(), w, x, n, y)
}

/// Rows `r0 .. r0 + out.len() / n` of the product on this thread, `out` transposed (`[rows, n]`).
/// Callers have checked the product's shapes ([`dense::check_product`]) and that `isa` runs here.
pub(crate) fn rows_into<T: BitmaskValue>(
    isa: Isa,
    w: &BitmaskView<'_, T>,
    x: &[f32],
    n: usize,
    r0: usize,
    out: &mut [f32],
) {
    let mb = w.mask_bytes();
    let r1 = r0 + out.len() / n;
    let (mask, offsets) = (&w.bitmask[r0 * mb..r1 * mb], &w.row_offsets[r0..r1]);
    if isa == Isa::Scalar || n > dense::GEMV_MAX_N {
        gemv_block_scalar(mask, w.values, offsets, w.cols, x, out);
    } else {
        // SAFETY: the view was validated (mask length, zero padding bits, offsets in range with
        // enough values from each), x is [n, cols] and out [r1 - r0, n] (the caller's checked
        // shapes; the slicing above panics rather than reads out of bounds), 1 <= n <= 8, and
        // `isa` is supported (caller).
        unsafe { T::gemv_block(isa, mask, w.values, offsets, w.cols, x, out) };
    }
}

/// [`matmul`] on an explicit path (tests and benches compare the paths).
pub fn matmul_on<T: BitmaskValue>(isa: Isa, w: &BitmaskView<'_, T>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    let (rows, cols) = (w.rows, w.cols);
    dense::check_product(isa, rows, cols, n, x, y)?;
    if n == 0 || rows == 0 {
        return Ok(());
    }
    let per = dense::rows_per_task(rows);
    // One task: rows t·per .. into `out` ([rows, n]).
    let gemv = |t: usize, out: &mut [f32]| rows_into(isa, w, x, n, t * per, out);
    if n == 1 {
        y.par_chunks_mut(per).enumerate().for_each(|(t, out)| gemv(t, out));
        return Ok(());
    }
    if dense::is_small_batch(isa, n) {
        // Batched decode: each task expands a cache chunk of its rows at a time and multiplies it
        // while it sits in L2.
        let mut yt = vec![0f32; rows * n];
        yt.par_chunks_mut(per * n).enumerate().for_each(|(t, out)| {
            dense::small_gemm_produced(cols, x, n, t * per, out, |r, dst| {
                for (j, d) in dst.chunks_exact_mut(cols).enumerate() {
                    let (mask, vals) = w.row_parts(r + j);
                    // SAFETY: the view was validated; d.len() == cols; `isa` is supported.
                    unsafe { T::expand_row(isa, mask, vals, cols, d) };
                }
            })
        });
        dense::scatter_transposed(&yt, n, rows, y);
        return Ok(());
    }
    if n > dense::GEMV_MAX_N && prefill::supported(isa) {
        // Prefill is compute-bound: multiply the non-zeros only (the scalar path below is the
        // reference).
        prefill::bitmask_product(isa, w, x, n, y);
        return Ok(());
    }
    // Transposed output [rows, n] so that row ranges are contiguous and tasks write disjoint chunks.
    let mut yt = vec![0f32; rows * n];
    yt.par_chunks_mut(per * n).enumerate().for_each(|(t, out)| gemv(t, out));
    dense::scatter_transposed(&yt, n, rows, y);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::{DenseMatrix, Element};
    use rand::{Rng, SeedableRng};

    type Rng8 = rand_chacha::ChaCha8Rng;

    /// Rows 0 and 1 are all zero and all stored; the rest have about `sparsity` zeros.
    fn rand_weight(rng: &mut Rng8, rows: usize, cols: usize, sparsity: f64) -> Vec<f32> {
        let mut w = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let keep = match r {
                    0 => false,
                    1 => true,
                    _ => !rng.random_bool(sparsity),
                };
                if keep {
                    // Never exactly zero, so "stored" is decided by `keep` alone.
                    let v: f32 = rng.random_range(0.01f32..1.0);
                    w[r * cols + c] = if rng.random_bool(0.5) { v } else { -v };
                }
            }
        }
        w
    }

    fn check<T: BitmaskValue + Element>(conv: impl Fn(f32) -> T) {
        let mut rng = Rng8::seed_from_u64(11);
        for &cols in &[0usize, 1, 7, 9, 15, 16, 17, 25, 63, 64, 65, 576, 1536, 4096] {
            for &rows in &[2usize, 5, 70] {
                for &s in &[0.0, 0.5, 0.7, 1.0] {
                    let dense: Vec<T> = rand_weight(&mut rng, rows, cols, s).into_iter().map(&conv).collect();
                    let m = BitmaskMatrix::from_dense(&dense, rows, cols).unwrap();
                    assert_eq!(m.to_dense(), dense);
                    let v = m.view();
                    let dm = DenseMatrix::new(&dense, rows, cols).unwrap();
                    for &n in &[1usize, 2, 3, 4, 5, 7, 8, 9, 14, 32, 33, 150] {
                        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                        let want = dense::matmul_reference(&dm, &x, n);
                        // f32 rounding error of a sum grows with the sum of |terms|.
                        let tol: Vec<f32> = (0..n * rows)
                            .map(|k| {
                                let (i, r) = (k / rows, k % rows);
                                let abs: f32 = (0..cols)
                                    .map(|c| (BitmaskValue::to_f32(dense[r * cols + c]) * x[i * cols + c]).abs())
                                    .sum();
                                2e-6 * (1.0 + abs)
                            })
                            .collect();
                        let mut via_dense = vec![f32::NAN; n * rows];
                        dense::matmul(&dm, &x, n, &mut via_dense).unwrap();
                        for isa in Isa::available() {
                            let mut y = vec![f32::NAN; n * rows];
                            matmul_on(isa, &v, &x, n, &mut y).unwrap();
                            for k in 0..y.len() {
                                for (what, b) in [("reference", want[k]), ("dense", via_dense[k])] {
                                    assert!(
                                        (y[k] - b).abs() <= 2.0 * tol[k],
                                        "{} {isa:?} rows={rows} cols={cols} s={s} n={n} out {k}: {} vs {what} {b}",
                                        <T as BitmaskValue>::NAME,
                                        y[k]
                                    );
                                }
                            }
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

    #[test]
    fn bf16_paths_match_reference() {
        check::<bf16>(bf16::from_f32);
    }

    /// On CPUs with VBMI2 the dispatch never reaches the 16-lane AVX-512 bf16 kernel, so it is
    /// called directly here (scalar reference, same shapes as above).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_bf16_16_lane_kernel_matches_scalar() {
        if !Isa::available().contains(&Isa::Avx512) {
            eprintln!("no AVX-512 on this CPU: the 16-lane bf16 kernel cannot run here");
            return;
        }
        let mut rng = Rng8::seed_from_u64(5);
        for &cols in &[1usize, 7, 9, 15, 16, 17, 25, 63, 65, 576, 1536] {
            for &s in &[0.0, 0.5, 0.7, 1.0] {
                let rows = 7;
                let dense: Vec<bf16> = rand_weight(&mut rng, rows, cols, s).into_iter().map(bf16::from_f32).collect();
                let m = BitmaskMatrix::from_dense(&dense, rows, cols).unwrap();
                for n in [1usize, 2, 5, 8] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                    let mut want = vec![0f32; rows * n];
                    gemv_block_scalar(&m.bitmask, &m.values, &m.row_offsets, cols, &x, &mut want);
                    let mut got = vec![f32::NAN; rows * n];
                    let a = (&m.bitmask[..], &m.values[..], &m.row_offsets[..], cols, &x[..], &mut got[..]);
                    // SAFETY: AVX-512 F/BW/VL were detected; the parts come from a valid matrix and
                    // the shapes match the kernel's `N`.
                    unsafe {
                        match n {
                            1 => avx512::gemv_bf16::<1, 4>(a.0, a.1, a.2, a.3, a.4, a.5),
                            2 => avx512::gemv_bf16::<2, 4>(a.0, a.1, a.2, a.3, a.4, a.5),
                            5 => avx512::gemv_bf16::<5, 2>(a.0, a.1, a.2, a.3, a.4, a.5),
                            _ => avx512::gemv_bf16::<8, 2>(a.0, a.1, a.2, a.3, a.4, a.5),
                        }
                    }
                    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + cols as f32),
                            "cols={cols} s={s} n={n} out {k}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn layout_matches_compressed_tensors() {
        // Column c sets bit c % 8 of byte c / 8, least significant first; rows pad separately.
        #[rustfmt::skip]
        let dense = [
            0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0,
            -0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0,
        ];
        let m = BitmaskMatrix::from_dense(&dense, 3, 9).unwrap();
        assert_eq!(m.bitmask(), &[0b0000_0010, 0b1, 0, 0, 0b1000_0001, 0]);
        assert_eq!(m.values(), &[1.5, 2.0, 3.0, 4.0]);
        assert_eq!(m.row_offsets(), &[0, 2, 2]);
        assert_eq!(m.nbytes(), 6 + 4 * 4 + 3 * 8);
        assert!((m.sparsity() - (1.0 - 4.0 / 27.0)).abs() < 1e-12);
        let again =
            BitmaskMatrix::from_parts(3, 9, m.bitmask().to_vec(), m.values().to_vec(), m.row_offsets().to_vec());
        assert_eq!(again.unwrap(), m);
        // -0.0 is dropped like +0.0 and comes back as +0.0.
        assert_eq!(m.to_dense()[9].to_bits(), 0);
    }

    #[test]
    fn malformed_parts_are_rejected() {
        let ok = |bm: &[u8], vals: &[f32], offs: &[i64]| BitmaskView::new(2, 9, bm, vals, offs).map(|_| ());
        let v = [1.0f32, 2.0, 3.0];
        ok(&[0b11, 0, 0b1, 0], &v, &[0, 2]).unwrap();
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        // Popcount of row 0 (2) disagrees with where row 1 starts.
        assert!(msg(ok(&[0b11, 0, 0b1, 0], &v, &[0, 1])).contains("row 1"));
        // Too many / too few values overall.
        assert!(msg(ok(&[0b11, 0, 0b1, 0], &[1.0, 2.0], &[0, 2])).contains("set bits"));
        assert!(msg(ok(&[0b11, 0, 0b1, 0], &[1.0; 4], &[0, 2])).contains("set bits"));
        // Wrong bitmask length, wrong number of offsets.
        assert!(msg(ok(&[0b11, 0, 0b1], &v, &[0, 2])).contains("bytes"));
        assert!(msg(ok(&[0b11, 0, 0b1, 0], &v, &[0])).contains("row offsets"));
        // Padding bit (column 9 of 9) set.
        assert!(msg(ok(&[0b11, 0b10, 0b1, 0], &[1.0; 4], &[0, 3])).contains("padding"));
        // Offsets not starting at 0, decreasing, negative.
        assert!(msg(ok(&[0b11, 0, 0b1, 0], &v, &[1, 2])).contains("row 0"));
        assert!(msg(BitmaskView::new(3, 8, &[0b11, 0, 0b1], &v, &[0, 2, 1]).map(|_| ())).contains("decrease"));
        assert!(BitmaskView::new(1, 8, &[0], &[] as &[f32], &[-1]).is_err());
        // Owned construction checks the same.
        assert!(BitmaskMatrix::from_parts(2, 9, vec![0b11, 0, 0b1, 0], v.to_vec(), vec![0, 3]).is_err());
        // Zero columns: no bytes, offsets must all be 0, no values.
        BitmaskView::new(3, 0, &[], &[] as &[f32], &[0, 0, 0]).unwrap();
        assert!(BitmaskView::new(3, 0, &[], &[] as &[f32], &[0, 1, 1]).is_err());
        assert!(BitmaskView::new(0, 5, &[], &[1.0f32], &[]).is_err());
    }

    #[test]
    fn shape_errors_are_reported() {
        let m = BitmaskMatrix::from_dense(&[1.0f32, 0.0, 2.0, 0.0, 0.0, 3.0], 2, 3).unwrap();
        assert!(BitmaskMatrix::from_dense(&[1.0f32; 5], 2, 3).is_err());
        let mut y = vec![0f32; 2];
        assert!(matmul(&m.view(), &[0.0; 2], 1, &mut y).is_err());
        assert!(matmul(&m.view(), &[0.0; 3], 1, &mut [0.0; 3]).is_err());
        matmul(&m.view(), &[1.0, 1.0, 1.0], 1, &mut y).unwrap();
        assert_eq!(y, [3.0, 3.0]);
    }
}
