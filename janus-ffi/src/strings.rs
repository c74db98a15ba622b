//! Reading the caller's strings and writing the caller's out-pointers.

use std::ffi::{CStr, c_char};
use std::path::PathBuf;

use crate::status::{FfiError, bad_argument};

/// A NUL-terminated UTF-8 argument.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn str_arg<'a>(ptr: *const c_char, name: &str) -> Result<&'a str, FfiError> {
    if ptr.is_null() {
        return Err(bad_argument(format!("{name} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|e| bad_argument(format!("{name} is not UTF-8: {e}")))
}

/// A path argument (UTF-8).
///
/// # Safety
/// As [`str_arg`].
pub(crate) unsafe fn path_arg(ptr: *const c_char, name: &str) -> Result<PathBuf, FfiError> {
    // SAFETY: forwarded.
    unsafe { str_arg(ptr, name) }.map(PathBuf::from)
}

/// The caller's out-pointer, set to NULL until the call succeeds.
///
/// # Safety
/// `out` is NULL or valid for writes for `'a`.
pub(crate) unsafe fn set_out<'a, T>(
    out: *mut *mut T,
    name: &str,
) -> Result<&'a mut *mut T, FfiError> {
    // SAFETY: NULL or valid by the caller's contract.
    match unsafe { out.as_mut() } {
        Some(slot) => {
            *slot = std::ptr::null_mut();
            Ok(slot)
        }
        None => Err(bad_argument(format!("{name} is NULL"))),
    }
}
