//! # janus-py
//!
//! The native part of the Python package `janus_rs` (module `janus_rs._janus_rs`): a thin PyO3
//! layer over janus-core. Images come in as PIL images, paths or numpy arrays and go out as PIL
//! images; token grids are numpy arrays; every model call releases the GIL. The exception
//! classes and the package's public names live in `python/janus_rs`.

mod errors;
mod images;
mod model;
mod options;
mod results;
mod stream;
mod train;

use pyo3::prelude::*;

/// Janus and Janus-Pro multimodal models (image understanding and text-to-image generation) in
/// Rust.
#[pymodule(name = "_janus_rs")]
fn janus_rs_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::Janus>()?;
    m.add_class::<results::Answer>()?;
    m.add_class::<results::GeneratedImage>()?;
    m.add_class::<stream::TextStream>()?;
    m.add_function(wrap_pyfunction!(train::train, m)?)?;
    m.add_function(wrap_pyfunction!(train::loss, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
