//! The errors of the `janus` command.

use std::path::PathBuf;

/// Everything that makes a command fail (exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The model, its input or its output is wrong.
    #[error(transparent)]
    Core(#[from] janus_core::Error),

    /// An output file could not be written.
    #[error("cannot write {path}: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// A token file is not the JSON of `encode-image` or `generate`.
    #[error("{path}: {message}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A flag's value cannot be used.
    #[error("{0}")]
    Invalid(String),

    /// The user interrupted the command (Ctrl-C), after it saved what it could (exit status 130).
    #[error("{0}")]
    Interrupted(String),

    /// Standard output is closed or full.
    #[error("cannot write to standard output: {0}")]
    Stdout(#[source] std::io::Error),
}

/// The command's result type.
pub type Result<T, E = CliError> = std::result::Result<T, E>;
