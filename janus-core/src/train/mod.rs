//! Training data and the training objective.
//!
//! Janus is trained with cross-entropy on the tokens it must produce, and only those: the VQ
//! codes of the image for a generation sample, the answer (and its end-of-sequence token) for an
//! understanding sample, every token after the first for plain text. [`data`] reads samples from
//! JSONL; [`loss`] computes each sample's loss with the model as it runs for inference.

#[cfg(feature = "train")]
pub mod checkpoint;
pub mod data;
pub mod export;
#[cfg(feature = "train")]
pub mod job;
pub mod lora;
pub mod loss;
#[cfg(feature = "train")]
pub(crate) mod order;
pub mod params;
#[cfg(feature = "train")]
pub mod trainer;

pub use data::{Example, read_jsonl};
pub use loss::{
    Losses, Scored, example_loss, generation_loss, generation_scored, language_scored, losses,
    score,
};
