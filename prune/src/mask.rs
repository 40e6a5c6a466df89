//! Mask-selection rules shared by the algorithms, so every one of them counts the same way.

use std::cmp::Ordering;

/// `round(fraction · count)`, halves rounded up (`floor(x + 0.5)`, as the fixture script does).
pub(crate) fn target_count(fraction: f64, count: usize) -> usize {
    ((fraction * count as f64 + 0.5).floor() as usize).min(count)
}

/// Total order on (score, index): lower score first, ties to the lower index, so the selection is
/// deterministic and equal to a stable sort's.
fn by_score_then_index(a: &(f64, usize), b: &(f64, usize)) -> Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

/// The `k` smallest (score, index) pairs of `cands` (reordered in place), in no particular order.
pub(crate) fn smallest(cands: &mut [(f64, usize)], k: usize) -> &[(f64, usize)] {
    let k = k.min(cands.len());
    if k == 0 {
        return &[];
    }
    if k < cands.len() {
        cands.select_nth_unstable_by(k - 1, by_score_then_index);
    }
    &cands[..k]
}

/// Splits `extra` new prunes of one row over its blocks in proportion to each block's prunable
/// (not already forced) weights `avail`, rounding the cumulative share half up so that the
/// parts sum to exactly `extra` and none exceeds its block's `avail`. With nothing forced this is
/// "`round(s · block_width)` per block, carrying the rounding remainder".
pub(crate) fn split_quota(extra: usize, avail: &[usize], out: &mut Vec<usize>) {
    out.clear();
    let total: usize = avail.iter().sum();
    if total == 0 {
        out.resize(avail.len(), 0);
        return;
    }
    let extra = extra.min(total) as u128;
    let total = total as u128;
    let (mut cum, mut prev) = (0u128, 0u128);
    for &a in avail {
        cum += a as u128;
        let r = (2 * extra * cum + total) / (2 * total);
        out.push((r - prev) as usize);
        prev = r;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_sums_exactly_and_respects_availability() {
        let mut out = Vec::new();
        for extra in 0..=20 {
            let avail = [4, 0, 7, 3, 6];
            split_quota(extra, &avail, &mut out);
            assert_eq!(out.iter().sum::<usize>(), extra.min(20));
            for (o, a) in out.iter().zip(avail) {
                assert!(*o <= a, "{out:?} vs {avail:?}");
            }
        }
        // Unforced blocks of 128 columns at 50%: 64 per block.
        split_quota(288, &[128, 128, 128, 192], &mut out);
        assert_eq!(out, [64, 64, 64, 96]);
    }

    #[test]
    fn smallest_breaks_ties_by_index() {
        let mut c = vec![(1.0, 0), (0.5, 1), (1.0, 2), (0.5, 3), (2.0, 4)];
        let mut got: Vec<usize> = smallest(&mut c, 3).iter().map(|x| x.1).collect();
        got.sort();
        assert_eq!(got, [0, 1, 3]);
        assert!(smallest(&mut c, 0).is_empty());
        assert_eq!(smallest(&mut c, 9).len(), 5);
    }

    #[test]
    fn target_count_rounds_half_up() {
        assert_eq!(target_count(0.5, 7), 4);
        assert_eq!(target_count(0.7, 96), 67);
        assert_eq!(target_count(0.0, 10), 0);
    }
}
