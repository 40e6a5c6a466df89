//! Weight tensors that stay in their checkpoint dtype and, where possible, in the memory map they
//! were read from: a bf16 checkpoint is served from its own pages, never copied or widened.

use std::sync::Arc;

use std::borrow::Cow;

use half::{bf16, f16};
use lacuna_kernels::bitmask::{BitmaskMatrix, BitmaskValue};
use lacuna_kernels::dense::{DenseMatrix, Element};
use lacuna_kernels::matrix::Matrix;
use lacuna_kernels::mmap::Mmap;

use crate::int8::{InputQuant, Int8Matrix};
use crate::{Error, Result};

/// Element type of a stored weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    /// Per-output-channel symmetric INT8 codes with an f32 scale per row ([`Int8Matrix`]).
    I8,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I8 => 1,
        }
    }
    /// The name transformers uses in `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::I8 => "int8",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
            Dtype::I8 => "int8",
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Dtype::F32),
            "f16" | "float16" | "half" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::BF16),
            _ => Err(Error::Invalid(format!("unknown dtype {s:?} (f32, f16, bf16)"))),
        }
    }
}

/// Elements either owned or borrowed from a shared memory map.
#[derive(Clone)]
pub enum Storage<T> {
    Owned(Vec<T>),
    /// `len` elements starting `offset` bytes into `map`; alignment was checked at construction.
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

impl<T: bytemuck::Pod> Storage<T> {
    /// Borrows `len` elements at byte `offset` of `map` when aligned, else copies them.
    pub fn from_map(map: &Arc<Mmap>, offset: usize, len: usize) -> Option<Self> {
        let bytes = map.get(offset..offset.checked_add(len.checked_mul(size_of::<T>())?)?)?;
        if bytemuck::try_cast_slice::<u8, T>(bytes).is_ok() {
            Some(Storage::Mapped { map: map.clone(), offset, len })
        } else {
            Some(Storage::Owned(bytemuck::pod_collect_to_vec(bytes)))
        }
    }

    pub fn as_slice(&self) -> &[T] {
        match self {
            Storage::Owned(v) => v,
            Storage::Mapped { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + *len * size_of::<T>()])
            }
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self, Storage::Mapped { .. })
    }

    /// Copies mapped elements into memory of this process (nothing for owned ones); returns the
    /// bytes copied.
    pub fn copy_into_memory(&mut self) -> usize {
        if !self.is_mapped() {
            return 0;
        }
        let v = self.as_slice().to_vec();
        let bytes = std::mem::size_of_val(&v[..]);
        *self = Storage::Owned(v);
        bytes
    }
}

#[derive(Clone)]
pub enum Data {
    F32(Storage<f32>),
    F16(Storage<f16>),
    BF16(Storage<bf16>),
    /// A matrix in the compressed-tensors `sparse-bitmask` form: the kernels expand its
    /// non-zeros in registers, so a decode step streams only the bitmask and the non-zeros.
    BitmaskF32(Arc<BitmaskMatrix<f32>>),
    BitmaskBF16(Arc<BitmaskMatrix<bf16>>),
    /// Per-output-channel symmetric INT8 (compressed-tensors `int-quantized`): codes and a scale
    /// per row. A W8A8 weight runs on the INT8 kernels (dense codes or their bitmask form); a
    /// W8A16 one through its dequantized f32 form (see [`crate::int8`]).
    I8(Arc<Int8Matrix>),
}

/// Keep a matrix in bitmask form only when that streams at most this share of its dense bytes:
/// a layer too dense to gain stays dense.
pub const BITMASK_MAX_BYTE_RATIO: f64 = 0.75;

/// A named-by-its-owner weight: shape (outermost first) and data.
#[derive(Clone)]
pub struct Weight {
    shape: Vec<usize>,
    data: Data,
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weight({:?}, {})", self.shape, self.dtype().name())
    }
}

impl Weight {
    pub fn new(shape: Vec<usize>, data: Data) -> Result<Self> {
        let w = Self { shape, data };
        let n: usize = w.shape.iter().product();
        if n != w.len() {
            return Err(Error::Invalid(format!("weight of shape {:?} holds {} elements", w.shape, w.len())));
        }
        Ok(w)
    }
    pub fn from_f32(shape: Vec<usize>, v: Vec<f32>) -> Result<Self> {
        Self::new(shape, Data::F32(Storage::Owned(v)))
    }
    /// A per-output-channel symmetric INT8 matrix: `w[r, c] = codes[r·cols + c] as f32 · scales[r]`.
    /// Errors unless `codes` holds `rows · cols` values and `scales` `rows` finite positive ones
    /// (an all-zero row takes any positive scale). Codes are whatever i8 the quantizer chose
    /// (compressed-tensors clamps to `-128..=127`). Activations are not quantized
    /// ([`Weight::with_input_quant`] makes it a W8A8 layer).
    pub fn from_int8(rows: usize, cols: usize, codes: Vec<i8>, scales: Vec<f32>) -> Result<Self> {
        Self::from_int8_matrix(Int8Matrix::new(rows, cols, Storage::Owned(codes), scales)?)
    }
    pub fn from_int8_matrix(m: Int8Matrix) -> Result<Self> {
        Self::new(vec![m.rows(), m.cols()], Data::I8(Arc::new(m)))
    }
    /// The INT8 matrix behind an int8 weight.
    pub fn int8(&self) -> Option<&Int8Matrix> {
        match &self.data {
            Data::I8(m) => Some(m),
            _ => None,
        }
    }
    /// This int8 weight with activations quantized as `q` on their way into it (W8A8 when
    /// [`crate::int8::InputQuant::Int8PerToken`]); an error for any other weight.
    pub fn with_input_quant(&self, q: crate::int8::InputQuant) -> Result<Weight> {
        match &self.data {
            Data::I8(m) => Self::from_int8_matrix(m.as_ref().clone().with_input_quant(q)),
            _ => Err(Error::Invalid(format!("{self:?}: only int8 weights quantize their input"))),
        }
    }
    /// Whether a product with this weight quantizes its input first (a W8A8 layer).
    pub fn quantizes_input(&self) -> bool {
        matches!(&self.data, Data::I8(m) if m.input_quant() != crate::int8::InputQuant::None)
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The element type (of the non-zeros, for a bitmask matrix).
    pub fn dtype(&self) -> Dtype {
        match self.data {
            Data::F32(_) | Data::BitmaskF32(_) => Dtype::F32,
            Data::F16(_) => Dtype::F16,
            Data::BF16(_) | Data::BitmaskBF16(_) => Dtype::BF16,
            Data::I8(_) => Dtype::I8,
        }
    }
    pub fn is_bitmask(&self) -> bool {
        matches!(self.data, Data::BitmaskF32(_) | Data::BitmaskBF16(_))
    }
    /// Bytes a full read of this weight streams (bitmask + non-zeros + row offsets when sparse).
    /// A W8A8 weight counts its codes (or their bitmask form) and scales; a W8A16 one the f32
    /// form it is multiplied through.
    pub fn stored_bytes(&self) -> usize {
        match &self.data {
            Data::BitmaskF32(m) => m.nbytes(),
            Data::BitmaskBF16(m) => m.nbytes(),
            Data::I8(m) if m.input_quant() == InputQuant::Int8PerToken => m.kernel_bytes(),
            Data::I8(m) => m.compute().stored_bytes(),
            _ => self.nbytes(),
        }
    }
    pub fn data(&self) -> &Data {
        &self.data
    }
    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(s) => s.as_slice().len(),
            Data::F16(s) => s.as_slice().len(),
            Data::BF16(s) => s.as_slice().len(),
            Data::BitmaskF32(m) => m.rows() * m.cols(),
            Data::BitmaskBF16(m) => m.rows() * m.cols(),
            Data::I8(m) => m.codes().len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn nbytes(&self) -> usize {
        self.len() * self.dtype().size()
    }
    /// Raw little-endian bytes of the dense tensor (what a safetensors file stores); a bitmask
    /// matrix is expanded; an int8 matrix gives its codes (its scales are a tensor of their own).
    pub fn bytes(&self) -> Cow<'_, [u8]> {
        match &self.data {
            Data::F32(s) => Cow::Borrowed(bytemuck::cast_slice(s.as_slice())),
            Data::F16(s) => Cow::Borrowed(bytemuck::cast_slice(s.as_slice())),
            Data::BF16(s) => Cow::Borrowed(bytemuck::cast_slice(s.as_slice())),
            Data::BitmaskF32(m) => Cow::Owned(bytemuck::cast_slice(&m.to_dense()).to_vec()),
            Data::BitmaskBF16(m) => Cow::Owned(bytemuck::cast_slice(&m.to_dense()).to_vec()),
            Data::I8(m) => Cow::Borrowed(bytemuck::cast_slice(m.codes())),
        }
    }
    pub fn is_mapped(&self) -> bool {
        match &self.data {
            Data::F32(s) => s.is_mapped(),
            Data::F16(s) => s.is_mapped(),
            Data::BF16(s) => s.is_mapped(),
            Data::BitmaskF32(_) | Data::BitmaskBF16(_) => false,
            Data::I8(m) => m.is_mapped(),
        }
    }
    /// All elements as f32 (a copy; int8 codes dequantized, `code · scale` rounded once).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        fn widen<T: Element>(s: &[T]) -> Vec<f32> {
            s.iter().map(|v| v.to_f32()).collect()
        }
        match &self.data {
            Data::F32(s) => s.as_slice().to_vec(),
            Data::F16(s) => widen(s.as_slice()),
            Data::BF16(s) => widen(s.as_slice()),
            Data::BitmaskF32(m) => m.to_dense(),
            Data::BitmaskBF16(m) => widen(&m.to_dense()),
            Data::I8(m) => m.dequantize(),
        }
    }
    /// Row `r` of a 2-D weight widened into `out`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let [rows, cols] = self.dims2()?;
        if r >= rows || out.len() != cols {
            return Err(Error::Invalid(format!("row {r} of {:?} into a buffer of {}", self.shape, out.len())));
        }
        fn copy<T: Element>(s: &[T], out: &mut [f32]) {
            for (o, v) in out.iter_mut().zip(s) {
                *o = v.to_f32();
            }
        }
        fn expand<T: BitmaskValue>(m: &BitmaskMatrix<T>, r: usize, out: &mut [f32]) {
            let stride = m.cols().div_ceil(8);
            let bits = &m.bitmask()[r * stride..(r + 1) * stride];
            let mut k = m.row_offsets()[r] as usize;
            for (c, o) in out.iter_mut().enumerate() {
                *o = if bits[c / 8] >> (c % 8) & 1 == 1 {
                    k += 1;
                    m.values()[k - 1].to_f32()
                } else {
                    0.0
                };
            }
        }
        let range = r * cols..(r + 1) * cols;
        match &self.data {
            Data::F32(s) => out.copy_from_slice(&s.as_slice()[range]),
            Data::F16(s) => copy(&s.as_slice()[range], out),
            Data::BF16(s) => copy(&s.as_slice()[range], out),
            Data::BitmaskF32(m) => expand(m, r, out),
            Data::BitmaskBF16(m) => expand(m, r, out),
            Data::I8(m) => m.dequantize_row_into(r, out),
        }
        Ok(())
    }
    /// Number of elements exactly equal to zero (either sign; zero codes of an int8 matrix).
    pub fn count_zeros(&self) -> usize {
        match &self.data {
            Data::F32(s) => s.as_slice().iter().filter(|v| **v == 0.0).count(),
            Data::F16(s) => s.as_slice().iter().filter(|v| (v.to_bits() & 0x7fff) == 0).count(),
            Data::BF16(s) => s.as_slice().iter().filter(|v| (v.to_bits() & 0x7fff) == 0).count(),
            Data::BitmaskF32(m) => self.len() - m.nnz() + m.values().iter().filter(|v| **v == 0.0).count(),
            Data::BitmaskBF16(m) => {
                self.len() - m.nnz() + m.values().iter().filter(|v| (v.to_bits() & 0x7fff) == 0).count()
            }
            Data::I8(m) => m.codes().iter().filter(|c| **c == 0).count(),
        }
    }
    pub fn dims2(&self) -> Result<[usize; 2]> {
        match self.shape.as_slice() {
            [r, c] => Ok([*r, *c]),
            s => Err(Error::Invalid(format!("expected a matrix, got shape {s:?}"))),
        }
    }
    /// Converts to another dtype (a copy unless it already is that dtype); a bitmask matrix
    /// becomes dense, an int8 one is dequantized, and [`Dtype::I8`] rounds each row to nearest
    /// with the scale `max|row| / 127` (the last dimension is the row).
    pub fn to_dtype(&self, dtype: Dtype) -> Weight {
        if dtype == self.dtype() && !self.is_bitmask() {
            return self.clone();
        }
        let v = self.to_f32_vec();
        let data = match dtype {
            Dtype::F32 => Data::F32(Storage::Owned(v)),
            Dtype::F16 => Data::F16(Storage::Owned(v.iter().map(|x| f16::from_f32(*x)).collect())),
            Dtype::BF16 => Data::BF16(Storage::Owned(v.iter().map(|x| bf16::from_f32(*x)).collect())),
            Dtype::I8 => {
                let cols = self.shape.last().copied().unwrap_or(1).max(1);
                Data::I8(Arc::new(Int8Matrix::round_to_nearest(&v, v.len() / cols, cols)))
            }
        };
        Weight { shape: self.shape.clone(), data }
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ` for a 2-D weight; a W8A8 weight on the INT8 kernels, its
    /// input quantized per token.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        Ok(self.matrix()?.matmul(x, n, y)?)
    }

    /// The reference of [`Weight::matmul`], the oracle the INT8 kernels are tested against: a
    /// W8A8 weight's product is its dequantized f32 form (`code · scale`) times the input
    /// quantized per token in f32 ([`crate::int8::quantize_activations_per_token`]); any other
    /// weight's is [`Weight::matmul`].
    pub fn matmul_dequantized(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        match &self.data {
            Data::I8(m) if m.input_quant() == InputQuant::Int8PerToken => {
                let [_, cols] = self.dims2()?;
                let mut xq = vec![0f32; x.len()];
                crate::int8::quantize_activations_per_token(x, cols, &mut xq)?;
                Ok(m.compute().matrix()?.matmul(&xq, n, y)?)
            }
            _ => self.matmul(x, n, y),
        }
    }

    /// The kernels' view of this 2-D weight, whatever its stored format: a W8A8 weight lends its
    /// INT8 codes ([`Matrix::Int8`], whose products quantize their input), a W8A16 one its
    /// dequantized f32 form.
    pub fn matrix(&self) -> Result<Matrix<'_>> {
        let [rows, cols] = self.dims2()?;
        Ok(match &self.data {
            Data::F32(s) => Matrix::F32(DenseMatrix::new(s.as_slice(), rows, cols)?),
            Data::F16(s) => Matrix::F16(DenseMatrix::new(s.as_slice(), rows, cols)?),
            Data::BF16(s) => Matrix::Bf16(DenseMatrix::new(s.as_slice(), rows, cols)?),
            Data::BitmaskF32(m) => Matrix::BitmaskF32(m.view()),
            Data::BitmaskBF16(m) => Matrix::BitmaskBf16(m.view()),
            Data::I8(m) if m.input_quant() == InputQuant::Int8PerToken => Matrix::Int8(m.kernel_matrix()?),
            Data::I8(m) => return m.compute().matrix(),
        })
    }

    /// The dense form (a copy for a bitmask matrix, the dense codes alone for an int8 one, a
    /// clone otherwise).
    pub fn densify(&self) -> Weight {
        match &self.data {
            Data::I8(m) if m.bitmask_codes().is_some() => Weight {
                shape: self.shape.clone(),
                data: Data::I8(Arc::new(m.as_ref().clone().without_bitmask_codes())),
            },
            _ if self.is_bitmask() => self.to_dtype(self.dtype()),
            _ => self.clone(),
        }
    }

    /// Copies what this weight's products read from a file mapping into process memory (see
    /// [`Llama::copy_mapped_weights`](crate::Llama::copy_mapped_weights)); returns the bytes
    /// copied. Int8 codes are copied only where W8A8 products read them: not under bitmask codes
    /// (decoded into memory at load), not for W8A16 (products read its dequantized form), not
    /// when the matrix is shared with another owner.
    pub fn copy_mapped_into_memory(&mut self) -> usize {
        match &mut self.data {
            Data::F32(s) => s.copy_into_memory(),
            Data::F16(s) => s.copy_into_memory(),
            Data::BF16(s) => s.copy_into_memory(),
            Data::BitmaskF32(_) | Data::BitmaskBF16(_) => 0,
            Data::I8(m)
                if m.input_quant() == InputQuant::Int8PerToken && m.bitmask_codes().is_none() && m.is_mapped() =>
            {
                Arc::get_mut(m).map_or(0, |m| m.copy_codes_into_memory())
            }
            Data::I8(_) => 0,
        }
    }

    /// Whether products run on a `sparse-bitmask` form (a float bitmask matrix, or the codes of
    /// an int8 one).
    pub fn runs_bitmask(&self) -> bool {
        self.is_bitmask() || self.int8().is_some_and(|m| m.bitmask_codes().is_some())
    }

    /// The `sparse-bitmask` form of a 2-D f32/bf16 weight, if it streams at most
    /// [`BITMASK_MAX_BYTE_RATIO`] of the dense bytes; `None` when it would not pay. An int8
    /// weight stays int8: a W8A8 one runs on the bitmask form of its codes (compared with the
    /// dense codes), a W8A16 one on the f32 bitmask form of its dequantized values (compared
    /// with the dense f32 form).
    pub fn to_bitmask_if_smaller(&self) -> Result<Option<Weight>> {
        if self.is_bitmask() {
            return Ok(Some(self.clone()));
        }
        if let Data::I8(m) = &self.data {
            let [rows, cols] = self.dims2()?;
            if m.input_quant() == InputQuant::Int8PerToken {
                let b = BitmaskMatrix::from_dense(m.codes(), rows, cols)?;
                if b.nbytes() as f64 > BITMASK_MAX_BYTE_RATIO * m.codes().len() as f64 {
                    return Ok(None);
                }
                return Ok(Some(Self::from_int8_matrix(m.as_ref().clone().with_bitmask_codes(b)?)?));
            }
            let Some(b) = Weight::from_f32(self.shape.clone(), m.dequantize())?.to_bitmask_if_smaller()? else {
                return Ok(None);
            };
            return Ok(Some(Self::from_int8_matrix(m.as_ref().clone().with_compute(b)?)?));
        }
        let [rows, cols] = match self.shape.as_slice() {
            [r, c] => [*r, *c],
            _ => return Ok(None),
        };
        let data = match &self.data {
            Data::F32(s) => Data::BitmaskF32(Arc::new(BitmaskMatrix::from_dense(s.as_slice(), rows, cols)?)),
            Data::BF16(s) => Data::BitmaskBF16(Arc::new(BitmaskMatrix::from_dense(s.as_slice(), rows, cols)?)),
            _ => return Ok(None),
        };
        let w = Weight { shape: self.shape.clone(), data };
        Ok((w.stored_bytes() as f64 <= BITMASK_MAX_BYTE_RATIO * self.nbytes() as f64).then_some(w))
    }
}
