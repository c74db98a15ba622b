//! Key/value cache for the language model: one preallocated buffer per layer, filled in place.
//!
//! Each step writes its keys and values into the next free positions; when the capacity is
//! exhausted the buffer is reallocated at twice the size (the only copy of old entries), so a
//! step never copies the whole cache. The batch axis serves several rows at once (the CFG
//! conditional/unconditional pair, several images).

use burn::tensor::{DType, Int, Tensor, TensorData};
use rayon::prelude::*;

/// The keys and values of every layer for the positions processed so far.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
    capacity_hint: usize,
    left_pad: Vec<usize>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers that expects about `capacity` positions
    /// (it grows past that if needed).
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            capacity_hint: capacity.max(1),
            left_pad: Vec::new(),
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Declares that row `r` of the batch starts with `pads[r]` padding positions (prompts of
    /// different lengths, left-padded to one length).
    pub fn set_left_padding(&mut self, pads: Vec<usize>) {
        self.left_pad = pads;
    }

    /// Padding positions at the start of each row (empty: none).
    pub fn left_padding(&self) -> &[usize] {
        &self.left_pad
    }

    /// Rows of the batch the cache holds, once anything is held.
    pub fn batch(&self) -> Option<usize> {
        self.layers
            .iter()
            .flatten()
            .map(|(k, _)| k.dims()[0])
            .next()
    }

    /// Positions that fit before the buffers are reallocated.
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, _)| k.dims()[2])
            .next()
            .unwrap_or(self.capacity_hint)
    }

    /// Writes `k`, `v` (`[batch, kv_heads, t, head_dim]`) of `layer` after the held positions and
    /// returns views of all keys and values so far (`[batch, kv_heads, len + t, head_dim]`).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        let [b, h, t, d] = k.dims();
        let start = self.len;
        let end = start + t;
        let slot = &mut self.layers[layer];
        let (mut kc, mut vc) = match slot.take() {
            Some((kc, vc)) if kc.dims()[2] >= end => (kc, vc),
            old => {
                let cap = self
                    .capacity_hint
                    .max(end)
                    .max(old.as_ref().map_or(0, |(k, _)| 2 * k.dims()[2]));
                let mut kc = zeroed([b, h, cap, d], &k);
                let mut vc = zeroed([b, h, cap, d], &k);
                if let Some((ko, vo)) = old {
                    kc = kc.slice_assign(
                        [0..b, 0..h, 0..start, 0..d],
                        ko.slice([0..b, 0..h, 0..start, 0..d]),
                    );
                    vc = vc.slice_assign(
                        [0..b, 0..h, 0..start, 0..d],
                        vo.slice([0..b, 0..h, 0..start, 0..d]),
                    );
                }
                (kc, vc)
            }
        };
        kc = kc.slice_assign([0..b, 0..h, start..end, 0..d], k);
        vc = vc.slice_assign([0..b, 0..h, start..end, 0..d], v);
        let k_all = kc.clone().slice([0..b, 0..h, 0..end, 0..d]);
        let v_all = vc.clone().slice([0..b, 0..h, 0..end, 0..d]);
        *slot = Some((kc, vc));
        (k_all, v_all)
    }

    /// [`append`](Self::append) for keys and values in host memory (`[1, kv_heads, t, head_dim]`
    /// as `dims` says). Where the layer holds nothing yet and the cache lives on the CPU in f32
    /// (a prompt's first pass), its buffers are made from the host values directly, with no
    /// tensor of the new positions and no copy into a zero tensor; the buffers' pages beyond
    /// the written positions stay unmapped until decoding reaches them. Otherwise the values
    /// go through [`append`](Self::append).
    pub(crate) fn append_host(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        dims: [usize; 4],
        device: &burn::tensor::Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let [b, h, t, d] = dims;
        let fresh = self.len == 0
            && self.layers[layer].is_none()
            && b == 1
            && crate::device::is_cpu(device);
        if !fresh {
            let tensor =
                |x: &[f32]| Tensor::<4>::from_data(TensorData::new(x.to_vec(), dims), device);
            return self.append(layer, tensor(k), tensor(v));
        }
        let cap = self.capacity_hint.max(t);
        let buffer = |x: &[f32]| {
            // A zeroed allocation: only the pages written are mapped, each head's on a thread
            // of the pool (mapping fresh pages costs more than the copy).
            let mut all = vec![0.0f32; h * cap * d];
            all.par_chunks_mut(cap * d)
                .zip(x.par_chunks(t * d))
                .for_each(|(dst, src)| {
                    super::kernels::map_pages_now(&mut dst[..t * d]);
                    dst[..t * d].copy_from_slice(src);
                });
            Tensor::<4>::from_data(TensorData::new(all, [1, h, cap, d]), (device, DType::F32))
        };
        let (kc, vc) = rayon::join(|| buffer(k), || buffer(v));
        let k_all = kc.clone().slice([0..1, 0..h, 0..t, 0..d]);
        let v_all = vc.clone().slice([0..1, 0..h, 0..t, 0..d]);
        self.layers[layer] = Some((kc, vc));
        (k_all, v_all)
    }

    /// Keeps the rows `rows` of the batch, in that order (a row may repeat): one prefill can serve
    /// several sequences that continue differently.
    pub fn select_rows(&mut self, rows: &[usize]) {
        let unchanged =
            self.batch() == Some(rows.len()) && rows.iter().enumerate().all(|(i, &r)| i == r);
        if unchanged {
            // Every row in place: no copy of the buffers.
            return;
        }
        if !self.left_pad.is_empty() {
            self.left_pad = rows.iter().map(|&r| self.left_pad[r]).collect();
        }
        let len = self.len;
        let n = rows.len();
        // Only the held positions are copied; the new buffers keep the old capacity.
        let pick = |t: &Tensor<4>, idx: Tensor<1, Int>| {
            let [b, h, cap, d] = t.dims();
            let fresh = zeroed([n, h, cap, d], t);
            if len == 0 {
                return fresh;
            }
            let held = t.clone().slice([0..b, 0..h, 0..len, 0..d]).select(0, idx);
            fresh.slice_assign([0..n, 0..h, 0..len, 0..d], held)
        };
        for (k, v) in self.layers.iter_mut().flatten() {
            let idx = Tensor::<1, Int>::from_data(
                TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [n]),
                &k.device(),
            );
            *k = pick(k, idx.clone());
            *v = pick(v, idx);
        }
    }

    /// Marks `t` more positions as held (after every layer has appended them).
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

/// A zero buffer on `like`'s device and dtype. On the CPU backend an f32 buffer comes from a
/// zeroed allocation whose pages the system maps only as positions are written, so reserving a
/// whole image's positions up front costs nothing until they are used (a backend-made zero
/// tensor is written out in full, twice on the CPU backend).
fn zeroed(shape: [usize; 4], like: &Tensor<4>) -> Tensor<4> {
    let device = like.device();
    if like.dtype() == DType::F32 && crate::device::is_cpu(&device) {
        let n = shape.iter().product();
        Tensor::from_data(
            TensorData::new(vec![0.0f32; n], shape),
            (&device, DType::F32),
        )
    } else {
        Tensor::zeros(shape, (&device, like.dtype()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + seed * 13) % 29) as f32 - 14.0)
            .collect()
    }

    /// A prompt appended from host values, then a step appended as tensors, holds what the
    /// same appends as tensors hold: the same positions, capacity and values.
    #[test]
    fn host_appends_hold_what_tensor_appends_hold() {
        let device = crate::device::default_device();
        let (h, t, d) = (3, 5, 4);
        let tensor = |v: &[f32], t: usize| {
            Tensor::<4>::from_data(TensorData::new(v.to_vec(), [1, h, t, d]), &device)
        };
        let (k, v) = (values(h * t * d, 1), values(h * t * d, 2));
        let (k1, v1) = (values(h * d, 3), values(h * d, 4));
        let mut host = KvCache::new(1, 8);
        let mut plain = KvCache::new(1, 8);
        let (hk, hv) = host.append_host(0, &k, &v, [1, h, t, d], &device);
        let (pk, pv) = plain.append(0, tensor(&k, t), tensor(&v, t));
        let same = |a: Tensor<4>, b: Tensor<4>| {
            assert_eq!(a.dims(), b.dims());
            let (a, b): (Vec<f32>, Vec<f32>) = (
                a.into_data().try_to_vec().unwrap(),
                b.into_data().try_to_vec().unwrap(),
            );
            assert_eq!(a, b);
        };
        same(hk, pk);
        same(hv, pv);
        host.advance(t);
        plain.advance(t);
        assert_eq!(host.capacity(), plain.capacity());
        let (hk, hv) = host.append(0, tensor(&k1, 1), tensor(&v1, 1));
        let (pk, pv) = plain.append(0, tensor(&k1, 1), tensor(&v1, 1));
        same(hk, pk);
        same(hv, pv);
        // Once the layer holds positions, host values take the tensor route.
        host.advance(1);
        plain.advance(1);
        let (hk, _) = host.append_host(0, &k1, &v1, [1, h, 1, d], &device);
        let (pk, _) = plain.append(0, tensor(&k1, 1), tensor(&v1, 1));
        same(hk, pk);
    }
}
