//! The VQ-16 image tokenizer (LlamaGen) as the official code computes it: encoder, quantizer
//! (l2-normalised latents and codebook, nearest code by distance), decoder (ResNet blocks,
//! GroupNorm(32, eps 1e-6), swish, spatial attention, nearest ×2 upsampling + conv).

use burn::tensor::activation::softmax;
use burn::tensor::module::{conv2d, embedding};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::config::VqConfig;
use crate::load::Weights;

use super::host_prompt::host_values;
use super::kernels::Bf16Gemm;
#[cfg(feature = "flex")]
use super::kernels::KernelPath;
use super::kernels::conv::conv_same_bf16;
use super::kernels::group_norm::group_norm;
#[cfg(feature = "flex")]
use super::kernels::winograd::{self, ConvAlgo, conv3x3_same};
use super::weight::Matrix;

/// A convolution of one image's host values into another's.
type ImageConv<'a> = dyn Fn(&[f32], &mut [f32]) -> crate::Result<()> + 'a;

/// A 2-D convolution's parameters.
#[derive(Debug, Clone)]
pub struct Conv {
    /// `[out, in·k·k]`, held as the load options ask (widened for each call when compact).
    weight: Matrix,
    /// `[out, in, k, k]`.
    shape: [usize; 4],
    /// `[out]`.
    pub bias: Tensor<1>,
}

impl Conv {
    /// The weight `[out, in, k, k]` in the dtype of `like`.
    pub fn weight(&self, like: &Tensor<4>) -> Tensor<4> {
        self.weight
            .dense(like.dtype(), &like.device())
            .reshape(self.shape)
    }

    /// Convolution with stride 1 and "same" padding for odd kernels. On the CPU in f32: with
    /// bf16 compute, on the bf16 products
    /// ([`conv_same_bf16`](super::kernels::conv::conv_same_bf16)); else 3×3 kernels of enough
    /// channels by Winograd's F(4×4, 3×3) ([`conv3x3_same`], unless `JANUS_CONV=im2col`).
    // Without the CPU backend the inner test is alone and clippy would fold the two.
    #[allow(clippy::collapsible_if)]
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let k = self.shape[2];
        let p = k / 2;
        if x.dtype() == DType::F32 && crate::device::is_cpu(&x.device()) {
            if let Some((path, bits)) = self.weight.bf16_operands() {
                return self.forward_bf16(x, path, bits);
            }
            // The choice was validated when the model loaded.
            #[cfg(feature = "flex")]
            if k == 3
                && winograd::applies(self.shape[1], self.shape[0])
                && ConvAlgo::selected().is_ok_and(|a| a == ConvAlgo::Winograd)
            {
                return self.forward_winograd(x);
            }
        }
        let weight = self.weight(&x);
        conv2d(
            x,
            weight,
            Some(self.bias.clone()),
            ConvOptions::new([1, 1], [p, p], [1, 1], 1),
        )
    }

    /// [`forward`](Self::forward) on the bf16 products.
    fn forward_bf16(&self, x: Tensor<4>, path: Bf16Gemm, bits: &[u16]) -> Tensor<4> {
        let k = self.shape[2];
        self.each_image(x, |src, dims, bias, dst| {
            conv_same_bf16(path, src, dims, bits, k, bias, dst)
        })
    }

    /// [`forward`](Self::forward) by Winograd's F(4×4, 3×3).
    #[cfg(feature = "flex")]
    fn forward_winograd(&self, x: Tensor<4>) -> Tensor<4> {
        let w = self.weight.host_f32();
        // The path was validated when the model loaded.
        let path = KernelPath::selected().unwrap_or(KernelPath::Portable);
        self.each_image(x, |src, dims, bias, dst| {
            conv3x3_same(path, src, dims, &w, bias, dst)
        })
    }

    /// [`forward`](Self::forward) of host values `x` (`[b, c, h, w]`) into a buffer of `pool`.
    fn forward_host(&self, x: &[f32], [b, c, h, w]: [usize; 4], pool: &mut Pool) -> Vec<f32> {
        let k = self.shape[2];
        let out = self.shape[0];
        let bias = host_values(&self.bias);
        let mut y = pool.take(b * out * h * w);
        let each = |conv: &ImageConv<'_>, y: &mut [f32]| {
            for (src, dst) in x
                .chunks_exact(c * h * w)
                .zip(y.chunks_exact_mut(out * h * w))
            {
                conv(src, dst).expect("the weight's shape is the layer's");
            }
        };
        if let Some((path, bits)) = self.weight.bf16_operands() {
            each(
                &|src, dst| conv_same_bf16(path, src, (c, h, w), bits, k, &bias, dst),
                &mut y,
            );
            return y;
        }
        #[cfg(feature = "flex")]
        if k == 3
            && winograd::applies(c, out)
            && ConvAlgo::selected().is_ok_and(|a| a == ConvAlgo::Winograd)
        {
            let wf = self.weight.host_f32();
            // The path was validated when the model loaded.
            let path = KernelPath::selected().unwrap_or(KernelPath::Portable);
            each(
                &|src, dst| conv3x3_same(path, src, (c, h, w), &wf, &bias, dst),
                &mut y,
            );
            return y;
        }
        let device = self.bias.device();
        let t = Tensor::<4>::from_data(TensorData::new(x.to_vec(), [b, c, h, w]), &device);
        y.copy_from_slice(&host_values(&self.forward(t)));
        y
    }

    /// Runs a "same" convolution on the host image by image: `conv(x, [c, h, w], bias, y)`.
    fn each_image(
        &self,
        x: Tensor<4>,
        conv: impl Fn(&[f32], (usize, usize, usize), &[f32], &mut [f32]) -> crate::Result<()>,
    ) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let out = self.shape[0];
        let device = x.device();
        let xs: Vec<f32> = x
            .into_data()
            .try_into_vec()
            .expect("an f32 tensor reads back as f32");
        let bias = host_values(&self.bias);
        let mut y = vec![0.0f32; b * out * h * w];
        for (src, dst) in xs
            .chunks_exact(c * h * w)
            .zip(y.chunks_exact_mut(out * h * w))
        {
            conv(src, (c, h, w), &bias, dst).expect("the weight's shape is the layer's");
        }
        Tensor::from_data(TensorData::new(y, [b, out, h, w]), &device)
    }

    /// 3×3 convolution with stride 2 after padding one row/column at the bottom/right.
    fn forward_down(&self, x: Tensor<4>) -> Tensor<4> {
        let weight = self.weight(&x);
        conv2d(
            x,
            weight,
            Some(self.bias.clone()),
            ConvOptions::new_with_padding([2, 2], [(0, 1), (0, 1)], [1, 1], 1),
        )
    }

    fn load(w: &mut Weights<'_>, prefix: &str, c_in: usize, c_out: usize, k: usize) -> Self {
        let shape = [c_out, c_in, k, k];
        Conv {
            weight: w.matrix(&format!("{prefix}.weight"), &shape, false),
            shape,
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

/// `x·sigmoid(x)`.
fn swish(x: Tensor<4>) -> Tensor<4> {
    super::activation::silu_f32(x)
}

impl GroupNorm {
    const GROUPS: usize = 32;
    const EPS: f64 = 1e-6;

    /// Normalises each of 32 channel groups over channels and space (statistics in f32, in f64
    /// on the CPU).
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        if Self::on_cpu(&x) {
            return self.on_host(x, false);
        }
        let [b, c, h, w] = x.dims();
        let dtype = x.dtype();
        // Each statistic is a mean over rows of means over a row (equal lengths, so the same
        // value): one reduction over a whole group (589 824 values at 384² with 128 channels)
        // comes out wrong on wgpu (measured on Mesa's lavapipe from 2^18 values on).
        let g = x
            .cast(DType::F32)
            .reshape([b, Self::GROUPS, (c / Self::GROUPS) * h, w]);
        let mean = g.clone().mean_dim(3).mean_dim(2);
        let centered = g - mean;
        let var = centered.clone().square().mean_dim(3).mean_dim(2);
        let y = (centered / (var + Self::EPS).sqrt())
            .reshape([b, c, h, w])
            .cast(dtype);
        y * self.weight.clone().reshape([1, c, 1, 1]) + self.bias.clone().reshape([1, c, 1, 1])
    }

    /// `swish(forward(x))`, in one pass over the output on the CPU.
    fn forward_swish(&self, x: Tensor<4>) -> Tensor<4> {
        if Self::on_cpu(&x) {
            return self.on_host(x, true);
        }
        swish(self.forward(x))
    }

    /// Whether the host kernel takes `x`: f32 on the CPU.
    fn on_cpu(x: &Tensor<4>) -> bool {
        x.dtype() == DType::F32 && crate::device::is_cpu(&x.device())
    }

    /// The norm (and swish) by the host kernel, in place where `x`'s values are not shared.
    fn on_host(&self, x: Tensor<4>, swish: bool) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let device = x.device();
        let mut y: Vec<f32> = x
            .into_data()
            .try_into_vec()
            .expect("an f32 tensor reads back as f32");
        self.host_in_place(&mut y, c, h * w, swish);
        Tensor::from_data(TensorData::new(y, [b, c, h, w]), &device)
    }

    /// The norm (and swish) of host values `x` (`[images, c, pixels]`) in place.
    fn host_in_place(&self, x: &mut [f32], c: usize, pixels: usize, swish: bool) {
        group_norm(
            x,
            (c, pixels),
            Self::GROUPS,
            Self::EPS,
            &host_values(&self.weight),
            &host_values(&self.bias),
            swish,
        )
        .expect("the norm's shapes are the layer's");
    }

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
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.conv1.forward(self.norm1.forward_swish(x.clone()));
        let h = self.conv2.forward(self.norm2.forward_swish(h));
        let shortcut = match &self.nin_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        shortcut + h
    }

    /// [`forward`](Self::forward) on host values (`[b, c, h, w]`); returns the output and
    /// its channels.
    fn forward_host(
        &self,
        x: Vec<f32>,
        [b, c, h, w]: [usize; 4],
        pool: &mut Pool,
    ) -> (Vec<f32>, usize) {
        let out = self.conv1.shape[0];
        let mut t = pool.take(x.len());
        t.copy_from_slice(&x);
        self.norm1.host_in_place(&mut t, c, h * w, true);
        let mut y = self.conv1.forward_host(&t, [b, c, h, w], pool);
        pool.give(t);
        self.norm2.host_in_place(&mut y, out, h * w, true);
        let y2 = self.conv2.forward_host(&y, [b, out, h, w], pool);
        pool.give(y);
        let mut shortcut = match &self.nin_shortcut {
            Some(conv) => {
                let s = conv.forward_host(&x, [b, c, h, w], pool);
                pool.give(x);
                s
            }
            None => x,
        };
        add_in_place(&mut shortcut, &y2);
        pool.give(y2);
        (shortcut, out)
    }

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
    /// `x + proj_out(attention over the h·w positions with c-wide single-head q, k, v)`.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let n = self.norm.forward(x.clone());
        // [b, c, h, w] → [b, h·w, c]
        let seq = |t: Tensor<4>| t.reshape([b, c, h * w]).swap_dims(1, 2);
        let q = seq(self.q.forward(n.clone()));
        let k = seq(self.k.forward(n.clone()));
        let v = seq(self.v.forward(n));
        let scores = q.matmul(k.swap_dims(1, 2)) * (c as f64).powf(-0.5);
        // The softmax in f32 (a no-op in f32), as the references keep it.
        let dtype = scores.dtype();
        let attn = softmax(scores.cast(DType::F32), 2).cast(dtype);
        let out = attn.matmul(v).swap_dims(1, 2).reshape([b, c, h, w]);
        x + self.proj_out.forward(out)
    }

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

impl Level {
    /// `{prefix}.res.{j}` (the first maps `channels[0]` to `channels[1]`), `{prefix}.attn.{j}`
    /// after each when `attn`, and `{prefix}.{resample}.conv`.
    fn load(
        w: &mut Weights<'_>,
        prefix: &str,
        blocks: usize,
        channels: [usize; 2],
        attn: bool,
        resample: Option<&str>,
    ) -> Self {
        let [mut c_in, c_out] = channels;
        let mut res = Vec::with_capacity(blocks);
        let mut attns = Vec::new();
        for j in 0..blocks {
            res.push(ResBlock::load(w, &format!("{prefix}.res.{j}"), c_in, c_out));
            c_in = c_out;
            if attn {
                attns.push(AttnBlock::load(w, &format!("{prefix}.attn.{j}"), c_out));
            }
        }
        let resample =
            resample.map(|name| Conv::load(w, &format!("{prefix}.{name}.conv"), c_out, c_out, 3));
        Level {
            res,
            attn: attns,
            resample,
        }
    }
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
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.res2.forward(self.attn.forward(self.res1.forward(x)))
    }

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

/// Nearest-neighbour ×2 upsampling of `[b, c, h, w]`.
fn upsample2(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}

impl Trunk {
    /// Runs the trunk; `down` selects encoder (strided convs) or decoder (upsampling) levels.
    fn forward(&self, x: Tensor<4>, down: bool) -> Tensor<4> {
        let mut x = self.conv_in.forward(x);
        if !down {
            x = self.mid.forward(x);
            if x.dtype() == DType::F32 && crate::device::is_cpu(&x.device()) {
                return self.decode_host(x);
            }
        }
        for level in &self.levels {
            for (j, res) in level.res.iter().enumerate() {
                x = res.forward(x);
                if let Some(attn) = level.attn.get(j) {
                    x = attn.forward(x);
                }
            }
            if let Some(conv) = &level.resample {
                x = if down {
                    conv.forward_down(x)
                } else {
                    conv.forward(upsample2(x))
                };
            }
        }
        if down {
            x = self.mid.forward(x);
        }
        self.conv_out.forward(self.norm_out.forward_swish(x))
    }
}

impl Trunk {
    /// The decoder's levels, output norm and conv over host buffers (f32 on the CPU): each
    /// ResNet block reads and writes buffers of one pool, so the full-resolution activations
    /// (75 MB at 384×384 with 128 channels) reuse memory instead of each being fresh pages
    /// (page faults and zeroing were a fifth of the decoder's time). Attention blocks (at the
    /// lowest resolution) run as tensors.
    fn decode_host(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, mut c, mut h, mut w] = x.dims();
        let device = x.device();
        let mut pool = Pool::default();
        let mut x = host_values(&x);
        for level in &self.levels {
            for (j, res) in level.res.iter().enumerate() {
                (x, c) = res.forward_host(x, [b, c, h, w], &mut pool);
                if let Some(attn) = level.attn.get(j) {
                    let t = Tensor::<4>::from_data(TensorData::new(x, [b, c, h, w]), &device);
                    x = host_values(&attn.forward(t));
                }
            }
            if let Some(conv) = &level.resample {
                let up = upsample2_host(&x, [b, c, h, w], &mut pool);
                pool.give(x);
                (h, w) = (2 * h, 2 * w);
                // Buffers of the lower resolution are too small from here on.
                pool.keep_at_least(b * c * h * w);
                x = conv.forward_host(&up, [b, c, h, w], &mut pool);
                pool.give(up);
            }
        }
        self.norm_out.host_in_place(&mut x, c, h * w, true);
        let y = self.conv_out.forward_host(&x, [b, c, h, w], &mut pool);
        let out = self.conv_out.shape[0];
        Tensor::from_data(TensorData::new(y, [b, out, h, w]), &device)
    }
}

/// Host buffers a decoder pass reuses.
#[derive(Default)]
struct Pool(Vec<Vec<f32>>);

impl Pool {
    /// A buffer of `len` values: a returned one where one is large enough (its old values are
    /// left in place: every caller overwrites them all), else a new one.
    fn take(&mut self, len: usize) -> Vec<f32> {
        let fit = self
            .0
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        let mut v = match fit {
            Some(i) => self.0.swap_remove(i),
            None => Vec::new(),
        };
        v.truncate(len);
        v.resize(len, 0.0);
        v
    }

    /// Frees the buffers of fewer than `len` values.
    fn keep_at_least(&mut self, len: usize) {
        self.0.retain(|v| v.capacity() >= len);
    }

    /// Returns a buffer for later [`take`](Self::take)s.
    fn give(&mut self, v: Vec<f32>) {
        self.0.push(v);
    }
}

/// `x += y`, on the thread pool.
fn add_in_place(x: &mut [f32], y: &[f32]) {
    use rayon::prelude::*;
    x.par_chunks_mut(1 << 16)
        .zip(y.par_chunks(1 << 16))
        .for_each(|(x, y)| {
            super::kernels::simd::widest(
                #[inline(always)]
                || x.iter_mut().zip(y).for_each(|(x, y)| *x += y),
            )
        });
}

/// Nearest-neighbour ×2 upsampling of host values `[b, c, h, w]` into a buffer of `pool`.
fn upsample2_host(x: &[f32], [b, c, h, w]: [usize; 4], pool: &mut Pool) -> Vec<f32> {
    use rayon::prelude::*;
    let mut y = pool.take(b * c * 4 * h * w);
    y.par_chunks_mut(4 * h * w)
        .zip(x.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for (rows, srow) in dst.chunks_exact_mut(4 * w).zip(src.chunks_exact(w)) {
                let (top, bottom) = rows.split_at_mut(2 * w);
                for (pair, &v) in top.chunks_exact_mut(2).zip(srow) {
                    pair.fill(v);
                }
                bottom.copy_from_slice(top);
            }
        });
    y
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
            let last = i == n - 1;
            levels.push(Level::load(
                w,
                &format!("{e}.conv_blocks.{i}"),
                c.num_res_blocks,
                [block_in, block_out],
                last,
                (!last).then_some("downsample"),
            ));
            block_in = block_out;
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
            levels.push(Level::load(
                w,
                &format!("{d}.conv_blocks.{k}"),
                c.num_res_blocks + 1,
                [block_in, block_out],
                level == n - 1,
                (level != 0).then_some("upsample"),
            ));
            block_in = block_out;
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

/// Rows of `x` (`[n, d]`) divided by their l2 norm (at least 1e-12), as `F.normalize` does.
fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

impl VqModel {
    /// Decodes token grids (`[batch, grid·grid]` row-major ids, all below the codebook size) to
    /// images `[batch, 3, size, size]` in about [-1, 1].
    pub fn decode(&self, tokens: Tensor<2, Int>) -> Tensor<4> {
        let [b, n] = tokens.dims();
        let g = self.config.grid;
        debug_assert_eq!(n, g * g);
        let codebook = l2_normalize(self.codebook.clone());
        let dim = codebook.dims()[1];
        let z = embedding(codebook, tokens)
            .reshape([b, g, g, dim])
            .permute([0, 3, 1, 2]);
        let z = self.post_quant_conv.forward(z);
        self.decoder.forward(z, false)
    }

    /// The latents before quantisation, `[batch, dim, grid, grid]`, of images in [-1, 1]
    /// (`[batch, 3, size, size]`).
    pub fn encode_latent(&self, images: Tensor<4>) -> Tensor<4> {
        self.quant_conv.forward(self.encoder.forward(images, true))
    }

    /// Squared distances `[batch · grid², codes]` between the l2-normalised latents and the
    /// l2-normalised codebook; the nearest code of a position is its argmin.
    pub fn code_distances(&self, latent: Tensor<4>) -> Tensor<2> {
        let [b, d, h, w] = latent.dims();
        let z = l2_normalize(latent.permute([0, 2, 3, 1]).reshape([b * h * w, d]));
        let e = l2_normalize(self.codebook.clone());
        let z2 = z.clone().square().sum_dim(1);
        let e2 = e
            .clone()
            .square()
            .sum_dim(1)
            .reshape([1, self.config.codebook_size]);
        z2 + e2 - z.matmul(e.transpose()) * 2.0
    }
}
