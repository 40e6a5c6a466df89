// Bitmask-sparse f16/bf16 products (the compressed-tensors `sparse-bitmask` layout of
// kernels/src/bitmask.rs): per row ceil(cols / 8) mask bytes, bit c % 8 of byte c / 8 (least
// significant first) set where column c holds a stored value; the stored values packed row after
// row; row_offsets[r] = index of row r's first value. y[b, r] = sum_c W[r, c] * x[b, c], b < n.
//
// One warp per row, BITMASK_WARPS rows per block. The warp walks its row's mask in chunks of
// 32 lanes x 32 bits = 1024 columns:
//   1. lane l loads mask bytes 4l..4l+3 of the chunk (consecutive lanes, consecutive bytes) as one
//      32-bit word, LSB first, so bit j is column chunk * 1024 + 32 l + j;
//   2. popcount and a warp inclusive scan give each lane the offset of its first value inside the
//      chunk (prefix popcounts) and the chunk's total;
//   3. the warp copies the chunk's packed values into shared memory, lane l taking values l,
//      l + 32, ...: consecutive lanes read consecutive values (coalesced);
//   4. each lane expands its word: for every set bit, the next value from shared memory times the
//      activations of that column, into NB register accumulators.
// So global memory sees the mask and the non-zeros once each, in order; the expansion happens in
// shared memory and registers. gpu/src/emulate.rs is this algorithm in Rust, tested on the CPU.

#define BITMASK_WARPS 8
#define BITMASK_CHUNK_COLS (WARP * 32)

template <typename DT, int NB>
__device__ __forceinline__ void bitmask_gemm(const u8* __restrict__ mask, const u16* __restrict__ vals,
                                             const i64* __restrict__ row_offsets,
                                             const float* __restrict__ x, float* __restrict__ y, int rows,
                                             int cols, int n) {
    __shared__ u16 staged[BITMASK_WARPS][BITMASK_CHUNK_COLS];
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    const int row = blockIdx.x * BITMASK_WARPS + warp;
    if (row >= rows) return;  // whole warps leave together: the __syncwarp calls below stay warp-uniform
    const int mb = (cols + 7) / 8;
    const u8* mrow = mask + (size_t)row * mb;
    i64 base = row_offsets[row];
    u16* sh = staged[warp];

    float acc[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) acc[b] = 0.0f;

    for (int chunk_byte = 0; chunk_byte < mb; chunk_byte += WARP * 4) {
        const int byte0 = chunk_byte + lane * 4;
        u32 word = 0;
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (byte0 + i < mb) word |= ((u32)mrow[byte0 + i]) << (8 * i);
        const int count = __popc(word);
        // Inclusive scan of the counts across the warp.
        int incl = count;
#pragma unroll
        for (int o = 1; o < WARP; o <<= 1) {
            const int t = __shfl_up_sync(FULL_MASK, incl, o);
            if (lane >= o) incl += t;
        }
        const int total = __shfl_sync(FULL_MASK, incl, WARP - 1);
        const int first = incl - count;
        for (int j = lane; j < total; j += WARP) sh[j] = vals[base + j];
        __syncwarp();
        const int col0 = byte0 * 8;
        int k = first;
        while (word) {
            const int bit = __ffs(word) - 1;
            word &= word - 1;
            const float v = DT::load(sh[k++]);
            const int col = col0 + bit;
#pragma unroll
            for (int b = 0; b < NB; b++)
                if (b < n) acc[b] += v * x[(size_t)b * cols + col];
        }
        __syncwarp();  // the next chunk overwrites the staged values
        base += total;
    }
#pragma unroll
    for (int b = 0; b < NB; b++) {
        if (b < n) {
            const float s = warp_sum(acc[b]);
            if (lane == 0) y[(size_t)b * rows + row] = s;
        }
    }
}

#define BITMASK_KERNEL(NAME, DT, NB)                                                               \
    extern "C" __global__ void __launch_bounds__(BITMASK_WARPS * WARP) bitmask_gemm_##NAME##_nb##NB( \
        const u8* __restrict__ mask, const u16* __restrict__ vals, const i64* __restrict__ row_offsets, \
        const float* __restrict__ x, float* __restrict__ y, int rows, int cols, int n) {           \
        bitmask_gemm<DT, NB>(mask, vals, row_offsets, x, y, rows, cols, n);                        \
    }

#define BITMASK_ALL_NB(NAME, DT)                                                                   \
    BITMASK_KERNEL(NAME, DT, 1)                                                                    \
    BITMASK_KERNEL(NAME, DT, 2)                                                                    \
    BITMASK_KERNEL(NAME, DT, 4)                                                                    \
    BITMASK_KERNEL(NAME, DT, 8)                                                                    \
    BITMASK_KERNEL(NAME, DT, 16)                                                                   \
    BITMASK_KERNEL(NAME, DT, 32)

BITMASK_ALL_NB(f16, F16)
BITMASK_ALL_NB(bf16, Bf16)
