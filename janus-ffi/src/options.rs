//! Options structs, their defaults, and their translation to janus-core's options.
//!
//! Every options struct starts with `size_t struct_size`, set by its `janus_*_default_options()`
//! initialiser to the struct's size in the header the caller was compiled with. The library reads
//! only that many bytes and takes the defaults for fields added since, so that programs built
//! against an older header keep working. Passing NULL instead of an options struct takes all the
//! defaults.

use std::ffi::c_void;

use janus_core::generate::image::ImageGenOptions;
use janus_core::generate::sampling::Sampling;
use janus_core::generate::text::TextGenOptions;
use janus_core::pipeline::LoadOptions;
use janus_core::{Backend, ComputeDType, WeightFormat};

use crate::status::{FfiError, bad_argument};

/// A compute backend: one of the `JANUS_BACKEND_*` values.
pub type janus_backend = u32;
/// Burn's pure-Rust CPU backend (the default).
pub const JANUS_BACKEND_CPU: janus_backend = 0;
/// The best GPU wgpu finds (Vulkan, Metal, DX12); needs a library built with the `wgpu` feature.
pub const JANUS_BACKEND_WGPU: janus_backend = 1;
/// The first NVIDIA GPU; needs a library built with the `cuda` feature.
pub const JANUS_BACKEND_CUDA: janus_backend = 2;

/// The dtype weights are converted to and computed in: one of the `JANUS_DTYPE_*` values.
pub type janus_dtype = u32;
/// 32-bit float.
pub const JANUS_DTYPE_F32: janus_dtype = 0;
/// IEEE half precision.
pub const JANUS_DTYPE_F16: janus_dtype = 1;
/// bfloat16. On the CPU: f32 activations, bf16 weights, and the large products with bf16
/// operands and f32 sums (AMX or AVX512-BF16 where the CPU has them).
pub const JANUS_DTYPE_BF16: janus_dtype = 2;
/// The default: bf16 on a CPU with AMX when the weights are held in bf16, else f32.
/// `janus_model_dtype` tells what it resolved to.
pub const JANUS_DTYPE_AUTO: janus_dtype = 3;

/// The C value of a compute dtype.
pub(crate) fn dtype_value(d: ComputeDType) -> janus_dtype {
    match d {
        ComputeDType::Auto => JANUS_DTYPE_AUTO,
        ComputeDType::F32 => JANUS_DTYPE_F32,
        ComputeDType::F16 => JANUS_DTYPE_F16,
        ComputeDType::BF16 => JANUS_DTYPE_BF16,
    }
}

/// How weights are held in memory: one of the `JANUS_WEIGHTS_*` values. The compute dtype stays
/// `dtype`'s.
pub type janus_weights = u32;
/// On the CPU, each weight in the half precision its file stores (bf16 or f16), else f32; on a
/// GPU, the compute dtype (the default). `janus_model_weights` tells what it resolved to.
pub const JANUS_WEIGHTS_AUTO: janus_weights = 0;
/// 32-bit float.
pub const JANUS_WEIGHTS_F32: janus_weights = 1;
/// bfloat16.
pub const JANUS_WEIGHTS_BF16: janus_weights = 2;
/// IEEE half precision.
pub const JANUS_WEIGHTS_F16: janus_weights = 3;
/// GGML's q8_0 (CPU, compute dtype f32).
pub const JANUS_WEIGHTS_Q8_0: janus_weights = 4;
/// GGML's q4_0 (CPU, compute dtype f32).
pub const JANUS_WEIGHTS_Q4_0: janus_weights = 5;

/// The C value of a weight storage.
pub(crate) fn weights_value(f: WeightFormat) -> janus_weights {
    match f {
        WeightFormat::Auto => JANUS_WEIGHTS_AUTO,
        WeightFormat::F32 => JANUS_WEIGHTS_F32,
        WeightFormat::Bf16 => JANUS_WEIGHTS_BF16,
        WeightFormat::F16 => JANUS_WEIGHTS_F16,
        WeightFormat::Q8_0 => JANUS_WEIGHTS_Q8_0,
        WeightFormat::Q4_0 => JANUS_WEIGHTS_Q4_0,
    }
}

/// Resource limits of each request on a handle (the same names and defaults as `janus
/// --max-images`, ... and `janus_core::Limits`). Past a limit a call fails with
/// `JANUS_ERR_INVALID_INPUT` before any allocation sized by it. Every limit must be at least 1.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct janus_limits {
    /// Most images in one request (8).
    pub max_images: usize,
    /// Most pixels (width × height) of one input image (50 000 000).
    pub max_image_pixels: u64,
    /// Most images one `janus_generate` call makes: its `count` (64).
    pub max_count: usize,
    /// Largest input file read for a request, in MiB (64).
    pub max_input_mb: u64,
}

impl From<janus_core::Limits> for janus_limits {
    fn from(l: janus_core::Limits) -> Self {
        janus_limits {
            max_images: l.max_images,
            max_image_pixels: l.max_image_pixels,
            max_count: l.max_count,
            max_input_mb: l.max_input_mb,
        }
    }
}

impl From<janus_limits> for janus_core::Limits {
    fn from(l: janus_limits) -> Self {
        janus_core::Limits {
            max_images: l.max_images,
            max_image_pixels: l.max_image_pixels,
            max_count: l.max_count,
            max_input_mb: l.max_input_mb,
        }
    }
}

/// How to load a model. Initialise with `janus_load_default_options()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct janus_load_options {
    /// `sizeof(janus_load_options)`, set by `janus_load_default_options()`.
    pub struct_size: usize,
    /// Where to run (`JANUS_BACKEND_CPU`).
    pub backend: janus_backend,
    /// The compute dtype (`JANUS_DTYPE_AUTO`).
    pub dtype: janus_dtype,
    /// How weights are held in memory (`JANUS_WEIGHTS_AUTO`). Added after the first release:
    /// callers built against a header without it get the default.
    pub weights: janus_weights,
    /// Resource limits of each request on the handle (see `janus_limits`). Added after the
    /// first release: callers built against a header without it get the defaults.
    pub limits: janus_limits,
}

/// How to answer a question about images. Initialise with
/// `janus_understand_default_options()`; the defaults decode greedily.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct janus_understand_options {
    /// `sizeof(janus_understand_options)`, set by `janus_understand_default_options()`.
    pub struct_size: usize,
    /// Most tokens to generate, at least 1 (512).
    pub max_new_tokens: usize,
    /// Softmax temperature, finite and ≥ 0; 0 takes the most likely token (0).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens when sampling; 0 keeps all (0).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`, in (0, 1];
    /// 1 keeps all (1).
    pub top_p: f32,
    /// Repetition penalty as transformers applies it, > 0; 1 is none (1).
    pub repetition_penalty: f32,
    /// Seed of the random stream when sampling (0).
    pub seed: u64,
    /// Longest prompt plus answer allowed, in tokens (4096).
    pub max_context: usize,
}

/// Called after every image-token step of `janus_generate` with the step number (1-based) and
/// the number of steps; return `false` to cancel the call (it then returns
/// `JANUS_ERR_CANCELLED`). Runs on the calling thread; must not unwind (throw) or longjmp.
pub type janus_progress_callback =
    Option<unsafe extern "C" fn(step: usize, total: usize, user_data: *mut c_void) -> bool>;

/// How to generate images. Initialise with `janus_generate_default_options()`; the defaults are
/// the reference's (guidance 5, temperature 1).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct janus_generate_options {
    /// `sizeof(janus_generate_options)`, set by `janus_generate_default_options()`.
    pub struct_size: usize,
    /// Images to generate, at least 1 (1).
    pub count: usize,
    /// Classifier-free guidance weight, finite (5).
    pub cfg_weight: f32,
    /// Softmax temperature, finite and ≥ 0; 0 takes the most likely token (1).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all (0).
    pub top_k: usize,
    /// Nucleus sampling threshold in (0, 1]; 1 keeps all (1).
    pub top_p: f32,
    /// Seed of the random streams: image `i` of a call draws from stream `i` (0).
    pub seed: u64,
    /// Progress callback, or NULL (NULL).
    pub progress: janus_progress_callback,
    /// Passed to `progress` unchanged (NULL).
    pub user_data: *mut c_void,
}

/// Options structs that start with `struct_size`.
///
/// # Safety
/// `Self` must be `#[repr(C)]`, start with a `usize`, and accept any bytes a C caller's struct
/// of the same declaration holds.
pub(crate) unsafe trait Versioned: Copy {
    /// The C name, for messages.
    const NAME: &'static str;
    /// The defaults.
    fn defaults() -> Self;
}

// SAFETY: all three are #[repr(C)], start with `struct_size: usize`, and hold only integers,
// floats, an optional function pointer and a raw pointer (no bool or enum fields).
unsafe impl Versioned for janus_load_options {
    const NAME: &'static str = "janus_load_options";
    fn defaults() -> Self {
        janus_load_default_options()
    }
}
// SAFETY: as above.
unsafe impl Versioned for janus_understand_options {
    const NAME: &'static str = "janus_understand_options";
    fn defaults() -> Self {
        janus_understand_default_options()
    }
}
// SAFETY: as above.
unsafe impl Versioned for janus_generate_options {
    const NAME: &'static str = "janus_generate_options";
    fn defaults() -> Self {
        janus_generate_default_options()
    }
}

/// Reads a caller's options struct (NULL: the defaults).
///
/// # Safety
/// `ptr` is NULL or points to at least `(*ptr).struct_size` readable bytes.
pub(crate) unsafe fn read<T: Versioned>(ptr: *const T) -> Result<T, FfiError> {
    let mut out = T::defaults();
    if ptr.is_null() {
        return Ok(out);
    }
    // SAFETY: a non-NULL options pointer points at least to its `struct_size` field.
    let size = unsafe { ptr.cast::<usize>().read_unaligned() };
    let full = size_of::<T>();
    if size < size_of::<usize>() || size > full {
        return Err(bad_argument(format!(
            "{}.struct_size is {size}, but this library knows sizes up to {full}: initialise \
             options with their janus_*_default_options() function",
            T::NAME
        )));
    }
    // SAFETY: the caller's struct has `size` readable bytes, `out` has `full` ≥ `size`, and any
    // bytes are valid for the fields (see `Versioned`).
    unsafe {
        std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&raw mut out).cast::<u8>(), size);
    }
    Ok(out)
}

/// The default load options: CPU backend, compute dtype `auto`, weights `auto`.
///
/// Thread safety: safe from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn janus_load_default_options() -> janus_load_options {
    janus_load_options {
        struct_size: size_of::<janus_load_options>(),
        backend: JANUS_BACKEND_CPU,
        dtype: JANUS_DTYPE_AUTO,
        weights: JANUS_WEIGHTS_AUTO,
        limits: janus_core::Limits::default().into(),
    }
}

/// The default understanding options: greedy decoding of up to 512 tokens.
///
/// Thread safety: safe from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn janus_understand_default_options() -> janus_understand_options {
    let d = TextGenOptions::default();
    janus_understand_options {
        struct_size: size_of::<janus_understand_options>(),
        max_new_tokens: d.max_new_tokens,
        temperature: d.sampling.temperature,
        top_k: d.sampling.top_k.unwrap_or(0),
        top_p: d.sampling.top_p.unwrap_or(1.0),
        repetition_penalty: d.repetition_penalty,
        seed: d.seed,
        max_context: d.max_context,
    }
}

/// The default generation options: one image, guidance 5, temperature 1, seed 0, no callback.
///
/// Thread safety: safe from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn janus_generate_default_options() -> janus_generate_options {
    let d = ImageGenOptions::default();
    janus_generate_options {
        struct_size: size_of::<janus_generate_options>(),
        count: d.count,
        cfg_weight: d.cfg_weight,
        temperature: d.sampling.temperature,
        top_k: d.sampling.top_k.unwrap_or(0),
        top_p: d.sampling.top_p.unwrap_or(1.0),
        seed: d.seed,
        progress: None,
        user_data: std::ptr::null_mut(),
    }
}

/// The sampling settings of C options: `top_k` 0 and `top_p` 1 mean off. janus-core checks the
/// values.
fn sampling(temperature: f32, top_k: usize, top_p: f32) -> Sampling {
    Sampling {
        temperature,
        top_k: (top_k != 0).then_some(top_k),
        top_p: (top_p != 1.0).then_some(top_p),
    }
}

/// janus-core's load options for C options.
pub(crate) fn load_options(o: &janus_load_options) -> Result<LoadOptions, FfiError> {
    {
        let backend = match o.backend {
            JANUS_BACKEND_CPU => Backend::Cpu,
            JANUS_BACKEND_WGPU => Backend::Wgpu,
            JANUS_BACKEND_CUDA => Backend::Cuda,
            other => return Err(bad_argument(format!("unknown backend {other}"))),
        };
        let dtype = match o.dtype {
            JANUS_DTYPE_AUTO => ComputeDType::Auto,
            JANUS_DTYPE_F32 => ComputeDType::F32,
            JANUS_DTYPE_F16 => ComputeDType::F16,
            JANUS_DTYPE_BF16 => ComputeDType::BF16,
            other => return Err(bad_argument(format!("unknown dtype {other}"))),
        };
        let weights = match o.weights {
            JANUS_WEIGHTS_AUTO => WeightFormat::Auto,
            JANUS_WEIGHTS_F32 => WeightFormat::F32,
            JANUS_WEIGHTS_BF16 => WeightFormat::Bf16,
            JANUS_WEIGHTS_F16 => WeightFormat::F16,
            JANUS_WEIGHTS_Q8_0 => WeightFormat::Q8_0,
            JANUS_WEIGHTS_Q4_0 => WeightFormat::Q4_0,
            other => return Err(bad_argument(format!("unknown weights {other}"))),
        };
        Ok(LoadOptions {
            backend,
            dtype,
            weights,
            lora: None,
            limits: o.limits.into(),
        })
    }
}

impl From<&janus_understand_options> for TextGenOptions {
    fn from(o: &janus_understand_options) -> Self {
        TextGenOptions {
            max_new_tokens: o.max_new_tokens,
            sampling: sampling(o.temperature, o.top_k, o.top_p),
            repetition_penalty: o.repetition_penalty,
            seed: o.seed,
            max_context: o.max_context,
        }
    }
}

impl From<&janus_generate_options> for ImageGenOptions {
    fn from(o: &janus_generate_options) -> Self {
        ImageGenOptions {
            count: o.count,
            cfg_weight: o.cfg_weight,
            sampling: sampling(o.temperature, o.top_k, o.top_p),
            seed: o.seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_core_defaults() {
        let t = TextGenOptions::from(&janus_understand_default_options());
        assert_eq!(t, TextGenOptions::default());
        let g = ImageGenOptions::from(&janus_generate_default_options());
        assert_eq!(g, ImageGenOptions::default());
        let l = load_options(&janus_load_default_options()).unwrap();
        assert_eq!(l, LoadOptions::default());
    }

    #[test]
    fn an_older_shorter_struct_keeps_the_defaults_of_later_fields() {
        let mut o = janus_understand_default_options();
        o.max_new_tokens = 7;
        o.seed = 99;
        o.struct_size = std::mem::offset_of!(janus_understand_options, temperature);
        let read = unsafe { read(&o) }.unwrap();
        assert_eq!(read.max_new_tokens, 7);
        assert_eq!(read.seed, janus_understand_default_options().seed);
    }

    #[test]
    fn unset_or_oversized_struct_size_is_rejected() {
        let mut o = janus_load_default_options();
        o.struct_size = 0;
        assert!(matches!(unsafe { read(&o) }, Err(FfiError::Argument(_))));
        o.struct_size = size_of::<janus_load_options>() + 8;
        assert!(matches!(unsafe { read(&o) }, Err(FfiError::Argument(_))));
        let null: *const janus_load_options = std::ptr::null();
        assert_eq!(unsafe { read(null) }.unwrap().backend, JANUS_BACKEND_CPU);
    }
}
