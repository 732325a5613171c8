// kernels/attention_tc.cu — flash-attention forward on the tensor cores: Q, K, V bf16 (or all
// f16), f32 softmax statistics and accumulation, f32 output; causal mask aligned bottom-right
// (query i of Tq sees key j iff j ≤ i + Tk − Tq); optional row log-sum-exp for training.
//
// Layouts as attention.cu: strided views of [batch, heads, seq, head_dim] with head_dim
// contiguous (Q, K, V, O), LSE [batch, heads, Tq] contiguous. Requirements (checked by the
// host): head_dim D = 64 or 128; Q, K, V strides and offsets multiples of 8 elements (16-byte
// rows for cp.async).
//
// Tiling (FlashAttention-2):
//   * a block of 4 warps owns 64 query rows of one (b, h); warp w owns rows 16w..16w+15, so the
//     softmax statistics of a row never leave its warp (each row lives in one quad of 4 lanes);
//   * Q (64×D) is copied to shared memory once and kept in registers as mma A fragments;
//   * K and V tiles of 64 keys are double-buffered in shared memory through cp.async: the next
//     tile's copies are in flight while the current one is used;
//   * S = Q·Kᵀ: per warp 16×64 from 8 n-tiles × D/16 k-steps of mma.m16n8k16 (K rows, with D
//     contiguous, are read with plain ldmatrix); scores are scaled by scale·log2 e and masked;
//   * online softmax in registers: the row max and sum are reduced over the quad with two
//     shuffles, the output accumulators rescaled by 2^(m_old − m_new);
//   * O += P·V: the S accumulators of two adjacent n-tiles are exactly an A fragment of
//     m16n8k16, so P is packed to 16-bit pairs in registers, never stored; V rows (keys, D
//     contiguous) are read with ldmatrix.trans;
//   * shared tiles are XOR-swizzled by 16-byte chunks (chunk c of row r at c ^ (r mod 8)), so
//     the 8 row addresses of every ldmatrix phase hit distinct banks.
// Key tiles past the last key the block's last query sees are skipped (causal: about half).
// Roofline: 4·Tq·Tk·D FLOPs (× ½ causal) per (b, h) reading Q once and K, V once per query
// block: compute-bound on the tensor cores.
#include "common.cuh"

#define FA_BQ 64
#define FA_BK 64
#define FA_THREADS 128
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

struct View {
    long long sb, sh, st;
};

// Element offset of 16-byte chunk c of row r in a tile whose rows hold D 16-bit values.
template <int D> __device__ __forceinline__ int fa_off(int r, int c) { return r * D + ((c ^ (r & 7)) << 3); }

template <class T, int D>
__device__ __forceinline__ void flash_fwd_kernel(const T* q, View qv, const T* k, View kv, const T* v, View vv,
                                                 float* o, View ov, float* lse, int H, int Tq, int Tk, float scale,
                                                 int causal) {
    KILN_DYNAMIC_SMEM(T, smem);
    T* Qs = smem;                 // [64][D]
    T* Ks = Qs + FA_BQ * D;       // [2][64][D]
    T* Vs = Ks + 2 * FA_BK * D;   // [2][64][D]
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * FA_BQ;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int lr = lane & 7, lm = lane >> 3;
    const int off = Tk - Tq;
    const int CH = D / 8;  // 16-byte chunks per row
    const T* qb = q + (long long)b * qv.sb + (long long)h * qv.sh;
    const T* kb = k + (long long)b * kv.sb + (long long)h * kv.sh;
    const T* vb = v + (long long)b * vv.sb + (long long)h * vv.sh;

    // Copies of rows [row0, row0 + 64) of a [seq, D] view (stride st) into a swizzled tile.
    auto load_tile = [&](T* dst, const T* src, long long st, int row0, int rows) {
        for (int q_ = tid; q_ < FA_BK * CH; q_ += FA_THREADS) {
            const int r = q_ / CH, c = q_ % CH;
            const bool ok = row0 + r < rows;
            cp_async_16(dst + fa_off<D>(r, c), ok ? src + (long long)(row0 + r) * st + c * 8 : src, ok ? 16 : 0);
        }
    };

    const int q_last = min(q0 + FA_BQ, Tq) - 1;
    const int k_end = causal ? max(0, min(Tk, q_last + off + 1)) : Tk;
    const int ktiles = (k_end + FA_BK - 1) / FA_BK;

    load_tile(Qs, qb, qv.st, q0, Tq);
    if (ktiles > 0) {
        load_tile(Ks, kb, kv.st, 0, Tk);
        load_tile(Vs, vb, vv.st, 0, Tk);
    }
    cp_async_commit();

    uint32_t qf[D / 16][4];
    float acc[D / 8][4];
    KILN_UNROLL
    for (int n = 0; n < D / 8; ++n)
        KILN_UNROLL
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
    float m[2] = {KILN_NEG_INF, KILN_NEG_INF}, l[2] = {0.0f, 0.0f};
    const float sl2 = scale * FA_LOG2E;
    const int row_a = q0 + warp * 16 + g, row_b = row_a + 8;

    for (int kt = 0; kt < ktiles; ++kt) {
        const int cur = kt & 1;
        if (kt + 1 < ktiles) {
            load_tile(Ks + (cur ^ 1) * FA_BK * D, kb, kv.st, (kt + 1) * FA_BK, Tk);
            load_tile(Vs + (cur ^ 1) * FA_BK * D, vb, vv.st, (kt + 1) * FA_BK, Tk);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // tile kt (and Q) landed for every thread
        if (kt == 0) {
            KILN_UNROLL
            for (int kk = 0; kk < D / 16; ++kk)
                ldmatrix_x4(qf[kk], Qs + fa_off<D>(warp * 16 + (lm & 1) * 8 + lr, 2 * kk + (lm >> 1)));
        }
        const T* ks = Ks + cur * FA_BK * D;
        const T* vs = Vs + cur * FA_BK * D;
        const int k0 = kt * FA_BK;

        // S = Q·Kᵀ for this warp's 16 rows × 64 keys.
        float s[FA_BK / 8][4];
        KILN_UNROLL
        for (int n = 0; n < FA_BK / 8; ++n)
            KILN_UNROLL
            for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
        KILN_UNROLL
        for (int kk = 0; kk < D / 16; ++kk) {
            KILN_UNROLL
            for (int p = 0; p < FA_BK / 16; ++p) {
                uint32_t r[4];
                ldmatrix_x4(r, ks + fa_off<D>(p * 16 + (lm >> 1) * 8 + lr, 2 * kk + (lm & 1)));
                const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                mma_16816<T>(s[2 * p], qf[kk], b0);
                mma_16816<T>(s[2 * p + 1], qf[kk], b1);
            }
        }
        // Scale, mask, row maxima (rows g and g + 8 of the warp's 16).
        float mx[2] = {m[0], m[1]};
        KILN_UNROLL
        for (int n = 0; n < FA_BK / 8; ++n) {
            KILN_UNROLL
            for (int e = 0; e < 4; ++e) {
                const int row = e < 2 ? row_a : row_b;
                const int key = k0 + n * 8 + 2 * t + (e & 1);
                const bool ok = row < Tq && key < Tk && (!causal || key <= row + off);
                s[n][e] = ok ? s[n][e] * sl2 : KILN_NEG_INF;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
            }
        }
        float corr[2];
        KILN_UNROLL
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(KILN_FULL_MASK, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(KILN_FULL_MASK, mx[i], 2));
            corr[i] = mx[i] == KILN_NEG_INF ? 1.0f : exp2f(m[i] - mx[i]);
            m[i] = mx[i];
            l[i] *= corr[i];
        }
        KILN_UNROLL
        for (int n = 0; n < D / 8; ++n) {
            acc[n][0] *= corr[0];
            acc[n][1] *= corr[0];
            acc[n][2] *= corr[1];
            acc[n][3] *= corr[1];
        }
        // P = 2^(s − m), packed to 16-bit A fragments: k-step j covers keys 16j..16j+15.
        uint32_t pf[FA_BK / 16][4];
        KILN_UNROLL
        for (int n = 0; n < FA_BK / 8; ++n) {
            float p[4];
            KILN_UNROLL
            for (int e = 0; e < 4; ++e) {
                p[e] = s[n][e] == KILN_NEG_INF ? 0.0f : exp2f(s[n][e] - m[e >> 1]);
                l[e >> 1] += p[e];
            }
            pf[n >> 1][(n & 1) * 2 + 0] = pack2<T>(p[0], p[1]);
            pf[n >> 1][(n & 1) * 2 + 1] = pack2<T>(p[2], p[3]);
        }
        // O += P·V: V tile [64 keys][D], keys = the mma's depth.
        KILN_UNROLL
        for (int j = 0; j < FA_BK / 16; ++j) {
            KILN_UNROLL
            for (int p = 0; p < D / 16; ++p) {
                uint32_t r[4];
                ldmatrix_x4_trans(r, vs + fa_off<D>(j * 16 + (lm & 1) * 8 + lr, 2 * p + (lm >> 1)));
                const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                mma_16816<T>(acc[2 * p], pf[j], b0);
                mma_16816<T>(acc[2 * p + 1], pf[j], b1);
            }
        }
        __syncthreads();  // this tile's buffers are free for the copies issued next iteration
    }
    cp_async_wait<0>();

    // Row sums over the quad, normalise, write.
    KILN_UNROLL
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(KILN_FULL_MASK, l[i], 1);
        l[i] += __shfl_xor_sync(KILN_FULL_MASK, l[i], 2);
    }
    KILN_UNROLL
    for (int i = 0; i < 2; ++i) {
        const int row = i == 0 ? row_a : row_b;
        if (row < Tq) {
            const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
            float* orow = o + (long long)b * ov.sb + (long long)h * ov.sh + (long long)row * ov.st;
            KILN_UNROLL
            for (int n = 0; n < D / 8; ++n) {
                orow[n * 8 + 2 * t] = acc[n][2 * i] * inv;
                orow[n * 8 + 2 * t + 1] = acc[n][2 * i + 1] * inv;
            }
            if (lse && t == 0)
                lse[((long long)b * H + h) * Tq + row] = l[i] > 0.0f ? (m[i] + log2f(l[i])) * FA_LN2 : KILN_NEG_INF;
        }
    }
}

#define FA_PARAMS(T) \
    const T *q, View qv, const T *k, View kv, const T *v, View vv, float *o, View ov, float *lse, int H, int Tq, int Tk, float scale, int causal
#define FA_ARGS q, qv, k, kv, v, vv, o, ov, lse, H, Tq, Tk, scale, causal

extern "C" __global__ void __launch_bounds__(128) flash_fwd_bf16_d64(FA_PARAMS(bf16_t)) {
    flash_fwd_kernel<bf16_t, 64>(FA_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) flash_fwd_bf16_d128(FA_PARAMS(bf16_t)) {
    flash_fwd_kernel<bf16_t, 128>(FA_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) flash_fwd_f16_d64(FA_PARAMS(f16_t)) {
    flash_fwd_kernel<f16_t, 64>(FA_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) flash_fwd_f16_d128(FA_PARAMS(f16_t)) {
    flash_fwd_kernel<f16_t, 128>(FA_ARGS);
}
