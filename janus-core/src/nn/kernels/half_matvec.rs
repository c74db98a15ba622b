//! `y = x·Wᵀ` for one to [`MAX_ROWS`] f32 rows `x` and a weight `W` kept in bf16 or f16.
//!
//! `W` (`[out, in]`, row-major, the 16-bit patterns as stored) is split by output rows across
//! rayon's pool. Each weight row is read once: its values are widened to f32 in registers (bf16
//! by a 16-bit shift, exact; f16 by the F16C/AVX-512 conversion, exact) and multiplied into one
//! f32 accumulator per row of `x`. The result is what the f32 product of the widened weights
//! gives, up to summation order. A row's summation order does not depend on how many rows come
//! with it (row-invariant): a row batched with others gets exactly what it gets alone.

use super::dispatch::KernelPath;
use super::{check_product, each_output_of};
use crate::error::{Error, Result};

/// Most rows of `x` one call serves (a CFG pair of four images).
pub const MAX_ROWS: usize = 8;

/// How the 16-bit weights encode their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HalfKind {
    /// bfloat16: the upper half of an f32.
    Bf16,
    /// IEEE half precision.
    F16,
}

/// `y[r·out + o] = Σᵢ x[r·d_in + i] · W[o·d_in + i]` for `rows` rows of `x`.
///
/// # Errors
/// [`Error::InvalidInput`] if `rows` is 0 or above [`MAX_ROWS`], a slice's length does not match
/// `rows`, `d_in` and the number of outputs `w.len() / d_in`, or this CPU cannot run `path`.
pub fn half_matvec(
    path: KernelPath,
    kind: HalfKind,
    x: &[f32],
    rows: usize,
    w: &[u16],
    d_in: usize,
    y: &mut [f32],
) -> Result<()> {
    half_matvec_many(path, kind, x, rows, &[w], d_in, &mut [y])
}

/// [`half_matvec`] for several weights of one kind and input width that multiply the same rows
/// of `x` (`y_m = x·W_mᵀ`, `ys[m]` `[rows, out_m]`), in one pass over the thread pool.
///
/// # Errors
/// As [`half_matvec`], for any of the weights; also when `ws` and `ys` differ in length.
pub fn half_matvec_many(
    path: KernelPath,
    kind: HalfKind,
    x: &[f32],
    rows: usize,
    ws: &[&[u16]],
    d_in: usize,
    ys: &mut [&mut [f32]],
) -> Result<()> {
    if ws.len() != ys.len() || ws.is_empty() {
        return Err(Error::InvalidInput(format!(
            "half_matvec: {} weights and {} outputs",
            ws.len(),
            ys.len()
        )));
    }
    let mut outs = Vec::with_capacity(ws.len());
    for (w, y) in ws.iter().zip(ys.iter()) {
        if d_in == 0 || !w.len().is_multiple_of(d_in) {
            return Err(Error::InvalidInput(format!(
                "half_matvec: {} weights are not rows of {d_in}",
                w.len()
            )));
        }
        let out = w.len() / d_in;
        check_product("half_matvec", path, rows, (d_in, out), (x.len(), y.len()))?;
        outs.push(out);
    }
    let packed = match (path, kind) {
        (KernelPath::Portable, _) => Vec::new(),
        (KernelPath::Avx2, HalfKind::Bf16) => pack(x, rows, d_in, 16),
        (KernelPath::Avx512, HalfKind::Bf16) => pack(x, rows, d_in, CHUNK),
        (_, HalfKind::F16) => pack(x, rows, d_in, 1),
    };
    let rows_x = Rows {
        x,
        packed: &packed,
        d_in,
    };
    #[cfg(target_arch = "x86_64")]
    {
        if path == KernelPath::Avx512 && rows >= PAIR_MIN_ROWS {
            each_output_of(rows, &outs, ys, 2, |m, o, acc| {
                let wrows = &ws[m][o * d_in..(o + acc.len() / rows) * d_in];
                dot_row_pair(kind, &rows_x, rows, wrows, acc)
            });
            return Ok(());
        }
    }
    each_output_of(rows, &outs, ys, 1, |m, o, acc| {
        dot_rows(
            path,
            kind,
            &rows_x,
            rows,
            &ws[m][o * d_in..(o + 1) * d_in],
            acc,
        )
    });
    Ok(())
}

/// Values of `x` the SIMD loops take per step, from every row at once.
const CHUNK: usize = 32;

/// `x` rearranged `[d_in / CHUNK][rows][CHUNK]` (whole chunks only): a step of the SIMD loops
/// reads one contiguous piece for all rows. Rows of `x` a power-of-two width apart would
/// otherwise fall into the same L1 cache sets and evict each other at every step.
///
/// With `split` > 1, each run of `split` values is stored as its even-indexed values, then its
/// odd-indexed ones: a bf16 weight vector loaded whole holds value `2j` in the low half of
/// 32-bit lane `j` and `2j + 1` in the high half, which a shift and a mask turn into two f32
/// vectors without a widening shuffle, matching these two runs.
fn pack(x: &[f32], rows: usize, d_in: usize, split: usize) -> Vec<f32> {
    let chunks = d_in / CHUNK;
    let mut out = Vec::with_capacity(chunks * rows * CHUNK);
    for c in 0..chunks {
        for r in 0..rows {
            let chunk = &x[r * d_in + c * CHUNK..r * d_in + (c + 1) * CHUNK];
            if split > 1 {
                for run in chunk.chunks_exact(split) {
                    out.extend(run.iter().step_by(2));
                    out.extend(run.iter().skip(1).step_by(2));
                }
            } else {
                out.extend_from_slice(chunk);
            }
        }
    }
    out
}

/// The activation rows: as given (for the tails and the portable path) and packed.
struct Rows<'a> {
    x: &'a [f32],
    packed: &'a [f32],
    d_in: usize,
}

/// From this many rows of `x` on, the AVX-512 path reads two rows of `W` per pass, so that each
/// value of `x` loaded serves both. With many rows the loads of `x` and the FMAs, not the
/// weights, set the pace (Janus-Pro-1B, a decoding step's products with 8 rows: 191 → 143 ms).
const PAIR_MIN_ROWS: usize = 3;

/// `acc[r] = x_r · w_a`, `acc[rows + r] = x_r · w_b` for the weight rows `w_a`, `w_b` that
/// `wrows` holds back to back (or `acc[r] = x_r · w_a` alone when it holds one).
#[cfg(target_arch = "x86_64")]
fn dot_row_pair(kind: HalfKind, x: &Rows<'_>, rows: usize, wrows: &[u16], acc: &mut [f32]) {
    let d_in = x.d_in;
    if wrows.len() == d_in {
        return dot_rows(KernelPath::Avx512, kind, x, rows, wrows, acc);
    }
    let (wa, wb) = wrows.split_at(d_in);
    macro_rules! by_rows {
        ($($r:literal)+) => {
            match rows {
                // SAFETY: only the AVX-512 path, which `half_matvec` checked this CPU supports,
                // pairs rows.
                $($r => unsafe { x86::avx512_pair::<$r>(kind, x, wa, wb, acc) },)+
                _ => unreachable!("half_matvec checked the row count"),
            }
        };
    }
    by_rows!(3 4 5 6 7 8);
}

/// `acc[r] = x_r · wrow` for every row `r` of `x`.
fn dot_rows(
    path: KernelPath,
    kind: HalfKind,
    x: &Rows<'_>,
    rows: usize,
    wrow: &[u16],
    acc: &mut [f32],
) {
    macro_rules! by_rows {
        ($($f:tt)+) => {
            match rows {
                1 => $($f)+::<1>(kind, x, wrow, acc),
                2 => $($f)+::<2>(kind, x, wrow, acc),
                3 => $($f)+::<3>(kind, x, wrow, acc),
                4 => $($f)+::<4>(kind, x, wrow, acc),
                5 => $($f)+::<5>(kind, x, wrow, acc),
                6 => $($f)+::<6>(kind, x, wrow, acc),
                7 => $($f)+::<7>(kind, x, wrow, acc),
                _ => $($f)+::<8>(kind, x, wrow, acc),
            }
        };
    }
    match path {
        KernelPath::Portable => by_rows!(portable),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `half_matvec` checked that the CPU supports the path.
        KernelPath::Avx2 => unsafe { by_rows!(x86::avx2) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512 => unsafe { by_rows!(x86::avx512) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable path exists on this architecture"),
    }
}

/// The value of one stored weight.
#[inline(always)]
fn widen(kind: HalfKind, bits: u16) -> f32 {
    match kind {
        HalfKind::Bf16 => f32::from_bits(u32::from(bits) << 16),
        HalfKind::F16 => half::f16::from_bits(bits).to_f32(),
    }
}

fn portable<const R: usize>(kind: HalfKind, x: &Rows<'_>, wrow: &[u16], acc: &mut [f32]) {
    let (x, d_in) = (x.x, x.d_in);
    let mut sums = [0.0f32; R];
    for (i, &bits) in wrow.iter().enumerate() {
        let w = widen(kind, bits);
        for (r, s) in sums.iter_mut().enumerate() {
            *s += x[r * d_in + i] * w;
        }
    }
    acc[..R].copy_from_slice(&sums);
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    //! The loops walk raw pointers (bounds are checked once, at the top) and widen in registers.
    //! The AVX2 loops keep two accumulators per row of `x`, so that consecutive FMAs into one
    //! row do not wait on each other; the AVX-512 ones keep one per product, which the rows (and
    //! the pair of weight rows) already interleave. Neither depends on the number of rows.

    use std::arch::x86_64::*;

    use super::super::{PREFETCH_BYTES, prefetch};
    use super::{CHUNK, HalfKind, Rows, widen};

    /// Widens 8 stored values.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen8(kind: HalfKind, p: *const u16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable values at `p`.
        let raw = unsafe { _mm_loadu_si128(p.cast()) };
        match kind {
            HalfKind::Bf16 => {
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
            }
            HalfKind::F16 => _mm256_cvtph_ps(raw),
        }
    }

    /// The sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx")]
    pub(in crate::nn::kernels) fn hsum8(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps::<1>(v);
        let q = _mm_add_ps(_mm256_castps256_ps128(v), hi);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
        _mm_cvtss_f32(q)
    }

    /// A chunk of 32 values a step (four vectors of 8, two accumulators per row of `x`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2<const R: usize>(
        kind: HalfKind,
        x: &Rows<'_>,
        wrow: &[u16],
        acc: &mut [f32],
    ) {
        let d_in = x.d_in;
        let body = d_in / CHUNK * CHUNK;
        assert!(wrow.len() == d_in && x.packed.len() >= body * R && acc.len() >= R);
        let mut s0 = [_mm256_setzero_ps(); R];
        let mut s1 = [_mm256_setzero_ps(); R];
        let wp = wrow.as_ptr();
        let mut xp = x.packed.as_ptr();
        let mut i = 0;
        while i < body {
            // SAFETY: i + 32 <= body <= wrow.len(); the packed chunk holds R·32 values
            // (asserted above).
            unsafe {
                prefetch(wp.add(i), PREFETCH_BYTES);
                for half in 0..2 {
                    let (w0, w1) = match kind {
                        HalfKind::Bf16 => split8(wp.add(i + 16 * half)),
                        HalfKind::F16 => (
                            widen8(kind, wp.add(i + 16 * half)),
                            widen8(kind, wp.add(i + 16 * half + 8)),
                        ),
                    };
                    for r in 0..R {
                        let xr = xp.add(r * CHUNK + 16 * half);
                        s0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, s0[r]);
                        s1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w1, s1[r]);
                    }
                }
                xp = xp.add(R * CHUNK);
            }
            i += CHUNK;
        }
        for r in 0..R {
            let mut total = hsum8(_mm256_add_ps(s0[r], s1[r]));
            let tail = &x.x[r * d_in + body..(r + 1) * d_in];
            for (xv, &w) in tail.iter().zip(&wrow[body..]) {
                total += xv * widen(kind, w);
            }
            acc[r] = total;
        }
    }

    /// 16 stored bf16 values as two f32 vectors: the even-indexed values, then the odd ones.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn split8(p: *const u16) -> (__m256, __m256) {
        // SAFETY: the caller guarantees 16 readable values at `p`.
        let raw = unsafe { _mm256_loadu_si256(p.cast()) };
        let even = _mm256_slli_epi32::<16>(raw);
        let odd = _mm256_and_si256(raw, _mm256_set1_epi32(0xffff_0000u32 as i32));
        (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
    }

    /// 32 stored bf16 values as two f32 vectors: the even-indexed values, then the odd ones.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn split16(p: *const u16) -> (__m512, __m512) {
        // SAFETY: the caller guarantees 32 readable values at `p`.
        let raw = unsafe { _mm512_loadu_si512(p.cast()) };
        let even = _mm512_slli_epi32::<16>(raw);
        let odd = _mm512_and_si512(raw, _mm512_set1_epi32(0xffff_0000u32 as i32));
        (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
    }

    /// Widens 16 stored values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn widen16(kind: HalfKind, p: *const u16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable values at `p`.
        let raw = unsafe { _mm256_loadu_si256(p.cast()) };
        match kind {
            HalfKind::Bf16 => {
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
            }
            HalfKind::F16 => _mm512_cvtph_ps(raw),
        }
    }

    /// A chunk of 32 values a step (two vectors of 16), one accumulator per row of `x`: the
    /// weight row is read once for every row, and a row's sum is formed the same way whatever
    /// the number of rows (batched decoding gives each row what it gets alone).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512<const R: usize>(
        kind: HalfKind,
        x: &Rows<'_>,
        wrow: &[u16],
        acc: &mut [f32],
    ) {
        let d_in = x.d_in;
        let body = d_in / CHUNK * CHUNK;
        assert!(wrow.len() == d_in && x.packed.len() >= body * R && acc.len() >= R);
        let mut s = [_mm512_setzero_ps(); R];
        let wp = wrow.as_ptr();
        let mut xp = x.packed.as_ptr();
        let mut i = 0;
        while i < body {
            // SAFETY: i + 32 <= body <= wrow.len(); the packed chunk holds R·32 values
            // (asserted above).
            unsafe {
                prefetch(wp.add(i), PREFETCH_BYTES);
                let (w0, w1) = match kind {
                    HalfKind::Bf16 => split16(wp.add(i)),
                    HalfKind::F16 => (widen16(kind, wp.add(i)), widen16(kind, wp.add(i + 16))),
                };
                for (r, s) in s.iter_mut().enumerate() {
                    let xr = xp.add(r * CHUNK);
                    *s = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, *s);
                    *s = _mm512_fmadd_ps(_mm512_loadu_ps(xr.add(16)), w1, *s);
                }
                xp = xp.add(R * CHUNK);
            }
            i += CHUNK;
        }
        for (r, &s) in s.iter().enumerate() {
            let mut total = _mm512_reduce_add_ps(s);
            let tail = &x.x[r * d_in + body..(r + 1) * d_in];
            for (xv, &w) in tail.iter().zip(&wrow[body..]) {
                total += xv * widen(kind, w);
            }
            acc[r] = total;
        }
    }
    /// Two rows of `W` (`wa`, `wb`) against every row of `x` in one pass: each chunk of `x` is
    /// loaded once for both. `acc[..R]` receives the products with `wa`, `acc[R..]` with `wb`.
    /// One accumulator per product, summed in the order [`avx512`] sums: a row's result does not
    /// depend on how many rows are served with it.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512_pair<const R: usize>(
        kind: HalfKind,
        x: &Rows<'_>,
        wa: &[u16],
        wb: &[u16],
        acc: &mut [f32],
    ) {
        let d_in = x.d_in;
        let body = d_in / CHUNK * CHUNK;
        assert!(
            wa.len() == d_in
                && wb.len() == d_in
                && x.packed.len() >= body * R
                && acc.len() >= 2 * R
        );
        let mut a = [_mm512_setzero_ps(); R];
        let mut b = [_mm512_setzero_ps(); R];
        let (pa, pb) = (wa.as_ptr(), wb.as_ptr());
        let mut xp = x.packed.as_ptr();
        let mut i = 0;
        while i < body {
            // SAFETY: i + 32 <= body <= the length of both weight rows; the packed chunk holds
            // R·32 values (asserted above).
            unsafe {
                prefetch(pa.add(i), PREFETCH_BYTES);
                prefetch(pb.add(i), PREFETCH_BYTES);
                let (wa0, wa1, wb0, wb1) = match kind {
                    HalfKind::Bf16 => {
                        let (a, b) = (split16(pa.add(i)), split16(pb.add(i)));
                        (a.0, a.1, b.0, b.1)
                    }
                    HalfKind::F16 => (
                        widen16(kind, pa.add(i)),
                        widen16(kind, pa.add(i + 16)),
                        widen16(kind, pb.add(i)),
                        widen16(kind, pb.add(i + 16)),
                    ),
                };
                for r in 0..R {
                    let xr = xp.add(r * CHUNK);
                    let (x0, x1) = (_mm512_loadu_ps(xr), _mm512_loadu_ps(xr.add(16)));
                    a[r] = _mm512_fmadd_ps(x0, wa0, a[r]);
                    b[r] = _mm512_fmadd_ps(x0, wb0, b[r]);
                    a[r] = _mm512_fmadd_ps(x1, wa1, a[r]);
                    b[r] = _mm512_fmadd_ps(x1, wb1, b[r]);
                }
                xp = xp.add(R * CHUNK);
            }
            i += CHUNK;
        }
        for r in 0..R {
            let xt = &x.x[r * d_in + body..(r + 1) * d_in];
            for (k, (w, s)) in [(wa, a[r]), (wb, b[r])].into_iter().enumerate() {
                let mut total = _mm512_reduce_add_ps(s);
                for (xv, &wv) in xt.iter().zip(&w[body..]) {
                    total += xv * widen(kind, wv);
                }
                acc[k * R + r] = total;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(kind: HalfKind, v: f32) -> u16 {
        match kind {
            HalfKind::Bf16 => half::bf16::from_f32(v).to_bits(),
            HalfKind::F16 => half::f16::from_f32(v).to_bits(),
        }
    }

    /// Every path this CPU has, both kinds, every row count, widths that are not a multiple of
    /// any vector width and output counts that are not a multiple of a task: each result equals
    /// `x·Wᵀ` computed in f64 from the widened weights.
    #[test]
    fn every_path_equals_the_definition() {
        let value = |i: usize| ((i * 7919 + 13) % 211) as f32 / 211.0 - 0.5;
        for path in KernelPath::available() {
            for kind in [HalfKind::Bf16, HalfKind::F16] {
                for (d_in, out) in [(1, 3), (15, 1), (17, 70), (67, 129), (300, 64)] {
                    let w: Vec<u16> = (0..out * d_in).map(|i| encode(kind, value(i))).collect();
                    for rows in 1..=MAX_ROWS {
                        let x: Vec<f32> = (0..rows * d_in).map(|i| value(3 * i + 1)).collect();
                        let mut y = vec![f32::NAN; rows * out];
                        half_matvec(path, kind, &x, rows, &w, d_in, &mut y).unwrap();
                        for r in 0..rows {
                            for o in 0..out {
                                let (mut want, mut scale) = (0.0f64, 0.0f64);
                                for i in 0..d_in {
                                    let p = f64::from(x[r * d_in + i])
                                        * f64::from(widen(kind, w[o * d_in + i]));
                                    want += p;
                                    scale += p.abs();
                                }
                                let got = f64::from(y[r * out + o]);
                                assert!(
                                    (got - want).abs() <= 1e-6 * scale.max(1.0),
                                    "{path:?} {kind:?} rows {rows} in {d_in} out {out} \
                                     [{r},{o}]: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Several weights in one pass (output counts that split tasks and pairs across matrices)
    /// give what each gives alone, on every path and row count.
    #[test]
    fn many_weights_in_one_pass_match_one_at_a_time() {
        let value = |i: usize| ((i * 7919 + 5) % 223) as f32 / 223.0 - 0.5;
        let (d_in, outs) = (67, [70, 3, 129]);
        for path in KernelPath::available() {
            for kind in [HalfKind::Bf16, HalfKind::F16] {
                let ws: Vec<Vec<u16>> = outs
                    .iter()
                    .enumerate()
                    .map(|(m, &out)| {
                        (0..out * d_in)
                            .map(|i| encode(kind, value(i + m)))
                            .collect()
                    })
                    .collect();
                let wrefs: Vec<&[u16]> = ws.iter().map(Vec::as_slice).collect();
                for rows in 1..=MAX_ROWS {
                    let x: Vec<f32> = (0..rows * d_in).map(|i| value(3 * i + 2)).collect();
                    let mut many: Vec<Vec<f32>> =
                        outs.iter().map(|&o| vec![f32::NAN; rows * o]).collect();
                    let mut ys: Vec<&mut [f32]> = many.iter_mut().map(Vec::as_mut_slice).collect();
                    half_matvec_many(path, kind, &x, rows, &wrefs, d_in, &mut ys).unwrap();
                    for (m, w) in ws.iter().enumerate() {
                        let mut alone = vec![f32::NAN; rows * outs[m]];
                        half_matvec(path, kind, &x, rows, w, d_in, &mut alone).unwrap();
                        for (i, (a, b)) in many[m].iter().zip(&alone).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                                "{path:?} {kind:?} rows {rows} matrix {m} [{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
                let mut y = vec![0.0f32; 70];
                let bad = half_matvec_many(path, kind, &[0.0; 67], 1, &wrefs, d_in, &mut [&mut y]);
                assert!(matches!(bad, Err(Error::InvalidInput(_))));
            }
        }
    }

    /// A row's result is bit-identical whatever rows come with it and however many (1 to
    /// [`MAX_ROWS`]), on every path this CPU has: batched decoding must not change any answer.
    #[test]
    fn each_row_is_independent_of_the_row_count() {
        let value = |i: usize| ((i * 7919 + 29) % 227) as f32 / 227.0 - 0.5;
        for path in KernelPath::available() {
            for kind in [HalfKind::Bf16, HalfKind::F16] {
                for (d_in, out) in [(17, 70), (300, 131)] {
                    let w: Vec<u16> = (0..out * d_in).map(|i| encode(kind, value(i))).collect();
                    let row = |r: usize| -> Vec<f32> {
                        (0..d_in).map(|i| value(5 * (r * d_in + i) + 3)).collect()
                    };
                    let alone: Vec<Vec<f32>> = (0..MAX_ROWS)
                        .map(|r| {
                            let mut y = vec![f32::NAN; out];
                            half_matvec(path, kind, &row(r), 1, &w, d_in, &mut y).unwrap();
                            y
                        })
                        .collect();
                    for rows in 2..=MAX_ROWS {
                        for first in [0, MAX_ROWS - rows] {
                            let x: Vec<f32> = (first..first + rows).flat_map(row).collect();
                            let mut y = vec![f32::NAN; rows * out];
                            half_matvec(path, kind, &x, rows, &w, d_in, &mut y).unwrap();
                            for k in 0..rows {
                                let got = &y[k * out..(k + 1) * out];
                                assert!(
                                    got.iter()
                                        .zip(&alone[first + k])
                                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                                    "{path:?} {kind:?} in {d_in}: row {} of {rows} differs",
                                    first + k
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let w = vec![0u16; 6];
        let mut y = vec![0.0f32; 2];
        let p = KernelPath::Portable;
        let k = HalfKind::Bf16;
        let bad = |r: Result<()>| matches!(r, Err(Error::InvalidInput(_)));
        assert!(bad(half_matvec(p, k, &[], 0, &w, 3, &mut [])));
        assert!(bad(half_matvec(p, k, &[0.0; 27], 9, &w, 3, &mut [0.0; 18])));
        assert!(bad(half_matvec(p, k, &[0.0; 3], 1, &w, 4, &mut y)));
        assert!(bad(half_matvec(p, k, &[0.0; 3], 1, &w, 0, &mut y)));
        assert!(bad(half_matvec(p, k, &[0.0; 2], 1, &w, 3, &mut y)));
        assert!(bad(half_matvec(p, k, &[0.0; 3], 1, &w, 3, &mut [0.0; 3])));
        half_matvec(p, k, &[0.0; 3], 1, &w, 3, &mut y).unwrap();
    }

    /// The widening is exact: bf16 is the upper half of the f32, f16 converts without rounding.
    #[test]
    fn widening_is_exact() {
        for bits in [
            0u16, 1, 0x3f80, 0x7f7f, 0x8001, 0xc2f7, 0x7bff, 0x0400, 0x03ff,
        ] {
            assert_eq!(
                widen(HalfKind::Bf16, bits),
                half::bf16::from_bits(bits).to_f32()
            );
            assert_eq!(
                widen(HalfKind::F16, bits).to_bits(),
                half::f16::from_bits(bits).to_f32().to_bits()
            );
        }
    }
}
