//! Step-wise batched decoding: answers being written and images being drawn advance one token
//! at a time together, each with its own key/value cache, joining and leaving between steps.
//!
//! Decoding is bound by reading the weights, so one step over many sequences costs little more
//! than a step over one. A [`Sequence`] is started by [`Janus::begin_chat`] /
//! [`Janus::begin_understand`] (the images encoded and the prompt run on the sequence's own
//! rows) or [`Janus::begin_generate`]; [`Janus::step`] then advances any set of sequences by one
//! token, running the language model once over all their rows. A sequence that finishes leaves;
//! one started later joins at the next step; dropping one cancels it.
//!
//! Batching does not change any result: each sequence's prompt runs alone, and a step's products
//! are row-invariant ([`Linear::forward_step`](crate::nn::Linear::forward_step)), so every
//! sequence gets bit-identically what it gets alone (on the CPU backend), greedy or sampled from
//! its seed. [`Janus::understand`] and [`Janus::generate`] with the same options give the same
//! answers and images.

use std::time::{Duration, Instant};

use burn::tensor::{Int, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::generate::device::{DevicePicker, draw_numbers};
use crate::generate::image::{
    ImageGenOptions, cfg_rows, check_prompts, embed_image_tokens, pick_image_token,
    reserve_generation,
};
use crate::generate::sampling::stream;
use crate::generate::text::{TextGenOptions, check_context, host_values, pick_token};
use crate::nn::kv_cache::KvCache;
use crate::pipeline::{Answer, GeneratedImage, Janus, Turn};

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model ended the answer (its EOS token), or the image grid is complete.
    Done,
    /// The answer reached one of the stop strings (cut before it).
    StopString,
    /// The answer reached its `max_new_tokens`.
    Length,
    /// The model produced a NaN or infinite logit at this step (counted from 1): nothing was
    /// sampled from it, and finishing the sequence gives [`Error::NonFiniteLogits`].
    NonFiniteLogits {
        /// The token that could not be chosen.
        step: usize,
    },
}

/// One answer or one set of images in progress (see the [module docs](self)).
#[derive(Debug)]
pub struct Sequence {
    cache: KvCache,
    rows: usize,
    /// The hidden states the next token is read from, `[rows, 1, hidden]`.
    last: Tensor<3>,
    state: State,
    finish: Option<Finish>,
    started: Instant,
}

#[derive(Debug)]
enum State {
    Text(Box<TextState>),
    Image(Box<ImageState>),
}

#[derive(Debug)]
struct TextState {
    options: TextGenOptions,
    stop: Vec<String>,
    eos: u32,
    rng: ChaCha8Rng,
    ids: Vec<u32>,
    prompt_tokens: usize,
    /// The answer so far (cut before a stop string once one is reached).
    text: String,
    /// Bytes of `text` already handed out by [`Sequence::take_text`].
    taken: usize,
    vision_time: Duration,
    /// When the prompt's decoding began (after the images).
    decode_start: Instant,
    prefill_time: Option<Duration>,
}

#[derive(Debug)]
struct ImageState {
    options: ImageGenOptions,
    rngs: Vec<ChaCha8Rng>,
    tokens: Vec<Vec<u32>>,
    total: usize,
}

impl Sequence {
    /// Rows of the language model's batch this sequence takes (one for an answer, two per image:
    /// the guidance pair).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Time since it was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether it has finished (then [`Janus::step`] passes it by).
    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Why it finished, once it has.
    pub fn finish(&self) -> Option<Finish> {
        self.finish
    }

    /// Whether it writes text (else it draws images).
    pub fn is_text(&self) -> bool {
        matches!(self.state, State::Text(_))
    }

    /// Tokens produced so far (image tokens per image).
    pub fn tokens(&self) -> usize {
        match &self.state {
            State::Text(t) => t.ids.len(),
            State::Image(i) => i.tokens[0].len(),
        }
    }

    /// Token steps done and to do: `(done, total)` (for an answer, the total is its
    /// `max_new_tokens`).
    pub fn progress(&self) -> (usize, usize) {
        match &self.state {
            State::Text(t) => (t.ids.len(), t.options.max_new_tokens),
            State::Image(i) => (i.tokens[0].len(), i.total),
        }
    }

    /// An answer's prompt length after image-token expansion (0 for images, whose prompt
    /// `usage` does not report).
    pub fn prompt_tokens(&self) -> usize {
        match &self.state {
            State::Text(t) => t.prompt_tokens,
            State::Image(_) => 0,
        }
    }

    /// The answer's text not yet taken: pieces of the final text, in order, so that the pieces
    /// of all calls concatenate to [`Answer::text`]. Text that ends inside a multi-byte
    /// character or could be the start of a stop string is held back until it is settled.
    pub fn take_text(&mut self) -> String {
        let finished = self.finish.is_some();
        let State::Text(t) = &mut self.state else {
            return String::new();
        };
        let mut end = t.text.len();
        if !finished {
            end -= held_back(&t.text, &t.stop);
        }
        if end <= t.taken {
            return String::new();
        }
        let piece = t.text[t.taken..end].to_string();
        t.taken = end;
        piece
    }
}

/// Bytes at the end of `text` that may still change: a trailing U+FFFD (a character that later
/// tokens may complete), or the longest end that is the start of a stop string.
fn held_back(text: &str, stop: &[String]) -> usize {
    if text.ends_with('\u{fffd}') {
        let kept = text.trim_end_matches('\u{fffd}').len();
        return text.len() - kept;
    }
    let mut held = 0;
    for s in stop {
        for (i, _) in s.char_indices().skip(1) {
            if i > held && text.ends_with(&s[..i]) {
                held = i;
            }
        }
    }
    held
}

/// The first stop string in `text`: where it starts.
fn first_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

impl Janus {
    /// Starts the assistant's next turn of a conversation (see [`chat`](Self::chat)) as a
    /// [`Sequence`]: the images are encoded and the prompt is run now. The answer stops at the
    /// EOS token, at `options.max_new_tokens`, or when its text contains one of `stop` (the
    /// text is then cut before it).
    pub fn begin_chat(
        &self,
        turns: &[Turn],
        options: &TextGenOptions,
        stop: &[String],
    ) -> Result<Sequence> {
        options.validate()?;
        let ids = self.conversation_ids(turns)?;
        let images: Vec<&image::RgbImage> = turns.iter().flat_map(|t| t.images.iter()).collect();
        self.begin_text(&ids, &images, options, stop)
    }

    /// Starts an answer to a question about images (see [`understand`](Self::understand)) as a
    /// [`Sequence`]; `stop` as in [`begin_chat`](Self::begin_chat).
    pub fn begin_understand(
        &self,
        images: &[image::RgbImage],
        question: &str,
        options: &TextGenOptions,
        stop: &[String],
    ) -> Result<Sequence> {
        options.validate()?;
        let ids = self.understanding_ids(question, images.len())?;
        let images: Vec<&image::RgbImage> = images.iter().collect();
        self.begin_text(&ids, &images, options, stop)
    }

    /// Encodes the images, places their features at the prompt's image tokens and runs the
    /// prompt on the sequence's own cache.
    fn begin_text(
        &self,
        ids: &[u32],
        images: &[&image::RgbImage],
        options: &TextGenOptions,
        stop: &[String],
    ) -> Result<Sequence> {
        let started = Instant::now();
        check_context(self.model(), ids.len(), options)?;
        let (embeds, vision_time) = self.prompt_embeds(ids, images)?;
        let decode_start = Instant::now();
        let llm = &self.model().llm;
        let t = embeds.dims()[1];
        crate::generate::reserve_rows(
            self.model(),
            1,
            t + options.max_new_tokens,
            llm.config().vocab_size,
            "an answer",
        )?;
        let mut cache = llm.new_cache(t + options.max_new_tokens);
        let hidden = llm.forward(embeds, &mut cache)?;
        Ok(Sequence {
            cache,
            rows: 1,
            last: hidden.narrow(1, t - 1, 1),
            state: State::Text(Box::new(TextState {
                options: options.clone(),
                stop: stop.to_vec(),
                eos: self.tokenizer().special().eos,
                rng: stream(options.seed, 0),
                ids: Vec::new(),
                prompt_tokens: ids.len(),
                text: String::new(),
                taken: 0,
                vision_time,
                decode_start,
                prefill_time: None,
            })),
            finish: None,
            started,
        })
    }

    /// Starts `options.count` images of `prompt` (see [`generate`](Self::generate)) as a
    /// [`Sequence`]: the prompt and its unconditional twin are run now, once for all images.
    pub fn begin_generate(&self, prompt: &str, options: &ImageGenOptions) -> Result<Sequence> {
        options.validate()?;
        self.limits().check_count(1, options.count)?;
        let ids = self.generation_ids(prompt)?;
        let model = self.model();
        check_prompts(model, &[ids.len()])?;
        let llm = &model.llm;
        let t = ids.len();
        let n = model.config.vq.num_tokens();
        let p = options.count;
        reserve_generation(model, p, t + n)?;
        let (rows, pads) = cfg_rows(std::slice::from_ref(&ids), self.tokenizer().special().pad);
        let mut cache = llm.new_cache(t + n);
        cache.set_left_padding(pads);
        let hidden = llm.forward(llm.embed(&rows)?, &mut cache)?;
        // Rows from here: image i conditional (i), then unconditional (p + i).
        let order: Vec<usize> = (0..2 * p).map(|r| r / p).collect();
        cache.select_rows(&order);
        let pick = Tensor::<1, Int>::from_data(
            TensorData::new(order.iter().map(|&r| r as i64).collect::<Vec<_>>(), [2 * p]),
            &hidden.device(),
        );
        Ok(Sequence {
            cache,
            rows: 2 * p,
            last: hidden.narrow(1, t - 1, 1).select(0, pick),
            state: State::Image(Box::new(ImageState {
                options: options.clone(),
                rngs: (0..p).map(|i| stream(options.seed, i as u64)).collect(),
                tokens: vec![Vec::with_capacity(n); p],
                total: n,
            })),
            finish: None,
            started: Instant::now(),
        })
    }

    /// Advances every unfinished sequence of `seqs` by one token, with one run of the language
    /// model over all their rows. Sequences that finish at this step are marked so and not run.
    pub fn step(&self, seqs: &mut [&mut Sequence]) -> Result<()> {
        let model = self.model();
        let llm = &model.llm;
        let live: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].finish.is_none())
            .collect();
        let Some(&first) = live.first() else {
            return Ok(());
        };
        let device = seqs[first].last.device();
        // The heads over every row of their kind at once (row-invariant products).
        let (text, image): (Vec<usize>, Vec<usize>) =
            live.iter().partition(|&&i| seqs[i].is_text());
        let lasts = |seqs: &[&mut Sequence], idx: &[usize]| -> Tensor<3> {
            Tensor::cat(idx.iter().map(|&i| seqs[i].last.clone()).collect(), 0)
        };
        let rows_of = |seqs: &[&mut Sequence], idx: &[usize]| {
            idx.iter().map(|&i| seqs[i].rows).sum::<usize>()
        };
        // On a GPU the picks are made there (three numbers a row come back).
        let picker = DevicePicker::for_device(&device);
        let mut text_picks = Vec::new();
        let (text_logits, text_width) = if text.is_empty() {
            (Vec::new(), 0)
        } else if let Some(p) = &picker {
            let logits = llm.logits(lasts(seqs, &text));
            let [n, _, v] = logits.dims();
            let mut rules = Vec::with_capacity(n);
            for &i in &text {
                if let State::Text(t) = &mut seqs[i].state {
                    rules.extend(
                        draw_numbers(&t.options.sampling, std::slice::from_mut(&mut t.rng))
                            .into_iter()
                            .map(|r| r.with_penalty(t.options.repetition_penalty, &t.ids)),
                    );
                }
            }
            text_picks = p.pick(logits.reshape([n, v]), &rules, 0)?;
            (Vec::new(), 0)
        } else {
            let v = host_values(llm.logits(lasts(seqs, &text)))?;
            let w = v.len() / rows_of(seqs, &text);
            (v, w)
        };
        let mut image_picks = Vec::new();
        let (image_logits, image_width) = if image.is_empty() {
            (Vec::new(), 0)
        } else if let Some(p) = &picker {
            let logits = model.heads.gen_head.forward(lasts(seqs, &image));
            let [n, _, v] = logits.dims();
            let rows = logits.reshape([n, v]).cast(burn::tensor::DType::F32);
            let (mut mixed, mut rules) = (Vec::new(), Vec::new());
            let mut at = 0;
            for &i in &image {
                let seq_rows = seqs[i].rows;
                if let State::Image(im) = &mut seqs[i].state {
                    // Guidance in f32: conditional rows first, then as many unconditional.
                    let half = seq_rows / 2;
                    let c = rows.clone().narrow(0, at, half);
                    let u = rows.clone().narrow(0, at + half, half);
                    mixed.push(u.clone() + (c - u) * f64::from(im.options.cfg_weight));
                    rules.extend(draw_numbers(&im.options.sampling, &mut im.rngs));
                }
                at += seq_rows;
            }
            image_picks = p.pick(Tensor::cat(mixed, 0), &rules, 0)?;
            (Vec::new(), 0)
        } else {
            let v = host_values(model.heads.gen_head.forward(lasts(seqs, &image)))?;
            let w = v.len() / rows_of(seqs, &image);
            (v, w)
        };
        let (mut text_at, mut image_at) = (0, 0);
        let mut inputs = Vec::with_capacity(live.len());
        let mut running = vec![false; seqs.len()];
        for &i in &live {
            let seq = &mut *seqs[i];
            let rows = seq.rows;
            let input = match &mut seq.state {
                State::Text(t) => {
                    let step = t.ids.len() + 1;
                    let picked = if picker.is_some() {
                        match &text_picks[text_at] {
                            Ok(tok) => Ok(*tok),
                            Err(_) => Err(Error::NonFiniteLogits { step }),
                        }
                    } else {
                        let mut row =
                            text_logits[text_at * text_width..(text_at + 1) * text_width].to_vec();
                        pick_token(&mut row, &t.options, &t.ids, &mut t.rng, step)
                    };
                    text_at += 1;
                    let tok = match picked {
                        Ok(tok) => tok,
                        Err(Error::NonFiniteLogits { step }) => {
                            // This sequence fails alone; the others of the step go on.
                            seq.finish = Some(Finish::NonFiniteLogits { step });
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    t.ids.push(tok);
                    t.prefill_time
                        .get_or_insert_with(|| t.decode_start.elapsed());
                    let decoded = self.tokenizer().decode(&t.ids, true)?;
                    let cut = first_stop(&decoded, &t.stop);
                    t.text = match cut {
                        Some(at) => decoded[..at].to_string(),
                        None => decoded,
                    };
                    seq.finish = if cut.is_some() {
                        Some(Finish::StopString)
                    } else if tok == t.eos {
                        Some(Finish::Done)
                    } else if t.ids.len() == t.options.max_new_tokens {
                        Some(Finish::Length)
                    } else {
                        None
                    };
                    match seq.finish {
                        Some(_) => None,
                        None => Some(llm.embed(&[vec![tok]])?),
                    }
                }
                State::Image(im) => {
                    let p = im.tokens.len();
                    let mut next = Vec::with_capacity(2 * p);
                    let step = im.tokens[0].len() + 1;
                    let mut picked = Ok(());
                    if picker.is_some() {
                        // This sequence's images are rows `image_at / 2 ..` of the picks.
                        let first = image_at / 2;
                        image_at += rows;
                        for tok in &image_picks[first..first + p] {
                            match tok {
                                Ok(tok) => next.push(i64::from(*tok)),
                                Err(_) => {
                                    picked = Err(Error::NonFiniteLogits { step });
                                    break;
                                }
                            }
                        }
                    } else {
                        let block =
                            &image_logits[image_at * image_width..(image_at + rows) * image_width];
                        image_at += rows;
                        for (k, rng) in im.rngs.iter_mut().enumerate() {
                            let c = &block[k * image_width..(k + 1) * image_width];
                            let u = &block[(p + k) * image_width..(p + k + 1) * image_width];
                            let o = &im.options;
                            match pick_image_token(c, u, o.cfg_weight, &o.sampling, rng, step) {
                                Ok(tok) => next.push(i64::from(tok)),
                                Err(e) => {
                                    picked = Err(e);
                                    break;
                                }
                            }
                        }
                    }
                    match picked {
                        Ok(()) => {}
                        Err(Error::NonFiniteLogits { step }) => {
                            seq.finish = Some(Finish::NonFiniteLogits { step });
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                    for (k, &tok) in next.iter().enumerate() {
                        im.tokens[k].push(tok as u32);
                    }
                    if im.tokens[0].len() == im.total {
                        seq.finish = Some(Finish::Done);
                        None
                    } else {
                        // The same token goes to an image's conditional and unconditional rows.
                        next.extend_from_within(..);
                        Some(embed_image_tokens(model, next, &device))
                    }
                }
            };
            if let Some(x) = input {
                inputs.push(x);
                running[i] = true;
            }
        }
        if inputs.is_empty() {
            return Ok(());
        }
        let mut groups: Vec<(usize, &mut KvCache)> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| running[*i])
            .map(|(_, s)| (s.rows, &mut s.cache))
            .collect();
        let hidden = llm.forward_groups(Tensor::cat(inputs, 0), &mut groups)?;
        let mut at = 0;
        for (i, seq) in seqs.iter_mut().enumerate() {
            if running[i] {
                seq.last = hidden.clone().narrow(0, at, seq.rows);
                at += seq.rows;
            }
        }
        Ok(())
    }

    /// The answer of a finished text sequence (as [`understand`](Self::understand) returns it).
    pub fn finish_answer(&self, seq: Sequence) -> Result<Answer> {
        let State::Text(t) = seq.state else {
            return Err(Error::InvalidInput(
                "an image sequence has no answer".into(),
            ));
        };
        if seq.finish.is_none() {
            return Err(Error::InvalidInput("the answer is not finished".into()));
        }
        if let Some(Finish::NonFiniteLogits { step }) = seq.finish {
            return Err(Error::NonFiniteLogits { step });
        }
        let prefill = t.prefill_time.unwrap_or_default();
        Ok(Answer {
            text: t.text,
            token_ids: t.ids,
            prompt_tokens: t.prompt_tokens,
            vision_time: t.vision_time,
            prefill_time: prefill,
            decode_time: t.decode_start.elapsed().saturating_sub(prefill),
        })
    }

    /// The images of a finished image sequence, decoded by the VQ decoder (as
    /// [`generate`](Self::generate) returns them).
    pub fn finish_images(&self, seq: Sequence) -> Result<Vec<GeneratedImage>> {
        let State::Image(im) = seq.state else {
            return Err(Error::InvalidInput("a text sequence has no images".into()));
        };
        if seq.finish.is_none() {
            return Err(Error::InvalidInput("the images are not finished".into()));
        }
        if let Some(Finish::NonFiniteLogits { step }) = seq.finish {
            return Err(Error::NonFiniteLogits { step });
        }
        self.decode_grids(im.tokens, im.options.seed)
    }

    /// Answers several conversations at once (see [`chat`](Self::chat)): their prompts run one
    /// by one, then they decode together, each leaving the batch when it finishes. Every answer
    /// equals what [`chat`](Self::chat) gives it alone with the same options.
    pub fn chat_batch(
        &self,
        conversations: &[&[Turn]],
        options: &TextGenOptions,
    ) -> Result<Vec<Answer>> {
        let seqs = conversations
            .iter()
            .map(|turns| self.begin_chat(turns, options, &[]))
            .collect::<Result<Vec<_>>>()?;
        self.run_answers(seqs)
    }

    /// Answers several questions about images at once (see [`understand`](Self::understand) and
    /// [`chat_batch`](Self::chat_batch)): each request is its images and question.
    pub fn understand_batch(
        &self,
        requests: &[(&[image::RgbImage], &str)],
        options: &TextGenOptions,
    ) -> Result<Vec<Answer>> {
        let seqs = requests
            .iter()
            .map(|(images, question)| self.begin_understand(images, question, options, &[]))
            .collect::<Result<Vec<_>>>()?;
        self.run_answers(seqs)
    }

    /// Answers several questions about images at once, each request with its own options (its
    /// own seed, say): the prompts run one by one, then the answers decode together. Every answer
    /// equals what [`understand`](Self::understand) gives its request alone. `keep_going` is
    /// asked after every decoding step; `false` cancels with [`Error::Cancelled`].
    pub fn understand_each(
        &self,
        requests: &[(&[image::RgbImage], &str, TextGenOptions)],
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Result<Vec<Answer>> {
        let mut seqs = Vec::with_capacity(requests.len());
        for (images, question, options) in requests {
            seqs.push(self.begin_understand(images, question, options, &[])?);
            if !keep_going() {
                return Err(Error::Cancelled);
            }
        }
        self.run_answers_while(seqs, keep_going)
    }

    fn run_answers(&self, seqs: Vec<Sequence>) -> Result<Vec<Answer>> {
        self.run_answers_while(seqs, &mut || true)
    }

    fn run_answers_while(
        &self,
        mut seqs: Vec<Sequence>,
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Result<Vec<Answer>> {
        while seqs.iter().any(|s| !s.is_finished()) {
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            self.step(&mut refs)?;
            if !keep_going() {
                return Err(Error::Cancelled);
            }
        }
        seqs.into_iter().map(|s| self.finish_answer(s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_may_still_change_is_held_back() {
        let stop = vec!["</s>".to_string(), "END".to_string()];
        assert_eq!(held_back("hello", &stop), 0);
        assert_eq!(held_back("hello <", &stop), 1);
        assert_eq!(held_back("hello </", &stop), 2);
        assert_eq!(held_back("hello EN", &stop), 2);
        assert_eq!(held_back("caf\u{fffd}", &stop), 3);
        assert_eq!(held_back("x", &[]), 0);
    }

    #[test]
    fn the_first_stop_string_cuts() {
        let stop = vec!["b".to_string(), "cd".to_string(), String::new()];
        assert_eq!(first_stop("aacdb", &stop), Some(2));
        assert_eq!(first_stop("aaa", &stop), None);
    }
}
