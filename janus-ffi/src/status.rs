//! Status codes, the per-thread error message, and the guard every entry point runs in.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// What a call did: `JANUS_OK`, or why it failed. The message of a failure is in
/// `janus_last_error()`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum janus_status {
    /// Success.
    JANUS_OK = 0,
    /// A required pointer is NULL, a string is not UTF-8, an options struct's `struct_size` is
    /// not one this library knows (initialise options with the `janus_*_default_options()`
    /// functions), or an enum value is unknown.
    JANUS_ERR_INVALID_ARGUMENT = 1,
    /// A handle or result that was already freed, or that did not come from this library.
    JANUS_ERR_INVALID_HANDLE = 2,
    /// A file could not be read or written.
    JANUS_ERR_IO = 3,
    /// A configuration file of the model is malformed or lacks a key.
    JANUS_ERR_CONFIG = 4,
    /// The model folder lacks a file the model needs.
    JANUS_ERR_MISSING_FILE = 5,
    /// A checkpoint file is malformed (truncated, bad header, unreadable or unsafe pickle).
    JANUS_ERR_CHECKPOINT = 6,
    /// The checkpoint's tensors do not match what the configuration describes.
    JANUS_ERR_WEIGHTS = 7,
    /// The tokenizer files are malformed or lack a token the model needs.
    JANUS_ERR_TOKENIZER = 8,
    /// The input is invalid: an empty prompt, an image with no pixels or a stride shorter than
    /// a row, out-of-range option values or token ids, a prompt longer than the context, ...
    JANUS_ERR_INVALID_INPUT = 9,
    /// A callback returned `false`.
    JANUS_ERR_CANCELLED = 10,
    /// The feature or backend is not supported by this build.
    JANUS_ERR_UNSUPPORTED = 11,
    /// A bug in the library (a Rust panic, caught at the boundary). The message says where.
    JANUS_ERR_INTERNAL = 12,
    /// The model produced NaN or infinite logits (NaN weights, or a guidance weight so large
    /// that the guided logits overflow); the message names the step. Nothing was sampled.
    JANUS_ERR_NUMERIC = 13,
    /// The memory a request needs could not be allocated; it was tried before the work began,
    /// and the handle stays usable.
    JANUS_ERR_OUT_OF_MEMORY = 14,
}

use janus_status::*;

impl janus_status {
    /// Every status, in order.
    pub(crate) const ALL: [janus_status; 15] = [
        JANUS_OK,
        JANUS_ERR_INVALID_ARGUMENT,
        JANUS_ERR_INVALID_HANDLE,
        JANUS_ERR_IO,
        JANUS_ERR_CONFIG,
        JANUS_ERR_MISSING_FILE,
        JANUS_ERR_CHECKPOINT,
        JANUS_ERR_WEIGHTS,
        JANUS_ERR_TOKENIZER,
        JANUS_ERR_INVALID_INPUT,
        JANUS_ERR_CANCELLED,
        JANUS_ERR_UNSUPPORTED,
        JANUS_ERR_INTERNAL,
        JANUS_ERR_NUMERIC,
        JANUS_ERR_OUT_OF_MEMORY,
    ];

    /// The C name of the code.
    pub(crate) fn name(self) -> &'static CStr {
        match self {
            JANUS_OK => c"JANUS_OK",
            JANUS_ERR_INVALID_ARGUMENT => c"JANUS_ERR_INVALID_ARGUMENT",
            JANUS_ERR_INVALID_HANDLE => c"JANUS_ERR_INVALID_HANDLE",
            JANUS_ERR_IO => c"JANUS_ERR_IO",
            JANUS_ERR_CONFIG => c"JANUS_ERR_CONFIG",
            JANUS_ERR_MISSING_FILE => c"JANUS_ERR_MISSING_FILE",
            JANUS_ERR_CHECKPOINT => c"JANUS_ERR_CHECKPOINT",
            JANUS_ERR_WEIGHTS => c"JANUS_ERR_WEIGHTS",
            JANUS_ERR_TOKENIZER => c"JANUS_ERR_TOKENIZER",
            JANUS_ERR_INVALID_INPUT => c"JANUS_ERR_INVALID_INPUT",
            JANUS_ERR_CANCELLED => c"JANUS_ERR_CANCELLED",
            JANUS_ERR_UNSUPPORTED => c"JANUS_ERR_UNSUPPORTED",
            JANUS_ERR_INTERNAL => c"JANUS_ERR_INTERNAL",
            JANUS_ERR_NUMERIC => c"JANUS_ERR_NUMERIC",
            JANUS_ERR_OUT_OF_MEMORY => c"JANUS_ERR_OUT_OF_MEMORY",
        }
    }
}

/// Why a call failed, as the entry points see it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FfiError {
    /// A bad argument (NULL pointer, bad enum value, ...).
    #[error("{0}")]
    Argument(String),
    /// A freed or foreign handle.
    #[error("{0}")]
    Handle(String),
    /// An error of janus-core.
    #[error(transparent)]
    Core(#[from] janus_core::Error),
}

impl FfiError {
    /// The status code reported for this error.
    pub(crate) fn status(&self) -> janus_status {
        use janus_core::Error as E;
        match self {
            FfiError::Argument(_) => JANUS_ERR_INVALID_ARGUMENT,
            FfiError::Handle(_) => JANUS_ERR_INVALID_HANDLE,
            FfiError::Core(e) => match e {
                E::Io { .. } | E::Write { .. } | E::Hub(_) => JANUS_ERR_IO,
                E::NonFiniteLogits { .. } => JANUS_ERR_NUMERIC,
                E::OutOfMemory(_) => JANUS_ERR_OUT_OF_MEMORY,
                E::Config { .. } => JANUS_ERR_CONFIG,
                E::MissingFile { .. } => JANUS_ERR_MISSING_FILE,
                E::Checkpoint { .. } | E::UnsafePickle { .. } => JANUS_ERR_CHECKPOINT,
                E::Weights(_) => JANUS_ERR_WEIGHTS,
                E::Tokenizer(_) => JANUS_ERR_TOKENIZER,
                E::InvalidInput(_) => JANUS_ERR_INVALID_INPUT,
                E::Cancelled => JANUS_ERR_CANCELLED,
                E::Unsupported(_) => JANUS_ERR_UNSUPPORTED,
                _ => JANUS_ERR_INTERNAL,
            },
        }
    }
}

/// Shorthand for an argument error.
pub(crate) fn bad_argument(message: impl Into<String>) -> FfiError {
    FfiError::Argument(message.into())
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let message = CString::new(message.replace('\0', "\u{fffd}")).unwrap_or_default();
    // During thread teardown the slot may be gone; there is no one left to read it then.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = message);
}

/// Runs the body of an entry point: records its error message (empty on success) for
/// `janus_last_error`, and turns a panic into `JANUS_ERR_INTERNAL` instead of unwinding into C.
pub(crate) fn guard(body: impl FnOnce() -> Result<(), FfiError>) -> janus_status {
    let (status, message) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => (JANUS_OK, String::new()),
        Ok(Err(e)) => (e.status(), e.to_string()),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            // Dropping the payload could panic again; leak it instead.
            std::mem::forget(payload);
            (JANUS_ERR_INTERNAL, format!("internal error: {what}"))
        }
    };
    // Formatting the message must not unwind either.
    let _ = catch_unwind(|| set_last_error(&message));
    status
}

/// The message of the most recent call on this thread that returned a `janus_status`: empty
/// after `JANUS_OK`, else what went wrong (UTF-8, NUL-terminated).
///
/// The string belongs to the library and stays valid until the next `janus_*` call on the same
/// thread that returns a `janus_status`. Never NULL.
///
/// Thread safety: each thread has its own message.
#[unsafe(no_mangle)]
pub extern "C" fn janus_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| slot.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// The name of a status code (`"JANUS_OK"`, `"JANUS_ERR_IO"`, ...), or `"unknown status"` for a
/// value that is not one. The string is static: never free it.
///
/// Thread safety: safe from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn janus_status_string(status: c_int) -> *const c_char {
    janus_status::ALL
        .iter()
        .find(|&&s| s as c_int == status)
        .map_or(c"unknown status", |s| s.name())
        .as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: janus_last_error returns a NUL-terminated string that stays valid until the
        // next call on this thread.
        unsafe { CStr::from_ptr(janus_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_an_internal_error_with_its_message() {
        assert_eq!(guard(|| panic!("boom {}", 7)), JANUS_ERR_INTERNAL);
        assert_eq!(last_error(), "internal error: boom 7");
        assert_eq!(guard(|| Ok(())), JANUS_OK);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn core_errors_keep_their_kind_and_message() {
        let status = guard(|| Err(janus_core::Error::Cancelled.into()));
        assert_eq!(status, JANUS_ERR_CANCELLED);
        assert_eq!(last_error(), "cancelled");
        assert_eq!(
            guard(|| Err(bad_argument("x is NULL"))),
            JANUS_ERR_INVALID_ARGUMENT
        );
        assert_eq!(last_error(), "x is NULL");
    }

    #[test]
    fn every_status_has_its_name() {
        for s in janus_status::ALL {
            // SAFETY: static NUL-terminated strings.
            let name = unsafe { CStr::from_ptr(janus_status_string(s as c_int)) };
            assert_eq!(name, s.name());
            assert!(name.to_str().unwrap().starts_with("JANUS_"));
        }
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(janus_status_string(-1)) };
        assert_eq!(unknown, c"unknown status");
    }
}
