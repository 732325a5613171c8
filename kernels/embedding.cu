// kernels/embedding.cu — GPT-2's token + position embedding, forward and backward.
//
// Forward: out[n, :] = wte[ids[n], :] + wpe[pos_start + n mod seq, :] for n in [0, n_tokens)
// (n_tokens = batch·seq), tables in f32, bf16 or f16, out f32. One block per token, threads
// over the dim. An id outside [0, vocab) writes a NaN row (the host validates ids it uploads).
//
// Backward (deterministic, no atomics, no sort): dwte[ids[n], :] += dout[n, :] and
// dwpe[pos_start + n mod seq, :] += dout[n, :], every table row receiving its tokens in token
// order (the order of kiln-cpu's sequential loop, so results match it bitwise).
// embedding_backward_wte: each block OWNS the table rows [r0, r0 + EMB_ROWS); it scans all ids
// in chunks of blockDim, compacts the chunk's tokens that hit its rows in token order (warp
// ballots and a prefix over the warps' counts in shared memory), then adds those tokens' rows of
// dout to their table rows, threads striding over the dim. Every table row is written by
// exactly one block. Cost: each block reads all ids (4 bytes × n_tokens, from L2).
// embedding_backward_wpe: one block per position t, summing the batch's tokens at t in order.
//
// Gather (embedding_gather_*): out[n, :] = wte[ids[n], :] + wpe[pos[n], :] with a position per
// token (a batched decode step: every sequence at its own position); one block per token. The
// two tables may have different dtypes (TW, TP in the name) and any strides: element (r, c) of
// a table at r·rs + c·cs (row-major: rs = dim, cs = 1; a token table kept as its transpose
// [dim, vocab] for the output projection: rs = 1, cs = vocab). The host checks ids and
// positions.
#include "common.cuh"

#define EMB_ROWS 64

template <class T>
__device__ __forceinline__ void embedding_forward_impl(const int* ids, const T* wte, const T* wpe, float* out,
                                                       int n_tokens, int seq, int pos_start, int dim, int vocab) {
    const int n = blockIdx.x;
    const int id = ids[n];
    const long long p = pos_start + n % seq;
    float* o = out + (long long)n * dim;
    const bool ok = id >= 0 && id < vocab;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        o[c] = ok ? to_f32(wte[(long long)id * dim + c]) + to_f32(wpe[p * dim + c]) : KILN_INF - KILN_INF;
    }
}

extern "C" __global__ void embedding_forward_f32(const int* ids, const float* wte, const float* wpe, float* out,
                                                 int n_tokens, int seq, int pos_start, int dim, int vocab) {
    embedding_forward_impl(ids, wte, wpe, out, n_tokens, seq, pos_start, dim, vocab);
}
extern "C" __global__ void embedding_forward_bf16(const int* ids, const bf16_t* wte, const bf16_t* wpe, float* out,
                                                  int n_tokens, int seq, int pos_start, int dim, int vocab) {
    embedding_forward_impl(ids, wte, wpe, out, n_tokens, seq, pos_start, dim, vocab);
}
extern "C" __global__ void embedding_forward_f16(const int* ids, const f16_t* wte, const f16_t* wpe, float* out,
                                                 int n_tokens, int seq, int pos_start, int dim, int vocab) {
    embedding_forward_impl(ids, wte, wpe, out, n_tokens, seq, pos_start, dim, vocab);
}

// blockDim.x: a multiple of 32, at most 1024.
extern "C" __global__ void embedding_backward_wte(const int* ids, const float* dout, float* dwte, int n_tokens,
                                                  int vocab, int dim) {
    __shared__ int hits[1024];
    __shared__ int warp_counts[32];
    const int r0 = blockIdx.x * EMB_ROWS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int base = 0; base < n_tokens; base += blockDim.x) {
        const int n = base + threadIdx.x;
        const int id = n < n_tokens ? ids[n] : -1;
        const bool hit = id >= r0 && id < r0 + EMB_ROWS && id < vocab;
        const unsigned ballot = __ballot_sync(KILN_FULL_MASK, hit);
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < warps; ++w) {
            before += w < warp ? warp_counts[w] : 0;
            total += warp_counts[w];
        }
        if (hit) hits[before + __popc(ballot & ((1u << lane) - 1u))] = n;
        __syncthreads();
        for (int k = 0; k < total; ++k) {
            const int tok = hits[k];
            const long long row = ids[tok];
            for (int c = threadIdx.x; c < dim; c += blockDim.x) dwte[row * dim + c] += dout[(long long)tok * dim + c];
        }
        __syncthreads();  // `hits` and `warp_counts` are rewritten by the next chunk
    }
}

extern "C" __global__ void embedding_backward_wpe(const float* dout, float* dwpe, int n_tokens, int seq, int pos_start,
                                                  int dim) {
    const int t = blockIdx.x;
    const int batch = n_tokens / seq;
    float* w = dwpe + (long long)(pos_start + t) * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float acc = w[c];
        for (int b = 0; b < batch; ++b) acc += dout[((long long)b * seq + t) * dim + c];
        w[c] = acc;
    }
}

template <class TW, class TP>
__device__ __forceinline__ void embedding_gather_impl(const int* ids, const int* pos, const TW* wte, long long wte_rs,
                                                      long long wte_cs, const TP* wpe, long long wpe_rs,
                                                      long long wpe_cs, float* out, int dim) {
    const int n = blockIdx.x;
    const TW* t = wte + (long long)ids[n] * wte_rs;
    const TP* p = wpe + (long long)pos[n] * wpe_rs;
    float* o = out + (long long)n * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) o[c] = to_f32(t[c * wte_cs]) + to_f32(p[c * wpe_cs]);
}
// The parameters of every embedding_gather_* instance (TW: the token table's element type, TP:
// the position table's); each instance is spelled out so that its name stays searchable.
#define GATHER_PARAMS(TW, TP)                                                                         \
    const int* ids, const int* pos, const TW* wte, long long wte_rs, long long wte_cs, const TP* wpe, \
        long long wpe_rs, long long wpe_cs, float* out, int dim
#define GATHER_ARGS ids, pos, wte, wte_rs, wte_cs, wpe, wpe_rs, wpe_cs, out, dim
extern "C" __global__ void embedding_gather_f32_f32(GATHER_PARAMS(float, float)) { embedding_gather_impl(GATHER_ARGS); }
extern "C" __global__ void embedding_gather_f32_bf16(GATHER_PARAMS(float, bf16_t)) { embedding_gather_impl(GATHER_ARGS); }
extern "C" __global__ void embedding_gather_f32_f16(GATHER_PARAMS(float, f16_t)) { embedding_gather_impl(GATHER_ARGS); }
extern "C" __global__ void embedding_gather_bf16_f32(GATHER_PARAMS(bf16_t, float)) { embedding_gather_impl(GATHER_ARGS); }
extern "C" __global__ void embedding_gather_bf16_bf16(GATHER_PARAMS(bf16_t, bf16_t)) { embedding_gather_impl(GATHER_ARGS); }
extern "C" __global__ void embedding_gather_bf16_f16(GATHER_PARAMS(bf16_t, f16_t)) { embedding_gather_impl(GATHER_ARGS); }
extern "C" __global__ void embedding_gather_f16_f32(GATHER_PARAMS(f16_t, float)) { embedding_gather_impl(GATHER_ARGS); }
extern "C" __global__ void embedding_gather_f16_bf16(GATHER_PARAMS(f16_t, bf16_t)) { embedding_gather_impl(GATHER_ARGS); }
extern "C" __global__ void embedding_gather_f16_f16(GATHER_PARAMS(f16_t, f16_t)) { embedding_gather_impl(GATHER_ARGS); }
