//! Score-only pruning (no weight update): Wanda and magnitude.

use std::time::Instant;

use crate::config::{Pattern, PruneConfig, PruneReport};
use crate::mask::{smallest, target_count};
use crate::{Error, Result, check_finite_f64, check_layer};

/// Wanda (Sun et al. 2023): zeroes, within each output row, the weights with the lowest
/// `|W_ij| · ‖X_j‖₂`; `col_sq_norms` are `‖X_j‖²` (e.g. [`crate::Hessian::col_sq_norms`], any
/// positive common scale). Each row loses exactly `round(s · cols)` weights (the reference
/// truncates, `int(cols · s)`; they agree whenever `s · cols` is whole), ties going to the lower
/// column. N:M prunes the `n` lowest of every group of `m`.
pub fn wanda(w: &mut [f32], rows: usize, cols: usize, col_sq_norms: &[f64], cfg: &PruneConfig) -> Result<PruneReport> {
    let start = Instant::now();
    check_layer(w, rows, cols)?;
    cfg.pattern.validate(cols)?;
    if col_sq_norms.len() != cols {
        return Err(Error::Shape { what: "input squared norms", expected: cols, got: col_sq_norms.len() });
    }
    check_finite_f64("input squared norms", col_sq_norms)?;
    let scale: Vec<f64> = col_sq_norms.iter().map(|&n| n.max(0.0).sqrt()).collect();
    let mut cands = Vec::with_capacity(cols);
    for row in w.chunks_exact_mut(cols) {
        let score = |j: usize, v: f32| (v as f64).abs() * scale[j];
        prune_row(row, cfg, &mut cands, score);
    }
    Ok(PruneReport::new(w, start.elapsed().as_secs_f64()))
}

/// Magnitude pruning: unstructured zeroes exactly `round(s · rows · cols)` weights of the
/// smallest `|W|` over the whole layer (ties to the lower flat index); N:M works per row group.
pub fn magnitude(w: &mut [f32], rows: usize, cols: usize, cfg: &PruneConfig) -> Result<PruneReport> {
    let start = Instant::now();
    check_layer(w, rows, cols)?;
    cfg.pattern.validate(cols)?;
    match cfg.pattern {
        Pattern::Unstructured(s) => magnitude_layer(w, s, cfg.keep_zeros),
        Pattern::NM { .. } => {
            let mut cands = Vec::with_capacity(cols);
            for row in w.chunks_exact_mut(cols) {
                prune_row(row, cfg, &mut cands, |_, v| (v as f64).abs());
            }
        }
    }
    Ok(PruneReport::new(w, start.elapsed().as_secs_f64()))
}

/// Layer-wide magnitude threshold without a per-weight index array (large layers): find the
/// k-th smallest |w| among the prunable weights, zero everything below it, then the ties in
/// index order until exactly k are gone.
fn magnitude_layer(w: &mut [f32], s: f64, keep_zeros: bool) {
    let target = target_count(s, w.len());
    let prunable = |v: f32| !(keep_zeros && v == 0.0);
    let forced = w.len() - w.iter().filter(|&&v| prunable(v)).count();
    let k = target.saturating_sub(forced);
    if k == 0 {
        return;
    }
    let mut mags: Vec<f32> = w.iter().filter(|&&v| prunable(v)).map(|v| v.abs()).collect();
    let (_, &mut thr, _) = mags.select_nth_unstable_by(k - 1, f32::total_cmp);
    drop(mags);
    let below = w.iter().filter(|&&v| prunable(v) && v.abs() < thr).count();
    let mut ties = k - below;
    for v in w.iter_mut() {
        if !prunable(*v) {
            continue;
        }
        let a = v.abs();
        if a < thr {
            *v = 0.0;
        } else if a == thr && ties > 0 {
            *v = 0.0;
            ties -= 1;
        }
    }
}

/// Prunes one row by `score` (lower = pruned first) under `cfg`: exact per-row count for
/// unstructured, per group for N:M; in iterative mode existing zeros count first.
fn prune_row(row: &mut [f32], cfg: &PruneConfig, cands: &mut Vec<(f64, usize)>, score: impl Fn(usize, f32) -> f64) {
    let forced = |v: f32| cfg.keep_zeros && v == 0.0;
    let mut prune_span = |span: &mut [f32], offset: usize, count: usize| {
        let already = span.iter().filter(|&&v| forced(v)).count();
        let k = count.saturating_sub(already);
        cands.clear();
        cands.extend(span.iter().enumerate().filter(|(_, v)| !forced(**v)).map(|(j, &v)| (score(offset + j, v), j)));
        for &(_, j) in smallest(cands, k) {
            span[j] = 0.0;
        }
    };
    match cfg.pattern {
        Pattern::Unstructured(s) => {
            let count = target_count(s, row.len());
            prune_span(row, 0, count);
        }
        Pattern::NM { n, m } => {
            for (g, group) in row.chunks_exact_mut(m).enumerate() {
                prune_span(group, g * m, n);
            }
        }
    }
}
