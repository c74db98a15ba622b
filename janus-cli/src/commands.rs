//! What each subcommand does.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use janus_core::generate::image::ImageGenOptions;
use janus_core::generate::sampling::Sampling;
use janus_core::generate::text::TextGenOptions;
use janus_core::hub::HubEvent;
use janus_core::pipeline::{Janus, LoadOptions};
use janus_core::processor::image::open_image_within;
use janus_core::tokenizer::strings::IMAGE_PLACEHOLDER;

use crate::args::{
    Command, Common, DecodeArgs, EncodeArgs, GenerateArgs, LossArgs, ServeArgs, TrainArgs,
    UnderstandArgs,
};
use crate::error::{CliError, Result};
use crate::formats::{
    EncodeJson, GenerateJson, GenerateTimings, LossJson, UnderstandJson, UnderstandTimings,
    check_output, output_paths, read_tokens, save_image,
};
use crate::progress::Progress;

/// Runs one subcommand.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Understand(args) => understand(args),
        Command::Generate(args) => generate(args),
        Command::EncodeImage(args) => encode_image(args),
        Command::DecodeImage(args) => decode_image(args),
        Command::Serve(args) => serve(args),
        Command::Loss(args) => loss(args),
        Command::Train(args) => train(args),
    }
}

/// `janus train`: the samples are read and the options checked before the model loads; the
/// model loads on the backend's autodiff device in f32, trains, and is saved with its log.
fn train(args: TrainArgs) -> Result<()> {
    use janus_core::train::job::{TrainEvent, TrainJob, run};
    use janus_core::train::lora::LoraOptions;
    use janus_core::train::trainer::{Stage, TrainOptions};
    let mut progress = Progress::new(args.common.quiet);
    // The samples and options are checked before the model is found.
    janus_core::train::read_jsonl(&args.data)?;
    let options = TrainOptions {
        lora: args.lora.map(|rank| LoraOptions {
            rank,
            alpha: args.lora_alpha.unwrap_or(rank as f64),
        }),
        stage: match args.stage {
            1 => Stage::One,
            2 => Stage::Two,
            _ => Stage::Three,
        },
        lr: args.lr,
        steps: args.steps.unwrap_or(1),
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        clip: (args.clip > 0.0).then_some(args.clip),
        cfg_drop: args.cfg_drop,
        seed: args.seed,
        mix: args.mix.map(|m| m.0),
    };
    options.check()?;
    let dir = {
        let mut on_hub = |event: HubEvent<'_>| progress.hub(event);
        janus_core::hub::resolve(&args.common.model, Some(&mut on_hub))?
    };
    let job = TrainJob {
        backend: args.common.backend.into(),
        options,
        steps_given: args.steps.is_some(),
        epochs: args.epochs.unwrap_or(1),
        merge: args.merge,
        save_every: args.save_every.map(|n| n as usize),
        resume: args.resume.clone(),
        ..TrainJob::new(dir, args.data.clone(), args.out.clone())
    };
    let interrupted = interrupt_flag();
    let summary = run(&job, &mut |event| match event {
        TrainEvent::Loading(dir) => {
            progress.stage(&format!("loading {} for training (f32)", dir.display()));
            true
        }
        TrainEvent::Step {
            report,
            steps,
            rate,
        } => {
            progress.count(
                &format!("training: loss {:.4}, {rate:.2} samples/s", report.loss),
                report.step as u64,
                steps as u64,
                false,
            );
            !interrupted.load(std::sync::atomic::Ordering::SeqCst)
        }
        TrainEvent::Saving(out) => {
            progress.stage(&format!("saving {}", out.display()));
            true
        }
    })?;
    if summary.stopped {
        progress.clear();
        let dir = summary.checkpoint.display();
        return Err(CliError::Interrupted(format!(
            "interrupted after update {} of {}: checkpoint saved in {dir}; continue with \
             --resume {dir}",
            summary.steps, summary.total_steps
        )));
    }
    progress.done(&format!("saved {}", args.out.display()));
    Ok(())
}

/// A flag Ctrl-C sets (a second Ctrl-C ends the process at once, with status 130).
fn interrupt_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    let set = std::sync::Arc::clone(&flag);
    // Without a handler (one already installed), Ctrl-C ends the process as it would anyway.
    let _ = ctrlc::set_handler(move || {
        if set.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: finishing this update, then saving a checkpoint (Ctrl-C again to quit now)"
        );
    });
    flag
}

/// `janus loss`: the samples are read (and checked) before the model loads.
fn loss(args: LossArgs) -> Result<()> {
    let mut progress = Progress::new(args.common.quiet);
    let examples = janus_core::train::read_jsonl(&args.data)?;
    let janus = load(
        &args.common,
        args.adapter.lora.as_deref(),
        janus_core::Limits::default(),
        &mut progress,
    )?;
    let total = examples.len() as u64;
    let losses = janus_core::train::losses(&janus, &examples, &mut |done, _| {
        progress.count("computing losses", done as u64, total, false);
        true
    })?;
    progress.clear();
    if args.json {
        return print_json(&LossJson {
            losses: &losses.losses,
            mean: losses.mean,
        });
    }
    let mut lines: Vec<String> = examples
        .iter()
        .zip(&losses.losses)
        .enumerate()
        .map(|(i, (e, l))| format!("{}\t{}\t{l:.6}", i + 1, e.task()))
        .collect();
    lines.push(format!("mean\t\t{:.6}", losses.mean));
    print_lines(&lines)
}

/// `janus serve`: the port is bound first, the model loads on the server's model thread.
fn serve(args: ServeArgs) -> Result<()> {
    let options = janus_serve::ServeOptions {
        host: args.host,
        port: args.port,
        api_key: args.api_key.filter(|k| !k.is_empty()),
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        limits: args.limits.limits(),
        max_body_mb: args.max_body_mb,
        allow_remote_images: args.allow_remote_images,
        model_id: args.common.model.clone(),
        quiet: args.common.quiet,
    };
    let common = args.common;
    let lora = args.adapter.lora;
    let limits = options.limits;
    janus_serve::serve(options, move || {
        let mut progress = Progress::new(common.quiet);
        load(&common, lora.as_deref(), limits, &mut progress).map_err(|e| e.to_string())
    })
    .map_err(|e| CliError::Invalid(e.to_string()))
}

/// Finds (or downloads) the model and loads it, with a LoRA adapter folder merged in and the
/// request limits it checks.
fn load(
    common: &Common,
    lora: Option<&Path>,
    limits: janus_core::Limits,
    progress: &mut Progress,
) -> Result<Janus> {
    let dir = {
        let mut on_hub = |event: HubEvent<'_>| progress.hub(event);
        janus_core::hub::resolve(&common.model, Some(&mut on_hub))?
    };
    progress.stage(&format!("loading {}", dir.display()));
    let started = Instant::now();
    let options = LoadOptions {
        backend: common.backend.into(),
        dtype: common.dtype.into(),
        weights: common.weights.into(),
        lora: lora.map(Path::to_path_buf),
        limits,
    };
    let janus = Janus::load(&dir, &options)?;
    let storage = janus.storage();
    let mapped = if storage.mapped > 0 {
        format!(
            ", {:.2} GB of it mapped from the files",
            storage.mapped as f64 / 1e9
        )
    } else {
        String::new()
    };
    progress.done(&format!(
        "loaded {} in {:.1} s (dtype {}, weights {}, {:.2} GB resident{mapped})",
        dir.display(),
        started.elapsed().as_secs_f64(),
        janus.dtype().name(),
        janus.weights(),
        storage.bytes as f64 / 1e9
    ));
    Ok(janus)
}

fn understand(args: UnderstandArgs) -> Result<()> {
    let mut progress = Progress::new(args.common.quiet);
    // Bad input fails before the model loads.
    let limits = args.limits.limits();
    limits.validate()?;
    let prompt = prompt_text(args.prompt.as_deref(), args.prompt_file.as_deref(), &limits)?;
    if prompt.trim().is_empty() {
        return Err(janus_core::Error::InvalidInput("the question is empty".into()).into());
    }
    limits.check_images(args.images.len())?;
    let tags = prompt.matches(IMAGE_PLACEHOLDER).count();
    if tags > 0 && tags != args.images.len() {
        return Err(janus_core::Error::InvalidInput(format!(
            "the prompt has {tags} {IMAGE_PLACEHOLDER} tags but {} --image files were given",
            args.images.len()
        ))
        .into());
    }
    let images = args
        .images
        .iter()
        .map(|p| open_image_within(p, &limits))
        .collect::<janus_core::Result<Vec<_>>>()?;
    let options = TextGenOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
        },
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ..TextGenOptions::default()
    };
    options.validate()?;

    let loading = Instant::now();
    let janus = load(
        &args.common,
        args.adapter.lora.as_deref(),
        limits,
        &mut progress,
    )?;
    let load_s = loading.elapsed().as_secs_f64();
    progress.stage("reading the prompt");
    let answer = if args.json {
        janus.understand(&images, &prompt, &options)?
    } else {
        let mut stdout = std::io::stdout().lock();
        let mut failed = None;
        let mut first = true;
        let result = janus.understand_stream(&images, &prompt, &options, &mut |piece| {
            if first {
                progress.clear();
                first = false;
            }
            match stdout
                .write_all(piece.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        });
        if let Some(e) = failed {
            return Err(CliError::Stdout(e));
        }
        let answer = result?;
        writeln!(stdout).map_err(CliError::Stdout)?;
        answer
    };
    let new = answer.token_ids.len();
    let tokens_per_s = (new > 1 && !answer.decode_time.is_zero())
        .then(|| (new - 1) as f64 / answer.decode_time.as_secs_f64());
    let decode_rate = tokens_per_s.map_or(String::new(), |r| format!(", {r:.1} tokens/s"));
    progress.done(&format!(
        "{} prompt tokens, {new} new; vision {:.2} s, prefill {:.2} s, decode {:.2} s{decode_rate}",
        answer.prompt_tokens,
        answer.vision_time.as_secs_f64(),
        answer.prefill_time.as_secs_f64(),
        answer.decode_time.as_secs_f64(),
    ));
    if args.json {
        print_json(&UnderstandJson {
            text: &answer.text,
            token_ids: &answer.token_ids,
            prompt_tokens: answer.prompt_tokens,
            weights: janus.weights().name(),
            dtype: janus.dtype().name(),
            timings: UnderstandTimings {
                load_s,
                vision_s: answer.vision_time.as_secs_f64(),
                prefill_s: answer.prefill_time.as_secs_f64(),
                decode_s: answer.decode_time.as_secs_f64(),
                decode_tokens_per_s: tokens_per_s,
            },
        })?;
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<()> {
    let mut progress = Progress::new(args.common.quiet);
    let limits = args.limits.limits();
    limits.validate()?;
    let prompts = match &args.prompt_file {
        Some(file) => vec![prompt_text(None, Some(file), &limits)?],
        None => args.prompts.clone(),
    };
    if args.count == 0 {
        return Err(CliError::Invalid("--count must be at least 1".into()));
    }
    limits.check_count(prompts.len(), args.count)?;
    let paths = output_paths(&args.out, prompts.len(), args.count)?;
    let options = ImageGenOptions {
        count: args.count,
        cfg_weight: args.cfg_weight,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
        },
        seed: args.seed.unwrap_or_else(random_seed),
    };
    options.validate()?;
    if prompts.iter().any(|p| p.trim().is_empty()) {
        return Err(janus_core::Error::InvalidInput("a --prompt is empty".into()).into());
    }

    let loading = Instant::now();
    let janus = load(
        &args.common,
        args.adapter.lora.as_deref(),
        limits,
        &mut progress,
    )?;
    let load_s = loading.elapsed().as_secs_f64();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut tokens_done = None;
    let batch = janus.generate_batch_with_progress(&prompts, &options, &mut |step, total| {
        progress.count("image tokens", step as u64, total as u64, false);
        if step >= total {
            tokens_done = Some(started.elapsed());
            progress.stage("decoding the image tokens (VQ)");
        }
        true
    })?;
    let total = started.elapsed();
    let tokens_time = tokens_done.unwrap_or(total);
    let images: Vec<_> = batch.into_iter().flatten().collect();
    for (image, path) in images.iter().zip(&paths) {
        save_image(&image.image, path)?;
    }
    progress.done(&format!(
        "{} image{} in {:.1} s (seed {})",
        images.len(),
        if images.len() == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64(),
        options.seed
    ));
    let written: Vec<String> = paths
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if args.json {
        let grid = images
            .first()
            .map_or([0, 0], |g| [g.tokens.rows, g.tokens.cols]);
        print_json(&GenerateJson {
            images: written,
            tokens: images.into_iter().map(|g| g.tokens.ids).collect(),
            grid,
            seed: options.seed,
            weights: janus.weights().name(),
            dtype: janus.dtype().name(),
            timings: GenerateTimings {
                load_s,
                tokens_s: tokens_time.as_secs_f64(),
                vq_decode_s: total.saturating_sub(tokens_time).as_secs_f64(),
                total_s: total.as_secs_f64(),
            },
        })
    } else {
        print_lines(&written)
    }
}

fn encode_image(args: EncodeArgs) -> Result<()> {
    let mut progress = Progress::new(args.common.quiet);
    let limits = args.limits.limits();
    limits.validate()?;
    let image = open_image_within(&args.image, &limits)?;
    let janus = load(&args.common, None, limits, &mut progress)?;
    progress.stage("encoding the image (VQ)");
    let tokens = janus.encode_image(&image)?;
    progress.clear();
    if args.json {
        print_json(&EncodeJson {
            tokens: &tokens.ids,
            grid: [tokens.rows, tokens.cols],
            weights: janus.weights().name(),
            dtype: janus.dtype().name(),
        })
    } else {
        let rows: Vec<String> = tokens
            .ids
            .chunks(tokens.cols.max(1))
            .map(|row| row.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
            .collect();
        print_lines(&rows)
    }
}

fn decode_image(args: DecodeArgs) -> Result<()> {
    let mut progress = Progress::new(args.common.quiet);
    let limits = args.limits.limits();
    limits.validate()?;
    let tokens = read_tokens(&args.tokens, &limits)?;
    check_output(&args.out)?;
    let janus = load(&args.common, None, limits, &mut progress)?;
    progress.stage("decoding the image tokens (VQ)");
    let image = janus.decode_image(&tokens)?;
    save_image(&image, &args.out)?;
    progress.clear();
    print_lines(&[args.out.to_string_lossy().into_owned()])
}

/// The prompt given on the command line, or read from `--prompt-file` (`-`: standard input),
/// bounded by `--max-input-mb`, with one trailing newline (`\n` or `\r\n`) trimmed.
fn prompt_text(
    prompt: Option<&str>,
    file: Option<&Path>,
    limits: &janus_core::Limits,
) -> Result<String> {
    let Some(file) = file else {
        return Ok(prompt.unwrap_or_default().to_string());
    };
    let bytes = if file == Path::new("-") {
        use std::io::Read;
        let limit = limits.max_input_bytes();
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| janus_core::Error::Io {
                path: file.to_path_buf(),
                source: e,
            })?;
        if bytes.len() as u64 > limit {
            return Err(janus_core::Error::InvalidInput(format!(
                "the prompt on standard input is longer than the limit of {limit} bytes \
                 (--max-input-mb)"
            ))
            .into());
        }
        bytes
    } else {
        janus_core::files::read_bounded(file, limits.max_input_bytes(), "prompt file")?
    };
    let mut text = String::from_utf8(bytes).map_err(|_| {
        janus_core::Error::InvalidInput(format!("{}: the prompt is not UTF-8", file.display()))
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// A seed for a run that names none, exact in any JSON reader (below 2^53).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(t.as_nanos());
    }
    hasher.write_u32(std::process::id());
    hasher.finish() & ((1 << 53) - 1)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let text = serde_json::to_string(value)
        .map_err(|e| CliError::Invalid(format!("cannot write JSON: {e}")))?;
    print_lines(&[text])
}

fn print_lines(lines: &[String]) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    for line in lines {
        writeln!(stdout, "{line}").map_err(CliError::Stdout)?;
    }
    stdout.flush().map_err(CliError::Stdout)
}
