//! Key/value cache for the language model: one preallocated buffer per layer, filled in place.
//!
//! Each step writes its keys and values into the next free positions; when the capacity is
//! exhausted the buffer is reallocated at twice the size (the only copy of old entries), so a
//! step never copies the whole cache. The batch axis serves several rows at once (the CFG
//! conditional/unconditional pair, several images).

use burn::tensor::{DType, Int, Tensor, TensorData};

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
