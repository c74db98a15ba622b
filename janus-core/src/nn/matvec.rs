//! Products `x·Wᵀ` with one to a few rows on the CPU backend, as decoding runs them.
//!
//! With one to four rows a product is bound by reading `W` from memory, not by arithmetic. The
//! CPU backend's matrix–vector product streams `W`'s contiguous rows at close to the memory
//! bandwidth, but on one thread, and a general product with two rows reads `W` several times
//! over. Here `W`'s rows are split across the thread pool; each thread walks its share in blocks
//! that the backend computes as dot products of every row of `x` with each row of `W`, so `W`
//! crosses the memory bus once whatever the row count. Every piece is an ordinary tensor
//! product, so the result is the same mathematics as `x.matmul(w.transpose())`.

use burn::tensor::{Device, Tensor};
use rayon::prelude::*;

/// Most rows of `x` this path serves; beyond, `W·Xᵀ` is faster.
pub(crate) const MAX_ROWS: usize = 4;

/// Outputs (rows of `x` × rows of `W`) of one block: the size up to which the CPU backend's
/// matrix product (the `gemm` crate) takes its dot-product kernel.
const BLOCK_OUTPUTS: usize = 256;

/// Whether `device` runs products this way (the CPU backend only; GPUs want one large kernel).
pub(crate) fn applies(device: &Device, rows: usize) -> bool {
    (1..=MAX_ROWS).contains(&rows) && crate::device::is_cpu(device)
}

/// `x·Wᵀ` for `x` `[rows, in]` and `w` `[out, in]` (row-major), `[rows, out]`.
pub(crate) fn forward(x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
    let out = w.dims()[0];
    let parts = rayon::current_num_threads().min(out.div_ceil(64)).max(1);
    if parts == 1 {
        return blocked(&x, w.clone());
    }
    let per = out.div_ceil(parts);
    let shares: Vec<Tensor<2>> = (0..parts)
        .map(|p| w.clone().narrow(0, p * per, per.min(out - p * per)))
        .collect();
    let pieces: Vec<Tensor<2>> = shares.into_par_iter().map(|w| blocked(&x, w)).collect();
    Tensor::cat(pieces, 1)
}

/// One thread's share. With several rows of `x`, `W` goes in blocks of at most
/// [`BLOCK_OUTPUTS`] products: the CPU backend computes such a block as dot products that read
/// each row of `W` once for every row of `x` together.
fn blocked(x: &Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    let rows = x.dims()[0];
    if rows == 1 {
        return x.clone().matmul(w.transpose());
    }
    let out = w.dims()[0];
    let block = (BLOCK_OUTPUTS / rows).max(1);
    let mut pieces = Vec::with_capacity(out.div_ceil(block));
    let mut start = 0;
    while start < out {
        let n = block.min(out - start);
        pieces.push(x.clone().matmul(w.clone().narrow(0, start, n).transpose()));
        start += n;
    }
    Tensor::cat(pieces, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    /// Several threads' shares, several blocks each, a ragged last block: the pieces must land
    /// in their places.
    #[test]
    fn split_product_equals_the_definition() {
        let device = crate::device::default_device();
        let (d_in, d_out) = (512, 1101);
        let value = |i: usize| ((i * 7919) % 101) as f32 / 101.0 - 0.5;
        let w: Vec<f32> = (0..d_out * d_in).map(value).collect();
        let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [d_out, d_in]), &device);
        assert!(
            BLOCK_OUTPUTS < d_out / 2,
            "the test must span several blocks"
        );
        for rows in 1..=MAX_ROWS {
            let x: Vec<f32> = (0..rows * d_in).map(|i| value(5 * i + 2)).collect();
            let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, d_in]), &device);
            let y: Vec<f32> = forward(xt, &wt).into_data().try_to_vec().unwrap();
            assert_eq!(y.len(), rows * d_out);
            for r in 0..rows {
                for o in 0..d_out {
                    let expected: f64 = (0..d_in)
                        .map(|i| f64::from(x[r * d_in + i]) * f64::from(w[o * d_in + i]))
                        .sum();
                    let got = f64::from(y[r * d_out + o]);
                    assert!(
                        (got - expected).abs() < 1e-3,
                        "rows {rows}, row {r}, out {o}: {got} vs {expected}"
                    );
                }
            }
        }
    }
}
