//! Writing images to files: the format is the one the file name's extension names (`.png`,
//! `.jpg`/`.jpeg`, `.webp`), checked before any work, and the file is written whole or not at
//! all ([`write_atomic`](crate::files::write_atomic)).

use std::path::Path;

use image::{ImageFormat, RgbImage};

use crate::error::{Error, Result};

/// The format an output file's extension names.
///
/// # Errors
/// [`Error::InvalidInput`] for a missing or other extension.
pub fn format_for(path: &Path) -> Result<ImageFormat> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => Ok(ImageFormat::Png),
        Some("jpg" | "jpeg") => Ok(ImageFormat::Jpeg),
        Some("webp") => Ok(ImageFormat::WebP),
        _ => Err(Error::InvalidInput(format!(
            "{}: the file name must end in .png, .jpg, .jpeg or .webp (the format is taken \
             from it)",
            path.display()
        ))),
    }
}

/// The image encoded in `format` (JPEG at quality 95, WebP lossless).
///
/// # Errors
/// [`Error::InvalidInput`] when the encoder fails.
pub fn encode(image: &RgbImage, format: ImageFormat) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    let encoded = match format {
        ImageFormat::Jpeg => {
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95);
            image.write_with_encoder(encoder)
        }
        other => image.write_to(&mut out, other),
    };
    encoded.map_err(|e| Error::InvalidInput(format!("encoding {format:?}: {e}")))?;
    Ok(out.into_inner())
}

/// Writes the image to `path` in the format its extension names, whole or not at all.
///
/// # Errors
/// [`Error::InvalidInput`] for an extension other than the supported ones; [`Error::Write`]
/// when the file cannot be written (an existing file is then left as it was).
pub fn save(image: &RgbImage, path: &Path) -> Result<()> {
    let bytes = encode(image, format_for(path)?)?;
    crate::files::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extension_picks_the_format() {
        assert_eq!(format_for(Path::new("a.PNG")).unwrap(), ImageFormat::Png);
        assert_eq!(format_for(Path::new("a.jpeg")).unwrap(), ImageFormat::Jpeg);
        assert_eq!(format_for(Path::new("a.webp")).unwrap(), ImageFormat::WebP);
        assert!(format_for(Path::new("a.gif")).is_err());
        assert!(format_for(Path::new("a")).is_err());
    }

    #[test]
    fn each_format_writes_its_own_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(8, 6, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 7]));
        for name in ["a.png", "a.jpg", "a.webp"] {
            let path = dir.path().join(name);
            save(&img, &path).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let guessed = image::guess_format(&bytes).unwrap();
            assert_eq!(guessed, format_for(&path).unwrap(), "{name}");
        }
    }
}
