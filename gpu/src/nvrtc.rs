//! Finding NVRTC, compiling the kernel modules with it, and the on-disk cache of the results.
//!
//! NVRTC is opened with `dlopen`, never linked: from `$LACUNA_NVRTC_LIB` when set (a path to
//! `libnvrtc.so.12`), else from the `nvidia-cuda-nvrtc-cu12` wheel in the virtualenv that
//! `scripts/test-deps.sh` creates (`$LACUNA_CACHE/venvs/compressed-tensors/lib/python3*/
//! site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12`), else from the loader's search path (a CUDA
//! toolkit on `LD_LIBRARY_PATH`). cudarc looks the library up by name (`libnvrtc.so`,
//! `libnvrtc.so.12`, ...): opening the wheel's file by its full path first registers its soname
//! `libnvrtc.so.12` with the dynamic loader, so cudarc's lookup by that name finds the same
//! library without touching `LD_LIBRARY_PATH` (which a running process cannot change for itself).
//!
//! A module is compiled for a real architecture (`--gpu-architecture=sm_XY`, from the device's
//! compute capability) into a CUBIN; for a device newer than this NVRTC knows, into PTX for the
//! newest virtual architecture it supports, which the driver finishes compiling. Results are cached
//! under `$LACUNA_CACHE/gpu-kernels/`, keyed by the source's SHA-256, the target and the NVRTC
//! version, and written atomically (temporary file, fsync, rename).

use std::ffi::{CStr, CString, c_char, c_int};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;
use sha2::{Digest, Sha256};

use crate::kernels::Module;
use crate::{GpuError, Result};

/// Path of `libnvrtc.so.12` to use instead of the default locations.
pub const NVRTC_LIB_ENV: &str = "LACUNA_NVRTC_LIB";

/// Options every module is compiled with. Warnings are kept (not `-w`): the compile test fails
/// on any line NVRTC logs, and the runtime reports them.
const OPTIONS: &[&str] = &["--std=c++17", "--extra-device-vectorization"];

/// The NVRTC in use.
#[derive(Clone, Debug)]
pub struct Nvrtc {
    /// The file opened by path, `None` when the loader's search path provided it.
    pub path: Option<PathBuf>,
    pub version: (i32, i32),
    /// Real architectures it compiles for (`80` for sm_80, ...), ascending.
    pub archs: Vec<u32>,
}

/// What one compilation produces for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Machine code for `sm_XY`.
    Cubin(u32),
    /// PTX for `compute_XY`, for devices newer than this NVRTC.
    Ptx(u32),
}

impl Target {
    /// The target for a device of compute capability `(major, minor)` given what NVRTC supports.
    pub fn for_device(cc: (u32, u32), supported: &[u32]) -> Result<Target> {
        let want = cc.0 * 10 + cc.1;
        if supported.contains(&want) {
            return Ok(Target::Cubin(want));
        }
        match supported.iter().copied().filter(|a| *a <= want).max() {
            Some(best) => Ok(Target::Ptx(best)),
            None => Err(GpuError::Unsupported(format!(
                "compute capability {}.{}: this NVRTC compiles for {supported:?} only",
                cc.0, cc.1
            ))),
        }
    }
    pub fn option(self) -> String {
        match self {
            Target::Cubin(a) => format!("--gpu-architecture=sm_{a}"),
            Target::Ptx(a) => format!("--gpu-architecture=compute_{a}"),
        }
    }
    fn tag(self) -> String {
        match self {
            Target::Cubin(a) => format!("sm_{a}"),
            Target::Ptx(a) => format!("compute_{a}"),
        }
    }
    fn extension(self) -> &'static str {
        match self {
            Target::Cubin(_) => "cubin",
            Target::Ptx(_) => "ptx",
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.tag())
    }
}

/// Candidate files for NVRTC, in order: `$LACUNA_NVRTC_LIB` alone when set, else the test
/// virtualenv's wheel (every `python3*` directory).
pub fn candidate_paths() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os(NVRTC_LIB_ENV).filter(|v| !v.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let Ok(cache) = lacuna_data::Cache::from_env() else { return Vec::new() };
    let lib = cache.root().join("venvs/compressed-tensors/lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found
}

/// Opens NVRTC once per process (see the module docs for where it looks).
pub fn load() -> Result<&'static Nvrtc> {
    static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
    NVRTC.get_or_init(open).as_ref().map_err(|e| GpuError::NoNvrtc(e.clone()))
}

fn open() -> std::result::Result<Nvrtc, String> {
    let explicit = std::env::var_os(NVRTC_LIB_ENV).is_some_and(|v| !v.is_empty());
    let mut path = None;
    for p in candidate_paths() {
        // SAFETY: loading NVRTC runs its initialisers, which have no preconditions; the library
        // stays loaded for the life of the process (leaked below), so cudarc's function pointers
        // into it never dangle.
        match unsafe { libloading::Library::new(&p) } {
            Ok(lib) => {
                std::mem::forget(lib);
                path = Some(p);
                break;
            }
            Err(e) if explicit => return Err(format!("{NVRTC_LIB_ENV}={}: {e}", p.display())),
            Err(e) => tracing::debug!("NVRTC candidate {}: {e}", p.display()),
        }
    }
    // SAFETY: probes cudarc's candidate library names with dlopen; no NVRTC function is called.
    if !unsafe { sys::is_culib_present() } {
        return Err(format!(
            "set {NVRTC_LIB_ENV} to libnvrtc.so.12 (pip package nvidia-cuda-nvrtc-cu12; scripts/test-deps.sh installs it \
             under $LACUNA_CACHE/venvs/compressed-tensors) or put a CUDA toolkit's lib directory on LD_LIBRARY_PATH"
        ));
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: the library is loaded (checked above); both pointers are to live locals.
    check(unsafe { sys::nvrtcVersion(&mut major, &mut minor) }).map_err(|e| format!("nvrtcVersion: {e}"))?;
    let mut n: c_int = 0;
    // SAFETY: as above; `n` is a live local.
    check(unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }).map_err(|e| format!("nvrtcGetNumSupportedArchs: {e}"))?;
    let mut archs = vec![0 as c_int; n.max(0) as usize];
    // SAFETY: `archs` holds the `n` entries NVRTC reported it will write.
    check(unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) })
        .map_err(|e| format!("nvrtcGetSupportedArchs: {e}"))?;
    let mut archs: Vec<u32> = archs.into_iter().map(|a| a as u32).collect();
    archs.sort_unstable();
    Ok(Nvrtc { path, version: (major, minor), archs })
}

fn check(r: sys::nvrtcResult) -> std::result::Result<(), String> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: nvrtcGetErrorString returns a pointer to a static NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(sys::nvrtcGetErrorString(r)) };
    Err(msg.to_string_lossy().into_owned())
}

/// A compiled module: the image the driver loads, and NVRTC's log (warnings; empty when clean).
#[derive(Clone, Debug)]
pub struct Compiled {
    pub module: Module,
    pub target: Target,
    pub image: Vec<u8>,
    pub log: String,
}

/// Compiles `module` for `target` (no cache). A compile error is [`GpuError::Compile`] with the log.
pub fn compile(module: Module, target: Target) -> Result<Compiled> {
    load()?;
    let src = CString::new(module.source())
        .map_err(|_| GpuError::Unsupported(format!("{}.cu contains a NUL byte", module.name())))?;
    let name = CString::new(format!("{}.cu", module.name())).expect("module names have no NUL");
    let mut options: Vec<CString> =
        OPTIONS.iter().map(|o| CString::new(*o).expect("static options have no NUL")).collect();
    options.push(CString::new(target.option()).expect("no NUL"));
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();

    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    let err = |what: &str, e: String| GpuError::Compile {
        module: module.name().to_owned(),
        arch: target.to_string(),
        log: format!("{what}: {e}"),
    };
    // SAFETY: `src` and `name` are NUL-terminated and outlive the program (destroyed below); no
    // headers are passed (counts 0, null arrays).
    check(unsafe {
        sys::nvrtcCreateProgram(&mut prog, src.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null())
    })
    .map_err(|e| err("nvrtcCreateProgram", e))?;
    // SAFETY: `prog` was created above; `option_ptrs` points at `options.len()` live C strings.
    let compiled = check(unsafe { sys::nvrtcCompileProgram(prog, option_ptrs.len() as c_int, option_ptrs.as_ptr()) });
    let log = program_log(prog);
    let image = compiled.and_then(|()| program_image(prog, target));
    // SAFETY: `prog` was created above and is destroyed exactly once.
    let _ = unsafe { sys::nvrtcDestroyProgram(&mut prog) };
    match image {
        Ok(image) => Ok(Compiled { module, target, image, log }),
        Err(e) => Err(GpuError::Compile {
            module: module.name().to_owned(),
            arch: target.to_string(),
            log: if log.is_empty() { e } else { format!("{e}\n{log}") },
        }),
    }
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: `prog` is a live program; `size` a live local.
    if check(unsafe { sys::nvrtcGetProgramLogSize(prog, &mut size) }).is_err() || size == 0 {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` has the `size` bytes NVRTC reported (its terminating NUL included).
    if check(unsafe { sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr().cast()) }).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&buf).trim_end_matches('\0').trim().to_owned()
}

fn program_image(prog: sys::nvrtcProgram, target: Target) -> std::result::Result<Vec<u8>, String> {
    let mut size = 0usize;
    let mut buf;
    match target {
        Target::Cubin(_) => {
            // SAFETY: `prog` compiled successfully; `size` is a live local.
            check(unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) })?;
            buf = vec![0u8; size];
            // SAFETY: `buf` has the `size` bytes NVRTC reported.
            check(unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) })?;
        }
        Target::Ptx(_) => {
            // SAFETY: as above, for the PTX text (NUL-terminated, the NUL counted in `size`).
            check(unsafe { sys::nvrtcGetPTXSize(prog, &mut size) })?;
            buf = vec![0u8; size];
            // SAFETY: `buf` has the `size` bytes NVRTC reported.
            check(unsafe { sys::nvrtcGetPTX(prog, buf.as_mut_ptr().cast()) })?;
        }
    }
    Ok(buf)
}

/// The cache file of `module` for `target`: its name carries the key (source hash, target, NVRTC
/// version), so a changed kernel, device or NVRTC never reads a stale image.
pub fn cache_path(dir: &Path, module: Module, target: Target, nvrtc_version: (i32, i32)) -> PathBuf {
    let mut h = Sha256::new();
    h.update(module.source().as_bytes());
    for o in OPTIONS {
        h.update([0]);
        h.update(o.as_bytes());
    }
    let digest = hex::encode(h.finalize());
    dir.join(format!(
        "{}-{}-nvrtc{}.{}-{}.{}",
        module.name(),
        target,
        nvrtc_version.0,
        nvrtc_version.1,
        &digest[..16],
        target.extension()
    ))
}

/// Where compiled modules are cached: `$LACUNA_CACHE/gpu-kernels` (`None` without a cache root).
pub fn cache_dir() -> Option<PathBuf> {
    lacuna_data::Cache::from_env().ok().map(|c| c.root().join("gpu-kernels"))
}

/// The image of `module` for `target`: from the cache when present, else compiled and cached.
pub fn compile_cached(module: Module, target: Target) -> Result<Vec<u8>> {
    let nvrtc = load()?;
    let Some(dir) = cache_dir() else {
        return compile(module, target).map(|c| c.image);
    };
    let path = cache_path(&dir, module, target, nvrtc.version);
    if let Ok(image) = std::fs::read(&path)
        && !image.is_empty()
    {
        return Ok(image);
    }
    let compiled = compile(module, target)?;
    if !compiled.log.is_empty() {
        tracing::warn!("NVRTC warnings for {}.cu ({target}):\n{}", module.name(), compiled.log);
    }
    write_atomic(&path, &compiled.image)?;
    Ok(compiled.image)
}

/// Writes `bytes` to `path` through a temporary file in the same directory, fsynced, then renamed,
/// so a reader sees either no file or the whole image.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| GpuError::Cache { path: path.display().to_string(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = tempfile::Builder::new().prefix(".partial-").tempfile_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_is_the_devices_architecture_or_the_newest_older_ptx() {
        let supported = [50, 60, 70, 75, 80, 86, 89, 90];
        assert_eq!(Target::for_device((8, 6), &supported).unwrap(), Target::Cubin(86));
        assert_eq!(Target::for_device((9, 0), &supported).unwrap(), Target::Cubin(90));
        assert_eq!(Target::for_device((10, 0), &supported).unwrap(), Target::Ptx(90));
        assert_eq!(Target::for_device((8, 7), &supported).unwrap(), Target::Ptx(86));
        assert!(Target::for_device((3, 5), &supported).is_err());
        assert_eq!(Target::Cubin(90).option(), "--gpu-architecture=sm_90");
        assert_eq!(Target::Ptx(90).option(), "--gpu-architecture=compute_90");
    }

    #[test]
    fn cache_key_changes_with_target_version_and_module() {
        let d = Path::new("c");
        let a = cache_path(d, Module::Dense, Target::Cubin(80), (12, 1));
        assert_eq!(a, cache_path(d, Module::Dense, Target::Cubin(80), (12, 1)));
        assert_ne!(a, cache_path(d, Module::Dense, Target::Cubin(86), (12, 1)));
        assert_ne!(a, cache_path(d, Module::Dense, Target::Cubin(80), (12, 4)));
        assert_ne!(a, cache_path(d, Module::Bitmask, Target::Cubin(80), (12, 1)));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("dense-sm_80-nvrtc12.1-") && name.ends_with(".cubin"), "{name}");
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.cubin");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second image").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second image");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.cubin")]);
    }
}
