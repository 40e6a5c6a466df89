// The element-wise and row-wise pieces of a Llama decoder step, each the GPU twin of the CPU
// model's function of the same name (model/src/llama.rs). Activations are f32 throughout.

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w. One block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, int d, float eps) {
    __shared__ float scratch[WARP];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* orow = out + (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    const float total = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(total / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = xr[i] * inv * w[i];
}

// Rotary embedding in Hugging Face's rotate_half convention: within each head the pair is
// (i, i + hd/2). x is [n, n_head * hd]; row b sits at position pos[b]. The angle is computed in
// f64 as on the CPU (positions reach 1e5 and f32 would lose the phase).
// Grid (n, n_head), hd / 2 threads.
extern "C" __global__ void rope(float* __restrict__ x, const int* __restrict__ pos,
                                const float* __restrict__ inv_freq, int n_head, int hd) {
    const int b = blockIdx.x, head = blockIdx.y, i = threadIdx.x, half = hd / 2;
    if (i >= half) return;
    double s, c;
    sincos((double)pos[b] * (double)inv_freq[i], &s, &c);
    const float cf = (float)c, sf = (float)s;
    float* h = x + (size_t)b * n_head * hd + (size_t)head * hd;
    const float x0 = h[i], x1 = h[i + half];
    h[i] = x0 * cf - x1 * sf;
    h[i + half] = x1 * cf + x0 * sf;
}

// gate = silu(gate) * up, element-wise over len values.
extern "C" __global__ void swiglu(float* __restrict__ gate, const float* __restrict__ up, int len) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// x += y, element-wise over len values (the residual connections).
extern "C" __global__ void add_into(float* __restrict__ x, const float* __restrict__ y, int len) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) x[i] += y[i];
}

// out[b, :] = table[tokens[b], :] widened to f32. One block per token.
template <typename DT>
__device__ __forceinline__ void embed(const u16* __restrict__ table, const u32* __restrict__ tokens,
                                      float* __restrict__ out, int hidden) {
    const u16* row = table + (size_t)tokens[blockIdx.x] * hidden;
    float* o = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = DT::load(row[i]);
}
extern "C" __global__ void embed_f16(const u16* __restrict__ t, const u32* __restrict__ tok, float* __restrict__ o, int h) {
    embed<F16>(t, tok, o, h);
}
extern "C" __global__ void embed_bf16(const u16* __restrict__ t, const u32* __restrict__ tok, float* __restrict__ o, int h) {
    embed<Bf16>(t, tok, o, h);
}

// Appends one position per sequence to the f16 KV cache: row b of k/v ([n, kv_dim] f32) goes to
// slot slot[b], position pos[b], rounded to f16 once (as the CPU's f16 cache does). The cache of
// one layer is [slots, capacity, kv_dim]. One block per sequence.
extern "C" __global__ void kv_append(const float* __restrict__ k, const float* __restrict__ v,
                                     u16* __restrict__ kc, u16* __restrict__ vc,
                                     const int* __restrict__ slot, const int* __restrict__ pos,
                                     int kv_dim, int capacity) {
    const int b = blockIdx.x;
    const size_t at = ((size_t)slot[b] * capacity + pos[b]) * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kc[at + i] = f32_to_f16(k[(size_t)b * kv_dim + i]);
        vc[at + i] = f32_to_f16(v[(size_t)b * kv_dim + i]);
    }
}
