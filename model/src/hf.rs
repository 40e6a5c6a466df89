//! Hugging Face checkpoint directories: `config.json`, one or several `*.safetensors` (with
//! `model.safetensors.index.json`), tokenizer files, `generation_config.json`.
//!
//! Reading maps every shard and borrows tensors from the maps. Writing produces a directory that
//! transformers' `LlamaForCausalLM.from_pretrained` loads unchanged, and is atomic: everything is
//! written into a hidden sibling directory, fsynced, then renamed into place.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype as StDtype, SafeTensors, View};
use serde_json::{Value, json};

use lacuna_kernels::bitmask::BitmaskMatrix;

use crate::config::LlamaConfig;
use crate::int8::{InputQuant, Int8Matrix};
pub use crate::int8::{Int8Config, Int8Sparsity, int8_quantization_config};
use crate::tokenizer::Tokenizer;
use crate::weights::{Data, Dtype, Storage, Weight};
use crate::{Error, Result};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

fn st_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Safetensors { path: path.to_path_buf(), msg: msg.to_string() }
}

/// The safetensors files of a directory: the index's shards if it has one, else `model.safetensors`.
pub fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| st_err(&index, e))?;
        let map =
            v.get("weight_map").and_then(Value::as_object).ok_or_else(|| st_err(&index, "no `weight_map` object"))?;
        let mut files: Vec<String> = Vec::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| st_err(&index, format!("weight_map[{name}] is not a file name")))?;
            if f.contains('/') || f.contains("..") {
                return Err(st_err(&index, format!("shard name {f:?} escapes the directory")));
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_owned());
            }
        }
        files.sort();
        let mut out = Vec::new();
        for f in files {
            let p = dir.join(&f);
            if !p.is_file() {
                return Err(st_err(&index, format!("shard {f} listed in the index is missing")));
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::Safetensors { path: dir.to_path_buf(), msg: format!("neither {SINGLE_FILE} nor {INDEX_FILE} found") })
}

/// Memory-maps every shard and returns all tensors by name, borrowed from the maps. Weights stored
/// in the compressed-tensors `sparse-bitmask` layout are validated and expanded to dense; INT8
/// weights (`int-quantized`: `<m>.weight` int8 with `<m>.weight_scale`, dense or bitmask) become
/// int8 [`Weight`]s, W8A8 ones (input activations in `config.json`'s `quantization_config`) with
/// [`InputQuant::Int8PerToken`].
pub fn load_tensors(dir: &Path) -> Result<BTreeMap<String, Weight>> {
    let mut out = BTreeMap::new();
    let mut raw: BTreeMap<String, (PathBuf, RawTensor)> = BTreeMap::new();
    let mut ints: BTreeMap<String, IntTensor> = BTreeMap::new();
    for path in shard_files(dir)? {
        let file = read_file(&path)?;
        for (name, w) in file.weights {
            if out.contains_key(&name) || ints.contains_key(&name) {
                return Err(st_err(&path, format!("tensor {name} appears in more than one shard")));
            }
            out.insert(name, w);
        }
        for (name, r) in file.raws {
            raw.insert(name, (path.clone(), r));
        }
        for (name, t) in file.ints {
            if out.contains_key(&name) || ints.contains_key(&name) {
                return Err(st_err(&path, format!("tensor {name} appears in more than one shard")));
            }
            ints.insert(name, t);
        }
    }
    decompress_bitmask(&mut out, raw, &mut ints)?;
    let input = if ints.is_empty() { InputQuant::None } else { int8_input_quant(dir)? };
    assemble_int8(&mut out, ints, input)?;
    Ok(out)
}

/// The input quantization of a directory's int8 weights, from its `config.json` (W8A16 when the
/// directory has none).
fn int8_input_quant(dir: &Path) -> Result<InputQuant> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Ok(InputQuant::None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config { path: path.clone(), msg: e.to_string() })?;
    match crate::int8::read_input_quant(&v) {
        Ok(Some(q)) => Ok(q),
        Ok(None) => Err(Error::Config {
            path,
            msg: "the checkpoint holds int8 weights but quantization_config.config_groups does not describe them"
                .into(),
        }),
        Err(msg) => Err(Error::Config { path, msg }),
    }
}

/// An int8 tensor: the codes of an INT8 weight (or of its `sparse-bitmask` form's non-zeros).
struct IntTensor {
    path: PathBuf,
    shape: Vec<usize>,
    codes: Storage<i8>,
    /// Expanded from the `sparse-bitmask` form.
    from_bitmask: bool,
}

/// Pairs every int8 `<m>.weight` with its `<m>.weight_scale` into an int8 [`Weight`]; an int8
/// tensor that is not such a weight, a missing or malformed scale (shape `[rows, 1]`, float,
/// finite, positive), and quantization parameters Lacuna does not read are errors naming the tensor.
fn assemble_int8(
    out: &mut BTreeMap<String, Weight>,
    ints: BTreeMap<String, IntTensor>,
    input: InputQuant,
) -> Result<()> {
    for (name, t) in ints {
        let bad = |msg: String| st_err(&t.path, format!("tensor {name}: {msg}"));
        let Some(prefix) = name.strip_suffix(".weight") else {
            return Err(bad("int8 tensors are read only as `<module>.weight` of an int-quantized layer".into()));
        };
        let [rows, cols] = match t.shape.as_slice() {
            [r, c] => [*r, *c],
            s => return Err(bad(format!("int8 weight of shape {s:?} is not a matrix"))),
        };
        let scale_name = format!("{prefix}.weight_scale");
        let bad_scale = |msg: String| st_err(&t.path, format!("tensor {scale_name}: {msg}"));
        let scale = out.remove(&scale_name).ok_or_else(|| bad(format!("int8 weight without {scale_name}")))?;
        if scale.shape() != [rows, 1] {
            return Err(bad_scale(format!(
                "shape {:?}, expected [{rows}, 1] (one scale per output channel of {name} {:?})",
                scale.shape(),
                t.shape
            )));
        }
        if scale.dtype() == crate::weights::Dtype::I8 {
            return Err(bad_scale("scales must be float".into()));
        }
        let m = Int8Matrix::new(rows, cols, t.codes, scale.to_f32_vec()).map_err(|e| bad_scale(e.to_string()))?;
        let w = Weight::from_int8_matrix(m.with_stored_bitmask(t.from_bitmask).with_input_quant(input))
            .map_err(|e| bad(e.to_string()))?;
        out.insert(name, w);
    }
    for name in out.keys() {
        let unread = ["weight_scale", "weight_zero_point", "weight_g_idx", "input_scale", "input_zero_point"];
        if let Some(p) = unread.iter().find(|p| name.ends_with(&format!(".{p}"))) {
            let msg = if *p == "weight_scale" {
                "a scale for a weight that is not int8".to_owned()
            } else {
                format!("`{p}` (asymmetric, grouped or static quantization) is not supported")
            };
            return Err(Error::Unsupported(format!("tensor {name}: {msg}")));
        }
    }
    Ok(())
}

/// An integer tensor (the index parts of a compressed weight).
struct RawTensor {
    dtype: StDtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Every tensor of one safetensors file, borrowed from its memory map.
pub fn read_tensors_file(path: &Path) -> Result<Vec<(String, Weight)>> {
    let file = read_file(path)?;
    if let Some((name, r)) = file.raws.first() {
        return Err(st_err(path, format!("tensor {name}: dtype {:?} is not a weight dtype", r.dtype)));
    }
    if let Some((name, _)) = file.ints.first() {
        return Err(st_err(path, format!("tensor {name}: int8 tensors are read only from checkpoint directories")));
    }
    Ok(file.weights)
}

/// A file's float tensors (weights), integer index parts of compressed weights, and int8 codes.
struct FileTensors {
    weights: Vec<(String, Weight)>,
    raws: Vec<(String, RawTensor)>,
    ints: Vec<(String, IntTensor)>,
}

fn read_file(path: &Path) -> Result<FileTensors> {
    let map = Arc::new(lacuna_kernels::mmap::map_file(path).map_err(|e| Error::io(path, e))?);
    let st = SafeTensors::deserialize(&map).map_err(|e| st_err(path, e))?;
    let mut out = Vec::new();
    let mut raws = Vec::new();
    let mut ints = Vec::new();
    for (name, view) in st.tensors() {
        let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
        let n: usize = view.shape().iter().product();
        let shape = view.shape().to_vec();
        let storage_err = || st_err(path, format!("tensor {name}: data out of range"));
        let data = match view.dtype() {
            StDtype::F32 => Data::F32(Storage::from_map(&map, offset, n).ok_or_else(storage_err)?),
            StDtype::F16 => Data::F16(Storage::from_map(&map, offset, n).ok_or_else(storage_err)?),
            StDtype::BF16 => Data::BF16(Storage::from_map(&map, offset, n).ok_or_else(storage_err)?),
            d @ (StDtype::I64 | StDtype::U8) => {
                raws.push((name, RawTensor { dtype: d, shape, bytes: view.data().to_vec() }));
                continue;
            }
            StDtype::I8 => {
                let codes = Storage::from_map(&map, offset, n).ok_or_else(storage_err)?;
                ints.push((name, IntTensor { path: path.to_path_buf(), shape, codes, from_bitmask: false }));
                continue;
            }
            other => {
                return Err(st_err(
                    path,
                    format!("tensor {name}: dtype {other:?} is not supported (f32, f16, bf16; int8 quantized)"),
                ));
            }
        };
        let w = Weight::new(shape, data).map_err(|e| st_err(path, format!("tensor {name}: {e}")))?;
        out.push((name, w));
    }
    Ok(FileTensors { weights: out, raws, ints })
}

fn i64s(r: &RawTensor) -> Option<Vec<i64>> {
    (r.dtype == StDtype::I64)
        .then(|| r.bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// Replaces every `<p>.{shape,compressed,bitmask,row_offsets}` group by a dense `<p>.weight`
/// (into `ints` when the non-zeros are int8 codes).
fn decompress_bitmask(
    out: &mut BTreeMap<String, Weight>,
    mut raw: BTreeMap<String, (PathBuf, RawTensor)>,
    ints: &mut BTreeMap<String, IntTensor>,
) -> Result<()> {
    let prefixes: Vec<String> = raw.keys().filter_map(|k| k.strip_suffix(".bitmask")).map(str::to_owned).collect();
    for p in prefixes {
        let (path, bitmask) = raw.remove(&format!("{p}.bitmask")).expect("listed");
        let bad = |msg: String| st_err(&path, format!("compressed weight {p}: {msg}"));
        let (_, shape) = raw.remove(&format!("{p}.shape")).ok_or_else(|| bad("no `.shape` tensor".into()))?;
        let (_, offsets) =
            raw.remove(&format!("{p}.row_offsets")).ok_or_else(|| bad("no `.row_offsets` tensor".into()))?;
        let shape = i64s(&shape).ok_or_else(|| bad("`.shape` must be int64".into()))?;
        let offsets = i64s(&offsets).ok_or_else(|| bad("`.row_offsets` must be int64".into()))?;
        if bitmask.dtype != StDtype::U8 {
            return Err(bad("`.bitmask` must be uint8".into()));
        }
        let [rows, cols] = match shape.as_slice() {
            [r, c] if *r >= 0 && *c >= 0 => [*r as usize, *c as usize],
            s => return Err(bad(format!("shape {s:?} is not a matrix"))),
        };
        let name = format!("{p}.weight");
        if out.contains_key(&name) || ints.contains_key(&name) {
            return Err(bad(format!("both {name} and its compressed form are present")));
        }
        if let Some(codes) = ints.remove(&format!("{p}.compressed")) {
            // Int8 non-zeros: validated and expanded by the f32 bitmask code (i8 → f32 is exact).
            let widened: Vec<f32> = codes.codes.as_slice().iter().map(|c| *c as f32).collect();
            let m = BitmaskMatrix::from_parts(rows, cols, bitmask.bytes, widened, offsets)
                .map_err(|e| bad(e.to_string()))?;
            let dense: Vec<i8> = m.to_dense().iter().map(|v| *v as i8).collect();
            let t = IntTensor {
                path: path.clone(),
                shape: vec![rows, cols],
                codes: Storage::Owned(dense),
                from_bitmask: true,
            };
            ints.insert(name, t);
            continue;
        }
        let values = out.remove(&format!("{p}.compressed")).ok_or_else(|| bad("no `.compressed` tensor".into()))?;
        let data = match values.data() {
            Data::F32(v) => {
                let m = BitmaskMatrix::from_parts(rows, cols, bitmask.bytes, v.as_slice().to_vec(), offsets)
                    .map_err(|e| bad(e.to_string()))?;
                Data::BitmaskF32(Arc::new(m))
            }
            Data::BF16(v) => {
                let m = BitmaskMatrix::from_parts(rows, cols, bitmask.bytes, v.as_slice().to_vec(), offsets)
                    .map_err(|e| bad(e.to_string()))?;
                Data::BitmaskBF16(Arc::new(m))
            }
            _ => return Err(bad("`.compressed` must hold f32, bf16 or int8 values".into())),
        };
        out.insert(name, Weight::new(vec![rows, cols], data).map_err(|e| bad(e.to_string()))?);
    }
    if let Some((name, (path, r))) = raw.into_iter().next() {
        return Err(st_err(&path, format!("tensor {name}: dtype {:?} is not a weight dtype", r.dtype)));
    }
    Ok(())
}

/// A safetensors file's bytes holding `items` (small files: checkpoints of a pruning run).
pub fn serialize_tensors<'a>(items: impl IntoIterator<Item = (&'a str, &'a Weight)>) -> Result<Vec<u8>> {
    let out: Vec<(&str, OutTensor)> =
        items.into_iter().map(|(n, w)| (n, OutTensor::Weight(std::borrow::Cow::Borrowed(w)))).collect();
    let refs: Vec<(&str, &OutTensor)> = out.iter().map(|(n, t)| (*n, t)).collect();
    safetensors::serialize(refs, None).map_err(|e| Error::Invalid(format!("serializing tensors: {e}")))
}

/// Options for writing a checkpoint directory.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Convert every tensor to this dtype (default: keep each tensor's dtype).
    pub dtype: Option<Dtype>,
    /// Shard above this many bytes of tensor data (transformers' default is 5 GB).
    pub max_shard_bytes: u64,
    /// Replace an existing directory.
    pub overwrite: bool,
    /// Extra `config.json` entries (e.g. `quantization_config`).
    pub extra_config: BTreeMap<String, Value>,
    /// Store these weights in `sparse-bitmask` form.
    pub bitmask: Option<BitmaskOptions>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            max_shard_bytes: 5_000_000_000,
            overwrite: false,
            extra_config: BTreeMap::new(),
            bitmask: None,
        }
    }
}

enum OutTensor<'a> {
    Weight(std::borrow::Cow<'a, Weight>),
    Raw(RawTensor),
}

impl OutTensor<'_> {
    fn nbytes(&self) -> usize {
        match self {
            OutTensor::Weight(w) => w.nbytes(),
            OutTensor::Raw(r) => r.bytes.len(),
        }
    }
}

impl View for &OutTensor<'_> {
    fn dtype(&self) -> StDtype {
        match self {
            OutTensor::Weight(w) => match w.dtype() {
                Dtype::F32 => StDtype::F32,
                Dtype::F16 => StDtype::F16,
                Dtype::BF16 => StDtype::BF16,
                Dtype::I8 => StDtype::I8,
            },
            OutTensor::Raw(r) => r.dtype,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::Weight(w) => w.shape(),
            OutTensor::Raw(r) => &r.shape,
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            OutTensor::Weight(w) => w.bytes(),
            OutTensor::Raw(r) => std::borrow::Cow::Borrowed(&r.bytes),
        }
    }
    fn data_len(&self) -> usize {
        self.nbytes()
    }
}

/// Writes these weights in the compressed-tensors `sparse-bitmask` layout: `<p>.shape` (int64),
/// `<p>.compressed` (non-zeros, row-major, original dtype), `<p>.bitmask` (uint8 `[rows,
/// ceil(cols/8)]`, LSB first, rows padded separately) and `<p>.row_offsets` (int64).
#[derive(Clone, Debug, Default)]
pub struct BitmaskOptions {
    /// Full tensor names (`model.layers.0.mlp.down_proj.weight`).
    pub targets: Vec<String>,
}

/// The `config.json` `quantization_config` of a checkpoint written with [`BitmaskOptions`]: what
/// compressed-tensors' `ModelCompressor.from_pretrained` reads to pick its `sparse-bitmask`
/// decompressor (no quantization: `format: dense`, no config groups).
///
/// `targets` and `ignore` are layer-name regexes searched anywhere in the name, as the pruning
/// recipe matches them; compressed-tensors (and vLLM) `re.match` a `re:` target from the start of
/// the name, so each is written as `re:.*?(?:<regex>)`, which selects the same layers there.
/// `sparsity_structure` is compressed-tensors' notation (`unstructured`, or `2:4` for two kept
/// weights in every four).
pub fn sparse_bitmask_quantization_config(
    global_sparsity: f64,
    sparsity_structure: &str,
    targets: &[String],
    ignore: &[String],
) -> Value {
    let search = |l: &[String]| l.iter().map(|t| format!("re:.*?(?:{t})")).collect::<Vec<_>>();
    json!({
        "quant_method": "compressed-tensors",
        "format": "dense",
        "config_groups": {},
        "sparsity_config": sparsity_config(global_sparsity, sparsity_structure, search(targets), search(ignore)),
    })
}

/// compressed-tensors' `sparsity_config` for the `sparse-bitmask` format (targets and ignore as
/// compressed-tensors reads them: module names, class names or `re:` patterns).
pub(crate) fn sparsity_config(
    global_sparsity: f64,
    sparsity_structure: &str,
    targets: Vec<String>,
    ignore: Vec<String>,
) -> Value {
    json!({
        "format": "sparse-bitmask",
        "global_sparsity": global_sparsity,
        "sparsity_structure": sparsity_structure,
        "targets": targets,
        "ignore": ignore,
        "registry_requires_subclass": false,
    })
}

/// An int8 weight's `<p>.weight_scale`: float32 `[rows, 1]`.
fn weight_scale<'a>(prefix: &str, m: &Int8Matrix) -> (String, OutTensor<'a>) {
    let bytes = bytemuck::cast_slice(m.scales()).to_vec();
    (
        format!("{prefix}.weight_scale"),
        OutTensor::Raw(RawTensor { dtype: StDtype::F32, shape: vec![m.rows(), 1], bytes }),
    )
}

/// The four tensors of one weight in `sparse-bitmask` form (and the scale of an int8 one, whose
/// non-zeros are its codes: what compressed-tensors' `ModelCompressor` writes for a sparse
/// `int-quantized` layer).
fn compress_bitmask<'a>(prefix: &str, w: &Weight, path_hint: &Path) -> Result<Vec<(String, OutTensor<'a>)>> {
    let [rows, cols] = w.dims2()?;
    let bad = |e: lacuna_kernels::KernelError| st_err(path_hint, format!("{prefix}: {e}"));
    let mut scale = None;
    let (bitmask, values, offsets) = match w.data() {
        Data::I8(m) => {
            // i8 → f32 and back are exact, and f32's `v != 0` is the codes' `c != 0`.
            let widened: Vec<f32> = m.codes().iter().map(|c| *c as f32).collect();
            let (b, v, o) = BitmaskMatrix::from_dense(&widened, rows, cols).map_err(bad)?.into_parts();
            scale = Some(weight_scale(prefix, m));
            let codes: Vec<i8> = v.iter().map(|x| *x as i8).collect();
            let n = codes.len();
            let values = Weight::from_int8(1, n, codes, vec![1.0])?;
            (b, values.data().clone(), o)
        }
        Data::BitmaskF32(m) => {
            let (b, v, o) = (**m).clone().into_parts();
            (b, Data::F32(Storage::Owned(v)), o)
        }
        Data::BitmaskBF16(m) => {
            let (b, v, o) = (**m).clone().into_parts();
            (b, Data::BF16(Storage::Owned(v)), o)
        }
        Data::F32(s) => {
            let (b, v, o) = BitmaskMatrix::from_dense(s.as_slice(), rows, cols).map_err(bad)?.into_parts();
            (b, Data::F32(Storage::Owned(v)), o)
        }
        Data::BF16(s) => {
            let (b, v, o) = BitmaskMatrix::from_dense(s.as_slice(), rows, cols).map_err(bad)?.into_parts();
            (b, Data::BF16(Storage::Owned(v)), o)
        }
        Data::F16(_) => {
            return Err(Error::Unsupported(format!("{prefix}: sparse-bitmask from f16 (convert to bf16 or f32)")));
        }
    };
    // Validated bitmasks: one set bit per stored value.
    let nnz: usize = bitmask.iter().map(|b| b.count_ones() as usize).sum();
    let le = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut parts = vec![
        (
            format!("{prefix}.shape"),
            OutTensor::Raw(RawTensor { dtype: StDtype::I64, shape: vec![2], bytes: le(&[rows as i64, cols as i64]) }),
        ),
        (format!("{prefix}.compressed"), OutTensor::Weight(std::borrow::Cow::Owned(Weight::new(vec![nnz], values)?))),
        (
            format!("{prefix}.bitmask"),
            OutTensor::Raw(RawTensor { dtype: StDtype::U8, shape: vec![rows, cols.div_ceil(8)], bytes: bitmask }),
        ),
        (
            format!("{prefix}.row_offsets"),
            OutTensor::Raw(RawTensor { dtype: StDtype::I64, shape: vec![rows], bytes: le(&offsets) }),
        ),
    ];
    parts.extend(scale);
    Ok(parts)
}

/// Writes `tensors` (HF names, in order) with `config` and `tokenizer` as a checkpoint directory.
pub fn save_dir(
    dir: &Path,
    config: &LlamaConfig,
    tensors: &[(String, &Weight)],
    tokenizer: Option<&Tokenizer>,
    opts: &SaveOptions,
) -> Result<()> {
    if dir.exists() && !opts.overwrite {
        return Err(Error::Invalid(format!("{} already exists (pass overwrite to replace it)", dir.display())));
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = dir.file_name().ok_or_else(|| Error::Invalid(format!("{}: not a directory name", dir.display())))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = write_contents(&tmp, config, tensors, tokenizer, opts);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = parent.join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    }
    if let Ok(d) = File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn write_contents(
    tmp: &Path,
    config: &LlamaConfig,
    tensors: &[(String, &Weight)],
    tokenizer: Option<&Tokenizer>,
    opts: &SaveOptions,
) -> Result<()> {
    // `torch_dtype` names the float dtype; int8 weights keep their codes whatever `opts.dtype` says.
    let dtype = opts
        .dtype
        .filter(|d| *d != Dtype::I8)
        .or_else(|| tensors.iter().map(|(_, w)| w.dtype()).find(|d| !matches!(d, Dtype::F32 | Dtype::I8)))
        .unwrap_or(Dtype::F32);
    let mut out: Vec<(String, OutTensor)> = Vec::new();
    for (n, w) in tensors {
        let weight = match opts.dtype {
            Some(d) if d != w.dtype() && w.dtype() != Dtype::I8 => std::borrow::Cow::Owned(w.to_dtype(d)),
            _ => std::borrow::Cow::Borrowed(*w),
        };
        let compress = opts.bitmask.as_ref().is_some_and(|b| b.targets.iter().any(|t| t == n));
        match (compress, n.strip_suffix(".weight"), weight.int8()) {
            (true, Some(prefix), _) => out.extend(compress_bitmask(prefix, &weight, tmp)?),
            (true, None, _) => return Err(Error::Invalid(format!("{n}: only `.weight` tensors can be compressed"))),
            (false, Some(prefix), Some(m)) => {
                let scale = weight_scale(prefix, m);
                out.push((n.clone(), OutTensor::Weight(weight)));
                out.push(scale);
            }
            (false, None, Some(_)) => {
                return Err(Error::Invalid(format!("{n}: int8 tensors are written only as `<module>.weight`")));
            }
            _ => out.push((n.clone(), OutTensor::Weight(weight))),
        }
    }

    // Greedy sharding in the given order, as transformers' `split_torch_state_dict_into_shards`.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (i, (_, t)) in out.iter().enumerate() {
        let b = t.nbytes() as u64;
        if cur > 0 && cur + b > opts.max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        shards.last_mut().expect("non-empty").push(i);
        cur += b;
    }
    let total: u64 = out.iter().map(|(_, t)| t.nbytes() as u64).sum();
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (si, idx) in shards.iter().enumerate() {
        let fname =
            if n == 1 { SINGLE_FILE.to_owned() } else { format!("model-{:05}-of-{:05}.safetensors", si + 1, n) };
        let path = tmp.join(&fname);
        let items: Vec<(&str, &OutTensor)> = idx.iter().map(|&i| (out[i].0.as_str(), &out[i].1)).collect();
        for (name, _) in &items {
            weight_map.insert((*name).to_owned(), json!(fname));
        }
        let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        safetensors::serialize_to_file(items, Some(meta), &path).map_err(|e| st_err(&path, e))?;
        // safetensors writes through a private temp file (mode 0600). Give the shard the mode the JSON
        // files get, 0666 less the umask (read off the directory, made as 0777 less the umask), so
        // that other users and services can load the checkpoint as they can its config.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let dir_mode = std::fs::metadata(tmp).map_err(|e| Error::io(tmp, e))?.permissions().mode();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(dir_mode & 0o666))
                .map_err(|e| Error::io(&path, e))?;
        }
        File::open(&path).and_then(|f| f.sync_all()).map_err(|e| Error::io(&path, e))?;
    }
    if n > 1 {
        write_json(&tmp.join(INDEX_FILE), &json!({"metadata": {"total_size": total}, "weight_map": weight_map}))?;
    }

    let mut cfg = config.to_hf_json(dtype.torch_name())?;
    if let Value::Object(m) = &mut cfg {
        for (k, v) in &opts.extra_config {
            m.insert(k.clone(), v.clone());
        }
    }
    write_json(&tmp.join("config.json"), &cfg)?;
    let eos = match config.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    write_json(
        &tmp.join("generation_config.json"),
        &json!({"bos_token_id": config.bos_token_id, "eos_token_id": eos}),
    )?;
    if let Some(tok) = tokenizer {
        tok.save_hf(tmp)?;
    }
    Ok(())
}
