//! CPU kernels for decode-shaped products over compact weights, and the choice among their
//! instruction-set paths.
//!
//! A decoding step multiplies one to a few activation rows by every weight matrix, so it is bound
//! by reading the weights. These kernels read each weight byte once for all rows, widen it to f32
//! in registers and accumulate in f32. Every kernel has a portable twin; the paths are tested
//! against each other and against the plain definition.
//!
//! The path is picked once per process: the widest one this CPU supports, or the one named by the
//! environment variable `JANUS_KERNELS` (`auto`, `portable`, `avx2`, `avx512`).

pub mod dispatch;
pub mod half_matvec;
pub mod quant;

pub use dispatch::KernelPath;
pub use half_matvec::{HalfKind, MAX_ROWS, half_matvec};
pub use quant::{QK, QuantKind, QuantMatrix, quant_matvec};

use rayon::prelude::*;

use crate::error::{Error, Result};

/// How far ahead of the loads the SIMD loops ask for weight bytes, once per cache line. Each task
/// walks its rows of `W` as one stream, and the hardware prefetcher alone leaves decode-shaped
/// products well below the memory's speed on this machine class (2 threads, Janus-Pro-7B: a CFG
/// step in bf16 476 → 389 ms, in q8_0 320 → 228 ms with it; 2–8 KB ahead measure alike).
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 4096;

/// Asks for the cache line `bytes` past `p` (a hint: it never faults, even past the end of the
/// data, so the address is formed with wrapping arithmetic and never dereferenced).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch<T>(p: *const T, bytes: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: a prefetch is a hint; it reads nothing the program can observe and cannot fault.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(bytes)) }
}

/// Output rows of `W` one task computes (enough to amortise the task, small enough to spread a
/// 2048-wide layer over the threads).
const OUTPUTS_PER_TASK: usize = 64;

/// The checks every decode-shaped product makes: 1 to [`MAX_ROWS`] rows, slices that match the
/// shapes, a path this CPU runs.
fn check_product(
    name: &str,
    path: KernelPath,
    rows: usize,
    (d_in, out): (usize, usize),
    (x_len, y_len): (usize, usize),
) -> Result<()> {
    let bad = |msg: String| Err(Error::InvalidInput(format!("{name}: {msg}")));
    if !(1..=MAX_ROWS).contains(&rows) {
        return bad(format!("{rows} rows; 1 to {MAX_ROWS} are served"));
    }
    if x_len != rows * d_in || y_len != rows * out {
        return bad(format!(
            "x has {x_len} values and y {y_len}, for {rows} rows of {d_in} inputs and {out} outputs"
        ));
    }
    if !path.supported() {
        return bad(format!("this CPU cannot run the {} path", path.name()));
    }
    Ok(())
}

/// `y[r·out + o] = dot(o)[r]`: the output rows of `W` split across the pool, each task filling
/// one contiguous piece of a transposed buffer (`[out, rows]`), then laid out row-major.
fn each_output<F>(rows: usize, out: usize, y: &mut [f32], dot: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    each_output_group(rows, out, y, 1, |o, acc| dot(o, acc));
}

/// As [`each_output`], `dot(o, acc)` filling `acc.len() / rows` consecutive outputs from `o`
/// (`group` of them, fewer at the end of a task): a kernel that reads several rows of `W` in one
/// pass loads each activation value once for all of them.
fn each_output_group<F>(rows: usize, out: usize, y: &mut [f32], group: usize, dot: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    debug_assert!(group >= 1 && OUTPUTS_PER_TASK.is_multiple_of(group));
    let mut yt = vec![0.0f32; out * rows];
    yt.par_chunks_mut(OUTPUTS_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (k, acc) in chunk.chunks_mut(group * rows).enumerate() {
                dot(task * OUTPUTS_PER_TASK + k * group, acc);
            }
        });
    for (o, acc) in yt.chunks_exact(rows).enumerate() {
        for (r, v) in acc.iter().enumerate() {
            y[r * out + o] = *v;
        }
    }
}
