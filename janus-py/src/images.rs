//! Images and token grids between Python (PIL, paths, numpy) and janus-core.

use std::path::PathBuf;

use numpy::{
    PyArray1, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray2, PyReadonlyArray3,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use janus_core::Limits;
use janus_core::pipeline::ImageTokens;
use janus_core::processor::image::{RgbImage, open_image_within, rgb_from_raw};

use crate::errors::{self, guarded, invalid_input};

/// One image argument, before any file is read.
enum ImageInput {
    /// Pixels already in memory.
    Pixels(RgbImage),
    /// A file to read and decode.
    Path(PathBuf),
}

/// The images of an `images` argument: `None`, one image, or a list or tuple of them. Files are
/// read and decoded with the interpreter detached.
pub(crate) fn images_arg(
    py: Python<'_>,
    obj: Option<&Bound<'_, PyAny>>,
    limits: &Limits,
) -> PyResult<Vec<RgbImage>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(Vec::new());
    };
    let inputs = if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        obj.try_iter()?
            .map(|item| image_input(py, &item?))
            .collect::<PyResult<Vec<_>>>()?
    } else {
        vec![image_input(py, obj)?]
    };
    limits
        .check_images(inputs.len())
        .map_err(|e| errors::to_py(py, e))?;
    resolve(py, inputs, limits)
}

/// One image (a PIL image, a path or a numpy array).
pub(crate) fn image_arg(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    limits: &Limits,
) -> PyResult<RgbImage> {
    let mut images = resolve(py, vec![image_input(py, obj)?], limits)?;
    Ok(images.remove(0))
}

/// Reads the files among `inputs` (detached from the interpreter), within `limits`.
fn resolve(py: Python<'_>, inputs: Vec<ImageInput>, limits: &Limits) -> PyResult<Vec<RgbImage>> {
    let result = py.detach(|| {
        guarded(|| {
            inputs
                .into_iter()
                .map(|input| match input {
                    ImageInput::Pixels(img) => Ok(img),
                    ImageInput::Path(path) => open_image_within(&path, limits),
                })
                .collect::<Result<Vec<_>, _>>()
        })
    });
    errors::finish(py, result, None)
}

fn image_input(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<ImageInput> {
    if obj.is_instance_of::<PyString>() || obj.hasattr("__fspath__")? {
        return Ok(ImageInput::Path(obj.extract::<PathBuf>()?));
    }
    if let Ok(array) = obj.cast::<PyUntypedArray>() {
        return numpy_image(py, array).map(ImageInput::Pixels);
    }
    if is_pil_image(py, obj) {
        return pil_image(py, obj).map(ImageInput::Pixels);
    }
    Err(PyTypeError::new_err(format!(
        "an image must be a PIL.Image.Image, a path, or a numpy uint8 array of shape \
         (height, width, 3), not {}",
        type_name(obj)
    )))
}

/// A numpy `uint8` array of shape `(height, width, 3)`.
fn numpy_image(py: Python<'_>, array: &Bound<'_, PyUntypedArray>) -> PyResult<RgbImage> {
    let dtype = array.dtype();
    let shape = array.shape().to_vec();
    if !dtype.is_equiv_to(&numpy::dtype::<u8>(py)) || shape.len() != 3 || shape[2] != 3 {
        return Err(invalid_input(
            py,
            format!(
                "a numpy image must be a uint8 array of shape (height, width, 3), got a {} array \
                 of shape {shape:?}",
                dtype.str().map(|s| s.to_string()).unwrap_or_default()
            ),
        ));
    }
    let pixels: PyReadonlyArray3<'_, u8> = array.extract()?;
    let view = pixels.as_array();
    let data: Vec<u8> = match view.as_slice() {
        Some(slice) => slice.to_vec(),
        None => view.iter().copied().collect(),
    };
    rgb_from_raw(shape[1], shape[0], shape[1].saturating_mul(3), &data)
        .map_err(|e| errors::to_py(py, e))
}

/// Whether `obj` is a `PIL.Image.Image` (false when Pillow is not installed).
fn is_pil_image(py: Python<'_>, obj: &Bound<'_, PyAny>) -> bool {
    py.import("PIL.Image")
        .and_then(|m| m.getattr("Image"))
        .and_then(|cls| obj.is_instance(&cls))
        .unwrap_or(false)
}

/// A PIL image, converted to RGB as `Image.convert("RGB")` does (alpha dropped).
fn pil_image(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<RgbImage> {
    let mode: String = obj.getattr("mode")?.extract()?;
    let rgb = if mode == "RGB" {
        obj.clone()
    } else {
        obj.call_method1("convert", ("RGB",))?
    };
    let (width, height): (usize, usize) = rgb.getattr("size")?.extract()?;
    let bytes = rgb.call_method0("tobytes")?;
    let data = bytes.cast::<PyBytes>()?.as_bytes();
    rgb_from_raw(width, height, width.saturating_mul(3), data).map_err(|e| errors::to_py(py, e))
}

/// A `PIL.Image.Image` (mode RGB) of an image.
pub(crate) fn to_pil<'py>(py: Python<'py>, image: &RgbImage) -> PyResult<Bound<'py, PyAny>> {
    let bytes = PyBytes::new(py, image.as_raw());
    py.import("PIL.Image")?
        .call_method1("frombytes", ("RGB", (image.width(), image.height()), bytes))
}

/// A token grid as a numpy `int32` array of shape `(rows, cols)`.
pub(crate) fn tokens_to_numpy<'py>(
    py: Python<'py>,
    tokens: &ImageTokens,
) -> PyResult<Bound<'py, PyAny>> {
    let ids: Vec<i32> = tokens.ids.iter().map(|&t| t as i32).collect();
    Ok(PyArray1::from_vec(py, ids)
        .reshape([tokens.rows, tokens.cols])?
        .into_any())
}

/// A token grid from any 2-D array-like of integers.
pub(crate) fn tokens_arg(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<ImageTokens> {
    let np = py.import("numpy")?;
    let array = np.call_method1("asarray", (obj,))?;
    let array = array.cast::<PyUntypedArray>()?;
    let kind = array.dtype().kind();
    let shape = array.shape().to_vec();
    if !matches!(kind, b'i' | b'u') || shape.len() != 2 {
        return Err(invalid_input(
            py,
            format!(
                "image tokens must be a 2-D array of integers (rows, cols), got a {} array of \
                 shape {shape:?}",
                array
                    .dtype()
                    .str()
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            ),
        ));
    }
    let wide = array.call_method1("astype", ("int64",))?;
    let wide: PyReadonlyArray2<'_, i64> = wide.extract()?;
    let ids = wide
        .as_array()
        .iter()
        .map(|&v| u32::try_from(v))
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|_| invalid_input(py, "image tokens must be in 0..2**32"))?;
    Ok(ImageTokens {
        ids,
        rows: shape[0],
        cols: shape[1],
    })
}

/// The name of an object's type, for messages.
pub(crate) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}
