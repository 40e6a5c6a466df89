//! Every kernel module through NVRTC for sm_80, sm_86 and sm_90, on any machine: no GPU or driver
//! is needed, only NVRTC (`libnvrtc.so.12`, found as `lacuna_gpu::nvrtc` describes). A compile
//! error fails, and so does any warning NVRTC logs. Without NVRTC every trial is reported as
//! ignored with the reason, unless `LACUNA_GPU_COMPILE_REQUIRED=1` (as in `.ci/run`), which fails.

use std::process::ExitCode;

use lacuna_gpu::kernels::Module;
use lacuna_gpu::nvrtc::{self, Target};
use libtest_mimic::{Arguments, Failed, Trial};

const ARCHS: [u32; 3] = [80, 86, 90];

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let trials: Vec<(String, Module, u32)> =
        Module::ALL.iter().flat_map(|m| ARCHS.iter().map(move |a| (format!("{}_sm_{a}", m.name()), *m, *a))).collect();
    match nvrtc::load() {
        Ok(n) => {
            eprintln!(
                "nvrtc_compile: NVRTC {}.{} from {} (architectures {:?})",
                n.version.0,
                n.version.1,
                n.path.as_ref().map_or("the loader's search path".into(), |p| p.display().to_string()),
                n.archs
            );
            let tests = trials
                .into_iter()
                .map(|(name, module, arch)| Trial::test(name, move || compile_clean(module, arch)))
                .collect();
            libtest_mimic::run(&args, tests).exit_code()
        }
        Err(e) => {
            eprintln!("nvrtc_compile: SKIPPED, {e}");
            if std::env::var_os("LACUNA_GPU_COMPILE_REQUIRED").is_some_and(|v| v != "0") {
                eprintln!("nvrtc_compile: LACUNA_GPU_COMPILE_REQUIRED is set: failing instead of skipping");
                return ExitCode::FAILURE;
            }
            let tests =
                trials.into_iter().map(|(name, ..)| Trial::test(name, || Ok(())).with_ignored_flag(true)).collect();
            libtest_mimic::run(&args, tests).exit_code()
        }
    }
}

fn compile_clean(module: Module, arch: u32) -> Result<(), Failed> {
    let c = nvrtc::compile(module, Target::Cubin(arch)).map_err(|e| Failed::from(e.to_string()))?;
    if !c.log.is_empty() {
        return Err(format!(
            "{}.cu for sm_{arch} compiled with warnings (treated as errors):\n{}",
            module.name(),
            c.log
        )
        .into());
    }
    // Every kernel the runtime loads by name is in the image (ELF symbol names, NUL-terminated).
    for name in module.kernel_names() {
        let sym = format!("{name}\0");
        if !c.image.windows(sym.len()).any(|w| w == sym.as_bytes()) {
            return Err(
                format!("{}.cu for sm_{arch}: kernel {name} is not in the compiled image", module.name()).into()
            );
        }
    }
    Ok(())
}
