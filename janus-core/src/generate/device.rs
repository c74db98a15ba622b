//! Token picks on a GPU: the argmax or the temperature draw of each logits row computed where the
//! logits are, so that a step reads back three numbers per row instead of whole rows (16 384
//! values per image row, 102 400 per answer row).
//!
//! The draw is the host's ([`sample`](super::sampling::sample) over every token): one uniform
//! number from the sequence's stream, and the first id whose cumulative weight in id order
//! exceeds it, so a seed draws the same tokens on either side (up to rounding at a boundary).
//! The cumulative sums run in blocks of [`BLOCK`] ids and then over the blocks: one reduction over
//! a whole row of a hundred thousand values is not exact on every wgpu driver (a single reduction
//! over 2^18 values came out wrong on Mesa's lavapipe). Top-k and top-p need the candidates in
//! order, a sort that stays on the host: those rows are read back whole.

use burn::tensor::{DType, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;

use super::sampling::{Sampling, uniform};
use crate::Device;
use crate::error::{Error, Result};

/// Ids per block of the cumulative sums.
const BLOCK: usize = 256;

/// What [`DevicePicker::pick`] takes for rows that all follow `sampling`: each row's
/// temperature, and each sampled row's uniform number drawn from its stream (greedy rows draw
/// none, as on the host).
pub(crate) fn draw_numbers(sampling: &Sampling, rngs: &mut [ChaCha8Rng]) -> (Vec<f32>, Vec<f64>) {
    let greedy = sampling.is_greedy();
    rngs.iter_mut()
        .map(|rng| {
            let u = if greedy { 0.0 } else { uniform(rng) };
            (sampling.temperature, u)
        })
        .unzip()
}

/// Picks tokens from rows of logits on one device.
pub(crate) struct DevicePicker {
    device: Device,
}

impl DevicePicker {
    /// A picker for `device`, where picks there apply: a device other than the CPU backend
    /// (whose host loop reads its own memory) and a rule that keeps every token (no top-k or
    /// top-p).
    pub(crate) fn for_device(device: &Device, sampling: &Sampling) -> Option<Self> {
        (!crate::device::is_cpu(device) && !sampling.truncates()).then(|| DevicePicker {
            device: device.clone(),
        })
    }

    /// The token of each row of `logits` (`[rows, width]`, any float dtype; computed in f32):
    /// the argmax where the row's temperature is 0, else the draw at the row's uniform number
    /// (see [`draw_numbers`]). A row with a NaN or infinite logit is
    /// [`Error::NonFiniteLogits`] with `step` (that row only: the others are picked).
    pub(crate) fn pick(
        &self,
        logits: Tensor<2>,
        temperatures: &[f32],
        uniforms: &[f64],
        step: usize,
    ) -> Result<Vec<Result<u32>>> {
        let [rows, width] = logits.dims();
        if width == 0 || rows != temperatures.len() || rows != uniforms.len() {
            return Err(Error::InvalidInput(format!(
                "{rows} rows of {width} logits for {} temperatures and {} draws",
                temperatures.len(),
                uniforms.len()
            )));
        }
        let x = logits.cast(DType::F32);
        // 0 where every logit of the row is finite, NaN otherwise.
        let finite = (x.clone() - x.clone()).sum_dim(1);
        let best = x.clone().argmax(1).float();
        let picked = if temperatures.iter().all(|&t| t == 0.0) || width <= 1 {
            best.clone()
        } else {
            // Greedy rows among sampled ones: any temperature (their draw is not used).
            let t: Vec<f32> = temperatures
                .iter()
                .map(|&t| if t == 0.0 { 1.0 } else { t })
                .collect();
            let t = Tensor::<2>::from_data(TensorData::new(t, [rows, 1]), &self.device);
            let u: Vec<f32> = uniforms.iter().map(|&u| u as f32).collect();
            let u = Tensor::<2>::from_data(TensorData::new(u, [rows, 1]), &self.device);
            self.draw(x, t, u)
        };
        let picks = Tensor::cat(vec![finite, best, picked], 1);
        let back: Vec<f32> = super::read_back(picks, "picking tokens")?
            .convert::<f32>()
            .try_into_vec()
            .map_err(|e| Error::InvalidInput(format!("reading the picked tokens: {e:?}")))?;
        Ok(back
            .chunks_exact(3)
            .zip(temperatures)
            .map(|(r, &t)| {
                if r[0] != 0.0 {
                    Err(Error::NonFiniteLogits { step })
                } else {
                    let id = if t == 0.0 { r[1] } else { r[2] };
                    Ok((id as u32).min(width as u32 - 1))
                }
            })
            .collect())
    }

    /// The first id per row whose cumulative weight `Σ_{j ≤ i} exp((x_j − max) / t)` exceeds
    /// `u` times the row's total (`t`, `u`: `[rows, 1]`; the ids `[rows, 1]` as f32).
    fn draw(&self, x: Tensor<2>, t: Tensor<2>, u: Tensor<2>) -> Tensor<2> {
        let [rows, width] = x.dims();
        let (nb, b) = (width.div_ceil(BLOCK), BLOCK);
        let max = x.clone().max_dim(1);
        let weights = ((x - max) / t).exp();
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
        (cumulative - threshold)
            .lower_equal_elem(0.0)
            .float()
            .reshape([rows, nb * b])
            .sum_dim(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::sampling::{sample, stream};

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

    #[test]
    fn device_draws_equal_the_host_draws() {
        // Widths below, at and across block edges, and the image head's.
        for width in [1usize, 5, BLOCK, BLOCK + 3, 3000, 16384] {
            let values = rows(3, width);
            let s = Sampling {
                temperature: 0.8,
                top_k: None,
                top_p: None,
            };
            let p = picker();
            for step in 0..20u64 {
                let mut host_rngs: Vec<_> = (0..3).map(|r| stream(step, r)).collect();
                let mut dev_rngs = host_rngs.clone();
                let want: Vec<u32> = values
                    .chunks_exact(width)
                    .zip(&mut host_rngs)
                    .map(|(row, rng)| sample(row, &s, rng) as u32)
                    .collect();
                let t =
                    Tensor::<2>::from_data(TensorData::new(values.clone(), [3, width]), &p.device);
                let (temps, draws) = draw_numbers(&s, &mut dev_rngs);
                let got: Vec<u32> = p
                    .pick(t, &temps, &draws, 1)
                    .unwrap()
                    .into_iter()
                    .map(|r| r.unwrap())
                    .collect();
                assert_eq!(got, want, "width {width}, seed {step}");
            }
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
        let got = p.pick(t, &[1.0, 1.0, 0.0], &[0.5, 0.5, 0.0], 9).unwrap();
        assert!(matches!(got[1], Err(Error::NonFiniteLogits { step: 9 })));
        assert_eq!(*got[2].as_ref().unwrap(), 5);
        assert!(got[0].is_ok());
    }
}
