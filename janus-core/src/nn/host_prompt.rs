//! Whole prompts through SigLIP blocks and decoder layers on host buffers, for bf16 compute on
//! the CPU.
//!
//! With bf16 compute the products of a prompt run on the bf16 kernels
//! ([`kernels::bf16_gemm`](super::kernels::bf16_gemm)), which read and write host memory. Between
//! them, the tensor form of a layer spends as long again on the backend's element-wise work
//! (norms, RoPE, activations, residual adds), each step a fresh tensor, and on copies in and out
//! of host memory around every product. Here a layer is one pass over a few buffers reused from
//! layer to layer: the norm writes the bf16-packed rows the products read, biases, activations
//! and residual adds happen on the products' outputs in place, and the attention reads its heads
//! from the projections' outputs. The arithmetic is the tensor form's: norms, softmax, RoPE and
//! activations in f32, the products with bf16 operands and f32 sums.

use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::attention::{HostShape, prompt_host};
use super::kernels::bf16_gemm::{
    Bf16Gemm, Epilogue, PackedRows, bf16_gemm_packed_to_packed, bf16_gemm_packed_with,
};
use super::kernels::simd::{self, widest};
use super::kv_cache::KvCache;
use super::{LayerNorm, Linear};

/// Rows one task of the row-wise loops takes.
const ROWS_PER_TASK: usize = 16;

/// A tensor's values in host memory, as f32 (a copy where the tensor is shared).
pub(crate) fn host_values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.clone()
        .cast(DType::F32)
        .into_data()
        .try_into_vec()
        .expect("a tensor cast to f32 reads back as f32")
}

/// A linear layer as the host pass takes it: the bf16 weight bits, its output width, the bias.
pub(crate) struct HostLinear<'a> {
    path: Bf16Gemm,
    w: &'a [u16],
    out: usize,
    bias: Option<Vec<f32>>,
}

impl<'a> HostLinear<'a> {
    /// The layer's operands, where it takes bf16 products on this machine.
    pub(crate) fn of(layer: &'a Linear) -> Option<Self> {
        if layer.lora.is_some() {
            // The adapter's term is added by the layer's tensor form.
            return None;
        }
        let (path, w) = layer.weight.bf16_operands()?;
        Some(HostLinear {
            path,
            w,
            out: layer.weight.dims()[0],
            bias: layer.bias.as_ref().map(|b| host_values(&b.val())),
        })
    }

    /// `y = x·Wᵀ + b` for rows packed on this layer's path (`y` `[rows, out]`, overwritten).
    fn apply(&self, x: &PackedRows, y: &mut Vec<f32>) {
        y.resize(x.rows() * self.out, 0.0);
        self.product(x, y, Epilogue::default());
    }

    /// [`apply`](Self::apply) with `y` laid out as heads of `d` outputs (`[out / d, rows, d]`),
    /// as the attention reads them.
    fn apply_heads(&self, x: &PackedRows, d: usize, y: &mut Vec<f32>) {
        y.resize(x.rows() * self.out, 0.0);
        let heads = Epilogue {
            head_width: Some(d),
            ..Epilogue::default()
        };
        self.product(x, y, heads);
    }

    /// `next` ← `gelu(x·Wᵀ + b)` packed as the next layer's rows (an MLP's hidden layer, fed to
    /// the next projection without its f32 values where the path allows; `scratch` otherwise).
    fn apply_gelu_packed(&self, x: &PackedRows, next: &mut PackedRows, scratch: &mut Vec<f32>) {
        let gelu = Epilogue {
            gelu: true,
            bias: self.bias.as_deref(),
            ..Epilogue::default()
        };
        bf16_gemm_packed_to_packed(x, self.w, gelu, next, scratch)
            .expect("the layers' widths were checked when they loaded");
    }

    /// `y = silu(gate) · (x·Wᵀ + b)`: a SwiGLU's up projection times its activated gate
    /// projection (`gate` `[rows, out]`), as the results are stored.
    fn apply_gated(&self, x: &PackedRows, gate: &[f32], y: &mut Vec<f32>) {
        y.resize(x.rows() * self.out, 0.0);
        let gated = Epilogue {
            gate: Some(gate),
            ..Epilogue::default()
        };
        self.product(x, y, gated);
    }

    /// `x += y·Wᵀ + b`: a residual branch's output projection, added as the results are stored.
    fn add_into(&self, y: &PackedRows, x: &mut [f32]) {
        let residual = Epilogue {
            accumulate: true,
            ..Epilogue::default()
        };
        self.product(y, x, residual);
    }

    /// The product with `epilogue` and this layer's bias applied as it stores its results.
    fn product(&self, x: &PackedRows, y: &mut [f32], epilogue: Epilogue<'_>) {
        let epilogue = Epilogue {
            bias: self.bias.as_deref(),
            ..epilogue
        };
        bf16_gemm_packed_with(x, self.w, y, epilogue)
            .expect("the layers' widths were checked when they loaded");
    }
}

/// An MLP's layers over `x` (`rows` rows of `d_in`) with exact GELU between them: each hidden
/// layer activated as its results are stored. Returns the output rows and their width.
pub(crate) fn mlp(
    layers: &[HostLinear<'_>],
    x: Vec<f32>,
    rows: usize,
    d_in: usize,
) -> (Vec<f32>, usize) {
    let Some((last, hidden)) = layers.split_last() else {
        return (x, d_in);
    };
    let (mut packed, mut next) = (PackedRows::default(), PackedRows::default());
    packed
        .pack(last.path, &x, rows, d_in)
        .expect("the layers' widths were checked when they loaded");
    let mut scratch = x;
    for layer in hidden {
        layer.apply_gelu_packed(&packed, &mut next, &mut scratch);
        std::mem::swap(&mut packed, &mut next);
    }
    let mut y = Vec::new();
    last.apply(&packed, &mut y);
    (y, last.out)
}

/// `f(row of x, row of out)` for each row (`width` wide), rows in tasks on the thread pool,
/// compiled for the widest vectors ([`widest`]; pass an `#[inline(always)]` closure).
fn each_row(x: &[f32], width: usize, out: &mut [f32], f: impl Fn(&[f32], &mut [f32]) + Sync) {
    out.par_chunks_mut(ROWS_PER_TASK * width)
        .zip(x.par_chunks(ROWS_PER_TASK * width))
        .for_each(|(out, x)| {
            widest(
                #[inline(always)]
                || {
                    for (o, x) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
                        f(x, o);
                    }
                },
            )
        });
}

/// LayerNorm of each row of `x` (`width` wide) into `out`, statistics in f32 lanes.
fn layer_norm(x: &[f32], width: usize, weight: &[f32], bias: &[f32], eps: f64, out: &mut [f32]) {
    let eps = eps as f32;
    each_row(
        x,
        width,
        out,
        #[inline(always)]
        |x, o| {
            let mean = simd::sum(x) / width as f32;
            let var = simd::sum_sq(x, mean) / width as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for (((o, &v), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
                *o = (v - mean) * inv * w + b;
            }
        },
    );
}

/// RMSNorm of each row of `x` (`width` wide) into `out`, the mean square in f32 lanes.
fn rms_norm(x: &[f32], width: usize, weight: &[f32], eps: f64, out: &mut [f32]) {
    let eps = eps as f32;
    each_row(
        x,
        width,
        out,
        #[inline(always)]
        |x, o| {
            let inv = 1.0 / (simd::sum_sq(x, 0.0) / width as f32 + eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(x).zip(weight) {
                *o = v * inv * w;
            }
        },
    );
}

/// Buffers reused from layer to layer.
#[derive(Default)]
pub(crate) struct Scratch {
    normed: Vec<f32>,
    packed: PackedRows,
    a: Vec<f32>,
    b: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// An MLP's hidden rows, packed for its output projection.
    hidden: PackedRows,
}

/// Attention of the heads in `q`, `k`, `v` (`[heads, rows, d]`, scale `1/√d`) into `out`
/// (`[t, h·d]`, the rows the output projection reads).
fn attend(
    path: Bf16Gemm,
    (q, k, v): (&[f32], &[f32], &[f32]),
    shape: HostShape,
    causal: bool,
    out: &mut Vec<f32>,
) {
    out.resize(shape.h * shape.t * shape.d, 0.0);
    let scale = 1.0 / (shape.d as f32).sqrt();
    prompt_host(Some(path), q, k, v, shape, None, scale, causal, out);
}

/// A SigLIP block's operands on the host.
pub(crate) struct HostBlock<'a> {
    norm1: (Vec<f32>, Vec<f32>, f64),
    qkv: HostLinear<'a>,
    proj: HostLinear<'a>,
    norm2: (Vec<f32>, Vec<f32>, f64),
    fc1: HostLinear<'a>,
    fc2: HostLinear<'a>,
}

fn host_norm(n: &LayerNorm) -> (Vec<f32>, Vec<f32>, f64) {
    (host_values(&n.weight), host_values(&n.bias), n.eps)
}

impl<'a> HostBlock<'a> {
    /// The block's operands, where every product of it takes bf16 products on this machine.
    pub(crate) fn of(b: &'a super::siglip::Block) -> Option<Self> {
        Some(HostBlock {
            norm1: host_norm(&b.norm1),
            qkv: HostLinear::of(&b.qkv)?,
            proj: HostLinear::of(&b.proj)?,
            norm2: host_norm(&b.norm2),
            fc1: HostLinear::of(&b.fc1)?,
            fc2: HostLinear::of(&b.fc2)?,
        })
    }

    /// The block over `x` (`[n, width]`, one image's patches), in place.
    pub(crate) fn forward(&self, x: &mut [f32], width: usize, heads: usize, s: &mut Scratch) {
        let n = x.len() / width;
        let d = width / heads;
        let path = self.qkv.path;
        s.normed.resize(x.len(), 0.0);
        let (w, b, eps) = &self.norm1;
        layer_norm(x, width, w, b, *eps, &mut s.normed);
        s.packed
            .pack(path, &s.normed, n, width)
            .expect("the path was checked by HostLinear::of");
        // Queries, keys and values, each as `heads` heads of `[n, d]`.
        self.qkv.apply_heads(&s.packed, d, &mut s.a);
        let (q, kv) = s.a.split_at(n * width);
        let (k, v) = kv.split_at(n * width);
        let shape = HostShape {
            b: 1,
            h: heads,
            kvh: heads,
            t: n,
            s: n,
            d,
            tokens: true,
        };
        attend(path, (q, k, v), shape, false, &mut s.normed);
        s.packed
            .pack(path, &s.normed, n, width)
            .expect("the path was checked by HostLinear::of");
        self.proj.add_into(&s.packed, x);
        let (w, b, eps) = &self.norm2;
        layer_norm(x, width, w, b, *eps, &mut s.normed);
        s.packed
            .pack(path, &s.normed, n, width)
            .expect("the path was checked by HostLinear::of");
        self.fc1
            .apply_gelu_packed(&s.packed, &mut s.hidden, &mut s.b);
        self.fc2.add_into(&s.hidden, x);
    }
}

/// A decoder layer's operands on the host.
pub(crate) struct HostDecoder<'a> {
    input_norm: (Vec<f32>, f64),
    q: HostLinear<'a>,
    k: HostLinear<'a>,
    v: HostLinear<'a>,
    o: HostLinear<'a>,
    post_norm: (Vec<f32>, f64),
    gate: HostLinear<'a>,
    up: HostLinear<'a>,
    down: HostLinear<'a>,
}

/// The decoder layer's parts the host pass reads: norms as (weight, eps), the seven projections.
pub(crate) struct DecoderParts<'a> {
    pub input_norm: (&'a Tensor<1>, f64),
    pub post_norm: (&'a Tensor<1>, f64),
    pub q: &'a Linear,
    pub k: &'a Linear,
    pub v: &'a Linear,
    pub o: &'a Linear,
    pub gate: &'a Linear,
    pub up: &'a Linear,
    pub down: &'a Linear,
}

/// A prompt's positions for RoPE: the rotary tables `[t, head_dim]` (cos, sin).
pub(crate) struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

/// Where a decoder layer's prompt pass stands: the layer's index in the cache, the heads.
#[derive(Clone, Copy)]
pub(crate) struct DecoderShape {
    pub layer: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl<'a> HostDecoder<'a> {
    /// The layer's operands, where every product of it takes bf16 products on this machine.
    pub(crate) fn of(p: DecoderParts<'a>) -> Option<Self> {
        Some(HostDecoder {
            input_norm: (host_values(p.input_norm.0), p.input_norm.1),
            q: HostLinear::of(p.q)?,
            k: HostLinear::of(p.k)?,
            v: HostLinear::of(p.v)?,
            o: HostLinear::of(p.o)?,
            post_norm: (host_values(p.post_norm.0), p.post_norm.1),
            gate: HostLinear::of(p.gate)?,
            up: HostLinear::of(p.up)?,
            down: HostLinear::of(p.down)?,
        })
    }

    /// The layer over one sequence's `t` new positions `x` (`[t, width]`, in place), after the
    /// positions `cache` holds, appending their keys and values to it (in its host buffers, or as
    /// tensors on `device` where it keeps tensors).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        x: &mut [f32],
        width: usize,
        shape: DecoderShape,
        rope: &RopeTables,
        cache: &mut KvCache,
        device: &burn::tensor::Device,
        s: &mut Scratch,
    ) {
        let DecoderShape {
            layer,
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        let t = x.len() / width;
        let path = self.q.path;
        s.normed.resize(x.len(), 0.0);
        rms_norm(
            x,
            width,
            &self.input_norm.0,
            self.input_norm.1,
            &mut s.normed,
        );
        s.packed
            .pack(path, &s.normed, t, width)
            .expect("the path was checked by HostLinear::of");
        self.q.apply_heads(&s.packed, d, &mut s.q);
        self.k.apply_heads(&s.packed, d, &mut s.k);
        self.v.apply_heads(&s.packed, d, &mut s.v);
        rotate(&mut s.q, t, d, rope);
        rotate(&mut s.k, t, d, rope);
        let start = cache.len();
        let dims = [1, kv_heads, t, d];
        if cache.takes_host_on(layer, device) {
            cache.append_host(layer, &s.k, &s.v, dims);
            if start > 0 {
                // Earlier positions: every key and value so far.
                (s.k, s.v) = cache.held_host(layer, t).expect("just written");
            }
        } else {
            let tensor =
                |x: &[f32]| Tensor::<4>::from_data(TensorData::new(x.to_vec(), dims), device);
            let (k_all, v_all) = cache.append(layer, tensor(&s.k), tensor(&s.v));
            if start > 0 {
                s.k = host_values(&k_all);
                s.v = host_values(&v_all);
            }
        }
        let shape = HostShape {
            b: 1,
            h: heads,
            kvh: kv_heads,
            t,
            s: start + t,
            d,
            tokens: true,
        };
        attend(path, (&s.q, &s.k, &s.v), shape, true, &mut s.normed);
        s.packed
            .pack(path, &s.normed, t, heads * d)
            .expect("the path was checked by HostLinear::of");
        self.o.add_into(&s.packed, x);
        s.normed.resize(x.len(), 0.0);
        rms_norm(x, width, &self.post_norm.0, self.post_norm.1, &mut s.normed);
        s.packed
            .pack(path, &s.normed, t, width)
            .expect("the path was checked by HostLinear::of");
        self.gate.apply(&s.packed, &mut s.a);
        self.up.apply_gated(&s.packed, &s.a, &mut s.b);
        let f = self.gate.out;
        s.packed
            .pack(path, &s.b, t, f)
            .expect("the path was checked by HostLinear::of");
        self.down.add_into(&s.packed, x);
    }
}

/// Half-split ("rotate half") RoPE of heads `[heads, t, d]` in place: `x·cos + rotate_half(x)·sin`
/// with the tables of the `t` positions.
fn rotate(x: &mut [f32], t: usize, d: usize, rope: &RopeTables) {
    let half = d / 2;
    x.par_chunks_mut(t * d).for_each(|head| {
        for ((v, cos), sin) in head
            .chunks_exact_mut(d)
            .zip(rope.cos.chunks_exact(d))
            .zip(rope.sin.chunks_exact(d))
        {
            let (x1, x2) = v.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] + -b * sin[i];
                x2[i] = b * cos[half + i] + a * sin[half + i];
            }
        }
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use burn::tensor::TensorData;

    use super::*;
    use crate::nn::kernels::HalfKind;
    use crate::nn::weight::{HalfMatrix, Matrix};

    pub(crate) fn value(i: usize, seed: usize) -> f32 {
        (((i + 31 * seed) * 7919) % 1009) as f32 / 1009.0 - 0.5
    }

    pub(crate) fn vector(n: usize, seed: usize, base: f32) -> Tensor<1> {
        let v: Vec<f32> = (0..n).map(|i| base + 0.2 * value(i, seed)).collect();
        Tensor::from_data(TensorData::new(v, [n]), &crate::device::default_device())
    }

    /// A layer over bf16 weights `[out, d_in]` that takes bf16 products (values of size
    /// `1/√d_in`).
    pub(crate) fn linear(out: usize, d_in: usize, seed: usize, bias: bool) -> Linear {
        let scale = 2.0 / (d_in as f32).sqrt();
        let bits: Vec<u16> = (0..out * d_in)
            .map(|i| half::bf16::from_f32(scale * value(i, seed)).to_bits())
            .collect();
        Linear {
            weight: Matrix::Half(Arc::new(HalfMatrix {
                kind: HalfKind::Bf16,
                bits: bits.into(),
                out,
                d_in,
                bf16_products: true,
            })),
            bias: bias.then(|| super::super::param(vector(out, seed + 1, 0.0))),
            lora: None,
        }
    }

    /// Largest |a − b| over the largest |b| (every value of `a` finite).
    pub(crate) fn compare(a: Tensor<3>, b: Tensor<3>) -> f32 {
        let a = host_values(&a);
        let b = host_values(&b);
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(a.iter().all(|v| v.is_finite()));
        worst / scale
    }

    /// SigLIP blocks on host buffers against their tensor form, on the bf16 products (two
    /// heads of 32, so the attention takes them too): the same arithmetic up to the order of
    /// the norms' sums, which may flip a bf16 rounding of an activation here and there.
    #[test]
    fn siglip_blocks_on_host_buffers_match_the_tensor_form() {
        if Bf16Gemm::selected().unwrap().is_none() {
            return;
        }
        let (n, width, heads, mlp) = (40, 64, 2, 128);
        let norm = |seed| LayerNorm {
            weight: vector(width, seed, 1.0),
            bias: vector(width, seed + 1, 0.0),
            eps: 1e-6,
        };
        let blocks: Vec<super::super::siglip::Block> = (0..2)
            .map(|i| super::super::siglip::Block {
                norm1: norm(10 * i),
                qkv: linear(3 * width, width, 10 * i + 2, true),
                proj: linear(width, width, 10 * i + 3, true),
                norm2: norm(10 * i + 4),
                fc1: linear(mlp, width, 10 * i + 5, true),
                fc2: linear(width, mlp, 10 * i + 6, true),
            })
            .collect();
        let device = crate::device::default_device();
        let x: Vec<f32> = (0..2 * n * width).map(|i| 2.0 * value(i, 99)).collect();
        let x = Tensor::<3>::from_data(TensorData::new(x, [2, n, width]), &device);
        let mut want = x.clone();
        for b in &blocks {
            want = b.forward(want, heads);
        }
        let host: Vec<HostBlock<'_>> = blocks.iter().map(|b| HostBlock::of(b).unwrap()).collect();
        let got = super::super::siglip::SigLip::forward_host(&host, x, heads);
        let worst = compare(got, want);
        println!("SigLIP blocks: host against tensor form {worst:.2e}");
        assert!(worst < 1e-3, "{worst}");
    }
}
