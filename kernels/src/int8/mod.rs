//! INT8 weights with dynamic per-token INT8 activations (W8A8): formats and products.
//!
//! Weights are symmetric INT8 codes with one f32 scale per output channel (row), as the
//! compressed-tensors `int-quantized` format stores them, in two layouts:
//! - [`Int8Dense`]: `[rows, cols]` codes, row-major;
//! - [`Int8Bitmask`]: the `sparse-bitmask` layout of [`crate::bitmask`] over the codes (the
//!   same bitmask, row offsets and validation; the values are the packed non-zero codes).
//!
//! Both are views over borrowed slices (memory-mapped checkpoint tensors), checked once.
//!
//! A product `y[n, rows] = x[n, cols] · Wᵀ` quantizes each activation row once
//! ([`QuantizedActs`]): `scale = max|x| / 127`, codes `q = round(x · (127 / max|x|))` with f32
//! arithmetic and ties to even (as `torch.round`), clamped to ±127. Every weight row then takes
//! an i32 dot product of codes and a single dequantize per output:
//! `y = (Σ w·q as f32) · (act scale · weight scale)`, the two scales multiplied first.
//!
//! Code ranges: activations −127..=127 (never −128), weights the full −128..=127. The i32 sums
//! are exact while `|Σ w·q| ≤ 128 · 127 · cols < 2³¹`, hence [`MAX_COLS`]; every path adds in
//! wrapping i32, which is associative, so the SIMD paths (any order of additions) equal the
//! scalar reference bit for bit, and the f32 outputs too (same dequantize expression).
//!
//! Paths ([`Int8Isa`]): the scalar reference; AVX2 (`vpmaddubsw` + `vpmaddwd`, sign trick);
//! AVX-VNNI (256-bit `vpdpbusd`); AVX-512 VNNI (`vpdpbusd`, bitmask expansion with VBMI2
//! `vpexpandb`, and a prefill kernel for bitmask weights that skips the zero 4-column groups);
//! AMX (AVX-512 VNNI, with prefill products of either layout on AMX-INT8 tiles, [`amx`]).

use std::cell::RefCell;

use rayon::prelude::*;

use crate::bitmask::BitmaskView;
use crate::cpu::{self, Int8Isa};
use crate::dense;
use crate::{KernelError, Result};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod x86;

/// The widest weight row: beyond it an i32 sum of `w · q` products could overflow.
pub const MAX_COLS: usize = 131_072;
const _: () = assert!(128 * 127 * MAX_COLS < i32::MAX as usize);

/// Activation rows up to which products run the row-tiled kernels (decode and batched decode);
/// beyond, bitmask weights take the prefill kernel where the path has one.
pub const SMALL_BATCH_MAX_N: usize = 32;

/// Activation codes are padded to a multiple of this many columns (one AVX-512 vector), with
/// zero codes, so that kernels read whole vectors.
const ACT_ALIGN: usize = 64;
/// ... and, for more than [`SMALL_BATCH_MAX_N`] rows (the AMX kernel's products, which read 32
/// rows a block), to a multiple of this many rows of zero codes. Decode rows are not padded.
const ACT_ROW_ALIGN: usize = 32;
/// Activation rows from which [`QuantizedActs::quantize`] runs on every thread (prefill).
const PARALLEL_ROWS: usize = 64;

fn shape_err(msg: String) -> KernelError {
    KernelError::Shape(msg)
}

fn check_cols(cols: usize) -> Result<()> {
    if cols > MAX_COLS {
        return Err(shape_err(format!("INT8 weight with {cols} columns: at most {MAX_COLS} (i32 accumulation)")));
    }
    Ok(())
}

fn check_scale_count(scales: &[f32], rows: usize) -> Result<()> {
    if scales.len() != rows {
        return Err(shape_err(format!("weight scales: expected {rows} (one per row), got {}", scales.len())));
    }
    Ok(())
}

/// Every scale finite: the check `new` adds to `with_checked_scales`.
fn check_finite_scales(scales: &[f32]) -> Result<()> {
    if let Some(r) = scales.iter().position(|s| !s.is_finite()) {
        return Err(KernelError::Format {
            format: "int-quantized",
            msg: format!("weight scale of row {r} is {}", scales[r]),
        });
    }
    Ok(())
}

/// Dense INT8 codes `[rows, cols]` with one f32 scale per row.
#[derive(Clone, Copy, Debug)]
pub struct Int8Dense<'a> {
    rows: usize,
    cols: usize,
    codes: &'a [i8],
    scales: &'a [f32],
}

impl<'a> Int8Dense<'a> {
    /// Checks the shapes (and that every scale is finite) and borrows the parts.
    pub fn new(codes: &'a [i8], scales: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        let m = Self::with_checked_scales(codes, scales, rows, cols)?;
        check_finite_scales(scales)?;
        Ok(m)
    }

    /// As [`Int8Dense::new`] for scales the caller has already checked to be finite (a model
    /// checks them once at load, not on every product of a decode step, where reading every
    /// scale again cost more than some products): only the shapes are checked here. A
    /// non-finite scale would give non-finite outputs in its row, nothing worse.
    pub fn with_checked_scales(codes: &'a [i8], scales: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        check_cols(cols)?;
        let total = rows.checked_mul(cols).ok_or_else(|| shape_err(format!("[{rows}, {cols}] overflows")))?;
        if codes.len() != total {
            return Err(shape_err(format!("INT8 weight [{rows}, {cols}] needs {total} codes, got {}", codes.len())));
        }
        check_scale_count(scales, rows)?;
        Ok(Self { rows, cols, codes, scales })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn codes(&self) -> &'a [i8] {
        self.codes
    }
    pub fn scales(&self) -> &'a [f32] {
        self.scales
    }
    /// Bytes one pass over the weight streams: codes and scales.
    pub fn nbytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

/// Bitmask-sparse INT8 codes with one f32 scale per row.
#[derive(Clone, Copy, Debug)]
pub struct Int8Bitmask<'a> {
    codes: BitmaskView<'a, i8>,
    scales: &'a [f32],
}

impl<'a> Int8Bitmask<'a> {
    /// `codes` was validated when its view was built; this checks the scales and the width.
    pub fn new(codes: BitmaskView<'a, i8>, scales: &'a [f32]) -> Result<Self> {
        let m = Self::with_checked_scales(codes, scales)?;
        check_finite_scales(scales)?;
        Ok(m)
    }

    /// As [`Int8Bitmask::new`] for scales the caller has already checked to be finite (see
    /// [`Int8Dense::with_checked_scales`]).
    pub fn with_checked_scales(codes: BitmaskView<'a, i8>, scales: &'a [f32]) -> Result<Self> {
        check_cols(codes.cols())?;
        check_scale_count(scales, codes.rows())?;
        Ok(Self { codes, scales })
    }
    pub fn rows(&self) -> usize {
        self.codes.rows()
    }
    pub fn cols(&self) -> usize {
        self.codes.cols()
    }
    pub fn codes(&self) -> &BitmaskView<'a, i8> {
        &self.codes
    }
    pub fn scales(&self) -> &'a [f32] {
        self.scales
    }
    /// Bytes one pass over the weight streams: bitmask, packed codes, row offsets and scales.
    pub fn nbytes(&self) -> usize {
        self.codes.nbytes() + 4 * self.scales.len()
    }
}

/// A borrowed INT8 weight in either layout.
#[derive(Clone, Copy, Debug)]
pub enum Int8Matrix<'a> {
    Dense(Int8Dense<'a>),
    Bitmask(Int8Bitmask<'a>),
}

impl<'a> Int8Matrix<'a> {
    pub fn rows(&self) -> usize {
        match self {
            Int8Matrix::Dense(m) => m.rows(),
            Int8Matrix::Bitmask(m) => m.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Int8Matrix::Dense(m) => m.cols(),
            Int8Matrix::Bitmask(m) => m.cols(),
        }
    }
    pub fn scales(&self) -> &'a [f32] {
        match self {
            Int8Matrix::Dense(m) => m.scales(),
            Int8Matrix::Bitmask(m) => m.scales(),
        }
    }
    pub fn nbytes(&self) -> usize {
        match self {
            Int8Matrix::Dense(m) => m.nbytes(),
            Int8Matrix::Bitmask(m) => m.nbytes(),
        }
    }
}

/// Activation rows quantized once per step and reused by every product that reads them.
#[derive(Clone, Debug, Default)]
pub struct QuantizedActs {
    n: usize,
    cols: usize,
    /// Codes per row, `cols` rounded up to [`ACT_ALIGN`], zero-padded.
    stride: usize,
    codes: Vec<i8>,
    scales: Vec<f32>,
    /// Σ of each row's codes (the VNNI paths' correction for their +128 weight bias).
    sums: Vec<i32>,
}

/// `1.5 · 2²³`: adding and subtracting it rounds an f32 of magnitude below 2²² to an integer,
/// ties to even (the sum's last place is 1).
pub(crate) const ROUND: f32 = 12_582_912.0;

impl QuantizedActs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantizes `x` (`[n, cols]`) in one pass per row: its largest magnitude, then its codes
    /// and their sum. Reuses the buffers. A row holding NaN or ±∞ is an error naming it.
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize) -> Result<()> {
        check_cols(cols)?;
        let want = n.checked_mul(cols).ok_or_else(|| shape_err(format!("[{n}, {cols}] overflows")))?;
        if x.len() != want {
            return Err(shape_err(format!("activations: expected [{n}, {cols}] = {want} values, got {}", x.len())));
        }
        let stride = cols.next_multiple_of(ACT_ALIGN);
        self.n = n;
        self.cols = cols;
        self.stride = stride;
        self.codes.clear();
        let padded = if n > SMALL_BATCH_MAX_N { n.next_multiple_of(ACT_ROW_ALIGN) } else { n };
        self.codes.resize(padded * stride, 0);
        self.scales.clear();
        self.scales.resize(n, 0.0);
        self.sums.clear();
        self.sums.resize(n, 0);
        if cols == 0 {
            return Ok(());
        }
        // One row: its codes (the padded row's first `cols`), its input, its scale and sum.
        type Row<'r> = ((&'r mut [i8], &'r [f32]), (&'r mut f32, &'r mut i32));
        let one = |((dst, row), (scale, sum)): Row<'_>| match quantize_row(row, &mut dst[..cols]) {
            Some((s, q)) => {
                (*scale, *sum) = (s, q);
                true
            }
            None => false,
        };
        let codes = &mut self.codes[..n * stride];
        // Prefill rows in parallel; a decode step's few rows on the calling thread.
        let bad = if n >= PARALLEL_ROWS {
            (codes.par_chunks_mut(stride).zip(x.par_chunks(cols)))
                .zip(self.scales.par_iter_mut().zip(self.sums.par_iter_mut()))
                .with_min_len(PARALLEL_ROWS / 2)
                .map(one)
                .collect::<Vec<bool>>()
                .iter()
                .position(|&ok| !ok)
        } else {
            (codes.chunks_mut(stride).zip(x.chunks(cols)))
                .zip(self.scales.iter_mut().zip(self.sums.iter_mut()))
                .map(one)
                .position(|ok| !ok)
        };
        match bad {
            Some(i) => Err(shape_err(format!("activations: row {i} holds a NaN or infinite value"))),
            None => Ok(()),
        }
    }

    pub fn rows(&self) -> usize {
        self.n
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Row `i`'s codes (`cols` of them).
    pub fn codes(&self, i: usize) -> &[i8] {
        &self.codes[i * self.stride..i * self.stride + self.cols]
    }
    /// Row `i`'s scale (`max|x| / 127`; 0 for an all-zero row, whose codes are all 0).
    pub fn scale(&self, i: usize) -> f32 {
        self.scales[i]
    }
}

/// One row's codes into `dst` (same length); returns its scale and the sum of its codes, or
/// `None` if the row holds a NaN or an infinity.
fn quantize_row(x: &[f32], dst: &mut [i8]) -> Option<(f32, i32)> {
    quantize_row_on(cpu::isa(), x, dst)
}

/// [`quantize_row`] on an explicit path: AVX-512 in vectors (the same operations, so the same
/// bits), else the scalar reference.
fn quantize_row_on(isa: crate::cpu::Isa, x: &[f32], dst: &mut [i8]) -> Option<(f32, i32)> {
    #[cfg(target_arch = "x86_64")]
    if isa == crate::cpu::Isa::Avx512 && cpu::supports(isa) {
        // SAFETY: AVX-512 F/BW/VL present (checked).
        let amax = unsafe { x86::quant::amax_512(x) }?;
        if amax == 0.0 {
            dst.fill(0);
            return Some((0.0, 0));
        }
        // SAFETY: as above; dst and x have the same length (callers).
        let sum = unsafe { x86::quant::codes_512(x, 127.0 / amax, dst) };
        return Some((amax / 127.0, sum));
    }
    let _ = isa;
    let mut amax = 0f32;
    let mut finite = true;
    for &v in x {
        let a = v.abs();
        finite &= a <= f32::MAX;
        amax = if a > amax { a } else { amax };
    }
    if !finite {
        return None;
    }
    if amax == 0.0 {
        dst.fill(0);
        return Some((0.0, 0));
    }
    let inv = 127.0 / amax;
    let mut sum = 0i32;
    for (d, &v) in dst.iter_mut().zip(x) {
        // |v · inv| <= 127 (+ one rounding), far below 2²²: the ROUND trick is exact.
        let q = ((v * inv + ROUND) - ROUND) as i32;
        let q = q.clamp(-127, 127);
        *d = q as i8;
        sum += q;
    }
    Some((amax / 127.0, sum))
}

/// `y[n, rows] = x[n, cols] · Wᵀ` on the process's INT8 path (overwrites `y`).
pub fn matmul(w: &Int8Matrix<'_>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    matmul_on(cpu::int8_isa(), w, x, n, y)
}

/// [`matmul`] on an explicit path (tests and benches compare the paths).
pub fn matmul_on(isa: Int8Isa, w: &Int8Matrix<'_>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    crate::scratch::with_local(&ACTS, |acts| {
        acts.quantize(x, n, w.cols())?;
        matmul_quantized_on(isa, w, acts, y)
    })
}

thread_local! {
    /// The quantized activations of [`matmul_on`], kept between calls (decode allocates nothing).
    static ACTS: RefCell<QuantizedActs> = RefCell::new(QuantizedActs::new());
    /// A task's i32 sums before they are dequantized.
    static SUMS: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
}

/// The product with activations already quantized: products that share an input (q/k/v,
/// gate/up) quantize it once and call this for each weight.
pub fn matmul_quantized_on(isa: Int8Isa, w: &Int8Matrix<'_>, acts: &QuantizedActs, y: &mut [f32]) -> Result<()> {
    if !isa.supported() {
        return Err(KernelError::Unsupported(format!("the {} INT8 kernels on this CPU", isa.name())));
    }
    let (rows, cols, n) = (w.rows(), w.cols(), acts.n);
    if acts.cols != cols {
        return Err(shape_err(format!("activations quantized with {} columns for a weight of {cols}", acts.cols)));
    }
    let want = n.checked_mul(rows).ok_or_else(|| shape_err(format!("[{n}, {rows}] overflows")))?;
    if y.len() != want {
        return Err(shape_err(format!("output: expected [{n}, {rows}] = {want} values, got {}", y.len())));
    }
    if n == 0 || rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        y.fill(0.0);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if n > SMALL_BATCH_MAX_N {
        if isa == Int8Isa::Amx {
            amx::prefill(w, acts, y);
            return Ok(());
        }
        if isa == Int8Isa::Avx512Vnni
            && let Int8Matrix::Bitmask(b) = w
        {
            x86::prefill(b, acts, y);
            return Ok(());
        }
    }
    let per = dense::rows_per_task(rows);
    if n == 1 {
        y.par_chunks_mut(per).enumerate().for_each(|(t, out)| rows_into(isa, w, acts, t * per, out));
        return Ok(());
    }
    let mut yt = vec![0f32; rows * n];
    yt.par_chunks_mut(per * n).enumerate().for_each(|(t, out)| rows_into(isa, w, acts, t * per, out));
    dense::scatter_transposed(&yt, n, rows, y);
    Ok(())
}

/// Rows per chunk of a task: the chunk's sums fit a small buffer and, for several activation
/// groups, its weights stay in L2 while every group passes over them.
const CHUNK_ROWS: usize = dense::SMALL_GEMM_CHUNK_ROWS;

/// Rows `r0 .. r0 + out.len() / n` into `out` (`[rows, n]`, for `n == 1` simply the outputs),
/// on this thread: the layout of the float kernels' `rows_into`, so that [`crate::matrix`] runs
/// INT8 and float products in one region. Callers have checked that `isa` runs here and that
/// `acts` holds `n >= 1` rows quantized for `w`'s columns.
pub(crate) fn rows_into(isa: Int8Isa, w: &Int8Matrix<'_>, acts: &QuantizedActs, r0: usize, out: &mut [f32]) {
    let n = acts.n;
    if w.cols() == 0 {
        out.fill(0.0);
        return;
    }
    let r1 = r0 + out.len() / n;
    let scales = w.scales();
    crate::scratch::with_local(&SUMS, |sums| {
        sums.resize(CHUNK_ROWS * n, 0);
        for c0 in (r0..r1).step_by(CHUNK_ROWS) {
            let c1 = (c0 + CHUNK_ROWS).min(r1);
            let acc = &mut sums[..(c1 - c0) * n];
            dots(isa, w, acts, c0, c1, acc);
            let o = &mut out[(c0 - r0) * n..(c1 - r0) * n];
            dequantize(acc, &acts.scales, &scales[c0..c1], o);
        }
    });
}

/// `out[r · n + i] = acc[r · n + i] as f32 · (act_scales[i] · w_scales[r])`: the one
/// dequantize every path shares (so equal sums give equal bits).
fn dequantize(acc: &[i32], act_scales: &[f32], w_scales: &[f32], out: &mut [f32]) {
    let n = act_scales.len();
    for ((o, a), &sw) in out.chunks_exact_mut(n).zip(acc.chunks_exact(n)).zip(w_scales) {
        for ((o, &a), &sa) in o.iter_mut().zip(a).zip(act_scales) {
            *o = a as f32 * (sa * sw);
        }
    }
}

/// `acc[(r − r0) · n + i] = Σ_c W[r, c] · q[i, c]` for rows `r0..r1` on `isa`.
fn dots(isa: Int8Isa, w: &Int8Matrix<'_>, acts: &QuantizedActs, r0: usize, r1: usize, acc: &mut [i32]) {
    assert!(
        r0 <= r1 && r1 <= w.rows() && acc.len() == (r1 - r0) * acts.n && acts.cols == w.cols(),
        "int8 dots: shapes"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers run only supported paths (`matmul_quantized_on` checks); the weight was
        // validated at construction and the shapes are asserted above.
        Int8Isa::Avx512Vnni | Int8Isa::Amx => unsafe { x86::avx512::dots(w, acts, r0, r1, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Int8Isa::AvxVnni => unsafe { x86::avxvnni::dots(w, acts, r0, r1, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Int8Isa::Avx2 => unsafe { x86::avx2::dots(w, acts, r0, r1, acc) },
        _ => dots_scalar(w, acts, r0, r1, acc),
    }
}

/// The reference: one product at a time in wrapping i32.
fn dots_scalar(w: &Int8Matrix<'_>, acts: &QuantizedActs, r0: usize, r1: usize, acc: &mut [i32]) {
    let (n, cols) = (acts.n, w.cols());
    match w {
        Int8Matrix::Dense(d) => {
            for r in r0..r1 {
                let row = &d.codes[r * cols..(r + 1) * cols];
                for i in 0..n {
                    let s = row.iter().zip(acts.codes(i)).fold(0i32, |s, (&w, &q)| s.wrapping_add(w as i32 * q as i32));
                    acc[(r - r0) * n + i] = s;
                }
            }
        }
        Int8Matrix::Bitmask(b) => {
            let v = b.codes();
            let mb = cols.div_ceil(8);
            for r in r0..r1 {
                let o = &mut acc[(r - r0) * n..(r - r0 + 1) * n];
                o.fill(0);
                let mut vals = v.values()[v.row_offsets()[r] as usize..].iter();
                for (k, &m) in v.bitmask()[r * mb..(r + 1) * mb].iter().enumerate() {
                    let mut bits = m;
                    while bits != 0 {
                        let c = 8 * k + bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        let Some(&wv) = vals.next() else { return };
                        for (i, o) in o.iter_mut().enumerate() {
                            *o = o.wrapping_add(wv as i32 * acts.codes[i * acts.stride + c] as i32);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
