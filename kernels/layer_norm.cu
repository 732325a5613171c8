// kernels/layer_norm.cu — layer normalisation over the last dimension, forward and backward.
//
// Per row x of `dim` elements: mean = Σx/dim, var = Σ(x − mean)²/dim (biased),
// rstd = 1/√(var + eps), n = (x − mean)·rstd, out = n·weight + bias.
// Backward, with g = weight·dout: dx += (g − mean(g) − n·mean(g·n))·rstd,
// dweight += Σ_rows dout·n, dbias += Σ_rows dout.
//
// Tiling: forward and dx: one block per row (blockIdx.x = row), threads stride over the row;
// two block reductions (mean, then the centred sum of squares: two passes, as kiln-cpu).
// Parameter gradients (deterministic, no atomics): layer_norm_backward_params_partial runs a
// grid of (column blocks of 128, row chunks of LN_CHUNK rows); each thread owns one column and
// sums its chunk's rows in order into partial[2][chunks][dim]; layer_norm_backward_params_finish
// adds the chunk partials in chunk order to dweight and dbias, one thread per column.
// Roofline: memory-bound (forward reads x twice from L1/L2 and once more to write).
#include "common.cuh"

#define LN_CHUNK 32

extern "C" __global__ void layer_norm_forward(const float* x, const float* weight, const float* bias, float* out,
                                              float* mean_out, float* rstd_out, int rows, int dim, float eps) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * dim;
    float s = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) s += x[base + c];
    const float mean = block_sum(s, scratch) / dim;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float d = x[base + c] - mean;
        sq += d * d;
    }
    const float var = block_sum(sq, scratch) / dim;
    const float rstd = 1.0f / sqrtf(var + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) out[base + c] = (x[base + c] - mean) * rstd * weight[c] + bias[c];
    if (threadIdx.x == 0) {
        if (mean_out) mean_out[blockIdx.x] = mean;
        if (rstd_out) rstd_out[blockIdx.x] = rstd;
    }
}

// dx += (g − mean(g) − n·mean(g·n))·rstd, one block per row.
extern "C" __global__ void layer_norm_backward_dx(const float* dout, const float* x, const float* weight,
                                                  const float* mean, const float* rstd, float* dx, int rows, int dim) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * dim;
    const float m = mean[blockIdx.x], rs = rstd[blockIdx.x];
    float sg = 0.0f, sgn = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float g = weight[c] * dout[base + c];
        sg += g;
        sgn += g * (x[base + c] - m) * rs;
    }
    const float g_mean = block_sum(sg, scratch) / dim;
    const float gn_mean = block_sum(sgn, scratch) / dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float g = weight[c] * dout[base + c];
        const float n = (x[base + c] - m) * rs;
        dx[base + c] += (g - g_mean - n * gn_mean) * rs;
    }
}

// partial[0][chunk][j] = Σ_{rows of chunk} dout·n, partial[1][chunk][j] = Σ dout.
extern "C" __global__ void layer_norm_backward_params_partial(const float* dout, const float* x, const float* mean,
                                                              const float* rstd, float* partial, int rows, int dim) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk = blockIdx.y, chunks = gridDim.y;
    if (j >= dim) return;
    const int r0 = chunk * LN_CHUNK, r1 = min(rows, r0 + LN_CHUNK);
    float pw = 0.0f, pb = 0.0f;
    for (int r = r0; r < r1; ++r) {
        const float d = dout[(long long)r * dim + j];
        pw += d * (x[(long long)r * dim + j] - mean[r]) * rstd[r];
        pb += d;
    }
    partial[(long long)chunk * dim + j] = pw;
    partial[((long long)chunks + chunk) * dim + j] = pb;
}

// dweight[j] += Σ_chunks partial[0][chunk][j], dbias[j] += Σ_chunks partial[1][chunk][j].
extern "C" __global__ void layer_norm_backward_params_finish(const float* partial, int chunks, int dim, float* dweight,
                                                             float* dbias) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) return;
    float w = 0.0f, b = 0.0f;
    for (int c = 0; c < chunks; ++c) {
        w += partial[(long long)c * dim + j];
        b += partial[((long long)chunks + c) * dim + j];
    }
    dweight[j] += w;
    dbias[j] += b;
}
