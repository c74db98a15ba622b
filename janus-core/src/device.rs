//! Choosing where the model runs, at run time, among the backends compiled in.

use std::str::FromStr;

use burn::tensor::Device;

use crate::error::{Error, Result};

/// A compute backend, chosen by name (`cpu`, `wgpu`, `cuda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Burn's pure-Rust CPU backend (`flex`, feature `flex`, the default).
    Cpu,
    /// The best GPU wgpu finds through Vulkan, Metal or DX12 (feature `wgpu`).
    Wgpu,
    /// The first NVIDIA GPU (feature `cuda`).
    Cuda,
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(Backend::Cpu),
            "wgpu" | "vulkan" | "metal" | "gpu" => Ok(Backend::Wgpu),
            "cuda" => Ok(Backend::Cuda),
            other => Err(Error::InvalidInput(format!(
                "unknown backend `{other}` (expected cpu, wgpu or cuda)"
            ))),
        }
    }
}

impl Backend {
    /// The device of this backend, or an error naming the cargo feature that enables it.
    pub fn device(self) -> Result<Device> {
        match self {
            #[cfg(feature = "flex")]
            Backend::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "cuda")]
            Backend::Cuda => Ok(Device::cuda(0usize)),
            #[allow(unreachable_patterns)]
            other => Err(Error::Unsupported(format!(
                "the {other:?} backend is not compiled in (enable the cargo feature `{}`)",
                match other {
                    Backend::Cpu => "flex",
                    Backend::Wgpu => "wgpu",
                    Backend::Cuda => "cuda",
                }
            ))),
        }
    }
}

thread_local! {
    static HOST_READS: std::cell::Cell<HostReads> = const {
        std::cell::Cell::new(HostReads { count: 0, bytes: 0 })
    };
}

/// Reads of tensors back to the host from a device other than the CPU backend (whose tensors
/// are in host memory already), made by the calling thread since it started: see
/// [`host_reads`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostReads {
    /// How many reads.
    pub count: u64,
    /// How many bytes they carried.
    pub bytes: u64,
}

impl std::ops::Sub for HostReads {
    type Output = HostReads;

    /// The reads made between two snapshots.
    fn sub(self, earlier: HostReads) -> HostReads {
        HostReads {
            count: self.count - earlier.count,
            bytes: self.bytes - earlier.bytes,
        }
    }
}

/// The calling thread's reads from a GPU so far. On a GPU each token step of a generation or an
/// answer reads once, three numbers a row (the picked tokens); decoding images reads their
/// pixels. A diagnostic: reads that grow with the layers of the model, or whole rows of logits,
/// would mean a step waits on the host.
pub fn host_reads() -> HostReads {
    HOST_READS.with(std::cell::Cell::get)
}

/// Counts a read of `bytes` for [`host_reads`] when `device` is not the CPU backend.
pub(crate) fn count_host_read(device: &Device, bytes: usize) {
    if !is_cpu(device) {
        HOST_READS.with(|r| {
            let mut now = r.get();
            now.count += 1;
            now.bytes += bytes as u64;
            r.set(now);
        });
    }
}

/// Whether `device` is the CPU backend (flex) without autodiff: its memory is the process's own,
/// and host code may compute a step in place of the backend's operations. Under autodiff every
/// step must stay an operation the graph records, so the host paths are off (device equality
/// ignores autodiff, hence the second test).
pub(crate) fn is_cpu(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    {
        *device == Device::flex() && !device.is_autodiff()
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// The default device: the CPU backend when compiled in, else the first enabled backend.
pub fn default_device() -> Device {
    #[cfg(feature = "flex")]
    {
        Device::flex()
    }
    #[cfg(not(feature = "flex"))]
    {
        Device::default()
    }
}
