//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in janus-core.
///
/// Every fallible public function returns this type; nothing in the crate panics on bad input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// A file could not be written (it is left as it was: outputs are written whole or not at
    /// all).
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// A configuration file is malformed, or lacks a key it must have.
    #[error("{file}: {message}")]
    Config {
        /// The file (for example `config.json`).
        file: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },

    /// The model folder lacks a file the model needs.
    #[error("{dir}: {message}")]
    MissingFile {
        /// The model folder.
        dir: PathBuf,
        /// What is missing.
        message: String,
    },

    /// A checkpoint file is malformed (truncated, lying header, unreadable pickle, ...).
    #[error("{path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A pickled checkpoint references a global that a state dict never needs.
    #[error(
        "{path}: refusing pickle global `{global}`: only the globals of a plain state dict are allowed"
    )]
    UnsafePickle {
        /// The checkpoint file.
        path: PathBuf,
        /// The `module.name` the pickle asked for.
        global: String,
    },

    /// The checkpoint's tensors do not match what the configuration describes.
    #[error("checkpoint does not match the model: {}", .0.summary())]
    Weights(Box<WeightMismatch>),

    /// The tokenizer files are malformed or lack a token the model needs.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The caller's input is invalid (empty prompt, out-of-range id, wrong shape, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The model produced a NaN or infinite logit (NaN weights, or a guidance weight so large
    /// that the guided logits overflow): nothing is sampled from it. `step` counts the tokens of
    /// the answer or image grid from 1.
    #[error("non-finite logits at step {step}")]
    NonFiniteLogits {
        /// The token being chosen, from 1.
        step: usize,
    },

    /// Memory for the request could not be had (the allocation was tried before the work began,
    /// so nothing was lost).
    #[error("out of memory: {0}")]
    OutOfMemory(String),

    /// The caller's callback asked to stop.
    #[error("cancelled")]
    Cancelled,

    /// The model or feature is not supported by this implementation.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A model could not be found in the Hugging Face cache or downloaded from the hub.
    #[error("hub: {0}")]
    Hub(String),
}

/// The difference between the tensors a checkpoint holds and those the model needs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WeightMismatch {
    /// Tensors the model needs that no file holds.
    pub missing: Vec<String>,
    /// Tensors in the files that the model does not know.
    pub unexpected: Vec<String>,
    /// Tensors with the wrong shape: (name, expected, found).
    pub wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Tensors with a storage type that cannot be used: (name, dtype).
    pub wrong_dtype: Vec<(String, String)>,
}

impl WeightMismatch {
    /// True when nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.wrong_shape.is_empty()
            && self.wrong_dtype.is_empty()
    }

    /// A one-paragraph description listing the offending tensors (at most a few of each kind).
    pub fn summary(&self) -> String {
        fn list(names: &[String]) -> String {
            const MAX: usize = 8;
            let mut s = names
                .iter()
                .take(MAX)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if names.len() > MAX {
                s.push_str(&format!(", … ({} more)", names.len() - MAX));
            }
            s
        }
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!(
                "{} missing: {}",
                self.missing.len(),
                list(&self.missing)
            ));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!(
                "{} unexpected: {}",
                self.unexpected.len(),
                list(&self.unexpected)
            ));
        }
        if !self.wrong_shape.is_empty() {
            let items: Vec<String> = self
                .wrong_shape
                .iter()
                .map(|(n, e, f)| format!("{n} (expected {e:?}, found {f:?})"))
                .collect();
            parts.push(format!("{} wrong shape: {}", items.len(), list(&items)));
        }
        if !self.wrong_dtype.is_empty() {
            let items: Vec<String> = self
                .wrong_dtype
                .iter()
                .map(|(n, d)| format!("{n} ({d})"))
                .collect();
            parts.push(format!("{} unusable dtype: {}", items.len(), list(&items)));
        }
        parts.join("; ")
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            message: message.into(),
        }
    }
    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
