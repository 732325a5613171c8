// kernels/loss.cu — binary cross-entropy (mean) and cross-entropy fused with the softmax over
// the vocabulary, forward and backward.
//
// BCE on probabilities p against targets t, PyTorch's log clamp at −100:
//   L = −(1/N) Σ [t·max(ln p, −100) + (1 − t)·max(ln(1 − p), −100)],
//   ∂L/∂p = (1/N)·(p − t)/max(p·(1 − p), 1e−12).
// The forward sum is deterministic: a FIXED grid of BCE_BLOCKS blocks of 256 threads (element
// i goes to thread i mod (BCE_BLOCKS·256)), each block reducing its terms in f64 into
// partial[block]; bce_forward_finish sums the partials in a fixed order (one warp). The order
// depends only on N, never on the device.
//
// Cross-entropy per row r of logits [rows, vocab] with target id t_r:
//   loss_r = logsumexp(logits_r) − logits_r[t_r],
//   dlogits_r = scale·(softmax(logits_r) − onehot(t_r))   (scale = dloss/rows for a mean).
// A target outside [0, vocab) marks a row to ignore: loss 0, gradient 0.
// Tiling: one block per row; an online (max, sum of exp) per thread, combined by block_max and
// block_sum; the backward writes dlogits in a second pass (dlogits may be the logits buffer:
// each thread rewrites only the elements it read). Roofline: memory-bound (read the row twice).
#include "common.cuh"

#define BCE_BLOCKS 128
#define BCE_THREADS 256

extern "C" __global__ void bce_forward_partial(const float* p, const float* t, double* partial, long long n) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * BCE_THREADS + threadIdx.x; i < n; i += (long long)BCE_BLOCKS * BCE_THREADS) {
        const float pi = p[i], ti = t[i];
        const double log_p = (double)fmaxf(logf(pi), -100.0f);
        const double log_1mp = (double)fmaxf(log1pf(-pi), -100.0f);
        acc += ((double)ti - 1.0) * log_1mp - (double)ti * log_p;
    }
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// loss[0] = Σ partial / n, one warp.
extern "C" __global__ void bce_forward_finish(const double* partial, int count, long long n, float* loss) {
    double s = 0.0;
    for (int i = threadIdx.x; i < count; i += 32) s += partial[i];
    s = warp_sum_f64(s);
    if (threadIdx.x == 0) loss[0] = (float)(s / (double)n);
}

// dp = scale·(p − t)/max(p·(1 − p), 1e−12), scale = dloss/n (overwrites).
extern "C" __global__ void bce_backward(const float* p, const float* t, float* dp, long long n, float scale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float pi = p[i];
        dp[i] = scale * (pi - t[i]) / fmaxf(pi * (1.0f - pi), 1e-12f);
    }
}

// The row's max and Σ exp(x − max) (every thread gets both).
__device__ __forceinline__ void row_stats(const float* xr, int cols, float* scratch, float& row_max, float& row_sum) {
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
    row_max = block_max(m, scratch);
    row_sum = block_sum(m == KILN_NEG_INF ? 0.0f : s * expf(m - row_max), scratch);
}

extern "C" __global__ void cross_entropy_forward(const float* logits, const int* targets, float* losses, int rows,
                                                 int vocab) {
    __shared__ float scratch[32];
    const float* xr = logits + (long long)blockIdx.x * vocab;
    float mx, sum;
    row_stats(xr, vocab, scratch, mx, sum);
    if (threadIdx.x == 0) {
        const int t = targets[blockIdx.x];
        losses[blockIdx.x] = (t >= 0 && t < vocab) ? mx + logf(sum) - xr[t] : 0.0f;
    }
}

// Forward and backward in one pass over the row: losses (may be null) and
// dlogits = scale·(softmax − onehot). dlogits may be logits (in place).
extern "C" __global__ void cross_entropy_backward(const float* logits, const int* targets, float* losses,
                                                  float* dlogits, int rows, int vocab, float scale) {
    __shared__ float scratch[32];
    const float* xr = logits + (long long)blockIdx.x * vocab;
    float* dr = dlogits + (long long)blockIdx.x * vocab;
    float mx, sum;
    row_stats(xr, vocab, scratch, mx, sum);
    const int t = targets[blockIdx.x];
    const bool valid = t >= 0 && t < vocab;
    float target_logit = 0.0f;
    if (valid) target_logit = xr[t];  // every thread reads it before any thread writes the row
    __syncthreads();
    if (threadIdx.x == 0 && losses) losses[blockIdx.x] = valid ? mx + logf(sum) - target_logit : 0.0f;
    const float inv = 1.0f / sum;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float p = expf(xr[c] - mx) * inv;
        dr[c] = valid ? scale * (p - (c == t ? 1.0f : 0.0f)) : 0.0f;
    }
}
