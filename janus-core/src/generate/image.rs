//! Text-to-image: the classifier-free-guidance loop over image tokens, then VQ decoding.
//!
//! Each image has a conditional row (the prompt) and an unconditional row (the prompt with every
//! token between BOS and the final `<begin_of_image>` replaced by the pad id); the logits used are
//! `u + w·(c − u)`. The prompt is run once and its cache shared by all images of the call.

use burn::tensor::module::embedding;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::model::JanusModel;

use super::device::{DevicePicker, draw_numbers};
use super::sampling::{Sampling, check_finite, sample, stream};

/// Options of one text-to-image call.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageGenOptions {
    /// Images to generate from the prompt.
    pub count: usize,
    /// Classifier-free guidance weight `w` (5 in the reference).
    pub cfg_weight: f32,
    /// Token selection (temperature 1, no top-k/top-p in the reference; 0 = argmax).
    pub sampling: Sampling,
    /// Seed of the random streams (image `i` draws from stream `i`).
    pub seed: u64,
}

impl Default for ImageGenOptions {
    fn default() -> Self {
        ImageGenOptions {
            count: 1,
            cfg_weight: 5.0,
            sampling: Sampling {
                temperature: 1.0,
                top_k: None,
                top_p: None,
            },
            seed: 0,
        }
    }
}

impl ImageGenOptions {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.count == 0 {
            return Err(Error::InvalidInput("count must be at least 1".into()));
        }
        if !self.cfg_weight.is_finite() {
            return Err(Error::InvalidInput(format!(
                "cfg weight must be a finite number, got {}",
                self.cfg_weight
            )));
        }
        self.sampling.validate()
    }
}

/// The unconditional row of a generation prompt: BOS and the last token kept, the rest padding.
pub fn unconditional_ids(ids: &[u32], pad: u32) -> Vec<u32> {
    let n = ids.len();
    ids.iter()
        .enumerate()
        .map(|(i, &t)| if i == 0 || i + 1 == n { t } else { pad })
        .collect()
}

/// Samples `opts.count` token grids for a prompt already tokenised (`ids`, ending with
/// `<begin_of_image>`). `progress(step, total)` is called after each token step; returning
/// `false` cancels.
pub fn generate_tokens(
    model: &JanusModel,
    ids: &[u32],
    pad: u32,
    opts: &ImageGenOptions,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Vec<Vec<u32>>> {
    let mut all = generate_tokens_batch(model, &[ids.to_vec()], pad, opts, progress)?;
    Ok(all.remove(0))
}

/// [`generate_tokens`] for several prompts at once: `opts.count` grids per prompt. Prompts of
/// different lengths are left-padded and their padding masked, and image `i` of every prompt
/// samples from stream `i` of the seed, so each prompt gets the images it gets alone.
pub fn generate_tokens_batch(
    model: &JanusModel,
    prompts: &[Vec<u32>],
    pad: u32,
    opts: &ImageGenOptions,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Vec<Vec<Vec<u32>>>> {
    opts.validate()?;
    let llm = &model.llm;
    let heads = &model.heads;
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    check_prompts(model, &lens)?;
    let k = prompts.len();
    let p = opts.count;
    let n = model.config.vq.num_tokens();
    let t = lens.iter().copied().max().unwrap_or(0);
    reserve_generation(model, k.saturating_mul(p), t + n)?;
    let (rows, pads) = cfg_rows(prompts, pad);
    // One prefill for all of them, then shared by every image of a prompt.
    let mut cache = llm.new_cache(t + n);
    cache.set_left_padding(pads);
    let hidden = llm.forward(llm.embed(&rows)?, &mut cache)?;
    // Row order from here: image i of prompt j, conditional (j·p + i), then unconditional.
    let images = k * p;
    let order: Vec<usize> = (0..2 * images)
        .map(|r| {
            let (half, r) = (r / images, r % images);
            half * k + r / p
        })
        .collect();
    cache.select_rows(&order);
    let device = hidden.device();
    let pick = Tensor::<1, Int>::from_data(
        TensorData::new(
            order.iter().map(|&r| r as i64).collect::<Vec<_>>(),
            [2 * images],
        ),
        &device,
    );
    let mut last = hidden.narrow(1, t - 1, 1).select(0, pick);

    let mut rngs: Vec<_> = (0..images)
        .map(|r| stream(opts.seed, (r % p) as u64))
        .collect();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::with_capacity(n); images];
    let w = opts.cfg_weight;
    let on_device = DevicePicker::for_device(&device);
    for step in 0..n {
        let logits = heads.gen_head.forward(last);
        let v = logits.dims()[2];
        let mut next = Vec::with_capacity(2 * images);
        if let Some(picker) = &on_device {
            // Guidance in f32 (as the references keep it) and the picks, on the device.
            let rows = logits.reshape([2 * images, v]).cast(DType::F32);
            let c = rows.clone().narrow(0, 0, images);
            let u = rows.narrow(0, images, images);
            let mixed = u.clone() + (c - u) * f64::from(w);
            let rules = draw_numbers(&opts.sampling, &mut rngs);
            for (i, tok) in picker
                .pick(mixed, &rules, step + 1)?
                .into_iter()
                .enumerate()
            {
                let tok = tok?;
                tokens[i].push(tok);
                next.push(i64::from(tok));
            }
        } else {
            let host: Vec<f32> = super::read_back(logits, "reading logits")?
                .convert::<f32>()
                .try_into_vec()
                .map_err(|e| Error::InvalidInput(format!("reading logits: {e:?}")))?;
            for (i, rng) in rngs.iter_mut().enumerate() {
                let c = &host[i * v..(i + 1) * v];
                let u = &host[(images + i) * v..(images + i + 1) * v];
                let tok = pick_image_token(c, u, w, &opts.sampling, rng, step + 1)?;
                tokens[i].push(tok);
                next.push(i64::from(tok));
            }
        }
        if !progress(step + 1, n) {
            return Err(Error::Cancelled);
        }
        if step + 1 == n {
            break;
        }
        // The same token goes to an image's conditional and unconditional rows.
        next.extend_from_within(..);
        last = llm.forward(embed_image_tokens(model, next, &device), &mut cache)?;
    }
    let mut grouped = Vec::with_capacity(k);
    let mut it = tokens.into_iter();
    for _ in 0..k {
        grouped.push(it.by_ref().take(p).collect());
    }
    Ok(grouped)
}

/// The next image token (the grid's `step`-th, from 1) from an image's conditional and
/// unconditional logits: guided logits `u + w·(c − u)`, then the sampling rule with the image's
/// random stream. A NaN or infinite guided logit is [`Error::NonFiniteLogits`].
pub(crate) fn pick_image_token(
    c: &[f32],
    u: &[f32],
    w: f32,
    sampling: &Sampling,
    rng: &mut rand_chacha::ChaCha8Rng,
    step: usize,
) -> Result<u32> {
    let mixed: Vec<f32> = c.iter().zip(u).map(|(&c, &u)| u + w * (c - u)).collect();
    check_finite(&mixed, step)?;
    Ok(sample(&mixed, sampling, rng) as u32)
}

/// Makes sure the memory of `images` images' guidance rows (two each) can be had before
/// generation begins (see [`reserve_rows`](super::reserve_rows)).
pub(crate) fn reserve_generation(
    model: &JanusModel,
    images: usize,
    positions: usize,
) -> Result<()> {
    super::reserve_rows(
        model,
        images.saturating_mul(2),
        positions,
        model.config.vq.codebook_size,
        &format!("generating {images} image(s)"),
    )
}

/// Checks generation prompts (`lens`: their token counts) against the context: each at least
/// two tokens, the longest plus the grid's tokens within the position table.
pub(crate) fn check_prompts(model: &JanusModel, lens: &[usize]) -> Result<()> {
    if lens.is_empty() {
        return Err(Error::InvalidInput("no prompt".into()));
    }
    if lens.iter().any(|&l| l < 2) {
        return Err(Error::InvalidInput(
            "a generation prompt is too short".into(),
        ));
    }
    let t = lens.iter().copied().max().unwrap_or(0);
    let n = model.config.vq.num_tokens();
    let max_len = model.llm.config().max_position_embeddings;
    if t + n > max_len {
        return Err(Error::InvalidInput(format!(
            "the prompt ({t} tokens) and {n} image tokens exceed the context of {max_len}"
        )));
    }
    Ok(())
}

/// The conditional rows of every prompt, then their unconditional rows, left-padded with `pad`
/// to the longest, and each row's padding.
pub(crate) fn cfg_rows(prompts: &[Vec<u32>], pad: u32) -> (Vec<Vec<u32>>, Vec<usize>) {
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut rows = Vec::with_capacity(2 * prompts.len());
    let mut pads = Vec::with_capacity(2 * prompts.len());
    for uncond in [false, true] {
        for ids in prompts {
            let row = if uncond {
                unconditional_ids(ids, pad)
            } else {
                ids.clone()
            };
            let fill = t - row.len();
            pads.push(fill);
            rows.push(
                std::iter::repeat_n(pad, fill)
                    .chain(row)
                    .collect::<Vec<u32>>(),
            );
        }
    }
    (rows, pads)
}

/// The language-model inputs `[rows, 1, hidden]` for one image token per row: generation
/// embedding, then the generation aligner.
pub(crate) fn embed_image_tokens(
    model: &JanusModel,
    ids: Vec<i64>,
    device: &burn::tensor::Device,
) -> Tensor<3> {
    let n = ids.len();
    let idx = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, 1]), device);
    model
        .heads
        .gen_aligner
        .forward_step(embedding(model.heads.gen_embed.val(), idx))
}

/// Decodes token grids to RGB8 images as the reference does:
/// `clip((x + 1) / 2 · 255, 0, 255)`, truncated to `u8`.
pub fn decode_tokens(model: &JanusModel, grids: &[Vec<u32>]) -> Result<Vec<image::RgbImage>> {
    let vq = &model.vq;
    let n = vq.config.num_tokens();
    let codes = vq.config.codebook_size;
    for grid in grids {
        if grid.len() != n {
            return Err(Error::InvalidInput(format!(
                "a token grid of {} ids, expected {n} ({}×{})",
                grid.len(),
                vq.config.grid,
                vq.config.grid
            )));
        }
        if let Some(bad) = grid.iter().find(|&&t| t as usize >= codes) {
            return Err(Error::InvalidInput(format!(
                "image token {bad} is outside the codebook of {codes}"
            )));
        }
    }
    let mut out = Vec::with_capacity(grids.len());
    // On a GPU one image at a time: a full-resolution activation of two (151 MB) is past the
    // 128 MiB a storage buffer may hold on some adapters (lavapipe's, wgpu's default limit).
    let chunk = if crate::device::is_cpu(&vq.codebook.device()) {
        VQ_DECODE_CHUNK
    } else {
        1
    };
    for chunk in grids.chunks(chunk) {
        out.extend(decode_chunk(model, chunk)?);
    }
    Ok(out)
}

/// Images the VQ decoder runs at once. Its full-resolution activations take ~75 MB per image
/// and channel stage at 384² (f32, 128 channels): decoding the 64 images a call may make in
/// one batch would need many GB at once; in fours it stays near what one image needs, at no
/// cost in speed (each image's convolutions are the same work either way).
const VQ_DECODE_CHUNK: usize = 4;

fn decode_chunk(model: &JanusModel, grids: &[Vec<u32>]) -> Result<Vec<image::RgbImage>> {
    let vq = &model.vq;
    let n = vq.config.num_tokens();
    let device = vq.codebook.device();
    let flat: Vec<i64> = grids.iter().flatten().map(|&t| i64::from(t)).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [grids.len(), n]), &device);
    let images = vq.decode(ids);
    let [b, c, h, w] = images.dims();
    let data: Vec<f32> = super::read_back(images, "decoding images")?
        .convert::<f32>()
        .try_into_vec()
        .map_err(|e| Error::InvalidInput(format!("reading pixels: {e:?}")))?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let plane = &data[i * c * h * w..(i + 1) * c * h * w];
        let mut img = image::RgbImage::new(w as u32, h as u32);
        for (idx, px) in img.pixels_mut().enumerate() {
            for ch in 0..3 {
                let x = plane[ch * h * w + idx];
                px.0[ch] = ((x + 1.0) / 2.0 * 255.0).clamp(0.0, 255.0) as u8;
            }
        }
        out.push(img);
    }
    Ok(out)
}

/// Token grids of images already at the VQ input size (`[-1, 1]` pixels, `[batch, 3, s, s]`
/// as a flat CHW buffer per image), with the official quantizer: the nearest code by distance
/// between l2-normalised latents and codebook.
pub fn encode_pixels(model: &JanusModel, images: &[Vec<f32>]) -> Result<Vec<Vec<u32>>> {
    let vq = &model.vq;
    let s = vq.config.image_size();
    let c = vq.config.in_channels;
    if images.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(bad) = images.iter().find(|img| img.len() != c * s * s) {
        return Err(Error::InvalidInput(format!(
            "an image of {} values, expected {c}×{s}×{s}",
            bad.len()
        )));
    }
    let device = vq.codebook.device();
    if images.len() > 1 && !crate::device::is_cpu(&device) {
        // One at a time on a GPU, as the decoder (buffer size limits).
        return images
            .iter()
            .map(|img| encode_pixels(model, std::slice::from_ref(img)).map(|mut g| g.remove(0)))
            .collect();
    }
    let flat: Vec<f32> = images.iter().flatten().copied().collect();
    let x = Tensor::<4>::from_data(
        TensorData::new(flat, [images.len(), c, s, s]),
        (&device, vq.codebook.dtype()),
    );
    let latent = vq.encode_latent(x);
    let per_image = latent.dims()[2] * latent.dims()[3];
    let ids: Vec<i64> = super::read_back(vq.code_distances(latent).argmin(1), "encoding images")?
        .convert::<i64>()
        .try_into_vec()
        .map_err(|e| Error::InvalidInput(format!("reading codes: {e:?}")))?;
    Ok(ids
        .chunks(per_image)
        .map(|c| c.iter().map(|&i| i as u32).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unconditional_row_keeps_bos_and_boi() {
        assert_eq!(unconditional_ids(&[1, 5, 6, 7, 9], 0), [1, 0, 0, 0, 9]);
        assert_eq!(unconditional_ids(&[1, 9], 0), [1, 9]);
    }

    #[test]
    fn options_are_checked() {
        let mut o = ImageGenOptions::default();
        assert!(o.validate().is_ok());
        o.count = 0;
        assert!(o.validate().is_err());
        o.count = 1;
        o.cfg_weight = f32::NAN;
        assert!(o.validate().is_err());
    }
}
