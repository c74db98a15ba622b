//! The model's own thread: it takes requests from a queue, starts each as a sequence of the
//! library's step-wise decoder ([`janus_core::engine`]) and advances all running sequences
//! together, one token a step. Requests that arrive while a batch runs join it at the next step;
//! a finished one leaves without stopping the others; one whose client went away is dropped.
//!
//! The batching rules (and the guarantee that batching changes no result) live in `janus-core`;
//! this loop only decides who is in the batch.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use janus_core::engine::{Finish, Sequence};
use janus_core::pipeline::Janus;
use tokio::sync::mpsc::UnboundedSender;

use crate::api::{ChatRequest, ImageRequest};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// What a request asks the model for.
#[derive(Debug)]
pub enum Work {
    /// An answer.
    Chat(ChatRequest),
    /// Images.
    Images(ImageRequest),
}

/// A request on its way to the model, with the channel its events go back on.
#[derive(Debug)]
pub struct Job {
    /// What to do.
    pub work: Work,
    /// Where its events go; when the receiver is gone, the request is cancelled.
    pub events: UnboundedSender<Event>,
}

impl Job {
    /// Places in the batch: an answer takes one, an image request one per image.
    fn weight(&self) -> usize {
        match &self.work {
            Work::Chat(_) => 1,
            Work::Images(r) => r.options.count,
        }
    }
}

/// What the model thread reports about a request.
#[derive(Debug)]
pub enum Event {
    /// It joined the batch (its prompt ran): the prompt's length after image expansion.
    Started {
        /// Prompt tokens.
        prompt_tokens: usize,
    },
    /// More of the answer.
    Text(String),
    /// Image-token steps done of all.
    Progress {
        /// Steps done.
        step: usize,
        /// Steps in all.
        total: usize,
    },
    /// The answer is complete.
    Answer {
        /// The whole text.
        text: String,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// New tokens, EOS included.
        completion_tokens: usize,
        /// Why it ended.
        finish: Finish,
    },
    /// The images are complete, as PNG files.
    Images(Vec<Vec<u8>>),
    /// The request failed.
    Failed(ApiError),
}

/// State shared between the HTTP side and the model thread.
#[derive(Debug)]
pub struct Shared {
    /// Counters.
    pub metrics: Metrics,
    /// Set once the model is loaded.
    pub ready: AtomicBool,
    /// Set to stop: queued and running requests fail with 503.
    pub shutdown: AtomicBool,
    /// Most sequences in one batch.
    pub max_batch: usize,
    /// Most requests waiting.
    pub max_queue: usize,
}

/// The HTTP side's end of the queue.
#[derive(Debug, Clone)]
pub struct Queue {
    tx: mpsc::Sender<Job>,
    /// State shared with the model thread.
    pub shared: Arc<Shared>,
}

impl Queue {
    /// Queues a job, or refuses it when the queue is full or the server is stopping.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        if self.shared.shutdown.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        let depth = &self.shared.metrics.queue_depth;
        if depth.fetch_add(1, Ordering::SeqCst) >= self.shared.max_queue {
            depth.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::queue_full(self.shared.max_queue));
        }
        self.tx.send(job).map_err(|_| {
            depth.fetch_sub(1, Ordering::SeqCst);
            ApiError::unavailable("the model is not running")
        })
    }
}

/// A queue and the receiving end the model thread runs on.
pub fn queue(shared: Arc<Shared>) -> (Queue, mpsc::Receiver<Job>) {
    let (tx, rx) = mpsc::channel();
    (Queue { tx, shared }, rx)
}

/// A running request.
struct Running {
    seq: Sequence,
    events: UnboundedSender<Event>,
    weight: usize,
}

/// How long the idle loop waits for a job before looking at the shutdown flag again.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// Runs the batch until the queue closes or the server shuts down.
pub fn run(janus: &Janus, rx: &mpsc::Receiver<Job>, shared: &Shared) {
    let metrics = &shared.metrics;
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            let stop = || Event::Failed(ApiError::unavailable("the server is shutting down"));
            for r in running.drain(..) {
                let _ = r.events.send(stop());
            }
            for job in waiting.drain(..).chain(rx.try_iter()) {
                let _ = job.events.send(stop());
            }
            metrics.queue_depth.store(0, Ordering::SeqCst);
            metrics.active.store(0, Ordering::SeqCst);
            return;
        }
        if running.is_empty() && waiting.is_empty() {
            match rx.recv_timeout(IDLE_POLL) {
                Ok(job) => waiting.push_back(job),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        waiting.extend(rx.try_iter());
        admit(janus, shared, &mut waiting, &mut running);
        metrics
            .active
            .store(running.iter().map(|r| r.weight).sum(), Ordering::Relaxed);
        if running.is_empty() {
            continue;
        }
        let before: Vec<usize> = running.iter().map(|r| r.seq.tokens()).collect();
        let stepped = catch_unwind(AssertUnwindSafe(|| {
            let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.seq).collect();
            janus.step(&mut seqs)
        }));
        let failure = match stepped {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(ApiError::from(e)),
            Err(_) => Some(ApiError::internal(
                "the decoding step failed (internal error)",
            )),
        };
        if let Some(e) = failure {
            // The caches of this step may be half written: every running request fails.
            for r in running.drain(..) {
                let _ = r.events.send(Event::Failed(e.clone()));
            }
            continue;
        }
        let (mut tokens, mut steps) = (0, 0);
        for (r, b) in running.iter().zip(&before) {
            let new = (r.seq.tokens() - b) as u64;
            if r.seq.is_text() {
                tokens += new;
            } else {
                steps += new * r.weight as u64;
            }
        }
        metrics.step(running.iter().map(|r| r.weight).sum(), tokens, steps);
        let mut still = Vec::with_capacity(running.len());
        for mut r in running.drain(..) {
            if r.events.is_closed() {
                // The client went away: its rows leave the batch.
                continue;
            }
            if r.seq.is_text() {
                let piece = r.seq.take_text();
                if !piece.is_empty() {
                    let _ = r.events.send(Event::Text(piece));
                }
            } else {
                let (step, total) = r.seq.progress();
                let _ = r.events.send(Event::Progress { step, total });
            }
            if r.seq.is_finished() {
                let events = r.events.clone();
                let _ = events.send(finish(janus, r.seq));
            } else {
                still.push(r);
            }
        }
        running = still;
        metrics
            .active
            .store(running.iter().map(|r| r.weight).sum(), Ordering::Relaxed);
    }
}

/// Starts waiting jobs while the batch has room (a job larger than the batch runs alone).
fn admit(janus: &Janus, shared: &Shared, waiting: &mut VecDeque<Job>, running: &mut Vec<Running>) {
    while let Some(job) = waiting.front() {
        let used: usize = running.iter().map(|r| r.weight).sum();
        if !running.is_empty() && used + job.weight() > shared.max_batch {
            return;
        }
        let Some(job) = waiting.pop_front() else {
            return;
        };
        shared.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
        if job.events.is_closed() {
            continue;
        }
        let weight = job.weight();
        let begun = catch_unwind(AssertUnwindSafe(|| match &job.work {
            Work::Chat(r) => janus.begin_chat(&r.turns, &r.options, &r.stop),
            Work::Images(r) => janus.begin_generate(&r.prompt, &r.options),
        }));
        match begun {
            Ok(Ok(seq)) => {
                let _ = job.events.send(Event::Started {
                    prompt_tokens: seq.prompt_tokens(),
                });
                running.push(Running {
                    seq,
                    events: job.events,
                    weight,
                });
            }
            Ok(Err(e)) => {
                let _ = job.events.send(Event::Failed(e.into()));
            }
            Err(_) => {
                let _ = job.events.send(Event::Failed(ApiError::internal(
                    "the prompt failed (internal error)",
                )));
            }
        }
    }
}

/// The final event of a finished sequence: the answer, or the decoded images as PNG.
fn finish(janus: &Janus, seq: Sequence) -> Event {
    let done = catch_unwind(AssertUnwindSafe(|| -> Result<Event, ApiError> {
        if seq.is_text() {
            let finish = seq.finish().unwrap_or(Finish::Done);
            let answer = janus.finish_answer(seq)?;
            Ok(Event::Answer {
                completion_tokens: answer.token_ids.len(),
                prompt_tokens: answer.prompt_tokens,
                text: answer.text,
                finish,
            })
        } else {
            let images = janus.finish_images(seq)?;
            let pngs = images
                .iter()
                .map(|i| i.png_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Event::Images(pngs))
        }
    }));
    match done {
        Ok(Ok(event)) => event,
        Ok(Err(e)) => Event::Failed(e),
        Err(_) => Event::Failed(ApiError::internal(
            "finishing the request failed (internal error)",
        )),
    }
}
