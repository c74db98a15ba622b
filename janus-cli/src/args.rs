//! The command line: subcommands and their flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Janus and Janus-Pro: image understanding and text-to-image generation.
#[derive(Debug, Parser)]
#[command(name = "janus", version, about, max_term_width = 100)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Answer a question about one or more images.
    Understand(UnderstandArgs),
    /// Generate images from text prompts.
    Generate(GenerateArgs),
    /// Turn an image into its grid of VQ image tokens.
    EncodeImage(EncodeArgs),
    /// Turn a grid of VQ image tokens back into an image.
    DecodeImage(DecodeArgs),
    /// Serve the model over HTTP: OpenAI-compatible chat completions (understanding) and image
    /// generations, batched across requests, with a web page at /.
    Serve(ServeArgs),
    /// The training loss of each sample of a JSONL file, and their mean (no update).
    Loss(LossArgs),
    /// Fine-tune with Janus' recipe on a JSONL file and save the model (in f32, on autodiff).
    Train(TrainArgs),
}

/// Flags every subcommand takes.
#[derive(Debug, Args)]
pub struct Common {
    /// A model folder (Hugging Face or original DeepSeek layout) or a hub id such as
    /// deepseek-community/Janus-Pro-1B.
    #[arg(long, value_name = "DIR|ORG/NAME")]
    pub model: String,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    pub backend: BackendArg,
    /// The compute dtype: auto is bf16 on a CPU with AMX for bf16 weights, else f32.
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,
    /// How weights are held in memory: auto keeps the half precision the files store on the CPU
    /// (the compute dtype on a GPU); q8_0 and q4_0 quantize at load (CPU, compute in f32).
    #[arg(long, value_enum, default_value_t = WeightsArg::Auto)]
    pub weights: WeightsArg,
    /// Print no progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// A LoRA adapter applied at load (understand, generate, serve, loss).
#[derive(Debug, Args)]
pub struct AdapterArg {
    /// A LoRA adapter folder in PEFT's format (adapter_config.json + adapter_model.safetensors,
    /// as `janus train --lora` or PEFT's save_pretrained writes it), merged into the weights it
    /// adapts as the model loads.
    #[arg(long = "lora", value_name = "DIR")]
    pub lora: Option<PathBuf>,
}

/// `janus understand`.
#[derive(Debug, Args)]
pub struct UnderstandArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub adapter: AdapterArg,
    /// An image file; repeat for several. They fill the prompt's <image_placeholder> tags in
    /// order, or, when it has none, each gets a placeholder line before the prompt.
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<PathBuf>,
    /// The question.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// Most new tokens to produce.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 takes the most likely token (greedy, the default).
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub temperature: f32,
    /// Sample only from the most likely tokens whose probability reaches P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Sample only from the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Penalty for tokens already produced (1 = none).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repetition_penalty: f32,
    /// Random seed of the sampling.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Print one JSON object {text, token_ids, prompt_tokens} at the end instead of streaming.
    #[arg(long)]
    pub json: bool,
}

/// `janus generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub adapter: AdapterArg,
    /// What to draw; repeat for several prompts (generated in one batch).
    #[arg(long = "prompt", value_name = "TEXT", required = true)]
    pub prompts: Vec<String>,
    /// The PNG to write. With several prompts or images: <stem>_<i>.png beside it, i counting
    /// over prompts, then images.
    #[arg(long, value_name = "PATH.png")]
    pub out: PathBuf,
    /// Images per prompt.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub count: usize,
    /// Classifier-free guidance weight.
    #[arg(long, default_value_t = 5.0, value_name = "W")]
    pub cfg_weight: f32,
    /// Sampling temperature; 0 takes the most likely token (deterministic).
    #[arg(long, default_value_t = 1.0, value_name = "T")]
    pub temperature: f32,
    /// Sample only from the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample only from the most likely tokens whose probability reaches P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Random seed (a random one when not given; --json reports it).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Print one JSON object {images, tokens, grid, seed} instead of the paths.
    #[arg(long)]
    pub json: bool,
}

/// `janus encode-image`.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub common: Common,
    /// The image file.
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// Print one JSON object {tokens, grid} instead of the grid as rows of ids.
    #[arg(long)]
    pub json: bool,
}

/// `janus decode-image`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub common: Common,
    /// The JSON of `encode-image --json` or of `generate --json` (its first image).
    #[arg(long, value_name = "FILE.json")]
    pub tokens: PathBuf,
    /// The PNG to write.
    #[arg(long, value_name = "PATH.png")]
    pub out: PathBuf,
}

/// `janus loss`.
#[derive(Debug, Args)]
pub struct LossArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub adapter: AdapterArg,
    /// Training samples, one JSON object a line: {"task": "generate", "prompt", "image"},
    /// {"task": "understand", "images", "question", "answer"} or {"task": "text", "text"};
    /// image paths relative to the file's folder.
    #[arg(long, value_name = "FILE.jsonl")]
    pub data: PathBuf,
    /// Print one JSON object {losses, mean} instead of a line per sample.
    #[arg(long)]
    pub json: bool,
}

/// `janus train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub common: Common,
    /// Training samples, as `janus loss` reads them.
    #[arg(long, value_name = "FILE.jsonl")]
    pub data: PathBuf,
    /// The folder to write the fine-tuned model to (in the input's layout), with
    /// train_log.jsonl.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// 1: aligners, generation embedding and image head; 2 and 3: the language model too.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub stage: u8,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4, value_name = "LR")]
    pub lr: f64,
    /// Passes over the samples (the default: 1).
    #[arg(long, value_name = "N", conflicts_with = "steps")]
    pub epochs: Option<usize>,
    /// Optimizer updates, each of batch-size × grad-accum samples.
    #[arg(long, value_name = "N")]
    pub steps: Option<usize>,
    /// Samples a micro-batch.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub batch_size: usize,
    /// Micro-batches an update.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub grad_accum: usize,
    /// Updates of linear warmup before the cosine decay.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub warmup: usize,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.1, value_name = "W")]
    pub weight_decay: f32,
    /// Largest global gradient norm (0: no clipping).
    #[arg(long, default_value_t = 1.0, value_name = "NORM")]
    pub clip: f32,
    /// Probability that a generation sample's prompt becomes the unconditional prompt.
    #[arg(long, default_value_t = 0.1, value_name = "P")]
    pub cfg_drop: f64,
    /// Sampling weights of generation, understanding and text samples, e.g. 2:1:0 (the
    /// default: each sample once an epoch, in the file's own proportions).
    #[arg(long, value_name = "G:U:T", value_parser = parse_mix)]
    pub mix: Option<Mix>,
    /// Seed of the sample order, the condition drops and the adapters' first values.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Train LoRA adapters of this rank on the language model's projections (q, k, v, o, gate,
    /// up, down) instead of the stage's parameters; every weight of the model stays frozen and
    /// OUT gets the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "RANK", conflicts_with = "stage")]
    pub lora: Option<usize>,
    /// The adapters' alpha (their term is scaled by alpha / rank); the default is the rank.
    #[arg(long, value_name = "A", requires = "lora")]
    pub lora_alpha: Option<f64>,
    /// With --lora: write the full model with the adapters merged into its weights instead of
    /// the adapter.
    #[arg(long, requires = "lora")]
    pub merge: bool,
    /// Write a checkpoint (OUT/checkpoint) every N updates; one is always written when Ctrl-C
    /// stops the run.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub save_every: Option<u64>,
    /// Continue the run whose checkpoint this is (OUT/checkpoint of an interrupted run), with
    /// the options and data it was started with: it gives the losses the uninterrupted run gives.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

/// `janus serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub adapter: AdapterArg,
    /// Address to listen on (loopback by default; 0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000, value_name = "PORT")]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every request (but the page and /health).
    #[arg(
        long,
        value_name = "KEY",
        env = "JANUS_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Most sequences decoded together (an image counts once, an answer once).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_batch: usize,
    /// Most requests waiting for the batch; more get 429.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_queue: usize,
    /// Most images in one chat request.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_images: usize,
    /// Largest request body in MiB; larger ones get 413.
    #[arg(long, default_value_t = 20, value_name = "MB")]
    pub max_body_mb: usize,
    /// Fetch http(s) image URLs in chat requests (refused otherwise; local paths never).
    #[arg(long)]
    pub allow_remote_images: bool,
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// Burn's CPU backend.
    Cpu,
    /// A GPU through wgpu (build with the `wgpu` feature).
    Wgpu,
    /// An NVIDIA GPU (build with the `cuda` feature).
    Cuda,
}

impl From<BackendArg> for janus_core::Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Cpu => janus_core::Backend::Cpu,
            BackendArg::Wgpu => janus_core::Backend::Wgpu,
            BackendArg::Cuda => janus_core::Backend::Cuda,
        }
    }
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// bf16 on a CPU with AMX when the weights are held in bf16 (every published checkpoint, with
    /// --weights auto), else f32.
    Auto,
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16. On the CPU: f32 activations, bf16 weights, and the large products of a prompt,
    /// SigLIP and the aligners with bf16 operands and f32 sums on AMX or AVX512-BF16 where the
    /// CPU has them (the arithmetic of PyTorch's bf16 path), exact f32 products elsewhere.
    Bf16,
}

/// `--weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightsArg {
    /// The files' own half precision on the CPU (bf16 or f16, else f32); the compute dtype on a GPU.
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// GGML's q8_0 (8.5 bits a weight).
    #[value(name = "q8_0")]
    Q8_0,
    /// GGML's q4_0 (4.5 bits a weight).
    #[value(name = "q4_0")]
    Q4_0,
}

impl From<WeightsArg> for janus_core::WeightFormat {
    fn from(w: WeightsArg) -> Self {
        match w {
            WeightsArg::Auto => janus_core::WeightFormat::Auto,
            WeightsArg::F32 => janus_core::WeightFormat::F32,
            WeightsArg::Bf16 => janus_core::WeightFormat::Bf16,
            WeightsArg::F16 => janus_core::WeightFormat::F16,
            WeightsArg::Q8_0 => janus_core::WeightFormat::Q8_0,
            WeightsArg::Q4_0 => janus_core::WeightFormat::Q4_0,
        }
    }
}

impl From<DTypeArg> for janus_core::ComputeDType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::Auto => janus_core::ComputeDType::Auto,
            DTypeArg::F32 => janus_core::ComputeDType::F32,
            DTypeArg::F16 => janus_core::ComputeDType::F16,
            DTypeArg::Bf16 => janus_core::ComputeDType::BF16,
        }
    }
}

/// `--mix G:U:T`.
#[derive(Debug, Clone, Copy)]
pub struct Mix(pub [f64; 3]);

fn parse_mix(s: &str) -> Result<Mix, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [g, u, t] = parts[..] else {
        return Err("expected three weights G:U:T, e.g. 2:1:0".into());
    };
    let w = |p: &str| -> Result<f64, String> {
        p.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("{p:?} is not a non-negative number"))
    };
    let mix = [w(g)?, w(u)?, w(t)?];
    if mix.iter().sum::<f64>() <= 0.0 {
        return Err("the weights are all zero".into());
    }
    Ok(Mix(mix))
}
