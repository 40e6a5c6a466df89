// Dense f16/bf16 products with f32 activations: y[b, r] = sum_c W[r, c] * x[b, c] for b < n.
//
// One warp per output row, DENSE_WARPS rows per block. Decode is bound by the weight bytes, so
// each lane loads 16 bytes (8 weights) per step and consecutive lanes read consecutive 16-byte
// pieces of the row: one fully coalesced 512-byte transaction per warp step. The activations
// (n rows of `cols` f32) are small and shared by every row, so they are served from L1/L2.
// NB (1, 2, 4, 8, 16, 32) is the batch the accumulators are sized for; n <= NB rows are live, and
// the weight row is streamed once for all of them.

#define DENSE_WARPS 8

template <typename DT, int NB>
__device__ __forceinline__ void dense_gemm(const u16* __restrict__ w, const float* __restrict__ x,
                                           float* __restrict__ y, int rows, int cols, int n) {
    const int lane = threadIdx.x % WARP;
    const int row = blockIdx.x * DENSE_WARPS + threadIdx.x / WARP;
    if (row >= rows) return;
    const u16* wr = w + (size_t)row * cols;
    float acc[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) acc[b] = 0.0f;

    int c = 0;
    if ((cols & 7) == 0) {
        // 16-byte loads: the row starts 16-byte aligned (the buffer is, and cols * 2 is a multiple of 16).
        const uint4* wv = reinterpret_cast<const uint4*>(wr);
        const int steps = cols / 8;
        for (int s = lane; s < steps; s += WARP) {
            const uint4 p = wv[s];
            float wf[8];
            const u32 words[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                wf[2 * i] = DT::load((u16)(words[i] & 0xffffu));
                wf[2 * i + 1] = DT::load((u16)(words[i] >> 16));
            }
            const int c0 = s * 8;
#pragma unroll
            for (int b = 0; b < NB; b++) {
                if (b < n) {
                    const float4* xv = reinterpret_cast<const float4*>(x + (size_t)b * cols + c0);
                    const float4 x0 = xv[0], x1 = xv[1];
                    acc[b] += wf[0] * x0.x + wf[1] * x0.y + wf[2] * x0.z + wf[3] * x0.w
                            + wf[4] * x1.x + wf[5] * x1.y + wf[6] * x1.z + wf[7] * x1.w;
                }
            }
        }
        c = cols;
    }
    // Rows whose length is not a multiple of 8: element by element (still coalesced).
    for (int cc = c + lane; cc < cols; cc += WARP) {
        const float wf = DT::load(wr[cc]);
#pragma unroll
        for (int b = 0; b < NB; b++)
            if (b < n) acc[b] += wf * x[(size_t)b * cols + cc];
    }
#pragma unroll
    for (int b = 0; b < NB; b++) {
        if (b < n) {
            const float s = warp_sum(acc[b]);
            if (lane == 0) y[(size_t)b * rows + row] = s;
        }
    }
}

#define DENSE_KERNEL(NAME, DT, NB)                                                                 \
    extern "C" __global__ void __launch_bounds__(DENSE_WARPS * WARP)                               \
        dense_gemm_##NAME##_nb##NB(const u16* __restrict__ w, const float* __restrict__ x,         \
                                   float* __restrict__ y, int rows, int cols, int n) {             \
        dense_gemm<DT, NB>(w, x, y, rows, cols, n);                                                \
    }

#define DENSE_ALL_NB(NAME, DT)                                                                     \
    DENSE_KERNEL(NAME, DT, 1)                                                                      \
    DENSE_KERNEL(NAME, DT, 2)                                                                      \
    DENSE_KERNEL(NAME, DT, 4)                                                                      \
    DENSE_KERNEL(NAME, DT, 8)                                                                      \
    DENSE_KERNEL(NAME, DT, 16)                                                                     \
    DENSE_KERNEL(NAME, DT, 32)

DENSE_ALL_NB(f16, F16)
DENSE_ALL_NB(bf16, Bf16)
