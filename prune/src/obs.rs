//! The Optimal Brain Surgeon column engine shared by SparseGPT and GPTQ: one Hessian
//! factorisation (with dampening escalation) and one pass over the columns in blocks, with the
//! OBS update inside a block after each column and a lazy batch update of the later columns after
//! each block. What a weight becomes when its column is reached is the [`ObsRule`]'s choice:
//! SparseGPT's rule prunes (a mask chosen as the pass goes), GPTQ's quantizes.

use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, MatRef, Par, Side};

use crate::config::MIN_ESCALATED_DAMP;
use crate::{Error, Result};

/// What happens to each column when the pass reaches it.
pub(crate) trait ObsRule {
    /// Called when the pass reaches columns `i1..i2` (block `b`), before any of them is processed.
    /// `wm` holds the weights as the earlier blocks' updates left them; `l` is the lower Cholesky
    /// factor of `H⁻¹` (`U = Lᵀ`).
    fn begin_block(&mut self, b: usize, i1: usize, i2: usize, wm: MatRef<'_, f64>, l: MatRef<'_, f64>);

    /// Writes into `q` (one value per row) what column `i1 + i` becomes; `wm` is the current state.
    fn column(&mut self, i1: usize, i: usize, wm: MatRef<'_, f64>, l: MatRef<'_, f64>, q: &mut [f64]);

    /// The weights that receive error compensation, column-major `rows × cols` (`true` = updated);
    /// `None` updates every weight. GPTQ on a sparse layer leaves its zeros out, so they stay
    /// exactly zero (llm-compressor's `preserve_zeros`).
    fn compensated(&self) -> Option<&[bool]> {
        None
    }
}

/// `L` lower with `(H + damp·I)⁻¹ = L Lᵀ` (so `U = Lᵀ`), dampening `percdamp · mean(diag H)`
/// escalated ×10 (with a warning) while the factorisation fails, at most `max_escalations` times.
/// Returns `L` and the dampening fraction used.
pub(crate) fn factor_inverse(
    h_lower: &Mat<f64>,
    percdamp: f64,
    max_escalations: u32,
    algorithm: &'static str,
) -> Result<(Mat<f64>, f64)> {
    let n = h_lower.nrows();
    let mean_diag = (0..n).map(|j| h_lower[(j, j)]).sum::<f64>() / n as f64;
    let mut percdamp = percdamp;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let mut hd = h_lower.clone();
        let damp = percdamp * mean_diag;
        for j in 0..n {
            hd[(j, j)] += damp;
        }
        let factored = hd.llt(Side::Lower).ok().and_then(|llt| {
            let inv = llt.inverse();
            let l = inv.llt(Side::Lower).ok()?.L().to_owned();
            // A factorisation that "succeeds" on rounding noise shows up as non-finite entries.
            let finite = (0..n).all(|j| l.col_as_slice(j).iter().all(|x| x.is_finite()));
            finite.then_some(l)
        });
        if let Some(l) = factored {
            return Ok((l, percdamp));
        }
        if attempts > max_escalations {
            return Err(Error::Cholesky { percdamp, attempts });
        }
        let next = if percdamp == 0.0 { MIN_ESCALATED_DAMP } else { percdamp * 10.0 };
        tracing::warn!(
            failed_percdamp = percdamp,
            next_percdamp = next,
            "{algorithm}: Cholesky of the dampened Hessian failed; retrying with more dampening"
        );
        percdamp = next;
    }
}

/// Runs the column pass over `wm` (column-major `rows × cols`, f64) with `U = Lᵀ`, blocks of
/// `bs` columns. Returns `Σ ((w − q) / U_cc)²` (the reference code's `Losses`, not halved).
pub(crate) fn obs_pass(wm: &mut Mat<f64>, l: &Mat<f64>, bs: usize, rule: &mut dyn ObsRule) -> f64 {
    let (rows, cols) = (wm.nrows(), wm.ncols());
    let nblocks = cols.div_ceil(bs);
    let mut obs_loss = 0.0f64;
    let mut err = Mat::<f64>::zeros(rows, bs);
    let mut q = vec![0.0f64; rows];
    // Masked lazy updates go through a buffer (the product, then a masked subtraction).
    let mut delta = Mat::<f64>::zeros(0, 0);
    for b in 0..nblocks {
        let i1 = b * bs;
        let i2 = (i1 + bs).min(cols);
        let count = i2 - i1;
        rule.begin_block(b, i1, i2, wm.as_ref(), l.as_ref());
        for i in 0..count {
            let c = i1 + i;
            rule.column(i1, i, wm.as_ref(), l.as_ref(), &mut q);
            let d = l[(c, c)];
            {
                let wcol = wm.col_as_slice_mut(c);
                let ecol = err.col_as_slice_mut(i);
                for r in 0..rows {
                    let v = wcol[r];
                    let e = (v - q[r]) / d;
                    obs_loss += e * e;
                    ecol[r] = e;
                    wcol[r] = q[r];
                }
            }
            // OBS update of the rest of the block: W[:, j] -= err · U[c, j], U[c, j] = L[j, c].
            let keep = rule.compensated();
            for j in c + 1..i2 {
                let u = l[(j, c)];
                if u == 0.0 {
                    continue;
                }
                let (ecols, wcols) = (err.col_as_slice(i), wm.col_as_slice_mut(j));
                match keep {
                    None => {
                        for (wv, e) in wcols.iter_mut().zip(ecols) {
                            *wv -= e * u;
                        }
                    }
                    Some(k) => {
                        for ((wv, e), &kept) in wcols.iter_mut().zip(ecols).zip(&k[j * rows..(j + 1) * rows]) {
                            if kept {
                                *wv -= e * u;
                            }
                        }
                    }
                }
            }
        }
        // Lazy batch update of all later columns: W[:, i2:] -= Err · U[i1:i2, i2:].
        if i2 < cols {
            let rest = cols - i2;
            let e = err.as_ref().submatrix(0, 0, rows, count);
            let u = l.as_ref().submatrix(i2, i1, rest, count).transpose();
            match rule.compensated() {
                None => faer::linalg::matmul::matmul(
                    wm.as_mut().submatrix_mut(0, i2, rows, rest),
                    Accum::Add,
                    e,
                    u,
                    -1.0,
                    Par::rayon(0),
                ),
                Some(k) => {
                    if delta.nrows() != rows || delta.ncols() < rest {
                        delta = Mat::zeros(rows, rest);
                    }
                    let dv = delta.as_mut().submatrix_mut(0, 0, rows, rest);
                    faer::linalg::matmul::matmul(dv, Accum::Replace, e, u, 1.0, Par::rayon(0));
                    for j in 0..rest {
                        let kcol = &k[(i2 + j) * rows..(i2 + j + 1) * rows];
                        let dcol = delta.col_as_slice(j);
                        let wcol = wm.col_as_slice_mut(i2 + j);
                        for r in 0..rows {
                            if kcol[r] {
                                wcol[r] -= dcol[r];
                            }
                        }
                    }
                }
            }
        }
    }
    obs_loss
}
