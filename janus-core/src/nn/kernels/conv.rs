//! Stride-1 "same" convolutions with bf16 operands and f32 sums: the image is unfolded (im2col) a
//! band of pixels at a time straight into bf16, and each band is one bf16 product
//! ([`bf16_gemm`](super::bf16_gemm)) with the weight, whose outputs land channel-first where the
//! band's pixels go. A band holds about [`BAND_VALUES`] unfolded values, so the unfolded image is
//! never held whole (at 384×384 with 128 channels it would be 340 MB).

use rayon::prelude::*;

use super::bf16_gemm::{ALIGN, Bf16Gemm, bf16_gemm};
use crate::error::{Error, Result};

/// Unfolded values per band (8 MiB of bf16).
const BAND_VALUES: usize = 1 << 22;

/// `y[o][p] = bias[o] + Σ_{c,dy,dx} x[c][p + (dy − k/2, dx − k/2)] · w[o][(c·k + dy)·k + dx]` for
/// one image `x` `[c_in, h, wd]` (zero outside it), an odd `k`, `w` bf16 bits `[out, c_in·k·k]`,
/// `y` `[out, h, wd]`; `x` is rounded to bf16.
///
/// # Errors
/// [`Error::InvalidInput`] when the slices do not match the shapes, `k` is even, `out` or
/// `c_in·k·k` is not a multiple of [`ALIGN`], or this machine cannot run `path`.
#[allow(clippy::too_many_arguments)]
pub fn conv_same_bf16(
    path: Bf16Gemm,
    x: &[f32],
    (c_in, h, wd): (usize, usize, usize),
    w: &[u16],
    k: usize,
    bias: &[f32],
    y: &mut [f32],
) -> Result<()> {
    let d_in = c_in * k * k;
    let out = bias.len();
    let bad = |msg: String| Err(Error::InvalidInput(format!("bf16 convolution: {msg}")));
    if k.is_multiple_of(2) {
        return bad(format!("kernel size {k} is even"));
    }
    if !Bf16Gemm::covers(out, d_in) {
        return bad(format!(
            "{out} outputs of {d_in} inputs are not multiples of {ALIGN}"
        ));
    }
    if x.len() != c_in * h * wd || w.len() != out * d_in || y.len() != out * h * wd {
        return bad(format!(
            "x {}, w {}, y {} values for [{c_in}, {h}, {wd}] → [{out}, {h}, {wd}], k {k}",
            x.len(),
            w.len(),
            y.len()
        ));
    }
    let pixels = h * wd;
    if pixels == 0 {
        return Ok(());
    }
    // The weight is the product's many-row side: its values widened (exactly) once.
    let wf: Vec<f32> = w
        .iter()
        .map(|&b| f32::from_bits(u32::from(b) << 16))
        .collect();
    // The image in bf16 with a border of k/2 zeros: each unfolded run of k values is then one
    // copy, without bounds tests.
    let p = k / 2;
    let (ph, pw) = (h + 2 * p, wd + 2 * p);
    let mut xp = vec![0u16; c_in * ph * pw];
    xp.par_chunks_mut(ph * pw)
        .zip(x.par_chunks(h * wd))
        .for_each(|(dst, src)| {
            for (drow, srow) in dst[p * pw..].chunks_exact_mut(pw).zip(src.chunks_exact(wd)) {
                for (d, &v) in drow[p..p + wd].iter_mut().zip(srow) {
                    *d = half::bf16::from_f32(v).to_bits();
                }
            }
        });
    let band = (BAND_VALUES / d_in).max(ALIGN) / ALIGN * ALIGN;
    let mut cols = vec![0u16; band * d_in];
    let mut yb = vec![0.0f32; out * band];
    let mut start = 0;
    while start < pixels {
        let n = band.min(pixels - start);
        let padded = n.next_multiple_of(ALIGN);
        let cols = &mut cols[..padded * d_in];
        cols.par_chunks_mut(d_in * ALIGN)
            .enumerate()
            .for_each(|(g, group)| {
                for (i, col) in group.chunks_exact_mut(d_in).enumerate() {
                    let i = g * ALIGN + i;
                    if i >= n {
                        col.fill(0);
                    } else {
                        unfold(
                            &xp,
                            (c_in, ph, pw),
                            k,
                            (start + i) / wd,
                            (start + i) % wd,
                            col,
                        );
                    }
                }
            });
        let yb = &mut yb[..out * padded];
        bf16_gemm(path, &wf, out, cols, d_in, yb)?;
        y.par_chunks_mut(pixels)
            .zip(yb.par_chunks(padded))
            .zip(bias.par_iter())
            .for_each(|((dst, src), &b)| {
                for (d, &s) in dst[start..start + n].iter_mut().zip(&src[..n]) {
                    *d = s + b;
                }
            });
        start += n;
    }
    Ok(())
}

/// The `c_in·k·k` values pixel `(py, px)` sees in the bordered image `xp` `[c_in, ph, pw]`.
#[inline]
fn unfold(
    xp: &[u16],
    dims: (usize, usize, usize),
    k: usize,
    py: usize,
    px: usize,
    col: &mut [u16],
) {
    // Runs of a size known at compile time are moved inline, not through `memmove`.
    match k {
        1 => unfold_k::<1>(xp, dims, py, px, col),
        3 => unfold_k::<3>(xp, dims, py, px, col),
        5 => unfold_k::<5>(xp, dims, py, px, col),
        7 => unfold_k::<7>(xp, dims, py, px, col),
        _ => {
            let (c_in, ph, pw) = dims;
            for (c, dst) in col.chunks_exact_mut(k * k).enumerate().take(c_in) {
                for (dy, run) in dst.chunks_exact_mut(k).enumerate() {
                    run.copy_from_slice(&xp[(c * ph + py + dy) * pw + px..][..k]);
                }
            }
        }
    }
}

/// [`unfold`] for a kernel of `K`.
#[inline]
fn unfold_k<const K: usize>(
    xp: &[u16],
    (c_in, ph, pw): (usize, usize, usize),
    py: usize,
    px: usize,
    col: &mut [u16],
) {
    for (c, dst) in col.chunks_exact_mut(K * K).enumerate().take(c_in) {
        for (dy, run) in dst.chunks_exact_mut(K).enumerate() {
            let at = (c * ph + py + dy) * pw + px;
            let src: &[u16; K] = xp[at..at + K].try_into().expect("K values");
            let run: &mut [u16; K] = run.try_into().expect("K values");
            *run = *src;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the definition, with the operands rounded to bf16 and summed in f64, for a 3×3
    /// and a 1×1 kernel over an image whose pixel count is not a multiple of 32.
    #[test]
    fn matches_the_definition() {
        let Some(path) = Bf16Gemm::best() else {
            return;
        };
        let value =
            |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 211) as f32 / 211.0 - 0.5;
        for (c_in, k, out, h, wd) in [(32, 3, 64, 7, 9), (32, 1, 32, 5, 5), (64, 3, 32, 12, 11)] {
            let d_in = c_in * k * k;
            let x: Vec<f32> = (0..c_in * h * wd).map(|i| value(i, 1)).collect();
            let w: Vec<u16> = (0..out * d_in)
                .map(|i| half::bf16::from_f32(value(i, 2)).to_bits())
                .collect();
            let bias: Vec<f32> = (0..out).map(|i| value(i, 3)).collect();
            let mut y = vec![f32::NAN; out * h * wd];
            conv_same_bf16(path, &x, (c_in, h, wd), &w, k, &bias, &mut y).unwrap();
            let r = |v: f32| f64::from(half::bf16::from_f32(v).to_f32());
            let p = (k / 2) as isize;
            let mut worst = 0.0f64;
            for o in 0..out {
                for py in 0..h {
                    for px in 0..wd {
                        let mut s = f64::from(bias[o]);
                        for c in 0..c_in {
                            for dy in 0..k {
                                for dx in 0..k {
                                    let (yy, xx) = (
                                        py as isize + dy as isize - p,
                                        px as isize + dx as isize - p,
                                    );
                                    if yy < 0 || xx < 0 || yy >= h as isize || xx >= wd as isize {
                                        continue;
                                    }
                                    let xv = r(x[(c * h + yy as usize) * wd + xx as usize]);
                                    let wv = f64::from(f32::from_bits(
                                        u32::from(w[o * d_in + (c * k + dy) * k + dx]) << 16,
                                    ));
                                    s += xv * wv;
                                }
                            }
                        }
                        worst = worst.max((f64::from(y[(o * h + py) * wd + px]) - s).abs());
                    }
                }
            }
            assert!(worst < 1e-4, "[{c_in}, {h}, {wd}] k {k} → {out}: {worst}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let Some(path) = Bf16Gemm::best() else {
            return;
        };
        let x = vec![0.0; 3 * 4 * 4];
        let w = vec![0u16; 32 * 27];
        let mut y = vec![0.0; 32 * 16];
        // 3·3·3 = 27 inputs: not a multiple of 32.
        let got = conv_same_bf16(path, &x, (3, 4, 4), &w, 3, &[0.0; 32], &mut y);
        assert!(matches!(got, Err(Error::InvalidInput(_))));
        let got = conv_same_bf16(path, &x, (3, 4, 4), &w, 2, &[0.0; 32], &mut y);
        assert!(matches!(got, Err(Error::InvalidInput(_))));
    }
}
