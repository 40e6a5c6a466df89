// Decode attention over the f16 KV cache, grouped-query (query head h reads KV head
// h / (n_head / n_kv_head), as SmolLM2 and Llama do). Each of the n sequences has one new query
// at position len[b] - 1, already appended to the cache, and attends to positions 0..len[b].
//
// Grid (n_head, n), ATTN_THREADS threads; dynamic shared memory: hd + max_len floats (the query
// and the scores; the host checks it fits). Scores are scaled by 1/sqrt(hd) and softmaxed with
// the maximum subtracted, as the CPU's softmax_scaled does.

#define ATTN_THREADS 128

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_decode(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,
                     const int* __restrict__ slot, const int* __restrict__ len, float* __restrict__ out,
                     int n_head, int n_kv_head, int hd, int capacity, float scale) {
    extern __shared__ float smem[];
    __shared__ float scratch[WARP];
    float* qs = smem;
    float* scores = smem + hd;
    const int head = blockIdx.x, b = blockIdx.y;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    const int kv_head = head / (n_head / n_kv_head);
    const int kv_dim = n_kv_head * hd;
    const int L = len[b];
    const size_t seq0 = (size_t)slot[b] * capacity * kv_dim + (size_t)kv_head * hd;

    const float* qrow = q + (size_t)b * n_head * hd + (size_t)head * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = qrow[d];
    __syncthreads();

    // One warp per position: lanes split the head dimension (consecutive lanes, consecutive halves).
    for (int t = warp; t < L; t += warps) {
        const u16* kr = kc + seq0 + (size_t)t * kv_dim;
        float dot = 0.0f;
        for (int d = lane; d < hd; d += WARP) dot += qs[d] * f16_to_f32(kr[d]);
        dot = warp_sum(dot);
        if (lane == 0) scores[t] = dot;
    }
    __syncthreads();

    float m = __int_as_float(0xff800000);  // -inf
    for (int t = threadIdx.x; t < L; t += blockDim.x) m = fmaxf(m, scores[t]);
    m = block_max(m, scratch) * scale;
    float sum = 0.0f;
    for (int t = threadIdx.x; t < L; t += blockDim.x) {
        const float e = expf(scores[t] * scale - m);
        scores[t] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);  // its leading __syncthreads also publishes the exponentials
    const float inv = 1.0f / sum;

    float* orow = out + (size_t)b * n_head * hd + (size_t)head * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        const u16* vcol = vc + seq0 + d;
        float acc = 0.0f;
        for (int t = 0; t < L; t++) acc += scores[t] * f16_to_f32(vcol[(size_t)t * kv_dim]);
        orow[d] = acc * inv;
    }
}
