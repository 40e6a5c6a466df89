//! Lacuna's CUDA backend: the kernels of a Llama decode step in CUDA C (`gpu/kernels/*.cu`),
//! compiled at run time by NVRTC for the device's architecture and cached on disk, and
//! [`GpuLlama`], the decoder with its weights uploaded once in their stored format.
//!
//! Nothing here needs CUDA to build: cudarc opens `libcuda` and `libnvrtc` with `dlopen` on first
//! use ([`nvrtc`] finds the NVRTC of the `nvidia-cuda-nvrtc-cu12` wheel), and every entry point
//! checks that they are there first and returns [`GpuError::NoDriver`] / [`GpuError::NoNvrtc`]
//! instead of letting cudarc panic. See `docs/gpu.md`.
//!
//! `unsafe` is confined to kernel launches and the NVRTC calls, each with a `// SAFETY:` comment,
//! behind shape-checked safe functions.

pub mod device;
pub mod emulate;
pub mod kernels;
pub mod launch;
pub mod llama;
pub mod nvrtc;

pub use device::{Gpu, GpuMatrix};
pub use llama::GpuLlama;

/// Errors of the CUDA backend. Absent libraries are their own variants so callers can say
/// "no CUDA driver found" plainly.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver found: {0}")]
    NoDriver(String),
    #[error("no NVRTC library found: {0}")]
    NoNvrtc(String),
    #[error("CUDA device {ordinal} does not exist ({count} device(s) found)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("NVRTC failed to compile {module} for {arch}:\n{log}")]
    Compile { module: String, arch: String, log: String },
    #[error("CUDA driver call failed: {0}")]
    Driver(String),
    #[error("kernel cache {path}: {source}")]
    Cache { path: String, source: std::io::Error },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("unsupported on the GPU: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Model(#[from] lacuna_model::Error),
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        GpuError::Driver(e.to_string())
    }
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;

/// Which device `--device` names: the CPU engine, or CUDA device `N` (`cuda` is `cuda:0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!("unknown device {s:?} (cpu, cuda or cuda:N)")),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceSpec;

    #[test]
    fn device_specs_parse_and_print() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }
}
