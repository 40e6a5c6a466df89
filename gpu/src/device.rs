//! A CUDA device with every kernel module loaded, and the safe, shape-checked operations a decode
//! step is made of. Buffers are cudarc `CudaSlice`s on the device's default stream; every launch
//! checks the lengths it relies on before it is issued.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, PushKernelArg};
use cudarc::nvrtc::Ptx;

use crate::kernels::{Module, WeightDtype, product_kernel};
use crate::launch::{self, PackedWeight};
use crate::nvrtc::{self, Target};
use crate::{GpuError, Result};

/// Whether a CUDA driver can be opened and reports at least one device: `Err` says why not, in
/// words a user can act on. Never panics (cudarc would, on a missing library).
pub fn probe() -> Result<usize> {
    // SAFETY: probes libcuda's candidate names with dlopen; no driver function is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(GpuError::NoDriver(
            "libcuda.so.1 could not be opened (no NVIDIA driver is installed, or its library is not on the loader's path)"
                .into(),
        ));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err(GpuError::NoDriver("the CUDA driver reports no devices".into())),
        Err(e) => Err(GpuError::NoDriver(format!("the CUDA driver did not initialise: {e}"))),
    }
}

/// One CUDA device with the kernel modules compiled for its architecture and loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
    target: Target,
    name: String,
}

impl Gpu {
    /// Opens device `ordinal`, compiles (or reads from the cache) every module for it, loads them.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let count = probe()?;
        if ordinal >= count {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let nv = nvrtc::load()?;
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let target = Target::for_device((major as u32, minor as u32), &nv.archs)?;
        let mut functions = HashMap::new();
        for m in Module::ALL {
            let image = nvrtc::compile_cached(m, target)?;
            let module = ctx.load_module(Ptx::from_binary(image))?;
            for name in m.kernel_names() {
                let f = module.load_function(&name)?;
                functions.insert(name, f);
            }
        }
        let name = ctx.name()?;
        let stream = ctx.default_stream();
        tracing::info!("CUDA device {ordinal}: {name}, compute capability {major}.{minor}, kernels for {target}");
        Ok(Gpu { ctx, stream, functions, target, name })
    }

    /// The device's name as the driver reports it (`NVIDIA H100 80GB HBM3`).
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn target(&self) -> Target {
        self.target
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| GpuError::Unsupported(format!("kernel {name} is not loaded")))
    }

    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(host)?)
    }
    pub fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        Ok(self.stream.alloc_zeros::<f32>(len.max(1))?)
    }
    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(dev)?)
    }

    /// Uploads a packed weight once, in its stored format.
    pub fn upload_matrix(&self, w: &PackedWeight) -> Result<GpuMatrix> {
        let values = self.upload(&w.values)?;
        let sparse = if w.is_bitmask() { Some((self.upload(&w.mask)?, self.upload(&w.row_offsets)?)) } else { None };
        Ok(GpuMatrix { rows: w.rows, cols: w.cols, dtype: w.dtype, values, sparse, nbytes: w.nbytes() })
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ` (f32 activations), in launches of at most 32 rows of `x`.
    pub fn matmul(&self, w: &GpuMatrix, x: &CudaSlice<f32>, n: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        let (rows, cols) = (w.rows, w.cols);
        if x.len() < n * cols || y.len() < n * rows {
            return Err(GpuError::Shape(format!(
                "product of [{rows}, {cols}] with {n} rows needs x ≥ {} and y ≥ {} values, got {} and {}",
                n * cols,
                n * rows,
                x.len(),
                y.len()
            )));
        }
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let kind = if w.sparse.is_some() { "bitmask" } else { "dense" };
        let (rows_i, cols_i) = (to_i32(rows, "rows")?, to_i32(cols, "cols")?);
        let cfg = launch::product(rows)?.to_config();
        for (start, len) in launch::batch_chunks(n) {
            let nb = launch::batch_tile(len)?;
            let f = self.function(&product_kernel(kind, w.dtype, nb))?;
            let xs = x.slice(start * cols..(start + len) * cols);
            let mut ys = y.slice_mut(start * rows..(start + len) * rows);
            let len_i = len as i32;
            let mut b = self.stream.launch_builder(f);
            if let Some((mask, offsets)) = &w.sparse {
                b.arg(mask).arg(&w.values).arg(offsets);
            } else {
                b.arg(&w.values);
            }
            b.arg(&xs).arg(&mut ys).arg(&rows_i).arg(&cols_i).arg(&len_i);
            // SAFETY: the kernel's signature is (mask, values, row_offsets)? + (x, y, rows, cols, n)
            // as pushed; `x` holds len · cols and `y` len · rows values (checked above); a bitmask
            // matrix's parts were validated by `BitmaskView` before packing (mask rows · ⌈cols/8⌉
            // bytes, offsets within the values); a dense one holds rows · cols values.
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }

    /// `out[r] = x[r] / rms(x[r]) · w` over `rows` rows of `w.len()` values.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = w.len();
        if x.len() < rows * d || out.len() < rows * d {
            return Err(GpuError::Shape(format!(
                "rms_norm of {rows} rows of {d} on buffers of {} and {}",
                x.len(),
                out.len()
            )));
        }
        let d_i = to_i32(d, "width")?;
        let mut b = self.stream.launch_builder(self.function("rms_norm")?);
        b.arg(x).arg(w).arg(out).arg(&d_i).arg(&eps);
        // SAFETY: rms_norm(x, w, out, d, eps) reads rows · d values of x and d of w, writes rows · d (checked).
        unsafe { b.launch(launch::per_row(rows)?.to_config()) }?;
        Ok(())
    }

    /// Rotates `x` (`[n, n_head · hd]`) in place, row `b` at position `pos[b]`.
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        pos: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        n: usize,
        n_head: usize,
    ) -> Result<()> {
        let hd = inv_freq.len() * 2;
        if x.len() < n * n_head * hd || pos.len() < n {
            return Err(GpuError::Shape(format!(
                "rope of [{n}, {n_head} × {hd}] on {} values, {} positions",
                x.len(),
                pos.len()
            )));
        }
        let (nh, hd_i) = (to_i32(n_head, "heads")?, to_i32(hd, "head_dim")?);
        let mut b = self.stream.launch_builder(self.function("rope")?);
        b.arg(x).arg(pos).arg(inv_freq).arg(&nh).arg(&hd_i);
        // SAFETY: rope(x, pos, inv_freq, n_head, hd) touches n · n_head · hd values of x, n positions
        // and hd / 2 frequencies (checked).
        unsafe { b.launch(launch::rope(n, n_head, hd)?.to_config()) }?;
        Ok(())
    }

    /// `gate = silu(gate) · up` over `len` values.
    pub fn swiglu(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>, len: usize) -> Result<()> {
        self.elementwise("swiglu", gate, up, len)
    }

    /// `x += y` over `len` values.
    pub fn add_into(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, len: usize) -> Result<()> {
        self.elementwise("add_into", x, y, len)
    }

    fn elementwise(&self, kernel: &str, a: &mut CudaSlice<f32>, b_: &CudaSlice<f32>, len: usize) -> Result<()> {
        if a.len() < len || b_.len() < len {
            return Err(GpuError::Shape(format!(
                "{kernel} of {len} values on buffers of {} and {}",
                a.len(),
                b_.len()
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let len_i = to_i32(len, "length")?;
        let mut b = self.stream.launch_builder(self.function(kernel)?);
        b.arg(a).arg(b_).arg(&len_i);
        // SAFETY: (a, b, len) with both buffers holding at least len values (checked).
        unsafe { b.launch(launch::elementwise(len)?.to_config()) }?;
        Ok(())
    }

    /// `out[b] = table[tokens[b]]` widened to f32 (`table` is `[vocab, hidden]`).
    pub fn embed(&self, table: &GpuMatrix, tokens: &CudaSlice<u32>, n: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        if table.sparse.is_some() {
            return Err(GpuError::Unsupported("a bitmask embedding table".into()));
        }
        if tokens.len() < n || out.len() < n * table.cols {
            return Err(GpuError::Shape(format!("embedding {n} tokens into {} values", out.len())));
        }
        let h = to_i32(table.cols, "hidden")?;
        let kernel = match table.dtype {
            WeightDtype::F16 => "embed_f16",
            WeightDtype::Bf16 => "embed_bf16",
        };
        let mut b = self.stream.launch_builder(self.function(kernel)?);
        b.arg(&table.values).arg(tokens).arg(out).arg(&h);
        // SAFETY: embed(table, tokens, out, hidden): the caller's token ids are below table.rows
        // (GpuLlama checks them on the host before uploading); out holds n · hidden values.
        unsafe { b.launch(launch::per_row(n)?.to_config()) }?;
        Ok(())
    }

    /// Appends row `b` of `k`/`v` (`[n, kv_dim]`) at `(slot[b], pos[b])` of one layer's f16 caches
    /// (`[slots, capacity, kv_dim]`).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append(
        &self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        cache: &mut KvLayer,
        slot: &CudaSlice<i32>,
        pos: &CudaSlice<i32>,
        n: usize,
    ) -> Result<()> {
        let kvd = cache.kv_dim;
        if k.len() < n * kvd || v.len() < n * kvd || slot.len() < n || pos.len() < n {
            return Err(GpuError::Shape(format!("kv_append of {n} rows of {kvd}")));
        }
        let (kvd_i, cap) = (to_i32(kvd, "kv_dim")?, to_i32(cache.capacity, "capacity")?);
        let mut b = self.stream.launch_builder(self.function("kv_append")?);
        b.arg(k).arg(v).arg(&mut cache.k).arg(&mut cache.v).arg(slot).arg(pos).arg(&kvd_i).arg(&cap);
        // SAFETY: kv_append(k, v, kc, vc, slot, pos, kv_dim, capacity): the caller (GpuLlama, the
        // device tests) passes slots below cache.slots and positions below cache.capacity,
        // checked on the host; the caches hold slots · capacity · kv_dim values.
        unsafe { b.launch(launch::per_row(n)?.to_config()) }?;
        Ok(())
    }

    /// Decode attention of `n` queries (`[n, n_head · hd]`) over their sequences' cached
    /// positions `0..len[b]`; `max_len` bounds every `len[b]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &CudaSlice<f32>,
        cache: &KvLayer,
        slot: &CudaSlice<i32>,
        len: &CudaSlice<i32>,
        n: usize,
        n_head: usize,
        max_len: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let hd = cache.head_dim;
        let n_kv = cache.kv_dim / hd;
        if n_kv == 0 || !n_head.is_multiple_of(n_kv) {
            return Err(GpuError::Shape(format!("{n_head} query heads over {n_kv} KV heads")));
        }
        if q.len() < n * n_head * hd
            || out.len() < n * n_head * hd
            || slot.len() < n
            || len.len() < n
            || max_len > cache.capacity
        {
            return Err(GpuError::Shape(format!("attention of {n} × {n_head} heads of {hd}")));
        }
        let args = (
            to_i32(n_head, "heads")?,
            to_i32(n_kv, "kv heads")?,
            to_i32(hd, "head_dim")?,
            to_i32(cache.capacity, "capacity")?,
            1.0f32 / (hd as f32).sqrt(),
        );
        let mut b = self.stream.launch_builder(self.function("attention_decode")?);
        b.arg(q).arg(&cache.k).arg(&cache.v).arg(slot).arg(len).arg(out);
        b.arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3).arg(&args.4);
        // SAFETY: attention_decode(q, kc, vc, slot, len, out, n_head, n_kv_head, hd, capacity, scale):
        // shapes checked above; lengths are at most max_len ≤ capacity (GpuLlama checks them on
        // the host) and the shared memory for max_len scores is requested in the geometry.
        unsafe { b.launch(launch::attention(n_head, n, hd, max_len)?.to_config()) }?;
        Ok(())
    }

    /// An f16 KV cache for one layer: `slots` sequences of up to `capacity` positions.
    pub fn kv_layer(&self, slots: usize, capacity: usize, kv_dim: usize, head_dim: usize) -> Result<KvLayer> {
        let len = (slots * capacity * kv_dim).max(1);
        Ok(KvLayer {
            k: self.stream.alloc_zeros::<u16>(len)?,
            v: self.stream.alloc_zeros::<u16>(len)?,
            slots,
            capacity,
            kv_dim,
            head_dim,
        })
    }
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| GpuError::Shape(format!("{what} = {v} exceeds a kernel's i32 index")))
}

/// A weight matrix on the device, in its stored format.
pub struct GpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub dtype: WeightDtype,
    values: CudaSlice<u16>,
    /// Mask and row offsets of a bitmask matrix.
    sparse: Option<(CudaSlice<u8>, CudaSlice<i64>)>,
    nbytes: usize,
}

impl GpuMatrix {
    pub fn is_bitmask(&self) -> bool {
        self.sparse.is_some()
    }
    /// Bytes one product streams.
    pub fn nbytes(&self) -> usize {
        self.nbytes
    }
}

/// One layer's f16 KV cache on the device: `[slots, capacity, kv_dim]` for K and for V.
pub struct KvLayer {
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    pub slots: usize,
    pub capacity: usize,
    pub kv_dim: usize,
    pub head_dim: usize,
}

impl KvLayer {
    /// The K and V caches as raw f16 bits (for tests).
    pub fn download(&self, gpu: &Gpu) -> Result<(Vec<u16>, Vec<u16>)> {
        Ok((gpu.download(&self.k)?, gpu.download(&self.v)?))
    }
}
