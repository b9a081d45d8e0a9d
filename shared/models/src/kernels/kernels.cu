// CUDA kernels behind the fused ops of mod.rs (f32): GELU (erf form) and its gradient, softmax
// over the last dimension (plain and with an attention mask) and its gradient, layer norm (the
// normalisation alone, and with scale and shift) with its input and weight gradients, the bias
// add of a linear layer and its column-sum gradient, dropout, embedding gather / scatter, and the
// AdamW update in place. Compiled to PTX by build.rs (feature `cuda`) and loaded by candle's
// CudaDevice; compiled as C++ for the CPU by shared/cuda-emu for the tests (emulated.rs), so keep
// to what cuda_emu.h provides. Row kernels give one warp to a row (rows of attention scores,
// 256-512 columns, and of hidden states, 384-1024 columns); the same formulas as the CPU kernels.
#include <stdint.h>
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <mma.h>
#endif

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The row this warp handles, or -1.
__device__ __forceinline__ int64_t warp_row(int64_t rows) {
  int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  return row < rows ? row : -1;
}

extern "C" __global__ void distill_gelu_erf_f32(const float* x, float* y, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float v = x[i];
    y[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
  }
}

extern "C" __global__ void distill_gelu_erf_grad_f32(const float* x, const float* g, float* dx, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float v = x[i];
    float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
    dx[i] = g[i] * (cdf + v * pdf);
  }
}

extern "C" __global__ void distill_softmax_f32(const float* x, float* y, int64_t rows, int64_t cols) {
  int64_t row = warp_row(rows);
  if (row < 0) return;
  int lane = threadIdx.x % 32;
  const float* xr = x + row * cols;
  float* yr = y + row * cols;
  float m = -INFINITY;
  for (int64_t i = lane; i < cols; i += 32) m = fmaxf(m, xr[i]);
  m = warp_max(m);
  if (m == -INFINITY) m = 0.0f;
  float s = 0.0f;
  for (int64_t i = lane; i < cols; i += 32) {
    float e = expf(xr[i] - m);
    yr[i] = e;
    s += e;
  }
  float inv = 1.0f / warp_sum(s);
  for (int64_t i = lane; i < cols; i += 32) yr[i] *= inv;
}

// Attention probabilities: softmax(x · scale + bias) per row of scores [B, H, Q, K], with the
// additive mask `bias` [B, 1, Q or 1, K] read in place (no broadcast copy): row r is batch
// r / rows_per_batch and query r % q_len.
extern "C" __global__ void distill_masked_softmax_f32(const float* x, const float* bias, float* y, int64_t rows, int64_t cols,
                                                     int64_t rows_per_batch, int64_t bias_batch_stride,
                                                     int64_t bias_row_stride, int64_t q_len, float scale) {
  int64_t row = warp_row(rows);
  if (row < 0) return;
  int lane = threadIdx.x % 32;
  const float* xr = x + row * cols;
  const float* br = bias + (row / rows_per_batch) * bias_batch_stride + (row % q_len) * bias_row_stride;
  float* yr = y + row * cols;
  float m = -INFINITY;
  for (int64_t i = lane; i < cols; i += 32) m = fmaxf(m, xr[i] * scale + br[i]);
  m = warp_max(m);
  if (m == -INFINITY) m = 0.0f;
  float s = 0.0f;
  for (int64_t i = lane; i < cols; i += 32) {
    float e = expf(xr[i] * scale + br[i] - m);
    yr[i] = e;
    s += e;
  }
  float inv = 1.0f / warp_sum(s);
  for (int64_t i = lane; i < cols; i += 32) yr[i] *= inv;
}

// dx = scale · y (g - Σ g y) per row (scale 1 for a plain softmax)
extern "C" __global__ void distill_softmax_grad_f32(const float* y, const float* g, float* dx, int64_t rows, int64_t cols,
                                                    float scale) {
  int64_t row = warp_row(rows);
  if (row < 0) return;
  int lane = threadIdx.x % 32;
  const float* yr = y + row * cols;
  const float* gr = g + row * cols;
  float* dr = dx + row * cols;
  float dot = 0.0f;
  for (int64_t i = lane; i < cols; i += 32) dot += yr[i] * gr[i];
  dot = warp_sum(dot);
  for (int64_t i = lane; i < cols; i += 32) dr[i] = scale * yr[i] * (gr[i] - dot);
}

// Mean and 1/σ of a row, two passes (as the composite computes them).
__device__ __forceinline__ void moments(const float* xr, int64_t cols, float eps, int lane, float* mean, float* rstd) {
  float s = 0.0f;
  for (int64_t i = lane; i < cols; i += 32) s += xr[i];
  float mu = warp_sum(s) / (float)cols;
  float q = 0.0f;
  for (int64_t i = lane; i < cols; i += 32) {
    float d = xr[i] - mu;
    q += d * d;
  }
  float var = warp_sum(q) / (float)cols;
  *mean = mu;
  *rstd = 1.0f / sqrtf(var + eps);
}

// One row of x̂ w + b (w, b null: x̂ alone).
__device__ __forceinline__ void norm_row(const float* xr, const float* w, const float* b, float* yr, int64_t cols, float eps,
                                         int lane) {
  float mean, rstd;
  moments(xr, cols, eps, lane, &mean, &rstd);
  for (int64_t i = lane; i < cols; i += 32) {
    float v = (xr[i] - mean) * rstd;
    yr[i] = (w ? v * w[i] : v) + (b ? b[i] : 0.0f);
  }
}

extern "C" __global__ void distill_normalize_f32(const float* x, float* y, int64_t rows, int64_t cols, float eps) {
  int64_t row = warp_row(rows);
  if (row < 0) return;
  norm_row(x + row * cols, nullptr, nullptr, y + row * cols, cols, eps, threadIdx.x % 32);
}

// One row of the normalisation's gradient of g w (w null: of g): dx = (gw - mean(gw) - x̂ mean(gw x̂)) / σ.
__device__ __forceinline__ void norm_grad_row(const float* xr, const float* w, const float* gr, float* dr, int64_t cols,
                                              float eps, int lane) {
  float mean, rstd;
  moments(xr, cols, eps, lane, &mean, &rstd);
  float gs = 0.0f, gx = 0.0f;
  for (int64_t i = lane; i < cols; i += 32) {
    float gw = w ? gr[i] * w[i] : gr[i];
    gs += gw;
    gx += gw * (xr[i] - mean) * rstd;
  }
  float g_mean = warp_sum(gs) / (float)cols;
  float gx_mean = warp_sum(gx) / (float)cols;
  for (int64_t i = lane; i < cols; i += 32)
    dr[i] = ((w ? gr[i] * w[i] : gr[i]) - g_mean - (xr[i] - mean) * rstd * gx_mean) * rstd;
}

extern "C" __global__ void distill_normalize_grad_f32(const float* x, const float* g, float* dx, int64_t rows, int64_t cols,
                                                      float eps) {
  int64_t row = warp_row(rows);
  if (row < 0) return;
  norm_grad_row(x + row * cols, nullptr, g + row * cols, dx + row * cols, cols, eps, threadIdx.x % 32);
}

// Dropout with a counter-based mask: element i is kept when uniform(seed, i) >= p (splitmix64 of
// seed and index), so the backward regenerates the same mask from the seed instead of storing it.
__device__ __forceinline__ float uniform(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (float)(z >> 40) * (1.0f / 16777216.0f);
}

extern "C" __global__ void distill_dropout_f32(const float* x, float* y, int64_t n, uint64_t seed, float p, float scale) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    y[i] = uniform(seed, (uint64_t)i) >= p ? x[i] * scale : 0.0f;
  }
}

// Embedding rows: out[t] = table[ids[t]] (ids past the vocabulary give zeros), and the backward
// scatter dtable[ids[t]] += g[t] with atomic adds (dtable zeroed by the caller).
extern "C" __global__ void distill_gather_rows_f32(const float* table, const uint32_t* ids, float* out, int64_t n, int64_t dim,
                                                  int64_t vocab) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n * dim; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t id = ids[i / dim];
    out[i] = id < vocab ? table[id * dim + i % dim] : 0.0f;
  }
}

extern "C" __global__ void distill_scatter_add_rows_f32(const float* g, const uint32_t* ids, float* dtable, int64_t n, int64_t dim,
                                                       int64_t vocab) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n * dim; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t id = ids[i / dim];
    if (id < vocab) atomicAdd(&dtable[id * dim + i % dim], g[i]);
  }
}

// AdamW in place, as optim.rs's composite: θ ← θ·decay; m ← β1 m + (1-β1) g; v ← β2 v + (1-β2) g²;
// θ ← θ - (lr / bc1) m / (sqrt(v / bc2) + eps).
extern "C" __global__ void distill_adamw_f32(float* p, float* m, float* v, const float* g, int64_t n, float decay, float beta1,
                                             float beta2, float bc2, float step, float eps) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float gi = g[i];
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step * (mi / (sqrtf(vi / bc2) + eps));
  }
}

// Layer norm with its scale and shift: y = x̂ w + b per row (b when has_bias), x̂ as
// distill_normalize_f32.
extern "C" __global__ void distill_layer_norm_f32(const float* x, const float* w, const float* b, float* y, int64_t rows,
                                                  int64_t cols, float eps, int64_t has_bias) {
  int64_t row = warp_row(rows);
  if (row < 0) return;
  norm_row(x + row * cols, w, has_bias ? b : nullptr, y + row * cols, cols, eps, threadIdx.x % 32);
}

// The input gradient of layer norm: the normalisation's gradient of g w.
extern "C" __global__ void distill_layer_norm_grad_f32(const float* x, const float* w, const float* g, float* dx,
                                                       int64_t rows, int64_t cols, float eps) {
  int64_t row = warp_row(rows);
  if (row < 0) return;
  norm_grad_row(x + row * cols, w, g + row * cols, dx + row * cols, cols, eps, threadIdx.x % 32);
}

// Column sums for the weight gradients: rows are split into chunks of ROWS_PER_BLOCK, one block
// per chunk; a block sums its rows into shared memory and adds that to the output with one
// atomic per column. The output is zeroed by the caller.
#define DISTILL_ROWS_PER_BLOCK 64
#define DISTILL_MAX_COLS 2048

// dw[c] = Σ_rows g x̂ and db[c] = Σ_rows g (out = [dw | db], 2 x cols), one warp per row.
extern "C" __global__ void distill_layer_norm_wgrad_f32(const float* x, const float* g, float* out, int64_t rows,
                                                        int64_t cols, float eps) {
  __shared__ float sums[2 * DISTILL_MAX_COLS];
  for (int64_t i = threadIdx.x; i < 2 * cols; i += blockDim.x) sums[i] = 0.0f;
  __syncthreads();
  int warps = blockDim.x / 32;
  int lane = threadIdx.x % 32;
  int64_t first = (int64_t)blockIdx.x * DISTILL_ROWS_PER_BLOCK;
  int64_t last = first + DISTILL_ROWS_PER_BLOCK < rows ? first + DISTILL_ROWS_PER_BLOCK : rows;
  for (int64_t row = first + threadIdx.x / 32; row < last; row += warps) {
    const float* xr = x + row * cols;
    const float* gr = g + row * cols;
    float mean, rstd;
    moments(xr, cols, eps, lane, &mean, &rstd);
    for (int64_t i = lane; i < cols; i += 32) {
      atomicAdd(&sums[i], gr[i] * (xr[i] - mean) * rstd);
      atomicAdd(&sums[cols + i], gr[i]);
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < 2 * cols; i += blockDim.x) atomicAdd(&out[i], sums[i]);
}

// out[c] = Σ_rows g[row, c] (a bias gradient), out zeroed by the caller; threads over columns,
// so each row is read coalesced.
extern "C" __global__ void distill_column_sum_f32(const float* g, float* out, int64_t rows, int64_t cols) {
  int64_t first = (int64_t)blockIdx.x * DISTILL_ROWS_PER_BLOCK;
  int64_t last = first + DISTILL_ROWS_PER_BLOCK < rows ? first + DISTILL_ROWS_PER_BLOCK : rows;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float s = 0.0f;
    for (int64_t row = first; row < last; ++row) s += g[row * cols + c];
    atomicAdd(&out[c], s);
  }
}

// y = x + b[i % cols] (a bias over the last dimension), in f32; from a bf16 x (an autocast
// matmul's output), the cast back to f32 in the same pass.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ void bias_add(const T* x, const float* b, float* y, int64_t n, int64_t cols) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    y[i] = to_f32(x[i]) + b[i % cols];
  }
}

extern "C" __global__ void distill_bias_add_f32(const float* x, const float* b, float* y, int64_t n, int64_t cols) {
  bias_add(x, b, y, n, cols);
}

extern "C" __global__ void distill_bias_add_bf16_f32(const __nv_bfloat16* x, const float* b, float* y, int64_t n,
                                                     int64_t cols) {
  bias_add(x, b, y, n, cols);
}

// Rotary embeddings fused with the head split of a packed projection (ModernBERT's Wqkv):
// qkv [B, L, 3, H, D] -> out [3, B, H, L, D], q and k rotated (x cos + rotate_half(x) sin, with
// rotate_half(x) = [-x2, x1]), v copied; cos and sin [L, D]. The backward is the merge the other
// way with the rotation by -sin (distill_rotary_merge_f32).
__device__ __forceinline__ float rotate(const float* x, int64_t i, int64_t d, float c, float s) {
  int64_t half = d / 2;
  float other = i < half ? -x[i + half] : x[i - half];
  return x[i] * c + other * s;
}

extern "C" __global__ void distill_rotary_split_f32(const float* qkv, const float* cos, const float* sin, float* out,
                                                    int64_t b, int64_t l, int64_t h, int64_t d) {
  int64_t n = 3 * b * h * l * d;
  for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < n; o += (int64_t)gridDim.x * blockDim.x) {
    int64_t i = o % d, pos = (o / d) % l, head = (o / (d * l)) % h, batch = (o / (d * l * h)) % b, part = o / (d * l * h * b);
    const float* x = qkv + (((batch * l + pos) * 3 + part) * h + head) * d;
    out[o] = part == 2 ? x[i] : rotate(x, i, d, cos[pos * d + i], sin[pos * d + i]);
  }
}

extern "C" __global__ void distill_rotary_merge_f32(const float* g, const float* cos, const float* sin, float* dqkv,
                                                    int64_t b, int64_t l, int64_t h, int64_t d) {
  int64_t n = 3 * b * h * l * d;
  for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < n; o += (int64_t)gridDim.x * blockDim.x) {
    int64_t i = o % d, head = (o / d) % h, part = (o / (d * h)) % 3, pos = (o / (d * h * 3)) % l, batch = o / (d * h * 3 * l);
    const float* x = g + (((part * b + batch) * h + head) * l + pos) * d;
    dqkv[o] = part == 2 ? x[i] : rotate(x, i, d, cos[pos * d + i], -sin[pos * d + i]);
  }
}

// Attention for scoring (no backward), flash-style: softmax(q kᵀ · scale + key bias) v without the
// [B, H, L, L] scores in memory, bf16 tensor-core tiles (wmma 16 x 16 x 16, f32 accumulation),
// the softmax kept online in f32. q, k, v [B, H, L, D] bf16; bias [B, 1, 1, L] f32 (0 or very
// negative per key); window >= 0 limits each query to keys within that distance (ModernBERT's
// local layers), -1 none. Out [B, L, H, D] bf16: the heads already merged. A block of 4 warps
// takes 64 queries of one (batch, head), each warp 16; keys go through in tiles of 32 (K and V
// tiles in shared memory, shared by the warps). 1-D grid: blockIdx.x = (batch x heads) x query
// blocks + query block.
#define DISTILL_FA_WARPS 4
#define DISTILL_FA_QW 16
#define DISTILL_FA_KT 32

template <int D>
__device__ void flash_attention_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                     const float* bias, __nv_bfloat16* out, int64_t heads, int64_t len, float scale,
                                     int64_t window) {
  using namespace nvcuda;
  constexpr int W = DISTILL_FA_WARPS, QW = DISTILL_FA_QW, KT = DISTILL_FA_KT;
  __shared__ __align__(32) __nv_bfloat16 qs[W * QW * D];
  __shared__ __align__(32) __nv_bfloat16 ks[KT * D];
  __shared__ __align__(32) __nv_bfloat16 vs[KT * D];
  __shared__ __align__(32) float ss[W][QW * KT];
  __shared__ __align__(32) __nv_bfloat16 ps[W][QW * KT];
  __shared__ __align__(32) float os[W][QW * D];
  __shared__ float ms[W][QW], ls[W][QW];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t qblocks = (len + W * QW - 1) / (W * QW);
  const int64_t bh = blockIdx.x / qblocks, batch = bh / heads, head = bh % heads;
  const int64_t q0 = (blockIdx.x % qblocks) * (W * QW);
  const __nv_bfloat16 zero = __float2bfloat16(0.0f);
  const __nv_bfloat16* qb = q + bh * len * D;
  const __nv_bfloat16* kb = k + bh * len * D;
  const __nv_bfloat16* vb = v + bh * len * D;
  const float* bb = bias + batch * len;

  for (int i = threadIdx.x; i < W * QW * D; i += blockDim.x) {
    int64_t r = q0 + i / D;
    qs[i] = r < len ? qb[r * D + i % D] : zero;
  }
  for (int i = lane; i < QW * D; i += 32) os[warp][i] = 0.0f;
  if (lane < QW) {
    ms[warp][lane] = -INFINITY;
    ls[warp][lane] = 0.0f;
  }
  __syncthreads();

  // Two lanes per query row, each over half of a key tile and half of the head's values.
  const int r = lane / 2, half = lane % 2;
  const int64_t qi = q0 + warp * QW + r;
  for (int64_t k0 = 0; k0 < len; k0 += KT) {
    for (int i = threadIdx.x; i < KT * D; i += blockDim.x) {
      int64_t row = k0 + i / D;
      ks[i] = row < len ? kb[row * D + i % D] : zero;
      vs[i] = row < len ? vb[row * D + i % D] : zero;
    }
    __syncthreads();

    // S = Q Kᵀ for this warp's 16 queries and the tile's 32 keys (Kᵀ read column-major from K).
    for (int n = 0; n < KT / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
        wmma::load_matrix_sync(a, qs + warp * QW * D + kk * 16, D);
        wmma::load_matrix_sync(b, ks + n * 16 * D + kk * 16, D);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(ss[warp] + n * 16, acc, KT, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax: the row's new max, P = exp(s - max) (bf16 for the next product), the
    // running sum and the output rescaled by exp(old max - new max).
    float sv[KT / 2];
    float mx = -INFINITY;
    for (int c = 0; c < KT / 2; ++c) {
      int64_t kj = k0 + half * (KT / 2) + c;
      bool on = kj < len && (window < 0 || (qi - kj <= window && kj - qi <= window));
      sv[c] = on ? ss[warp][r * KT + half * (KT / 2) + c] * scale + bb[kj] : -INFINITY;
      mx = fmaxf(mx, sv[c]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_old = ms[warp][r];
    const float m_new = fmaxf(m_old, mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    float sum = 0.0f;
    for (int c = 0; c < KT / 2; ++c) {
      float p = sv[c] == -INFINITY ? 0.0f : expf(sv[c] - m_use);
      ps[warp][r * KT + half * (KT / 2) + c] = __float2bfloat16(p);
      sum += p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_use);
    for (int j = half * (D / 2); j < (half + 1) * (D / 2); ++j) os[warp][r * D + j] *= alpha;
    __syncwarp();
    if (half == 0) {
      ms[warp][r] = m_new;
      ls[warp][r] = ls[warp][r] * alpha + sum;
    }

    // O += P V
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, os[warp] + n * 16, D, wmma::mem_row_major);
      for (int kk = 0; kk < KT / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
        wmma::load_matrix_sync(a, ps[warp] + kk * 16, KT);
        wmma::load_matrix_sync(b, vs + kk * 16 * D + n * 16, D);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(os[warp] + n * 16, acc, D, wmma::mem_row_major);
    }
    // The tile's K and V are overwritten next; the output tiles are read next.
    __syncthreads();
  }

  for (int i = lane; i < QW * D; i += 32) {
    int row = i / D;
    int64_t qrow = q0 + warp * QW + row;
    if (qrow < len) {
      float l = ls[warp][row];
      out[((batch * len + qrow) * heads + head) * D + i % D] = __float2bfloat16(l > 0.0f ? os[warp][i] / l : 0.0f);
    }
  }
}

extern "C" __global__ void distill_flash_attention_d32_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                            const __nv_bfloat16* v, const float* bias,
                                                            __nv_bfloat16* out, int64_t heads, int64_t len,
                                                            float scale, int64_t window) {
  flash_attention_bf16<32>(q, k, v, bias, out, heads, len, scale, window);
}

extern "C" __global__ void distill_flash_attention_d64_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                            const __nv_bfloat16* v, const float* bias,
                                                            __nv_bfloat16* out, int64_t heads, int64_t len,
                                                            float scale, int64_t window) {
  flash_attention_bf16<64>(q, k, v, bias, out, heads, len, scale, window);
}
