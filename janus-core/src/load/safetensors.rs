//! `.safetensors` files, memory-mapped; the `safetensors` crate validates the header against the
//! file (offsets inside the file, sizes matching shapes and dtypes, no gaps).

use std::path::Path;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

use super::{StoredDType, TensorInfo, TensorSource};

/// Opens one safetensors file and lists its tensors.
pub(crate) fn open(path: &Path) -> Result<Vec<TensorInfo>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; the file is not modified while the model loads, nor while
    // it runs when weights are read in place from the map (the same assumption every
    // safetensors reader that maps files makes; `JANUS_MMAP=0` copies them, see `in_place`).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    #[cfg(target_os = "linux")]
    if super::in_place() {
        // Weights read in place stream through the file's pages at every decoding step: large
        // pages where the system's file cache can give them (fewer TLB misses). A refusal
        // leaves ordinary pages.
        let _ = mmap.advise(memmap2::Advice::HugePage);
    }
    let mmap = Arc::new(mmap);
    Ok(tensors_in(path, &mmap[..])?
        .into_iter()
        .map(|t| TensorInfo {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            source: TensorSource::Mapped {
                map: Arc::clone(&mmap),
                start: t.start,
                end: t.end,
            },
        })
        .collect())
}

/// One tensor of a safetensors file: name, dtype, shape and where its bytes lie in the file.
pub(crate) struct Listed {
    pub name: String,
    pub dtype: StoredDType,
    pub shape: Vec<usize>,
    /// Byte range in the file (not in the data section).
    pub start: usize,
    pub end: usize,
}

/// Reads the header of the safetensors file `bytes` (read from `path`, which names it in errors)
/// and lists its tensors.
pub(crate) fn tensors_in(path: &Path, bytes: &[u8]) -> Result<Vec<Listed>> {
    let (header_len, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::checkpoint(path, format!("invalid safetensors file: {e}")))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = match info.dtype {
            Dtype::F32 => StoredDType::F32,
            Dtype::F16 => StoredDType::F16,
            Dtype::BF16 => StoredDType::BF16,
            Dtype::F64 => StoredDType::F64,
            other => StoredDType::Other(format!("{other:?}")),
        };
        let (start, end) = info.data_offsets;
        let (start, end) = (data_start + start, data_start + end);
        if end > bytes.len() || start > end {
            return Err(Error::checkpoint(
                path,
                format!("tensor {name} lies outside the file"),
            ));
        }
        out.push(Listed {
            name,
            dtype,
            shape: info.shape.clone(),
            start,
            end,
        });
    }
    Ok(out)
}
