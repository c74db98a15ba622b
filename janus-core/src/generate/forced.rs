//! Step-by-step logits under greedy decoding or teacher forcing: how one model's choices compare
//! with another's (a weight storage against f32) on the same token sequence.
//!
//! Run a reference model greedily, then feed its tokens to another model: at every step both
//! saw the same prefix, so their logits compare directly (cosine, top-1 agreement) and the first
//! step whose top-1 differs is where greedy decoding of the two would part.

use burn::tensor::Tensor;

use super::image::{cfg_rows, embed_image_tokens};
use crate::error::{Error, Result};
use crate::model::JanusModel;

/// The tokens fed, and each step's logits (guided logits for images).
#[derive(Debug, Clone, Default)]
pub struct Stepped {
    /// The token chosen (or forced) at each step.
    pub tokens: Vec<u32>,
    /// The logits of each step, before its token was chosen.
    pub logits: Vec<Vec<f32>>,
}

fn host(t: Tensor<3>) -> Result<Vec<f32>> {
    super::read_back(t, "reading logits")?
        .convert::<f32>()
        .try_into_vec()
        .map_err(|e| Error::InvalidInput(format!("reading logits: {e:?}")))
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The token of `step`: `forced[step]`, else the most likely.
fn choose(forced: Option<&[u32]>, step: usize, logits: &[f32]) -> Result<u32> {
    match forced {
        Some(f) => f.get(step).copied().ok_or_else(|| {
            Error::InvalidInput(format!("{} forced tokens for step {step}", f.len()))
        }),
        None => Ok(argmax(logits)),
    }
}

/// `steps` text tokens after prompt embeddings `[1, t, hidden]` (end-of-sequence tokens do not
/// stop it).
pub fn text_logits(
    model: &JanusModel,
    prompt: Tensor<3>,
    steps: usize,
    forced: Option<&[u32]>,
) -> Result<Stepped> {
    let llm = &model.llm;
    let t = prompt.dims()[1];
    let mut cache = llm.new_cache(t + steps);
    let hidden = llm.forward(prompt, &mut cache)?;
    let mut last = hidden.narrow(1, t - 1, 1);
    let mut out = Stepped::default();
    for step in 0..steps {
        let logits = host(llm.logits(last.clone()))?;
        let tok = choose(forced, step, &logits)?;
        out.tokens.push(tok);
        out.logits.push(logits);
        if step + 1 < steps {
            last = llm.forward(llm.embed(&[vec![tok]])?, &mut cache)?;
        }
    }
    Ok(out)
}

/// `steps` image tokens of one generation prompt with classifier-free guidance weight
/// `cfg_weight` (`pad` fills the unconditional row): each step's guided logits.
pub fn image_logits(
    model: &JanusModel,
    prompt: &[u32],
    pad: u32,
    cfg_weight: f32,
    steps: usize,
    forced: Option<&[u32]>,
) -> Result<Stepped> {
    let llm = &model.llm;
    if prompt.len() < 2 {
        return Err(Error::InvalidInput(
            "a generation prompt is too short".into(),
        ));
    }
    let (rows, pads) = cfg_rows(&[prompt.to_vec()], pad);
    let t = rows[0].len();
    let mut cache = llm.new_cache(t + steps);
    cache.set_left_padding(pads);
    let hidden = llm.forward(llm.embed(&rows)?, &mut cache)?;
    let device = hidden.device();
    let mut last = hidden.narrow(1, t - 1, 1);
    let mut out = Stepped::default();
    for step in 0..steps {
        let logits = host(model.heads.gen_head.forward(last.clone()))?;
        let v = logits.len() / 2;
        let guided: Vec<f32> = logits[..v]
            .iter()
            .zip(&logits[v..])
            .map(|(&c, &u)| u + cfg_weight * (c - u))
            .collect();
        let tok = choose(forced, step, &guided)?;
        out.tokens.push(tok);
        out.logits.push(guided);
        if step + 1 < steps {
            let ids = vec![i64::from(tok); 2];
            last = llm.forward(embed_image_tokens(model, ids, &device), &mut cache)?;
        }
    }
    Ok(out)
}

/// How a model's step logits compare with a reference's on the same tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    /// Mean over steps of the cosine between the two logit vectors.
    pub mean_cosine: f64,
    /// Smallest cosine of a step.
    pub min_cosine: f64,
    /// Steps whose reference top-2 margin exceeds the threshold (near-ties are not counted).
    pub counted: usize,
    /// Of those, the steps where both top-1 tokens agree.
    pub agree: usize,
    /// First step (0-based) whose top-1 tokens differ, if any: where greedy decoding parts.
    pub first_divergence: Option<usize>,
}

/// Compares `other` with `reference`, step by step; top-1 agreement counts the steps whose
/// reference top-2 margin exceeds `margin`.
pub fn agreement(reference: &Stepped, other: &Stepped, margin: f32) -> Agreement {
    let mut cos = Vec::new();
    let (mut counted, mut agree, mut first) = (0, 0, None);
    for (step, (a, b)) in reference.logits.iter().zip(&other.logits).enumerate() {
        let dot: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        cos.push(dot / (na * nb));
        let (ta, tb) = (argmax(a), argmax(b));
        if ta != tb && first.is_none() {
            first = Some(step);
        }
        let top = a[ta as usize];
        let second = a
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != ta as usize)
            .fold(f32::NEG_INFINITY, |m, (_, v)| m.max(*v));
        if top - second > margin {
            counted += 1;
            if ta == tb {
                agree += 1;
            }
        }
    }
    Agreement {
        mean_cosine: cos.iter().sum::<f64>() / cos.len().max(1) as f64,
        min_cosine: cos.iter().copied().fold(f64::INFINITY, f64::min),
        counted,
        agree,
        first_divergence: first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_counts_clear_steps_and_finds_the_first_divergence() {
        let reference = Stepped {
            tokens: vec![0, 1, 0],
            logits: vec![vec![2.0, 1.0], vec![1.0, 1.005], vec![3.0, 0.0]],
        };
        let other = Stepped {
            tokens: vec![0, 0, 1],
            logits: vec![vec![2.0, 1.0], vec![1.01, 1.0], vec![0.0, 3.0]],
        };
        let a = agreement(&reference, &other, 1e-2);
        // Step 1 is a near-tie in the reference: not counted, but greedy parts there.
        assert_eq!((a.counted, a.agree, a.first_divergence), (2, 1, Some(1)));
        assert!((a.min_cosine - 0.0).abs() < 1e-12);
        let same = agreement(&reference, &reference, 1e-2);
        assert_eq!(same.first_divergence, None);
        assert!((same.mean_cosine - 1.0).abs() < 1e-12);
    }
}
