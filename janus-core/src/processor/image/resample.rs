//! Antialiased bicubic resizing in fixed point, separable, with a rounded and clipped `u8`
//! image between the passes. What differs between the references lives in one file each:
//! [`pillow`] (Pillow's kernel, 22-bit coefficients, its pass order) and [`torch`] (PyTorch's
//! CPU uint8 kernel, `i16` coefficients with a per-pass precision).

use image::RgbImage;

use super::config::Resampler;

mod pillow;
mod torch;

/// Resizes `img` to `width` x `height` with the antialiased bicubic kernel `resampler` (see
/// [`Resampler`]). Sizes equal to the input's return a copy; a zero target or source size gives
/// an image of the target size filled with zeros.
pub fn resize_bicubic(
    img: &RgbImage,
    width: usize,
    height: usize,
    resampler: Resampler,
) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 || w == 0 || h == 0 {
        return RgbImage::new(width as u32, height as u32);
    }
    let vertical_first =
        resampler == Resampler::Pillow && pillow::vertical_first((w, h), (width, height));
    let mut data = img.as_raw().clone();
    if vertical_first {
        if height != h {
            data = vertical(&data, w, &Pass::new(h, height, resampler));
        }
        if width != w {
            data = horizontal(&data, w, height, &Pass::new(w, width, resampler));
        }
    } else {
        if width != w {
            data = horizontal(&data, w, h, &Pass::new(w, width, resampler));
        }
        if height != h {
            data = vertical(&data, width, &Pass::new(h, height, resampler));
        }
    }
    RgbImage::from_raw(width as u32, height as u32, data)
        .expect("buffer length matches the dimensions")
}

/// The fixed-point filter of one resampling pass.
pub(super) struct Pass {
    /// `(first input index, number of taps)` per output index.
    pub(super) bounds: Vec<(usize, usize)>,
    /// Taps per output index in `coeffs` (the maximum number of taps).
    pub(super) ksize: usize,
    pub(super) coeffs: Vec<i32>,
    /// Fractional bits of `coeffs`.
    pub(super) precision: u32,
}

/// A weight in fixed point: rounded half away from zero, truncated to `i32` as C's cast does.
fn round_half_away(v: f64) -> i32 {
    if v < 0.0 {
        (-0.5 + v) as i32
    } else {
        (0.5 + v) as i32
    }
}

impl Pass {
    pub(super) fn new(in_size: usize, out_size: usize, resampler: Resampler) -> Pass {
        let filter: fn(f64) -> f64 = match resampler {
            Resampler::Pillow | Resampler::PillowHorizontalFirst => pillow::cubic,
            Resampler::TorchUint8 => torch::cubic,
        };
        let scale = in_size as f64 / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = 2.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0f64; out_size * ksize];
        let mut wt_max = 0f64;
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) conversion truncates toward zero, as `as i64` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let xmin = xmin as usize;
            let k = &mut weights[xx * ksize..xx * ksize + n];
            let mut total = 0f64;
            for (x, w) in k.iter_mut().enumerate() {
                *w = filter(((x + xmin) as f64 - center + 0.5) * inv);
                total += *w;
            }
            if total != 0.0 {
                for w in k.iter_mut() {
                    *w /= total;
                    wt_max = wt_max.max(*w);
                }
            }
            bounds.push((xmin, n));
        }
        let (precision, quantize): (u32, fn(f64) -> i32) = match resampler {
            Resampler::Pillow | Resampler::PillowHorizontalFirst => {
                (pillow::PRECISION, pillow::quantize)
            }
            Resampler::TorchUint8 => (torch::precision(wt_max), torch::quantize),
        };
        let unit = f64::from(1u32 << precision);
        let coeffs = weights.iter().map(|&w| quantize(w * unit)).collect();
        Pass {
            bounds,
            ksize,
            coeffs,
            precision,
        }
    }

    #[inline]
    pub(super) fn taps(&self, out_index: usize) -> (usize, &[i32]) {
        let (xmin, n) = self.bounds[out_index];
        let k = &self.coeffs[out_index * self.ksize..out_index * self.ksize + n];
        (xmin, k)
    }

    #[inline]
    fn clip(&self, acc: i64) -> u8 {
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// Horizontal pass over an RGB buffer `w` x `h` → `pass.bounds.len()` x `h`.
fn horizontal(src: &[u8], w: usize, h: usize, pass: &Pass) -> Vec<u8> {
    let ow = pass.bounds.len();
    let mut out = vec![0u8; ow * h * 3];
    let round = 1i64 << (pass.precision - 1);
    for y in 0..h {
        let row = &src[y * w * 3..(y + 1) * w * 3];
        let orow = &mut out[y * ow * 3..(y + 1) * ow * 3];
        for xx in 0..ow {
            let (xmin, k) = pass.taps(xx);
            let mut acc = [round; 3];
            for (i, &kv) in k.iter().enumerate() {
                let p = &row[(xmin + i) * 3..(xmin + i) * 3 + 3];
                for c in 0..3 {
                    acc[c] += i64::from(kv) * i64::from(p[c]);
                }
            }
            for c in 0..3 {
                orow[xx * 3 + c] = pass.clip(acc[c]);
            }
        }
    }
    out
}

/// Vertical pass over an RGB buffer of width `w` → `w` x `pass.bounds.len()`.
fn vertical(src: &[u8], w: usize, pass: &Pass) -> Vec<u8> {
    let oh = pass.bounds.len();
    let stride = w * 3;
    let mut out = vec![0u8; oh * stride];
    let round = 1i64 << (pass.precision - 1);
    let mut acc = vec![0i64; stride];
    for yy in 0..oh {
        let (ymin, k) = pass.taps(yy);
        acc.iter_mut().for_each(|a| *a = round);
        for (i, &kv) in k.iter().enumerate() {
            let row = &src[(ymin + i) * stride..(ymin + i + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i64::from(kv) * i64::from(p);
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *o = pass.clip(a);
        }
    }
    out
}
