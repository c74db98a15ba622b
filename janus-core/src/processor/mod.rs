//! Turning user input into model input: prompts (chat formats, templates) and images.

pub mod image;
pub mod prompt;
