//! The image processor's settings, read from either layout's files with each reference's
//! defaults.

use std::path::Path;

use serde_json::Value;

use crate::config::{Layout, Obj};
use crate::error::{Error, Result};

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
            if !path.exists() {
                return Ok(None);
            }
            let bytes =
                crate::files::read_bounded(&path, crate::config::MAX_JSON_BYTES, "JSON file")?;
            let value: Value = serde_json::from_slice(&bytes)
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
