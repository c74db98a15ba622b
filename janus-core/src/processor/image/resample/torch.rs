//! PyTorch's CPU uint8 antialiased bicubic kernel (`_upsample_bicubic2d_aa`), as transformers'
//! torchvision-backed `JanusImageProcessor` uses it: its cubic, and `i16` coefficients with the
//! most fractional bits that keep the largest weight below 2^15.

/// PyTorch's `cubic_convolution1/2` with A = -0.5 (Pillow's polynomial, another operation
/// order).
pub(super) fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// The pass's fractional bits: the most (up to 22) for which the largest weight `wt_max` stays
/// below 2^15 in fixed point, at least 1.
pub(super) fn precision(wt_max: f64) -> u32 {
    let mut p = 0u32;
    while p < 22 {
        let next = (0.5 + wt_max * f64::from(1u32 << (p + 1))) as i32;
        if next >= 1 << 15 {
            break;
        }
        p += 1;
    }
    p.max(1)
}

/// A coefficient as PyTorch stores it: rounded, then held in an `i16`.
pub(super) fn quantize(v: f64) -> i32 {
    i32::from(super::round_half_away(v) as i16)
}
