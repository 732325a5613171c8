// kernels/cast.cu — conversions between f32 and the 16-bit storage types (round to nearest
// even), e.g. activations to bf16 before a tensor-core product.
//
// Shapes: flat arrays of n elements; a grid-stride loop, one element per thread per step.
// Roofline: memory-bound (6 bytes per element).
#include "common.cuh"

#define GRID_STRIDE_LOOP(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

template <class S, class D> __device__ __forceinline__ void cast_loop(const S* x, D* y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = from_f32<D>(to_f32(x[i])); }
}

extern "C" __global__ void cast_f32_bf16(const float* x, bf16_t* y, long long n) { cast_loop(x, y, n); }
extern "C" __global__ void cast_f32_f16(const float* x, f16_t* y, long long n) { cast_loop(x, y, n); }
extern "C" __global__ void cast_bf16_f32(const bf16_t* x, float* y, long long n) { cast_loop(x, y, n); }
extern "C" __global__ void cast_f16_f32(const f16_t* x, float* y, long long n) { cast_loop(x, y, n); }
