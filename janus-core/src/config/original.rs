//! The original DeepSeek layout (`model_type: "multi_modality"`): the vision tower and the VQ
//! model are named, not described, and their architectures are known here by name as the
//! official code knows them.

use super::{GenHeadConfig, JanusConfig, Layout, MlpConfig, Obj, VisionConfig, VqConfig};
use crate::error::Result;

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

pub(super) fn parse(root: &Obj<'_>) -> Result<JanusConfig> {
    let text = super::llama::parse(&root.obj("language_config")?, false)?;

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
