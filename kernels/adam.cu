// kernels/adam.cu — one Adam / AdamW step over a parameter tensor, PyTorch's update order
// (kiln-nn's optim.rs):
//   Adam (L2):        g ← g + wd·θ
//   AdamW (decoupled): θ ← θ·(1 − lr·wd)
//   m ← m + (1 − β1)·(g − m)
//   v ← β2·v + (1 − β2)·g²
//   θ ← θ − step_size · m / (√v / bc2_sqrt + eps)
// with step_size = lr/(1 − β1ᵗ) and bc2_sqrt = √(1 − β2ᵗ) computed on the host in f64.
// Work: a grid-stride loop, one element per thread per step. Roofline: memory-bound
// (16 bytes read, 12 written per element).
#include "common.cuh"

extern "C" __global__ void adam_step(float* param, const float* grad, float* m, float* v, long long n, float step_size,
                                     float bc2_sqrt, float w1, float b2, float w2, float eps, float wd, float decay,
                                     int decoupled) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float p = param[i], g = grad[i];
        if (wd != 0.0f) {
            if (decoupled) {
                p *= decay;
            } else {
                g += wd * p;
            }
        }
        const float mi = m[i] + w1 * (g - m[i]);
        const float vi = b2 * v[i] + w2 * g * g;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        m[i] = mi;
        v[i] = vi;
        param[i] = p + -step_size * (mi / denom);
    }
}
