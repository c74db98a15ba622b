//! The model's neural-network parts, written once against Burn's tensor API. They know nothing of
//! files, prompts or sampling: weights come in through [`Weights`](crate::load::Weights) by their
//! canonical names, activations go in and out as tensors.

pub mod activation;
mod attention;
pub mod heads;
mod host_prompt;
pub mod kernels;
pub mod kv_cache;
pub mod llm;
pub mod lora;
mod matvec;
pub mod siglip;
pub mod vq;
pub mod weight;

use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor};

use crate::config::MlpConfig;
use crate::load::Weights;
use weight::Matrix;

/// A tensor as a parameter (a test's layer): no gradient unless training asks for one.
#[cfg(test)]
pub(crate) fn param<const D: usize>(t: Tensor<D>) -> Param<Tensor<D>> {
    Param::initialized(burn::module::ParamId::new(), t)
}

/// A linear layer, `y = x·Wᵀ + b`, with `W` (`[out, in]`) held as the load options ask: a
/// tensor in the compute dtype, or on the CPU compact bf16/f16/`q8_0`/`q4_0` storage
/// ([`weight`]).
///
/// The product is written one of several ways, all the same mathematics, picked by the storage
/// and by how many rows `x` has once its leading axes are folded (see
/// [`Matrix::product`](weight::Matrix::product)). Folding the leading axes here also keeps
/// backends from materialising a broadcast copy of `W` for a batched product.
///
/// A layer being fine-tuned with a low-rank adapter adds its term ([`lora::Lora`]).
#[derive(Module, Debug)]
pub struct Linear {
    weight: Matrix,
    bias: Option<Param<Tensor<1>>>,
    lora: Option<lora::Lora>,
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
        Self::load_as(w, prefix, d_in, d_out, bias, true)
    }

    /// [`load`](Self::load), with `quantizable` false for a layer that keeps the unquantized
    /// storage under `q8_0`/`q4_0`.
    pub(crate) fn load_as(
        w: &mut Weights<'_>,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        quantizable: bool,
    ) -> Self {
        let weight = w.matrix(&format!("{prefix}.weight"), &[d_out, d_in], quantizable);
        let bias = bias.then(|| w.param(&format!("{prefix}.bias"), [d_out]));
        Linear {
            weight,
            bias,
            lora: None,
        }
    }

    /// A layer without bias over an `[out, in]` weight already loaded (`lm_head`, which may be
    /// the embedding table when the config ties them).
    pub(crate) fn from_weight(weight: Matrix) -> Self {
        Linear {
            weight,
            bias: None,
            lora: None,
        }
    }

    /// Applies the layer over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.apply(x, false)
    }

    /// [`forward`](Self::forward) as a decoding step runs it: each row's result does not depend
    /// on the other rows or their number ([`Matrix::step_product`]).
    pub fn forward_step<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.apply(x, true)
    }

    /// [`forward`](Self::forward), or with `step` [`forward_step`](Self::forward_step).
    pub fn apply<const D: usize>(&self, x: Tensor<D>, step: bool) -> Tensor<D> {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let x = x.reshape([rows, dims[D - 1]]);
        let term = self.lora.as_ref().map(|l| l.apply(x.clone()));
        let y = if step {
            self.weight.step_product(x)
        } else {
            self.weight.product(x)
        };
        self.finish(y, term, dims)
    }

    /// Several layers over the same input (`[…, in]`), as [`apply`](Self::apply) applies
    /// each: a decoder layer's q, k and v projections, or gate and up. Decode-shaped inputs over
    /// compact weights run as one pass of the kernels ([`Matrix::products`]).
    pub fn forward_many<const D: usize>(
        layers: &[&Linear],
        x: Tensor<D>,
        step: bool,
    ) -> Vec<Tensor<D>> {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let mats: Vec<&Matrix> = layers.iter().map(|l| &l.weight).collect();
        let x = x.reshape([rows, dims[D - 1]]);
        let terms: Vec<_> = layers
            .iter()
            .map(|l| l.lora.as_ref().map(|l| l.apply(x.clone())))
            .collect();
        let ys = if step {
            Matrix::step_products(&mats, x)
        } else {
            Matrix::products(&mats, x)
        };
        ys.into_iter()
            .zip(terms)
            .zip(layers)
            .map(|((y, term), layer)| layer.finish(y, term, dims))
            .collect()
    }

    /// The layer's adapter, if it has one.
    pub fn lora(&self) -> Option<&lora::Lora> {
        self.lora.as_ref()
    }

    /// Sets (or with `None` removes) the layer's adapter. An adapter must fit the layer:
    /// `A` `[r, in]`, `B` `[out, r]`.
    pub(crate) fn set_lora(&mut self, lora: Option<lora::Lora>) {
        if let Some(l) = &lora {
            let [out, d_in] = self.weight.dims();
            debug_assert_eq!(l.a.val().dims()[1], d_in);
            debug_assert_eq!(l.b.val().dims()[0], out);
        }
        self.lora = lora;
    }

    /// The layer's weight, as stored.
    pub(crate) fn weight(&self) -> &Matrix {
        &self.weight
    }

    /// Replaces the layer's weight (same shape).
    pub(crate) fn set_weight(&mut self, weight: Matrix) {
        debug_assert_eq!(weight.dims(), self.weight.dims());
        self.weight = weight;
    }

    /// The bf16 instruction path this layer's prompt-shaped products take, if any
    /// ([`Matrix::bf16_path`]): the layers around an attention use it to pick the attention's.
    pub(crate) fn bf16_path(&self) -> Option<kernels::Bf16Gemm> {
        self.weight.bf16_path()
    }

    /// The bias (and the adapter's `term`) added to a product `[rows, out]`, laid out as the
    /// input's leading axes `dims`.
    fn finish<const D: usize>(
        &self,
        y: Tensor<2>,
        term: Option<Tensor<2>>,
        dims: [usize; D],
    ) -> Tensor<D> {
        let y = match term {
            Some(t) => {
                let dtype = y.dtype();
                y + t.cast(dtype)
            }
            None => y,
        };
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze::<2>(),
            None => y,
        };
        let mut out = dims;
        out[D - 1] = self.weight.dims()[0];
        y.reshape(out)
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
#[derive(Module, Debug)]
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
        self.apply(x, false)
    }

    /// [`forward`](Self::forward) with row-invariant products ([`Linear::forward_step`]).
    pub fn forward_step<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.apply(x, true)
    }

    fn apply<const D: usize>(&self, x: Tensor<D>, step: bool) -> Tensor<D> {
        if !step && let Some(y) = self.host_forward(&x) {
            return y;
        }
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            if i > 0 {
                x = activation::gelu_erf(x);
            }
            x = layer.apply(x, step);
        }
        x
    }
}

impl Mlp {
    /// The layers on host buffers with bf16 compute on the CPU, over prompt-shaped inputs (an
    /// image's features through the aligner): the same products as [`Linear::forward`], each
    /// hidden layer's GELU applied as its results are stored, without a tensor between the
    /// layers. `None` where the layers take another path.
    fn host_forward<const D: usize>(&self, x: &Tensor<D>) -> Option<Tensor<D>> {
        if x.dtype() != DType::F32 || !crate::device::is_cpu(&x.device()) {
            return None;
        }
        let mut dims = x.dims();
        let d_in = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        if rows <= kernels::MAX_ROWS {
            return None;
        }
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(host_prompt::HostLinear::of)
            .collect::<Option<_>>()?;
        let (y, out) = host_prompt::mlp(&layers, host_prompt::host_values(x), rows, d_in);
        dims[D - 1] = out;
        Some(Tensor::from_data(
            burn::tensor::TensorData::new(y, dims),
            &x.device(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::weight::FEW_ROWS;
    use super::*;
    use burn::tensor::TensorData;

    /// An MLP on host buffers (bf16 products, GELU as the hidden layers store their results)
    /// gives exactly what its layers give one at a time with GELU between them.
    #[test]
    fn mlp_on_host_buffers_equals_its_layers_one_at_a_time() {
        use host_prompt::tests::linear;
        let mlp = Mlp {
            layers: vec![
                linear(96, 64, 1, true),
                linear(64, 96, 3, true),
                linear(32, 64, 5, false),
            ],
        };
        let (b, n, d) = (2, 20, 64);
        let v: Vec<f32> = (0..b * n * d)
            .map(|i| host_prompt::tests::value(i, 9))
            .collect();
        let x = Tensor::<3>::from_data(
            TensorData::new(v, [b, n, d]),
            &crate::device::default_device(),
        );
        let host = mlp.host_forward(&x);
        assert_eq!(
            host.is_some(),
            kernels::Bf16Gemm::selected().unwrap().is_some(),
            "the host form runs where the layers take bf16 products"
        );
        let mut want = x.clone();
        for (i, layer) in mlp.layers.iter().enumerate() {
            if i > 0 {
                want = activation::gelu_erf(want);
            }
            want = layer.forward(want);
        }
        let got = mlp.forward(x);
        assert_eq!(got.dims(), [b, n, 32]);
        assert_eq!(
            host_prompt::host_values(&got),
            host_prompt::host_values(&want)
        );
    }

    /// Layers applied together give what each gives alone, for every storage and row count
    /// (decode-shaped ones over compact weights run as one pass), biases included.
    #[test]
    fn layers_applied_together_match_one_at_a_time() {
        use super::kernels::{HalfKind, QuantKind, QuantMatrix};
        use super::weight::HalfMatrix;
        use std::sync::Arc;
        let device = crate::device::default_device();
        let d_in = 64;
        let value = |i: usize| ((i * 7919) % 113) as f32 / 113.0 - 0.5;
        let values = |out: usize, seed: usize| -> Vec<f32> {
            (0..out * d_in).map(|i| value(i + seed)).collect()
        };
        let half = |out: usize, seed: usize| {
            Matrix::Half(Arc::new(HalfMatrix {
                kind: HalfKind::Bf16,
                bits: values(out, seed)
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect::<Vec<_>>()
                    .into(),
                out,
                d_in,
                bf16_products: false,
            }))
        };
        let quant = |out: usize, seed: usize| {
            let w = values(out, seed);
            Matrix::Quant(Arc::new(
                QuantMatrix::quantize(QuantKind::Q8_0, out, d_in, |o, buf| {
                    buf.copy_from_slice(&w[o * d_in..(o + 1) * d_in])
                })
                .unwrap(),
            ))
        };
        let dense = |out: usize, seed: usize| {
            Matrix::dense_param(Tensor::from_data(
                TensorData::new(values(out, seed), [out, d_in]),
                &device,
            ))
        };
        let bias = |out: usize| {
            Tensor::<1>::from_data(
                TensorData::new(values(1, out)[..out].to_vec(), [out]),
                &device,
            )
        };
        for make in [&half as &dyn Fn(usize, usize) -> Matrix, &quant, &dense] {
            let layers = [
                Linear {
                    weight: make(70, 1),
                    bias: None,
                    lora: None,
                },
                Linear {
                    weight: make(3, 2),
                    bias: Some(param(bias(3))),
                    lora: None,
                },
                Linear {
                    weight: make(129, 3),
                    bias: None,
                    lora: None,
                },
            ];
            let refs: Vec<&Linear> = layers.iter().collect();
            for rows in [1, 2, 5, 8, 9] {
                let x = Tensor::<3>::from_data(
                    TensorData::new(
                        (0..rows * d_in)
                            .map(|i| value(3 * i + 7))
                            .collect::<Vec<_>>(),
                        [1, rows, d_in],
                    ),
                    &device,
                );
                let together = Linear::forward_many(&refs, x.clone(), false);
                for (layer, got) in layers.iter().zip(together) {
                    let want: Vec<f32> = layer.forward(x.clone()).into_data().try_to_vec().unwrap();
                    assert_eq!(got.dims(), [1, rows, layer.weight.dims()[0]]);
                    let got: Vec<f32> = got.into_data().try_to_vec().unwrap();
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "rows {rows} [{i}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// Every row count takes one of the forms of [`Linear::forward`]; each must give `x·Wᵀ + b`
    /// as a plain triple loop computes it.
    #[test]
    fn linear_forms_agree_with_the_definition() {
        let device = crate::device::default_device();
        let (d_in, d_out) = (37, 23);
        let value = |i: usize| ((i * 7919) % 113) as f32 / 113.0 - 0.5;
        let w: Vec<f32> = (0..d_out * d_in).map(value).collect();
        let b: Vec<f32> = (0..d_out).map(|i| value(i + 5)).collect();
        let layer = Linear {
            weight: Matrix::dense_param(Tensor::from_data(
                TensorData::new(w.clone(), [d_out, d_in]),
                &device,
            )),
            bias: Some(param(Tensor::from_data(
                TensorData::new(b.clone(), [d_out]),
                &device,
            ))),
            lora: None,
        };
        for rows in [1, 2, 3, FEW_ROWS, FEW_ROWS + 1, 2 * FEW_ROWS + 6] {
            let x: Vec<f32> = (0..rows * d_in).map(|i| value(3 * i + 1)).collect();
            // A broadcast batch axis: the input is a view, not a contiguous buffer.
            let input =
                Tensor::<3>::from_data(TensorData::new(x.clone(), [1, rows, d_in]), &device)
                    .expand([2, rows, d_in]);
            let y: Vec<f32> = layer.forward(input).into_data().try_to_vec().unwrap();
            assert_eq!(y.len(), 2 * rows * d_out);
            for r in 0..rows {
                for o in 0..d_out {
                    let expected = b[o]
                        + (0..d_in)
                            .map(|i| x[r * d_in + i] * w[o * d_in + i])
                            .sum::<f32>();
                    for copy in 0..2 {
                        let got = y[(copy * rows + r) * d_out + o];
                        assert!(
                            (got - expected).abs() < 1e-5,
                            "rows {rows}, row {r}, out {o}: {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }
}
