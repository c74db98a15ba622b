//! The SigLIP ViT of the understanding path (weights; see `JANUS-SPEC` §6.2 for its computation).

use burn::tensor::Tensor;

use crate::config::VisionConfig;
use crate::load::Weights;

use super::{LayerNorm, Linear};

/// One pre-norm transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Norm before attention.
    pub norm1: LayerNorm,
    /// Fused query/key/value projection (`[q; k; v]` rows).
    pub qkv: Linear,
    /// Attention output projection.
    pub proj: Linear,
    /// Norm before the MLP.
    pub norm2: LayerNorm,
    /// MLP up projection.
    pub fc1: Linear,
    /// MLP down projection.
    pub fc2: Linear,
}

/// The vision tower: patch embedding, learned positions, blocks, final norm.
#[derive(Debug, Clone)]
pub struct SigLip {
    /// Patch embedding conv weight `[width, channels, patch, patch]`.
    pub patch_weight: Tensor<4>,
    /// Patch embedding bias.
    pub patch_bias: Tensor<1>,
    /// Learned absolute positions `[1, patches, width]`.
    pub pos_embed: Tensor<3>,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm (its output is the feature map).
    pub norm: LayerNorm,
    /// The configuration.
    pub config: VisionConfig,
}

impl SigLip {
    pub(crate) fn load(w: &mut Weights<'_>, c: &VisionConfig) -> Self {
        let p = "vision_model.vision_tower";
        let (width, eps) = (c.hidden_size, c.layer_norm_eps);
        let blocks = (0..c.num_hidden_layers)
            .map(|i| {
                let b = format!("{p}.blocks.{i}");
                Block {
                    norm1: LayerNorm::load(w, &format!("{b}.norm1"), width, eps),
                    qkv: Linear::load(
                        w,
                        &format!("{b}.attn.qkv"),
                        width,
                        3 * width,
                        c.attention_bias,
                    ),
                    proj: Linear::load(w, &format!("{b}.attn.proj"), width, width, true),
                    norm2: LayerNorm::load(w, &format!("{b}.norm2"), width, eps),
                    fc1: Linear::load(w, &format!("{b}.mlp.fc1"), width, c.intermediate_size, true),
                    fc2: Linear::load(w, &format!("{b}.mlp.fc2"), c.intermediate_size, width, true),
                }
            })
            .collect();
        SigLip {
            patch_weight: w.get(
                &format!("{p}.patch_embed.proj.weight"),
                [width, c.num_channels, c.patch_size, c.patch_size],
            ),
            patch_bias: w.get(&format!("{p}.patch_embed.proj.bias"), [width]),
            pos_embed: w.get(&format!("{p}.pos_embed"), [1, c.num_patches(), width]),
            blocks,
            norm: LayerNorm::load(w, &format!("{p}.norm"), width, eps),
            config: c.clone(),
        }
    }
}
