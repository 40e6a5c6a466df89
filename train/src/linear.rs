//! The linears of the trainer, `y = x · Wᵀ`, as candle custom ops with their backward passes.
//!
//! - [`dense`]: the three products (forward, input gradient, weight gradient) as large GEMMs on
//!   the kernels crate's fastest path (`dense::gemm_large`: faer's AVX-512 kernels where the CPU
//!   has them; candle's own matmul runs the gemm crate's 8-lane kernels on a stable compiler).
//! - [`sparse`]: `W` stored as its kept values only, with a backward pass that never touches a
//!   pruned position.
//!
//! Both run f32 on the CPU; other dtypes and devices take candle's matmul (dense) or plain loops
//! (sparse, f64: the finite-difference tests).
//!
//! # Sparse layout
//!
//! A masked linear's parameter is a 1-D `Var` of its kept values in row-major order (the
//! compressed-tensors `sparse-bitmask` order); its [`SparseLayout`] holds the frozen mask as a
//! bitmask with row offsets, the same mask transposed, and the permutation from the transposed
//! order to the stored one. The pruned entries do not exist: their gradient is never computed,
//! their AdamW moments never stored (optimizer memory × (1 − s)), their update never applied.
//!
//! # Why a candle custom op
//!
//! The rest of the Llama block (norms, RoPE, attention, SwiGLU, the losses) keeps candle's
//! autograd, which is tested against finite differences; only the seven linears of each block
//! change, so one `CustomOp2` with its backward is the smallest change that makes them sparse.
//! A hand-written autograd for the whole block would duplicate that tested machinery.
//!
//! # Arithmetic (f32 on the CPU, through `lacuna_kernels`)
//!
//! - forward `y[n, rows] = x[n, cols] · Wᵀ`: the non-zeros-only prefill product
//!   (`bitmask::matmul`), `2 · nnz · n` flops;
//! - input gradient `dx[n, cols] = dy[n, rows] · W`: the same product over `Wᵀ` (the transposed
//!   bitmask, its values gathered through the permutation, `nnz` loads per step);
//! - weight gradient at the kept positions only, `dW[k] = Σ_t dy[t, r_k] · x[t, c_k]`: the sampled
//!   product (`sampled::sampled_matmul`).
//!
//! f64 (the finite-difference tests) runs the same three products as plain loops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use lacuna_kernels::bitmask::{self, BitmaskView};
use lacuna_kernels::dense::{self as kd, Strided};
use lacuna_kernels::sampled;

use crate::{Error, Result};

/// A frozen mask of a `[rows, cols]` weight in the forms the sparse products need.
#[derive(Debug)]
pub struct SparseLayout {
    rows: usize,
    cols: usize,
    bitmask: Vec<u8>,
    row_offsets: Vec<i64>,
    /// The mask of `Wᵀ` (`[cols, rows]`).
    t_bitmask: Vec<u8>,
    t_row_offsets: Vec<i64>,
    /// `perm[k]`: the stored (row-major) index of the `k`-th entry of `Wᵀ` in its row-major order.
    perm: Vec<u32>,
}

fn bit(mask: &[u8], mb: usize, r: usize, c: usize) -> bool {
    mask[r * mb + c / 8] >> (c % 8) & 1 == 1
}

impl SparseLayout {
    /// The layout of a `[rows, cols]` mask (`keep[i] != 0` keeps entry `i`).
    pub fn from_keep(keep: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if keep.len() != rows * cols {
            return Err(Error::Mask {
                name: format!("[{rows}, {cols}]"),
                msg: format!("a mask of {} entries for a weight of {}", keep.len(), rows * cols),
            });
        }
        if rows * cols > u32::MAX as usize {
            return Err(Error::Unsupported(format!("a sparse linear of {rows} × {cols} entries (over 2³² )")));
        }
        let (mb, tmb) = (cols.div_ceil(8), rows.div_ceil(8));
        let mut bitmask = vec![0u8; rows * mb];
        let mut t_bitmask = vec![0u8; cols * tmb];
        let mut row_offsets = Vec::with_capacity(rows);
        let mut col_count = vec![0usize; cols];
        let mut nnz = 0usize;
        for r in 0..rows {
            row_offsets.push(nnz as i64);
            for c in 0..cols {
                if keep[r * cols + c] != 0.0 {
                    bitmask[r * mb + c / 8] |= 1 << (c % 8);
                    t_bitmask[c * tmb + r / 8] |= 1 << (r % 8);
                    col_count[c] += 1;
                    nnz += 1;
                }
            }
        }
        let mut t_row_offsets = Vec::with_capacity(cols);
        let mut next = Vec::with_capacity(cols);
        let mut acc = 0usize;
        for &n in &col_count {
            t_row_offsets.push(acc as i64);
            next.push(acc);
            acc += n;
        }
        let mut perm = vec![0u32; nnz];
        let mut k = 0u32;
        for r in 0..rows {
            for c in 0..cols {
                if bit(&bitmask, mb, r, c) {
                    perm[next[c]] = k;
                    next[c] += 1;
                    k += 1;
                }
            }
        }
        Ok(Self { rows, cols, bitmask, row_offsets, t_bitmask, t_row_offsets, perm })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Kept entries.
    pub fn nnz(&self) -> usize {
        self.perm.len()
    }

    /// Every kept `(row, col)` in stored order.
    fn entries(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mb = self.cols.div_ceil(8);
        (0..self.rows)
            .flat_map(move |r| (0..self.cols).filter(move |&c| bit(&self.bitmask, mb, r, c)).map(move |c| (r, c)))
    }

    /// The kept values of a dense `[rows, cols]` row-major array; errors if a pruned entry is not
    /// exactly zero (it would be lost).
    pub fn pack<T: Copy + PartialEq + Default>(&self, dense: &[T]) -> Result<Vec<T>> {
        if dense.len() != self.rows * self.cols {
            return Err(Error::Mask {
                name: format!("[{}, {}]", self.rows, self.cols),
                msg: format!("{} values to pack", dense.len()),
            });
        }
        let mut out = Vec::with_capacity(self.nnz());
        let mb = self.cols.div_ceil(8);
        let mut leaked = 0usize;
        for r in 0..self.rows {
            for c in 0..self.cols {
                let v = dense[r * self.cols + c];
                if bit(&self.bitmask, mb, r, c) {
                    out.push(v);
                } else if v != T::default() {
                    leaked += 1;
                }
            }
        }
        if leaked > 0 {
            return Err(Error::Mask {
                name: format!("[{}, {}]", self.rows, self.cols),
                msg: format!("{leaked} pruned entries are non-zero"),
            });
        }
        Ok(out)
    }

    /// The dense `[rows, cols]` array of `vals` (zeros at pruned positions).
    pub fn expand<T: Copy + Default>(&self, vals: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); self.rows * self.cols];
        for ((r, c), v) in self.entries().zip(vals) {
            out[r * self.cols + c] = *v;
        }
        out
    }

    /// [`pack`](Self::pack) of a dense tensor (f32 or f64) into a 1-D tensor of its kept values.
    pub fn pack_tensor(&self, dense: &Tensor) -> Result<Tensor> {
        let flat = dense.flatten_all()?;
        Ok(match dense.dtype() {
            DType::F64 => Tensor::from_vec(self.pack(&flat.to_vec1::<f64>()?)?, self.nnz(), dense.device())?,
            _ => {
                Tensor::from_vec(self.pack(&flat.to_dtype(DType::F32)?.to_vec1::<f32>()?)?, self.nnz(), dense.device())?
                    .to_dtype(dense.dtype())?
            }
        })
    }

    /// The dense `[rows, cols]` tensor of a 1-D tensor of kept values.
    pub fn expand_tensor(&self, vals: &Tensor) -> Result<Tensor> {
        let shape = (self.rows, self.cols);
        Ok(match vals.dtype() {
            DType::F64 => Tensor::from_vec(self.expand(&vals.to_vec1::<f64>()?), shape, vals.device())?,
            _ => Tensor::from_vec(self.expand(&vals.to_dtype(DType::F32)?.to_vec1::<f32>()?), shape, vals.device())?
                .to_dtype(vals.dtype())?,
        })
    }

    fn view<'a>(&'a self, vals: &'a [f32]) -> candle_core::Result<BitmaskView<'a, f32>> {
        BitmaskView::new(self.rows, self.cols, &self.bitmask, vals, &self.row_offsets).map_err(candle_core::Error::wrap)
    }
}

/// `x · Wᵀ` for `x` `[n, cols]` and `W` the kept values `vals` under `layout`.
pub fn sparse(x: &Tensor, vals: &Tensor, layout: &Arc<SparseLayout>) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(vals, Forward(layout.clone()))?)
}

/// `x · wᵀ` for `x` `[n, in]` and `w` `[out, in]`.
pub fn dense(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.device().is_cpu() && x.rank() == 2 && w.rank() == 2 {
        return Ok(x.contiguous()?.apply_op2(&w.contiguous()?, DenseForward)?);
    }
    Ok(x.matmul(&w.t()?)?)
}

/// The dense forward op (with its backward), and its two gradients.
struct DenseForward;
struct DenseGradInput;
struct DenseGradWeight;

fn gemm(a: &[f32], al: Strided, b: &[f32], bl: Strided, c: &mut [f32], cl: Strided) -> candle_core::Result<()> {
    kd::gemm_large(a, al, b, bl, c, cl).map_err(kernel_err)
}

/// `(n, k)` of a rank-2 operand.
fn dims2(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    match l.dims() {
        &[n, k] => Ok((n, k)),
        d => Err(candle_core::Error::Msg(format!("dense linear: {what} has shape {d:?}, a matrix is expected"))),
    }
}

fn f32_only() -> candle_core::Error {
    candle_core::Error::Msg("dense linear: the custom op runs f32 only".into())
}

impl CustomOp2 for DenseForward {
    fn name(&self) -> &'static str {
        "dense-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((n, k), (out, k2)) = (dims2(l1, "x")?, dims2(l2, "w")?);
        if k != k2 {
            return Err(candle_core::Error::Msg(format!("dense linear: x [{n}, {k}] · w [{out}, {k2}]ᵀ")));
        }
        let (CpuStorage::F32(_), CpuStorage::F32(_)) = (s1, s2) else { return Err(f32_only()) };
        let (x, w) = (slice::<f32>(s1, l1, "linear: x")?, slice::<f32>(s2, l2, "linear: w")?);
        let mut y = vec![0f32; n * out];
        gemm(x, Strided::row_major(n, k), w, Strided::row_major(out, k).t(), &mut y, Strided::row_major(n, out))?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // A detached operand (a frozen weight, an input from outside the graph) needs no gradient.
        let dx = if x.track_op() { Some(grad.apply_op2_no_bwd(w, &DenseGradInput)?) } else { None };
        let dw = if w.track_op() { Some(grad.apply_op2_no_bwd(x, &DenseGradWeight)?) } else { None };
        Ok((dx, dw))
    }
}

impl CustomOp2 for DenseGradInput {
    fn name(&self) -> &'static str {
        "dense-linear-grad-input"
    }

    /// `dx[n, in] = dy[n, out] · w[out, in]`.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((n, out), (out2, k)) = (dims2(l1, "dy")?, dims2(l2, "w")?);
        if out != out2 {
            return Err(candle_core::Error::Msg(format!("dense linear: dy [{n}, {out}] · w [{out2}, {k}]")));
        }
        let (CpuStorage::F32(_), CpuStorage::F32(_)) = (s1, s2) else { return Err(f32_only()) };
        let (dy, w) = (slice::<f32>(s1, l1, "linear: dy")?, slice::<f32>(s2, l2, "linear: w")?);
        let mut dx = vec![0f32; n * k];
        gemm(dy, Strided::row_major(n, out), w, Strided::row_major(out, k), &mut dx, Strided::row_major(n, k))?;
        Ok((CpuStorage::F32(dx), Shape::from((n, k))))
    }
}

impl CustomOp2 for DenseGradWeight {
    fn name(&self) -> &'static str {
        "dense-linear-grad-weight"
    }

    /// `dw[out, in] = dy[n, out]ᵀ · x[n, in]`.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((n, out), (n2, k)) = (dims2(l1, "dy")?, dims2(l2, "x")?);
        if n != n2 {
            return Err(candle_core::Error::Msg(format!("dense linear: dy [{n}, {out}]ᵀ · x [{n2}, {k}]")));
        }
        let (CpuStorage::F32(_), CpuStorage::F32(_)) = (s1, s2) else { return Err(f32_only()) };
        let (dy, x) = (slice::<f32>(s1, l1, "linear: dy")?, slice::<f32>(s2, l2, "linear: x")?);
        let mut dw = vec![0f32; out * k];
        gemm(dy, Strided::row_major(n, out).t(), x, Strided::row_major(n, k), &mut dw, Strided::row_major(out, k))?;
        Ok((CpuStorage::F32(dw), Shape::from((out, k))))
    }
}

/// The forward op (with its backward).
struct Forward(Arc<SparseLayout>);
/// `dx = dy · W` (no backward).
struct GradInput(Arc<SparseLayout>);
/// `dW` at the kept positions from `(dy, x)`; the values (third operand) are not read, they only
/// complete the bitmask view the kernel takes (no backward).
struct GradWeight(Arc<SparseLayout>);

/// Whether `t` is a contiguous f32 tensor on the CPU: what the trainer's custom ops (here, in
/// `attention` and `optim`) run on; other tensors take candle's composed ops.
pub(crate) fn is_f32_cpu(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous()
}

/// The contiguous slice of a CPU tensor's storage (`what` names it in the error).
pub(crate) fn slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what} is not contiguous")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// The contiguous f32 slice of a CPU tensor's storage, to write in place.
pub(crate) fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a mut [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what} is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => Err(candle_core::Error::Msg(format!("{what} is not f32"))),
    }
}

/// `(n, k)` of a `[.., k]` operand whose last dimension must be `k`.
fn rows_of(l: &Layout, k: usize, what: &str) -> candle_core::Result<usize> {
    let dims = l.dims();
    match dims.last() {
        Some(&d) if d == k => Ok(dims[..dims.len() - 1].iter().product()),
        _ => Err(candle_core::Error::Msg(format!(
            "sparse linear: {what} has shape {dims:?}, its last dimension must be {k}"
        ))),
    }
}

fn check_vals(l: &Layout, layout: &SparseLayout) -> candle_core::Result<()> {
    if l.dims() != [layout.nnz()] {
        return Err(candle_core::Error::Msg(format!(
            "sparse linear: {} kept values expected, got shape {:?}",
            layout.nnz(),
            l.dims()
        )));
    }
    Ok(())
}

fn out_shape(l: &Layout, last: usize) -> Shape {
    let mut d = l.dims().to_vec();
    *d.last_mut().expect("rank checked by rows_of") = last;
    Shape::from(d)
}

fn kernel_err(e: lacuna_kernels::KernelError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "sparse-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &*self.0;
        let n = rows_of(l1, w.cols, "x")?;
        check_vals(l2, w)?;
        let shape = out_shape(l1, w.rows);
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (x, vals) = (slice::<f32>(s1, l1, "linear: x")?, slice::<f32>(s2, l2, "linear: values")?);
                let mut y = vec![0f32; n * w.rows];
                bitmask::matmul(&w.view(vals)?, x, n, &mut y).map_err(kernel_err)?;
                Ok((CpuStorage::F32(y), shape))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (x, vals) = (slice::<f64>(s1, l1, "linear: x")?, slice::<f64>(s2, l2, "linear: values")?);
                let mut y = vec![0f64; n * w.rows];
                for (k, (r, c)) in w.entries().enumerate() {
                    for t in 0..n {
                        y[t * w.rows + r] += vals[k] * x[t * w.cols + c];
                    }
                }
                Ok((CpuStorage::F64(y), shape))
            }
            _ => Err(candle_core::Error::Msg("sparse linear: x and the values must both be f32 or both f64".into())),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        vals: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = if x.track_op() { Some(grad.apply_op2_no_bwd(vals, &GradInput(self.0.clone()))?) } else { None };
        let dw =
            if vals.track_op() { Some(grad.apply_op3_no_bwd(x, vals, &GradWeight(self.0.clone()))?) } else { None };
        Ok((dx, dw))
    }
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "sparse-linear-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &*self.0;
        let n = rows_of(l1, w.rows, "dy")?;
        check_vals(l2, w)?;
        let shape = out_shape(l1, w.cols);
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (dy, vals) = (slice::<f32>(s1, l1, "linear: dy")?, slice::<f32>(s2, l2, "linear: values")?);
                // Wᵀ's values in its own row-major order.
                let t_vals: Vec<f32> = w.perm.iter().map(|&k| vals[k as usize]).collect();
                let wt =
                    BitmaskView::new(w.cols, w.rows, &w.t_bitmask, &t_vals, &w.t_row_offsets).map_err(kernel_err)?;
                let mut dx = vec![0f32; n * w.cols];
                bitmask::matmul(&wt, dy, n, &mut dx).map_err(kernel_err)?;
                Ok((CpuStorage::F32(dx), shape))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (dy, vals) = (slice::<f64>(s1, l1, "linear: dy")?, slice::<f64>(s2, l2, "linear: values")?);
                let mut dx = vec![0f64; n * w.cols];
                for (k, (r, c)) in w.entries().enumerate() {
                    for t in 0..n {
                        dx[t * w.cols + c] += vals[k] * dy[t * w.rows + r];
                    }
                }
                Ok((CpuStorage::F64(dx), shape))
            }
            _ => Err(candle_core::Error::Msg("sparse linear: dy and the values must both be f32 or both f64".into())),
        }
    }
}

impl CustomOp3 for GradWeight {
    fn name(&self) -> &'static str {
        "sparse-linear-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &*self.0;
        let n = rows_of(l1, w.rows, "dy")?;
        if rows_of(l2, w.cols, "x")? != n {
            return Err(candle_core::Error::Msg(format!(
                "sparse linear: dy {:?} and x {:?} disagree",
                l1.dims(),
                l2.dims()
            )));
        }
        let shape = Shape::from(w.nnz());
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (dy, x) = (slice::<f32>(s1, l1, "linear: dy")?, slice::<f32>(s2, l2, "linear: x")?);
                check_vals(l3, w)?;
                let mut dw = vec![0f32; w.nnz()];
                sampled::sampled_matmul(&w.view(slice::<f32>(s3, l3, "linear: values")?)?, x, dy, n, &mut dw)
                    .map_err(kernel_err)?;
                Ok((CpuStorage::F32(dw), shape))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (dy, x) = (slice::<f64>(s1, l1, "linear: dy")?, slice::<f64>(s2, l2, "linear: x")?);
                let dw =
                    w.entries().map(|(r, c)| (0..n).map(|t| dy[t * w.rows + r] * x[t * w.cols + c]).sum()).collect();
                Ok((CpuStorage::F64(dw), shape))
            }
            _ => Err(candle_core::Error::Msg("sparse linear: dy and x must both be f32 or both f64".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize, sparsity: f64) -> Vec<f32> {
        (0..n).map(|_| if rng.random::<f64>() < sparsity { 0.0 } else { rng.random_range(-1.0f32..1.0) }).collect()
    }

    #[test]
    fn layout_packs_expands_and_transposes() {
        let (rows, cols) = (5, 11);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let w = random(&mut rng, rows * cols, 0.6);
        let keep: Vec<f32> = w.iter().map(|v| (*v != 0.0) as u8 as f32).collect();
        let l = SparseLayout::from_keep(&keep, rows, cols).unwrap();
        let packed = l.pack(&w).unwrap();
        assert_eq!(packed.len(), w.iter().filter(|v| **v != 0.0).count());
        assert_eq!(l.expand(&packed), w);
        // The transposed view through the permutation is Wᵀ.
        let t_vals: Vec<f32> = l.perm.iter().map(|&k| packed[k as usize]).collect();
        let wt = BitmaskView::new(cols, rows, &l.t_bitmask, &t_vals, &l.t_row_offsets).unwrap().to_dense();
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(wt[c * rows + r], w[r * cols + c]);
            }
        }
        // A non-zero at a pruned position is refused, not dropped.
        let mut bad = w.clone();
        let at = keep.iter().position(|k| *k == 0.0).unwrap();
        bad[at] = 1.0;
        assert!(l.pack(&bad).unwrap_err().to_string().contains("1 pruned entries are non-zero"));
    }

    /// The op's output and both gradients equal candle's dense product of the masked weight, in
    /// f32 (the kernels) and f64 (the loops), on prefill-sized and small token counts.
    #[test]
    fn sparse_linear_equals_the_dense_masked_product_and_its_gradients() {
        let d = Device::Cpu;
        for (n, rows, cols, s) in [(3usize, 7usize, 10usize, 0.5f64), (150, 70, 96, 0.7), (40, 33, 130, 0.3)] {
            let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
            let w = random(&mut rng, rows * cols, s);
            let x = random(&mut rng, n * cols, 0.0);
            let gy = random(&mut rng, n * rows, 0.0);
            let keep: Vec<f32> = w.iter().map(|v| (*v != 0.0) as u8 as f32).collect();
            let layout = Arc::new(SparseLayout::from_keep(&keep, rows, cols).unwrap());
            for dt in [DType::F32, DType::F64] {
                let xv = Var::from_tensor(&Tensor::from_vec(x.clone(), (n, cols), &d).unwrap().to_dtype(dt).unwrap())
                    .unwrap();
                let wd =
                    Var::from_tensor(&Tensor::from_vec(w.clone(), (rows, cols), &d).unwrap().to_dtype(dt).unwrap())
                        .unwrap();
                let ws = Var::from_tensor(&layout.pack_tensor(wd.as_tensor()).unwrap()).unwrap();
                let g = Tensor::from_vec(gy.clone(), (n, rows), &d).unwrap().to_dtype(dt).unwrap();
                let dense = xv.as_tensor().matmul(&wd.as_tensor().t().unwrap()).unwrap();
                let sparse = super::sparse(xv.as_tensor(), ws.as_tensor(), &layout).unwrap();
                let tol = if dt == DType::F32 { 1e-4 } else { 1e-12 };
                let close = |a: &Tensor, b: &Tensor, what: &str| {
                    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                    assert_eq!(a.len(), b.len(), "{what}");
                    for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                        assert!(
                            (p - q).abs() <= tol * (1.0 + q.abs()) * (n.max(cols) as f64).sqrt(),
                            "{what} {dt:?} [{i}]: {p} vs {q}"
                        );
                    }
                };
                close(&sparse, &dense, "y");
                let gd = (dense * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let gs = (sparse * &g).unwrap().sum_all().unwrap().backward().unwrap();
                close(gs.get(xv.as_tensor()).unwrap(), gd.get(xv.as_tensor()).unwrap(), "dx");
                // The dense weight gradient at the kept positions is the packed one.
                let dwd = layout
                    .pack_tensor(
                        &(gd.get(wd.as_tensor()).unwrap()
                            * Tensor::from_vec(keep.clone(), (rows, cols), &d).unwrap().to_dtype(dt).unwrap())
                        .unwrap(),
                    )
                    .unwrap();
                close(gs.get(ws.as_tensor()).unwrap(), &dwd, "dW");
            }
        }
    }

    /// The dense op and its gradients equal candle's matmul (f32, prefill-sized and small).
    #[test]
    fn dense_linear_equals_candles_matmul_and_its_gradients() {
        let d = Device::Cpu;
        for (n, rows, cols) in [(3usize, 7usize, 10usize), (150, 70, 96)] {
            let mut rng = ChaCha8Rng::seed_from_u64(7 + n as u64);
            let xv = Var::from_vec(random(&mut rng, n * cols, 0.0), (n, cols), &d).unwrap();
            let wv = Var::from_vec(random(&mut rng, rows * cols, 0.0), (rows, cols), &d).unwrap();
            let g = Tensor::from_vec(random(&mut rng, n * rows, 0.0), (n, rows), &d).unwrap();
            let want = xv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap();
            let got = super::dense(xv.as_tensor(), wv.as_tensor()).unwrap();
            let gw = (want * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = (got.clone() * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let cmp = |a: &Tensor, b: &Tensor, what: &str| {
                let (a, b) = (
                    a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert_eq!(a.len(), b.len());
                for (p, q) in a.iter().zip(&b) {
                    assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()) * (n as f32).sqrt(), "{what}: {p} vs {q}");
                }
            };
            cmp(&got, &xv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap(), "y");
            cmp(gg.get(xv.as_tensor()).unwrap(), gw.get(xv.as_tensor()).unwrap(), "dx");
            cmp(gg.get(wv.as_tensor()).unwrap(), gw.get(wv.as_tensor()).unwrap(), "dw");
        }
    }
}
