//! Prompt-shaped products with bf16 operands and f32 accumulation: `y = bf16(x) · Wᵀ` for a bf16
//! weight `W` `[out, in]` and many activation rows `x` `[rows, in]`, the arithmetic PyTorch's
//! bf16 path does on the CPU (operands rounded to bf16, products summed in f32), on the CPU's
//! bf16 instructions.
//!
//! Two instruction paths, picked once per process ([`Bf16Gemm::selected`]):
//! - [`Bf16Gemm::Amx`]: Intel AMX tiles (`tdpbf16ps`, 16×16 f32 results over 32 bf16 products a
//!   step). The weight rows are the tiles' left operand as stored; the activations are packed
//!   once per product into the pairwise layout the right operand takes.
//! - [`Bf16Gemm::Avx512Bf16`]: AVX512-BF16 dot products (`vdpbf16ps`, 16 pairs a step) of four
//!   weight rows with four activation rows, reduced at the end of each row.
//!
//! Either path covers shapes whose `in` and `out` are multiples of [`ALIGN`] (every large
//! product of Janus); the caller widens the weight to f32 for others and on CPUs without the
//! instructions. [`reference`] is the plain definition the paths are tested against.

use std::sync::OnceLock;

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::super::activation::gelu_avx512;
use super::super::activation::{gelu_value, silu_value};
use crate::error::{Error, Result};

/// `in` and `out` must be multiples of this for the instruction paths.
pub const ALIGN: usize = 32;

/// The environment variable that forces a path (`auto`, `amx`, `avx512bf16`, `none`).
pub const ENV: &str = "JANUS_BF16_GEMM";

/// One instruction path for bf16 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bf16Gemm {
    /// Intel AMX (AMX-TILE and AMX-BF16, with the tile state granted by Linux).
    Amx,
    /// AVX512-BF16 (`vdpbf16ps`).
    Avx512Bf16,
}

impl Bf16Gemm {
    /// Every path, fastest first.
    pub const ALL: [Bf16Gemm; 2] = [Bf16Gemm::Amx, Bf16Gemm::Avx512Bf16];

    /// The name `JANUS_BF16_GEMM` uses.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Gemm::Amx => "amx",
            Bf16Gemm::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Whether this CPU (and, for AMX, the operating system) can run the path.
    pub fn supported(self) -> bool {
        match self {
            Bf16Gemm::Amx => amx::usable(),
            #[cfg(target_arch = "x86_64")]
            Bf16Gemm::Avx512Bf16 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Bf16Gemm::Avx512Bf16 => false,
        }
    }

    /// The fastest path this machine runs, if any.
    pub fn best() -> Option<Bf16Gemm> {
        Self::ALL.into_iter().find(|p| p.supported())
    }

    /// Reads a path by name: `auto` is [`best`](Self::best), `none` no path; a path this machine
    /// cannot run is an error.
    pub fn parse(name: &str) -> Result<Option<Bf16Gemm>> {
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "" | "auto" => return Ok(Self::best()),
            "none" => return Ok(None),
            _ => {}
        }
        super::dispatch::pick(
            ENV,
            &name,
            &Self::ALL,
            Self::name,
            Self::supported,
            "auto, none, ",
        )
        .map(Some)
    }

    /// The path of this process: `JANUS_BF16_GEMM` if set, else the fastest. Read once.
    pub fn selected() -> Result<Option<Bf16Gemm>> {
        static SELECTED: OnceLock<std::result::Result<Option<Bf16Gemm>, String>> = OnceLock::new();
        SELECTED
            .get_or_init(|| match std::env::var(ENV) {
                Ok(v) => Self::parse(&v).map_err(super::dispatch::message),
                Err(_) => Ok(Self::best()),
            })
            .clone()
            .map_err(Error::InvalidInput)
    }

    /// Whether the path covers a weight `[out, d_in]`.
    pub fn covers(out: usize, d_in: usize) -> bool {
        out > 0 && d_in > 0 && out.is_multiple_of(ALIGN) && d_in.is_multiple_of(ALIGN)
    }
}

/// A buffer whose first value starts a cache line. An AMX tile row (64 bytes) read from an
/// address that is not a multiple of 64 spans two lines and takes two loads: Pro-1B shapes, 600
/// rows, one thread, ~0.8 TFLOP/s with the operands 16 bytes past a line against ~1.4 aligned.
pub(crate) type Aligned<T> = aligned_vec::AVec<T, aligned_vec::ConstAlign<64>>;

/// An empty [`Aligned`] buffer.
pub(crate) fn aligned<T>() -> Aligned<T> {
    Aligned::new(64)
}

/// `x` rounded to bf16 (to nearest, ties to even, as PyTorch converts).
fn to_bf16(x: &[f32], dst: &mut [u16]) {
    for (d, &v) in dst.iter_mut().zip(x) {
        *d = super::simd::bf16_bits(v);
    }
}

/// The plain definition: `y[r][o] = Σ_k bf16(x[r][k]) · w[o][k]`, summed in f64 (the paths sum in
/// f32, in their own order).
pub fn reference(x: &[f32], rows: usize, w: &[u16], d_in: usize, y: &mut [f32]) {
    let out = w.len() / d_in;
    for r in 0..rows {
        let xr: Vec<f64> = x[r * d_in..(r + 1) * d_in]
            .iter()
            .map(|&v| f64::from(half::bf16::from_f32(v).to_f32()))
            .collect();
        for o in 0..out {
            let wr = &w[o * d_in..(o + 1) * d_in];
            let s: f64 = wr
                .iter()
                .zip(&xr)
                .map(|(&b, &v)| f64::from(f32::from_bits(u32::from(b) << 16)) * v)
                .sum();
            y[r * out + o] = s as f32;
        }
    }
}

/// `y[r][o] = Σ_k bf16(x[r][k]) · w[o][k]` (`x` `[rows, d_in]`, `w` bf16 bits `[out, d_in]`, `y`
/// `[rows, out]`) on `path`, over the thread pool.
///
/// # Errors
/// [`Error::InvalidInput`] when the slices do not match the shapes, the shape is not one the
/// paths cover ([`Bf16Gemm::covers`]), or this machine cannot run `path`.
pub fn bf16_gemm(
    path: Bf16Gemm,
    x: &[f32],
    rows: usize,
    w: &[u16],
    d_in: usize,
    y: &mut [f32],
) -> Result<()> {
    let mut packed = PackedRows::default();
    packed.pack(path, x, rows, d_in)?;
    bf16_gemm_packed(&packed, w, y)
}

/// Activation rows rounded to bf16 and laid out as one path's products read them, so that
/// several weights can multiply the same rows (a layer's q, k and v, or gate and up) with one
/// conversion. The buffer is kept between [`pack`](Self::pack) calls.
#[derive(Debug)]
pub struct PackedRows {
    path: Option<Bf16Gemm>,
    rows: usize,
    d_in: usize,
    /// AMX: bf16 pairs in blocks of 16 rows ([`amx::pack`]). AVX512-BF16: bf16 values, rows of
    /// `d_in + 32` ([`dot::pack`]), as pairs of values.
    data: Aligned<u32>,
}

impl Default for PackedRows {
    fn default() -> Self {
        PackedRows {
            path: None,
            rows: 0,
            d_in: 0,
            data: aligned(),
        }
    }
}

impl PackedRows {
    /// Packs `x` (`[rows, d_in]`) for `path`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `x` does not hold `rows` rows of `d_in`, `d_in` is not a
    /// multiple of [`ALIGN`], or this machine cannot run `path`.
    pub fn pack(&mut self, path: Bf16Gemm, x: &[f32], rows: usize, d_in: usize) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidInput(format!("bf16 product: {msg}")));
        if d_in == 0 || !d_in.is_multiple_of(ALIGN) {
            return bad(format!(
                "an input width of {d_in} is not a multiple of {ALIGN}"
            ));
        }
        if x.len() != rows * d_in {
            return bad(format!(
                "x has {} values, for {rows} rows of {d_in} inputs",
                x.len()
            ));
        }
        if !path.supported() {
            return bad(format!("this machine cannot run the {} path", path.name()));
        }
        match path {
            Bf16Gemm::Amx => amx::pack(x, rows, d_in, &mut self.data),
            Bf16Gemm::Avx512Bf16 => dot::pack(x, rows, d_in, &mut self.data),
        }
        self.path = Some(path);
        self.rows = rows;
        self.d_in = d_in;
        Ok(())
    }

    /// Rows packed.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// `y = x · wᵀ` ([`bf16_gemm`]) for rows packed by [`PackedRows::pack`], on their path.
///
/// # Errors
/// [`Error::InvalidInput`] when nothing was packed, `w` is not rows of the packed width in a
/// shape the paths cover, or `y` does not hold `[rows, out]`.
pub fn bf16_gemm_packed(x: &PackedRows, w: &[u16], y: &mut [f32]) -> Result<()> {
    bf16_gemm_packed_with(x, w, y, Epilogue::default())
}

/// What a product does with each result as it stores it: `y = x·wᵀ + bias` (`bias` one value
/// per output), through GELU with `gelu` (an MLP's first projection), times `silu(gate)` with a
/// `gate` (a SwiGLU's up projection times its activated gate projection, `gate` laid out as
/// `y`), or with `accumulate` `y += …` (a residual branch added to its input). The sum, the
/// bias, the GELU, the gate and the earlier value are applied in that order, as separate passes
/// would. With `head_width`, `y` is laid out as heads of that many
/// outputs, one after the other: `[out / head_width, rows, head_width]` instead of
/// `[rows, out]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// Added to each row of results.
    pub bias: Option<&'a [f32]>,
    /// Add to `y` instead of overwriting it.
    pub accumulate: bool,
    /// Each result through GELU (exact, with `erf`).
    pub gelu: bool,
    /// Each result times `silu` of the value at its place here.
    pub gate: Option<&'a [f32]>,
    /// `y` as heads of this many outputs (a multiple of 16 that divides the outputs).
    pub head_width: Option<usize>,
}

impl Epilogue<'_> {
    /// Where result `(r, o)` of a `[rows, out]` product goes in `y`.
    #[inline(always)]
    fn place(&self, rows: usize, out: usize, r: usize, o: usize) -> usize {
        match self.head_width {
            None => r * out + o,
            Some(d) => (o / d * rows + r) * d + o % d,
        }
    }

    /// The distance in `y` between one row's result and the next row's for the same output.
    #[inline(always)]
    fn row_stride(&self, out: usize) -> usize {
        self.head_width.unwrap_or(out)
    }
}

/// [`bf16_gemm_packed`] with an [`Epilogue`] applied as results are stored.
///
/// # Errors
/// As [`bf16_gemm_packed`]'s, and when the bias does not hold one value per output.
pub fn bf16_gemm_packed_with(
    x: &PackedRows,
    w: &[u16],
    y: &mut [f32],
    epilogue: Epilogue<'_>,
) -> Result<()> {
    let (path, rows, d_in, out) = check(x, w, epilogue)?;
    if y.len() != rows * out {
        return Err(Error::InvalidInput(format!(
            "bf16 product: y has {} values, for {rows} rows of {out} outputs",
            y.len()
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    match path {
        Bf16Gemm::Amx => amx::gemm_into(
            &x.data,
            rows,
            w,
            d_in,
            out,
            amx::Dest::Rows(Out(y.as_mut_ptr())),
            epilogue,
        ),
        Bf16Gemm::Avx512Bf16 => dot::gemm(&x.data, rows, w, d_in, out, y, epilogue),
    }
    Ok(())
}

/// [`bf16_gemm_packed_with`] whose results go to `next`, packed as the next product's rows on
/// the same path: the bits [`PackedRows::pack`] of the f32 results would give. On AMX, with an
/// epilogue of a bias and GELU at most (an MLP's hidden layer), each result tile is rounded and
/// laid out as it is stored, and the f32 results are never written; otherwise they go through
/// `scratch`.
///
/// # Errors
/// As [`bf16_gemm_packed_with`]'s.
pub fn bf16_gemm_packed_to_packed(
    x: &PackedRows,
    w: &[u16],
    epilogue: Epilogue<'_>,
    next: &mut PackedRows,
    scratch: &mut Vec<f32>,
) -> Result<()> {
    let (path, rows, d_in, out) = check(x, w, epilogue)?;
    let direct = path == Bf16Gemm::Amx
        && !epilogue.accumulate
        && epilogue.gate.is_none()
        && epilogue.head_width.is_none();
    if !direct {
        scratch.clear();
        scratch.resize(rows * out, 0.0);
        bf16_gemm_packed_with(x, w, scratch, epilogue)?;
        return next.pack(path, scratch, rows, out);
    }
    amx::size(rows, out, &mut next.data);
    next.path = Some(path);
    next.rows = rows;
    next.d_in = out;
    if rows > 0 {
        let dest = amx::Dest::Packed(Out(next.data.as_mut_ptr().cast()));
        amx::gemm_into(&x.data, rows, w, d_in, out, dest, epilogue);
    }
    Ok(())
}

/// The path and shape of a product of `x` by `w` with `epilogue`, checked: (path, rows, input
/// width, outputs).
fn check(
    x: &PackedRows,
    w: &[u16],
    epilogue: Epilogue<'_>,
) -> Result<(Bf16Gemm, usize, usize, usize)> {
    let bad = |msg: String| Err(Error::InvalidInput(format!("bf16 product: {msg}")));
    let (Some(path), rows, d_in) = (x.path, x.rows, x.d_in) else {
        return bad("no activation rows were packed".into());
    };
    let out = weight_rows(w, d_in)?;
    if let Some(b) = epilogue.bias
        && b.len() != out
    {
        return bad(format!("a bias of {} values for {out} outputs", b.len()));
    }
    if let Some(g) = epilogue.gate
        && g.len() != rows * out
    {
        return bad(format!(
            "a gate of {} values for {rows} rows of {out} outputs",
            g.len()
        ));
    }
    if let Some(d) = epilogue.head_width
        && (d == 0 || !d.is_multiple_of(16) || !out.is_multiple_of(d))
    {
        return bad(format!("heads of {d} outputs for {out} outputs"));
    }
    Ok((path, rows, d_in, out))
}

/// The rows of `w`, checked to be whole rows of `d_in` in a shape the products cover.
fn weight_rows(w: &[u16], d_in: usize) -> Result<usize> {
    let bad = |msg: String| Err(Error::InvalidInput(format!("bf16 product: {msg}")));
    if !w.len().is_multiple_of(d_in) {
        return bad(format!("{} weight values are not rows of {d_in}", w.len()));
    }
    let out = w.len() / d_in;
    if !Bf16Gemm::covers(out, d_in) {
        return bad(format!(
            "a [{out}, {d_in}] weight is not in multiples of {ALIGN}"
        ));
    }
    Ok(out)
}

/// `y`'s base pointer, shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: every task writes its own columns of `y` only (see the callers), and `y` outlives the
// parallel loop that uses the pointer.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Weight rows one task takes: a block whose bytes stay in a core's L2 (~1 MiB) while every
/// activation row passes over it, in whole multiples of `unit` rows.
fn rows_per_task(out: usize, d_in: usize, unit: usize, threads: usize) -> usize {
    let fit = ((1 << 20) / (2 * d_in)).max(unit) / unit * unit;
    // At least two tasks a thread where the matrix allows it, so the pool balances.
    let spread = out.div_ceil(2 * threads).next_multiple_of(unit);
    fit.min(spread).max(unit)
}

pub(crate) mod amx {
    //! The AMX path. Tiles: 0–3 the 2×2 results (`[16 weight rows, 16 activation rows]` f32),
    //! 4–5 two blocks of 16 weight rows × 32 values, 6–7 two blocks of 32 values × 16
    //! activation rows in pairs.

    use super::*;

    /// Whether the CPU has AMX-TILE and AMX-BF16 and Linux grants this process the tile state
    /// (asked once).
    pub fn usable() -> bool {
        static USABLE: OnceLock<bool> = OnceLock::new();
        *USABLE.get_or_init(|| {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
                let leaf = std::arch::x86_64::__cpuid_count(7, 0);
                if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
                    return false;
                }
                // The epilogues and conversions around the tile products (every AMX CPU so far
                // has these).
                let vector = std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
                    && std::arch::is_x86_feature_detected!("fma");
                if !vector {
                    return false;
                }
                const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
                const XFEATURE_XTILEDATA: libc::c_long = 18;
                // SAFETY: asks the kernel for permission to use the AMX tile data state; it
                // touches no memory of the process and fails cleanly where unsupported.
                let granted = unsafe {
                    libc::syscall(
                        libc::SYS_arch_prctl,
                        ARCH_REQ_XCOMP_PERM,
                        XFEATURE_XTILEDATA,
                    )
                };
                granted == 0
            }
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            false
        })
    }

    /// The 64-byte tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    pub(crate) struct Config(pub(crate) [u8; 64]);

    impl Config {
        pub(crate) fn new() -> Self {
            let mut c = [0u8; 64];
            c[0] = 1;
            for t in 0..8 {
                c[16 + 2 * t] = 64;
                c[48 + t] = 16;
            }
            Config(c)
        }
    }

    /// Activation rows a result tile covers.
    pub(crate) const TILE: usize = 16;

    /// `x` as bf16 pairs in blocks of 16 rows: block `b`, pair `p`, row `j` at
    /// `(b · d_in/2 + p) · 16 + j`, holding `x[16b + j][2p]` (low half) and `x[..][2p + 1]`; rows
    /// past `rows` are zero, to a whole number of 32-row blocks. The buffer keeps its memory
    /// between calls; every value is written.
    pub(super) fn pack(x: &[f32], rows: usize, d_in: usize, packed: &mut Aligned<u32>) {
        let pairs = d_in / 2;
        let one = block_packer(x, rows, d_in, packed);
        packed
            .par_chunks_mut(pairs * TILE)
            .enumerate()
            .for_each(|(b, block)| one(b, block));
    }

    /// [`pack`] on the calling thread alone (for work already spread over the pool, as one
    /// attention head per task).
    pub(crate) fn pack_here(x: &[f32], rows: usize, d_in: usize, packed: &mut Aligned<u32>) {
        let pairs = d_in / 2;
        let one = block_packer(x, rows, d_in, packed);
        packed
            .chunks_mut(pairs * TILE)
            .enumerate()
            .for_each(|(b, block)| one(b, block));
    }

    /// Sizes `packed` for [`pack`] and returns the function that fills its block `b`.
    fn block_packer<'a>(
        x: &'a [f32],
        rows: usize,
        d_in: usize,
        packed: &mut Aligned<u32>,
    ) -> impl Fn(usize, &mut [u32]) + Sync + 'a {
        size(rows, d_in, packed);
        let vector = vector_conversions();
        move |b, block| {
            let first = b * TILE;
            let n = TILE.min(rows.saturating_sub(first));
            let lo = first.min(rows);
            let x = &x[lo * d_in..(lo + n) * d_in];
            if vector {
                // SAFETY: the features were detected; `x` holds `n` ≤ 16 rows of `d_in` (a
                // multiple of 32) and `block` 16 rows of `d_in / 2` pairs.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    pack_block_avx512(x, n, d_in, block)
                };
            } else {
                pack_block(x, n, d_in, block);
            }
        }
    }

    /// `packed` sized for [`pack`]'s layout of `rows` rows of `d_in` (values left to the caller).
    pub(super) fn size(rows: usize, d_in: usize, packed: &mut Aligned<u32>) {
        let len = rows.div_ceil(2 * TILE) * 2 * (d_in / 2) * TILE;
        if packed.len() != len {
            packed.resize(len, 0);
        }
    }

    /// Whether AVX-512F and AVX512-BF16 convert to bf16 here (every AMX CPU so far has them).
    fn vector_conversions() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The columns of `v` (`[s, d]`) as [`pack`] lays out rows: the operand that multiplies
    /// rows over `s` (the softmax weights of `p·v`) by `v`. Column block `c` (16 columns),
    /// pair `p` (rows `2p`, `2p + 1`), column `16c + j` at `(c · keys/2 + p) · 16 + j`, rows
    /// from `s` to `keys` (`s` rounded up to 32) zero. Runs on the calling thread.
    pub(crate) fn pack_columns(v: &[f32], s: usize, d: usize, packed: &mut Aligned<u32>) {
        assert!(
            v.len() == s * d && d.is_multiple_of(TILE),
            "[{s}, {d}] columns"
        );
        let pairs = s.next_multiple_of(2 * TILE) / 2;
        packed.resize(d * pairs, 0);
        #[cfg(target_arch = "x86_64")]
        if vector_conversions() {
            let row = |r: usize| (r < s).then(|| &v[r * d..][..d]);
            for p in 0..pairs {
                // SAFETY: the features were detected; rows are `d` values, `d` a multiple of
                // 16, and the writes land inside `packed` (`d / 16` blocks of `pairs · 16`).
                unsafe { pack_pair_avx512(row(2 * p), row(2 * p + 1), d, p, pairs, packed) };
            }
            return;
        }
        pack_columns_scalar(v, s, d, packed);
    }

    /// [`pack_columns`] one value at a time.
    pub(crate) fn pack_columns_scalar(v: &[f32], s: usize, d: usize, packed: &mut Aligned<u32>) {
        let pairs = s.next_multiple_of(2 * TILE) / 2;
        packed.resize(d * pairs, 0);
        let bits = |r: usize, c: usize| {
            if r < s {
                u32::from(super::super::simd::bf16_bits(v[r * d + c]))
            } else {
                0
            }
        };
        for p in 0..pairs {
            for c in 0..d {
                packed[((c / TILE) * pairs + p) * TILE + c % TILE] =
                    bits(2 * p, c) | (bits(2 * p + 1, c) << 16);
            }
        }
    }

    /// One pair of rows of [`pack_columns`]: 16 columns at a time, both rows rounded to bf16
    /// in one instruction and interleaved.
    ///
    /// # Safety
    /// AVX-512F, AVX512-BW and AVX512-BF16 must be available; rows of `d` values, `d` a multiple
    /// of 16, `packed` holding `d · pairs` values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_pair_avx512(
        a: Option<&[f32]>,
        b: Option<&[f32]>,
        d: usize,
        p: usize,
        pairs: usize,
        packed: &mut [u32],
    ) {
        use std::arch::x86_64::*;
        // Word 2j of the result: word j (row a's column j); word 2j + 1: word 16 + j.
        let order: [u16; 32] = std::array::from_fn(|w| (w / 2 + 16 * (w % 2)) as u16);
        // SAFETY: reads 16 values inside each row and writes 16 inside `packed` (as above).
        unsafe {
            let order = _mm512_loadu_si512(order.as_ptr().cast());
            let load = |r: Option<&[f32]>, c: usize| match r {
                Some(r) => _mm512_loadu_ps(r.as_ptr().add(c)),
                None => _mm512_setzero_ps(),
            };
            for c in (0..d).step_by(TILE) {
                let both: __m512i =
                    std::mem::transmute(_mm512_cvtne2ps_pbh(load(b, c), load(a, c)));
                let pairs_out = _mm512_permutexvar_epi16(order, both);
                let at = packed.as_mut_ptr().add(((c / TILE) * pairs + p) * TILE);
                _mm512_storeu_si512(at.cast(), pairs_out);
            }
        }
    }

    /// One block of [`pack`]: `n` rows of `x` (16 with zeros after them) into `block`.
    fn pack_block(x: &[f32], n: usize, d_in: usize, block: &mut [u32]) {
        let mut row = vec![0u16; d_in];
        for j in 0..TILE {
            if j < n {
                to_bf16(&x[j * d_in..(j + 1) * d_in], &mut row);
            } else {
                row.fill(0);
            }
            for (p, pair) in row.chunks_exact(2).enumerate() {
                block[p * TILE + j] = u32::from(pair[0]) | (u32::from(pair[1]) << 16);
            }
        }
    }

    /// [`pack_block`] on AVX512-BF16: each row's 32 values of a step rounded to bf16 pairs in
    /// one instruction (to nearest even, as [`to_bf16`]; subnormal inputs become zero, as in
    /// oneDNN), then sixteen rows' pairs transposed in registers into the tile's order.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 must be available; as [`pack_block`]'s shapes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pack_block_avx512(x: &[f32], n: usize, d_in: usize, block: &mut [u32]) {
        use std::arch::x86_64::*;
        assert!(n <= TILE && x.len() == n * d_in && block.len() == TILE * d_in / 2);
        for s in 0..d_in / 32 {
            // SAFETY: reads 32 values of row j < n at step s inside `x`; writes 256 values
            // inside `block`.
            unsafe {
                let r: [__m512; 16] = std::array::from_fn(|j| {
                    if j < n {
                        let src = x.as_ptr().add(j * d_in + 32 * s);
                        let lo = _mm512_loadu_ps(src);
                        let hi = _mm512_loadu_ps(src.add(16));
                        _mm512_castsi512_ps(std::mem::transmute::<__m512bh, __m512i>(
                            _mm512_cvtne2ps_pbh(hi, lo),
                        ))
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                let t = transpose16(r);
                let dst = block.as_mut_ptr().add(s * TILE * 16).cast::<f32>();
                for (p, v) in t.iter().enumerate() {
                    _mm512_storeu_ps(dst.add(16 * p), *v);
                }
            }
        }
    }

    /// Sixteen vectors of 16 lanes transposed: lane `i` of result `j` is lane `j` of input `i`
    /// (unpacks, then lane shuffles; the bits move unchanged).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
        use std::arch::x86_64::*;
        // u[g][q], lane L: inputs 4g..4g + 4 of column 4L + q.
        let u: [[__m512; 4]; 4] = std::array::from_fn(|g| {
            let lo01 = _mm512_unpacklo_ps(r[4 * g], r[4 * g + 1]);
            let hi01 = _mm512_unpackhi_ps(r[4 * g], r[4 * g + 1]);
            let lo23 = _mm512_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]);
            let hi23 = _mm512_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
            [
                _mm512_shuffle_ps::<0x44>(lo01, lo23),
                _mm512_shuffle_ps::<0xEE>(lo01, lo23),
                _mm512_shuffle_ps::<0x44>(hi01, hi23),
                _mm512_shuffle_ps::<0xEE>(hi01, hi23),
            ]
        });
        let mut out = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            // Lanes 0 and 2 of two groups, and lanes 1 and 3.
            let a0 = _mm512_shuffle_f32x4::<0x88>(u[0][q], u[1][q]);
            let a2 = _mm512_shuffle_f32x4::<0x88>(u[2][q], u[3][q]);
            let b0 = _mm512_shuffle_f32x4::<0xDD>(u[0][q], u[1][q]);
            let b2 = _mm512_shuffle_f32x4::<0xDD>(u[2][q], u[3][q]);
            out[q] = _mm512_shuffle_f32x4::<0x88>(a0, a2);
            out[4 + q] = _mm512_shuffle_f32x4::<0x88>(b0, b2);
            out[8 + q] = _mm512_shuffle_f32x4::<0xDD>(a0, a2);
            out[12 + q] = _mm512_shuffle_f32x4::<0xDD>(b0, b2);
        }
        out
    }

    /// Where a product's results go.
    #[derive(Clone, Copy)]
    pub(super) enum Dest {
        /// `y` `[rows, out]` f32 (or as the epilogue lays out heads).
        Rows(Out),
        /// [`pack`]'s layout of `rows` rows of `out` (the pointer cast from its `u32`s), every
        /// value written.
        Packed(Out),
    }

    /// `y = x·wᵀ` for `packed` from [`pack`], the epilogue applied as results are stored into
    /// `y` as it says; a packed `y` takes a bias and GELU only.
    pub(super) fn gemm_into(
        packed: &[u32],
        rows: usize,
        w: &[u16],
        d_in: usize,
        out: usize,
        y: Dest,
        epilogue: Epilogue<'_>,
    ) {
        let per = rows_per_task(out, d_in, 2 * TILE, rayon::current_num_threads());
        (0..out.div_ceil(per)).into_par_iter().for_each(|task| {
            let first = task * per;
            let last = (first + per).min(out);
            // SAFETY: this task writes the outputs of weight rows first..last only; `usable`
            // was checked by the caller, shapes are multiples of 32, the packed rows cover
            // every block, and so does a packed `y`.
            unsafe { block(packed, rows, w, d_in, out, first, last, y, epilogue) };
        });
    }

    /// Weight rows whose length in bytes is a multiple of this are not read in place by every
    /// pass over the activations: a tile's 16 rows would map to one or two sets of the 4
    /// KiB-periodic L1 cache and evict each other (Pro-1B shapes, 600 rows, 2 threads: `in` =
    /// 2048 in place ~1.1 TFLOP/s, in tile order ~1.35). The first pass stores the tiles it
    /// loads in tile order ([`TILES`]) and the later passes read them from there; rows not
    /// starting a cache line take the same route. Other rows are read in place throughout (`in`
    /// = 5632; the attention's products over 64–128-wide heads and 576-key rows).
    const ALIASED_ROWS: usize = 2048;

    thread_local! {
        /// The weight rows of a task in tile order: block `i` of 16 rows, step `s` of 32 values
        /// at `(i · steps + s) · 512`, 16 rows of 32 values (1 KiB, one tile) each, so that a
        /// tile load reads 16 consecutive cache lines. Kept between calls.
        static TILES: std::cell::RefCell<Aligned<u16>> = std::cell::RefCell::new(aligned());
    }

    /// Weight rows `first..last` (multiples of 32) against every activation row.
    ///
    /// # Safety
    /// AMX must be usable; `w` `[out, d_in]`, `packed` from [`pack`], `y` `[rows, out]` with no
    /// other writer of columns `first..last`.
    #[cfg(target_arch = "x86_64")]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        packed: &[u32],
        rows: usize,
        w: &[u16],
        d_in: usize,
        out: usize,
        first: usize,
        last: usize,
        y: Dest,
        epilogue: Epilogue<'_>,
    ) {
        let src = WeightLayout {
            // SAFETY: `first < out`, so the offset lies inside `w`.
            base: unsafe { w.as_ptr().add(first * d_in) },
            step: 32,
            row_bytes: 2 * d_in,
        };
        // One pass over the activations reads each weight tile once: no copy pays for itself.
        let in_place = !(2 * d_in).is_multiple_of(ALIASED_ROWS)
            && (src.base as usize).is_multiple_of(64)
            || rows <= 2 * TILE;
        if in_place {
            // SAFETY: as this function's.
            return unsafe {
                tiled_block(packed, rows, src, None, d_in, out, first, last, y, epilogue)
            };
        }
        TILES.with_borrow_mut(|tiles| {
            // Every tile is stored by the first pass before a later one reads it: the buffer
            // only grows, and is not cleared.
            let len = (last - first) * d_in;
            if tiles.len() < len {
                tiles.resize(len, 0);
            }
            let dst = WeightLayout {
                base: tiles.as_ptr(),
                step: TILE * 32,
                row_bytes: 64,
            };
            // SAFETY: as this function's; `tiles` holds the task's rows in tile order.
            unsafe {
                tiled_block(
                    packed,
                    rows,
                    src,
                    Some(dst),
                    d_in,
                    out,
                    first,
                    last,
                    y,
                    epilogue,
                )
            }
        })
    }

    /// Where the weight tiles of a task are: the tile of rows `16i..` (from the task's first)
    /// and step `s` starts at `base + i·16·d_in + s·step`, its rows `row_bytes` apart.
    #[derive(Clone, Copy)]
    struct WeightLayout {
        base: *const u16,
        step: usize,
        row_bytes: usize,
    }

    /// [`block`] over the weight tiles at `src`; with `copy`, the first pass over the
    /// activations also stores them there, and the later passes read them from there.
    ///
    /// # Safety
    /// As [`block`]'s, with `src` the rows `first..last` of `w` and `copy` room for them.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiled_block(
        packed: &[u32],
        rows: usize,
        src: WeightLayout,
        copy: Option<WeightLayout>,
        d_in: usize,
        out: usize,
        first: usize,
        last: usize,
        y: Dest,
        epilogue: Epilogue<'_>,
    ) {
        use std::arch::asm;
        let config = Config::new();
        // Two sets of result tiles: the products of one block of 32 × 32 results run while
        // the last block's results, stored in the other set, are transposed into `y` a tile at
        // a time between its steps (the tile products take ~19 cycles each and leave the
        // vector units idle; run after them, the stores took a third of the time).
        let mut res = [
            ResultTiles([[0f32; TILE * TILE]; 4]),
            ResultTiles([[0f32; TILE * TILE]; 4]),
        ];
        // Result tile `t` of the block `(mb, n)` held in `res[set]`, stored into `y`.
        let store = |res: &ResultTiles, mb: usize, n: usize, t: usize| {
            let (i, j) = (t / 2, t % 2);
            let r0 = (mb + j) * TILE;
            let take = TILE.min(rows.saturating_sub(r0));
            let y = match y {
                Dest::Rows(y) => y,
                Dest::Packed(p) => {
                    let o = n + i * TILE;
                    // SAFETY: block `mb + j` of a packed `[rows, out]` (`out / 2` pairs of 16
                    // rows each) holds the pairs of outputs o.. at the place below, written by
                    // this task alone; the bias holds `out` values.
                    unsafe {
                        pack_store(
                            &res.0[t],
                            p.0.cast::<u32>().add(((mb + j) * (out / 2) + o / 2) * TILE),
                            take,
                            epilogue.bias.map(|b| b[o..].as_ptr()),
                            epilogue.gelu,
                        )
                    };
                    return;
                }
            };
            if take > 0 {
                let o = n + i * TILE;
                let at = epilogue.place(rows, out, r0, o);
                // SAFETY: result tile (i, j) holds weight rows n + 16i.. (outputs of this
                // task) and activation rows r0..r0 + take, whose places in `y` (and `gate`)
                // the caller vouches for.
                unsafe {
                    transpose_store(
                        &res.0[t],
                        y.0.add(at),
                        epilogue.row_stride(out),
                        take,
                        epilogue.bias.map(|b| b[o..].as_ptr()),
                        epilogue.gelu,
                        epilogue.gate.map(|g| g[at..].as_ptr()),
                        epilogue.accumulate,
                    )
                };
            }
        };
        // The block whose results wait in `res[set ^ 1]`.
        let mut pending: Option<(usize, usize)> = None;
        let mut set = 0;
        // Both operands' tiles are 16 rows of 64 bytes, one after the other.
        let stride = 4 * TILE;
        let steps = d_in / 32;
        // SAFETY (all asm blocks): the configuration and tiles are this thread's own; loads
        // read 1 KiB inside `tiles` (block of rows n.., step s) and `packed` (block b, pairs
        // 16s..16s+16); stores write 16 rows of 64 bytes inside `res`.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
            for mb in (0..rows.div_ceil(2 * TILE)).map(|b| 2 * b) {
                let x0 = packed.as_ptr().add(mb * (d_in / 2) * TILE);
                let x1 = x0.add((d_in / 2) * TILE);
                // The first pass reads the weight tiles from their rows and, with `copy`, stores
                // them in tile order there for the later passes.
                let tiles = match copy {
                    Some(dst) if mb > 0 => dst,
                    _ => src,
                };
                let store_to = copy.filter(|_| mb == 0);
                for n in (first..last).step_by(2 * TILE) {
                    let w0 = tiles.base.add((n - first) * d_in);
                    let w1 = w0.add(TILE * d_in);
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                    for s in 0..steps {
                        // The four tiles of two steps ahead into L1: the tile loads then
                        // wait less (Pro-1B shapes, 600 rows, 2 threads: ~1.15 → ~1.3 TFLOP/s;
                        // one step or four ahead measured no better).
                        if s + 2 < steps {
                            prefetch_tile(w0.add(tiles.step * (s + 2)), tiles.row_bytes);
                            prefetch_tile(w1.add(tiles.step * (s + 2)), tiles.row_bytes);
                            prefetch_tile(x0.add(16 * TILE * (s + 2)), stride);
                            prefetch_tile(x1.add(16 * TILE * (s + 2)), stride);
                        }
                        if let Some(dst) = store_to {
                            let d0 = dst.base.add((n - first) * d_in);
                            let d1 = d0.add(TILE * d_in);
                            asm!(
                                "tileloadd tmm4, [{a0} + {wst}*1]",
                                "tileloadd tmm6, [{b0} + {st}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tileloadd tmm7, [{b1} + {st}*1]",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tileloadd tmm5, [{a1} + {wst}*1]",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                "tilestored [{d0} + {st}*1], tmm4",
                                "tilestored [{d1} + {st}*1], tmm5",
                                a0 = in(reg) w0.add(tiles.step * s),
                                a1 = in(reg) w1.add(tiles.step * s),
                                b0 = in(reg) x0.add(16 * TILE * s),
                                b1 = in(reg) x1.add(16 * TILE * s),
                                d0 = in(reg) d0.add(dst.step * s),
                                d1 = in(reg) d1.add(dst.step * s),
                                st = in(reg) stride,
                                wst = in(reg) tiles.row_bytes,
                                options(nostack)
                            );
                        } else {
                            // Each load just before the first product that needs it, so the
                            // next loads overlap the products already issued.
                            asm!(
                                "tileloadd tmm4, [{a0} + {wst}*1]",
                                "tileloadd tmm6, [{b0} + {st}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tileloadd tmm7, [{b1} + {st}*1]",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tileloadd tmm5, [{a1} + {wst}*1]",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a0 = in(reg) w0.add(tiles.step * s),
                                a1 = in(reg) w1.add(tiles.step * s),
                                b0 = in(reg) x0.add(16 * TILE * s),
                                b1 = in(reg) x1.add(16 * TILE * s),
                                st = in(reg) stride,
                                wst = in(reg) tiles.row_bytes,
                                options(nostack, readonly)
                            );
                        }
                        // The last block's result tiles, spread over this block's steps.
                        if let Some((pm, pn)) = pending {
                            for t in (0..4).filter(|t| t * steps / 4 == s) {
                                store(&res[set ^ 1], pm, pn, t);
                            }
                        }
                    }
                    let r = &mut res[set].0;
                    asm!(
                        "tilestored [{r0} + {s}*1], tmm0",
                        "tilestored [{r1} + {s}*1], tmm1",
                        "tilestored [{r2} + {s}*1], tmm2",
                        "tilestored [{r3} + {s}*1], tmm3",
                        r0 = in(reg) r[0].as_mut_ptr(),
                        r1 = in(reg) r[1].as_mut_ptr(),
                        r2 = in(reg) r[2].as_mut_ptr(),
                        r3 = in(reg) r[3].as_mut_ptr(),
                        s = in(reg) stride,
                        options(nostack)
                    );
                    pending = Some((mb, n));
                    set ^= 1;
                }
            }
            if let Some((pm, pn)) = pending {
                for t in 0..4 {
                    store(&res[set ^ 1], pm, pn, t);
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// Configures this thread's tiles as [`Config::new`] says (for [`block_32x32`]); release
    /// them with [`release_tiles`].
    ///
    /// # Safety
    /// AMX must be [`usable`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) unsafe fn configure_tiles() {
        let config = Config::new();
        // SAFETY: AMX is usable (the caller's promise); the configuration is this thread's.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        }
    }

    /// Releases this thread's tiles.
    ///
    /// # Safety
    /// AMX must be [`usable`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) unsafe fn release_tiles() {
        // SAFETY: AMX is usable (the caller's promise).
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }

    /// `c = a · bᵀ` for 32 rows of `a` and 32 rows of `b`, over `steps` steps of 32 values:
    /// `a` bf16 rows `a_row` bytes apart (step `k` at `a + 32k`); `b` two blocks of 16 rows
    /// in [`pack`]'s pair layout, the second `b_next` values after the first (step `k` at
    /// `+ 256k`); `c` 32 rows of 32 f32 `c_row` bytes apart (row `i` for `a`'s row `i`, column
    /// `j` for `b`'s row `j`), overwritten.
    ///
    /// # Safety
    /// Between [`configure_tiles`] and [`release_tiles`]; every tile read (16 rows of 64 bytes at the places above, for
    /// `k < steps`) and written lies inside live buffers.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn block_32x32(
        a: *const u16,
        a_row: usize,
        b: *const u32,
        b_next: usize,
        steps: usize,
        c: *mut f32,
        c_row: usize,
    ) {
        use std::arch::asm;
        // SAFETY (all asm blocks): as this function's.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            let a1 = a.byte_add(TILE * a_row);
            let b1 = b.add(b_next);
            for k in 0..steps {
                asm!(
                    "tileloadd tmm4, [{a0} + {ast}*1]",
                    "tileloadd tmm6, [{b0} + {bst}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {bst}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {ast}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a.add(32 * k),
                    a1 = in(reg) a1.add(32 * k),
                    b0 = in(reg) b.add(16 * TILE * k),
                    b1 = in(reg) b1.add(16 * TILE * k),
                    ast = in(reg) a_row,
                    bst = in(reg) 4 * TILE,
                    options(nostack, readonly)
                );
            }
            let c1 = c.byte_add(TILE * c_row);
            asm!(
                "tilestored [{r0} + {s}*1], tmm0",
                "tilestored [{r1} + {s}*1], tmm1",
                "tilestored [{r2} + {s}*1], tmm2",
                "tilestored [{r3} + {s}*1], tmm3",
                r0 = in(reg) c,
                r1 = in(reg) c.add(TILE),
                r2 = in(reg) c1,
                r3 = in(reg) c1.add(TILE),
                s = in(reg) c_row,
                options(nostack)
            );
        }
    }

    /// Four result tiles as `tilestored` writes them, each row on a cache line of its own.
    #[repr(C, align(64))]
    struct ResultTiles([[f32; TILE * TILE]; 4]);

    /// Asks for the 16 cache lines of a tile (rows `stride` bytes apart from `p`) in L1 (a
    /// hint: it never faults). Sixteen instructions off four base registers: the addresses
    /// computed one by one were kept on the stack, and reloading them took load slots from
    /// the tile loads.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch_tile<T>(p: *const T, stride: usize) {
        // SAFETY: a prefetch reads nothing the program can observe and cannot fault; the
        // registers are scratch values computed here.
        unsafe {
            std::arch::asm!(
                "lea {s3}, [{s} + {s}*2]",
                "lea {q}, [{p} + {s}*4]",
                "prefetcht0 [{p}]",
                "prefetcht0 [{p} + {s}]",
                "prefetcht0 [{p} + {s}*2]",
                "prefetcht0 [{p} + {s3}]",
                "prefetcht0 [{q}]",
                "prefetcht0 [{q} + {s}]",
                "prefetcht0 [{q} + {s}*2]",
                "prefetcht0 [{q} + {s3}]",
                "lea {q}, [{q} + {s}*4]",
                "prefetcht0 [{q}]",
                "prefetcht0 [{q} + {s}]",
                "prefetcht0 [{q} + {s}*2]",
                "prefetcht0 [{q} + {s3}]",
                "lea {q}, [{q} + {s}*4]",
                "prefetcht0 [{q}]",
                "prefetcht0 [{q} + {s}]",
                "prefetcht0 [{q} + {s}*2]",
                "prefetcht0 [{q} + {s3}]",
                p = in(reg) p,
                s = in(reg) stride,
                s3 = out(reg) _,
                q = out(reg) _,
                options(nostack, readonly, preserves_flags)
            );
        }
    }

    /// Writes column `j` of the 16×16 `tile` as 16 consecutive values at `dst + j·stride`, for
    /// `j < take` ([`transpose16`]), plus the 16 values at `bias` if any, through GELU with
    /// `gelu`, times `silu` of the values at `gate + j·stride` if any, plus the values already
    /// there with `accumulate`.
    ///
    /// # Safety
    /// AVX-512F and FMA must be available ([`usable`] checks); `dst + j·stride .. + 16` must be
    /// writable (and, with `accumulate`, readable) for `j < take`, and as much readable at
    /// `gate`; `bias` must hold 16 values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn transpose_store(
        tile: &[f32; TILE * TILE],
        dst: *mut f32,
        stride: usize,
        take: usize,
        bias: Option<*const f32>,
        gelu: bool,
        gate: Option<*const f32>,
        accumulate: bool,
    ) {
        use std::arch::x86_64::*;
        // SAFETY: loads read inside `tile` and what the caller vouches for; stores write what
        // the caller vouches for.
        unsafe {
            let r: [__m512; 16] =
                std::array::from_fn(|i| _mm512_loadu_ps(tile.as_ptr().add(16 * i)));
            let b = bias.map(|b| _mm512_loadu_ps(b));
            for (j, v) in transpose16(r).iter().enumerate().take(take) {
                let mut v = *v;
                if let Some(b) = b {
                    v = _mm512_add_ps(v, b);
                }
                if gelu {
                    v = gelu_avx512(v);
                }
                if let Some(g) = gate {
                    let mut lanes = [0f32; 16];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), v);
                    let g = std::slice::from_raw_parts(g.add(j * stride), 16);
                    for (x, &g) in lanes.iter_mut().zip(g) {
                        *x *= silu_value(g);
                    }
                    v = _mm512_loadu_ps(lanes.as_ptr());
                }
                if accumulate {
                    v = _mm512_add_ps(v, _mm512_loadu_ps(dst.add(j * stride)));
                }
                _mm512_storeu_ps(dst.add(j * stride), v);
            }
        }
    }

    /// The 16×16 `tile` (row `k` output `k`, column `j` activation row `j`) plus the 16 values
    /// at `bias` if any (one per output), through GELU with `gelu`, rounded to bf16 and stored
    /// as [`pack`] lays out 16 outputs of a block of rows: pair `q` (outputs `2q`, `2q + 1`),
    /// row `j` at `dst + 16q + j`; rows from `take` on zero.
    ///
    /// # Safety
    /// AVX-512F and BW, AVX512-BF16 and FMA must be available ([`usable`] checks); `dst .. +
    /// 128` must be writable, `bias` must hold 16 values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,fma")]
    unsafe fn pack_store(
        tile: &[f32; TILE * TILE],
        dst: *mut u32,
        take: usize,
        bias: Option<*const f32>,
        gelu: bool,
    ) {
        use std::arch::x86_64::*;
        let keep: __mmask16 = if take >= TILE {
            0xffff
        } else {
            (1 << take) - 1
        };
        // Word 2j of a result: word j (output 2q's row j); word 2j + 1: word 16 + j.
        let order: [u16; 32] = std::array::from_fn(|w| (w / 2 + 16 * (w % 2)) as u16);
        // SAFETY: loads read inside `tile`, `order` and the 16 bias values; stores write what
        // the caller vouches for.
        unsafe {
            let order = _mm512_loadu_si512(order.as_ptr().cast());
            let row = |k: usize| {
                let mut v = _mm512_loadu_ps(tile.as_ptr().add(TILE * k));
                if let Some(b) = bias {
                    v = _mm512_add_ps(v, _mm512_set1_ps(*b.add(k)));
                }
                if gelu {
                    v = gelu_avx512(v);
                }
                _mm512_maskz_mov_ps(keep, v)
            };
            for q in 0..TILE / 2 {
                let both: __m512i =
                    std::mem::transmute(_mm512_cvtne2ps_pbh(row(2 * q + 1), row(2 * q)));
                let pairs = _mm512_permutexvar_epi16(order, both);
                _mm512_storeu_si512(dst.add(TILE * q).cast(), pairs);
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        _: &[u32],
        _: usize,
        _: &[u16],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: Dest,
        _: Epilogue<'_>,
    ) {
        unreachable!("AMX is x86-64 only and `usable` says so")
    }
}

mod dot {
    //! The AVX512-BF16 path: each result is one 16-lane accumulator of pairwise products along
    //! `in`, four weight rows by four activation rows at a time, summed across lanes at the end.

    use super::*;

    /// Weight rows per kernel call.
    const NR: usize = 4;
    /// Activation rows per kernel call.
    const MR: usize = 4;

    /// Activations as bf16 (two to a `u32`), padded with zero rows to a multiple of MR, each
    /// row one cache line longer than `d_in` so that the rows a kernel reads do not share L1
    /// sets.
    pub(super) fn pack(x: &[f32], rows: usize, d_in: usize, packed: &mut Aligned<u32>) {
        let padded = rows.next_multiple_of(MR);
        let stride = (d_in + 32) / 2;
        packed.clear();
        packed.resize(padded * stride, 0);
        packed
            .par_chunks_mut(stride)
            .zip(x.par_chunks(d_in))
            .for_each(|(d, s)| {
                super::super::simd::widest(
                    #[inline(always)]
                    || {
                        for (p, v) in d.iter_mut().zip(s.chunks_exact(2)) {
                            let lo = super::super::simd::bf16_bits(v[0]);
                            let hi = super::super::simd::bf16_bits(v[1]);
                            *p = u32::from(lo) | (u32::from(hi) << 16);
                        }
                    },
                )
            });
    }

    /// `y = x·wᵀ` for `packed` from [`pack`].
    pub(super) fn gemm(
        packed: &[u32],
        rows: usize,
        w: &[u16],
        d_in: usize,
        out: usize,
        y: &mut [f32],
        epilogue: Epilogue<'_>,
    ) {
        let stride = d_in + 32;
        // SAFETY: u32 has the alignment of two u16 and no invalid bit patterns; the values are
        // bf16 pairs, low half first (x86-64 is little-endian).
        let xb: &[u16] =
            unsafe { std::slice::from_raw_parts(packed.as_ptr().cast::<u16>(), packed.len() * 2) };
        let per = rows_per_task(out, d_in, NR, rayon::current_num_threads());
        let y = Out(y.as_mut_ptr());
        (0..out.div_ceil(per)).into_par_iter().for_each(|task| {
            let first = task * per;
            let last = (first + per).min(out);
            // SAFETY: this task writes columns first..last of y only; the caller checked the
            // instructions, `out` is a multiple of NR and `xb` holds `padded` rows.
            unsafe { block(xb, stride, rows, w, d_in, out, first, last, y, epilogue) };
        });
    }

    /// Weight rows `first..last` against every activation row, `MR` rows at a time over
    /// groups of `NR` weight rows.
    ///
    /// # Safety
    /// AVX512-F and AVX512-BF16 must be available; `xb` holds `rows` rounded up to `MR` rows of
    /// `d_in` (a multiple of 32); `y` `[rows, out]` has no other writer of columns
    /// `first..last`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        xb: &[u16],
        stride: usize,
        rows: usize,
        w: &[u16],
        d_in: usize,
        out: usize,
        first: usize,
        last: usize,
        y: Out,
        epilogue: Epilogue<'_>,
    ) {
        use std::arch::x86_64::*;
        // Activation rows one pass keeps in L2 next to the task's weight rows.
        let chunk = ((256 << 10) / (2 * stride)).max(MR) / MR * MR;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + chunk).min(rows);
            for n in (first..last).step_by(NR) {
                let mut m = r0;
                while m < r1 {
                    let mut acc = [[_mm512_setzero_ps(); MR]; NR];
                    // SAFETY: rows n..n+NR of w and m..m+MR of xb exist (out is a multiple of
                    // NR, xb is padded to MR rows); each load reads 32 values inside a row.
                    unsafe {
                        let wp = w.as_ptr().add(n * d_in);
                        let xp = xb.as_ptr().add(m * stride);
                        for k in (0..d_in).step_by(32) {
                            let wv: [__m512bh; NR] = std::array::from_fn(|i| {
                                std::mem::transmute(_mm512_loadu_si512(wp.add(i * d_in + k).cast()))
                            });
                            for j in 0..MR {
                                let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                                    xp.add(j * stride + k).cast(),
                                ));
                                for (a, &wr) in acc.iter_mut().zip(&wv) {
                                    a[j] = _mm512_dpbf16_ps(a[j], wr, xv);
                                }
                            }
                        }
                        for j in 0..MR.min(r1 - m) {
                            for (i, a) in acc.iter().enumerate() {
                                let at = epilogue.place(rows, out, m + j, n + i);
                                let mut v = _mm512_reduce_add_ps(a[j]);
                                if let Some(b) = epilogue.bias {
                                    v += b[n + i];
                                }
                                if epilogue.gelu {
                                    v = gelu_value(v);
                                }
                                if let Some(g) = epilogue.gate {
                                    v *= silu_value(g[at]);
                                }
                                if epilogue.accumulate {
                                    v += *y.0.add(at);
                                }
                                *y.0.add(at) = v;
                            }
                        }
                    }
                    m += MR;
                }
            }
            r0 = r1;
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        _: &[u16],
        _: usize,
        _: usize,
        _: &[u16],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: Out,
        _: Epilogue<'_>,
    ) {
        unreachable!("AVX512-BF16 is x86-64 only and `supported` says so")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(i: usize, salt: usize) -> f32 {
        ((i * 7919 + salt * 104_729 + 3) % 2017) as f32 / 1000.0 - 1.0
    }

    fn weight(out: usize, d_in: usize) -> Vec<u16> {
        (0..out * d_in)
            .map(|i| half::bf16::from_f32(value(i, 1) * 0.5).to_bits())
            .collect()
    }

    #[test]
    fn every_path_matches_the_definition() {
        for path in Bf16Gemm::ALL.into_iter().filter(|p| p.supported()) {
            for &(rows, d_in, out) in &[
                (1, 32, 32),
                (7, 64, 96),
                (33, 96, 64),
                (50, 160, 128),
                (100, 64, 320),
                // Rows of 2 KiB and 4 KiB: the AMX path copies them into tile order as it
                // goes (more than one pass over the activations) or reads them in place.
                (40, 1024, 64),
                (100, 1024, 96),
                (3, 2048, 32),
            ] {
                let x: Vec<f32> = (0..rows * d_in).map(|i| value(i, 2)).collect();
                let w = weight(out, d_in);
                let mut want = vec![0.0; rows * out];
                reference(&x, rows, &w, d_in, &mut want);
                // The weight at the start of a cache line and one value past it (AMX reads
                // the latter through its tile-order copy).
                for skip in [0, 1] {
                    let mut held: Aligned<u16> = aligned();
                    held.resize(skip, 0);
                    held.extend_from_slice(&w);
                    let mut got = vec![f32::NAN; rows * out];
                    bf16_gemm(path, &x, rows, &held[skip..], d_in, &mut got).unwrap();
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{} {rows}x{d_in}x{out} (skip {skip}) at {i}: {g} vs {e}",
                            path.name()
                        );
                    }
                }
            }
        }
    }

    /// Bias and accumulation as results are stored, on every path: `y += x·wᵀ + b`, exactly
    /// the separate passes' sums (the same three terms added in the same order).
    #[test]
    fn the_epilogue_applies_bias_activations_and_input_and_lays_out_heads() {
        for path in Bf16Gemm::ALL.into_iter().filter(|p| p.supported()) {
            for &(rows, d_in, out) in &[(7, 64, 96), (50, 160, 128), (33, 1024, 64)] {
                let x: Vec<f32> = (0..rows * d_in).map(|i| value(i, 4)).collect();
                let w = weight(out, d_in);
                let bias: Vec<f32> = (0..out).map(|i| value(i, 5)).collect();
                let before: Vec<f32> = (0..rows * out).map(|i| value(i, 6)).collect();
                let mut packed = PackedRows::default();
                packed.pack(path, &x, rows, d_in).unwrap();
                let mut plain = vec![0.0; rows * out];
                bf16_gemm_packed(&packed, &w, &mut plain).unwrap();
                let mut want = before.clone();
                for (r, row) in want.chunks_exact_mut(out).enumerate() {
                    for (o, v) in row.iter_mut().enumerate() {
                        *v += plain[r * out + o] + bias[o];
                    }
                }
                let mut got = before.clone();
                let epilogue = Epilogue {
                    bias: Some(&bias),
                    accumulate: true,
                    ..Epilogue::default()
                };
                bf16_gemm_packed_with(&packed, &w, &mut got, epilogue).unwrap();
                assert_eq!(got, want, "{} {rows}x{d_in}x{out}", path.name());
                let mut biased = vec![f32::NAN; rows * out];
                let epilogue = Epilogue {
                    bias: Some(&bias),
                    ..Epilogue::default()
                };
                bf16_gemm_packed_with(&packed, &w, &mut biased, epilogue).unwrap();
                for (i, (g, p)) in biased.iter().zip(&plain).enumerate() {
                    assert_eq!(*g, p + bias[i % out]);
                }
                let short = Epilogue {
                    bias: Some(&bias[1..]),
                    ..Epilogue::default()
                };
                assert!(bf16_gemm_packed_with(&packed, &w, &mut biased, short).is_err());
                // Through GELU, as an MLP's first projection.
                let mut activated = vec![f32::NAN; rows * out];
                let epilogue = Epilogue {
                    bias: Some(&bias),
                    gelu: true,
                    ..Epilogue::default()
                };
                bf16_gemm_packed_with(&packed, &w, &mut activated, epilogue).unwrap();
                // (AMX evaluates GELU in vectors with fused multiply-adds.)
                for (i, g) in activated.iter().enumerate() {
                    let want = gelu_value(plain[i] + bias[i % out]);
                    assert!(
                        (g - want).abs() <= 4e-7 * want.abs().max(1.0),
                        "{g} vs {want}"
                    );
                }
                // Times silu of a gate, as a SwiGLU's up projection.
                let gate: Vec<f32> = (0..rows * out).map(|i| 8.0 * value(i, 7)).collect();
                let mut gated = vec![f32::NAN; rows * out];
                let epilogue = Epilogue {
                    bias: Some(&bias),
                    gate: Some(&gate),
                    ..Epilogue::default()
                };
                bf16_gemm_packed_with(&packed, &w, &mut gated, epilogue).unwrap();
                for (i, g) in gated.iter().enumerate() {
                    assert_eq!(*g, (plain[i] + bias[i % out]) * silu_value(gate[i]));
                }
                let short = Epilogue {
                    gate: Some(&gate[1..]),
                    ..Epilogue::default()
                };
                assert!(bf16_gemm_packed_with(&packed, &w, &mut gated, short).is_err());
                // Laid out as heads of 32 outputs.
                let d = 32;
                let mut heads = vec![f32::NAN; rows * out];
                let epilogue = Epilogue {
                    head_width: Some(d),
                    ..Epilogue::default()
                };
                bf16_gemm_packed_with(&packed, &w, &mut heads, epilogue).unwrap();
                for (i, p) in plain.iter().enumerate() {
                    let (r, o) = (i / out, i % out);
                    assert_eq!(heads[(o / d * rows + r) * d + o % d], *p, "({r}, {o})");
                }
                for bad in [0, 24, 3 * out] {
                    let epilogue = Epilogue {
                        head_width: Some(bad),
                        ..Epilogue::default()
                    };
                    assert!(bf16_gemm_packed_with(&packed, &w, &mut heads, epilogue).is_err());
                }
            }
        }
    }

    /// The attention's AMX block product over rows packed by `pack_here` (keys) and columns
    /// packed by `pack_columns` (values, `s` not always a multiple of 32), against the
    /// definition on the bf16-rounded operands; the columns' vector packing against its scalar
    /// form.
    /// Results packed as they are stored carry the bits that packing the f32 results gives,
    /// padding rows included, with each epilogue the direct form takes and one it does not.
    #[test]
    fn results_packed_for_the_next_product_are_the_packed_results() {
        for path in Bf16Gemm::ALL.into_iter().filter(|p| p.supported()) {
            for &(rows, d_in, out) in &[(1, 64, 96), (17, 160, 128), (40, 96, 64), (70, 64, 160)] {
                let x: Vec<f32> = (0..rows * d_in).map(|i| value(i, 7) * 3.0).collect();
                let w = weight(out, d_in);
                let bias: Vec<f32> = (0..out).map(|i| value(i, 8)).collect();
                let gate: Vec<f32> = (0..rows * out).map(|i| value(i, 9)).collect();
                let mut packed = PackedRows::default();
                packed.pack(path, &x, rows, d_in).unwrap();
                let epilogues = [
                    Epilogue::default(),
                    Epilogue {
                        bias: Some(&bias),
                        ..Epilogue::default()
                    },
                    Epilogue {
                        bias: Some(&bias),
                        gelu: true,
                        ..Epilogue::default()
                    },
                    Epilogue {
                        gate: Some(&gate),
                        ..Epilogue::default()
                    },
                ];
                for (e, epilogue) in epilogues.into_iter().enumerate() {
                    let mut y = vec![0.0; rows * out];
                    bf16_gemm_packed_with(&packed, &w, &mut y, epilogue).unwrap();
                    let mut want = PackedRows::default();
                    want.pack(path, &y, rows, out).unwrap();
                    // Stale values in both buffers: every value must be written.
                    let mut got = PackedRows::default();
                    got.pack(path, &vec![7.0; 3 * out], 3, out).unwrap();
                    let mut scratch = vec![5.0; 4];
                    bf16_gemm_packed_to_packed(&packed, &w, epilogue, &mut got, &mut scratch)
                        .unwrap();
                    let case = format!("{} {rows}x{d_in}x{out}, epilogue {e}", path.name());
                    assert_eq!(
                        (got.path, got.rows, got.d_in),
                        (Some(path), rows, out),
                        "{case}"
                    );
                    assert!(got.data.as_slice() == want.data.as_slice(), "{case}");
                }
            }
        }
    }

    #[test]
    fn amx_blocks_of_32_match_the_definition() {
        if !Bf16Gemm::Amx.supported() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        for &(s, d) in &[(45, 32), (64, 64), (100, 128)] {
            let round = |v: f32| half::bf16::from_f32(v).to_f32();
            let bits = |b: u16| half::bf16::from_bits(b).to_f32();
            let keys: Vec<f32> = (0..s * d).map(|i| value(i, 5)).collect();
            let values: Vec<f32> = (0..s * d).map(|i| value(i, 6)).collect();
            let rows = s.next_multiple_of(ALIGN);
            // 32 query rows of `d`, and 32 rows of weights over `rows` keys (zero past `s`).
            let mut queries: Aligned<u16> = aligned();
            queries.resize(ALIGN * d, 0);
            for (i, q) in queries.iter_mut().enumerate() {
                *q = half::bf16::from_f32(value(i, 7)).to_bits();
            }
            let mut weights: Aligned<u16> = aligned();
            weights.resize(ALIGN * rows, 0);
            for (i, w) in weights.iter_mut().enumerate() {
                let v = if i % rows < s { value(i, 8) } else { 0.0 };
                *w = half::bf16::from_f32(v).to_bits();
            }

            let mut key_pairs = aligned();
            amx::pack_here(&keys, s, d, &mut key_pairs);
            let mut value_pairs = aligned();
            amx::pack_columns(&values, s, d, &mut value_pairs);
            let mut scalar = aligned();
            amx::pack_columns_scalar(&values, s, d, &mut scalar);
            assert_eq!(&value_pairs[..], &scalar[..], "[{s}, {d}] columns");
            let mut scores: Aligned<f32> = aligned();
            scores.resize(ALIGN * rows, f32::NAN);
            let mut out: Aligned<f32> = aligned();
            out.resize(ALIGN * d, f32::NAN);
            let (key_block, value_block) = ((d / 2) * amx::TILE, (rows / 2) * amx::TILE);
            // SAFETY: AMX is usable; the buffers hold what each call reads and writes.
            unsafe {
                amx::configure_tiles();
                for k0 in (0..rows).step_by(ALIGN) {
                    amx::block_32x32(
                        queries.as_ptr(),
                        2 * d,
                        key_pairs.as_ptr().add(k0 / amx::TILE * key_block),
                        key_block,
                        d / ALIGN,
                        scores.as_mut_ptr().add(k0),
                        4 * rows,
                    );
                }
                for c0 in (0..d).step_by(ALIGN) {
                    amx::block_32x32(
                        weights.as_ptr(),
                        2 * rows,
                        value_pairs.as_ptr().add(c0 / amx::TILE * value_block),
                        value_block,
                        rows / ALIGN,
                        out.as_mut_ptr().add(c0),
                        4 * d,
                    );
                }
                amx::release_tiles();
            }
            let close = |g: f32, e: f32| (g - e).abs() <= 1e-4 * (1.0 + e.abs());
            for i in 0..ALIGN {
                for j in 0..rows {
                    let e = if j < s {
                        (0..d)
                            .map(|c| bits(queries[i * d + c]) * round(keys[j * d + c]))
                            .sum()
                    } else {
                        0.0
                    };
                    let g = scores[i * rows + j];
                    assert!(close(g, e), "scores [{s}, {d}] ({i}, {j}): {g} vs {e}");
                }
                for c in 0..d {
                    let e: f32 = (0..s)
                        .map(|j| bits(weights[i * rows + j]) * round(values[j * d + c]))
                        .sum();
                    let g = out[i * d + c];
                    assert!(close(g, e), "p·v [{s}, {d}] ({i}, {c}): {g} vs {e}");
                }
            }
        }
    }

    #[test]
    fn the_activations_are_rounded_to_bf16() {
        // One input whose value bf16 cannot hold: the product sees it rounded.
        for path in Bf16Gemm::ALL.into_iter().filter(|p| p.supported()) {
            let d_in = 32;
            let mut x = vec![0.0f32; d_in];
            x[0] = 1.0 + 1.0 / 512.0;
            let mut w = vec![0u16; 32 * d_in];
            w[0] = half::bf16::from_f32(1.0).to_bits();
            let mut y = vec![0.0; 32];
            bf16_gemm(path, &x, 1, &w, d_in, &mut y).unwrap();
            assert_eq!(y[0], half::bf16::from_f32(x[0]).to_f32(), "{}", path.name());
            assert!(y[1..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn shapes_outside_the_paths_are_errors() {
        let Some(path) = Bf16Gemm::best() else {
            return;
        };
        let w = weight(32, 48);
        let x = vec![0.0; 48];
        let mut y = vec![0.0; 32];
        assert!(matches!(
            bf16_gemm(path, &x, 1, &w, 48, &mut y),
            Err(Error::InvalidInput(_))
        ));
        let w = weight(32, 32);
        assert!(matches!(
            bf16_gemm(path, &x[..31], 1, &w, 32, &mut y),
            Err(Error::InvalidInput(_))
        ));
        assert!(!Bf16Gemm::covers(16, 32) && Bf16Gemm::covers(64, 2048));
    }

    #[test]
    fn names_parse_back() {
        assert_eq!(Bf16Gemm::parse("none").unwrap(), None);
        assert_eq!(Bf16Gemm::parse("auto").unwrap(), Bf16Gemm::best());
        assert!(matches!(
            Bf16Gemm::parse("tpu"),
            Err(Error::InvalidInput(_))
        ));
        for p in Bf16Gemm::ALL {
            match Bf16Gemm::parse(p.name()) {
                Ok(got) => assert!(p.supported() && got == Some(p)),
                Err(_) => assert!(!p.supported()),
            }
        }
    }
}
