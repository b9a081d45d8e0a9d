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
// A loop unrolled in full by nvcc (its trip count a constant): register arrays stay registers and
// its loads issue together.
#ifdef __CUDACC__
#define DISTILL_UNROLL _Pragma("unroll")
#else
#define DISTILL_UNROLL
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

// DeBERTa's disentangled attention probabilities for scoring: softmax over the keys j of
// (qk[i, j] + c2p[i, c2p_idx[i, j]] + p2c[j, p2c_idx[j, i]]) · inv_scale + mask[b, j], in f32
// from bf16 products, bf16 out. qk [BH, Q, L] (q kᵀ), c2p [BH, Q, P] (q and the position keys),
// p2c [BH, L, P] (k and the position queries), the relative-position buckets c2p_idx and p2c_idx
// [L, L] (query row i of Q: the first Q rows), mask [B, L]. Where the composite gathered, scaled
// and added three [BH, Q, L] score tensors, cast them and ran the masked softmax, this reads each
// product once and writes bf16.
//
// A block takes `block_rows` consecutive query rows of one batch x head (Q split in
// ceil(Q / block_rows) blocks each). The p2c term is the transposed gather: one query row reads
// p2c at (j, p2c_idx[j, i]) over the keys j, a row stride apart (a 32-byte sector for 2 bytes).
// So the block first stages that term for all its rows in shared memory with consecutive threads
// on consecutive query rows of one key, whose buckets are adjacent (one sector serves ~16 rows,
// and the p2c_idx column reads become row reads); then a warp per row adds the rest, row-wise.
// block_rows x (len + 2) <= DISTILL_DEBERTA_STAGE; the row stride len + 2 keeps the staging
// writes of 16 rows x 2 keys per warp on distinct banks.
#define DISTILL_DEBERTA_STAGE 8192

__device__ __forceinline__ void deberta_stage_p2c(float* ss, const __nv_bfloat16* p2c, const uint32_t* p2c_idx,
                                                  int i0, int nr, int len, int64_t pos) {
  const int ls = len + 2;
  for (int t = threadIdx.x; t < nr * len; t += blockDim.x) {
    const int r = t % nr, j = t / nr;
    ss[r * ls + j] = __bfloat162float(p2c[j * pos + p2c_idx[(int64_t)j * len + i0 + r]]);
  }
}

// The block's batch x head, its first query row and its rows.
struct DebertaBlock {
  int64_t bh;
  int i0, nr;
};

__device__ __forceinline__ DebertaBlock deberta_block(int64_t q_rows, int64_t block_rows) {
  const int64_t per_bh = (q_rows + block_rows - 1) / block_rows;
  DebertaBlock k;
  k.bh = blockIdx.x / per_bh;
  k.i0 = (int)((blockIdx.x % per_bh) * block_rows);
  k.nr = (int)(q_rows - k.i0 < block_rows ? q_rows - k.i0 : block_rows);
  return k;
}

// The scores of query row i (its staged p2c terms in sr, replaced by the scores) and this lane's
// largest.
__device__ __forceinline__ float deberta_row_scores(float* sr, const __nv_bfloat16* qr, const __nv_bfloat16* cr,
                                                    const uint32_t* ci, const float* mr, int len, float inv_scale) {
  float m = -INFINITY;
  for (int j = threadIdx.x % 32; j < len; j += 32) {
    const float s = (__bfloat162float(qr[j]) + __bfloat162float(cr[ci[j]]) + sr[j]) * inv_scale + mr[j];
    sr[j] = s;
    m = fmaxf(m, s);
  }
  return m;
}

extern "C" __global__ void distill_deberta_probs_bf16(const __nv_bfloat16* qk, const __nv_bfloat16* c2p,
                                                      const __nv_bfloat16* p2c, const uint32_t* c2p_idx,
                                                      const uint32_t* p2c_idx, const float* mask, __nv_bfloat16* out,
                                                      int64_t heads, int64_t q_rows, int64_t len, int64_t pos,
                                                      int64_t block_rows, float inv_scale) {
  __shared__ float ss[DISTILL_DEBERTA_STAGE];
  const DebertaBlock k = deberta_block(q_rows, block_rows);
  deberta_stage_p2c(ss, p2c + k.bh * len * pos, p2c_idx, k.i0, k.nr, (int)len, pos);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const float* mr = mask + (k.bh / heads) * len;
  for (int r = threadIdx.x / 32; r < k.nr; r += blockDim.x / 32) {
    const int64_t i = k.i0 + r, row = k.bh * q_rows + i;
    float* sr = ss + r * (len + 2);
    float m = warp_max(deberta_row_scores(sr, qk + row * len, c2p + row * pos, c2p_idx + i * len, mr, (int)len,
                                          inv_scale));
    if (m == -INFINITY) m = 0.0f;
    float s = 0.0f;
    for (int j = lane; j < len; j += 32) s += expf(sr[j] - m);
    const float inv = 1.0f / warp_sum(s);
    for (int j = lane; j < len; j += 32) out[row * len + j] = __float2bfloat16(expf(sr[j] - m) * inv);
  }
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
// The gradient is scaled by *scale first (clipping by global norm, computed on the device: no host
// read between the backward pass and the update).
__device__ __forceinline__ void adamw_at(float* p, float* m, float* v, const float* g, int64_t i, float s, float decay,
                                         float beta1, float beta2, float bc2, float step, float eps) {
  float gi = g[i] * s;
  float mi = beta1 * m[i] + (1.0f - beta1) * gi;
  float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
  m[i] = mi;
  v[i] = vi;
  p[i] = p[i] * decay - step * (mi / (sqrtf(vi / bc2) + eps));
}

extern "C" __global__ void distill_adamw_f32(float* p, float* m, float* v, const float* g, const float* scale, int64_t n,
                                             float decay, float beta1, float beta2, float bc2, float step, float eps) {
  const float s = *scale;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    adamw_at(p, m, v, g, i, s, decay, beta1, beta2, bc2, step, eps);
  }
}

// Up to DISTILL_LIST_LEN tensors for one launch of the multi-tensor kernels (as PyTorch's fused
// optimizers): their device pointers and sizes passed by value in the kernel's parameters (2,824
// bytes of the 4 KB a launch may pass), so that one launch covers a list of parameter tensors
// without a table copied to the device first. The layout of launch.rs's TensorList.
#define DISTILL_LIST_LEN 64
struct DistillTensorList {
  float* p[DISTILL_LIST_LEN];
  float* m[DISTILL_LIST_LEN];
  float* v[DISTILL_LIST_LEN];
  const float* g[DISTILL_LIST_LEN];
  int64_t n[DISTILL_LIST_LEN];
  float decay[DISTILL_LIST_LEN];
  int64_t count;
};
static_assert(sizeof(DistillTensorList) == 2824, "the layout of launch.rs's TensorList");

// Where block `blockIdx.x` starts in tensor t of a list: the blocks a tensor needs (n / block
// size) go round the grid from where the previous tensor's ended, so that a list of small
// tensors spreads over the blocks instead of all landing on the first.
__device__ __forceinline__ int64_t list_first(int64_t shift) {
  return ((blockIdx.x + gridDim.x - shift % gridDim.x) % gridDim.x) * (int64_t)blockDim.x + threadIdx.x;
}

// distill_adamw_f32 over every tensor of a list in one launch (each its own weight decay).
extern "C" __global__ void distill_adamw_list_f32(DistillTensorList l, const float* scale, float beta1, float beta2,
                                                  float bc2, float step, float eps) {
  const float s = *scale;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t shift = 0;
  for (int64_t t = 0; t < l.count; ++t) {
    float* p = l.p[t];
    float* m = l.m[t];
    float* v = l.v[t];
    const float* g = l.g[t];
    const int64_t n = l.n[t];
    const float decay = l.decay[t];
    for (int64_t i = list_first(shift); i < n; i += stride) {
      adamw_at(p, m, v, g, i, s, decay, beta1, beta2, bc2, step, eps);
    }
    shift += (n + blockDim.x - 1) / blockDim.x;
  }
}

// acc[0] += Σ g² over every gradient of a list (l.g, l.n; the rest unused) in one launch: a
// block's sum by warp shuffles, one atomic per block.
extern "C" __global__ void distill_sum_squares_list_f32(DistillTensorList l, float* acc) {
  __shared__ float part[32];
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  float s = 0.0f;
  int64_t shift = 0;
  for (int64_t t = 0; t < l.count; ++t) {
    const float* g = l.g[t];
    const int64_t n = l.n[t];
    for (int64_t i = list_first(shift); i < n; i += stride) s += g[i] * g[i];
    shift += (n + blockDim.x - 1) / blockDim.x;
  }
  s = warp_sum(s);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) part[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < (int)(blockDim.x / 32) ? part[lane] : 0.0f;
    s = warp_sum(s);
    if (lane == 0) atomicAdd(acc, s);
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
// per chunk, a thread per column summing down the chunk (its loads unrolled: all in flight at
// once), one atomic per column and block. The output is zeroed by the caller. 16 rows: a training
// batch of 64 x 256 tokens gives 1,024 blocks (with 64, 256 blocks left an H100's 132 SMs two each,
// too few loads in flight to approach its bandwidth).
#define DISTILL_ROWS_PER_BLOCK 16
#define DISTILL_MAX_COLS 2048
// Warps per block of the row kernels (`WARPS` in launch.rs).
#define DISTILL_NORM_WARPS 4

// dw[c] = Σ_rows g x̂ and db[c] = Σ_rows g (out = [dw | db], 2 x cols): a warp per row takes the
// block's rows' moments into shared memory, then a thread per column sums down the rows (each row
// read coalesced, the sums in registers: no shared atomics, which on floats compile to
// compare-and-swap loops), one atomic per column and block.
extern "C" __global__ void distill_layer_norm_wgrad_f32(const float* x, const float* g, float* out, int64_t rows,
                                                        int64_t cols, float eps) {
  __shared__ float mean_s[DISTILL_ROWS_PER_BLOCK], rstd_s[DISTILL_ROWS_PER_BLOCK];
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t first = (int64_t)blockIdx.x * DISTILL_ROWS_PER_BLOCK;
  const int64_t last = first + DISTILL_ROWS_PER_BLOCK < rows ? first + DISTILL_ROWS_PER_BLOCK : rows;
  for (int64_t row = first + threadIdx.x / 32; row < last; row += warps) {
    float mean, rstd;
    moments(x + row * cols, cols, eps, lane, &mean, &rstd);
    if (lane == 0) {
      mean_s[row - first] = mean;
      rstd_s[row - first] = rstd;
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float dw = 0.0f, db = 0.0f;
    DISTILL_UNROLL
    for (int r = 0; r < DISTILL_ROWS_PER_BLOCK; ++r) {
      if (first + r >= last) break;
      const float gv = g[(first + r) * cols + c];
      dw += gv * (x[(first + r) * cols + c] - mean_s[r]) * rstd_s[r];
      db += gv;
    }
    atomicAdd(&out[c], dw);
    atomicAdd(&out[cols + c], db);
  }
}

// y = x + b[i % cols] (a bias over the last dimension), in f32; from a bf16 x (an autocast
// matmul's output), the cast back to f32 in the same pass.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// A lane's 16 scores of a warp's score tile in shared memory (rows `ld` floats apart, 16-byte
// aligned), by four 16-byte loads: with ld = 36 the quarter warp's loads (4 rows, both halves)
// fall in different banks, where the 16 rows' equal columns read one at a time share one bank.
__device__ __forceinline__ void load16(float* v, const float* row) {
  const float4* p = reinterpret_cast<const float4*>(row);
  for (int i = 0; i < 4; ++i) {
    const float4 t = p[i];
    v[4 * i] = t.x;
    v[4 * i + 1] = t.y;
    v[4 * i + 2] = t.z;
    v[4 * i + 3] = t.w;
  }
}

// 8 values rounded to bf16, to 16-byte aligned memory by one 16-byte store (the first in the low
// half of each word).
__device__ __forceinline__ void store8_bf16(__nv_bfloat16* dst, const float* v) {
  unsigned w[4];
  for (int i = 0; i < 4; ++i)
    w[i] = (unsigned)__bfloat16_as_ushort(__float2bfloat16(v[2 * i])) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16(v[2 * i + 1])) << 16);
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

// 16 values to a bf16 row in shared memory (16-byte aligned), by two 16-byte stores.
__device__ __forceinline__ void store16_bf16(__nv_bfloat16* row, const float* v) {
  store8_bf16(row, v);
  store8_bf16(row + 8, v + 8);
}

// 8 bf16 from 16-byte aligned memory, widened (the first in the low half of each word, as memory
// holds them), each with its column's bias added and rounded to bf16 again where there is one.
__device__ __forceinline__ void load8(float* x, const __nv_bfloat16* src, const float* bias) {
  const uint4 w = *reinterpret_cast<const uint4*>(src);
  const unsigned u[4] = {w.x, w.y, w.z, w.w};
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = __bfloat162float(__ushort_as_bfloat16((unsigned short)(u[i] & 0xffffu)));
    x[2 * i + 1] = __bfloat162float(__ushort_as_bfloat16((unsigned short)(u[i] >> 16)));
  }
  if (bias)
    for (int i = 0; i < 8; ++i) x[i] = __bfloat162float(__float2bfloat16(x[i] + bias[i]));
}


// Whether 8-element vectors can serve an elementwise kernel: rows of `cols` (a multiple of 8, so a
// vector stays in one row) and every pointer 16-byte aligned.
__device__ __forceinline__ bool vec8(int64_t cols, const void* a, const void* b, const void* c = nullptr,
                                     const void* d = nullptr) {
  const uintptr_t any = (uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d;
  return cols % 8 == 0 && any % 16 == 0;
}

// out[c] = Σ_rows g[row, c] (a bias gradient), out zeroed by the caller; threads over columns,
// so each row is read coalesced.
template <class T>
__device__ void column_sum(const T* g, float* out, int64_t rows, int64_t cols) {
  int64_t first = (int64_t)blockIdx.x * DISTILL_ROWS_PER_BLOCK;
  int64_t last = first + DISTILL_ROWS_PER_BLOCK < rows ? first + DISTILL_ROWS_PER_BLOCK : rows;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float s = 0.0f;
    DISTILL_UNROLL
    for (int r = 0; r < DISTILL_ROWS_PER_BLOCK; ++r)
      if (first + r < last) s += to_f32(g[(first + r) * cols + c]);
    atomicAdd(&out[c], s);
  }
}

extern "C" __global__ void distill_column_sum_f32(const float* g, float* out, int64_t rows, int64_t cols) {
  column_sum(g, out, rows, cols);
}

// The column sums of a bf16 gradient, in f32 (the bias gradient of the training bias + GELU).
extern "C" __global__ void distill_column_sum_bf16(const __nv_bfloat16* g, float* out, int64_t rows, int64_t cols) {
  column_sum(g, out, rows, cols);
}

template <class T>
__device__ void bias_add(const T* x, const float* b, float* y, int64_t n, int64_t cols) {
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  if constexpr (sizeof(T) == 2) {
    // bf16 x: 8 elements a load, two 16-byte stores, one index division per 8.
    if (vec8(cols, x, y)) {
      for (int64_t v = first; v < n / 8; v += stride) {
        const int64_t c0 = v * 8 % cols;
        float t[8];
        load8(t, x + v * 8, (const float*)nullptr);
        for (int j = 0; j < 8; ++j) t[j] += b[c0 + j];
        float4* out = reinterpret_cast<float4*>(y + v * 8);
        out[0] = float4{t[0], t[1], t[2], t[3]};
        out[1] = float4{t[4], t[5], t[6], t[7]};
      }
      return;
    }
  }
  for (int64_t i = first; i < n; i += stride) y[i] = to_f32(x[i]) + b[i % cols];
}

extern "C" __global__ void distill_bias_add_f32(const float* x, const float* b, float* y, int64_t n, int64_t cols) {
  bias_add(x, b, y, n, cols);
}

extern "C" __global__ void distill_bias_add_bf16_f32(const __nv_bfloat16* x, const float* b, float* y, int64_t n,
                                                     int64_t cols) {
  bias_add(x, b, y, n, cols);
}

// Scoring epilogues in bf16 (forward only: scoring keeps no graph). A post-LN block's linear
// bias, residual and layer norm in one pass, y = LN(x + bias + residual) w + shift, with
// params [3, cols] f32 = (the linear layer's bias, the norm's weight, its shift; zeros where a
// model has none); one warp per row, the row's sums kept in shared memory (cols <= 2,048), math in
// f32. And the feed-forward's bias with GELU (erf form), y = gelu(x + bias).
// One row of LN(x + bias + residual) w + shift; with `sum` the row's sum is written too, rounded
// to bf16, and the norm taken of that (a pre-LN block's residual stream and the next norm).
// 8 f32 from / to 16-byte aligned memory, two 16-byte accesses.
__device__ __forceinline__ void load8_f32(float* x, const float* src) {
  const float4* p = reinterpret_cast<const float4*>(src);
  const float4 a = p[0], b = p[1];
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}
__device__ __forceinline__ void store8_f32(float* dst, const float* x) {
  float4* p = reinterpret_cast<float4*>(dst);
  p[0] = float4{x[0], x[1], x[2], x[3]};
  p[1] = float4{x[4], x[5], x[6], x[7]};
}

__device__ __forceinline__ void add_norm_row(const __nv_bfloat16* xr, const __nv_bfloat16* rr, const float* params,
                                             __nv_bfloat16* sum, __nv_bfloat16* yr, float* v, int64_t cols,
                                             float eps, int lane) {
  if (vec8(cols, xr, rr, params, yr) && (uintptr_t)sum % 16 == 0) {
    // 8 elements a 16-byte access (the row kept in `v`, 16-byte aligned), a lane's vectors 32
    // apart: a fraction of the instructions of one element at a time, which bound the kernel.
    float s = 0.0f;
    for (int64_t c0 = 8 * lane; c0 < cols; c0 += 256) {
      float a[8], b[8], bias[8];
      load8(a, xr + c0, (const float*)nullptr);
      load8(b, rr + c0, (const float*)nullptr);
      load8_f32(bias, params + c0);
      for (int j = 0; j < 8; ++j) {
        a[j] += bias[j] + b[j];
        if (sum) a[j] = __bfloat162float(__float2bfloat16(a[j]));
        s += a[j];
      }
      if (sum) store8_bf16(sum + c0, a);
      store8_f32(v + c0, a);
    }
    const float mean = warp_sum(s) / (float)cols;
    float q = 0.0f;
    for (int64_t c0 = 8 * lane; c0 < cols; c0 += 256) {
      float a[8];
      load8_f32(a, v + c0);
      for (int j = 0; j < 8; ++j) q += (a[j] - mean) * (a[j] - mean);
    }
    const float rstd = 1.0f / sqrtf(warp_sum(q) / (float)cols + eps);
    for (int64_t c0 = 8 * lane; c0 < cols; c0 += 256) {
      float a[8], w[8], shift[8];
      load8_f32(a, v + c0);
      load8_f32(w, params + cols + c0);
      load8_f32(shift, params + 2 * cols + c0);
      for (int j = 0; j < 8; ++j) a[j] = (a[j] - mean) * rstd * w[j] + shift[j];
      store8_bf16(yr + c0, a);
    }
    return;
  }
  float s = 0.0f;
  for (int64_t i = lane; i < cols; i += 32) {
    float t = to_f32(xr[i]) + params[i] + to_f32(rr[i]);
    if (sum) {
      __nv_bfloat16 r = __float2bfloat16(t);
      sum[i] = r;
      t = to_f32(r);
    }
    v[i] = t;
    s += t;
  }
  float mean = warp_sum(s) / (float)cols;
  float q = 0.0f;
  for (int64_t i = lane; i < cols; i += 32) {
    float d = v[i] - mean;
    q += d * d;
  }
  float rstd = 1.0f / sqrtf(warp_sum(q) / (float)cols + eps);
  for (int64_t i = lane; i < cols; i += 32) yr[i] = __float2bfloat16((v[i] - mean) * rstd * params[cols + i] + params[2 * cols + i]);
}

extern "C" __global__ void distill_add_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* res, const float* params,
                                                 __nv_bfloat16* y, int64_t rows, int64_t cols, float eps) {
  __shared__ __align__(16) float sums[DISTILL_NORM_WARPS][DISTILL_MAX_COLS];
  int64_t row = warp_row(rows);
  if (row < 0) return;
  add_norm_row(x + row * cols, res + row * cols, params, (__nv_bfloat16*)nullptr, y + row * cols,
               sums[threadIdx.x / 32], cols, eps, threadIdx.x % 32);
}

// Scoring embeddings in one pass: y = LN(t0[i0] + t1[i1] + t2[i2]) w + shift per token, the first
// `tables` (1-3) bf16 tables [n_k, cols] gathered by their ids [rows] u32 (an id past its table
// gives zeros, as distill_gather_rows_f32), each add rounded to bf16 (as the composite's bf16
// adds), the norm in f32, params [2, cols] = (w, shift) f32, y bf16. Where the composite gathered
// each table into a [rows, cols] tensor, added them, cast to f32, normalised and cast back. One
// warp per token, its row in shared memory (cols <= DISTILL_MAX_COLS), 8 columns a 16-byte access
// where rows allow it.
__device__ __forceinline__ const __nv_bfloat16* embedding_row(const __nv_bfloat16* t, const uint32_t* ids, int64_t row,
                                                              int64_t n, int64_t cols) {
  const int64_t id = ids[row];
  return id < n ? t + id * cols : nullptr;
}

// A row's sum of 8 columns from c0: a (the first table's, zeros where its id was past it) plus
// each next table's row (null: zeros), rounded to bf16 after each add.
__device__ __forceinline__ void embedding_add8(float* a, const __nv_bfloat16* row, int64_t c0) {
  float b[8];
  for (int j = 0; j < 8; ++j) b[j] = 0.0f;
  if (row) load8(b, row + c0, (const float*)nullptr);
  for (int j = 0; j < 8; ++j) a[j] = __bfloat162float(__float2bfloat16(a[j] + b[j]));
}

extern "C" __global__ void distill_embed_norm_bf16(const __nv_bfloat16* t0, const __nv_bfloat16* t1,
                                                   const __nv_bfloat16* t2, const uint32_t* i0, const uint32_t* i1,
                                                   const uint32_t* i2, const float* params, __nv_bfloat16* y,
                                                   int64_t rows, int64_t cols, int64_t n0, int64_t n1, int64_t n2,
                                                   int64_t tables, float eps) {
  __shared__ __align__(16) float sums[DISTILL_NORM_WARPS][DISTILL_MAX_COLS];
  const int64_t row = warp_row(rows);
  if (row < 0) return;
  const int lane = threadIdx.x % 32;
  float* v = sums[threadIdx.x / 32];
  const __nv_bfloat16* r0 = embedding_row(t0, i0, row, n0, cols);
  const __nv_bfloat16* r1 = tables > 1 ? embedding_row(t1, i1, row, n1, cols) : nullptr;
  const __nv_bfloat16* r2 = tables > 2 ? embedding_row(t2, i2, row, n2, cols) : nullptr;
  __nv_bfloat16* yr = y + row * cols;
  float s = 0.0f;
  const bool vec = vec8(cols, t0, t1, t2, yr) && (uintptr_t)params % 16 == 0;
  if (vec) {
    for (int64_t c0 = 8 * lane; c0 < cols; c0 += 256) {
      float a[8];
      for (int j = 0; j < 8; ++j) a[j] = 0.0f;
      if (r0) load8(a, r0 + c0, (const float*)nullptr);
      if (tables > 1) embedding_add8(a, r1, c0);
      if (tables > 2) embedding_add8(a, r2, c0);
      for (int j = 0; j < 8; ++j) s += a[j];
      store8_f32(v + c0, a);
    }
  } else {
    for (int64_t c = lane; c < cols; c += 32) {
      float a = r0 ? __bfloat162float(r0[c]) : 0.0f;
      if (tables > 1) a = __bfloat162float(__float2bfloat16(a + (r1 ? __bfloat162float(r1[c]) : 0.0f)));
      if (tables > 2) a = __bfloat162float(__float2bfloat16(a + (r2 ? __bfloat162float(r2[c]) : 0.0f)));
      v[c] = a;
      s += a;
    }
  }
  __syncwarp();
  const float mean = warp_sum(s) / (float)cols;
  float q = 0.0f;
  for (int64_t c = lane; c < cols; c += 32) q += (v[c] - mean) * (v[c] - mean);
  const float rstd = 1.0f / sqrtf(warp_sum(q) / (float)cols + eps);
  if (vec) {
    for (int64_t c0 = 8 * lane; c0 < cols; c0 += 256) {
      float a[8], w[8], shift[8];
      load8_f32(a, v + c0);
      load8_f32(w, params + c0);
      load8_f32(shift, params + cols + c0);
      for (int j = 0; j < 8; ++j) a[j] = (a[j] - mean) * rstd * w[j] + shift[j];
      store8_bf16(yr + c0, a);
    }
    return;
  }
  for (int64_t c = lane; c < cols; c += 32)
    yr[c] = __float2bfloat16((v[c] - mean) * rstd * params[c] + params[cols + c]);
}

// out [2, rows, cols]: the sums, then the norms.
extern "C" __global__ void distill_add_norm_sum_bf16(const __nv_bfloat16* x, const __nv_bfloat16* res,
                                                     const float* params, __nv_bfloat16* out, int64_t rows,
                                                     int64_t cols, float eps) {
  __shared__ __align__(16) float sums[DISTILL_NORM_WARPS][DISTILL_MAX_COLS];
  int64_t row = warp_row(rows);
  if (row < 0) return;
  add_norm_row(x + row * cols, res + row * cols, params, out + row * cols, out + (rows + row) * cols,
               sums[threadIdx.x / 32], cols, eps, threadIdx.x % 32);
}

__device__ __forceinline__ float gelu_erf(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

// The elementwise bf16 kernels below go 8 elements a 16-byte load and store, with one index
// division per 8 (a 64-bit division or modulo is a few dozen instructions: per element it made
// them instruction-bound), where vec8 holds; else one element at a time.
extern "C" __global__ void distill_bias_gelu_bf16(const __nv_bfloat16* x, const float* b, __nv_bfloat16* y, int64_t n,
                                                  int64_t cols) {
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  if (vec8(cols, x, y)) {
    for (int64_t v = first; v < n / 8; v += stride) {
      const int64_t c0 = v * 8 % cols;
      float t[8];
      load8(t, x + v * 8, (const float*)nullptr);
      for (int j = 0; j < 8; ++j) t[j] = gelu_erf(t[j] + b[c0 + j]);
      store8_bf16(y + v * 8, t);
    }
    return;
  }
  for (int64_t i = first; i < n; i += stride) y[i] = __float2bfloat16(gelu_erf(to_f32(x[i]) + b[i % cols]));
}

// The backward of distill_bias_gelu_bf16 in training: dx = g gelu'(x + b), from the bf16 output
// gradient g and the bf16 product x (the pre-activation recomputed, not stored), in f32, rounded
// to bf16 for the product's gradient (the bias's gradient is its column sum).
// gelu'(v) (erf form).
__device__ __forceinline__ float gelu_erf_grad(float v) {
  return 0.5f * (1.0f + erff(v * 0.70710678118654752f)) + v * 0.39894228040143268f * expf(-0.5f * v * v);
}

extern "C" __global__ void distill_bias_gelu_grad_bf16(const __nv_bfloat16* g, const __nv_bfloat16* x, const float* b,
                                                       __nv_bfloat16* dx, int64_t n, int64_t cols) {
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  if (vec8(cols, g, x, dx)) {
    for (int64_t v = first; v < n / 8; v += stride) {
      const int64_t c0 = v * 8 % cols;
      float t[8], gv[8];
      load8(t, x + v * 8, (const float*)nullptr);
      load8(gv, g + v * 8, (const float*)nullptr);
      for (int j = 0; j < 8; ++j) t[j] = gv[j] * gelu_erf_grad(t[j] + b[c0 + j]);
      store8_bf16(dx + v * 8, t);
    }
    return;
  }
  for (int64_t i = first; i < n; i += stride) dx[i] = __float2bfloat16(to_f32(g[i]) * gelu_erf_grad(to_f32(x[i]) + b[i % cols]));
}

// A post-LN block's end in training under autocast: y = LN(dropout(x + bias) + res) w + shift per
// row, x the bf16 product, res the f32 residual stream, params [3, cols] = (bias, w, shift), y f32.
// Dropout keeps element i = row x cols + c when uniform(seed, i) >= p, scaling it by `scale`
// (distill_dropout_f32's mask over the [rows, cols] tensor; p = 0 keeps all). One warp per row,
// the row in registers (column lane + 32 k in v[k]; cols <= DISTILL_TRAIN_NORM_COLS). The loops
// go 8 slots k at a time, each chunk's loads first (predicated, so they are all in flight at once;
// a load under `if` waits for the one before), and stop after the row's last chunk (a branch the
// whole warp takes). The backward recomputes the sums from x and res: nothing is stored but y.
#define DISTILL_TRAIN_NORM_COLS 1024
#define DISTILL_TRAIN_NORM_K (DISTILL_TRAIN_NORM_COLS / 32)
#define DISTILL_TRAIN_NORM_CHUNK 8

// The row's pre-norm sums into v (f32), their mean and 1/σ; returns the lane's dropout keep bits
// (bit k: column lane + 32 k kept), drawn once here for the backward's second use.
__device__ __forceinline__ uint32_t train_sum_row(const __nv_bfloat16* xr, const float* rr, const float* bias,
                                                  float (&v)[DISTILL_TRAIN_NORM_K], int64_t row, int cols, float eps,
                                                  uint64_t seed, float p, float scale, float* mean, float* rstd) {
  const int lane = threadIdx.x % 32;
  uint32_t keep = 0;
  float s = 0.0f;
  DISTILL_UNROLL
  for (int k0 = 0; k0 < DISTILL_TRAIN_NORM_K; k0 += DISTILL_TRAIN_NORM_CHUNK) {
    if (32 * k0 >= cols) break;
    float xs[DISTILL_TRAIN_NORM_CHUNK], rs[DISTILL_TRAIN_NORM_CHUNK], bs[DISTILL_TRAIN_NORM_CHUNK];
    DISTILL_UNROLL
    for (int u = 0; u < DISTILL_TRAIN_NORM_CHUNK; ++u) {
      const int i = lane + 32 * (k0 + u);
      xs[u] = i < cols ? to_f32(xr[i]) : 0.0f;
      rs[u] = i < cols ? rr[i] : 0.0f;
      bs[u] = i < cols ? bias[i] : 0.0f;
    }
    DISTILL_UNROLL
    for (int u = 0; u < DISTILL_TRAIN_NORM_CHUNK; ++u) {
      const int i = lane + 32 * (k0 + u);
      float t = xs[u] + bs[u];
      if (p > 0.0f) {
        const bool kept = uniform(seed, (uint64_t)(row * cols + i)) >= p;
        keep |= (uint32_t)kept << (k0 + u);
        t = kept ? t * scale : 0.0f;
      }
      v[k0 + u] = i < cols ? t + rs[u] : 0.0f;
      s += v[k0 + u];
    }
  }
  const float mu = warp_sum(s) / (float)cols;
  float q = 0.0f;
  DISTILL_UNROLL
  for (int k = 0; k < DISTILL_TRAIN_NORM_K; ++k) {
    if (32 * k >= cols) break;
    const float d = v[k] - mu;
    if (lane + 32 * k < cols) q += d * d;
  }
  *mean = mu;
  *rstd = 1.0f / sqrtf(warp_sum(q) / (float)cols + eps);
  return keep;
}

extern "C" __global__ void distill_add_norm_train_f32(const __nv_bfloat16* x, const float* res, const float* params,
                                                      float* y, int64_t rows, int64_t cols, float eps, uint64_t seed,
                                                      float p, float scale) {
  int64_t row = warp_row(rows);
  if (row < 0) return;
  const int lane = threadIdx.x % 32, n = (int)cols;
  float v[DISTILL_TRAIN_NORM_K], mean, rstd;
  train_sum_row(x + row * cols, res + row * cols, params, v, row, n, eps, seed, p, scale, &mean, &rstd);
  float* yr = y + row * cols;
  const float *w = params + cols, *shift = params + 2 * cols;
  DISTILL_UNROLL
  for (int k0 = 0; k0 < DISTILL_TRAIN_NORM_K; k0 += DISTILL_TRAIN_NORM_CHUNK) {
    if (32 * k0 >= n) break;
    float ws[DISTILL_TRAIN_NORM_CHUNK], hs[DISTILL_TRAIN_NORM_CHUNK];
    DISTILL_UNROLL
    for (int u = 0; u < DISTILL_TRAIN_NORM_CHUNK; ++u) {
      const int i = lane + 32 * (k0 + u);
      ws[u] = i < n ? w[i] : 0.0f;
      hs[u] = i < n ? shift[i] : 0.0f;
    }
    DISTILL_UNROLL
    for (int u = 0; u < DISTILL_TRAIN_NORM_CHUNK; ++u) {
      const int i = lane + 32 * (k0 + u);
      if (i < n) yr[i] = (v[k0 + u] - mean) * rstd * ws[u] + hs[u];
    }
  }
}

// Its backward, from the output's gradient g: ds = (g w - mean(g w) - x̂ mean(g w x̂)) / σ, the
// residual's gradient (f32, out ds [rows, cols]), and the column sums into out sums [3, cols]
// (zeroed by the caller): the bias's Σ ds·keep·scale, the weight's Σ g x̂, the shift's Σ g. The
// product's gradient (ds with the mask, in bf16) is distill_dropout_bf16_f32's. Blocks of
// DISTILL_TRAIN_ROWS_PER_BLOCK rows (fewer than the weight-gradient kernels' 64: a block per 64
// rows of a 16,384-row batch leaves the card's SMs two blocks each), one warp per row at a time
// (the row, g w and x̂ in registers). Each warp sums its rows' columns in its own slice of shared
// memory (each lane its own columns: plain adds, where shared atomics on floats compile to
// compare-and-swap loops), then one atomic per column and block.
#define DISTILL_TRAIN_ROWS_PER_BLOCK 16
extern "C" __global__ void distill_add_norm_train_grad_f32(const __nv_bfloat16* x, const float* res,
                                                           const float* params, const float* g, float* ds, float* sums,
                                                           int64_t rows, int64_t cols, float eps, uint64_t seed,
                                                           float p, float scale) {
  __shared__ float acc[DISTILL_NORM_WARPS][3][DISTILL_TRAIN_NORM_COLS];
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32, n = (int)cols;
  float(*a)[DISTILL_TRAIN_NORM_COLS] = acc[threadIdx.x / 32];
  for (int i = lane; i < n; i += 32) a[0][i] = a[1][i] = a[2][i] = 0.0f;
  const float* w = params + cols;
  const int64_t first = (int64_t)blockIdx.x * DISTILL_TRAIN_ROWS_PER_BLOCK;
  const int64_t last = first + DISTILL_TRAIN_ROWS_PER_BLOCK < rows ? first + DISTILL_TRAIN_ROWS_PER_BLOCK : rows;
  for (int64_t row = first + threadIdx.x / 32; row < last; row += warps) {
    float v[DISTILL_TRAIN_NORM_K], gw[DISTILL_TRAIN_NORM_K], mean, rstd;
    const uint32_t keep = train_sum_row(x + row * cols, res + row * cols, params, v, row, n, eps, seed, p, scale,
                                        &mean, &rstd);
    const float* gr = g + row * cols;
    float gs = 0.0f, gx = 0.0f;
    DISTILL_UNROLL
    for (int k0 = 0; k0 < DISTILL_TRAIN_NORM_K; k0 += DISTILL_TRAIN_NORM_CHUNK) {
      if (32 * k0 >= n) break;
      float gv[DISTILL_TRAIN_NORM_CHUNK], ws[DISTILL_TRAIN_NORM_CHUNK];
      DISTILL_UNROLL
      for (int u = 0; u < DISTILL_TRAIN_NORM_CHUNK; ++u) {
        const int i = lane + 32 * (k0 + u);
        gv[u] = i < n ? gr[i] : 0.0f;
        ws[u] = i < n ? w[i] : 0.0f;
      }
      DISTILL_UNROLL
      for (int u = 0; u < DISTILL_TRAIN_NORM_CHUNK; ++u) {
        const int i = lane + 32 * (k0 + u), k = k0 + u;
        v[k] = (v[k] - mean) * rstd;
        gw[k] = gv[u] * ws[u];
        gs += gw[k];
        gx += gw[k] * v[k];
        if (i < n) {
          a[1][i] += gv[u] * v[k];
          a[2][i] += gv[u];
        }
      }
    }
    const float g_mean = warp_sum(gs) / (float)cols, gx_mean = warp_sum(gx) / (float)cols;
    float* dr = ds + row * cols;
    DISTILL_UNROLL
    for (int k = 0; k < DISTILL_TRAIN_NORM_K; ++k) {
      if (32 * k >= n) break;
      const int i = lane + 32 * k;
      const float d = (gw[k] - g_mean - v[k] * gx_mean) * rstd;
      if (i < n) {
        dr[i] = d;
        a[0][i] += p > 0.0f ? ((keep >> k) & 1u ? d * scale : 0.0f) : d;
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 3 * n; i += blockDim.x) {
    const int c = i / n, col = i - c * n;
    float t = 0.0f;
    for (int wp = 0; wp < warps; ++wp) t += acc[wp][c][col];
    atomicAdd(&sums[i], t);
  }
}

// Dropout's mask on an f32 gradient, rounded to bf16 (the bf16 product's gradient): y = x scale
// where uniform(seed, i) >= p, else 0 (p = 0: the cast alone).
extern "C" __global__ void distill_dropout_bf16_f32(const float* x, __nv_bfloat16* y, int64_t n, uint64_t seed, float p,
                                                    float scale) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    y[i] = __float2bfloat16(p > 0.0f ? (uniform(seed, (uint64_t)i) >= p ? x[i] * scale : 0.0f) : x[i]);
  }
}

// GeGLU for scoring (ModernBERT's MLP): x [rows, 2 inter] = (input | gate) -> gelu(input) gate
// [rows, inter], n = rows x inter.
extern "C" __global__ void distill_geglu_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int64_t n, int64_t inter) {
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  if (vec8(inter, x, y)) {
    for (int64_t v = first; v < n / 8; v += stride) {
      const int64_t row = v * 8 / inter, c0 = v * 8 - row * inter;
      float a[8], g[8];
      load8(a, x + row * 2 * inter + c0, (const float*)nullptr);
      load8(g, x + row * 2 * inter + inter + c0, (const float*)nullptr);
      for (int j = 0; j < 8; ++j) a[j] = gelu_erf(a[j]) * g[j];
      store8_bf16(y + v * 8, a);
    }
    return;
  }
  for (int64_t i = first; i < n; i += stride) {
    int64_t row = i / inter, c = i % inter;
    float a = to_f32(x[row * 2 * inter + c]);
    float g = to_f32(x[row * 2 * inter + inter + c]);
    y[i] = __float2bfloat16(gelu_erf(a) * g);
  }
}

// DeBERTa's attention probabilities in training (as distill_deberta_probs_bf16, the same scores
// and blocks): out [rows, len] bf16 = the probabilities with attention dropout (element
// row x len + j kept when uniform(seed, that index) >= p, scaled by keep_scale;
// distill_dropout_f32's mask over the [B, H, Q, L] probabilities), and the rows' log-sum-exp
// lse [rows] f32 for the backward.
__device__ __forceinline__ float keep_at(uint64_t seed, float p, float keep_scale, int64_t i) {
  return p > 0.0f ? (uniform(seed, (uint64_t)i) >= p ? keep_scale : 0.0f) : 1.0f;
}

extern "C" __global__ void distill_deberta_probs_train_bf16(const __nv_bfloat16* qk, const __nv_bfloat16* c2p,
                                                            const __nv_bfloat16* p2c, const uint32_t* c2p_idx,
                                                            const uint32_t* p2c_idx, const float* mask,
                                                            __nv_bfloat16* out, float* lse, int64_t heads,
                                                            int64_t q_rows, int64_t len, int64_t pos,
                                                            int64_t block_rows, float inv_scale, uint64_t seed, float p,
                                                            float keep_scale) {
  __shared__ float ss[DISTILL_DEBERTA_STAGE];
  const DebertaBlock k = deberta_block(q_rows, block_rows);
  deberta_stage_p2c(ss, p2c + k.bh * len * pos, p2c_idx, k.i0, k.nr, (int)len, pos);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const float* mr = mask + (k.bh / heads) * len;
  for (int r = threadIdx.x / 32; r < k.nr; r += blockDim.x / 32) {
    const int64_t i = k.i0 + r, row = k.bh * q_rows + i;
    float* sr = ss + r * (len + 2);
    const float m = warp_max(deberta_row_scores(sr, qk + row * len, c2p + row * pos, c2p_idx + i * len, mr,
                                                (int)len, inv_scale));
    float s = 0.0f;
    for (int j = lane; j < len; j += 32) s += expf(sr[j] - m);
    const float l = m + logf(warp_sum(s));
    for (int j = lane; j < len; j += 32)
      out[row * len + j] = __float2bfloat16(expf(sr[j] - l) * keep_at(seed, p, keep_scale, row * len + j));
    if (lane == 0) lse[row] = l;
  }
}

// Its backward from dout (the dropped probabilities' gradient, bf16): with P recomputed from the
// log-sum-exp, dP = dout · keep, Δ = Σ_j P dP, dS = P (dP - Δ) / scale, the gradient of two of the
// three terms: dqk [rows, len] = dS (bf16) and dc2p [rows, pos] (bf16) = dS summed into the bucket
// c2p_idx[i, j] of each key (the warp's row, in shared memory). The third, p2c's, sums dS down the
// query rows: distill_deberta_p2c_grad_bf16 from dqk. pos <= 1,024.
#define DISTILL_DEBERTA_MAX_POS 1024
extern "C" __global__ void distill_deberta_probs_train_grad_bf16(
    const __nv_bfloat16* qk, const __nv_bfloat16* c2p, const __nv_bfloat16* p2c, const uint32_t* c2p_idx,
    const uint32_t* p2c_idx, const float* mask, const float* lse, const __nv_bfloat16* dout, __nv_bfloat16* dqk,
    __nv_bfloat16* dc2p, int64_t heads, int64_t q_rows, int64_t len, int64_t pos, int64_t block_rows,
    float inv_scale, uint64_t seed, float p, float keep_scale) {
  __shared__ float ss[DISTILL_DEBERTA_STAGE];
  __shared__ float acc[DISTILL_NORM_WARPS][DISTILL_DEBERTA_MAX_POS];
  const DebertaBlock k = deberta_block(q_rows, block_rows);
  deberta_stage_p2c(ss, p2c + k.bh * len * pos, p2c_idx, k.i0, k.nr, (int)len, pos);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  float* a = acc[threadIdx.x / 32];
  const float* mr = mask + (k.bh / heads) * len;
  for (int r = threadIdx.x / 32; r < k.nr; r += blockDim.x / 32) {
    const int64_t i = k.i0 + r, row = k.bh * q_rows + i;
    float* sr = ss + r * (len + 2);
    for (int c = lane; c < pos; c += 32) a[c] = 0.0f;
    __syncwarp();
    const uint32_t* ci = c2p_idx + i * len;
    deberta_row_scores(sr, qk + row * len, c2p + row * pos, ci, mr, (int)len, inv_scale);
    const float l = lse[row];
    const __nv_bfloat16* gr = dout + row * len;
    float d = 0.0f;
    for (int j = lane; j < len; j += 32) {
      const float pr = expf(sr[j] - l);
      sr[j] = pr;
      d += pr * __bfloat162float(gr[j]) * keep_at(seed, p, keep_scale, row * len + j);
    }
    d = warp_sum(d);
    for (int j = lane; j < len; j += 32) {
      const float dp = __bfloat162float(gr[j]) * keep_at(seed, p, keep_scale, row * len + j);
      const float ds = sr[j] * (dp - d) * inv_scale;
      dqk[row * len + j] = __float2bfloat16(ds);
      atomicAdd(&a[ci[j]], ds);
    }
    __syncwarp();
    for (int c = lane; c < pos; c += 32) dc2p[row * pos + c] = __float2bfloat16(a[c]);
    __syncwarp();
  }
}

// The p2c term's gradient dp2c [BH, len, pos] (bf16) = dS summed down the query rows into each
// key's buckets: dp2c[j, b] = Σ_i dS[i, j] over the rows i with p2c_idx[j, i] = b, from dS = dqk
// [BH, Q, len] as rounded to bf16 (as a bf16 autocast graph's gather backward adds it). A block
// takes key_block keys of one batch x head (key_block x pos <= DISTILL_DEBERTA_STAGE floats in
// shared memory), its threads key_block keys wide (dS read key_block x 2 bytes a row) and
// 128 / key_block rows deep; then writes the keys' rows of dp2c whole (contiguous). Where the
// backward used to add each dS into an f32 [BH, len, pos] with a global atomic (zeroed first,
// rounded to bf16 after: three passes over twice the output).
extern "C" __global__ void distill_deberta_p2c_grad_bf16(const __nv_bfloat16* dqk, const uint32_t* p2c_idx,
                                                         __nv_bfloat16* dp2c, int64_t q_rows, int64_t len, int64_t pos,
                                                         int64_t key_block) {
  __shared__ float acc[DISTILL_DEBERTA_STAGE];
  const int64_t per_bh = (len + key_block - 1) / key_block;
  const int64_t bh = blockIdx.x / per_bh, j0 = (blockIdx.x % per_bh) * key_block;
  const int nk = (int)(len - j0 < key_block ? len - j0 : key_block), kb = (int)key_block, n = nk * (int)pos;
  for (int t = threadIdx.x; t < n; t += blockDim.x) acc[t] = 0.0f;
  __syncthreads();
  const int jl = threadIdx.x % kb;
  if (jl < nk) {
    const int64_t j = j0 + jl;
    const __nv_bfloat16* g = dqk + bh * q_rows * len + j;
    const uint32_t* idx = p2c_idx + j * len;
    for (int64_t i = threadIdx.x / kb; i < q_rows; i += blockDim.x / kb)
      atomicAdd(&acc[jl * pos + idx[i]], __bfloat162float(g[i * len]));
  }
  __syncthreads();
  __nv_bfloat16* out = dp2c + (bh * len + j0) * pos;
  for (int t = threadIdx.x; t < n; t += blockDim.x) out[t] = __float2bfloat16(acc[t]);
}

// GeGLU's backward in training (x the bf16 product [rows, 2 inter], g the output's bf16 gradient
// [rows, inter], n = rows x inter): d input = g gate gelu'(input), d gate = g gelu(input), in f32,
// rounded to bf16 into dx [rows, 2 inter].
extern "C" __global__ void distill_geglu_grad_bf16(const __nv_bfloat16* g, const __nv_bfloat16* x, __nv_bfloat16* dx,
                                                   int64_t n, int64_t inter) {
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  if (vec8(inter, g, x, dx)) {
    for (int64_t v = first; v < n / 8; v += stride) {
      const int64_t row = v * 8 / inter, c0 = v * 8 - row * inter;
      float a[8], gate[8], gi[8], da[8], dg[8];
      load8(a, x + row * 2 * inter + c0, (const float*)nullptr);
      load8(gate, x + row * 2 * inter + inter + c0, (const float*)nullptr);
      load8(gi, g + v * 8, (const float*)nullptr);
      for (int j = 0; j < 8; ++j) {
        da[j] = gi[j] * gate[j] * gelu_erf_grad(a[j]);
        dg[j] = gi[j] * gelu_erf(a[j]);
      }
      store8_bf16(dx + row * 2 * inter + c0, da);
      store8_bf16(dx + row * 2 * inter + inter + c0, dg);
    }
    return;
  }
  for (int64_t i = first; i < n; i += stride) {
    int64_t row = i / inter, c = i % inter;
    float a = to_f32(x[row * 2 * inter + c]);
    float gate = to_f32(x[row * 2 * inter + inter + c]);
    float gi = to_f32(g[i]);
    dx[row * 2 * inter + c] = __float2bfloat16(gi * gate * gelu_erf_grad(a));
    dx[row * 2 * inter + inter + c] = __float2bfloat16(gi * gelu_erf(a));
  }
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

// Attention, flash-style: softmax(q kᵀ · scale + key bias) v without the [B, H, L, L] scores in
// memory, bf16 tensor-core tiles (wmma 16 x 16 x 16, f32 accumulation), the softmax kept online in
// f32. q, k, v [B, H, L, D] (bf16 for scoring; f32 in training, cast to bf16 as tiles enter shared
// memory, as autocast's matmuls do); bias [B, 1, 1, L] f32 (0, or <= -1e4 to mask the key out); window >= 0
// limits each query to keys within that distance (ModernBERT's local layers), -1 none. Out
// [B, L, H, D] (the heads already merged), bf16 for scoring, f32 in training. Training adds
// attention dropout (p > 0: probability (i, j) of head bh kept when uniform(seed, (bh L + i) L + j)
// >= p, the mask distill_dropout_f32 draws over materialised probabilities) and the row
// log-sum-exp `lse` [B, H, L] for the backward. A block of 4 warps takes 64 queries of one
// (batch, head), each warp 16; keys go through in tiles of 32 (K and V tiles in shared memory,
// shared by the warps). 1-D grid: blockIdx.x = (batch x heads) x query blocks + query block.
// The kernels that run it cap their registers (__launch_bounds__: 128 threads, so many blocks per
// multiprocessor), without spills: 4 blocks of at most 128 registers a thread for head size 64,
// 6 of 85 for 32 (5 of 102 for training's head size 32, which spilled at 85; shared memory would
// allow 7 and 10).
#define DISTILL_FA_WARPS 4
#define DISTILL_FA_QW 16
#define DISTILL_FA_KT 32

__device__ __forceinline__ __nv_bfloat16 to_bf16(float v) { return __float2bfloat16(v); }
__device__ __forceinline__ __nv_bfloat16 to_bf16(__nv_bfloat16 v) { return v; }
__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// A key bias at or below this masks the key out entirely (the masks are 0 or -1e9): added to a
// score it would leave only its f32 rounding (steps of 64 at 1e9), and a fully masked row would
// give exp(s - lse) of tens in the backward.
#define DISTILL_MASKED (-1.0e4f)

// Whether any of rows a0 .. a0 + na may attend any of b0 .. b0 + nb (window >= 0: within that
// distance; -1: all): a block skips the tiles wholly outside its window (ModernBERT's local layers,
// a window of 64 each side: at 256 tokens a block of 64 queries needs 6 of the 8 key tiles).
// The same for the whole block, so its barriers stay uniform.
__device__ __forceinline__ bool tile_in_window(int64_t a0, int64_t na, int64_t b0, int64_t nb, int64_t window) {
  return window < 0 || (b0 <= a0 + na - 1 + window && b0 + nb - 1 >= a0 - window);
}

// Whether query qi may attend key kj (inside the sequence and the window, not masked).
__device__ __forceinline__ bool attends(int64_t qi, int64_t kj, int64_t len, int64_t window, const float* bias) {
  return qi < len && kj < len && (window < 0 || (qi - kj <= window && kj - qi <= window)) && bias[kj] > DISTILL_MASKED;
}

// The dropout scale of probability (qi, kj) of head bh: 0 or 1 / (1 - p); 1 without dropout.
__device__ __forceinline__ float keep(uint64_t seed, float p, int64_t bh, int64_t qi, int64_t kj, int64_t len) {
  if (p <= 0.0f) return 1.0f;
  return uniform(seed, (uint64_t)((bh * len + qi) * len + kj)) >= p ? 1.0f / (1.0f - p) : 0.0f;
}

// bf16 tensor-core operands from shared memory (every tile the flash kernels multiply is
// __shared__): wmma.load with the .shared state space, which ptxas turns into one ldmatrix (LDSM)
// per tile. The C++ API's bf16 loads carry no state space and become eight generic 32-bit loads
// per tile, plus transposes for a row-major B. The emulator (no __CUDA_ARCH__) takes the API.
#ifdef __CUDA_ARCH__
#define DISTILL_LOAD_SHARED(ptx)                                                                           \
  int* r = reinterpret_cast<int*>(&f);                                                                   \
  asm volatile(ptx " {%0, %1, %2, %3}, [%4], %5;"                                                         \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                                          \
               : "r"((unsigned)__cvta_generic_to_shared(p)), "r"(ldm)                                    \
               : "memory");
#else
#define DISTILL_LOAD_SHARED(ptx) nvcuda::wmma::load_matrix_sync(f, p, ldm);
#endif
__device__ __forceinline__ void load_shared(
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>& f,
    const __nv_bfloat16* p, unsigned ldm) {
  DISTILL_LOAD_SHARED("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16")
}
__device__ __forceinline__ void load_shared(
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major>& f,
    const __nv_bfloat16* p, unsigned ldm) {
  DISTILL_LOAD_SHARED("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16")
}
__device__ __forceinline__ void load_shared(
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>& f,
    const __nv_bfloat16* p, unsigned ldm) {
  DISTILL_LOAD_SHARED("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16")
}

// out [16 x N] (f32, leading dimension ldo) = A [16 x D] · Bᵀ, with A and B [N x D] row-major bf16
// (leading dimensions LDA, LDB; Bᵀ read column-major from B): one warp, wmma tiles.
template <int D, int N, int LDA = D, int LDB = D>
__device__ void mma_abt(float* out, int ldo, const __nv_bfloat16* a, const __nv_bfloat16* b) {
  using namespace nvcuda;
  for (int n = 0; n < N / 16; ++n) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < D / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
      load_shared(fa, a + kk * 16, LDA);
      load_shared(fb, b + n * 16 * LDB + kk * 16, LDB);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + n * 16, acc, ldo, wmma::mem_row_major);
  }
}

// acc[n] += A [16 x K] · B [K x D] (columns 16 n ..), A and B row-major bf16 (leading dimensions
// LDA, LDB): one warp, wmma tiles.
template <int K, int D, int LDA = K, int LDB = D>
__device__ void mma_ab_acc(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>* acc,
                           const __nv_bfloat16* a, const __nv_bfloat16* b) {
  using namespace nvcuda;
  for (int n = 0; n < D / 16; ++n)
    for (int kk = 0; kk < K / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
      load_shared(fa, a + kk * 16, LDA);
      load_shared(fb, b + kk * 16 * LDB + n * 16, LDB);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
}

// An element of q, k or v as it enters shared memory: bf16, with its column's bias added first
// (in f32, then rounded: what a bf16 bias add before the split gives) where there is one.
template <class TI>
__device__ __forceinline__ __nv_bfloat16 tile_bf16(TI x, const float* bias, int64_t c) {
  return bias ? __float2bfloat16(to_f32(x) + bias[c]) : to_bf16(x);
}

// An element c of a query or key row as it enters shared memory, with rotary embeddings where
// rope (cos [len, D] then sin [len, D], f32) is given: the biased value and its partner c ± D/2
// rounded to bf16 as the product would be, rotated in f32 (x cos + rotate_half(x) sin, with
// rotate_half(x) = [-x2, x1]) and rounded again, as the composite (the bf16 product, then the
// rotation in f32, back to bf16) gives.
template <int D, class TI>
__device__ __forceinline__ __nv_bfloat16 tile_rope(const TI* row, const float* bias, int64_t c, const float* rope,
                                                   int64_t pos, int64_t len) {
  if (!rope) return tile_bf16(row[c], bias, c);
  const int64_t h = D / 2, o = c < h ? c + h : c - h;
  const float x = to_f32(tile_bf16(row[c], bias, c)), y = to_f32(tile_bf16(row[o], bias, o));
  return __float2bfloat16(x * rope[pos * D + c] + (c < h ? -y : y) * rope[(len + pos) * D + c]);
}

// Rows row0 .. row0 + nrows of a (batch, head)'s q, k or v (`base`, rows rs elements apart, D
// wide) into a bf16 tile (rows LQ apart), each element as tile_rope gives it (its column's bias,
// rotated where rope is given; rope null for v), zeros past len. bf16 rows that start 16-byte
// aligned go 8 elements a load (a quarter of the instructions of one a load); others one a load.
template <int D, int LQ, class TI>
__device__ void load_rows(__nv_bfloat16* tile, int nrows, const TI* base, int64_t rs, int64_t row0, int64_t len,
                          const float* bias, const float* rope) {
  if constexpr (sizeof(TI) == 2) {
    if ((uintptr_t)base % 16 == 0 && rs % 8 == 0) {
      constexpr int h = D / 2;
      for (int i = threadIdx.x; i < nrows * (D / 8); i += blockDim.x) {
        const int rr = i / (D / 8), c0 = i % (D / 8) * 8;
        const int64_t row = row0 + rr;
        float x[8];
        if (row < len) {
          const TI* src = base + row * rs;
          load8(x, src + c0, bias ? bias + c0 : nullptr);
          if (rope) {
            const int o = c0 < h ? c0 + h : c0 - h;
            float y[8];
            load8(y, src + o, bias ? bias + o : nullptr);
            for (int j = 0; j < 8; ++j) {
              const int c = c0 + j;
              x[j] = x[j] * rope[row * D + c] + (c < h ? -y[j] : y[j]) * rope[(len + row) * D + c];
            }
          }
        } else {
          for (int j = 0; j < 8; ++j) x[j] = 0.0f;
        }
        store8_bf16(tile + rr * LQ + c0, x);
      }
      return;
    }
  }
  const __nv_bfloat16 zero = __float2bfloat16(0.0f);
  for (int i = threadIdx.x; i < nrows * D; i += blockDim.x) {
    const int64_t row = row0 + i / D;
    tile[i / D * LQ + i % D] = row < len ? tile_rope<D>(base + row * rs, bias, i % D, rope, row, len) : zero;
  }
}

// q, k, v either [B, H, L, D] each (packed = 0), or one linear layer's output [B, L, 3, H, D]
// (packed = 1: q points at it, k and v are ignored) with its bias qkv_bias [3, H, D] (or null)
// added as the tiles load: BERT's joined query/key/value product read in place, without the
// bias pass and the three head-split copies. With rope (packed only; or null): q and k rotated
// as they load (ModernBERT's Wqkv product, without the rotation's passes and the split copies).
template <int D, class TI, class TO>
__device__ void flash_forward(const TI* q, const TI* k, const TI* v, const float* qkv_bias, int64_t packed,
                              const float* rope, const float* bias, TO* out, float* lse, int64_t heads, int64_t len,
                              float scale, int64_t window, uint64_t seed, float p) {
  using namespace nvcuda;
  constexpr int W = DISTILL_FA_WARPS, QW = DISTILL_FA_QW, KT = DISTILL_FA_KT;
  static_assert(KT == 32, "a lane holds 16 scores: half a key tile");
  // Rows in shared memory padded, so that the rows an ldmatrix, an accumulator store or a lane's
  // 16-byte loads touch together fall in different banks (unpadded, rows 128 or 64 bytes apart
  // share theirs): LQ for the bf16 tiles, LS for a warp's f32 scores; its bf16 probabilities P
  // reuse that space, rows LP bf16 apart (the scores are in registers by then), and so does the
  // output on its way out.
  constexpr int LQ = D + 8, LS = KT + 4, LP = KT + 8;
  __shared__ __align__(32) __nv_bfloat16 qs[W * QW * LQ];
  __shared__ __align__(32) __nv_bfloat16 ks[KT * LQ];
  __shared__ __align__(32) __nv_bfloat16 vs[KT * LQ];
  __shared__ __align__(32) float ss[W][QW * LS];
  __shared__ __align__(32) float row_of[16 * 16];
  __shared__ float ms[W][QW], ls[W][QW], as[W][QW];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __nv_bfloat16* ps = reinterpret_cast<__nv_bfloat16*>(ss[warp]);
  const int64_t qblocks = (len + W * QW - 1) / (W * QW);
  const int64_t bh = blockIdx.x / qblocks, batch = bh / heads, head = bh % heads;
  const int64_t q0 = (blockIdx.x % qblocks) * (W * QW);
  const int64_t hd = heads * D;
  // Each (batch, head)'s rows: where they start, how far apart; the bias of its columns.
  const int64_t rs = packed ? 3 * hd : D;
  const TI* qb = packed ? q + batch * len * 3 * hd + head * D : q + bh * len * D;
  const TI* kb = packed ? qb + hd : k + bh * len * D;
  const TI* vb = packed ? qb + 2 * hd : v + bh * len * D;
  const float* qbias = qkv_bias ? qkv_bias + head * D : nullptr;
  const float* kbias = qkv_bias ? qkv_bias + hd + head * D : nullptr;
  const float* vbias = qkv_bias ? qkv_bias + 2 * hd + head * D : nullptr;
  const float* bb = bias + batch * len;

  load_rows<D, LQ>(qs, W * QW, qb, rs, q0, len, qbias, rope);
  for (int i = threadIdx.x; i < 16 * 16; i += blockDim.x) row_of[i] = (float)(i / 16);
  if (lane < QW) {
    ms[warp][lane] = -INFINITY;
    ls[warp][lane] = 0.0f;
  }
  __syncthreads();

  // The output O stays in the warp's accumulators from tile to tile. wmma leaves which element
  // of a 16 x 16 tile a lane's fragment element holds unspecified, but the same for every
  // fragment of a type: a fragment loaded from a tile of row numbers tells each element's row,
  // for the rescaling by exp(old max - new max) and the final 1 / sum, per row.
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> rows, acc[D / 16];
  wmma::load_matrix_sync(rows, row_of, 16, wmma::mem_row_major);
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);

  // Two lanes per query row, each over half of a key tile.
  const int r = lane / 2, half = lane % 2;
  const int64_t qi = q0 + warp * QW + r;
  for (int64_t k0 = 0; k0 < len; k0 += KT) {
    if (!tile_in_window(q0, W * QW, k0, KT, window)) continue;
    load_rows<D, LQ>(ks, KT, kb, rs, k0, len, kbias, rope);
    load_rows<D, LQ>(vs, KT, vb, rs, k0, len, vbias, (const float*)nullptr);
    __syncthreads();

    // S = Q Kᵀ for this warp's 16 queries and the tile's 32 keys.
    mma_abt<D, KT, LQ, LQ>(ss[warp], LS, qs + warp * QW * LQ, ks);
    __syncwarp();

    // Online softmax: the row's new max, P = exp(s - max) (bf16, dropped out, for the next
    // product), the running sum (of the kept and the dropped) and the factor exp(old max - new
    // max) for the output so far.
    float sv[KT / 2];
    load16(sv, ss[warp] + r * LS + half * (KT / 2));
    float mx = -INFINITY;
    for (int c = 0; c < KT / 2; ++c) {
      int64_t kj = k0 + half * (KT / 2) + c;
      sv[c] = attends(qi, kj, len, window, bb) ? sv[c] * scale + bb[kj] : -INFINITY;
      mx = fmaxf(mx, sv[c]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_old = ms[warp][r];
    // Every lane's scores and the pair's old max are read past this barrier: P and the new max
    // may overwrite them (a shuffle orders no memory).
    __syncwarp();
    const float m_new = fmaxf(m_old, mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    float sum = 0.0f;
    for (int c = 0; c < KT / 2; ++c) {
      int64_t kj = k0 + half * (KT / 2) + c;
      float e = sv[c] == -INFINITY ? 0.0f : expf(sv[c] - m_use);
      sum += e;
      sv[c] = e == 0.0f ? 0.0f : e * keep(seed, p, bh, qi, kj, len);
    }
    store16_bf16(ps + r * LP + half * (KT / 2), sv);
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_use);
    if (half == 0) {
      ms[warp][r] = m_new;
      ls[warp][r] = ls[warp][r] * alpha + sum;
      as[warp][r] = alpha;
    }
    __syncwarp();

    // O = O · alpha (per row) + P V
    for (int e = 0; e < rows.num_elements; ++e) {
      const float f = as[warp][(int)rows.x[e]];
      for (int n = 0; n < D / 16; ++n) acc[n].x[e] *= f;
    }
    mma_ab_acc<KT, D, LP, LQ>(acc, ps, vs);
    // The tile's K and V are overwritten next.
    __syncthreads();
  }

  // O / sum (one division per fragment element, D / 16 products), out through the warp's score
  // space a 16 x 16 tile at a time.
  for (int e = 0; e < rows.num_elements; ++e) {
    const float l = ls[warp][(int)rows.x[e]], inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int n = 0; n < D / 16; ++n) acc[n].x[e] *= inv;
  }
  float* stage = ss[warp];
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(stage, acc[n], 16, wmma::mem_row_major);
    __syncwarp();
    for (int i = lane; i < 16 * 16; i += 32) {
      int64_t qrow = q0 + warp * QW + i / 16;
      if (qrow < len) store_out(&out[((batch * len + qrow) * heads + head) * D + n * 16 + i % 16], stage[i]);
    }
    __syncwarp();
  }
  if (lse && lane < QW && q0 + warp * QW + lane < len) {
    float m = ms[warp][lane], l = ls[warp][lane];
    lse[bh * len + q0 + warp * QW + lane] = l > 0.0f ? (m == -INFINITY ? 0.0f : m) + logf(l) : INFINITY;
  }
}

extern "C" __global__ void __launch_bounds__(128, 6) distill_flash_attention_d32_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                            const __nv_bfloat16* v, const float* bias,
                                                            __nv_bfloat16* out, int64_t heads, int64_t len,
                                                            float scale, int64_t window) {
  flash_forward<32>(q, k, v, (const float*)nullptr, 0, (const float*)nullptr, bias, out, (float*)nullptr, heads, len, scale, window, 0, 0.0f);
}

extern "C" __global__ void __launch_bounds__(128, 4) distill_flash_attention_d64_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                            const __nv_bfloat16* v, const float* bias,
                                                            __nv_bfloat16* out, int64_t heads, int64_t len,
                                                            float scale, int64_t window) {
  flash_forward<64>(q, k, v, (const float*)nullptr, 0, (const float*)nullptr, bias, out, (float*)nullptr, heads, len, scale, window, 0, 0.0f);
}

extern "C" __global__ void __launch_bounds__(128, 6) distill_flash_attention_packed_d32_bf16(const __nv_bfloat16* qkv, const float* qkv_bias,
                                                                   const float* bias, __nv_bfloat16* out, int64_t heads,
                                                                   int64_t len, float scale, int64_t window) {
  flash_forward<32>(qkv, qkv, qkv, qkv_bias, 1, (const float*)nullptr, bias, out, (float*)nullptr, heads, len, scale, window, 0, 0.0f);
}

extern "C" __global__ void __launch_bounds__(128, 4) distill_flash_attention_packed_d64_bf16(const __nv_bfloat16* qkv, const float* qkv_bias,
                                                                   const float* bias, __nv_bfloat16* out, int64_t heads,
                                                                   int64_t len, float scale, int64_t window) {
  flash_forward<64>(qkv, qkv, qkv, qkv_bias, 1, (const float*)nullptr, bias, out, (float*)nullptr, heads, len, scale, window, 0, 0.0f);
}

// The packed attention with rotary embeddings on q and k (rope [2, len, D]: cos, sin).
// (Written out: the emulator's build reads the kernel names from these definitions.)
extern "C" __global__ void __launch_bounds__(128, 6) distill_flash_attention_packed_rope_d32_bf16(const __nv_bfloat16* qkv,
                                                                        const float* qkv_bias, const float* rope,
                                                                        const float* bias, __nv_bfloat16* out,
                                                                        int64_t heads, int64_t len, float scale,
                                                                        int64_t window) {
  flash_forward<32>(qkv, qkv, qkv, qkv_bias, 1, rope, bias, out, (float*)nullptr, heads, len, scale, window, 0, 0.0f);
}

extern "C" __global__ void __launch_bounds__(128, 4) distill_flash_attention_packed_rope_d64_bf16(const __nv_bfloat16* qkv,
                                                                        const float* qkv_bias, const float* rope,
                                                                        const float* bias, __nv_bfloat16* out,
                                                                        int64_t heads, int64_t len, float scale,
                                                                        int64_t window) {
  flash_forward<64>(qkv, qkv, qkv, qkv_bias, 1, rope, bias, out, (float*)nullptr, heads, len, scale, window, 0, 0.0f);
}

extern "C" __global__ void __launch_bounds__(128, 6) distill_flash_attention_train_d32_f32(const float* q, const float* k, const float* v,
                                                                 const float* bias, float* out, float* lse,
                                                                 int64_t heads, int64_t len, float scale,
                                                                 int64_t window, uint64_t seed, float p) {
  flash_forward<32>(q, k, v, (const float*)nullptr, 0, (const float*)nullptr, bias, out, lse, heads, len, scale, window, seed, p);
}

extern "C" __global__ void __launch_bounds__(128, 4) distill_flash_attention_train_d64_f32(const float* q, const float* k, const float* v,
                                                                 const float* bias, float* out, float* lse,
                                                                 int64_t heads, int64_t len, float scale,
                                                                 int64_t window, uint64_t seed, float p) {
  flash_forward<64>(q, k, v, (const float*)nullptr, 0, (const float*)nullptr, bias, out, lse, heads, len, scale, window, seed, p);
}

// The backward of the training attention, FA2-style, P recomputed from the log-sum-exp:
// with Z the dropout scale, dP = (dO vᵀ) Z, dS = P (dP - Δ) where Δ_i = dO_i · O_i, then
// dQ = scale dS K, dK = scale dSᵀ Q, dV = (P Z)ᵀ dO. Two kernels: per query block, dQ (and Δ for the
// second); per key block, dK and dV. O and dO are [B, L, H, D] (merged heads); lse, delta
// [B, H, L] f32. Either q, k, v, dq, dk, dv [B, H, L, D] f32 (packed = 0; O and dO f32), or
// (packed = 1) q the joined product [B, L, 3, H, D] bf16 read with its bias qkv_bias [3, H, D] (or
// null) as the forward reads it, O and dO bf16, and the gradients written into dq, the joined
// product's gradient [B, L, 3, H, D] bf16 (each kernel its own parts: dQ, or dK and dV), the bias's
// gradient left to a column sum of it.

// Stores a warp's 16 x D accumulators (x scale) to rows row0.. of dst (rows `stride` apart, D
// wide) through the warp's 16 x 32 staging tile, skipping rows past len.
template <int D, class TG>
__device__ void store_rows(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>* acc, float* stage,
                           TG* dst, int64_t stride, int64_t row0, int64_t len, float scale, int lane) {
  using namespace nvcuda;
  for (int n2 = 0; n2 < D / 32; ++n2) {
    wmma::store_matrix_sync(stage, acc[2 * n2], 32, wmma::mem_row_major);
    wmma::store_matrix_sync(stage + 16, acc[2 * n2 + 1], 32, wmma::mem_row_major);
    __syncwarp();
    for (int i = lane; i < 16 * 32; i += 32) {
      int64_t row = row0 + i / 32;
      if (row < len) store_out(&dst[row * stride + n2 * 32 + i % 32], stage[i] * scale);
    }
    __syncwarp();
  }
}

// Where (batch, head)'s rows of q, k, v (or their gradients) start in a packed or split layout,
// and how far apart its rows are.
struct HeadRows {
  int64_t q, k, v, stride;
};
__device__ __forceinline__ HeadRows head_rows(int64_t packed, int64_t batch, int64_t head, int64_t heads,
                                              int64_t len, int64_t D) {
  const int64_t hd = heads * D;
  if (packed) {
    const int64_t q = batch * len * 3 * hd + head * D;
    return {q, q + hd, q + 2 * hd, 3 * hd};
  }
  const int64_t at = (batch * heads + head) * len * D;
  return {at, at, at, D};
}

// As store_rows, with rotary embeddings undone first (rope: cos [len, D] then sin [len, D]): the
// gradient of a rotated row r (r_c = x_c cos_c + rotate_half(x)_c sin_c) with respect to x is
// dx_c = dr_c cos_c + (c < D/2 ? dr_{c+D/2} sin_{c+D/2} : -dr_{c-D/2} sin_{c-D/2}). The warp's
// whole 16 x D tile goes through `stage` (16 x D floats).
template <int D, class TG>
__device__ void store_rows_rope(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>* acc, float* stage,
                                TG* dst, int64_t stride, int64_t row0, int64_t len, float scale, int lane,
                                const float* rope) {
  using namespace nvcuda;
  for (int n = 0; n < D / 16; ++n) wmma::store_matrix_sync(stage + n * 16, acc[n], D, wmma::mem_row_major);
  __syncwarp();
  constexpr int H = D / 2;
  for (int i = lane; i < 16 * D; i += 32) {
    const int r = i / D, c = i % D;
    const int64_t row = row0 + r;
    if (row >= len) continue;
    const float* cs = rope + row * D;
    const float* sn = rope + (len + row) * D;
    const float dr = c < H ? stage[r * D + c + H] * sn[c + H] : -stage[r * D + c - H] * sn[c - H];
    store_out(&dst[row * stride + c], (stage[i] * cs[c] + dr) * scale);
  }
  __syncwarp();
}

// The score tile of a backward kernel, rows LS = KT + 4 floats apart (a lane's 16-byte loads of
// its half row in different banks from its quarter warp's: load16), which also stages the
// gradients on their way out: 16 x 32 floats, or 16 x D where rotary embeddings are undone (the
// whole row at once).
template <int D, bool ROPE>
struct Stage {
  static constexpr int LS = DISTILL_FA_KT + 4;
  static constexpr int size = DISTILL_FA_QW * (ROPE && D > LS ? D : LS);
  // bf16 tiles: rows padded by 8 (ldmatrix rows in different banks) where shared memory allows
  // (the dK/dV kernel of head size 64 with rotary embeddings would pass 48 KB).
  static constexpr int LQ = ROPE && D == 64 ? D : D + 8;
  // A warp's bf16 dS or P tile, rows LP apart (16-byte aligned, ldmatrix rows in different banks).
  static constexpr int LP = DISTILL_FA_KT + 8;
};

template <int D, bool ROPE = false, class TI, class TG>
__device__ void flash_backward_dq(const TI* q, const TI* k, const TI* v, const float* qkv_bias, int64_t packed,
                                  const float* rope, const float* bias, const TG* o, const TG* dout, const float* lse, TG* dq,
                                  float* delta, int64_t heads, int64_t len, float scale, int64_t window,
                                  uint64_t seed, float p) {
  using namespace nvcuda;
  constexpr int W = DISTILL_FA_WARPS, QW = DISTILL_FA_QW, KT = DISTILL_FA_KT;
  constexpr int LS = Stage<D, ROPE>::LS, LQ = Stage<D, ROPE>::LQ, LP = Stage<D, ROPE>::LP;
  __shared__ __align__(32) __nv_bfloat16 qs[W * QW * LQ];
  __shared__ __align__(32) __nv_bfloat16 dos[W * QW * LQ];
  __shared__ __align__(32) __nv_bfloat16 ks[KT * LQ];
  __shared__ __align__(32) __nv_bfloat16 vs[KT * LQ];
  __shared__ __align__(32) float sb[W][Stage<D, ROPE>::size];
  __shared__ __align__(32) __nv_bfloat16 dsb[W][QW * LP];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t qblocks = (len + W * QW - 1) / (W * QW);
  const int64_t bh = blockIdx.x / qblocks, batch = bh / heads, head = bh % heads;
  const int64_t q0 = (blockIdx.x % qblocks) * (W * QW);
  const float* bb = bias + batch * len;
  const HeadRows hr = head_rows(packed, batch, head, heads, len, D);
  const TI *qb = q + hr.q, *kb = (packed ? q : k) + hr.k, *vb = (packed ? q : v) + hr.v;
  const int64_t rs = hr.stride, hd = heads * D;
  const float* qbias = qkv_bias ? qkv_bias + head * D : nullptr;
  const float* kbias = qkv_bias ? qkv_bias + hd + head * D : nullptr;
  const float* vbias = qkv_bias ? qkv_bias + 2 * hd + head * D : nullptr;

  load_rows<D, LQ>(qs, W * QW, qb, rs, q0, len, qbias, rope);
  load_rows<D, LQ>(dos, W * QW, dout + (batch * len * heads + head) * D, heads * D, q0, len, (const float*)nullptr,
                   (const float*)nullptr);
  // Δ_i = dO_i · O_i in f32, two lanes per row.
  const int r = lane / 2, half = lane % 2;
  const int64_t qi = q0 + warp * QW + r;
  float dlt = 0.0f;
  if (qi < len)
    for (int c = half * (D / 2); c < (half + 1) * (D / 2); ++c) {
      int64_t at = ((batch * len + qi) * heads + head) * D + c;
      dlt += to_f32(dout[at]) * to_f32(o[at]);
    }
  dlt += __shfl_xor_sync(0xffffffffu, dlt, 1);
  if (half == 0 && qi < len) delta[bh * len + qi] = dlt;
  const float lse_i = qi < len ? lse[bh * len + qi] : INFINITY;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_dq[D / 16];
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(acc_dq[n], 0.0f);
  __syncthreads();

  for (int64_t k0 = 0; k0 < len; k0 += KT) {
    if (!tile_in_window(q0, W * QW, k0, KT, window)) continue;
    load_rows<D, LQ>(ks, KT, kb, rs, k0, len, kbias, rope);
    load_rows<D, LQ>(vs, KT, vb, rs, k0, len, vbias, (const float*)nullptr);
    __syncthreads();
    // S = Q Kᵀ, then P from the log-sum-exp (registers).
    mma_abt<D, KT, LQ, LQ>(sb[warp], LS, qs + warp * QW * LQ, ks);
    __syncwarp();
    float pv[KT / 2], ds[KT / 2];
    load16(pv, sb[warp] + r * LS + half * (KT / 2));
    for (int c = 0; c < KT / 2; ++c) {
      int64_t kj = k0 + half * (KT / 2) + c;
      pv[c] = attends(qi, kj, len, window, bb) ? expf(pv[c] * scale + bb[kj] - lse_i) : 0.0f;
    }
    __syncwarp();
    // dO Vᵀ
    mma_abt<D, KT, LQ, LQ>(sb[warp], LS, dos + warp * QW * LQ, vs);
    __syncwarp();
    load16(ds, sb[warp] + r * LS + half * (KT / 2));
    for (int c = 0; c < KT / 2; ++c) {
      int64_t kj = k0 + half * (KT / 2) + c;
      ds[c] = pv[c] * (ds[c] * keep(seed, p, bh, qi, kj, len) - dlt);
    }
    store16_bf16(dsb[warp] + r * LP + half * (KT / 2), ds);
    __syncwarp();
    // dQ += dS K
    mma_ab_acc<KT, D, LP, LQ>(acc_dq, dsb[warp], ks);
    __syncthreads();
  }
  if (ROPE)
    store_rows_rope<D>(acc_dq, sb[warp], dq + hr.q, rs, q0 + warp * QW, len, scale, lane, rope);
  else
    store_rows<D>(acc_dq, sb[warp], dq + hr.q, rs, q0 + warp * QW, len, scale, lane);
}

template <int D, bool ROPE = false, class TI, class TG>
__device__ void flash_backward_dkv(const TI* q, const TI* k, const TI* v, const float* qkv_bias, int64_t packed,
                                   const float* rope, const float* bias, const TG* dout, const float* lse, const float* delta, TG* dk,
                                   TG* dv, int64_t heads, int64_t len, float scale, int64_t window, uint64_t seed,
                                   float p) {
  using namespace nvcuda;
  constexpr int W = DISTILL_FA_WARPS, KW = DISTILL_FA_QW, QT = DISTILL_FA_KT;
  constexpr int LS = Stage<D, ROPE>::LS, LQ = Stage<D, ROPE>::LQ, LP = Stage<D, ROPE>::LP;
  __shared__ __align__(32) __nv_bfloat16 ks[W * KW * LQ];
  __shared__ __align__(32) __nv_bfloat16 vs[W * KW * LQ];
  __shared__ __align__(32) __nv_bfloat16 qs[QT * LQ];
  __shared__ __align__(32) __nv_bfloat16 dos[QT * LQ];
  __shared__ __align__(32) float sb[W][Stage<D, ROPE>::size];
  __shared__ __align__(32) __nv_bfloat16 pb[W][KW * LP];
  __shared__ float lse_t[QT], delta_t[QT];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t kblocks = (len + W * KW - 1) / (W * KW);
  const int64_t bh = blockIdx.x / kblocks, batch = bh / heads, head = bh % heads;
  const int64_t k0 = (blockIdx.x % kblocks) * (W * KW);
  const HeadRows hr = head_rows(packed, batch, head, heads, len, D);
  const TI *qb = q + hr.q, *kb = (packed ? q : k) + hr.k, *vb = (packed ? q : v) + hr.v;
  const int64_t rs = hr.stride, hd = heads * D;
  const float* qbias = qkv_bias ? qkv_bias + head * D : nullptr;
  const float* kbias = qkv_bias ? qkv_bias + hd + head * D : nullptr;
  const float* vbias = qkv_bias ? qkv_bias + 2 * hd + head * D : nullptr;

  load_rows<D, LQ>(ks, W * KW, kb, rs, k0, len, kbias, rope);
  load_rows<D, LQ>(vs, W * KW, vb, rs, k0, len, vbias, (const float*)nullptr);
  // Two lanes per key row (this warp's 16 keys), each over half of a query tile.
  const int r = lane / 2, half = lane % 2;
  const int64_t kj = k0 + warp * KW + r;
  const float bias_j = kj < len ? bias[batch * len + kj] : 0.0f;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_dk[D / 16], acc_dv[D / 16];
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(acc_dk[n], 0.0f);
    wmma::fill_fragment(acc_dv[n], 0.0f);
  }
  __syncthreads();

  for (int64_t t0 = 0; t0 < len; t0 += QT) {
    if (!tile_in_window(k0, W * KW, t0, QT, window)) continue;
    load_rows<D, LQ>(qs, QT, qb, rs, t0, len, qbias, rope);
    load_rows<D, LQ>(dos, QT, dout + (batch * len * heads + head) * D, heads * D, t0, len, (const float*)nullptr,
                     (const float*)nullptr);
    for (int i = threadIdx.x; i < QT; i += blockDim.x) {
      lse_t[i] = t0 + i < len ? lse[bh * len + t0 + i] : INFINITY;
      delta_t[i] = t0 + i < len ? delta[bh * len + t0 + i] : 0.0f;
    }
    __syncthreads();
    // Sᵀ = K Qᵀ for this warp's 16 keys and the tile's 32 queries.
    mma_abt<D, QT, LQ, LQ>(sb[warp], LS, ks + warp * KW * LQ, qs);
    __syncwarp();
    float pv[QT / 2], zv[QT / 2], t[QT / 2];
    load16(pv, sb[warp] + r * LS + half * (QT / 2));
    for (int c = 0; c < QT / 2; ++c) {
      int cc = half * (QT / 2) + c;
      int64_t qi = t0 + cc;
      pv[c] = attends(qi, kj, len, window, bias + batch * len) ? expf(pv[c] * scale + bias_j - lse_t[cc]) : 0.0f;
      zv[c] = qi < len && kj < len ? keep(seed, p, bh, qi, kj, len) : 0.0f;
      t[c] = pv[c] * zv[c];
    }
    store16_bf16(pb[warp] + r * LP + half * (QT / 2), t);
    __syncwarp();
    // dV += (P Z)ᵀ dO
    mma_ab_acc<QT, D, LP, LQ>(acc_dv, pb[warp], dos);
    // dPᵀ = V dOᵀ
    mma_abt<D, QT, LQ, LQ>(sb[warp], LS, vs + warp * KW * LQ, dos);
    __syncwarp();
    load16(t, sb[warp] + r * LS + half * (QT / 2));
    for (int c = 0; c < QT / 2; ++c) t[c] = pv[c] * (t[c] * zv[c] - delta_t[half * (QT / 2) + c]);
    store16_bf16(pb[warp] + r * LP + half * (QT / 2), t);
    __syncwarp();
    // dK += dSᵀ Q
    mma_ab_acc<QT, D, LP, LQ>(acc_dk, pb[warp], qs);
    __syncthreads();
  }
  // Packed, dk and dv are both the joined gradient, with the key and value parts' offsets.
  if (ROPE)
    store_rows_rope<D>(acc_dk, sb[warp], dk + hr.k, rs, k0 + warp * KW, len, scale, lane, rope);
  else
    store_rows<D>(acc_dk, sb[warp], dk + hr.k, rs, k0 + warp * KW, len, scale, lane);
  store_rows<D>(acc_dv, sb[warp], dv + hr.v, rs, k0 + warp * KW, len, 1.0f, lane);
}

extern "C" __global__ void distill_flash_attention_dq_d32_f32(const float* q, const float* k, const float* v,
                                                              const float* bias, const float* o, const float* dout,
                                                              const float* lse, float* dq, float* delta, int64_t heads,
                                                              int64_t len, float scale, int64_t window, uint64_t seed,
                                                              float p) {
  flash_backward_dq<32>(q, k, v, (const float*)nullptr, 0, (const float*)nullptr, bias, o, dout, lse, dq, delta, heads, len, scale, window,
                        seed, p);
}

extern "C" __global__ void distill_flash_attention_dq_d64_f32(const float* q, const float* k, const float* v,
                                                              const float* bias, const float* o, const float* dout,
                                                              const float* lse, float* dq, float* delta, int64_t heads,
                                                              int64_t len, float scale, int64_t window, uint64_t seed,
                                                              float p) {
  flash_backward_dq<64>(q, k, v, (const float*)nullptr, 0, (const float*)nullptr, bias, o, dout, lse, dq, delta, heads, len, scale, window,
                        seed, p);
}

extern "C" __global__ void distill_flash_attention_dkv_d32_f32(const float* q, const float* k, const float* v,
                                                               const float* bias, const float* dout, const float* lse,
                                                               const float* delta, float* dk, float* dv,
                                                               int64_t heads, int64_t len, float scale,
                                                               int64_t window, uint64_t seed, float p) {
  flash_backward_dkv<32>(q, k, v, (const float*)nullptr, 0, (const float*)nullptr, bias, dout, lse, delta, dk, dv, heads, len, scale,
                         window, seed, p);
}

extern "C" __global__ void distill_flash_attention_dkv_d64_f32(const float* q, const float* k, const float* v,
                                                               const float* bias, const float* dout, const float* lse,
                                                               const float* delta, float* dk, float* dv,
                                                               int64_t heads, int64_t len, float scale,
                                                               int64_t window, uint64_t seed, float p) {
  flash_backward_dkv<64>(q, k, v, (const float*)nullptr, 0, (const float*)nullptr, bias, dout, lse, delta, dk, dv, heads, len, scale,
                         window, seed, p);
}

// The training attention from a joined product (packed): (qkv [B, L, 3, H, D] bf16, its bias [3 H D]
// f32 or null) -> out [B, L, H, D] bf16 and lse; its backward into dqkv [B, L, 3, H, D] bf16.
extern "C" __global__ void __launch_bounds__(128, 5) distill_flash_attention_train_packed_d32_bf16(const __nv_bfloat16* qkv, const float* qkv_bias,
                                                                        const float* bias, __nv_bfloat16* out,
                                                                        float* lse, int64_t heads, int64_t len,
                                                                        float scale, int64_t window, uint64_t seed,
                                                                        float p) {
  flash_forward<32>(qkv, qkv, qkv, qkv_bias, 1, (const float*)nullptr, bias, out, lse, heads, len, scale, window, seed, p);
}

extern "C" __global__ void distill_flash_attention_dq_packed_d32_bf16(const __nv_bfloat16* qkv, const float* qkv_bias,
                                                                     const float* bias, const __nv_bfloat16* o,
                                                                     const __nv_bfloat16* dout, const float* lse,
                                                                     __nv_bfloat16* dqkv, float* delta, int64_t heads,
                                                                     int64_t len, float scale, int64_t window,
                                                                     uint64_t seed, float p) {
  flash_backward_dq<32>(qkv, qkv, qkv, qkv_bias, 1, (const float*)nullptr, bias, o, dout, lse, dqkv, delta, heads, len, scale, window, seed, p);
}

extern "C" __global__ void distill_flash_attention_dkv_packed_d32_bf16(const __nv_bfloat16* qkv, const float* qkv_bias,
                                                                      const float* bias, const __nv_bfloat16* dout,
                                                                      const float* lse, const float* delta,
                                                                      __nv_bfloat16* dqkv, int64_t heads, int64_t len,
                                                                      float scale, int64_t window, uint64_t seed,
                                                                      float p) {
  flash_backward_dkv<32>(qkv, qkv, qkv, qkv_bias, 1, (const float*)nullptr, bias, dout, lse, delta, dqkv, dqkv, heads, len, scale, window, seed,
                         p);
}

// The training attention from a joined product (packed): (qkv [B, L, 3, H, D] bf16, its bias [3 H D]
// f32 or null) -> out [B, L, H, D] bf16 and lse; its backward into dqkv [B, L, 3, H, D] bf16.
extern "C" __global__ void __launch_bounds__(128, 4) distill_flash_attention_train_packed_d64_bf16(const __nv_bfloat16* qkv, const float* qkv_bias,
                                                                        const float* bias, __nv_bfloat16* out,
                                                                        float* lse, int64_t heads, int64_t len,
                                                                        float scale, int64_t window, uint64_t seed,
                                                                        float p) {
  flash_forward<64>(qkv, qkv, qkv, qkv_bias, 1, (const float*)nullptr, bias, out, lse, heads, len, scale, window, seed, p);
}

extern "C" __global__ void distill_flash_attention_dq_packed_d64_bf16(const __nv_bfloat16* qkv, const float* qkv_bias,
                                                                     const float* bias, const __nv_bfloat16* o,
                                                                     const __nv_bfloat16* dout, const float* lse,
                                                                     __nv_bfloat16* dqkv, float* delta, int64_t heads,
                                                                     int64_t len, float scale, int64_t window,
                                                                     uint64_t seed, float p) {
  flash_backward_dq<64>(qkv, qkv, qkv, qkv_bias, 1, (const float*)nullptr, bias, o, dout, lse, dqkv, delta, heads, len, scale, window, seed, p);
}

extern "C" __global__ void distill_flash_attention_dkv_packed_d64_bf16(const __nv_bfloat16* qkv, const float* qkv_bias,
                                                                      const float* bias, const __nv_bfloat16* dout,
                                                                      const float* lse, const float* delta,
                                                                      __nv_bfloat16* dqkv, int64_t heads, int64_t len,
                                                                      float scale, int64_t window, uint64_t seed,
                                                                      float p) {
  flash_backward_dkv<64>(qkv, qkv, qkv, qkv_bias, 1, (const float*)nullptr, bias, dout, lse, delta, dqkv, dqkv, heads, len, scale, window, seed,
                         p);
}

// The packed training attention with rotary embeddings on q and k (rope [2, len, D]: cos, sin):
// rotated as they load, the rotation undone on their gradients (ModernBERT's Wqkv product).
extern "C" __global__ void __launch_bounds__(128, 5) distill_flash_attention_train_packed_rope_d32_bf16(const __nv_bfloat16* qkv,
                                                                             const float* qkv_bias, const float* rope,
                                                                             const float* bias, __nv_bfloat16* out,
                                                                             float* lse, int64_t heads, int64_t len,
                                                                             float scale, int64_t window,
                                                                             uint64_t seed, float p) {
  flash_forward<32>(qkv, qkv, qkv, qkv_bias, 1, rope, bias, out, lse, heads, len, scale, window, seed, p);
}

extern "C" __global__ void distill_flash_attention_dq_packed_rope_d32_bf16(const __nv_bfloat16* qkv,
                                                                          const float* qkv_bias, const float* rope,
                                                                          const float* bias, const __nv_bfloat16* o,
                                                                          const __nv_bfloat16* dout, const float* lse,
                                                                          __nv_bfloat16* dqkv, float* delta,
                                                                          int64_t heads, int64_t len, float scale,
                                                                          int64_t window, uint64_t seed, float p) {
  flash_backward_dq<32, true>(qkv, qkv, qkv, qkv_bias, 1, rope, bias, o, dout, lse, dqkv, delta, heads, len, scale, window,
                              seed, p);
}

extern "C" __global__ void distill_flash_attention_dkv_packed_rope_d32_bf16(const __nv_bfloat16* qkv,
                                                                           const float* qkv_bias, const float* rope,
                                                                           const float* bias,
                                                                           const __nv_bfloat16* dout, const float* lse,
                                                                           const float* delta, __nv_bfloat16* dqkv,
                                                                           int64_t heads, int64_t len, float scale,
                                                                           int64_t window, uint64_t seed, float p) {
  flash_backward_dkv<32, true>(qkv, qkv, qkv, qkv_bias, 1, rope, bias, dout, lse, delta, dqkv, dqkv, heads, len, scale,
                               window, seed, p);
}

// The packed training attention with rotary embeddings on q and k (rope [2, len, D]: cos, sin):
// rotated as they load, the rotation undone on their gradients (ModernBERT's Wqkv product).
extern "C" __global__ void __launch_bounds__(128, 4) distill_flash_attention_train_packed_rope_d64_bf16(const __nv_bfloat16* qkv,
                                                                             const float* qkv_bias, const float* rope,
                                                                             const float* bias, __nv_bfloat16* out,
                                                                             float* lse, int64_t heads, int64_t len,
                                                                             float scale, int64_t window,
                                                                             uint64_t seed, float p) {
  flash_forward<64>(qkv, qkv, qkv, qkv_bias, 1, rope, bias, out, lse, heads, len, scale, window, seed, p);
}

extern "C" __global__ void distill_flash_attention_dq_packed_rope_d64_bf16(const __nv_bfloat16* qkv,
                                                                          const float* qkv_bias, const float* rope,
                                                                          const float* bias, const __nv_bfloat16* o,
                                                                          const __nv_bfloat16* dout, const float* lse,
                                                                          __nv_bfloat16* dqkv, float* delta,
                                                                          int64_t heads, int64_t len, float scale,
                                                                          int64_t window, uint64_t seed, float p) {
  flash_backward_dq<64, true>(qkv, qkv, qkv, qkv_bias, 1, rope, bias, o, dout, lse, dqkv, delta, heads, len, scale, window,
                              seed, p);
}

extern "C" __global__ void distill_flash_attention_dkv_packed_rope_d64_bf16(const __nv_bfloat16* qkv,
                                                                           const float* qkv_bias, const float* rope,
                                                                           const float* bias,
                                                                           const __nv_bfloat16* dout, const float* lse,
                                                                           const float* delta, __nv_bfloat16* dqkv,
                                                                           int64_t heads, int64_t len, float scale,
                                                                           int64_t window, uint64_t seed, float p) {
  flash_backward_dkv<64, true>(qkv, qkv, qkv, qkv_bias, 1, rope, bias, dout, lse, delta, dqkv, dqkv, heads, len, scale,
                               window, seed, p);
}
