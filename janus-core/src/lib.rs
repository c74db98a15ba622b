//! # janus-core
//!
//! DeepSeek's Janus and Janus-Pro unified multimodal models (image understanding and text-to-image
//! generation) in Rust, written once against Burn's tensor API so that one implementation runs on
//! any device Burn supports (the pure-Rust CPU backend by default, wgpu and CUDA behind features).
//!
//! ```no_run
//! use janus_core::{ComputeDType, JanusModel, JanusTokenizer};
//! # fn main() -> janus_core::Result<()> {
//! let dir = std::path::Path::new("Janus-Pro-1B");
//! let device = janus_core::default_device();
//! let model = JanusModel::load(dir, &device, ComputeDType::F32)?;
//! let tokenizer = JanusTokenizer::from_dir(dir)?;
//! let ids = tokenizer.encode("Hello", true)?;
//! let mut cache = model.llm.new_cache(ids.len() + 16);
//! let hidden = model.llm.forward(model.llm.embed(&[ids])?, &mut cache)?;
//! let logits = model.llm.logits(hidden);
//! # let _ = logits;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod files;
#[doc(hidden)]
pub mod fuzz;
pub mod generate;
#[cfg(feature = "hub")]
pub mod hub;
pub mod image_file;
pub mod limits;
pub mod load;
pub mod model;
pub mod nn;
pub mod pipeline;
pub mod processor;
pub mod tokenizer;
pub mod train;

pub use burn::tensor::Device;
pub use config::{JanusConfig, Layout};
pub use device::{Backend, default_device};
pub use error::{Error, Result, WeightMismatch};
pub use limits::Limits;
pub use load::{Checkpoint, ComputeDType, WeightStorage};
pub use model::JanusModel;
pub use nn::weight::WeightFormat;
pub use tokenizer::{JanusTokenizer, SpecialTokens};

/// The README's Rust examples, compiled as doc tests so that they stay correct.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExamples;
