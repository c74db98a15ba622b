//! Low-rank adapters on a linear layer (LoRA): `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, with `A` `[r, in]`,
//! `B` `[out, r]` and `s = α / r`, laid out as PEFT's `lora_A` / `lora_B` weights.
//!
//! The adapter's term is computed as two thin products through the rank, never as a dense
//! `W + s·B·A`: a step touches `r·(in + out)` adapter values instead of a copy of every adapted
//! weight. Merging into the weight ([`Lora::delta`]) is what loading an adapter for inference
//! and saving a merged model do.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};
use rand_chacha::rand_core::Rng;

/// One layer's adapter.
#[derive(Module, Debug)]
pub struct Lora {
    /// `[r, in]`: PEFT's `lora_A.weight`.
    pub(crate) a: Param<Tensor<2>>,
    /// `[out, r]`: PEFT's `lora_B.weight`.
    pub(crate) b: Param<Tensor<2>>,
    /// `α / r`.
    pub(crate) scale: f64,
}

impl Lora {
    /// A fresh adapter as PEFT initialises one (`init_lora_weights=True`): `A` uniform in
    /// `±1/√in` (Kaiming-uniform with `a = √5`, as `nn.Linear`), `B` zero, so that the adapted
    /// layer starts equal to the layer. `rng` draws `A`'s values.
    pub fn new(
        d_in: usize,
        d_out: usize,
        rank: usize,
        alpha: f64,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let a: Vec<f32> = (0..rank * d_in)
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                ((2.0 * u - 1.0) * bound) as f32
            })
            .collect();
        Self::from_values(
            (a, rank, d_in),
            (vec![0.0; d_out * rank], d_out),
            alpha / rank as f64,
            device,
        )
    }

    /// An adapter from its values: `a` (`[r, in]` row-major, `r`, `in`), `b` (`[out, r]`, `out`)
    /// and the scale `s`.
    pub(crate) fn from_values(
        (a, rank, d_in): (Vec<f32>, usize, usize),
        (b, d_out): (Vec<f32>, usize),
        scale: f64,
        device: &Device,
    ) -> Self {
        let a = Tensor::from_data(TensorData::new(a, [rank, d_in]), device);
        let b = Tensor::from_data(TensorData::new(b, [d_out, rank]), device);
        Lora {
            a: Param::initialized(ParamId::new(), a).set_require_grad(true),
            b: Param::initialized(ParamId::new(), b).set_require_grad(true),
            scale,
        }
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.val().dims()[0]
    }

    /// The adapter's term `s·(x·Aᵀ)·Bᵀ` for rows `x` `[rows, in]`.
    pub(crate) fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        let x = x.cast(self.a.val().dtype());
        x.matmul(self.a.val().transpose())
            .matmul(self.b.val().transpose())
            * self.scale
    }

    /// `s·B·A` (`[out, in]`): what merging adds to the layer's weight.
    pub fn delta(&self) -> Tensor<2> {
        self.b.val().matmul(self.a.val()) * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::sampling::stream;

    /// A fresh adapter changes nothing; its term equals `x·(s·B·A)ᵀ`, the merged form.
    #[test]
    fn the_term_is_the_merged_weight_product() {
        let device = crate::device::default_device();
        let fresh = Lora::new(6, 5, 3, 6.0, &mut stream(1, 0), &device);
        assert_eq!(fresh.rank(), 3);
        assert_eq!(fresh.scale, 2.0);
        let a: Vec<f32> = fresh.a.val().into_data().try_to_vec().unwrap();
        assert!(a.iter().all(|v| v.abs() <= 1.0 / 6f32.sqrt()) && a.iter().any(|&v| v != 0.0));
        let value = |i: usize| ((i * 7919) % 113) as f32 / 113.0 - 0.5;
        let x = Tensor::<2>::from_data(
            TensorData::new((0..4 * 6).map(value).collect::<Vec<_>>(), [4, 6]),
            &device,
        );
        let zero: Vec<f32> = fresh.apply(x.clone()).into_data().try_to_vec().unwrap();
        assert!(zero.iter().all(|&v| v == 0.0));

        let lora = Lora::from_values(
            ((0..18).map(|i| value(i + 3)).collect(), 3, 6),
            ((0..15).map(|i| value(i + 40)).collect(), 5),
            0.5,
            &device,
        );
        let got: Vec<f32> = lora.apply(x.clone()).into_data().try_to_vec().unwrap();
        let want: Vec<f32> = x
            .matmul(lora.delta().transpose())
            .into_data()
            .try_to_vec()
            .unwrap();
        assert_eq!(got.len(), 20);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
