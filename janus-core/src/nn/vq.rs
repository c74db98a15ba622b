//! The VQ-16 image tokenizer (LlamaGen): encoder, quantizer, decoder (weights).

use burn::tensor::Tensor;

use crate::config::VqConfig;
use crate::load::Weights;

/// A 2-D convolution's parameters.
#[derive(Debug, Clone)]
pub struct Conv {
    /// `[out, in, k, k]`.
    pub weight: Tensor<4>,
    /// `[out]`.
    pub bias: Tensor<1>,
}

impl Conv {
    fn load(w: &mut Weights<'_>, prefix: &str, c_in: usize, c_out: usize, k: usize) -> Self {
        Conv {
            weight: w.get(&format!("{prefix}.weight"), [c_out, c_in, k, k]),
            bias: w.get(&format!("{prefix}.bias"), [c_out]),
        }
    }
}

/// GroupNorm (32 groups, affine) parameters.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// Scale per channel.
    pub weight: Tensor<1>,
    /// Shift per channel.
    pub bias: Tensor<1>,
}

impl GroupNorm {
    fn load(w: &mut Weights<'_>, prefix: &str, c: usize) -> Self {
        GroupNorm {
            weight: w.get(&format!("{prefix}.weight"), [c]),
            bias: w.get(&format!("{prefix}.bias"), [c]),
        }
    }
}

/// `shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x))))))`.
#[derive(Debug, Clone)]
pub struct ResBlock {
    /// First norm.
    pub norm1: GroupNorm,
    /// First 3×3 conv.
    pub conv1: Conv,
    /// Second norm.
    pub norm2: GroupNorm,
    /// Second 3×3 conv.
    pub conv2: Conv,
    /// 1×1 conv on the residual when the channel count changes.
    pub nin_shortcut: Option<Conv>,
}

impl ResBlock {
    fn load(w: &mut Weights<'_>, p: &str, c_in: usize, c_out: usize) -> Self {
        ResBlock {
            norm1: GroupNorm::load(w, &format!("{p}.norm1"), c_in),
            conv1: Conv::load(w, &format!("{p}.conv1"), c_in, c_out, 3),
            norm2: GroupNorm::load(w, &format!("{p}.norm2"), c_out),
            conv2: Conv::load(w, &format!("{p}.conv2"), c_out, c_out, 3),
            nin_shortcut: (c_in != c_out)
                .then(|| Conv::load(w, &format!("{p}.nin_shortcut"), c_in, c_out, 1)),
        }
    }
}

/// Single-head spatial self-attention with 1×1 projections.
#[derive(Debug, Clone)]
pub struct AttnBlock {
    /// Input norm.
    pub norm: GroupNorm,
    /// Query projection.
    pub q: Conv,
    /// Key projection.
    pub k: Conv,
    /// Value projection.
    pub v: Conv,
    /// Output projection.
    pub proj_out: Conv,
}

impl AttnBlock {
    fn load(w: &mut Weights<'_>, p: &str, c: usize) -> Self {
        AttnBlock {
            norm: GroupNorm::load(w, &format!("{p}.norm"), c),
            q: Conv::load(w, &format!("{p}.q"), c, c, 1),
            k: Conv::load(w, &format!("{p}.k"), c, c, 1),
            v: Conv::load(w, &format!("{p}.v"), c, c, 1),
            proj_out: Conv::load(w, &format!("{p}.proj_out"), c, c, 1),
        }
    }
}

/// One resolution level: ResNet blocks (each followed by attention at the lowest resolution) and
/// an optional resampling conv.
#[derive(Debug, Clone)]
pub struct Level {
    /// ResNet blocks.
    pub res: Vec<ResBlock>,
    /// Attention after each block (lowest resolution only).
    pub attn: Vec<AttnBlock>,
    /// Down- (encoder) or up-sampling (decoder) conv.
    pub resample: Option<Conv>,
}

/// The middle: ResNet, attention, ResNet.
#[derive(Debug, Clone)]
pub struct Mid {
    /// First block.
    pub res1: ResBlock,
    /// Attention.
    pub attn: AttnBlock,
    /// Second block.
    pub res2: ResBlock,
}

impl Mid {
    fn load(w: &mut Weights<'_>, p: &str, c: usize) -> Self {
        Mid {
            res1: ResBlock::load(w, &format!("{p}.mid.0"), c, c),
            attn: AttnBlock::load(w, &format!("{p}.mid.1"), c),
            res2: ResBlock::load(w, &format!("{p}.mid.2"), c, c),
        }
    }
}

/// Encoder or decoder trunk.
#[derive(Debug, Clone)]
pub struct Trunk {
    /// First conv.
    pub conv_in: Conv,
    /// Resolution levels in execution order.
    pub levels: Vec<Level>,
    /// Middle blocks.
    pub mid: Mid,
    /// Output norm.
    pub norm_out: GroupNorm,
    /// Last conv.
    pub conv_out: Conv,
}

/// The VQ model.
#[derive(Debug, Clone)]
pub struct VqModel {
    /// Image → latent.
    pub encoder: Trunk,
    /// Latent → code space (1×1).
    pub quant_conv: Conv,
    /// Codebook `[codes, dim]` (l2-normalised when used).
    pub codebook: Tensor<2>,
    /// Code space → latent (1×1).
    pub post_quant_conv: Conv,
    /// Latent → image.
    pub decoder: Trunk,
    /// The configuration.
    pub config: VqConfig,
}

impl VqModel {
    pub(crate) fn load(w: &mut Weights<'_>, c: &VqConfig) -> Self {
        let p = "gen_vision_model";
        let ch = c.base_channels;
        let mult = &c.channel_multiplier;
        let n = mult.len();

        // Encoder: full resolution first.
        let e = format!("{p}.encoder");
        let mut levels = Vec::with_capacity(n);
        let mut block_in = ch;
        for (i, &m) in mult.iter().enumerate() {
            let block_out = ch * m;
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for j in 0..c.num_res_blocks {
                res.push(ResBlock::load(
                    w,
                    &format!("{e}.conv_blocks.{i}.res.{j}"),
                    block_in,
                    block_out,
                ));
                block_in = block_out;
                if i == n - 1 {
                    attn.push(AttnBlock::load(
                        w,
                        &format!("{e}.conv_blocks.{i}.attn.{j}"),
                        block_in,
                    ));
                }
            }
            let resample = (i != n - 1).then(|| {
                Conv::load(
                    w,
                    &format!("{e}.conv_blocks.{i}.downsample.conv"),
                    block_in,
                    block_in,
                    3,
                )
            });
            levels.push(Level {
                res,
                attn,
                resample,
            });
        }
        let latent_out = if c.double_latent {
            2 * c.latent_channels
        } else {
            c.latent_channels
        };
        let encoder = Trunk {
            conv_in: Conv::load(w, &format!("{e}.conv_in"), c.in_channels, ch, 3),
            levels,
            mid: Mid::load(w, &e, block_in),
            norm_out: GroupNorm::load(w, &format!("{e}.norm_out"), block_in),
            conv_out: Conv::load(w, &format!("{e}.conv_out"), block_in, latent_out, 3),
        };

        // Decoder: lowest resolution first (`conv_blocks.k` is level n-1-k).
        let d = format!("{p}.decoder");
        let mut block_in = ch * mult[n - 1];
        let conv_in = Conv::load(w, &format!("{d}.conv_in"), c.latent_channels, block_in, 3);
        let mid = Mid::load(w, &d, block_in);
        let mut levels = Vec::with_capacity(n);
        for k in 0..n {
            let level = n - 1 - k;
            let block_out = ch * mult[level];
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for j in 0..=c.num_res_blocks {
                res.push(ResBlock::load(
                    w,
                    &format!("{d}.conv_blocks.{k}.res.{j}"),
                    block_in,
                    block_out,
                ));
                block_in = block_out;
                if level == n - 1 {
                    attn.push(AttnBlock::load(
                        w,
                        &format!("{d}.conv_blocks.{k}.attn.{j}"),
                        block_in,
                    ));
                }
            }
            let resample = (level != 0).then(|| {
                Conv::load(
                    w,
                    &format!("{d}.conv_blocks.{k}.upsample.conv"),
                    block_in,
                    block_in,
                    3,
                )
            });
            levels.push(Level {
                res,
                attn,
                resample,
            });
        }
        let decoder = Trunk {
            conv_in,
            levels,
            mid,
            norm_out: GroupNorm::load(w, &format!("{d}.norm_out"), block_in),
            conv_out: Conv::load(w, &format!("{d}.conv_out"), block_in, c.out_channels, 3),
        };

        VqModel {
            encoder,
            quant_conv: Conv::load(
                w,
                &format!("{p}.quant_conv"),
                c.latent_channels,
                c.codebook_dim,
                1,
            ),
            codebook: w.get(
                &format!("{p}.quantize.embedding.weight"),
                [c.codebook_size, c.codebook_dim],
            ),
            post_quant_conv: Conv::load(
                w,
                &format!("{p}.post_quant_conv"),
                c.codebook_dim,
                c.latent_channels,
                1,
            ),
            decoder,
            config: c.clone(),
        }
    }
}
