//! janus-core errors as Python exceptions (the classes live in `janus_rs._errors`).

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;

use janus_core::Error;

/// The Python module that defines the exception classes.
const ERRORS_MODULE: &str = "janus_rs._errors";

/// An instance of `janus_rs._errors.<class>` carrying `message`.
pub(crate) fn new_error(py: Python<'_>, class: &str, message: impl Into<String>) -> PyErr {
    let message = message.into();
    let made = py
        .import(ERRORS_MODULE)
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1((message.clone(),)));
    match made {
        Ok(instance) => PyErr::from_value(instance),
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// `InvalidInputError` (also a `ValueError`).
pub(crate) fn invalid_input(py: Python<'_>, message: impl Into<String>) -> PyErr {
    new_error(py, "InvalidInputError", message)
}

/// The Python exception for a janus-core error, with janus-core's message.
pub(crate) fn to_py(py: Python<'_>, err: Error) -> PyErr {
    let message = err.to_string();
    match err {
        Error::Io { path, source } | Error::Write { path, source } => {
            let class = if source.kind() == std::io::ErrorKind::NotFound {
                "MissingFileError"
            } else {
                "IoError"
            };
            let e = new_error(py, class, message);
            let value = e.value(py);
            // The OSError fields; failing to set them leaves the message intact.
            let _ = value.setattr("filename", path.display().to_string());
            if let Some(code) = source.raw_os_error() {
                let _ = value.setattr("errno", code);
            }
            e
        }
        Error::MissingFile { dir, .. } => {
            let e = new_error(py, "MissingFileError", message);
            let _ = e.value(py).setattr("filename", dir.display().to_string());
            e
        }
        Error::Config { .. } => new_error(py, "ConfigError", message),
        Error::Checkpoint { .. } | Error::UnsafePickle { .. } | Error::Weights(_) => {
            new_error(py, "CheckpointError", message)
        }
        Error::Tokenizer(_) => new_error(py, "TokenizerError", message),
        Error::InvalidInput(_) => new_error(py, "InvalidInputError", message),
        Error::Cancelled => new_error(py, "Cancelled", message),
        Error::Unsupported(_) => new_error(py, "UnsupportedError", message),
        Error::Hub(_) => new_error(py, "HubError", message),
        Error::NonFiniteLogits { .. } => new_error(py, "NumericError", message),
        Error::OutOfMemory(_) => new_error(py, "OutOfMemoryError", message),
        _ => new_error(py, "JanusError", message),
    }
}

/// Why a core call run by the bindings failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// janus-core returned an error.
    Core(Error),
    /// janus-core panicked (a bug; never expected): the panic's message.
    Panic(String),
}

impl From<Error> for CallError {
    fn from(err: Error) -> Self {
        CallError::Core(err)
    }
}

/// Runs a core call, turning a panic into [`CallError::Panic`] instead of unwinding into Python.
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, CallError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(CallError::Core),
        Err(payload) => Err(CallError::Panic(
            payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into()),
        )),
    }
}

/// The Python exception of a failed call (see [`finish`]).
pub(crate) fn call_error(py: Python<'_>, err: CallError) -> PyErr {
    match err {
        CallError::Core(err) => to_py(py, err),
        CallError::Panic(what) => new_error(py, "JanusError", format!("internal error: {what}")),
    }
}

/// The result of a core call as Python sees it, given what stopped it on the Python side (if
/// anything did): Ctrl-C becomes `Cancelled` chained to the `KeyboardInterrupt`; an exception
/// raised by a callback is raised again as it is; otherwise the core's error is mapped as usual.
pub(crate) fn finish<T>(
    py: Python<'_>,
    result: Result<T, CallError>,
    interrupt: Option<PyErr>,
) -> PyResult<T> {
    match (result, interrupt) {
        (Ok(value), _) => Ok(value),
        (Err(CallError::Core(Error::Cancelled)), Some(cause)) => Err(cancelled_by(py, cause)),
        (Err(err), _) => Err(call_error(py, err)),
    }
}

/// `Cancelled` for a Ctrl-C (chained to the `KeyboardInterrupt`), or the callback's own error.
pub(crate) fn cancelled_by(py: Python<'_>, cause: PyErr) -> PyErr {
    if cause.is_instance_of::<PyKeyboardInterrupt>(py) {
        let e = new_error(py, "Cancelled", "cancelled: interrupted (Ctrl-C)");
        e.set_cause(py, Some(cause));
        e
    } else {
        cause
    }
}

/// A callback for the core that checks for Ctrl-C (and whatever `extra` wants to check) with
/// the interpreter attached, keeping the first Python exception in `slot`; it returns `false`
/// (cancel) once there is one.
pub(crate) fn keep_going(
    slot: &mut Option<PyErr>,
    extra: impl FnOnce(Python<'_>) -> PyResult<bool>,
) -> bool {
    if slot.is_some() {
        return false;
    }
    Python::attach(|py| match py.check_signals().and_then(|()| extra(py)) {
        Ok(go_on) => go_on,
        Err(e) => {
            *slot = Some(e);
            false
        }
    })
}
