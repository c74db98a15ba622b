//! Checkpoint loading: finds the weight files of a model folder (single or sharded, safetensors or
//! pickled `.bin`), maps either layout's tensor names onto the one module tree, checks every shape,
//! and converts each tensor to the compute dtype as it is read, one tensor at a time.
//!
//! Building a model is done twice with the same code: a *plan* pass, in which [`Weights::get`]
//! only records what the module tree asks for and returns placeholders, so that every missing,
//! unexpected or wrong-shaped tensor is reported at once before anything large is read; then the
//! *load* pass, which reads and converts.

pub mod adapter;
mod keys;
pub(crate) mod pickle;
pub(crate) mod safetensors;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{Param, ParamId};
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::config::Layout;
use crate::error::{Error, Result, WeightMismatch};
#[cfg(feature = "flex")]
use crate::nn::kernels::winograd::ConvAlgo;
use crate::nn::kernels::{
    Bf16Gemm, HalfKind, KernelPath, QK, QuantKind, QuantMatrix, prefer_huge_pages,
};
use crate::nn::weight::{HalfBits, HalfMatrix, Matrix, WeightFormat};

use adapter::{LoraAdapter, LoraFactors};
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

    /// The storage `auto` gives on the CPU: the half precision most of the stored bytes have,
    /// else f32.
    fn stored_half(&self) -> WeightFormat {
        let (mut bf16, mut f16, mut other) = (0usize, 0usize, 0usize);
        for (_, t) in self.tensors.values() {
            let bytes = t.shape.iter().product::<usize>() * t.dtype.size().unwrap_or(0);
            match t.dtype {
                StoredDType::BF16 => bf16 += bytes,
                StoredDType::F16 => f16 += bytes,
                _ => other += bytes,
            }
        }
        if bf16 >= f16 && bf16 > other {
            WeightFormat::Bf16
        } else if f16 > other {
            WeightFormat::F16
        } else {
            WeightFormat::F32
        }
    }

    /// The tensors of weight file `file` (an index into [`files`](Self::files)), by name, each
    /// with its stored dtype, shape and little-endian bytes (borrowed from a mapped file, read
    /// from a pickled one).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for a tensor whose bytes cannot be read or do not fill its shape.
    pub(crate) fn file_tensors(&self, file: usize) -> Result<Vec<RawTensor<'_>>> {
        let mut names: Vec<&String> = self
            .tensors
            .iter()
            .filter(|(_, (i, _))| *i == file)
            .map(|(n, _)| n)
            .collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let (_, info) = &self.tensors[name];
            let bytes = match &info.source {
                TensorSource::Mapped { map, start, end } => {
                    std::borrow::Cow::Borrowed(&map[*start..*end])
                }
                TensorSource::Pickle(t) => std::borrow::Cow::Owned(
                    t.read()
                        .map_err(|e| Error::checkpoint(&self.files[file], e.to_string()))?,
                ),
            };
            let numel: usize = info.shape.iter().product();
            if info.dtype.size().is_some_and(|s| s * numel != bytes.len()) {
                return Err(Error::checkpoint(
                    &self.files[file],
                    format!(
                        "tensor {name} has {} bytes for shape {:?}",
                        bytes.len(),
                        info.shape
                    ),
                ));
            }
            out.push((name.clone(), info.dtype.clone(), info.shape.clone(), bytes));
        }
        Ok(out)
    }

    /// Whether the weights are pickled (`pytorch_model.bin`, sharded or not).
    pub(crate) fn is_pickled(&self) -> bool {
        self.files
            .first()
            .is_some_and(|f| f.extension().and_then(|e| e.to_str()) == Some("bin"))
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.tensors
            .get(name)
            .map(|(i, _)| self.files[*i].clone())
            .unwrap_or_else(|| self.dir.clone())
    }
}

/// A stored tensor: name, dtype, shape and little-endian bytes.
pub(crate) type RawTensor<'a> = (String, StoredDType, Vec<usize>, std::borrow::Cow<'a, [u8]>);

/// A sharded checkpoint's shard files (in order) and its tensor → shard pairs.
type ShardIndex = (Vec<PathBuf>, Vec<(String, String)>);

/// The shard names (sorted) and tensor → shard pairs an index lists.
pub(crate) type IndexEntries = (BTreeSet<String>, Vec<(String, String)>);

/// Reads a sharded checkpoint's index.
fn read_index(dir: &Path, index_path: &Path) -> Result<ShardIndex> {
    let value = crate::config::read_json(index_path)?;
    let (shards, pairs) = index_entries(index_path, &value)?;
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

/// The shard names (sorted, each a plain file name) and tensor → shard pairs of a sharded
/// checkpoint's index `value` (read from `index_path`, which names it in errors).
pub(crate) fn index_entries(index_path: &Path, value: &serde_json::Value) -> Result<IndexEntries> {
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
    Ok((shards, pairs))
}

/// The dtype weights are converted to, and computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDType {
    /// The fastest dtype that keeps the reference's quality, resolved when a model loads
    /// ([`JanusModel::dtype`](crate::JanusModel::dtype) tells which): `bf16` on a CPU with AMX
    /// (where the bf16 path is measured 2–3× faster than f32) when the weights are held in bf16
    /// (`--weights auto` on bf16 files, which every published Janus checkpoint is, or `--weights
    /// bf16`); `f32` otherwise and on a GPU. AVX512-BF16 alone does not make it `bf16`: on the
    /// Intel CPU measured, its products are slower than f32's (`BENCHMARKS.md`).
    #[default]
    Auto,
    /// 32-bit float (the one parity with the f32 references is proven in).
    F32,
    /// IEEE half.
    F16,
    /// bfloat16. On a GPU, tensors in bf16. On the CPU, activations stay f32 and weights are
    /// held in bf16; the prompt-shaped products (prefill, SigLIP, aligners) take bf16 operands
    /// with f32 sums on AMX or AVX512-BF16 where the CPU has them (`JANUS_BF16_GEMM` picks one),
    /// the exact f32 product elsewhere. Norms, softmax, RoPE, decoding steps and the VQ decoder
    /// stay f32.
    BF16,
}

impl ComputeDType {
    /// Every value, `auto` first.
    pub const ALL: [ComputeDType; 4] = [
        ComputeDType::Auto,
        ComputeDType::F32,
        ComputeDType::F16,
        ComputeDType::BF16,
    ];

    /// The name used by the CLI, Python and JSON (`auto`, `f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            ComputeDType::Auto => "auto",
            ComputeDType::F32 => "f32",
            ComputeDType::F16 => "f16",
            ComputeDType::BF16 => "bf16",
        }
    }

    /// What `self` means for a model of checkpoint `ckpt` on `device` with weights `choice`
    /// (never [`Auto`](Self::Auto); other values are themselves).
    pub(crate) fn resolve(self, device: &Device, choice: WeightFormat, ckpt: &Checkpoint) -> Self {
        if self != ComputeDType::Auto {
            return self;
        }
        let bf16_weights = match choice {
            WeightFormat::Bf16 => true,
            WeightFormat::Auto => ckpt.stored_half() == WeightFormat::Bf16,
            _ => false,
        };
        let bf16_path = matches!(Bf16Gemm::selected(), Ok(Some(Bf16Gemm::Amx)));
        if crate::device::is_cpu(device) && bf16_weights && bf16_path {
            ComputeDType::BF16
        } else {
            ComputeDType::F32
        }
    }

    /// The Burn dtype ([`Auto`](Self::Auto), unresolved, holds f32).
    pub fn burn(self) -> DType {
        match self {
            ComputeDType::Auto | ComputeDType::F32 => DType::F32,
            ComputeDType::F16 => DType::F16,
            ComputeDType::BF16 => DType::BF16,
        }
    }
}

/// What the loaded weights hold in memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WeightStorage {
    /// What the choice resolved to (never [`WeightFormat::Auto`]): `auto` on the CPU is the
    /// half precision the files store (bf16 or f16, by most of their bytes), else f32; on a GPU
    /// the compute dtype. Weights a quantized format does not apply to keep `auto`'s storage
    /// ([`by_format`](Self::by_format) tells).
    pub format: WeightFormat,
    /// Bytes held by all weights.
    pub bytes: usize,
    /// Bytes held in each storage, largest first.
    pub by_format: Vec<(WeightFormat, usize)>,
    /// Bytes of them read in place from the memory-mapped checkpoint files (pages of the
    /// system's file cache, shared with other processes that map the same files; see
    /// [`in_place`]).
    pub mapped: usize,
}

/// Checks that `choice` is possible for this device and compute dtype, before anything is read.
///
/// # Errors
/// [`Error::Unsupported`] for a compute dtype the GPU's adapter does not offer (bf16 where WGSL
/// is all there is, f16 without shader-f16) or a storage a GPU backend does not have (anything but
/// `auto` and the compute dtype); [`Error::InvalidInput`] for `q8_0`/`q4_0` or `f32` storage with a compute
/// dtype other than f32, or a `JANUS_KERNELS` value this CPU cannot run.
pub(crate) fn check_weight_format(
    choice: WeightFormat,
    device: &Device,
    dtype: ComputeDType,
) -> Result<()> {
    if dtype == ComputeDType::Auto {
        // Auto resolves to a dtype the choice can take.
        KernelPath::selected()?;
        #[cfg(feature = "flex")]
        ConvAlgo::selected()?;
        return Ok(());
    }
    let compute = match dtype {
        ComputeDType::Auto | ComputeDType::F32 => WeightFormat::F32,
        ComputeDType::F16 => WeightFormat::F16,
        ComputeDType::BF16 => WeightFormat::Bf16,
    };
    if !crate::device::is_cpu(device) {
        if dtype != ComputeDType::F32 && !device.supports_dtype(dtype.burn()) {
            return Err(Error::Unsupported(format!(
                "compute dtype {} on this GPU: its adapter does not offer it{} (use --dtype f32{})",
                dtype.name(),
                if dtype == ComputeDType::BF16 {
                    " (WGSL has no bf16; Vulkan adapters with bf16 shaders and CUDA do)"
                } else {
                    " (wgpu needs the shader-f16 feature)"
                },
                if dtype == ComputeDType::BF16 && device.supports_dtype(DType::F16) {
                    " or f16"
                } else {
                    ""
                }
            )));
        }
        if choice != WeightFormat::Auto && choice != compute {
            return Err(Error::Unsupported(format!(
                "weights {choice} on a GPU backend: GPUs hold weights in the compute dtype \
                 (use --weights auto or {compute})"
            )));
        }
        return Ok(());
    }
    if dtype != ComputeDType::F32
        && matches!(
            choice,
            WeightFormat::F32 | WeightFormat::Q8_0 | WeightFormat::Q4_0
        )
    {
        return Err(Error::InvalidInput(format!(
            "weights {choice} compute in f32: use --dtype f32 (the compute dtype is {compute})"
        )));
    }
    KernelPath::selected()?;
    #[cfg(feature = "flex")]
    ConvAlgo::selected()?;
    if dtype == ComputeDType::BF16 {
        Bf16Gemm::selected()?;
    }
    Ok(())
}

/// Hands tensors to the module tree by their canonical (original-layout) names.
pub(crate) struct Weights<'a> {
    ckpt: &'a Checkpoint,
    keys: FileKeys,
    device: Device,
    /// The dtype of the tensors: f32 on the CPU when bf16 compute is asked for.
    dtype: ComputeDType,
    format: WeightFormat,
    cpu: bool,
    /// bf16 compute on the CPU: f32 activations, bf16 weights, prompt-shaped products with
    /// bf16 operands (see [`HalfMatrix::bf16_products`]).
    bf16_products: bool,
    plan: bool,
    used: HashSet<String>,
    mismatch: WeightMismatch,
    error: Option<Error>,
    resident: HashMap<WeightFormat, usize>,
    mapped: usize,
    /// The canonical name of every parameter made ([`param`](Self::param), dense matrices).
    names: HashMap<ParamId, String>,
    /// A LoRA adapter merged into the weights it adapts as they are read.
    adapter: Option<&'a LoraAdapter>,
    /// The adapter's layers merged so far (by module name).
    adapted: HashSet<String>,
}

/// One file tensor behind a canonical name: its key, its metadata, the shape expected of it.
type Part<'a> = (String, &'a TensorInfo, Vec<usize>);

/// The storage one matrix gets.
enum Target {
    Dense,
    Half(HalfKind),
    Quant(QuantKind),
}

impl<'a> Weights<'a> {
    /// `format` must have passed [`check_weight_format`].
    pub(crate) fn new(
        ckpt: &'a Checkpoint,
        layout: Layout,
        device: &Device,
        dtype: ComputeDType,
        format: WeightFormat,
        plan: bool,
    ) -> Self {
        let cpu = crate::device::is_cpu(device);
        let bf16_products = cpu && dtype == ComputeDType::BF16;
        Weights {
            ckpt,
            keys: FileKeys::new(layout),
            device: device.clone(),
            dtype: if bf16_products {
                ComputeDType::F32
            } else {
                dtype
            },
            format,
            cpu,
            bf16_products,
            plan,
            used: HashSet::new(),
            mismatch: WeightMismatch::default(),
            error: None,
            resident: HashMap::new(),
            mapped: 0,
            names: HashMap::new(),
            adapter: None,
            adapted: HashSet::new(),
        }
    }

    /// Merges `adapter`'s layers into the weights they adapt as they are read.
    pub(crate) fn with_adapter(mut self, adapter: Option<&'a LoraAdapter>) -> Self {
        self.adapter = adapter;
        self
    }

    /// The adapter's factors of each part of a matrix (by the part's file key), where the
    /// adapter has any; a factor pair whose widths do not fit the part is recorded as an error.
    fn adapter_parts(
        &mut self,
        parts: &[Part<'a>],
        d_in: usize,
    ) -> Option<Vec<Option<&'a LoraFactors>>> {
        let adapter = self.adapter?;
        let found: Vec<Option<&'a LoraFactors>> = parts
            .iter()
            .map(|(key, _, _)| {
                key.strip_suffix(".weight")
                    .and_then(|module| adapter.layers.get(module))
            })
            .collect();
        if found.iter().all(Option::is_none) {
            return None;
        }
        for ((key, _, shape), f) in parts.iter().zip(&found) {
            if let Some(f) = f
                && (f.d_in != d_in || f.d_out != shape[0])
            {
                self.error.get_or_insert(Error::Checkpoint {
                    path: adapter.dir.join(adapter::ADAPTER_WEIGHTS),
                    message: format!(
                        "the adapter of {key} is [{}, {}] → [{}, {}], the weight is [{}, {d_in}]",
                        f.d_in, f.rank, f.rank, f.d_out, shape[0]
                    ),
                });
            }
        }
        Some(found)
    }

    /// [`get`](Self::get) as a parameter (no gradient unless training asks for one), its
    /// canonical name recorded.
    pub(crate) fn param<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
    ) -> Param<Tensor<D>> {
        let p = Param::initialized(ParamId::new(), self.get(name, shape));
        self.names.insert(p.id, name.to_string());
        p
    }

    /// The canonical name of each parameter made, by id (what saving a trained model writes).
    pub(crate) fn take_names(&mut self) -> HashMap<ParamId, String> {
        std::mem::take(&mut self.names)
    }

    /// The compute dtype's storage name.
    fn dense_format(&self) -> WeightFormat {
        match self.dtype {
            ComputeDType::Auto | ComputeDType::F32 => WeightFormat::F32,
            ComputeDType::F16 => WeightFormat::F16,
            ComputeDType::BF16 => WeightFormat::Bf16,
        }
    }

    /// The storage of a matrix stored as `stored` with rows of `d_in`: on a GPU the compute
    /// dtype; on the CPU the choice, where `auto` keeps half-precision files as they are (and
    /// holds f32 ones in bf16 for bf16 compute) and quantized formats apply to `quantizable`
    /// matrices with whole blocks per row only (others keep what `auto` gives).
    fn target(&self, stored: &StoredDType, d_in: usize, quantizable: bool) -> Target {
        if !self.cpu {
            return Target::Dense;
        }
        let auto = match stored {
            StoredDType::BF16 => Target::Half(HalfKind::Bf16),
            StoredDType::F16 => Target::Half(HalfKind::F16),
            _ if self.bf16_products => Target::Half(HalfKind::Bf16),
            _ => Target::Dense,
        };
        match self.format {
            WeightFormat::Auto => auto,
            WeightFormat::F32 => Target::Dense,
            WeightFormat::Bf16 => Target::Half(HalfKind::Bf16),
            WeightFormat::F16 => Target::Half(HalfKind::F16),
            WeightFormat::Q8_0 | WeightFormat::Q4_0 => match self.format.quant() {
                Some(kind) if quantizable && d_in.is_multiple_of(QK) => Target::Quant(kind),
                _ => auto,
            },
        }
    }

    /// Whether the checkpoint holds the tensor with this canonical name.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.keys
            .file_keys(name)
            .iter()
            .all(|k| self.ckpt.tensors.contains_key(k))
    }

    /// The file tensors behind a canonical name (several when HF splits it along the first
    /// axis), each with its part's shape, once every check passed; `None` in the plan pass, after
    /// a problem (recorded, see [`finish`](Self::finish)) or after a read error.
    fn locate(&mut self, name: &str, shape: &[usize]) -> Option<Vec<Part<'a>>> {
        let ckpt: &'a Checkpoint = self.ckpt;
        let parts = self.keys.file_keys(name);
        let mut infos = Vec::with_capacity(parts.len());
        let mut ok = true;
        for key in &parts {
            self.used.insert(key.clone());
            match ckpt.tensors.get(key) {
                Some((_, info)) => infos.push(info),
                None => {
                    self.mismatch.missing.push(key.clone());
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        // Parts are concatenated along the first axis (HF's split q/k/v).
        let n = parts.len();
        let mut part_shape = shape.to_vec();
        if n > 1 {
            if !part_shape[0].is_multiple_of(n) {
                for (key, info) in parts.iter().zip(&infos) {
                    self.mismatch.wrong_shape.push((
                        key.clone(),
                        shape.to_vec(),
                        info.shape.clone(),
                    ));
                }
                return None;
            }
            part_shape[0] /= n;
        }
        for (key, info) in parts.iter().zip(&infos) {
            if !same_shape(&part_shape, &info.shape) {
                self.mismatch.wrong_shape.push((
                    key.clone(),
                    part_shape.clone(),
                    info.shape.clone(),
                ));
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
            return None;
        }
        Some(
            parts
                .into_iter()
                .zip(infos)
                .map(|(k, i)| (k, i, part_shape.clone()))
                .collect(),
        )
    }

    /// The tensor with this canonical name, which must have `shape`, in the compute dtype.
    /// Problems are recorded (see [`finish`](Self::finish)) and a placeholder is returned, so
    /// that all of them are found in one pass.
    pub(crate) fn get<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Tensor<D> {
        let Some(parts) = self.locate(name, &shape) else {
            return self.placeholder();
        };
        let mut pieces = Vec::with_capacity(parts.len());
        for (key, info, part_shape) in parts {
            match self.read(&key, info, part_shape) {
                Ok(t) => pieces.push(t),
                Err(e) => {
                    self.error = Some(e);
                    return self.placeholder();
                }
            }
        }
        let t = if pieces.len() == 1 {
            pieces.pop().expect("one piece")
        } else {
            Tensor::cat(pieces, 0)
        };
        let bytes = shape.iter().product::<usize>() * self.dtype.burn().size();
        *self.resident.entry(self.dense_format()).or_default() += bytes;
        t
    }

    /// A weight with this canonical name and `shape`, held as a matrix `[shape[0], rest]`
    /// (a convolution's `[out, in, k, k]` is `[out, in·k·k]`) in the storage the load options
    /// ask for (see [`target`](Self::target)); `quantizable` is false for weights that are not
    /// multiplied as matrices (they keep `auto`'s storage under a quantized format).
    pub(crate) fn matrix(&mut self, name: &str, shape: &[usize], quantizable: bool) -> Matrix {
        if let Some(adapter) = self.adapter {
            for key in self.keys.file_keys(name) {
                if let Some(module) = key.strip_suffix(".weight")
                    && adapter.layers.contains_key(module)
                {
                    self.adapted.insert(module.to_string());
                }
            }
        }
        let Some(parts) = self.locate(name, shape) else {
            return Matrix::dense_param(self.placeholder());
        };
        let out = shape[0];
        let d_in: usize = shape[1..].iter().product();
        if let Some(adapted) = self.adapter_parts(&parts, d_in) {
            if shape.len() != 2 {
                self.error.get_or_insert(Error::Unsupported(format!(
                    "{name}: adapters of convolutions are not applied"
                )));
            }
            if self.error.is_some() {
                return Matrix::dense_param(self.placeholder());
            }
            return self.merged_matrix(name, &parts, &adapted, out, d_in, quantizable);
        }
        let m = match self.target(&parts[0].1.dtype, d_in, quantizable) {
            Target::Dense => self.read_dense(&parts, d_in).map(Matrix::dense_param),
            Target::Half(kind) => self.read_half(&parts, kind, out * d_in).map(|bits| {
                Matrix::Half(std::sync::Arc::new(HalfMatrix {
                    kind,
                    bits,
                    out,
                    d_in,
                    bf16_products: self.bf16_products && kind == HalfKind::Bf16,
                }))
            }),
            Target::Quant(kind) => self
                .read_quant(&parts, kind, out, d_in)
                .map(|q| Matrix::Quant(std::sync::Arc::new(q))),
        };
        self.record(name, m)
    }

    /// A weight with an adapter merged: the parts' values as f32, each plus its adapter's
    /// `s·B·A`, then held in the storage [`matrix`](Self::matrix) would give the weight.
    fn merged_matrix(
        &mut self,
        name: &str,
        parts: &[Part<'a>],
        adapted: &[Option<&LoraFactors>],
        out: usize,
        d_in: usize,
        quantizable: bool,
    ) -> Matrix {
        let scale = self.adapter.map_or(1.0, |a| a.scale);
        let mut values = vec![0f32; out * d_in];
        let mut at = 0;
        for ((key, info, shape), f) in parts.iter().zip(adapted) {
            let numel = shape[0] * d_in;
            let bytes = match self.bytes_of(key, info, numel) {
                Ok(b) => b,
                Err(e) => {
                    self.error = Some(e);
                    return Matrix::dense_param(self.placeholder());
                }
            };
            let dst = &mut values[at..at + numel];
            decode_f32(&bytes, &info.dtype, dst);
            drop(bytes);
            release(info);
            if let Some(f) = f {
                for (v, d) in dst.iter_mut().zip(f.delta(scale)) {
                    *v += d;
                }
            }
            at += numel;
        }
        let m = match self.target(&parts[0].1.dtype, d_in, quantizable) {
            Target::Dense => {
                let t = Tensor::<2>::from_data(TensorData::new(values, [out, d_in]), &self.device);
                Ok(Matrix::dense_param(t.cast(self.dtype.burn())))
            }
            Target::Half(kind) => {
                let bits: Vec<u16> = values
                    .iter()
                    .map(|&v| match kind {
                        HalfKind::Bf16 => half::bf16::from_f32(v).to_bits(),
                        HalfKind::F16 => half::f16::from_f32(v).to_bits(),
                    })
                    .collect();
                Ok(Matrix::Half(Arc::new(HalfMatrix {
                    kind,
                    bits: bits.into(),
                    out,
                    d_in,
                    bf16_products: self.bf16_products && kind == HalfKind::Bf16,
                })))
            }
            Target::Quant(kind) => QuantMatrix::quantize(kind, out, d_in, |o, buf| {
                buf.copy_from_slice(&values[o * d_in..(o + 1) * d_in]);
            })
            .map(|q| Matrix::Quant(Arc::new(q))),
        };
        self.record(name, m)
    }

    /// A matrix made (its name kept, its bytes counted), or the error that stopped it recorded.
    fn record(&mut self, name: &str, m: Result<Matrix>) -> Matrix {
        match m {
            Ok(m) => {
                if let Matrix::Dense(p) = &m {
                    self.names.insert(p.id, name.to_string());
                }
                *self.resident.entry(m.format()).or_default() += m.bytes();
                if matches!(&m, Matrix::Half(h) if h.bits.is_mapped()) {
                    self.mapped += m.bytes();
                }
                m
            }
            Err(e) => {
                self.error = Some(e);
                Matrix::dense_param(self.placeholder())
            }
        }
    }

    /// Parts as one `[rows, d_in]` tensor in the compute dtype.
    fn read_dense(&self, parts: &[Part<'a>], d_in: usize) -> Result<Tensor<2>> {
        let mut pieces = Vec::with_capacity(parts.len());
        for (key, info, shape) in parts {
            pieces.push(self.read::<2>(key, info, vec![shape[0], d_in])?);
        }
        Ok(if pieces.len() == 1 {
            pieces.pop().expect("one piece")
        } else {
            Tensor::cat(pieces, 0)
        })
    }

    /// The stored bytes of one file tensor of `numel` elements, checked for length.
    fn bytes_of(
        &self,
        key: &str,
        info: &'a TensorInfo,
        numel: usize,
    ) -> Result<std::borrow::Cow<'a, [u8]>> {
        let bytes = match &info.source {
            TensorSource::Mapped { map, start, end } => {
                std::borrow::Cow::Borrowed(&map[*start..*end])
            }
            TensorSource::Pickle(t) => std::borrow::Cow::Owned(
                t.read()
                    .map_err(|e| Error::checkpoint(self.ckpt.path_of(key), e.to_string()))?,
            ),
        };
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
        Ok(bytes)
    }

    /// Parts as 16-bit patterns of `kind`, concatenated: read in place from the mapped file
    /// where one stored tensor already holds them (see [`in_place`]), else copied.
    fn read_half(&self, parts: &[Part<'a>], kind: HalfKind, total: usize) -> Result<HalfBits> {
        use rayon::prelude::*;
        if let [(key, info, shape)] = parts
            && let Some(bits) = self.half_in_place(info, kind)
        {
            // The length check of a copy (a borrow of the map: nothing is read).
            self.bytes_of(key, info, shape.iter().product())?;
            return Ok(bits);
        }
        let mut bits = vec![0u16; total];
        prefer_huge_pages(&mut bits);
        let mut at = 0;
        for (key, info, shape) in parts {
            let numel: usize = shape.iter().product();
            let bytes = self.bytes_of(key, info, numel)?;
            let size = info.dtype.size().unwrap_or(1);
            const CHUNK: usize = 1 << 16;
            bits[at..at + numel]
                .par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(CHUNK * size))
                .for_each(|(dst, src)| encode_half(src, &info.dtype, kind, dst));
            drop(bytes);
            release(info);
            at += numel;
        }
        Ok(bits.into())
    }

    /// The stored patterns of a mapped tensor of `kind`, borrowed from the map (its pages asked
    /// for now, so that the first product does not fault them in one by one).
    fn half_in_place(&self, info: &TensorInfo, kind: HalfKind) -> Option<HalfBits> {
        let TensorSource::Mapped { map, start, end } = &info.source else {
            return None;
        };
        let same = matches!(
            (&info.dtype, kind),
            (StoredDType::BF16, HalfKind::Bf16) | (StoredDType::F16, HalfKind::F16)
        );
        if !same || !in_place() {
            return None;
        }
        let bits = HalfBits::mapped(Arc::clone(map), *start, *end)?;
        #[cfg(target_os = "linux")]
        {
            // A refusal (a kernel older than 5.14) only leaves the pages to be faulted on use.
            let _ = map.advise_range(memmap2::Advice::PopulateRead, *start, *end - *start);
        }
        Some(bits)
    }

    /// Parts quantized row by row into one matrix.
    fn read_quant(
        &self,
        parts: &[Part<'a>],
        kind: QuantKind,
        out: usize,
        d_in: usize,
    ) -> Result<QuantMatrix> {
        let per_part = out / parts.len();
        let mut sources = Vec::with_capacity(parts.len());
        for (key, info, shape) in parts {
            let bytes = self.bytes_of(key, info, shape.iter().product())?;
            sources.push((bytes, &info.dtype));
        }
        let q = QuantMatrix::quantize(kind, out, d_in, |o, buf| {
            let (bytes, dtype) = &sources[o / per_part];
            let size = dtype.size().unwrap_or(1);
            let r = o % per_part;
            decode_f32(&bytes[r * d_in * size..(r + 1) * d_in * size], dtype, buf);
        })?;
        drop(sources);
        for (_, info, _) in parts {
            release(info);
        }
        Ok(q)
    }
    fn read<const D: usize>(
        &self,
        key: &str,
        info: &'a TensorInfo,
        shape: Vec<usize>,
    ) -> Result<Tensor<D>> {
        let numel: usize = shape.iter().product();
        let bytes = self.bytes_of(key, info, numel)?;
        let data = convert(&bytes, &info.dtype, self.dtype, shape);
        drop(bytes);
        release(info);
        Ok(Tensor::from_data(data, (&self.device, self.dtype.burn())))
    }

    fn placeholder<const D: usize>(&self) -> Tensor<D> {
        Tensor::zeros([1; D], (&self.device, self.dtype.burn()))
    }

    /// Ends a pass: any read error, or any mismatch between the checkpoint and the module tree
    /// (tensors nobody asked for included, except those the reference ignores too).
    pub(crate) fn finish(mut self) -> Result<WeightStorage> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if let Some(adapter) = self.adapter {
            let unused: Vec<&str> = adapter
                .layers
                .keys()
                .filter(|m| !self.adapted.contains(*m))
                .map(String::as_str)
                .collect();
            if !unused.is_empty() {
                return Err(Error::Checkpoint {
                    path: adapter.dir.join(adapter::ADAPTER_WEIGHTS),
                    message: format!(
                        "the adapter targets {} layer(s) this model does not have (or that \
                         are not linear layers), e.g. {}: is it an adapter of another model \
                         or layout?",
                        unused.len(),
                        unused[..unused.len().min(3)].join(", ")
                    ),
                });
            }
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
            let mut by_format: Vec<(WeightFormat, usize)> =
                std::mem::take(&mut self.resident).into_iter().collect();
            by_format.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.name().cmp(b.0.name())));
            let format = match self.format {
                WeightFormat::Auto if self.cpu => self.ckpt.stored_half(),
                WeightFormat::Auto => self.dense_format(),
                chosen => chosen,
            };
            Ok(WeightStorage {
                format,
                bytes: by_format.iter().map(|f| f.1).sum(),
                by_format,
                mapped: self.mapped,
            })
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

/// Whether bf16/f16 weights stored as they are held are read in place from the mapped
/// checkpoint files (the default: no copy, and the model's weights share the system's cached
/// pages of the files). `JANUS_MMAP=0` copies them into memory of the process instead, for files
/// that may be rewritten in place while the model runs (a mapped file that shrinks under a
/// running model ends it with `SIGBUS`).
pub fn in_place() -> bool {
    !matches!(
        std::env::var("JANUS_MMAP").as_deref(),
        Ok("0" | "false" | "off" | "no")
    )
}

/// Lets the kernel drop the pages of a mapped tensor whose bytes are no longer needed, so that
/// the mapped file does not add to the resident memory while the model loads.
fn release(info: &TensorInfo) {
    #[cfg(unix)]
    if let TensorSource::Mapped { map, start, end } = &info.source {
        // SAFETY: the map is a read-only, never-written file mapping, and the callers hold no
        // reference into the range any more; discarded pages are read from the file again if a
        // later access needs them.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, *start, *end - *start)
        };
    }
    #[cfg(not(unix))]
    let _ = info;
}

/// The value of one stored element (`c` holds its bytes, little-endian).
#[inline(always)]
fn stored_value(c: &[u8], dtype: &StoredDType) -> f32 {
    match dtype {
        StoredDType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        StoredDType::BF16 => half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
        StoredDType::F16 => half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
        StoredDType::F64 => {
            f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
        }
        StoredDType::Other(_) => 0.0,
    }
}

/// Stored elements as f32 (`dst.len()` of them).
fn decode_f32(src: &[u8], dtype: &StoredDType, dst: &mut [f32]) {
    let size = dtype.size().unwrap_or(1);
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(size)) {
        *d = stored_value(c, dtype);
    }
}

/// Stored elements as `kind`'s 16-bit patterns: copied when the file stores `kind`, else
/// rounded to nearest even from their value.
fn encode_half(src: &[u8], dtype: &StoredDType, kind: HalfKind, dst: &mut [u16]) {
    let size = dtype.size().unwrap_or(1);
    let same = matches!(
        (dtype, kind),
        (StoredDType::BF16, HalfKind::Bf16) | (StoredDType::F16, HalfKind::F16)
    );
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(size)) {
        *d = if same {
            u16::from_le_bytes([c[0], c[1]])
        } else {
            let v = stored_value(c, dtype);
            match kind {
                HalfKind::Bf16 => half::bf16::from_f32(v).to_bits(),
                HalfKind::F16 => half::f16::from_f32(v).to_bits(),
            }
        };
    }
}

/// Converts little-endian stored bytes to the compute dtype, in parallel chunks (the output
/// pages are first touched by the threads that fill them).
fn convert(bytes: &[u8], from: &StoredDType, to: ComputeDType, shape: Vec<usize>) -> TensorData {
    use half::{bf16, f16};
    let u16_at = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
    let f32_at = |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    let f64_at =
        |c: &[u8]| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32;
    // Auto is resolved before any tensor is read; unresolved, it stands for f32.
    match (to, from) {
        (ComputeDType::Auto | ComputeDType::F32, StoredDType::F32) => {
            TensorData::new(map_elems(bytes, 4, f32_at), shape)
        }
        (ComputeDType::Auto | ComputeDType::F32, StoredDType::BF16) => TensorData::new(
            map_elems(bytes, 2, |c| bf16::from_bits(u16_at(c)).to_f32()),
            shape,
        ),
        (ComputeDType::Auto | ComputeDType::F32, StoredDType::F16) => TensorData::new(
            map_elems(bytes, 2, |c| f16::from_bits(u16_at(c)).to_f32()),
            shape,
        ),
        (ComputeDType::Auto | ComputeDType::F32, StoredDType::F64) => {
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
        (ComputeDType::Auto | ComputeDType::F32, StoredDType::Other(_)) => {
            TensorData::new(Vec::<f32>::new(), shape)
        }
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
