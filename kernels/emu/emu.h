// kernels/emu/emu.h — runs kiln's CUDA kernels on the CPU, for tests.
//
// A kernel file (`kernels/*.cu`) is compiled as C++ by g++ with this header included first.
// The header defines what CUDA provides (`__global__`, `threadIdx`, `__shared__`,
// `__syncthreads()`, warp shuffles, ...) and emulates one thread block at a time:
//
// * every CUDA thread of the block is a fiber (its own stack; entered once through
//   `makecontext`/`setcontext`, then switched with `_setjmp`/`_longjmp`) on the calling OS
//   thread; the fibers run one after another, each until it reaches a barrier or ends;
// * `__syncthreads()` waits until every thread of the block has arrived; warp-synchronous
//   operations (`__shfl_*_sync`, `__syncwarp`, and the tensor-core and `ldmatrix` models below)
//   wait for the 32 lanes of their warp and exchange values through a per-warp slot array;
// * the order the fibers run in between two barriers is thread 0, 1, 2, ... or, with the
//   launch flag FLAG_REVERSE, the reverse (the blocks too): a missing barrier shows up as a read
//   of data that another thread has not written yet (or has already overwritten) in one of the
//   two orders;
// * dynamic shared memory is filled with NaN bytes (0xFF) before every block and has a guard
//   zone after it; `cp.async` copies are queued per thread and land at `cp.async.wait_group`,
//   so a read of a stage before its wait sees stale data;
// * a barrier that not every thread (or lane) reaches — early returns, divergent
//   `__syncthreads()` — is reported as an error instead of hanging.
//
// Tensor-core instructions (`mma.sync`), `ldmatrix` and `cp.async` are modelled from the PTX
// ISA's fragment layouts: the kernels call them through the small wrappers in `common.cuh`,
// which compile to inline PTX on the GPU and to the functions below here. Nothing here models
// timing, memory coalescing, bank conflicts or memory ordering beyond the barriers (a warp
// operation acts as a full warp barrier here); atomics are not provided (kiln's kernels use
// none). `__shared__` arrays are `static thread_local`: one per OS thread, so concurrent
// launches from several test threads do not share them.
//
// Entry point (generated per kernel file by the Rust emulator, see crates/kiln-cuda/src/emu.rs):
//   extern "C" int kiln_emu_launch(const char* name, const unsigned grid[3],
//                                  const unsigned block[3], unsigned dynamic_smem_bytes,
//                                  void** args, unsigned flags, char* err, unsigned long errlen);
#pragma once
#define KILN_EMU 1

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>
#include <setjmp.h>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ---- math and bit casts that CUDA provides ---------------------------------------------------
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline void __threadfence_block() {}
inline void __threadfence() {}
[[noreturn]] void kiln_emu_trap();
inline void __trap() { kiln_emu_trap(); }

namespace kiln_emu {

// One queued `cp.async` copy: the source bytes are read when it is issued (inputs do not change
// during a kernel), written to shared memory when its group is waited for.
struct Copy {
    void* dst;
    unsigned char data[16];
    int bytes;
};

struct Fiber {
    ucontext_t ctx;  // the entry context (makecontext), used once per block
    jmp_buf jb;      // where the fiber continues after a yield
    bool started = false;
    char* stack = nullptr;
    uint3 tid{};
    int lin = 0;
    bool done = false;
    std::vector<Copy> open;                // copies since the last commit
    std::vector<std::vector<Copy>> groups;  // committed groups, oldest first
};

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr size_t GUARD_BYTES = 4096;
constexpr size_t SMEM_GUARD = 256;
constexpr int SLOT_WORDS = 16;  // 64-bit words per lane in a warp exchange

struct Block {
    std::vector<Fiber> fibers;
    jmp_buf main;       // the scheduler
    ucontext_t entry;   // template for the fibers' entry contexts
    int cur = -1;
    int n = 0;
    unsigned long block_gen = 0;
    int block_arrived = 0;
    std::vector<unsigned long> warp_gen;
    std::vector<int> warp_arrived;
    std::vector<int> warp_count;
    std::vector<uint64_t> slots;  // [warp][lane][SLOT_WORDS]
    bool progressed = false;
    std::string error;
    void (*thunk)(void**) = nullptr;
    void** args = nullptr;
    std::vector<unsigned char> smem;  // dynamic shared memory + guard
    size_t smem_bytes = 0;
};

inline thread_local Block* blk = nullptr;

inline Fiber& me() { return blk->fibers[blk->cur]; }

// Switches are _setjmp/_longjmp between stacks (no signal-mask system call); a fiber's first
// entry is a setcontext into its makecontext'ed entry context.
inline void yield() {
    Fiber& f = me();
    if (!_setjmp(f.jb)) _longjmp(blk->main, 1);
}

[[noreturn]] inline void fail(const std::string& msg) {
    if (blk->error.empty()) blk->error = msg;
    // Park this fiber forever: the scheduler sees no progress and stops the block.
    for (;;) yield();
}

inline void block_barrier() {
    Block& b = *blk;
    unsigned long g = b.block_gen;
    b.progressed = true;
    if (++b.block_arrived == b.n) {
        b.block_arrived = 0;
        b.block_gen++;
    }
    do {
        yield();
    } while (b.block_gen == g);
    b.progressed = true;
}

inline int lane_id() { return me().lin & 31; }
inline int warp_id() { return me().lin >> 5; }

inline void warp_barrier() {
    Block& b = *blk;
    int w = warp_id();
    unsigned long g = b.warp_gen[w];
    b.progressed = true;
    if (++b.warp_arrived[w] == b.warp_count[w]) {
        b.warp_arrived[w] = 0;
        b.warp_gen[w]++;
    }
    do {
        yield();
    } while (b.warp_gen[w] == g);
    b.progressed = true;
}

inline uint64_t* slot(int warp, int lane) {
    return &blk->slots[((size_t)warp * 32 + lane) * SLOT_WORDS];
}

inline void require_full_warp(const char* what) {
    if (blk->warp_count[warp_id()] != 32) {
        fail(std::string(what) + ": needs a full warp of 32 threads (block size " +
             std::to_string(blk->n) + ")");
    }
}

template <class T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 64 bits");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T> inline T from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}

// Every lane publishes `v`; lane `l` receives the value of lane `src(l)` (its own when `src`
// is outside its segment of `width` lanes).
template <class T, class F> inline T exchange(T v, int width, F src) {
    Block& b = *blk;
    int w = warp_id(), l = lane_id();
    *slot(w, l) = to_bits(v);
    warp_barrier();
    int base = l - l % width;
    int s = src(l - base);
    T r = (s >= 0 && s < width) ? from_bits<T>(*slot(w, base + s)) : v;
    warp_barrier();
    (void)b;
    return r;
}

inline void* dynamic_smem() { return blk->smem.data(); }

inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
    Copy c;
    c.dst = dst;
    c.bytes = bytes;
    std::memset(c.data, 0, sizeof c.data);
    if (src_bytes > 0) std::memcpy(c.data, src, (size_t)src_bytes);
    me().open.push_back(c);
}
inline void cp_async_commit() {
    Fiber& f = me();
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}
inline void cp_async_wait(int pending) {
    Fiber& f = me();
    while ((int)f.groups.size() > pending) {
        for (const Copy& c : f.groups.front()) std::memcpy(c.dst, c.data, (size_t)c.bytes);
        f.groups.erase(f.groups.begin());
    }
}

inline void fiber_main() {
    blk->thunk(blk->args);
    Fiber& f = me();
    if (!f.open.empty() || !f.groups.empty()) {
        // Copies that were never waited for never land: on the GPU their data would be lost.
        f.open.clear();
        f.groups.clear();
    }
    f.done = true;
    blk->progressed = true;
    _longjmp(blk->main, 1);
}

// Runs one block to completion. Returns false (with `b.error` set) on a deadlock or failure.
inline bool run_block(Block& b, bool reverse) {
    for (int i = 0; i < b.n; ++i) {
        Fiber& f = b.fibers[i];
        f.done = false;
        f.started = false;
        f.open.clear();
        f.groups.clear();
        f.ctx = b.entry;
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, (void (*)())fiber_main, 0);
    }
    b.block_arrived = 0;
    std::fill(b.warp_arrived.begin(), b.warp_arrived.end(), 0);
    int live = b.n;
    while (live > 0) {
        b.progressed = false;
        for (int k = 0; k < b.n; ++k) {
            int i = reverse ? b.n - 1 - k : k;
            Fiber& f = b.fibers[i];
            if (f.done) continue;
            b.cur = i;
            threadIdx = f.tid;
            if (!_setjmp(b.main)) {
                if (!f.started) {
                    f.started = true;
                    setcontext(&f.ctx);
                } else {
                    _longjmp(f.jb, 1);
                }
            }
            if (f.done) --live;
        }
        if (!b.error.empty()) return false;
        if (live > 0 && !b.progressed) {
            int exited = 0;
            for (auto& f : b.fibers) exited += f.done ? 1 : 0;
            b.error = "deadlock: " + std::to_string(live) +
                      " threads wait at a barrier that the other " + std::to_string(exited) +
                      " threads (exited) never reach";
            return false;
        }
    }
    b.cur = -1;
    return true;
}

struct KernelEntry {
    const char* name;
    void (*thunk)(void**);
};

template <class... A, size_t... I>
inline void invoke_impl(void (*f)(A...), void** a, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(a[I])...);
}
template <class... A> inline void invoke(void (*f)(A...), void** a) {
    invoke_impl(f, a, std::index_sequence_for<A...>{});
}

constexpr unsigned FLAG_REVERSE = 1;

inline int launch(const KernelEntry* table, const char* name, const unsigned* grid,
                  const unsigned* block, unsigned smem_bytes, void** args, unsigned flags,
                  char* err, unsigned long errlen) {
    auto report = [&](const std::string& m) {
        std::snprintf(err, errlen, "%s", m.c_str());
        return 1;
    };
    const KernelEntry* e = table;
    while (e->name && std::strcmp(e->name, name) != 0) ++e;
    if (!e->name) return report(std::string("no kernel named ") + name + " in this module");
    unsigned nthreads = block[0] * block[1] * block[2];
    if (nthreads == 0 || nthreads > 1024) return report("block size out of range");
    Block b;
    b.n = (int)nthreads;
    b.thunk = e->thunk;
    b.args = args;
    b.fibers.resize(nthreads);
    int nwarps = (int)((nthreads + 31) / 32);
    b.warp_gen.assign(nwarps, 0);
    b.warp_arrived.assign(nwarps, 0);
    b.warp_count.assign(nwarps, 0);
    b.slots.assign((size_t)nwarps * 32 * SLOT_WORDS, 0);
    for (unsigned i = 0; i < nthreads; ++i) b.warp_count[i / 32]++;
    // Stacks are mapped lazily (untouched pages cost nothing), each above a guard page.
    const size_t stride = STACK_BYTES + GUARD_BYTES;
    size_t map_bytes = (size_t)nthreads * stride;
    char* stacks = (char*)mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stacks == (char*)MAP_FAILED) return report("cannot map fiber stacks");
    struct Unmap {
        char* p;
        size_t n;
        ~Unmap() { munmap(p, n); }
    } unmap{stacks, map_bytes};
    for (unsigned i = 0; i < nthreads; ++i) {
        Fiber& f = b.fibers[i];
        mprotect(stacks + (size_t)i * stride, GUARD_BYTES, PROT_NONE);
        f.stack = stacks + (size_t)i * stride + GUARD_BYTES;
        f.lin = (int)i;
        f.tid = uint3{i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
    }
    getcontext(&b.entry);
    b.smem_bytes = smem_bytes;
    b.smem.resize(smem_bytes + SMEM_GUARD);
    Block* saved = blk;
    blk = &b;
    blockDim = dim3(block[0], block[1], block[2]);
    gridDim = dim3(grid[0], grid[1], grid[2]);
    bool reverse = (flags & FLAG_REVERSE) != 0;
    unsigned long nblocks = (unsigned long)grid[0] * grid[1] * grid[2];
    int rc = 0;
    for (unsigned long k = 0; k < nblocks && rc == 0; ++k) {
        unsigned long bi = reverse ? nblocks - 1 - k : k;
        blockIdx = uint3{(unsigned)(bi % grid[0]), (unsigned)((bi / grid[0]) % grid[1]),
                         (unsigned)(bi / ((unsigned long)grid[0] * grid[1]))};
        std::fill(b.smem.begin(), b.smem.end(), (unsigned char)0xFF);
        b.block_gen = 0;
        if (!run_block(b, reverse)) {
            rc = report("block (" + std::to_string(blockIdx.x) + ", " +
                        std::to_string(blockIdx.y) + ", " + std::to_string(blockIdx.z) +
                        "): " + b.error);
            break;
        }
        for (size_t i = smem_bytes; i < b.smem.size(); ++i) {
            if (b.smem[i] != 0xFF) {
                rc = report("block (" + std::to_string(blockIdx.x) + ", " +
                            std::to_string(blockIdx.y) + ", " + std::to_string(blockIdx.z) +
                            "): write past the end of dynamic shared memory (" +
                            std::to_string(smem_bytes) + " bytes)");
                break;
            }
        }
    }
    blk = saved;
    return rc;
}

// ---- 16-bit floats -----------------------------------------------------------------------------
inline float f16_bits_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                man <<= 1;
                ++e;
            } while ((man & 0x400) == 0);
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    return __uint_as_float(u);
}
inline uint16_t f32_to_f16_bits(float f) {
    _Float16 h = (_Float16)f;  // round to nearest even
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
}

}  // namespace kiln_emu

inline void kiln_emu_trap() { kiln_emu::fail("__trap() called"); }

// ---- warp-synchronous operations ---------------------------------------------------------------
inline void __syncthreads() { kiln_emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    (void)mask;
    kiln_emu::require_full_warp("__syncwarp");
    kiln_emu::warp_barrier();
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    (void)mask;
    kiln_emu::require_full_warp("__shfl_xor_sync");
    return kiln_emu::exchange(v, width, [&](int l) { return l ^ lane_mask; });
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    (void)mask;
    kiln_emu::require_full_warp("__shfl_sync");
    return kiln_emu::exchange(v, width, [&](int) { return ((src_lane % width) + width) % width; });
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    (void)mask;
    kiln_emu::require_full_warp("__shfl_down_sync");
    return kiln_emu::exchange(v, width, [&](int l) { return l + (int)delta; });
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    (void)mask;
    kiln_emu::require_full_warp("__shfl_up_sync");
    return kiln_emu::exchange(v, width, [&](int l) { return l - (int)delta; });
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    (void)mask;
    kiln_emu::require_full_warp("__ballot_sync");
    int w = kiln_emu::warp_id(), l = kiln_emu::lane_id();
    *kiln_emu::slot(w, l) = pred ? 1 : 0;
    kiln_emu::warp_barrier();
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= (unsigned)(*kiln_emu::slot(w, i) & 1) << i;
    kiln_emu::warp_barrier();
    return r;
}

// ---- models of the PTX instructions behind common.cuh's wrappers -----------------------------
// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8i..8i+7 give the row addresses
// of matrix i (eight 16-bit values each); lane l receives, of matrix i, row l/4, columns
// 2(l%4), 2(l%4)+1 (with .trans: rows 2(l%4), 2(l%4)+1 of column l/4), packed low half first.
namespace kiln_emu {
template <int N> inline void ldmatrix(uint32_t* r, const void* row_ptr, bool trans) {
    require_full_warp("ldmatrix");
    int w = warp_id(), l = lane_id();
    slot(w, l)[0] = (uint64_t)(uintptr_t)row_ptr;
    warp_barrier();
    for (int i = 0; i < N; ++i) {
        uint16_t v[2];
        for (int h = 0; h < 2; ++h) {
            int row, col;
            if (!trans) {
                row = l / 4;
                col = 2 * (l % 4) + h;
            } else {
                row = 2 * (l % 4) + h;
                col = l / 4;
            }
            const uint16_t* p = (const uint16_t*)(uintptr_t)slot(w, 8 * i + row)[0];
            v[h] = p[col];
        }
        r[i] = (uint32_t)v[0] | ((uint32_t)v[1] << 16);
    }
    warp_barrier();
}

inline float bf16_bits_to_f32(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: D = A·B + C with
// (g = lane/4, t = lane%4) A 16×16: a0,a1 = A[g][2t..], a2,a3 = A[g+8][2t..],
// a4,a5 = A[g][2t+8..], a6,a7 = A[g+8][2t+8..]; B 16×8: b0,b1 = B[2t..][g], b2,b3 = B[2t+8..][g];
// C, D 16×8: c0,c1 = C[g][2t..], c2,c3 = C[g+8][2t..].
inline void mma_16816(float* d, const uint32_t* a, const uint32_t* b, const float* c, bool bf16) {
    require_full_warp("mma.sync");
    int w = warp_id(), l = lane_id();
    uint64_t* s = slot(w, l);
    for (int i = 0; i < 4; ++i) s[i] = a[i];
    for (int i = 0; i < 2; ++i) s[4 + i] = b[i];
    warp_barrier();
    auto half_of = [&](uint32_t word, int hi) -> float {
        uint16_t h = (uint16_t)(hi ? word >> 16 : word & 0xffff);
        return bf16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
    };
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        int g = lane / 4, t = lane % 4;
        const uint64_t* q = slot(w, lane);
        for (int h = 0; h < 2; ++h) {
            A[g][2 * t + h] = half_of((uint32_t)q[0], h);
            A[g + 8][2 * t + h] = half_of((uint32_t)q[1], h);
            A[g][2 * t + 8 + h] = half_of((uint32_t)q[2], h);
            A[g + 8][2 * t + 8 + h] = half_of((uint32_t)q[3], h);
            B[2 * t + h][g] = half_of((uint32_t)q[4], h);
            B[2 * t + 8 + h][g] = half_of((uint32_t)q[5], h);
        }
    }
    int g = l / 4, t = l % 4;
    int rows[4] = {g, g, g + 8, g + 8};
    int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    float out[4];
    for (int i = 0; i < 4; ++i) {
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += A[rows[i]][k] * B[k][cols[i]];
        out[i] = acc;
    }
    warp_barrier();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}
}  // namespace kiln_emu

#define KILN_EMU_TABLE_BEGIN static const kiln_emu::KernelEntry kiln_emu_table[] = {
#define KILN_EMU_KERNEL(f) {#f, [](void** a) { kiln_emu::invoke(f, a); }},
#define KILN_EMU_TABLE_END                                                                     \
    {nullptr, nullptr}                                                                         \
    }                                                                                          \
    ;                                                                                          \
    extern "C" int kiln_emu_launch(const char* name, const unsigned* grid,                     \
                                   const unsigned* block, unsigned smem, void** args,          \
                                   unsigned flags, char* err, unsigned long errlen) {          \
        return kiln_emu::launch(kiln_emu_table, name, grid, block, smem, args, flags, err,     \
                                errlen);                                                       \
    }
