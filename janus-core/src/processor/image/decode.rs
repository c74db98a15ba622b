//! Image files and raw buffers to 8-bit RGB, converted the way Pillow's `convert("RGB")` does,
//! within the request's [`Limits`].

use std::path::Path;

use image::RgbImage;

use crate::error::{Error, Result};
use crate::limits::Limits;

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
    let mut out = Vec::new();
    out.try_reserve_exact(row * height)
        .map_err(|_| Error::OutOfMemory(format!("copying a {width}x{height} image")))?;
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
