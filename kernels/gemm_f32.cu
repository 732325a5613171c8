// kernels/gemm_f32.cu — C = alpha·op(A)·op(B) + beta·C, then an epilogue (bias, GELU), on the
// f32 FMA units (no tensor cores). A and B are f32, or 16-bit (bf16/f16) converted to f32 as
// they are loaded; accumulation and C are f32.
//
// Shapes and layouts (ld = row stride in elements):
//   op(A) [M, K]: A row-major [M, K] (A(i,p) = A[i·lda + p]) or, transposed, A stored [K, M]
//                 (A(i,p) = A[p·lda + i]);
//   op(B) [K, N]: B row-major [K, N] (B(p,j) = B[p·ldb + j]) or, transposed, B stored [N, K]
//                 (B(p,j) = B[j·ldb + p]) — the tied GPT-2 output projection wteᵀ and the
//                 backward products;
//   C [M, N] row-major, C(i,j) = C[i·ldc + j]. beta = 0 ignores C's old contents (even NaN);
//   beta = 1 accumulates (gradients).
//   Epilogue: 0 none, 1 + bias[j], 2 gelu_tanh(· + bias[j]), 3 gelu_tanh(·).
//
// Tiling (BLIS-style register blocking on the GPU):
//   * a block computes a 128×128 tile of C with 256 threads, stepping through K by BK = 8;
//   * thread (ty, tx) = (tid / 16, tid % 16) owns an 8×8 sub-tile made of four 4×4 pieces, at
//     rows ty·4 + {0..3} and 64 + ty·4 + {0..3}, columns tx·4 + {0..3} and 64 + tx·4 + {0..3}
//     (so a warp's shared-memory reads are 16 consecutive float4: conflict-free);
//   * each BK step: the A tile is kept in shared memory as Aᵀ (As[k][m]) and the B tile as
//     Bs[k][n]; per k, a thread reads 8 values of A and 8 of B and does 64 FMAs;
//   * double buffering: the next tiles' global loads (4 elements of A, 4 of B per thread,
//     16-byte vector loads when the operand is aligned) are issued before the current tile's
//     FMAs and stored to the other shared buffer after them: one barrier per step.
// Roofline: 2·M·N·K FLOPs over (M·K + K·N)·4 bytes (plus C): compute-bound for large squares;
// the tile's arithmetic intensity is 128·128·8·2 / ((128 + 128)·8·4) = 32 FLOP/byte of shared
// memory traffic per block.
#include "common.cuh"

#define BM 128
#define BN 128
#define BK 8
#define PAD 4

// Four consecutive elements starting at p, of which `valid` (0..4) are inside the matrix;
// vec: p is aligned for one vector load.
__device__ __forceinline__ void load4(const float* p, int valid, bool vec, float (&r)[4]) {
    if (vec && valid == 4) {
        const float4 v = *reinterpret_cast<const float4*>(p);
        r[0] = v.x;
        r[1] = v.y;
        r[2] = v.z;
        r[3] = v.w;
    } else {
        KILN_UNROLL
        for (int q = 0; q < 4; ++q) r[q] = q < valid ? p[q] : 0.0f;
    }
}
template <class T> __device__ __forceinline__ void load4(const T* p, int valid, bool vec, float (&r)[4]) {
    if (vec && valid == 4) {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        T h[4];
        h[0].bits = (uint16_t)(v.x & 0xffffu);
        h[1].bits = (uint16_t)(v.x >> 16);
        h[2].bits = (uint16_t)(v.y & 0xffffu);
        h[3].bits = (uint16_t)(v.y >> 16);
        KILN_UNROLL
        for (int q = 0; q < 4; ++q) r[q] = to_f32(h[q]);
    } else {
        KILN_UNROLL
        for (int q = 0; q < 4; ++q) r[q] = q < valid ? to_f32(p[q]) : 0.0f;
    }
}

__device__ __forceinline__ float epilogue(float v, int j, const float* bias, int epi) {
    if (epi == 1 || epi == 2) v += bias[j];
    if (epi >= 2) v = gelu_tanh(v);
    return v;
}

template <bool AT, bool BT, class TA, class TB>
__device__ __forceinline__ void gemm_f32_kernel(int M, int N, int K, float alpha, const TA* A, long long lda,
                                                const TB* B, long long ldb, float beta, float* C, long long ldc,
                                                const float* bias, int epi, int vec_a, int vec_b) {
    __shared__ __align__(16) float As[2][BK][BM + PAD];
    __shared__ __align__(16) float Bs[2][BK][BN + PAD];
    const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    // What this thread loads: A: (row of the tile, depth) of its 4 elements, same for B.
    // !AT: 4 consecutive depths of one row (mm = tid/2, kk = (tid%2)·4); AT: 4 consecutive rows.
    const int a_mm = AT ? (tid % 32) * 4 : tid / 2;
    const int a_kk = AT ? tid / 32 : (tid % 2) * 4;
    const int b_nn = BT ? tid / 2 : (tid % 32) * 4;
    const int b_kk = BT ? (tid % 2) * 4 : tid / 32;
    float ra[4], rb[4];

    auto load_tiles = [&](int k0) {
        if (!AT) {
            const int i = m0 + a_mm, p = k0 + a_kk;
            const int valid = i < M ? max(0, min(4, K - p)) : 0;
            load4(A + (valid > 0 ? (long long)i * lda + p : 0), valid, vec_a != 0, ra);
        } else {
            const int i = m0 + a_mm, p = k0 + a_kk;
            const int valid = p < K ? max(0, min(4, M - i)) : 0;
            load4(A + (valid > 0 ? (long long)p * lda + i : 0), valid, vec_a != 0, ra);
        }
        if (!BT) {
            const int j = n0 + b_nn, p = k0 + b_kk;
            const int valid = p < K ? max(0, min(4, N - j)) : 0;
            load4(B + (valid > 0 ? (long long)p * ldb + j : 0), valid, vec_b != 0, rb);
        } else {
            const int j = n0 + b_nn, p = k0 + b_kk;
            const int valid = j < N ? max(0, min(4, K - p)) : 0;
            load4(B + (valid > 0 ? (long long)j * ldb + p : 0), valid, vec_b != 0, rb);
        }
    };
    auto store_tiles = [&](int buf) {
        KILN_UNROLL
        for (int q = 0; q < 4; ++q) {
            if (!AT) As[buf][a_kk + q][a_mm] = ra[q];
            else As[buf][a_kk][a_mm + q] = ra[q];
            if (!BT) Bs[buf][b_kk][b_nn + q] = rb[q];
            else Bs[buf][b_kk + q][b_nn] = rb[q];
        }
    };

    float acc[8][8];
    KILN_UNROLL
    for (int i = 0; i < 8; ++i)
        KILN_UNROLL
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    const int ktiles = (K + BK - 1) / BK;
    load_tiles(0);
    store_tiles(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
        const int buf = kt & 1;
        if (kt + 1 < ktiles) load_tiles((kt + 1) * BK);
        KILN_UNROLL
        for (int kk = 0; kk < BK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][kk][64 + ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&Bs[buf][kk][64 + tx * 4]);
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
            KILN_UNROLL
            for (int i = 0; i < 8; ++i)
                KILN_UNROLL
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        if (kt + 1 < ktiles) store_tiles(buf ^ 1);
        __syncthreads();
    }

    KILN_UNROLL
    for (int i = 0; i < 8; ++i) {
        const int row = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
        if (row >= M) continue;
        KILN_UNROLL
        for (int j = 0; j < 8; ++j) {
            const int col = n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
            if (col >= N) continue;
            float* c = C + (long long)row * ldc + col;
            float v = alpha * acc[i][j];
            if (beta != 0.0f) v += beta * *c;
            *c = epilogue(v, col, bias, epi);
        }
    }
}

#define GEMM_F32_PARAMS(TA, TB)                                                                                   \
    int M, int N, int K, float alpha, const TA *A, long long lda, const TB *B, long long ldb, float beta, float *C, \
        long long ldc, const float *bias, int epi, int vec_a, int vec_b
#define GEMM_F32_ARGS M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, epi, vec_a, vec_b

// Instantiations: gemm_<A type>_<B type>_<layout>, layout letters for A then B: n = as stored
// (row-major), t = transposed.
extern "C" __global__ void __launch_bounds__(256) gemm_f32_f32_nn(GEMM_F32_PARAMS(float, float)) {
    gemm_f32_kernel<false, false, float, float>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f32_f32_nt(GEMM_F32_PARAMS(float, float)) {
    gemm_f32_kernel<false, true, float, float>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f32_f32_tn(GEMM_F32_PARAMS(float, float)) {
    gemm_f32_kernel<true, false, float, float>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f32_f32_tt(GEMM_F32_PARAMS(float, float)) {
    gemm_f32_kernel<true, true, float, float>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f32_bf16_nn(GEMM_F32_PARAMS(float, bf16_t)) {
    gemm_f32_kernel<false, false, float, bf16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f32_bf16_nt(GEMM_F32_PARAMS(float, bf16_t)) {
    gemm_f32_kernel<false, true, float, bf16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f32_bf16_tn(GEMM_F32_PARAMS(float, bf16_t)) {
    gemm_f32_kernel<true, false, float, bf16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f32_bf16_tt(GEMM_F32_PARAMS(float, bf16_t)) {
    gemm_f32_kernel<true, true, float, bf16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f32_f16_nn(GEMM_F32_PARAMS(float, f16_t)) {
    gemm_f32_kernel<false, false, float, f16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f32_f16_nt(GEMM_F32_PARAMS(float, f16_t)) {
    gemm_f32_kernel<false, true, float, f16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f32_f16_tn(GEMM_F32_PARAMS(float, f16_t)) {
    gemm_f32_kernel<true, false, float, f16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f32_f16_tt(GEMM_F32_PARAMS(float, f16_t)) {
    gemm_f32_kernel<true, true, float, f16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_bf16_bf16_nn(GEMM_F32_PARAMS(bf16_t, bf16_t)) {
    gemm_f32_kernel<false, false, bf16_t, bf16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_bf16_bf16_nt(GEMM_F32_PARAMS(bf16_t, bf16_t)) {
    gemm_f32_kernel<false, true, bf16_t, bf16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_bf16_bf16_tn(GEMM_F32_PARAMS(bf16_t, bf16_t)) {
    gemm_f32_kernel<true, false, bf16_t, bf16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_bf16_bf16_tt(GEMM_F32_PARAMS(bf16_t, bf16_t)) {
    gemm_f32_kernel<true, true, bf16_t, bf16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f16_f16_nn(GEMM_F32_PARAMS(f16_t, f16_t)) {
    gemm_f32_kernel<false, false, f16_t, f16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f16_f16_nt(GEMM_F32_PARAMS(f16_t, f16_t)) {
    gemm_f32_kernel<false, true, f16_t, f16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f16_f16_tn(GEMM_F32_PARAMS(f16_t, f16_t)) {
    gemm_f32_kernel<true, false, f16_t, f16_t>(GEMM_F32_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_f16_f16_tt(GEMM_F32_PARAMS(f16_t, f16_t)) {
    gemm_f32_kernel<true, true, f16_t, f16_t>(GEMM_F32_ARGS);
}
