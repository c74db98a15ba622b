//! A whole fine-tuning run as `janus train` and `janus_rs.train` run it: the samples read, the
//! model loaded for training (f32 on the backend's autodiff device), the updates made with a
//! loss log (`OUT/train_log.jsonl`, one `{"step", "loss", "lr", "samples"}` a line) and
//! checkpoints (`OUT/checkpoint`), then the result saved into `OUT`: the model folder in its
//! input's layout, or with adapters their PEFT folder (or, merged, the model folder).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::data::read_jsonl;
use super::export::{check_out, save_model};
use super::lora::{merge, save_adapter};
use super::trainer::{Checkpoints, StepReport, TrainOptions, train_with};
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::load::ComputeDType;
use crate::pipeline::Janus;

/// What to train and where to write it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainJob {
    /// The model folder (either layout).
    pub model: PathBuf,
    /// The samples (JSONL, [`read_jsonl`]).
    pub data: PathBuf,
    /// The output folder (never the model folder).
    pub out: PathBuf,
    /// Where to run (on its autodiff device, in f32).
    pub backend: Backend,
    /// The recipe. Its `steps` is replaced by the count [`TrainJob::epochs`] gives, unless
    /// `steps_given` says the caller chose it.
    pub options: TrainOptions,
    /// Whether `options.steps` is the caller's (else the updates of `epochs` passes).
    pub steps_given: bool,
    /// Passes over the samples when the steps are not given (at least one update).
    pub epochs: usize,
    /// With adapters: save the model with them merged instead of the adapter folder.
    pub merge: bool,
    /// Updates between checkpoints in `OUT/checkpoint` (one is also written when the run is
    /// stopped).
    pub save_every: Option<usize>,
    /// A checkpoint to continue from ([`Checkpoints::resume`]).
    pub resume: Option<PathBuf>,
}

impl TrainJob {
    /// A job with the default recipe, one epoch, no checkpoints between updates.
    pub fn new(model: PathBuf, data: PathBuf, out: PathBuf) -> Self {
        TrainJob {
            model,
            data,
            out,
            backend: Backend::Cpu,
            options: TrainOptions::default(),
            steps_given: false,
            epochs: 1,
            merge: false,
            save_every: None,
            resume: None,
        }
    }
}

/// What a run is doing, for a progress display.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    /// The model is loading.
    Loading(&'a Path),
    /// An update is done; `rate` is samples a second since the run (or its resume) began.
    Step {
        /// The update's report.
        report: &'a StepReport,
        /// Updates the run makes in all.
        steps: usize,
        /// Samples a second.
        rate: f64,
    },
    /// The result is being written.
    Saving(&'a Path),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Updates done (those before a resume included).
    pub steps: usize,
    /// Updates the run was to make.
    pub total_steps: usize,
    /// Whether the callback stopped it early (then a checkpoint was written and nothing else).
    pub stopped: bool,
    /// The last update's loss.
    pub loss: Option<f64>,
    /// Where the checkpoint of a stopped run is.
    pub checkpoint: PathBuf,
}

/// Runs `job`, calling `on_event` along the way; `false` returned for a
/// [`TrainEvent::Step`] stops the run after that update, with a checkpoint.
///
/// # Errors
/// The samples', options', model's and files' errors; [`Error::InvalidInput`] for `merge`
/// without adapters.
pub fn run(
    job: &TrainJob,
    on_event: &mut dyn FnMut(TrainEvent<'_>) -> bool,
) -> Result<TrainSummary> {
    let examples = read_jsonl(&job.data)?;
    let mut options = job.options.clone();
    if !job.steps_given {
        let per_update = options.batch_size.max(1) * options.grad_accum.max(1);
        options.steps = (job.epochs * examples.len()).div_ceil(per_update).max(1);
    }
    options.check()?;
    if job.merge && options.lora.is_none() {
        return Err(Error::InvalidInput(
            "merging needs adapters to train (LoRA)".into(),
        ));
    }
    check_out(&job.model, &job.out)?;
    on_event(TrainEvent::Loading(&job.model));
    let device = job.backend.device()?.autodiff();
    let mut janus = Janus::load_on(&job.model, &device, ComputeDType::F32)?;

    let log_path = job.out.join("train_log.jsonl");
    // A resumed run adds to its log.
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(job.resume.is_some())
        .truncate(job.resume.is_none())
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let checkpoint = job.out.join("checkpoint");
    let checkpoints = Checkpoints {
        dir: Some(checkpoint.clone()),
        every: job.save_every,
        resume: job.resume.clone(),
    };
    let started = Instant::now();
    let mut first = None;
    let mut last_loss = None;
    let mut failed = None;
    let end = train_with(&mut janus, &examples, &options, &checkpoints, &mut |r| {
        let line =
            serde_json::json!({"step": r.step, "loss": r.loss, "lr": r.lr, "samples": r.samples});
        if let Err(e) = writeln!(log, "{line}") {
            failed = Some(e);
            return false;
        }
        last_loss = Some(r.loss);
        let per_update = options.batch_size * options.grad_accum;
        let from = *first.get_or_insert(r.samples - per_update);
        let rate = (r.samples - from) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        on_event(TrainEvent::Step {
            report: r,
            steps: options.steps,
            rate,
        })
    })?;
    if let Some(e) = failed {
        return Err(Error::io(&log_path, e));
    }
    let summary = TrainSummary {
        steps: end.steps,
        total_steps: options.steps,
        stopped: end.stopped,
        loss: last_loss,
        checkpoint,
    };
    if end.stopped {
        return Ok(summary);
    }
    on_event(TrainEvent::Saving(&job.out));
    match (options.lora.is_some(), job.merge) {
        (true, false) => save_adapter(&janus, &job.out)?,
        (true, true) => {
            merge(&mut janus)?;
            save_model(&janus, &job.out)?;
        }
        (false, _) => save_model(&janus, &job.out)?,
    }
    Ok(summary)
}
