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
