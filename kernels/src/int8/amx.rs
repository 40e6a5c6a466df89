//! Products of many activation rows (prefill) on AMX-INT8 tiles, for dense and bitmask INT8
//! weights alike.
//!
//! A tile register holds 16 rows of 64 bytes; `tdpbssd C, A, B` adds to the 16 × 16 i32 tile
//! `C[t][o]` the s8 × s8 products `Σ_j A[t][4k + j] · B[k][4o + j]` over the 16 `k` of a step:
//! 16 · 16 · 64 multiply-adds in one instruction, in wrapping i32 like every other path (so the
//! sums equal the scalar reference bit for bit, see [`super`]). Both operands are signed: no
//! +128 bias and no correction, unlike `vpdpbusd`.
//!
//! - `A` is the quantized activations as they are (`[n, stride]` codes, 64 columns a tile row,
//!   rows `stride` apart; [`QuantizedActs`] pads the rows to a multiple of [`ROWS`]).
//! - `B` is a weight panel of 16 output rows in the VNNI layout, `panel[k][o]` = the four codes
//!   of row `o` at columns `4k .. 4k + 4`: a 16 × 16 transpose of 32-bit groups per 64 columns.
//!   The weight blocks of 32 rows are staged as dense codes (copied, or expanded from the
//!   bitmask with `vpexpandb`) and transposed into two panels each with [`crate::transpose`],
//!   once per product; then each block of 32 tokens runs against every weight block.
//! - Per step of 64 columns: two `A` tiles (32 tokens), two `B` tiles (32 outputs), four
//!   `tdpbssd` into four accumulator tiles (32 × 32 outputs). The sums leave through one tile
//!   store per accumulator; once every token block has run they are dequantized in 16-lane
//!   vectors into `y` (`[n, rows]`) directly, rows of consecutive outputs, no transposed copy.
//!
//! Sparse weights take the dense tile product after their expansion: at AMX's rate the
//! multiply-adds of the zeros cost less than any skipping would.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::{Int8Matrix, QuantizedActs, x86};
use crate::cpu::Isa;

/// Activation rows of a token block (two `A` tiles), and output rows of a weight block (two `B`
/// panels): the quantized activations are padded to a multiple of it.
pub(super) const ROWS: usize = 32;

/// The tile configuration `ldtilecfg` reads (palette 1): eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

thread_local! {
    /// A thread's 32 staged weight rows (dense codes, `stride` bytes each; u32 storage, since
    /// the transpose moves 4-byte groups), reused between blocks and calls.
    static STAGED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's packed weight panels, reused between calls.
    static PACKED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's buffer of `cell`, grown to `len` (see [`crate::scratch`]).
fn with_buffer<R>(
    cell: &'static std::thread::LocalKey<RefCell<Vec<u32>>>,
    len: usize,
    f: impl FnOnce(&mut [u32]) -> R,
) -> R {
    crate::scratch::with_local(cell, |b| {
        if b.len() < len {
            b.resize(len, 0);
        }
        f(&mut b[..len])
    })
}

/// `y[n, rows] = x · Wᵀ` for activations quantized in `acts` (`n = acts.rows()`), on AMX tiles.
/// The caller checked the shapes (`acts` quantized for `w`'s columns, `y` of `n · rows`) and
/// that the [`crate::cpu::Int8Isa::Amx`] path runs here (which requested the tile state).
///
/// Two parallel phases: every block of 32 weight rows is staged and packed into two panels
/// (the whole weight, `rows · stride` bytes, read once); then one task per block of 32 tokens
/// runs every weight block against its two activation tiles, which stay in L1, and writes its
/// own rows of `y`, whole cache lines of consecutive outputs. (With weight blocks outermost,
/// each block's 32 outputs landed on a different page for every token: the dequantize took as
/// long as the tile products.)
pub(super) fn prefill(w: &Int8Matrix<'_>, acts: &QuantizedActs, y: &mut [f32]) {
    let (rows, n, stride) = (w.rows(), acts.n, acts.stride);
    assert!(
        y.len() == n * rows
            && acts.cols == w.cols()
            && stride % 64 == 0
            && acts.codes.len() >= n.next_multiple_of(ROWS) * stride,
        "amx prefill: shapes"
    );
    let blocks = rows.div_ceil(ROWS);
    // Two panels of `stride / 4` rows × 16 groups per weight block.
    let block_len = 2 * 16 * (stride / 4);
    with_buffer(&PACKED, blocks * block_len, |packed| {
        packed.par_chunks_mut(block_len).enumerate().for_each(|(b, dst)| pack(w, stride, b, dst));
        let packed = &*packed;
        y.par_chunks_mut(ROWS * rows).enumerate().for_each(|(tb, yc)| {
            let t0 = tb * ROWS;
            let tv = yc.len() / rows;
            let mut sums = [0i32; ROWS * ROWS];
            // SAFETY: the Amx path runs here (caller), so the tile state is granted and AVX-512
            // is present; `ldtilecfg` reads the 64-byte configuration.
            unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
            for b in 0..blocks {
                let (r0, r1) = (b * ROWS, (b * ROWS + ROWS).min(rows));
                let p = &packed[b * block_len..(b + 1) * block_len];
                // SAFETY: the tile state is configured (above); tokens t0 .. t0 + 32 are readable
                // rows of `stride` codes (the activations are padded to 32 rows); each panel holds
                // `stride / 4` rows of 16 groups, so step k reads its rows 16 k .. 16 k + 16; the
                // stores write the 32 × 32 sums.
                unsafe {
                    let a = acts.codes.as_ptr().add(t0 * stride);
                    tiles(a, stride, p.as_ptr(), p[block_len / 2..].as_ptr(), stride / 64, sums.as_mut_ptr());
                }
                // SAFETY: AVX-512F (the Amx path implies it); `sums` holds tv <= 32 rows of 32;
                // row t of this task's chunk has `rows` outputs, of which r0 .. r1 are written.
                unsafe {
                    dequantize(&sums, &acts.scales[t0..t0 + tv], &w.scales()[r0..r1], yc.as_mut_ptr().add(r0), rows)
                };
            }
            // SAFETY: as above; releases this thread's tile state (no live tile values remain).
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        });
    });
}

/// Weight block `b` (rows `32 b ..`) into `dst`: its rows staged as dense codes (copied, or
/// expanded from the bitmask), then transposed in 4-byte groups into two panels of 16 rows
/// (rows past the weight are zeros).
fn pack(w: &Int8Matrix<'_>, stride: usize, b: usize, dst: &mut [u32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let (r0, r1) = (b * ROWS, (b * ROWS + ROWS).min(rows));
    let groups = stride / 4;
    with_buffer(&STAGED, ROWS * groups, |staged_u32| {
        let staged: &mut [u8] = bytemuck::cast_slice_mut(staged_u32);
        for r in r0..r1 {
            let row = &mut staged[(r - r0) * stride..(r - r0 + 1) * stride];
            match w {
                Int8Matrix::Dense(d) => {
                    row[..cols].copy_from_slice(bytemuck::cast_slice(&d.codes()[r * cols..(r + 1) * cols]));
                    row[cols..].fill(0);
                }
                // SAFETY: the Amx path implies AVX-512 VBMI2 and BMI2; the view was validated;
                // r < rows; the row holds stride = 64 · cols.div_ceil(64) bytes.
                Int8Matrix::Bitmask(m) => unsafe { x86::avx512::expand_row(m, r, row) },
            }
        }
        let staged: &[f32] = bytemuck::cast_slice(staged_u32);
        let panels: &mut [f32] = bytemuck::cast_slice_mut(dst);
        for half in 0..2 {
            let valid = (r1 - r0).saturating_sub(16 * half).min(16);
            let d = &mut panels[half * 16 * groups..(half + 1) * 16 * groups];
            crate::transpose::transpose(Isa::Avx512, &staged[16 * half * groups..], valid, groups, groups, d, 16, 16);
        }
    });
}

/// `y[t][o] = sums[t][o] as f32 · (act_scales[t] · w_scales[o])` for `o < w_scales.len() <= 32`
/// (the dequantize of every path, `super::dequantize`, in 16-lane vectors), `y` row `t` at
/// `y + t · rows`.
///
/// # Safety
/// AVX-512F; `sums.len() >= 32 · act_scales.len()`; `w_scales.len() <= 32` outputs writable at
/// `y + t · rows` for every row `t`.
#[target_feature(enable = "avx512f")]
unsafe fn dequantize(sums: &[i32], act_scales: &[f32], w_scales: &[f32], y: *mut f32, rows: usize) {
    let valid = w_scales.len();
    let masks = [((1u32 << valid.min(16)) - 1) as u16, ((1u32 << valid.saturating_sub(16)) - 1) as u16];
    // SAFETY: masked loads of the valid scales only.
    let sw = [0, 1].map(|h| unsafe { _mm512_maskz_loadu_ps(masks[h], w_scales.as_ptr().wrapping_add(16 * h)) });
    for (t, &sa) in act_scales.iter().enumerate() {
        let sa = _mm512_set1_ps(sa);
        for h in 0..2 {
            // SAFETY: row t of the sums holds 32 values; the masked store writes the valid
            // outputs of row t (caller).
            unsafe {
                let acc = _mm512_cvtepi32_ps(_mm512_loadu_si512(sums.as_ptr().add(t * ROWS + 16 * h) as *const _));
                let v = _mm512_mul_ps(acc, _mm512_mul_ps(sa, sw[h]));
                _mm512_mask_storeu_ps(y.wrapping_add(t * rows + 16 * h), masks[h], v);
            }
        }
    }
}

/// The 32 × 32 sums of 32 activation rows at `a` (`stride` apart) against two weight panels,
/// over `steps` steps of 64 columns, stored to `c` as `[32][32]` i32.
///
/// # Safety
/// The tiles are configured by [`CONFIG`] on this thread; 32 rows of `64 · steps` codes are
/// readable at `a`; `16 · steps` rows of 16 u32 at `p0` and `p1`; `c` has 1024 writable i32.
#[inline]
unsafe fn tiles(a: *const i8, stride: usize, p0: *const u32, p1: *const u32, steps: usize, c: *mut i32) {
    // SAFETY (every block): the caller's contract; tile registers are not allocated by the
    // compiler, so their values persist between the blocks of this function.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        let a1 = a.add(16 * stride);
        for k in 0..steps {
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tileloadd tmm6, [{b0} + {bs}*1]",
                "tileloadd tmm7, [{b1} + {bs}*1]",
                "tdpbssd tmm0, tmm4, tmm6",
                "tdpbssd tmm1, tmm4, tmm7",
                "tdpbssd tmm2, tmm5, tmm6",
                "tdpbssd tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(64 * k),
                a1 = in(reg) a1.add(64 * k),
                b0 = in(reg) p0.add(256 * k),
                b1 = in(reg) p1.add(256 * k),
                s = in(reg) stride,
                bs = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        let cs = 4 * ROWS;
        asm!(
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c1} + {cs}*1], tmm1",
            "tilestored [{c2} + {cs}*1], tmm2",
            "tilestored [{c3} + {cs}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) c.add(16 * ROWS),
            c3 = in(reg) c.add(16 * ROWS + 16),
            cs = in(reg) cs,
            options(nostack),
        );
    }
}
