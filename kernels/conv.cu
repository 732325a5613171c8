// kernels/conv.cu — 2-D convolution and transposed convolution, forward and backward, NCHW, as
// implicit GEMMs (the patch matrix is gathered tile by tile, never stored).
//
// Geometry (kiln-cpu's conv::ConvGeometry): the image side `big` [N, Cb, Hb, Wb] (a conv's
// input, a transposed conv's output), the patch side `small` [N, Cs, Hs, Ws] (a conv's output,
// a transposed conv's input), the weight [Cs, Cb/G, kh, kw] (PyTorch's layout for both:
// [C_out, C_in/G, kh, kw] for Conv2d, [C_in, C_out/G, kh, kw] for ConvTranspose2d). Patch pixel
// (oy, ox) and tap (ki, kj) read image pixel (oy·sh − ph + ki·dh, ox·sw − pw + kj·dw).
// Three kernels cover the six directions (per group g, Cbg = Cb/G, Csg = Cs/G):
//   conv_correlate:   small[n, g·Csg + o, p] = Σ_{c,ki,kj} W[g·Csg + o, c, ki, kj]·big[n, g·Cbg + c, map(p)] (+ bias)
//                     — conv forward, transposed-conv input gradient;
//                     GEMM M = Csg, N = N·Hs·Ws, K = Cbg·kh·kw.
//   conv_scatter:     big[n, g·Cbg + c, y, x] = Σ_{o,ki,kj} W[g·Csg + o, c, ki, kj]·small[n, g·Csg + o, oy, ox]
//                     over the taps whose map hits (y, x) (oy = (y + ph − ki·dh)/sh when that
//                     divides, likewise ox) (+ bias) — conv input gradient, transposed-conv
//                     forward; the gather form of col2im: every output element is computed by
//                     one thread, no atomics. GEMM M = Cbg, N = N·Hb·Wb, K = Csg·kh·kw.
//   conv_weight_grad: dW[g·Csg + o, c, ki, kj] = Σ_{n,oy,ox} small[n, g·Csg + o, oy, ox]·big[n, g·Cbg + c, map]
//                     — the weight gradient of both (with `small` the output gradient of a conv,
//                     or the input of a transposed conv); GEMM M = Csg, N = Cbg·kh·kw,
//                     K = N·Hs·Ws, split into fixed slices of the reduction written to
//                     partial[slice] and added in slice order by conv_sum_slices
//                     (deterministic).
// Bias gradients are channel sums (reduce.cu).
//
// Tiling (all three): a block computes a 64×64 tile of the GEMM with 256 threads, stepping
// K by 16; each step, every thread gathers 4 elements of A and 4 of B (zero outside the
// image or the matrix) into registers, while the block multiplies the previous step's tiles
// from shared memory (double-buffered); thread (ty, tx) = (tid/16, tid%16) owns the 4×4
// outputs at rows ty·4.., columns tx·4... Consecutive threads take consecutive pixels, so the
// image reads are coalesced along a row. blockIdx.z is the group (and, for the weight
// gradient, the reduction slice).
// Roofline: 2·N·Cs·Hs·Ws·Cbg·kh·kw FLOPs per direction over the image, the patch side and the
// weight: compute-bound for DCGAN's layers; the transposed forward (gather form) also spends
// FMAs on taps that miss (about 3/4 for stride 2, kernel 4).
#include "common.cuh"

#define CV_BM 64
#define CV_BN 64
#define CV_BK 16
#define CV_PAD 4
#define CV_THREADS 256

struct ConvGeom {
    int N, Cb, Hb, Wb, Cs, Hs, Ws, kh, kw, sh, sw, ph, pw, dh, dw, G;
};

// C[M, N] = A·B for one group: loadA(i, p), loadB(p, j) give elements (already zero outside
// the image), store(i, j, value) writes one result. Each thread stages 4 of A and 4 of B per step.
template <class FA, class FB, class FS>
__device__ __forceinline__ void implicit_gemm(int M, int N, int K, int m0, int n0, FA loadA, FB loadB, FS store) {
    __shared__ __align__(16) float As[2][CV_BK][CV_BM + CV_PAD];
    __shared__ __align__(16) float Bs[2][CV_BK][CV_BN + CV_PAD];
    const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
    const int a_i = tid / 4, a_p = (tid % 4) * 4;
    const int b_j = tid % 64, b_p = (tid / 64) * 4;
    float ra[4], rb[4];
    auto load = [&](int k0) {
        KILN_UNROLL
        for (int q = 0; q < 4; ++q) {
            const int pa = k0 + a_p + q, pb = k0 + b_p + q;
            ra[q] = (m0 + a_i < M && pa < K) ? loadA(m0 + a_i, pa) : 0.0f;
            rb[q] = (n0 + b_j < N && pb < K) ? loadB(pb, n0 + b_j) : 0.0f;
        }
    };
    auto stage = [&](int buf) {
        KILN_UNROLL
        for (int q = 0; q < 4; ++q) {
            As[buf][a_p + q][a_i] = ra[q];
            Bs[buf][b_p + q][b_j] = rb[q];
        }
    };
    float acc[4][4];
    KILN_UNROLL
    for (int i = 0; i < 4; ++i)
        KILN_UNROLL
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    const int ktiles = (K + CV_BK - 1) / CV_BK;
    load(0);
    stage(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
        const int buf = kt & 1;
        if (kt + 1 < ktiles) load((kt + 1) * CV_BK);
        KILN_UNROLL
        for (int kk = 0; kk < CV_BK; ++kk) {
            const float4 a = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
            const float4 b = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4]);
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
            KILN_UNROLL
            for (int i = 0; i < 4; ++i)
                KILN_UNROLL
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        if (kt + 1 < ktiles) stage(buf ^ 1);
        __syncthreads();
    }
    KILN_UNROLL
    for (int i = 0; i < 4; ++i) {
        KILN_UNROLL
        for (int j = 0; j < 4; ++j) {
            const int r = m0 + ty * 4 + i, c = n0 + tx * 4 + j;
            if (r < M && c < N) store(r, c, acc[i][j]);
        }
    }
}

// grid: (pixel tiles of 64, out-channel tiles of 64, groups)
template <class TW>
__device__ __forceinline__ void correlate_kernel(const float* big, const TW* w, const float* bias, float* small,
                                                 ConvGeom g) {
    const int grp = blockIdx.z;
    const int Cbg = g.Cb / g.G, Csg = g.Cs / g.G, taps = g.kh * g.kw, Kg = Cbg * taps;
    const int shw = g.Hs * g.Ws;
    const int M = Csg, N = g.N * shw, K = Kg;
    const TW* wg = w + (long long)grp * Csg * Kg;
    auto loadA = [&](int i, int p) { return to_f32(wg[(long long)i * Kg + p]); };
    auto loadB = [&](int p, int j) {
        const int n = j / shw, pix = j % shw, oy = pix / g.Ws, ox = pix % g.Ws;
        const int c = p / taps, t = p % taps, ki = t / g.kw, kj = t % g.kw;
        const int iy = oy * g.sh - g.ph + ki * g.dh, ix = ox * g.sw - g.pw + kj * g.dw;
        if (iy < 0 || iy >= g.Hb || ix < 0 || ix >= g.Wb) return 0.0f;
        return big[(((long long)n * g.Cb + grp * Cbg + c) * g.Hb + iy) * g.Wb + ix];
    };
    auto store = [&](int i, int j, float v) {
        const int n = j / shw, pix = j % shw, o = grp * Csg + i;
        small[((long long)n * g.Cs + o) * shw + pix] = v + (bias ? bias[o] : 0.0f);
    };
    implicit_gemm(M, N, K, blockIdx.y * CV_BM, blockIdx.x * CV_BN, loadA, loadB, store);
}

// grid: (pixel tiles of 64 over the image side, image-channel tiles of 64, groups)
template <class TW>
__device__ __forceinline__ void scatter_kernel(const float* small, const TW* w, const float* bias, float* big,
                                               ConvGeom g) {
    const int grp = blockIdx.z;
    const int Cbg = g.Cb / g.G, Csg = g.Cs / g.G, taps = g.kh * g.kw;
    const int bhw = g.Hb * g.Wb;
    const int M = Cbg, N = g.N * bhw, K = Csg * taps;
    auto loadA = [&](int c, int p) {
        const int o = p / taps, t = p % taps;
        return to_f32(w[(((long long)grp * Csg + o) * Cbg + c) * taps + t]);
    };
    auto loadB = [&](int p, int j) {
        const int n = j / bhw, pix = j % bhw, y = pix / g.Wb, x = pix % g.Wb;
        const int o = p / taps, t = p % taps, ki = t / g.kw, kj = t % g.kw;
        const int ny = y + g.ph - ki * g.dh, nx = x + g.pw - kj * g.dw;
        if (ny < 0 || nx < 0 || ny % g.sh != 0 || nx % g.sw != 0) return 0.0f;
        const int oy = ny / g.sh, ox = nx / g.sw;
        if (oy >= g.Hs || ox >= g.Ws) return 0.0f;
        return small[(((long long)n * g.Cs + grp * Csg + o) * g.Hs + oy) * g.Ws + ox];
    };
    auto store = [&](int c, int j, float v) {
        const int n = j / bhw, pix = j % bhw, ch = grp * Cbg + c;
        big[((long long)n * g.Cb + ch) * bhw + pix] = v + (bias ? bias[ch] : 0.0f);
    };
    implicit_gemm(M, N, K, blockIdx.y * CV_BM, blockIdx.x * CV_BN, loadA, loadB, store);
}

// grid: (tap-column tiles of 64 over Cbg·kh·kw, patch-channel tiles of 64, groups × slices)
// Slice s reduces over r in [s·rchunk, (s + 1)·rchunk) of r = (n, oy, ox) and writes
// out[s][Cs][Cbg·kh·kw] (out is dw itself when there is one slice).
extern "C" __global__ void __launch_bounds__(256)
    conv_weight_grad(const float* big, const float* small, float* out, ConvGeom g, int slices, int rchunk) {
    const int grp = blockIdx.z / slices, slice = blockIdx.z % slices;
    const int Cbg = g.Cb / g.G, Csg = g.Cs / g.G, taps = g.kh * g.kw, Kg = Cbg * taps;
    const int shw = g.Hs * g.Ws, R = g.N * shw;
    const int r0 = slice * rchunk, r1 = min(R, r0 + rchunk);
    const int M = Csg, N = Kg, K = r1 - r0;
    auto loadA = [&](int i, int p) {
        const int r = r0 + p, n = r / shw, pix = r % shw;
        return small[((long long)n * g.Cs + grp * Csg + i) * shw + pix];
    };
    auto loadB = [&](int p, int j) {
        const int r = r0 + p, n = r / shw, pix = r % shw, oy = pix / g.Ws, ox = pix % g.Ws;
        const int c = j / taps, t = j % taps, ki = t / g.kw, kj = t % g.kw;
        const int iy = oy * g.sh - g.ph + ki * g.dh, ix = ox * g.sw - g.pw + kj * g.dw;
        if (iy < 0 || iy >= g.Hb || ix < 0 || ix >= g.Wb) return 0.0f;
        return big[(((long long)n * g.Cb + grp * Cbg + c) * g.Hb + iy) * g.Wb + ix];
    };
    float* o = out + (long long)slice * g.Cs * Kg;
    auto store = [&](int i, int j, float v) { o[((long long)grp * Csg + i) * Kg + j] = v; };
    implicit_gemm(M, N, K, blockIdx.y * CV_BM, blockIdx.x * CV_BN, loadA, loadB, store);
}

// dw[i] = Σ_s partial[s·n + i], slices in order.
extern "C" __global__ void conv_sum_slices(const float* partial, int slices, long long n, float* dw) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int k = 0; k < slices; ++k) s += partial[(long long)k * n + i];
        dw[i] = s;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    conv_correlate_f32(const float* big, const float* w, const float* bias, float* small, ConvGeom g) {
    correlate_kernel(big, w, bias, small, g);
}
extern "C" __global__ void __launch_bounds__(256)
    conv_correlate_bf16(const float* big, const bf16_t* w, const float* bias, float* small, ConvGeom g) {
    correlate_kernel(big, w, bias, small, g);
}
extern "C" __global__ void __launch_bounds__(256)
    conv_correlate_f16(const float* big, const f16_t* w, const float* bias, float* small, ConvGeom g) {
    correlate_kernel(big, w, bias, small, g);
}
extern "C" __global__ void __launch_bounds__(256)
    conv_scatter_f32(const float* small, const float* w, const float* bias, float* big, ConvGeom g) {
    scatter_kernel(small, w, bias, big, g);
}
extern "C" __global__ void __launch_bounds__(256)
    conv_scatter_bf16(const float* small, const bf16_t* w, const float* bias, float* big, ConvGeom g) {
    scatter_kernel(small, w, bias, big, g);
}
extern "C" __global__ void __launch_bounds__(256)
    conv_scatter_f16(const float* small, const f16_t* w, const float* bias, float* big, ConvGeom g) {
    scatter_kernel(small, w, bias, big, g);
}
