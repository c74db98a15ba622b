//! The LLaMA-style decoder (DeepSeek-LLM) as transformers' `LlamaModel` computes it: RMSNorm,
//! half-split ("rotate half") RoPE, grouped/multi-head causal attention, SwiGLU MLP, no biases,
//! an untied `lm_head`.

use burn::module::{Module, Param};
use burn::tensor::{Bool, DType, Tensor, TensorData};

use crate::config::TextConfig;
use crate::error::{Error, Result};
use crate::load::Weights;

use super::Linear;
use super::host_prompt::{
    DecoderParts, DecoderShape, HostDecoder, RopeTables, Scratch, host_values,
};
use super::kv_cache::KvCache;
use super::weight::Matrix;

/// Root-mean-square norm: normalised in f32, cast back, then scaled by the weight.
#[derive(Module, Debug)]
pub struct RmsNorm {
    weight: Param<Tensor<1>>,
    eps: f64,
}

impl RmsNorm {
    fn load(w: &mut Weights<'_>, name: &str, dim: usize, eps: f64) -> Self {
        RmsNorm {
            weight: w.param(name, [dim]),
            eps,
        }
    }

    /// Applies the norm over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let var = x.clone().square().mean_dim(D - 1);
        let y = x / (var + self.eps).sqrt();
        y.cast(dtype) * self.weight.val().unsqueeze()
    }
}

/// cos/sin `[t, head_dim]` of positions `start..start + t` (less `pad` padding positions) times
/// `inv_freq`, computed in f32 as transformers does (`inv_freq = 1 / θ^(2i/d)`,
/// `emb = cat(freqs, freqs)`).
fn rope_tables(start: usize, t: usize, pad: usize, head_dim: usize, theta: f64) -> RopeTables {
    let half = head_dim / 2;
    let base = theta as f32;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(t * head_dim);
    let mut sin = Vec::with_capacity(t * head_dim);
    for p in start..start + t {
        let p = p.saturating_sub(pad) as f32;
        for _ in 0..2 {
            for f in &inv_freq {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    RopeTables { cos, sin }
}

/// Rotary tables for a run of positions, `[rows, 1, t, head_dim]` (one row when every sequence
/// is at the same position).
struct Rope {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rope {
    /// The tables of [`rope_tables`] for each row: row `r` starts at `start − left_pad[r]` (its
    /// padding does not count as positions).
    fn new(
        start: usize,
        t: usize,
        left_pad: &[usize],
        head_dim: usize,
        theta: f64,
        x: &Tensor<4>,
    ) -> Self {
        let offsets: Vec<usize> = if left_pad.iter().all(|&p| p == 0) {
            vec![0]
        } else {
            left_pad.to_vec()
        };
        let rows = offsets.len();
        let mut cos = Vec::with_capacity(rows * t * head_dim);
        let mut sin = Vec::with_capacity(rows * t * head_dim);
        for &pad in &offsets {
            let tables = rope_tables(start, t, pad, head_dim, theta);
            cos.extend(tables.cos);
            sin.extend(tables.sin);
        }
        let opts = (&x.device(), x.dtype());
        Rope {
            cos: Tensor::from_data(TensorData::new(cos, [rows, 1, t, head_dim]), opts),
            sin: Tensor::from_data(TensorData::new(sin, [rows, 1, t, head_dim]), opts),
        }
    }

    /// `x·cos + rotate_half(x)·sin` for `x` of shape `[batch, heads, t, head_dim]`.
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let d = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

#[derive(Module, Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl DecoderLayer {
    fn load(w: &mut Weights<'_>, prefix: &str, c: &TextConfig) -> Self {
        let d = c.hidden_size;
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        let f = c.intermediate_size;
        let p = |s: &str| format!("{prefix}.{s}");
        DecoderLayer {
            input_layernorm: RmsNorm::load(w, &p("input_layernorm.weight"), d, c.rms_norm_eps),
            q_proj: Linear::load(w, &p("self_attn.q_proj"), d, q, false),
            k_proj: Linear::load(w, &p("self_attn.k_proj"), d, kv, false),
            v_proj: Linear::load(w, &p("self_attn.v_proj"), d, kv, false),
            o_proj: Linear::load(w, &p("self_attn.o_proj"), q, d, false),
            post_attention_layernorm: RmsNorm::load(
                w,
                &p("post_attention_layernorm.weight"),
                d,
                c.rms_norm_eps,
            ),
            gate_proj: Linear::load(w, &p("mlp.gate_proj"), d, f, false),
            up_proj: Linear::load(w, &p("mlp.up_proj"), d, f, false),
            down_proj: Linear::load(w, &p("mlp.down_proj"), f, d, false),
        }
    }

    /// The layer's operands for the host pass over a prompt, where every product of it takes
    /// bf16 products on this machine.
    fn host(&self) -> Option<HostDecoder<'_>> {
        HostDecoder::of(DecoderParts {
            input_norm: (&self.input_layernorm.weight, self.input_layernorm.eps),
            post_norm: (
                &self.post_attention_layernorm.weight,
                self.post_attention_layernorm.eps,
            ),
            q: &self.q_proj,
            k: &self.k_proj,
            v: &self.v_proj,
            o: &self.o_proj,
            gate: &self.gate_proj,
            up: &self.up_proj,
            down: &self.down_proj,
        })
    }

    /// One layer over `x` (`[batch, t, hidden]`), whose rows are the groups' rows in order:
    /// each group attends over its own cache with its own positions and mask; the products
    /// run over all rows at once.
    fn forward(
        &self,
        x: Tensor<3>,
        groups: &mut [Group<'_>],
        layer: usize,
        c: &TextConfig,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        // A decoding step (one position per row) takes the row-invariant products.
        let step = t == 1;
        let normed = self.input_layernorm.forward(x.clone());
        let [q, k, v]: [Tensor<3>; 3] =
            Linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], normed, step)
                .try_into()
                .expect("three layers give three outputs");
        let q = q.reshape([b, t, h, hd]).swap_dims(1, 2);
        let k = k.reshape([b, t, kvh, hd]).swap_dims(1, 2);
        let v = v.reshape([b, t, kvh, hd]).swap_dims(1, 2);
        let bf16 = self.q_proj.bf16_path();
        let scale = 1.0 / (hd as f64).sqrt();
        let attend = |g: &mut Group<'_>, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>| {
            let q = g.rope.apply(q);
            let k = g.rope.apply(k);
            if step && g.cache.takes_host(layer, &k) {
                // A step over a cache in host memory: its keys and values read in place.
                let dims = k.dims();
                let s = g.cache.len() + 1;
                let host = super::host_prompt::host_values::<4>;
                g.cache.append_host(layer, &host(&k), &host(&v), dims);
                let kv = g.cache.host_layer(layer).expect("just written");
                return super::attention::step_host(q, kv, s, g.mask.as_ref(), scale);
            }
            let (k, v) = g.cache.append(layer, k, v);
            let (k, v) = if kvh == h {
                (k, v)
            } else {
                (repeat_kv(k, h / kvh), repeat_kv(v, h / kvh))
            };
            super::attention::causal(q, k, v, g.mask.as_ref(), scale, bf16)
        };
        let o = if let [g] = groups {
            attend(g, q, k, v)
        } else {
            let mut start = 0;
            let mut parts = Vec::with_capacity(groups.len());
            for g in groups.iter_mut() {
                let n = g.rows;
                let part = |x: &Tensor<4>| x.clone().narrow(0, start, n);
                parts.push(attend(g, part(&q), part(&k), part(&v)));
                start += n;
            }
            Tensor::cat(parts, 0)
        };
        let o = o.swap_dims(1, 2).reshape([b, t, h * hd]);
        let x = x + self.o_proj.apply(o, step);
        let normed = self.post_attention_layernorm.forward(x.clone());
        let [gate, up]: [Tensor<3>; 2] =
            Linear::forward_many(&[&self.gate_proj, &self.up_proj], normed, step)
                .try_into()
                .expect("two layers give two outputs");
        let mlp = super::activation::silu_f32(gate) * up;
        x + self.down_proj.apply(mlp, step)
    }
}

/// The rows of one sequence (or of sequences sharing a cache) in a batched forward pass: their
/// count, cache, rotary tables and padding mask.
struct Group<'a> {
    rows: usize,
    cache: &'a mut KvCache,
    rope: Rope,
    mask: Option<Tensor<4, Bool>>,
}

/// `[b, kv_heads, s, d]` → `[b, kv_heads · n, s, d]`, each head repeated `n` times in place.
fn repeat_kv(x: Tensor<4>, n: usize) -> Tensor<4> {
    let [b, kvh, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n, s, d])
        .reshape([b, kvh * n, s, d])
}

/// The language model: token embeddings, decoder layers, final norm and `lm_head` (the
/// parameters of Janus' second training stage).
#[derive(Module, Debug)]
pub struct Llm {
    embed_tokens: Matrix,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    #[module(skip)]
    config: TextConfig,
}

impl Llm {
    /// Loads `language_model.*`. Without an `lm_head` tensor, a config that ties the
    /// embeddings reuses `embed_tokens`.
    pub(crate) fn load(w: &mut Weights<'_>, c: &TextConfig) -> Self {
        let (v, d) = (c.vocab_size, c.hidden_size);
        // The table takes the chosen storage, quantized ones included (a lookup dequantizes just
        // the rows taken), as GGML's q8_0 files hold `token_embd`.
        let embed_tokens = w.matrix("language_model.model.embed_tokens.weight", &[v, d], true);
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, &format!("language_model.model.layers.{i}"), c))
            .collect();
        let norm = RmsNorm::load(w, "language_model.model.norm.weight", d, c.rms_norm_eps);
        let head_name = "language_model.lm_head.weight";
        let lm_head = if c.tie_word_embeddings && !w.contains(head_name) {
            embed_tokens.clone()
        } else {
            w.matrix(head_name, &[v, d], true)
        };
        Llm {
            embed_tokens,
            layers,
            norm,
            lm_head: Linear::from_weight(lm_head),
            config: c.clone(),
        }
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// The names of a decoder layer's projections (what LoRA adapts), as in the checkpoints:
    /// `language_model.model.layers.{i}.{name}.weight`.
    pub const PROJECTIONS: [&'static str; 7] = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];

    /// Every decoder layer's projections with their layer index and name (one of
    /// [`PROJECTIONS`](Self::PROJECTIONS)), layer by layer.
    pub(crate) fn projections_mut(&mut self) -> Vec<(usize, &'static str, &mut Linear)> {
        let mut out = Vec::with_capacity(7 * self.layers.len());
        for (i, l) in self.layers.iter_mut().enumerate() {
            let [q, k, v, o, gate, up, down] = Self::PROJECTIONS;
            out.extend([
                (i, q, &mut l.q_proj),
                (i, k, &mut l.k_proj),
                (i, v, &mut l.v_proj),
                (i, o, &mut l.o_proj),
                (i, gate, &mut l.gate_proj),
                (i, up, &mut l.up_proj),
                (i, down, &mut l.down_proj),
            ]);
        }
        out
    }

    /// [`projections_mut`](Self::projections_mut), to read.
    pub(crate) fn projections(&self) -> Vec<(usize, &'static str, &Linear)> {
        let mut out = Vec::with_capacity(7 * self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let [q, k, v, o, gate, up, down] = Self::PROJECTIONS;
            out.extend([
                (i, q, &l.q_proj),
                (i, k, &l.k_proj),
                (i, v, &l.v_proj),
                (i, o, &l.o_proj),
                (i, gate, &l.gate_proj),
                (i, up, &l.up_proj),
                (i, down, &l.down_proj),
            ]);
        }
        out
    }

    /// The compute dtype of the weights.
    pub fn dtype(&self) -> burn::tensor::DType {
        self.norm.weight.dtype()
    }

    /// A cache sized for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.config.num_hidden_layers, capacity)
    }

    /// Token embeddings for `ids` (`[batch, t]`), `[batch, t, hidden]`. Every id must be below
    /// the vocabulary size.
    pub fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        if b == 0 || t == 0 {
            return Err(Error::InvalidInput("no token ids".into()));
        }
        if ids.iter().any(|row| row.len() != t) {
            return Err(Error::InvalidInput(
                "token rows of different lengths".into(),
            ));
        }
        let vocab = self.config.vocab_size;
        let flat: Vec<usize> = ids.iter().flatten().map(|&i| i as usize).collect();
        if let Some(bad) = flat.iter().find(|&&i| i >= vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let device = self.norm.weight.device();
        let rows = self.embed_tokens.gather(&flat, self.dtype(), &device);
        Ok(rows.reshape([b, t, self.config.hidden_size]))
    }

    /// Runs the decoder over `x` (`[batch, t, hidden]`) after the positions held in `cache`,
    /// appending to it. Returns the hidden states after the final norm. Rows the cache marks as
    /// left-padded ([`KvCache::set_left_padding`]) ignore their padding positions and count
    /// their positions from the first real token.
    pub fn forward(&self, x: Tensor<3>, cache: &mut KvCache) -> Result<Tensor<3>> {
        let b = x.dims()[0];
        self.forward_groups(x, &mut [(b, cache)])
    }

    /// [`forward`](Self::forward) for several sequences at once, each with its own cache:
    /// `x`'s rows are the groups' rows in order (`groups[i].0` rows for cache `groups[i].1`).
    /// The products run over all rows together; each group attends over its own cache with its
    /// own positions and padding. With one position per row (a decoding step) every row gets
    /// bit-identically what its group gets alone (on the CPU backend; the products are
    /// row-invariant, see [`Linear::forward_step`]).
    pub fn forward_groups(
        &self,
        x: Tensor<3>,
        groups: &mut [(usize, &mut KvCache)],
    ) -> Result<Tensor<3>> {
        self.run(x, groups, true)
    }

    /// [`forward_groups`](Self::forward_groups); `host`: a prompt may take the host pass.
    fn run(
        &self,
        x: Tensor<3>,
        groups: &mut [(usize, &mut KvCache)],
        host: bool,
    ) -> Result<Tensor<3>> {
        let [b, t, d] = x.dims();
        if d != self.config.hidden_size || t == 0 {
            return Err(Error::InvalidInput(format!(
                "expected embeddings [batch, t>0, {}], got [{b}, {t}, {d}]",
                self.config.hidden_size
            )));
        }
        let total: usize = groups.iter().map(|(n, _)| n).sum();
        if total != b || groups.iter().any(|(n, _)| *n == 0) {
            return Err(Error::InvalidInput(format!(
                "groups of {:?} rows for an input of {b} rows",
                groups.iter().map(|(n, _)| *n).collect::<Vec<_>>()
            )));
        }
        let c = &self.config;
        let probe: Tensor<4> = x.clone().narrow(0, 0, 1).narrow(1, 0, 1).unsqueeze();
        let mut parts = Vec::with_capacity(groups.len());
        for (rows, cache) in groups.iter_mut() {
            let rows = *rows;
            if let Some(k) = cache.batch()
                && k != rows
            {
                return Err(Error::InvalidInput(format!(
                    "the cache holds {k} rows, the input has {rows}"
                )));
            }
            let pads = cache.left_padding().to_vec();
            if !pads.is_empty() && pads.len() != rows {
                return Err(Error::InvalidInput(format!(
                    "left padding given for {} rows, the input has {rows}",
                    pads.len()
                )));
            }
            let start = cache.len();
            let rope = Rope::new(start, t, &pads, c.head_dim, c.rope_theta, &probe);
            // Padding keys are hidden from every query of their row.
            let mask = pads.iter().any(|&p| p > 0).then(|| {
                let total = start + t;
                let flags: Vec<bool> = pads
                    .iter()
                    .flat_map(|&p| (0..t).flat_map(move |_| (0..total).map(move |j| j < p)))
                    .collect();
                Tensor::<4, Bool>::from_data(
                    TensorData::new(flags, [rows, 1, t, total]),
                    &x.device(),
                )
            });
            parts.push(Group {
                rows,
                cache,
                rope,
                mask,
            });
        }
        let mut x = x;
        match self.host_prompt(&x, &parts).filter(|_| host) {
            Some(layers) => {
                drop(parts);
                let (_, cache) = &mut groups[0];
                x = self.forward_host(&layers, x, cache);
            }
            None => {
                for (i, layer) in self.layers.iter().enumerate() {
                    x = layer.forward(x, &mut parts, i, c);
                }
                drop(parts);
            }
        }
        for (_, cache) in groups.iter_mut() {
            cache.advance(t);
        }
        Ok(self.norm.forward(x))
    }

    /// The layers' operands for the host pass over a prompt ([`host_prompt`](super::host_prompt)):
    /// bf16 compute on the CPU (f32 activations, every product on the bf16 kernels), a prompt
    /// (more positions than a decoding step takes) of one sequence without padding.
    fn host_prompt(&self, x: &Tensor<3>, groups: &[Group<'_>]) -> Option<Vec<HostDecoder<'_>>> {
        let [b, t, _] = x.dims();
        let one = matches!(groups, [g] if g.mask.is_none() && g.rows == 1);
        if b != 1
            || !one
            || t <= super::attention::DIRECT_MAX_QUERIES
            || x.dtype() != DType::F32
            || !crate::device::is_cpu(&x.device())
        {
            return None;
        }
        self.layers.iter().map(DecoderLayer::host).collect()
    }

    /// Every layer over one sequence's prompt `x` (`[1, t, hidden]`) on host buffers, appending
    /// to `cache` (not yet advanced).
    fn forward_host(
        &self,
        layers: &[HostDecoder<'_>],
        x: Tensor<3>,
        cache: &mut KvCache,
    ) -> Tensor<3> {
        let c = &self.config;
        let [b, t, w] = x.dims();
        let device = x.device();
        let mut values = host_values(&x);
        let rope = rope_tables(cache.len(), t, 0, c.head_dim, c.rope_theta);
        let mut scratch = Scratch::default();
        for (i, layer) in layers.iter().enumerate() {
            let shape = DecoderShape {
                layer: i,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            };
            layer.forward(&mut values, w, shape, &rope, cache, &device, &mut scratch);
        }
        Tensor::from_data(TensorData::new(values, [b, t, w]), &device)
    }

    /// Text logits `[batch, t, vocab]` for hidden states from [`forward`](Self::forward), with
    /// the row-invariant products of a decoding step: a row's logits do not depend on the
    /// other rows.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.lm_head.forward_step(hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::host_prompt::tests::{compare, linear, value, vector};

    /// A prompt through decoder layers on host buffers against their tensor form, on the bf16
    /// products (two query heads of 32 over one key/value head), with an empty cache and then
    /// after the positions of a first prompt; the caches must end up alike.
    #[test]
    fn decoder_layers_on_host_buffers_match_the_tensor_form() {
        if crate::nn::kernels::Bf16Gemm::selected().unwrap().is_none() {
            return;
        }
        let (d, heads, kv_heads, head_dim, f) = (64, 2, 1, 32, 96);
        let config = TextConfig {
            vocab_size: 32,
            hidden_size: d,
            intermediate_size: f,
            num_hidden_layers: 2,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
        };
        let norm = |seed| RmsNorm {
            weight: crate::nn::param(vector(d, seed, 1.0)),
            eps: 1e-6,
        };
        let layers = (0..2)
            .map(|i| DecoderLayer {
                input_layernorm: norm(20 * i),
                q_proj: linear(heads * head_dim, d, 20 * i + 1, false),
                k_proj: linear(kv_heads * head_dim, d, 20 * i + 2, false),
                v_proj: linear(kv_heads * head_dim, d, 20 * i + 3, false),
                o_proj: linear(d, heads * head_dim, 20 * i + 4, false),
                post_attention_layernorm: norm(20 * i + 5),
                gate_proj: linear(f, d, 20 * i + 6, false),
                up_proj: linear(f, d, 20 * i + 7, false),
                down_proj: linear(d, f, 20 * i + 8, false),
            })
            .collect();
        let llm = Llm {
            embed_tokens: linear(32, d, 90, false).weight,
            layers,
            norm: norm(91),
            lm_head: linear(32, d, 92, false),
            config,
        };
        let device = crate::device::default_device();
        let prompt = |t: usize, seed: usize| {
            let x: Vec<f32> = (0..t * d).map(|i| 2.0 * value(i, seed)).collect();
            Tensor::<3>::from_data(TensorData::new(x, [1, t, d]), &device)
        };
        let mut host_cache = llm.new_cache(8);
        let mut tensor_cache = llm.new_cache(8);
        for (t, seed) in [(40, 1), (23, 2)] {
            let x = prompt(t, seed);
            let got = llm
                .run(x.clone(), &mut [(1, &mut host_cache)], true)
                .unwrap();
            let want = llm.run(x, &mut [(1, &mut tensor_cache)], false).unwrap();
            let worst = compare(got, want);
            println!("{t} positions: host against tensor form {worst:.2e}");
            assert!(worst < 1e-3, "{t} positions: {worst}");
        }
        assert_eq!(host_cache.len(), tensor_cache.len());
        // One decoding step over each cache: the keys and values the prompts left agree.
        let x = prompt(1, 3);
        let got = llm.forward(x.clone(), &mut host_cache).unwrap();
        let want = llm.forward(x, &mut tensor_cache).unwrap();
        let worst = compare(got, want);
        assert!(worst < 1e-3, "step: {worst}");
    }
}
