//! SparseGPT (Frantar & Alistarh 2023, Algorithm 1; reference `sparsegpt.py`, `fasterprune`).

use std::time::Instant;

use faer::{Mat, MatRef};

use crate::config::{MaskScope, Pattern, PruneReport, SparseGptConfig};
use crate::hessian::{Hessian, reconstruction_error};
use crate::mask::{smallest, split_quota, target_count};
use crate::obs::{ObsRule, factor_inverse, obs_pass};
use crate::{Error, Result, check_layer};

/// Prunes `w` (row-major `[rows, cols]`) in place with SparseGPT, using the layer's input
/// Hessian `h`.
///
/// As published: inputs never seen non-zero ("dead", `H_jj == 0`) get `H_jj = 1` and their
/// weights zeroed; `percdamp · mean(diag H)` is added to the diagonal (escalated ×10 with a
/// warning while the Cholesky factorisation fails, at most `max_damp_escalations` times);
/// `U = chol(H⁻¹)ᵀ` (upper); columns are processed in blocks of `blocksize` with the OBS update
/// of the rest of the block after each column and a lazy update of the later columns after
/// each block. All of it runs in f64.
///
/// Unstructured mask selection is adaptive, as published: each block's mask is chosen when the
/// pass reaches the block, from the weights as the previous blocks' OBS updates left them, by
/// the saliency `w² / U_cc²`. [`MaskScope`] says over which weights the saliencies are ranked:
///
/// * [`MaskScope::Block`] (default; the reference `fasterprune` and llm-compressor): over the
///   whole `rows × width` block at once. The block prunes its share of the layer's target,
///   `round(s · rows · i₂) − round(s · rows · i₁)` for columns `i₁..i₂` (cumulative rounding, so
///   the layer gets exactly `round(s · rows · cols)` when nothing is forced), the weights with the
///   lowest saliencies; ties go to the lower row-major position within the block. Rows end up
///   with different sparsities: the rows whose weights matter keep more of them. The reference
///   takes `thresh = sort(scores)[floor(s · n)]` and prunes every score `≤ thresh`, i.e. one
///   weight more per block plus any ties; here the count is exact.
/// * [`MaskScope::Row`]: each row chooses within each block its own smallest scores, the row's
///   `round(s · cols)` prunes being split over the blocks in proportion to the block widths
///   (cumulative rounding, so the remainders carry): every row has exactly the requested
///   sparsity, which row-balanced formats and per-row load balancing want, at some accuracy
///   cost at high sparsity.
///
/// N:M chooses the `n` smallest scores of each group of `m` of a row when the OBS pass reaches
/// the group, as the reference, whatever the scope.
///
/// Forced zeros — dead inputs, and in iterative mode (`keep_zeros`) every weight that is zero on
/// entry — are pruned again (the mask only grows) and count towards the target first. With the
/// block scope they count towards their own block's share, as in llm-compressor with
/// `preserve_sparsity_mask` (whose existing zeros score 0 and so fall under the threshold first):
/// a block already at or above its share prunes nothing new, and its surplus is not moved to
/// other blocks. With the row scope the row's remaining prunes are split over the blocks in
/// proportion to each block's still-prunable weights. Unlike llm-compressor, the lazy update
/// still reaches forced weights of later blocks; they are zeroed again when their column comes
/// and the change is compensated by the OBS update, as for any other pruned weight.
pub fn sparsegpt(w: &mut [f32], rows: usize, cols: usize, h: &Hessian, cfg: &SparseGptConfig) -> Result<PruneReport> {
    let start = Instant::now();
    check_layer(w, rows, cols)?;
    cfg.validate(cols)?;
    if h.cols() != cols {
        return Err(Error::HessianCols { hessian: h.cols(), layer: cols });
    }
    if h.tokens() == 0 {
        return Err(Error::EmptyHessian);
    }
    let original = cfg.compute_error.then(|| w.to_vec());

    // Lower triangle of H, dead inputs patched.
    let mut hm = h.lower().to_owned();
    let mut forced = vec![false; rows * cols]; // row-major
    for j in 0..cols {
        if hm[(j, j)] == 0.0 {
            hm[(j, j)] = 1.0;
            for r in 0..rows {
                forced[r * cols + j] = true;
                w[r * cols + j] = 0.0;
            }
        }
    }
    if cfg.keep_zeros {
        for (f, &v) in forced.iter_mut().zip(w.iter()) {
            *f |= v == 0.0;
        }
    }
    let (l, damp_used) = factor_inverse(&hm, cfg.percdamp, cfg.max_damp_escalations, "SparseGPT")?;
    drop(hm);

    // Working copy, column-major so that a column (one input across all rows) is contiguous.
    let mut wm = Mat::from_fn(rows, cols, |r, c| w[r * cols + c] as f64);
    let bs = cfg.blocksize;
    let nblocks = cols.div_ceil(bs);

    // Row scope: each row's new prunes per block.
    let mut quota = Vec::new();
    if let (Pattern::Unstructured(s), MaskScope::Row) = (cfg.pattern, cfg.mask_scope) {
        quota = vec![0usize; rows * nblocks];
        let target = target_count(s, cols);
        let mut avail = vec![0usize; nblocks];
        let mut split = Vec::with_capacity(nblocks);
        for r in 0..rows {
            let frow = &forced[r * cols..(r + 1) * cols];
            for (b, a) in avail.iter_mut().enumerate() {
                let span = &frow[b * bs..((b + 1) * bs).min(cols)];
                *a = span.iter().filter(|&&f| !f).count();
            }
            let already = cols - avail.iter().sum::<usize>();
            split_quota(target.saturating_sub(already), &avail, &mut split);
            quota[r * nblocks..(r + 1) * nblocks].copy_from_slice(&split);
        }
    }

    let mut rule = MaskRule {
        cfg,
        rows,
        cols,
        nblocks,
        forced,
        quota,
        mask: vec![false; rows * bs],
        cands: Vec::with_capacity(rows * bs),
    };
    let obs_loss = obs_pass(&mut wm, &l, bs, &mut rule);

    for r in 0..rows {
        for c in 0..cols {
            w[r * cols + c] = wm[(r, c)] as f32;
        }
    }
    let mut report = PruneReport::new(w, 0.0);
    report.damp_used = Some(damp_used);
    report.obs_loss = Some(obs_loss / 2.0);
    if let Some(orig) = original {
        report.recon_error = Some(reconstruction_error(&orig, w, rows, cols, h)?);
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// SparseGPT's rule on the OBS engine: each block's mask is chosen when the pass reaches the
/// block (unstructured) or each group of `m` columns (N:M); a masked weight becomes 0, a kept
/// one stays as the updates left it.
struct MaskRule<'a> {
    cfg: &'a SparseGptConfig,
    rows: usize,
    cols: usize,
    nblocks: usize,
    /// Row-major: weights that must end at zero whatever the scores.
    forced: Vec<bool>,
    /// Row scope: each row's new prunes per block, row-major `rows × nblocks`.
    quota: Vec<usize>,
    /// The current block's mask, column-major `rows × blocksize`.
    mask: Vec<bool>,
    cands: Vec<(f64, usize)>,
}

impl ObsRule for MaskRule<'_> {
    fn begin_block(&mut self, b: usize, i1: usize, i2: usize, wm: MatRef<'_, f64>, l: MatRef<'_, f64>) {
        let (rows, cols, count) = (self.rows, self.cols, i2 - i1);
        let (mask, cands) = (&mut self.mask, &mut self.cands);
        mask.iter_mut().for_each(|m| *m = false);
        for i in 0..count {
            for r in 0..rows {
                mask[i * rows + r] = self.forced[r * cols + i1 + i];
            }
        }
        if let Pattern::Unstructured(s) = self.cfg.pattern {
            let score = |r: usize, i: usize| {
                let d = l[(i1 + i, i1 + i)];
                let v = wm[(r, i1 + i)];
                v * v / (d * d)
            };
            match self.cfg.mask_scope {
                MaskScope::Block => {
                    // This block's share of the layer target, forced zeros first.
                    let share = target_count(s, rows * i2) - target_count(s, rows * i1);
                    let already = mask[..count * rows].iter().filter(|&&m| m).count();
                    cands.clear();
                    for i in 0..count {
                        for r in 0..rows {
                            if !mask[i * rows + r] {
                                cands.push((score(r, i), r * count + i));
                            }
                        }
                    }
                    for &(_, p) in smallest(cands, share.saturating_sub(already)) {
                        mask[(p % count) * rows + p / count] = true;
                    }
                }
                MaskScope::Row => {
                    for r in 0..rows {
                        cands.clear();
                        for i in 0..count {
                            if !mask[i * rows + r] {
                                cands.push((score(r, i), i));
                            }
                        }
                        for &(_, i) in smallest(cands, self.quota[r * self.nblocks + b]) {
                            mask[i * rows + r] = true;
                        }
                    }
                }
            }
        }
    }

    fn column(&mut self, i1: usize, i: usize, wm: MatRef<'_, f64>, l: MatRef<'_, f64>, q: &mut [f64]) {
        let rows = self.rows;
        let (mask, cands) = (&mut self.mask, &mut self.cands);
        if let Pattern::NM { n, m } = self.cfg.pattern
            && i.is_multiple_of(m)
        {
            for r in 0..rows {
                let already = (i..i + m).filter(|&k| mask[k * rows + r]).count();
                cands.clear();
                for k in i..i + m {
                    if !mask[k * rows + r] {
                        let d = l[(i1 + k, i1 + k)];
                        let v = wm[(r, i1 + k)];
                        cands.push((v * v / (d * d), k));
                    }
                }
                for &(_, k) in smallest(cands, n.saturating_sub(already)) {
                    mask[k * rows + r] = true;
                }
            }
        }
        for (r, qr) in q.iter_mut().enumerate() {
            *qr = if mask[i * rows + r] { 0.0 } else { wm[(r, i1 + i)] };
        }
    }
}
