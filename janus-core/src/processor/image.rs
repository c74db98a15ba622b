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
//! Both resamplers are Keys cubic convolution (a = -0.5) with the support widened by the downscale
//! factor (antialiasing), separable, with a rounded and clipped `u8` image between the passes;
//! they differ in the fixed-point format of the coefficients (Pillow: 22 fractional bits; PyTorch:
//! `i16` with a per-pass precision), in how the cubic is evaluated, and in the pass order
//! (PyTorch: always horizontal first; Pillow 13: vertical first when the height shrinks much more
//! than the width). Both reproduce their reference bit for bit.

use std::path::Path;

use serde_json::Value;

use crate::config::{Layout, Obj};
use crate::error::{Error, Result};
use crate::limits::Limits;

pub use image::RgbImage;

// ------------------------------------------------------------------------------------------------
// Decoding
// ------------------------------------------------------------------------------------------------

/// Decodes a PNG, JPEG, WebP or BMP file held in memory into 8-bit RGB, within the default
/// [`Limits`] (see [`decode_image_within`]).
///
/// # Errors
/// As [`decode_image_within`].
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    decode_image_within(bytes, &Limits::default())
}

/// Decodes a PNG, JPEG, WebP or BMP file held in memory into 8-bit RGB.
///
/// The conversion follows Pillow's `Image.open(f).convert("RGB")`: an alpha channel is dropped
/// (not composited over a background), grey and palette images are expanded, 16-bit RGB(A)
/// samples keep their high byte, and 16-bit grey samples are clipped to 255 (Pillow's `I;16`
/// conversion). No EXIF orientation or colour profile is applied (Pillow applies neither either).
/// The image's size is read from its header and checked against `limits.max_image_pixels`
/// before its pixels are decoded.
///
/// # Errors
/// [`Error::InvalidInput`] for empty, truncated or corrupt data, an image with a zero width or
/// height or more pixels than the limit, or a format other than the four above.
pub fn decode_image_within(bytes: &[u8], limits: &Limits) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::InvalidInput("empty image data".into()));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        Error::InvalidInput(
            "unrecognised image data (PNG, JPEG, WebP and BMP are supported)".into(),
        )
    })?;
    let name = match format {
        image::ImageFormat::Png => "PNG",
        image::ImageFormat::Jpeg => "JPEG",
        image::ImageFormat::WebP => "WebP",
        image::ImageFormat::Bmp => "BMP",
        other => {
            return Err(Error::InvalidInput(format!(
                "unsupported image format {other:?} (PNG, JPEG, WebP and BMP are supported)"
            )));
        }
    };
    let reader = || image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    // The decoders report bad data as errors; the unwind guard is a second line of defence for
    // untrusted input (a decoder bug must not take the caller down).
    let corrupt = |e: String| Error::InvalidInput(format!("cannot decode {name} image: {e}"));
    let malformed = || corrupt("the decoder failed on malformed data".into());
    let (width, height) = std::panic::catch_unwind(|| reader().into_dimensions())
        .map_err(|_| malformed())?
        .map_err(|e| corrupt(e.to_string()))?;
    if width == 0 || height == 0 {
        return Err(Error::InvalidInput(format!(
            "{name} image has a zero size ({width}x{height})"
        )));
    }
    limits.check_pixels(u64::from(width), u64::from(height))?;
    // At most 8 bytes a pixel (16-bit RGBA) for the decoded buffer, whatever the header hides.
    let mut decoder_limits = image::Limits::default();
    let largest = limits.max_image_pixels.saturating_mul(8);
    decoder_limits.max_alloc = Some(decoder_limits.max_alloc.unwrap_or(0).max(largest));
    let decoded = std::panic::catch_unwind(|| {
        let mut r = reader();
        r.limits(decoder_limits);
        r.decode()
    });
    let img = match decoded {
        Ok(Ok(img)) => img,
        Ok(Err(e)) => return Err(corrupt(e.to_string())),
        Err(_) => return Err(malformed()),
    };
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::InvalidInput(format!(
            "{name} image has a zero size ({}x{})",
            img.width(),
            img.height()
        )));
    }
    Ok(to_rgb_like_pillow(img))
}

/// Reads and decodes an image file within the default [`Limits`] (see [`open_image_within`]).
///
/// # Errors
/// As [`open_image_within`].
pub fn open_image(path: &Path) -> Result<RgbImage> {
    open_image_within(path, &Limits::default())
}

/// Reads and decodes an image file (see [`decode_image_within`]): a regular file of at most
/// `limits.max_input_mb`, with at most `limits.max_image_pixels` pixels.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read; [`Error::InvalidInput`] (naming the file) when it
/// is not a regular file, is past a limit, or its content is not a supported, valid image.
pub fn open_image_within(path: &Path, limits: &Limits) -> Result<RgbImage> {
    let bytes = crate::files::read_bounded(path, limits.max_input_bytes(), "image file")?;
    decode_image_within(&bytes, limits).map_err(|e| match e {
        Error::InvalidInput(msg) => Error::InvalidInput(format!("{}: {msg}", path.display())),
        other => other,
    })
}

/// Builds an image from a raw 8-bit RGB buffer (`R, G, B` per pixel, rows `stride` bytes apart;
/// the last row needs only `3 * width` bytes). Used by the C and Python bindings.
///
/// # Errors
/// [`Error::InvalidInput`] for a zero width or height, a stride shorter than a row, a buffer too
/// short for the rows, or sizes that overflow.
pub fn rgb_from_raw(width: usize, height: usize, stride: usize, data: &[u8]) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(Error::InvalidInput(format!(
            "raw RGB image has a zero size ({width}x{height})"
        )));
    }
    let (w32, h32) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => {
            return Err(Error::InvalidInput(format!(
                "raw RGB image is too large ({width}x{height})"
            )));
        }
    };
    let row = width
        .checked_mul(3)
        .ok_or_else(|| Error::InvalidInput(format!("raw RGB width {width} overflows")))?;
    if stride < row {
        return Err(Error::InvalidInput(format!(
            "raw RGB stride {stride} is shorter than a row of {width} pixels ({row} bytes)"
        )));
    }
    let needed = stride
        .checked_mul(height - 1)
        .and_then(|v| v.checked_add(row))
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "raw RGB size overflows ({width}x{height}, stride {stride})"
            ))
        })?;
    if data.len() < needed {
        return Err(Error::InvalidInput(format!(
            "raw RGB buffer holds {} bytes, {width}x{height} with stride {stride} needs {needed}",
            data.len()
        )));
    }
    let mut out = Vec::with_capacity(row * height);
    for y in 0..height {
        out.extend_from_slice(&data[y * stride..y * stride + row]);
    }
    Ok(RgbImage::from_raw(w32, h32, out).expect("buffer length matches the dimensions"))
}

/// Pillow's `convert("RGB")` applied to what the `image` crate decoded.
fn to_rgb_like_pillow(img: image::DynamicImage) -> RgbImage {
    use image::DynamicImage as D;
    let (w, h) = (img.width(), img.height());
    let n = w as usize * h as usize;
    let mut out = Vec::with_capacity(n * 3);
    match img {
        D::ImageRgb8(b) => return b,
        D::ImageRgba8(b) => b.pixels().for_each(|p| out.extend_from_slice(&p.0[..3])),
        D::ImageLuma8(b) => b.pixels().for_each(|p| out.extend_from_slice(&[p.0[0]; 3])),
        D::ImageLumaA8(b) => b.pixels().for_each(|p| out.extend_from_slice(&[p.0[0]; 3])),
        // Pillow opens 16-bit grey PNGs as mode "I;16", whose RGB conversion clips at 255.
        D::ImageLuma16(b) => b
            .pixels()
            .for_each(|p| out.extend_from_slice(&[p.0[0].min(255) as u8; 3])),
        // 16-bit grey + alpha, RGB and RGBA are unpacked to 8 bits by keeping the high byte.
        D::ImageLumaA16(b) => b
            .pixels()
            .for_each(|p| out.extend_from_slice(&[(p.0[0] >> 8) as u8; 3])),
        D::ImageRgb16(b) => b
            .pixels()
            .for_each(|p| out.extend(p.0.iter().map(|&v| (v >> 8) as u8))),
        D::ImageRgba16(b) => b
            .pixels()
            .for_each(|p| out.extend(p.0[..3].iter().map(|&v| (v >> 8) as u8))),
        other => return other.to_rgb8(),
    }
    RgbImage::from_raw(w, h, out).expect("buffer length matches the dimensions")
}

// ------------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------------

/// How the short side of the resized image is derived from the scale factor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeRounding {
    /// `int(short / long * S)`: float64 division first, then truncation (official
    /// `VLMImageProcessor`).
    Truncate,
    /// `round(short * (S / long))` with Python's round-half-to-even (transformers
    /// `JanusImageProcessor`).
    RoundHalfEven,
}

/// Which fixed-point bicubic kernel resizes the image (both: Keys cubic a = -0.5, antialiased).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resampler {
    /// Pillow's `Image.resize(size, Image.BICUBIC)` (what torchvision's `resize` runs on a PIL
    /// image), as of Pillow 13.0 (the reference environment): coefficients with 22 fractional
    /// bits; the vertical pass runs first when the height shrinks by more than twice as many
    /// pixels as the width (Pillow PR #9549), otherwise the horizontal pass runs first.
    Pillow,
    /// Pillow before 13.0: as [`Resampler::Pillow`], but always horizontal pass first. Differs
    /// from Pillow 13 only for images whose height shrinks much more than their width.
    PillowHorizontalFirst,
    /// PyTorch's CPU kernel for `interpolate(uint8, mode="bicubic", antialias=True)` (what
    /// torchvision v2's `resize` runs on a uint8 tensor on CPU): `i16` coefficients with the
    /// largest precision that keeps the largest weight below 2^15. (On CUDA the reference uses a
    /// float kernel and rounds, which this does not reproduce.)
    TorchUint8,
}

/// The arithmetic of the rescale + normalise step (the order of float operations differs between
/// the two reference processors, which changes the last bit of about half the values).
///
/// transformers 5's PIL backend (`JanusImageProcessorPil`, used with `backend="pil"` or without
/// torchvision) is [`SizeRounding::RoundHalfEven`] + [`Resampler::Pillow`] +
/// [`PixelArithmetic::Numpy`]: set those fields on the [`Layout::HuggingFace`] settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelArithmetic {
    /// numpy, official processor: `x = float32(float64(u8) * rescale_factor)`, then
    /// `(x - mean) / std` in float32.
    Numpy,
    /// torchvision backend of transformers 5: `(float32(u8) - m) / s` in float32 with
    /// `m = mean * float32(1 / rescale_factor)`, `s = std * float32(1 / rescale_factor)` (float32
    /// products); without normalisation `float32(u8) * float32(rescale_factor)`.
    TorchFused,
}

/// The image processor settings of a checkpoint (`preprocessor_config.json`, or the
/// `image_processor` block of `processor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    /// Side S of the square model input (384 for every released Janus checkpoint).
    pub image_size: usize,
    /// Lower bound of the resized short side before padding (14).
    pub min_size: usize,
    /// Per-channel mean subtracted after rescaling.
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub image_std: [f32; 3],
    /// Factor that maps u8 values to [0, 1] (1/255).
    pub rescale_factor: f64,
    /// Whether the rescale step runs (always true for the official processor).
    pub do_rescale: bool,
    /// Whether the normalisation step runs.
    pub do_normalize: bool,
    /// Padding colour: `int(mean * 255)` per channel in both reference processors (a
    /// `background_color` key in the file is ignored by both, and so here).
    pub background_color: [u8; 3],
    /// Short-side rounding rule.
    pub rounding: SizeRounding,
    /// Bicubic kernel.
    pub resampler: Resampler,
    /// Rescale/normalise arithmetic.
    pub arithmetic: PixelArithmetic,
}

/// OpenAI CLIP mean, the default of both reference processor classes.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP standard deviation, the default of both reference processor classes.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const DEFAULT_MIN_SIZE: usize = 14;
const DEFAULT_RESCALE: f64 = 1.0 / 255.0;
const HF_DEFAULT_IMAGE_SIZE: usize = 384;
/// Largest model input side [`ImageProcessorConfig::from_dir`] accepts (the released checkpoints
/// use 384).
pub const MAX_IMAGE_SIZE: usize = 8192;

/// `int(x * 255)` per channel, how both reference processors derive the padding colour from the
/// mean (values outside [0, 1] saturate).
pub fn background_from_mean(mean: [f64; 3]) -> [u8; 3] {
    mean.map(|m| (m * 255.0).trunc().clamp(0.0, 255.0) as u8)
}

impl ImageProcessorConfig {
    /// The settings of the layout's reference processor class for keys a file does not give:
    /// `VLMImageProcessor` (official) or `JanusImageProcessor` (transformers), with the given
    /// `image_size` (the official class has no default for it; transformers' is 384). Both
    /// default to the OpenAI CLIP mean/std; the released checkpoints set 0.5/0.5.
    pub fn defaults(layout: Layout, image_size: usize) -> Self {
        let (rounding, resampler, arithmetic) = match layout {
            Layout::Original => (
                SizeRounding::Truncate,
                Resampler::Pillow,
                PixelArithmetic::Numpy,
            ),
            Layout::HuggingFace => (
                SizeRounding::RoundHalfEven,
                Resampler::TorchUint8,
                PixelArithmetic::TorchFused,
            ),
        };
        ImageProcessorConfig {
            image_size,
            min_size: DEFAULT_MIN_SIZE,
            image_mean: CLIP_MEAN.map(|v| v as f32),
            image_std: CLIP_STD.map(|v| v as f32),
            rescale_factor: DEFAULT_RESCALE,
            do_rescale: true,
            do_normalize: true,
            background_color: background_from_mean(CLIP_MEAN),
            rounding,
            resampler,
            arithmetic,
        }
    }

    /// Reads the image processor settings of a model folder.
    ///
    /// * [`Layout::Original`]: `preprocessor_config.json`, else `processor_config.json` (in either,
    ///   a nested `image_processor` object is used when present), as transformers 4.x's
    ///   `from_pretrained` looks them up for `VLMImageProcessor`. `image_size` is required.
    /// * [`Layout::HuggingFace`]: the `image_processor` object of `processor_config.json`, else
    ///   `preprocessor_config.json`, as transformers 5 does. `size` must be square (an integer or
    ///   `{"height": S, "width": S}`).
    ///
    /// Missing keys take the defaults of the layout's reference class (see [`Self::defaults`]);
    /// JSON `null` counts as missing.
    ///
    /// # Errors
    /// [`Error::MissingFile`] when neither file exists, [`Error::Io`] when one cannot be read,
    /// [`Error::Config`] (naming the file and key) for malformed JSON or values (an image size
    /// of 0 or above [`MAX_IMAGE_SIZE`], `min_size` above the image size, a zero `image_std`),
    /// [`Error::Unsupported`] for settings this implementation does not reproduce (a resampling
    /// filter other than bicubic, `do_resize` or `do_pad` false, a non-square `size`).
    pub fn from_dir(dir: &Path, layout: Layout) -> Result<Self> {
        const PRE: &str = "preprocessor_config.json";
        const PROC: &str = "processor_config.json";
        let read = |name: &str| -> Result<Option<(std::path::PathBuf, Value)>> {
            let path = dir.join(name);
            if !path.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&path, format!("invalid JSON: {e}")))?;
            if !value.is_object() {
                return Err(Error::config(&path, "the top level is not a JSON object"));
            }
            Ok(Some((path, value)))
        };
        let nested = |v: &Value| v.get("image_processor").is_some_and(|b| !b.is_null());
        let found = match layout {
            Layout::Original => match read(PRE)? {
                Some(x) => Some(x),
                None => read(PROC)?,
            }
            .map(|(path, v)| {
                let key = nested(&v).then_some("image_processor");
                (path, v, key)
            }),
            Layout::HuggingFace => match read(PROC)? {
                Some((path, v)) if nested(&v) => Some((path, v, Some("image_processor"))),
                _ => read(PRE)?.map(|(path, v)| (path, v, None)),
            },
        };
        let Some((path, value, key)) = found else {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                message: match layout {
                    Layout::Original => {
                        format!("no {PRE} (or {PROC}) with the image processor settings")
                    }
                    Layout::HuggingFace => {
                        format!("no {PROC} with an image_processor block, and no {PRE}")
                    }
                },
            });
        };
        let obj = match key {
            Some(k) => Obj::root(&path, &value)?.obj(k)?,
            None => Obj::root(&path, &value)?,
        };
        Self::from_json_object(&obj, layout)
    }

    /// Parses one image processor object (the body of `preprocessor_config.json`, or the
    /// `image_processor` block). `file` only names the source in errors.
    ///
    /// # Errors
    /// As [`Self::from_dir`].
    pub fn from_json(file: &Path, value: &Value, layout: Layout) -> Result<Self> {
        Self::from_json_object(&Obj::root(file, value)?, layout)
    }

    fn from_json_object(obj: &Obj<'_>, layout: Layout) -> Result<Self> {
        let image_size = match layout {
            Layout::Original => obj.usize("image_size")?,
            Layout::HuggingFace => {
                let size = obj.opt_square_size("size")?;
                for flag in ["do_resize", "do_pad"] {
                    if obj.opt_bool(flag)? == Some(false) {
                        return Err(Error::Unsupported(format!(
                            "{}: {} = false (the image must be resized and padded to a square)",
                            obj.file.display(),
                            obj.key_path(flag)
                        )));
                    }
                }
                if let Some(r) = obj.opt_i64("resample")?
                    && r != 3
                {
                    return Err(Error::Unsupported(format!(
                        "{}: {} = {r} (only 3 = BICUBIC is implemented)",
                        obj.file.display(),
                        obj.key_path("resample")
                    )));
                }
                size.unwrap_or(HF_DEFAULT_IMAGE_SIZE)
            }
        };
        if image_size == 0 || image_size > MAX_IMAGE_SIZE {
            let key = match layout {
                Layout::Original => "image_size",
                Layout::HuggingFace => "size",
            };
            return Err(obj.err(key, &format!("must be between 1 and {MAX_IMAGE_SIZE}")));
        }
        let mut cfg = Self::defaults(layout, image_size);
        if let Some(v) = obj.opt_usize("min_size")? {
            cfg.min_size = v;
        }
        if cfg.min_size > cfg.image_size {
            return Err(obj.err(
                "min_size",
                &format!("{} exceeds the image size {}", cfg.min_size, cfg.image_size),
            ));
        }
        let mean = obj.opt_triple("image_mean")?.unwrap_or(CLIP_MEAN);
        let std = obj.opt_triple("image_std")?.unwrap_or(CLIP_STD);
        cfg.image_mean = mean.map(|v| v as f32);
        cfg.image_std = std.map(|v| v as f32);
        cfg.background_color = background_from_mean(mean);
        if let Some(v) = obj.opt_f64("rescale_factor")? {
            if !(v.is_finite() && v > 0.0) {
                return Err(obj.err("rescale_factor", "must be a positive number"));
            }
            cfg.rescale_factor = v;
        }
        if let Some(v) = obj.opt_bool("do_normalize")? {
            cfg.do_normalize = v;
        }
        if layout == Layout::HuggingFace
            && let Some(v) = obj.opt_bool("do_rescale")?
        {
            cfg.do_rescale = v;
        }
        if cfg.do_normalize && cfg.image_std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(obj.err("image_std", "must be finite and non-zero"));
        }
        Ok(cfg)
    }

    /// `(width, height)` of the image after the resize step (before padding) for a `width` x
    /// `height` input, by the configured rounding rule; both sides are at least
    /// `min(min_size, image_size)` and the longer side is `image_size`.
    pub fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        let s = self.image_size;
        let min = self.min_size.min(s);
        let long = width.max(height);
        if long == 0 {
            return (min, min);
        }
        let side = |v: usize| -> usize {
            let x = match self.rounding {
                SizeRounding::Truncate => (v as f64 / long as f64 * s as f64).trunc(),
                SizeRounding::RoundHalfEven => {
                    (v as f64 * (s as f64 / long as f64)).round_ties_even()
                }
            };
            (x as usize).max(min)
        };
        (side(width), side(height))
    }
}

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
pub fn resize_and_center_crop(img: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 || size == 0 {
        return RgbImage::new(size as u32, size as u32);
    }
    let (short, long) = (w.min(h), w.max(h));
    let new_long = ((size as f64 * long as f64) / short as f64) as usize;
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
    RgbImage::from_raw(size as u32, size as u32, out).expect("buffer length matches the dimensions")
}

/// The VQ encoder input of one image: [`resize_and_center_crop`] to `size`, then
/// `(float32(u8) / 255 - 0.5) / 0.5` in float32, channel-major `[3, size, size]`.
pub fn preprocess_for_vq(img: &RgbImage, size: usize) -> Vec<f32> {
    let crop = resize_and_center_crop(img, size);
    let n = size * size;
    let raw = crop.as_raw();
    let mut out = vec![0f32; 3 * n];
    for c in 0..3 {
        for i in 0..n {
            out[c * n + i] = (f32::from(raw[i * 3 + c]) / 255.0 - 0.5) / 0.5;
        }
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Bicubic resampling
// ------------------------------------------------------------------------------------------------

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
    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
    // pixels as the width; older Pillow and PyTorch always start horizontally.
    let dy = h as i64 - height as i64;
    let dx = w as i64 - width as i64;
    let vertical_first = resampler == Resampler::Pillow && dy > 0 && dy > dx * 2;
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
struct Pass {
    /// `(first input index, number of taps)` per output index.
    bounds: Vec<(usize, usize)>,
    /// Taps per output index in `coeffs` (the maximum number of taps).
    ksize: usize,
    coeffs: Vec<i32>,
    /// Fractional bits of `coeffs`.
    precision: u32,
}

/// Pillow's `bicubic_filter` (a = -0.5).
fn cubic_pillow(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PyTorch's `cubic_convolution1/2` with A = -0.5 (same polynomial, other operation order).
fn cubic_torch(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

impl Pass {
    fn new(in_size: usize, out_size: usize, resampler: Resampler) -> Pass {
        let filter: fn(f64) -> f64 = match resampler {
            Resampler::Pillow | Resampler::PillowHorizontalFirst => cubic_pillow,
            Resampler::TorchUint8 => cubic_torch,
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
        let precision = match resampler {
            Resampler::Pillow | Resampler::PillowHorizontalFirst => 22,
            Resampler::TorchUint8 => {
                let mut p = 0u32;
                while p < 22 {
                    let next = (0.5 + wt_max * f64::from(1u32 << (p + 1))) as i32;
                    if next >= 1 << 15 {
                        break;
                    }
                    p += 1;
                }
                p.max(1)
            }
        };
        let unit = f64::from(1u32 << precision);
        let coeffs = weights
            .iter()
            .map(|&w| {
                let v = w * unit;
                let q = if v < 0.0 {
                    (-0.5 + v) as i32
                } else {
                    (0.5 + v) as i32
                };
                match resampler {
                    Resampler::TorchUint8 => i32::from(q as i16),
                    _ => q,
                }
            })
            .collect();
        Pass {
            bounds,
            ksize,
            coeffs,
            precision,
        }
    }

    #[inline]
    fn taps(&self, out_index: usize) -> (usize, &[i32]) {
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

// ------------------------------------------------------------------------------------------------
// Tests (no fixtures; see tests/preprocess.rs for the reference comparisons)
// ------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(layout: Layout, s: usize) -> ImageProcessorConfig {
        let mut c = ImageProcessorConfig::defaults(layout, s);
        c.image_mean = [0.5; 3];
        c.image_std = [0.5; 3];
        c.background_color = background_from_mean([0.5; 3]);
        c
    }

    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 37 + y * 11) as u8,
                (x * 5 + y * 73) as u8,
                ((x ^ y) * 29) as u8,
            ])
        })
    }

    fn png_bytes(img: &image::DynamicImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn resized_size_rounding_rules() {
        let o = cfg(Layout::Original, 384);
        let h = cfg(Layout::HuggingFace, 384);
        // 45 / 70 * 384 = 246.86: truncated by the official processor, rounded by transformers.
        assert_eq!(o.resized_size(70, 45), (384, 246));
        assert_eq!(h.resized_size(70, 45), (384, 247));
        assert_eq!(o.resized_size(45, 70), (246, 384));
        assert_eq!(h.resized_size(45, 70), (247, 384));
        // 23 * 384 / 256 = 34.5 exactly: truncation and round-half-to-even both give 34 ...
        assert_eq!(o.resized_size(256, 23), (384, 34));
        assert_eq!(h.resized_size(256, 23), (384, 34));
        // ... and 21 * 1.5 = 31.5 rounds up to the even 32 but truncates to 31.
        assert_eq!(o.resized_size(256, 21), (384, 31));
        assert_eq!(h.resized_size(256, 21), (384, 32));
        // min_size floor
        assert_eq!(o.resized_size(1000, 1), (384, 14));
        assert_eq!(h.resized_size(1, 1000), (14, 384));
        // squares and upscaling
        assert_eq!(o.resized_size(7, 7), (384, 384));
        assert_eq!(h.resized_size(10, 3), (384, 115));
        assert_eq!(o.resized_size(10, 3), (384, 115));
        // tiny image size: min_size is capped at S
        let mut t = cfg(Layout::Original, 8);
        t.min_size = 14;
        assert_eq!(t.resized_size(100, 1), (8, 8));
    }

    #[test]
    fn padding_offsets_are_floor_centred() {
        for layout in [Layout::Original, Layout::HuggingFace] {
            let mut c = cfg(layout, 16);
            c.background_color = [1, 2, 3];
            c.min_size = 1;
            // 16x5 after resize (wider): rows (16 - 5) / 2 = 5 .. 10
            let img = RgbImage::from_pixel(32, 10, image::Rgb([200, 200, 200]));
            let (nw, nh) = c.resized_size(32, 10);
            assert_eq!((nw, nh), (16, 5));
            let out = resize_and_pad(&img, &c);
            assert_eq!(out.dimensions(), (16, 16));
            for y in 0..16 {
                let inside = (5..10).contains(&y);
                let p = out.get_pixel(3, y).0;
                assert_eq!(p, if inside { [200; 3] } else { [1, 2, 3] }, "row {y}");
            }
            // taller: columns (16 - 5) / 2 = 5 .. 10
            let img = RgbImage::from_pixel(10, 32, image::Rgb([9, 9, 9]));
            let out = resize_and_pad(&img, &c);
            for x in 0..16 {
                let inside = (5..10).contains(&x);
                assert_eq!(
                    out.get_pixel(x, 7).0,
                    if inside { [9; 3] } else { [1, 2, 3] }
                );
            }
        }
    }

    #[test]
    fn background_colour_follows_the_mean() {
        assert_eq!(background_from_mean([0.5; 3]), [127; 3]);
        assert_eq!(background_from_mean(CLIP_MEAN), [122, 116, 104]);
        assert_eq!(
            ImageProcessorConfig::defaults(Layout::Original, 384).background_color,
            [122, 116, 104]
        );
    }

    #[test]
    fn understanding_output_shape_and_range() {
        for layout in [Layout::Original, Layout::HuggingFace] {
            let c = cfg(layout, 32);
            let v = preprocess_for_understanding(&pattern(50, 13), &c);
            assert_eq!(v.len(), 3 * 32 * 32);
            assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
            // the padding rows are the background colour 127 -> (127/255 - 0.5)/0.5
            let bg = v[0];
            assert!((bg - (127.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
        }
    }

    #[test]
    fn pixel_arithmetic_edges() {
        let c = cfg(Layout::Original, 4);
        let img = RgbImage::from_fn(4, 4, |x, y| {
            image::Rgb([(x * 85) as u8, (y * 85) as u8, 255])
        });
        let v = preprocess_for_understanding(&img, &c);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[3], 1.0);
        assert_eq!(v[32], 1.0);
        let h = cfg(Layout::HuggingFace, 4);
        let v = preprocess_for_understanding(&img, &h);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[3], 1.0);
        let mut raw = h.clone();
        raw.do_rescale = false;
        raw.do_normalize = false;
        assert_eq!(preprocess_for_understanding(&img, &raw)[3], 255.0);
    }

    #[test]
    fn resampling_identity_constant_and_sizes() {
        let img = pattern(17, 9);
        for r in [
            Resampler::Pillow,
            Resampler::PillowHorizontalFirst,
            Resampler::TorchUint8,
        ] {
            assert_eq!(resize_bicubic(&img, 17, 9, r), img);
            let flat = RgbImage::from_pixel(13, 7, image::Rgb([0, 255, 77]));
            for (w, h) in [(40, 3), (3, 40), (1, 1), (13, 100), (200, 7), (5, 5)] {
                let out = resize_bicubic(&flat, w, h, r);
                assert_eq!(out.dimensions(), (w as u32, h as u32));
                assert!(out.pixels().all(|p| p.0 == [0, 255, 77]), "{r:?} {w}x{h}");
            }
            assert_eq!(resize_bicubic(&img, 0, 5, r).dimensions(), (0, 5));
            let empty = RgbImage::new(0, 0);
            assert_eq!(resize_bicubic(&empty, 4, 4, r).dimensions(), (4, 4));
        }
    }

    #[test]
    fn pass_order() {
        let img = pattern(40, 200);
        let one = |i: &RgbImage, w, h, r| resize_bicubic(i, w, h, r);
        // the height shrinks by 136 pixels, the width by 26: Pillow 13 resizes vertically first
        let v_first = one(
            &one(&img, 40, 64, Resampler::Pillow),
            14,
            64,
            Resampler::Pillow,
        );
        let h_first = one(
            &one(&img, 14, 200, Resampler::Pillow),
            14,
            64,
            Resampler::Pillow,
        );
        assert_ne!(v_first, h_first);
        assert_eq!(resize_bicubic(&img, 14, 64, Resampler::Pillow), v_first);
        assert_eq!(
            resize_bicubic(&img, 14, 64, Resampler::PillowHorizontalFirst),
            h_first
        );
        // otherwise horizontal first
        let img = pattern(200, 40);
        let h_first = one(
            &one(&img, 64, 40, Resampler::Pillow),
            64,
            14,
            Resampler::Pillow,
        );
        assert_eq!(resize_bicubic(&img, 64, 14, Resampler::Pillow), h_first);
        let t = Resampler::TorchUint8;
        let img = pattern(40, 200);
        assert_eq!(
            resize_bicubic(&img, 14, 64, t),
            one(&one(&img, 14, 200, t), 14, 64, t)
        );
    }

    #[test]
    fn pillow_and_torch_coefficients() {
        // Pillow: 22 fractional bits, weights sum to 1 (up to rounding).
        let p = Pass::new(100, 37, Resampler::Pillow);
        assert_eq!(p.precision, 22);
        for xx in 0..37 {
            let s: i32 = p.taps(xx).1.iter().sum();
            assert!((s - (1 << 22)).abs() <= 8, "{s}");
        }
        // PyTorch: the largest weight fits in 15 bits at the chosen precision.
        for (i, o) in [(100, 37), (37, 100), (1000, 3), (3, 1000)] {
            let t = Pass::new(i, o, Resampler::TorchUint8);
            let max = t.coeffs.iter().copied().max().unwrap();
            assert!(
                (1 << 13..1 << 15).contains(&max),
                "{i}->{o}: {max} at {}",
                t.precision
            );
        }
    }

    #[test]
    fn center_crop_offsets_round_half_to_even() {
        // 20x10 -> short side 4: 8x4; left = round(4 / 2) = 2
        let img = RgbImage::from_fn(20, 10, |x, _| image::Rgb([(x * 10) as u8, 0, 0]));
        assert_eq!(resize_and_center_crop(&img, 4).dimensions(), (4, 4));
        // 7x2 -> size 2: no resize (short side is already 2), long side 7, offset round(2.5) = 2
        let img = RgbImage::from_fn(7, 2, |x, _| image::Rgb([x as u8, 0, 0]));
        let out = resize_and_center_crop(&img, 2);
        assert_eq!(out.get_pixel(0, 0).0[0], 2);
        // 9x2 -> offset round(3.5) = 4
        let img = RgbImage::from_fn(9, 2, |x, _| image::Rgb([x as u8, 0, 0]));
        assert_eq!(resize_and_center_crop(&img, 2).get_pixel(0, 0).0[0], 4);
        // taller
        let img = RgbImage::from_fn(2, 9, |_, y| image::Rgb([0, y as u8, 0]));
        assert_eq!(resize_and_center_crop(&img, 2).get_pixel(0, 0).0[1], 4);
        let v = preprocess_for_vq(&pattern(30, 11), 8);
        assert_eq!(v.len(), 3 * 64);
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
        assert_eq!(preprocess_for_vq(&RgbImage::new(0, 3), 4), vec![-1.0; 48]);
    }

    #[test]
    fn decode_rejects_bad_input() {
        let bad = |b: &[u8]| matches!(decode_image(b), Err(Error::InvalidInput(_)));
        assert!(bad(b""));
        assert!(bad(b"not an image at all"));
        assert!(bad(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"));
        let png = png_bytes(&image::DynamicImage::ImageRgb8(pattern(16, 16)));
        for cut in [8, 20, 33, 50, png.len() - 13] {
            assert!(bad(&png[..cut]), "cut at {cut}");
        }
        // a JPEG/BMP/WebP header alone
        assert!(bad(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"));
        assert!(bad(b"BM\x00\x00"));
        assert!(bad(b"RIFF\x00\x00\x00\x00WEBPVP8 "));
        let e = open_image(Path::new("/nonexistent/janus.png")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }));
    }

    #[test]
    fn decode_converts_like_pillow() {
        let rgba = image::RgbaImage::from_fn(3, 2, |x, y| {
            image::Rgba([x as u8 * 50, y as u8 * 60, 7, (x * 100) as u8])
        });
        let out = decode_image(&png_bytes(&image::DynamicImage::ImageRgba8(rgba))).unwrap();
        assert_eq!(out.get_pixel(2, 1).0, [100, 60, 7]);
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 7]);
        let grey = image::GrayImage::from_fn(2, 2, |x, y| image::Luma([(x + 2 * y) as u8 * 40]));
        let out = decode_image(&png_bytes(&image::DynamicImage::ImageLuma8(grey))).unwrap();
        assert_eq!(out.get_pixel(1, 1).0, [120; 3]);
        let g16 =
            image::ImageBuffer::<image::Luma<u16>, _>::from_raw(4, 1, vec![0u16, 200, 256, 65535])
                .unwrap();
        let out = decode_image(&png_bytes(&image::DynamicImage::ImageLuma16(g16))).unwrap();
        assert_eq!(
            out.as_raw()[..].chunks(3).map(|p| p[0]).collect::<Vec<_>>(),
            [0, 200, 255, 255]
        );
        let c16 =
            image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![255u16, 256, 65535])
                .unwrap();
        let out = decode_image(&png_bytes(&image::DynamicImage::ImageRgb16(c16))).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [0, 1, 255]);
    }

    #[test]
    fn raw_buffers_are_validated() {
        let data: Vec<u8> = (0..=255).collect();
        let img = rgb_from_raw(2, 3, 10, &data).unwrap();
        assert_eq!(img.dimensions(), (2, 3));
        assert_eq!(img.get_pixel(1, 2).0, [23, 24, 25]);
        // the last row needs only 3 * width bytes
        assert!(rgb_from_raw(2, 3, 10, &data[..26]).is_ok());
        let bad = |r: Result<RgbImage>| matches!(r, Err(Error::InvalidInput(_)));
        assert!(bad(rgb_from_raw(2, 3, 10, &data[..25])));
        assert!(bad(rgb_from_raw(0, 3, 10, &data)));
        assert!(bad(rgb_from_raw(2, 0, 10, &data)));
        assert!(bad(rgb_from_raw(4, 3, 11, &data)));
        assert!(bad(rgb_from_raw(usize::MAX, 1, usize::MAX, &data)));
        assert!(bad(rgb_from_raw(1, usize::MAX, 3, &data)));
        assert!(bad(rgb_from_raw(1 << 33, 1, 3 << 33, &data)));
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn config_files_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // nothing there
        assert!(matches!(
            ImageProcessorConfig::from_dir(d, Layout::Original),
            Err(Error::MissingFile { .. })
        ));
        // official: image_size only -> CLIP defaults, truncation, Pillow
        write(
            d,
            "preprocessor_config.json",
            r#"{"image_size": 64, "background_color": [1, 2, 3]}"#,
        );
        let c = ImageProcessorConfig::from_dir(d, Layout::Original).unwrap();
        assert_eq!(c.image_size, 64);
        assert_eq!(c.min_size, 14);
        assert_eq!(c.image_mean, CLIP_MEAN.map(|v| v as f32));
        assert_eq!(c.background_color, [122, 116, 104]);
        assert_eq!(c.rounding, SizeRounding::Truncate);
        assert_eq!(c.resampler, Resampler::Pillow);
        // transformers reads the nested block of processor_config.json first
        write(
            d,
            "processor_config.json",
            r#"{"image_processor": {"size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "min_size": 3, "resample": 3}, "num_image_tokens": 4}"#,
        );
        let h = ImageProcessorConfig::from_dir(d, Layout::HuggingFace).unwrap();
        assert_eq!((h.image_size, h.min_size), (32, 3));
        assert_eq!(h.background_color, [127; 3]);
        assert_eq!(h.rounding, SizeRounding::RoundHalfEven);
        assert_eq!(h.resampler, Resampler::TorchUint8);
        // ... and falls back to preprocessor_config.json without it (size default 384)
        write(d, "processor_config.json", r#"{"num_image_tokens": 4}"#);
        let h = ImageProcessorConfig::from_dir(d, Layout::HuggingFace).unwrap();
        assert_eq!(h.image_size, 384);
        // the official layout uses preprocessor_config.json first
        let o = ImageProcessorConfig::from_dir(d, Layout::Original).unwrap();
        assert_eq!(o.image_size, 64);
    }

    #[test]
    fn config_errors_name_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let check = |text: &str, layout: Layout, key: &str| {
            write(d, "preprocessor_config.json", text);
            match ImageProcessorConfig::from_dir(d, layout) {
                Err(Error::Config { file, message }) => {
                    assert!(file.ends_with("preprocessor_config.json"), "{file:?}");
                    assert!(message.contains(key), "{message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        };
        check(r#"{"min_size": 14}"#, Layout::Original, "image_size");
        check(r#"{"image_size": "384"}"#, Layout::Original, "image_size");
        check(r#"{"image_size": 0}"#, Layout::Original, "image_size");
        check(r#"{"image_size": 100000}"#, Layout::Original, "image_size");
        check(r#"{"size": 0}"#, Layout::HuggingFace, "size");
        check(
            r#"{"image_size": 384, "image_mean": [0.5, 0.5]}"#,
            Layout::Original,
            "image_mean",
        );
        check(
            r#"{"image_size": 384, "image_std": [0.5, 0, 0.5]}"#,
            Layout::Original,
            "image_std",
        );
        check(
            r#"{"image_size": 384, "do_normalize": 1}"#,
            Layout::Original,
            "do_normalize",
        );
        check(
            r#"{"image_size": 384, "rescale_factor": -1}"#,
            Layout::Original,
            "rescale_factor",
        );
        check(
            r#"{"image_size": 8, "min_size": 14}"#,
            Layout::Original,
            "min_size",
        );
        check(r#"{"size": {"height": 64}}"#, Layout::HuggingFace, "size");
        check(r#"{"image_size": 384,"#, Layout::Original, "invalid JSON");
        check(r#"[1, 2]"#, Layout::Original, "top level");
        write(
            d,
            "preprocessor_config.json",
            r#"{"size": {"height": 64, "width": 32}}"#,
        );
        assert!(matches!(
            ImageProcessorConfig::from_dir(d, Layout::HuggingFace),
            Err(Error::Unsupported(_))
        ));
        write(d, "preprocessor_config.json", r#"{"resample": 2}"#);
        assert!(matches!(
            ImageProcessorConfig::from_dir(d, Layout::HuggingFace),
            Err(Error::Unsupported(_))
        ));
        write(d, "preprocessor_config.json", r#"{"do_pad": false}"#);
        assert!(matches!(
            ImageProcessorConfig::from_dir(d, Layout::HuggingFace),
            Err(Error::Unsupported(_))
        ));
        // nested block with a wrong type names the nested key
        std::fs::remove_file(d.join("preprocessor_config.json")).unwrap();
        write(
            d,
            "processor_config.json",
            r#"{"image_processor": {"min_size": -3}}"#,
        );
        match ImageProcessorConfig::from_dir(d, Layout::HuggingFace) {
            Err(Error::Config { message, .. }) => {
                assert!(message.contains("image_processor.min_size"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
}
