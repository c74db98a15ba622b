//! Image loading and preprocessing: the pixels that reach the SigLIP encoder (understanding) and the
//! VQ encoder, computed exactly the way the reference processors compute them.
//!
//! * **Decoding** ([`decode_image`], [`open_image`], [`rgb_from_raw`]): PNG, JPEG, WebP and BMP,
//!   converted to 8-bit RGB the way Pillow's `Image.open(..).convert("RGB")` does (alpha dropped, not
//!   blended; grey and palette expanded; 16-bit RGB reduced to its high byte; 16-bit grey clipped
//!   to 255, Pillow's `I;16 → RGB` rule).
//! * **Understanding input** ([`preprocess_for_understanding`]): scale the longest side to
//!   `image_size` with antialiased bicubic resampling, pad to a square with the background colour
//!   centred, rescale and normalise, as
//!   * the official DeepSeek `VLMImageProcessor` ([`Layout::Original`]): short side
//!     `max(int(short / long * S), min_size)` (float64, truncated), Pillow `BICUBIC`, numpy
//!     arithmetic (`float32(u8 * rescale_factor)` in float64, then `(x - mean) / std` in float32);
//!   * transformers 5 `JanusImageProcessor` ([`Layout::HuggingFace`], the torchvision backend that
//!     `AutoImageProcessor` / `JanusProcessor.from_pretrained` picks): short side
//!     `max(round(short * (S / long)), min_size)` (round half to even), PyTorch's CPU uint8
//!     antialiased bicubic kernel, fused arithmetic `(x - mean / rescale) / (std / rescale)` in
//!     float32.
//! * **VQ input** ([`preprocess_for_vq`]): short side to `size` (Pillow bicubic, torchvision
//!   `Resize(size)` sizing), centre crop (torchvision `CenterCrop` offsets), `(u8 / 255 - 0.5) / 0.5`.
//!
//! The rooms: `decode` (files and buffers to RGB), `config` (the processor settings of both
//! layouts), this module (the two preprocessings), and `resample` with one file per reference
//! resampler (`pillow`, `torch`) over a shared separable fixed-point pass.
//!
//! Both resamplers are Keys cubic convolution (a = -0.5) with the support widened by the downscale
//! factor (antialiasing), separable, with a rounded and clipped `u8` image between the passes;
//! they differ in the fixed-point format of the coefficients (Pillow: 22 fractional bits; PyTorch:
//! `i16` with a per-pass precision), in how the cubic is evaluated, and in the pass order
//! (PyTorch: always horizontal first; Pillow 13: vertical first when the height shrinks much more
//! than the width). Both reproduce their reference bit for bit.

use crate::error::{Error, Result};

mod config;
mod decode;
mod resample;
#[cfg(test)]
mod tests;

pub use config::{
    CLIP_MEAN, CLIP_STD, ImageProcessorConfig, MAX_IMAGE_SIZE, PixelArithmetic, Resampler,
    SizeRounding, background_from_mean,
};
pub use decode::{decode_image, decode_image_within, open_image, open_image_within, rgb_from_raw};
pub use image::RgbImage;
pub use resample::resize_bicubic;

// ------------------------------------------------------------------------------------------------
// Understanding preprocessing
// ------------------------------------------------------------------------------------------------

/// Resizes `img` so that its longer side is `cfg.image_size` (short side by `cfg.rounding`, at
/// least `cfg.min_size`) with `cfg.resampler`, then pads it to an `S` x `S` square filled with
/// `cfg.background_color`, the image placed at row `(S - h) / 2` (wider images) or column
/// `(S - w) / 2` (taller images), rounded down. This is the `u8` image the reference normalises.
///
/// An image with a zero width or height (which the decoders never produce) gives a square of
/// background colour.
pub fn resize_and_pad(img: &RgbImage, cfg: &ImageProcessorConfig) -> RgbImage {
    let s = cfg.image_size;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let bg = image::Rgb(cfg.background_color);
    if w == 0 || h == 0 {
        return RgbImage::from_pixel(s as u32, s as u32, bg);
    }
    let (nw, nh) = cfg.resized_size(w, h);
    let resized = resize_bicubic(img, nw, nh, cfg.resampler);
    let side = nw.max(nh);
    if nw == nh {
        return resized;
    }
    let mut out = RgbImage::from_pixel(side as u32, side as u32, bg);
    let (left, top) = if nw > nh {
        (0, (nw - nh) / 2)
    } else {
        ((nh - nw) / 2, 0)
    };
    let src = resized.as_raw();
    let dst_stride = side * 3;
    let dst = &mut *out;
    for y in 0..nh {
        let d = (top + y) * dst_stride + left * 3;
        dst[d..d + nw * 3].copy_from_slice(&src[y * nw * 3..(y + 1) * nw * 3]);
    }
    out
}

/// The understanding input of one image: [`resize_and_pad`], then rescale and normalise with
/// `cfg`'s arithmetic, as a channel-major `[3, S, S]` buffer (S = `cfg.image_size`) in float32.
/// The reference scripts cast this to bfloat16 before the vision tower.
pub fn preprocess_for_understanding(img: &RgbImage, cfg: &ImageProcessorConfig) -> Vec<f32> {
    let padded = resize_and_pad(img, cfg);
    let n = padded.width() as usize * padded.height() as usize;
    let raw = padded.as_raw();
    let mut out = vec![0f32; 3 * n];
    for c in 0..3 {
        let f = pixel_fn(cfg, c);
        let plane = &mut out[c * n..(c + 1) * n];
        for (i, v) in plane.iter_mut().enumerate() {
            *v = f(raw[i * 3 + c]);
        }
    }
    out
}

/// The per-channel map u8 → float32 of the rescale + normalise step.
fn pixel_fn(cfg: &ImageProcessorConfig, c: usize) -> impl Fn(u8) -> f32 {
    let mean = cfg.image_mean[c];
    let std = cfg.image_std[c];
    let rf = cfg.rescale_factor;
    let (rescale, normalize, arith) = (cfg.do_rescale, cfg.do_normalize, cfg.arithmetic);
    // torchvision backend: mean and std divided by the rescale factor, as float32 products.
    let inv = (1.0 / rf) as f32;
    let (fm, fs) = (mean * inv, std * inv);
    let rf32 = rf as f32;
    move |u: u8| -> f32 {
        match (arith, rescale, normalize) {
            (PixelArithmetic::Numpy, true, true) => ((f64::from(u) * rf) as f32 - mean) / std,
            (PixelArithmetic::Numpy, true, false) => (f64::from(u) * rf) as f32,
            (PixelArithmetic::TorchFused, true, true) => (f32::from(u) - fm) / fs,
            (PixelArithmetic::TorchFused, true, false) => f32::from(u) * rf32,
            (_, false, true) => (f32::from(u) - mean) / std,
            (_, false, false) => f32::from(u),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// VQ preprocessing
// ------------------------------------------------------------------------------------------------

/// Resizes `img` so that its short side is `size` (long side `int(size * long / short)`,
/// torchvision `Resize(size)`) with Pillow bicubic, then crops the centre `size` x `size` square
/// (offset `round((extent - size) / 2)` with round-half-to-even, torchvision `CenterCrop`).
///
/// An image with a zero width or height gives a black square.
///
/// # Errors
/// [`Error::InvalidInput`] when the resized long side would exceed [`MAX_RESIZED_SIDE`] (an
/// image more than ~170 times longer than wide at the VQ's 384: resizing it whole before the
/// crop, as the reference does, would take gigabytes).
pub fn resize_and_center_crop(img: &RgbImage, size: usize) -> Result<RgbImage> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 || size == 0 {
        return Ok(RgbImage::new(size as u32, size as u32));
    }
    let (short, long) = (w.min(h), w.max(h));
    let new_long = ((size as f64 * long as f64) / short as f64) as usize;
    if new_long > MAX_RESIZED_SIDE {
        return Err(Error::InvalidInput(format!(
            "a {w}x{h} image is too elongated: its short side resized to {size} makes the long \
             side {new_long} pixels, more than {MAX_RESIZED_SIDE}"
        )));
    }
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    let resized = resize_bicubic(img, nw, nh, Resampler::Pillow);
    let top = ((nh - size) as f64 / 2.0).round_ties_even() as usize;
    let left = ((nw - size) as f64 / 2.0).round_ties_even() as usize;
    let src = resized.as_raw();
    let mut out = Vec::with_capacity(size * size * 3);
    for y in top..top + size {
        out.extend_from_slice(&src[(y * nw + left) * 3..(y * nw + left + size) * 3]);
    }
    Ok(RgbImage::from_raw(size as u32, size as u32, out)
        .expect("buffer length matches the dimensions"))
}

/// The longest side [`resize_and_center_crop`] resizes to before cropping.
pub const MAX_RESIZED_SIDE: usize = 1 << 16;

/// The VQ encoder input of one image: [`resize_and_center_crop`] to `size`, then
/// `(float32(u8) / 255 - 0.5) / 0.5` in float32, channel-major `[3, size, size]`.
///
/// # Errors
/// As [`resize_and_center_crop`].
pub fn preprocess_for_vq(img: &RgbImage, size: usize) -> Result<Vec<f32>> {
    let crop = resize_and_center_crop(img, size)?;
    let n = size * size;
    let raw = crop.as_raw();
    let mut out = vec![0f32; 3 * n];
    for c in 0..3 {
        for i in 0..n {
            out[c * n + i] = (f32::from(raw[i * 3 + c]) / 255.0 - 0.5) / 0.5;
        }
    }
    Ok(out)
}
