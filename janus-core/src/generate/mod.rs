//! Generation loops (outside the model code): sampling, and the image-token loop.

pub mod forced;
pub mod image;
pub mod sampling;
pub mod text;
