//! The bitmask product kernel's algorithm (`gpu/kernels/bitmask.cu`) step for step on the CPU:
//! the same lanes, 32-bit mask words, prefix popcounts, staged values and expansion order. Tested
//! against `lacuna_kernels::bitmask` (the CPU reference), it checks the indexing the CUDA kernel
//! relies on where no GPU exists; the device test then checks the kernel itself.

use crate::launch::PackedWeight;
use crate::{GpuError, Result};

const WARP: usize = 32;

/// Lane `lane`'s mask word of the chunk starting at mask byte `chunk_byte` of a row of `mb` bytes:
/// bytes `chunk_byte + 4 lane ..+4`, least significant first, missing bytes zero.
pub fn lane_word(row_mask: &[u8], chunk_byte: usize, lane: usize) -> u32 {
    let byte0 = chunk_byte + lane * 4;
    (0..4).filter(|i| byte0 + i < row_mask.len()).fold(0u32, |w, i| w | (row_mask[byte0 + i] as u32) << (8 * i))
}

/// Exclusive prefix sums of the lanes' popcounts (each lane's first value in the chunk) and the
/// chunk's total, as the warp's shuffle scan computes them.
pub fn prefix_popcounts(words: &[u32; WARP]) -> ([usize; WARP], usize) {
    let mut first = [0usize; WARP];
    let mut running = 0;
    for (l, w) in words.iter().enumerate() {
        first[l] = running;
        running += w.count_ones() as usize;
    }
    (first, running)
}

/// `y[b, r] = Σ_c W[r, c] · x[b, c]` for `n` rows of `x`, computed as the kernel does: per row,
/// per 1024-column chunk, per lane, then the lanes' partial sums added.
pub fn bitmask_gemm(w: &PackedWeight, x: &[f32], n: usize) -> Result<Vec<f32>> {
    if !w.is_bitmask() {
        return Err(GpuError::Shape("bitmask_gemm needs a bitmask matrix".into()));
    }
    let (rows, cols) = (w.rows, w.cols);
    if x.len() != n * cols {
        return Err(GpuError::Shape(format!("x holds {} values, not {n} × {cols}", x.len())));
    }
    let load = |v: u16| match w.dtype {
        crate::kernels::WeightDtype::F16 => half::f16::from_bits(v).to_f32(),
        crate::kernels::WeightDtype::Bf16 => half::bf16::from_bits(v).to_f32(),
    };
    let mb = cols.div_ceil(8);
    let mut y = vec![0f32; n * rows];
    let mut staged = vec![0u16; WARP * 32];
    for r in 0..rows {
        let mrow = &w.mask[r * mb..(r + 1) * mb];
        let mut base = w.row_offsets[r] as usize;
        let mut acc = vec![[0f32; WARP]; n];
        for chunk_byte in (0..mb).step_by(WARP * 4) {
            let words: [u32; WARP] = std::array::from_fn(|l| lane_word(mrow, chunk_byte, l));
            let (first, total) = prefix_popcounts(&words);
            // The coalesced copy: value j of the chunk into staged[j].
            staged[..total].copy_from_slice(&w.values[base..base + total]);
            for lane in 0..WARP {
                let col0 = (chunk_byte + lane * 4) * 8;
                let (mut word, mut k) = (words[lane], first[lane]);
                while word != 0 {
                    let bit = word.trailing_zeros() as usize;
                    word &= word - 1;
                    let v = load(staged[k]);
                    k += 1;
                    for (b, a) in acc.iter_mut().enumerate() {
                        a[lane] += v * x[b * cols + col0 + bit];
                    }
                }
            }
            base += total;
        }
        for (b, a) in acc.iter().enumerate() {
            y[b * rows + r] = a.iter().sum();
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::pack;
    use half::bf16;
    use lacuna_kernels::bitmask::{self, BitmaskMatrix};
    use lacuna_model::weights::{Data, Weight};
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    #[test]
    fn lane_words_are_little_endian_and_stop_at_the_row_end() {
        let row = [0x01, 0x80, 0xff, 0x10, 0x03];
        assert_eq!(lane_word(&row, 0, 0), 0x10ff_8001);
        assert_eq!(lane_word(&row, 0, 1), 0x03);
        assert_eq!(lane_word(&row, 0, 2), 0);
        let mut words = [0u32; WARP];
        words[0] = 0b1011;
        words[3] = u32::MAX;
        let (first, total) = prefix_popcounts(&words);
        assert_eq!((first[0], first[1], first[3], first[4], total), (0, 3, 3, 35, 35));
    }

    /// The kernel's algorithm equals the CPU bitmask kernel over awkward shapes, sparsities and
    /// batch sizes (f32 sums in another order: tolerance 1e-5 of Σ|W[r, c]·x[b, c]|).
    #[test]
    fn emulated_kernel_matches_the_cpu_bitmask_product() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        for &(rows, cols) in
            &[(1, 1), (3, 7), (5, 63), (4, 64), (9, 65), (2, 1023), (3, 1024), (2, 1025), (4, 4096), (2, 4100)]
        {
            for &sparsity in &[0.0, 0.5, 0.7, 0.95, 1.0] {
                let dense: Vec<bf16> = (0..rows * cols)
                    .map(|_| {
                        if rng.random::<f64>() < sparsity {
                            bf16::ZERO
                        } else {
                            bf16::from_f32(rng.random_range(-1.0..1.0))
                        }
                    })
                    .collect();
                let m = BitmaskMatrix::from_dense(&dense, rows, cols).unwrap();
                let w = Weight::new(vec![rows, cols], Data::BitmaskBF16(Arc::new(m.clone()))).unwrap();
                let p = pack(&w).unwrap();
                for n in [1, 3, 8, 32] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let got = bitmask_gemm(&p, &x, n).unwrap();
                    let mut want = vec![0f32; n * rows];
                    bitmask::matmul(&m.view(), &x, n, &mut want).unwrap();
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        let (b, r) = (i / rows, i % rows);
                        let magnitude: f32 =
                            (0..cols).map(|c| (dense[r * cols + c].to_f32() * x[b * cols + c]).abs()).sum();
                        assert!(
                            (g - e).abs() <= 1e-5 * magnitude + 1e-30,
                            "[{rows}, {cols}] s={sparsity} n={n} at {i}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }
}
