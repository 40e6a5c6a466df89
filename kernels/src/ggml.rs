//! GGML block formats (as stored in GGUF files) and their dequantization to f32.
//!
//! A GGML tensor row is a sequence of fixed-size blocks; each block packs `block_size()`
//! elements into `type_size()` bytes, little-endian. Block layouts and the dequantization
//! arithmetic follow ggml's reference `dequantize_row_*` (ggml-quants.c) and gguf-py's
//! `gguf.quants`, operation for operation, so results are bit-identical to both (every product
//! and sum is rounded to f32 in the same order; nothing is fused into an FMA).

use rayon::prelude::*;

use crate::{KernelError, Result};

/// Element type of a GGML tensor, numbered as in ggml's `enum ggml_type` (= GGUF's tensor type
/// field). Gaps in the numbering are formats ggml has removed.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// Super-block size of the K-quants.
const QK_K: usize = 256;

impl GgmlType {
    /// The type with GGUF/ggml number `v`, or `None` for numbers ggml does not (or no longer) define.
    pub fn from_u32(v: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match v {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            _ => return None,
        })
    }

    /// ggml's name for the type ("Q4_K", "F32", ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
        }
    }

    /// (elements per block, bytes per block), as in ggml's type traits / gguf-py's
    /// `GGML_QUANT_SIZES`.
    fn layout(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            // ggml's block_q8_1 is {f16 d, f16 s, i8 qs[32]}; gguf-py 0.19 still lists 40 bytes from
            // the f32 era. Q8_1 is a matmul scratch format that never appears in model files.
            Q8_1 => (32, 36),
            Q2K => (QK_K, 84),
            Q3K => (QK_K, 110),
            Q4K => (QK_K, 144),
            Q5K => (QK_K, 176),
            Q6K => (QK_K, 210),
            Q8K => (QK_K, 292),
            IQ2_XXS => (QK_K, 66),
            IQ2_XS => (QK_K, 74),
            IQ3_XXS => (QK_K, 98),
            IQ1_S => (QK_K, 50),
            IQ4_NL => (32, 18),
            IQ3_S => (QK_K, 110),
            IQ2_S => (QK_K, 82),
            IQ4_XS => (QK_K, 136),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1_M => (QK_K, 56),
            BF16 => (1, 2),
            TQ1_0 => (QK_K, 54),
            TQ2_0 => (QK_K, 66),
            MXFP4 => (32, 17),
            NVFP4 => (64, 36),
            Q1_0 => (128, 18),
        }
    }

    /// Elements per block (1 for the plain scalar types).
    pub fn block_size(self) -> usize {
        self.layout().0
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.layout().1
    }

    /// Bytes holding `n` elements; `n` must be a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Result<usize> {
        let (bs, ts) = self.layout();
        if !n.is_multiple_of(bs) {
            return Err(KernelError::Shape(format!(
                "{n} elements is not a whole number of {} blocks of {bs}",
                self.name()
            )));
        }
        (n / bs)
            .checked_mul(ts)
            .ok_or_else(|| KernelError::Shape(format!("{n} {} elements overflow the address space", self.name())))
    }

    /// Whether [`dequantize`] supports this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K | Q8K)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantize `out.len()` elements from `data`, which must be exactly
/// `ty.row_bytes(out.len())` bytes. Large inputs are split over rayon's pool in whole blocks.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    use GgmlType::*;
    let unsupported = || KernelError::Unsupported(format!("dequantizing GGML type {}", ty.name()));
    if !ty.can_dequantize() {
        return Err(unsupported());
    }
    let need = ty.row_bytes(out.len())?;
    if data.len() != need {
        return Err(KernelError::Shape(format!(
            "{} elements of {} take {need} bytes, got {}",
            out.len(),
            ty.name(),
            data.len()
        )));
    }
    match ty {
        F32 => run::<4, 1>(data, out, |b, y| y[0] = f32::from_le_bytes(*b)),
        F16 => run::<2, 1>(data, out, |b, y| y[0] = half::f16::from_le_bytes(*b).to_f32()),
        BF16 => run::<2, 1>(data, out, |b, y| y[0] = f32::from_bits((u16::from_le_bytes(*b) as u32) << 16)),
        Q4_0 => run(data, out, block_q4_0),
        Q4_1 => run(data, out, block_q4_1),
        Q5_0 => run(data, out, block_q5_0),
        Q5_1 => run(data, out, block_q5_1),
        Q8_0 => run(data, out, block_q8_0),
        Q2K => run(data, out, block_q2_k),
        Q3K => run(data, out, block_q3_k),
        Q4K => run(data, out, block_q4_k),
        Q5K => run(data, out, block_q5_k),
        Q6K => run(data, out, block_q6_k),
        Q8K => run(data, out, block_q8_k),
        _ => return Err(unsupported()),
    }
    Ok(())
}

/// Below this many elements a tensor is dequantized on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 16;
/// Elements per rayon task: big enough to amortise scheduling, small enough to balance.
const TASK_ELEMS: usize = 1 << 14;

/// Apply a per-block kernel to every block. The caller has checked that `data` holds exactly
/// `out.len() / BS` blocks of `TS` bytes.
fn run<const TS: usize, const BS: usize>(
    data: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; TS], &mut [f32; BS]) + Sync + Send + Copy,
) {
    let n = out.len();
    let (src, src_rest) = data.as_chunks::<TS>();
    let (dst, dst_rest) = out.as_chunks_mut::<BS>();
    debug_assert!(src_rest.is_empty() && dst_rest.is_empty() && src.len() == dst.len());
    let seq = move |src: &[[u8; TS]], dst: &mut [[f32; BS]]| {
        for (b, y) in src.iter().zip(dst) {
            f(b, y);
        }
    };
    if n >= PAR_MIN_ELEMS {
        let per_task = (TASK_ELEMS / BS).max(1);
        src.par_chunks(per_task).zip(dst.par_chunks_mut(per_task)).for_each(|(s, d)| seq(s, d));
    } else {
        seq(src, dst);
    }
}

#[inline(always)]
fn f16_at<const N: usize>(b: &[u8; N], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// `{f16 d; u8 qs[16]}`: y = (q - 8) * d; low nibbles are elements 0..16, high nibbles 16..32.
#[inline(always)]
fn block_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `{f16 d; f16 m; u8 qs[16]}`: y = q * d + m.
#[inline(always)]
fn block_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// `{f16 d; u32 qh; u8 qs[16]}`: bit j of qh is the fifth bit of element j; y = (q - 16) * d.
#[inline(always)]
fn block_q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j] as u32;
        let lo = (q & 0x0F) | (((qh >> j) & 1) << 4);
        let hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = (lo as i32 - 16) as f32 * d;
        y[j + 16] = (hi as i32 - 16) as f32 * d;
    }
}

/// `{f16 d; f16 m; u32 qh; u8 qs[16]}`: y = q * d + m with 5-bit q as in Q5_0.
#[inline(always)]
fn block_q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j] as u32;
        let lo = (q & 0x0F) | (((qh >> j) & 1) << 4);
        let hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = lo as f32 * d + m;
        y[j + 16] = hi as f32 * d + m;
    }
}

/// `{f16 d; i8 qs[32]}`: y = q * d.
#[inline(always)]
fn block_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// `{u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}`: 16 groups of 16; group g has scale
/// `d * (scales[g] & 15)` and offset `dmin * (scales[g] >> 4)`. Byte `qs[32n + l]` holds the 2-bit
/// quants of elements `128n + 32s + l` for s = 0..4 at bit 2s.
#[inline(always)]
fn block_q2_k(b: &[u8; 84], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    let mut dl = [0f32; 16];
    let mut ml = [0f32; 16];
    for g in 0..16 {
        dl[g] = d * (b[g] & 0x0F) as f32;
        ml[g] = dmin * (b[g] >> 4) as f32;
    }
    for n in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let pos = 128 * n + 32 * s + l;
                let q = (b[16 + 32 * n + l] >> (2 * s)) & 3;
                y[pos] = dl[pos / 16] * q as f32 - ml[pos / 16];
            }
        }
    }
}

/// `{u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}`: 2 low bits as in Q2_K; bit b of `hmask[l]`
/// is the high bit of element `32b + l`, and a *clear* high bit subtracts 4. 16 signed 6-bit
/// scales (minus 32): low nibbles in bytes 0..8, high 2-bit pairs in bytes 8..12.
#[inline(always)]
fn block_q3_k(b: &[u8; 110], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 108);
    let sc = |i: usize| b[96 + i];
    let mut dl = [0f32; 16];
    for (i, dl) in dl.iter_mut().enumerate() {
        let lo = (sc(i % 8) >> (4 * (i / 8))) & 0x0F;
        let hi = (sc(8 + i % 4) >> (2 * (i / 4))) & 0x03;
        *dl = d * ((lo | (hi << 4)) as i32 - 32) as f32;
    }
    for n in 0..2 {
        for s in 0..4 {
            let bit = 4 * n + s;
            for l in 0..32 {
                let pos = 128 * n + 32 * s + l;
                let lo = ((b[32 + 32 * n + l] >> (2 * s)) & 3) as i32;
                let q = if (b[l] >> bit) & 1 == 0 { lo - 4 } else { lo };
                y[pos] = dl[pos / 16] * q as f32;
            }
        }
    }
}

/// The 8 pairs of 6-bit (scale, min) of Q4_K/Q5_K, packed in 12 bytes.
#[inline(always)]
fn scale_min_k4(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

fn k_scales(b: &[u8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s.copy_from_slice(&b[4..16]);
    s
}

/// `{f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}`: 8 groups of 32; y = d*sc[g] * q - dmin*m[g].
/// Byte `qs[32c + l]` holds element `64c + l` (low nibble) and `64c + 32 + l` (high nibble).
#[inline(always)]
fn block_q4_k(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = scale_min_k4(&k_scales(b));
    for c in 0..4 {
        let (d1, m1) = (d * sc[2 * c] as f32, dmin * mn[2 * c] as f32);
        let (d2, m2) = (d * sc[2 * c + 1] as f32, dmin * mn[2 * c + 1] as f32);
        for l in 0..32 {
            let q = b[16 + 32 * c + l];
            y[64 * c + l] = d1 * (q & 0x0F) as f32 - m1;
            y[64 * c + 32 + l] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

/// `{f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}`: Q4_K plus a fifth bit, bit g of
/// `qh[l]` for element `32g + l`.
#[inline(always)]
fn block_q5_k(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = scale_min_k4(&k_scales(b));
    for c in 0..4 {
        let (d1, m1) = (d * sc[2 * c] as f32, dmin * mn[2 * c] as f32);
        let (d2, m2) = (d * sc[2 * c + 1] as f32, dmin * mn[2 * c + 1] as f32);
        for l in 0..32 {
            let q = b[48 + 32 * c + l];
            let h = b[16 + l];
            let lo = (q & 0x0F) | (((h >> (2 * c)) & 1) << 4);
            let hi = (q >> 4) | (((h >> (2 * c + 1)) & 1) << 4);
            y[64 * c + l] = d1 * lo as f32 - m1;
            y[64 * c + 32 + l] = d2 * hi as f32 - m2;
        }
    }
}

/// `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}`: 6-bit q (minus 32), 16 groups of 16 with
/// scale `d * scales[g]`. In each half n, `ql[64n + l]`/`ql[64n + 32 + l]` give the low nibbles
/// of elements 0/32 (low) and 64/96 (high) + l, and `qh[32n + l]` their top bits, 2 per element.
#[inline(always)]
fn block_q6_k(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 208);
    let mut ds = [0f32; 16];
    for (g, ds) in ds.iter_mut().enumerate() {
        *ds = d * b[192 + g] as i8 as f32;
    }
    for n in 0..2 {
        for l in 0..32 {
            let ql0 = b[64 * n + l];
            let ql1 = b[64 * n + 32 + l];
            let h = b[128 + 32 * n + l];
            let q0 = (ql0 & 0x0F) | ((h & 3) << 4);
            let q1 = (ql1 & 0x0F) | (((h >> 2) & 3) << 4);
            let q2 = (ql0 >> 4) | (((h >> 4) & 3) << 4);
            let q3 = (ql1 >> 4) | (((h >> 6) & 3) << 4);
            let base = 128 * n + l;
            let g = 8 * n + l / 16;
            y[base] = ds[g] * (q0 as i32 - 32) as f32;
            y[base + 32] = ds[g + 2] * (q1 as i32 - 32) as f32;
            y[base + 64] = ds[g + 4] * (q2 as i32 - 32) as f32;
            y[base + 96] = ds[g + 6] * (q3 as i32 - 32) as f32;
        }
    }
}

/// `{f32 d; i8 qs[256]; i16 bsums[16]}`: y = d * q (bsums only serve dot products).
#[inline(always)]
fn block_q8_k(b: &[u8; 292], y: &mut [f32; QK_K]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..QK_K {
        y[j] = d * b[4 + j] as i8 as f32;
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // tests spell out the block layouts index by index
mod tests {
    use super::*;
    use half::f16;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn deq(ty: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n];
        dequantize(ty, data, &mut out).unwrap();
        out
    }

    #[test]
    fn numbering_matches_ggml() {
        let expect = [
            (0, "F32"),
            (1, "F16"),
            (2, "Q4_0"),
            (3, "Q4_1"),
            (6, "Q5_0"),
            (7, "Q5_1"),
            (8, "Q8_0"),
            (9, "Q8_1"),
            (10, "Q2_K"),
            (11, "Q3_K"),
            (12, "Q4_K"),
            (13, "Q5_K"),
            (14, "Q6_K"),
            (15, "Q8_K"),
            (20, "IQ4_NL"),
            (28, "F64"),
            (30, "BF16"),
            (39, "MXFP4"),
        ];
        for (v, name) in expect {
            assert_eq!(GgmlType::from_u32(v).map(GgmlType::name), Some(name), "type {v}");
        }
        for v in [4, 5, 31, 32, 33, 36, 37, 38, 42, 1000] {
            assert_eq!(GgmlType::from_u32(v), None, "type {v}");
        }
    }

    #[test]
    fn row_bytes_checks_blocks() {
        assert_eq!(GgmlType::Q4K.row_bytes(512).unwrap(), 288);
        assert_eq!(GgmlType::F16.row_bytes(3).unwrap(), 6);
        assert!(matches!(GgmlType::Q8_0.row_bytes(33), Err(KernelError::Shape(_))));
        assert!(matches!(GgmlType::F64.row_bytes(usize::MAX), Err(KernelError::Shape(_))));
    }

    #[test]
    fn rejects_wrong_length_and_unsupported() {
        let mut out = [0f32; 32];
        let e = dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out).unwrap_err();
        assert!(matches!(e, KernelError::Shape(_)), "{e}");
        let e = dequantize(GgmlType::Q4_0, &[0u8; 18], &mut out[..31]).unwrap_err();
        assert!(matches!(e, KernelError::Shape(_)), "{e}");
        let e = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut [0f32; 256]).unwrap_err();
        assert!(matches!(&e, KernelError::Unsupported(m) if m.contains("IQ2_XXS")), "{e}");
    }

    #[test]
    fn scalars() {
        let data: Vec<u8> = [1.5f32, -2.25].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(deq(GgmlType::F32, &data, 2), [1.5, -2.25]);
        let data: Vec<u8> = [0.5f32, -3.0, 65504.0].iter().flat_map(|&x| h(x)).collect();
        assert_eq!(deq(GgmlType::F16, &data, 3), [0.5, -3.0, 65504.0]);
        // bf16 is the top half of the f32: 1.0 = 0x3F80, -2.5 = 0xC020.
        assert_eq!(deq(GgmlType::BF16, &[0x80, 0x3F, 0x20, 0xC0], 2), [1.0, -2.5]);
    }

    #[test]
    fn q4_0_and_q4_1() {
        let mut b = h(0.5).to_vec();
        // byte j: low nibble j (element j), high nibble 15 - j (element j + 16)
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = deq(GgmlType::Q4_0, &b, 32);
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
        }
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = deq(GgmlType::Q4_1, &b, 32);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q5_0_and_q5_1() {
        // Fifth bit set for elements 1 and 17 only.
        let qh: u32 = (1 << 1) | (1 << 17);
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let mut b = h(2.0).to_vec();
        b.extend(qh.to_le_bytes());
        b.extend(&qs);
        let y = deq(GgmlType::Q5_0, &b, 32);
        let q = |i: usize| -> f32 {
            let nib = if i < 16 { i as f32 } else { (31 - i) as f32 };
            nib + if i == 1 || i == 17 { 16.0 } else { 0.0 }
        };
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (q(i) - 16.0) * 2.0, "element {i}");
        }
        let mut b = h(0.5).to_vec();
        b.extend(h(3.0));
        b.extend(qh.to_le_bytes());
        b.extend(&qs);
        let y = deq(GgmlType::Q5_1, &b, 32);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, q(i) * 0.5 + 3.0, "element {i}");
        }
    }

    #[test]
    fn q8_0_and_q8_k() {
        let mut b = h(0.125).to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let y = deq(GgmlType::Q8_0, &b, 32);
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 0.125);
        }
        let mut b = 0.5f32.to_le_bytes().to_vec();
        b.extend((0..256).map(|j| (j as u8).wrapping_sub(128)));
        b.extend([0u8; 32]);
        let y = deq(GgmlType::Q8K, &b, 256);
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as u8).wrapping_sub(128) as i8 as f32 * 0.5);
        }
    }

    #[test]
    fn q2_k() {
        let mut b = vec![0u8; 84];
        for g in 0..16 {
            b[g] = (g as u8 % 16) | (((g as u8 + 3) % 16) << 4);
        }
        // qs[32n + l] = pattern with distinct 2-bit fields
        for i in 0..64 {
            b[16 + i] = (i as u8).wrapping_mul(37);
        }
        b[80..82].copy_from_slice(&h(0.5));
        b[82..84].copy_from_slice(&h(0.25));
        let y = deq(GgmlType::Q2K, &b, 256);
        for (pos, v) in y.iter().enumerate() {
            let (n, s, l) = (pos / 128, (pos % 128) / 32, pos % 32);
            let q = ((b[16 + 32 * n + l] >> (2 * s)) & 3) as f32;
            let g = pos / 16;
            let expect = 0.5 * (b[g] & 15) as f32 * q - 0.25 * (b[g] >> 4) as f32;
            assert_eq!(*v, expect, "element {pos}");
        }
    }

    #[test]
    fn q3_k() {
        let mut b = vec![0u8; 110];
        // hmask: element 32k + l has its high bit set iff l is even
        for l in 0..32 {
            b[l] = if l % 2 == 0 { 0xFF } else { 0x00 };
        }
        for i in 0..64 {
            b[32 + i] = (i as u8).wrapping_mul(29);
        }
        // Scales: 6-bit value s_i = 32 + (i - 8) (signed scale i - 8).
        let raw: Vec<u8> = (0..16u8).map(|i| 24 + i).collect();
        for i in 0..16 {
            b[96 + i % 8] |= (raw[i] & 0x0F) << (4 * (i / 8));
            b[96 + 8 + i % 4] |= (raw[i] >> 4) << (2 * (i / 4));
        }
        b[108..110].copy_from_slice(&h(0.5));
        let y = deq(GgmlType::Q3K, &b, 256);
        for (pos, v) in y.iter().enumerate() {
            let (n, s, l) = (pos / 128, (pos % 128) / 32, pos % 32);
            let lo = ((b[32 + 32 * n + l] >> (2 * s)) & 3) as f32;
            let q = if l % 2 == 0 { lo } else { lo - 4.0 };
            let scale = (pos / 16) as f32 - 8.0;
            assert_eq!(*v, 0.5 * scale * q, "element {pos}");
        }
    }

    /// Pack 8 (scale, min) 6-bit pairs the way Q4_K/Q5_K store them.
    fn pack_k4(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
        }
        s
    }

    const K4_SC: [u8; 8] = [1, 63, 17, 32, 5, 48, 33, 62];
    const K4_MN: [u8; 8] = [0, 7, 63, 16, 40, 2, 51, 31];

    #[test]
    fn q4_k() {
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&h(0.5));
        b[2..4].copy_from_slice(&h(0.125));
        b[4..16].copy_from_slice(&pack_k4(K4_SC, K4_MN));
        for i in 0..128 {
            b[16 + i] = (i as u8).wrapping_mul(53);
        }
        let y = deq(GgmlType::Q4K, &b, 256);
        for (pos, v) in y.iter().enumerate() {
            let g = pos / 32;
            let byte = b[16 + 32 * (g / 2) + pos % 32];
            let q = if g % 2 == 0 { byte & 15 } else { byte >> 4 } as f32;
            let expect = 0.5 * K4_SC[g] as f32 * q - 0.125 * K4_MN[g] as f32;
            assert_eq!(*v, expect, "element {pos}");
        }
    }

    #[test]
    fn q5_k() {
        let mut b = vec![0u8; 176];
        b[0..2].copy_from_slice(&h(0.25));
        b[2..4].copy_from_slice(&h(1.5));
        b[4..16].copy_from_slice(&pack_k4(K4_SC, K4_MN));
        for l in 0..32 {
            b[16 + l] = (l as u8).wrapping_mul(71) ^ 0x5A;
        }
        for i in 0..128 {
            b[48 + i] = (i as u8).wrapping_mul(53);
        }
        let y = deq(GgmlType::Q5K, &b, 256);
        for (pos, v) in y.iter().enumerate() {
            let (g, l) = (pos / 32, pos % 32);
            let byte = b[48 + 32 * (g / 2) + l];
            let lo = if g % 2 == 0 { byte & 15 } else { byte >> 4 };
            let q = (lo | (((b[16 + l] >> g) & 1) << 4)) as f32;
            let expect = 0.25 * K4_SC[g] as f32 * q - 1.5 * K4_MN[g] as f32;
            assert_eq!(*v, expect, "element {pos}");
        }
    }

    #[test]
    fn q6_k() {
        // Build from desired 6-bit quants q[pos] = (7 * pos) % 64 following ggml's quantize layout.
        let q: Vec<u8> = (0..256).map(|p| ((7 * p) % 64) as u8).collect();
        let mut b = vec![0u8; 210];
        for n in 0..2 {
            for l in 0..32 {
                let base = 128 * n + l;
                let (q0, q1, q2, q3) = (q[base], q[base + 32], q[base + 64], q[base + 96]);
                b[64 * n + l] = (q0 & 15) | ((q2 & 15) << 4);
                b[64 * n + 32 + l] = (q1 & 15) | ((q3 & 15) << 4);
                b[128 + 32 * n + l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6);
            }
        }
        for g in 0..16 {
            b[192 + g] = (g as i32 * 9 - 70) as i8 as u8;
        }
        b[208..210].copy_from_slice(&h(0.0625));
        let y = deq(GgmlType::Q6K, &b, 256);
        for (pos, v) in y.iter().enumerate() {
            let scale = (pos / 16) as i32 * 9 - 70;
            let expect = 0.0625 * scale as f32 * (q[pos] as i32 - 32) as f32;
            assert_eq!(*v, expect, "element {pos}");
        }
    }

    #[test]
    fn parallel_path_matches_serial() {
        // Enough Q8_0 blocks to cross PAR_MIN_ELEMS; compare against per-block dequantization.
        let n_blocks = PAR_MIN_ELEMS / 32 * 3 + 5;
        let mut data = Vec::with_capacity(n_blocks * 34);
        for k in 0..n_blocks {
            data.extend(h((k % 97) as f32 / 64.0));
            data.extend((0..32).map(|j| (k * 31 + j * 7) as u8));
        }
        let all = deq(GgmlType::Q8_0, &data, n_blocks * 32);
        for k in [0, 1, n_blocks / 2, n_blocks - 1] {
            let one = deq(GgmlType::Q8_0, &data[k * 34..(k + 1) * 34], 32);
            assert_eq!(&all[k * 32..(k + 1) * 32], &one[..], "block {k}");
        }
    }
}
