//! 3×3 stride-1 "same" convolutions in f32 by Winograd's minimal filtering F(4×4, 3×3) (Lavin and
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 4×4 block of outputs comes from the 6×6 block of inputs around it: both the input block
//! (`V = Bᵀ·d·B`) and each 3×3 filter (`U = G·g·Gᵀ`) are taken to 6×6 transformed tiles, where
//! the convolution becomes 36 independent sums over the input channels, `M[ξ] = V[ξ]·U[ξ]` (one
//! matrix product per point ξ of the tile, tiles × channels by channels × outputs, run on
//! `gemm`), and the outputs are `Y = Aᵀ·M·A`. That is 36 multiplications per input–output channel
//! pair and block instead of 144: the decoder of the VQ tokenizer, whose 3×3 convolutions at
//! 128–512 channels are almost all of its arithmetic, does a quarter of the products an im2col
//! convolution does. The transforms are additions and small constant multiples, vectorised over
//! channels; the rounding they add stays near f32's own (the tests bound it against the
//! definition in f64).
//!
//! The image is processed a band of tile rows at a time, so the transformed tiles of a band
//! (`V`, `M`) stay a few MiB whatever the image size.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::KernelPath;
use super::dispatch::{message, pick};
use crate::error::{Error, Result};

/// How the CPU computes f32 3×3 convolutions of at least [`MIN_CHANNELS`] channels in and out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvAlgo {
    /// Winograd F(4×4, 3×3) ([`conv3x3_same`]); the default.
    Winograd,
    /// The backend's convolution (im2col and GEMM), which every shape takes otherwise.
    Im2col,
}

/// The environment variable that picks the algorithm (`auto`, `winograd`, `im2col`).
pub const ENV: &str = "JANUS_CONV";

impl ConvAlgo {
    /// Every algorithm.
    pub const ALL: [ConvAlgo; 2] = [ConvAlgo::Winograd, ConvAlgo::Im2col];

    /// The name `JANUS_CONV` uses.
    pub fn name(self) -> &'static str {
        match self {
            ConvAlgo::Winograd => "winograd",
            ConvAlgo::Im2col => "im2col",
        }
    }

    /// Reads an algorithm by name (`auto` is Winograd).
    pub fn parse(name: &str) -> Result<ConvAlgo> {
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() || name == "auto" {
            return Ok(ConvAlgo::Winograd);
        }
        pick(ENV, &name, &Self::ALL, Self::name, |_| true, "auto, ")
    }

    /// The algorithm of this process: `JANUS_CONV` if set, else Winograd. Read once.
    pub fn selected() -> Result<ConvAlgo> {
        static SELECTED: OnceLock<std::result::Result<ConvAlgo, String>> = OnceLock::new();
        SELECTED
            .get_or_init(|| match std::env::var(ENV) {
                Ok(v) => Self::parse(&v).map_err(message),
                Err(_) => Ok(ConvAlgo::Winograd),
            })
            .clone()
            .map_err(Error::InvalidInput)
    }
}

/// Outputs per tile side.
const M: usize = 4;
/// Inputs per tile side (`M + 3 − 1`).
const N: usize = 6;
/// Points of a transformed tile.
const P: usize = N * N;

/// Fewest input and output channels the transformed form is used for: below it the products are
/// too narrow for the transforms to pay (a decoder's last convolution, to 3 colour channels).
pub const MIN_CHANNELS: usize = 8;

/// Bytes the transformed tiles of one band (`V` and `M`) take at most, unless a single tile row
/// needs more.
const BAND_BYTES: usize = 8 << 20;

/// Whether the transformed form takes a convolution of these channel counts.
pub fn applies(c_in: usize, out: usize) -> bool {
    c_in >= MIN_CHANNELS && out >= MIN_CHANNELS
}

/// `y[o][p] = bias[o] + Σ_{c,dy,dx} x[c][p + (dy − 1, dx − 1)] · w[o][c][dy][dx]` for one image `x`
/// `[c_in, h, wd]` (zero outside it), `w` `[out, c_in, 3, 3]`, `y` `[out, h, wd]`: a 3×3
/// convolution with stride 1 and one pixel of zero padding, as PyTorch's `conv2d` computes it.
///
/// # Errors
/// [`Error::InvalidInput`] when the slices do not match the shapes or this CPU cannot run
/// `path`.
pub fn conv3x3_same(
    path: KernelPath,
    x: &[f32],
    (c_in, h, wd): (usize, usize, usize),
    w: &[f32],
    bias: &[f32],
    y: &mut [f32],
) -> Result<()> {
    convolve(path, x, (c_in, h, wd), w, bias, y, BAND_BYTES)
}

/// [`conv3x3_same`] with bands of transformed tiles of about `band_bytes`.
fn convolve(
    path: KernelPath,
    x: &[f32],
    (c_in, h, wd): (usize, usize, usize),
    w: &[f32],
    bias: &[f32],
    y: &mut [f32],
    band_bytes: usize,
) -> Result<()> {
    let out = bias.len();
    let bad = |msg: String| Err(Error::InvalidInput(format!("Winograd convolution: {msg}")));
    if x.len() != c_in * h * wd || w.len() != out * c_in * 9 || y.len() != out * h * wd {
        return bad(format!(
            "x {}, w {}, y {} values for [{c_in}, {h}, {wd}] → [{out}, {h}, {wd}]",
            x.len(),
            w.len(),
            y.len()
        ));
    }
    if !path.supported() {
        return bad(format!("this CPU cannot run the {} path", path.name()));
    }
    let plane = h * wd;
    if plane == 0 || out == 0 {
        return Ok(());
    }
    if c_in == 0 {
        for (dst, &b) in y.chunks_exact_mut(plane).zip(bias) {
            dst.fill(b);
        }
        return Ok(());
    }
    let u = weight_tiles(path, w, c_in, out);
    let (th, tw) = (h.div_ceil(M), wd.div_ceil(M));
    let per_band = band_bytes / (P * 4 * (c_in + out));
    let band_rows = (per_band / tw).clamp(1, th);
    // A band's input rows with a border of one zero pixel, channels last: row `rr`, column `cc`
    // hold the image's pixel (`M·ti + rr − 1`, `cc − 1`).
    let cols = M * tw + 2;
    let mut xs = vec![0.0f32; (M * band_rows + 2) * cols * c_in];
    // The band's transformed input, `[tile][ξ][c_in]`, and products, `[ξ][out][tile]`.
    let mut v = vec![0.0f32; band_rows * tw * P * c_in];
    let mut m = vec![0.0f32; P * band_rows * tw * out];
    let mut ti = 0;
    while ti < th {
        let rows = band_rows.min(th - ti);
        let tiles = rows * tw;
        let xs = &mut xs[..(M * rows + 2) * cols * c_in];
        gather_band(x, (c_in, h, wd), M * ti, cols, xs);
        let xs = &*xs;
        let v = &mut v[..tiles * P * c_in];
        v.par_chunks_mut(P * c_in)
            .with_min_len(4)
            .enumerate()
            .for_each(|(k, vt)| {
                let at = ((k / tw) * M * cols + (k % tw) * M) * c_in;
                input_tile(path, &xs[at..], cols * c_in, c_in, vt);
            });
        let v = &*v;
        let m = &mut m[..P * tiles * out];
        m.par_chunks_mut(out * tiles)
            .enumerate()
            .for_each(|(xi, dst)| {
                // M[ξ]ᵀ = U[ξ]ᵀ·V[ξ]ᵀ, so that the output transform reads consecutive tiles.
                // SAFETY: dst is `[out, tiles]` row-major (row stride tiles); the left operand
                // U[ξ]ᵀ `[out, c_in]` is read from `u` (`[c_in][P][out]`: column stride P·out,
                // offset ξ·out); the right one V[ξ]ᵀ `[c_in, tiles]` from `v`
                // (`[tiles][P][c_in]`: column stride P·c_in, offset ξ·c_in). Every index the
                // product reads or writes is inside those buffers.
                unsafe {
                    gemm::gemm(
                        out,
                        tiles,
                        c_in,
                        dst.as_mut_ptr(),
                        1,
                        tiles as isize,
                        false,
                        u.as_ptr().add(xi * out),
                        (P * out) as isize,
                        1,
                        v.as_ptr().add(xi * c_in),
                        (P * c_in) as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
        let band = Band {
            m,
            tiles,
            out,
            first_row: M * ti,
            tw,
            h,
            wd,
        };
        y.par_chunks_mut(plane)
            .zip(bias.par_iter())
            .enumerate()
            .for_each(|(o, (dst, &b))| output_tiles(path, &band, o, b, dst));
        ti += rows;
    }
    Ok(())
}

/// Rows `first − 1 ..` of the image (those one band reads) into `xs`, channels last, with zeros
/// outside the image.
fn gather_band(
    x: &[f32],
    (c_in, h, wd): (usize, usize, usize),
    first: usize,
    cols: usize,
    xs: &mut [f32],
) {
    xs.par_chunks_mut(cols * c_in)
        .enumerate()
        .for_each(|(rr, dst)| {
            let Some(r) = (first + rr).checked_sub(1).filter(|&r| r < h) else {
                dst.fill(0.0);
                return;
            };
            // The border columns; the image's columns are all written below.
            dst[..c_in].fill(0.0);
            dst[(wd + 1) * c_in..].fill(0.0);
            for (c, plane) in x.chunks_exact(h * wd).enumerate() {
                let src = &plane[r * wd..(r + 1) * wd];
                for (q, &value) in src.iter().enumerate() {
                    dst[(q + 1) * c_in + c] = value;
                }
            }
        });
}

/// One band's products for the output transform.
struct Band<'a> {
    /// `[ξ][out][tile]`.
    m: &'a [f32],
    tiles: usize,
    out: usize,
    /// The band's first output row.
    first_row: usize,
    /// Tiles per row.
    tw: usize,
    h: usize,
    wd: usize,
}

/// Runs `body` compiled for the instructions of `path`, with the lane count that fills its
/// vectors; the generic loops inside are `#[inline(always)]`, so they are vectorised for it.
macro_rules! on_path {
    ($path:expr, |$lanes:ident| $body:expr) => {
        match $path {
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => {
                const $lanes: usize = 16;
                // SAFETY: the path was checked to be supported by this CPU.
                unsafe { simd::on_avx512(|| $body) }
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => {
                const $lanes: usize = 8;
                // SAFETY: as above.
                unsafe { simd::on_avx2(|| $body) }
            }
            _ => {
                const $lanes: usize = 8;
                $body
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod simd {
    /// Runs `f` (inlined here) with AVX2 and FMA enabled.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn on_avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    /// Runs `f` (inlined here) with AVX-512 enabled.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn on_avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// `block(i, true)` for each block of `L` indices from `start` that ends by `end`, then
/// `block(i, false)` for each index left (one lane at a time).
#[inline(always)]
fn by_lanes<const L: usize>(start: usize, end: usize, mut block: impl FnMut(usize, bool)) {
    let mut i = start;
    while i + L <= end {
        block(i, true);
        i += L;
    }
    while i < end {
        block(i, false);
        i += 1;
    }
}

/// `Bᵀ·d` for a column of six inputs, lane by lane.
#[inline(always)]
fn bt<const L: usize>(d: &[[f32; L]; N]) -> [[f32; L]; N] {
    let mut v = [[0.0f32; L]; N];
    for l in 0..L {
        let [d0, d1, d2, d3, d4, d5] = [d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]];
        v[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        v[1][l] = -4.0 * (d1 + d2) + d3 + d4;
        v[2][l] = 4.0 * (d1 - d2) - d3 + d4;
        v[3][l] = 2.0 * (d3 - d1) - d2 + d4;
        v[4][l] = 2.0 * (d1 - d3) - d2 + d4;
        v[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    v
}

/// `G·g` for a column of three filter taps, lane by lane.
#[inline(always)]
fn gt<const L: usize>(g: &[[f32; L]; 3]) -> [[f32; L]; N] {
    let mut u = [[0.0f32; L]; N];
    for l in 0..L {
        let [g0, g1, g2] = [g[0][l], g[1][l], g[2][l]];
        u[0][l] = g0 / 4.0;
        u[1][l] = -(g0 + g1 + g2) / 6.0;
        u[2][l] = -(g0 - g1 + g2) / 6.0;
        u[3][l] = g0 / 24.0 + g1 / 12.0 + g2 / 6.0;
        u[4][l] = g0 / 24.0 - g1 / 12.0 + g2 / 6.0;
        u[5][l] = g2;
    }
    u
}

/// `Aᵀ·m` for a column of six products, lane by lane.
#[inline(always)]
fn at<const L: usize>(m: &[[f32; L]; N]) -> [[f32; L]; M] {
    let mut o = [[0.0f32; L]; M];
    for l in 0..L {
        let [m0, m1, m2, m3, m4, m5] = [m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]];
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        o[0][l] = m0 + s12 + s34;
        o[1][l] = d12 + 2.0 * d34;
        o[2][l] = s12 + 4.0 * s34;
        o[3][l] = d12 + 8.0 * d34 + m5;
    }
    o
}

/// The transformed filters `U`, `[c_in][ξ][out]`, of `w` `[out, c_in, 3, 3]`.
fn weight_tiles(path: KernelPath, w: &[f32], c_in: usize, out: usize) -> Vec<f32> {
    let mut u = vec![0.0f32; c_in * P * out];
    u.par_chunks_mut(P * out).enumerate().for_each(|(c, uc)| {
        on_path!(path, |LANES| by_lanes::<LANES>(0, out, |o, full| {
            if full {
                weight_block::<LANES>(w, c_in, c, o, uc)
            } else {
                weight_block::<1>(w, c_in, c, o, uc)
            }
        }))
    });
    u
}

/// `U` of input channel `c` for outputs `o..o + L`, into `uc` (`[ξ][out]`).
#[inline(always)]
fn weight_block<const L: usize>(w: &[f32], c_in: usize, c: usize, o: usize, uc: &mut [f32]) {
    let out = uc.len() / P;
    // g[dy][dx], lane l: output o + l.
    let mut g = [[[0.0f32; L]; 3]; 3];
    for l in 0..L {
        let taps = &w[((o + l) * c_in + c) * 9..][..9];
        for (k, &t) in taps.iter().enumerate() {
            g[k / 3][k % 3][l] = t;
        }
    }
    // G·g column by column, then (G·g)·Gᵀ row by row.
    let cols = [0, 1, 2].map(|dx| gt(&[g[0][dx], g[1][dx], g[2][dx]]));
    for r in 0..N {
        let row = gt(&[cols[0][r], cols[1][r], cols[2][r]]);
        for (s, lanes) in row.iter().enumerate() {
            uc[(r * N + s) * out + o..][..L].copy_from_slice(lanes);
        }
    }
}

/// `V` of one tile, `[ξ][c_in]`, from the band at the tile's top-left input (`xs`, rows
/// `row` values apart, channels last).
fn input_tile(path: KernelPath, xs: &[f32], row: usize, c_in: usize, vt: &mut [f32]) {
    on_path!(path, |LANES| by_lanes::<LANES>(0, c_in, |c, full| {
        if full {
            input_block::<LANES>(xs, row, c_in, c, vt)
        } else {
            input_block::<1>(xs, row, c_in, c, vt)
        }
    }))
}

/// `V = Bᵀ·d·B` for channels `c..c + L` of one tile.
#[inline(always)]
fn input_block<const L: usize>(xs: &[f32], row: usize, c_in: usize, c: usize, vt: &mut [f32]) {
    // (Bᵀ·d) column by column: t[r][s].
    let mut t = [[[0.0f32; L]; N]; N];
    for s in 0..N {
        let mut d = [[0.0f32; L]; N];
        for (r, lanes) in d.iter_mut().enumerate() {
            lanes.copy_from_slice(&xs[r * row + s * c_in + c..][..L]);
        }
        for (r, lanes) in bt(&d).into_iter().enumerate() {
            t[r][s] = lanes;
        }
    }
    // (Bᵀ·d)·B row by row.
    for (r, tr) in t.iter().enumerate() {
        for (s, lanes) in bt(tr).iter().enumerate() {
            vt[(r * N + s) * c_in + c..][..L].copy_from_slice(lanes);
        }
    }
}

/// `Y = Aᵀ·M·A` plus the bias for output `o` of every tile of the band, into its plane of `y`
/// (`plane`, `[h, wd]`), `L` consecutive tiles of a tile row at a time.
fn output_tiles(path: KernelPath, band: &Band<'_>, o: usize, bias: f32, plane: &mut [f32]) {
    on_path!(path, |LANES| {
        for k0 in (0..band.tiles).step_by(band.tw) {
            by_lanes::<LANES>(k0, k0 + band.tw, |k, full| {
                if full {
                    output_block::<LANES>(band, k, o, bias, plane)
                } else {
                    output_block::<1>(band, k, o, bias, plane)
                }
            });
        }
    })
}

/// Output `o` of tiles `k..k + L` (one tile row).
#[inline(always)]
fn output_block<const L: usize>(band: &Band<'_>, k: usize, o: usize, bias: f32, plane: &mut [f32]) {
    let stride = band.out * band.tiles;
    let first = o * band.tiles + k;
    // (Aᵀ·M) column by column: t[a][s].
    let mut t = [[[0.0f32; L]; N]; M];
    for s in 0..N {
        let mut col = [[0.0f32; L]; N];
        for (r, lanes) in col.iter_mut().enumerate() {
            lanes.copy_from_slice(&band.m[(r * N + s) * stride + first..][..L]);
        }
        for (ta, lanes) in t.iter_mut().zip(at(&col)) {
            ta[s] = lanes;
        }
    }
    let (row0, col0) = (band.first_row + (k / band.tw) * M, (k % band.tw) * M);
    // The block's columns inside the image (the last tile of a row may reach past it).
    let width = (M * L).min(band.wd - col0);
    for (a, ta) in t.iter().enumerate() {
        let r = row0 + a;
        if r >= band.h {
            break;
        }
        let ys = at(ta);
        let mut row = [[0.0f32; M]; L];
        for (l, px) in row.iter_mut().enumerate() {
            for (b, v) in px.iter_mut().enumerate() {
                *v = ys[b][l] + bias;
            }
        }
        plane[r * band.wd + col0..][..width].copy_from_slice(&row.as_flattened()[..width]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(i: usize, salt: usize) -> f32 {
        ((i * 7919 + salt * 104_729 + 3) % 211) as f32 / 105.5 - 1.0
    }

    /// The definition, in f64.
    fn reference(
        x: &[f32],
        (c_in, h, wd): (usize, usize, usize),
        w: &[f32],
        bias: &[f32],
    ) -> Vec<f64> {
        let out = bias.len();
        let mut y = vec![0.0f64; out * h * wd];
        for o in 0..out {
            for r in 0..h {
                for q in 0..wd {
                    let mut acc = f64::from(bias[o]);
                    for c in 0..c_in {
                        for dy in 0..3 {
                            for dx in 0..3 {
                                let (rr, qq) = (r + dy, q + dx);
                                if rr < 1 || qq < 1 || rr > h || qq > wd {
                                    continue;
                                }
                                acc += f64::from(x[(c * h + rr - 1) * wd + qq - 1])
                                    * f64::from(w[((o * c_in + c) * 3 + dy) * 3 + dx]);
                            }
                        }
                    }
                    y[(o * h + r) * wd + q] = acc;
                }
            }
        }
        y
    }

    /// Every path, sizes that are and are not multiples of the tile and of the lanes, against
    /// the definition.
    #[test]
    fn every_path_computes_the_convolution() {
        for (c_in, out, h, wd) in [
            (8, 8, 4, 4),
            (9, 17, 7, 5),
            (16, 32, 13, 21),
            (3, 5, 1, 1),
            (24, 40, 30, 9),
            // Rows of 8 and 16 tiles whose last one is cut by the image's edge, and of 18.
            (8, 8, 5, 30),
            (8, 9, 6, 62),
            (10, 8, 9, 70),
        ] {
            let x: Vec<f32> = (0..c_in * h * wd).map(|i| value(i, 1)).collect();
            let w: Vec<f32> = (0..out * c_in * 9).map(|i| value(i, 2) * 0.3).collect();
            let bias: Vec<f32> = (0..out).map(|i| value(i, 3)).collect();
            let want = reference(&x, (c_in, h, wd), &w, &bias);
            let scale = (c_in * 9) as f64;
            for path in KernelPath::available() {
                let mut y = vec![f32::NAN; out * h * wd];
                conv3x3_same(path, &x, (c_in, h, wd), &w, &bias, &mut y).unwrap();
                let worst = y
                    .iter()
                    .zip(&want)
                    .map(|(&g, &e)| (f64::from(g) - e).abs())
                    .fold(0.0f64, f64::max);
                // f32 sums of c_in·9 terms of magnitude ≤ 0.3, plus the transforms' rounding
                // (measured: 1e-6 to 1.1e-5, up to a quarter of this bound).
                assert!(
                    worst < 2e-7 * scale,
                    "{path:?} [{c_in},{h},{wd}] → {out}: {worst}"
                );
            }
        }
    }

    #[test]
    fn a_band_boundary_inside_the_image_changes_nothing() {
        let (c_in, out, h, wd) = (16, 24, 19, 13);
        let x: Vec<f32> = (0..c_in * h * wd).map(|i| value(i, 4)).collect();
        let w: Vec<f32> = (0..out * c_in * 9).map(|i| value(i, 5) * 0.05).collect();
        let bias: Vec<f32> = (0..out).map(|i| value(i, 6)).collect();
        let mut whole = vec![f32::NAN; out * h * wd];
        conv3x3_same(KernelPath::best(), &x, (c_in, h, wd), &w, &bias, &mut whole).unwrap();
        // Bands of one tile row (the smallest), and of two.
        for band_bytes in [1, 2 * wd.div_ceil(M) * P * 4 * (c_in + out)] {
            let mut y = vec![f32::NAN; out * h * wd];
            convolve(
                KernelPath::best(),
                &x,
                (c_in, h, wd),
                &w,
                &bias,
                &mut y,
                band_bytes,
            )
            .unwrap();
            assert_eq!(y, whole, "bands of {band_bytes} bytes");
        }
        let want = reference(&x, (c_in, h, wd), &w, &bias);
        for (i, (&g, &e)) in whole.iter().zip(&want).enumerate() {
            assert!((f64::from(g) - e).abs() < 1e-3, "{i}: {g} vs {e}");
        }
    }

    #[test]
    fn shapes_that_do_not_match_are_errors() {
        let mut y = vec![0.0f32; 8 * 16];
        let err = conv3x3_same(
            KernelPath::Portable,
            &[0.0; 8 * 15],
            (8, 4, 4),
            &[0.0; 8 * 8 * 9],
            &[0.0; 8],
            &mut y,
        );
        assert!(matches!(err, Err(Error::InvalidInput(_))));
        // No input channels: the bias alone.
        let mut y = vec![0.0f32; 2 * 4];
        conv3x3_same(
            KernelPath::Portable,
            &[],
            (0, 2, 2),
            &[],
            &[1.0, 2.0],
            &mut y,
        )
        .unwrap();
        assert_eq!(y, [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
    }

    #[test]
    fn names_parse_back() {
        for a in ConvAlgo::ALL {
            assert_eq!(ConvAlgo::parse(a.name()).unwrap(), a);
        }
        assert_eq!(ConvAlgo::parse("auto").unwrap(), ConvAlgo::Winograd);
        assert!(matches!(
            ConvAlgo::parse("fft"),
            Err(Error::InvalidInput(_))
        ));
    }
}
