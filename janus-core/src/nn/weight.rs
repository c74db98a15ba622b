//! How a weight matrix is held in memory, and the products and row lookups over it.
//!
//! A matrix is either a tensor in the compute dtype on the model's device ([`Matrix::Dense`],
//! every backend), or, on the CPU backend, compact host memory that kernels read directly:
//! bf16/f16 as stored ([`Matrix::Half`]) or GGML's `q8_0`/`q4_0` blocks ([`Matrix::Quant`]).
//! Compact matrices widen (or dequantize) in registers for decode-shaped products (up to
//! [`MAX_ROWS`] rows) and a block of rows at a time into f32 for prompt-shaped ones, which then
//! run the backend's GEMM; row lookups (embedding tables) widen only the rows taken. With bf16
//! compute, prompt-shaped products take the bf16 kernels, and on CPUs with AMX every product
//! does, decoding steps included (one pass over the weights for every row of a step).

use std::str::FromStr;
use std::sync::Arc;

use burn::module::{
    Content, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor, Param,
    ParamId,
};
use burn::tensor::module::embedding;
use burn::tensor::{DType, Int, Tensor, TensorData};
use rayon::prelude::*;

#[cfg(feature = "flex")]
use super::kernels::bf16_gemm;
use super::kernels::{
    Bf16Gemm, HalfKind, KernelPath, MAX_ROWS, QuantKind, QuantMatrix, half_matvec,
    half_matvec_many, quant_matvec, quant_matvec_many,
};
use super::matvec;
use crate::error::{Error, Result};

/// How weights are stored in memory (`--weights`). Activations are computed in the compute dtype
/// (`--dtype`) whatever the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WeightFormat {
    /// On the CPU, each weight in the half precision its file stores (bf16 or f16), else f32;
    /// on a GPU, the compute dtype.
    #[default]
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16 (exact for bf16 checkpoints, which all real Janus checkpoints are).
    Bf16,
    /// IEEE half.
    F16,
    /// GGML's `q8_0`: blocks of 32 int8 with one f16 scale (8.5 bits a weight).
    Q8_0,
    /// GGML's `q4_0`: blocks of 32 nibbles with one f16 scale (4.5 bits a weight).
    Q4_0,
}

impl WeightFormat {
    /// Every value, `auto` first.
    pub const ALL: [WeightFormat; 6] = [
        WeightFormat::Auto,
        WeightFormat::F32,
        WeightFormat::Bf16,
        WeightFormat::F16,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
    ];

    /// The name used by the CLI, Python and JSON (`auto`, `f32`, `bf16`, `f16`, `q8_0`, `q4_0`).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Auto => "auto",
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::F16 => "f16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
        }
    }

    /// The block format of a quantized storage.
    pub(crate) fn quant(self) -> Option<QuantKind> {
        match self {
            WeightFormat::Q8_0 => Some(QuantKind::Q8_0),
            WeightFormat::Q4_0 => Some(QuantKind::Q4_0),
            _ => None,
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown weight format `{s}` (expected one of {})",
                    Self::ALL.map(|f| f.name()).join(", ")
                ))
            })
    }
}

/// The 16-bit patterns of a [`HalfMatrix`]: in memory of their own, or the stored bytes of a
/// memory-mapped checkpoint file that already holds them in this layout (no copy at load: the
/// matrix reads the system's cached pages of the file).
pub(crate) enum HalfBits {
    /// Patterns of their own.
    Owned(Vec<u16>),
    /// `len` patterns at byte `start` of `map` (2-byte aligned, checked by [`HalfBits::mapped`]).
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    },
}

impl HalfBits {
    /// The bytes `start..end` of `map` as little-endian 16-bit patterns, where they can be read
    /// in place: an even start and length inside the map, on a little-endian machine.
    pub(crate) fn mapped(map: Arc<memmap2::Mmap>, start: usize, end: usize) -> Option<Self> {
        let fits = end <= map.len() && start <= end && (end - start).is_multiple_of(2);
        let aligned = (map.as_ptr() as usize + start).is_multiple_of(std::mem::align_of::<u16>());
        (cfg!(target_endian = "little") && fits && aligned).then(|| HalfBits::Mapped {
            map,
            start,
            len: (end - start) / 2,
        })
    }

    /// Whether the patterns are read from a mapped file.
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self, HalfBits::Mapped { .. })
    }
}

impl From<Vec<u16>> for HalfBits {
    fn from(bits: Vec<u16>) -> Self {
        HalfBits::Owned(bits)
    }
}

impl std::ops::Deref for HalfBits {
    type Target = [u16];

    fn deref(&self) -> &[u16] {
        match self {
            HalfBits::Owned(bits) => bits,
            HalfBits::Mapped { map, start, len } => {
                let bytes = &map[*start..*start + 2 * *len];
                // SAFETY: `mapped` checked that the range lies inside the map, has an even
                // length and starts 2-byte aligned; any bit pattern is a valid `u16`; the map is
                // read-only and lives as long as `self` (the `Arc`).
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u16>(), *len) }
            }
        }
    }
}

impl std::fmt::Debug for HalfBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (how, len) = match self {
            HalfBits::Owned(bits) => ("owned", bits.len()),
            HalfBits::Mapped { len, .. } => ("mapped", *len),
        };
        write!(f, "HalfBits({how}, {len} values)")
    }
}

/// bf16 or f16 values as their 16-bit patterns, `[out, in]` row-major.
#[derive(Debug)]
pub(crate) struct HalfMatrix {
    pub kind: HalfKind,
    pub bits: HalfBits,
    pub out: usize,
    pub d_in: usize,
    /// bf16 compute (`--dtype bf16` on the CPU): prompt-shaped products round the activations
    /// to bf16 and sum the products in f32 on the CPU's bf16 instructions
    /// ([`Bf16Gemm`](super::kernels::Bf16Gemm)), as PyTorch's bf16 path does; without them, and
    /// for shapes they do not cover, the exact f32 product. Only for bf16 weights.
    pub bf16_products: bool,
}

impl HalfMatrix {
    fn widen_rows(&self, first: usize, dst: &mut [f32]) {
        let src = &self.bits[first * self.d_in..first * self.d_in + dst.len()];
        match self.kind {
            HalfKind::Bf16 => {
                for (d, &b) in dst.iter_mut().zip(src) {
                    *d = f32::from_bits(u32::from(b) << 16);
                }
            }
            HalfKind::F16 => {
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                let src: &[half::f16] = src.reinterpret_cast();
                src.convert_to_f32_slice(dst);
            }
        }
    }
}

/// A weight matrix `[out, in]`.
// A tensor handle is large but held once per layer, as before; boxing it would add an
// indirection to every dense product for no saving.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum Matrix {
    /// A tensor in the compute dtype: a parameter that training may update.
    Dense(Param<Tensor<2>>),
    /// bf16/f16 in host memory (CPU backend).
    Half(Arc<HalfMatrix>),
    /// Quantized blocks in host memory (CPU backend).
    Quant(Arc<QuantMatrix>),
}

/// A tensor's values as f32 in host memory (the CPU backend's tensors are there already).
fn host_f32(x: Tensor<2>) -> Vec<f32> {
    x.cast(DType::F32)
        .into_data()
        .try_into_vec()
        .expect("a tensor cast to f32 reads back as f32")
}

/// `x·W_mᵀ` for AMX weights `ws` ([`Matrix::amx_weight`], all `[_, in]`): `x` rounded and packed
/// once for all of them.
#[cfg(feature = "flex")]
fn amx_products(ws: &[&[u16]], x: Tensor<2>) -> Vec<Tensor<2>> {
    let [rows, d_in] = x.dims();
    let (dtype, device) = (x.dtype(), x.device());
    let xs = host_f32(x);
    let mut packed = bf16_gemm::PackedRows::default();
    packed
        .pack(Bf16Gemm::Amx, &xs, rows, d_in)
        .expect("the weights' shapes were checked when they loaded");
    ws.iter()
        .map(|w| {
            let out = w.len() / d_in;
            let mut y = vec![0.0f32; rows * out];
            bf16_gemm::bf16_gemm_packed(&packed, w, &mut y)
                .expect("the product's shape was checked when the weight loaded");
            Tensor::<2>::from_data(TensorData::new(y, [rows, out]), &device).cast(dtype)
        })
        .collect()
}

/// Most rows that use the `W·Xᵀ` form on a dense matrix (measured crossover on the CPU backend:
/// beyond about a hundred rows `X·Wᵀ` is faster).
pub(crate) const FEW_ROWS: usize = 128;

/// Values of `W` widened at a time in a prompt-shaped product over a compact matrix (16 MiB of
/// f32, reused by the calling thread).
#[cfg(feature = "flex")]
const WIDEN_BLOCK: usize = 1 << 22;

#[cfg(feature = "flex")]
thread_local! {
    /// The widening scratch of [`Matrix::prompt_product`], kept between calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows of `x` one decode-kernel call takes in a row-invariant step product. The AVX2 kernels
/// keep two accumulators per row in sixteen vector registers: beyond four rows they spill, and
/// two passes over the weights of four rows each are faster than one of eight (Janus-Pro-1B, a
/// 4-image step of 8 rows on a 2-core AVX2 EPYC: 646 → 435 ms; 3, 5 and 6 rows a call measured
/// 475, 427 and 453 ms). The AVX-512 kernels have 32 registers and take [`MAX_ROWS`]. A row's
/// result does not depend on this choice (the kernels are row-invariant).
fn kernel_step_rows(path: KernelPath) -> usize {
    match path {
        KernelPath::Avx2 => 4,
        _ => MAX_ROWS,
    }
}

/// A matrix is a module whose only parameter is a dense weight: compact storage is inference's
/// (the CPU backend without autodiff) and is never trained, moved or recorded.
impl Module for Matrix {
    fn collect_devices(&self, devices: Vec<burn::tensor::Device>) -> Vec<burn::tensor::Device> {
        match self {
            Matrix::Dense(p) => p.collect_devices(devices),
            _ => devices,
        }
    }

    fn fork(self, device: &burn::tensor::Device) -> Self {
        match self {
            Matrix::Dense(p) => Matrix::Dense(p.fork(device)),
            other => other,
        }
    }

    fn to_device(self, device: &burn::tensor::Device) -> Self {
        match self {
            Matrix::Dense(p) => Matrix::Dense(p.to_device(device)),
            other => other,
        }
    }

    fn train(self) -> Self {
        match self {
            Matrix::Dense(p) => Matrix::Dense(p.train()),
            other => other,
        }
    }

    fn valid(&self) -> Self {
        match self {
            Matrix::Dense(p) => Matrix::Dense(p.valid()),
            other => other.clone(),
        }
    }

    fn materialize(self) -> Self {
        match self {
            Matrix::Dense(p) => Matrix::Dense(p.materialize()),
            other => other,
        }
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        if let Matrix::Dense(p) = self {
            Module::visit(p, visitor);
        }
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        match self {
            Matrix::Dense(p) => Matrix::Dense(Module::map(p, mapper)),
            other => other,
        }
    }
}

impl ModuleDisplayDefault for Matrix {
    fn content(&self, content: Content) -> Option<Content> {
        match self {
            Matrix::Dense(p) => p.content(content),
            _ => content
                .add_formatted(&format!("{} matrix {:?}", self.format(), self.dims()))
                .optional(),
        }
    }
}

impl ModuleDisplay for Matrix {}

impl Matrix {
    /// A dense matrix: `w` as a parameter (no gradient unless training asks for one).
    pub(crate) fn dense_param(w: Tensor<2>) -> Self {
        Matrix::Dense(Param::initialized(ParamId::new(), w))
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Matrix::Dense(t) => t.dims(),
            Matrix::Half(h) => [h.out, h.d_in],
            Matrix::Quant(q) => q.dims(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.shape().num_elements() * t.dtype().size(),
            Matrix::Half(h) => h.bits.len() * 2,
            Matrix::Quant(q) => q.bytes(),
        }
    }

    /// The storage's name ([`WeightFormat::name`]).
    pub fn format(&self) -> WeightFormat {
        match self {
            Matrix::Dense(t) => match t.dtype() {
                DType::BF16 => WeightFormat::Bf16,
                DType::F16 => WeightFormat::F16,
                _ => WeightFormat::F32,
            },
            Matrix::Half(h) => match h.kind {
                HalfKind::Bf16 => WeightFormat::Bf16,
                HalfKind::F16 => WeightFormat::F16,
            },
            Matrix::Quant(q) => match q.kind() {
                QuantKind::Q8_0 => WeightFormat::Q8_0,
                QuantKind::Q4_0 => WeightFormat::Q4_0,
            },
        }
    }

    /// Rows `first..` as f32 into `dst` (whole rows), sixteen rows a task on the thread pool.
    fn widen_rows_par(&self, first: usize, dst: &mut [f32]) {
        let d_in = self.dims()[1];
        dst.par_chunks_mut(d_in * 16)
            .enumerate()
            .for_each(|(k, rows)| self.widen_rows(first + k * 16, rows));
    }

    /// Rows `first..first + dst.len() / in` as f32.
    fn widen_rows(&self, first: usize, dst: &mut [f32]) {
        match self {
            Matrix::Half(h) => h.widen_rows(first, dst),
            Matrix::Quant(q) => {
                let d_in = q.dims()[1];
                for (k, row) in dst.chunks_exact_mut(d_in).enumerate() {
                    q.dequantize_row(first + k, row);
                }
            }
            Matrix::Dense(_) => unreachable!("dense matrices are not widened"),
        }
    }

    /// `x·Wᵀ` for `x` `[rows, in]`, `[rows, out]` in `x`'s dtype.
    pub fn product(&self, x: Tensor<2>) -> Tensor<2> {
        let [rows, _] = x.dims();
        match self {
            Matrix::Dense(w) => {
                let w = w.val();
                if matvec::applies(&x.device(), rows) {
                    matvec::forward(x, &w)
                } else if (2..=FEW_ROWS).contains(&rows) {
                    w.matmul(x.transpose()).transpose()
                } else {
                    x.matmul(w.transpose())
                }
            }
            // AMX reads the weights once for any number of rows, at the memory's speed from
            // one row to 32: the prompt's product serves decoding steps too.
            _ if rows <= MAX_ROWS && self.amx_weight().is_none() => self.decode_product(x),
            _ => self.prompt_product(x),
        }
    }

    /// `x·Wᵀ` as a decoding step takes it: every row's result is bit-identical whatever the
    /// number of rows (row-invariant), so the rows of several sequences batched together get
    /// exactly what each gets alone. Compact matrices run the kernels a few rows at a time
    /// ([`kernel_step_rows`]; their summation order does not depend on the row count); dense ones on the CPU
    /// backend one row at a time; on other backends this is [`product`](Self::product).
    pub fn step_product(&self, x: Tensor<2>) -> Tensor<2> {
        let rows = x.dims()[0];
        match self.step_rows(&x.device()) {
            Some(chunk) if rows > chunk => Tensor::cat(
                (0..rows)
                    .step_by(chunk)
                    .map(|s| self.product(x.clone().narrow(0, s, chunk.min(rows - s))))
                    .collect(),
                0,
            ),
            _ => self.product(x),
        }
    }

    /// [`products`](Self::products) as a decoding step takes them ([`step_product`](Self::step_product)).
    pub fn step_products(mats: &[&Matrix], x: Tensor<2>) -> Vec<Tensor<2>> {
        let rows = x.dims()[0];
        let device = x.device();
        let chunk = mats.iter().filter_map(|m| m.step_rows(&device)).min();
        match chunk {
            Some(chunk) if rows > chunk => {
                let mut parts: Vec<Vec<Tensor<2>>> = vec![Vec::new(); mats.len()];
                for s in (0..rows).step_by(chunk) {
                    let piece = x.clone().narrow(0, s, chunk.min(rows - s));
                    for (m, y) in Self::products(mats, piece).into_iter().enumerate() {
                        parts[m].push(y);
                    }
                }
                parts.into_iter().map(|p| Tensor::cat(p, 0)).collect()
            }
            _ => Self::products(mats, x),
        }
    }

    /// Most rows one row-invariant product serves on `device` (`None`: any number).
    fn step_rows(&self, device: &burn::tensor::Device) -> Option<usize> {
        match self {
            Matrix::Dense(_) if crate::device::is_cpu(device) => Some(1),
            Matrix::Dense(_) => None,
            // Each result is one tile product over the whole input, the same instructions in
            // the same order whatever the other rows ([`amx_weight`](Self::amx_weight)).
            _ if self.amx_weight().is_some() => None,
            _ => Some(kernel_step_rows(
                KernelPath::selected().unwrap_or(KernelPath::Portable),
            )),
        }
    }

    /// `x·W_mᵀ` for each matrix of `mats` (all `[_, in]`), as [`product`](Self::product) gives
    /// them one by one. Decode-shaped products over compact matrices of one family (all bf16/f16
    /// of one kind, or all quantized) run as one pass of the kernels over the thread pool.
    pub fn products(mats: &[&Matrix], x: Tensor<2>) -> Vec<Tensor<2>> {
        let [rows, d_in] = x.dims();
        #[cfg(feature = "flex")]
        if mats.len() > 1
            && let Some(ws) = mats
                .iter()
                .map(|m| m.amx_weight())
                .collect::<Option<Vec<_>>>()
        {
            return amx_products(&ws, x);
        }
        let fused = rows <= MAX_ROWS
            && mats.len() > 1
            && mats.iter().all(|m| m.dims()[1] == d_in)
            && match mats[0] {
                Matrix::Half(h) => mats
                    .iter()
                    .all(|m| matches!(m, Matrix::Half(o) if o.kind == h.kind)),
                Matrix::Quant(_) => mats.iter().all(|m| matches!(m, Matrix::Quant(_))),
                Matrix::Dense(_) => false,
            };
        if !fused {
            return mats.iter().map(|m| m.product(x.clone())).collect();
        }
        let (dtype, device) = (x.dtype(), x.device());
        let xs = host_f32(x);
        // The path was validated when the model loaded.
        let path = KernelPath::selected().unwrap_or(KernelPath::Portable);
        let outs: Vec<usize> = mats.iter().map(|m| m.dims()[0]).collect();
        let mut values: Vec<Vec<f32>> = outs.iter().map(|&o| vec![0.0f32; rows * o]).collect();
        let mut ys: Vec<&mut [f32]> = values.iter_mut().map(Vec::as_mut_slice).collect();
        let done = match mats[0] {
            Matrix::Half(h) => {
                let ws: Vec<&[u16]> = mats
                    .iter()
                    .map(|m| match m {
                        Matrix::Half(o) => &o.bits[..],
                        _ => unreachable!("checked above: all bf16/f16 of one kind"),
                    })
                    .collect();
                half_matvec_many(path, h.kind, &xs, rows, &ws, d_in, &mut ys)
            }
            _ => {
                let ws: Vec<&QuantMatrix> = mats
                    .iter()
                    .map(|m| match m {
                        Matrix::Quant(q) => q.as_ref(),
                        _ => unreachable!("checked above: all quantized"),
                    })
                    .collect();
                quant_matvec_many(path, &ws, &xs, rows, &mut ys)
            }
        };
        done.expect("the products' shapes were checked above");
        values
            .into_iter()
            .zip(outs)
            .map(|(y, out)| {
                Tensor::<2>::from_data(TensorData::new(y, [rows, out]), &device).cast(dtype)
            })
            .collect()
    }

    /// Up to [`MAX_ROWS`] rows: the kernels read each weight once for all rows.
    fn decode_product(&self, x: Tensor<2>) -> Tensor<2> {
        let [rows, d_in] = x.dims();
        let [out, w_in] = self.dims();
        assert_eq!(d_in, w_in, "a product's input width must be the weight's");
        let (dtype, device) = (x.dtype(), x.device());
        let xs = host_f32(x);
        // The path was validated when the model loaded.
        let path = KernelPath::selected().unwrap_or(KernelPath::Portable);
        let mut y = vec![0.0f32; rows * out];
        let done = match self {
            Matrix::Half(h) => half_matvec(path, h.kind, &xs, rows, &h.bits, d_in, &mut y),
            Matrix::Quant(q) => quant_matvec(path, q, &xs, rows, &mut y),
            Matrix::Dense(_) => unreachable!("dense matrices take the backend's product"),
        };
        done.expect("the product's shapes were checked above");
        Tensor::<2>::from_data(TensorData::new(y, [rows, out]), &device).cast(dtype)
    }

    /// Many rows: `W` is widened a block of rows at a time into a scratch buffer the calling
    /// thread keeps, and each block is multiplied by every row of `x` with the CPU backend's
    /// GEMM (`gemm`, on the thread pool), so `W` is read once and never widened whole.
    #[cfg(feature = "flex")]
    fn prompt_product(&self, x: Tensor<2>) -> Tensor<2> {
        let [out, d_in] = self.dims();
        let [rows, _] = x.dims();
        let (dtype, device) = (x.dtype(), x.device());
        let xs = host_f32(x);
        if let Some((path, w)) = self.bf16_operands() {
            let mut y = vec![0.0f32; rows * out];
            bf16_gemm(path, &xs, rows, w, d_in, &mut y)
                .expect("the product's shape was checked by `bf16_gemm`");
            return Tensor::<2>::from_data(TensorData::new(y, [rows, out]), &device).cast(dtype);
        }
        let per = (WIDEN_BLOCK / d_in).clamp(1, out);
        let mut y = vec![0.0f32; rows * out];
        SCRATCH.with_borrow_mut(|scratch| {
            if scratch.len() < per * d_in {
                scratch.resize(per * d_in, 0.0);
            }
            let mut first = 0;
            while first < out {
                let n = per.min(out - first);
                let w = &mut scratch[..n * d_in];
                self.widen_rows_par(first, w);
                // y[:, first..first + n] = x · Wblockᵀ, the form the backend's own product of
                // `x` and a transposed weight takes.
                // SAFETY: x is [rows, d_in] (row stride d_in); Wblockᵀ read from w ([n, d_in])
                // is [d_in, n] with column stride d_in; the destination columns
                // first..first + n of y ([rows, out], row stride out) are in bounds.
                unsafe {
                    gemm::gemm(
                        rows,
                        n,
                        d_in,
                        y.as_mut_ptr().add(first),
                        1,
                        out as isize,
                        false,
                        xs.as_ptr(),
                        1,
                        d_in as isize,
                        w.as_ptr(),
                        d_in as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(rayon::current_num_threads()),
                    );
                }
                first += n;
            }
        });
        Tensor::<2>::from_data(TensorData::new(y, [rows, out]), &device).cast(dtype)
    }

    /// The bf16 instruction path and the weight's bits, where this matrix takes bf16 products
    /// ([`HalfMatrix::bf16_products`]), the machine has a path and it covers the shape.
    pub(crate) fn bf16_operands(&self) -> Option<(Bf16Gemm, &[u16])> {
        match self {
            Matrix::Half(h) if Bf16Gemm::covers(h.out, h.d_in) => {
                Some((self.bf16_path()?, &h.bits))
            }
            _ => None,
        }
    }

    /// The weight's bf16 bits where its products take the AMX path: bf16 compute on a CPU with
    /// AMX, in a shape the path covers. There every product, a decoding step's included, is the
    /// tile product ([`bf16_gemm`]): one pass over the weights for any number of rows (at the
    /// memory's speed up to 32 rows, where the vector kernels become bound by arithmetic), and
    /// each row's result independent of the other rows, so batching changes no result.
    fn amx_weight(&self) -> Option<&[u16]> {
        match self.bf16_operands() {
            Some((Bf16Gemm::Amx, w)) => Some(w),
            _ => None,
        }
    }

    /// The bf16 instruction path of this machine when this matrix takes bf16 products
    /// ([`HalfMatrix::bf16_products`]), whatever its shape.
    pub fn bf16_path(&self) -> Option<Bf16Gemm> {
        match self {
            // The path was validated when the model loaded.
            Matrix::Half(h) if h.bf16_products => Bf16Gemm::selected().ok().flatten(),
            _ => None,
        }
    }

    /// Without the CPU backend compiled in there are no compact matrices.
    #[cfg(not(feature = "flex"))]
    fn prompt_product(&self, _x: Tensor<2>) -> Tensor<2> {
        unreachable!("compact weights exist on the CPU backend only")
    }

    /// The whole matrix as a tensor in `dtype` (widened for compact storage: a convolution's
    /// weight, once per call).
    pub fn dense(&self, dtype: DType, device: &burn::tensor::Device) -> Tensor<2> {
        match self {
            Matrix::Dense(w) => w.val(),
            _ => Tensor::<2>::from_data(TensorData::new(self.host_f32(), self.dims()), device)
                .cast(dtype),
        }
    }

    /// The whole matrix as f32 values in host memory, `[out, in]` row-major (widened for compact
    /// storage).
    pub fn host_f32(&self) -> Vec<f32> {
        match self {
            Matrix::Dense(w) => host_f32(w.val()),
            _ => {
                let [out, d_in] = self.dims();
                let mut values = vec![0.0f32; out * d_in];
                self.widen_rows_par(0, &mut values);
                values
            }
        }
    }

    /// Rows `ids` of the matrix (an embedding lookup), `[ids, in]` in `dtype`. Every id must be
    /// below `out` (checked by the caller).
    pub fn gather(&self, ids: &[usize], dtype: DType, device: &burn::tensor::Device) -> Tensor<2> {
        let [_, d_in] = self.dims();
        match self {
            Matrix::Dense(w) => {
                let flat: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
                let idx =
                    Tensor::<2, Int>::from_data(TensorData::new(flat, [1, ids.len()]), device);
                let rows: Tensor<3> = embedding(w.val(), idx);
                rows.reshape([ids.len(), d_in])
            }
            _ => {
                let mut out = vec![0.0f32; ids.len() * d_in];
                for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(d_in)) {
                    self.widen_rows(id, dst);
                }
                Tensor::<2>::from_data(TensorData::new(out, [ids.len(), d_in]), device).cast(dtype)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(i: usize) -> f32 {
        ((i * 7919 + 3) % 113) as f32 / 113.0 - 0.5
    }

    #[test]
    fn names_parse_back() {
        for f in WeightFormat::ALL {
            assert_eq!(f.name().parse::<WeightFormat>().unwrap(), f);
        }
        assert_eq!(
            " BF16 ".parse::<WeightFormat>().unwrap(),
            WeightFormat::Bf16
        );
        assert!(matches!(
            "int3".parse::<WeightFormat>(),
            Err(Error::InvalidInput(_))
        ));
    }

    /// Mapped patterns read the file's bytes in place; ranges that cannot be read as `u16`
    /// (odd start or length, past the end) are refused.
    #[test]
    fn mapped_bits_read_the_file_in_place() {
        use std::io::Write;
        let values: Vec<u16> = (0..1000u16).map(|i| i.wrapping_mul(40503)).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 6]).unwrap();
        for v in &values {
            file.write_all(&v.to_le_bytes()).unwrap();
        }
        // SAFETY: a private temporary file nothing else writes.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
        let end = 6 + 2 * values.len();
        let bits = HalfBits::mapped(Arc::clone(&map), 6, end).unwrap();
        assert!(bits.is_mapped());
        assert_eq!(&bits[..], &values[..]);
        assert_eq!(
            &HalfBits::mapped(Arc::clone(&map), 8, 12).unwrap()[..],
            &values[1..3]
        );
        assert!(
            HalfBits::mapped(Arc::clone(&map), 7, 11).is_none(),
            "odd start"
        );
        assert!(
            HalfBits::mapped(Arc::clone(&map), 6, 11).is_none(),
            "odd length"
        );
        assert!(
            HalfBits::mapped(Arc::clone(&map), 6, end + 2).is_none(),
            "past the end"
        );
        assert!(!HalfBits::from(values).is_mapped());
    }

    /// Every storage, decode- and prompt-shaped products and row lookups, against the f64
    /// product over the values the storage holds.
    /// With bf16 compute, a decoding step's products give each row what it gets alone,
    /// whatever the number of rows and alone or with other weights, where the AMX path takes
    /// every product (one pass for all rows) as where the vector kernels take a few rows at a
    /// time.
    #[test]
    fn bf16_step_products_are_row_invariant() {
        let device = crate::device::default_device();
        let (d_in, outs) = (96, [64, 160]);
        let mats: Vec<Matrix> = outs
            .iter()
            .enumerate()
            .map(|(k, &out)| {
                let bits = (0..out * d_in)
                    .map(|i| half::bf16::from_f32(value(3 * i + k)).to_bits())
                    .collect();
                Matrix::Half(Arc::new(HalfMatrix {
                    kind: HalfKind::Bf16,
                    bits: HalfBits::Owned(bits),
                    out,
                    d_in,
                    bf16_products: true,
                }))
            })
            .collect();
        let amx = Bf16Gemm::selected().unwrap() == Some(Bf16Gemm::Amx);
        assert!(mats.iter().all(|m| m.amx_weight().is_some() == amx));
        let rows = 37;
        let x: Vec<f32> = (0..rows * d_in).map(|i| value(5 * i + 2)).collect();
        let xt = |r0: usize, n: usize| {
            Tensor::<2>::from_data(
                TensorData::new(x[r0 * d_in..(r0 + n) * d_in].to_vec(), [n, d_in]),
                &device,
            )
        };
        let host = |t: Tensor<2>| -> Vec<f32> { t.into_data().try_into_vec().unwrap() };
        let refs: Vec<&Matrix> = mats.iter().collect();
        let together = Matrix::step_products(&refs, xt(0, rows));
        for (m, (all, &out)) in mats.iter().zip(together.into_iter().zip(&outs)) {
            let all = host(all);
            assert_eq!(all, host(m.step_product(xt(0, rows))));
            for r in 0..rows {
                let alone = host(m.step_product(xt(r, 1)));
                assert_eq!(alone, all[r * out..(r + 1) * out], "row {r} of {out}");
            }
        }
    }

    #[test]
    fn every_storage_computes_the_product_of_its_values() {
        let device = crate::device::default_device();
        // Wide enough that prompt products take several widened blocks.
        let (out, d_in) = (1030, 2048);
        let w: Vec<f32> = (0..out * d_in).map(value).collect();
        let half = |kind| {
            let bits = w
                .iter()
                .map(|&v| match kind {
                    HalfKind::Bf16 => half::bf16::from_f32(v).to_bits(),
                    HalfKind::F16 => half::f16::from_f32(v).to_bits(),
                })
                .collect();
            Matrix::Half(Arc::new(HalfMatrix {
                kind,
                bits: HalfBits::Owned(bits),
                out,
                d_in,
                bf16_products: false,
            }))
        };
        let quant = |kind| {
            Matrix::Quant(Arc::new(
                QuantMatrix::quantize(kind, out, d_in, |o, b| {
                    b.copy_from_slice(&w[o * d_in..(o + 1) * d_in])
                })
                .unwrap(),
            ))
        };
        let dense = Matrix::dense_param(Tensor::from_data(
            TensorData::new(w.clone(), [out, d_in]),
            &device,
        ));
        for (m, tol) in [
            (dense, 1e-3),
            (half(HalfKind::Bf16), 1e-3),
            (half(HalfKind::F16), 1e-3),
            // The activations are quantized to 8 bits per block in decode-shaped products.
            (quant(QuantKind::Q8_0), 0.1),
            (quant(QuantKind::Q4_0), 0.1),
        ] {
            let mut values = vec![0.0f32; out * d_in];
            if let Matrix::Dense(_) = m {
                values.copy_from_slice(&w);
            } else {
                m.widen_rows(0, &mut values);
            }
            for rows in [1, 2, MAX_ROWS, MAX_ROWS + 1, 300] {
                let x: Vec<f32> = (0..rows * d_in).map(|i| value(5 * i + 1)).collect();
                let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, d_in]), &device);
                let y: Vec<f32> = m.product(xt).into_data().try_into_vec().unwrap();
                assert_eq!(y.len(), rows * out);
                for r in (0..rows).step_by(37) {
                    for o in (0..out).step_by(7) {
                        let exact: f64 = (0..d_in)
                            .map(|i| f64::from(x[r * d_in + i]) * f64::from(values[o * d_in + i]))
                            .sum();
                        let got = f64::from(y[r * out + o]);
                        assert!(
                            (got - exact).abs() < tol,
                            "{:?} rows {rows} [{r},{o}]: {got} vs {exact}",
                            m.format()
                        );
                    }
                }
            }
            let ids = [0, out - 1, 17];
            let rows: Vec<f32> = m
                .gather(&ids, DType::F32, &device)
                .into_data()
                .try_into_vec()
                .unwrap();
            for (k, &id) in ids.iter().enumerate() {
                assert_eq!(
                    rows[k * d_in..(k + 1) * d_in],
                    values[id * d_in..(id + 1) * d_in]
                );
            }
        }
    }
}
