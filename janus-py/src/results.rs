//! What the calls return: `Answer` and `GeneratedImage`.

use pyo3::prelude::*;
use pyo3::types::PyString;

use janus_core::pipeline::{self, GeneratedImage as CoreImage};

use crate::images::{to_pil, tokens_to_numpy};

/// The answer to a question about images.
///
/// ``str(answer)`` is the text.
#[pyclass(frozen, module = "janus_rs", name = "Answer")]
pub(crate) struct Answer {
    /// The answer text (special tokens left out).
    #[pyo3(get)]
    text: String,
    /// The new token ids, with the end-of-sentence id last when generation stopped on it.
    #[pyo3(get)]
    token_ids: Vec<u32>,
    /// Length of the prompt in tokens, after image-token expansion.
    #[pyo3(get)]
    prompt_tokens: usize,
    /// Seconds spent encoding the images.
    #[pyo3(get)]
    vision_seconds: f64,
    /// Seconds to run the prompt and pick the first token.
    #[pyo3(get)]
    prefill_seconds: f64,
    /// Seconds for the tokens after the first.
    #[pyo3(get)]
    decode_seconds: f64,
}

impl From<pipeline::Answer> for Answer {
    fn from(a: pipeline::Answer) -> Self {
        Answer {
            text: a.text,
            token_ids: a.token_ids,
            prompt_tokens: a.prompt_tokens,
            vision_seconds: a.vision_time.as_secs_f64(),
            prefill_seconds: a.prefill_time.as_secs_f64(),
            decode_seconds: a.decode_time.as_secs_f64(),
        }
    }
}

#[pymethods]
impl Answer {
    fn __str__(&self) -> &str {
        &self.text
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let text = PyString::new(py, &self.text).repr()?;
        Ok(format!(
            "Answer(text={text}, tokens={}, prompt_tokens={})",
            self.token_ids.len(),
            self.prompt_tokens
        ))
    }
}

/// One generated image.
#[pyclass(frozen, module = "janus_rs", name = "GeneratedImage")]
pub(crate) struct GeneratedImage {
    /// The picture, a ``PIL.Image.Image`` in mode RGB.
    #[pyo3(get)]
    image: Py<PyAny>,
    /// The image tokens it was decoded from: a numpy int32 array of shape (rows, cols).
    #[pyo3(get)]
    tokens: Py<PyAny>,
    /// The seed of the call that made it.
    #[pyo3(get)]
    seed: u64,
    width: u32,
    height: u32,
    rows: usize,
    cols: usize,
}

impl GeneratedImage {
    /// The Python view of a core image.
    pub(crate) fn new(py: Python<'_>, g: &CoreImage) -> PyResult<Self> {
        Ok(GeneratedImage {
            image: to_pil(py, &g.image)?.unbind(),
            tokens: tokens_to_numpy(py, &g.tokens)?.unbind(),
            seed: g.seed,
            width: g.image.width(),
            height: g.image.height(),
            rows: g.tokens.rows,
            cols: g.tokens.cols,
        })
    }
}

#[pymethods]
impl GeneratedImage {
    fn __repr__(&self) -> String {
        format!(
            "GeneratedImage(size={}x{}, tokens={}x{}, seed={})",
            self.width, self.height, self.rows, self.cols, self.seed
        )
    }
}
