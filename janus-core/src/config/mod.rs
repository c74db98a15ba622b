//! Model configuration: both `config.json` layouts parsed into one typed [`JanusConfig`].
//!
//! * The original DeepSeek layout (`model_type: "multi_modality"`) names its vision tower and VQ
//!   model (`siglip_large_patch16_384`, `VQ-16`) instead of describing them; their architectures are
//!   known here by name, as the official code knows them. Keys missing from `language_config` take
//!   the defaults of transformers' `LlamaConfig` (the Janus-Pro-7B file omits the hidden size, heads,
//!   intermediate size, eps and RoPE theta).
//! * The Hugging Face transformers layout (`model_type: "janus"`) describes every part in
//!   `text_config`, `vision_config` and `vq_config`.
//!
//! One room each: `original` and `hf` (the two layouts), `llama` (the language model's
//! `LlamaConfig`, which both embed), `json` (access that names the file and key in errors); this
//! module holds the typed result and the checks across parts.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

mod hf;
mod json;
mod llama;
mod original;

pub(crate) use json::{MAX_JSON_BYTES, Obj, read_json};

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

/// The largest image side (vision input, generated image) a configuration may declare.
pub const MAX_IMAGE_SIDE: usize = 8192;

/// The most resolution levels of the VQ model (each halves the image side).
pub const MAX_VQ_LEVELS: usize = 8;

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

impl JanusConfig {
    /// Reads `config.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        if !file.exists() {
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
            Some("multi_modality") => original::parse(&root),
            Some("janus") => hf::parse(&root),
            Some(other) => Err(Error::config(
                file,
                format!(
                    "key `model_type`: `{other}` is not a Janus model (expected `multi_modality` or `janus`)"
                ),
            )),
            None if root.has("language_config") => original::parse(&root),
            None if root.has("text_config") && root.has("vq_config") => hf::parse(&root),
            None => Err(Error::config(file, "key `model_type`: missing")),
        }
    }
}

impl JanusConfig {
    /// Cross-part consistency: widths that must agree for the model to run at all.
    pub(crate) fn check(&self, root: &Obj<'_>) -> Result<()> {
        let d = self.text.hidden_size;
        let bad = |what: &str| Err(Error::config(root.file, what.to_string()));
        // Image sides and resolution levels that no model has: refused before any size derived
        // from them (patch counts, the VQ's downsampling) can overflow.
        if self.vision.image_size > MAX_IMAGE_SIDE {
            return bad(&format!(
                "the vision image size {} is larger than {MAX_IMAGE_SIDE}",
                self.vision.image_size
            ));
        }
        if self.vq.channel_multiplier.len() > MAX_VQ_LEVELS {
            return bad(&format!(
                "the VQ model has {} resolution levels, more than {MAX_VQ_LEVELS}",
                self.vq.channel_multiplier.len()
            ));
        }
        if self.vq.grid.saturating_mul(self.vq.downsample()) > MAX_IMAGE_SIDE {
            return bad(&format!(
                "the VQ model's images ({} tokens a side) are larger than {MAX_IMAGE_SIDE} pixels",
                self.vq.grid
            ));
        }
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
