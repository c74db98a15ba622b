//! GELU and SiLU as the references compute them on the CPU, without a library call per value.
//!
//! The exact GELU is `x·Φ(x) = ½·x·(1 + erf(x/√2))`. The CPU backend evaluates `erf` one value at
//! a time through libm (SigLIP-L/16 applies it to 56 M values per image: 14 % of its time).
//! PyTorch's vectorized CPU `erf` uses Abramowitz and Stegun's formula 7.1.26 (absolute error
//! below 1.5e-7) with a vectorized `exp`; this module computes the same formula in loops the
//! compiler vectorizes, on the thread pool. SiLU (`x·σ(x)`, the decoder's MLP and the VQ
//! decoder's swish) takes the same `exp`. Other devices and dtypes take the backend's functions.

use burn::tensor::activation::{gelu, silu};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

/// Values one task computes.
const CHUNK: usize = 1 << 14;

/// The exact (erf) GELU of `x`.
pub fn gelu_erf<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    map_f32(x, gelu_value, gelu)
}

/// SiLU (swish), `x·σ(x)`.
pub fn silu_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    map_f32(x, silu_value, silu)
}

/// `f` on every value of an f32 tensor on the CPU, in chunks on the thread pool; `otherwise`
/// (the backend's function) for other devices and dtypes.
/// `f` is a type parameter, not a function pointer, so that it inlines into the loop and the loop
/// vectorizes.
fn map_f32<const D: usize, F: Fn(f32) -> f32 + Sync>(
    x: Tensor<D>,
    f: F,
    otherwise: fn(Tensor<D>) -> Tensor<D>,
) -> Tensor<D> {
    if x.dtype() != DType::F32 || !crate::device::is_cpu(&x.device()) {
        return otherwise(x);
    }
    let (shape, device) = (x.shape(), x.device());
    let mut values: Vec<f32> = x
        .into_data()
        .try_into_vec()
        .expect("an f32 tensor reads back as f32");
    map_in_place(&mut values, f);
    Tensor::from_data(TensorData::new(values, shape), &device)
}

/// `f` on every value of `x`, in place, in chunks on the thread pool, compiled for the widest
/// vectors ([`widest`](super::kernels::simd::widest)).
pub(crate) fn map_in_place<F: Fn(f32) -> f32 + Sync>(x: &mut [f32], f: F) {
    x.par_chunks_mut(CHUNK).for_each(|chunk| {
        super::kernels::simd::widest(
            #[inline(always)]
            || chunk.iter_mut().for_each(|v| *v = f(*v)),
        )
    });
}

/// `x·σ(x)`, with `σ(x) = 1/(1 + e^(−|x|))` for `x ≥ 0` and `e^(−|x|)/(1 + e^(−|x|))` below (no
/// overflow either way).
#[inline(always)]
pub(crate) fn silu_value(x: f32) -> f32 {
    let e = exp_neg(x.abs());
    let s = if x >= 0.0 { 1.0 } else { e } / (1.0 + e);
    x * s
}

/// `½·x·(1 + erf(x/√2))`.
#[inline(always)]
pub(crate) fn gelu_value(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Abramowitz and Stegun 7.1.26: `erf(a) = 1 − (a₁t + a₂t² + a₃t³ + a₄t⁴ + a₅t⁵)·e^(−a²)`,
/// `t = 1/(1 + p·a)` for `a = |x| ≥ ½` (the series below ½), odd in `x`.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    let large = 1.0 - poly * exp_neg(a * a);
    // Near 0 the formula loses digits to cancellation (1 − a value close to 1); there the
    // Maclaurin series, 2/√π·(a − a³/3 + a⁵/10 − a⁷/42 + a⁹/216 − a¹¹/1320), is exact to f32.
    let z = a * a;
    let series = a
        * std::f32::consts::FRAC_2_SQRT_PI
        * (1.0
            + z * (-1.0 / 3.0
                + z * (1.0 / 10.0 + z * (-1.0 / 42.0 + z * (1.0 / 216.0 + z * (-1.0 / 1320.0))))));
    let y = if a < 0.5 { series } else { large };
    // Odd: the sign of x on |erf|, by its bit.
    f32::from_bits(y.to_bits() | (x.to_bits() & 0x8000_0000))
}

/// `e^(−v)` for `v ≥ 0` (0 once it underflows): `2ⁿ·e^r` with `n = round(−v/ln 2)`,
/// `|r| ≤ ln 2 / 2`, `e^r` by its Taylor polynomial of degree 6 (relative error below 2e-7).
#[inline(always)]
pub(crate) fn exp_neg(v: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a library call.
    const ROUND: f32 = 12_582_912.0;
    let v = v.min(87.0);
    let shifted = -v * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = -v - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2ⁿ from its exponent bits (−126 ≤ n ≤ 0 for 0 ≤ v ≤ 87). The low mantissa bits of
    // `shifted` hold 2²² + n, so the low 9 bits of its bits plus 127 are n + 127: shifted into
    // the exponent field, the rest falls off. Integer lane operations only; `n as i32` would
    // be converted one lane at a time (its saturating semantics have no vector instruction).
    p * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
}

/// [`exp_neg`] of 16 values: the same steps, each multiply and add fused.
///
/// # Safety
/// AVX-512F and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) fn exp_neg_avx512(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0;
    let c = _mm512_set1_ps;
    // min(v, 87), a NaN becoming 87 as `f32::min` makes it.
    let v = _mm512_min_ps(v, c(87.0));
    let shifted = _mm512_fnmadd_ps(v, c(LOG2E), c(ROUND));
    let n = _mm512_sub_ps(shifted, c(ROUND));
    let r = _mm512_fnmadd_ps(n, c(LN2_HI), _mm512_sub_ps(_mm512_setzero_ps(), v));
    let r = _mm512_fnmadd_ps(n, c(LN2_LO), r);
    let mut p = c(1.0 / 720.0);
    for k in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, c(k));
    }
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_castps_si512(shifted),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(p, _mm512_castsi512_ps(bits))
}

/// [`gelu_value`] of 16 values: the same formula with fused multiply-adds, and `1/(1 + p·a)`
/// by a reciprocal estimate refined by one Newton step (within an f32 rounding step or two of
/// the division, far inside the formula's own 1.5e-7).
///
/// # Safety
/// AVX-512F and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) fn gelu_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        1.061_405_4,
        -1.453_152_1,
        1.421_413_7,
        -0.284_496_74,
        0.254_829_6,
    ];
    const SERIES: [f32; 6] = [
        -1.0 / 1320.0,
        1.0 / 216.0,
        -1.0 / 42.0,
        1.0 / 10.0,
        -1.0 / 3.0,
        1.0,
    ];
    let c = _mm512_set1_ps;
    let z = _mm512_mul_ps(x, c(std::f32::consts::FRAC_1_SQRT_2));
    let a = _mm512_abs_ps(z);
    // Past 16, erf is 1 in f32 whatever t is; the bound keeps t finite for a = ∞.
    let den = _mm512_fmadd_ps(_mm512_min_ps(a, c(16.0)), c(P), c(1.0));
    let r0 = _mm512_rcp14_ps(den);
    let t = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(den, r0, c(1.0)), r0);
    let mut poly = c(A[0]);
    for k in &A[1..] {
        poly = _mm512_fmadd_ps(poly, t, c(*k));
    }
    let poly = _mm512_mul_ps(poly, t);
    let zz = _mm512_mul_ps(a, a);
    let large = _mm512_fnmadd_ps(poly, exp_neg_avx512(zz), c(1.0));
    let mut series = c(SERIES[0]);
    for k in &SERIES[1..] {
        series = _mm512_fmadd_ps(series, zz, c(*k));
    }
    let series = _mm512_mul_ps(
        _mm512_mul_ps(a, c(std::f32::consts::FRAC_2_SQRT_PI)),
        series,
    );
    let small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, c(0.5));
    let y = _mm512_mask_blend_ps(small, large, series);
    // Odd: the sign of z on |erf|.
    let sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(i32::MIN));
    let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
    _mm512_mul_ps(_mm512_mul_ps(c(0.5), x), _mm512_add_ps(c(1.0), erf))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `erf` within 4e-7 of the f64 reference below over the range GELU meets (the formula's 1.5e-7
    /// plus f32 rounding), and `exp_neg` against f64's `exp`.
    #[test]
    fn erf_and_exp_follow_their_definitions() {
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let want = libm_erf(f64::from(x));
            let got = f64::from(erf(x));
            assert!((got - want).abs() < 4e-7, "erf({x}) = {got}, want {want}");
        }
        for i in 0..=8_700 {
            let v = i as f32 * 1e-2;
            let want = (-f64::from(v)).exp();
            let got = f64::from(exp_neg(v));
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp(-{v}) = {got}, want {want}"
            );
        }
        assert_eq!(exp_neg(1e30), exp_neg(87.0));
        // 2ⁿ from the shifted value's bits is 2ⁿ from n converted to an integer.
        for i in 0..=870_000 {
            let v = i as f32 * 1e-4;
            let n = (-v * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let by_int = f32::from_bits(((n as i32 + 127) as u32) << 23);
            let shifted = -v * std::f32::consts::LOG2_E + 12_582_912.0;
            let by_bits = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
            assert_eq!(by_bits.to_bits(), by_int.to_bits(), "v = {v}");
        }
        assert_eq!(erf(0.0), 0.0);
        assert!(erf(-0.0).is_sign_negative());
    }

    /// The vector `exp_neg` within the scalar one's bound of f64's `exp`, and alike at the edges.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_follows_its_definition() {
        use std::arch::x86_64::*;
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")) {
            return;
        }
        let exp16 = |v: [f32; 16]| {
            let mut out = [0f32; 16];
            // SAFETY: the features were detected; loads and stores of 16 values.
            unsafe {
                let e = exp_neg_avx512(_mm512_loadu_ps(v.as_ptr()));
                _mm512_storeu_ps(out.as_mut_ptr(), e);
            }
            out
        };
        for i in (0..=8_704).step_by(16) {
            let v: [f32; 16] = std::array::from_fn(|j| (i + j).min(8_700) as f32 * 1e-2);
            for (&v, got) in v.iter().zip(exp16(v)) {
                let want = (-f64::from(v)).exp();
                assert!(
                    (f64::from(got) - want).abs() <= 3e-7 * want,
                    "exp(-{v}) = {got}, want {want}"
                );
            }
        }
        let mut specials = [0f32; 16];
        specials[..4].copy_from_slice(&[1e30, f32::INFINITY, f32::NAN, 87.0]);
        let edges = exp16(specials);
        for got in &edges[..3] {
            assert_eq!(got.to_bits(), edges[3].to_bits());
        }
        assert_eq!(edges[4], 1.0);
    }

    /// The vector GELU within a few f32 rounding steps of the scalar one, and alike at the
    /// edges (±∞, NaN, ±0).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_gelu_follows_the_scalar_one() {
        use std::arch::x86_64::*;
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")) {
            return;
        }
        let gelu16 = |v: &[f32]| {
            let mut out = [0f32; 16];
            // SAFETY: the features were detected; loads and stores of 16 values.
            unsafe {
                let g = gelu_avx512(_mm512_loadu_ps(v.as_ptr()));
                _mm512_storeu_ps(out.as_mut_ptr(), g);
            }
            out
        };
        let xs: Vec<f32> = (-120_000..120_000).map(|i| i as f32 * 1e-4).collect();
        for chunk in xs.chunks_exact(16) {
            for (&x, g) in chunk.iter().zip(gelu16(chunk)) {
                let want = gelu_value(x);
                assert!(
                    (g - want).abs() <= 4e-7 * x.abs().max(1.0),
                    "gelu({x}) = {g}, want {want}"
                );
            }
        }
        let mut edges = [0f32; 16];
        edges[..6].copy_from_slice(&[f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0, 40.0]);
        for (&x, g) in edges.iter().zip(gelu16(&edges)) {
            let want = gelu_value(x);
            assert!(
                g == want || (g.is_nan() && want.is_nan()),
                "gelu({x}) = {g}, want {want}"
            );
        }
    }

    /// erf in f64 by its Maclaurin series (small |x|) and continued fraction (large |x|): an
    /// independent reference, accurate to ~1e-12 over the tested range.
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let y = if a < 2.5 {
            // Σ (−1)ⁿ x^(2n+1) / (n! (2n+1)), times 2/√π.
            let (mut term, mut sum, mut n) = (a, a, 0.0f64);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = e^(−a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + 2/(a + …))))).
            let mut frac = a;
            for k in (1..60).rev() {
                frac = a + (k as f64 / 2.0) / frac;
            }
            1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * frac)
        };
        y.copysign(x)
    }

    /// SiLU equals the backend's up to the exponential's error, large magnitudes included.
    #[test]
    fn silu_matches_the_backends() {
        let device = crate::device::default_device();
        let n = 2 * (CHUNK + 5);
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 40_009) as f32 / 200.0 - 100.0)
            .collect();
        let t = Tensor::<2>::from_data(TensorData::new(x.clone(), [2, n / 2]), &device);
        let ours: Vec<f32> = silu_f32(t.clone()).into_data().try_to_vec().unwrap();
        let theirs: Vec<f32> = silu(t).into_data().try_to_vec().unwrap();
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                (a - b).abs() <= 5e-7 * (1e-6 + b.abs()) + 1e-30,
                "silu({}) = {a}, backend {b}",
                x[i]
            );
        }
    }

    /// The tensor function equals the backend's exact GELU up to the formula's error, shape and
    /// all.
    #[test]
    fn gelu_matches_the_backends() {
        let device = crate::device::default_device();
        let n = 3 * (CHUNK + 7);
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 20_011) as f32 / 1000.0 - 10.0)
            .collect();
        let t = Tensor::<2>::from_data(TensorData::new(x.clone(), [3, n / 3]), &device);
        let ours = gelu_erf(t.clone());
        assert_eq!(ours.dims(), [3, n / 3]);
        let ours: Vec<f32> = ours.into_data().try_to_vec().unwrap();
        let theirs: Vec<f32> = gelu(t).into_data().try_to_vec().unwrap();
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                (a - b).abs() <= 5e-7 * (1.0 + x[i].abs()),
                "gelu({}) = {a}, backend {b}",
                x[i]
            );
        }
    }
}
