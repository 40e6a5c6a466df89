//! GGUF v2/v3 reader: memory-mapped, metadata parsed eagerly, tensors borrowed from the map.
//!
//! Layout (little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, the
//! metadata key/value pairs, the tensor infos (name, u32 n_dims, u64 dims in GGML order, u32
//! type, u64 offset), padding to `general.alignment` (default 32), then the data section that
//! tensor offsets are relative to. v1 (u32 counts) and big-endian files are rejected.
//!
//! Everything read from the file is bounds-checked: a malformed or truncated file gives an
//! [`Error::Gguf`] naming the file and the problem, never a panic or an out-of-bounds read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lacuna_kernels::ggml::{self, GgmlType};
use lacuna_kernels::mmap::{Mmap, map_file};

use crate::{Error, Result};

/// One metadata value. GGUF arrays are homogeneous but may nest.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }

    fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

/// Where one tensor lives and what it holds.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the contiguous (column) axis.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset inside the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Row-major shape, outermost first (`[rows, cols]` for a matrix): the reversed `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements (saturating for infos not validated by [`GgufFile::open`]).
    pub fn n_elements(&self) -> usize {
        let n = self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d));
        usize::try_from(n).unwrap_or(usize::MAX)
    }
}

/// An open, validated GGUF file.
pub struct GgufFile {
    map: Arc<Mmap>,
    path: PathBuf,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    /// Absolute file offset of the data section.
    data_offset: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Deeper array nesting than any real file uses; bounds recursion on hostile input.
const MAX_ARRAY_DEPTH: usize = 8;
/// Smallest encodings, to reject counts that cannot fit in the rest of the file before looping.
const MIN_KV_BYTES: usize = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;

impl GgufFile {
    /// Map and parse `path`, validating the header, all metadata, and every tensor's type, shape,
    /// alignment and byte extent.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let map = map_file(&path).map_err(|e| Error::io(&path, e))?;
        match parse(&map) {
            Ok(h) => {
                let by_name = h.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
                Ok(GgufFile {
                    map: Arc::new(map),
                    path,
                    version: h.version,
                    metadata: h.metadata,
                    tensors: h.tensors,
                    by_name,
                    data_offset: h.data_offset,
                })
            }
            Err(msg) => Err(Error::Gguf { path, msg }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The mapped file, for holding tensor bytes beyond this struct's lifetime
    /// (pair it with [`GgufFile::tensor_range`]).
    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// Absolute byte range of a tensor in the map; `None` if `info` does not fit this file
    /// (only possible for an info that did not come from this file).
    pub fn tensor_range(&self, info: &GgufTensorInfo) -> Option<Range<usize>> {
        let nbytes = info.ty.row_bytes(info.n_elements()).ok()?;
        let start = usize::try_from(info.offset).ok()?.checked_add(self.data_offset)?;
        let end = start.checked_add(nbytes)?;
        (end <= self.map.len()).then_some(start..end)
    }

    /// The tensor's raw GGML bytes, borrowed from the map. Infos from this file are validated at
    /// open; for a foreign info that does not fit, this is empty.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        self.tensor_range(info).and_then(|r| self.map.get(r)).unwrap_or(&[])
    }

    /// Dequantize tensor `name` to row-major f32 of shape `info.shape()`.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor(name).ok_or_else(|| self.err(format!("no tensor named '{name}'")))?;
        let mut out = vec![0f32; info.n_elements()];
        ggml::dequantize(info.ty, self.tensor_bytes(info), &mut out)
            .map_err(|e| self.err(format!("tensor '{name}': {e}")))?;
        Ok(out)
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn err(&self, msg: String) -> Error {
        Error::Gguf { path: self.path.clone(), msg }
    }

    fn require(&self, key: &str) -> Result<&MetaValue> {
        self.get(key).ok_or_else(|| self.err(format!("missing metadata key '{key}'")))
    }

    /// Integer metadata of any integer type whose value fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.require(key)?;
        let i = v
            .as_i128()
            .ok_or_else(|| self.err(format!("metadata key '{key}' is {}, expected an integer", v.type_name())))?;
        u32::try_from(i).map_err(|_| self.err(format!("metadata key '{key}' = {i} does not fit in u32")))
    }

    /// Float metadata stored as f32 or f64.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.require(key)? {
            MetaValue::F32(v) => Ok(*v),
            MetaValue::F64(v) => Ok(*v as f32),
            v => Err(self.err(format!("metadata key '{key}' is {}, expected a float", v.type_name()))),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            MetaValue::String(s) => Ok(s),
            v => Err(self.err(format!("metadata key '{key}' is {}, expected a string", v.type_name()))),
        }
    }
}

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<GgufTensorInfo>,
    data_offset: usize,
}

/// Parse and validate the whole header. Errors are messages; the caller adds the path.
fn parse(buf: &[u8]) -> Result<Parsed, String> {
    let mut r = Reader { buf, pos: 0 };
    let magic = r.take(4, "magic")?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file: magic bytes are {:?}, expected \"GGUF\"",
            String::from_utf8_lossy(magic)
        ));
    }
    let version = r.u32("version")?;
    match version {
        2 | 3 => {}
        1 => return Err("unsupported GGUF version 1 (only v2 and v3 are supported)".into()),
        v if v.swap_bytes() <= 3 => return Err("big-endian GGUF files are not supported".into()),
        v => {
            return Err(format!("unsupported GGUF version {v} (only v2 and v3 are supported)"));
        }
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    check_count(&r, n_kv, MIN_KV_BYTES, "metadata count")?;
    check_count(&r, n_tensors, MIN_TENSOR_INFO_BYTES, "tensor count")?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string().map_err(|e| format!("metadata entry #{i}: key: {e}"))?;
        let value =
            r.u32("value type").and_then(|t| r.value(t, 0)).map_err(|e| format!("metadata key '{key}': {e}"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("duplicate metadata key '{key}'"));
        }
    }

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen = HashSet::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let info = r.tensor_info().map_err(|e| format!("tensor info #{i}: {e}"))?;
        if !seen.insert(info.name.clone()) {
            return Err(format!("duplicate tensor name '{}'", info.name));
        }
        tensors.push(info);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_i128() {
            Some(a) if a > 0 && a <= u32::MAX as i128 && (a as u64).is_power_of_two() => a as u64,
            _ => {
                return Err(format!("general.alignment must be a power-of-two u32, got {v:?}"));
            }
        },
    };
    let file_len = buf.len() as u64;
    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;

    for t in &tensors {
        let bytes = tensor_nbytes(t).map_err(|e| format!("tensor '{}': {e}", t.name))?;
        if !t.offset.is_multiple_of(alignment) {
            return Err(format!(
                "tensor '{}': data offset {} is not a multiple of the alignment {alignment}",
                t.name, t.offset
            ));
        }
        let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(bytes));
        if end.is_none_or(|end| end > file_len) {
            return Err(format!(
                "tensor '{}' ({}, {bytes} bytes at file offset {}) runs past the end of the file \
                     ({file_len} bytes): truncated file?",
                t.name,
                t.ty,
                data_offset.saturating_add(t.offset)
            ));
        }
    }

    Ok(Parsed { version, metadata, tensors, data_offset: data_offset as usize })
}

/// Bytes of a tensor, with its shape validated against the type's block size.
fn tensor_nbytes(t: &GgufTensorInfo) -> Result<u64, String> {
    let mut n: u64 = 1;
    for &d in &t.dims {
        n = n.checked_mul(d).ok_or_else(|| format!("dims {:?} overflow the element count", t.dims))?;
    }
    let bs = t.ty.block_size() as u64;
    let row = t.dims.first().copied().unwrap_or(1);
    if !row.is_multiple_of(bs) {
        return Err(format!("row length {row} is not a multiple of the {} block size {bs}", t.ty));
    }
    let n = usize::try_from(n).map_err(|_| format!("{n} elements do not fit in memory"))?;
    t.ty.row_bytes(n).map(|b| b as u64).map_err(|e| e.to_string())
}

fn check_count(r: &Reader<'_>, n: u64, min_bytes: usize, what: &str) -> Result<(), String> {
    let room = (r.remaining() / min_bytes) as u64;
    if n > room {
        return Err(format!(
            "{what} {n} is impossible: the remaining {} bytes of the file hold at most {room}",
            r.remaining()
        ));
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!(
                "{what} ({n} bytes at offset {}) runs past the end of the file ({} bytes)",
                self.pos,
                self.buf.len()
            )
        })?;
        let s = self.buf.get(self.pos..end).unwrap_or(&[]);
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.arr(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.arr(what).map(u64::from_le_bytes)
    }

    fn string(&mut self) -> Result<String, String> {
        let at = self.pos;
        let len = self.u64("string length")?;
        if len > self.remaining() as u64 {
            return Err(format!(
                "string length {len} at offset {at} runs past the end of the file ({} bytes)",
                self.buf.len()
            ));
        }
        let bytes = self.take(len as usize, "string")?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("string at offset {at} is not UTF-8: {e}"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.arr("u8 value")?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.arr("i8 value")?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr("u16 value")?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr("i16 value")?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.arr("u32 value")?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr("i32 value")?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr("f32 value")?)),
            7 => match self.arr::<1>("bool value")? {
                [0] => MetaValue::Bool(false),
                [1] => MetaValue::Bool(true),
                [b] => {
                    return Err(format!("bool byte {b} at offset {} is neither 0 nor 1", self.pos - 1));
                }
            },
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let elem = self.u32("array element type")?;
                let n = self.u64("array length")?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(format!("unknown array element type {t}")),
                };
                if n > (self.remaining() / min) as u64 {
                    return Err(format!(
                        "array of {n} elements of type {elem} at offset {} runs past the end of the file ({} bytes)",
                        self.pos,
                        self.buf.len()
                    ));
                }
                let mut v = Vec::with_capacity((n as usize).min(1 << 16));
                for i in 0..n {
                    v.push(self.value(elem, depth + 1).map_err(|e| format!("array element {i}: {e}"))?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.arr("u64 value")?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr("i64 value")?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr("f64 value")?)),
            t => return Err(format!("unknown value type {t}")),
        })
    }

    fn tensor_info(&mut self) -> Result<GgufTensorInfo, String> {
        let name = self.string().map_err(|e| format!("name: {e}"))?;
        let ctx = |e: String| format!("tensor '{name}': {e}");
        let n_dims = self.u32("dimension count").map_err(ctx)?;
        if n_dims > MAX_DIMS {
            return Err(ctx(format!("{n_dims} dimensions (ggml supports at most {MAX_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64("dimension").map_err(ctx)?);
        }
        let t = self.u32("type").map_err(ctx)?;
        let ty = GgmlType::from_u32(t).ok_or_else(|| ctx(format!("unknown GGML tensor type {t}")))?;
        let offset = self.u64("data offset").map_err(ctx)?;
        Ok(GgufTensorInfo { name, dims, ty, offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal GGUF writer for structural cases the Python fixture cannot produce.
    struct W(Vec<u8>);
    impl W {
        fn new(version: u32, n_tensors: u64, n_kv: u64) -> Self {
            let mut w = W(b"GGUF".to_vec());
            w.u32(version);
            w.u64(n_tensors);
            w.u64(n_kv);
            w
        }
        fn u32(&mut self, v: u32) {
            self.0.extend(v.to_le_bytes());
        }
        fn u64(&mut self, v: u64) {
            self.0.extend(v.to_le_bytes());
        }
        fn str(&mut self, s: &str) {
            self.u64(s.len() as u64);
            self.0.extend(s.as_bytes());
        }
    }

    fn parse_err(buf: &[u8]) -> String {
        match parse(buf) {
            Ok(_) => panic!("parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn nested_arrays_alignment_and_tensor() {
        let mut w = W::new(2, 1, 2);
        w.str("nested");
        w.u32(9);
        w.u32(9); // array of arrays
        w.u64(2);
        for row in [[1u16, 2].as_slice(), &[3]] {
            w.u32(2);
            w.u64(row.len() as u64);
            for v in row {
                w.0.extend(v.to_le_bytes());
            }
        }
        w.str("general.alignment");
        w.u32(4);
        w.u32(64);
        w.str("t");
        w.u32(2);
        w.u64(2);
        w.u64(3);
        w.u32(0); // F32
        w.u64(0);
        let data_at = w.0.len().div_ceil(64) * 64;
        w.0.resize(data_at, 0);
        for v in 0..6 {
            w.0.extend((v as f32).to_le_bytes());
        }
        let p = parse(&w.0).unwrap();
        assert_eq!(p.version, 2);
        assert_eq!(p.data_offset, data_at);
        use MetaValue::*;
        assert_eq!(p.metadata["nested"], Array(vec![Array(vec![U16(1), U16(2)]), Array(vec![U16(3)])]));
        let t = &p.tensors[0];
        assert_eq!((t.shape(), t.n_elements(), t.ty), (vec![3, 2], 6, GgmlType::F32));
    }

    #[test]
    fn rejects_structural_problems() {
        let mut w = W::new(3, 0, 1);
        w.str("k");
        w.u32(13);
        assert!(parse_err(&w.0).contains("unknown value type 13"));

        let mut w = W::new(3, 0, 1);
        w.str("k");
        w.u32(9);
        w.u32(4);
        w.u64(1 << 40);
        assert!(parse_err(&w.0).contains("runs past the end"));

        let mut w = W::new(3, 0, 1);
        w.str("k");
        w.u32(9);
        for _ in 0..100 {
            w.u32(9);
            w.u64(1);
        }
        w.0.resize(w.0.len() + 100, 0);
        let e = parse_err(&w.0);
        assert!(e.contains("nested deeper"), "{e}");

        let e = parse_err(&W::new(3, u64::MAX, 0).0);
        assert!(e.contains("tensor count") && e.contains("impossible"), "{e}");
        let e = parse_err(&W::new(1, 0, 0).0);
        assert!(e.contains("version 1"), "{e}");
        let e = parse_err(&W::new(3u32.swap_bytes(), 0, 0).0);
        assert!(e.contains("big-endian"), "{e}");

        // Tensor problems: unknown type, overflowing dims, misaligned offset, bad row length.
        let tensor = |dims: &[u64], ty: u32, off: u64| {
            let mut w = W::new(3, 1, 0);
            w.str("w");
            w.u32(dims.len() as u32);
            for &d in dims {
                w.u64(d);
            }
            w.u32(ty);
            w.u64(off);
            w.0.resize(w.0.len().div_ceil(32) * 32 + 4096, 0);
            parse(&w.0).err().unwrap_or_default()
        };
        assert_eq!(tensor(&[4, 4], 0, 0), "");
        assert!(tensor(&[4], 4, 0).contains("unknown GGML tensor type 4"));
        assert!(tensor(&[u64::MAX, 4], 0, 0).contains("overflow"));
        assert!(tensor(&[4], 0, 16).contains("not a multiple of the alignment"));
        assert!(tensor(&[16], 8, 0).contains("block size"));
        assert!(tensor(&[4096], 0, 0).contains("runs past the end"));
        assert!(tensor(&[1, 1, 1, 1, 1], 0, 0).contains("dimensions"));
    }
}
