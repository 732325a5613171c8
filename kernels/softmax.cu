// kernels/softmax.cu — softmax over the rows of a [rows, cols] row-major matrix, forward and
// backward.
//
// Tiling: one block per row (blockIdx.x = row), blockDim.x (a multiple of 32, ≤ 1024) threads
// stride over the columns. Forward: each thread keeps an online (max, sum of exp) over its
// columns; the block combines them (block_max, then block_sum of the rescaled sums), and a
// second pass writes exp(x − max)/sum. Backward: one block_sum of y·dy per row.
// Roofline: memory-bound (the row is read twice, written once: 12 bytes per element).
// y may be x (in place): every thread reads and writes only its own columns, after the
// reductions' barriers.
#include "common.cuh"

extern "C" __global__ void softmax_rows(const float* x, float* y, int rows, int cols) {
    __shared__ float scratch[32];
    const float* xr = x + (long long)blockIdx.x * cols;
    float* yr = y + (long long)blockIdx.x * cols;
    float m = KILN_NEG_INF, s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = xr[c];
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else if (v != KILN_NEG_INF) {
            s += expf(v - m);
        }
    }
    const float row_max = block_max(m, scratch);
    const float row_sum = block_sum(m == KILN_NEG_INF ? 0.0f : s * expf(m - row_max), scratch);
    const float inv = 1.0f / row_sum;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = expf(xr[c] - row_max) * inv;
}

// dx += y ⊙ (dy − Σ_j dy_j·y_j), per row (accumulates, as kiln-cpu's softmax_backward).
extern "C" __global__ void softmax_backward(const float* y, const float* dy, float* dx, int rows, int cols) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * cols;
    float dot = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dot += y[base + c] * dy[base + c];
    dot = block_sum(dot, scratch);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dx[base + c] += y[base + c] * (dy[base + c] - dot);
}
