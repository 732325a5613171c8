// kernels/batch_norm.cu — batch normalisation over [N, C, HW] (NCHW, spatial dims flattened),
// per channel, as kiln-cpu's norm::batch_norm.
//
// Training (M = N·HW values per channel): mean and the centred sum of squares in f64 (two
// passes), rstd = 1/√(var + eps) with the biased var; y = γ·(x − mean)·rstd + β;
// running_mean ← (1 − m)·running_mean + m·mean, running_var ← (1 − m)·running_var + m·var·M/(M − 1).
// Backward: dβ = Σ dy, dγ = Σ dy·x̂, dx = γ·rstd·(dy − dβ/M − x̂·dγ/M).
//
// Tiling: one block per channel (blockIdx.x = c); threads stride over the channel's N planes of
// HW values (n outer, pixel inner: coalesced within a plane). The block reduces in f64 and then
// makes a second (and third) pass over the same values from L2 to normalise: one kernel per
// direction, no scratch, deterministic. Eval forward: one block per (n, c) plane.
// Roofline: memory-bound; parallelism is C blocks (DCGAN: 64–512), enough to fill the GPU at
// its batch sizes.
#include "common.cuh"

extern "C" __global__ void batch_norm_train_forward(const float* x, const float* gamma, const float* beta, float* y,
                                                    float* mean_out, float* rstd_out, float* running_mean,
                                                    float* running_var, int N, int C, int HW, float eps, float momentum) {
    __shared__ double scratch[32];
    const int c = blockIdx.x;
    const long long M = (long long)N * HW;
    double s = 0.0;
    for (int n = 0; n < N; ++n) {
        const float* p = x + ((long long)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) s += (double)p[i];
    }
    const double mean = block_sum_f64(s, scratch) / (double)M;
    double sq = 0.0;
    for (int n = 0; n < N; ++n) {
        const float* p = x + ((long long)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) {
            const double d = (double)p[i] - mean;
            sq += d * d;
        }
    }
    sq = block_sum_f64(sq, scratch);
    const float meanf = (float)mean;
    const float rstd = (float)(1.0 / sqrt(sq / (double)M + (double)eps));
    if (threadIdx.x == 0) {
        mean_out[c] = meanf;
        rstd_out[c] = rstd;
        if (running_mean) {
            const float unbiased = (float)(sq / (double)(M - 1));
            running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * meanf;
            running_var[c] = (1.0f - momentum) * running_var[c] + momentum * unbiased;
        }
    }
    const float scale = gamma[c] * rstd;
    const float shift = beta[c] - meanf * scale;
    for (int n = 0; n < N; ++n) {
        const long long o = ((long long)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) y[o + i] = x[o + i] * scale + shift;
    }
}

// y = γ·(x − running_mean)/√(running_var + eps) + β; one block per (n, c) plane.
extern "C" __global__ void batch_norm_eval_forward(const float* x, const float* gamma, const float* beta,
                                                   const float* running_mean, const float* running_var, float* y, int N,
                                                   int C, int HW, float eps) {
    const int c = blockIdx.x % C;
    const float rstd = (float)(1.0 / sqrt((double)running_var[c] + (double)eps));
    const float scale = gamma[c] * rstd;
    const float shift = beta[c] - running_mean[c] * scale;
    const long long o = (long long)blockIdx.x * HW;
    for (int i = threadIdx.x; i < HW; i += blockDim.x) y[o + i] = x[o + i] * scale + shift;
}

// Training backward from the saved per-channel mean and rstd: dx, dγ, dβ (overwritten).
extern "C" __global__ void batch_norm_train_backward(const float* x, const float* dy, const float* gamma,
                                                     const float* mean, const float* rstd, float* dx, float* dgamma,
                                                     float* dbeta, int N, int C, int HW) {
    __shared__ double scratch[32];
    const int c = blockIdx.x;
    const long long M = (long long)N * HW;
    const double mu = (double)mean[c], rs = (double)rstd[c];
    double sdy = 0.0, sdyx = 0.0;
    for (int n = 0; n < N; ++n) {
        const long long o = ((long long)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) {
            const double g = (double)dy[o + i];
            sdy += g;
            sdyx += g * ((double)x[o + i] - mu) * rs;
        }
    }
    sdy = block_sum_f64(sdy, scratch);
    sdyx = block_sum_f64(sdyx, scratch);
    if (threadIdx.x == 0) {
        dbeta[c] = (float)sdy;
        dgamma[c] = (float)sdyx;
    }
    const float k = gamma[c] * rstd[c];
    const float mean_dy = (float)(sdy / (double)M), mean_dyx = (float)(sdyx / (double)M);
    const float mf = mean[c], rf = rstd[c];
    for (int n = 0; n < N; ++n) {
        const long long o = ((long long)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) {
            const float xhat = (x[o + i] - mf) * rf;
            dx[o + i] = k * (dy[o + i] - mean_dy - xhat * mean_dyx);
        }
    }
}

// Eval backward: dx = dy·γ/√(running_var + eps); dγ = Σ dy·x̂, dβ = Σ dy (x̂ from the running
// statistics). One block per channel.
extern "C" __global__ void batch_norm_eval_backward(const float* x, const float* dy, const float* gamma,
                                                    const float* running_mean, const float* running_var, float* dx,
                                                    float* dgamma, float* dbeta, int N, int C, int HW, float eps) {
    __shared__ double scratch[32];
    const int c = blockIdx.x;
    const float rstd = (float)(1.0 / sqrt((double)running_var[c] + (double)eps));
    const float mu = running_mean[c];
    const float k = gamma[c] * rstd;
    double sdy = 0.0, sdyx = 0.0;
    for (int n = 0; n < N; ++n) {
        const long long o = ((long long)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) {
            const float g = dy[o + i];
            sdy += (double)g;
            sdyx += (double)g * (double)((x[o + i] - mu) * rstd);
            dx[o + i] = k * g;
        }
    }
    sdy = block_sum_f64(sdy, scratch);
    sdyx = block_sum_f64(sdyx, scratch);
    if (threadIdx.x == 0) {
        dbeta[c] = (float)sdy;
        dgamma[c] = (float)sdyx;
    }
}
