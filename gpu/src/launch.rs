//! Launch geometry of every kernel, and the host-side packing of weights into what the kernels
//! read. Pure functions: tested on the CPU, used unchanged by [`crate::device`].

use half::{bf16, f16};
use lacuna_model::weights::{Data, Weight};

use crate::kernels::{BATCH_TILES, MAX_BATCH, WeightDtype};
use crate::{GpuError, Result};

/// Rows (warps) per block of the product kernels (`DENSE_WARPS`, `BITMASK_WARPS` in the sources).
pub const PRODUCT_WARPS: u32 = 8;
/// Threads of the attention kernel (`ATTN_THREADS`).
pub const ATTN_THREADS: u32 = 128;
/// Threads of the row-wise and element-wise kernels.
pub const ROW_THREADS: u32 = 256;
/// Dynamic shared memory a block may use without opting in (every architecture since sm_20).
pub const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// A launch: grid, block and dynamic shared memory (cudarc's `LaunchConfig` without the driver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl Geometry {
    pub fn to_config(self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig { grid_dim: self.grid, block_dim: self.block, shared_mem_bytes: self.shared_bytes }
    }
}

fn dim(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| GpuError::Shape(format!("{what} = {v} does not fit a launch")))
}

/// The accumulator count of the product kernel that serves `n` activation rows (`1..=32`).
pub fn batch_tile(n: usize) -> Result<usize> {
    BATCH_TILES
        .iter()
        .copied()
        .find(|nb| *nb >= n && n > 0)
        .ok_or_else(|| GpuError::Shape(format!("a product launch takes 1..={MAX_BATCH} activation rows, got {n}")))
}

/// `(first row, rows)` of each product launch for `n` activation rows: runs of at most 32.
pub fn batch_chunks(n: usize) -> Vec<(usize, usize)> {
    (0..n).step_by(MAX_BATCH).map(|s| (s, MAX_BATCH.min(n - s))).collect()
}

/// Dense and bitmask products: one warp per output row.
pub fn product(rows: usize) -> Result<Geometry> {
    let blocks = dim(rows.div_ceil(PRODUCT_WARPS as usize), "row blocks")?;
    Ok(Geometry { grid: (blocks, 1, 1), block: (PRODUCT_WARPS * 32, 1, 1), shared_bytes: 0 })
}

/// One block per row (RMSNorm, embedding rows, KV appends).
pub fn per_row(rows: usize) -> Result<Geometry> {
    Ok(Geometry { grid: (dim(rows, "rows")?, 1, 1), block: (ROW_THREADS, 1, 1), shared_bytes: 0 })
}

/// Element-wise over `len` values.
pub fn elementwise(len: usize) -> Result<Geometry> {
    let blocks = dim(len.div_ceil(ROW_THREADS as usize), "element blocks")?;
    Ok(Geometry { grid: (blocks, 1, 1), block: (ROW_THREADS, 1, 1), shared_bytes: 0 })
}

/// RoPE over `[n, n_head * hd]`: a block per (row, head), a thread per rotated pair.
pub fn rope(n: usize, n_head: usize, hd: usize) -> Result<Geometry> {
    if !hd.is_multiple_of(2) || hd / 2 > 1024 {
        return Err(GpuError::Shape(format!("head_dim {hd}: RoPE needs an even head_dim of at most 2048")));
    }
    Ok(Geometry {
        grid: (dim(n, "rows")?, dim(n_head, "heads")?, 1),
        block: (dim(hd / 2, "pairs")?, 1, 1),
        shared_bytes: 0,
    })
}

/// Decode attention: a block per (head, sequence); the query and `max_len` scores in shared memory.
pub fn attention(n_head: usize, n: usize, hd: usize, max_len: usize) -> Result<Geometry> {
    let shared = (hd + max_len) * 4;
    if shared > DEFAULT_SHARED_BYTES {
        return Err(GpuError::Unsupported(format!(
            "decode attention over {max_len} positions needs {shared} bytes of shared memory (at most {DEFAULT_SHARED_BYTES}: \
             {} positions at head_dim {hd})",
            DEFAULT_SHARED_BYTES / 4 - hd
        )));
    }
    Ok(Geometry {
        grid: (dim(n_head, "heads")?, dim(n, "sequences")?, 1),
        block: (ATTN_THREADS, 1, 1),
        shared_bytes: shared as u32,
    })
}

/// The longest context decode attention serves at `head_dim` `hd`.
pub fn max_attention_len(hd: usize) -> usize {
    DEFAULT_SHARED_BYTES / 4 - hd
}

/// A weight as the product kernels read it: 16-bit values (raw f16/bf16 bits), and for a bitmask
/// matrix its mask and row offsets exactly as `kernels/src/bitmask.rs` lays them out.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedWeight {
    pub rows: usize,
    pub cols: usize,
    pub dtype: WeightDtype,
    /// `rows · ceil(cols / 8)` bytes for a bitmask matrix, empty for a dense one.
    pub mask: Vec<u8>,
    /// `rows · cols` values (dense) or the stored non-zeros (bitmask).
    pub values: Vec<u16>,
    /// One per row for a bitmask matrix, empty for a dense one.
    pub row_offsets: Vec<i64>,
}

impl PackedWeight {
    pub fn is_bitmask(&self) -> bool {
        !self.row_offsets.is_empty()
    }
    /// Bytes one product streams from device memory.
    pub fn nbytes(&self) -> usize {
        self.mask.len() + self.values.len() * 2 + self.row_offsets.len() * 8
    }
    /// The dense f32 matrix (for tests).
    pub fn to_f32(&self) -> Vec<f32> {
        let load = |v: u16| match self.dtype {
            WeightDtype::F16 => f16::from_bits(v).to_f32(),
            WeightDtype::Bf16 => bf16::from_bits(v).to_f32(),
        };
        if !self.is_bitmask() {
            return self.values.iter().map(|v| load(*v)).collect();
        }
        let mb = self.cols.div_ceil(8);
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            let mut k = self.row_offsets[r] as usize;
            for c in 0..self.cols {
                if self.mask[r * mb + c / 8] >> (c % 8) & 1 == 1 {
                    out[r * self.cols + c] = load(self.values[k]);
                    k += 1;
                }
            }
        }
        out
    }
}

/// Packs a 2-D model weight for upload, keeping its stored format: f16/bf16 as they are, f32
/// rounded to f16 (the GPU kernels read 16-bit weights); a bitmask matrix keeps its mask and row
/// offsets and only its values are converted.
pub fn pack(w: &Weight) -> Result<PackedWeight> {
    let [rows, cols] = w.dims2()?;
    let bits16 = |v: &[f32]| v.iter().map(|x| f16::from_f32(*x).to_bits()).collect::<Vec<u16>>();
    let dense = |dtype, values| PackedWeight { rows, cols, dtype, mask: Vec::new(), values, row_offsets: Vec::new() };
    // Formats other crates add (INT8) have no GPU kernels yet: refused by name, not mis-read.
    #[allow(unreachable_patterns)]
    Ok(match w.data() {
        Data::F16(s) => dense(WeightDtype::F16, s.as_slice().iter().map(|v| v.to_bits()).collect()),
        Data::BF16(s) => dense(WeightDtype::Bf16, s.as_slice().iter().map(|v| v.to_bits()).collect()),
        Data::F32(s) => dense(WeightDtype::F16, bits16(s.as_slice())),
        Data::BitmaskF32(m) => PackedWeight {
            rows,
            cols,
            dtype: WeightDtype::F16,
            mask: m.bitmask().to_vec(),
            values: bits16(m.values()),
            row_offsets: m.row_offsets().to_vec(),
        },
        Data::BitmaskBF16(m) => PackedWeight {
            rows,
            cols,
            dtype: WeightDtype::Bf16,
            mask: m.bitmask().to_vec(),
            values: m.values().iter().map(|v| v.to_bits()).collect(),
            row_offsets: m.row_offsets().to_vec(),
        },
        _ => {
            return Err(GpuError::Unsupported(format!(
                "{} weights (f16/bf16/f32, dense or bitmask, only)",
                w.dtype().name()
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lacuna_kernels::bitmask::BitmaskMatrix;
    use lacuna_model::weights::Storage;
    use std::sync::Arc;

    #[test]
    fn batch_tiles_and_chunks_cover_every_row_once() {
        assert_eq!(batch_tile(1).unwrap(), 1);
        assert_eq!(batch_tile(3).unwrap(), 4);
        assert_eq!(batch_tile(9).unwrap(), 16);
        assert_eq!(batch_tile(32).unwrap(), 32);
        assert!(batch_tile(0).is_err() && batch_tile(33).is_err());
        for n in [1, 7, 32, 33, 64, 65, 100] {
            let chunks = batch_chunks(n);
            assert_eq!(chunks.iter().map(|c| c.1).sum::<usize>(), n);
            assert!(chunks.iter().all(|c| (1..=32).contains(&c.1)));
            assert!(chunks.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        }
        assert!(batch_chunks(0).is_empty());
    }

    #[test]
    fn geometries_cover_their_work_and_refuse_what_does_not_fit() {
        let g = product(4097).unwrap();
        assert_eq!(g.grid.0 as usize * PRODUCT_WARPS as usize, 4104);
        assert_eq!(g.block.0, 256);
        assert!(product(0).is_err());
        let e = elementwise(1000).unwrap();
        assert!(e.grid.0 * e.block.0 >= 1000 && (e.grid.0 - 1) * e.block.0 < 1000);
        let r = rope(3, 9, 64).unwrap();
        assert_eq!((r.grid, r.block.0), ((3, 9, 1), 32));
        assert!(rope(1, 1, 63).is_err());
        let a = attention(9, 4, 64, 2048).unwrap();
        assert_eq!((a.grid, a.shared_bytes), ((9, 4, 1), (64 + 2048) * 4));
        assert!(attention(9, 4, 64, max_attention_len(64)).is_ok());
        assert!(attention(9, 4, 64, max_attention_len(64) + 1).is_err());
    }

    #[test]
    fn packing_keeps_the_stored_format_and_values() {
        let (rows, cols) = (5, 19);
        let dense: Vec<f32> =
            (0..rows * cols).map(|i| if i % 3 == 0 { 0.0 } else { (i as f32 * 0.37).sin() }).collect();
        let bf: Vec<bf16> = dense.iter().map(|v| bf16::from_f32(*v)).collect();
        let m = BitmaskMatrix::from_dense(&bf, rows, cols).unwrap();
        let w = Weight::new(vec![rows, cols], Data::BitmaskBF16(Arc::new(m.clone()))).unwrap();
        let p = pack(&w).unwrap();
        assert!(p.is_bitmask());
        assert_eq!(p.mask, m.bitmask());
        assert_eq!(p.row_offsets, m.row_offsets());
        let want: Vec<f32> = bf.iter().map(|v| v.to_f32()).collect();
        assert_eq!(p.to_f32(), want, "bf16 bitmask values are uploaded bit for bit");
        assert_eq!(p.nbytes(), m.bitmask().len() + m.values().len() * 2 + rows * 8);

        let hw: Vec<f16> = dense.iter().map(|v| f16::from_f32(*v)).collect();
        let w = Weight::new(vec![rows, cols], Data::F16(Storage::Owned(hw.clone()))).unwrap();
        let p = pack(&w).unwrap();
        assert!(!p.is_bitmask());
        assert_eq!(p.to_f32(), hw.iter().map(|v| v.to_f32()).collect::<Vec<_>>());

        let w = Weight::from_f32(vec![rows, cols], dense.clone()).unwrap();
        let p = pack(&w).unwrap();
        assert_eq!(p.dtype, WeightDtype::F16);
        for (a, b) in p.to_f32().iter().zip(&dense) {
            assert!((a - b).abs() <= b.abs() * 1e-3, "f32 weights are rounded to f16: {a} vs {b}");
        }
    }
}
