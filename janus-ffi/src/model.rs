//! Loading a model and using it: understanding (with streaming), generation, and the VQ image
//! tokenizer.

use std::ffi::{c_char, c_void};

use janus_core::generate::image::ImageGenOptions;
use janus_core::generate::text::TextGenOptions;
use janus_core::pipeline::{Answer, Janus};

use crate::handles::{
    Owned, insert_model, janus_model, lookup_model, publish, reclaim, remove_model,
};
use crate::image::{
    OwnedImage, OwnedImageList, OwnedTokens, janus_image, janus_image_list, janus_tokens,
    rgb_from_c, rgb_list_from_c, tokens_from_c,
};
use crate::options::{
    dtype_value, janus_dtype, janus_generate_options, janus_load_options, janus_understand_options,
    janus_weights, load_options, read, weights_value,
};
use crate::status::{FfiError, bad_argument, guard, janus_status};
use crate::strings::{path_arg, set_out, str_arg};

/// The answer to a question about images, freed by `janus_answer_free`. Read-only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct janus_answer {
    /// The answer text, UTF-8, `text_len` bytes followed by a NUL (special tokens left out).
    pub text: *const c_char,
    /// Bytes of `text`, without the NUL.
    pub text_len: usize,
    /// The new token ids, with the end-of-sentence id last when generation stopped on it.
    pub token_ids: *const u32,
    /// How many token ids.
    pub n_token_ids: usize,
    /// Length of the prompt in tokens, after image-token expansion.
    pub prompt_tokens: usize,
    /// Seconds spent encoding the images.
    pub vision_seconds: f64,
    /// Seconds to run the prompt and pick the first token.
    pub prefill_seconds: f64,
    /// Seconds for the tokens after the first.
    pub decode_seconds: f64,
}

#[repr(C)]
struct OwnedAnswer {
    public: janus_answer,
    text: Vec<u8>,
    ids: Vec<u32>,
}

// SAFETY: #[repr(C)] with the public part first.
unsafe impl Owned for OwnedAnswer {
    type Public = janus_answer;
    const KIND: &'static str = "janus_answer";
}

impl OwnedAnswer {
    fn new(answer: Answer) -> Self {
        let text_len = answer.text.len();
        let mut text = answer.text.into_bytes();
        text.push(0);
        OwnedAnswer {
            public: janus_answer {
                text: text.as_ptr().cast(),
                text_len,
                token_ids: answer.token_ids.as_ptr(),
                n_token_ids: answer.token_ids.len(),
                prompt_tokens: answer.prompt_tokens,
                vision_seconds: answer.vision_time.as_secs_f64(),
                prefill_seconds: answer.prefill_time.as_secs_f64(),
                decode_seconds: answer.decode_time.as_secs_f64(),
            },
            text,
            ids: answer.token_ids,
        }
    }
}

/// Called with each new piece of answer text as it is produced: `piece` is UTF-8, `len` bytes
/// followed by a NUL, valid only during the call. Return `false` to cancel (the call then
/// returns `JANUS_ERR_CANCELLED`). Runs on the calling thread; must not unwind (throw) or
/// longjmp.
pub type janus_text_callback =
    Option<unsafe extern "C" fn(piece: *const c_char, len: usize, user_data: *mut c_void) -> bool>;

/// Loads a model folder (Hugging Face or original DeepSeek layout: `config.json`, the tokenizer
/// and the weights as safetensors or PyTorch `.bin`, possibly sharded). `options` may be NULL
/// for the defaults (CPU, f32). On success `*out_model` is a handle to free with
/// `janus_model_free`; on failure it is NULL.
///
/// Errors: `JANUS_ERR_IO`, `JANUS_ERR_MISSING_FILE`, `JANUS_ERR_CONFIG`, `JANUS_ERR_CHECKPOINT`,
/// `JANUS_ERR_WEIGHTS`, `JANUS_ERR_TOKENIZER` for a bad folder; `JANUS_ERR_UNSUPPORTED` for a
/// backend this build lacks.
///
/// Thread safety: safe from any thread.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `options` is NULL or a valid options struct;
/// `out_model` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn janus_model_load(
    path: *const c_char,
    options: *const janus_load_options,
    out_model: *mut *mut janus_model,
) -> janus_status {
    guard(|| {
        // SAFETY: the caller's pointers are NULL or valid.
        let out = unsafe { set_out(out_model, "out_model")? };
        // SAFETY: as above.
        let path = unsafe { path_arg(path, "path")? };
        // SAFETY: as above.
        let options = load_options(&unsafe { read(options)? })?;
        *out = insert_model(Janus::load(&path, &options)?);
        Ok(())
    })
}

/// Frees a model. NULL is a no-op. A handle that was already freed (or never loaded) gives
/// `JANUS_ERR_INVALID_HANDLE`; nothing is touched.
///
/// Thread safety: safe from any thread, also while other threads are still running calls on the
/// model: those calls finish normally and the memory is released after the last of them; calls
/// that start after the free get `JANUS_ERR_INVALID_HANDLE`.
#[unsafe(no_mangle)]
pub extern "C" fn janus_model_free(model: *mut janus_model) -> janus_status {
    guard(|| {
        if model.is_null() {
            return Ok(());
        }
        remove_model(model)
    })
}

/// The shape of the image-token grids the model generates, encodes to and decodes
/// (`out_rows · out_cols` tokens per image).
///
/// Thread safety: safe to call on one model from several threads at once.
///
/// # Safety
/// `out_rows` and `out_cols` are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn janus_model_grid(
    model: *const janus_model,
    out_rows: *mut usize,
    out_cols: *mut usize,
) -> janus_status {
    guard(|| {
        let janus = lookup_model(model)?;
        // SAFETY: the caller's pointers are NULL or valid.
        let (Some(rows), Some(cols)) = (unsafe { out_rows.as_mut() }, unsafe { out_cols.as_mut() })
        else {
            return Err(bad_argument("out_rows or out_cols is NULL"));
        };
        let g = janus.config().vq.grid;
        (*rows, *cols) = (g, g);
        Ok(())
    })
}

/// How the model's weights are held in memory: a `JANUS_WEIGHTS_*` value other than
/// `JANUS_WEIGHTS_AUTO` (what `auto` resolved to: the storage of most of the weights' bytes).
/// `out_bytes`, if not NULL, receives the bytes the weights take.
///
/// Thread safety: safe to call on one model from several threads at once.
///
/// # Safety
/// `out_weights` is NULL or writable; `out_bytes` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn janus_model_weights(
    model: *const janus_model,
    out_weights: *mut janus_weights,
    out_bytes: *mut usize,
) -> janus_status {
    guard(|| {
        let janus = lookup_model(model)?;
        // SAFETY: the caller's pointers are NULL or valid.
        let Some(weights) = (unsafe { out_weights.as_mut() }) else {
            return Err(bad_argument("out_weights is NULL"));
        };
        *weights = weights_value(janus.weights());
        // SAFETY: as above.
        if let Some(bytes) = unsafe { out_bytes.as_mut() } {
            *bytes = janus.storage().bytes;
        }
        Ok(())
    })
}

/// The compute dtype of the model: a `JANUS_DTYPE_*` value other than `JANUS_DTYPE_AUTO` (what
/// `auto` resolved to).
///
/// Thread safety: safe to call on one model from several threads at once.
///
/// # Safety
/// `out_dtype` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn janus_model_dtype(
    model: *const janus_model,
    out_dtype: *mut janus_dtype,
) -> janus_status {
    guard(|| {
        let janus = lookup_model(model)?;
        // SAFETY: the caller's pointer is NULL or valid.
        let Some(dtype) = (unsafe { out_dtype.as_mut() }) else {
            return Err(bad_argument("out_dtype is NULL"));
        };
        *dtype = dtype_value(janus.dtype());
        Ok(())
    })
}

/// The body of both understanding calls.
///
/// # Safety
/// The caller's pointers are NULL or valid (see `janus_understand`).
unsafe fn understand(
    model: *const janus_model,
    images: *const janus_image,
    n_images: usize,
    prompt: *const c_char,
    options: *const janus_understand_options,
    on_text: Option<(janus_text_callback, *mut c_void)>,
    out_answer: *mut *mut janus_answer,
) -> Result<(), FfiError> {
    // SAFETY: the caller's pointers are NULL or valid.
    let out = unsafe { set_out(out_answer, "out_answer")? };
    let janus = lookup_model(model)?;
    // SAFETY: as above.
    let images = unsafe { rgb_list_from_c(images, n_images)? };
    // SAFETY: as above.
    let prompt = unsafe { str_arg(prompt, "prompt")? };
    // SAFETY: as above.
    let options = TextGenOptions::from(&unsafe { read(options)? });
    let answer = match on_text {
        None => janus.understand(&images, prompt, &options)?,
        Some((callback, user_data)) => {
            let Some(callback) = callback else {
                return Err(bad_argument("on_text is NULL"));
            };
            let mut send = |text: &str| {
                let mut piece = Vec::with_capacity(text.len() + 1);
                piece.extend_from_slice(text.as_bytes());
                piece.push(0);
                // SAFETY: the caller's callback, with a NUL-terminated buffer of `text.len()`
                // bytes that lives across the call.
                unsafe { callback(piece.as_ptr().cast(), text.len(), user_data) }
            };
            // The pieces add up to the answer's text (the core sends any held-back tail last).
            janus.understand_stream(&images, prompt, &options, &mut send)?
        }
    };
    *out = publish(OwnedAnswer::new(answer));
    Ok(())
}

/// Answers a question about images. `images` holds `n_images` RGB8 images (NULL when
/// `n_images` is 0); `prompt` is the question (UTF-8), where `<image_placeholder>` tags place
/// the images (otherwise each image goes on its own line before the question). `options` may be
/// NULL for greedy decoding of up to 512 tokens. On success `*out_answer` is the answer, to free
/// with `janus_answer_free`; on failure it is NULL.
///
/// Errors: `JANUS_ERR_INVALID_INPUT` for an empty prompt, placeholders that do not match the
/// images, an empty image, bad options, or a prompt past the context.
///
/// Thread safety: safe to call on one model from several threads at once (the calls share the
/// weights and run independently).
///
/// # Safety
/// `model` is NULL or any handle value; `images` points to `n_images` images whose buffers hold
/// what they describe; `prompt` is NULL or NUL-terminated; `options` is NULL or a valid options
/// struct; `out_answer` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn janus_understand(
    model: *const janus_model,
    images: *const janus_image,
    n_images: usize,
    prompt: *const c_char,
    options: *const janus_understand_options,
    out_answer: *mut *mut janus_answer,
) -> janus_status {
    // SAFETY: forwarded from the caller.
    guard(|| unsafe { understand(model, images, n_images, prompt, options, None, out_answer) })
}

/// `janus_understand`, calling `on_text(piece, len, user_data)` with each new piece of the
/// answer as it is produced (the pieces concatenate to the answer's text). When `on_text`
/// returns `false` the call stops and returns `JANUS_ERR_CANCELLED`.
///
/// Thread safety: as `janus_understand`; the callback runs on the calling thread.
///
/// # Safety
/// As `janus_understand`; `on_text` is a valid function or NULL (an error).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn janus_understand_stream(
    model: *const janus_model,
    images: *const janus_image,
    n_images: usize,
    prompt: *const c_char,
    options: *const janus_understand_options,
    on_text: janus_text_callback,
    user_data: *mut c_void,
    out_answer: *mut *mut janus_answer,
) -> janus_status {
    guard(|| {
        // SAFETY: forwarded from the caller.
        unsafe {
            understand(
                model,
                images,
                n_images,
                prompt,
                options,
                Some((on_text, user_data)),
                out_answer,
            )
        }
    })
}

/// Frees an answer. NULL is a no-op; an answer that was already freed (or did not come from
/// this library) gives `JANUS_ERR_INVALID_HANDLE` and is left alone.
///
/// Thread safety: safe from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn janus_answer_free(answer: *mut janus_answer) -> janus_status {
    guard(|| reclaim::<OwnedAnswer>(answer).map(drop))
}

/// Generates `options->count` images of `prompt` (UTF-8) with classifier-free guidance.
/// `options` may be NULL for the defaults (one image, guidance 5, temperature 1, seed 0). The
/// progress callback in `options`, if any, is called after every token step and can cancel
/// (`JANUS_ERR_CANCELLED`). A seed reproduces its images on the same backend and dtype, and
/// image 0 of a call with `count` 2 is the image of `count` 1. On success `*out_images` holds
/// the images, to free with `janus_image_list_free`; on failure it is NULL.
///
/// Errors: `JANUS_ERR_INVALID_INPUT` for an empty prompt or bad options.
///
/// Thread safety: safe to call on one model from several threads at once; the callback runs on
/// the calling thread.
///
/// # Safety
/// `prompt` is NULL or NUL-terminated; `options` is NULL or a valid options struct whose
/// `progress` is NULL or a valid function; `out_images` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn janus_generate(
    model: *const janus_model,
    prompt: *const c_char,
    options: *const janus_generate_options,
    out_images: *mut *mut janus_image_list,
) -> janus_status {
    guard(|| {
        // SAFETY: the caller's pointers are NULL or valid.
        let out = unsafe { set_out(out_images, "out_images")? };
        let janus = lookup_model(model)?;
        // SAFETY: as above.
        let prompt = unsafe { str_arg(prompt, "prompt")? };
        // SAFETY: as above.
        let c_options = unsafe { read(options)? };
        let options = ImageGenOptions::from(&c_options);
        let (callback, user_data) = (c_options.progress, c_options.user_data);
        let images = janus.generate_with_progress(prompt, &options, &mut |step, total| {
            match callback {
                // SAFETY: the caller's callback and user data.
                Some(f) => unsafe { f(step, total, user_data) },
                None => true,
            }
        })?;
        *out = publish(OwnedImageList::new(images));
        Ok(())
    })
}

/// The VQ token grid of an RGB8 image: its short side resized to the model's image size
/// (bicubic), centre-cropped to a square, encoded and quantised. On success `*out_tokens` is
/// the grid (`janus_model_grid`'s shape), to free with `janus_tokens_free`; on failure NULL.
///
/// Errors: `JANUS_ERR_INVALID_INPUT` for an empty image or a stride shorter than a row.
///
/// Thread safety: safe to call on one model from several threads at once.
///
/// # Safety
/// `image` is NULL or a valid image whose buffer holds what it describes; `out_tokens` is NULL
/// or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn janus_encode_image(
    model: *const janus_model,
    image: *const janus_image,
    out_tokens: *mut *mut janus_tokens,
) -> janus_status {
    guard(|| {
        // SAFETY: the caller's pointers are NULL or valid.
        let out = unsafe { set_out(out_tokens, "out_tokens")? };
        let janus = lookup_model(model)?;
        // SAFETY: as above.
        let image = unsafe { rgb_from_c(image, "image")? };
        *out = publish(OwnedTokens::new(janus.encode_image(&image)?));
        Ok(())
    })
}

/// Decodes an image-token grid (the shape `janus_model_grid` gives) to an RGB8 image. On
/// success `*out_image` is the image, to free with `janus_image_free`; on failure NULL.
///
/// Errors: `JANUS_ERR_INVALID_INPUT` for a grid of another shape or an id outside the codebook.
///
/// Thread safety: safe to call on one model from several threads at once.
///
/// # Safety
/// `tokens` is NULL or a grid whose `ids` holds `rows · cols` ids; `out_image` is NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn janus_decode_image(
    model: *const janus_model,
    tokens: *const janus_tokens,
    out_image: *mut *mut janus_image,
) -> janus_status {
    guard(|| {
        // SAFETY: the caller's pointers are NULL or valid.
        let out = unsafe { set_out(out_image, "out_image")? };
        let janus = lookup_model(model)?;
        // SAFETY: as above.
        let tokens = unsafe { tokens_from_c(tokens)? };
        *out = publish(OwnedImage::new(janus.decode_image(&tokens)?));
        Ok(())
    })
}
