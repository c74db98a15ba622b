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
