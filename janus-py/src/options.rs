//! Call options from Python keyword arguments, with the command line's defaults.

use std::hash::{BuildHasher, Hasher};

use janus_core::ComputeDType;
use janus_core::generate::image::ImageGenOptions;
use janus_core::generate::sampling::Sampling;
use janus_core::generate::text::TextGenOptions;

/// A fresh random seed (from the operating system's hash keys) when none is given.
pub(crate) fn seed_or_random(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    })
}

/// Token selection: temperature 0 takes the argmax.
pub(crate) fn sampling(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> Sampling {
    Sampling {
        temperature,
        top_k,
        top_p,
    }
}

/// Options of an understanding or chat call.
pub(crate) struct TextArgs {
    pub(crate) max_new_tokens: usize,
    pub(crate) temperature: f32,
    pub(crate) top_p: Option<f32>,
    pub(crate) top_k: Option<usize>,
    pub(crate) repetition_penalty: f32,
    pub(crate) seed: Option<u64>,
}

impl TextArgs {
    /// The core's options (validated by the core).
    pub(crate) fn options(&self) -> TextGenOptions {
        TextGenOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: sampling(self.temperature, self.top_k, self.top_p),
            repetition_penalty: self.repetition_penalty,
            seed: seed_or_random(self.seed),
            ..TextGenOptions::default()
        }
    }
}

/// Options of a generation call (validated by the core).
pub(crate) fn image_options(
    count: usize,
    cfg_weight: f32,
    sampling: Sampling,
    seed: Option<u64>,
) -> ImageGenOptions {
    ImageGenOptions {
        count,
        cfg_weight,
        sampling,
        seed: seed_or_random(seed),
    }
}

/// `auto`, `f32`, `f16` or `bf16`.
pub(crate) fn parse_dtype(name: &str) -> Option<ComputeDType> {
    match name.to_ascii_lowercase().as_str() {
        "auto" => Some(ComputeDType::Auto),
        "f32" | "float32" => Some(ComputeDType::F32),
        "f16" | "float16" | "half" => Some(ComputeDType::F16),
        "bf16" | "bfloat16" => Some(ComputeDType::BF16),
        _ => None,
    }
}
