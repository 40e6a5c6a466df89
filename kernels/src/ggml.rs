//! GGML block formats (as stored in GGUF files) and their dequantization to f32.
//!
//! OWNER: helper A. Interface (keep these signatures):
//!
//! ```ignore
//! #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
//! pub enum GgmlType { F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K, /* ... */ }
//! impl GgmlType {
//!     pub fn from_u32(v: u32) -> Option<Self>;      // GGUF's ggml_type numbering
//!     pub fn name(self) -> &'static str;            // "Q4_K", "F32", ...
//!     pub fn block_size(self) -> usize;             // elements per block (1 for F32/F16/BF16)
//!     pub fn type_size(self) -> usize;              // bytes per block
//!     pub fn row_bytes(self, n: usize) -> crate::Result<usize>; // bytes for n elements (n % block_size == 0)
//!     pub fn can_dequantize(self) -> bool;
//! }
//! /// Dequantize `out.len()` elements from `data` (exactly `ty.row_bytes(out.len())` bytes).
//! pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> crate::Result<()>;
//! ```
