//! GGML's `q8_0` and `q4_0` block formats, and `y = x·Wᵀ` over them for one to [`MAX_ROWS`](super::MAX_ROWS)
//! rows.
//!
//! A row of `W` is cut into blocks of [`QK`] = 32 values, each with one scale `d`:
//! - `q8_0`: 32 signed bytes `q` and `d = amax / 127` (value `q·d`), 34 bytes a block;
//! - `q4_0`: 32 nibbles `q` with offset 8 and `d = m / −8`, where `m` is the value of largest
//!   magnitude (value `(q − 8)·d`), 18 bytes a block. Byte `j` of a block holds element `j` in
//!   its low nibble and element `j + 16` in its high one.
//!
//! The quantizers compute GGML's reference quantizers' values bit for bit (`roundf` for `q8_0`,
//! truncation after `+ 8.5` for `q4_0`, the scale rounded to f16). Scales and quants are kept in
//! two arrays (the same 34 or 18 bytes a block), so that a block's quants load as one vector.
//!
//! The product quantizes each activation row once to 8 bits per block (`d = amax / 127`, the
//! scale kept in f32) and accumulates integer dot products per block, scaled by both blocks'
//! scales, in f32: the route llama.cpp takes (`maddubs` on AVX2, VNNI's `dpbusd` on AVX-512).

use half::f16;
use rayon::prelude::*;

use super::dispatch::KernelPath;
use super::{check_product, each_output_of};
use crate::error::{Error, Result};

/// Values in a block.
pub const QK: usize = 32;

/// Which block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    /// 32 int8 and one f16 scale.
    Q8_0,
    /// 32 nibbles with offset 8 and one f16 scale.
    Q4_0,
}

impl QuantKind {
    /// Bytes of quants in one block.
    fn quant_bytes(self) -> usize {
        match self {
            QuantKind::Q8_0 => QK,
            QuantKind::Q4_0 => QK / 2,
        }
    }

    /// Bytes one block takes, scale included (34 or 18, as GGML stores it).
    pub fn block_bytes(self) -> usize {
        self.quant_bytes() + 2
    }
}

/// GGML's `quantize_row_q8_0_ref` on one block: the scale and 32 int8.
pub fn quantize_block_q8_0(x: &[f32; QK], q: &mut [u8]) -> f16 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, v) in q.iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
    f16::from_f32(d)
}

/// GGML's `quantize_row_q4_0_ref` on one block: the scale and 16 bytes of nibbles.
pub fn quantize_block_q4_0(x: &[f32; QK], q: &mut [u8]) -> f16 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let nib = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for j in 0..QK / 2 {
        q[j] = nib(x[j]) | (nib(x[j + QK / 2]) << 4);
    }
    f16::from_f32(d)
}

/// A matrix `[out, in]` quantized by rows, `in` a multiple of [`QK`].
#[derive(Clone)]
pub struct QuantMatrix {
    kind: QuantKind,
    out: usize,
    d_in: usize,
    /// `[out, in / QK]`.
    scales: Vec<f16>,
    /// `[out, in / QK, quant_bytes]`.
    quants: Vec<u8>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("kind", &self.kind)
            .field("out", &self.out)
            .field("d_in", &self.d_in)
            .finish()
    }
}

impl QuantMatrix {
    /// Quantizes `out` rows of `d_in` values; `row(o, buf)` writes row `o` into `buf`. Rows are
    /// quantized in parallel, each task with one row of scratch, so no second copy of the
    /// matrix is ever held.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `d_in` is not a positive multiple of [`QK`].
    pub fn quantize<F>(kind: QuantKind, out: usize, d_in: usize, row: F) -> Result<Self>
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        if d_in == 0 || !d_in.is_multiple_of(QK) {
            return Err(Error::InvalidInput(format!(
                "{kind:?} needs rows that are a multiple of {QK} values, not {d_in}"
            )));
        }
        let nb = d_in / QK;
        let qb = kind.quant_bytes();
        let mut scales = vec![f16::ZERO; out * nb];
        let mut quants = vec![0u8; out * nb * qb];
        super::prefer_huge_pages(&mut quants);
        scales
            .par_chunks_mut(nb)
            .zip(quants.par_chunks_mut(nb * qb))
            .enumerate()
            .for_each_init(
                || vec![0.0f32; d_in],
                |buf, (o, (s, q))| {
                    row(o, buf);
                    for (b, (s, q)) in s.iter_mut().zip(q.chunks_exact_mut(qb)).enumerate() {
                        let block: &[f32; QK] = buf[b * QK..(b + 1) * QK]
                            .try_into()
                            .expect("a block is QK values");
                        *s = match kind {
                            QuantKind::Q8_0 => quantize_block_q8_0(block, q),
                            QuantKind::Q4_0 => quantize_block_q4_0(block, q),
                        };
                    }
                },
            );
        Ok(QuantMatrix {
            kind,
            out,
            d_in,
            scales,
            quants,
        })
    }

    /// The block format.
    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.out, self.d_in]
    }

    /// Bytes held (GGML's size of the same blocks).
    pub fn bytes(&self) -> usize {
        self.scales.len() * 2 + self.quants.len()
    }

    /// Writes the values of row `o` (`d_in` of them) into `dst`.
    pub fn dequantize_row(&self, o: usize, dst: &mut [f32]) {
        let nb = self.d_in / QK;
        let qb = self.kind.quant_bytes();
        let scales = &self.scales[o * nb..(o + 1) * nb];
        let quants = &self.quants[o * nb * qb..(o + 1) * nb * qb];
        for ((d, q), dst) in scales
            .iter()
            .zip(quants.chunks_exact(qb))
            .zip(dst.chunks_exact_mut(QK))
        {
            let d = d.to_f32();
            match self.kind {
                QuantKind::Q8_0 => {
                    for (v, &q) in dst.iter_mut().zip(q) {
                        *v = f32::from(q as i8) * d;
                    }
                }
                QuantKind::Q4_0 => {
                    for j in 0..QK / 2 {
                        dst[j] = (i32::from(q[j] & 0x0f) - 8) as f32 * d;
                        dst[j + QK / 2] = (i32::from(q[j] >> 4) - 8) as f32 * d;
                    }
                }
            }
        }
    }
}

/// Activation rows quantized to 8 bits per block, scales in f32, stored by pairs of blocks
/// (`[pair][row][2·QK]`, scales likewise `[pair][row][2]`; an odd last block alone): a step of
/// the loops reads one contiguous piece for all rows, and a row's two blocks of a pair are one
/// 64-byte vector.
struct QuantRows {
    quants: Vec<i8>,
    scales: Vec<f32>,
    /// Per pair and row, 16 lanes: the first block's scale 8 times, then the second's (the
    /// scale vector of one 64-byte step; empty where no step uses it).
    pair_scales: Vec<f32>,
}

impl QuantRows {
    /// Index (in blocks) of block `b` of row `r`, for `rows` rows of `nb` blocks.
    #[inline(always)]
    fn at(rows: usize, nb: usize, b: usize, r: usize) -> usize {
        let pair = b / 2;
        let width = if 2 * pair + 1 < nb { 2 } else { 1 };
        pair * 2 * rows + r * width + b % 2
    }
}

fn quantize_rows(x: &[f32], rows: usize, pair_scales: bool) -> QuantRows {
    let d_in = x.len() / rows;
    let nb = d_in / QK;
    let mut quants = vec![0i8; x.len()];
    let mut scales = vec![0.0f32; rows * nb];
    for r in 0..rows {
        for b in 0..nb {
            let block = &x[r * d_in + b * QK..r * d_in + (b + 1) * QK];
            let k = QuantRows::at(rows, nb, b, r);
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (q, v) in quants[k * QK..(k + 1) * QK].iter_mut().zip(block) {
                *q = (v * id).round() as i8;
            }
            scales[k] = d;
        }
    }
    let pair_scales = if pair_scales {
        // Full pairs only: their blocks' scales sit side by side in `scales`.
        scales[..nb / 2 * 2 * rows]
            .chunks_exact(2)
            .flat_map(|d| [[d[0]; 8], [d[1]; 8]].into_iter().flatten())
            .collect()
    } else {
        Vec::new()
    };
    QuantRows {
        quants,
        scales,
        pair_scales,
    }
}

/// `y[r·out + o] = Σᵢ x[r·d_in + i] · W[o, i]` for `rows` rows of `x` (the activations
/// quantized to 8 bits per block first).
///
/// # Errors
/// [`Error::InvalidInput`] if `rows` is 0 or above [`MAX_ROWS`](super::MAX_ROWS), the slices do not match the
/// matrix, or this CPU cannot run `path`.
pub fn quant_matvec(
    path: KernelPath,
    w: &QuantMatrix,
    x: &[f32],
    rows: usize,
    y: &mut [f32],
) -> Result<()> {
    quant_matvec_many(path, &[w], x, rows, &mut [y])
}

/// [`quant_matvec`] for several matrices of one input width that multiply the same rows of `x`
/// (`ys[m]` `[rows, out_m]`), in one pass over the thread pool, `x` quantized once.
///
/// # Errors
/// As [`quant_matvec`], for any of the matrices; also when `ws` and `ys` differ in length or the
/// matrices in input width.
pub fn quant_matvec_many(
    path: KernelPath,
    ws: &[&QuantMatrix],
    x: &[f32],
    rows: usize,
    ys: &mut [&mut [f32]],
) -> Result<()> {
    let Some(first) = ws.first().filter(|_| ws.len() == ys.len()) else {
        return Err(Error::InvalidInput(format!(
            "quant_matvec: {} matrices and {} outputs",
            ws.len(),
            ys.len()
        )));
    };
    let d_in = first.d_in;
    let mut outs = Vec::with_capacity(ws.len());
    for (w, y) in ws.iter().zip(ys.iter()) {
        let [out, w_in] = w.dims();
        if w_in != d_in {
            return Err(Error::InvalidInput(format!(
                "quant_matvec: matrices of {d_in} and {w_in} inputs in one product"
            )));
        }
        check_product("quant_matvec", path, rows, (d_in, out), (x.len(), y.len()))?;
        outs.push(out);
    }
    let isa = Isa::of(path);
    let xq = quantize_rows(x, rows, isa.uses_pair_scales());
    let nb = d_in / QK;
    each_output_of(rows, &outs, ys, 1, |m, o, acc| {
        let w = ws[m];
        let qb = w.kind.quant_bytes();
        let row = WRow {
            kind: w.kind,
            scales: &w.scales[o * nb..(o + 1) * nb],
            quants: &w.quants[o * nb * qb..(o + 1) * nb * qb],
        };
        dot_rows(isa, &row, &xq, rows, acc);
    });
    Ok(())
}

/// One quantized weight row.
struct WRow<'a> {
    kind: QuantKind,
    scales: &'a [f16],
    quants: &'a [u8],
}

/// The instruction set a [`KernelPath`] gives the integer products.
#[derive(Clone, Copy)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Isa {
    /// Whether its loops read [`QuantRows::pair_scales`].
    fn uses_pair_scales(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Isa::Vnni = self {
            return true;
        }
        false
    }

    fn of(path: KernelPath) -> Isa {
        match path {
            KernelPath::Portable => Isa::Portable,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => Isa::Avx2,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => {
                if std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                {
                    Isa::Vnni
                } else if KernelPath::Avx2.supported() {
                    Isa::Avx2
                } else {
                    Isa::Portable
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => Isa::Portable,
        }
    }
}

fn dot_rows(isa: Isa, w: &WRow<'_>, x: &QuantRows, rows: usize, acc: &mut [f32]) {
    macro_rules! by_rows {
        ($($f:tt)+) => {
            match rows {
                1 => $($f)+::<1>(w, x, acc),
                2 => $($f)+::<2>(w, x, acc),
                3 => $($f)+::<3>(w, x, acc),
                4 => $($f)+::<4>(w, x, acc),
                5 => $($f)+::<5>(w, x, acc),
                6 => $($f)+::<6>(w, x, acc),
                7 => $($f)+::<7>(w, x, acc),
                _ => $($f)+::<8>(w, x, acc),
            }
        };
    }
    match isa {
        Isa::Portable => by_rows!(portable),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::of` picked it from a supported path and the detected features.
        Isa::Avx2 => unsafe { by_rows!(x86::avx2) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Vnni => unsafe { by_rows!(x86::vnni) },
    }
}

/// A weight block's 32 values as signed integers.
#[inline(always)]
fn block_ints(kind: QuantKind, q: &[u8]) -> [i8; QK] {
    let mut v = [0i8; QK];
    match kind {
        QuantKind::Q8_0 => {
            for (v, &q) in v.iter_mut().zip(q) {
                *v = q as i8;
            }
        }
        QuantKind::Q4_0 => {
            for j in 0..QK / 2 {
                v[j] = (q[j] & 0x0f) as i8 - 8;
                v[j + QK / 2] = (q[j] >> 4) as i8 - 8;
            }
        }
    }
    v
}

fn portable<const R: usize>(w: &WRow<'_>, x: &QuantRows, acc: &mut [f32]) {
    let nb = w.scales.len();
    let qb = w.kind.quant_bytes();
    let mut sums = [0.0f32; R];
    for b in 0..nb {
        let wi = block_ints(w.kind, &w.quants[b * qb..(b + 1) * qb]);
        let dw = w.scales[b].to_f32();
        for (r, s) in sums.iter_mut().enumerate() {
            let k = QuantRows::at(R, nb, b, r);
            let xi = &x.quants[k * QK..(k + 1) * QK];
            let dot: i32 = wi
                .iter()
                .zip(xi)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            *s += dot as f32 * (dw * x.scales[k]);
        }
    }
    acc[..R].copy_from_slice(&sums);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::half_matvec::x86::hsum8;
    use super::super::{PREFETCH_BYTES, prefetch};
    use super::{QK, QuantKind, QuantRows, WRow};

    /// A weight block's 32 values as signed bytes in one register.
    #[inline(always)]
    unsafe fn load_block(kind: QuantKind, p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees the block's bytes are readable at `p`.
        unsafe {
            match kind {
                QuantKind::Q8_0 => _mm256_loadu_si256(p.cast()),
                QuantKind::Q4_0 => {
                    let raw = _mm_loadu_si128(p.cast());
                    let mask = _mm_set1_epi8(0x0f);
                    let lo = _mm_and_si128(raw, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), mask);
                    _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8))
                }
            }
        }
    }

    /// Signed bytes times signed bytes, summed in fours to 8 i32 lanes: `maddubs` takes an
    /// unsigned left operand, so `|w|` multiplies `x` carrying `w`'s sign (no value is −128,
    /// so no product pair saturates).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<const R: usize>(w: &WRow<'_>, x: &QuantRows, acc: &mut [f32]) {
        let nb = w.scales.len();
        let qb = w.kind.quant_bytes();
        let ones = _mm256_set1_epi16(1);
        let mut sums = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            // SAFETY: block b of the row and of every row of x is in bounds.
            unsafe {
                if (b * qb).is_multiple_of(64) {
                    prefetch(w.quants.as_ptr().add(b * qb), PREFETCH_BYTES);
                }
                if b.is_multiple_of(32) {
                    prefetch(w.scales.as_ptr().add(b), PREFETCH_BYTES / qb * 2);
                }
                let wv = load_block(w.kind, w.quants.as_ptr().add(b * qb));
                let aw = _mm256_sign_epi8(wv, wv);
                let dw = w.scales[b].to_f32();
                for (r, s) in sums.iter_mut().enumerate() {
                    let k = QuantRows::at(R, nb, b, r);
                    let xv = _mm256_loadu_si256(x.quants.as_ptr().add(k * QK).cast());
                    let sx = _mm256_sign_epi8(xv, wv);
                    let pairs = _mm256_maddubs_epi16(aw, sx);
                    let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    let d = _mm256_set1_ps(dw * x.scales[k]);
                    *s = _mm256_fmadd_ps(dot, d, *s);
                }
            }
        }
        for (r, s) in sums.iter().enumerate() {
            acc[r] = hsum8(*s);
        }
    }

    /// Two weight blocks' 64 values as signed bytes in one register.
    #[inline(always)]
    unsafe fn load_pair(kind: QuantKind, p: *const u8) -> __m512i {
        // SAFETY: the caller guarantees both blocks' bytes are readable at `p`.
        unsafe {
            match kind {
                QuantKind::Q8_0 => _mm512_loadu_si512(p.cast()),
                QuantKind::Q4_0 => {
                    let raw = _mm256_loadu_si256(p.cast());
                    let mask = _mm256_set1_epi8(0x0f);
                    let lo = _mm256_and_si256(raw, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                    // 128-bit lanes [lo₀, lo₁, hi₀, hi₁] → [lo₀, hi₀, lo₁, hi₁]
                    let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    let v = _mm512_shuffle_i64x2::<0b11_01_10_00>(v, v);
                    _mm512_sub_epi8(v, _mm512_set1_epi8(8))
                }
            }
        }
    }

    /// `[d₀ ×8, d₁ ×8]` from two consecutive f16 scales.
    #[inline(always)]
    unsafe fn pair_scale(p: *const half::f16) -> __m512 {
        // SAFETY: the caller guarantees two readable scales at `p`.
        unsafe {
            let both = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
            let idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
            _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(both))
        }
    }

    /// Two blocks a step in 512-bit registers: `|w|` times `x` carrying `w`'s sign (AVX-512 has
    /// no byte `sign`: a masked negation), VNNI's `dpbusd` for the byte products and their sums,
    /// then both blocks' scales at once. An odd last block takes the 256-bit step.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(super) unsafe fn vnni<const R: usize>(w: &WRow<'_>, x: &QuantRows, acc: &mut [f32]) {
        let nb = w.scales.len();
        let qb = w.kind.quant_bytes();
        let pairs = nb / 2;
        assert!(x.pair_scales.len() >= pairs * R * 16 && x.quants.len() >= nb * R * QK);
        let mut wide = [_mm512_setzero_ps(); R];
        for p in 0..pairs {
            // SAFETY: blocks 2p and 2p+1 of the row and of every row of x are in bounds
            // (asserted above for x).
            unsafe {
                prefetch(w.quants.as_ptr().add(2 * p * qb), PREFETCH_BYTES);
                if p.is_multiple_of(16) {
                    // the scales, as many blocks ahead
                    prefetch(w.scales.as_ptr().add(2 * p), PREFETCH_BYTES / qb * 2);
                }
                let wv = load_pair(w.kind, w.quants.as_ptr().add(2 * p * qb));
                let aw = _mm512_abs_epi8(wv);
                let negative = _mm512_movepi8_mask(wv);
                let dw = pair_scale(w.scales.as_ptr().add(2 * p));
                for (r, s) in wide.iter_mut().enumerate() {
                    let k = (p * R + r) * 2;
                    let xv = _mm512_loadu_si512(x.quants.as_ptr().add(k * QK).cast());
                    let sx = _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv);
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sx);
                    let d = _mm512_mul_ps(dw, _mm512_loadu_ps(x.pair_scales.as_ptr().add(k * 8)));
                    *s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, *s);
                }
            }
        }
        let mut sums = [_mm256_setzero_ps(); R];
        if nb % 2 == 1 {
            let b = nb - 1;
            // SAFETY: block b of the row and of every row of x is in bounds.
            unsafe {
                let wv = load_block(w.kind, w.quants.as_ptr().add(b * qb));
                let aw = _mm256_abs_epi8(wv);
                let dw = w.scales[b].to_f32();
                for (r, s) in sums.iter_mut().enumerate() {
                    let k = QuantRows::at(R, nb, b, r);
                    let xv = _mm256_loadu_si256(x.quants.as_ptr().add(k * QK).cast());
                    let sx = _mm256_sign_epi8(xv, wv);
                    let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
                    let d = _mm256_set1_ps(dw * x.scales[k]);
                    *s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, *s);
                }
            }
        }
        for r in 0..R {
            acc[r] = _mm512_reduce_add_ps(wide[r]) + hsum8(sums[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::MAX_ROWS;
    use super::*;

    /// A row's result is bit-identical whatever rows come with it and however many, on every
    /// path this CPU has and both kinds (an odd number of blocks included).
    #[test]
    fn each_row_is_independent_of_the_row_count() {
        for kind in [QuantKind::Q8_0, QuantKind::Q4_0] {
            for d_in in [96, 256] {
                let out = 70;
                let m = QuantMatrix::quantize(kind, out, d_in, |o, buf| {
                    for (i, v) in buf.iter_mut().enumerate() {
                        *v = value(o * d_in + i);
                    }
                })
                .unwrap();
                let row = |r: usize| -> Vec<f32> {
                    (0..d_in).map(|i| value(7 * (r * d_in + i) + 1)).collect()
                };
                for path in KernelPath::available() {
                    let alone: Vec<Vec<f32>> = (0..MAX_ROWS)
                        .map(|r| {
                            let mut y = vec![f32::NAN; out];
                            quant_matvec(path, &m, &row(r), 1, &mut y).unwrap();
                            y
                        })
                        .collect();
                    for rows in 2..=MAX_ROWS {
                        let first = MAX_ROWS - rows;
                        let x: Vec<f32> = (first..MAX_ROWS).flat_map(row).collect();
                        let mut y = vec![f32::NAN; rows * out];
                        quant_matvec(path, &m, &x, rows, &mut y).unwrap();
                        for k in 0..rows {
                            let same = y[k * out..(k + 1) * out]
                                .iter()
                                .zip(&alone[first + k])
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(
                                same,
                                "{path:?} {kind:?} in {d_in}: row {} of {rows}",
                                first + k
                            );
                        }
                    }
                }
            }
        }
    }

    fn value(i: usize) -> f32 {
        ((i * 7919 + 13) % 211) as f32 / 211.0 - 0.5
    }

    /// GGML's reference quantizers, written out as ggml-quants.c has them.
    #[test]
    fn blocks_match_the_reference_quantizers() {
        let mut x = [0.0f32; QK];
        for (i, v) in x.iter_mut().enumerate() {
            *v = value(i) * 3.0;
        }
        x[5] = -2.0; // the largest magnitude, negative
        let mut q = [0u8; QK];
        let d = quantize_block_q8_0(&x, &mut q);
        let amax = 2.0f32;
        assert_eq!(d, f16::from_f32(amax / 127.0));
        for (j, &q) in q.iter().enumerate() {
            assert_eq!(q as i8, (x[j] * (127.0 / amax)).round() as i8, "q8_0 {j}");
        }
        let mut q4 = [0u8; QK / 2];
        let d = quantize_block_q4_0(&x, &mut q4);
        let d32 = -2.0f32 / -8.0;
        assert_eq!(d, f16::from_f32(d32));
        for j in 0..QK / 2 {
            let lo = ((x[j] / d32 + 8.5) as i8).min(15) as u8;
            let hi = ((x[j + 16] / d32 + 8.5) as i8).min(15) as u8;
            assert_eq!(q4[j], lo | (hi << 4), "q4_0 {j}");
        }
        // The most negative value maps to nibble 0, the scale is positive here.
        assert_eq!(q4[5] & 0x0f, 0);
        // All zeros: scale 0, quants at the offset.
        let zeros = [0.0f32; QK];
        assert_eq!(quantize_block_q8_0(&zeros, &mut q), f16::ZERO);
        assert!(q.iter().all(|&q| q == 0));
        assert_eq!(quantize_block_q4_0(&zeros, &mut q4), f16::ZERO);
        assert!(q4.iter().all(|&q| q == 0x88));
    }

    #[test]
    fn dequantized_values_are_close_to_the_input() {
        let (out, d_in) = (5, 96);
        let w: Vec<f32> = (0..out * d_in).map(value).collect();
        // Values lie in [-0.5, 0.5): half a step of 0.5/127 for q8_0; up to a whole step of 0.5/8
        // for q4_0 (the end opposite the largest magnitude is clamped to nibble 15).
        for (kind, tol) in [(QuantKind::Q8_0, 0.003), (QuantKind::Q4_0, 0.07)] {
            let m = QuantMatrix::quantize(kind, out, d_in, |o, buf| {
                buf.copy_from_slice(&w[o * d_in..(o + 1) * d_in])
            })
            .unwrap();
            assert_eq!(m.bytes(), out * d_in / QK * kind.block_bytes());
            let mut row = vec![0.0; d_in];
            for o in 0..out {
                m.dequantize_row(o, &mut row);
                for (i, v) in row.iter().enumerate() {
                    assert!((v - w[o * d_in + i]).abs() <= tol, "{kind:?}");
                }
            }
        }
        assert!(QuantMatrix::quantize(QuantKind::Q8_0, 2, 48, |_, _| {}).is_err());
    }

    /// Several matrices (of both formats) in one pass give, bit for bit, what each gives alone:
    /// the same kernel computes every output, only the split across the pool differs.
    #[test]
    fn many_matrices_in_one_pass_match_one_at_a_time() {
        let d_in = 64;
        let specs = [
            (QuantKind::Q8_0, 70),
            (QuantKind::Q4_0, 3),
            (QuantKind::Q8_0, 129),
        ];
        let ms: Vec<QuantMatrix> = specs
            .iter()
            .enumerate()
            .map(|(k, &(kind, out))| {
                QuantMatrix::quantize(kind, out, d_in, |o, buf| {
                    for (i, v) in buf.iter_mut().enumerate() {
                        *v = value(o * d_in + i + k);
                    }
                })
                .unwrap()
            })
            .collect();
        let refs: Vec<&QuantMatrix> = ms.iter().collect();
        for path in KernelPath::available() {
            for rows in 1..=MAX_ROWS {
                let x: Vec<f32> = (0..rows * d_in).map(|i| value(5 * i + 3)).collect();
                let mut many: Vec<Vec<f32>> = specs
                    .iter()
                    .map(|&(_, o)| vec![f32::NAN; rows * o])
                    .collect();
                let mut ys: Vec<&mut [f32]> = many.iter_mut().map(Vec::as_mut_slice).collect();
                quant_matvec_many(path, &refs, &x, rows, &mut ys).unwrap();
                for (m, w) in ms.iter().enumerate() {
                    let mut alone = vec![f32::NAN; rows * specs[m].1];
                    quant_matvec(path, w, &x, rows, &mut alone).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&many[m]),
                        bits(&alone),
                        "{path:?} rows {rows} matrix {m}"
                    );
                }
            }
        }
        let other = QuantMatrix::quantize(QuantKind::Q8_0, 2, 32, |_, b| b.fill(1.0)).unwrap();
        let (mut y1, mut y2) = (vec![0.0f32; 70], vec![0.0f32; 2]);
        let mixed = quant_matvec_many(
            KernelPath::Portable,
            &[&ms[0], &other],
            &[0.0; 64],
            1,
            &mut [&mut y1, &mut y2],
        );
        assert!(matches!(mixed, Err(Error::InvalidInput(_))));
    }

    /// Every path this CPU has, both formats, every row count, outputs not a multiple of a task:
    /// the result equals the f64 sum over the dequantized weights and the 8-bit activations.
    #[test]
    fn every_path_equals_the_definition() {
        for path in KernelPath::available() {
            for kind in [QuantKind::Q8_0, QuantKind::Q4_0] {
                for (d_in, out) in [(32, 1), (64, 70), (160, 129), (416, 3)] {
                    let w: Vec<f32> = (0..out * d_in).map(|i| value(i * 5 + 1)).collect();
                    let m = QuantMatrix::quantize(kind, out, d_in, |o, buf| {
                        buf.copy_from_slice(&w[o * d_in..(o + 1) * d_in])
                    })
                    .unwrap();
                    for rows in 1..=MAX_ROWS {
                        let x: Vec<f32> = (0..rows * d_in).map(|i| value(3 * i + 7)).collect();
                        let xq = quantize_rows(&x, rows, false);
                        let mut y = vec![f32::NAN; rows * out];
                        quant_matvec(path, &m, &x, rows, &mut y).unwrap();
                        let mut wrow = vec![0.0; d_in];
                        for o in 0..out {
                            m.dequantize_row(o, &mut wrow);
                            for r in 0..rows {
                                let expected: f64 = (0..d_in)
                                    .map(|i| {
                                        let k = QuantRows::at(rows, d_in / QK, i / QK, r);
                                        f64::from(xq.quants[k * QK + i % QK])
                                            * f64::from(xq.scales[k])
                                            * f64::from(wrow[i])
                                    })
                                    .sum();
                                let got = f64::from(y[r * out + o]);
                                assert!(
                                    (got - expected).abs() < 1e-4 * (1.0 + expected.abs()),
                                    "{} {kind:?} rows {rows} ({d_in}×{out}) [{r},{o}]: {got} vs {expected}",
                                    path.name()
                                );
                                // And close to the unquantized product.
                                let exact: f64 = (0..d_in)
                                    .map(|i| {
                                        f64::from(x[r * d_in + i]) * f64::from(w[o * d_in + i])
                                    })
                                    .sum();
                                let tol = if kind == QuantKind::Q8_0 { 0.05 } else { 0.5 };
                                assert!((got - exact).abs() < tol, "{got} vs exact {exact}");
                            }
                        }
                    }
                }
            }
        }
        let m = QuantMatrix::quantize(QuantKind::Q8_0, 3, 32, |_, b| b.fill(1.0)).unwrap();
        let mut y = vec![0.0; 3];
        assert!(quant_matvec(KernelPath::Portable, &m, &[0.0; 31], 1, &mut y).is_err());
        assert!(quant_matvec(KernelPath::Portable, &m, &[], 0, &mut []).is_err());
    }
}
