//! INT8 weights as compressed-tensors stores them (`int-quantized`: per-output-channel symmetric
//! codes `<module>.weight` int8 `[rows, cols]` and `<module>.weight_scale` `[rows, 1]`), the
//! `quantization_config` that describes them, and the dynamic per-token INT8 quantization of
//! a W8A8 layer's input.
//!
//! A W8A8 weight ([`InputQuant::Int8PerToken`]) runs on the INT8 kernels
//! ([`lacuna_kernels::int8`]): its input is quantized per token to INT8 codes, each output is an
//! i32 sum of code products dequantized once, and a product streams the codes (dense, or their
//! `sparse-bitmask` form when [`crate::Llama::prefer_bitmask`] finds that it streams fewer
//! bytes) and the scales: a quarter of the f32 bytes. A W8A16 weight ([`InputQuant::None`])
//! keeps float activations, so it is multiplied through its dequantized f32 form (built on
//! first use). [`quantize_activations_per_token`] is the same quantization simulated in f32:
//! the reference the kernels are tested against ([`crate::Llama::set_int8_reference`]).

use std::sync::{Arc, OnceLock};

use lacuna_api::QuantScheme;
use lacuna_kernels::bitmask::BitmaskMatrix;
use lacuna_kernels::int8 as kernels;
use serde_json::{Value, json};

use crate::weights::{Storage, Weight};
use crate::{Error, Result};

/// How a layer's input is quantized before the product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum InputQuant {
    /// Floating point (W8A16, or a float layer).
    #[default]
    None,
    /// Dynamic per-token symmetric INT8 (W8A8): see [`quantize_activations_per_token`].
    Int8PerToken,
}

/// Per-output-channel symmetric INT8: `w[r, c] = codes[r·cols + c] · scales[r]`.
#[derive(Clone)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    codes: Storage<i8>,
    scales: Vec<f32>,
    input: InputQuant,
    /// The checkpoint held the codes in `sparse-bitmask` form (what `inspect` reports).
    stored_bitmask: bool,
    /// The codes in `sparse-bitmask` form, which W8A8 products run on when set (see
    /// [`Weight::to_bitmask_if_smaller`]).
    bitmask: Option<Arc<BitmaskMatrix<i8>>>,
    /// The dequantized f32 form W8A16 products (and the reference path) run on, built on first
    /// use: dense unless set by [`Int8Matrix::with_compute`]. A W8A8 model never builds it.
    compute: OnceLock<Weight>,
}

impl std::fmt::Debug for Int8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Int8Matrix([{}, {}], input {:?})", self.rows, self.cols, self.input)
    }
}

impl Int8Matrix {
    /// Checks that `codes` holds `rows · cols` values and `scales` one finite positive value per
    /// row; the error names the first bad row.
    pub fn new(rows: usize, cols: usize, codes: Storage<i8>, scales: Vec<f32>) -> Result<Self> {
        let n =
            rows.checked_mul(cols).ok_or_else(|| Error::Invalid(format!("int8 matrix [{rows}, {cols}] overflows")))?;
        if codes.as_slice().len() != n {
            return Err(Error::Invalid(format!(
                "int8 matrix [{rows}, {cols}] needs {n} codes, got {}",
                codes.as_slice().len()
            )));
        }
        if scales.len() != rows {
            return Err(Error::Invalid(format!(
                "int8 matrix [{rows}, {cols}] needs {rows} scales, got {}",
                scales.len()
            )));
        }
        if let Some((r, s)) = scales.iter().enumerate().find(|(_, s)| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::Invalid(format!("scale of row {r} is {s}: scales must be finite and positive")));
        }
        Ok(Self {
            rows,
            cols,
            codes,
            scales,
            input: InputQuant::None,
            stored_bitmask: false,
            bitmask: None,
            compute: OnceLock::new(),
        })
    }

    /// Round to nearest (ties to even) with the scale `max|row| / 127` (1 for an all-zero row):
    /// codes in `-127..=127`.
    pub fn round_to_nearest(v: &[f32], rows: usize, cols: usize) -> Self {
        let mut codes = Vec::with_capacity(v.len());
        let mut scales = Vec::with_capacity(rows);
        for row in v.chunks(cols.max(1)).take(rows) {
            let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let scale = if max > 0.0 && max.is_finite() { max / 127.0 } else { 1.0 };
            codes.extend(row.iter().map(|x| (x / scale).round_ties_even().clamp(-127.0, 127.0) as i8));
            scales.push(scale);
        }
        let input = InputQuant::None;
        Self {
            rows,
            cols,
            codes: Storage::Owned(codes),
            scales,
            input,
            stored_bitmask: false,
            bitmask: None,
            compute: OnceLock::new(),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Row-major `[rows, cols]` codes.
    pub fn codes(&self) -> &[i8] {
        self.codes.as_slice()
    }
    /// One scale per row (output channel).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    pub fn input_quant(&self) -> InputQuant {
        self.input
    }
    pub fn with_input_quant(mut self, input: InputQuant) -> Self {
        self.input = input;
        self
    }
    /// Copies mapped codes into process memory; returns the bytes copied.
    pub(crate) fn copy_codes_into_memory(&mut self) -> usize {
        self.codes.copy_into_memory()
    }
    pub fn is_mapped(&self) -> bool {
        self.codes.is_mapped()
    }
    /// Whether the checkpoint stored these codes in `sparse-bitmask` form.
    pub fn stored_as_bitmask(&self) -> bool {
        self.stored_bitmask
    }
    pub(crate) fn with_stored_bitmask(mut self, b: bool) -> Self {
        self.stored_bitmask = b;
        self
    }

    /// `code · scale` for every element, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
                self.dequantize_row_into(r, o);
            }
        }
        out
    }

    /// Row `r` dequantized into `out` (`out.len() == cols`, `r < rows`: the caller checks).
    pub(crate) fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        let s = self.scales[r];
        for (o, c) in out.iter_mut().zip(&self.codes()[r * self.cols..(r + 1) * self.cols]) {
            *o = *c as f32 * s;
        }
    }

    /// The INT8 kernels' view: the bitmask form when set, the dense codes otherwise.
    pub fn kernel_matrix(&self) -> Result<kernels::Int8Matrix<'_>> {
        Ok(match &self.bitmask {
            // `new` checked every scale finite and positive.
            Some(b) => kernels::Int8Matrix::Bitmask(kernels::Int8Bitmask::with_checked_scales(b.view(), &self.scales)?),
            None => kernels::Int8Matrix::Dense(kernels::Int8Dense::with_checked_scales(
                self.codes(),
                &self.scales,
                self.rows,
                self.cols,
            )?),
        })
    }

    /// Bytes an INT8 product streams: codes (or bitmask, packed codes and row offsets) and scales.
    pub fn kernel_bytes(&self) -> usize {
        let codes = match &self.bitmask {
            Some(b) => b.nbytes(),
            None => self.codes().len(),
        };
        codes + 4 * self.scales.len()
    }

    /// The `sparse-bitmask` form of the codes W8A8 products run on, if set.
    pub fn bitmask_codes(&self) -> Option<&BitmaskMatrix<i8>> {
        self.bitmask.as_deref()
    }

    /// Runs W8A8 products on the dense codes.
    pub(crate) fn without_bitmask_codes(self) -> Self {
        Self { bitmask: None, ..self }
    }

    /// Runs W8A8 products on `b`, the codes in `sparse-bitmask` form.
    pub(crate) fn with_bitmask_codes(self, b: BitmaskMatrix<i8>) -> Result<Self> {
        if b.rows() != self.rows || b.cols() != self.cols {
            return Err(Error::Invalid(format!(
                "a [{}, {}] bitmask cannot hold the codes of int8 matrix [{}, {}]",
                b.rows(),
                b.cols(),
                self.rows,
                self.cols
            )));
        }
        Ok(Self { bitmask: Some(Arc::new(b)), ..self })
    }

    /// The f32 weight W8A16 products run on.
    pub(crate) fn compute(&self) -> &Weight {
        self.compute.get_or_init(|| {
            Weight::from_f32(vec![self.rows, self.cols], self.dequantize()).expect("rows · cols values, checked in new")
        })
    }

    /// Runs products on `w` (the dequantized values in another f32 form, e.g. bitmask).
    pub(crate) fn with_compute(self, w: Weight) -> Result<Self> {
        if w.shape() != [self.rows, self.cols] || w.dtype() != crate::weights::Dtype::F32 {
            return Err(Error::Invalid(format!("{w:?} cannot stand for int8 matrix [{}, {}]", self.rows, self.cols)));
        }
        let compute = OnceLock::new();
        let _ = compute.set(w);
        Ok(Self { compute, ..self })
    }
}

/// Dynamic per-token symmetric INT8 of activations `x` (rows of `width`), simulated in f32: each
/// row becomes `round(x · 127 / max|row|) · max|row| / 127` (ties to even; an all-zero row stays
/// zero), so codes lie in `-127..=127`. This is what vLLM's dynamic per-token kernel computes for
/// a compressed-tensors W8A8 checkpoint (compressed-tensors' own fake quantization divides by
/// 127.5 and clamps to -128; the deployed model is vLLM's). The INT8 kernels
/// ([`lacuna_kernels::int8::QuantizedActs`]) compute the same codes and scales (a test holds
/// them to it: every value here is their code · scale exactly) and accumulate in i32; this f32
/// form is the reference they are tested against, never the product path.
pub fn quantize_activations_per_token(x: &[f32], width: usize, out: &mut [f32]) -> Result<()> {
    if out.len() != x.len() || (width == 0 && !x.is_empty()) || (width > 0 && !x.len().is_multiple_of(width)) {
        return Err(Error::Invalid(format!(
            "per-token quantization of {} values in rows of {width} into {}",
            x.len(),
            out.len()
        )));
    }
    if width == 0 {
        return Ok(());
    }
    for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max == 0.0 || !max.is_finite() {
            // Zeros stay zero; a non-finite row is passed on as is (its products are non-finite anyway).
            o.copy_from_slice(row);
            continue;
        }
        let (inv, scale) = (127.0 / max, max / 127.0);
        for (d, v) in o.iter_mut().zip(row) {
            *d = (v * inv).round_ties_even().clamp(-127.0, 127.0) * scale;
        }
    }
    Ok(())
}

/// What [`int8_quantization_config`] describes.
#[derive(Clone, Debug)]
pub struct Int8Config {
    pub scheme: QuantScheme,
    /// Module names kept in floating point (`lm_head`, layers skipped by kurtosis), e.g.
    /// `model.layers.3.mlp.down_proj`.
    pub ignore: Vec<String>,
    /// Set when some int8 weights are stored in `sparse-bitmask` form.
    pub sparsity: Option<Int8Sparsity>,
    /// Lacuna's own record (SmoothQuant α, kurtosis ranking, GPTQ settings), stored under
    /// [`LACUNA_METADATA_KEY`], a key compressed-tensors and transformers ignore.
    pub metadata: Value,
}

/// The `sparsity_config` of a sparse int8 checkpoint.
#[derive(Clone, Debug)]
pub struct Int8Sparsity {
    /// Fraction of zeros over the compressed weights.
    pub global_sparsity: f64,
    /// compressed-tensors' notation: `unstructured` or `2:4`.
    pub structure: String,
    /// Full tensor names stored as bitmask (`model.layers.0.mlp.down_proj.weight`): the same list
    /// as `SaveOptions.bitmask`.
    pub targets: Vec<String>,
}

/// The key of [`Int8Config::metadata`] inside `quantization_config`.
pub const LACUNA_METADATA_KEY: &str = "lacuna_metadata";

/// The compressed-tensors format name of INT8 weights stored as int8 tensors.
pub const INT_QUANTIZED: &str = "int-quantized";

fn int8_args(strategy: &str, dynamic: bool, observer: Value) -> Value {
    json!({
        "num_bits": 8,
        "type": "int",
        "symmetric": true,
        "group_size": null,
        "strategy": strategy,
        "block_structure": null,
        "dynamic": dynamic,
        "actorder": null,
        "scale_dtype": null,
        "zp_dtype": null,
        "observer": observer,
        "observer_kwargs": {},
    })
}

/// The `config.json` `quantization_config` of an INT8 checkpoint, in compressed-tensors'
/// schema: `format: int-quantized`, one config group over every `Linear` (weights int8 symmetric
/// per channel; for W8A8 input activations int8 symmetric per token, dynamic), `ignore` as
/// given, the `sparsity_config` of the bitmask form when sparse, and Lacuna's metadata.
pub fn int8_quantization_config(c: &Int8Config) -> Value {
    let input = match c.scheme {
        QuantScheme::W8a8 => int8_args("token", true, Value::Null),
        QuantScheme::W8a16 => Value::Null,
    };
    let sparsity = match &c.sparsity {
        Some(s) => {
            let modules: Vec<String> =
                s.targets.iter().map(|t| t.strip_suffix(".weight").unwrap_or(t).to_owned()).collect();
            crate::hf::sparsity_config(s.global_sparsity, &s.structure, modules, Vec::new())
        }
        None => json!({}),
    };
    json!({
        "quant_method": "compressed-tensors",
        "format": INT_QUANTIZED,
        "quantization_status": "compressed",
        "global_compression_ratio": null,
        "kv_cache_scheme": null,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": int8_args("channel", false, json!("memoryless_minmax")),
                "input_activations": input,
                "output_activations": null,
                "format": INT_QUANTIZED,
            }
        },
        "ignore": c.ignore,
        "sparsity_config": sparsity,
        "transform_config": {},
        LACUNA_METADATA_KEY: c.metadata,
    })
}

/// Reads the INT8 scheme of a `config.json`: `None` without quantization groups; the input
/// quantization every group agrees on otherwise. Anything but 8-bit symmetric per-channel int
/// weights, and float or dynamic per-token symmetric 8-bit int inputs, is an error naming the field.
pub(crate) fn read_input_quant(config: &Value) -> std::result::Result<Option<InputQuant>, String> {
    let Some(qc) = config.get("quantization_config").filter(|v| !v.is_null()) else { return Ok(None) };
    let groups = match qc.get("config_groups") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(g)) if g.is_empty() => return Ok(None),
        Some(Value::Object(g)) => g,
        Some(_) => return Err("quantization_config.config_groups is not an object".into()),
    };
    let format = qc.get("format").and_then(Value::as_str).unwrap_or("");
    let mut found: Option<InputQuant> = None;
    for (name, g) in groups {
        let field = |f: &str| format!("quantization_config.config_groups.{name}.{f}");
        let gformat = g.get("format").and_then(Value::as_str).unwrap_or(format);
        if !matches!(gformat, "int-quantized" | "naive-quantized") {
            return Err(format!("{}: {gformat:?} (Lacuna reads int-quantized)", field("format")));
        }
        let check = |what: &str, args: &Value, strategy: &str, dynamic: bool| -> std::result::Result<(), String> {
            let want = [
                ("num_bits", json!(8)),
                ("type", json!("int")),
                ("symmetric", json!(true)),
                ("strategy", json!(strategy)),
                ("dynamic", json!(dynamic)),
            ];
            for (k, v) in want {
                let got = args.get(k).cloned().unwrap_or(Value::Null);
                if got != v {
                    return Err(format!("{}.{k}: {got} (Lacuna reads {v})", field(what)));
                }
            }
            Ok(())
        };
        let weights =
            g.get("weights").filter(|v| !v.is_null()).ok_or_else(|| format!("{}: missing", field("weights")))?;
        check("weights", weights, "channel", false)?;
        let input = match g.get("input_activations") {
            None | Some(Value::Null) => InputQuant::None,
            Some(a) => {
                check("input_activations", a, "token", true)?;
                InputQuant::Int8PerToken
            }
        };
        if g.get("output_activations").is_some_and(|v| !v.is_null()) {
            return Err(format!("{}: output quantization is not supported", field("output_activations")));
        }
        match found {
            Some(f) if f != input => {
                return Err("quantization_config.config_groups: groups quantize inputs differently".into());
            }
            _ => found = Some(input),
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_token_quantization_rounds_each_row_on_its_own_scale() {
        let x = [1.0, -0.5, 0.25, 0.0, 0.0, 0.0, 2.0, 1.0, -2.0];
        let mut out = [0f32; 9];
        quantize_activations_per_token(&x, 3, &mut out).unwrap();
        // Row 0: scale 1/127; 0.25·127 = 31.75 → 32; -0.5·127 = -63.5 → -64 (ties to even).
        assert_eq!(out[0], 127.0 * (1.0 / 127.0));
        assert_eq!(out[1], -64.0 * (1.0 / 127.0));
        assert_eq!(out[2], 32.0 * (1.0 / 127.0));
        assert_eq!(&out[3..6], &[0.0, 0.0, 0.0]);
        // Row 2: scale 2/127; 1.0 → 63.5 → 64.
        assert_eq!(out[6], 127.0 * (2.0 / 127.0));
        assert_eq!(out[7], 64.0 * (2.0 / 127.0));
        assert_eq!(out[8], -127.0 * (2.0 / 127.0));
        assert!(quantize_activations_per_token(&x, 4, &mut out).is_err());
    }

    #[test]
    fn the_f32_reference_quantizes_as_the_int8_kernels_do_exactly() {
        // Rows with ties (values k + 0.5 of the code step), zeros, a single large value and
        // ordinary values: the simulated value is exactly the kernel's code times its scale.
        let width = 67;
        let mut x = Vec::new();
        for r in 0..40usize {
            for c in 0..width {
                let v = match r % 4 {
                    0 => (c as f32 - 33.0) + 0.5,
                    1 => 0.0,
                    2 if c == 5 => 1e4,
                    _ => ((r * 131 + c * 71) % 1009) as f32 * 1e-3 - 0.5,
                };
                x.push(v * (1.0 + r as f32 * 0.37));
            }
        }
        let n = x.len() / width;
        let mut sim = vec![0f32; x.len()];
        quantize_activations_per_token(&x, width, &mut sim).unwrap();
        let mut q = lacuna_kernels::int8::QuantizedActs::new();
        q.quantize(&x, n, width).unwrap();
        for i in 0..n {
            for (c, &code) in q.codes(i).iter().enumerate() {
                let want = code as f32 * q.scale(i);
                // Equal as numbers (a negative value rounded to zero is −0 in f32, a 0 code +0).
                assert_eq!(sim[i * width + c], want, "row {i} col {c}");
            }
        }
    }

    #[test]
    fn bad_scales_and_code_counts_are_rejected() {
        let codes = || Storage::Owned(vec![1i8; 6]);
        assert!(Int8Matrix::new(2, 3, codes(), vec![0.5, 0.25]).is_ok());
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let e = Int8Matrix::new(2, 3, codes(), vec![0.5, bad]).unwrap_err().to_string();
            assert!(e.contains("row 1"), "{e}");
        }
        assert!(Int8Matrix::new(2, 3, codes(), vec![0.5]).is_err());
        assert!(Int8Matrix::new(3, 3, codes(), vec![0.5; 3]).is_err());
    }

    #[test]
    fn config_round_trips_through_the_reader() {
        let mut c = Int8Config {
            scheme: QuantScheme::W8a8,
            ignore: vec!["lm_head".into()],
            sparsity: None,
            metadata: json!({"alpha": 0.8}),
        };
        let qc = int8_quantization_config(&c);
        assert_eq!(qc["config_groups"]["group_0"]["weights"]["strategy"], "channel");
        assert_eq!(qc[LACUNA_METADATA_KEY]["alpha"], 0.8);
        assert_eq!(read_input_quant(&json!({"quantization_config": qc})), Ok(Some(InputQuant::Int8PerToken)));
        c.scheme = QuantScheme::W8a16;
        let qc = int8_quantization_config(&c);
        assert!(qc["config_groups"]["group_0"]["input_activations"].is_null());
        assert_eq!(read_input_quant(&json!({"quantization_config": qc})), Ok(Some(InputQuant::None)));
        let mut bad = int8_quantization_config(&c);
        bad["config_groups"]["group_0"]["weights"]["strategy"] = json!("tensor");
        let e = read_input_quant(&json!({"quantization_config": bad})).unwrap_err();
        assert!(e.contains("config_groups.group_0.weights.strategy"), "{e}");
        // A sparsity-only config (what `lacuna prune` writes) has no int8 scheme.
        let sparse = crate::hf::sparse_bitmask_quantization_config(0.5, "unstructured", &[], &[]);
        assert_eq!(read_input_quant(&json!({"quantization_config": sparse})), Ok(None));
    }
}
