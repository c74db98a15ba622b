//! Tests of the image processing without fixtures (see `tests/preprocess.rs` for the reference
//! comparisons).

use std::path::Path;

use super::resample::Pass;
use super::*;
use crate::config::Layout;
use crate::error::{Error, Result};

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
    assert_eq!(
        resize_and_center_crop(&img, 4).unwrap().dimensions(),
        (4, 4)
    );
    // 7x2 -> size 2: no resize (short side is already 2), long side 7, offset round(2.5) = 2
    let img = RgbImage::from_fn(7, 2, |x, _| image::Rgb([x as u8, 0, 0]));
    let out = resize_and_center_crop(&img, 2).unwrap();
    assert_eq!(out.get_pixel(0, 0).0[0], 2);
    // 9x2 -> offset round(3.5) = 4
    let img = RgbImage::from_fn(9, 2, |x, _| image::Rgb([x as u8, 0, 0]));
    assert_eq!(
        resize_and_center_crop(&img, 2).unwrap().get_pixel(0, 0).0[0],
        4
    );
    // taller
    let img = RgbImage::from_fn(2, 9, |_, y| image::Rgb([0, y as u8, 0]));
    assert_eq!(
        resize_and_center_crop(&img, 2).unwrap().get_pixel(0, 0).0[1],
        4
    );
    let v = preprocess_for_vq(&pattern(30, 11), 8).unwrap();
    assert_eq!(v.len(), 3 * 64);
    assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
    assert_eq!(
        preprocess_for_vq(&RgbImage::new(0, 3), 4).unwrap(),
        vec![-1.0; 48]
    );
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
        image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![255u16, 256, 65535]).unwrap();
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

#[test]
fn an_elongated_image_is_refused_before_resizing() {
    // A 1 × 1 000 000 strip: resizing its short side to 32 first would take 3 GB.
    let strip = RgbImage::new(1, 1_000_000);
    let e = preprocess_for_vq(&strip, 32).unwrap_err();
    assert!(e.to_string().contains("too elongated"), "{e}");
    assert!(preprocess_for_vq(&RgbImage::new(3, 200), 32).is_ok());
}
