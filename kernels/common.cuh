// kernels/common.cuh — included by every kernel file.
//
// * fixed-width integer types (NVRTC has no standard headers);
// * bf16_t / f16_t storage types and their conversions to and from f32 (round to nearest even);
// * warp and block reductions in a fixed order (results do not depend on timing);
// * thin wrappers around the PTX instructions the tensor-core kernels use (cp.async, ldmatrix,
//   mma.sync). On the GPU they are inline PTX; compiled as C++ for the CPU emulator
//   (emu/emu.h, where KILN_EMU is defined) they call the emulator's models of the same
//   instructions, so the kernels themselves are the same code in both places.
#pragma once

#ifndef KILN_EMU
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#endif

#define KILN_INF __uint_as_float(0x7f800000u)
#define KILN_NEG_INF __uint_as_float(0xff800000u)
#define KILN_FULL_MASK 0xffffffffu

// Fully unroll the next loop (its trip count is a compile-time constant): arrays indexed by its
// counter then live in registers, not in local memory.
#ifdef KILN_EMU
#define KILN_UNROLL
#else
#define KILN_UNROLL _Pragma("unroll")
#endif

// Dynamic shared memory of a kernel, as an array of T (16-byte aligned).
#ifdef KILN_EMU
#define KILN_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(kiln_emu::dynamic_smem())
#else
#define KILN_DYNAMIC_SMEM(T, name)                                    \
    extern __shared__ __align__(16) unsigned char kiln_dynamic_smem_[]; \
    T* name = reinterpret_cast<T*>(kiln_dynamic_smem_)
#endif

// ---- 16-bit floating-point storage ---------------------------------------------------------------
struct __align__(2) bf16_t {
    uint16_t bits;
};
struct __align__(2) f16_t {
    uint16_t bits;
};

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float((uint32_t)v.bits << 16); }
__device__ __forceinline__ float to_f32(f16_t v) {
#ifdef KILN_EMU
    return kiln_emu::f16_bits_to_f32(v.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#endif
}

// f32 -> bf16 bits, round to nearest even; NaN stays NaN (quiet).
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
__device__ __forceinline__ uint16_t f32_to_f16_bits(float f) {
#ifdef KILN_EMU
    return kiln_emu::f32_to_f16_bits(f);
#else
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

template <class T> struct FromF32;
template <> struct FromF32<float> {
    static __device__ __forceinline__ float conv(float v) { return v; }
};
template <> struct FromF32<bf16_t> {
    static __device__ __forceinline__ bf16_t conv(float v) {
        bf16_t r;
        r.bits = f32_to_bf16_bits(v);
        return r;
    }
};
template <> struct FromF32<f16_t> {
    static __device__ __forceinline__ f16_t conv(float v) {
        f16_t r;
        r.bits = f32_to_f16_bits(v);
        return r;
    }
};
template <class T> __device__ __forceinline__ T from_f32(float v) { return FromF32<T>::conv(v); }

// Two floats as one 32-bit pair of 16-bit values (`lo` in the low half), as mma operands hold them.
template <class T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<bf16_t>(float lo, float hi) {
#ifdef KILN_EMU
    return (uint32_t)f32_to_bf16_bits(lo) | ((uint32_t)f32_to_bf16_bits(hi) << 16);
#else
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}
template <> __device__ __forceinline__ uint32_t pack2<f16_t>(float lo, float hi) {
#ifdef KILN_EMU
    return (uint32_t)f32_to_f16_bits(lo) | ((uint32_t)f32_to_f16_bits(hi) << 16);
#else
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

// ---- reductions -------------------------------------------------------------------------------------
// Butterfly over the 32 lanes: every lane gets the same result, summed in the same order.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(KILN_FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(KILN_FULL_MASK, v, o));
    return v;
}
__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(KILN_FULL_MASK, v, o);
    return v;
}

// Sum over a 1-D block (blockDim.x a multiple of 32): every thread gets the result. `scratch`
// is 32 floats of shared memory; the leading barrier lets callers reuse it back to back.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? scratch[lane] : 0.0f);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_max(lane < warps ? scratch[lane] : KILN_NEG_INF);
}
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum_f64(lane < warps ? scratch[lane] : 0.0);
}

// ---- GELU (tanh approximation), as kiln-cpu's gelu_scalar / gelu_grad_scalar ---------------
#define KILN_S2PI 0.7978845608028654f
#define KILN_GELU_A 0.044715f
__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(KILN_S2PI * (x + KILN_GELU_A * x * x * x)));
}
__device__ __forceinline__ float gelu_tanh_grad(float x) {
    const float t = tanhf(KILN_S2PI * (x + KILN_GELU_A * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * KILN_S2PI * (1.0f + 3.0f * KILN_GELU_A * x * x);
}

// ---- PTX wrappers: asynchronous copies, ldmatrix, mma.sync --------------------------------------
#ifdef KILN_EMU
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    kiln_emu::cp_async(smem, gmem, 16, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { kiln_emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { kiln_emu::cp_async_wait(N); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) { kiln_emu::ldmatrix<4>(r, p, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { kiln_emu::ldmatrix<4>(r, p, true); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) { kiln_emu::ldmatrix<2>(r, p, false); }
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { kiln_emu::ldmatrix<2>(r, p, true); }
template <class T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <> __device__ __forceinline__ void mma_16816<bf16_t>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    kiln_emu::mma_16816(d, a, b, d, true);
}
template <> __device__ __forceinline__ void mma_16816<f16_t>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    kiln_emu::mma_16816(d, a, b, d, false);
}
#else
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
// 16 bytes global -> shared, bypassing L1; bytes past `src_bytes` (0..16) are zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(p)));
}
// d += a·b for one 16×8×16 tile (a: 16×16 row-major fragment, b: 16×8 column fragment).
template <class T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <> __device__ __forceinline__ void mma_16816<bf16_t>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma_16816<f16_t>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
