// kernels/gemv.cu — the decode product: y = alpha·x·op(B) + beta·y + epilogue for a few rows
// x [M, K] (f32, row-major, row stride ldx; 1 ≤ M ≤ GEMV_MAX_M) and a weight B in f32, bf16 or
// f16. Its cost is reading B once: a bandwidth kernel, not a tiled GEMM.
//
// Two weight layouts (as gemm_f32.cu):
//   kn: B row-major [K, N] (GPT-2's Conv1D weights, B(p,j) = B[p·ldb + j]);
//   nk: B stored [N, K] (the tied output projection wteᵀ, B(p,j) = B[j·ldb + p]).
// Epilogue as in gemm_f32.cu (0 none, 1 bias, 2 bias + GELU, 3 GELU).
//
// Tiling, kn: a block of 8 warps owns 32·VEC consecutive columns (VEC = 16 bytes of B per
// lane: 4 f32 or 8 halves, one vector load) and one slice of `kchunk` rows of K (blockIdx.y).
// Warp w reads rows k0 + w, k0 + w + 8, ...: each row segment is 32 lanes × 16 bytes = 512
// contiguous bytes. Each lane accumulates M × VEC sums; the 8 warps' sums are added in warp order
// through shared memory. With one K slice the block applies the epilogue and writes y; with
// several, it writes partial[slice][m][j] and gemv_kn_finish adds the slices in order
// (deterministic, no atomics).
// Tiling, nk: one warp per output column j (8 per block): lanes stride over the row B[j, :] in
// 16-byte vectors, each lane keeps M partial dot products, a warp butterfly adds them.
// Roofline: K·N·sizeof(B) bytes for 2·M·K·N FLOPs; at M = 1 that is 1 FLOP per byte of bf16:
// far below the ridge point, the target is the copy bandwidth.
#include "common.cuh"

#define GEMV_MAX_M 4
#define GEMV_WARPS 8

template <class T> struct Vec {
    static const int N = 16 / sizeof(T);
};

// VEC consecutive elements of B at p, `valid` of them inside the matrix; vec: aligned.
template <int VEC> __device__ __forceinline__ void loadv(const float* p, int valid, bool vec, float (&r)[VEC]) {
    if (vec && valid == VEC) {
        const float4 v = *reinterpret_cast<const float4*>(p);
        r[0] = v.x;
        r[1] = v.y;
        r[2] = v.z;
        r[3] = v.w;
    } else {
        KILN_UNROLL
        for (int q = 0; q < VEC; ++q) r[q] = q < valid ? p[q] : 0.0f;
    }
}
template <int VEC, class T> __device__ __forceinline__ void loadv(const T* p, int valid, bool vec, float (&r)[VEC]) {
    if (vec && valid == VEC) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
        KILN_UNROLL
        for (int q = 0; q < 4; ++q) {
            T lo, hi;
            lo.bits = (uint16_t)(w[q] & 0xffffu);
            hi.bits = (uint16_t)(w[q] >> 16);
            r[2 * q] = to_f32(lo);
            r[2 * q + 1] = to_f32(hi);
        }
    } else {
        KILN_UNROLL
        for (int q = 0; q < VEC; ++q) r[q] = q < valid ? to_f32(p[q]) : 0.0f;
    }
}

__device__ __forceinline__ float gemv_epilogue(float v, int j, const float* bias, int epi) {
    if (epi == 1 || epi == 2) v += bias[j];
    if (epi >= 2) v = gelu_tanh(v);
    return v;
}

template <class T>
__device__ __forceinline__ void gemv_kn_kernel(int M, int N, int K, float alpha, const float* x, long long ldx,
                                               const T* B, long long ldb, float beta, float* y, long long ldy,
                                               const float* bias, int epi, int vec_b, int kchunk, float* partial) {
    const int VEC = Vec<T>::N;
    __shared__ float red[GEMV_WARPS][GEMV_MAX_M][32 * 8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j0 = blockIdx.x * 32 * VEC + lane * VEC;
    const int k0 = blockIdx.y * kchunk, k1 = min(K, k0 + kchunk);
    const int valid = max(0, min(VEC, N - j0));
    float acc[GEMV_MAX_M][VEC];
    KILN_UNROLL
    for (int m = 0; m < GEMV_MAX_M; ++m)
        KILN_UNROLL
        for (int q = 0; q < VEC; ++q) acc[m][q] = 0.0f;
    for (int k = k0 + warp; k < k1; k += GEMV_WARPS) {
        float b[VEC];
        loadv<VEC>(B + (valid > 0 ? (long long)k * ldb + j0 : 0), valid, vec_b != 0, b);
        KILN_UNROLL
        for (int m = 0; m < GEMV_MAX_M; ++m) {
            if (m < M) {
                const float xv = x[(long long)m * ldx + k];
                KILN_UNROLL
                for (int q = 0; q < VEC; ++q) acc[m][q] = fmaf(xv, b[q], acc[m][q]);
            }
        }
    }
    KILN_UNROLL
    for (int m = 0; m < GEMV_MAX_M; ++m)
        KILN_UNROLL
        for (int q = 0; q < VEC; ++q) red[warp][m][lane * VEC + q] = acc[m][q];
    __syncthreads();
    // Thread t adds the 8 warps' values of (m, column t) in warp order, for its columns.
    for (int idx = threadIdx.x; idx < M * 32 * VEC; idx += blockDim.x) {
        const int m = idx / (32 * VEC), c = idx % (32 * VEC);
        const int j = blockIdx.x * 32 * VEC + c;
        if (j >= N) continue;
        float s = 0.0f;
        KILN_UNROLL
        for (int w = 0; w < GEMV_WARPS; ++w) s += red[w][m][c];
        if (gridDim.y == 1) {
            float* o = y + (long long)m * ldy + j;
            float v = alpha * s;
            if (beta != 0.0f) v += beta * *o;
            *o = gemv_epilogue(v, j, bias, epi);
        } else {
            partial[((long long)blockIdx.y * M + m) * N + j] = s;
        }
    }
}

template <class T>
__device__ __forceinline__ void gemv_nk_kernel(int M, int N, int K, float alpha, const float* x, long long ldx,
                                               const T* B, long long ldb, float beta, float* y, long long ldy,
                                               const float* bias, int epi, int vec_b) {
    const int VEC = Vec<T>::N;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j = blockIdx.x * GEMV_WARPS + warp;
    const bool live = j < N;  // a warp past the last column still takes part in the shuffles
    const T* row = B + (live ? (long long)j * ldb : 0);
    float acc[GEMV_MAX_M];
    KILN_UNROLL
    for (int m = 0; m < GEMV_MAX_M; ++m) acc[m] = 0.0f;
    for (int k = lane * VEC; k < K; k += 32 * VEC) {
        const int valid = live ? min(VEC, K - k) : 0;
        float b[VEC];
        loadv<VEC>(row + (valid > 0 ? k : 0), valid, vec_b != 0, b);
        KILN_UNROLL
        for (int m = 0; m < GEMV_MAX_M; ++m) {
            if (m < M) {
                const float* xr = x + (long long)m * ldx + k;
                KILN_UNROLL
                for (int q = 0; q < VEC; ++q)
                    if (q < valid) acc[m] = fmaf(xr[q], b[q], acc[m]);
            }
        }
    }
    KILN_UNROLL
    for (int m = 0; m < GEMV_MAX_M; ++m) acc[m] = warp_sum(acc[m]);
    if (live && lane < M) {
        float s = 0.0f;
        KILN_UNROLL
        for (int m = 0; m < GEMV_MAX_M; ++m)
            if (m == lane) s = acc[m];
        float* o = y + (long long)lane * ldy + j;
        float v = alpha * s;
        if (beta != 0.0f) v += beta * *o;
        *o = gemv_epilogue(v, j, bias, epi);
    }
}

// y[m, j] = epilogue(alpha·Σ_slices partial[slice][m][j] + beta·y[m, j]), slices in order.
extern "C" __global__ void gemv_kn_finish(int M, int N, int slices, const float* partial, float alpha, float beta,
                                          float* y, long long ldy, const float* bias, int epi) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)M * N) return;
    const int m = (int)(idx / N), j = (int)(idx % N);
    float s = 0.0f;
    for (int sl = 0; sl < slices; ++sl) s += partial[((long long)sl * M + m) * N + j];
    float* o = y + (long long)m * ldy + j;
    float v = alpha * s;
    if (beta != 0.0f) v += beta * *o;
    *o = gemv_epilogue(v, j, bias, epi);
}

#define GEMV_KN_PARAMS(T)                                                                                      \
    int M, int N, int K, float alpha, const float *x, long long ldx, const T *B, long long ldb, float beta,     \
        float *y, long long ldy, const float *bias, int epi, int vec_b, int kchunk, float *partial
#define GEMV_KN_ARGS M, N, K, alpha, x, ldx, B, ldb, beta, y, ldy, bias, epi, vec_b, kchunk, partial
#define GEMV_NK_PARAMS(T)                                                                                      \
    int M, int N, int K, float alpha, const float *x, long long ldx, const T *B, long long ldb, float beta,     \
        float *y, long long ldy, const float *bias, int epi, int vec_b
#define GEMV_NK_ARGS M, N, K, alpha, x, ldx, B, ldb, beta, y, ldy, bias, epi, vec_b

extern "C" __global__ void __launch_bounds__(256) gemv_kn_f32(GEMV_KN_PARAMS(float)) {
    gemv_kn_kernel<float>(GEMV_KN_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_kn_bf16(GEMV_KN_PARAMS(bf16_t)) {
    gemv_kn_kernel<bf16_t>(GEMV_KN_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_kn_f16(GEMV_KN_PARAMS(f16_t)) {
    gemv_kn_kernel<f16_t>(GEMV_KN_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_nk_f32(GEMV_NK_PARAMS(float)) {
    gemv_nk_kernel<float>(GEMV_NK_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_nk_bf16(GEMV_NK_PARAMS(bf16_t)) {
    gemv_nk_kernel<bf16_t>(GEMV_NK_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_nk_f16(GEMV_NK_PARAMS(f16_t)) {
    gemv_nk_kernel<f16_t>(GEMV_NK_ARGS);
}
