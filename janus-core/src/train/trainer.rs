//! Fine-tuning with Janus' recipe on Burn's autodiff: AdamW over the stage's parameters, linear
//! warmup then cosine decay of the learning rate, gradient accumulation, clipping of the global
//! gradient norm (as `torch.nn.utils.clip_grad_norm_`), and generation samples whose condition
//! is dropped with a probability (the unconditional prompt that guidance subtracts).

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;
use rand_chacha::rand_core::Rng;

use super::checkpoint::{self, RunState};
use super::data::Example;
use super::lora::LoraOptions;
use super::loss::{Scored, generation_scored_ids, score};
use super::order::Order;
use crate::error::{Error, Result};
use crate::generate::image::unconditional_ids;
use crate::generate::sampling::stream;
use crate::pipeline::Janus;
use crate::processor::image::open_image;

/// Which parameters train: the first stage trains the aligners, the generation embedding and
/// the image head; the second adds the language model. The vision encoder and the VQ codec stay
/// frozen in every stage (the third stage, instruction tuning, trains what the second does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Adaptors and image head.
    One,
    /// Adaptors, image head and language model.
    Two,
    /// As [`Stage::Two`], on instruction data.
    Three,
}

/// How to train. Defaults: the first stage, lr 1e-4, one sample a batch, no accumulation or
/// warmup, weight decay 0.1, clipping at 1.0, condition dropped in 10 % of generation samples,
/// AdamW β = (0.9, 0.95), seed 0.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// The parameters trained.
    pub stage: Stage,
    /// Peak learning rate.
    pub lr: f64,
    /// Optimizer updates.
    pub steps: usize,
    /// Samples a micro-batch.
    pub batch_size: usize,
    /// Micro-batches an update.
    pub grad_accum: usize,
    /// Updates of linear warmup from 0 to `lr`, before the cosine decay to 0.
    pub warmup: usize,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f32,
    /// Largest global gradient norm (`None`: no clipping).
    pub clip: Option<f32>,
    /// Probability that a generation sample's prompt becomes the unconditional prompt.
    pub cfg_drop: f64,
    /// Seed of the sample order, the condition drops and fresh adapters' values.
    pub seed: u64,
    /// Sampling weights of the generation, understanding and text samples (`None`: each
    /// sample once an epoch, in the file's own proportions); see [`Order`](super::order).
    pub mix: Option<[f64; 3]>,
    /// Train low-rank adapters on the language model's projections instead of the stage's
    /// parameters: the adapters alone train, every weight of the model stays frozen (what
    /// PEFT's LoRA trains). Adapters already on the model (a resumed run) keep their values;
    /// otherwise fresh ones are put on ([`lora::attach`](super::lora::attach)).
    pub lora: Option<LoraOptions>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            stage: Stage::One,
            lr: 1e-4,
            steps: 1,
            batch_size: 1,
            grad_accum: 1,
            warmup: 0,
            weight_decay: 0.1,
            clip: Some(1.0),
            cfg_drop: 0.1,
            seed: 0,
            mix: None,
            lora: None,
        }
    }
}

/// What one update did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Updates done, this one included.
    pub step: usize,
    /// The mean loss of the update's samples (before the update).
    pub loss: f64,
    /// The learning rate the update used.
    pub lr: f64,
    /// Samples seen so far.
    pub samples: usize,
}

impl TrainOptions {
    /// The learning rate of update `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let t = (step - self.warmup) as f64 / span;
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }

    /// Whether the options are in range.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the option out of range.
    pub fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidInput(format!("training options: {m}")));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("the learning rate must be a positive number");
        }
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            return bad("steps, batch size and accumulation must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.cfg_drop) {
            return bad("the condition-drop probability must be in [0, 1]");
        }
        if self.clip.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return bad("the clipping norm must be a positive number");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("the weight decay must be a non-negative number");
        }
        if let Some(lora) = &self.lora {
            lora.check()?;
        }
        if let Some(mix) = self.mix
            && (mix.iter().any(|w| !(w.is_finite() && *w >= 0.0)) || mix.iter().sum::<f64>() <= 0.0)
        {
            return bad("the mix weights must be non-negative numbers, not all zero");
        }
        Ok(())
    }
}

/// Checkpoints of a run: where they go, how often, and one to continue from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoints {
    /// The folder a checkpoint is written to ([`checkpoint`](super::checkpoint)): every
    /// `every` updates, and when the run is stopped early (its callback returned `false`).
    pub dir: Option<std::path::PathBuf>,
    /// Updates between checkpoints (`None`: only when stopped early).
    pub every: Option<usize>,
    /// A checkpoint to continue from: the run goes on from its step with its parameters,
    /// optimizer states and random streams, so that it gives the losses the uninterrupted run
    /// gives. The options and samples must be the ones it was made with (but the number of
    /// updates).
    pub resume: Option<std::path::PathBuf>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainEnd {
    /// Updates done, those before a resume included.
    pub steps: usize,
    /// Whether the callback stopped the run before its last update.
    pub stopped: bool,
}

/// Trains `janus` (loaded on an autodiff device, in f32) on `examples` for `options.steps`
/// updates, calling `on_step` after each; returning `false` stops after that update. The
/// samples are taken in a seeded random order, epoch after epoch.
///
/// # Errors
/// [`Error::InvalidInput`] for options out of range, no samples, or a model not on an autodiff
/// device; a sample's errors.
pub fn train(
    janus: &mut Janus,
    examples: &[Example],
    options: &TrainOptions,
    on_step: &mut dyn FnMut(&StepReport) -> bool,
) -> Result<()> {
    train_with(janus, examples, options, &Checkpoints::default(), on_step).map(|_| ())
}

/// [`train`], with checkpoints written and a run continued from one.
///
/// # Errors
/// As [`train`]; a checkpoint that cannot be written or read, or that another run made
/// ([`Error::InvalidInput`]).
pub fn train_with(
    janus: &mut Janus,
    examples: &[Example],
    options: &TrainOptions,
    checkpoints: &Checkpoints,
    on_step: &mut dyn FnMut(&StepReport) -> bool,
) -> Result<TrainEnd> {
    options.check()?;
    if checkpoints.every == Some(0) {
        return Err(Error::InvalidInput(
            "checkpoints every 0 updates: give at least 1".into(),
        ));
    }
    if examples.is_empty() {
        return Err(Error::InvalidInput("no training samples".into()));
    }
    if !janus.device().is_autodiff() {
        return Err(Error::InvalidInput(
            "training needs the model loaded on an autodiff device (Device::autodiff)".into(),
        ));
    }
    let heads_train = options.lora.is_none();
    let llm_trains = options.stage != Stage::One || options.lora.is_some();
    if let Some(lora) = &options.lora
        && !super::lora::has_adapters(janus)
    {
        super::lora::attach(janus, lora, options.seed)?;
    }
    {
        let model = janus.model_mut();
        model.heads = model.heads.clone().set_require_grad(heads_train);
        model.llm = model
            .llm
            .clone()
            .set_require_grad(llm_trains && heads_train);
        if options.lora.is_some() {
            super::lora::adapters_require_grad(&mut model.llm, true);
        }
    }
    let config = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(options.weight_decay);
    let (mut heads_optim, mut llm_optim, mut run) = match &checkpoints.resume {
        Some(dir) => checkpoint::load(
            dir,
            janus.model_mut(),
            (config.init(), config.init()),
            options,
            examples,
        )?,
        None => (
            config.init(),
            config.init(),
            RunState {
                step: 0,
                samples: 0,
                order: Order::new(examples, options.mix, options.seed)?,
                drops: drop_stream(options.seed),
            },
        ),
    };
    let save = |janus: &Janus,
                optims: (&ModuleOptimizer, &ModuleOptimizer),
                run: &RunState|
     -> Result<()> {
        match &checkpoints.dir {
            Some(dir) => checkpoint::save(dir, janus.model(), optims, run, options, examples),
            None => Ok(()),
        }
    };
    let per_update = options.batch_size * options.grad_accum;
    while run.step < options.steps {
        let step = run.step;
        let mut heads_grads = GradientsParams::new();
        let mut llm_grads = GradientsParams::new();
        let mut total = 0.0;
        for _ in 0..options.grad_accum {
            let mut batch = Vec::with_capacity(options.batch_size);
            for _ in 0..options.batch_size {
                let example = &examples[run.order.next()];
                let drop = matches!(example, Example::Generate { .. })
                    && options.cfg_drop > 0.0
                    && uniform(&mut run.drops) < options.cfg_drop;
                batch.push(scored(janus, example, drop)?.loss_tensor()?);
            }
            let loss = Tensor::cat(batch, 0).sum() / per_update as f32;
            total += f64::from(loss.clone().into_scalar::<f32>());
            let mut grads = loss.backward();
            let model = janus.model();
            if heads_train {
                let ids = ids_of(&model.heads);
                add(
                    &mut heads_grads,
                    GradientsParams::from_module(&mut grads, &model.heads),
                    &ids,
                );
            }
            if llm_trains {
                let ids = ids_of(&model.llm);
                add(
                    &mut llm_grads,
                    GradientsParams::from_module(&mut grads, &model.llm),
                    &ids,
                );
            }
        }
        run.samples += per_update;
        if let Some(max) = options.clip {
            let model = janus.model();
            let mut ids = if heads_train {
                ids_of(&model.heads)
            } else {
                Vec::new()
            };
            if llm_trains {
                ids.extend(ids_of(&model.llm));
            }
            clip(&mut [&mut heads_grads, &mut llm_grads], &ids, max);
        }
        let lr = options.lr_at(step);
        let model = janus.model_mut();
        if heads_train {
            model.heads = heads_optim.step(lr, model.heads.clone(), heads_grads);
        }
        if llm_trains {
            model.llm = llm_optim.step(lr, model.llm.clone(), llm_grads);
        }
        run.step += 1;
        let report = StepReport {
            step: run.step,
            loss: total,
            lr,
            samples: run.samples,
        };
        let go_on = on_step(&report);
        let last = run.step == options.steps;
        if !go_on && !last {
            save(janus, (&heads_optim, &llm_optim), &run)?;
            return Ok(TrainEnd {
                steps: run.step,
                stopped: true,
            });
        }
        if checkpoints
            .every
            .is_some_and(|n| run.step.is_multiple_of(n))
        {
            save(janus, (&heads_optim, &llm_optim), &run)?;
        }
    }
    Ok(TrainEnd {
        steps: run.step,
        stopped: false,
    })
}

/// The stream that decides which generation samples lose their condition.
pub(crate) fn drop_stream(seed: u64) -> rand_chacha::ChaCha8Rng {
    stream(seed, 1)
}

/// A sample's logits and targets, a generation sample's prompt made unconditional with `drop`.
fn scored(janus: &Janus, example: &Example, drop: bool) -> Result<Scored> {
    match example {
        Example::Generate { prompt, image } if drop => {
            let codes = janus.encode_image(&open_image(image)?)?.ids;
            let ids = janus.generation_ids(prompt)?;
            let pad = janus.tokenizer().special().pad;
            generation_scored_ids(janus, unconditional_ids(&ids, pad), &codes)
        }
        _ => score(janus, example),
    }
}

/// Each float parameter's id and rank.
struct Ids(Vec<(ParamId, usize)>);

impl ModuleVisitor for Ids {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push((param.id, D));
    }
}

/// The ids and ranks of `module`'s float parameters.
fn ids_of<M: Module>(module: &M) -> Vec<(ParamId, usize)> {
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    ids.0
}

/// `into` += `more`, parameter by parameter (`ids`: the parameters either may hold).
fn add(into: &mut GradientsParams, mut more: GradientsParams, ids: &[(ParamId, usize)]) {
    fn one<const D: usize>(into: &mut GradientsParams, more: &mut GradientsParams, id: ParamId) {
        if let Some(g) = more.remove::<D>(id) {
            let sum = match into.remove::<D>(id) {
                Some(old) => old + g,
                None => g,
            };
            into.register::<D>(id, sum);
        }
    }
    for &(id, rank) in ids {
        match rank {
            1 => one::<1>(into, &mut more, id),
            2 => one::<2>(into, &mut more, id),
            _ => unreachable!("the model's parameters are vectors and matrices"),
        }
    }
}

/// Scales every gradient by `max / (‖g‖ + 1e-6)` where the global norm `‖g‖` over all of them
/// exceeds `max`, as `torch.nn.utils.clip_grad_norm_` does.
fn clip(grads: &mut [&mut GradientsParams], ids: &[(ParamId, usize)], max: f32) {
    fn square_sum<const D: usize>(g: &GradientsParams, id: ParamId) -> f64 {
        g.get::<D>(id)
            .map_or(0.0, |t| f64::from(t.square().sum().into_scalar::<f32>()))
    }
    fn scale<const D: usize>(g: &mut GradientsParams, id: ParamId, by: f32) {
        if let Some(t) = g.remove::<D>(id) {
            g.register::<D>(id, t * by);
        }
    }
    let mut total = 0.0;
    for g in grads.iter() {
        for &(id, rank) in ids {
            total += match rank {
                1 => square_sum::<1>(g, id),
                _ => square_sum::<2>(g, id),
            };
        }
    }
    let coef = f64::from(max) / (total.sqrt() + 1e-6);
    if coef >= 1.0 {
        return;
    }
    for g in grads.iter_mut() {
        for &(id, rank) in ids {
            match rank {
                1 => scale::<1>(g, id, coef as f32),
                _ => scale::<2>(g, id, coef as f32),
            }
        }
    }
}

/// A uniform draw in [0, 1).
pub(crate) fn uniform(rng: &mut rand_chacha::ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_warms_up_then_decays_to_zero() {
        let o = TrainOptions {
            lr: 1.0,
            steps: 10,
            warmup: 4,
            ..TrainOptions::default()
        };
        let lrs: Vec<f64> = (0..10).map(|s| o.lr_at(s)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert_eq!(lrs[4], 1.0);
        assert!(lrs[4..].windows(2).all(|w| w[1] < w[0]), "{lrs:?}");
        let mid = 0.5 * (1.0 + (std::f64::consts::PI * 3.0 / 6.0).cos());
        assert!((lrs[7] - mid).abs() < 1e-12);
        let flat = TrainOptions {
            lr: 2.0,
            steps: 1,
            ..TrainOptions::default()
        };
        assert_eq!(flat.lr_at(0), 2.0);
    }

    #[test]
    fn options_out_of_range_are_errors() {
        let ok = TrainOptions::default();
        assert!(ok.check().is_ok());
        for bad in [
            TrainOptions {
                lr: 0.0,
                ..ok.clone()
            },
            TrainOptions {
                lr: f64::NAN,
                ..ok.clone()
            },
            TrainOptions {
                steps: 0,
                ..ok.clone()
            },
            TrainOptions {
                batch_size: 0,
                ..ok.clone()
            },
            TrainOptions {
                grad_accum: 0,
                ..ok.clone()
            },
            TrainOptions {
                cfg_drop: 1.5,
                ..ok.clone()
            },
            TrainOptions {
                clip: Some(0.0),
                ..ok.clone()
            },
            TrainOptions {
                weight_decay: -1.0,
                ..ok.clone()
            },
            TrainOptions {
                mix: Some([0.0, 0.0, 0.0]),
                ..ok.clone()
            },
            TrainOptions {
                mix: Some([1.0, -1.0, 1.0]),
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(bad.check(), Err(Error::InvalidInput(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let device = crate::default_device();
        let (a, b) = (ParamId::new(), ParamId::new());
        let mut g1 = GradientsParams::new();
        g1.register::<1>(a, Tensor::from_floats([3.0, 0.0], &device));
        let mut g2 = GradientsParams::new();
        g2.register::<2>(b, Tensor::from_floats([[0.0, 4.0]], &device));
        let ids = [(a, 1), (b, 2)];
        clip(&mut [&mut g1, &mut g2], &ids, 10.0);
        let norm5: Vec<f32> = g1.get::<1>(a).unwrap().into_data().try_to_vec().unwrap();
        assert_eq!(norm5, [3.0, 0.0], "under the limit: unchanged");
        clip(&mut [&mut g1, &mut g2], &ids, 1.0);
        let x: Vec<f32> = g1.get::<1>(a).unwrap().into_data().try_to_vec().unwrap();
        let y: Vec<f32> = g2.get::<2>(b).unwrap().into_data().try_to_vec().unwrap();
        assert!(
            (x[0] - 0.6).abs() < 1e-6 && (y[1] - 0.8).abs() < 1e-6,
            "{x:?} {y:?}"
        );
    }
}
