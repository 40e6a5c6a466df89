//! The CUDA C sources, embedded at build time, and the names of the kernels each module defines.

/// Prepended to every module: types, half-precision conversions and reductions.
pub const PRELUDE: &str = include_str!("../kernels/prelude.cuh");

/// One NVRTC compilation unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Dense,
    Bitmask,
    Layers,
    Attention,
}

/// Batch sizes the GEMV/GEMM kernels are instantiated for (their accumulator count). A product
/// of `n` activation rows runs the smallest that holds `n` ([`crate::launch::batch_tile`]).
pub const BATCH_TILES: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// Largest batch one product launch serves; more rows are split into launches of at most this.
pub const MAX_BATCH: usize = 32;

/// Element types of stored 16-bit weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F16,
    Bf16,
}

impl WeightDtype {
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
        }
    }
}

impl Module {
    pub const ALL: [Module; 4] = [Module::Dense, Module::Bitmask, Module::Layers, Module::Attention];

    pub fn name(self) -> &'static str {
        match self {
            Module::Dense => "dense",
            Module::Bitmask => "bitmask",
            Module::Layers => "layers",
            Module::Attention => "attention",
        }
    }

    /// The module's own file (without the prelude).
    pub fn body(self) -> &'static str {
        match self {
            Module::Dense => include_str!("../kernels/dense.cu"),
            Module::Bitmask => include_str!("../kernels/bitmask.cu"),
            Module::Layers => include_str!("../kernels/layers.cu"),
            Module::Attention => include_str!("../kernels/attention.cu"),
        }
    }

    /// What NVRTC compiles: the prelude, then the module.
    pub fn source(self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", self.name(), self.body())
    }

    /// Every `extern "C"` kernel the module defines (the runtime loads each by name; the compile
    /// test checks they are all in the compiled image).
    pub fn kernel_names(self) -> Vec<String> {
        let products = |kind: &str| {
            [WeightDtype::F16, WeightDtype::Bf16]
                .iter()
                .flat_map(|dt| BATCH_TILES.iter().map(move |nb| product_kernel(kind, *dt, *nb)))
                .collect()
        };
        match self {
            Module::Dense => products("dense"),
            Module::Bitmask => products("bitmask"),
            Module::Layers => ["rms_norm", "rope", "swiglu", "add_into", "embed_f16", "embed_bf16", "kv_append"]
                .map(String::from)
                .to_vec(),
            Module::Attention => vec!["attention_decode".to_owned()],
        }
    }
}

/// Name of a product kernel: `dense_gemm_f16_nb8`, `bitmask_gemm_bf16_nb1`, ...
pub fn product_kernel(kind: &str, dtype: WeightDtype, nb: usize) -> String {
    format!("{kind}_gemm_{}_nb{nb}", dtype.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_kernel_is_defined_in_its_source() {
        for m in Module::ALL {
            let src = m.source();
            for name in m.kernel_names() {
                // Product kernels are pasted together by macros: find the macro instantiation.
                let found = match name.split_once("_gemm_") {
                    Some((kind, rest)) => {
                        let (dt, nb) = rest.split_once("_nb").unwrap();
                        let upper = kind.to_uppercase();
                        src.contains(&format!("{upper}_ALL_NB({dt},"))
                            && src.contains(&format!("{upper}_KERNEL(NAME, DT, {nb})"))
                    }
                    None => src.contains(&format!(" {name}(")),
                };
                assert!(found, "{}: {name} not defined", m.name());
            }
        }
    }
}
