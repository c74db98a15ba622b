//! The janus-core side of the benchmark harness (`bench/run.py` drives it, side by side with
//! `bench/bench_torch.py`): one task per process, one JSON object on stdout.
//!
//! ```text
//! cargo bench -p janus-core --bench pipeline -- --model DIR --task TASK [options]
//!   --task load|understand|prefill|generate|batch|vq_decode|siglip|bandwidth|kernels|bf16_gemm|quality
//!                          (batch: --parallel separate image requests stepped together by the
//!                          engine, as `janus serve` runs them)
//!                          (quality: the model with --weights against the same checkpoint in f32:
//!                          teacher-forced guided image logits over --steps and answer logits over
//!                          --new-tokens, both greedy in f32)
//!                          (load: also the seconds to read the weight files once, after it)
//!                          (bandwidth: memory read speed of the thread pool; kernels: the
//!                          half-precision decode products on every kernel path, and the
//!                          products of one whole Janus-Pro-1B decoding step as `layer_sweep`;
//!                          no model needed; bf16_gemm: the prompt-shaped bf16 products alone)
//!   --dtype f32|f16|bf16   --backend cpu|wgpu|cuda
//!   --weights auto|f32|bf16|f16|q8_0|q4_0   weight storage (auto)
//!   --image PNG            understanding / prefill / siglip input (required for those)
//!   --question TEXT        understanding question
//!   --prompt TEXT          generation prompt
//!   --new-tokens N         greedy tokens after the prefill (32)
//!   --parallel N           images per generate call (1: one CFG pair)
//!   --steps S              image-token steps to time (32; the model's full count runs the VQ decoder too)
//!   --repeat R             timed repetitions of vq_decode / siglip / prefill after one warm-up (3)
//!                          (JANUS_PERF_CTL=CTL,ACK: perf record control FIFOs; only those
//!                          repetitions are sampled, see bench/profile_stages.py)
//! ```
//!
//! Threads: the CPU backend uses rayon's global pool (`RAYON_NUM_THREADS`, else every core).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use janus_core::generate::forced;
use janus_core::generate::image::ImageGenOptions;
use janus_core::generate::sampling::Sampling;
use janus_core::generate::text::{TextGenOptions, decode, embed_with_images};
use janus_core::pipeline::{ImageTokens, Janus};
use janus_core::processor::image::{
    ImageProcessorConfig, open_image, preprocess_for_understanding,
};
use janus_core::{Backend, ComputeDType, Error, WeightFormat};
use serde_json::{Value, json};

const USAGE: &str = "usage: pipeline --model DIR --task load|understand|prefill|generate|batch|vq_decode|siglip|bandwidth|kernels|bf16_gemm|quality \
[--dtype f32|f16|bf16] [--weights auto|f32|bf16|f16|q8_0|q4_0] [--backend cpu|wgpu|cuda] [--image PNG] [--question TEXT] [--prompt TEXT] [--new-tokens N] \
[--parallel N] [--steps S] [--repeat R]";

/// The default question (the same as `bench/bench_torch.py`'s).
const QUESTION: &str =
    "What is shown in this image? Describe the colors, the shapes and the objects in detail.";
/// The default generation prompt (the same as `bench/bench_torch.py`'s).
const PROMPT: &str = "A watercolor painting of a red fox sitting in a snowy forest at sunrise.";

struct Args {
    model: PathBuf,
    task: String,
    dtype: ComputeDType,
    weights: WeightFormat,
    backend: Backend,
    image: Option<PathBuf>,
    question: String,
    prompt: String,
    new_tokens: usize,
    parallel: usize,
    steps: usize,
    repeat: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        model: PathBuf::new(),
        task: String::new(),
        dtype: ComputeDType::F32,
        weights: WeightFormat::Auto,
        backend: Backend::Cpu,
        image: None,
        question: QUESTION.to_string(),
        prompt: PROMPT.to_string(),
        new_tokens: 32,
        parallel: 1,
        steps: 32,
        repeat: 3,
    };
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench` to harness-less benches.
        if flag == "--bench" {
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: not a count: {v}"))
        };
        match flag.as_str() {
            "--model" => args.model = value.into(),
            "--task" => args.task = value,
            "--dtype" => {
                args.dtype = match value.as_str() {
                    "f32" => ComputeDType::F32,
                    "f16" => ComputeDType::F16,
                    "bf16" => ComputeDType::BF16,
                    other => return Err(format!("--dtype: unknown dtype {other}")),
                }
            }
            "--weights" => args.weights = value.parse().map_err(|e: Error| e.to_string())?,
            "--backend" => args.backend = value.parse().map_err(|e: Error| e.to_string())?,
            "--image" => args.image = Some(value.into()),
            "--question" => args.question = value,
            "--prompt" => args.prompt = value,
            "--new-tokens" => args.new_tokens = number(&value)?,
            "--parallel" => args.parallel = number(&value)?,
            "--steps" => args.steps = number(&value)?,
            "--repeat" => args.repeat = number(&value)?,
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if args.task.is_empty()
        || (args.model.as_os_str().is_empty()
            && !["bandwidth", "kernels", "bf16_gemm"].contains(&args.task.as_str()))
    {
        return Err(USAGE.into());
    }
    Ok(args)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process in MiB (Linux: `VmHWM`).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn pixels(janus: &Janus, args: &Args) -> Result<(Vec<f32>, usize), String> {
    let path = args.image.as_ref().ok_or("this task needs --image")?;
    let image = open_image(path).map_err(|e| e.to_string())?;
    let cfg = ImageProcessorConfig::from_dir(janus.dir(), janus.config().layout)
        .map_err(|e| e.to_string())?;
    Ok((preprocess_for_understanding(&image, &cfg), cfg.image_size))
}

/// SigLIP and the aligner on preprocessed pixels (`[1, 3, size, size]`, flat).
fn image_features(janus: &Janus, flat: Vec<f32>, size: usize) -> burn::tensor::Tensor<3> {
    let model = janus.model();
    let pixels = burn::tensor::Tensor::<4>::from_data(
        burn::tensor::TensorData::new(flat, [1, 3, size, size]),
        (janus.device(), model.llm.dtype()),
    );
    model.heads.aligner.forward(model.vision.forward(pixels))
}

fn understand(janus: &Janus, args: &Args) -> Result<Value, String> {
    let model = janus.model();
    let (flat, size) = pixels(janus, args)?;
    let ids = janus
        .understanding_ids(&args.question, 1)
        .map_err(|e| e.to_string())?;
    let question_tokens = janus
        .tokenizer()
        .encode(&args.question, false)
        .map_err(|e| e.to_string())?
        .len();
    let started = Instant::now();
    let features = image_features(janus, flat, size);
    // Wait for the device before reading the clock.
    let _ = features.clone().narrow(1, 0, 1).into_data();
    let vision = started.elapsed();
    let sp = *janus.tokenizer().special();
    let embeds = embed_with_images(model, &ids, sp.image_placeholder, Some(features))
        .map_err(|e| e.to_string())?;
    let options = TextGenOptions {
        max_new_tokens: args.new_tokens,
        ..TextGenOptions::default()
    };
    // No EOS id stops the run: every timed run produces exactly `new_tokens` tokens.
    let mut marks = Vec::with_capacity(args.new_tokens);
    let out = decode(model, embeds, u32::MAX, &options, &mut |_| {
        marks.push(started.elapsed());
        true
    })
    .map_err(|e| e.to_string())?;
    let steps: Vec<f64> = marks.windows(2).map(|w| ms(w[1] - w[0])).collect();
    let decode_total: f64 = steps.iter().sum();
    Ok(json!({
        "prompt_tokens": ids.len(),
        "question_tokens": question_tokens,
        "new_tokens": out.ids.len(),
        "vision_ms": ms(vision),
        "prefill_ms": marks.first().map(|&d| ms(d)),
        "decode_ms_total": decode_total,
        "decode_tokens_per_s": steps.len() as f64 / (decode_total / 1e3),
        "decode_step_ms_median": median(steps),
        "token_ids": out.ids,
    }))
}

/// Top-1 agreement is counted over steps whose f32 top-2 margin exceeds this (random weights
/// make near-ties).
const QUALITY_MARGIN: f32 = 1e-2;

fn agreement_json(a: &forced::Agreement) -> Value {
    json!({
        "mean_cosine": a.mean_cosine,
        "min_cosine": a.min_cosine,
        "top1_counted": a.counted,
        "top1_agree": a.agree,
        "top1_agreement": a.agree as f64 / a.counted.max(1) as f64,
        "first_divergence": a.first_divergence,
    })
}

/// `janus` (loaded with `--weights`) against the same checkpoint with f32 weights: greedy in f32,
/// teacher-forced in the other.
fn quality(janus: &Janus, args: &Args) -> Result<Value, String> {
    let err = |e: Error| e.to_string();
    let reference = Janus::load_on_with(
        &args.model,
        janus.device(),
        ComputeDType::F32,
        WeightFormat::F32,
    )
    .map_err(err)?;
    // The same prompts on both sides.
    let mut reference = reference;
    reference.set_prompt_format(janus.prompt_format().clone());
    let total = janus.config().vq.grid * janus.config().vq.grid;
    let steps = args.steps.min(total);
    let ids = janus.generation_ids(&args.prompt).map_err(err)?;
    let pad = janus.tokenizer().special().pad;
    let cfg = ImageGenOptions::default().cfg_weight;
    let want = forced::image_logits(reference.model(), &ids, pad, cfg, steps, None).map_err(err)?;
    let got = forced::image_logits(janus.model(), &ids, pad, cfg, steps, Some(&want.tokens))
        .map_err(err)?;
    let image = forced::agreement(&want, &got, QUALITY_MARGIN);

    let mut text = Value::Null;
    if args.image.is_some() {
        let embeds = |j: &Janus| -> Result<burn::tensor::Tensor<3>, String> {
            let (flat, size) = pixels(j, args)?;
            let model = j.model();
            let ids = j.understanding_ids(&args.question, 1).map_err(err)?;
            let pixels = burn::tensor::Tensor::<4>::from_data(
                burn::tensor::TensorData::new(flat, [1, 3, size, size]),
                (j.device(), model.llm.dtype()),
            );
            let features = model.heads.aligner.forward(model.vision.forward(pixels));
            let sp = *j.tokenizer().special();
            embed_with_images(model, &ids, sp.image_placeholder, Some(features)).map_err(err)
        };
        let want = forced::text_logits(
            reference.model(),
            embeds(&reference)?,
            args.new_tokens,
            None,
        )
        .map_err(err)?;
        let got = forced::text_logits(
            janus.model(),
            embeds(janus)?,
            args.new_tokens,
            Some(&want.tokens),
        )
        .map_err(err)?;
        text = agreement_json(&forced::agreement(&want, &got, QUALITY_MARGIN));
        text["steps"] = json!(args.new_tokens);
    }
    let mut image = agreement_json(&image);
    image["steps"] = json!(steps);
    Ok(json!({
        "image": image,
        "text": text,
        "reference_weight_bytes": reference.storage().bytes,
    }))
}

fn generate(janus: &Janus, args: &Args) -> Result<Value, String> {
    let options = ImageGenOptions {
        count: args.parallel,
        sampling: Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        },
        seed: 0,
        ..ImageGenOptions::default()
    };
    let total = janus.config().vq.grid * janus.config().vq.grid;
    let steps = args.steps.min(total);
    let mut marks = Vec::with_capacity(steps);
    let started = Instant::now();
    let result = janus.generate_with_progress(&args.prompt, &options, &mut |s, _| {
        marks.push(started.elapsed());
        steps == total || s < steps
    });
    let end = started.elapsed();
    match result {
        Ok(_) if steps == total => {}
        Err(Error::Cancelled) if steps < total => {}
        Ok(_) => return Err("generation did not stop at --steps".into()),
        Err(e) => return Err(e.to_string()),
    }
    let per_step: Vec<f64> = marks.windows(2).map(|w| ms(w[1] - w[0])).collect();
    let min = per_step.iter().copied().fold(f64::INFINITY, f64::min);
    let max = per_step.iter().copied().fold(0.0, f64::max);
    let mut out = json!({
        "step_min_ms": min,
        "step_max_ms": max,
        "prompt_tokens": janus.generation_ids(&args.prompt).map_err(|e| e.to_string())?.len(),
        "parallel": args.parallel,
        "batch_rows": 2 * args.parallel,
        "steps": marks.len(),
        "prefill_ms": marks.first().map(|&d| ms(d)),
        "ms_per_step": median(per_step),
        "total_ms": ms(end),
    });
    if steps == total {
        out["vq_decode_ms"] = json!(marks.last().map(|&d| ms(end - d)));
    }
    Ok(out)
}

/// `--parallel` separate image requests (one image each, seeds 0..N) decoded together by the
/// step-wise engine, as `janus serve` batches them: per-step time over `--steps` steps.
fn batch(janus: &Janus, args: &Args) -> Result<Value, String> {
    let err = |e: Error| e.to_string();
    let started = Instant::now();
    let mut seqs = (0..args.parallel)
        .map(|i| {
            let options = ImageGenOptions {
                seed: i as u64,
                ..ImageGenOptions::default()
            };
            janus.begin_generate(&args.prompt, &options)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    let prefill = started.elapsed();
    let total = janus.config().vq.grid * janus.config().vq.grid;
    let mut marks = Vec::with_capacity(args.steps);
    for _ in 0..args.steps.min(total) {
        let mut refs: Vec<&mut janus_core::engine::Sequence> = seqs.iter_mut().collect();
        janus.step(&mut refs).map_err(err)?;
        marks.push(started.elapsed());
    }
    let per_step: Vec<f64> = marks.windows(2).map(|w| ms(w[1] - w[0])).collect();
    Ok(json!({
        "parallel": args.parallel,
        "batch_rows": 2 * args.parallel,
        "steps": marks.len(),
        "prefill_ms": ms(prefill),
        "ms_per_step": median(per_step),
    }))
}

fn repeated(args: &Args, mut run: impl FnMut() -> Result<(), String>) -> Result<Value, String> {
    // The first run in the process is the warm-up; its time is reported as `first_ms`.
    let t = Instant::now();
    run()?;
    let first = ms(t.elapsed());
    let mut window = PerfWindow::from_env()?;
    let mut times = Vec::with_capacity(args.repeat);
    for _ in 0..args.repeat.max(1) {
        window.enable()?;
        let t = Instant::now();
        run()?;
        times.push(ms(t.elapsed()));
        window.disable()?;
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    Ok(json!({
        "ms": median(times.clone()),
        "min_ms": min,
        "max_ms": max,
        "runs_ms": times,
        "first_ms": first,
    }))
}

/// The timed repetitions of a task as the only window a profiler samples: with
/// `JANUS_PERF_CTL=CTL,ACK` (the FIFOs of `perf record -D -1 --control fifo:CTL,ACK`, as
/// `bench/profile_stages.py` runs it), each repetition is bracketed by `enable` and `disable`, so that
/// loading the model and the warm-up run stay out of the profile.
struct PerfWindow {
    fifos: Option<(std::fs::File, std::io::BufReader<std::fs::File>)>,
}

impl PerfWindow {
    fn from_env() -> Result<Self, String> {
        let Ok(spec) = std::env::var("JANUS_PERF_CTL") else {
            return Ok(PerfWindow { fifos: None });
        };
        let (ctl, ack) = spec
            .split_once(',')
            .ok_or_else(|| format!("JANUS_PERF_CTL={spec}: expected CTL,ACK"))?;
        let open = |path: &str, write: bool| {
            std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .open(path)
                .map_err(|e| format!("{path}: {e}"))
        };
        let ctl = open(ctl, true)?;
        let ack = std::io::BufReader::new(open(ack, false)?);
        Ok(PerfWindow {
            fifos: Some((ctl, ack)),
        })
    }

    fn command(&mut self, cmd: &str) -> Result<(), String> {
        use std::io::{BufRead, Write};
        let Some((ctl, ack)) = self.fifos.as_mut() else {
            return Ok(());
        };
        writeln!(ctl, "{cmd}").map_err(|e| format!("perf control: {e}"))?;
        let mut line = String::new();
        ack.read_line(&mut line)
            .map_err(|e| format!("perf control: {e}"))?;
        Ok(())
    }

    fn enable(&mut self) -> Result<(), String> {
        self.command("enable")
    }

    fn disable(&mut self) -> Result<(), String> {
        self.command("disable")
    }
}

/// The language model over the understanding prompt alone (the image's features computed once,
/// before the timed runs): the prefill that precedes an answer's first token, without SigLIP.
fn prefill(janus: &Janus, args: &Args) -> Result<Value, String> {
    let model = janus.model();
    let (flat, size) = pixels(janus, args)?;
    let ids = janus
        .understanding_ids(&args.question, 1)
        .map_err(|e| e.to_string())?;
    let features = image_features(janus, flat, size);
    let sp = *janus.tokenizer().special();
    let embeds = embed_with_images(model, &ids, sp.image_placeholder, Some(features))
        .map_err(|e| e.to_string())?;
    let mut out = repeated(args, || {
        let mut cache = model.llm.new_cache(ids.len());
        let hidden = model
            .llm
            .forward(embeds.clone(), &mut cache)
            .map_err(|e| e.to_string())?;
        let last = hidden.clone().narrow(1, ids.len() - 1, 1);
        model.llm.logits(last).into_data();
        Ok(())
    })?;
    out["prompt_tokens"] = json!(ids.len());
    Ok(out)
}

fn vq_decode(janus: &Janus, args: &Args) -> Result<Value, String> {
    let vq = &janus.config().vq;
    let g = vq.grid;
    // A fixed pseudo-random grid (64-bit LCG).
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let ids = (0..g * g)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vq.codebook_size as u64) as u32
        })
        .collect();
    let tokens = ImageTokens {
        ids,
        rows: g,
        cols: g,
    };
    repeated(args, || {
        janus
            .decode_image(&tokens)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

fn siglip(janus: &Janus, args: &Args) -> Result<Value, String> {
    let (flat, size) = pixels(janus, args)?;
    repeated(args, || {
        image_features(janus, flat.clone(), size).into_data();
        Ok(())
    })
}

/// Read bandwidth of rayon's pool over a filled 1 GiB buffer (best of 5): the speed at which
/// a decoding step can stream weights, so weight bytes ÷ this is a step's floor.
fn bandwidth() -> Value {
    use rayon::prelude::*;
    let data = vec![1.0f32; 1 << 28];
    let bytes = (data.len() * 4) as f64;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        // Integer sums of the bit patterns: associative, so the loop vectorises and the figure
        // is the memory's, not the adder's.
        let sum = data
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u32, |a, x| a.wrapping_add(x.to_bits())))
            .reduce(|| 0, u32::wrapping_add);
        std::hint::black_box(sum);
        best = best.min(t.elapsed().as_secs_f64());
    }
    json!({
        "task": "bandwidth",
        "impl": "janus-rs",
        "read_gbs": bytes / best / 1e9,
        "buffer_bytes": bytes,
        "threads": rayon::current_num_threads(),
    })
}

/// The decode-shaped bf16/f16 products of `nn::kernels` on every path this CPU has, over the
/// weight shapes of a Janus-Pro-1B layer (the MLP's 5632×2048 and the attention's 2048×2048),
/// 1, 2 and 8 rows: milliseconds per product and the weight bytes read per second.
fn kernels(repeat: usize) -> Value {
    use janus_core::nn::kernels::{HalfKind, KernelPath, half_matvec};
    let mut rows_out = Vec::new();
    for (out, d_in) in [(5632usize, 2048usize), (2048, 2048)] {
        // Several copies of the weight, used in turn, so that no run finds it in the cache.
        let copies = 8;
        let w: Vec<u16> = (0..copies * out * d_in)
            .map(|i| half::bf16::from_f32(((i % 251) as f32 - 125.0) / 500.0).to_bits())
            .collect();
        for rows in [1usize, 2, 8] {
            let x: Vec<f32> = (0..rows * d_in).map(|i| (i % 17) as f32 / 17.0).collect();
            let mut y = vec![0.0f32; rows * out];
            for path in KernelPath::available() {
                for kind in [HalfKind::Bf16, HalfKind::F16] {
                    let mut best = f64::INFINITY;
                    for rep in 0..repeat.max(1) * copies {
                        let c = rep % copies;
                        let wc = &w[c * out * d_in..(c + 1) * out * d_in];
                        let t = Instant::now();
                        half_matvec(path, kind, &x, rows, wc, d_in, &mut y)
                            .expect("shapes are consistent");
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    std::hint::black_box(&y);
                    rows_out.push(json!({
                        "shape": [out, d_in], "rows": rows, "path": path.name(),
                        "weights": format!("{kind:?}").to_lowercase(),
                        "ms": best * 1e3, "weight_gbs": (out * d_in * 2) as f64 / best / 1e9,
                    }));
                }
            }
        }
    }
    json!({
        "task": "kernels",
        "impl": "janus-rs",
        "threads": rayon::current_num_threads(),
        "results": rows_out,
        "layer_sweep": layer_sweep(repeat),
        "bf16_gemm": bf16_gemm(repeat),
    })
}

/// The prompt-shaped bf16 products of `nn::kernels::bf16_gemm` on every path this machine has,
/// over a Janus-Pro-1B layer's shapes and a 600-token prompt: milliseconds per product and the
/// arithmetic rate.
fn bf16_gemm(repeat: usize) -> Value {
    use janus_core::nn::kernels::{Bf16Gemm, bf16_gemm};
    let rows = 600usize;
    let mut out = Vec::new();
    for (outs, d_in) in [(5632usize, 2048usize), (2048, 5632), (2048, 2048)] {
        // Copies of the weight beyond any L3, used in turn: a prompt reads each weight from
        // memory once.
        let copies = (1usize << 30).div_ceil(outs * d_in * 2);
        let w: Vec<u16> = (0..copies * outs * d_in)
            .map(|i| half::bf16::from_f32(((i % 251) as f32 - 125.0) / 500.0).to_bits())
            .collect();
        let x: Vec<f32> = (0..rows * d_in).map(|i| (i % 17) as f32 / 17.0).collect();
        let mut y = vec![0.0f32; rows * outs];
        for path in Bf16Gemm::ALL.into_iter().filter(|p| p.supported()) {
            let mut times = Vec::new();
            for rep in 0..repeat.max(1) * copies {
                let c = rep % copies;
                let wc = &w[c * outs * d_in..(c + 1) * outs * d_in];
                let t = Instant::now();
                bf16_gemm(path, &x, rows, wc, d_in, &mut y).expect("shapes are consistent");
                times.push(t.elapsed().as_secs_f64());
            }
            std::hint::black_box(&y);
            let ms = median(times.iter().map(|t| t * 1e3).collect());
            out.push(json!({
                "shape": [outs, d_in], "rows": rows, "path": path.name(), "ms": ms,
                "gflops": 2.0 * (rows * outs * d_in) as f64 / ms / 1e6,
            }));
        }
    }
    json!(out)
}

/// One product of [`layer_sweep`]: `(index of the weight, x, rows, y)`.
type Product<'a> = dyn Fn(usize, &[f32], usize, &mut [f32]) + 'a;

fn layer_sweep(repeat: usize) -> Value {
    use janus_core::nn::kernels::{
        HalfKind, KernelPath, QuantKind, QuantMatrix, half_matvec, quant_matvec,
    };
    let (d, f, layers) = (2048usize, 5632usize, 24usize);
    let shapes = [(d, d), (d, d), (d, d), (d, d), (f, d), (f, d), (d, f)];
    let value = |k: usize, i: usize| (((i + k) % 251) as f32 - 125.0) / 500.0;
    let path = KernelPath::best();
    let mut out = Vec::new();
    // Runs `product(k, x, rows, y)` over the step's products, best of the repeats.
    let mut sweep = |format: &str, bytes: usize, product: &Product<'_>| {
        for rows in [1usize, 2, 8] {
            let x: Vec<f32> = (0..rows * f).map(|i| (i % 17) as f32 / 17.0).collect();
            let mut y = vec![0.0f32; rows * f];
            let mut best = f64::INFINITY;
            for _ in 0..repeat.max(1) + 1 {
                let t = Instant::now();
                for k in 0..layers * shapes.len() {
                    let (outs, d_in) = shapes[k % shapes.len()];
                    product(k, &x[..rows * d_in], rows, &mut y[..rows * outs]);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            std::hint::black_box(&y);
            out.push(json!({
                "format": format, "rows": rows, "path": path.name(), "weight_bytes": bytes,
                "ms": best * 1e3, "weight_gbs": bytes as f64 / best / 1e9,
            }));
        }
    };
    {
        let weights: Vec<Vec<u16>> = (0..layers * shapes.len())
            .map(|k| {
                let (outs, d_in) = shapes[k % shapes.len()];
                let mut w = vec![0u16; outs * d_in];
                janus_core::nn::kernels::prefer_huge_pages(&mut w);
                for (i, v) in w.iter_mut().enumerate() {
                    *v = half::bf16::from_f32(value(k, i)).to_bits();
                }
                w
            })
            .collect();
        let bytes = weights.iter().map(|w| w.len() * 2).sum();
        sweep("bf16", bytes, &|k, x, rows, y| {
            let d_in = shapes[k % shapes.len()].1;
            half_matvec(path, HalfKind::Bf16, x, rows, &weights[k], d_in, y)
                .expect("shapes are consistent");
        });
    }
    let weights: Vec<QuantMatrix> = (0..layers * shapes.len())
        .map(|k| {
            let (outs, d_in) = shapes[k % shapes.len()];
            QuantMatrix::quantize(QuantKind::Q8_0, outs, d_in, |o, buf| {
                for (i, v) in buf.iter_mut().enumerate() {
                    *v = value(k, o * d_in + i);
                }
            })
            .expect("the widths are multiples of a block")
        })
        .collect();
    let bytes = weights.iter().map(QuantMatrix::bytes).sum();
    sweep("q8_0", bytes, &|k, x, rows, y| {
        quant_matvec(path, &weights[k], x, rows, y).expect("shapes are consistent");
    });
    json!(out)
}

/// Seconds to read every weight file of the checkpoint once, in order, 16 MiB at a time: what a
/// load costs at least, to set beside the load time (the page cache is as the load left it).
fn read_weight_files(dir: &std::path::Path) -> Result<f64, String> {
    use std::io::Read;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "safetensors" || x == "bin")
        })
        .collect();
    files.sort();
    let mut buf = vec![0u8; 16 << 20];
    let t = Instant::now();
    for path in &files {
        let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        while f
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?
            > 0
        {}
    }
    Ok(t.elapsed().as_secs_f64())
}

fn run(args: &Args) -> Result<Value, String> {
    if args.task == "bandwidth" {
        return Ok(bandwidth());
    }
    if args.task == "kernels" {
        return Ok(kernels(args.repeat));
    }
    if args.task == "bf16_gemm" {
        return Ok(json!({
            "task": "bf16_gemm",
            "impl": "janus-rs",
            "threads": rayon::current_num_threads(),
            "bf16_gemm": bf16_gemm(args.repeat),
        }));
    }
    let device = args.backend.device().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut janus = Janus::load_on_with(&args.model, &device, args.dtype, args.weights)
        .map_err(|e| e.to_string())?;
    let load_s = started.elapsed().as_secs_f64();
    // The PyTorch side prompts both layouts without a system prompt.
    janus.set_prompt_format(janus.prompt_format().clone().with_system_prompt(""));
    let mut out = match args.task.as_str() {
        "load" => json!({ "files_read_s": read_weight_files(&args.model)? }),
        "understand" => understand(&janus, args)?,
        "generate" => generate(&janus, args)?,
        "batch" => batch(&janus, args)?,
        "vq_decode" => vq_decode(&janus, args)?,
        "siglip" => siglip(&janus, args)?,
        "prefill" => prefill(&janus, args)?,
        "quality" => quality(&janus, args)?,
        other => return Err(format!("unknown task {other}\n{USAGE}")),
    };
    out["impl"] = json!("janus-rs");
    out["weights"] = json!(janus.weights().name());
    out["weight_bytes"] = json!(janus.storage().bytes);
    out["task"] = json!(args.task);
    out["backend"] = json!(format!("{:?}", args.backend).to_lowercase());
    out["dtype"] = json!(format!("{:?}", args.dtype).to_lowercase());
    out["threads"] = json!(
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
    );
    out["load_s"] = json!(load_s);
    out["peak_rss_mb"] = json!(peak_rss_mb());
    Ok(out)
}

fn main() -> std::process::ExitCode {
    let result = parse_args().and_then(|args| run(&args));
    match result {
        Ok(v) => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
