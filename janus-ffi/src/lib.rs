//! `libjanus`: the C ABI of janus-rs.
//!
//! The header is `include/janus.h`. Every function is safe to call with any arguments: none of
//! them unwinds a Rust panic across the boundary.

use std::ffi::c_char;

/// The library version as a NUL-terminated UTF-8 string owned by the library (never free it).
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
