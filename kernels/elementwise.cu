// kernels/elementwise.cu — point-wise ops: GELU (tanh approximation), ReLU, LeakyReLU, Tanh,
// Sigmoid (forward and backward), residual add, fill, scale and dropout (the backend's ops).
//
// Shapes: flat arrays of n f32 elements. Work: a grid-stride loop, one element per thread per
// step (consecutive threads, consecutive elements: coalesced). Roofline: memory-bound, 8–12
// bytes moved per element for a handful of FLOPs; the target is the copy bandwidth.
// x and y may be the same buffer (in place): each element is read, then written, by one thread.
#include "common.cuh"

#define GRID_STRIDE_LOOP(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// y = gelu_tanh(x)
extern "C" __global__ void gelu_forward(const float* x, float* y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = gelu_tanh(x[i]); }
}

// dx += gelu_tanh'(x)·dy (accumulates, as kiln-cpu's gelu_backward)
extern "C" __global__ void gelu_backward(const float* x, const float* dy, float* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) { dx[i] += gelu_tanh_grad(x[i]) * dy[i]; }
}

// The activations of kiln-cpu's elementwise::activations, by kind.
#define ACT_RELU 0
#define ACT_LEAKY_RELU 1
#define ACT_TANH 2
#define ACT_SIGMOID 3

// y = f(x)
extern "C" __global__ void activation_forward(int kind, float slope, const float* x, float* y, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = x[i];
        float r;
        switch (kind) {
            case ACT_RELU: r = v > 0.0f ? v : 0.0f; break;
            case ACT_LEAKY_RELU: r = v > 0.0f ? v : slope * v; break;
            case ACT_TANH: r = tanhf(v); break;
            default: r = 1.0f / (1.0f + expf(-v)); break;
        }
        y[i] = r;
    }
}

// dx = dy·f'(x) from the forward OUTPUT y (overwrites, as kiln-cpu's activations::backward)
extern "C" __global__ void activation_backward(int kind, float slope, const float* y, const float* dy, float* dx,
                                               long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = y[i], g = dy[i];
        float r;
        switch (kind) {
            case ACT_RELU: r = v > 0.0f ? g : 0.0f; break;
            case ACT_LEAKY_RELU: r = v > 0.0f ? g : slope * g; break;
            case ACT_TANH: r = g * (1.0f - v * v); break;
            default: r = g * (v * (1.0f - v)); break;
        }
        dx[i] = r;
    }
}

// out = a + b (out may be a or b)
extern "C" __global__ void add(const float* a, const float* b, float* out, long long n) {
    GRID_STRIDE_LOOP(i, n) { out[i] = a[i] + b[i]; }
}

// y = alpha·x + beta·y
extern "C" __global__ void axpby(float alpha, const float* x, float beta, float* y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = alpha * x[i] + (beta == 0.0f ? 0.0f : beta * y[i]); }
}

// x = value (the backend's fill)
extern "C" __global__ void fill_f32(float* x, float value, long long n) {
    GRID_STRIDE_LOOP(i, n) { x[i] = value; }
}

// x *= s (the backend's scale; a plain product, so infinities and NaNs behave as on the CPU)
extern "C" __global__ void scale_f32(float* x, float s, long long n) {
    GRID_STRIDE_LOOP(i, n) { x[i] *= s; }
}

// Inverted dropout in place, the mask of kiln-nn's CPU backend bit for bit: element i is kept
// when the top 24 bits of mix64(seed ^ mix64(i)) are ≥ threshold (= p·2^24), and then scaled by
// `scale` (= 1/(1 − p), rounded to f32 on the host); otherwise zeroed. mix64 is splitmix64's
// finaliser.
__device__ __forceinline__ unsigned long long dropout_mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
extern "C" __global__ void dropout_f32(float* x, long long n, long long seed, long long threshold, float scale) {
    const unsigned long long s = (unsigned long long)seed, th = (unsigned long long)threshold;
    GRID_STRIDE_LOOP(i, n) {
        const unsigned long long h = dropout_mix64(s ^ dropout_mix64((unsigned long long)i)) >> 40;
        x[i] = h >= th ? x[i] * scale : 0.0f;
    }
}
