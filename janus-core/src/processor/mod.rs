//! Turning user input into model input: prompts (chat formats, templates) and images.

pub mod chat_template;
pub mod image;
pub mod prompt;
