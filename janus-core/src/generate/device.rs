//! Token picks on a GPU: the argmax or the sampled token of each logits row computed where the
//! logits are, so that a step reads back three numbers per row instead of whole rows (16 384
//! values per image row, 102 400 per answer row).
//!
//! The rule is the host's ([`sample`](super::sampling::sample), after
//! [`pick_token`](super::text::pick_token)'s repetition penalty): one uniform number from the
//! sequence's stream, and the first id whose cumulative weight in id order, over the kept tokens,
//! exceeds it; so a seed draws the same tokens on either side (up to rounding at a boundary).
//!
//! - **Top-k and top-p** keep the tokens at or above a cutoff logit. Finding it needs no sort:
//!   a search narrows an interval around the cutoff, testing [`PROBES`] cutoffs at once per round
//!   (how many tokens, or how much probability, lie strictly above each), [`ROUNDS`] rounds
//!   (2^-36 of the logits' range). The kept set is exact unless two logits lie closer than that
//!   below the cutoff, where the lower one is kept too.
//! - The cumulative sums of the draw run in blocks of [`BLOCK`] ids and then over the blocks: one
//!   reduction over a whole row of a hundred thousand values is not exact on every wgpu driver (a
//!   single reduction over 2^18 values came out wrong on Mesa's lavapipe). The search's sums run
//!   over one row (102 400 values at most), within what was measured exact.

use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;

use super::sampling::{Sampling, uniform};
use crate::Device;
use crate::error::{Error, Result};

/// Ids per block of the cumulative sums.
const BLOCK: usize = 256;

/// Cutoffs tested per round of the top-k / top-p search (the interval shrinks 64-fold).
const PROBES: usize = 63;

/// Rounds of the top-k / top-p search.
const ROUNDS: usize = 6;

/// Values a round of the search compares at once at most (`rows × PROBES × width`): rows are
/// searched in chunks so that no buffer of the search passes 32 MiB.
const SEARCH_VALUES: usize = 1 << 23;

/// How one row of logits becomes a token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RowRule {
    /// The sampling rule.
    pub sampling: Sampling,
    /// The row's uniform number from its stream (unused when greedy).
    pub uniform: f64,
    /// Repetition penalty (1: none), as [`pick_token`](super::text::pick_token) applies it.
    pub penalty: f32,
    /// The distinct ids the penalty applies to.
    pub seen: Vec<u32>,
}

impl RowRule {
    /// The rule with a repetition `penalty` on the ids `generated` so far.
    pub(crate) fn with_penalty(mut self, penalty: f32, generated: &[u32]) -> Self {
        if penalty != 1.0 {
            let mut seen = generated.to_vec();
            seen.sort_unstable();
            seen.dedup();
            self.penalty = penalty;
            self.seen = seen;
        }
        self
    }

    fn samples(&self) -> bool {
        !self.sampling.is_greedy()
    }
}

/// The rules of rows that all follow `sampling`, each sampled row's uniform number drawn from
/// its stream (greedy rows draw none, as on the host).
pub(crate) fn draw_numbers(sampling: &Sampling, rngs: &mut [ChaCha8Rng]) -> Vec<RowRule> {
    rngs.iter_mut()
        .map(|rng| RowRule {
            sampling: *sampling,
            uniform: if sampling.is_greedy() {
                0.0
            } else {
                uniform(rng)
            },
            penalty: 1.0,
            seen: Vec::new(),
        })
        .collect()
}

/// Picks tokens from rows of logits on one device.
pub(crate) struct DevicePicker {
    device: Device,
}

impl DevicePicker {
    /// A picker for `device` where picks there apply: a device other than the CPU backend (whose
    /// host loop reads its own memory).
    pub(crate) fn for_device(device: &Device) -> Option<Self> {
        (!crate::device::is_cpu(device)).then(|| DevicePicker {
            device: device.clone(),
        })
    }

    /// The token of each row of `logits` (`[rows, width]`, any float dtype; computed in f32)
    /// under its rule: the argmax where greedy, else the draw at the rule's uniform number among
    /// the kept tokens. A row with a NaN or infinite logit (after the penalty) is
    /// [`Error::NonFiniteLogits`] with `step` (that row only: the others are picked).
    pub(crate) fn pick(
        &self,
        logits: Tensor<2>,
        rules: &[RowRule],
        step: usize,
    ) -> Result<Vec<Result<u32>>> {
        let [rows, width] = logits.dims();
        if width == 0 || rows != rules.len() {
            return Err(Error::InvalidInput(format!(
                "{rows} rows of {width} logits for {} rules",
                rules.len()
            )));
        }
        if let Some(id) = rules
            .iter()
            .flat_map(|r| &r.seen)
            .find(|&&id| id as usize >= width)
        {
            return Err(Error::InvalidInput(format!(
                "token id {id} is past the {width} logits of a row"
            )));
        }
        let mut x = logits.cast(DType::F32);
        if rules.iter().any(|r| r.penalty != 1.0 && !r.seen.is_empty()) {
            x = self.penalize(x, rules);
        }
        // 0 where every logit of the row is finite, NaN otherwise.
        let finite = (x.clone() - x.clone()).sum_dim(1);
        let best = x.clone().argmax(1).float();
        let picked = if !rules.iter().any(RowRule::samples) || width <= 1 {
            best.clone()
        } else {
            // Greedy rows among sampled ones: any temperature (their draw is not used).
            let t = self.column(rules, |r| {
                if r.samples() {
                    r.sampling.temperature
                } else {
                    1.0
                }
            });
            let max = x.clone().max_dim(1);
            let mut weights = ((x.clone() - max) / t).exp();
            if rules.iter().any(|r| r.samples() && r.sampling.truncates()) {
                weights = self.truncate(x, weights, rules);
            }
            let u = self.column(rules, |r| r.uniform as f32);
            self.draw(weights, u)
        };
        let picks = Tensor::cat(vec![finite, best, picked], 1);
        let back: Vec<f32> = super::read_back(picks, "picking tokens")?
            .convert::<f32>()
            .try_into_vec()
            .map_err(|e| Error::InvalidInput(format!("reading the picked tokens: {e:?}")))?;
        Ok(back
            .chunks_exact(3)
            .zip(rules)
            .map(|(r, rule)| {
                if r[0] != 0.0 {
                    Err(Error::NonFiniteLogits { step })
                } else {
                    let id = if rule.samples() { r[2] } else { r[1] };
                    Ok((id as u32).min(width as u32 - 1))
                }
            })
            .collect())
    }

    /// One value per row, as a `[rows, 1]` column.
    fn column(&self, rules: &[RowRule], f: impl Fn(&RowRule) -> f32) -> Tensor<2> {
        let v: Vec<f32> = rules.iter().map(f).collect();
        Tensor::from_data(TensorData::new(v, [rules.len(), 1]), &self.device)
    }

    /// The repetition penalty on each row's seen ids: a negative logit times the penalty, any
    /// other divided by it.
    fn penalize(&self, x: Tensor<2>, rules: &[RowRule]) -> Tensor<2> {
        let [rows, width] = x.dims();
        let (mut at, mut factor) = (Vec::new(), Vec::new());
        for (r, rule) in rules.iter().enumerate() {
            if rule.penalty != 1.0 {
                for &id in &rule.seen {
                    at.push((r * width + id as usize) as i64);
                    factor.push(rule.penalty);
                }
            }
        }
        let n = at.len();
        let at = Tensor::<1, Int>::from_data(TensorData::new(at, [n]), &self.device);
        let p = Tensor::<1>::from_data(TensorData::new(factor, [n]), &self.device);
        let flat = x.reshape([rows * width]);
        let old = flat.clone().select(0, at.clone());
        let negative = old.clone().lower_elem(0.0);
        let new = (old.clone() / p.clone()).mask_where(negative, old.clone() * p);
        flat.select_assign(0, at, new - old, IndexingUpdateOp::Add)
            .reshape([rows, width])
    }

    /// `weights` with the tokens that the rows' top-k and top-p leave out set to 0 (rows
    /// without them, and greedy rows, keep every token).
    fn truncate(&self, x: Tensor<2>, weights: Tensor<2>, rules: &[RowRule]) -> Tensor<2> {
        let [rows, width] = x.dims();
        let cut = |r: &RowRule, f: &dyn Fn(&Sampling) -> Option<f32>| {
            if r.samples() {
                f(&r.sampling).unwrap_or(f32::INFINITY)
            } else {
                f32::INFINITY
            }
        };
        let mut weights = weights;
        let top_k = |s: &Sampling| s.top_k.filter(|&k| k > 0 && k < width).map(|k| k as f32);
        if rules.iter().any(|r| cut(r, &top_k).is_finite()) {
            let counts = self.column(rules, |r| cut(r, &top_k));
            let lo = self.cutoff(x.clone(), None, counts);
            weights = weights * x.clone().greater(lo.expand([rows, width])).float();
        }
        let top_p = |s: &Sampling| s.top_p.filter(|&p| p < 1.0);
        if rules.iter().any(|r| cut(r, &top_p).is_finite()) {
            let mass = weights.clone().sum_dim(1) * self.column(rules, |r| cut(r, &top_p));
            let lo = self.cutoff(x.clone(), Some(weights.clone()), mass);
            weights = weights * x.greater(lo.expand([rows, width])).float();
        }
        weights
    }

    /// Per row, a logit `lo` just below the cutoff: the largest value `τ*` at which the measure
    /// of the tokens strictly above `τ*` (their count, or their `weights`) is below the row's
    /// `need` (`[rows, 1]`; infinite: keep every token). Keeping the tokens above `lo` keeps
    /// those from `τ*` up. `x`: `[rows, width]`; returns `[rows, 1]`.
    fn cutoff(&self, x: Tensor<2>, weights: Option<Tensor<2>>, need: Tensor<2>) -> Tensor<2> {
        let [rows, width] = x.dims();
        let chunk = (SEARCH_VALUES / (PROBES * width)).max(1);
        let mut out = Vec::new();
        for start in (0..rows).step_by(chunk) {
            let r = chunk.min(rows - start);
            let x = x.clone().narrow(0, start, r);
            let weights = weights.as_ref().map(|w| {
                w.clone()
                    .narrow(0, start, r)
                    .unsqueeze_dim::<3>(1)
                    .expand([r, PROBES, width])
            });
            let need = need.clone().narrow(0, start, r).expand([r, PROBES]);
            let (min, max) = (x.clone().min_dim(1), x.clone().max_dim(1));
            // Below every logit (the measure above it is everything) and the largest logit
            // (nothing above it).
            let mut lo = min.clone() - (max.clone() - min) - 1.0;
            let mut hi = max;
            let steps: Vec<f32> = (1..=PROBES).map(|j| j as f32).collect();
            let steps = Tensor::<2>::from_data(TensorData::new(steps, [1, PROBES]), &self.device);
            let values = x.unsqueeze_dim::<3>(1).expand([r, PROBES, width]);
            for _ in 0..ROUNDS {
                let step = (hi - lo.clone()) / (PROBES + 1) as f64;
                let probes = lo.clone() + step.clone() * steps.clone();
                let above = values
                    .clone()
                    .greater(probes.unsqueeze_dim::<3>(2).expand([r, PROBES, width]))
                    .float();
                let measure = match &weights {
                    None => above,
                    Some(w) => above * w.clone(),
                }
                .sum_dim(2)
                .reshape([r, PROBES]);
                // Probes are ascending and the measure falls with them: the first `n` still
                // have enough above them.
                let n = measure.greater_equal(need.clone()).float().sum_dim(1);
                hi = lo.clone() + step.clone() * (n.clone() + 1.0);
                lo = lo + step * n;
            }
            out.push(lo);
        }
        Tensor::cat(out, 0)
    }

    /// The first id per row whose cumulative weight exceeds `u` times the row's total weight
    /// (`weights`: `[rows, width]`, ≥ 0; `u`: `[rows, 1]`; the ids `[rows, 1]` as f32).
    fn draw(&self, weights: Tensor<2>, u: Tensor<2>) -> Tensor<2> {
        let [rows, width] = weights.dims();
        // The last id of positive weight, where rounding at the very end leaves a draw past it.
        let ids = Tensor::<1, Int>::arange(0..width as i64, &self.device)
            .float()
            .reshape([1, width]);
        let last = (weights.clone().greater_elem(0.0).float() * ids).max_dim(1);
        let (nb, b) = (width.div_ceil(BLOCK), BLOCK);
        let pad = nb * b - width;
        let weights = if pad > 0 {
            Tensor::cat(vec![weights, Tensor::zeros([rows, pad], &self.device)], 1)
        } else {
            weights
        };
        let within = weights.reshape([rows * nb, b]).cumsum(1);
        let block_sums = within.clone().narrow(1, b - 1, 1).reshape([rows, nb]);
        let ends = block_sums.clone().cumsum(1);
        let total = ends.clone().narrow(1, nb - 1, 1);
        let before = ends - block_sums;
        let cumulative = within.reshape([rows, nb, b]) + before.reshape([rows, nb, 1]);
        let threshold = (u * total).reshape([rows, 1, 1]);
        let drawn = (cumulative - threshold)
            .lower_equal_elem(0.0)
            .float()
            .reshape([rows, nb * b])
            .sum_dim(1);
        drawn.min_pair(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::sampling::stream;

    /// A picker on the default device: the CPU backend (where the generation loops keep the
    /// host picks; the arithmetic is the same), or the GPU in a build without it (`scripts/test.sh`
    /// runs these tests on wgpu so).
    fn picker() -> DevicePicker {
        DevicePicker {
            device: crate::default_device(),
        }
    }

    fn rows(rows: usize, width: usize) -> Vec<f32> {
        (0..rows * width)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 6.0)
            .collect()
    }

    fn rule(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
        }
    }

    /// The host's pick of one row: [`pick_token`](crate::generate::text::pick_token), as the
    /// host loops call it.
    fn host_pick(row: &[f32], r: &RowRule, rng: &mut ChaCha8Rng) -> u32 {
        let options = crate::generate::text::TextGenOptions {
            sampling: r.sampling,
            repetition_penalty: r.penalty,
            ..Default::default()
        };
        crate::generate::text::pick_token(&mut row.to_vec(), &options, &r.seen, rng, 1).unwrap()
    }

    /// Device picks of `values` (`rules.len()` rows) against the host's, for 20 seeds.
    fn check(values: &[f32], rules: &[(Sampling, f32, Vec<u32>)], what: &str) {
        let n = rules.len();
        let width = values.len() / n;
        let p = picker();
        for seed in 0..20u64 {
            let mut host_rngs: Vec<_> = (0..n).map(|r| stream(seed, r as u64)).collect();
            let mut dev_rngs = host_rngs.clone();
            let device_rules: Vec<RowRule> = rules
                .iter()
                .zip(&mut dev_rngs)
                .map(|((s, penalty, seen), rng)| {
                    draw_numbers(s, std::slice::from_mut(rng))
                        .remove(0)
                        .with_penalty(*penalty, seen)
                })
                .collect();
            let want: Vec<u32> = values
                .chunks_exact(width)
                .zip(&device_rules)
                .zip(&mut host_rngs)
                .map(|((row, r), rng)| host_pick(row, r, rng))
                .collect();
            let t = Tensor::<2>::from_data(TensorData::new(values.to_vec(), [n, width]), &p.device);
            let got: Vec<u32> = p
                .pick(t, &device_rules, 1)
                .unwrap()
                .into_iter()
                .map(|r| r.unwrap())
                .collect();
            assert_eq!(got, want, "{what}, width {width}, seed {seed}");
        }
    }

    #[test]
    fn device_draws_equal_the_host_draws() {
        // Widths below, at and across block edges, and the image head's.
        for width in [1usize, 5, BLOCK, BLOCK + 3, 3000, 16384] {
            let s = rule(0.8, None, None);
            check(&rows(3, width), &vec![(s, 1.0, vec![]); 3], "every token");
        }
    }

    #[test]
    fn device_top_k_top_p_and_penalty_equal_the_host() {
        for width in [7usize, 300, 16384] {
            let values = rows(3, width);
            for (s, what) in [
                (rule(1.0, Some(1), None), "top-k 1"),
                (rule(0.7, Some(5), None), "top-k 5"),
                (rule(1.0, Some(40), None), "top-k 40"),
                (rule(1.0, None, Some(0.3)), "top-p 0.3"),
                (rule(1.5, None, Some(0.9)), "top-p 0.9"),
                (rule(1.0, Some(50), Some(0.8)), "top-k 50, top-p 0.8"),
            ] {
                check(&values, &vec![(s, 1.0, vec![]); 3], what);
            }
            // Every rule in one call, each row its own; a penalty on some rows.
            let seen: Vec<u32> = (0..width as u32).step_by(3).take(40).collect();
            check(
                &rows(5, width),
                &[
                    (rule(1.0, Some(5), None), 1.3, seen.clone()),
                    (rule(0.0, Some(5), Some(0.5)), 1.0, vec![]),
                    (rule(0.9, None, None), 2.0, seen.clone()),
                    (rule(1.0, None, Some(0.6)), 1.0, vec![]),
                    (rule(0.0, None, None), 1.5, seen),
                ],
                "mixed rules",
            );
        }
    }

    #[test]
    fn top_k_keeps_ties_and_near_ties_exactly() {
        // A second place shared by three ids, and logits a few ulps apart around zero.
        let mut values = vec![-2.0f32; 64];
        values[10] = 3.0;
        for i in [4, 20, 33] {
            values[i] = 1.0;
        }
        values[40] = 1e-7;
        values[41] = 2e-7;
        values[42] = 3e-7;
        let p = picker();
        for (k, kept) in [
            (2usize, vec![4u32, 10, 20, 33]),
            (4, vec![4, 10, 20, 33]),
            (5, vec![4, 10, 20, 33, 42]),
            (6, vec![4, 10, 20, 33, 41, 42]),
        ] {
            let mut got = Vec::new();
            for seed in 0..300u64 {
                let mut rng = [stream(seed, 0)];
                let rules = draw_numbers(&rule(100.0, Some(k), None), &mut rng);
                let t = Tensor::<2>::from_data(TensorData::new(values.clone(), [1, 64]), &p.device);
                got.push(p.pick(t, &rules, 1).unwrap().remove(0).unwrap());
            }
            got.sort_unstable();
            got.dedup();
            assert_eq!(got, kept, "top-k {k}");
        }
    }

    #[test]
    fn greedy_rows_take_the_argmax_and_non_finite_rows_fail_alone() {
        let width = 600;
        let mut values = rows(3, width);
        values[width + 17] = f32::NAN;
        values[2 * width + 5] = 100.0;
        let p = picker();
        let t = Tensor::<2>::from_data(TensorData::new(values, [3, width]), &p.device);
        // Row 2 greedy among sampled rows.
        let mut rngs: Vec<_> = (0..3).map(|r| stream(0, r)).collect();
        let mut rules = draw_numbers(&rule(1.0, None, None), &mut rngs[..2]);
        rules.extend(draw_numbers(&Sampling::GREEDY, &mut rngs[2..]));
        let got = p.pick(t, &rules, 9).unwrap();
        assert!(matches!(got[1], Err(Error::NonFiniteLogits { step: 9 })));
        assert_eq!(*got[2].as_ref().unwrap(), 5);
        assert!(got[0].is_ok());
    }

    #[test]
    fn a_penalized_id_past_the_row_is_refused() {
        let p = picker();
        let t = Tensor::<2>::from_data(TensorData::new(vec![0.0f32; 8], [1, 8]), &p.device);
        let rules: Vec<RowRule> = draw_numbers(&Sampling::GREEDY, &mut [stream(0, 0)])
            .into_iter()
            .map(|r| r.with_penalty(1.2, &[8]))
            .collect();
        assert!(matches!(p.pick(t, &rules, 1), Err(Error::InvalidInput(_))));
    }
}
