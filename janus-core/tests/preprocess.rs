//! Image decoding and preprocessing against the reference processors
//! (`tests/fixtures/preprocess/expected.safetensors`, written by
//! `tests/reference/make_fixtures.py preprocess`):
//!
//! * the official `VLMImageProcessor` (Pillow bicubic, truncated short side) and transformers 5's
//!   `JanusImageProcessor` (PyTorch uint8 bicubic, rounded short side; and its PIL backend
//!   `JanusImageProcessorPil`): padded `u8` image and float32 `pixel_values`, bit for bit;
//! * the VQ input (short side resize + centre crop), bit for bit;
//! * Pillow's `Image.open(f).convert("RGB")` of small PNG / JPEG / BMP / WebP files.
//!
//! Run with `--nocapture` to see the measured differences.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use janus_core::config::Layout;
use janus_core::processor::image::{
    CLIP_STD, ImageProcessorConfig, PixelArithmetic, Resampler, RgbImage, decode_image, open_image,
    preprocess_for_understanding, preprocess_for_vq, resize_and_center_crop, resize_and_pad,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// One tensor of a reference file: shape and raw little-endian bytes.
struct Tensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Tensor {
    fn u8_image(&self) -> RgbImage {
        assert_eq!(self.dtype, safetensors::Dtype::U8);
        assert_eq!(self.shape.len(), 3);
        assert_eq!(self.shape[2], 3);
        RgbImage::from_raw(
            self.shape[1] as u32,
            self.shape[0] as u32,
            self.data.clone(),
        )
        .unwrap()
    }

    fn f32s(&self) -> Vec<f32> {
        assert_eq!(self.dtype, safetensors::Dtype::F32);
        self.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn i64s(&self) -> Vec<i64> {
        assert_eq!(self.dtype, safetensors::Dtype::I64);
        self.data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let t = Tensor {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            (name, t)
        })
        .collect()
}

fn expected() -> HashMap<String, Tensor> {
    read(&fixtures().join("preprocess/expected.safetensors"))
}

/// The folder and layout of a processor configuration named in the fixture.
fn config(name: &str) -> ImageProcessorConfig {
    if name == "hf-tiny-pil" {
        // transformers' JanusImageProcessorPil: the same settings, Pillow and numpy arithmetic
        let mut cfg = config("hf-tiny");
        cfg.resampler = Resampler::Pillow;
        cfg.arithmetic = PixelArithmetic::Numpy;
        return cfg;
    }
    let (dir, layout) = match name {
        "original-64" => ("preprocess/original-64", Layout::Original),
        "original-clip" => ("preprocess/original-clip", Layout::Original),
        "original-384" => ("original-tiny", Layout::Original),
        "hf-tiny" => ("hf-tiny", Layout::HuggingFace),
        "hf-clip" => ("preprocess/hf-clip", Layout::HuggingFace),
        other => panic!("unknown configuration {other}"),
    };
    ImageProcessorConfig::from_dir(&fixtures().join(dir), layout)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn max_abs_u8(a: &[u8], b: &[u8]) -> i32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (i32::from(*x) - i32::from(*y)).abs())
        .max()
        .unwrap_or(0)
}

fn max_abs_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn configurations_load_as_the_reference_classes() {
    let o = config("original-384");
    assert_eq!((o.image_size, o.min_size), (384, 14));
    assert_eq!(o.image_mean, [0.5; 3]);
    assert_eq!(o.background_color, [127; 3]);
    let c = config("original-clip");
    assert_eq!(c.image_size, 64);
    assert_eq!(c.background_color, [122, 116, 104]);
    let h = config("hf-tiny");
    assert_eq!((h.image_size, h.min_size), (64, 14));
    assert_eq!(h.background_color, [127; 3]);
    let hc = config("hf-clip");
    assert_eq!(hc.image_size, 64);
    assert_eq!(hc.image_std, CLIP_STD.map(|v| v as f32));
    assert_eq!(hc.background_color, [122, 116, 104]);
}

#[test]
fn understanding_matches_the_reference_processors() {
    let exp = expected();
    let mut names: Vec<&String> = exp.keys().collect();
    names.sort();
    let mut report: BTreeMap<String, (i32, usize)> = BTreeMap::new();
    let mut checked_pixels = 0;
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() != 3
            || ["original-384", "src", "decode"].contains(&parts[0])
            || parts[0].starts_with("vq")
        {
            continue;
        }
        let (cfg_name, case, kind) = (parts[0], parts[1], parts[2]);
        let cfg = config(cfg_name);
        let src = exp[&format!("src.{case}")].u8_image();
        match kind {
            "padded_u8" => {
                let want = exp[name].u8_image();
                let got = resize_and_pad(&src, &cfg);
                assert_eq!(got.dimensions(), want.dimensions(), "{name}");
                let d = max_abs_u8(got.as_raw(), want.as_raw());
                let differing = got
                    .as_raw()
                    .iter()
                    .zip(want.as_raw())
                    .filter(|(a, b)| a != b)
                    .count();
                println!(
                    "{cfg_name:14} {case:8} {}x{} -> {:?}: max |du8| = {d} ({differing} values differ)",
                    src.width(),
                    src.height(),
                    cfg.resized_size(src.width() as usize, src.height() as usize)
                );
                let e = report.entry(cfg_name.to_string()).or_default();
                e.0 = e.0.max(d);
                e.1 += 1;
            }
            "pixel_values" => {
                let want = exp[name].f32s();
                let got = preprocess_for_understanding(&src, &cfg);
                println!(
                    "{cfg_name:14} {case:8} pixel_values: max |d| = {:e}, bit-identical: {}",
                    max_abs_f32(&got, &want),
                    bits_equal(&got, &want)
                );
                assert!(bits_equal(&got, &want), "{name}: pixel_values differ");
                checked_pixels += 1;
            }
            other => panic!("unexpected tensor kind {other}"),
        }
    }
    for (cfg, (d, n)) in &report {
        println!("{cfg}: {n} cases, max |du8| = {d}");
        assert_eq!(
            *d, 0,
            "{cfg}: resized and padded image differs from the reference"
        );
    }
    assert_eq!(report.len(), 5);
    assert!(checked_pixels >= 7, "{checked_pixels}");
}

#[test]
fn official_processor_at_384() {
    let exp = expected();
    let cfg = config("original-384");
    let mut cases: Vec<&str> = exp
        .keys()
        .filter_map(|k| k.strip_prefix("original-384.")?.strip_suffix(".content_u8"))
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let src = exp[&format!("src.{case}")].u8_image();
        let want = exp[&format!("original-384.{case}.content_u8")].u8_image();
        let tl = exp[&format!("original-384.{case}.content_top_left")].i64s();
        let (top, left) = (tl[0] as u32, tl[1] as u32);
        let got = resize_and_pad(&src, &cfg);
        assert_eq!(got.dimensions(), (384, 384));
        let mut max = 0;
        for y in 0..384 {
            for x in 0..384 {
                let inside =
                    y >= top && y < top + want.height() && x >= left && x < left + want.width();
                let w = if inside {
                    want.get_pixel(x - left, y - top).0
                } else {
                    [127; 3]
                };
                max = max.max(max_abs_u8(&got.get_pixel(x, y).0, &w));
            }
        }
        println!(
            "original-384  {case:8} {}x{} -> {}x{} at ({top}, {left}): max |du8| = {max}",
            src.width(),
            src.height(),
            want.width(),
            want.height()
        );
        assert_eq!(max, 0, "{case}");
        // the pixel values are the numpy map of the padded image
        let pv = preprocess_for_understanding(&src, &cfg);
        let p = got.get_pixel(left, top).0[1];
        let v = pv[384 * 384 + (top * 384 + left) as usize];
        assert_eq!(v, ((f64::from(p) * (1.0 / 255.0)) as f32 - 0.5) / 0.5);
    }
}

#[test]
fn official_processor_vq_preprocess_fixture() {
    // original-tiny/expected/vq_preprocess.safetensors: a 45x70 image through VLMImageProcessor
    // (resize to 246x384, pad to 384x384); pixel_values = (u8/255 - 0.5)/0.5.
    let exp = read(&fixtures().join("original-tiny/expected/vq_preprocess.safetensors"));
    let src = exp["pre_src_u8"].u8_image();
    let want = exp["pre_processed_u8"].u8_image();
    let cfg = config("original-384");
    let got = resize_and_pad(&src, &cfg);
    let d = max_abs_u8(got.as_raw(), want.as_raw());
    println!(
        "vq_preprocess.safetensors pre_processed_u8 (45x70 -> 384x246, padded): max |du8| = {d}"
    );
    assert_eq!(d, 0);
    let pv = preprocess_for_understanding(&src, &cfg);
    let n = 384 * 384;
    for c in 0..3 {
        for i in 0..n {
            let u = f32::from(want.as_raw()[i * 3 + c]);
            assert!((pv[c * n + i] - (u / 255.0 - 0.5) / 0.5).abs() <= 1e-6);
        }
    }
}

#[test]
fn vq_input_matches_torchvision_resize_and_center_crop() {
    let exp = expected();
    let mut names: Vec<&String> = exp.keys().filter(|k| k.starts_with("vq")).collect();
    names.sort();
    let mut crops = 0;
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        let size: usize = parts[0][2..].parse().unwrap();
        let src = exp[&format!("src.{}", parts[1])].u8_image();
        match parts[2] {
            "crop_u8" => {
                let want = exp[name].u8_image();
                let got = resize_and_center_crop(&src, size).unwrap();
                assert_eq!(got.dimensions(), want.dimensions(), "{name}");
                let d = max_abs_u8(got.as_raw(), want.as_raw());
                println!(
                    "{name}: {}x{} -> {size}: max |du8| = {d}",
                    src.width(),
                    src.height()
                );
                assert_eq!(d, 0, "{name}");
                crops += 1;
            }
            "pixel_values" => {
                let want = exp[name].f32s();
                let got = preprocess_for_vq(&src, size).unwrap();
                println!("{name}: max |d| = {:e}", max_abs_f32(&got, &want));
                assert!(bits_equal(&got, &want), "{name}");
            }
            other => panic!("unexpected tensor kind {other}"),
        }
    }
    assert_eq!(crops, 8);
}

#[test]
fn decoding_matches_pillow_convert_rgb() {
    let exp = expected();
    let dir = fixtures().join("preprocess/decode");
    let mut names: Vec<&String> = exp.keys().filter(|k| k.starts_with("decode.")).collect();
    names.sort();
    assert!(names.len() >= 15, "{}", names.len());
    for name in names {
        let file = name.strip_prefix("decode.").unwrap();
        let want = exp[name.as_str()].u8_image();
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let got = decode_image(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(got.dimensions(), want.dimensions(), "{file}");
        let d = max_abs_u8(got.as_raw(), want.as_raw());
        let differing = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        println!(
            "{file:26} max |du8| = {d} ({differing} of {} values differ)",
            want.as_raw().len()
        );
        // Lossy decoders are not specified bit for bit: zune-jpeg / image-webp against libjpeg-turbo /
        // libwebp (measured when the fixture was made: see the report printed above).
        let bound = if file.ends_with(".jpg") {
            2
        } else if file.ends_with("_q80.webp") {
            1
        } else {
            0
        };
        assert!(d <= bound, "{file}: max |du8| = {d} > {bound}");
        // open_image reads the same
        assert_eq!(open_image(&dir.join(file)).unwrap(), got);
    }
}
