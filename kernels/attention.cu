// kernels/attention.cu — scaled dot-product attention on the FMA units (f32 compute):
// O = softmax(scale·Q·Kᵀ + mask)·V, fused and tiled (flash-style: the Tq×Tk score matrix is
// never formed), its backward pass, and the KV-cache decode step.
//
// Layouts: every operand is a strided view of [batch, heads, seq, head_dim] with head_dim
// contiguous: element (b, h, t, d) at b·sb + h·sh + t·st + d (kiln-cpu's HeadsRef). The plain
// layout, [batch, seq, heads·head_dim], and one third of GPT-2's fused qkv [B·T, 3C] (head h
// at columns h·D of the third) are all such views. Q, O, dO, dQ, dK, dV are f32; K and V are
// f32, bf16 or f16 in the forward and decode kernels. LSE and delta are [batch, heads, Tq]
// contiguous f32. Causal masks are aligned bottom-right: query i of Tq sees key j of Tk iff
// j ≤ i + (Tk − Tq); a query row that sees no key outputs zeros (LSE −inf).
//
// Forward (attn_fwd_f32_*): a block of 128 threads owns 32 query rows of one (b, h)
// (grid: query blocks × heads × batch). Thread t works on row t/4 with its quad lane t%4; the
// quad splits the row's 32 keys of a tile (keys q4, q4+4, ...) and the output columns
// (c·4 + q4). Per key tile of 32: K and V are staged in shared memory (converted to f32),
// scores (pre-scaled by scale·log2 e) go through the online softmax — running max m, sum l,
// output rescaled by 2^(m_old − m_new) — and P (32×32, shared) is multiplied by V.
// Shared rows are padded to D + 1 floats so that the eight rows a warp reads fall in distinct
// banks. With `lse`, the row's log-sum-exp (natural log, of the scaled scores) is saved for
// the backward pass.
// Backward (flash-style, deterministic: no atomics): attn_bwd_delta computes
// delta_i = Σ_d dO_i·O_i; attn_bwd_dkdv_f32_* owns 32 keys per block and streams the query
// tiles that see them, recomputing P = exp(scale·Q·Kᵀ − LSE) tile by tile:
// dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − delta), dK += scale·dSᵀ·Q; attn_bwd_dq_f32_* owns 32
// queries per block and streams the key tiles: dQ += scale·dS·K. Each output element is
// written by exactly one thread.
// Decode (attn_decode_*): one block of 4 warps per (head, sequence) over a KV cache
// [sequences, heads, capacity, head_dim]; warp w takes keys w, w+4, ... (4 keys per step, the
// lanes splitting head_dim), keeps its own online softmax, and the 4 warps' (m, l, o) are merged
// in warp order. attn_decode_batch_* does the same for sequences whose caches are separate
// allocations (addresses in the kernel's parameters), appending the step's key and value first.
// Roofline: the forward does 4·Tq·Tk·D FLOPs (half with a causal mask) reading Q, K, V once
// per query block: compute-bound on the FMA units for long sequences; the decode step reads
// the cache once (2·len·D elements per head): bandwidth-bound.
#include "common.cuh"

#define ATT_BQ 32
#define ATT_BK 32
#define ATT_THREADS 128
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

struct View {  // element (b, h, t, d) at b·sb + h·sh + t·st + d
    long long sb, sh, st;
};

__device__ __forceinline__ long long at(const View& v, int b, int h, int t) {
    return (long long)b * v.sb + (long long)h * v.sh + (long long)t * v.st;
}

// ---- forward -------------------------------------------------------------------------------------
template <int DMAX, class T>
__device__ __forceinline__ void attn_fwd_kernel(const float* q, View qv, const T* k, View kv, const T* v, View vv,
                                                float* o, View ov, float* lse, int H, int Tq, int Tk, int D,
                                                float scale, int causal) {
    KILN_DYNAMIC_SMEM(float, smem);
    const int DP = D + 1;  // padded row
    float* Qs = smem;
    float* Ks = Qs + ATT_BQ * DP;
    float* Vs = Ks + ATT_BK * DP;
    float* Ps = Vs + ATT_BK * DP;  // [32][33]
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATT_BQ;
    const int tid = threadIdx.x, r = tid >> 2, q4 = tid & 3;
    const int qi = q0 + r;
    const int off = Tk - Tq;
    const float qscale = scale * LOG2E;

    for (int idx = tid; idx < ATT_BQ * D; idx += ATT_THREADS) {
        const int rr = idx / D, d = idx % D;
        Qs[rr * DP + d] = q0 + rr < Tq ? q[at(qv, b, h, q0 + rr) + d] * qscale : 0.0f;
    }
    // Keys this block needs: up to the last key its last query sees.
    const int q_last = min(q0 + ATT_BQ, Tq) - 1;
    const int k_end = causal ? max(0, min(Tk, q_last + off + 1)) : Tk;

    float acc[DMAX / 4];
    KILN_UNROLL
    for (int c = 0; c < DMAX / 4; ++c) acc[c] = 0.0f;
    float m = KILN_NEG_INF, l = 0.0f;

    for (int k0 = 0; k0 < k_end; k0 += ATT_BK) {
        __syncthreads();  // the previous tile's K, V and P are no longer read
        for (int idx = tid; idx < ATT_BK * D; idx += ATT_THREADS) {
            const int j = idx / D, d = idx % D;
            const bool ok = k0 + j < Tk;
            Ks[j * DP + d] = ok ? to_f32(k[at(kv, b, h, k0 + j) + d]) : 0.0f;
            Vs[j * DP + d] = ok ? to_f32(v[at(vv, b, h, k0 + j) + d]) : 0.0f;
        }
        __syncthreads();
        float s[ATT_BK / 4];
        float tile_max = KILN_NEG_INF;
        KILN_UNROLL
        for (int jj = 0; jj < ATT_BK / 4; ++jj) {
            const int j = q4 + 4 * jj, kj = k0 + j;
            float dot = 0.0f;
            for (int d = 0; d < D; ++d) dot = fmaf(Qs[r * DP + d], Ks[j * DP + d], dot);
            const bool ok = qi < Tq && kj < Tk && (!causal || kj <= qi + off);
            s[jj] = ok ? dot : KILN_NEG_INF;
            tile_max = fmaxf(tile_max, s[jj]);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(KILN_FULL_MASK, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(KILN_FULL_MASK, tile_max, 2));
        const float m_new = fmaxf(m, tile_max);
        // A row with nothing visible yet keeps m = −inf and contributes nothing.
        const float corr = m_new == KILN_NEG_INF ? 1.0f : exp2f(m - m_new);
        float psum = 0.0f;
        KILN_UNROLL
        for (int jj = 0; jj < ATT_BK / 4; ++jj) {
            const float p = s[jj] == KILN_NEG_INF ? 0.0f : exp2f(s[jj] - m_new);
            Ps[r * 33 + q4 + 4 * jj] = p;
            psum += p;
        }
        psum += __shfl_xor_sync(KILN_FULL_MASK, psum, 1);
        psum += __shfl_xor_sync(KILN_FULL_MASK, psum, 2);
        l = l * corr + psum;
        m = m_new;
        __syncwarp();  // the row's P, written by its quad (in this warp), is visible to the quad
        KILN_UNROLL
        for (int c = 0; c < DMAX / 4; ++c) {
            const int d = c * 4 + q4;
            if (d < D) {
                float a = acc[c] * corr;
                for (int j = 0; j < ATT_BK; ++j) a = fmaf(Ps[r * 33 + j], Vs[j * DP + d], a);
                acc[c] = a;
            }
        }
    }
    if (qi < Tq) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float* orow = o + at(ov, b, h, qi);
        KILN_UNROLL
        for (int c = 0; c < DMAX / 4; ++c) {
            const int d = c * 4 + q4;
            if (d < D) orow[d] = acc[c] * inv;
        }
        if (lse && q4 == 0) lse[((long long)b * H + h) * Tq + qi] = l > 0.0f ? (m + log2f(l)) * LN2 : KILN_NEG_INF;
    }
}

#define ATT_FWD_PARAMS(T)                                                                                   \
    const float *q, View qv, const T *k, View kv, const T *v, View vv, float *o, View ov, float *lse, int H, \
        int Tq, int Tk, int D, float scale, int causal
#define ATT_FWD_ARGS q, qv, k, kv, v, vv, o, ov, lse, H, Tq, Tk, D, scale, causal

extern "C" __global__ void __launch_bounds__(128) attn_fwd_f32_d64_f32(ATT_FWD_PARAMS(float)) {
    attn_fwd_kernel<64, float>(ATT_FWD_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_fwd_f32_d128_f32(ATT_FWD_PARAMS(float)) {
    attn_fwd_kernel<128, float>(ATT_FWD_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_fwd_f32_d64_bf16(ATT_FWD_PARAMS(bf16_t)) {
    attn_fwd_kernel<64, bf16_t>(ATT_FWD_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_fwd_f32_d128_bf16(ATT_FWD_PARAMS(bf16_t)) {
    attn_fwd_kernel<128, bf16_t>(ATT_FWD_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_fwd_f32_d64_f16(ATT_FWD_PARAMS(f16_t)) {
    attn_fwd_kernel<64, f16_t>(ATT_FWD_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_fwd_f32_d128_f16(ATT_FWD_PARAMS(f16_t)) {
    attn_fwd_kernel<128, f16_t>(ATT_FWD_ARGS);
}

// ---- backward ------------------------------------------------------------------------------------
// delta[b, h, i] = Σ_d dO[b, h, i, d]·O[b, h, i, d]; one warp per row (8 rows per block).
extern "C" __global__ void attn_bwd_delta(const float* o, View ov, const float* dout, View dov, float* delta, int H,
                                          int Tq, int D, long long rows) {
    const long long row = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    const bool live = row < rows;
    const int i = (int)(live ? row % Tq : 0), bh = (int)(live ? row / Tq : 0);
    const int b = bh / H, h = bh % H;
    float s = 0.0f;
    if (live) {
        const float* orow = o + at(ov, b, h, i);
        const float* drow = dout + at(dov, b, h, i);
        for (int d = lane; d < D; d += 32) s = fmaf(orow[d], drow[d], s);
    }
    s = warp_sum(s);
    if (live && lane == 0) delta[row] = s;
}

// dK, dV for 32 keys per block: grid (key blocks, H, B).
template <int DMAX>
__device__ __forceinline__ void attn_bwd_dkdv_kernel(const float* q, View qv, const float* k, View kv, const float* v,
                                                     View vv, const float* dout, View dov, const float* lse,
                                                     const float* delta, float* dk, View dkv, float* dv, View dvv,
                                                     int H, int Tq, int Tk, int D, float scale, int causal) {
    KILN_DYNAMIC_SMEM(float, smem);
    const int DP = D + 1;
    float* Ks = smem;
    float* Vs = Ks + ATT_BK * DP;
    float* Qs = Vs + ATT_BK * DP;
    float* dOs = Qs + ATT_BQ * DP;
    float* Ps = dOs + ATT_BQ * DP;  // [key][query], 32×33
    float* dSs = Ps + ATT_BK * 33;
    float* Ls = dSs + ATT_BK * 33;  // LSE·log2 e of the tile's queries
    float* Ds = Ls + ATT_BQ;        // delta of the tile's queries
    const int b = blockIdx.z, h = blockIdx.y, k0 = blockIdx.x * ATT_BK;
    const int tid = threadIdx.x, kr = tid >> 2, q4 = tid & 3;
    const int kj = k0 + kr;
    const int off = Tk - Tq;
    const float sl2 = scale * LOG2E;
    for (int idx = tid; idx < ATT_BK * D; idx += ATT_THREADS) {
        const int j = idx / D, d = idx % D;
        const bool ok = k0 + j < Tk;
        Ks[j * DP + d] = ok ? k[at(kv, b, h, k0 + j) + d] : 0.0f;
        Vs[j * DP + d] = ok ? v[at(vv, b, h, k0 + j) + d] : 0.0f;
    }
    float adk[DMAX / 4], adv[DMAX / 4];
    KILN_UNROLL
    for (int c = 0; c < DMAX / 4; ++c) adk[c] = adv[c] = 0.0f;
    // Queries that see any key of this block: i ≥ k0 − off (causal).
    const int i_begin = causal ? max(0, k0 - off) : 0;
    for (int i0 = (i_begin / ATT_BQ) * ATT_BQ; i0 < Tq; i0 += ATT_BQ) {
        __syncthreads();  // the previous query tile is no longer read
        for (int idx = tid; idx < ATT_BQ * D; idx += ATT_THREADS) {
            const int rr = idx / D, d = idx % D;
            const bool ok = i0 + rr < Tq;
            Qs[rr * DP + d] = ok ? q[at(qv, b, h, i0 + rr) + d] : 0.0f;
            dOs[rr * DP + d] = ok ? dout[at(dov, b, h, i0 + rr) + d] : 0.0f;
        }
        if (tid < ATT_BQ) {
            const bool ok = i0 + tid < Tq;
            const long long li = ((long long)b * H + h) * Tq + i0 + tid;
            Ls[tid] = ok ? lse[li] * LOG2E : 0.0f;
            Ds[tid] = ok ? delta[li] : 0.0f;
        }
        __syncthreads();
        KILN_UNROLL
        for (int jj = 0; jj < ATT_BQ / 4; ++jj) {
            const int qq = q4 + 4 * jj, qi = i0 + qq;
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < D; ++d) {
                s = fmaf(Ks[kr * DP + d], Qs[qq * DP + d], s);
                dp = fmaf(Vs[kr * DP + d], dOs[qq * DP + d], dp);
            }
            const bool ok = qi < Tq && kj < Tk && (!causal || kj <= qi + off) && Ls[qq] != KILN_NEG_INF;
            const float p = ok ? exp2f(s * sl2 - Ls[qq]) : 0.0f;
            Ps[kr * 33 + qq] = p;
            dSs[kr * 33 + qq] = p * (dp - Ds[qq]);
        }
        __syncwarp();  // the row of P and dS (written by its quad) is visible to the quad
        KILN_UNROLL
        for (int c = 0; c < DMAX / 4; ++c) {
            const int d = c * 4 + q4;
            if (d < D) {
                float a = adv[c], g = adk[c];
                for (int qq = 0; qq < ATT_BQ; ++qq) {
                    a = fmaf(Ps[kr * 33 + qq], dOs[qq * DP + d], a);
                    g = fmaf(dSs[kr * 33 + qq], Qs[qq * DP + d], g);
                }
                adv[c] = a;
                adk[c] = g;
            }
        }
    }
    if (kj < Tk) {
        float* dkrow = dk + at(dkv, b, h, kj);
        float* dvrow = dv + at(dvv, b, h, kj);
        KILN_UNROLL
        for (int c = 0; c < DMAX / 4; ++c) {
            const int d = c * 4 + q4;
            if (d < D) {
                dkrow[d] = scale * adk[c];
                dvrow[d] = adv[c];
            }
        }
    }
}

// dQ for 32 queries per block: grid (query blocks, H, B).
template <int DMAX>
__device__ __forceinline__ void attn_bwd_dq_kernel(const float* q, View qv, const float* k, View kv, const float* v,
                                                   View vv, const float* dout, View dov, const float* lse,
                                                   const float* delta, float* dq, View dqv, int H, int Tq, int Tk,
                                                   int D, float scale, int causal) {
    KILN_DYNAMIC_SMEM(float, smem);
    const int DP = D + 1;
    float* Qs = smem;
    float* dOs = Qs + ATT_BQ * DP;
    float* Ks = dOs + ATT_BQ * DP;
    float* Vs = Ks + ATT_BK * DP;
    float* dSs = Vs + ATT_BK * DP;  // [query][key], 32×33
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATT_BQ;
    const int tid = threadIdx.x, qr = tid >> 2, q4 = tid & 3;
    const int qi = q0 + qr;
    const int off = Tk - Tq;
    const float sl2 = scale * LOG2E;
    for (int idx = tid; idx < ATT_BQ * D; idx += ATT_THREADS) {
        const int rr = idx / D, d = idx % D;
        const bool ok = q0 + rr < Tq;
        Qs[rr * DP + d] = ok ? q[at(qv, b, h, q0 + rr) + d] : 0.0f;
        dOs[rr * DP + d] = ok ? dout[at(dov, b, h, q0 + rr) + d] : 0.0f;
    }
    const long long li = ((long long)b * H + h) * Tq + qi;
    const float L = qi < Tq ? lse[li] * LOG2E : KILN_NEG_INF;
    const float Dl = qi < Tq ? delta[li] : 0.0f;
    float adq[DMAX / 4];
    KILN_UNROLL
    for (int c = 0; c < DMAX / 4; ++c) adq[c] = 0.0f;
    const int q_last = min(q0 + ATT_BQ, Tq) - 1;
    const int k_end = causal ? max(0, min(Tk, q_last + off + 1)) : Tk;
    for (int k0 = 0; k0 < k_end; k0 += ATT_BK) {
        __syncthreads();
        for (int idx = tid; idx < ATT_BK * D; idx += ATT_THREADS) {
            const int j = idx / D, d = idx % D;
            const bool ok = k0 + j < Tk;
            Ks[j * DP + d] = ok ? k[at(kv, b, h, k0 + j) + d] : 0.0f;
            Vs[j * DP + d] = ok ? v[at(vv, b, h, k0 + j) + d] : 0.0f;
        }
        __syncthreads();
        KILN_UNROLL
        for (int jj = 0; jj < ATT_BK / 4; ++jj) {
            const int j = q4 + 4 * jj, kj = k0 + j;
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < D; ++d) {
                s = fmaf(Qs[qr * DP + d], Ks[j * DP + d], s);
                dp = fmaf(dOs[qr * DP + d], Vs[j * DP + d], dp);
            }
            const bool ok = qi < Tq && kj < Tk && (!causal || kj <= qi + off) && L != KILN_NEG_INF;
            const float p = ok ? exp2f(s * sl2 - L) : 0.0f;
            dSs[qr * 33 + j] = p * (dp - Dl);
        }
        __syncwarp();  // the row of dS (written by its quad) is visible to the quad
        KILN_UNROLL
        for (int c = 0; c < DMAX / 4; ++c) {
            const int d = c * 4 + q4;
            if (d < D) {
                float a = adq[c];
                for (int j = 0; j < ATT_BK; ++j) a = fmaf(dSs[qr * 33 + j], Ks[j * DP + d], a);
                adq[c] = a;
            }
        }
    }
    if (qi < Tq) {
        float* row = dq + at(dqv, b, h, qi);
        KILN_UNROLL
        for (int c = 0; c < DMAX / 4; ++c) {
            const int d = c * 4 + q4;
            if (d < D) row[d] = scale * adq[c];
        }
    }
}

#define ATT_BWD_COMMON \
    const float *q, View qv, const float *k, View kv, const float *v, View vv, const float *dout, View dov, const float *lse, const float *delta
extern "C" __global__ void __launch_bounds__(128)
    attn_bwd_dkdv_f32_d64(ATT_BWD_COMMON, float* dk, View dkv, float* dv, View dvv, int H, int Tq, int Tk, int D,
                          float scale, int causal) {
    attn_bwd_dkdv_kernel<64>(q, qv, k, kv, v, vv, dout, dov, lse, delta, dk, dkv, dv, dvv, H, Tq, Tk, D, scale, causal);
}
extern "C" __global__ void __launch_bounds__(128)
    attn_bwd_dkdv_f32_d128(ATT_BWD_COMMON, float* dk, View dkv, float* dv, View dvv, int H, int Tq, int Tk, int D,
                           float scale, int causal) {
    attn_bwd_dkdv_kernel<128>(q, qv, k, kv, v, vv, dout, dov, lse, delta, dk, dkv, dv, dvv, H, Tq, Tk, D, scale, causal);
}
extern "C" __global__ void __launch_bounds__(128)
    attn_bwd_dq_f32_d64(ATT_BWD_COMMON, float* dq, View dqv, int H, int Tq, int Tk, int D, float scale, int causal) {
    attn_bwd_dq_kernel<64>(q, qv, k, kv, v, vv, dout, dov, lse, delta, dq, dqv, H, Tq, Tk, D, scale, causal);
}
extern "C" __global__ void __launch_bounds__(128)
    attn_bwd_dq_f32_d128(ATT_BWD_COMMON, float* dq, View dqv, int H, int Tq, int Tk, int D, float scale, int causal) {
    attn_bwd_dq_kernel<128>(q, qv, k, kv, v, vv, dout, dov, lse, delta, dq, dqv, H, Tq, Tk, D, scale, causal);
}

// ---- KV cache ------------------------------------------------------------------------------------
// cache[s, h, pos + t, :] = src[s, h, t, :] (converted to the cache's type), for a cache laid out
// [sequences, heads, capacity, head_dim]; one block per (s, h, t) row.
template <class T>
__device__ __forceinline__ void kv_append_kernel(const float* src, View sv, T* cache, int H, int Tn, int capacity,
                                                 int D, int pos) {
    const int row = blockIdx.x;
    const int t = row % Tn, sh = row / Tn, h = sh % H, s = sh / H;
    const float* in = src + at(sv, s, h, t);
    T* out = cache + (((long long)s * H + h) * capacity + pos + t) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[d] = from_f32<T>(in[d]);
}
extern "C" __global__ void kv_append_f32(const float* src, View sv, float* cache, int H, int Tn, int capacity, int D,
                                         int pos) {
    kv_append_kernel(src, sv, cache, H, Tn, capacity, D, pos);
}
extern "C" __global__ void kv_append_bf16(const float* src, View sv, bf16_t* cache, int H, int Tn, int capacity, int D,
                                          int pos) {
    kv_append_kernel(src, sv, cache, H, Tn, capacity, D, pos);
}
extern "C" __global__ void kv_append_f16(const float* src, View sv, f16_t* cache, int H, int Tn, int capacity, int D,
                                         int pos) {
    kv_append_kernel(src, sv, cache, H, Tn, capacity, D, pos);
}

// ---- decode ----------------------------------------------------------------------------------------
// One query per (sequence s, head h): o = softmax(scale·q·K[:len]ᵀ)·V[:len] over the cache
// [S, H, capacity, D]; len = lens[s] when `lens` is given, else `len`. grid (H, S), 128 threads.
#define DEC_WARPS 4
#define DEC_KEYS 4
// The block's work, given its query row qr, its head's keys kc and values vc ([n, D] rows of
// D elements) and its output row orow.
template <int DMAX, class T>
__device__ __forceinline__ void attn_decode_core(const float* qr, const T* kc, const T* vc, float* orow, int n, int D,
                                                 float scale) {
    __shared__ float wm[DEC_WARPS], wl[DEC_WARPS];
    __shared__ float wo[DEC_WARPS][DMAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float qs = scale * LOG2E;
    float qreg[DMAX / 32], acc[DMAX / 32];
    KILN_UNROLL
    for (int c = 0; c < DMAX / 32; ++c) {
        const int d = c * 32 + lane;
        qreg[c] = d < D ? qr[d] * qs : 0.0f;
        acc[c] = 0.0f;
    }
    float m = KILN_NEG_INF, l = 0.0f;
    for (int t0 = warp * DEC_KEYS; t0 < n; t0 += DEC_WARPS * DEC_KEYS) {
        float sc[DEC_KEYS];
        KILN_UNROLL
        for (int u = 0; u < DEC_KEYS; ++u) {
            const int t = t0 + u;
            float dot = 0.0f;
            if (t < n) {
                const T* kr = kc + (long long)t * D;
                KILN_UNROLL
                for (int c = 0; c < DMAX / 32; ++c) {
                    const int d = c * 32 + lane;
                    if (d < D) dot = fmaf(qreg[c], to_f32(kr[d]), dot);
                }
            }
            sc[u] = dot;
        }
        KILN_UNROLL
        for (int u = 0; u < DEC_KEYS; ++u) sc[u] = warp_sum(sc[u]);
        float mx = m;
        KILN_UNROLL
        for (int u = 0; u < DEC_KEYS; ++u)
            if (t0 + u < n) mx = fmaxf(mx, sc[u]);
        const float corr = exp2f(m - mx);  // m = −inf the first time: corr = 0, acc and l are 0
        l *= corr;
        KILN_UNROLL
        for (int c = 0; c < DMAX / 32; ++c) acc[c] *= corr;
        KILN_UNROLL
        for (int u = 0; u < DEC_KEYS; ++u) {
            const int t = t0 + u;
            if (t < n) {
                const float p = exp2f(sc[u] - mx);
                l += p;
                const T* vr = vc + (long long)t * D;
                KILN_UNROLL
                for (int c = 0; c < DMAX / 32; ++c) {
                    const int d = c * 32 + lane;
                    if (d < D) acc[c] = fmaf(p, to_f32(vr[d]), acc[c]);
                }
            }
        }
        m = mx;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
    KILN_UNROLL
    for (int c = 0; c < DMAX / 32; ++c) wo[warp][c * 32 + lane] = acc[c];
    __syncthreads();
    // Merge the warps in order: M = max m_w, L = Σ l_w·2^(m_w − M), O = Σ o_w·2^(m_w − M) / L.
    float M = KILN_NEG_INF;
    for (int w = 0; w < DEC_WARPS; ++w) M = fmaxf(M, wm[w]);
    float L = 0.0f;
    for (int w = 0; w < DEC_WARPS; ++w) L += wm[w] == KILN_NEG_INF ? 0.0f : wl[w] * exp2f(wm[w] - M);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc_d = 0.0f;
        for (int w = 0; w < DEC_WARPS; ++w)
            if (wm[w] != KILN_NEG_INF) acc_d += wo[w][d] * exp2f(wm[w] - M);
        orow[d] = L > 0.0f ? acc_d / L : 0.0f;
    }
}

template <int DMAX, class T>
__device__ __forceinline__ void attn_decode_kernel(const float* q, View qv, const T* kc, const T* vc, float* o, View ov,
                                                   const int* lens, int len, int H, int capacity, int D, float scale) {
    const int h = blockIdx.x, s = blockIdx.y;
    const int n = lens ? lens[s] : len;
    const long long base = ((long long)s * H + h) * capacity * D;
    attn_decode_core<DMAX, T>(q + at(qv, s, h, 0), kc + base, vc + base, o + at(ov, s, h, 0), n, D, scale);
}

#define ATT_DEC_PARAMS(T) \
    const float *q, View qv, const T *kc, const T *vc, float *o, View ov, const int *lens, int len, int H, int capacity, int D, float scale
#define ATT_DEC_ARGS q, qv, kc, vc, o, ov, lens, len, H, capacity, D, scale
extern "C" __global__ void __launch_bounds__(128) attn_decode_d64_f32(ATT_DEC_PARAMS(float)) {
    attn_decode_kernel<64, float>(ATT_DEC_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_decode_d128_f32(ATT_DEC_PARAMS(float)) {
    attn_decode_kernel<128, float>(ATT_DEC_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_decode_d64_bf16(ATT_DEC_PARAMS(bf16_t)) {
    attn_decode_kernel<64, bf16_t>(ATT_DEC_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_decode_d128_bf16(ATT_DEC_PARAMS(bf16_t)) {
    attn_decode_kernel<128, bf16_t>(ATT_DEC_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_decode_d64_f16(ATT_DEC_PARAMS(f16_t)) {
    attn_decode_kernel<64, f16_t>(ATT_DEC_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_decode_d128_f16(ATT_DEC_PARAMS(f16_t)) {
    attn_decode_kernel<128, f16_t>(ATT_DEC_ARGS);
}

// ---- batched decode over separate caches ------------------------------------------------------------
// One decode step of S ≤ DEC_BATCH_MAX sequences whose caches are separate allocations (each
// sequence's own KV cache [H, capacity, D] per layer): the caches' addresses and lengths come
// in the kernel's parameters (DecodeBatch, by value: no copy to the device), so the whole step
// is one launch. Block (h, s) first appends the sequence's new key and value (columns C + h·D
// and 2C + h·D of its row of the fused qkv [S, 3C]) at position len[s] − 1 of its caches, then
// (after a barrier: the block reads what it wrote) attends from the query (columns h·D) over
// positions 0 .. len[s] − 1, writing out[s, h·D ..] ([S, C]). grid (H, S), 128 threads.
#define DEC_BATCH_MAX 32
struct DecodeBatch {
    unsigned long long k[DEC_BATCH_MAX];  // element 0 of sequence s's key cache [H, cap[s], D]
    unsigned long long v[DEC_BATCH_MAX];  // and of its value cache
    int len[DEC_BATCH_MAX];               // positions after the append (≥ 1)
    int cap[DEC_BATCH_MAX];               // the cache's capacity (positions per head)
};

template <int DMAX, class T>
__device__ __forceinline__ void attn_decode_batch_kernel(const float* qkv, DecodeBatch tab, float* o, int H, int D,
                                                         float scale) {
    const int h = blockIdx.x, s = blockIdx.y;
    const int C = H * D, n = tab.len[s], capacity = tab.cap[s];
    T* kc = reinterpret_cast<T*>(tab.k[s]) + (long long)h * capacity * D;
    T* vc = reinterpret_cast<T*>(tab.v[s]) + (long long)h * capacity * D;
    const float* row = qkv + (long long)s * 3 * C;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        kc[(long long)(n - 1) * D + d] = from_f32<T>(row[C + h * D + d]);
        vc[(long long)(n - 1) * D + d] = from_f32<T>(row[2 * C + h * D + d]);
    }
    __syncthreads();  // the new key and value are read below by other threads of the block
    attn_decode_core<DMAX, T>(row + h * D, kc, vc, o + (long long)s * C + h * D, n, D, scale);
}

#define ATT_DECB_PARAMS(T) const float *qkv, DecodeBatch tab, float *o, int H, int D, float scale
#define ATT_DECB_ARGS qkv, tab, o, H, D, scale
extern "C" __global__ void __launch_bounds__(128) attn_decode_batch_d64_f32(ATT_DECB_PARAMS(float)) {
    attn_decode_batch_kernel<64, float>(ATT_DECB_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_decode_batch_d128_f32(ATT_DECB_PARAMS(float)) {
    attn_decode_batch_kernel<128, float>(ATT_DECB_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_decode_batch_d64_bf16(ATT_DECB_PARAMS(bf16_t)) {
    attn_decode_batch_kernel<64, bf16_t>(ATT_DECB_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_decode_batch_d128_bf16(ATT_DECB_PARAMS(bf16_t)) {
    attn_decode_batch_kernel<128, bf16_t>(ATT_DECB_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_decode_batch_d64_f16(ATT_DECB_PARAMS(f16_t)) {
    attn_decode_batch_kernel<64, f16_t>(ATT_DECB_ARGS);
}
extern "C" __global__ void __launch_bounds__(128) attn_decode_batch_d128_f16(ATT_DECB_PARAMS(f16_t)) {
    attn_decode_batch_kernel<128, f16_t>(ATT_DECB_ARGS);
}
