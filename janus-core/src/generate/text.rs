//! Understanding: image features scattered into the prompt's embeddings, then text decoding
//! (greedy by default) with streaming and stop conditions.

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::model::JanusModel;

use rand_chacha::ChaCha8Rng;

use super::device::{DevicePicker, draw_numbers};
use super::sampling::{Sampling, check_finite, sample, stream};

/// Options of one understanding call.
#[derive(Debug, Clone, PartialEq)]
pub struct TextGenOptions {
    /// Most tokens to generate (512 in the reference).
    pub max_new_tokens: usize,
    /// Token selection (greedy by default).
    pub sampling: Sampling,
    /// Repetition penalty as transformers applies it (1 = none).
    pub repetition_penalty: f32,
    /// Seed of the random stream (used when sampling).
    pub seed: u64,
    /// Longest prompt + answer allowed (the models were trained on 4096 tokens).
    pub max_context: usize,
}

impl Default for TextGenOptions {
    fn default() -> Self {
        TextGenOptions {
            max_new_tokens: 512,
            sampling: Sampling::GREEDY,
            repetition_penalty: 1.0,
            seed: 0,
            max_context: 4096,
        }
    }
}

impl TextGenOptions {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(Error::InvalidInput(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(Error::InvalidInput(format!(
                "repetition penalty must be a positive number, got {}",
                self.repetition_penalty
            )));
        }
        self.sampling.validate()
    }
}

/// Replaces each `placeholder` id by `begin` + `count` × `placeholder` + `end`.
pub fn expand_image_tokens(
    ids: &[u32],
    placeholder: u32,
    begin: u32,
    end: u32,
    count: usize,
) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len() + count);
    for &id in ids {
        if id == placeholder {
            out.push(begin);
            out.extend(std::iter::repeat_n(placeholder, count));
            out.push(end);
        } else {
            out.push(id);
        }
    }
    out
}

/// Embeddings `[1, len, D]` of `ids` whose runs of `placeholder` ids are replaced, in order, by
/// the rows of `features` (`[images, count, D]`, one image per run).
pub fn embed_with_images(
    model: &JanusModel,
    ids: &[u32],
    placeholder: u32,
    features: Option<Tensor<3>>,
) -> Result<Tensor<3>> {
    let text = model.llm.embed(&[ids.to_vec()])?;
    let Some(features) = features else {
        if ids.contains(&placeholder) {
            return Err(Error::InvalidInput(
                "image placeholders without images".into(),
            ));
        }
        return Ok(text);
    };
    let [n_images, count, _] = features.dims();
    let mut pieces = Vec::new();
    let mut image = 0;
    let mut i = 0;
    while i < ids.len() {
        let start = i;
        let is_image = ids[i] == placeholder;
        while i < ids.len() && (ids[i] == placeholder) == is_image {
            i += 1;
        }
        if is_image {
            if i - start != count || image >= n_images {
                return Err(Error::InvalidInput(format!(
                    "image token runs do not match the {n_images} images of {count} features"
                )));
            }
            pieces.push(features.clone().narrow(0, image, 1));
            image += 1;
        } else {
            pieces.push(text.clone().narrow(1, start, i - start));
        }
    }
    if image != n_images {
        return Err(Error::InvalidInput(format!(
            "{n_images} images but {image} places for them in the prompt"
        )));
    }
    Ok(Tensor::cat(pieces, 1))
}

/// What a decoding run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The new ids, with the EOS id last when it stopped on it.
    pub ids: Vec<u32>,
    /// Time to run the prompt and pick the first token.
    pub prefill: std::time::Duration,
    /// Time for the tokens after the first.
    pub decode: std::time::Duration,
}

/// Decodes from prompt embeddings: each new token is passed to `on_token` (return `false` to
/// cancel); stops after `eos` or `max_new_tokens`.
pub fn decode(
    model: &JanusModel,
    prompt: Tensor<3>,
    eos: u32,
    opts: &TextGenOptions,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Decoded> {
    let started = std::time::Instant::now();
    let mut first: Option<std::time::Duration> = None;
    opts.validate()?;
    let llm = &model.llm;
    let t = prompt.dims()[1];
    check_context(model, t, opts)?;
    let mut cache = llm.new_cache(t + opts.max_new_tokens);
    let mut hidden = llm.forward(prompt, &mut cache)?;
    let mut rng = stream(opts.seed, 0);
    let mut out = Vec::new();
    let on_device = DevicePicker::for_device(&hidden.device());
    loop {
        let last = hidden.clone().narrow(1, hidden.dims()[1] - 1, 1);
        let logits = llm.logits(last);
        let step = out.len() + 1;
        let tok = match &on_device {
            Some(picker) => {
                let width = logits.dims()[2];
                let row = logits.reshape([1, width]);
                let rules: Vec<_> = draw_numbers(&opts.sampling, std::slice::from_mut(&mut rng))
                    .into_iter()
                    .map(|r| r.with_penalty(opts.repetition_penalty, &out))
                    .collect();
                picker.pick(row, &rules, step)?.remove(0)?
            }
            None => pick_token(&mut host_values(logits)?, opts, &out, &mut rng, step)?,
        };
        out.push(tok);
        let prefill = *first.get_or_insert_with(|| started.elapsed());
        if !on_token(tok) {
            return Err(Error::Cancelled);
        }
        if tok == eos || out.len() == opts.max_new_tokens {
            return Ok(Decoded {
                ids: out,
                prefill,
                decode: started.elapsed().saturating_sub(prefill),
            });
        }
        hidden = llm.forward(llm.embed(&[vec![tok]])?, &mut cache)?;
    }
}

/// Checks that a prompt of `t` tokens and up to `opts.max_new_tokens` new ones fit the context.
pub(crate) fn check_context(model: &JanusModel, t: usize, opts: &TextGenOptions) -> Result<()> {
    let limit = opts
        .max_context
        .min(model.llm.config().max_position_embeddings);
    if t.checked_add(opts.max_new_tokens)
        .is_none_or(|total| total > limit)
    {
        return Err(Error::InvalidInput(format!(
            "the prompt ({t} tokens) and up to {} new tokens exceed the context of {limit}",
            opts.max_new_tokens
        )));
    }
    Ok(())
}

/// A tensor's values as f32 in host memory.
pub(crate) fn host_values<const D: usize>(x: Tensor<D>) -> Result<Vec<f32>> {
    super::read_back(x, "reading logits")?
        .convert::<f32>()
        .try_into_vec()
        .map_err(|e| Error::InvalidInput(format!("reading logits: {e:?}")))
}

/// The next token (the answer's `step`-th, from 1) from one row of text logits: the repetition
/// penalty over the ids produced so far (`out`), then the sampling rule with the sequence's
/// random stream. A NaN or infinite logit is [`Error::NonFiniteLogits`].
pub(crate) fn pick_token(
    logits: &mut [f32],
    opts: &TextGenOptions,
    out: &[u32],
    rng: &mut ChaCha8Rng,
    step: usize,
) -> Result<u32> {
    if opts.repetition_penalty != 1.0 {
        let p = opts.repetition_penalty;
        let mut seen = out.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &id in &seen {
            let l = &mut logits[id as usize];
            *l = if *l < 0.0 { *l * p } else { *l / p };
        }
    }
    check_finite(logits, step)?;
    Ok(sample(logits, &opts.sampling, rng) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_expand_in_place() {
        assert_eq!(
            expand_image_tokens(&[1, 9, 2, 9], 9, 7, 8, 2),
            [1, 7, 9, 9, 8, 2, 7, 9, 9, 8]
        );
    }

    #[test]
    fn options_are_checked() {
        let mut o = TextGenOptions::default();
        assert!(o.validate().is_ok());
        o.max_new_tokens = 0;
        assert!(o.validate().is_err());
        o.max_new_tokens = 1;
        o.repetition_penalty = 0.0;
        assert!(o.validate().is_err());
    }

    #[test]
    fn a_non_finite_row_is_an_error_naming_the_step() {
        let o = TextGenOptions::default();
        let mut rng = stream(0, 0);
        assert_eq!(
            pick_token(&mut [0.0, 2.0], &o, &[], &mut rng, 1).unwrap(),
            1
        );
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let e = pick_token(&mut [0.0, bad], &o, &[], &mut rng, 7).unwrap_err();
            assert_eq!(e.to_string(), "non-finite logits at step 7");
        }
        // A penalty that pushes a finite logit past f32's range is caught too.
        let o = TextGenOptions {
            repetition_penalty: 1e-38,
            ..TextGenOptions::default()
        };
        assert!(pick_token(&mut [0.0, 1e3], &o, &[1], &mut rng, 2).is_err());
    }
}
