//! Next-token selection: greedy, or temperature / top-k / top-p sampling from a seeded RNG so that
//! a given seed reproduces a generation exactly.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 disables).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 disables).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!("temperature must be ≥ 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// Index of the largest value; ties go to the lowest index (as numpy's argmax).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 || logits.len() <= 1 {
            return argmax(logits) as u32;
        }
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.select_nth_unstable_by(p.top_k - 1, by_logit);
            idx.truncate(p.top_k);
        }
        idx.sort_unstable_by(by_logit);
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f64> =
            idx.iter().map(|&i| (((logits[i as usize] - max) / p.temperature) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, x) in probs.iter().enumerate() {
                cum += x;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (i, x) in probs.iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                return idx[i];
            }
        }
        idx[probs.len() - 1]
    }
}

/// OpenAI's presence and frequency penalties: every token generated so far has its logit lowered by
/// `presence` once and by `frequency` per occurrence (`counts` maps a token to its occurrences).
/// Both lie in [-2, 2]; negative values encourage repetition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Penalties {
    pub presence: f32,
    pub frequency: f32,
}

impl Penalties {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("presence_penalty", self.presence), ("frequency_penalty", self.frequency)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::Invalid(format!("{name} must be in [-2, 2], got {v}")));
            }
        }
        Ok(())
    }

    pub fn is_off(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0
    }

    /// Applies the penalties to `logits` in place; ids outside `logits` are ignored.
    pub fn apply(&self, logits: &mut [f32], counts: &std::collections::HashMap<u32, u32>) {
        if self.is_off() {
            return;
        }
        for (&id, &n) in counts {
            if let Some(l) = logits.get_mut(id as usize)
                && n > 0
            {
                *l -= self.presence + self.frequency * n as f32;
            }
        }
    }
}

/// The log-probability of `chosen` under `logits` and the `top` most likely tokens with theirs
/// (most likely first, ties to the lower id), from one log-softmax in f64.
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let chosen_lp = if (chosen as usize) < logits.len() { lp(chosen as usize) } else { f32::NEG_INFINITY };
    let top = top.min(logits.len());
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if top > 0 && top < idx.len() {
        idx.select_nth_unstable_by(top - 1, by_logit);
    }
    idx.truncate(top);
    idx.sort_unstable_by(by_logit);
    (chosen_lp, idx.into_iter().map(|i| (i, lp(i as usize))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_and_ties_go_low() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect();
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() }).unwrap();
        assert_eq!(s.sample(&logits) as usize, argmax(&logits));
        let p = SamplingParams { temperature: 0.8, top_p: 0.9, top_k: 50, seed: 42 };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone()).unwrap();
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p).unwrap();
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // Token 0 has ~99.99% of the mass: top_p 0.5 must always pick it.
        let mut logits = vec![0f32; 10];
        logits[0] = 20.0;
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, top_k: 0, seed: 1 }).unwrap();
        assert!((0..200).all(|_| s.sample(&logits) == 0));
        // With the nucleus at 1.0 and flat logits every token shows up eventually.
        let flat = vec![0f32; 4];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 1 }).unwrap();
        let mut seen = [false; 4];
        (0..400).for_each(|_| seen[s.sample(&flat) as usize] = true);
        assert!(seen.iter().all(|x| *x));
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
    }

    #[test]
    fn penalties_lower_seen_tokens_by_presence_and_count() {
        let mut logits = vec![1.0f32, 1.0, 1.0];
        let counts = std::collections::HashMap::from([(0u32, 3u32), (2, 1), (9, 4)]);
        Penalties { presence: 0.5, frequency: 0.25 }.apply(&mut logits, &counts);
        assert_eq!(logits, vec![1.0 - 0.5 - 0.75, 1.0, 1.0 - 0.5 - 0.25]);
        assert!(Penalties { presence: 2.5, frequency: 0.0 }.validate().is_err());
        assert!(Penalties { presence: -2.0, frequency: 2.0 }.validate().is_ok());
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_sorted_top() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let (lp, top) = logprobs(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        assert!((lp as f64 - (1.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f64 = logits.iter().enumerate().map(|(i, _)| (logprobs(&logits, i as u32, 0).0 as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
