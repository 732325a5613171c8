// kernels/reduce.cu — deterministic reductions: sums of squares (the global gradient norm),
// column sums (a linear layer's bias gradient), channel sums (a convolution's bias gradient).
// Plain sums (sum_values_partial + sum_partials): a mean, a mean loss; counts of values outside
// a range (count_outside_partial + sum_partials): the check of BCE's probabilities.
//
// Sum of squares, two passes: sum_squares_partial runs a FIXED grid of REDUCE_BLOCKS blocks of
// 256 threads over one tensor (element i to thread i mod (REDUCE_BLOCKS·256)) and writes one
// partial per block; sum_partials adds a list of partials in a fixed order (one warp) and
// writes the total (or its square root). The order depends only on the sizes.
// Column sums of x [rows, cols]: column_sums_partial, grid (column blocks of 128, row chunks of
// COLSUM_CHUNK rows), each thread sums its column over its chunk in row order;
// column_sums_finish adds the chunks in order (accumulating into `out` if asked).
// Channel sums of x [N, C, HW]: one block per channel, f64 per thread, block reduction
// (kiln-cpu accumulates in f64 too).
// Roofline: memory-bound.
#include "common.cuh"

#define REDUCE_BLOCKS 256
#define REDUCE_THREADS 256
#define COLSUM_CHUNK 256

extern "C" __global__ void sum_squares_partial(const float* x, long long n, float* partial) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * REDUCE_THREADS + threadIdx.x; i < n; i += (long long)REDUCE_BLOCKS * REDUCE_THREADS) {
        const float v = x[i];
        acc += v * v;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] = Σ partial[0..count) (or its square root), one warp.
extern "C" __global__ void sum_partials(const float* partial, int count, float* out, int take_sqrt) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < count; i += 32) s += partial[i];
    s = warp_sum(s);
    if (threadIdx.x == 0) out[0] = take_sqrt ? sqrtf(s) : s;
}

extern "C" __global__ void column_sums_partial(const float* x, int rows, int cols, float* partial) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    const int r0 = blockIdx.y * COLSUM_CHUNK, r1 = min(rows, r0 + COLSUM_CHUNK);
    float s = 0.0f;
    for (int r = r0; r < r1; ++r) s += x[(long long)r * cols + j];
    partial[(long long)blockIdx.y * cols + j] = s;
}

extern "C" __global__ void column_sums_finish(const float* partial, int chunks, int cols, float* out, int accumulate) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float s = 0.0f;
    for (int c = 0; c < chunks; ++c) s += partial[(long long)c * cols + j];
    out[j] = accumulate ? out[j] + s : s;
}

extern "C" __global__ void channel_sums(const float* x, int N, int C, int HW, float* out, int accumulate) {
    __shared__ double scratch[32];
    const int c = blockIdx.x;
    double s = 0.0;
    for (int n = 0; n < N; ++n) {
        const float* p = x + ((long long)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) s += (double)p[i];
    }
    s = block_sum_f64(s, scratch);
    if (threadIdx.x == 0) out[c] = accumulate ? out[c] + (float)s : (float)s;
}

// The plain sum's partials (a mean, a loss's mean over rows): as sum_squares_partial, without
// the square.
extern "C" __global__ void sum_values_partial(const float* x, long long n, float* partial) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * REDUCE_THREADS + threadIdx.x; i < n; i += (long long)REDUCE_BLOCKS * REDUCE_THREADS) {
        acc += x[i];
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Partials of the number of x[i] outside [lo, hi] (NaN counts as outside): the check of a
// probability input (BCE) whose verdict rides back with the loss.
extern "C" __global__ void count_outside_partial(const float* x, long long n, float lo, float hi, float* partial) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * REDUCE_THREADS + threadIdx.x; i < n; i += (long long)REDUCE_BLOCKS * REDUCE_THREADS) {
        const float v = x[i];
        acc += (v >= lo && v <= hi) ? 0.0f : 1.0f;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
