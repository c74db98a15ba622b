//! Attention: causal for the decoder over its key/value cache, bidirectional for SigLIP.
//!
//! A prompt (many queries) goes to the backend's fused attention, or with bf16 compute on the CPU
//! to [`bf16_prompt`]: per row and head, `q·kᵀ` and `p·v` on the bf16 products of
//! [`kernels::bf16_gemm`](super::kernels::bf16_gemm), scale, mask and softmax in f32 between
//! them (PyTorch's bf16 eager attention rounds the same operands). A decoding step (a query or a
//! few per row) is written out as `softmax(q·kᵀ·scale)·v` with tensor products: they read the
//! cache in place, where a fused kernel may first copy every key and value into a buffer of its
//! own (on the CPU backend, 5.6 ms per layer at 630 positions against 0.3 ms this way). Scores
//! and softmax are f32 whatever the compute dtype, as the fused kernels compute them.

use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Tensor, TensorData};
use rayon::prelude::*;

use super::activation::exp_neg;
use super::kernels::bf16_gemm::{ALIGN, Aligned, Out, aligned};
use super::kernels::simd::{self, widest};
use super::kernels::{Bf16Gemm, bf16_gemm};
use super::kv_cache::HostKv;

/// Most queries per row that take the written-out form.
pub(crate) const DIRECT_MAX_QUERIES: usize = 16;

/// Attention of `q` (`[b, h, t, d]`, the last `t` positions) over `k`, `v` (`[b, h, s, d]`,
/// every position so far, `s ≥ t`): query `i` sees keys `0..=s − t + i`, minus those `hidden`
/// marks (`[b, 1, t, s]`, true = hidden). `bf16`: the bf16 path of the layers around it (bf16
/// compute on the CPU), which a prompt's attention then takes too.
pub(crate) fn causal(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    hidden: Option<&Tensor<4, Bool>>,
    scale: f64,
    bf16: Option<Bf16Gemm>,
) -> Tensor<4> {
    let [b, h, t, d] = q.dims();
    let s = k.dims()[2];
    if t > DIRECT_MAX_QUERIES {
        if let Some(path) = bf16.filter(|_| bf16_prompt_applies(&q, &k, d)) {
            return bf16_prompt(path, q, k, v, hidden, scale, true);
        }
        let options = AttentionModuleOptions {
            scale: Some(scale),
            softcap: None,
            is_causal: true,
        };
        let mask = hidden.map(|m| m.clone().expand([b, h, t, s]));
        return attention(q, k, v, mask, None, options);
    }
    let dtype = q.dtype();
    let (q, k, v) = if dtype == DType::F32 {
        (q, k, v)
    } else {
        (q.cast(DType::F32), k.cast(DType::F32), v.cast(DType::F32))
    };
    let mut scores = q.matmul(k.swap_dims(2, 3)) * scale;
    let device = scores.device();
    let mut mask: Option<Tensor<4, Bool>> = hidden.map(|m| m.clone().expand([b, h, t, s]));
    if t > 1 {
        // Key j is in query i's future when j > s − t + i.
        let future = Tensor::<2, Bool>::tril_mask([t, s], (s - t) as i64, &device)
            .unsqueeze::<4>()
            .expand([b, h, t, s]);
        mask = Some(match mask {
            Some(m) => m.bool_or(future),
            None => future,
        });
    }
    if let Some(mask) = mask {
        // The lowest finite value, as transformers masks: a query that sees no key at all (a
        // left-padding position of the prompt) then averages the values instead of dividing by
        // zero, and its output stays finite, so it cannot poison later layers through 0 × NaN.
        scores = scores.mask_fill(mask, f32::MIN);
    }
    let out = softmax(scores, 3).matmul(v);
    if dtype == DType::F32 {
        out
    } else {
        out.cast(dtype)
    }
}

/// A decoding step's attention over a cache kept in host memory: `q` (`[b, h, 1, d]`) over the
/// first `s` keys and values of its row in `kv` (kv head `i / (h / kv_heads)` for query head
/// `i`), minus those `hidden` marks (`[b, 1, 1, s]`, true = hidden; a row that sees no key
/// averages the values, as the tensor form does). Each row and head is a task on the pool that
/// reads its keys and values once, in place.
pub(crate) fn step_host(
    q: Tensor<4>,
    kv: &HostKv,
    s: usize,
    hidden: Option<&Tensor<4, Bool>>,
    scale: f64,
) -> Tensor<4> {
    let [b, h, t, d] = q.dims();
    let [_, kvh, _, kd] = kv.dims();
    assert!(
        t == 1 && kd == d && h.is_multiple_of(kvh),
        "a step of [{b}, {h}, {t}, {d}] over kv heads of {kvh} × {kd}"
    );
    let device = q.device();
    let queries = super::host_prompt::host_values(&q);
    let mask: Option<Vec<bool>> = hidden.map(|m| {
        m.clone()
            .into_data()
            .try_to_vec::<bool>()
            .expect("a mask reads back as bool")
    });
    let scale = scale as f32;
    let mut out = vec![0.0f32; b * h * d];
    out.par_chunks_mut(d).enumerate().for_each(|(task, o)| {
        let (row, head) = (task / h, task % h);
        let (keys, values) = kv.head(row, head / (h / kvh), s);
        let q = &queries[task * d..][..d];
        let hid = mask.as_ref().map(|m| &m[row * s..][..s]);
        widest(
            #[inline(always)]
            || step_head(q, keys, values, hid, scale, o),
        );
    });
    Tensor::from_data(TensorData::new(out, [b, h, 1, d]), &device)
}

/// One query over `keys` and `values` (rows of `q.len()`) into `out`: scores, their softmax
/// ([`softmax_row`]) and the weighted sum of the values.
#[inline(always)]
fn step_head(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    hidden: Option<&[bool]>,
    scale: f32,
    out: &mut [f32],
) {
    const LANES: usize = 16;
    let d = q.len();
    let mut scores: Vec<f32> = keys
        .chunks_exact(d)
        .map(|k| {
            let mut acc = [0.0f32; LANES];
            let (qs, ks) = (q.chunks_exact(LANES), k.chunks_exact(LANES));
            let tail: f32 = qs
                .remainder()
                .iter()
                .zip(ks.remainder())
                .map(|(a, b)| a * b)
                .sum();
            for (qc, kc) in qs.zip(ks) {
                for i in 0..LANES {
                    acc[i] += qc[i] * kc[i];
                }
            }
            acc.iter().sum::<f32>() + tail
        })
        .collect();
    let n = scores.len();
    let norm = softmax_row(&mut scores, n, n, hidden, scale);
    out.fill(0.0);
    for (&p, v) in scores.iter().zip(values.chunks_exact(d)) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
    for o in out.iter_mut() {
        *o *= norm;
    }
}

/// Attention of every query of `q` (`[b, h, t, d]`) over every key of `k`, `v` (`[b, h, s, d]`),
/// as SigLIP attends; `bf16` as for [`causal`].
pub(crate) fn bidirectional(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    bf16: Option<Bf16Gemm>,
) -> Tensor<4> {
    let d = q.dims()[3];
    if let Some(path) = bf16.filter(|_| bf16_prompt_applies(&q, &k, d)) {
        return bf16_prompt(path, q, k, v, None, scale, false);
    }
    let options = AttentionModuleOptions {
        scale: Some(scale),
        softcap: None,
        is_causal: false,
    };
    attention(q, k, v, None, None, options)
}

/// Whether [`bf16_prompt`] takes these operands: f32 on the CPU, as many key heads as query
/// heads, a head width the bf16 products cover.
fn bf16_prompt_applies(q: &Tensor<4>, k: &Tensor<4>, d: usize) -> bool {
    q.dtype() == DType::F32
        && crate::device::is_cpu(&q.device())
        && q.dims()[1] == k.dims()[1]
        && Bf16Gemm::covers(super::kernels::bf16_gemm::ALIGN, d)
}

/// [`prompt_host`] over tensors: f32 CPU tensors read back, the result made a tensor again.
fn bf16_prompt(
    path: Bf16Gemm,
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    hidden: Option<&Tensor<4, Bool>>,
    scale: f64,
    causal: bool,
) -> Tensor<4> {
    let [b, h, t, d] = q.dims();
    let s = k.dims()[2];
    let device = q.device();
    let host = |x: Tensor<4>| -> Vec<f32> {
        x.into_data()
            .try_into_vec()
            .expect("an f32 tensor reads back as f32")
    };
    let (q, k, v) = (host(q), host(k), host(v));
    let hidden: Option<Vec<bool>> = hidden.map(|m| {
        m.clone()
            .into_data()
            .try_into_vec()
            .expect("a mask reads back as bool")
    });
    let shape = HostShape {
        b,
        h,
        kvh: h,
        t,
        s,
        d,
        tokens: false,
    };
    let mut out = vec![0.0f32; b * h * t * d];
    prompt_host(
        Some(path),
        &q,
        &k,
        &v,
        shape,
        hidden.as_deref(),
        scale as f32,
        causal,
        &mut out,
    );
    Tensor::from_data(TensorData::new(out, [b, h, t, d]), &device)
}

/// The shape of a [`prompt_host`] attention: `b` rows of `h` query heads over `kvh` key/value
/// heads (`h` a multiple of `kvh`; query head `i` reads key/value head `i / (h / kvh)`), `t`
/// queries, the last of `s` positions, head width `d`; with `tokens` the output is laid out
/// `[b, t, h·d]` (each position's heads side by side, as the output projection reads them)
/// instead of `[b, h, t, d]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostShape {
    pub b: usize,
    pub h: usize,
    pub kvh: usize,
    pub t: usize,
    pub s: usize,
    pub d: usize,
    pub tokens: bool,
}

/// Where one head's output rows go: row `i` (`d` values) at `base + i·stride`.
#[derive(Clone, Copy)]
struct OutRows {
    base: *mut f32,
    stride: usize,
    d: usize,
}

// SAFETY: each task writes the rows of its own head only (see `prompt_host`), and the output
// outlives the parallel loop.
unsafe impl Send for OutRows {}
unsafe impl Sync for OutRows {}

impl OutRows {
    /// Row `i`.
    ///
    /// # Safety
    /// `i` must be below the head's query count, and no other reference to the row may live.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, i: usize) -> &mut [f32] {
        // SAFETY: the caller's promise; `prompt_host` checked the output's length.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(i * self.stride), self.d) }
    }
}

/// Attention of host values, one task per row and query head on the thread pool: `q` `[b, h, t,
/// d]`, `k` and `v` `[b, kvh, s, d]`, `out` as `shape.tokens` says. The scores `q·kᵀ`, then in
/// f32 the scale, the mask (`causal`: query `i` sees keys `0..=s − t + i`; `hidden` `[b, t, s]`, true = hidden, as
/// for [`causal`]) and the softmax, then `p·v`. With `path` and a head width it covers, both
/// products take bf16 operands with f32 sums (keys and `vᵀ` padded with zero rows to a multiple
/// of 32), as PyTorch's bf16 eager attention rounds them; otherwise they are summed in f32. A
/// query that sees no key averages every value, as the written-out form does (all scores at
/// the lowest finite value).
#[allow(clippy::too_many_arguments)]
pub(crate) fn prompt_host(
    path: Option<Bf16Gemm>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: HostShape,
    hidden: Option<&[bool]>,
    scale: f32,
    causal: bool,
    out: &mut [f32],
) {
    let HostShape {
        b,
        h,
        kvh,
        t,
        s,
        d,
        tokens,
    } = shape;
    assert!(
        kvh > 0 && h.is_multiple_of(kvh) && s >= t,
        "attention shape {shape:?}"
    );
    assert_eq!(q.len(), b * h * t * d, "queries of {shape:?}");
    assert_eq!(k.len(), b * kvh * s * d, "keys of {shape:?}");
    assert_eq!(v.len(), b * kvh * s * d, "values of {shape:?}");
    assert_eq!(out.len(), b * h * t * d, "output of {shape:?}");
    let path = path.filter(|_| Bf16Gemm::covers(super::kernels::bf16_gemm::ALIGN, d));
    let padded = match path {
        Some(_) => s.next_multiple_of(super::kernels::bf16_gemm::ALIGN),
        None => s,
    };
    let all = Out(out.as_mut_ptr());
    (0..b * h).into_par_iter().for_each(move |task| {
        let all = all;
        let row = task / h;
        // SAFETY: inside `out` (its length was checked); each task's rows are its own.
        let out = unsafe {
            match tokens {
                false => OutRows {
                    base: all.0.add(task * t * d),
                    stride: d,
                    d,
                },
                true => OutRows {
                    base: all.0.add(row * t * h * d + task % h * d),
                    stride: h * d,
                    d,
                },
            }
        };
        let kv = row * kvh + task % h / (h / kvh);
        let (kh, vh) = (&k[kv * s * d..][..s * d], &v[kv * s * d..][..s * d]);
        let qh = &q[task * t * d..][..t * d];
        // Taken out of the thread's slot, not borrowed from it: the products below wait on
        // the pool, and this thread may meanwhile run another head's task, which then
        // finds the slot empty and makes its own.
        let mut scratch = SCRATCH.take();
        widest(
            #[inline(always)]
            || {
                let softmax = Softmax {
                    row,
                    hidden,
                    scale,
                    causal,
                };
                head(
                    path,
                    qh,
                    kh,
                    vh,
                    (t, s, d, padded),
                    softmax,
                    &mut scratch,
                    out,
                )
            },
        );
        SCRATCH.set(scratch);
    });
}

/// A head's buffers (see [`SCRATCH`]).
struct Scratch {
    /// Scores, then softmax weights, `[t, padded]` (AMX: `[t` rounded up to 32`, padded]`).
    p: Aligned<f32>,
    /// Each query's 1/Σ.
    norms: Vec<f32>,
    /// bf16 keys (AMX: queries).
    keys: Aligned<u16>,
    /// bf16 `vᵀ` (AMX: a block's softmax weights).
    values_t: Aligned<u16>,
    /// AMX: the keys as pairs of rows.
    key_pairs: Aligned<u32>,
    /// AMX: the values as pairs of columns.
    value_pairs: Aligned<u32>,
    /// The output rows before their 1/Σ (AMX: a block's).
    wide: Aligned<f32>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            p: aligned(),
            norms: Vec::new(),
            keys: aligned(),
            values_t: aligned(),
            key_pairs: aligned(),
            value_pairs: aligned(),
            wide: aligned(),
        }
    }
}

thread_local! {
    /// A task's buffers, kept between tasks.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// How a head's scores become softmax weights: the batch row (for `hidden`, `[b, t, s]`, true =
/// hidden), the scale, causal or not.
#[derive(Clone, Copy)]
struct Softmax<'a> {
    row: usize,
    hidden: Option<&'a [bool]>,
    scale: f32,
    causal: bool,
}

/// One query head of [`prompt_host`]: `qh` `[t, d]` over `kh`, `vh` `[s, d]` into `out`
/// `[t, d]`; `padded`: the key count the products take.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn head(
    path: Option<Bf16Gemm>,
    qh: &[f32],
    kh: &[f32],
    vh: &[f32],
    (t, s, d, padded): (usize, usize, usize, usize),
    softmax: Softmax<'_>,
    sc: &mut Scratch,
    out: OutRows,
) {
    #[cfg(target_arch = "x86_64")]
    if path == Some(Bf16Gemm::Amx) {
        return head_amx(qh, kh, vh, (t, s, d, padded), softmax, sc, out);
    }
    let Scratch {
        p,
        norms,
        keys,
        values_t,
        wide,
        ..
    } = sc;
    let bf16 = simd::bf16_bits;
    // The head's output rows, scaled into `out` at the end.
    set_len(wide, t * d);
    // Every score is written by the product below (padding keys give 0).
    p.resize(t * padded, 0.0);
    match path {
        Some(path) => {
            keys.clear();
            keys.resize(padded * d, 0);
            for (k, &x) in keys.iter_mut().zip(kh) {
                *k = bf16(x);
            }
            bf16_gemm(path, qh, t, keys, d, p)
                .expect("the head width is covered and the shapes match");
        }
        None => {
            for (qr, pr) in qh.chunks_exact(d).zip(p.chunks_exact_mut(padded)) {
                for (x, kr) in pr.iter_mut().zip(kh.chunks_exact(d)) {
                    *x = qr.iter().zip(kr).map(|(a, b)| a * b).sum();
                }
            }
        }
    }
    softmax_rows(p, (t, s, padded), softmax, norms);
    match path {
        Some(path) => {
            values_t.clear();
            values_t.resize(d * padded, 0);
            for (j, vr) in vh.chunks_exact(d).enumerate() {
                for (c, &x) in vr.iter().enumerate() {
                    values_t[c * padded + j] = bf16(x);
                }
            }
            bf16_gemm(path, p, t, values_t, padded, wide)
                .expect("the head width is covered and the shapes match");
        }
        None => {
            for (pr, or) in p.chunks_exact(padded).zip(wide.chunks_exact_mut(d)) {
                or.fill(0.0);
                for (&w, vr) in pr.iter().zip(vh.chunks_exact(d)) {
                    for (o, &x) in or.iter_mut().zip(vr) {
                        *o += w * x;
                    }
                }
            }
        }
    }
    for (i, (wr, &n)) in wide.chunks_exact(d).zip(norms.iter()).enumerate() {
        // SAFETY: `i < t`; this task's rows are its own.
        let or = unsafe { out.row(i) };
        for (o, &w) in or.iter_mut().zip(wr) {
            *o = w * n;
        }
    }
}

/// The softmax of the first `t` rows of `padded` scores in `p`, each left unnormalised with its
/// 1/Σ in `norms` (the output row is scaled at the end).
#[inline(always)]
fn softmax_rows(
    p: &mut [f32],
    (t, s, padded): (usize, usize, usize),
    softmax: Softmax<'_>,
    norms: &mut Vec<f32>,
) {
    let Softmax {
        row,
        hidden,
        scale,
        causal,
    } = softmax;
    // (Plain loops here and in the callers, not `extend` over an iterator: the iterator's
    // `fold` would be a function of its own, compiled without the vector instructions `widest`
    // enables.)
    norms.clear();
    for (i, pr) in p.chunks_exact_mut(padded).take(t).enumerate() {
        // Keys 0..upto are not in the query's future.
        let upto = if causal { s - t + i + 1 } else { s };
        let mask = hidden.map(|m| &m[(row * t + i) * s..][..upto]);
        norms.push(softmax_row(pr, upto, s, mask, scale));
    }
}

/// [`head`] on AMX, 32 queries at a time on this thread: their scores against the keys they
/// see (a causal block stops at its last query's key, and skips the products past it), the
/// softmax, then `p·v`, every buffer a block's size (a whole head's scores would not stay in
/// the core's L2). The operands round to bf16 as in [`head`]: the queries as rows, the keys as
/// the products' pairs of rows, the softmax weights as rows and the values as pairs of
/// columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn head_amx(
    qh: &[f32],
    kh: &[f32],
    vh: &[f32],
    (t, s, d, padded): (usize, usize, usize, usize),
    softmax: Softmax<'_>,
    sc: &mut Scratch,
    out: OutRows,
) {
    use super::kernels::bf16_gemm::amx::{self, TILE};
    let Softmax {
        row,
        hidden,
        scale,
        causal,
    } = softmax;
    let bf16 = simd::bf16_bits;
    // Queries as bf16 rows, zero rows up to a multiple of the block.
    let rows = t.next_multiple_of(ALIGN);
    set_len(&mut sc.keys, rows * d);
    let (queries, pad) = sc.keys.split_at_mut(t * d);
    for (q, &x) in queries.iter_mut().zip(qh) {
        *q = bf16(x);
    }
    pad.fill(0);
    amx::pack_here(kh, s, d, &mut sc.key_pairs);
    amx::pack_columns(vh, s, d, &mut sc.value_pairs);
    set_len(&mut sc.p, ALIGN * padded);
    set_len(&mut sc.values_t, ALIGN * padded);
    set_len(&mut sc.wide, ALIGN * d);
    // Values between two 16-key blocks of the packed keys, two 16-column blocks of the values.
    let (key_block, value_block) = ((d / 2) * TILE, (padded / 2) * TILE);
    let vector_softmax = vector_softmax();
    // SAFETY: the AMX path was selected, so AMX is usable.
    unsafe { amx::configure_tiles() };
    for q0 in (0..t).step_by(ALIGN) {
        let n = ALIGN.min(t - q0);
        // The keys a query of the block sees (all of them where a mask may hide every
        // one: such a query averages all `s` values).
        let seen = match (causal, hidden) {
            (true, None) => s - t + q0 + n,
            _ => s,
        };
        let width = seen.next_multiple_of(ALIGN);
        for k0 in (0..width).step_by(ALIGN) {
            // SAFETY: tiles configured below; the queries hold 32 rows of `d` from `q0`
            // (rows up to `t` rounded up to 32), the packed keys 16-key blocks up to
            // `padded` ≥ `width`, the scores 32 rows of `padded`.
            unsafe {
                amx::block_32x32(
                    sc.keys.as_ptr().add(q0 * d),
                    2 * d,
                    sc.key_pairs.as_ptr().add(k0 / TILE * key_block),
                    key_block,
                    d / ALIGN,
                    sc.p.as_mut_ptr().add(k0),
                    4 * padded,
                )
            };
        }
        sc.norms.clear();
        let probs = sc.values_t.chunks_exact_mut(padded);
        for (i, (pr, wr)) in sc.p.chunks_exact_mut(padded).zip(probs).enumerate() {
            let (pr, wr) = (&mut pr[..width], &mut wr[..width]);
            if i >= n {
                wr.fill(0);
                continue;
            }
            let q = q0 + i;
            // Keys 0..upto are not in the query's future.
            let upto = if causal { s - t + q + 1 } else { s };
            let mask = hidden.map(|m| &m[(row * t + q) * s..][..upto]);
            if mask.is_none() && vector_softmax {
                // SAFETY: the features were detected; `pr` and `wr` are `width` long.
                if let Some(norm) = unsafe { softmax_row_bf16(pr, upto, scale, wr) } {
                    sc.norms.push(norm);
                    continue;
                }
            }
            sc.norms.push(softmax_row(pr, upto, s, mask, scale));
            for (w, &x) in wr.iter_mut().zip(pr.iter()) {
                *w = bf16(x);
            }
        }
        for c0 in (0..d).step_by(ALIGN) {
            // SAFETY: as above; the weights hold 32 rows of `padded` bf16 values (the
            // first `width` written), the packed values 16-column blocks of `padded`
            // keys, the output buffer 32 rows of `d`.
            unsafe {
                amx::block_32x32(
                    sc.values_t.as_ptr(),
                    2 * padded,
                    sc.value_pairs.as_ptr().add(c0 / TILE * value_block),
                    value_block,
                    width / ALIGN,
                    sc.wide.as_mut_ptr().add(c0),
                    4 * d,
                )
            };
        }
        for (i, (wr, &norm)) in sc.wide.chunks_exact(d).zip(&sc.norms).enumerate() {
            // SAFETY: `q0 + i < t` (one norm per query of the block); the rows are this task's
            // own.
            let or = unsafe { out.row(q0 + i) };
            for (o, &w) in or.iter_mut().zip(wr) {
                *o = w * norm;
            }
        }
    }
    // SAFETY: as above.
    unsafe { amx::release_tiles() };
}

/// Whether [`softmax_row_bf16`] runs here (AVX-512F and VL, AVX512-BF16, FMA: every CPU with
/// AMX so far).
#[cfg(target_arch = "x86_64")]
fn vector_softmax() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bf16")
        && is_x86_feature_detected!("fma")
}

/// [`softmax_row`] without a mask, the weights rounded to bf16 into `wr` as they are computed
/// (to nearest even; a subnormal weight, below `e⁻⁸⁷`, becomes zero), `pr` left as it was: one
/// pass for the largest score, one for the weights, their sum and their bf16 form, in
/// 16-lane vectors with fused multiply-adds. Keys from `upto` on get weight 0. `None` where
/// every seen score is −∞ or NaN (for [`softmax_row`]'s average).
///
/// # Safety
/// AVX-512F and VL, AVX512-BF16 and FMA must be available ([`vector_softmax`]); `pr` and `wr`
/// as long, a multiple of 16, `upto` at most that.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bf16,fma")]
unsafe fn softmax_row_bf16(pr: &[f32], upto: usize, scale: f32, wr: &mut [u16]) -> Option<f32> {
    use std::arch::x86_64::*;
    const L: usize = 16;
    assert!(pr.len() == wr.len() && pr.len().is_multiple_of(L) && upto <= pr.len());
    let (p, w) = (pr.as_ptr(), wr.as_mut_ptr());
    // The lanes of chunk `c` below `upto`.
    let seen = |c: usize| -> __mmask16 {
        match upto.saturating_sub(c * L) {
            n if n >= L => 0xffff,
            n => (1u16 << n) - 1,
        }
    };
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    // SAFETY: every load reads 16 values of chunk `c < pr.len() / 16` (masked loads touch no
    // lane outside the mask), every store writes the 16 values of `wr`'s chunk `c`.
    unsafe {
        // Four accumulators: a chain of maxima waits on each one's latency. A NaN score is
        // skipped (`max(x, acc)` returns `acc` then), as `simd::max` skips it.
        let mut acc = [ninf; 4];
        let full = upto / L;
        for c in 0..full {
            acc[c % 4] = _mm512_max_ps(_mm512_loadu_ps(p.add(c * L)), acc[c % 4]);
        }
        if full * L < upto {
            let x = _mm512_mask_loadu_ps(ninf, seen(full), p.add(full * L));
            acc[0] = _mm512_max_ps(x, acc[0]);
        }
        let max = _mm512_reduce_max_ps(_mm512_max_ps(
            _mm512_max_ps(acc[0], acc[1]),
            _mm512_max_ps(acc[2], acc[3]),
        ));
        if max == f32::NEG_INFINITY {
            return None;
        }
        // scale > 0: the largest score scaled is the largest scaled score.
        let (m, k) = (_mm512_set1_ps(max * scale), _mm512_set1_ps(scale));
        let mut sums = [_mm512_setzero_ps(); 2];
        for c in 0..pr.len() / L {
            let mask = seen(c);
            let e = match mask {
                0 => _mm512_setzero_ps(),
                _ => {
                    let x = _mm512_maskz_loadu_ps(mask, p.add(c * L));
                    let e = crate::nn::activation::exp_neg_avx512(_mm512_fnmadd_ps(x, k, m));
                    _mm512_maskz_mov_ps(mask, e)
                }
            };
            sums[c % 2] = _mm512_add_ps(sums[c % 2], e);
            let bits: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_storeu_si256(w.add(c * L).cast(), bits);
        }
        Some(1.0 / _mm512_reduce_add_ps(_mm512_add_ps(sums[0], sums[1])))
    }
}

/// `v` holding `n` values, every one of which the caller writes: memory is zeroed only where
/// the buffer grows, not on every reuse.
#[inline(always)]
fn set_len<T: Copy + Default>(v: &mut Aligned<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    } else {
        v.truncate(n);
    }
}

/// One query's scores `pr` (keys `0..upto` seen, `upto..` set to 0) turned into softmax
/// weights in place, up to their normaliser, which is returned: scaled, `mask`ed (true =
/// hidden), `exp(x − max)`; with every key hidden, 1 for each of the `s` keys (their average).
#[inline(always)]
fn softmax_row(pr: &mut [f32], upto: usize, s: usize, mask: Option<&[bool]>, scale: f32) -> f32 {
    let (seen, rest) = pr.split_at_mut(upto);
    rest.fill(0.0);
    let max = match mask {
        None => simd::max(seen),
        Some(m) => seen
            .iter()
            .zip(m)
            .filter(|(_, hid)| !**hid)
            .fold(f32::NEG_INFINITY, |m, (&x, _)| m.max(x)),
    };
    if max == f32::NEG_INFINITY {
        let all = s.min(pr.len());
        pr[..all].fill(1.0);
        return 1.0 / s as f32;
    }
    // scale > 0: the largest score scaled is the largest scaled score.
    let max = max * scale;
    let sum = match mask {
        None => simd::map_sum(seen, |x| exp_neg(max - x * scale)),
        Some(m) => {
            for (x, hid) in seen.iter_mut().zip(m) {
                *x = if *hid { 0.0 } else { exp_neg(max - *x * scale) };
            }
            simd::sum(seen)
        }
    };
    1.0 / sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn tensor(shape: [usize; 4], seed: usize) -> Tensor<4> {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 7919) % 211) as f32 / 211.0 - 0.5)
            .collect();
        Tensor::from_data(
            TensorData::new(data, shape),
            &crate::device::default_device(),
        )
    }

    /// The written-out form (few queries) and the fused one (many) must agree, with the cache
    /// longer than the queries and some keys hidden: one function of positions, two code paths.
    /// Queries that see no key (padding positions of a prompt) must stay finite.
    /// A step over a cache in host memory gives what the tensor form gives over the same keys
    /// and values: grouped kv heads, a row with hidden keys and a row that sees none.
    #[test]
    fn step_over_a_host_cache_matches_the_tensor_form() {
        let (b, h, kvh, d, s) = (3, 4, 2, 40, 21);
        let device = crate::device::default_device();
        let q = tensor([b, h, 1, d], 4);
        let k = tensor([b, kvh, s, d], 5);
        let v = tensor([b, kvh, s, d], 6);
        let host = |t: &Tensor<4>| crate::nn::host_prompt::host_values(t);
        let mut cache = crate::nn::kv_cache::KvCache::new(1, 32);
        cache.append_host(0, &host(&k), &host(&v), [b, kvh, s, d]);
        // Row 1 hides its first five keys, row 2 every key.
        let flags: Vec<bool> = (0..b)
            .flat_map(|r| (0..s).map(move |j| (r == 1 && j < 5) || r == 2))
            .collect();
        let hidden = Tensor::<4, Bool>::from_data(TensorData::new(flags, [b, 1, 1, s]), &device);
        let scale = 0.2;
        let got = step_host(
            q.clone(),
            cache.host_layer(0).unwrap(),
            s,
            Some(&hidden),
            scale,
        );
        let repeat = |x: Tensor<4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([b, kvh, h / kvh, s, d])
                .reshape([b, h, s, d])
        };
        let want = causal(q, repeat(k), repeat(v), Some(&hidden), scale, None);
        let (g, w) = (host(&got), host(&want));
        assert_eq!(g.len(), w.len());
        for (i, (x, y)) in g.iter().zip(&w).enumerate() {
            assert!((x - y).abs() < 1e-5, "element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn decoding_form_matches_fused_attention() {
        let (b, h, d) = (2, 3, 8);
        let device = crate::device::default_device();
        for (t, s) in [(1, 9), (3, 9), (5, 5)] {
            let q = tensor([b, h, t, d], 1);
            let k = tensor([b, h, s, d], 2);
            let v = tensor([b, h, s, d], 3);
            // Row 1 hides its first two keys (left padding).
            let pad = 2;
            let flags: Vec<bool> = (0..b)
                .flat_map(|r| (0..t).flat_map(move |_| (0..s).map(move |j| r == 1 && j < pad)))
                .collect();
            let hidden =
                Tensor::<4, Bool>::from_data(TensorData::new(flags, [b, 1, t, s]), &device);
            let scale = 0.3;
            let direct = causal(q.clone(), k.clone(), v.clone(), Some(&hidden), scale, None);
            let fused = attention(
                q,
                k,
                v,
                Some(hidden.expand([b, h, t, s])),
                None,
                AttentionModuleOptions {
                    scale: Some(scale),
                    softcap: None,
                    is_causal: true,
                },
            );
            let a: Vec<f32> = direct.into_data().try_to_vec().unwrap();
            let f: Vec<f32> = fused.into_data().try_to_vec().unwrap();
            assert!(a.iter().all(|x| x.is_finite()), "t {t}, s {s}: not finite");
            for (i, (x, y)) in a.iter().zip(&f).enumerate() {
                let (row, query) = (i / (h * t * d), i / d % t);
                // Query `query` sees keys up to s − t + query; in row 1 none of them when that
                // is below the padding.
                let sees_nothing = row == 1 && s - t + query < pad;
                if !sees_nothing {
                    assert!(
                        (x - y).abs() < 1e-6,
                        "t {t}, s {s}, element {i}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// The bf16 prompt form against the backend's fused f32 attention, causal with a longer cache
    /// and hidden keys, and bidirectional: within bf16 rounding of the operands. Queries that see
    /// no key average every value.
    /// The bf16 prompt form on each path over several blocks of queries and keys, head widths
    /// of 32 to 128, causal without a mask (where a block of queries skips the keys after its last one)
    /// and bidirectional, against the fused attention in f32.
    /// The vector softmax into bf16 against the plain one rounded after it: weights within a
    /// bf16 rounding step (a −∞ score's as the plain one gives it), the normaliser within f32
    /// rounding, NaN scores skipped by the largest score, keys from `upto` on zero, and no
    /// answer where nothing is seen.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_softmax_matches_the_plain_one() {
        if !vector_softmax() {
            return;
        }
        let width = 96;
        for upto in [1, 15, 16, 17, 50, 64, 95, 96] {
            let mut scores: Vec<f32> = (0..width)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
                .collect();
            let hidden = (upto > 1).then_some(upto / 2);
            if let Some(i) = hidden {
                scores[i] = f32::NEG_INFINITY;
            }
            if upto > 3 {
                scores[3] = f32::NAN;
            }
            let scale = 0.125;
            let mut got = vec![0xffffu16; width];
            // SAFETY: the features were detected; both rows are `width` long.
            let norm = unsafe { softmax_row_bf16(&scores, upto, scale, &mut got) }.unwrap();
            let mut plain = scores.clone();
            let want_norm = softmax_row(&mut plain, upto, width, None, scale);
            assert!(
                (norm - want_norm).abs() <= 1e-5 * want_norm,
                "{upto}: {norm} vs {want_norm}"
            );
            for (i, (&g, &p)) in got.iter().zip(&plain).enumerate() {
                let g = f32::from(half::bf16::from_bits(g));
                if i >= upto {
                    assert_eq!(g, 0.0, "{upto}: key {i}");
                } else if !(upto > 3 && i == 3) {
                    assert!((g - p).abs() <= p / 128.0, "{upto}: key {i}: {g} vs {p}");
                }
            }
        }
        let unseen = vec![f32::NEG_INFINITY; 32];
        let mut w = vec![0u16; 32];
        // SAFETY: as above.
        assert_eq!(unsafe { softmax_row_bf16(&unseen, 20, 1.0, &mut w) }, None);
    }

    #[test]
    fn bf16_prompt_form_matches_over_many_blocks() {
        let paths = Bf16Gemm::ALL.into_iter().filter(|p| p.supported());
        for (path, d) in paths.flat_map(|p| [32, 64, 128].map(|d| (p, d))) {
            for (t, s, is_causal) in [
                (70, 70, true),
                (40, 100, true),
                (20, 37, true),
                (70, 70, false),
            ] {
                let (b, h) = (1, 3);
                let q = tensor([b, h, t, d], 7);
                let k = tensor([b, h, s, d], 8);
                let v = tensor([b, h, s, d], 9);
                let scale = 1.0 / (d as f64).sqrt();
                let got = if is_causal {
                    causal(q.clone(), k.clone(), v.clone(), None, scale, Some(path))
                } else {
                    bidirectional(q.clone(), k.clone(), v.clone(), scale, Some(path))
                };
                let options = AttentionModuleOptions {
                    scale: Some(scale),
                    softcap: None,
                    is_causal,
                };
                let want = attention(q, k, v, None, None, options);
                let a: Vec<f32> = got.into_data().try_to_vec().unwrap();
                let f: Vec<f32> = want.into_data().try_to_vec().unwrap();
                let worst = a
                    .iter()
                    .zip(&f)
                    .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    worst < 1e-2,
                    "d {d}, t {t}, s {s}, causal {is_causal}: {worst}"
                );
                assert!(
                    worst > 0.0,
                    "d {d}, t {t}, s {s}: the bf16 path did not run"
                );
            }
        }
    }

    #[test]
    fn bf16_prompt_form_matches_fused_attention() {
        let Some(path) = Bf16Gemm::best() else {
            return;
        };
        let (b, h, d) = (2, 2, 32);
        let device = crate::device::default_device();
        for (t, s, causal_mask) in [(20, 20, true), (18, 45, true), (33, 33, false)] {
            let q = tensor([b, h, t, d], 1);
            let k = tensor([b, h, s, d], 2);
            let v = tensor([b, h, s, d], 3);
            let pad = 3;
            let flags: Vec<bool> = (0..b)
                .flat_map(|r| (0..t).flat_map(move |_| (0..s).map(move |j| r == 1 && j < pad)))
                .collect();
            let hidden =
                Tensor::<4, Bool>::from_data(TensorData::new(flags, [b, 1, t, s]), &device);
            let scale = 0.5;
            let (got, want) = if causal_mask {
                let got = causal(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    Some(&hidden),
                    scale,
                    Some(path),
                );
                let options = AttentionModuleOptions {
                    scale: Some(scale),
                    softcap: None,
                    is_causal: true,
                };
                let want = attention(q, k, v, Some(hidden.expand([b, h, t, s])), None, options);
                (got, want)
            } else {
                let got = bidirectional(q.clone(), k.clone(), v.clone(), scale, Some(path));
                let want = bidirectional(q, k, v.clone(), scale, None);
                (got, want)
            };
            let a: Vec<f32> = got.into_data().try_to_vec().unwrap();
            let f: Vec<f32> = want.into_data().try_to_vec().unwrap();
            let mut worst = 0.0f32;
            for (i, (x, y)) in a.iter().zip(&f).enumerate() {
                let (row, query) = (i / (h * t * d), i / d % t);
                let sees_nothing = causal_mask && row == 1 && s - t + query < pad;
                if !sees_nothing {
                    worst = worst.max((x - y).abs());
                }
            }
            // Values in [-0.5, 0.5]: bf16 keeps 8 bits of each operand.
            assert!(worst < 1e-2, "t {t}, s {s}: {worst}");
            assert!(worst > 0.0, "t {t}, s {s}: the bf16 path did not run");
        }
        // Every key hidden from one query: it averages the values.
        let (t, s) = (17, 17);
        let q = tensor([1, 1, t, d], 4);
        let k = tensor([1, 1, s, d], 5);
        let v = tensor([1, 1, s, d], 6);
        let flags: Vec<bool> = (0..t).flat_map(|i| (0..s).map(move |_| i == 0)).collect();
        let hidden = Tensor::<4, Bool>::from_data(TensorData::new(flags, [1, 1, t, s]), &device);
        let got = causal(q, k, v.clone(), Some(&hidden), 0.5, Some(path));
        let a: Vec<f32> = got.narrow(2, 0, 1).into_data().try_to_vec().unwrap();
        let vs: Vec<f32> = v.into_data().try_to_vec().unwrap();
        for c in 0..d {
            let mean = (0..s).map(|j| vs[j * d + c]).sum::<f32>() / s as f32;
            assert!((a[c] - mean).abs() < 1e-2, "{c}: {} vs {mean}", a[c]);
        }
    }
}
