//! The SigLIP ViT of the understanding path, as the official tower computes it: patch embedding,
//! learned absolute positions (no class token), pre-norm blocks with exact-erf GELU MLPs, and the
//! final LayerNorm, whose output is the feature map (the attention-pool head is not used).

use super::activation::gelu_erf;
use burn::tensor::{DType, Tensor, TensorData};

use crate::config::VisionConfig;
use crate::load::Weights;

use super::host_prompt::{HostBlock, Scratch, host_values};
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
    /// Patch embedding: the convolution with stride = kernel = patch size as a product over
    /// each patch's pixels (its weight `[width, channels, patch, patch]` read as `[width,
    /// channels·patch²]`), so that it takes the layers' product paths (bf16 compute included).
    pub patch: Linear,
    /// Learned absolute positions `[1, patches, width]`.
    pub pos_embed: Tensor<3>,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm (its output is the feature map).
    pub norm: LayerNorm,
    /// The configuration.
    pub config: VisionConfig,
}

impl Block {
    pub(crate) fn forward(&self, x: Tensor<3>, heads: usize) -> Tensor<3> {
        let [b, n, w] = x.dims();
        let hd = w / heads;
        let qkv = self
            .qkv
            .forward(self.norm1.forward(x.clone()))
            .reshape([b, n, 3, heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([b, heads, n, hd]);
        let scale = 1.0 / (hd as f64).sqrt();
        let bf16 = self.qkv.bf16_path();
        let o = super::attention::bidirectional(part(0), part(1), part(2), scale, bf16)
            .swap_dims(1, 2)
            .reshape([b, n, w]);
        let x = x + self.proj.forward(o);
        let h = self
            .fc2
            .forward(gelu_erf(self.fc1.forward(self.norm2.forward(x.clone()))));
        x + h
    }
}

impl SigLip {
    /// Features `[batch, patches, width]` of normalised images `[batch, channels, size, size]`.
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        let c = &self.config;
        let p = c.patch_size;
        let [b, ch, h, w] = pixels.dims();
        let (gh, gw) = (h / p, w / p);
        // Each patch's pixels in the weight's order (channel, row, column); pixels past the
        // last whole patch are not seen, as by the strided convolution.
        let patches = pixels
            .slice([0..b, 0..ch, 0..gh * p, 0..gw * p])
            .reshape([b, ch, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, gh * gw, ch * p * p]);
        let mut x = self.patch.forward(patches) + self.pos_embed.clone();
        if let Some(blocks) = self.host_blocks(&x) {
            x = Self::forward_host(&blocks, x, c.num_attention_heads);
        } else {
            for block in &self.blocks {
                x = block.forward(x, c.num_attention_heads);
            }
        }
        self.norm.forward(x)
    }

    /// The blocks' operands for the host pass ([`host_prompt`](super::host_prompt)): with bf16
    /// compute on the CPU (f32 activations, every product on the bf16 kernels).
    fn host_blocks(&self, x: &Tensor<3>) -> Option<Vec<HostBlock<'_>>> {
        if x.dtype() != DType::F32 || !crate::device::is_cpu(&x.device()) {
            return None;
        }
        self.blocks.iter().map(HostBlock::of).collect()
    }

    /// Every block over `x` (`[batch, patches, width]`) on host buffers, one image at a time.
    pub(crate) fn forward_host(blocks: &[HostBlock<'_>], x: Tensor<3>, heads: usize) -> Tensor<3> {
        let [b, n, w] = x.dims();
        let device = x.device();
        let mut values = host_values(&x);
        let mut scratch = Scratch::default();
        for image in values.chunks_exact_mut(n * w) {
            for block in blocks {
                block.forward(image, w, heads, &mut scratch);
            }
        }
        Tensor::from_data(TensorData::new(values, [b, n, w]), &device)
    }

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
            patch: Linear {
                weight: w.matrix(
                    &format!("{p}.patch_embed.proj.weight"),
                    &[width, c.num_channels, c.patch_size, c.patch_size],
                    false,
                ),
                bias: Some(w.param(&format!("{p}.patch_embed.proj.bias"), [width])),
                lora: None,
            },
            pos_embed: w.get(&format!("{p}.pos_embed"), [1, c.num_patches(), width]),
            blocks,
            norm: LayerNorm::load(w, &format!("{p}.norm"), width, eps),
            config: c.clone(),
        }
    }
}
