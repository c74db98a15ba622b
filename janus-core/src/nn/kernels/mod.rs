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

pub mod bf16_gemm;
pub mod conv;
pub mod dispatch;
pub mod group_norm;
pub mod half_matvec;
pub mod quant;
pub(crate) mod simd;
#[cfg(feature = "flex")]
pub mod winograd;

pub use bf16_gemm::{Bf16Gemm, bf16_gemm};
pub use dispatch::KernelPath;
pub use half_matvec::{HalfKind, MAX_ROWS, half_matvec, half_matvec_many};
pub use quant::{QK, QuantKind, QuantMatrix, quant_matvec, quant_matvec_many};

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

/// Asks Linux to back a large, not yet touched weight buffer with transparent huge pages where
/// the system allows them on request (`enabled` = `madvise`): 2 MiB faults instead of 512 small
/// ones while it fills, and fewer TLB misses each time a decoding step streams it. A refusal
/// (old kernel, THP off) leaves ordinary pages.
pub fn prefer_huge_pages<T>(buf: &mut [T]) {
    const HUGE: usize = 2 << 20;
    if std::mem::size_of_val(buf) >= 2 * HUGE {
        #[cfg(target_os = "linux")]
        advise(buf, HUGE, libc::MADV_HUGEPAGE);
    }
}

/// Asks Linux to map the pages of `buf` now, in one call, before it is written: a large
/// zeroed allocation otherwise takes a page fault, a trap into the kernel, for each 4 KiB page
/// as it is first written (~2 µs a page all told on a virtual machine, zeroing included).
/// A refusal (kernels before 5.14) leaves the faults to happen as before.
pub fn map_pages_now<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    advise(buf, 4096, libc::MADV_POPULATE_WRITE);
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// `madvise(advice)` over the whole `unit`-sized, `unit`-aligned pieces inside `buf`; the
/// result is ignored (advice only changes how pages are backed, or maps zero pages, never the
/// values the buffer holds).
#[cfg(target_os = "linux")]
fn advise<T>(buf: &mut [T], unit: usize, advice: libc::c_int) {
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(unit);
    let last = (start + std::mem::size_of_val(buf)) / unit * unit;
    if last > first {
        // SAFETY: the range lies inside `buf`, which this function borrows mutably; the advice
        // used here changes how its pages are backed, never their contents (a page mapped
        // now of an allocation that reads as zero stays zero).
        let _ = unsafe { libc::madvise(first as *mut libc::c_void, last - first, advice) };
    }
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

/// The outputs of one or several matrices that multiply the same rows of `x`, in one pass over
/// the pool: `ys[m][r·outs[m] + o] = dot(m, o)[r]`, the output rows split across the pool, each
/// task filling one contiguous piece of a transposed buffer (`[Σ outs, rows]`), then laid out
/// row-major. `dot(m, o, acc)` fills `acc.len() / rows` consecutive outputs of matrix `m` from
/// `o` (up to `group`: a kernel that reads several rows of `W` per pass loads each activation
/// value once for all of them; fewer at the end of a task or of a matrix). One pass instead of one per matrix keeps both threads streaming weights
/// from one product into the next, with one wake-up of the pool (a decoder layer's q, k and v,
/// or gate and up).
fn each_output_of<F>(rows: usize, outs: &[usize], ys: &mut [&mut [f32]], group: usize, dot: F)
where
    F: Fn(usize, usize, &mut [f32]) + Sync,
{
    debug_assert!(group >= 1 && outs.len() == ys.len());
    let starts: Vec<usize> = outs
        .iter()
        .scan(0, |acc, &n| {
            let s = *acc;
            *acc += n;
            Some(s)
        })
        .collect();
    let total: usize = outs.iter().sum();
    // The matrix holding global output `o`, and its index there.
    let locate = |o: usize| {
        let m = starts.partition_point(|&s| s <= o) - 1;
        (m, o - starts[m])
    };
    let mut yt = vec![0.0f32; total * rows];
    yt.par_chunks_mut(OUTPUTS_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, chunk)| {
            let n = chunk.len() / rows;
            let mut k = 0;
            while k < n {
                let (m, o) = locate(task * OUTPUTS_PER_TASK + k);
                let g = group.min(n - k).min(outs[m] - o);
                dot(m, o, &mut chunk[k * rows..(k + g) * rows]);
                k += g;
            }
        });
    for (o, acc) in yt.chunks_exact(rows).enumerate() {
        let (m, o) = locate(o);
        for (r, v) in acc.iter().enumerate() {
            ys[m][r * outs[m] + o] = *v;
        }
    }
}
