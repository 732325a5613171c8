// kernels/probe.cu — small kernels that check the launch path and the CPU emulator itself:
// thread and block indexing, reductions, warp shuffles, and two deliberately broken kernels (a
// missing barrier, a barrier not every thread reaches) that the emulator must catch.
#include "common.cuh"

// out[b·blockDim + t] = 1000·b + t, for a 1-D grid of 1-D blocks.
extern "C" __global__ void probe_index(int* out) {
    out[blockIdx.x * blockDim.x + threadIdx.x] = (int)(1000 * blockIdx.x + threadIdx.x);
}

// out[b] = Σ x[b·blockDim .. (b+1)·blockDim) (block_sum), out_max[b] = max of the same.
extern "C" __global__ void probe_block_reduce(const float* x, float* out, float* out_max) {
    __shared__ float scratch[32];
    const float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    const float s = block_sum(v, scratch);
    const float m = block_max(v, scratch);
    if (threadIdx.x == 0) {
        out[blockIdx.x] = s;
        out_max[blockIdx.x] = m;
    }
}

// out[t] = x[t ^ 5] (a butterfly shuffle), one warp.
extern "C" __global__ void probe_shuffle(const float* x, float* out) {
    out[threadIdx.x] = __shfl_xor_sync(KILN_FULL_MASK, x[threadIdx.x], 5);
}

// Reverses a block through shared memory WITHOUT the barrier between the write and the read:
// the emulator must produce wrong output in at least one thread order.
extern "C" __global__ void probe_missing_barrier(const float* x, float* out) {
    KILN_DYNAMIC_SMEM(float, s);
    s[threadIdx.x] = x[threadIdx.x];
    out[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

// The same with the barrier: correct in every order.
extern "C" __global__ void probe_reverse(const float* x, float* out) {
    KILN_DYNAMIC_SMEM(float, s);
    s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

// Thread 0 leaves before a barrier the others wait at: the emulator must report it.
extern "C" __global__ void probe_divergent_barrier(float* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
