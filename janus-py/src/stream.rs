//! `TextStream`: an answer's text pieces as they are produced, from a generation running on a
//! background thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::prelude::*;

use janus_core::pipeline;

use crate::errors::{self, CallError, guarded};
use crate::results::Answer;

/// How often a waiting `__next__` looks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// What the background thread reports.
enum Event {
    /// The next piece of text.
    Piece(String),
    /// The generation ended.
    Done(Result<pipeline::Answer, CallError>),
}

/// A generation to run: given the piece callback, it returns the answer.
pub(crate) type Job = Box<
    dyn FnOnce(&mut dyn FnMut(&str) -> bool) -> Result<pipeline::Answer, janus_core::Error> + Send,
>;

/// The pieces of an answer's text as they are produced; iterate over it.
///
/// The generation runs on a background thread. Closing the stream (``close()``, leaving a
/// ``with`` block, or dropping it) cancels it. After the last piece, ``answer`` holds the whole
/// ``Answer``.
#[pyclass(frozen, module = "janus_rs", name = "TextStream")]
pub(crate) struct TextStream {
    events: Mutex<Receiver<Event>>,
    cancel: Arc<AtomicBool>,
    finished: AtomicBool,
    answer: Mutex<Option<Py<Answer>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A mutex's content, even after a panic elsewhere poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TextStream {
    /// Starts `job` on a background thread.
    pub(crate) fn start(job: Job) -> PyResult<Self> {
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&cancel);
        let thread = std::thread::Builder::new()
            .name("janus-stream".into())
            .spawn(move || {
                let pieces = tx.clone();
                let result = guarded(move || {
                    job(&mut |piece: &str| {
                        !stop.load(Ordering::Relaxed)
                            && pieces.send(Event::Piece(piece.to_owned())).is_ok()
                    })
                });
                // Nobody listens any more when the stream was dropped.
                let _ = tx.send(Event::Done(result));
            })
            .map_err(|e| {
                pyo3::exceptions::PyRuntimeError::new_err(format!(
                    "cannot start the generation thread: {e}"
                ))
            })?;
        Ok(TextStream {
            events: Mutex::new(rx),
            cancel,
            finished: AtomicBool::new(false),
            answer: Mutex::new(None),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn stop(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.finished.store(true, Ordering::Relaxed);
    }
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            if self.finished.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let event = py.detach(|| lock(&self.events).recv_timeout(SIGNAL_POLL));
            match event {
                Ok(Event::Piece(piece)) => return Ok(Some(piece)),
                Ok(Event::Done(Ok(answer))) => {
                    *lock(&self.answer) = Some(Py::new(py, Answer::from(answer))?);
                    self.finished.store(true, Ordering::Relaxed);
                    return Ok(None);
                }
                Ok(Event::Done(Err(err))) => {
                    self.finished.store(true, Ordering::Relaxed);
                    return Err(errors::call_error(py, err));
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(interrupt) = py.check_signals() {
                        self.stop();
                        return Err(errors::cancelled_by(py, interrupt));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.finished.store(true, Ordering::Relaxed);
                    return Err(errors::new_error(
                        py,
                        "JanusError",
                        "the generation thread stopped without an answer",
                    ));
                }
            }
        }
    }

    /// The whole answer once the stream is exhausted (None before, or when it was closed).
    #[getter]
    fn answer(&self, py: Python<'_>) -> Option<Py<Answer>> {
        lock(&self.answer).as_ref().map(|a| a.clone_ref(py))
    }

    /// Cancels the generation (if it still runs) and waits for its thread to stop.
    fn close(&self, py: Python<'_>) {
        self.stop();
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            // A panic on the thread was already turned into an event.
            py.detach(|| {
                let _ = thread.join();
            });
        }
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }
}

impl Drop for TextStream {
    fn drop(&mut self) {
        // The closed channel stops the generation at its next piece; the flag at once.
        self.cancel.store(true, Ordering::Relaxed);
    }
}
