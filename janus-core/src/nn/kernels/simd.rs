//! Plain loops compiled for the widest vector instructions this CPU runs.
//!
//! The crate is built for the x86-64 baseline (SSE2), so loops the compiler vectorizes on its
//! own (activations, norms, softmax, conversions) use 128-bit vectors. [`widest`] runs a closure
//! through a function compiled with AVX-512 (or AVX2 and FMA), picked at run time by the kernel
//! path of this process ([`KernelPath::selected`], `JANUS_KERNELS`), so the same source runs 4×
//! wider where the CPU allows. The closure, and what it calls, must inline into that function:
//! keep the work in the closure or in `#[inline(always)]` functions.

use super::KernelPath;

/// Runs `f`, compiled with the vector instructions of this process's kernel path.
#[inline(always)]
pub(crate) fn widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            // SAFETY: `level` checked that the CPU has every feature the function enables.
            Level::V4 => return unsafe { v4(f) },
            // SAFETY: as above.
            Level::V3 => return unsafe { v3(f) },
            Level::Base => {}
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Base,
    V3,
    V4,
}

/// The instruction level `widest` compiles for: the kernel path's, where the CPU has the
/// features the functions below enable. Read once.
#[cfg(target_arch = "x86_64")]
fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let v3 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let v4 = v3
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl");
        match KernelPath::selected().unwrap_or(KernelPath::Portable) {
            KernelPath::Avx512 if v4 => Level::V4,
            KernelPath::Avx512 | KernelPath::Avx2 if v3 => Level::V3,
            _ => Level::Base,
        }
    })
}

/// # Safety
/// The CPU must have AVX-512 F, BW, DQ and VL, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn v4<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn v3<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `x` rounded to bf16 (to nearest, ties to even; a NaN stays a quiet NaN): what
/// `half::bf16::from_f32` gives, without branches, so that loops of it vectorize.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x40;
    (if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

/// Lanes the reductions below keep (one 512-bit vector of f32).
const LANES: usize = 16;

/// The largest value of `x` (−∞ for none; NaNs are skipped), in lanes the compiler vectorizes.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

/// The sum of `x`, in lanes (each lane sums every sixteenth value, then the lanes are added).
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    chunks.remainder().iter().sum::<f32>() + acc.iter().sum::<f32>()
}

/// `x ← f(x)` for every value, and the sum of the results, in lanes.
#[inline(always)]
pub(crate) fn map_sum(x: &mut [f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = f(*v);
            *a += *v;
        }
    }
    let mut tail = 0.0f32;
    for v in chunks.into_remainder() {
        *v = f(*v);
        tail += *v;
    }
    tail + acc.iter().sum::<f32>()
}

/// The sums of `x` and of its squares about `center`, in lanes.
#[inline(always)]
pub(crate) fn sum_sq(x: &[f32], center: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = v - center;
            *a += d * d;
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&v| (v - center) * (v - center))
        .sum();
    tail + acc.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_halfs() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
        ];
        let spread = (0..200_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)));
        for x in specials.into_iter().chain(spread) {
            assert_eq!(
                bf16_bits(x),
                half::bf16::from_f32(x).to_bits(),
                "{x:e} ({:#x})",
                x.to_bits()
            );
        }
    }

    #[test]
    fn reductions_match_their_definitions() {
        for n in [0usize, 1, 15, 16, 17, 100, 1000] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 101) as f32 / 10.0 - 5.0)
                .collect();
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want_sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
            let c = 0.25f32;
            let want_sq: f64 = x.iter().map(|&v| f64::from(v - c).powi(2)).sum();
            let (m, s, q) = widest(
                #[inline(always)]
                || (max(&x), sum(&x), sum_sq(&x, c)),
            );
            assert_eq!(m, want_max, "{n}");
            assert!(
                (f64::from(s) - want_sum).abs() < 1e-3,
                "{n}: {s} vs {want_sum}"
            );
            assert!(
                (f64::from(q) - want_sq).abs() < 1e-2,
                "{n}: {q} vs {want_sq}"
            );
        }
        let with_nan = [1.0, f32::NAN, 3.0, -2.0];
        assert_eq!(max(&with_nan), 3.0);
    }
}
