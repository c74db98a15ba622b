//! `janus_rs.train` and `janus_rs.loss`: fine-tuning runs and training losses, each with the
//! interpreter detached (the logic is janus-core's `train::job`).

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use janus_core::Backend;
use janus_core::pipeline;
use janus_core::train::job::{TrainEvent, TrainJob, run};
use janus_core::train::lora::LoraOptions;
use janus_core::train::trainer::{Stage, TrainOptions};

use crate::errors::{self, guarded, invalid_input, keep_going};
use crate::model::{load_options, model_arg, report, resolve_model};

/// Fine-tunes a model on the samples of a JSONL file (as ``janus train`` does) and writes the
/// result into ``out``: the model folder in its input's layout, or with ``lora`` the adapter in
/// PEFT's format (``merge=True``: the model with the adapter merged). Returns a dict
/// ``{"steps", "total_steps", "stopped", "loss", "checkpoint"}``.
///
/// ``stage`` 1 trains the aligners, the generation embedding and the image head; 2 and 3 the
/// language model too. ``lora`` (a rank) trains adapters on the language model's projections
/// instead, every weight frozen. ``steps`` counts optimizer updates (each ``batch_size`` ×
/// ``grad_accum`` samples); without it, ``epochs`` passes. ``progress(report)`` is called after
/// each update with ``{"step", "loss", "lr", "samples", "steps", "rate"}``; returning ``False``
/// (or Ctrl-C) stops the run after that update with a checkpoint in ``out/checkpoint``, which
/// ``resume`` continues bit for bit. ``mix=(g, u, t)`` gives sampling weights of generation,
/// understanding and text samples (default: each sample once an epoch).
#[pyfunction]
#[pyo3(signature = (
    model, data, out, *, backend = "cpu", stage = 1, lora = None, lora_alpha = None,
    merge = false, lr = 1e-4, epochs = None, steps = None, batch_size = 1, grad_accum = 1,
    warmup = 0, weight_decay = 0.1, clip = 1.0, cfg_drop = 0.1, seed = 0, mix = None,
    save_every = None, resume = None, progress = None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn train<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    data: PathBuf,
    out: PathBuf,
    backend: &str,
    stage: u8,
    lora: Option<usize>,
    lora_alpha: Option<f64>,
    merge: bool,
    lr: f64,
    epochs: Option<usize>,
    steps: Option<usize>,
    batch_size: usize,
    grad_accum: usize,
    warmup: usize,
    weight_decay: f32,
    clip: f32,
    cfg_drop: f64,
    seed: u64,
    mix: Option<(f64, f64, f64)>,
    save_every: Option<usize>,
    resume: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let backend: Backend = backend.parse().map_err(|e| errors::to_py(py, e))?;
    let stage = match stage {
        1 => Stage::One,
        2 => Stage::Two,
        3 => Stage::Three,
        other => return Err(invalid_input(py, format!("stage {other}: 1, 2 or 3"))),
    };
    if steps.is_some() && epochs.is_some() {
        return Err(invalid_input(py, "give steps or epochs, not both"));
    }
    if lora.is_none() && (lora_alpha.is_some() || merge) {
        return Err(invalid_input(py, "lora_alpha and merge go with lora"));
    }
    let model = model_arg(model)?;
    let options = TrainOptions {
        stage,
        lr,
        steps: steps.unwrap_or(1),
        batch_size,
        grad_accum,
        warmup,
        weight_decay,
        clip: (clip > 0.0).then_some(clip),
        cfg_drop,
        seed,
        mix: mix.map(|(g, u, t)| [g, u, t]),
        lora: lora.map(|rank| LoraOptions {
            rank,
            alpha: lora_alpha.unwrap_or(rank as f64),
        }),
    };
    let mut interrupt = None;
    let result = py.detach(|| {
        guarded(|| {
            let job = TrainJob {
                backend,
                options,
                steps_given: steps.is_some(),
                epochs: epochs.unwrap_or(1),
                merge,
                save_every,
                resume,
                ..TrainJob::new(resolve_model(&model)?, data, out)
            };
            run(&job, &mut |event| match event {
                TrainEvent::Step {
                    report,
                    steps,
                    rate,
                } => keep_going(&mut interrupt, |py| match &progress {
                    None => Ok(true),
                    Some(callback) => {
                        let d = PyDict::new(py);
                        d.set_item("step", report.step)?;
                        d.set_item("loss", report.loss)?;
                        d.set_item("lr", report.lr)?;
                        d.set_item("samples", report.samples)?;
                        d.set_item("steps", steps)?;
                        d.set_item("rate", rate)?;
                        let ret = callback.bind(py).call1((d,))?;
                        Ok(ret.is_none() || ret.is_truthy()?)
                    }
                }),
                _ => true,
            })
        })
    });
    let summary = errors::finish(py, result, interrupt)?;
    let d = PyDict::new(py);
    d.set_item("steps", summary.steps)?;
    d.set_item("total_steps", summary.total_steps)?;
    d.set_item("stopped", summary.stopped)?;
    d.set_item("loss", summary.loss)?;
    d.set_item("checkpoint", summary.checkpoint)?;
    Ok(d)
}

/// The training loss of each sample of a JSONL file and their mean, without an update (as
/// ``janus loss`` computes them), for a model loaded as ``Janus.load`` loads it (``lora``: an
/// adapter folder applied at load): ``{"losses": [float, ...], "mean": float}``.
/// ``progress(done, total)`` is called after each sample; returning ``False`` cancels.
#[pyfunction]
#[pyo3(signature = (model, data, *, backend = "cpu", dtype = "auto", weights = "auto", lora = None, progress = None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn loss<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    data: PathBuf,
    backend: &str,
    dtype: &str,
    weights: &str,
    lora: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let options = load_options(py, backend, dtype, weights, lora)?;
    let model = model_arg(model)?;
    let mut interrupt = None;
    let result = py.detach(|| {
        guarded(|| {
            let examples = janus_core::train::read_jsonl(&data)?;
            let janus = pipeline::Janus::load(&resolve_model(&model)?, &options)?;
            janus_core::train::losses(&janus, &examples, &mut |done, total| {
                keep_going(&mut interrupt, |py| report(py, &progress, done, total))
            })
        })
    });
    let losses = errors::finish(py, result, interrupt)?;
    let out = PyDict::new(py);
    out.set_item("losses", losses.losses)?;
    out.set_item("mean", losses.mean)?;
    Ok(out)
}
