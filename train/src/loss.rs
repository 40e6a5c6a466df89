//! Training losses: causal-LM cross-entropy with per-token weights, SquareHead, logit KL.

use candle_core::{D, DType, Tensor};

use crate::llama::{log_softmax_last, softmax_last};
use crate::{Error, Result};

/// Weighted mean negative log-likelihood: `Σₙ wₙ · −log p(targetₙ) / Σₙ wₙ` for `logits`
/// `[n, vocab]`, `targets` `[n]` (u32) and `weights` `[n]` (f32; 0 leaves a token out, e.g. a
/// prompt or padding token).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let denom = scalar(&weights.sum_all()?)?;
    if denom <= 0.0 {
        return Err(Error::Recipe("a batch has no token to compute the loss on".into()));
    }
    let logp = log_softmax_last(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok(((picked * weights.to_dtype(logits.dtype())?)?.sum_all()?.neg()? / denom)?)
}

/// SquareHead (Kurtic et al. 2023), summed over decoder blocks:
///
/// `L = Σ_l  Σₙ wₙ ‖h_t,l,n − h_s,l,n‖² / Σₙ wₙ ‖h_t,l,n‖²`
///
/// with `h` the block outputs `[n, hidden]` and `wₙ` the token weights `[n]` (1 for real tokens,
/// 0 for padding). Each block's term is its mean squared error normalised by the teacher's mean
/// square (the `1 / (n·hidden)` of both means cancels), so every block counts equally whatever
/// the scale of its residual stream.
pub fn squarehead(student: &[Tensor], teacher: &[Tensor], weights: &Tensor) -> Result<Tensor> {
    if student.len() != teacher.len() || student.is_empty() {
        return Err(Error::Recipe(format!(
            "SquareHead needs as many teacher blocks as student blocks (student {}, teacher {})",
            student.len(),
            teacher.len()
        )));
    }
    let w = weights.unsqueeze(1)?.to_dtype(student[0].dtype())?;
    let mut total: Option<Tensor> = None;
    for (s, t) in student.iter().zip(teacher) {
        let t = t.detach();
        let num = (s - &t)?.sqr()?.broadcast_mul(&w)?.sum_all()?;
        let den = scalar(&t.sqr()?.broadcast_mul(&w)?.sum_all()?)?;
        if den <= 0.0 {
            return Err(Error::Recipe("SquareHead: a teacher block output is all zero".into()));
        }
        let term = (num / den)?;
        total = Some(match total {
            None => term,
            Some(acc) => (acc + term)?,
        });
    }
    total.ok_or_else(|| Error::Recipe("SquareHead: no block".into()))
}

/// `T² · Σₙ wₙ KL(softmax(z_t/T) ‖ softmax(z_s/T)) / Σₙ wₙ` over tokens.
pub fn kl_div(student_logits: &Tensor, teacher_logits: &Tensor, weights: &Tensor, temperature: f64) -> Result<Tensor> {
    let denom = scalar(&weights.sum_all()?)?;
    if denom <= 0.0 {
        return Err(Error::Recipe("a batch has no token to compute the KL on".into()));
    }
    let zt = (teacher_logits.detach() / temperature)?;
    let pt = softmax_last(&zt)?;
    let lpt = log_softmax_last(&zt)?;
    let lps = log_softmax_last(&(student_logits / temperature)?)?;
    let kl = (pt * (lpt - lps)?)?.sum(D::Minus1)?;
    Ok(((kl * weights.to_dtype(student_logits.dtype())?)?.sum_all()? * (temperature * temperature / denom))?)
}

/// A scalar tensor of any float type as f64.
pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn squarehead_matches_a_hand_computed_value() {
        let d = Device::Cpu;
        // Two blocks, three tokens (the last is padding), hidden 2.
        let s1 = Tensor::new(&[[1f32, 2.], [0., 1.], [9., 9.]], &d).unwrap();
        let t1 = Tensor::new(&[[1f32, 1.], [2., 0.], [0., 0.]], &d).unwrap();
        let s2 = Tensor::new(&[[3f32, 0.], [0., 0.], [5., 5.]], &d).unwrap();
        let t2 = Tensor::new(&[[1f32, 0.], [0., 2.], [1., 1.]], &d).unwrap();
        let w = Tensor::new(&[1f32, 1., 0.], &d).unwrap();
        // Block 1: ((0² + 1²) + (2² + 1²)) / ((1 + 1) + (4 + 0)) = 6 / 6 = 1.
        // Block 2: ((2² + 0²) + (0² + 2²)) / ((1 + 0) + (0 + 4)) = 8 / 5 = 1.6.
        let l = squarehead(&[s1, s2], &[t1, t2], &w).unwrap().to_scalar::<f32>().unwrap();
        assert!((l - 2.6).abs() < 1e-6, "{l}");
    }

    #[test]
    fn cross_entropy_matches_a_hand_computed_value() {
        let d = Device::Cpu;
        let logits = Tensor::new(&[[0f32, 0.], [2f32.ln(), 0.]], &d).unwrap();
        let targets = Tensor::new(&[1u32, 0], &d).unwrap();
        let w = Tensor::new(&[1f32, 1.], &d).unwrap();
        // Token 1: −log ½; token 2: −log ⅔.
        let want = (-(0.5f64.ln()) - (2.0f64 / 3.0).ln()) / 2.0;
        let l = cross_entropy(&logits, &targets, &w).unwrap().to_scalar::<f32>().unwrap();
        assert!((l as f64 - want).abs() < 1e-6, "{l} vs {want}");
        let only_second = Tensor::new(&[0f32, 1.], &d).unwrap();
        let l = cross_entropy(&logits, &targets, &only_second).unwrap().to_scalar::<f32>().unwrap();
        assert!((l as f64 + (2.0f64 / 3.0).ln()).abs() < 1e-6);
    }

    #[test]
    fn kl_is_zero_for_equal_logits_and_matches_by_hand() {
        let d = Device::Cpu;
        let z = Tensor::new(&[[1f32, 2., 3.]], &d).unwrap();
        let w = Tensor::new(&[1f32], &d).unwrap();
        assert!(kl_div(&z, &z, &w, 2.0).unwrap().to_scalar::<f32>().unwrap().abs() < 1e-6);
        let zs = Tensor::new(&[[0f32, 0.]], &d).unwrap();
        let zt = Tensor::new(&[[3f32.ln(), 0.]], &d).unwrap();
        // T = 1: KL((¾, ¼) ‖ (½, ½)) = ¾ ln(3/2) + ¼ ln(1/2).
        let want = 0.75 * 1.5f64.ln() + 0.25 * 0.5f64.ln();
        let got = kl_div(&zs, &zt, &w, 1.0).unwrap().to_scalar::<f32>().unwrap();
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
    }
}
