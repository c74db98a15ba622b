//! Images and image-token grids crossing the boundary: plain RGB8 buffers in and out, files read
//! and written as PNG for callers without an image library.

use std::ffi::c_char;

use image::RgbImage;
use janus_core::Error;
use janus_core::pipeline::{GeneratedImage, ImageTokens};
use janus_core::processor::image::{open_image_within, rgb_from_raw};

use crate::handles::{Owned, publish, reclaim};
use crate::status::{FfiError, bad_argument, guard, janus_status};
use crate::strings::{path_arg, set_out};

/// An 8-bit RGB image: `height` rows of `width` pixels, `R, G, B` bytes per pixel, rows
/// `stride` bytes apart (`stride ≥ 3 · width`; the last row needs only `3 · width` bytes).
///
/// As input the caller owns `data`; images the library returns own theirs (read-only for the
/// caller) with `stride == 3 · width`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct janus_image {
    /// The first byte of the first row.
    pub data: *const u8,
    /// Pixels per row.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Bytes from the start of one row to the start of the next.
    pub stride: usize,
}

/// A grid of image tokens: `rows · cols` ids, row by row.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct janus_tokens {
    /// The ids.
    pub ids: *const u32,
    /// Rows of the grid.
    pub rows: usize,
    /// Columns of the grid.
    pub cols: usize,
}

/// One generated image: its pixels, the token grid they were decoded from, and the seed of the
/// call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct janus_generated_image {
    /// The pixels (owned by the list).
    pub image: janus_image,
    /// The token grid (owned by the list).
    pub tokens: janus_tokens,
    /// The seed of the call that made it.
    pub seed: u64,
}

/// The images of one `janus_generate` call, freed together by `janus_image_list_free`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct janus_image_list {
    /// `count` images.
    pub images: *const janus_generated_image,
    /// How many.
    pub count: usize,
}

/// A library-owned image.
#[repr(C)]
pub(crate) struct OwnedImage {
    public: janus_image,
    pixels: Vec<u8>,
}

// SAFETY: #[repr(C)] with the public part first.
unsafe impl Owned for OwnedImage {
    type Public = janus_image;
    const KIND: &'static str = "janus_image";
}

impl OwnedImage {
    pub(crate) fn new(image: RgbImage) -> Self {
        let (width, height) = image.dimensions();
        let pixels = image.into_raw();
        OwnedImage {
            public: janus_image {
                data: pixels.as_ptr(),
                width,
                height,
                stride: width as usize * 3,
            },
            pixels,
        }
    }
}

/// A library-owned token grid.
#[repr(C)]
pub(crate) struct OwnedTokens {
    public: janus_tokens,
    ids: Vec<u32>,
}

// SAFETY: #[repr(C)] with the public part first.
unsafe impl Owned for OwnedTokens {
    type Public = janus_tokens;
    const KIND: &'static str = "janus_tokens";
}

impl OwnedTokens {
    pub(crate) fn new(tokens: ImageTokens) -> Self {
        OwnedTokens {
            public: janus_tokens {
                ids: tokens.ids.as_ptr(),
                rows: tokens.rows,
                cols: tokens.cols,
            },
            ids: tokens.ids,
        }
    }
}

/// A library-owned list of generated images.
#[repr(C)]
pub(crate) struct OwnedImageList {
    public: janus_image_list,
    items: Vec<janus_generated_image>,
    pixels: Vec<Vec<u8>>,
    ids: Vec<Vec<u32>>,
}

// SAFETY: #[repr(C)] with the public part first.
unsafe impl Owned for OwnedImageList {
    type Public = janus_image_list;
    const KIND: &'static str = "janus_image_list";
}

impl OwnedImageList {
    pub(crate) fn new(images: Vec<GeneratedImage>) -> Self {
        let mut items = Vec::with_capacity(images.len());
        let mut pixels = Vec::with_capacity(images.len());
        let mut ids = Vec::with_capacity(images.len());
        for g in images {
            let (width, height) = g.image.dimensions();
            let px = g.image.into_raw();
            items.push(janus_generated_image {
                image: janus_image {
                    data: px.as_ptr(),
                    width,
                    height,
                    stride: width as usize * 3,
                },
                tokens: janus_tokens {
                    ids: g.tokens.ids.as_ptr(),
                    rows: g.tokens.rows,
                    cols: g.tokens.cols,
                },
                seed: g.seed,
            });
            // Moving a Vec keeps its heap buffer where it is.
            pixels.push(px);
            ids.push(g.tokens.ids);
        }
        OwnedImageList {
            public: janus_image_list {
                images: items.as_ptr(),
                count: items.len(),
            },
            items,
            pixels,
            ids,
        }
    }
}

/// Copies a caller's image.
///
/// # Safety
/// `image` is NULL or points to a `janus_image` whose `data` holds the bytes it describes.
pub(crate) unsafe fn rgb_from_c(
    image: *const janus_image,
    what: &str,
) -> Result<RgbImage, FfiError> {
    // SAFETY: the caller's pointer is NULL or valid.
    let Some(img) = (unsafe { image.as_ref() }) else {
        return Err(bad_argument(format!("{what} is NULL")));
    };
    let (w, h, stride) = (img.width as usize, img.height as usize, img.stride);
    let invalid = |m: String| FfiError::Core(Error::InvalidInput(format!("{what}: {m}")));
    if w == 0 || h == 0 {
        return Err(invalid(format!("the image has no pixels ({w}x{h})")));
    }
    if stride < 3 * w {
        return Err(invalid(format!(
            "stride {stride} is shorter than a row of {w} pixels ({} bytes)",
            3 * w
        )));
    }
    let len = stride
        .checked_mul(h - 1)
        .and_then(|n| n.checked_add(3 * w))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| invalid(format!("a {w}x{h} image with stride {stride} is too large")))?;
    if img.data.is_null() {
        return Err(bad_argument(format!("{what}.data is NULL")));
    }
    // SAFETY: the caller guarantees `data` holds the `len` bytes the image describes.
    let bytes = unsafe { std::slice::from_raw_parts(img.data, len) };
    Ok(rgb_from_raw(w, h, stride, bytes)?)
}

/// Reads the caller's list of `n` images.
///
/// # Safety
/// `images` is NULL (only when `n` is 0) or points to `n` valid `janus_image`s.
pub(crate) unsafe fn rgb_list_from_c(
    images: *const janus_image,
    n: usize,
) -> Result<Vec<RgbImage>, FfiError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if images.is_null() {
        return Err(bad_argument(format!("images is NULL but n_images is {n}")));
    }
    // SAFETY: `images` points to `n` images (caller's contract); each is checked by rgb_from_c.
    (0..n)
        .map(|i| unsafe { rgb_from_c(images.add(i), &format!("images[{i}]")) })
        .collect()
}

/// Copies a caller's token grid.
///
/// # Safety
/// `tokens` is NULL or points to a `janus_tokens` whose `ids` holds `rows · cols` ids.
pub(crate) unsafe fn tokens_from_c(tokens: *const janus_tokens) -> Result<ImageTokens, FfiError> {
    // SAFETY: the caller's pointer is NULL or valid.
    let Some(t) = (unsafe { tokens.as_ref() }) else {
        return Err(bad_argument("tokens is NULL"));
    };
    let n = t
        .rows
        .checked_mul(t.cols)
        .filter(|&n| n <= isize::MAX as usize / 4)
        .ok_or_else(|| {
            FfiError::Core(Error::InvalidInput(format!(
                "a {}x{} token grid is too large",
                t.rows, t.cols
            )))
        })?;
    let ids = if n == 0 {
        Vec::new()
    } else if t.ids.is_null() {
        return Err(bad_argument("tokens.ids is NULL"));
    } else {
        // SAFETY: the caller guarantees `ids` holds `rows · cols` ids.
        unsafe { std::slice::from_raw_parts(t.ids, n) }.to_vec()
    };
    Ok(ImageTokens {
        ids,
        rows: t.rows,
        cols: t.cols,
    })
}

/// Reads a PNG, JPEG, WebP or BMP file into an RGB8 image (alpha dropped, grey expanded), to be
/// freed with `janus_image_free`. On failure `*out_image` is set to NULL.
///
/// Errors: `JANUS_ERR_IO` when the file cannot be read, `JANUS_ERR_INVALID_INPUT` when it is
/// not a regular file, is larger than the default `max_input_mb` (64 MiB) or has more pixels
/// than the default `max_image_pixels` (50 000 000; both checked before the file is read or
/// its pixels decoded), or is not a supported, valid image.
///
/// Thread safety: safe from any thread.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out_image` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn janus_image_read(
    path: *const c_char,
    out_image: *mut *mut janus_image,
) -> janus_status {
    guard(|| {
        // SAFETY: the caller's pointers are NULL or valid.
        let out = unsafe { set_out(out_image, "out_image")? };
        // SAFETY: as above.
        let path = unsafe { path_arg(path, "path")? };
        let image = open_image_within(&path, &janus_core::Limits::default())?;
        *out = publish(OwnedImage::new(image));
        Ok(())
    })
}

/// Writes an image (any `janus_image`: the caller's or one from the library) as a PNG file,
/// whole or not at all: through a temporary file beside it, flushed, then renamed over `path`,
/// so that a failure leaves an existing file as it was.
///
/// Errors: `JANUS_ERR_IO` when the file cannot be written (a missing folder, a full disk), with
/// a message that says so; `JANUS_ERR_INVALID_INPUT` for an empty image or a stride shorter
/// than a row.
///
/// Thread safety: safe from any thread.
///
/// # Safety
/// `image` is NULL or a valid image; `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn janus_image_write_png(
    image: *const janus_image,
    path: *const c_char,
) -> janus_status {
    guard(|| {
        // SAFETY: the caller's pointers are NULL or valid.
        let img = unsafe { rgb_from_c(image, "image")? };
        // SAFETY: as above.
        let path = unsafe { path_arg(path, "path")? };
        let png = janus_core::image_file::encode(&img, image::ImageFormat::Png)?;
        janus_core::files::write_atomic(&path, &png)?;
        Ok(())
    })
}

/// Frees an image returned by `janus_image_read` or `janus_decode_image`. NULL is a no-op;
/// an image that was already freed (or is part of a `janus_image_list`, or the caller's own)
/// gives `JANUS_ERR_INVALID_HANDLE` and is left alone.
///
/// The pointer is looked up by address before it is touched, so any pointer value is safe to
/// pass.
///
/// Thread safety: safe from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn janus_image_free(image: *mut janus_image) -> janus_status {
    guard(|| reclaim::<OwnedImage>(image).map(drop))
}

/// Frees a token grid returned by `janus_encode_image`. NULL is a no-op; a freed or foreign grid
/// gives `JANUS_ERR_INVALID_HANDLE`.
///
/// Thread safety: safe from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn janus_tokens_free(tokens: *mut janus_tokens) -> janus_status {
    guard(|| reclaim::<OwnedTokens>(tokens).map(drop))
}

/// Frees the images of a `janus_generate` call (all of them). NULL is a no-op; a freed or
/// foreign list gives `JANUS_ERR_INVALID_HANDLE`.
///
/// Thread safety: safe from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn janus_image_list_free(list: *mut janus_image_list) -> janus_status {
    guard(|| reclaim::<OwnedImageList>(list).map(drop))
}
