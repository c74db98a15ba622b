//! Reading inputs within a size limit and writing outputs whole or not at all.
//!
//! * [`read_bounded`] reads a regular file of at most a given size: a device (`/dev/zero`), a
//!   pipe or a folder where a file is expected, or a file past the limit, is refused before
//!   anything sized by it is allocated.
//! * [`write_atomic`] writes a file through a temporary file in the same folder, renamed over the
//!   target only once every byte is written and flushed to disk: a failure (a full disk, a
//!   missing permission) leaves an existing file as it was and no partial file behind.

use std::io::{Read, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// Reads the regular file `path`, of at most `limit` bytes; `what` names the input in errors
/// (for example `"image"`).
///
/// # Errors
/// [`Error::Io`] when the file cannot be opened or read; [`Error::InvalidInput`] when it is not a
/// regular file or is larger than `limit` (the message names the limit).
pub fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::InvalidInput(format!(
            "{}: the {what} must be a regular file (not a folder, device or pipe)",
            path.display()
        )));
    }
    if meta.len() > limit {
        return Err(too_large(path, what, meta.len(), limit));
    }
    // The length was checked; `take` still bounds a file that grows while it is read.
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(meta.len() as usize)
        .map_err(|_| Error::OutOfMemory(format!("reading {}", path.display())))?;
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(path, what, bytes.len() as u64, limit));
    }
    Ok(bytes)
}

fn too_large(path: &Path, what: &str, size: u64, limit: u64) -> Error {
    Error::InvalidInput(format!(
        "{}: the {what} has {size} bytes, more than the limit of {limit} (max_input_mb)",
        path.display()
    ))
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file beside it, flushed to
/// disk, then renamed over `path`. The new file gets the usual permissions (0666 less the
/// umask), not the temporary file's private ones.
///
/// # Errors
/// [`Error::Write`] naming `path` when the folder cannot hold the temporary file, a write or the
/// flush fails, or the rename fails; `path` is then unchanged.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let write_error = |e: std::io::Error| Error::Write {
        path: path.to_path_buf(),
        source: e,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".partial");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut file = builder.tempfile_in(dir).map_err(write_error)?;
    file.write_all(bytes).map_err(write_error)?;
    file.as_file().sync_all().map_err(write_error)?;
    file.persist(path).map_err(|e| write_error(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_within_the_limit_reads_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        std::fs::write(&path, [1u8, 2, 3]).unwrap();
        assert_eq!(read_bounded(&path, 3, "image").unwrap(), [1, 2, 3]);
        let e = read_bounded(&path, 2, "image").unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{e}");
        assert!(e.to_string().contains("max_input_mb"), "{e}");
    }

    #[test]
    fn folders_and_devices_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_bounded(dir.path(), 1 << 20, "image").unwrap_err();
        assert!(e.to_string().contains("regular file"), "{e}");
        #[cfg(unix)]
        {
            let e = read_bounded(Path::new("/dev/zero"), 1 << 20, "image").unwrap_err();
            assert!(e.to_string().contains("regular file"), "{e}");
        }
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_ne!(
                mode & 0o044,
                0,
                "readable by others as a plain write makes it"
            );
        }
    }

    #[test]
    fn a_failed_write_names_the_write_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-folder").join("out.png");
        let e = write_atomic(&path, b"x").unwrap_err();
        assert!(matches!(e, Error::Write { .. }), "{e}");
        assert!(e.to_string().starts_with("cannot write"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
