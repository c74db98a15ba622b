//! The training objective: each sample's mean cross-entropy over the tokens it teaches.
//!
//! - **generate**: the generation prompt's ids `P` as [`Janus::generation_ids`] builds them
//!   (ending with `<begin_of_image>`), then the image's `N` VQ codes `c` as
//!   [`Janus::encode_image`] computes them. The input is the embeddings of `P` followed by the
//!   generation embeddings of `c[0..N−1]` through the generation aligner; the generation head reads
//!   the final hidden states at positions `|P|−1 … |P|+N−2`, so `<begin_of_image>` predicts `c[0]`.
//!   The loss is the mean over all `N` codes.
//! - **understand**: the understanding prompt as [`Janus::understand`] builds it (image tokens
//!   expanded, image features in place), then the answer encoded alone (no special tokens), then
//!   the end-of-sequence id; the loss covers the answer's tokens and the end of sequence, each
//!   predicted by the language-model head from the position before it.
//! - **understand, multi-turn**: the conversation's prompt as [`Janus::chat`] renders it for
//!   answering its last assistant turn, with every earlier assistant turn's text replaced by
//!   that answer encoded alone followed by the end-of-sequence id, and the last answer (and its
//!   end of sequence) after the final assistant cue ([`conversation_ids`]). The loss covers every
//!   answer's tokens and end of sequence, one mean over the sample.
//! - **text**: the text's ids with BOS as the tokenizer adds it, no end of sequence; the loss covers
//!   every id after the first.
//!
//! The sums run in f64 over the logits of the compute dtype.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use super::data::{Example, TurnSample};
use crate::error::{Error, Result};
use crate::generate::image::embed_image_tokens;
use crate::generate::text::expand_image_tokens;
use crate::pipeline::Janus;
use crate::processor::image::open_image;
use crate::processor::prompt::{Role, TurnText};
use crate::tokenizer::strings;

/// Each sample's loss, in order, and their unweighted mean.
#[derive(Debug, Clone, PartialEq)]
pub struct Losses {
    /// One loss per sample.
    pub losses: Vec<f64>,
    /// Their mean.
    pub mean: f64,
}

/// Every sample's loss ([`example_loss`]), calling `progress(done, total)` after each; returning
/// `false` cancels with [`Error::Cancelled`].
///
/// # Errors
/// The first sample's error, naming the sample.
pub fn losses(
    janus: &Janus,
    examples: &[Example],
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Losses> {
    let mut losses = Vec::with_capacity(examples.len());
    for (i, example) in examples.iter().enumerate() {
        let loss = example_loss(janus, example).map_err(|e| match e {
            Error::InvalidInput(m) => Error::InvalidInput(format!("sample {}: {m}", i + 1)),
            other => other,
        })?;
        losses.push(loss);
        if !progress(i + 1, examples.len()) {
            return Err(Error::Cancelled);
        }
    }
    let mean = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
    Ok(Losses { losses, mean })
}

/// One sample's loss (see the module's definitions).
///
/// # Errors
/// [`Error::Io`] or [`Error::InvalidInput`] for an image that cannot be read, a text with nothing
/// to predict, an answer that holds an image token; the model's errors.
pub fn example_loss(janus: &Janus, example: &Example) -> Result<f64> {
    score(janus, example)?.loss()
}

/// The generation loss of an image given by its VQ codes (row-major, as
/// [`Janus::encode_image`] gives them) after `prompt`.
///
/// # Errors
/// As [`generation_scored`]'s.
pub fn generation_loss(janus: &Janus, prompt: &str, codes: &[u32]) -> Result<f64> {
    generation_scored(janus, prompt, codes)?.loss()
}

/// A sample's logits at the positions its loss covers, and the targets there: what both the
/// reported loss ([`Scored::loss`], in f64) and the training loss ([`Scored::loss_tensor`],
/// differentiable under autodiff) reduce.
#[derive(Debug, Clone)]
pub struct Scored {
    /// `[1, targets, classes]`: the head's logits at each position that predicts a target.
    pub logits: Tensor<3>,
    /// The ids to predict, one per position.
    pub targets: Vec<u32>,
}

impl Scored {
    /// The mean cross-entropy of the targets, summed in f64 on the host.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a target outside the head's classes, or logits that are not
    /// one row per target.
    pub fn loss(&self) -> Result<f64> {
        let [_, n, classes] = self.logits.dims();
        self.check(classes)?;
        let values: Vec<f32> = self
            .logits
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .map_err(|e| Error::InvalidInput(format!("reading logits: {e:?}")))?;
        let mut total = 0.0f64;
        for (row, &target) in values.chunks_exact(classes).zip(&self.targets) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            total += max + sum.ln() - row[target as usize] as f64;
        }
        Ok(total / n as f64)
    }

    /// The mean cross-entropy of the targets as a one-value tensor on the logits' device, in their
    /// dtype: `−mean(log_softmax(logits)[target])`, differentiable under autodiff.
    ///
    /// # Errors
    /// As [`loss`](Self::loss)'s.
    pub fn loss_tensor(&self) -> Result<Tensor<1>> {
        let [_, n, classes] = self.logits.dims();
        self.check(classes)?;
        let targets = self.targets.iter().map(|&t| i64::from(t)).collect();
        let index =
            Tensor::<3, Int>::from_data(TensorData::new(targets, [1, n, 1]), &self.logits.device());
        let picked = log_softmax(self.logits.clone(), 2).gather(2, index);
        Ok(picked.neg().mean())
    }

    fn check(&self, classes: usize) -> Result<()> {
        let [rows, n, _] = self.logits.dims();
        if rows != 1 || n != self.targets.len() || n == 0 {
            return Err(Error::InvalidInput(format!(
                "logits [{rows}, {n}, {classes}] for {} targets",
                self.targets.len()
            )));
        }
        match self.targets.iter().find(|&&t| t as usize >= classes) {
            Some(t) => Err(Error::InvalidInput(format!(
                "target id {t} outside the head's {classes} outputs"
            ))),
            None => Ok(()),
        }
    }
}

/// A sample's [`Scored`] logits and targets (see the module's definitions).
///
/// # Errors
/// As [`example_loss`]'s.
pub fn score(janus: &Janus, example: &Example) -> Result<Scored> {
    match example {
        Example::Generate { prompt, image } => {
            let codes = janus.encode_image(&open_image(image)?)?.ids;
            generation_scored(janus, prompt, &codes)
        }
        Example::Understand {
            images,
            question,
            answer,
        } => {
            let images = images
                .iter()
                .map(|p| open_image(p))
                .collect::<Result<Vec<_>>>()?;
            understanding_scored(janus, &images, question, answer)
        }
        Example::Conversation { turns } => {
            let mut images = Vec::new();
            for t in turns {
                for p in &t.images {
                    images.push(open_image(p)?);
                }
            }
            let (ids, positions) = conversation_ids(janus, turns)?;
            let targets = positions.iter().map(|&p| ids[p]).collect();
            let refs: Vec<&image::RgbImage> = images.iter().collect();
            let (x, _) = janus.prompt_embeds(&ids, &refs)?;
            language_scored_at(janus, x, &positions, targets)
        }
        Example::Text { text } => text_scored(janus, text),
    }
}

/// The text that stands for an earlier assistant turn while the prompt is rendered (a private-use
/// character no tokenizer or template gives meaning to).
const ANSWER_MARK: &str = "\u{E000}";

/// A multi-turn sample's ids (image tokens expanded) and the positions of the tokens its loss
/// covers.
///
/// The conversation without its last turn (the last answer) is rendered as [`Janus::chat`]
/// renders a prompt, each earlier assistant turn's text replaced by a mark. The text is cut at the
/// marks: each piece before a mark is encoded without its trailing whitespace (the first with the
/// tokenizer's BOS, the others without special tokens; a piece after a mark loses the template's
/// end-of-sentence text, which the answer's own end-of-sequence id stands for); each answer is
/// encoded alone, without special tokens, and followed by the end-of-sequence id; the last piece
/// (the assistant cue) is encoded as rendered, then the last answer. With one assistant turn this
/// is the single-turn sample's ids.
///
/// # Errors
/// [`Error::InvalidInput`] for turns that are not a conversation ending with an assistant turn,
/// an answer holding an image placeholder, or a template that does not render each mark once.
pub fn conversation_ids(janus: &Janus, turns: &[TurnSample]) -> Result<(Vec<u32>, Vec<usize>)> {
    let Some((last, before)) = turns.split_last() else {
        return Err(Error::InvalidInput("a conversation with no turns".into()));
    };
    if last.role != Role::Assistant {
        return Err(Error::InvalidInput(
            "a training conversation ends with the assistant's turn".into(),
        ));
    }
    let texts: Vec<TurnText<'_>> = before
        .iter()
        .map(|t| TurnText {
            role: t.role,
            content: if t.role == Role::Assistant {
                ANSWER_MARK
            } else {
                &t.content
            },
            images: t.images.len(),
        })
        .collect();
    let rendered = janus.prompt_format().conversation_prompt(&texts)?;
    let pieces: Vec<&str> = rendered.split(ANSWER_MARK).collect();
    let answers: Vec<&TurnSample> = turns.iter().filter(|t| t.role == Role::Assistant).collect();
    if pieces.len() != answers.len() {
        return Err(Error::InvalidInput(format!(
            "the chat template rendered {} of the conversation's {} earlier answers",
            pieces.len() - 1,
            answers.len() - 1
        )));
    }
    let tokenizer = janus.tokenizer();
    let sp = tokenizer.special();
    let eos_text = tokenizer
        .template_tokens()
        .into_iter()
        .find(|(k, _)| k == "eos_token")
        .map_or_else(|| strings::EOS.to_string(), |(_, v)| v);
    let patches = janus.config().vision.num_patches();
    let expand = |ids: &[u32]| {
        expand_image_tokens(
            ids,
            sp.image_placeholder,
            sp.begin_of_image,
            sp.end_of_image,
            patches,
        )
    };
    let mut ids = Vec::new();
    let mut positions = Vec::new();
    for (i, (piece, answer)) in pieces.iter().zip(&answers).enumerate() {
        let piece = if i > 0 {
            piece.strip_prefix(eos_text.as_str()).unwrap_or(piece)
        } else {
            piece
        };
        let piece = if i + 1 < pieces.len() {
            piece.trim_end()
        } else {
            piece
        };
        ids.extend(expand(&tokenizer.encode(piece, i == 0)?));
        let mut answer_ids = tokenizer.encode(&answer.content, false)?;
        if answer_ids.contains(&sp.image_placeholder) {
            return Err(Error::InvalidInput(
                "an answer holds an image placeholder token".into(),
            ));
        }
        answer_ids.push(sp.eos);
        positions.extend(ids.len()..ids.len() + answer_ids.len());
        ids.extend(answer_ids);
    }
    Ok((ids, positions))
}

/// The generation head's logits for an image given by its VQ codes after `prompt`.
///
/// # Errors
/// [`Error::InvalidInput`] when `codes` is not one id below the codebook's size for every
/// position of the VQ grid; the model's errors.
pub fn generation_scored(janus: &Janus, prompt: &str, codes: &[u32]) -> Result<Scored> {
    let model = janus.model();
    let vq = &model.config.vq;
    let (tokens, book) = (vq.num_tokens(), vq.codebook_size);
    if codes.len() != tokens {
        return Err(Error::InvalidInput(format!(
            "{} image codes, expected {tokens} ({}×{})",
            codes.len(),
            vq.grid,
            vq.grid
        )));
    }
    if let Some(&c) = codes.iter().find(|&&c| c as usize >= book) {
        return Err(Error::InvalidInput(format!(
            "image code {c} outside the codebook of {book}"
        )));
    }
    generation_scored_ids(janus, janus.generation_ids(prompt)?, codes)
}

/// [`generation_scored`] after prompt ids already built (the unconditional prompt of a sample
/// whose condition training drops). `codes` must be checked by the caller.
pub(crate) fn generation_scored_ids(janus: &Janus, ids: Vec<u32>, codes: &[u32]) -> Result<Scored> {
    let model = janus.model();
    let (p, n) = (ids.len(), codes.len());
    let device = janus.device().clone();
    let prompt_embeds = model.llm.embed(&[ids])?;
    let hidden_size = prompt_embeds.dims()[2];
    let inputs = codes[..n - 1].iter().map(|&c| i64::from(c)).collect();
    // `[n − 1, 1, hidden]`: one code a row, as a decoding step embeds it; here one sequence.
    let image_embeds = embed_image_tokens(model, inputs, &device).reshape([1, n - 1, hidden_size]);
    let x = Tensor::cat(vec![prompt_embeds, image_embeds], 1);
    let mut cache = model.llm.new_cache(p + n - 1);
    let hidden = model.llm.forward(x, &mut cache)?;
    let at = hidden.slice([0..1, p - 1..p + n - 1, 0..hidden_size]);
    Ok(Scored {
        logits: model.heads.gen_head.forward(at),
        targets: codes.to_vec(),
    })
}

/// The language-model head's logits for `answer` after the understanding prompt of `question`
/// about `images`.
fn understanding_scored(
    janus: &Janus,
    images: &[image::RgbImage],
    question: &str,
    answer: &str,
) -> Result<Scored> {
    let tokenizer = janus.tokenizer();
    let sp = tokenizer.special();
    let mut ids = janus.understanding_ids(question, images.len())?;
    let prompt = ids.len();
    let mut targets = tokenizer.encode(answer, false)?;
    if targets.contains(&sp.image_placeholder) {
        return Err(Error::InvalidInput(
            "the answer holds an image placeholder token".into(),
        ));
    }
    targets.push(sp.eos);
    ids.extend_from_slice(&targets);
    let refs: Vec<&image::RgbImage> = images.iter().collect();
    let (x, _) = janus.prompt_embeds(&ids, &refs)?;
    language_scored(janus, x, prompt - 1, targets)
}

/// The language-model head's logits for every token of `text` after the first.
fn text_scored(janus: &Janus, text: &str) -> Result<Scored> {
    let ids = janus.tokenizer().encode(text, true)?;
    if ids.len() < 2 {
        return Err(Error::InvalidInput(format!(
            "the text {text:?} has no token after the first to predict"
        )));
    }
    let x = janus.model().llm.embed(std::slice::from_ref(&ids))?;
    language_scored(janus, x, 0, ids[1..].to_vec())
}

/// The language-model head's logits for each of `targets`, the tokens at `positions` (each
/// above 0) of the sequence embedded as `x` (`[1, t, hidden]`), each read at the position before.
fn language_scored_at(
    janus: &Janus,
    x: Tensor<3>,
    positions: &[usize],
    targets: Vec<u32>,
) -> Result<Scored> {
    let llm = &janus.model().llm;
    let t = x.dims()[1];
    if positions.iter().any(|&p| p == 0 || p >= t) || positions.len() != targets.len() {
        return Err(Error::InvalidInput(
            "target positions outside the sequence".into(),
        ));
    }
    let device = x.device();
    let mut cache = llm.new_cache(t);
    let hidden = llm.forward(x, &mut cache)?;
    let before: Vec<i64> = positions.iter().map(|&p| p as i64 - 1).collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(before, [positions.len()]), &device);
    Ok(Scored {
        logits: llm.logits(hidden.select(1, index)),
        targets,
    })
}

/// The language-model head's logits for `targets` predicted at positions `first..` of the
/// sequence embedded as `x` (`[1, t, hidden]`).
///
/// # Errors
/// [`Error::InvalidInput`] when the targets run past the sequence; the model's errors.
pub fn language_scored(
    janus: &Janus,
    x: Tensor<3>,
    first: usize,
    targets: Vec<u32>,
) -> Result<Scored> {
    let llm = &janus.model().llm;
    let [_, t, hidden_size] = x.dims();
    if first + targets.len() > t {
        return Err(Error::InvalidInput(format!(
            "{} targets from position {first} of a sequence of {t}",
            targets.len()
        )));
    }
    let mut cache = llm.new_cache(t);
    let hidden = llm.forward(x, &mut cache)?;
    let at = hidden.slice([0..1, first..first + targets.len(), 0..hidden_size]);
    Ok(Scored {
        logits: llm.logits(at),
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_follows_its_definition() {
        let device = burn::tensor::Device::default();
        let logits = Tensor::<3>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 0.0, 0.0, 100.0], [1, 2, 3]),
            &device,
        );
        let lse0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let lse1 = 100.0 + (2.0 * (-100f64).exp() + 1.0).ln();
        let want = ((lse0 - 1.0) + (lse1 - 100.0)) / 2.0;
        let scored = Scored {
            logits: logits.clone(),
            targets: vec![0, 2],
        };
        let got = scored.loss().unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        let tensor: Vec<f32> = scored
            .loss_tensor()
            .unwrap()
            .into_data()
            .try_to_vec()
            .unwrap();
        assert!(
            (f64::from(tensor[0]) - want).abs() < 1e-6,
            "{tensor:?} vs {want}"
        );
        let outside = Scored {
            logits: logits.clone(),
            targets: vec![0, 3],
        };
        assert!(outside.loss().is_err() && outside.loss_tensor().is_err());
        let short = Scored {
            logits,
            targets: vec![0],
        };
        assert!(short.loss().is_err() && short.loss_tensor().is_err());
    }
}
