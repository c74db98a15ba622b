//! The Hugging Face transformers layout (`model_type: "janus"`): every part described in
//! `text_config`, `vision_config` and `vq_config`, with transformers' defaults.

use super::{GenHeadConfig, JanusConfig, Layout, MlpConfig, Obj, VisionConfig, VqConfig};
use crate::error::Result;

pub(super) fn parse(root: &Obj<'_>) -> Result<JanusConfig> {
    // JanusConfig's own `tie_word_embeddings` decides whether transformers ties lm_head.
    let tie = root.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    let text_obj = root.obj("text_config")?;
    let mut text = super::llama::parse(&text_obj, tie)?;
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
