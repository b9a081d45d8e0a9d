// Just enough of CUDA's device-side C++ to run kernels.cu on the CPU, for tests on a machine
// without a GPU: a launch runs its blocks one after another, each block's threads as OS threads,
// so warp shuffles and __syncthreads are real rendezvous (barriers) and a kernel's indexing,
// reductions and write pattern are exercised as written. Each block has its own shared memory
// (build.rs turns each `__shared__` declaration into `emu::shared`), filled with NaN bytes where
// a GPU leaves garbage. Nothing orders one block after another but the launch's end, so built
// with ThreadSanitizer (DISTILL_EMU_TSAN) the emulator reports races between a block's threads
// and between blocks; for it only __syncthreads and __syncwarp order memory, as in CUDA's memory
// model (a shuffle does not); with AddressSanitizer (DISTILL_EMU_ASAN) accesses out of bounds.
// A block's threads at different __syncthreads abort the test. Not emulated: partial-warp masks
// (shuffles exchange across the whole warp), timing.
#pragma once
#include <barrier>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <source_location>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct __align__(16) float4 {
  float x, y, z, w;
};
struct __align__(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {
struct Warp {
  explicit Warp(std::ptrdiff_t n) : bar(n), size(n) {}
  std::barrier<> bar;
  std::ptrdiff_t size;
  uint64_t slots[32];
};
// A block's barrier, which checks that its threads arrive from one __syncthreads (kernels.cu's
// line and column): CUDA allows __syncthreads in conditional code only where the condition is the
// same for the whole block (else a GPU may hang); unchecked, the threads would pair up here.
// (Lanes of a warp at different shuffles or __syncwarp do pair up from sm_70 on, as here.)
// Each thread's call site per barrier, in one of two rows by the barrier's parity (a fast thread
// writes the next row while the others still read this one); atomics, so that the sites order
// nothing for ThreadSanitizer.
struct Meet {
  explicit Meet(std::ptrdiff_t n) : bar(n), sites{std::vector<std::atomic<uint32_t>>(n), std::vector<std::atomic<uint32_t>>(n)} {}
  std::barrier<> bar;
  std::vector<std::atomic<uint32_t>> sites[2];
};
struct SharedMemory;
struct Thread {
  Warp* warp = nullptr;
  Meet* block = nullptr;
  unsigned lane = 0;
  unsigned index = 0;              // in the block
  unsigned block_meets = 0;
  SharedMemory* shared = nullptr;  // the block's
  unsigned shared_next = 0;        // the declarations this thread has reached
};
extern thread_local Thread self;

// An exited thread's site: it meets no one.
constexpr uint32_t EXITED = ~0u;
// Prints the two calls (kernels.cu lines) and aborts: a test cannot go on past them.
[[noreturn]] void divergent(uint32_t mine, uint32_t other);

// Arrives at `m` from `l` (thread `me`, its `count`th barrier) and checks that every thread
// still running came from the same call.
inline void meet(Meet& m, unsigned& count, unsigned me, const std::source_location& l) {
  const uint32_t site = (uint32_t)l.line() << 10 | ((uint32_t)l.column() & 1023u);
  auto& row = m.sites[count++ & 1];
  row[me].store(site, std::memory_order_relaxed);
  m.bar.arrive_and_wait();
  for (const auto& other : row) {
    const uint32_t o = other.load(std::memory_order_relaxed);
    if (o != site && o != EXITED) divergent(site, o);
  }
}

// The `index`th shared array of the running block (every thread of a block reaches the same
// declarations in the same order), allocated by the first thread to reach it.
void* shared_array(unsigned index, size_t size, size_t align);

// A `__shared__ T name[..]` declaration: `auto& name = emu::shared<T[..]>(align)`.
template <class T>
T& shared(size_t align) {
  return *static_cast<T*>(shared_array(self.shared_next++, sizeof(T), align > alignof(T) ? align : alignof(T)));
}
}  // namespace emu

extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

inline void __syncthreads(std::source_location l = std::source_location::current()) {
  emu::meet(*emu::self.block, emu::self.block_meets, emu::self.index, l);
}

#ifdef DISTILL_EMU_TSAN
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
// Within: no access is checked and no synchronisation orders memory, for the sanitizer.
#define EMU_UNSEEN_BEGIN() (AnnotateIgnoreSyncBegin(__FILE__, __LINE__), __tsan_ignore_thread_begin())
#define EMU_UNSEEN_END() (__tsan_ignore_thread_end(), AnnotateIgnoreSyncEnd(__FILE__, __LINE__))
#else
#define EMU_UNSEEN_BEGIN() ((void)0)
#define EMU_UNSEEN_END() ((void)0)
#endif

// Every lane writes its value, the warp meets, every lane reads its partner's, the warp meets
// again (so the slots are not overwritten before all have read). Unseen by the sanitizer: a
// shuffle exchanges registers and, unlike __syncwarp, orders no memory between the lanes.
template <class T>
inline T emu_exchange(T v, unsigned src) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  EMU_UNSEEN_BEGIN();
  emu::Warp* w = emu::self.warp;
  uint64_t slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  w->slots[emu::self.lane] = slot;
  w->bar.arrive_and_wait();
  T r = v;
  if (src < (unsigned)w->size) std::memcpy(&r, &w->slots[src], sizeof(T));
  w->bar.arrive_and_wait();
  EMU_UNSEEN_END();
  return r;
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) { return emu_exchange(v, emu::self.lane ^ (unsigned)mask); }
template <class T>
inline T __shfl_sync(unsigned, T v, int src) { return emu_exchange(v, (unsigned)src & 31u); }
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned d) {
  unsigned src = emu::self.lane + d;
  T r = emu_exchange(v, src);
  return src < 32 ? r : v;
}

// Relaxed, as CUDA's atomics: an atomic add orders nothing else (a sequentially consistent one
// would order two blocks that add to one sum, and hide a race between them on other memory).
inline float atomicAdd(float* a, float v) { return std::atomic_ref<float>(*a).fetch_add(v, std::memory_order_relaxed); }
inline double atomicAdd(double* a, double v) {
  return std::atomic_ref<double>(*a).fetch_add(v, std::memory_order_relaxed);
}

inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __fdividef(float a, float b) { return a / b; }

// bf16 as cuda_bf16.h: the top half of an f32, rounded to nearest even.
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = (uint32_t)h.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }

namespace emu {
// Runs `body` as a grid of 1-D blocks.
template <class F>
void launch(dim3 grid, dim3 block, F body);
}  // namespace emu

inline void __syncwarp(unsigned = 0xffffffffu) { emu::self.warp->bar.arrive_and_wait(); }

// The warp-level matrix API of mma.h (16 x 16 x 16 tiles) as its documented semantics: every
// lane holds the whole tile (the element-to-lane mapping is unspecified in CUDA, so kernels
// must not depend on it; these do not), loads read it all, stores are written by lane 0 (a
// kernel reads stored tiles after __syncwarp, as on the GPU).
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[rows * cols];  // row-major, whatever the memory layout it was loaded from
};

inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class Use, int M, int N, int K, class T, class Layout, class P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = to_float(std::is_same_v<Layout, col_major> ? p[r + c * ldm] : p[r * ldm + c]);
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t l) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = l == mem_col_major ? p[r + c * ldm] : p[r * ldm + c];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
  if (emu::self.lane != 0) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (l == mem_col_major ? p[r + c * ldm] : p[r * ldm + c]) = f.x[r * N + c];
}

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

// d = a b + c, products of the (bf16) inputs summed in f32.
template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = s;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda
