//! The `Janus` handle: one loaded model with its tokenizer and prompt format, serving many calls.

use std::path::{Path, PathBuf};

use burn::tensor::Device;

use crate::config::JanusConfig;
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::generate::image::{
    ImageGenOptions, decode_tokens, encode_pixels, generate_tokens_batch,
};
use crate::generate::text::{TextGenOptions, embed_with_images, expand_image_tokens};
use crate::limits::Limits;
use crate::load::ComputeDType;
use crate::load::adapter::LoraAdapter;
use crate::model::JanusModel;
use crate::nn::weight::WeightFormat;
use crate::processor::image::{ImageProcessorConfig, preprocess_for_understanding};
pub use crate::processor::prompt::Role;
use crate::processor::prompt::{PromptFormat, TurnText};
use crate::tokenizer::JanusTokenizer;

/// How to load a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Where to run.
    pub backend: Backend,
    /// The dtype activations are computed in (and dense weights held in); `auto` (the default)
    /// is bf16 on CPUs with AMX for bf16 weights, else f32
    /// ([`ComputeDType::Auto`]).
    pub dtype: ComputeDType,
    /// How weights are held in memory.
    pub weights: WeightFormat,
    /// A LoRA adapter folder in PEFT's format (`adapter_config.json` +
    /// `adapter_model.safetensors`), merged into the weights it adapts as they load (in f32,
    /// then held in the weights' storage: bf16 storage rounds each merged weight to bf16, as a
    /// merge into a bf16 model does).
    pub lora: Option<PathBuf>,
    /// Resource limits of each request ([`Limits`]; the handle keeps them,
    /// [`Janus::set_limits`] changes them).
    pub limits: Limits,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            backend: Backend::Cpu,
            dtype: ComputeDType::Auto,
            weights: WeightFormat::Auto,
            lora: None,
            limits: Limits::default(),
        }
    }
}

/// A grid of image tokens (row-major ids) and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTokens {
    /// The ids, `rows · cols` of them, row by row.
    pub ids: Vec<u32>,
    /// Rows of the grid.
    pub rows: usize,
    /// Columns of the grid.
    pub cols: usize,
}

/// The token file of `janus decode-image`: the JSON `janus encode-image --json` prints (a flat
/// list) or `janus generate --json` prints (one list per image).
#[derive(Debug, serde::Deserialize)]
struct TokenFile {
    tokens: TokenList,
    grid: [usize; 2],
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum TokenList {
    Flat(Vec<u32>),
    PerImage(Vec<Vec<u32>>),
}

impl ImageTokens {
    /// A token grid from the JSON of `janus encode-image --json` or `janus generate --json`
    /// (its first image): `{"tokens": [...], "grid": [rows, cols]}`.
    ///
    /// # Errors
    /// What is wrong with the JSON, as a message: malformed, no image, empty, or ids that do not
    /// fill the grid.
    pub fn from_json(bytes: &[u8]) -> std::result::Result<Self, String> {
        let file: TokenFile = serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "expected the JSON of encode-image or generate, {{\"tokens\": [...], \"grid\": \
                 [rows, cols]}}: {e}"
            )
        })?;
        let ids = match file.tokens {
            TokenList::Flat(ids) => ids,
            TokenList::PerImage(images) => images
                .into_iter()
                .next()
                .ok_or_else(|| "`tokens` lists no image".to_string())?,
        };
        if ids.is_empty() {
            return Err("`tokens` is empty".into());
        }
        let [rows, cols] = file.grid;
        if rows.checked_mul(cols) != Some(ids.len()) {
            return Err(format!(
                "{} tokens do not fill the {rows}×{cols} grid",
                ids.len()
            ));
        }
        Ok(ImageTokens { ids, rows, cols })
    }
}

/// One generated image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// The pixels.
    pub image: image::RgbImage,
    /// The image tokens it was decoded from.
    pub tokens: ImageTokens,
    /// The seed of the call that made it.
    pub seed: u64,
}

impl GeneratedImage {
    /// The image as PNG bytes, exactly as [`save_png`](Self::save_png) writes them.
    pub fn png_bytes(&self) -> Result<Vec<u8>> {
        let mut out = std::io::Cursor::new(Vec::new());
        self.image
            .write_to(&mut out, image::ImageFormat::Png)
            .map_err(|e| Error::InvalidInput(format!("encoding PNG: {e}")))?;
        Ok(out.into_inner())
    }

    /// Writes the image as PNG, whole or not at all (an existing file is replaced only once
    /// the new one is complete).
    pub fn save_png(&self, path: &Path) -> Result<()> {
        crate::files::write_atomic(path, &self.png_bytes()?)
    }

    /// Writes the image in the format its file name's extension names (`.png`, `.jpg`/`.jpeg`,
    /// `.webp`; see [`image_file`](crate::image_file)), whole or not at all.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::image_file::save(&self.image, path)
    }
}

/// The answer to a question about images.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The answer text (special tokens left out).
    pub text: String,
    /// The new token ids, with the EOS id last when generation stopped on it.
    pub token_ids: Vec<u32>,
    /// Length of the prompt after image-token expansion.
    pub prompt_tokens: usize,
    /// Time spent encoding the images.
    pub vision_time: std::time::Duration,
    /// Time to run the prompt and pick the first token.
    pub prefill_time: std::time::Duration,
    /// Time for the tokens after the first.
    pub decode_time: std::time::Duration,
}

/// One turn of a conversation: who speaks, the text, and the images it carries.
///
/// `<image_placeholder>` tags in `content` are the images' places (their count must equal the
/// turn's images); without tags, each image gets one placeholder on its own line before the text.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// The speaker.
    pub role: Role,
    /// The text.
    pub content: String,
    /// The turn's images, in the order of their placeholders.
    pub images: Vec<image::RgbImage>,
}

impl Turn {
    /// A user turn.
    pub fn user(content: impl Into<String>, images: Vec<image::RgbImage>) -> Self {
        Turn {
            role: Role::User,
            content: content.into(),
            images,
        }
    }

    /// A system turn (instructions before the first user turn; see
    /// [`PromptFormat::conversation_prompt`]).
    pub fn system(content: impl Into<String>) -> Self {
        Turn {
            role: Role::System,
            content: content.into(),
            images: Vec::new(),
        }
    }

    /// An assistant turn (an earlier answer).
    pub fn assistant(content: impl Into<String>) -> Self {
        Turn {
            role: Role::Assistant,
            content: content.into(),
            images: Vec::new(),
        }
    }
}

/// A loaded Janus model, ready to understand and generate.
#[derive(Debug)]
pub struct Janus {
    dir: PathBuf,
    device: Device,
    model: JanusModel,
    tokenizer: JanusTokenizer,
    prompt: PromptFormat,
    images: ImageProcessorConfig,
    limits: Limits,
}

impl Janus {
    /// Loads a model folder (either layout) onto the chosen backend.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        options.limits.validate()?;
        let device = options.backend.device()?;
        let adapter = options.lora.as_deref().map(LoraAdapter::open).transpose()?;
        let mut janus = Self::load_adapted(
            dir,
            &device,
            options.dtype,
            options.weights,
            adapter.as_ref(),
        )?;
        janus.limits = options.limits;
        Ok(janus)
    }

    /// Loads a model folder onto a given device, with the default weight storage.
    pub fn load_on(dir: &Path, device: &Device, dtype: ComputeDType) -> Result<Self> {
        Self::load_on_with(dir, device, dtype, WeightFormat::Auto)
    }

    /// Loads a model folder onto a given device with a chosen weight storage.
    pub fn load_on_with(
        dir: &Path,
        device: &Device,
        dtype: ComputeDType,
        weights: WeightFormat,
    ) -> Result<Self> {
        Self::load_adapted(dir, device, dtype, weights, None)
    }

    /// [`load_on_with`](Self::load_on_with), with a LoRA adapter merged into the weights it
    /// adapts as they load ([`LoraAdapter::open`] reads one).
    pub fn load_adapted(
        dir: &Path,
        device: &Device,
        dtype: ComputeDType,
        weights: WeightFormat,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Self> {
        if dir.exists() && !dir.is_dir() {
            return Err(not_a_folder(dir));
        }
        let tokenizer = JanusTokenizer::from_dir(dir)?;
        let model = JanusModel::load_adapted(dir, device, dtype, weights, adapter)?;
        let vocab = model.config.text.vocab_size;
        if tokenizer.vocab_size() > vocab {
            return Err(Error::Tokenizer(format!(
                "the tokenizer has {} tokens, more than the model's vocabulary of {vocab}",
                tokenizer.vocab_size()
            )));
        }
        let prompt = PromptFormat::from_dir(dir, model.config.layout, &tokenizer)?;
        check_processor_image_tokens(dir, model.config.vision.num_patches())?;
        let images = ImageProcessorConfig::from_dir(dir, model.config.layout)?;
        Ok(Janus {
            dir: dir.to_path_buf(),
            device: device.clone(),
            model,
            tokenizer,
            prompt,
            images,
            limits: Limits::default(),
        })
    }

    /// The resource limits each request is checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Changes the resource limits.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when a limit is 0.
    pub fn set_limits(&mut self, limits: Limits) -> Result<()> {
        limits.validate()?;
        self.limits = limits;
        Ok(())
    }

    /// The folder the model came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The configuration.
    pub fn config(&self) -> &JanusConfig {
        &self.model.config
    }

    /// How the weights are held in memory (never [`WeightFormat::Auto`]): the storage of most
    /// of their bytes.
    pub fn weights(&self) -> WeightFormat {
        self.model.storage.format
    }

    /// The compute dtype (never [`ComputeDType::Auto`]: what it resolved to).
    pub fn dtype(&self) -> ComputeDType {
        self.model.dtype
    }

    /// Bytes the weights take in memory, and their storage in detail.
    pub fn storage(&self) -> &crate::load::WeightStorage {
        &self.model.storage
    }

    /// The networks.
    pub fn model(&self) -> &JanusModel {
        &self.model
    }

    /// The networks, to change: which parameters training updates
    /// ([`Module::set_require_grad`](burn::module::Module::set_require_grad) on
    /// [`JanusModel::heads`](crate::model::JanusModel)), or the parameters an optimizer stepped.
    pub fn model_mut(&mut self) -> &mut JanusModel {
        &mut self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &JanusTokenizer {
        &self.tokenizer
    }

    /// The chat format.
    pub fn prompt_format(&self) -> &PromptFormat {
        &self.prompt
    }

    /// Replaces the chat format (for example to change the role names).
    pub fn set_prompt_format(&mut self, format: PromptFormat) {
        self.prompt = format;
    }

    /// Token ids of the understanding prompt for a question about `images` images, each
    /// placeholder expanded to `<begin_of_image>`, one `<image_placeholder>` per image token and
    /// `<end_of_image>`.
    pub fn understanding_ids(&self, question: &str, images: usize) -> Result<Vec<u32>> {
        if question.trim().is_empty() {
            return Err(Error::InvalidInput("the question is empty".into()));
        }
        self.prompt_ids(&self.prompt.understanding_prompt(question, images)?)
    }

    /// Token ids of a conversation's prompt (see [`chat`](Self::chat)), image placeholders
    /// expanded as in [`understanding_ids`](Self::understanding_ids).
    pub fn conversation_ids(&self, turns: &[Turn]) -> Result<Vec<u32>> {
        self.prompt_ids(&self.prompt.conversation_prompt(&turn_texts(turns))?)
    }

    fn prompt_ids(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode(text, true)?;
        let sp = self.tokenizer.special();
        Ok(expand_image_tokens(
            &ids,
            sp.image_placeholder,
            sp.begin_of_image,
            sp.end_of_image,
            self.model.config.vision.num_patches(),
        ))
    }

    /// Answers a question about images (greedy by default).
    pub fn understand(
        &self,
        images: &[image::RgbImage],
        question: &str,
        options: &TextGenOptions,
    ) -> Result<Answer> {
        self.understand_stream(images, question, options, &mut |_| true)
    }

    /// [`understand`](Self::understand), passing each new piece of text to `on_text` as it is
    /// produced; returning `false` cancels with [`Error::Cancelled`].
    pub fn understand_stream(
        &self,
        images: &[image::RgbImage],
        question: &str,
        options: &TextGenOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let seq = self.begin_understand(images, question, options, &[])?;
        self.answer(seq, on_text)
    }

    /// The assistant's next turn in a conversation: after optional system turns, turns alternate
    /// user, assistant, user, …, starting and ending with a user turn; each turn's images fill
    /// its own placeholders.
    pub fn chat(&self, turns: &[Turn], options: &TextGenOptions) -> Result<Answer> {
        self.chat_stream(turns, options, &mut |_| true)
    }

    /// [`chat`](Self::chat), passing each new piece of text to `on_text` as it is produced;
    /// returning `false` cancels with [`Error::Cancelled`].
    pub fn chat_stream(
        &self,
        turns: &[Turn],
        options: &TextGenOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let seq = self.begin_chat(turns, options, &[])?;
        self.answer(seq, on_text)
    }

    /// Decodes a started answer alone to its end, passing each new piece of text to `on_text`.
    fn answer(
        &self,
        mut seq: crate::engine::Sequence,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        while !seq.is_finished() {
            self.step(&mut [&mut seq])?;
            let piece = seq.take_text();
            if !piece.is_empty() && !on_text(&piece) {
                return Err(Error::Cancelled);
            }
        }
        self.finish_answer(seq)
    }

    /// The prompt's embeddings `[1, len, hidden]`: the images encoded (SigLIP and aligner) and
    /// their features placed at the prompt's image tokens; and the time the images took.
    pub(crate) fn prompt_embeds(
        &self,
        ids: &[u32],
        images: &[&image::RgbImage],
    ) -> Result<(burn::tensor::Tensor<3>, std::time::Duration)> {
        let started = std::time::Instant::now();
        let count = images.len();
        self.limits.check_images(count)?;
        for img in images {
            self.limits
                .check_pixels(u64::from(img.width()), u64::from(img.height()))?;
        }
        let features = if count == 0 {
            None
        } else {
            let size = self.images.image_size;
            let mut flat = Vec::with_capacity(count * 3 * size * size);
            for img in images {
                if img.width() == 0 || img.height() == 0 {
                    return Err(Error::InvalidInput("an image has no pixels".into()));
                }
                flat.extend(preprocess_for_understanding(img, &self.images));
            }
            let pixels = burn::tensor::Tensor::<4>::from_data(
                burn::tensor::TensorData::new(flat, [count, 3, size, size]),
                (&self.device, self.model.llm.dtype()),
            );
            Some(
                self.model
                    .heads
                    .aligner
                    .forward(self.model.vision.forward(pixels)),
            )
        };
        let vision_time = started.elapsed();
        let sp = self.tokenizer.special();
        let embeds = embed_with_images(&self.model, ids, sp.image_placeholder, features)?;
        Ok((embeds, vision_time))
    }

    /// Token ids of the generation prompt for `prompt`: BOS, the chat-formatted text, and
    /// `<begin_of_image>`.
    pub fn generation_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let text = self.prompt.generation_prompt(prompt)?;
        let mut ids = self.tokenizer.encode(&text, true)?;
        ids.push(self.tokenizer.special().begin_of_image);
        Ok(ids)
    }

    /// Generates `options.count` images of `prompt`.
    pub fn generate(&self, prompt: &str, options: &ImageGenOptions) -> Result<Vec<GeneratedImage>> {
        self.generate_with_progress(prompt, options, &mut |_, _| true)
    }

    /// [`generate`](Self::generate), calling `progress(step, total)` after every image-token step;
    /// returning `false` cancels with [`Error::Cancelled`].
    pub fn generate_with_progress(
        &self,
        prompt: &str,
        options: &ImageGenOptions,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<GeneratedImage>> {
        let mut all = self.generate_batch_with_progress(&[prompt], options, progress)?;
        Ok(all.remove(0))
    }

    /// Generates `options.count` images for each prompt, in one batch. Every image equals what
    /// its prompt gives alone with the same options (same backend and dtype).
    pub fn generate_batch(
        &self,
        prompts: &[&str],
        options: &ImageGenOptions,
    ) -> Result<Vec<Vec<GeneratedImage>>> {
        self.generate_batch_with_progress(prompts, options, &mut |_, _| true)
    }

    /// [`generate_batch`](Self::generate_batch) with a progress callback that can cancel.
    pub fn generate_batch_with_progress(
        &self,
        prompts: &[&str],
        options: &ImageGenOptions,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<Vec<GeneratedImage>>> {
        options.validate()?;
        self.limits.check_count(prompts.len(), options.count)?;
        let ids = prompts
            .iter()
            .map(|p| self.generation_ids(p))
            .collect::<Result<Vec<_>>>()?;
        let pad = self.tokenizer.special().pad;
        let grids = generate_tokens_batch(&self.model, &ids, pad, options, progress)?;
        grids
            .into_iter()
            .map(|per_prompt| self.decode_grids(per_prompt, options.seed))
            .collect()
    }

    /// Generated token grids decoded to images by the VQ decoder, with the seed that drew them.
    pub(crate) fn decode_grids(
        &self,
        grids: Vec<Vec<u32>>,
        seed: u64,
    ) -> Result<Vec<GeneratedImage>> {
        let g = self.model.config.vq.grid;
        let images = decode_tokens(&self.model, &grids)?;
        Ok(grids
            .into_iter()
            .zip(images)
            .map(|(ids, image)| GeneratedImage {
                image,
                tokens: ImageTokens {
                    ids,
                    rows: g,
                    cols: g,
                },
                seed,
            })
            .collect())
    }

    /// The VQ token grid of an image: its short side resized to the VQ input size (bicubic),
    /// centre-cropped to a square, scaled to [-1, 1], encoded, and quantised with the official
    /// quantizer (nearest l2-normalised code).
    pub fn encode_image(&self, image: &image::RgbImage) -> Result<ImageTokens> {
        if image.width() == 0 || image.height() == 0 {
            return Err(Error::InvalidInput("the image has no pixels".into()));
        }
        self.limits
            .check_pixels(u64::from(image.width()), u64::from(image.height()))?;
        let vq = &self.model.config.vq;
        let pixels = crate::processor::image::preprocess_for_vq(image, vq.image_size())?;
        let ids = encode_pixels(&self.model, &[pixels])?.remove(0);
        Ok(ImageTokens {
            ids,
            rows: vq.grid,
            cols: vq.grid,
        })
    }

    /// Decodes an image-token grid to pixels.
    pub fn decode_image(&self, tokens: &ImageTokens) -> Result<image::RgbImage> {
        let g = self.model.config.vq.grid;
        if tokens.rows != g || tokens.cols != g || tokens.ids.len() != g * g {
            return Err(Error::InvalidInput(format!(
                "a {}×{} grid of {} ids; this model decodes {g}×{g} grids",
                tokens.rows,
                tokens.cols,
                tokens.ids.len()
            )));
        }
        let mut images = decode_tokens(&self.model, std::slice::from_ref(&tokens.ids))?;
        Ok(images.remove(0))
    }
}

/// The error for a model path that names a file: a model is a folder (or a hub id).
pub(crate) fn not_a_folder(path: &Path) -> Error {
    Error::InvalidInput(format!(
        "{} is a file; a model is a folder holding config.json, the tokenizer and the weights \
         (or a Hugging Face hub id)",
        path.display()
    ))
}

/// Prompts get one image token per vision patch; a processor config that names another count
/// (`num_image_tokens`, which the reference processors expand by) describes another model.
fn check_processor_image_tokens(dir: &Path, patches: usize) -> Result<()> {
    let path = dir.join("processor_config.json");
    if !path.exists() {
        return Ok(());
    }
    match crate::config::read_json(&path)?.get("num_image_tokens") {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(v) if v.as_u64() == Some(patches as u64) => Ok(()),
        Some(v) => Err(Error::config(
            &path,
            format!(
                "key `num_image_tokens` is {v}, but the vision encoder of config.json gives \
                 {patches} tokens per image"
            ),
        )),
    }
}

/// The prompt's view of a conversation's turns.
fn turn_texts(turns: &[Turn]) -> Vec<TurnText<'_>> {
    turns
        .iter()
        .map(|t| TurnText {
            role: t.role,
            content: &t.content,
            images: t.images.len(),
        })
        .collect()
}
