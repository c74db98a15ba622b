//! The model's neural-network parts, written once against Burn's tensor API. They know nothing of
//! files, prompts or sampling: weights come in through [`Weights`](crate::load::Weights) by their
//! canonical names, activations go in and out as tensors.

pub mod heads;
pub mod kv_cache;
pub mod llm;
pub mod siglip;
pub mod vq;

use burn::tensor::activation::gelu;
use burn::tensor::{DType, Tensor};

use crate::config::MlpConfig;
use crate::load::Weights;

/// A linear layer, `y = x·Wᵀ + b`, stored as `[in, out]` for Burn's `linear`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
}

impl Linear {
    /// Loads `{prefix}.weight` (`[out, in]` in the file) and, if `bias`, `{prefix}.bias`.
    pub(crate) fn load(
        w: &mut Weights<'_>,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Self {
        let weight = w
            .get(&format!("{prefix}.weight"), [d_out, d_in])
            .transpose();
        let bias = bias.then(|| w.get(&format!("{prefix}.bias"), [d_out]));
        Linear { weight, bias }
    }

    /// Applies the layer over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        burn::tensor::module::linear(x, self.weight.clone(), self.bias.clone())
    }
}

/// LayerNorm with affine weight and bias over the last axis.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor<1>,
    bias: Tensor<1>,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn load(w: &mut Weights<'_>, prefix: &str, dim: usize, eps: f64) -> Self {
        LayerNorm {
            weight: w.get(&format!("{prefix}.weight"), [dim]),
            bias: w.get(&format!("{prefix}.bias"), [dim]),
            eps,
        }
    }

    /// Normalises in f32 whatever the compute dtype, as PyTorch's kernels accumulate.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let mean = x.clone().mean_dim(D - 1);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(D - 1);
        let y = centered / (var + self.eps).sqrt();
        y.cast(dtype) * self.weight.clone().unsqueeze() + self.bias.clone().unsqueeze()
    }
}

/// `Linear → GELU → Linear …`: the official `MlpProjector` (`mlp_gelu`) and HF's aligner MLPs.
#[derive(Debug, Clone)]
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    /// Loads `{prefix}.layers.{0,2,4,…}` (the odd indices are the parameterless GELUs).
    pub(crate) fn load(w: &mut Weights<'_>, prefix: &str, cfg: &MlpConfig) -> Self {
        let layers = (0..cfg.depth)
            .map(|i| {
                let d_in = if i == 0 {
                    cfg.input_dim
                } else {
                    cfg.output_dim
                };
                Linear::load(
                    w,
                    &format!("{prefix}.layers.{}", 2 * i),
                    d_in,
                    cfg.output_dim,
                    true,
                )
            })
            .collect();
        Mlp { layers }
    }

    /// Applies the layers with exact (erf) GELU between them.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            if i > 0 {
                x = gelu(x);
            }
            x = layer.forward(x);
        }
        x
    }
}
