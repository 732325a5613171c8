// kernels/gemm_tc.cu — C = alpha·op(A)·op(B) + beta·C (+ epilogue) on the tensor cores: A and
// B bf16 (or both f16), f32 accumulation and C, through mma.sync.m16n8k16 (sm_80 and sm_90).
//
// Layouts as gemm_f32.cu (ld = row stride in elements): op(A) [M, K] from A [M, K] row-major or
// A stored [K, M] ("t"); op(B) [K, N] from B [K, N] row-major or B stored [N, K] ("t");
// C [M, N] f32 row-major. Requirements (checked by the host): every operand's offset and
// row stride a multiple of 8 elements (16-byte rows for cp.async); M, N, K arbitrary (edge
// tiles are zero-filled by cp.async's source size).
//
// Tiling:
//   * a block computes a 128×128 tile of C with 8 warps arranged 2 (M) × 4 (N); warp (wm, wn)
//     owns the 64×32 sub-tile at rows wm·64, columns wn·32: 4 m16 × 4 n8 mma tiles, 64 f32
//     accumulators per thread (the mma C fragment: lane (g, t) = (lane/4, lane%4) holds rows
//     g, g+8 and columns 2t, 2t+1 of each 16×8 tile);
//   * K advances by BK = 32 through a STAGES = 4 deep cp.async pipeline in shared memory
//     (64 KiB: per stage a 128×32 A tile and a 32×128 B tile of 16-bit values): while the warps
//     multiply stage s, the copies of stages s+1..s+3 are in flight;
//   * operand fragments come from shared memory by ldmatrix (x4: four 8×8 matrices per
//     instruction); a tile stored with K contiguous (A as stored, B transposed) is read with
//     plain ldmatrix, one stored with M or N contiguous with ldmatrix.trans;
//   * shared memory is XOR-swizzled by 16-byte chunks so that the eight row addresses of an
//     ldmatrix phase (and the cp.async writes) fall in distinct banks: 64-byte rows (32 values
//     of K) swap chunk c with c ^ ((row/2) mod 4); 256-byte rows (128 values of M or N) swap
//     c with c ^ (row mod 8).
// Roofline: 2·M·N·K FLOPs over (M·K + K·N)·2 bytes: compute-bound from a few hundred on each
// side; the block tile's intensity from global memory is 128·128·32·2 / (2·128·32·2) = 64
// FLOP/byte.
#include "common.cuh"

#define TC_BM 128
#define TC_BN 128
#define TC_BK 32
#define TC_STAGES 4
#define TC_THREADS 256
// Elements of one stage: A tile + B tile.
#define TC_STAGE_ELEMS (TC_BM * TC_BK + TC_BK * TC_BN)

// Element offset of 16-byte chunk c of row r in a tile with 64-byte rows (32 values).
__device__ __forceinline__ int off64(int r, int c) { return r * 32 + ((c ^ ((r >> 1) & 3)) << 3); }
// ... with 256-byte rows (128 values).
__device__ __forceinline__ int off256(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 3); }

__device__ __forceinline__ float tc_epilogue(float v, int j, const float* bias, int epi) {
    if (epi == 1 || epi == 2) v += bias[j];
    if (epi >= 2) v = gelu_tanh(v);
    return v;
}

// Bytes of a 16-byte chunk inside the matrix: `left` elements remain in the row.
__device__ __forceinline__ int chunk_bytes(bool row_ok, int left) {
    return row_ok ? max(0, min(8, left)) * 2 : 0;
}

template <class T, bool AT, bool BT>
__device__ __forceinline__ void gemm_tc_kernel(int M, int N, int K, float alpha, const T* A, long long lda,
                                               const T* B, long long ldb, float beta, float* C, long long ldc,
                                               const float* bias, int epi) {
    KILN_DYNAMIC_SMEM(T, smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    const int m0 = blockIdx.y * TC_BM, n0 = blockIdx.x * TC_BN;
    const int ktiles = (K + TC_BK - 1) / TC_BK;

    // Issue the copies of K tile `kt` into stage `st` (each thread 2 chunks of A, 2 of B).
    auto load_stage = [&](int st, int kt) {
        T* as = smem + st * TC_STAGE_ELEMS;
        T* bs = as + TC_BM * TC_BK;
        const int k0 = kt * TC_BK;
        KILN_UNROLL
        for (int h = 0; h < 2; ++h) {
            const int q = tid + h * TC_THREADS;  // chunk id 0..511
            if (!AT) {  // As[m][k]: 128 rows × 4 chunks
                const int r = q >> 2, c = q & 3, i = m0 + r, p = k0 + c * 8;
                const int bytes = chunk_bytes(i < M, K - p);
                cp_async_16(as + off64(r, c), bytes ? A + (long long)i * lda + p : A, bytes);
            } else {  // As[k][m]: 32 rows × 16 chunks
                const int r = q >> 4, c = q & 15, p = k0 + r, i = m0 + c * 8;
                const int bytes = chunk_bytes(p < K, M - i);
                cp_async_16(as + off256(r, c), bytes ? A + (long long)p * lda + i : A, bytes);
            }
            if (BT) {  // Bs[n][k]: 128 rows × 4 chunks
                const int r = q >> 2, c = q & 3, j = n0 + r, p = k0 + c * 8;
                const int bytes = chunk_bytes(j < N, K - p);
                cp_async_16(bs + off64(r, c), bytes ? B + (long long)j * ldb + p : B, bytes);
            } else {  // Bs[k][n]: 32 rows × 16 chunks
                const int r = q >> 4, c = q & 15, p = k0 + r, j = n0 + c * 8;
                const int bytes = chunk_bytes(p < K, N - j);
                cp_async_16(bs + off256(r, c), bytes ? B + (long long)p * ldb + j : B, bytes);
            }
        }
    };

    float acc[4][4][4];
    KILN_UNROLL
    for (int i = 0; i < 4; ++i)
        KILN_UNROLL
        for (int j = 0; j < 4; ++j)
            KILN_UNROLL
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < ktiles) load_stage(s, s);
        cp_async_commit();
    }
    // ldmatrix x4: lane L addresses row L%8 of matrix L/8.
    const int lr = lane & 7, lm = lane >> 3;
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<TC_STAGES - 2>();
        __syncthreads();  // stage kt landed for every thread; stage kt-1 is no longer read
        {
            const int next = kt + TC_STAGES - 1;
            if (next < ktiles) load_stage(next % TC_STAGES, next);
            cp_async_commit();
        }
        const T* as = smem + (kt % TC_STAGES) * TC_STAGE_ELEMS;
        const T* bs = as + TC_BM * TC_BK;
        KILN_UNROLL
        for (int kk = 0; kk < TC_BK; kk += 16) {
            uint32_t a[4][4], b[4][2];
            KILN_UNROLL
            for (int i = 0; i < 4; ++i) {
                const int mr = wm * 64 + i * 16;
                // matrix lm: rows +(lm&1)·8, depth +(lm>>1)·8
                if (!AT) {
                    ldmatrix_x4(a[i], as + off64(mr + (lm & 1) * 8 + lr, (kk >> 3) + (lm >> 1)));
                } else {
                    ldmatrix_x4_trans(a[i], as + off256(kk + (lm >> 1) * 8 + lr, (mr >> 3) + (lm & 1)));
                }
            }
            KILN_UNROLL
            for (int p = 0; p < 2; ++p) {
                const int nc = wn * 32 + p * 16;
                uint32_t r[4];
                // matrix lm: columns +(lm>>1)·8, depth +(lm&1)·8
                if (BT) {
                    ldmatrix_x4(r, bs + off64(nc + (lm >> 1) * 8 + lr, (kk >> 3) + (lm & 1)));
                } else {
                    ldmatrix_x4_trans(r, bs + off256(kk + (lm & 1) * 8 + lr, (nc >> 3) + (lm >> 1)));
                }
                b[2 * p][0] = r[0];
                b[2 * p][1] = r[1];
                b[2 * p + 1][0] = r[2];
                b[2 * p + 1][1] = r[3];
            }
            KILN_UNROLL
            for (int i = 0; i < 4; ++i)
                KILN_UNROLL
                for (int j = 0; j < 4; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
        }
    }
    cp_async_wait<0>();

    const int g = lane >> 2, t = lane & 3;
    KILN_UNROLL
    for (int i = 0; i < 4; ++i) {
        KILN_UNROLL
        for (int j = 0; j < 4; ++j) {
            KILN_UNROLL
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + wm * 64 + i * 16 + g + (e >> 1) * 8;
                const int col = n0 + wn * 32 + j * 8 + 2 * t + (e & 1);
                if (row < M && col < N) {
                    float* c = C + (long long)row * ldc + col;
                    float v = alpha * acc[i][j][e];
                    if (beta != 0.0f) v += beta * *c;
                    *c = tc_epilogue(v, col, bias, epi);
                }
            }
        }
    }
}

#define GEMM_TC_PARAMS(T)                                                                                      \
    int M, int N, int K, float alpha, const T *A, long long lda, const T *B, long long ldb, float beta, float *C, \
        long long ldc, const float *bias, int epi
#define GEMM_TC_ARGS M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, epi

// gemm_tc_<type>_<layout>: layout letters for A then B, n = as stored, t = transposed.
extern "C" __global__ void __launch_bounds__(256) gemm_tc_bf16_nn(GEMM_TC_PARAMS(bf16_t)) {
    gemm_tc_kernel<bf16_t, false, false>(GEMM_TC_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_tc_bf16_nt(GEMM_TC_PARAMS(bf16_t)) {
    gemm_tc_kernel<bf16_t, false, true>(GEMM_TC_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_tc_bf16_tn(GEMM_TC_PARAMS(bf16_t)) {
    gemm_tc_kernel<bf16_t, true, false>(GEMM_TC_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_tc_bf16_tt(GEMM_TC_PARAMS(bf16_t)) {
    gemm_tc_kernel<bf16_t, true, true>(GEMM_TC_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_tc_f16_nn(GEMM_TC_PARAMS(f16_t)) {
    gemm_tc_kernel<f16_t, false, false>(GEMM_TC_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_tc_f16_nt(GEMM_TC_PARAMS(f16_t)) {
    gemm_tc_kernel<f16_t, false, true>(GEMM_TC_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_tc_f16_tn(GEMM_TC_PARAMS(f16_t)) {
    gemm_tc_kernel<f16_t, true, false>(GEMM_TC_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) gemm_tc_f16_tt(GEMM_TC_PARAMS(f16_t)) {
    gemm_tc_kernel<f16_t, true, true>(GEMM_TC_ARGS);
}
