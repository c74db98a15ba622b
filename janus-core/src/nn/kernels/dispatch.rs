//! Which instruction-set path the kernels take, detected at run time.

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// One implementation of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// Plain Rust, for every CPU (what the compiler vectorises on its own).
    Portable,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// x86-64 AVX-512 (foundation instructions).
    Avx512,
}

/// The environment variable that forces a path.
pub const ENV: &str = "JANUS_KERNELS";

impl KernelPath {
    /// Every path, widest last.
    pub const ALL: [KernelPath; 3] = [KernelPath::Portable, KernelPath::Avx2, KernelPath::Avx512];

    /// The name `JANUS_KERNELS` uses.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Portable => "portable",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            KernelPath::Portable => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx2 | KernelPath::Avx512 => false,
        }
    }

    /// The paths this CPU can run, widest last.
    pub fn available() -> Vec<KernelPath> {
        Self::ALL.into_iter().filter(|p| p.supported()).collect()
    }

    /// The widest path this CPU can run.
    pub fn best() -> KernelPath {
        Self::available().pop().unwrap_or(KernelPath::Portable)
    }

    /// Reads a path by name: `auto` is [`best`](Self::best); a path this CPU cannot run is an
    /// error.
    pub fn parse(name: &str) -> Result<KernelPath> {
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() || name == "auto" {
            return Ok(Self::best());
        }
        pick(
            ENV,
            &name,
            &Self::ALL,
            Self::name,
            Self::supported,
            "auto, ",
        )
    }

    /// The path of this process: `JANUS_KERNELS` if set, else the widest. Read once.
    pub fn selected() -> Result<KernelPath> {
        static SELECTED: OnceLock<std::result::Result<KernelPath, String>> = OnceLock::new();
        SELECTED
            .get_or_init(|| match std::env::var(ENV) {
                Ok(v) => Self::parse(&v).map_err(message),
                Err(_) => Ok(Self::best()),
            })
            .clone()
            .map_err(Error::InvalidInput)
    }
}

/// The text of an error, without the kind's prefix when it is [`Error::InvalidInput`] (kept
/// once per process and wrapped again on each use).
pub(crate) fn message(e: Error) -> String {
    match e {
        Error::InvalidInput(m) => m,
        other => other.to_string(),
    }
}

/// The value of `all` named `name` (already trimmed and lower-cased) that this machine runs, for
/// the environment variable `env`; `also` lists the names the caller handled itself (for the
/// message). Unknown names and paths this machine cannot run are [`Error::InvalidInput`].
pub(crate) fn pick<T: Copy>(
    env: &str,
    name: &str,
    all: &[T],
    name_of: fn(T) -> &'static str,
    supported: fn(T) -> bool,
    also: &str,
) -> Result<T> {
    let names = |keep: &dyn Fn(T) -> bool| {
        all.iter()
            .copied()
            .filter(|&p| keep(p))
            .map(name_of)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let path = all
        .iter()
        .copied()
        .find(|&p| name_of(p) == name)
        .ok_or_else(|| {
            Error::InvalidInput(format!("{env}={name}: expected {also}{}", names(&|_| true)))
        })?;
    if !supported(path) {
        return Err(Error::InvalidInput(format!(
            "{env}={name}: this machine cannot run that path (it can run: {})",
            names(&supported)
        )));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_unknown_ones_are_errors() {
        for p in KernelPath::available() {
            assert_eq!(KernelPath::parse(p.name()).unwrap(), p);
        }
        assert_eq!(KernelPath::parse("auto").unwrap(), KernelPath::best());
        assert_eq!(
            KernelPath::parse(" Portable ").unwrap(),
            KernelPath::Portable
        );
        assert!(matches!(
            KernelPath::parse("sse9"),
            Err(Error::InvalidInput(_))
        ));
        for p in KernelPath::ALL {
            if !p.supported() {
                assert!(matches!(
                    KernelPath::parse(p.name()),
                    Err(Error::InvalidInput(_))
                ));
            }
        }
        assert!(KernelPath::available().contains(&KernelPath::Portable));
    }
}
