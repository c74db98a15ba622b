//! `libjanus`: the C ABI of janus-rs.
//!
//! The header is `include/janus.h`, generated from this crate by cbindgen. Conventions:
//!
//! - Every function that can fail returns a `janus_status`; `janus_last_error()` gives the
//!   message of the thread's last such call. Results come back through out-pointers, which are
//!   set to NULL when a call fails.
//! - Models are opaque handles (`janus_model`); results (answers, images, token grids) are plain
//!   structs the caller reads and gives back to the matching `janus_*_free` function.
//! - NULL arguments are reported (`JANUS_ERR_INVALID_ARGUMENT`), freed handles and double frees
//!   too (`JANUS_ERR_INVALID_HANDLE`); freeing NULL is a no-op.
//! - No Rust panic unwinds into C: a panic becomes `JANUS_ERR_INTERNAL`.
//! - Options structs start with `struct_size` and come from `janus_*_default_options()`.
//! - Strings are UTF-8; images are RGB8 buffers with a stride.
#![allow(non_camel_case_types)]

// cbindgen lists the header's items in module order: status codes and errors, options, models
// and their calls, images.
mod status;

mod options;

mod handles;
mod model;

mod image;
mod strings;

use std::ffi::c_char;

pub use handles::janus_model;
pub use image::*;
pub use model::*;
pub use options::*;
pub use status::*;

/// The library version as a NUL-terminated UTF-8 string owned by the library (never free it).
///
/// Thread safety: safe from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn janus_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_the_package_version() {
        // SAFETY: janus_version returns a pointer to a static NUL-terminated string.
        let v = unsafe { std::ffi::CStr::from_ptr(janus_version()) };
        assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }
}
