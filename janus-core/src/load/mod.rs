//! Checkpoint loading: finds the weight files of a model folder (single or sharded, safetensors or
//! pickled `.bin`), maps either layout's tensor names onto the one module tree, checks every shape,
//! and converts each tensor to the compute dtype as it is read, one tensor at a time.
//!
//! Building a model is done twice with the same code: a *plan* pass, in which [`Weights::get`]
//! only records what the module tree asks for and returns placeholders, so that every missing,
//! unexpected or wrong-shaped tensor is reported at once before anything large is read; then the
//! *load* pass, which reads and converts.

mod keys;
mod pickle;
mod safetensors;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::config::Layout;
use crate::error::{Error, Result, WeightMismatch};

pub(crate) use keys::FileKeys;

/// Storage type of a tensor in a checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredDType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float.
    F64,
    /// Anything else (integers, bool, quantised): not usable as a weight.
    Other(String),
}

impl StoredDType {
    fn size(&self) -> Option<usize> {
        match self {
            StoredDType::F32 => Some(4),
            StoredDType::F16 | StoredDType::BF16 => Some(2),
            StoredDType::F64 => Some(8),
            StoredDType::Other(_) => None,
        }
    }
}

/// Where a tensor's bytes are.
#[derive(Clone)]
pub(crate) enum TensorSource {
    /// A byte range of a memory-mapped file.
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        end: usize,
    },
    /// A tensor of a pickled checkpoint, read on demand.
    Pickle(pytorch_reader::Tensor),
}

/// One tensor of a checkpoint, with its bytes not yet read.
#[derive(Clone)]
pub(crate) struct TensorInfo {
    pub name: String,
    pub dtype: StoredDType,
    pub shape: Vec<usize>,
    pub source: TensorSource,
}

/// The weight files of a model folder, opened (metadata only).
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    tensors: HashMap<String, (usize, TensorInfo)>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Safetensors,
    Pickle,
}

impl Checkpoint {
    /// Finds and opens the weight files of `dir`, in this order of preference:
    /// `model.safetensors.index.json`, `model.safetensors`, `pytorch_model.bin.index.json`,
    /// `pytorch_model.bin`.
    pub fn open(dir: &Path) -> Result<Self> {
        let candidates = [
            ("model.safetensors.index.json", Format::Safetensors, true),
            ("model.safetensors", Format::Safetensors, false),
            ("pytorch_model.bin.index.json", Format::Pickle, true),
            ("pytorch_model.bin", Format::Pickle, false),
        ];
        let Some(&(name, format, indexed)) = candidates
            .iter()
            .find(|(name, _, _)| dir.join(name).is_file())
        else {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                message: "no weights: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json)".into(),
            });
        };
        let (files, index) = if indexed {
            let index_path = dir.join(name);
            let (files, map) = read_index(dir, &index_path)?;
            (files, Some(map))
        } else {
            (vec![dir.join(name)], None)
        };

        let mut tensors = HashMap::new();
        for (file_idx, path) in files.iter().enumerate() {
            let listed = match format {
                Format::Safetensors => safetensors::open(path)?,
                Format::Pickle => pickle::open(path)?,
            };
            for info in listed {
                if let Some((other, _)) = tensors.get(&info.name) {
                    let other: &PathBuf = &files[*other];
                    return Err(Error::checkpoint(
                        path,
                        format!("tensor {} is also in {}", info.name, other.display()),
                    ));
                }
                tensors.insert(info.name.clone(), (file_idx, info));
            }
        }
        if tensors.is_empty() {
            return Err(Error::checkpoint(&files[0], "holds no tensors"));
        }
        if let Some(map) = index {
            for (tensor, shard) in map {
                match tensors.get(&tensor) {
                    Some((idx, _)) if files[*idx] == dir.join(&shard) => {}
                    _ => {
                        return Err(Error::checkpoint(
                            dir.join(&shard),
                            format!(
                                "the index places tensor {tensor} in this shard, but it is not there"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            tensors,
        })
    }

    /// The weight files in use.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Names of all tensors in the files.
    pub fn tensor_names(&self) -> BTreeSet<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Shape of a tensor in the files.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(_, t)| t.shape.as_slice())
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.tensors
            .get(name)
            .map(|(i, _)| self.files[*i].clone())
            .unwrap_or_else(|| self.dir.clone())
    }
}

/// A sharded checkpoint's shard files (in order) and its tensor → shard pairs.
type ShardIndex = (Vec<PathBuf>, Vec<(String, String)>);

/// Reads a sharded checkpoint's index.
fn read_index(dir: &Path, index_path: &Path) -> Result<ShardIndex> {
    let value = crate::config::read_json(index_path)?;
    let map = value
        .get("weight_map")
        .and_then(|v| v.as_object())
        .ok_or_else(|| {
            Error::config(index_path, "key `weight_map`: missing (expected an object)")
        })?;
    let mut pairs = Vec::with_capacity(map.len());
    let mut shards = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            Error::config(
                index_path,
                format!("key `weight_map.{tensor}`: expected a file name"),
            )
        })?;
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(Error::config(
                index_path,
                format!("key `weight_map.{tensor}`: `{shard}` is not a file name in the folder"),
            ));
        }
        shards.insert(shard.to_string());
        pairs.push((tensor.clone(), shard.to_string()));
    }
    if shards.is_empty() {
        return Err(Error::config(
            index_path,
            "key `weight_map`: lists no tensors",
        ));
    }
    let mut files = Vec::new();
    for shard in shards {
        let path = dir.join(&shard);
        if !path.is_file() {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                message: format!("shard {shard} named by {} is missing", index_path.display()),
            });
        }
        files.push(path);
    }
    Ok((files, pairs))
}

/// The dtype weights are converted to, and computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDType {
    /// 32-bit float (the default, and the one parity is proven in).
    #[default]
    F32,
    /// IEEE half.
    F16,
    /// bfloat16 (slow on the CPU backend).
    BF16,
}

impl ComputeDType {
    /// The Burn dtype.
    pub fn burn(self) -> DType {
        match self {
            ComputeDType::F32 => DType::F32,
            ComputeDType::F16 => DType::F16,
            ComputeDType::BF16 => DType::BF16,
        }
    }
}

/// Hands tensors to the module tree by their canonical (original-layout) names.
pub(crate) struct Weights<'a> {
    ckpt: &'a Checkpoint,
    keys: FileKeys,
    device: Device,
    dtype: ComputeDType,
    plan: bool,
    used: HashSet<String>,
    mismatch: WeightMismatch,
    error: Option<Error>,
}

impl<'a> Weights<'a> {
    pub(crate) fn new(
        ckpt: &'a Checkpoint,
        layout: Layout,
        device: &Device,
        dtype: ComputeDType,
        plan: bool,
    ) -> Self {
        Weights {
            ckpt,
            keys: FileKeys::new(layout),
            device: device.clone(),
            dtype,
            plan,
            used: HashSet::new(),
            mismatch: WeightMismatch::default(),
            error: None,
        }
    }

    /// Whether the checkpoint holds the tensor with this canonical name.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.keys
            .file_keys(name)
            .iter()
            .all(|k| self.ckpt.tensors.contains_key(k))
    }

    /// The tensor with this canonical name, which must have `shape`. Problems are recorded (see
    /// [`finish`](Self::finish)) and a placeholder is returned, so that all of them are found in
    /// one pass.
    pub(crate) fn get<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Tensor<D> {
        let parts = self.keys.file_keys(name);
        let mut infos = Vec::with_capacity(parts.len());
        let mut ok = true;
        for key in &parts {
            self.used.insert(key.clone());
            match self.ckpt.tensors.get(key) {
                Some((_, info)) => infos.push(info),
                None => {
                    self.mismatch.missing.push(key.clone());
                    ok = false;
                }
            }
        }
        if !ok {
            return self.placeholder();
        }
        // Parts are concatenated along the first axis (HF's split q/k/v).
        let n = parts.len();
        for (key, info) in parts.iter().zip(&infos) {
            let mut expected = shape.to_vec();
            if n > 1 {
                if !expected[0].is_multiple_of(n) {
                    self.mismatch
                        .wrong_shape
                        .push((key.clone(), expected, info.shape.clone()));
                    ok = false;
                    continue;
                }
                expected[0] /= n;
            }
            if !same_shape(&expected, &info.shape) {
                self.mismatch
                    .wrong_shape
                    .push((key.clone(), expected, info.shape.clone()));
                ok = false;
            }
            if info.dtype.size().is_none() {
                self.mismatch
                    .wrong_dtype
                    .push((key.clone(), format!("{:?}", info.dtype)));
                ok = false;
            }
        }
        if !ok || self.plan || self.error.is_some() {
            return self.placeholder();
        }
        let mut pieces = Vec::with_capacity(n);
        for (key, info) in parts.iter().zip(infos) {
            let part_shape: Vec<usize> = if n > 1 {
                let mut s = shape.to_vec();
                s[0] /= n;
                s
            } else {
                shape.to_vec()
            };
            match self.read(key, info, part_shape) {
                Ok(t) => pieces.push(t),
                Err(e) => {
                    self.error = Some(e);
                    return self.placeholder();
                }
            }
        }
        if pieces.len() == 1 {
            pieces.pop().expect("one piece")
        } else {
            Tensor::cat(pieces, 0)
        }
    }

    fn read<const D: usize>(
        &self,
        key: &str,
        info: &TensorInfo,
        shape: Vec<usize>,
    ) -> Result<Tensor<D>> {
        let owned;
        let bytes: &[u8] = match &info.source {
            TensorSource::Mapped { map, start, end } => &map[*start..*end],
            TensorSource::Pickle(t) => {
                owned = t
                    .read()
                    .map_err(|e| Error::checkpoint(self.ckpt.path_of(key), e.to_string()))?;
                &owned
            }
        };
        let numel: usize = shape.iter().product();
        let elem = info.dtype.size().unwrap_or(0);
        if bytes.len() != numel * elem {
            return Err(Error::checkpoint(
                self.ckpt.path_of(key),
                format!(
                    "tensor {key} has {} bytes, expected {}",
                    bytes.len(),
                    numel * elem
                ),
            ));
        }
        let data = convert(bytes, &info.dtype, self.dtype, shape);
        #[cfg(unix)]
        if let TensorSource::Mapped { map, start, end } = &info.source {
            // The stored bytes are no longer needed: let the kernel drop their pages so that the
            // mapped file does not add to the resident memory while the model loads.
            // SAFETY: the map is a read-only, never-written file mapping, and no reference into
            // the range is alive (`bytes` is not used past `convert`); discarded pages are read
            // from the file again if a later access needs them.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    *start,
                    *end - *start,
                )
            };
        }
        Ok(Tensor::from_data(data, (&self.device, self.dtype.burn())))
    }

    fn placeholder<const D: usize>(&self) -> Tensor<D> {
        Tensor::zeros([1; D], (&self.device, self.dtype.burn()))
    }

    /// Ends a pass: any read error, or any mismatch between the checkpoint and the module tree
    /// (tensors nobody asked for included, except those the reference ignores too).
    pub(crate) fn finish(mut self) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let mut unexpected: Vec<String> = self
            .ckpt
            .tensors
            .keys()
            .filter(|k| !self.used.contains(*k) && !self.keys.ignored(k))
            .cloned()
            .collect();
        unexpected.sort();
        self.mismatch.unexpected = unexpected;
        self.mismatch.missing.sort();
        if self.mismatch.is_empty() {
            Ok(())
        } else {
            Err(Error::Weights(Box::new(self.mismatch)))
        }
    }
}

/// Shapes match when they are equal once leading size-1 axes are ignored (the original
/// `pos_embed` is `[1, N, W]`, the HF one `[N, W]`).
fn same_shape(expected: &[usize], found: &[usize]) -> bool {
    fn strip(s: &[usize]) -> &[usize] {
        let first = s.iter().position(|&d| d != 1).unwrap_or(s.len());
        &s[first..]
    }
    strip(expected) == strip(found)
}

/// Converts little-endian stored bytes to the compute dtype, in parallel chunks (the output
/// pages are first touched by the threads that fill them).
fn convert(bytes: &[u8], from: &StoredDType, to: ComputeDType, shape: Vec<usize>) -> TensorData {
    use half::{bf16, f16};
    let u16_at = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
    let f32_at = |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    let f64_at =
        |c: &[u8]| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32;
    match (to, from) {
        (ComputeDType::F32, StoredDType::F32) => {
            TensorData::new(map_elems(bytes, 4, f32_at), shape)
        }
        (ComputeDType::F32, StoredDType::BF16) => TensorData::new(
            map_elems(bytes, 2, |c| bf16::from_bits(u16_at(c)).to_f32()),
            shape,
        ),
        (ComputeDType::F32, StoredDType::F16) => TensorData::new(
            map_elems(bytes, 2, |c| f16::from_bits(u16_at(c)).to_f32()),
            shape,
        ),
        (ComputeDType::F32, StoredDType::F64) => {
            TensorData::new(map_elems(bytes, 8, f64_at), shape)
        }
        (ComputeDType::F16, StoredDType::F16) => {
            TensorData::new(map_elems(bytes, 2, |c| f16::from_bits(u16_at(c))), shape)
        }
        (ComputeDType::F16, StoredDType::BF16) => TensorData::new(
            map_elems(bytes, 2, |c| {
                f16::from_f32(bf16::from_bits(u16_at(c)).to_f32())
            }),
            shape,
        ),
        (ComputeDType::F16, StoredDType::F32) => {
            TensorData::new(map_elems(bytes, 4, |c| f16::from_f32(f32_at(c))), shape)
        }
        (ComputeDType::F16, StoredDType::F64) => {
            TensorData::new(map_elems(bytes, 8, |c| f16::from_f32(f64_at(c))), shape)
        }
        (ComputeDType::BF16, StoredDType::BF16) => {
            TensorData::new(map_elems(bytes, 2, |c| bf16::from_bits(u16_at(c))), shape)
        }
        (ComputeDType::BF16, StoredDType::F16) => TensorData::new(
            map_elems(bytes, 2, |c| {
                bf16::from_f32(f16::from_bits(u16_at(c)).to_f32())
            }),
            shape,
        ),
        (ComputeDType::BF16, StoredDType::F32) => {
            TensorData::new(map_elems(bytes, 4, |c| bf16::from_f32(f32_at(c))), shape)
        }
        (ComputeDType::BF16, StoredDType::F64) => {
            TensorData::new(map_elems(bytes, 8, |c| bf16::from_f32(f64_at(c))), shape)
        }
        // Rejected before reading (no element size).
        (ComputeDType::F32, StoredDType::Other(_)) => TensorData::new(Vec::<f32>::new(), shape),
        (ComputeDType::F16, StoredDType::Other(_)) => TensorData::new(Vec::<f16>::new(), shape),
        (ComputeDType::BF16, StoredDType::Other(_)) => TensorData::new(Vec::<bf16>::new(), shape),
    }
}

/// `f` over each `size`-byte element of `bytes`, large inputs split across rayon's pool.
fn map_elems<T, F>(bytes: &[u8], size: usize, f: F) -> Vec<T>
where
    T: Copy + Default + Send,
    F: Fn(&[u8]) -> T + Sync,
{
    use rayon::prelude::*;
    /// Elements per parallel chunk (a few hundred KiB of output).
    const CHUNK: usize = 1 << 16;
    let n = bytes.len() / size;
    let mut out = vec![T::default(); n];
    prefer_huge_pages(&mut out);
    if n < 2 * CHUNK {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(size)) {
            *o = f(c);
        }
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(bytes.par_chunks(CHUNK * size))
            .for_each(|(o, b)| {
                for (o, c) in o.iter_mut().zip(b.chunks_exact(size)) {
                    *o = f(c);
                }
            });
    }
    out
}

/// Asks Linux to back a large, not yet touched weight buffer with transparent huge pages where
/// the system allows them on request (`enabled` = `madvise`): 2 MiB faults instead of 512 small
/// ones while it fills, and fewer TLB misses each time a decoding step streams it.
fn prefer_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let len = std::mem::size_of_val(buf);
        if len < 2 * HUGE {
            return;
        }
        let start = buf.as_mut_ptr() as usize;
        let first = start.next_multiple_of(HUGE);
        let last = (start + len) / HUGE * HUGE;
        if last > first {
            // SAFETY: the range lies inside `buf`, which this function borrows mutably; the
            // advice changes how its pages are backed, never their contents. A refusal (old
            // kernel, THP off) leaves ordinary pages, so the result is ignored.
            let _ = unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_unit_axes_are_ignored() {
        assert!(same_shape(&[1, 4, 3], &[4, 3]));
        assert!(same_shape(&[4, 3], &[1, 4, 3]));
        assert!(!same_shape(&[4, 3], &[3, 4]));
        assert!(!same_shape(&[4, 1], &[4]));
    }

    /// Large tensors convert in parallel chunks; every element must land in its place.
    #[test]
    fn parallel_conversion_keeps_order() {
        let n = 5 * (1 << 16) + 123;
        let bits: Vec<u16> = (0..n)
            .map(|i| ((i * 2654435761usize) >> 7) as u16 & 0x7f7f)
            .collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let d = convert(&bytes, &StoredDType::BF16, ComputeDType::F32, vec![n]);
        let got: Vec<f32> = d.try_to_vec().unwrap();
        assert_eq!(got.len(), n);
        for (i, (g, b)) in got.iter().zip(&bits).enumerate() {
            assert_eq!(
                g.to_bits(),
                half::bf16::from_bits(*b).to_f32().to_bits(),
                "element {i}"
            );
        }
    }

    #[test]
    fn bf16_and_f16_convert_exactly() {
        let v = [1.5f32, -2.25, 0.0];
        let bf: Vec<u8> = v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect();
        let d = convert(&bf, &StoredDType::BF16, ComputeDType::F32, vec![3]);
        assert_eq!(d.try_to_vec::<f32>().unwrap(), v.to_vec());
        let f: Vec<u8> = v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
            .collect();
        let d = convert(&f, &StoredDType::F16, ComputeDType::F32, vec![3]);
        assert_eq!(d.try_to_vec::<f32>().unwrap(), v.to_vec());
        let d = convert(&bf, &StoredDType::BF16, ComputeDType::F16, vec![3]);
        assert_eq!(
            d.try_to_vec::<half::f16>().unwrap(),
            v.iter()
                .map(|x| half::f16::from_f32(*x))
                .collect::<Vec<_>>()
        );
    }
}
