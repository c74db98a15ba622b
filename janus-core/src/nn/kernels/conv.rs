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
    if path == Bf16Gemm::Amx && direct::applies(c_in, out, wd) {
        direct::conv(x, (c_in, h, wd), w, k, bias, y);
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
                    *d = super::simd::bf16_bits(v);
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

mod direct {
    //! The AMX convolution without unfolding: a `k×k` convolution is `k²` shifted products
    //! summed in the same tiles. The image is held as bf16 channel pairs with a zero border
    //! (`[c_in/2, h + 2p, w + 2p]` pairs), so the right operand of tap `(dy, dx)` for 32 input
    //! channels and 16 pixels of a row is 16 rows of 64 bytes one channel-pair plane apart; the
    //! weights are laid out a tile after another (16 outputs × 32 input channels of one tap).
    //! Results are 2×2 tiles of 16 output channels × 16 pixels, started from the bias and
    //! stored channel-first straight into `y`. A row's last tile may overlap the one before it
    //! (it then writes the same values again), so any width from 16 up is covered.

    use super::super::bf16_gemm::amx::{Config, TILE};
    use super::super::prefer_huge_pages;
    use super::super::simd::bf16_bits;
    use rayon::prelude::*;

    /// Whether the direct form takes this shape: whole tiles of input channels and outputs, rows
    /// at least a tile wide.
    pub fn applies(c_in: usize, out: usize, wd: usize) -> bool {
        c_in.is_multiple_of(32) && out.is_multiple_of(32) && wd >= TILE
    }

    /// Output rows one task computes for one block of 32 output channels.
    const ROWS_PER_TASK: usize = 4;

    /// See [`conv_same_bf16`](super::conv_same_bf16); the shape passed [`applies`].
    pub fn conv(
        x: &[f32],
        (c_in, h, wd): (usize, usize, usize),
        w: &[u16],
        k: usize,
        bias: &[f32],
        y: &mut [f32],
    ) {
        let out = bias.len();
        let p = k / 2;
        let (ph, pw) = (h + 2 * p, wd + 2 * p);
        let plane = ph * pw;
        // The image as bordered channel pairs.
        let mut xp = vec![0u32; c_in / 2 * plane];
        prefer_huge_pages(&mut xp);
        xp.par_chunks_mut(plane).enumerate().for_each(|(cp, dst)| {
            let (a, b) = (
                &x[2 * cp * h * wd..][..h * wd],
                &x[(2 * cp + 1) * h * wd..][..h * wd],
            );
            super::super::simd::widest(
                #[inline(always)]
                || {
                    for r in 0..h {
                        let row = &mut dst[(r + p) * pw + p..][..wd];
                        let (a, b) = (&a[r * wd..][..wd], &b[r * wd..][..wd]);
                        for ((d, &lo), &hi) in row.iter_mut().zip(a).zip(b) {
                            let (lo, hi) = (bf16_bits(lo), bf16_bits(hi));
                            *d = u32::from(lo) | (u32::from(hi) << 16);
                        }
                    }
                },
            )
        });
        // The weights a tile after another: output block ob (16), tap t, input block ib (32).
        let (taps, blocks) = (k * k, c_in / 32);
        let tile = TILE * 32;
        let mut wt = vec![0u16; out * c_in * taps];
        wt.par_chunks_mut(taps * blocks * tile)
            .enumerate()
            .for_each(|(ob, dst)| {
                for t in 0..taps {
                    for ib in 0..blocks {
                        let tile_dst = &mut dst[(t * blocks + ib) * tile..][..tile];
                        for r in 0..TILE {
                            let o = ob * TILE + r;
                            for i in 0..32 {
                                tile_dst[r * 32 + i] =
                                    w[o * c_in * taps + (ib * 32 + i) * taps + t];
                            }
                        }
                    }
                }
            });
        // Bias tiles: output block ob, every column its channel's bias.
        let bt: Vec<f32> = (0..out)
            .flat_map(|o| std::iter::repeat_n(bias[o], TILE))
            .collect();
        // Tile starts along a row: every 16 pixels, the last one flush with the row's end, in
        // pairs (an odd count repeats the last).
        let mut starts: Vec<usize> = (0..wd / TILE).map(|i| i * TILE).collect();
        if !wd.is_multiple_of(TILE) {
            starts.push(wd - TILE);
        }
        if starts.len() % 2 == 1 {
            starts.push(*starts.last().expect("a row is at least one tile wide"));
        }
        let y = super::super::bf16_gemm::Out(y.as_mut_ptr());
        let bands = h.div_ceil(ROWS_PER_TASK);
        (0..out / 32 * bands).into_par_iter().for_each(|task| {
            let (pair, band) = (task / bands, task % bands);
            let rows = band * ROWS_PER_TASK..((band + 1) * ROWS_PER_TASK).min(h);
            // SAFETY: this task writes output channels 32·pair.. of rows `rows` only; AMX was
            // found usable by the caller; the buffers have the layouts described above.
            unsafe {
                tiles(
                    &xp,
                    (ph, pw, plane),
                    &wt,
                    (taps, blocks, k),
                    &bt,
                    pair,
                    rows,
                    &starts,
                    (h, wd),
                    y,
                )
            };
        });
    }

    /// Output channels `32·pair..32·pair + 32` of rows `rows`.
    ///
    /// # Safety
    /// AMX must be usable; the buffers as [`conv`] lays them out; no other writer of these
    /// outputs.
    #[cfg(target_arch = "x86_64")]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles(
        xp: &[u32],
        (_ph, pw, plane): (usize, usize, usize),
        wt: &[u16],
        (taps, blocks, k): (usize, usize, usize),
        bt: &[f32],
        pair: usize,
        rows: std::ops::Range<usize>,
        starts: &[usize],
        (h, wd): (usize, usize),
        y: super::super::bf16_gemm::Out,
    ) {
        use std::arch::asm;
        let config = Config::new();
        let tile = TILE * 32;
        let per_block = taps * blocks * tile;
        let (a0, a1) = (
            wt[2 * pair * per_block..].as_ptr(),
            wt[(2 * pair + 1) * per_block..].as_ptr(),
        );
        let (b0, b1) = (
            bt[2 * pair * TILE * TILE..].as_ptr(),
            bt[(2 * pair + 1) * TILE * TILE..].as_ptr(),
        );
        // Rows of a tile: 64 bytes apart for packed tiles and bias, a channel-pair plane apart
        // for the image, a channel plane apart for the output.
        let (s64, s_img, s_out) = (64usize, plane * 4, h * wd * 4);
        // SAFETY (all asm blocks): the configuration and tiles are this thread's own; every load
        // reads 16 rows of 64 bytes inside `wt`, `bt` or `xp` (the border keeps shifted reads
        // inside the plane; channel block ib reaches plane 16·ib + 15 < c_in/2), every store
        // writes 16 rows of 64 bytes inside `y` (16 channels of `out`, 16 pixels of a row).
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
            for py in rows {
                for sp in starts.chunks_exact(2) {
                    asm!(
                        "tileloadd tmm0, [{b0} + {s}*1]",
                        "tileloadd tmm1, [{b0} + {s}*1]",
                        "tileloadd tmm2, [{b1} + {s}*1]",
                        "tileloadd tmm3, [{b1} + {s}*1]",
                        b0 = in(reg) b0,
                        b1 = in(reg) b1,
                        s = in(reg) s64,
                        options(nostack, readonly)
                    );
                    for t in 0..taps {
                        let (dy, dx) = (t / k, t % k);
                        // Pixel (py, px) at tap (dy, dx) reads bordered pixel (py + dy, px + dx).
                        let at = |px: usize| (py + dy) * pw + px + dx;
                        for ib in 0..blocks {
                            let w_at = (t * blocks + ib) * tile;
                            let x_at = 16 * ib * plane;
                            asm!(
                                "tileloadd tmm4, [{a0} + {s64}*1]",
                                "tileloadd tmm5, [{a1} + {s64}*1]",
                                "tileloadd tmm6, [{x0} + {si}*1]",
                                "tileloadd tmm7, [{x1} + {si}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a0 = in(reg) a0.add(w_at),
                                a1 = in(reg) a1.add(w_at),
                                x0 = in(reg) xp.as_ptr().add(x_at + at(sp[0])),
                                x1 = in(reg) xp.as_ptr().add(x_at + at(sp[1])),
                                s64 = in(reg) s64,
                                si = in(reg) s_img,
                                options(nostack, readonly)
                            );
                        }
                    }
                    let o0 = 32 * pair;
                    let dst = |o: usize, px: usize| y.0.add((o * h + py) * wd + px);
                    asm!(
                        "tilestored [{d0} + {s}*1], tmm0",
                        "tilestored [{d1} + {s}*1], tmm1",
                        "tilestored [{d2} + {s}*1], tmm2",
                        "tilestored [{d3} + {s}*1], tmm3",
                        d0 = in(reg) dst(o0, sp[0]),
                        d1 = in(reg) dst(o0, sp[1]),
                        d2 = in(reg) dst(o0 + TILE, sp[0]),
                        d3 = in(reg) dst(o0 + TILE, sp[1]),
                        s = in(reg) s_out,
                        options(nostack)
                    );
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles(
        _: &[u32],
        _: (usize, usize, usize),
        _: &[u16],
        _: (usize, usize, usize),
        _: &[f32],
        _: usize,
        _: std::ops::Range<usize>,
        _: &[usize],
        _: (usize, usize),
        _: super::super::bf16_gemm::Out,
    ) {
        unreachable!("AMX is x86-64 only")
    }
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

    /// Against the definition, with the operands rounded to bf16 and summed in f64, on every
    /// path, for 3×3 and 1×1 kernels over images whose pixel count is not a multiple of 32:
    /// narrow ones (unfolded) and rows of 16 pixels or more (AMX takes them directly, rows whose
    /// width is not a multiple of 16 or 32 included).
    #[test]
    fn matches_the_definition() {
        let value =
            |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 211) as f32 / 211.0 - 0.5;
        let paths = Bf16Gemm::ALL.into_iter().filter(|p| p.supported());
        let shapes = [
            (32, 3, 64, 7, 9),
            (32, 1, 32, 5, 5),
            (64, 3, 32, 12, 11),
            (32, 3, 64, 5, 16),
            (64, 3, 32, 3, 24),
            (32, 1, 32, 2, 40),
            (32, 3, 32, 6, 33),
        ];
        for (path, (c_in, k, out, h, wd)) in paths.flat_map(|p| shapes.map(|s| (p, s))) {
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
            assert!(
                worst < 1e-4,
                "{}: [{c_in}, {h}, {wd}] k {k} → {out}: {worst}",
                path.name()
            );
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
