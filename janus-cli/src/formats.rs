//! The JSON the commands print and read, and the names of the images `generate` writes.

use std::path::{Path, PathBuf};

use janus_core::pipeline::ImageTokens;
use serde::Serialize;

use crate::error::{CliError, Result};

/// `understand --json`.
#[derive(Debug, Serialize)]
pub struct UnderstandJson<'a> {
    /// The answer.
    pub text: &'a str,
    /// The new token ids, with the EOS id last when generation stopped on it.
    pub token_ids: &'a [u32],
    /// Prompt length after image-token expansion.
    pub prompt_tokens: usize,
    /// How the weights were held in memory (`--weights` resolved).
    pub weights: &'static str,
    /// The compute dtype (`--dtype` resolved).
    pub dtype: &'static str,
    /// Where the time went.
    pub timings: UnderstandTimings,
}

/// Where the time of `understand` went, in seconds.
#[derive(Debug, Serialize)]
pub struct UnderstandTimings {
    /// Loading the model.
    pub load_s: f64,
    /// Encoding the images (inside the prefill).
    pub vision_s: f64,
    /// The prompt through the language model up to the first new token (after `vision_s`: the
    /// time to first token is the sum).
    pub prefill_s: f64,
    /// The tokens after the first.
    pub decode_s: f64,
    /// Tokens after the first per second of `decode_s` (null with fewer than two tokens).
    pub decode_tokens_per_s: Option<f64>,
}

/// Where the time of `generate` went, in seconds.
#[derive(Debug, Serialize)]
pub struct GenerateTimings {
    /// Loading the model.
    pub load_s: f64,
    /// Sampling every image's tokens (prompt, then one step per token for all images at once).
    pub tokens_s: f64,
    /// Decoding the token grids into pixels (VQ decoder).
    pub vq_decode_s: f64,
    /// Both, from the prompt to the last pixel (files not included).
    pub total_s: f64,
}

/// `generate --json`.
#[derive(Debug, Serialize)]
pub struct GenerateJson {
    /// The files written, in order.
    pub images: Vec<String>,
    /// Each image's tokens, row-major.
    pub tokens: Vec<Vec<u32>>,
    /// `[rows, cols]` of every image's grid.
    pub grid: [usize; 2],
    /// The seed used.
    pub seed: u64,
    /// How the weights were held in memory (`--weights` resolved).
    pub weights: &'static str,
    /// The compute dtype (`--dtype` resolved).
    pub dtype: &'static str,
    /// Where the time went.
    pub timings: GenerateTimings,
}

/// `loss --json`.
#[derive(Debug, Serialize)]
pub struct LossJson<'a> {
    /// One loss per sample, in file order.
    pub losses: &'a [f64],
    /// Their unweighted mean.
    pub mean: f64,
}

/// `encode-image --json`.
#[derive(Debug, Serialize)]
pub struct EncodeJson<'a> {
    /// The tokens, row-major.
    pub tokens: &'a [u32],
    /// `[rows, cols]`.
    pub grid: [usize; 2],
    /// How the weights were held in memory (`--weights` resolved).
    pub weights: &'static str,
    /// The compute dtype (`--dtype` resolved).
    pub dtype: &'static str,
}

/// Reads a token grid from the JSON of `encode-image --json` or `generate --json` (its first
/// image). The file is read only when it is a regular file within `limits.max_input_mb`.
pub fn read_tokens(path: &Path, limits: &janus_core::Limits) -> Result<ImageTokens> {
    let bytes = janus_core::files::read_bounded(path, limits.max_input_bytes(), "token file")?;
    ImageTokens::from_json(&bytes).map_err(|message| CliError::TokenFile {
        path: path.to_path_buf(),
        message,
    })
}

/// The files `generate` writes for `prompts` prompts of `count` images each: `out` itself for
/// one image, else `<stem>_<i>.<ext>` beside it with `i` counting over prompts, then images.
pub fn output_paths(out: &Path, prompts: usize, count: usize) -> Result<Vec<PathBuf>> {
    check_output(out)?;
    let n = prompts.saturating_mul(count);
    if n == 1 {
        return Ok(vec![out.to_path_buf()]);
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((0..n)
        .map(|i| out.with_file_name(format!("{stem}_{i}.{ext}")))
        .collect())
}

/// Fails early when `out` cannot be a file in an existing folder.
pub fn check_output(out: &Path) -> Result<()> {
    if out.file_name().is_none() || out.as_os_str().to_string_lossy().ends_with('/') {
        return Err(CliError::Invalid(format!(
            "--out {}: expected a file name such as image.png",
            out.display()
        )));
    }
    if out.is_dir() {
        return Err(CliError::Invalid(format!(
            "--out {} is a folder; expected a file name such as image.png",
            out.display()
        )));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(CliError::Write {
            path: out.to_path_buf(),
            message: format!("the folder {} does not exist", parent.display()),
        });
    }
    janus_core::image_file::format_for(out)?;
    Ok(())
}

/// Writes an image in the format its extension names, whole or not at all (an existing file is
/// replaced only by a complete one).
pub fn save_image(image: &image::RgbImage, path: &Path) -> Result<()> {
    Ok(janus_core::image_file::save(image, path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_count_over_prompts_then_images() {
        let dir = std::env::temp_dir();
        let out = dir.join("cat.png");
        assert_eq!(output_paths(&out, 1, 1).unwrap(), vec![out.clone()]);
        let names: Vec<String> = output_paths(&out, 2, 2)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["cat_0.png", "cat_1.png", "cat_2.png", "cat_3.png"]);
        assert!(output_paths(&dir.join("missing-folder-x/cat.png"), 1, 1).is_err());
        assert!(output_paths(&dir, 1, 1).is_err());
    }
}
