//! Prefill products of bitmask weights that multiply the non-zeros only.
//!
//! Decode reads every weight once per token and is bound by memory; prefill multiplies every
//! weight by hundreds of activation rows and is bound by arithmetic, so there a sparse matrix
//! saves multiply-adds, not bytes. Expanding the weights back to dense for a dense GEMM (the
//! portable path) spends the same arithmetic as the dense model.
//!
//! This kernel walks each weight row's set bits. The activations are packed transposed in tiles
//! of 8 vectors' worth of rows (`panel[c][i] = x[t·tile + i, c]`; 128 rows on AVX-512, 64 on
//! AVX2); for a non-zero `w` at column `c` of row `r`, the row's 8 accumulators take
//! `w · panel[c][..]` (one broadcast, eight FMAs from L1 — independent chains, so FMA latency is
//! covered). Columns go in blocks of 64 (one 64-bit mask word per row) so that a block of panel
//! (32 KiB on AVX-512, 16 on AVX2) stays in L1 while every row of the task passes over it; the
//! rows' partial sums wait in a transposed output tile between blocks.
//!
//! Cost: one broadcast and eight FMAs per non-zero per tile, so time follows the stored values
//! (about `1 − s` of a dense product of the same shape on the same kernel).

use rayon::prelude::*;

use crate::bitmask::{BitmaskValue, BitmaskView};
use crate::cpu::{self, Isa};
use crate::dense;

/// Columns per block: one 64-bit mask word of each row.
pub(crate) const BLOCK: usize = 64;

/// Whether [`bitmask_product`] runs on `isa` (AVX-512 and AVX2; the scalar path expands).
pub(crate) fn supported(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64") && matches!(isa, Isa::Avx512 | Isa::Avx2)
}

/// Activation rows per tile: 8 vectors of f32 lanes.
pub(crate) fn tile_rows(isa: Isa) -> usize {
    if isa == Isa::Avx512 { 128 } else { 64 }
}

/// `y[n, rows] = x[n, cols] · Wᵀ` on `isa`'s kernel. Callers have checked the shapes
/// ([`crate::dense::check_product`]), that `n >= 1` and that [`supported`] holds for an
/// available `isa`.
pub(crate) fn bitmask_product<T: BitmaskValue>(isa: Isa, w: &BitmaskView<'_, T>, x: &[f32], n: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    assert!(x.len() == n * cols && y.len() == n * rows, "bitmask_product: shapes checked by callers");
    if rows == 0 || n == 0 {
        return;
    }
    // A nested call on this thread (not made by the model) gets fresh buffers.
    crate::scratch::with_local(&BUFFERS, |(panel, out)| product_with(isa, w, x, n, y, panel, out));
}

fn product_with<T: BitmaskValue>(
    isa: Isa,
    w: &BitmaskView<'_, T>,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    panel: &mut Vec<f32>,
    out: &mut Vec<f32>,
) {
    let (rows, cols) = (w.rows(), w.cols());
    let tile = tile_rows(isa);
    let tiles = n.div_ceil(tile);
    // Vectors aligned to cache lines: a 64-byte load across two lines costs two.
    let (panel, out) = (aligned(panel, tiles * cols * tile), aligned(out, tiles * rows * tile));
    if cols > 0 {
        panel.par_chunks_mut(cols * tile).enumerate().for_each(|(t, p)| pack_tile(isa, x, n, cols, tile, t, p));
    }
    // Tasks: a tile's rows in ranges, enough of them that both (all) cores stay busy when a
    // prompt is a single tile; ranges of whole rows are independent. The ranges hold equal work,
    // not equal rows: SparseGPT's block rule leaves rows with very different numbers of
    // non-zeros, and equal row counts made the heaviest task the prompt's critical path.
    let tasks_per_tile = (4 * cpu::threads()).div_ceil(tiles).max(1);
    let bounds = balanced_rows(w, tasks_per_tile);
    let panel = &*panel;
    out.par_chunks_mut(rows * tile).enumerate().for_each(|(t, tile_out)| {
        let lanes = (n - t * tile).min(tile);
        let p = &panel[t * cols * tile..(t + 1) * cols * tile];
        let mut parts = Vec::with_capacity(bounds.len());
        let mut rest = tile_out;
        for r in bounds.windows(2) {
            let (o, tail) = std::mem::take(&mut rest).split_at_mut((r[1] - r[0]) * tile);
            if !o.is_empty() {
                parts.push((r[0], o));
            }
            rest = tail;
        }
        parts.into_par_iter().for_each(|(r0, o)| rows_tile(isa, w, r0, o, p, lanes));
    });
    let out = &*out;
    y.par_chunks_mut(tile * rows).enumerate().for_each(|(t, yt)| {
        dense::scatter_transposed(&out[t * rows * tile..(t + 1) * rows * tile], tile, rows, yt);
    });
}

/// Row bounds `0 = b₀ ≤ b₁ ≤ … ≤ b_k = rows` splitting `w` into `k ≤ tasks` ranges (at most one
/// per 8 rows) of about equal cost, counting a row's non-zeros (one broadcast and a tile of FMAs
/// each) plus its per-block overhead (a mask word, and loading and storing the row's
/// accumulators: about two non-zeros' worth per 64-column block).
pub(crate) fn balanced_rows<T: BitmaskValue>(w: &BitmaskView<'_, T>, tasks: usize) -> Vec<usize> {
    let (rows, offsets) = (w.rows(), w.row_offsets());
    let per_row = 2 * w.cols().div_ceil(BLOCK);
    // Cost of rows 0..r (validated views: row r's values start at offsets[r], row 0's at 0).
    let prefix = |r: usize| if r == rows { w.nnz() } else { offsets[r] as usize } + r * per_row;
    let tasks = tasks.clamp(1, rows.div_ceil(8).max(1));
    let total = prefix(rows);
    let mut bounds = vec![0];
    for k in 1..tasks {
        let target = total * k / tasks;
        // The first row whose prefix reaches the target (the prefix is non-decreasing).
        let (mut lo, mut hi) = (bounds[k - 1], rows);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if prefix(mid) < target { lo = mid + 1 } else { hi = mid }
        }
        bounds.push(lo);
    }
    bounds.push(rows);
    bounds
}

thread_local! {
    /// The packed activations and the transposed outputs, kept between products: fresh
    /// megabytes per product were page-faulted in every time.
    static BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `len` values of `buf` starting at a 64-byte boundary (the buffer grows as needed).
pub(crate) fn aligned(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len + 16, 0.0);
    let skip = buf.as_ptr().align_offset(64).min(16);
    &mut buf[skip..skip + len]
}

/// `p[c · tile + i] = x[t · tile + i, c]`, zeros for rows past `n`.
pub(crate) fn pack_tile(isa: Isa, x: &[f32], n: usize, cols: usize, tile: usize, t: usize, p: &mut [f32]) {
    let i0 = t * tile;
    let lanes = (n - i0).min(tile);
    crate::transpose::transpose(isa, &x[i0 * cols..], lanes, cols, cols, p, tile, tile);
}

/// Rows `r0 .. r0 + o.len() / tile` of one tile into `o` (`[rows, tile]`), the first `lanes`
/// lanes of each row meaningful (the rest multiply zero padding).
fn rows_tile<T: BitmaskValue>(isa: Isa, w: &BitmaskView<'_, T>, r0: usize, o: &mut [f32], panel: &[f32], lanes: usize) {
    let tile = tile_rows(isa);
    let (rows, cols) = (o.len() / tile, w.cols());
    let mb = cols.div_ceil(8);
    let mask = &w.bitmask()[r0 * mb..(r0 + rows) * mb];
    let offsets = &w.row_offsets()[r0..r0 + rows];
    assert!(panel.len() == cols * tile && (1..=tile).contains(&lanes), "rows_tile: shapes");
    #[cfg(target_arch = "x86_64")]
    {
        let vectors = lanes.div_ceil(tile / 8);
        let a = (mask, w.values(), offsets, cols, panel, o);
        macro_rules! by_vectors {
            ($isa:ident) => {
                match vectors {
                    1 => $isa::rows_tile::<T, 1>(a.0, a.1, a.2, a.3, a.4, a.5),
                    2 => $isa::rows_tile::<T, 2>(a.0, a.1, a.2, a.3, a.4, a.5),
                    3 => $isa::rows_tile::<T, 3>(a.0, a.1, a.2, a.3, a.4, a.5),
                    4 => $isa::rows_tile::<T, 4>(a.0, a.1, a.2, a.3, a.4, a.5),
                    5 => $isa::rows_tile::<T, 5>(a.0, a.1, a.2, a.3, a.4, a.5),
                    6 => $isa::rows_tile::<T, 6>(a.0, a.1, a.2, a.3, a.4, a.5),
                    7 => $isa::rows_tile::<T, 7>(a.0, a.1, a.2, a.3, a.4, a.5),
                    _ => $isa::rows_tile::<T, 8>(a.0, a.1, a.2, a.3, a.4, a.5),
                }
            };
        }
        // SAFETY: `isa` is available and one of the two kernels' (callers check `supported` on
        // an available isa); the view was validated (mask of `rows · mb` bytes with zero
        // padding bits; each row's offset within values and followed by as many values as its
        // set bits); panel is [cols, tile] and o [rows, tile] for this isa's tile (asserted).
        unsafe { if isa == Isa::Avx512 { by_vectors!(avx512) } else { by_vectors!(avx2) } }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (mask, offsets, o);
        unreachable!("`supported` holds on x86_64 only");
    }
}

/// One instruction set's kernel: `$lanes` f32 lanes per vector, tiles of 8 vectors.
macro_rules! kernel {
    ($isa:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident, $store:ident, $fma:ident, $set1:ident) => {
        #[cfg(target_arch = "x86_64")]
        mod $isa {
            use super::BLOCK;
            use crate::bitmask::BitmaskValue;
            use std::arch::x86_64::*;

            const LANES: usize = $lanes;
            const TILE: usize = 8 * LANES;

            /// The first `U` vectors of each row's tile.
            ///
            /// # Safety
            /// The instruction set is available; `mask` is `offsets.len() · cols.div_ceil(8)` bytes
            /// with zero padding bits; `vals[offsets[r]..]` holds at least as many values as row
            /// `r` has set bits; `panel.len() == cols · TILE`, `o.len() == offsets.len() · TILE`,
            /// `U <= 8`.
            #[allow(clippy::needless_range_loop)] // accumulators indexed by vector
            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows_tile<T: BitmaskValue, const U: usize>(
                mask: &[u8],
                vals: &[T],
                offsets: &[i64],
                cols: usize,
                panel: &[f32],
                o: &mut [f32],
            ) {
                let mb = cols.div_ceil(8);
                o.fill(0.0);
                // Each row's next value (rows advance block by block).
                let mut cursor: Vec<usize> = offsets.iter().map(|&v| v as usize).collect();
                let (mp, vp, op) = (mask.as_ptr(), vals.as_ptr(), o.as_mut_ptr());
                for c0 in (0..cols).step_by(BLOCK) {
                    let width = (cols - c0).min(BLOCK);
                    // SAFETY: c0 < cols, so the block's panel rows c0.. lie within panel.
                    let pb = unsafe { panel.as_ptr().add(c0 * TILE) };
                    for (r, cur) in cursor.iter_mut().enumerate() {
                        // SAFETY: the block's mask bytes c0/8 .. (c0 + width).div_ceil(8) <= mb of
                        // row r.
                        let m = unsafe {
                            let at = mp.add(r * mb + c0 / 8);
                            if width == BLOCK {
                                (at as *const u64).read_unaligned()
                            } else {
                                let mut m = 0u64;
                                for b in 0..width.div_ceil(8) {
                                    m |= (*at.add(b) as u64) << (8 * b);
                                }
                                m
                            }
                        };
                        if m == 0 {
                            continue;
                        }
                        // SAFETY: the row's values so far are within vals (contract), and so is
                        // its output row r < o.len() / TILE.
                        let (mut p, orow) = unsafe { (vp.add(*cur), op.add(r * TILE)) };
                        *cur += m.count_ones() as usize;
                        let mut acc = [$zero(); U];
                        for u in 0..U {
                            // SAFETY: lanes LANES·u .. LANES·(u + 1) <= TILE of row r.
                            acc[u] = unsafe { $load(orow.add(LANES * u)) };
                        }
                        let mut bits = m;
                        while bits != 0 {
                            let c = bits.trailing_zeros() as usize;
                            bits &= bits - 1;
                            // SAFETY: bit c set means the row stores a value for column c0 + c <
                            // cols, and it is the next one at p (contract); panel row c0 + c has
                            // TILE lanes.
                            unsafe {
                                let wv = $set1((*p).to_f32());
                                p = p.add(1);
                                let xp = pb.add(c * TILE);
                                for u in 0..U {
                                    acc[u] = $fma(wv, $load(xp.add(LANES * u)), acc[u]);
                                }
                            }
                        }
                        for u in 0..U {
                            // SAFETY: as for the loads above.
                            unsafe { $store(orow.add(LANES * u), acc[u]) };
                        }
                    }
                }
            }
        }
    };
}

kernel!(
    avx512,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt",
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_fmadd_ps,
    _mm512_set1_ps
);
kernel!(
    avx2,
    "avx2,fma,f16c,popcnt",
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_fmadd_ps,
    _mm256_set1_ps
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmask::BitmaskMatrix;

    #[test]
    fn row_ranges_hold_equal_work_when_rows_are_uneven() {
        // Rows 0..64 nearly dense, 64..256 nearly empty: equal row counts would give the first
        // task almost all the work.
        let (rows, cols) = (256, 256);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| if (i / cols < 64) == (i % 16 != 0) { 1.0 + (i % 7) as f32 } else { 0.0 })
            .collect();
        let m = BitmaskMatrix::from_dense(&w, rows, cols).unwrap();
        let v = m.view();
        let b = balanced_rows(&v, 8);
        assert_eq!((b.len(), b[0], b[8]), (9, 0, rows), "{b:?}");
        assert!(b.windows(2).all(|r| r[0] <= r[1]), "{b:?}");
        let cost = |a: usize, z: usize| {
            (a..z).map(|r| w[r * cols..(r + 1) * cols].iter().filter(|x| **x != 0.0).count() + 8).sum::<usize>()
        };
        let (total, max_row) = (cost(0, rows), cost(0, 1));
        for r in b.windows(2) {
            let c = cost(r[0], r[1]);
            assert!(c <= total / 8 + max_row, "range {r:?} costs {c} of {total}: {b:?}");
        }
        // The dense quarter holds 78% of the work: six ranges of eight.
        assert!(b[6] <= 64 && b[7] > 64, "{b:?}");
        // Few (uniform) rows: no more ranges than one per 8 rows, split evenly.
        let small = BitmaskMatrix::from_dense(&w[..12 * cols], 12, cols).unwrap();
        assert_eq!(balanced_rows(&small.view(), 8), vec![0, 6, 12]);
    }
}
