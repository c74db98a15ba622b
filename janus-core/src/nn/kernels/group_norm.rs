//! GroupNorm of f32 images on the host, optionally followed by swish (`x·σ(x)`), as the VQ
//! decoder applies it before each convolution: one task per group, the statistics in f64 over
//! the group's values, then one pass that writes the normalised, scaled and shifted values.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::nn::activation::silu_value;

/// `x ← (x − mean_g)/√(var_g + eps)·weight[c] + bias[c]`, then `x·σ(x)` when `swish`, in place,
/// for `x` `[images, channels, pixels]` whose `channels` split into `groups` groups of consecutive
/// channels; mean and (biased) variance over each group's channels and pixels, per image.
///
/// # Errors
/// [`Error::InvalidInput`] when the slices do not match the shapes or `groups` does not divide
/// `channels`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &mut [f32],
    (channels, pixels): (usize, usize),
    groups: usize,
    eps: f64,
    weight: &[f32],
    bias: &[f32],
    swish: bool,
) -> Result<()> {
    let bad = |msg: String| Err(Error::InvalidInput(format!("group norm: {msg}")));
    if groups == 0 || !channels.is_multiple_of(groups) {
        return bad(format!("{channels} channels in {groups} groups"));
    }
    let per = (channels / groups) * pixels;
    if weight.len() != channels
        || bias.len() != channels
        || (channels * pixels != 0 && !x.len().is_multiple_of(channels * pixels))
    {
        return bad(format!(
            "x {}, weight {}, bias {} values for {channels} channels of {pixels} pixels",
            x.len(),
            weight.len(),
            bias.len()
        ));
    }
    if per == 0 {
        return Ok(());
    }
    x.par_chunks_mut(per).enumerate().for_each(|(k, values)| {
        super::simd::widest(
            #[inline(always)]
            || {
                normalize(
                    values, k, pixels, groups, channels, eps, weight, bias, swish,
                )
            },
        )
    });
    Ok(())
}

/// One group of [`group_norm`] (group `k` of all images' groups), in place.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn normalize(
    values: &mut [f32],
    k: usize,
    pixels: usize,
    groups: usize,
    channels: usize,
    eps: f64,
    weight: &[f32],
    bias: &[f32],
    swish: bool,
) {
    let per = values.len();
    {
        let first = (k % groups) * (channels / groups);
        let mean = sum(values, |v| v) / per as f64;
        let var = sum(values, |v| (v - mean) * (v - mean)) / per as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for (plane, c) in values.chunks_exact_mut(pixels).zip(first..) {
            // y = x·scale + shift, the mean folded into the shift.
            let scale = rstd * f64::from(weight[c]);
            let shift = f64::from(bias[c]) - mean * scale;
            let (scale, shift) = (scale as f32, shift as f32);
            if swish {
                for v in plane.iter_mut() {
                    *v = silu_value(*v * scale + shift);
                }
            } else {
                for v in plane.iter_mut() {
                    *v = *v * scale + shift;
                }
            }
        }
    }
}

/// `Σ f(v)` over `values` in f64, in eight independent running sums (so the loop vectorises
/// and is not bound by the latency of one addition chain).
#[inline(always)]
fn sum(values: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(f64::from(v))).sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(f64::from(v));
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_norm_follows_its_definition() {
        let (images, channels, pixels, groups) = (2, 6, 7, 3);
        let x: Vec<f32> = (0..images * channels * pixels)
            .map(|i| ((i * 37 + 11) % 23) as f32 * 0.5 - 4.0 + (i / 42) as f32 * 10.0)
            .collect();
        let weight: Vec<f32> = (0..channels).map(|c| 0.5 + c as f32 * 0.25).collect();
        let bias: Vec<f32> = (0..channels).map(|c| c as f32 * 0.1 - 0.2).collect();
        for swish in [false, true] {
            let mut y = x.clone();
            group_norm(
                &mut y,
                (channels, pixels),
                groups,
                1e-6,
                &weight,
                &bias,
                swish,
            )
            .unwrap();
            let per = channels / groups * pixels;
            for (k, group) in x.chunks(per).enumerate() {
                let n = per as f64;
                let mean = group.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let var = group
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / n;
                for (i, &v) in group.iter().enumerate() {
                    let c = (k % groups) * (channels / groups) + i / pixels;
                    let mut want = (f64::from(v) - mean) / (var + 1e-6).sqrt()
                        * f64::from(weight[c])
                        + f64::from(bias[c]);
                    if swish {
                        want /= 1.0 + (-want).exp();
                    }
                    let got = f64::from(y[k * per + i]);
                    assert!(
                        (got - want).abs() < 1e-5,
                        "{swish} {k} {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_that_do_not_match_are_errors() {
        for (groups, weight) in [(5, 6), (0, 6), (3, 5)] {
            let err = group_norm(
                &mut [0.0; 12],
                (6, 2),
                groups,
                1e-6,
                &vec![1.0; weight],
                &[0.0; 6],
                false,
            );
            assert!(
                matches!(err, Err(Error::InvalidInput(_))),
                "{groups} {weight}"
            );
        }
    }
}
