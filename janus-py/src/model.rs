//! The `Janus` class: a loaded model and its calls, each run with the interpreter detached.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyMapping, PyString, PyTuple};

use janus_core::pipeline::{self, LoadOptions, Role, Turn};
use janus_core::{Backend, Error, Limits, WeightFormat};

use crate::errors::{self, guarded, invalid_input, keep_going};
use crate::images::{image_arg, images_arg, to_pil, tokens_arg, tokens_to_numpy, type_name};
use crate::options::{TextArgs, image_options, parse_dtype, sampling};
use crate::results::{Answer, GeneratedImage};
use crate::stream::TextStream;

// The model is shared with background threads and used with the interpreter detached.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<pipeline::Janus>();
};

/// A loaded Janus or Janus-Pro model: answers questions about images and generates images.
///
/// Load it with ``Janus.load``. Every call releases the GIL while the model runs, so other
/// Python threads keep going; one model can serve calls from several threads.
#[pyclass(frozen, module = "janus_rs", name = "Janus")]
pub(crate) struct Janus {
    inner: Arc<pipeline::Janus>,
    backend: Backend,
}

/// The model argument: a folder path (str or os.PathLike), or a Hugging Face id (`org/name`)
/// given as a str.
pub(crate) fn model_arg(model: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    if model.is_instance_of::<PyString>() || model.hasattr("__fspath__")? {
        return model.extract();
    }
    Err(PyTypeError::new_err(format!(
        "model must be a folder path (str or os.PathLike) or a Hugging Face id, not {}",
        type_name(model)
    )))
}

/// The load options of Python's string arguments.
pub(crate) fn load_options(
    py: Python<'_>,
    backend: &str,
    dtype: &str,
    weights: &str,
    lora: Option<PathBuf>,
) -> PyResult<LoadOptions> {
    let weights: WeightFormat = weights.parse().map_err(|e| errors::to_py(py, e))?;
    let backend: Backend = backend.parse().map_err(|e| errors::to_py(py, e))?;
    let dtype = parse_dtype(dtype).ok_or_else(|| {
        invalid_input(
            py,
            format!("unknown dtype {dtype:?} (expected auto, f32, f16 or bf16)"),
        )
    })?;
    Ok(LoadOptions {
        backend,
        dtype,
        weights,
        lora,
        limits: Limits::default(),
    })
}

/// The folder of a model: an existing folder as is; otherwise a hub id looked up in the
/// Hugging Face cache and downloaded into it when missing.
pub(crate) fn resolve_model(model: &Path) -> Result<PathBuf, Error> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    match model.to_str() {
        Some(id) => janus_core::hub::resolve(id, None),
        None => Err(Error::MissingFile {
            dir: model.to_path_buf(),
            message: "no such model folder".into(),
        }),
    }
}

/// The turns of a conversation: a list of mappings with `role`, `content` and optional `images`.
fn conversation_arg(
    py: Python<'_>,
    conversation: &Bound<'_, PyAny>,
    limits: &Limits,
) -> PyResult<Vec<Turn>> {
    if !(conversation.is_instance_of::<PyList>() || conversation.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(format!(
            "conversation must be a list of turns ({{\"role\": ..., \"content\": ..., \"images\": [...]}}), not {}",
            type_name(conversation)
        )));
    }
    let mut turns = Vec::new();
    for (i, item) in conversation.try_iter()?.enumerate() {
        let item = item?;
        let turn = item.cast::<PyMapping>().map_err(|_| {
            PyTypeError::new_err(format!(
                "turn {i} must be a dict with \"role\" and \"content\", not {}",
                type_name(&item)
            ))
        })?;
        let field = |key: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
            if turn.contains(key)? {
                Ok(Some(turn.get_item(key)?))
            } else {
                Ok(None)
            }
        };
        let role: String = match field("role")? {
            Some(r) => r.extract()?,
            None => return Err(invalid_input(py, format!("turn {i} has no \"role\""))),
        };
        let role = match role.as_str() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(invalid_input(
                    py,
                    format!(
                        "turn {i}: role must be \"system\", \"user\" or \"assistant\", \
                         not {other:?}"
                    ),
                ));
            }
        };
        let content: String = match field("content")? {
            Some(c) => c.extract()?,
            None => return Err(invalid_input(py, format!("turn {i} has no \"content\""))),
        };
        let images = images_arg(py, field("images")?.as_ref(), limits)?;
        turns.push(Turn {
            role,
            content,
            images,
        });
    }
    Ok(turns)
}

/// The prompts of a `generate` call: one string, or a list or tuple of them.
fn prompts_arg(py: Python<'_>, prompt: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if prompt.is_instance_of::<PyString>() {
        return Ok(vec![prompt.extract()?]);
    }
    if prompt.is_instance_of::<PyList>() || prompt.is_instance_of::<PyTuple>() {
        let prompts = prompt
            .try_iter()?
            .map(|p| p?.extract::<String>())
            .collect::<PyResult<Vec<_>>>()?;
        if prompts.is_empty() {
            return Err(invalid_input(py, "the list of prompts is empty"));
        }
        return Ok(prompts);
    }
    Err(PyTypeError::new_err(format!(
        "prompt must be a str or a list of str, not {}",
        type_name(prompt)
    )))
}

/// The seeds of `n` requests: one int for all, a list of `n` ints, or None (random each).
fn seeds_arg(
    py: Python<'_>,
    seed: Option<&Bound<'_, PyAny>>,
    n: usize,
) -> PyResult<Vec<Option<u64>>> {
    let Some(seed) = seed.filter(|s| !s.is_none()) else {
        return Ok(vec![None; n]);
    };
    if let Ok(one) = seed.extract::<u64>() {
        return Ok(vec![Some(one); n]);
    }
    if seed.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "seed must be an int or a list of ints, not a str",
        ));
    }
    let seeds: Vec<u64> = seed.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "seed must be an int ≥ 0 or a list of them, not {}",
            type_name(seed)
        ))
    })?;
    if seeds.len() != n {
        return Err(invalid_input(
            py,
            format!("{} seeds for {n} requests", seeds.len()),
        ));
    }
    Ok(seeds.into_iter().map(Some).collect())
}

impl Janus {
    /// Runs a text generation with the interpreter detached, checking for Ctrl-C at each piece.
    fn answer(
        &self,
        py: Python<'_>,
        run: impl FnOnce(
            &pipeline::Janus,
            &mut dyn FnMut(&str) -> bool,
        ) -> Result<pipeline::Answer, Error>
        + Send,
    ) -> PyResult<Answer> {
        let janus = &*self.inner;
        let mut interrupt = None;
        let result =
            py.detach(|| guarded(|| run(janus, &mut |_| keep_going(&mut interrupt, |_| Ok(true)))));
        errors::finish(py, result, interrupt).map(Answer::from)
    }
}

#[pymethods]
impl Janus {
    /// Loads a model: a folder (Hugging Face or original DeepSeek layout), or a Hugging Face id
    /// (``"org/name"``) found in the Hugging Face cache or downloaded into it
    /// (``HF_HUB_OFFLINE=1`` forbids downloading).
    ///
    /// ``backend`` is ``"cpu"``, ``"wgpu"`` or ``"cuda"`` (those compiled in); ``dtype``, the
    /// compute dtype, is ``"auto"`` (bf16 on a CPU with AMX when the weights are held in
    /// bf16; else f32), ``"f32"``, ``"f16"`` or ``"bf16"`` (on the
    /// CPU: bf16 operands and f32 sums for the large products, f32 elsewhere); ``weights``, how
    /// weights are held
    /// in memory, is ``"auto"`` (on the CPU the half precision the files store, else f32; on a
    /// GPU the compute dtype), ``"f32"``, ``"bf16"``, ``"f16"``, ``"q8_0"`` or ``"q4_0"``.
    /// ``lora``, a LoRA adapter folder in PEFT's format (``adapter_config.json`` +
    /// ``adapter_model.safetensors``), is merged into the weights it adapts as they load.
    /// ``max_images``, ``max_image_pixels``, ``max_count`` and ``max_input_mb`` limit every
    /// request on the model (as ``janus --max-images`` ...): most images per request, most
    /// pixels of one input image, most images one ``generate`` makes (prompts × count), the
    /// largest image file read, in MiB. Past one, ``InvalidInputError`` before the work starts.
    #[staticmethod]
    #[pyo3(signature = (model, backend = "cpu", dtype = "auto", weights = "auto", lora = None,
                        max_images = 8, max_image_pixels = 50_000_000, max_count = 64,
                        max_input_mb = 64))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        model: &Bound<'_, PyAny>,
        backend: &str,
        dtype: &str,
        weights: &str,
        lora: Option<PathBuf>,
        max_images: usize,
        max_image_pixels: u64,
        max_count: usize,
        max_input_mb: u64,
    ) -> PyResult<Self> {
        let mut options = load_options(py, backend, dtype, weights, lora)?;
        options.limits = Limits {
            max_images,
            max_image_pixels,
            max_count,
            max_input_mb,
        };
        let backend = options.backend;
        let model = model_arg(model)?;
        let result =
            py.detach(|| guarded(|| pipeline::Janus::load(&resolve_model(&model)?, &options)));
        let inner = errors::finish(py, result, None)?;
        Ok(Janus {
            inner: Arc::new(inner),
            backend,
        })
    }

    /// The folder the model was loaded from.
    #[getter]
    fn dir(&self) -> &Path {
        self.inner.dir()
    }

    /// The backend it runs on (``"cpu"``, ``"wgpu"`` or ``"cuda"``).
    #[getter]
    fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
        }
    }

    /// The dtype it computes in (what ``"auto"`` resolved to): ``"f32"``, ``"f16"`` or
    /// ``"bf16"``.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype().name()
    }

    /// How the weights are held in memory (what ``"auto"`` resolved to: the storage of most of
    /// their bytes): ``"f32"``, ``"bf16"``, ``"f16"``, ``"q8_0"`` or ``"q4_0"``.
    #[getter]
    fn weights(&self) -> &'static str {
        self.inner.weights().name()
    }

    /// Bytes the weights take in memory.
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.inner.storage().bytes
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let repr = |s: &str| PyString::new(py, s).repr().map(|r| r.to_string());
        Ok(format!(
            "Janus(dir={}, backend={}, dtype={}, weights={})",
            repr(&self.inner.dir().display().to_string())?,
            repr(self.backend())?,
            repr(self.dtype())?,
            repr(self.weights())?
        ))
    }

    /// Answers a question about images (one image, a list, or None).
    ///
    /// Each image is a ``PIL.Image.Image``, a path, or a numpy uint8 array of shape
    /// (height, width, 3). ``<image_placeholder>`` tags in the question mark the images' places
    /// (one per image, in order); without tags each image comes before the question. Greedy by
    /// default; ``temperature > 0`` samples (``seed`` None picks a random seed).
    #[pyo3(signature = (images, question, max_new_tokens = 512, temperature = 0.0, top_p = None,
                        top_k = None, repetition_penalty = 1.0, seed = None))]
    #[allow(clippy::too_many_arguments)]
    fn understand(
        &self,
        py: Python<'_>,
        images: Option<&Bound<'_, PyAny>>,
        question: String,
        max_new_tokens: usize,
        temperature: f32,
        top_p: Option<f32>,
        top_k: Option<usize>,
        repetition_penalty: f32,
        seed: Option<u64>,
    ) -> PyResult<Answer> {
        let images = images_arg(py, images, self.inner.limits())?;
        let options = TextArgs {
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed,
        }
        .options();
        self.answer(py, move |janus, on_text| {
            janus.understand_stream(&images, &question, &options, on_text)
        })
    }

    /// Answers several requests at once, each ``(images, question)`` (images as in
    /// ``understand``: one, a list, or None).
    ///
    /// The prompts run one by one, then the answers decode together (one pass of the model per
    /// token step for all of them). Each answer equals ``understand(images, question, ...,
    /// seed=...)`` of its request alone: ``seed`` is one seed for every request, a list with one
    /// per request, or None (a random seed each). Ctrl-C cancels.
    #[pyo3(signature = (requests, max_new_tokens = 512, temperature = 0.0, top_p = None,
                        top_k = None, repetition_penalty = 1.0, seed = None))]
    #[allow(clippy::too_many_arguments)]
    fn understand_batch(
        &self,
        py: Python<'_>,
        requests: &Bound<'_, PyAny>,
        max_new_tokens: usize,
        temperature: f32,
        top_p: Option<f32>,
        top_k: Option<usize>,
        repetition_penalty: f32,
        seed: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<Answer>> {
        if requests.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err(
                "requests must be a list of (images, question) pairs, not a str",
            ));
        }
        let mut parsed = Vec::new();
        for item in requests.try_iter()? {
            let item = item?;
            let pair = item.cast::<PyTuple>().ok().filter(|t| t.len() == 2);
            let Some(pair) = pair else {
                return Err(PyTypeError::new_err(format!(
                    "each request must be an (images, question) tuple, not {}",
                    type_name(&item)
                )));
            };
            let question: String = pair.get_item(1)?.extract().map_err(|_| {
                PyTypeError::new_err("a request's question must be a str".to_string())
            })?;
            let images = images_arg(py, Some(&pair.get_item(0)?), self.inner.limits())?;
            parsed.push((images, question));
        }
        let seeds = seeds_arg(py, seed, parsed.len())?;
        let janus = &*self.inner;
        let mut interrupt = None;
        let result = py.detach(|| {
            let requests: Vec<_> = parsed
                .iter()
                .zip(seeds)
                .map(|((images, question), seed)| {
                    let options = TextArgs {
                        max_new_tokens,
                        temperature,
                        top_p,
                        top_k,
                        repetition_penalty,
                        seed,
                    }
                    .options();
                    (images.as_slice(), question.as_str(), options)
                })
                .collect();
            guarded(|| {
                janus.understand_each(&requests, &mut || keep_going(&mut interrupt, |_| Ok(true)))
            })
        });
        let answers = errors::finish(py, result, interrupt)?;
        Ok(answers.into_iter().map(Answer::from).collect())
    }

    /// ``understand`` as an iterator of text pieces, produced while the model runs.
    ///
    /// Closing the returned stream (or dropping it) cancels the generation; after the last
    /// piece its ``answer`` holds the whole ``Answer``.
    #[pyo3(signature = (images, question, max_new_tokens = 512, temperature = 0.0, top_p = None,
                        top_k = None, repetition_penalty = 1.0, seed = None))]
    #[allow(clippy::too_many_arguments)]
    fn understand_stream(
        &self,
        py: Python<'_>,
        images: Option<&Bound<'_, PyAny>>,
        question: String,
        max_new_tokens: usize,
        temperature: f32,
        top_p: Option<f32>,
        top_k: Option<usize>,
        repetition_penalty: f32,
        seed: Option<u64>,
    ) -> PyResult<TextStream> {
        let images = images_arg(py, images, self.inner.limits())?;
        let options = TextArgs {
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed,
        }
        .options();
        let janus = Arc::clone(&self.inner);
        TextStream::start(Box::new(move |on_text| {
            janus.understand_stream(&images, &question, &options, on_text)
        }))
    }

    /// The assistant's next turn in a conversation.
    ///
    /// ``conversation`` is a list of turns ``{"role": "user" | "assistant", "content": str,
    /// "images": [...]}`` (``images`` optional, as in ``understand``), alternating user and
    /// assistant, starting and ending with a user turn.
    #[pyo3(signature = (conversation, max_new_tokens = 512, temperature = 0.0, top_p = None,
                        top_k = None, repetition_penalty = 1.0, seed = None))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        conversation: &Bound<'_, PyAny>,
        max_new_tokens: usize,
        temperature: f32,
        top_p: Option<f32>,
        top_k: Option<usize>,
        repetition_penalty: f32,
        seed: Option<u64>,
    ) -> PyResult<Answer> {
        let turns = conversation_arg(py, conversation, self.inner.limits())?;
        let options = TextArgs {
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed,
        }
        .options();
        self.answer(py, move |janus, on_text| {
            janus.chat_stream(&turns, &options, on_text)
        })
    }

    /// ``chat`` as an iterator of text pieces (see ``understand_stream``).
    #[pyo3(signature = (conversation, max_new_tokens = 512, temperature = 0.0, top_p = None,
                        top_k = None, repetition_penalty = 1.0, seed = None))]
    #[allow(clippy::too_many_arguments)]
    fn chat_stream(
        &self,
        py: Python<'_>,
        conversation: &Bound<'_, PyAny>,
        max_new_tokens: usize,
        temperature: f32,
        top_p: Option<f32>,
        top_k: Option<usize>,
        repetition_penalty: f32,
        seed: Option<u64>,
    ) -> PyResult<TextStream> {
        let turns = conversation_arg(py, conversation, self.inner.limits())?;
        let options = TextArgs {
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed,
        }
        .options();
        let janus = Arc::clone(&self.inner);
        TextStream::start(Box::new(move |on_text| {
            janus.chat_stream(&turns, &options, on_text)
        }))
    }

    /// Generates images from a prompt (or a list of prompts, run as one batch).
    ///
    /// Returns ``count`` images per prompt, prompt by prompt. ``cfg_weight`` is the
    /// classifier-free guidance weight; ``temperature`` 0 takes the argmax; ``seed`` None picks
    /// a random seed (each image reports it). ``progress(step, total)`` is called after every
    /// image-token step; returning False (any false value but None) cancels with ``Cancelled``.
    #[pyo3(signature = (prompt, count = 1, cfg_weight = 5.0, temperature = 1.0, top_k = None,
                        top_p = None, seed = None, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        count: usize,
        cfg_weight: f32,
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: Option<u64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<GeneratedImage>> {
        let prompts = prompts_arg(py, prompt)?;
        let options = image_options(count, cfg_weight, sampling(temperature, top_k, top_p), seed);
        let janus = &*self.inner;
        let mut interrupt = None;
        let result = py.detach(|| {
            let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
            guarded(|| {
                janus.generate_batch_with_progress(&prompts, &options, &mut |step, total| {
                    keep_going(&mut interrupt, |py| report(py, &progress, step, total))
                })
            })
        });
        let batches = errors::finish(py, result, interrupt)?;
        batches
            .iter()
            .flatten()
            .map(|g| GeneratedImage::new(py, g))
            .collect()
    }

    /// The VQ token grid of an image: a numpy int32 array of shape (rows, cols).
    ///
    /// The image (PIL, path or numpy, as in ``understand``) is resized on its short side and
    /// centre-cropped to the VQ model's input size first.
    fn encode_image<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let image = image_arg(py, image, self.inner.limits())?;
        let janus = &*self.inner;
        let result = py.detach(|| guarded(|| janus.encode_image(&image)));
        let tokens = errors::finish(py, result, None)?;
        tokens_to_numpy(py, &tokens)
    }

    /// The training loss of each sample of a JSONL file and their mean, without an update: a dict
    /// ``{"losses": [float, ...], "mean": float}``, one loss per sample in file order (the mean
    /// cross-entropy of the tokens it teaches; see ``janus loss``). ``progress(done, total)`` is
    /// called after each sample; returning ``False`` cancels.
    #[pyo3(signature = (data, progress = None))]
    fn loss<'py>(
        &self,
        py: Python<'py>,
        data: PathBuf,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let janus = &*self.inner;
        let mut interrupt = None;
        let result = py.detach(|| {
            guarded(|| {
                let examples = janus_core::train::read_jsonl(&data)?;
                janus_core::train::losses(janus, &examples, &mut |done, total| {
                    keep_going(&mut interrupt, |py| report(py, &progress, done, total))
                })
            })
        });
        let losses = errors::finish(py, result, interrupt)?;
        let out = pyo3::types::PyDict::new(py);
        out.set_item("losses", losses.losses)?;
        out.set_item("mean", losses.mean)?;
        Ok(out)
    }

    /// Decodes a token grid (a 2-D integer array of shape (rows, cols)) to a PIL image.
    fn decode_image<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let tokens = tokens_arg(py, tokens)?;
        let janus = &*self.inner;
        let result = py.detach(|| guarded(|| janus.decode_image(&tokens)));
        let image = errors::finish(py, result, None)?;
        to_pil(py, &image)
    }
}

/// Calls a `progress(done, total)` callback, if any: whether to go on (`None` or a true value).
pub(crate) fn report(
    py: Python<'_>,
    progress: &Option<Py<PyAny>>,
    done: usize,
    total: usize,
) -> PyResult<bool> {
    match progress {
        None => Ok(true),
        Some(callback) => {
            let ret = callback.bind(py).call1((done, total))?;
            Ok(ret.is_none() || ret.is_truthy()?)
        }
    }
}
