//! OWL: outlier-weighted layerwise sparsity (Yin et al. 2023; reference `luuyin/OWL`,
//! `lib/prune_all.py`, `check_outlier_mean` and the `all_layer_ratio` adjustment).

use crate::{Error, Result};

/// A layer's outlier ratio `D`: the fraction of its Wanda scores `|W_ij|·‖X_j‖₂` greater than `m`
/// times the layer's mean score. A "layer" is whatever OWL assigns one sparsity to (in the
/// reference a decoder block, all of its linear layers' scores pooled), hence several slices.
/// The reference returns a percentage; only ratios between layers matter downstream.
pub fn outlier_ratio(scores: &[&[f32]], m: f64) -> Result<f64> {
    let count: usize = scores.iter().map(|s| s.len()).sum();
    if count == 0 {
        return Err(Error::Owl("a layer has no scores".into()));
    }
    let sum: f64 = scores.iter().flat_map(|s| s.iter()).map(|&x| x as f64).sum();
    if !sum.is_finite() {
        return Err(Error::Owl("a layer's scores are not finite".into()));
    }
    let thr = m * sum / count as f64;
    let above = scores.iter().flat_map(|s| s.iter()).filter(|&&x| x as f64 > thr).count();
    Ok(above as f64 / count as f64)
}

/// Per-layer sparsities from per-layer outlier ratios, as the reference's unstructured variant:
/// `r_l = (D_l − min D) / (max D − min D) · 2λ` (spread over a range of width 2λ), then the
/// density `1 − s_l = r_l − mean(r) + (1 − target)`, so the mean sparsity is exactly `target`
/// and more outliers mean a lower sparsity. If every layer has the same ratio, every layer gets
/// `target`. Fails if a sparsity would leave [0, 1).
pub fn owl_sparsities_from_ratios(ratios: &[f64], target: f64, lambda: f64) -> Result<Vec<f64>> {
    if ratios.is_empty() {
        return Err(Error::Owl("no layers".into()));
    }
    if !(0.0..1.0).contains(&target) {
        return Err(Error::Sparsity(target));
    }
    if !lambda.is_finite() || lambda < 0.0 {
        return Err(Error::Owl(format!("lambda {lambda} must be finite and >= 0")));
    }
    if let Some(i) = ratios.iter().position(|r| !r.is_finite()) {
        return Err(Error::Owl(format!("outlier ratio of layer {i} is not finite")));
    }
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max - min <= 0.0 {
        return Ok(vec![target; ratios.len()]);
    }
    let spread: Vec<f64> = ratios.iter().map(|&d| (d - min) / (max - min) * lambda * 2.0).collect();
    let mean = spread.iter().sum::<f64>() / spread.len() as f64;
    let out: Vec<f64> = spread.iter().map(|&r| target - (r - mean)).collect();
    if let Some((i, s)) = out.iter().enumerate().find(|(_, s)| !(0.0..1.0).contains(*s)) {
        return Err(Error::Owl(format!(
            "layer {i} would get sparsity {s:.4} outside [0, 1) (target {target}, lambda {lambda}); use a smaller lambda"
        )));
    }
    Ok(out)
}

/// [`outlier_ratio`] of each layer's pooled scores with threshold `m`, then
/// [`owl_sparsities_from_ratios`]. For large models compute the ratios layer by layer with
/// [`outlier_ratio`] instead of holding every layer's scores.
pub fn owl_sparsities(layer_scores: &[Vec<&[f32]>], target: f64, m: f64, lambda: f64) -> Result<Vec<f64>> {
    let ratios = layer_scores.iter().map(|s| outlier_ratio(s, m)).collect::<Result<Vec<_>>>()?;
    owl_sparsities_from_ratios(&ratios, target, lambda)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_counts_scores_above_m_times_mean() {
        // mean = (1·8 + 12 + 20) / 10 = 4; 5 × mean = 20: only scores > 20 count (none), 2×: 12, 20.
        let a = [1.0f32; 8];
        let b = [12.0f32, 20.0];
        assert_eq!(outlier_ratio(&[&a, &b], 5.0).unwrap(), 0.0);
        assert_eq!(outlier_ratio(&[&a, &b], 2.0).unwrap(), 0.2);
        assert!(outlier_ratio(&[], 5.0).is_err());
    }

    #[test]
    fn mean_is_preserved_and_outliers_lower_sparsity() {
        let ratios = [0.01, 0.05, 0.02, 0.08, 0.03, 0.011];
        let s = owl_sparsities_from_ratios(&ratios, 0.7, 0.08).unwrap();
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        assert!((mean - 0.7).abs() < 1e-12, "mean {mean}");
        let max = s.iter().copied().fold(f64::MIN, f64::max);
        let min = s.iter().copied().fold(f64::MAX, f64::min);
        assert!((max - min - 0.16).abs() < 1e-12, "range {}", max - min);
        for i in 0..ratios.len() {
            for j in 0..ratios.len() {
                if ratios[i] > ratios[j] {
                    assert!(s[i] < s[j], "layer {i} has more outliers but sparsity {} >= {}", s[i], s[j]);
                }
            }
        }
        // Hand check: spread = (D − 0.01)/0.07 · 0.16.
        let spread: Vec<f64> = ratios.iter().map(|d| (d - 0.01) / 0.07 * 0.16).collect();
        let m = spread.iter().sum::<f64>() / 6.0;
        assert!((s[3] - (0.7 - (0.16 - m))).abs() < 1e-12);
    }

    #[test]
    fn degenerate_and_invalid_inputs() {
        assert_eq!(owl_sparsities_from_ratios(&[0.1, 0.1], 0.5, 0.1).unwrap(), [0.5, 0.5]);
        assert!(owl_sparsities_from_ratios(&[0.0, 1.0], 0.95, 0.2).is_err());
        assert!(owl_sparsities_from_ratios(&[0.0, 1.0], 1.0, 0.0).is_err());
        assert!(owl_sparsities_from_ratios(&[0.0, 1.0], 0.5, -0.1).is_err());
        assert!(owl_sparsities_from_ratios(&[], 0.5, 0.1).is_err());
        let a = [1.0f32, 1.0, 1.0, 9.0];
        let b = [1.0f32, 1.0, 1.0, 1.0];
        let s = owl_sparsities(&[vec![&a[..]], vec![&b[..]]], 0.5, 1.5, 0.05).unwrap();
        assert!(s[0] < s[1] && ((s[0] + s[1]) / 2.0 - 0.5).abs() < 1e-12);
    }
}
