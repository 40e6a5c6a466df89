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
//!   Each task stages 32 weight rows as dense codes (copied, or expanded from the bitmask with
//!   `vpexpandb`), transposes them into two panels with [`crate::transpose`], and runs every
//!   token block against them while they sit in L1.
//! - Per step of 64 columns: two `A` tiles (32 tokens), two `B` tiles (32 outputs), four
//!   `tdpbssd` into four accumulator tiles (32 × 32 outputs). The sums leave through one tile
//!   store per accumulator and are dequantized into `y` (`[n, rows]`) directly, rows of
//!   consecutive outputs, no transposed copy.
//!
//! Sparse weights take the dense tile product after their expansion: at AMX's rate the
//! multiply-adds of the zeros cost less than any skipping would.

use std::arch::asm;
use std::cell::RefCell;

use rayon::prelude::*;

use super::{Int8Matrix, QuantizedActs, x86};
use crate::cpu::{self, Isa};

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

/// What a task keeps between weight blocks: the staged rows and their two panels.
#[derive(Default)]
struct Scratch {
    /// 32 rows of dense codes, `stride` bytes each (u32 storage: the transpose reads groups).
    staged: Vec<u32>,
    /// Two panels of `stride / 4` rows × 16 groups.
    panels: Vec<u32>,
    /// Four accumulator tiles stored as `[32 tokens][32 outputs]`.
    sums: Vec<i32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The output pointer shared by the tasks.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each task writes only the output columns of its own weight rows (see `prefill`).
unsafe impl Sync for Out {}
// SAFETY: as above.
unsafe impl Send for Out {}

/// `y[n, rows] = x · Wᵀ` for activations quantized in `acts` (`n = acts.rows()`), on AMX tiles.
/// The caller checked the shapes (`acts` quantized for `w`'s columns, `y` of `n · rows`) and
/// that the [`cpu::Int8Isa::Amx`] path runs here (which requested the tile state).
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
    // Enough tasks for the threads to balance, each a run of whole weight blocks.
    let per = blocks.div_ceil(4 * cpu::threads()).max(1);
    let out = Out(y.as_mut_ptr());
    (0..blocks.div_ceil(per)).into_par_iter().for_each(|task| {
        let b1 = ((task + 1) * per).min(blocks);
        SCRATCH.with(|cell| {
            let mut fresh = Scratch::default();
            let mut guard = cell.try_borrow_mut();
            let s = match guard.as_mut() {
                Ok(s) => &mut **s,
                Err(_) => &mut fresh,
            };
            s.staged.resize(ROWS * stride / 4, 0);
            s.panels.resize(2 * 16 * stride / 4, 0);
            s.sums.resize(ROWS * ROWS, 0);
            // SAFETY: the Amx path runs here (caller), so the tile state is granted and AVX-512
            // is present; `ldtilecfg` reads the 64-byte configuration.
            unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
            for b in task * per..b1 {
                block(w, acts, b, s, out);
            }
            // SAFETY: as above; releases this thread's tile state (no live tile values remain).
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        });
    });
}

/// Weight block `b` (rows `32 b ..`) against every token block: stage, pack, multiply, store.
fn block(w: &Int8Matrix<'_>, acts: &QuantizedActs, b: usize, s: &mut Scratch, out: Out) {
    let (rows, cols, n, stride) = (w.rows(), w.cols(), acts.n, acts.stride);
    let (r0, r1) = (b * ROWS, (b * ROWS + ROWS).min(rows));
    let groups = stride / 4;
    {
        let staged: &mut [u8] = bytemuck::cast_slice_mut(&mut s.staged);
        for r in r0..r1 {
            let dst = &mut staged[(r - r0) * stride..(r - r0 + 1) * stride];
            match w {
                Int8Matrix::Dense(d) => {
                    dst[..cols].copy_from_slice(bytemuck::cast_slice(&d.codes()[r * cols..(r + 1) * cols]));
                    dst[cols..].fill(0);
                }
                // SAFETY: the Amx path implies AVX-512 VBMI2 and BMI2; the view was validated;
                // r < rows; dst holds stride = 64 · cols.div_ceil(64) bytes.
                Int8Matrix::Bitmask(m) => unsafe { x86::avx512::expand_row(m, r, dst) },
            }
        }
    }
    // Two panels of 16 rows each (rows past the weight are zeros).
    let staged: &[f32] = bytemuck::cast_slice(&s.staged);
    let panels: &mut [f32] = bytemuck::cast_slice_mut(&mut s.panels);
    for half in 0..2 {
        let valid = (r1 - r0).saturating_sub(16 * half).min(16);
        let src = &staged[16 * half * groups..];
        let dst = &mut panels[half * 16 * groups..(half + 1) * 16 * groups];
        crate::transpose::transpose(Isa::Avx512, src, valid, groups, groups, dst, 16, 16);
    }
    let (scales, act_scales) = (w.scales(), &acts.scales);
    let a = acts.codes.as_ptr();
    let (p0, p1) = (s.panels.as_ptr(), s.panels[16 * groups..].as_ptr());
    for t0 in (0..n).step_by(ROWS) {
        // SAFETY: the tile state is configured (the task did); tokens t0 .. t0 + 32 are
        // readable rows of `stride` codes (the activations are padded to 32 rows); each panel
        // holds `groups` rows of 16 groups, so step k reads its rows 16 k .. 16 k + 16; the
        // stores write the 32 × 32 sums buffer.
        unsafe { tiles(a.add(t0 * stride), stride, p0, p1, stride / 64, s.sums.as_mut_ptr()) };
        let tv = (n - t0).min(ROWS);
        for t in 0..tv {
            let sa = act_scales[t0 + t];
            let sums = &s.sums[t * ROWS..t * ROWS + (r1 - r0)];
            // SAFETY: row t0 + t of `y` has `rows` outputs; this task alone writes outputs
            // r0 .. r1 of any row (tasks own disjoint weight blocks), and `y` outlives the tasks.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add((t0 + t) * rows + r0), r1 - r0) };
            for ((d, &acc), &sw) in dst.iter_mut().zip(sums).zip(&scales[r0..r1]) {
                // The dequantize of every path (`super::dequantize`): the two scales first.
                *d = acc as f32 * (sa * sw);
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
