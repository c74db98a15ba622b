//! Model configuration: both `config.json` layouts parsed into one typed [`JanusConfig`].
//!
//! * The original DeepSeek layout (`model_type: "multi_modality"`) names its vision tower and VQ
//!   model (`siglip_large_patch16_384`, `VQ-16`) instead of describing them; their architectures are
//!   known here by name, as the official code knows them. Keys missing from `language_config` take
//!   the defaults of transformers' `LlamaConfig` (the Janus-Pro-7B file omits the hidden size, heads,
//!   intermediate size, eps and RoPE theta).
//! * The Hugging Face transformers layout (`model_type: "janus"`) describes every part in
//!   `text_config`, `vision_config` and `vq_config`.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Which checkpoint layout a model folder uses (decides weight names and processor rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The original DeepSeek layout (`deepseek-ai/Janus-1.3B`, `Janus-Pro-1B`, `Janus-Pro-7B`).
    Original,
    /// The Hugging Face transformers layout (`deepseek-community/Janus-Pro-*`).
    HuggingFace,
}

/// The LLaMA-style language model.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Number of text tokens (rows of `embed_tokens` and `lm_head`).
    pub vocab_size: usize,
    /// Model width D.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (equal to the query heads for multi-head attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Largest position the configuration admits.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the input embedding table when the checkpoint has no `lm_head`.
    pub tie_word_embeddings: bool,
}

/// The SigLIP vision encoder used for understanding.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Width of the ViT.
    pub hidden_size: usize,
    /// Number of transformer blocks that are built and run.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Side of one square patch in pixels.
    pub patch_size: usize,
    /// Side of the square input image in pixels.
    pub image_size: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Whether the attention projections have biases.
    pub attention_bias: bool,
}

impl VisionConfig {
    /// Patches (and so image tokens) per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
}

/// A two-or-more layer MLP (`Linear → GELU → Linear …`) mapping `input_dim` to `output_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpConfig {
    /// Input width.
    pub input_dim: usize,
    /// Output (and hidden) width.
    pub output_dim: usize,
    /// Number of linear layers.
    pub depth: usize,
}

/// The image-token generation head: `Linear(D, H) → GELU → Linear(H, codebook)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenHeadConfig {
    /// Input width (the LLM width).
    pub input_dim: usize,
    /// Hidden width.
    pub hidden_dim: usize,
    /// Output width: the number of image token ids.
    pub num_tokens: usize,
}

/// The VQ tokenizer (LlamaGen VQ-16 family).
#[derive(Debug, Clone, PartialEq)]
pub struct VqConfig {
    /// Number of codes.
    pub codebook_size: usize,
    /// Width of one code.
    pub codebook_dim: usize,
    /// Channels of the latent between encoder/decoder and the quantizer convs.
    pub latent_channels: usize,
    /// Channels of the first/last conv stage.
    pub base_channels: usize,
    /// Channel multiplier per resolution level, from full resolution down.
    pub channel_multiplier: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Whether the encoder's last conv doubles the latent channels.
    pub double_latent: bool,
    /// Token grid side for generated images.
    pub grid: usize,
}

impl VqConfig {
    /// Spatial reduction from pixels to tokens.
    pub fn downsample(&self) -> usize {
        1 << (self.channel_multiplier.len().saturating_sub(1))
    }
    /// Side of a generated image in pixels.
    pub fn image_size(&self) -> usize {
        self.grid * self.downsample()
    }
    /// Image tokens per generated image.
    pub fn num_tokens(&self) -> usize {
        self.grid * self.grid
    }
}

/// The whole model, as one typed configuration whatever the file layout.
#[derive(Debug, Clone, PartialEq)]
pub struct JanusConfig {
    /// The layout of the folder this came from.
    pub layout: Layout,
    /// The language model.
    pub text: TextConfig,
    /// The understanding vision encoder.
    pub vision: VisionConfig,
    /// The understanding aligner (vision width → LLM width).
    pub aligner: MlpConfig,
    /// The VQ tokenizer.
    pub vq: VqConfig,
    /// The generation aligner (code width → LLM width).
    pub gen_aligner: MlpConfig,
    /// The generation head.
    pub gen_head: GenHeadConfig,
    /// Rows of the generation embedding table (image token ids).
    pub gen_embed_tokens: usize,
    /// Width of the generation embedding table.
    pub gen_embed_dim: usize,
    /// Id of `<image_placeholder>` stated by the config, when it states one.
    pub image_token_id: Option<u32>,
}

// ---------------------------------------------------------------------------------------------
// JSON access helpers that name the file and key in their errors.

pub(crate) struct Obj<'a> {
    pub(crate) file: &'a Path,
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    pub(crate) fn root(file: &'a Path, value: &'a Value) -> Result<Self> {
        match value {
            Value::Object(map) => Ok(Obj {
                file,
                path: String::new(),
                map,
            }),
            _ => Err(Error::config(
                file,
                "expected a JSON object at the top level",
            )),
        }
    }

    pub(crate) fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(crate) fn err(&self, key: &str, msg: &str) -> Error {
        Error::config(self.file, format!("key `{}`: {msg}", self.key_path(key)))
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    pub(crate) fn obj(&self, key: &str) -> Result<Obj<'a>> {
        self.opt_obj(key)?
            .ok_or_else(|| self.err(key, "missing (expected an object)"))
    }

    pub(crate) fn opt_obj(&self, key: &str) -> Result<Option<Obj<'a>>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Obj {
                file: self.file,
                path: self.key_path(key),
                map,
            })),
            Some(_) => Err(self.err(key, "expected an object")),
        }
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, "expected a non-negative integer")),
        }
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(key, "missing (expected an integer)"))
    }

    pub(crate) fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.err(key, "expected an integer")),
        }
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(key, "expected a finite number")),
        }
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.err(key, "expected true or false")),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(self.err(key, "expected a string")),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<&'a str> {
        self.opt_str(key)?
            .ok_or_else(|| self.err(key, "missing (expected a string)"))
    }

    pub(crate) fn opt_usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| self.err(key, "expected a list of non-negative integers")),
            Some(_) => Err(self.err(key, "expected a list")),
        }
    }

    /// A list of three finite numbers.
    pub(crate) fn opt_triple(&self, key: &str) -> Result<Option<[f64; 3]>> {
        let Some(v) = self.map.get(key).filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let bad = || self.err(key, "expected a list of 3 numbers");
        let list = v.as_array().ok_or_else(bad)?;
        if list.len() != 3 {
            return Err(bad());
        }
        let mut out = [0f64; 3];
        for (o, x) in out.iter_mut().zip(list) {
            *o = x.as_f64().filter(|f| f.is_finite()).ok_or_else(bad)?;
        }
        Ok(Some(out))
    }

    /// transformers' `size`: an integer, or `{"height": S, "width": S}`.
    pub(crate) fn opt_square_size(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.map.get(key).filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        if v.is_number() {
            return self.opt_usize(key);
        }
        let size = self.obj(key)?;
        let (h, w) = (size.opt_usize("height")?, size.opt_usize("width")?);
        match (h, w) {
            (Some(h), Some(w)) if h == w => Ok(Some(h)),
            (Some(h), Some(w)) => Err(Error::Unsupported(format!(
                "{}: {} is {h}x{w}; the Janus image processor needs a square size",
                self.file.display(),
                self.key_path(key)
            ))),
            _ => Err(self.err(
                key,
                "expected an integer or {\"height\": S, \"width\": S} (the Janus image processor needs both)",
            )),
        }
    }

    /// A positive size: zero is as wrong as a missing key.
    fn positive(&self, key: &str, value: usize) -> Result<usize> {
        if value == 0 {
            Err(self.err(key, "must be positive"))
        } else {
            Ok(value)
        }
    }
}

/// Reads and parses a JSON file, naming the file in any error.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not valid JSON: {e}")))
}

impl JanusConfig {
    /// Reads `config.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        if !file.is_file() {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                message: "no config.json: not a Janus model folder".into(),
            });
        }
        let value = read_json(&file)?;
        Self::from_json(&file, &value)
    }

    /// Parses a `config.json` value (`file` names it in errors).
    pub fn from_json(file: &Path, value: &Value) -> Result<Self> {
        let root = Obj::root(file, value)?;
        let model_type = root.opt_str("model_type")?;
        match model_type {
            Some("multi_modality") => parse_original(&root),
            Some("janus") => parse_hf(&root),
            Some(other) => Err(Error::config(
                file,
                format!(
                    "key `model_type`: `{other}` is not a Janus model (expected `multi_modality` or `janus`)"
                ),
            )),
            None if root.has("language_config") => parse_original(&root),
            None if root.has("text_config") && root.has("vq_config") => parse_hf(&root),
            None => Err(Error::config(file, "key `model_type`: missing")),
        }
    }
}

/// `language_config` / `text_config`: a transformers `LlamaConfig`, with its defaults for missing keys.
fn parse_llama(obj: &Obj<'_>, tie_default: bool) -> Result<TextConfig> {
    if let Some(act) = obj.opt_str("hidden_act")?
        && act != "silu"
    {
        return Err(obj.err(
            "hidden_act",
            &format!("`{act}` is not supported (only silu)"),
        ));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if obj.opt_bool(key)? == Some(true) {
            return Err(obj.err(key, "biases in the language model are not supported"));
        }
    }
    let hidden_size = obj.positive("hidden_size", obj.usize_or("hidden_size", 4096)?)?;
    let heads = obj.positive(
        "num_attention_heads",
        obj.usize_or("num_attention_heads", 32)?,
    )?;
    let kv_heads = obj.positive(
        "num_key_value_heads",
        obj.usize_or("num_key_value_heads", heads)?,
    )?;
    if heads % kv_heads != 0 {
        return Err(obj.err(
            "num_key_value_heads",
            &format!("{kv_heads} does not divide the {heads} attention heads"),
        ));
    }
    let head_dim = match obj.opt_usize("head_dim")? {
        Some(h) => obj.positive("head_dim", h)?,
        None => {
            if hidden_size % heads != 0 {
                return Err(obj.err(
                    "num_attention_heads",
                    &format!("{heads} heads do not divide hidden_size {hidden_size}"),
                ));
            }
            hidden_size / heads
        }
    };
    if head_dim % 2 != 0 {
        return Err(obj.err("head_dim", "must be even for rotary embeddings"));
    }
    // RoPE: transformers 4.x writes `rope_theta` (+ `rope_scaling`); 5.x writes `rope_parameters`.
    let mut rope_theta = obj.f64_or("rope_theta", 10000.0)?;
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(rope) = obj.opt_obj(key)? {
            if let Some(kind) = rope.opt_str("rope_type")?.or(rope.opt_str("type")?)
                && kind != "default"
            {
                return Err(rope.err(
                    "rope_type",
                    &format!("`{kind}` RoPE scaling is not supported"),
                ));
            }
            if let Some(theta) = rope.opt_f64("rope_theta")? {
                rope_theta = theta;
            }
        }
    }
    if rope_theta <= 0.0 {
        return Err(obj.err("rope_theta", "must be positive"));
    }
    let rms_norm_eps = obj.f64_or("rms_norm_eps", 1e-6)?;
    if rms_norm_eps < 0.0 {
        return Err(obj.err("rms_norm_eps", "must not be negative"));
    }
    Ok(TextConfig {
        vocab_size: obj.positive("vocab_size", obj.usize_or("vocab_size", 32000)?)?,
        hidden_size,
        intermediate_size: obj.positive(
            "intermediate_size",
            obj.usize_or("intermediate_size", 11008)?,
        )?,
        num_hidden_layers: obj
            .positive("num_hidden_layers", obj.usize_or("num_hidden_layers", 32)?)?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        max_position_embeddings: obj.positive(
            "max_position_embeddings",
            obj.usize_or("max_position_embeddings", 2048)?,
        )?,
        tie_word_embeddings: obj.opt_bool("tie_word_embeddings")?.unwrap_or(tie_default),
    })
}

/// A known SigLIP architecture of the official code, by `model_name`.
struct SiglipArch {
    width: usize,
    layers: usize,
    heads: usize,
    patch: usize,
    mlp_ratio: f64,
}

fn siglip_arch(name: &str) -> Option<SiglipArch> {
    match name {
        "siglip_large_patch16_384" => Some(SiglipArch {
            width: 1024,
            layers: 24,
            heads: 16,
            patch: 16,
            mlp_ratio: 4.0,
        }),
        "siglip_so400m_patch14_384" | "siglip_so400m_patch14_224" => Some(SiglipArch {
            width: 1152,
            layers: 27,
            heads: 16,
            patch: 14,
            mlp_ratio: 3.7362,
        }),
        _ => None,
    }
}

/// The official `MlpProjector` params block.
fn parse_projector(obj: &Obj<'_>) -> Result<MlpConfig> {
    let params = obj.obj("params")?;
    let kind = params.opt_str("projector_type")?.unwrap_or("mlp_gelu");
    let depth = match kind {
        "mlp_gelu" => params.positive("depth", params.usize_or("depth", 1)?)?,
        "linear" => 1,
        other => {
            return Err(params.err(
                "projector_type",
                &format!("`{other}` is not supported (mlp_gelu or linear)"),
            ));
        }
    };
    Ok(MlpConfig {
        input_dim: params.positive("input_dim", params.usize("input_dim")?)?,
        output_dim: params.positive("n_embed", params.usize("n_embed")?)?,
        depth,
    })
}

fn parse_original(root: &Obj<'_>) -> Result<JanusConfig> {
    let text = parse_llama(&root.obj("language_config")?, false)?;

    let vision_obj = root.obj("vision_config")?;
    let vparams = vision_obj.obj("params")?;
    let name = vparams.str("model_name")?;
    let arch = siglip_arch(name)
        .ok_or_else(|| vparams.err("model_name", &format!("unknown vision tower `{name}`")))?;
    let image_size = vparams.positive("image_size", vparams.usize_or("image_size", 336)?)?;
    // The official tower keeps blocks up to `select_layer` (-1: all of them).
    let select_layer = vparams.opt_i64("select_layer")?.unwrap_or(-2);
    let layers_i = arch.layers as i64;
    let layers = if select_layer <= 0 {
        layers_i.min(layers_i + select_layer + 1)
    } else {
        layers_i.min(select_layer)
    };
    if layers <= 0 {
        return Err(vparams.err("select_layer", "selects no transformer block"));
    }
    if image_size % arch.patch != 0 {
        return Err(vparams.err(
            "image_size",
            &format!(
                "{image_size} is not a multiple of the patch size {}",
                arch.patch
            ),
        ));
    }
    let vision = VisionConfig {
        hidden_size: arch.width,
        num_hidden_layers: layers as usize,
        num_attention_heads: arch.heads,
        intermediate_size: (arch.width as f64 * arch.mlp_ratio) as usize,
        patch_size: arch.patch,
        image_size,
        num_channels: 3,
        layer_norm_eps: 1e-6,
        attention_bias: true,
    };

    let aligner = parse_projector(&root.obj("aligner_config")?)?;
    let gen_aligner = parse_projector(&root.obj("gen_aligner_config")?)?;

    let gen_vision = root.obj("gen_vision_config")?;
    let cls = gen_vision.str("cls")?;
    if cls != "VQ-16" {
        return Err(gen_vision.err("cls", &format!("unknown VQ model `{cls}` (expected VQ-16)")));
    }
    let gv_params = gen_vision.opt_obj("params")?;
    let (gen_embed_tokens, gen_embed_dim) = match &gv_params {
        Some(p) => (
            p.positive("image_token_size", p.usize_or("image_token_size", 16384)?)?,
            p.positive("n_embed", p.usize_or("n_embed", 8)?)?,
        ),
        None => (16384, 8),
    };
    // `VQ-16` is built from the official ModelArgs defaults whatever the params say.
    let vq = VqConfig {
        codebook_size: 16384,
        codebook_dim: 8,
        latent_channels: 256,
        base_channels: 128,
        channel_multiplier: vec![1, 1, 2, 2, 4],
        num_res_blocks: 2,
        in_channels: 3,
        out_channels: 3,
        double_latent: false,
        grid: vision.image_size / 16,
    };

    let head = root.obj("gen_head_config")?;
    let hp = head.obj("params")?;
    let gen_head = GenHeadConfig {
        input_dim: hp.positive("n_embed", hp.usize("n_embed")?)?,
        hidden_dim: hp.positive("image_token_embed", hp.usize("image_token_embed")?)?,
        num_tokens: hp.positive("image_token_size", hp.usize("image_token_size")?)?,
    };

    let config = JanusConfig {
        layout: Layout::Original,
        text,
        vision,
        aligner,
        vq,
        gen_aligner,
        gen_head,
        gen_embed_tokens,
        gen_embed_dim,
        image_token_id: None,
    };
    config.check(root)?;
    Ok(config)
}

fn parse_hf(root: &Obj<'_>) -> Result<JanusConfig> {
    // JanusConfig's own `tie_word_embeddings` decides whether transformers ties lm_head.
    let tie = root.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    let text_obj = root.obj("text_config")?;
    let mut text = parse_llama(&text_obj, tie)?;
    text.tie_word_embeddings = tie;

    let v = root.obj("vision_config")?;
    let hidden = v.positive("hidden_size", v.usize_or("hidden_size", 1024)?)?;
    let patch = v.positive("patch_size", v.usize_or("patch_size", 16)?)?;
    let image_size = v.positive("image_size", v.usize_or("image_size", 384)?)?;
    if image_size % patch != 0 {
        return Err(v.err(
            "image_size",
            &format!("{image_size} is not a multiple of the patch size {patch}"),
        ));
    }
    if v.opt_bool("use_qk_norm")? == Some(true) {
        return Err(v.err("use_qk_norm", "query/key norms are not supported"));
    }
    if let Some(act) = v.opt_str("hidden_act")?
        && act != "gelu"
    {
        return Err(v.err(
            "hidden_act",
            &format!("`{act}` is not supported (only gelu)"),
        ));
    }
    let mlp_ratio = v.f64_or("mlp_ratio", 4.0)?;
    let projection_dim = v.positive("projection_dim", v.usize_or("projection_dim", 2048)?)?;
    let vision = VisionConfig {
        hidden_size: hidden,
        num_hidden_layers: v.positive("num_hidden_layers", v.usize_or("num_hidden_layers", 24)?)?,
        num_attention_heads: v.positive(
            "num_attention_heads",
            v.usize_or("num_attention_heads", 16)?,
        )?,
        intermediate_size: (hidden as f64 * mlp_ratio) as usize,
        patch_size: patch,
        image_size,
        num_channels: v.positive("num_channels", v.usize_or("num_channels", 3)?)?,
        layer_norm_eps: v.f64_or("layer_norm_eps", 1e-6)?,
        attention_bias: v.opt_bool("attention_bias")?.unwrap_or(true),
    };
    let aligner = MlpConfig {
        input_dim: hidden,
        output_dim: projection_dim,
        depth: v.positive("depth", v.usize_or("depth", 2)?)?,
    };

    let q = root.obj("vq_config")?;
    let embed_dim = q.positive("embed_dim", q.usize_or("embed_dim", 8)?)?;
    let num_embeddings = q.positive("num_embeddings", q.usize_or("num_embeddings", 16384)?)?;
    let channel_multiplier = q
        .opt_usize_list("channel_multiplier")?
        .unwrap_or_else(|| vec![1, 1, 2, 2, 4]);
    if channel_multiplier.is_empty() || channel_multiplier.contains(&0) {
        return Err(q.err(
            "channel_multiplier",
            "must be a non-empty list of positive integers",
        ));
    }
    let vq = VqConfig {
        codebook_size: num_embeddings,
        codebook_dim: embed_dim,
        latent_channels: q.positive("latent_channels", q.usize_or("latent_channels", 256)?)?,
        base_channels: q.positive("base_channels", q.usize_or("base_channels", 128)?)?,
        channel_multiplier,
        num_res_blocks: q.positive("num_res_blocks", q.usize_or("num_res_blocks", 2)?)?,
        in_channels: q.positive("in_channels", q.usize_or("in_channels", 3)?)?,
        out_channels: q.positive("out_channels", q.usize_or("out_channels", 3)?)?,
        double_latent: q.opt_bool("double_latent")?.unwrap_or(false),
        // transformers sets num_patches = vision image_size // patch_size after loading.
        grid: image_size / patch,
    };
    let vq_projection = q.positive("projection_dim", q.usize_or("projection_dim", 2048)?)?;
    let gen_aligner = MlpConfig {
        input_dim: embed_dim,
        output_dim: vq_projection,
        depth: q.positive("num_hidden_layers", q.usize_or("num_hidden_layers", 2)?)?,
    };
    let gen_head = GenHeadConfig {
        input_dim: q.positive(
            "image_token_embed_dim",
            q.usize_or("image_token_embed_dim", 2048)?,
        )?,
        hidden_dim: vq_projection,
        num_tokens: num_embeddings,
    };
    let image_token_id = match root.opt_usize("image_token_id")? {
        Some(id) => Some(
            u32::try_from(id).map_err(|_| root.err("image_token_id", "does not fit in 32 bits"))?,
        ),
        None => None,
    };
    let config = JanusConfig {
        layout: Layout::HuggingFace,
        text,
        vision,
        aligner,
        vq,
        gen_aligner,
        gen_embed_tokens: num_embeddings,
        gen_embed_dim: embed_dim,
        gen_head,
        image_token_id,
    };
    config.check(root)?;
    Ok(config)
}

impl JanusConfig {
    /// Cross-part consistency: widths that must agree for the model to run at all.
    fn check(&self, root: &Obj<'_>) -> Result<()> {
        let d = self.text.hidden_size;
        let bad = |what: &str| Err(Error::config(root.file, what.to_string()));
        if self.aligner.input_dim != self.vision.hidden_size {
            return bad(&format!(
                "the aligner's input width {} differs from the vision width {}",
                self.aligner.input_dim, self.vision.hidden_size
            ));
        }
        if self.aligner.output_dim != d {
            return bad(&format!(
                "the aligner's output width {} differs from the language model width {d}",
                self.aligner.output_dim
            ));
        }
        if self.gen_aligner.output_dim != d {
            return bad(&format!(
                "the generation aligner's output width {} differs from the language model width {d}",
                self.gen_aligner.output_dim
            ));
        }
        if self.gen_aligner.input_dim != self.gen_embed_dim {
            return bad(&format!(
                "the generation aligner's input width {} differs from the generation embedding width {}",
                self.gen_aligner.input_dim, self.gen_embed_dim
            ));
        }
        if self.gen_head.input_dim != d {
            return bad(&format!(
                "the generation head's input width {} differs from the language model width {d}",
                self.gen_head.input_dim
            ));
        }
        if self.gen_head.num_tokens != self.gen_embed_tokens
            || self.gen_head.num_tokens != self.vq.codebook_size
        {
            return bad(&format!(
                "image token counts disagree: head {}, generation embedding {}, codebook {}",
                self.gen_head.num_tokens, self.gen_embed_tokens, self.vq.codebook_size
            ));
        }
        if !self
            .vision
            .hidden_size
            .is_multiple_of(self.vision.num_attention_heads)
        {
            return bad("the vision heads do not divide the vision width");
        }
        if !self.vq.base_channels.is_multiple_of(32) {
            return bad("the VQ base channels must be a multiple of 32 (GroupNorm with 32 groups)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn original_7b() -> Value {
        json!({
          "architectures": ["MultiModalityCausalLM"],
          "model_type": "multi_modality",
          "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                            "params": {"image_size": 384, "model_name": "siglip_large_patch16_384",
                                       "select_feature": "same", "select_layer": -1}},
          "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                             "params": {"depth": 2, "input_dim": 1024, "n_embed": 4096, "projector_type": "mlp_gelu"}},
          "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
                                "params": {"image_token_size": 16384, "n_embed": 8}},
          "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                                 "params": {"depth": 2, "input_dim": 8, "n_embed": 4096, "projector_type": "mlp_gelu"}},
          "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                              "params": {"image_token_embed": 4096, "image_token_size": 16384, "n_embed": 4096}},
          "language_config": {"max_position_embeddings": 16384, "model_type": "llama",
                              "num_hidden_layers": 30, "torch_dtype": "bfloat16", "vocab_size": 102400},
          "torch_dtype": "bfloat16"
        })
    }

    #[test]
    fn pro_7b_language_config_takes_llama_defaults() {
        let c = JanusConfig::from_json(Path::new("config.json"), &original_7b()).unwrap();
        assert_eq!(c.layout, Layout::Original);
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.intermediate_size, 11008);
        assert_eq!(c.text.num_attention_heads, 32);
        assert_eq!(c.text.num_key_value_heads, 32);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.num_hidden_layers, 30);
        assert_eq!(c.text.rms_norm_eps, 1e-6);
        assert_eq!(c.text.rope_theta, 10000.0);
        assert!(!c.text.tie_word_embeddings);
        assert_eq!(c.vision.num_hidden_layers, 24);
        assert_eq!(c.vision.intermediate_size, 4096);
        assert_eq!(c.vision.num_patches(), 576);
        assert_eq!(c.vq.num_tokens(), 576);
        assert_eq!(c.vq.image_size(), 384);
        assert_eq!(c.gen_head.num_tokens, 16384);
    }

    #[test]
    fn select_layer_limits_blocks() {
        let mut v = original_7b();
        v["vision_config"]["params"]["select_layer"] = json!(-2);
        let c = JanusConfig::from_json(Path::new("config.json"), &v).unwrap();
        assert_eq!(c.vision.num_hidden_layers, 23);
    }

    #[test]
    fn errors_name_file_and_key() {
        let mut v = original_7b();
        v["language_config"]["hidden_size"] = json!("wide");
        let e = JanusConfig::from_json(Path::new("/m/config.json"), &v).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/m/config.json"), "{msg}");
        assert!(msg.contains("language_config.hidden_size"), "{msg}");

        let mut v = original_7b();
        v["vision_config"]["params"]["model_name"] = json!("vit_huge");
        let msg = JanusConfig::from_json(Path::new("c.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("vision_config.params.model_name"), "{msg}");

        let mut v = original_7b();
        v["aligner_config"]["params"]["n_embed"] = json!(2048);
        assert!(matches!(
            JanusConfig::from_json(Path::new("c.json"), &v),
            Err(Error::Config { .. })
        ));

        let msg = JanusConfig::from_json(Path::new("c.json"), &json!({"model_type": "bert"}))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("model_type"), "{msg}");
        assert!(JanusConfig::from_json(Path::new("c.json"), &json!([1, 2])).is_err());
    }

    #[test]
    fn unsupported_rope_scaling_is_refused() {
        let mut v = original_7b();
        v["language_config"]["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0});
        let msg = JanusConfig::from_json(Path::new("c.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("rope_scaling.rope_type"), "{msg}");
    }

    #[test]
    fn hf_layout_defaults_and_rope_parameters() {
        let v = json!({
            "model_type": "janus",
            "image_token_id": 7,
            "tie_word_embeddings": false,
            "text_config": {"model_type": "llama", "vocab_size": 300, "hidden_size": 64,
                            "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}},
            "vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                              "image_size": 64, "patch_size": 16, "projection_dim": 64},
            "vq_config": {"embed_dim": 8, "num_embeddings": 64, "base_channels": 32,
                          "channel_multiplier": [1, 2], "latent_channels": 16, "num_res_blocks": 1,
                          "projection_dim": 64, "image_token_embed_dim": 64}
        });
        let c = JanusConfig::from_json(Path::new("config.json"), &v).unwrap();
        assert_eq!(c.layout, Layout::HuggingFace);
        assert_eq!(c.text.rope_theta, 5000.0);
        assert_eq!(c.text.num_key_value_heads, 2);
        assert_eq!(c.text.head_dim, 16);
        assert_eq!(c.vision.intermediate_size, 128);
        assert_eq!(c.vq.grid, 4);
        assert_eq!(c.vq.downsample(), 2);
        assert_eq!(c.image_token_id, Some(7));
        assert_eq!(c.gen_head.num_tokens, 64);
        assert!(!c.text.tie_word_embeddings);
    }
}
