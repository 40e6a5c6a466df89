//! GGUF v2/v3 reader: memory-mapped, metadata parsed eagerly, tensors borrowed from the map.
//!
//! OWNER: helper A. Interface (keep these signatures):
//!
//! ```ignore
//! pub struct GgufFile { /* Arc<Mmap>, path, version, metadata, tensors, data section offset */ }
//! #[derive(Clone, Debug, PartialEq)]
//! pub enum MetaValue { U8(u8), I8(i8), U16(u16), I16(i16), U32(u32), I32(i32), F32(f32), Bool(bool),
//!                      String(String), Array(Vec<MetaValue>), U64(u64), I64(i64), F64(f64) }
//! #[derive(Clone, Debug)]
//! pub struct GgufTensorInfo { pub name: String, pub dims: Vec<u64> /* GGML order: dims[0] is the
//!     contiguous (column) axis */, pub ty: lacuna_kernels::ggml::GgmlType, pub offset: u64 /* in data section */ }
//! impl GgufTensorInfo { pub fn shape(&self) -> Vec<usize> /* row-major, outermost first: [rows, cols] */;
//!                       pub fn n_elements(&self) -> usize; }
//! impl GgufFile {
//!     pub fn open(path: impl AsRef<Path>) -> crate::Result<Self>;   // validates every tensor's extent
//!     pub fn path(&self) -> &Path;
//!     pub fn version(&self) -> u32;
//!     pub fn metadata(&self) -> &BTreeMap<String, MetaValue>;
//!     pub fn tensors(&self) -> &[GgufTensorInfo];
//!     pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo>;
//!     pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8];
//!     pub fn dequantize(&self, name: &str) -> crate::Result<Vec<f32>>; // row-major, info.shape()
//!     // typed metadata getters; a missing key or wrong type is an Error::Gguf naming the key
//!     pub fn get_u32(&self, key: &str) -> crate::Result<u32>;   // accepts any integer type that fits
//!     pub fn get_f32(&self, key: &str) -> crate::Result<f32>;   // accepts F32/F64
//!     pub fn get_str(&self, key: &str) -> crate::Result<&str>;
//!     pub fn get(&self, key: &str) -> Option<&MetaValue>;
//! }
//! ```
