//! Key/value cache for the language model: one preallocated buffer per layer, filled in place.
//!
//! Each step writes its keys and values into the next free positions; when the capacity is
//! exhausted the buffer is reallocated at twice the size (the only copy of old entries), so a
//! step never copies the whole cache. The batch axis serves several rows at once (the CFG
//! conditional/unconditional pair, several images).

use burn::tensor::{DType, Int, Tensor, TensorData};
use rayon::prelude::*;

use super::host_prompt::host_values;

/// The keys and values of every layer for the positions processed so far.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<Layer>>,
    len: usize,
    capacity_hint: usize,
    left_pad: Vec<usize>,
}

/// One layer's keys and values, `[batch, kv_heads, capacity, head_dim]`.
#[derive(Debug)]
enum Layer {
    /// Tensors on the model's device (boxed: a tensor handle is large, and the host form is
    /// the common one).
    Tensors(Box<(Tensor<4>, Tensor<4>)>),
    /// f32 buffers in host memory: the CPU backend's f32 caches, which decoding steps attend
    /// over in place ([`attention::step_host`](super::attention::step_host)).
    Host(HostKv),
}

/// A layer's keys and values in host memory, `[batch, kv_heads, capacity, head_dim]` f32.
#[derive(Debug)]
pub(crate) struct HostKv {
    dims: [usize; 4],
    k: Vec<f32>,
    v: Vec<f32>,
}

impl HostKv {
    /// Zero buffers (an allocation whose pages are mapped only as positions are written, so
    /// reserving a whole image's positions costs nothing until they are used).
    fn zeroed(dims: [usize; 4]) -> Self {
        let n = dims.iter().product();
        HostKv {
            dims,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// `[batch, kv_heads, capacity, head_dim]`.
    pub(crate) fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// The first `n` keys and values of row `b`, head `h`: `n` rows of `head_dim`.
    pub(crate) fn head(&self, b: usize, h: usize, n: usize) -> (&[f32], &[f32]) {
        let [_, heads, cap, d] = self.dims;
        let at = (b * heads + h) * cap * d;
        (&self.k[at..][..n * d], &self.v[at..][..n * d])
    }

    /// Rows `rows` of this buffer (a row may repeat), positions `0..held`, in buffers of
    /// `cap` positions.
    fn picked(&self, rows: &[usize], cap: usize, held: usize) -> Self {
        let [_, h, old_cap, d] = self.dims;
        let mut out = HostKv::zeroed([rows.len(), h, cap, d]);
        let n = held * d;
        for (dst, &r) in rows.iter().enumerate() {
            for head in 0..h {
                let (from, to) = ((r * h + head) * old_cap * d, (dst * h + head) * cap * d);
                out.k[to..to + n].copy_from_slice(&self.k[from..from + n]);
                out.v[to..to + n].copy_from_slice(&self.v[from..from + n]);
            }
        }
        out
    }

    /// Writes `k`, `v` (`[batch, kv_heads, t, head_dim]`) at positions `start..start + t`, each
    /// head's on a thread of the pool.
    fn write(&mut self, k: &[f32], v: &[f32], t: usize, start: usize) {
        let [_, _, cap, d] = self.dims;
        let put = |all: &mut Vec<f32>, x: &[f32]| {
            all.par_chunks_mut(cap * d)
                .zip(x.par_chunks(t * d))
                .for_each(|(dst, src)| {
                    let dst = &mut dst[start * d..(start + t) * d];
                    if start == 0 {
                        // Fresh pages: mapping them one fault at a time costs more than the
                        // copy.
                        super::kernels::map_pages_now(dst);
                    }
                    dst.copy_from_slice(src);
                });
        };
        let (kb, vb) = (&mut self.k, &mut self.v);
        rayon::join(|| put(kb, k), || put(vb, v));
    }

    /// Positions `0..end` of every row and head, `[batch, kv_heads, end, head_dim]` (a copy).
    fn held(&self, end: usize) -> (Vec<f32>, Vec<f32>) {
        let [b, h, _, d] = self.dims;
        let mut k = Vec::with_capacity(b * h * end * d);
        let mut v = Vec::with_capacity(b * h * end * d);
        for row in 0..b {
            for head in 0..h {
                let (kh, vh) = self.head(row, head, end);
                k.extend_from_slice(kh);
                v.extend_from_slice(vh);
            }
        }
        (k, v)
    }
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

    /// `[batch, kv_heads, capacity, head_dim]` of the layers' buffers, once anything is held.
    fn dims(&self) -> Option<[usize; 4]> {
        self.layers
            .iter()
            .flatten()
            .map(|l| match l {
                Layer::Tensors(kv) => kv.0.dims(),
                Layer::Host(kv) => kv.dims,
            })
            .next()
    }

    /// Rows of the batch the cache holds, once anything is held.
    pub fn batch(&self) -> Option<usize> {
        self.dims().map(|d| d[0])
    }

    /// Positions that fit before the buffers are reallocated.
    pub fn capacity(&self) -> usize {
        self.dims().map_or(self.capacity_hint, |d| d[2])
    }

    /// Whether `layer` keeps (or, holding nothing yet, will keep) keys like `k` in host memory:
    /// f32 on the CPU backend.
    pub(crate) fn takes_host(&self, layer: usize, k: &Tensor<4>) -> bool {
        k.dtype() == DType::F32 && self.takes_host_on(layer, &k.device())
    }

    /// [`takes_host`](Self::takes_host) for f32 values on `device`.
    pub(crate) fn takes_host_on(&self, layer: usize, device: &burn::tensor::Device) -> bool {
        crate::device::is_cpu(device) && !matches!(self.layers[layer], Some(Layer::Tensors(..)))
    }

    /// The host buffers of `layer`, if it keeps them there.
    pub(crate) fn host_layer(&self, layer: usize) -> Option<&HostKv> {
        match &self.layers[layer] {
            Some(Layer::Host(kv)) => Some(kv),
            _ => None,
        }
    }

    /// The capacity for `end` positions: the hint, at least `end`, and at least twice the old
    /// capacity when the buffers must grow.
    fn grown(&self, end: usize, old: usize) -> usize {
        self.capacity_hint.max(end).max(2 * old)
    }

    /// Writes `k`, `v` (`[batch, kv_heads, t, head_dim]` as `dims` says, host values) of `layer`
    /// after the held positions, in host buffers (the layer must [take host
    /// values](Self::takes_host) or hold nothing yet).
    pub(crate) fn append_host(&mut self, layer: usize, k: &[f32], v: &[f32], dims: [usize; 4]) {
        let [b, h, t, d] = dims;
        let (start, end) = (self.len, self.len + t);
        let kv = match self.layers[layer].take() {
            Some(Layer::Host(kv)) if kv.dims[2] >= end => kv,
            Some(Layer::Host(old)) => {
                let rows: Vec<usize> = (0..b).collect();
                old.picked(&rows, self.grown(end, old.dims[2]), start)
            }
            Some(Layer::Tensors(..)) => unreachable!("the caller checks `takes_host`"),
            None => HostKv::zeroed([b, h, self.capacity_hint.max(end), d]),
        };
        let mut kv = kv;
        kv.write(k, v, t, start);
        self.layers[layer] = Some(Layer::Host(kv));
    }

    /// Every key and value of `layer` so far, `[batch, kv_heads, len, head_dim]` host values (a
    /// copy), after an [`append_host`](Self::append_host) of `t` positions not yet
    /// [advanced](Self::advance) over.
    pub(crate) fn held_host(&self, layer: usize, t: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        self.host_layer(layer).map(|kv| kv.held(self.len + t))
    }

    /// Writes `k`, `v` (`[batch, kv_heads, t, head_dim]`) of `layer` after the held positions and
    /// returns all keys and values so far (`[batch, kv_heads, len + t, head_dim]`).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        let [b, h, t, d] = k.dims();
        let start = self.len;
        let end = start + t;
        if self.takes_host(layer, &k) {
            let device = k.device();
            self.append_host(layer, &host_values(&k), &host_values(&v), [b, h, t, d]);
            if start == 0 {
                // The only positions are these.
                return (k, v);
            }
            let (kh, vh) = self.held_host(layer, t).expect("just written");
            let tensor = |x| Tensor::<4>::from_data(TensorData::new(x, [b, h, end, d]), &device);
            return (tensor(kh), tensor(vh));
        }
        let slot = &mut self.layers[layer];
        let (mut kc, mut vc) = match slot.take() {
            Some(Layer::Tensors(kv)) if kv.0.dims()[2] >= end => *kv,
            old => {
                let old = match old {
                    Some(Layer::Tensors(kv)) => Some(*kv),
                    _ => None,
                };
                let cap = self
                    .capacity_hint
                    .max(end)
                    .max(old.as_ref().map_or(0, |(k, _)| 2 * k.dims()[2]));
                let mut kc = Tensor::zeros([b, h, cap, d], (&k.device(), k.dtype()));
                let mut vc = Tensor::zeros([b, h, cap, d], (&k.device(), k.dtype()));
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
        *slot = Some(Layer::Tensors(Box::new((kc, vc))));
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
            let fresh = Tensor::zeros([n, h, cap, d], (&t.device(), t.dtype()));
            if len == 0 {
                return fresh;
            }
            let held = t.clone().slice([0..b, 0..h, 0..len, 0..d]).select(0, idx);
            fresh.slice_assign([0..n, 0..h, 0..len, 0..d], held)
        };
        for layer in self.layers.iter_mut().flatten() {
            match layer {
                Layer::Tensors(kv) => {
                    let (k, v) = &mut **kv;
                    let idx = Tensor::<1, Int>::from_data(
                        TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [n]),
                        &k.device(),
                    );
                    *k = pick(k, idx.clone());
                    *v = pick(v, idx);
                }
                Layer::Host(kv) => *kv = kv.picked(rows, kv.dims[2], len),
            }
        }
    }

    /// Marks `t` more positions as held (after every layer has appended them).
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
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

    /// Host appends (a prompt's, then a step's), tensor appends and a mix hold the same keys
    /// and values; buffers grow past their capacity keeping the held positions; picked rows
    /// keep theirs.
    #[test]
    fn host_and_tensor_appends_hold_the_same_positions() {
        let device = crate::device::default_device();
        let (b, h, t, d) = (2, 3, 5, 4);
        let tensor = |v: &[f32], t: usize| {
            Tensor::<4>::from_data(TensorData::new(v.to_vec(), [b, h, t, d]), &device)
        };
        let (k, v) = (values(b * h * t * d, 1), values(b * h * t * d, 2));
        let steps: Vec<(Vec<f32>, Vec<f32>)> = (0..6)
            .map(|i| (values(b * h * d, 3 + i), values(b * h * d, 30 + i)))
            .collect();
        // Capacity 8: the steps grow the buffers once.
        let mut host = KvCache::new(1, 8);
        let mut mixed = KvCache::new(1, 8);
        host.append_host(0, &k, &v, [b, h, t, d]);
        let (mk, mv) = mixed.append(0, tensor(&k, t), tensor(&v, t));
        assert_eq!(host_values(&mk), k);
        assert_eq!(host_values(&mv), v);
        host.advance(t);
        mixed.advance(t);
        let mut want_k: Vec<Vec<f32>> = k.chunks(t * d).map(<[f32]>::to_vec).collect();
        let mut want_v: Vec<Vec<f32>> = v.chunks(t * d).map(<[f32]>::to_vec).collect();
        for (sk, sv) in &steps {
            host.append_host(0, sk, sv, [b, h, 1, d]);
            let (mk, mv) = mixed.append(0, tensor(sk, 1), tensor(sv, 1));
            for (i, (wk, wv)) in want_k.iter_mut().zip(&mut want_v).enumerate() {
                wk.extend_from_slice(&sk[i * d..(i + 1) * d]);
                wv.extend_from_slice(&sv[i * d..(i + 1) * d]);
            }
            let (hk, hv) = host.held_host(0, 1).unwrap();
            assert_eq!(hk, want_k.concat());
            assert_eq!(hv, want_v.concat());
            assert_eq!(host_values(&mk), hk);
            assert_eq!(host_values(&mv), hv);
            host.advance(1);
            mixed.advance(1);
        }
        assert_eq!(host.capacity(), 16);
        assert_eq!(host.batch(), Some(b));
        // Row 1 twice: its positions, in buffers of the same capacity.
        host.select_rows(&[1, 1]);
        let held = host.len();
        let kv = host.host_layer(0).unwrap();
        assert_eq!(kv.dims(), [2, h, 16, d]);
        for row in 0..2 {
            for head in 0..h {
                let (hk, hv) = kv.head(row, head, held);
                assert_eq!(hk, &want_k[h + head][..]);
                assert_eq!(hv, &want_v[h + head][..]);
            }
        }
    }
}
