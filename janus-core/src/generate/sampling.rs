//! Token selection from logits: greedy, or temperature sampling with optional top-k / top-p,
//! from a seeded random stream per sequence so that results reproduce run to run.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 takes the argmax (deterministic).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens, and those tied with the k-th (None or `Some(0)`:
    /// all, as transformers' `top_k=0` and the C API's 0).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (ties with the
    /// last one kept too; None: all).
    pub top_p: Option<f32>,
}

impl Sampling {
    /// Argmax decoding.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };

    /// Checks the values (finite temperature ≥ 0, 0 < p ≤ 1).
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::InvalidInput(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(Error::InvalidInput(format!(
                "top_p must be in (0, 1], got {p}"
            )));
        }
        Ok(())
    }

    /// Whether this picks the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether a draw keeps only some tokens (top-k or top-p).
    pub fn truncates(&self) -> bool {
        self.top_k.is_some_and(|k| k > 0) || self.top_p.is_some()
    }
}

/// The random stream of one generated sequence: sequence `index` of a call seeded with `seed`
/// draws the same numbers whatever else the call generates.
pub fn stream(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Checks that every logit of a row is finite: sampling from a NaN or infinite logit would pick
/// a token the model did not choose.
///
/// # Errors
/// [`Error::NonFiniteLogits`] with `step`.
pub fn check_finite(logits: &[f32], step: usize) -> Result<()> {
    if logits.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(Error::NonFiniteLogits { step })
    }
}

/// Index of the largest value (the first one on ties); NaN counts as smallest.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best
}

/// A uniform draw in [0, 1) with 53 random bits: the one number a sampled token takes from its
/// sequence's stream.
pub(crate) fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Picks a token from `logits` (one row): the argmax, or the token where a [`uniform`] draw
/// falls in the cumulative distribution of `softmax(logits / temperature)` over the kept
/// tokens, taken in id order (as a GPU computes it, [`device`](super::device), so that a seed
/// draws the same tokens there).
///
/// The kept tokens, as transformers' logits warpers choose them: top-k keeps every token whose
/// logit reaches the k-th largest (ties with it included); top-p then keeps every token whose
/// more likely tokens (strictly larger logits, among those kept) hold less than `p` of the
/// probability, so the most likely token always stays. NaN logits are never drawn.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> usize {
    if s.is_greedy() || logits.len() <= 1 {
        return argmax(logits);
    }
    let max = logits
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return argmax(logits);
    }
    let t = f64::from(s.temperature);
    let mut weights: Vec<f64> = logits
        .iter()
        .map(|&v| {
            if v.is_nan() {
                0.0
            } else {
                ((f64::from(v) - f64::from(max)) / t).exp()
            }
        })
        .collect();
    if let Some(cut) = s
        .top_k
        .filter(|&k| k > 0)
        .and_then(|k| kth_largest(logits, k))
    {
        for (w, &v) in weights.iter_mut().zip(logits) {
            if v.is_nan() || v < cut {
                *w = 0.0;
            }
        }
    }
    if let Some(p) = s.top_p {
        nucleus(logits, &mut weights, f64::from(p));
    }
    draw_in_id_order(&weights, uniform(rng))
}

/// The `k`-th largest non-NaN logit, or None where there are no more than `k` of them.
fn kth_largest(logits: &[f32], k: usize) -> Option<f32> {
    let mut values: Vec<f32> = logits.iter().copied().filter(|v| !v.is_nan()).collect();
    if k >= values.len() {
        return None;
    }
    let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    Some(*kth)
}

/// Zeroes the weight of every token whose strictly more likely tokens hold at least `p` of the
/// total weight (the smallest group of equal logits that reaches `p` stays whole).
fn nucleus(logits: &[f32], weights: &mut [f64], p: f64) {
    let mut kept: Vec<usize> = (0..logits.len()).filter(|&i| weights[i] > 0.0).collect();
    kept.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let total: f64 = kept.iter().map(|&i| weights[i]).sum();
    let mut above = 0.0;
    let mut at = 0;
    while at < kept.len() {
        if above >= p * total {
            break;
        }
        // One group of equal logits.
        let v = logits[kept[at]];
        while at < kept.len() && logits[kept[at]] == v {
            above += weights[kept[at]];
            at += 1;
        }
    }
    for &i in &kept[at..] {
        weights[i] = 0.0;
    }
}

/// The first id whose cumulative weight (in id order) exceeds `u` times the total weight;
/// the last id of positive weight where rounding leaves the draw past the end.
fn draw_in_id_order(weights: &[f64], u: f64) -> usize {
    let total: f64 = weights.iter().sum();
    let threshold = u * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            last = i;
        }
        acc += w;
        if threshold < acc {
            return i;
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut rng = stream(0, 0);
        assert_eq!(
            sample(&[0.1, 3.0, -1.0, 3.0], &Sampling::GREEDY, &mut rng),
            1
        );
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_streams_reproduce() {
        let s = Sampling {
            temperature: 1.0,
            top_k: Some(1),
            top_p: None,
        };
        let mut rng = stream(7, 3);
        assert_eq!(sample(&[0.0, 0.5, 2.0], &s, &mut rng), 2);
        let s = Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed, index| {
            let mut rng = stream(seed, index);
            (0..20)
                .map(|_| sample(&logits, &s, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1, 0), draw(1, 0));
        assert_ne!(draw(1, 0), draw(1, 1));
        assert_ne!(draw(1, 0), draw(2, 0));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One token holds almost all the mass: p = 0.5 keeps only it.
        let s = Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.5),
        };
        let mut rng = stream(0, 0);
        for _ in 0..50 {
            assert_eq!(sample(&[0.0, 10.0, 0.0, 1.0], &s, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let s = Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        };
        // p = [0.2, 0.8]
        let logits = [0.0f32, (4.0f32).ln()];
        let mut rng = stream(42, 0);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| sample(&logits, &s, &mut rng) == 1)
            .count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.8).abs() < 0.02, "{f}");
    }

    #[test]
    fn top_k_zero_is_off() {
        let logits = [0.3, 1.0, -0.5, 0.9, 0.0];
        for seed in 0..20 {
            let draw = |k| {
                let s = Sampling {
                    temperature: 1.0,
                    top_k: k,
                    top_p: None,
                };
                sample(&logits, &s, &mut stream(seed, 0))
            };
            assert_eq!(draw(Some(0)), draw(None), "seed {seed}");
        }
    }

    #[test]
    fn top_k_keeps_ties_with_the_kth() {
        // Two tokens tie for the second place: top-k 2 keeps both (transformers' rule).
        let logits = [0.0f32, 2.0, 1.0, 1.0, -3.0];
        let s = Sampling {
            temperature: 1.0,
            top_k: Some(2),
            top_p: None,
        };
        let mut seen = [false; 5];
        let mut rng = stream(3, 0);
        for _ in 0..400 {
            seen[sample(&logits, &s, &mut rng)] = true;
        }
        assert_eq!(seen, [false, true, true, true, false]);
    }

    #[test]
    fn top_p_stops_at_the_first_group_reaching_p() {
        // Probabilities 0.5, 0.25, 0.25 (tied), ~0: p = 0.6 keeps the first three (the tied
        // pair stays whole), p = 0.45 only the first.
        let l4 = (4.0f32).ln();
        let logits = [l4 + (2.0f32).ln(), l4, l4, -40.0];
        let kept = |p: f32| {
            let s = Sampling {
                temperature: 1.0,
                top_k: None,
                top_p: Some(p),
            };
            let mut seen = [false; 4];
            let mut rng = stream(5, 0);
            for _ in 0..400 {
                seen[sample(&logits, &s, &mut rng)] = true;
            }
            seen
        };
        assert_eq!(kept(0.6), [true, true, true, false]);
        assert_eq!(kept(0.45), [true, false, false, false]);
    }

    #[test]
    fn bad_values_are_rejected() {
        let bad = |t: f32, k: Option<usize>, p: Option<f32>| {
            Sampling {
                temperature: t,
                top_k: k,
                top_p: p,
            }
            .validate()
            .is_err()
        };
        assert!(bad(f32::NAN, None, None));
        assert!(bad(-1.0, None, None));
        // top_k 0 keeps every token, as None does.
        assert!(!bad(1.0, Some(0), None));
        assert!(bad(1.0, None, Some(0.0)));
        assert!(bad(1.0, None, Some(1.5)));
        assert!(!bad(0.0, Some(5), Some(0.9)));
    }
}
