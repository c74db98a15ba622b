//! Pillow's antialiased bicubic resampling (`ImagingResample`, `BICUBIC`), as the official
//! DeepSeek processor uses it: its cubic, 22-bit coefficients, and Pillow 13's pass order.

/// Fractional bits of Pillow's coefficients.
pub(super) const PRECISION: u32 = 22;

/// Pillow's `bicubic_filter` (a = -0.5).
pub(super) fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// A coefficient in Pillow's fixed point.
pub(super) fn quantize(v: f64) -> i32 {
    super::round_half_away(v)
}

/// Whether Pillow 13 runs the vertical pass first from `(w, h)` to `(width, height)`: when the
/// height shrinks by more than twice as many pixels as the width (older Pillow and PyTorch
/// always start horizontally).
pub(super) fn vertical_first((w, h): (usize, usize), (width, height): (usize, usize)) -> bool {
    let dy = h as i64 - height as i64;
    let dx = w as i64 - width as i64;
    dy > 0 && dy > dx * 2
}
