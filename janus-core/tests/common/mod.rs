//! Shared helpers of the integration tests: fixture paths, reference tensors, the test device.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use janus_core::Device;

/// `tests/fixtures/<name>` at the repository root.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// The original-layout checkpoint written by `tests/reference/gen_original.py` (too large to
/// commit); `scripts/setup.sh` writes it.
pub fn original_checkpoint(variant: &str) -> PathBuf {
    let cache = std::env::var_os("JANUS_FIXTURE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/janus-rs-fixtures")
        });
    let dir = cache.join("original-tiny").join(variant);
    assert!(
        dir.join("config.json").is_file(),
        "{} is missing: run `bash scripts/setup.sh` (it writes the original-layout test checkpoint)",
        dir.display()
    );
    dir
}

/// The device the tests run on: `JANUS_TEST_DEVICE=wgpu` picks the wgpu backend.
pub fn device() -> Device {
    let name = std::env::var("JANUS_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    name.parse::<janus_core::Backend>()
        .and_then(|b| b.device())
        .expect("test device")
}

/// Whether the tests run on a GPU backend (`JANUS_TEST_DEVICE` other than `cpu`).
pub fn on_gpu() -> bool {
    std::env::var("JANUS_TEST_DEVICE").is_ok_and(|d| d != "cpu")
}

/// A tensor of a reference safetensors file: its values (as f64) and shape.
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

/// Checks a parameter's values (or gradient) against a reference tensor: same shape, and the
/// largest difference at most `tol` times the reference's norm (`relative`) or `tol`.
pub fn assert_near_reference(
    what: &str,
    shape: &[usize],
    values: &[f32],
    want: &RefTensor,
    tol: f64,
    relative: bool,
) {
    assert_eq!(shape, want.shape.as_slice(), "{what}");
    let norm = want.values.iter().map(|v| v * v).sum::<f64>().sqrt();
    let worst = values
        .iter()
        .zip(&want.values)
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0.0, f64::max);
    let limit = if relative { tol * norm } else { tol };
    assert!(worst <= limit, "{what}: {worst:e} off (norm {norm})");
}

/// Reads every tensor of a reference file (f32, i64, i32 or u8).
pub fn read_reference(path: &Path) -> std::collections::HashMap<String, RefTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I32 => data
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::U8 => data.iter().map(|&b| f64::from(b)).collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (
                name,
                RefTensor {
                    shape: view.shape().to_vec(),
                    values,
                },
            )
        })
        .collect()
}

/// Rows of an id matrix `[rows, cols]`.
pub fn id_rows(t: &RefTensor) -> Vec<Vec<u32>> {
    t.values
        .chunks(t.shape[1])
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect()
}

/// A burn tensor's values as f64.
pub fn values<const D: usize>(t: burn::tensor::Tensor<D>) -> (Vec<usize>, Vec<f64>) {
    let shape = t.dims().to_vec();
    let data = t.into_data().convert::<f32>();
    (
        shape,
        data.try_into_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
    )
}

/// Largest absolute difference, after checking the shapes agree.
pub fn max_abs_diff(shape: &[usize], got: &[f64], want: &RefTensor) -> f64 {
    assert_eq!(shape, want.shape.as_slice(), "shape");
    got.iter()
        .zip(&want.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// The official understanding fixture's input image: the 48×48 `image_small_u8` upscaled to
/// `size` (nearest, as `np.repeat` does), as CHW values `(u8/255 − 0.5)/0.5`.
pub fn upscaled_pixels(small: &RefTensor, size: usize) -> Vec<f64> {
    let (h, w) = (small.shape[0], small.shape[1]);
    let mut chw = vec![0f64; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            for c in 0..3 {
                let v = small.values[((y * h / size) * w + x * w / size) * 3 + c];
                chw[c * size * size + y * size + x] = (v / 255.0 - 0.5) / 0.5;
            }
        }
    }
    chw
}

/// A JSON list of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("a list of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}
