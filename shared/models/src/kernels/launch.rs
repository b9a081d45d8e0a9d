//! What a launch of a `kernels.cu` kernel is: its name, grid, block and arguments in the kernel's
//! order, built from the shapes alone. The CUDA path (`cuda.rs`) runs these on candle's storage;
//! the tests run the same descriptions on the CPU through `distill-cuda-emu`, so the argument
//! order, the scalar types and the launch geometry are checked on a machine without a GPU.
// Without CUDA only the tests launch (the attention shape is used by the CPU kernels too).
#![cfg_attr(not(any(feature = "cuda", test)), allow(dead_code))]

/// One kernel argument.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    /// The caller's buffer number `i` (a device pointer).
    Buf(usize),
    I64(i64),
    U64(u64),
    F32(f32),
    /// A `DistillTensorList` by value: the runner fills in the pointers of the list's tensors from
    /// the caller's buffers.
    List(Box<ListParam>),
}

/// Tensors per launch of the multi-tensor kernels (`DISTILL_LIST_LEN`).
pub(crate) const LIST_LEN: usize = 64;

/// kernels.cu's `DistillTensorList`, passed by value: up to [`LIST_LEN`] tensors' device pointers
/// (parameter, moments, gradient), sizes and weight decays.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TensorList {
    pub p: [u64; LIST_LEN],
    pub m: [u64; LIST_LEN],
    pub v: [u64; LIST_LEN],
    pub g: [u64; LIST_LEN],
    pub n: [i64; LIST_LEN],
    pub decay: [f32; LIST_LEN],
    pub count: i64,
}

// The C struct's size (kernels.cu asserts the same), well inside the 4 KB of a launch's parameters.
const _: () = assert!(std::mem::size_of::<TensorList>() == 2824);

/// A list argument's tensors: `n` and `decay` per tensor; their pointers are the caller's buffers
/// `per * t ..` (per = 4: parameter, m, v, gradient; per = 1: the gradient alone).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ListParam {
    pub per: usize,
    pub n: Vec<i64>,
    pub decay: Vec<f32>,
}

impl ListParam {
    /// The list with tensor t's pointers from `ptr(buffer number)`.
    pub fn fill(&self, mut ptr: impl FnMut(usize) -> u64) -> TensorList {
        let mut l = TensorList {
            p: [0; LIST_LEN],
            m: [0; LIST_LEN],
            v: [0; LIST_LEN],
            g: [0; LIST_LEN],
            n: [0; LIST_LEN],
            decay: [0.0; LIST_LEN],
            count: self.n.len() as i64,
        };
        for (t, (&n, &decay)) in self.n.iter().zip(&self.decay).enumerate() {
            if self.per == 4 {
                l.p[t] = ptr(4 * t);
                l.m[t] = ptr(4 * t + 1);
                l.v[t] = ptr(4 * t + 2);
            }
            l.g[t] = ptr(self.per * t + self.per - 1);
            l.n[t] = n;
            l.decay[t] = decay;
        }
        l
    }
}

/// A cuBLAS(Lt) product for y = x Wᵀ + bias with x [rows, k] and W [n, k] row-major (a linear
/// layer's input and weight) and y [rows, n] row-major. cuBLAS reads memory column-major and
/// computes C = op(A) op(B) (m x n, plus a bias of m per row of C): C = y read column-major
/// ([n x rows], ld n), A = W read as [k x n] (ld k) transposed, B = x read as [k x rows] (ld k) as
/// it is; the bias is one per output feature. `m`, `n`, `k` as cuBLAS names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LtProduct {
    pub transa: bool,
    pub transb: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
}

/// [`LtProduct`] of a linear layer: `rows` inputs of `k` features, `n` outputs.
pub(crate) fn lt_product(rows: usize, k: usize, n: usize) -> LtProduct {
    LtProduct {
        transa: true,
        transb: false,
        m: n as u64,
        n: rows as u64,
        k: k as u64,
        lda: k as i64,
        ldb: k as i64,
        ldc: n as i64,
    }
}

/// The (block of 64 rows, tile of 32 columns) pairs a flash-attention kernel computes over `l`
/// tokens: all, or with a window only those within it (kernels.cu's `tile_in_window`).
pub(crate) fn attention_tile_pairs(l: usize, window: Option<usize>) -> usize {
    let (blocks, tiles) = (l.div_ceil(64), l.div_ceil(32));
    let Some(w) = window else { return blocks * tiles };
    (0..blocks).map(|q| (0..tiles).filter(|t| 32 * t <= 64 * q + 63 + w && 32 * t + 31 + w >= 64 * q).count()).sum()
}

/// The element type a kernel's buffer argument points to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    Bf16,
    U32,
}

impl Elem {
    pub fn bytes(self) -> usize {
        match self {
            Elem::F32 | Elem::U32 => 4,
            Elem::Bf16 => 2,
        }
    }
}

/// What a launch reaches through one buffer argument: `len` elements of `elem` from the pointer
/// on, as the kernel indexes it for the launch's shape (0: the kernel does not touch it). The CUDA
/// path refuses a launch whose buffer is shorter (an error naming the kernel and the buffer, not
/// a write past an allocation); the emulated tests pass buffers of exactly this size, so
/// AddressSanitizer reports a kernel reaching one element further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Need {
    pub elem: Elem,
    pub len: usize,
}

impl Need {
    /// Whether `len` elements of `elem` hold what the launch reaches. An f32 buffer may come as
    /// twice as many bf16 (the log-sum-exps the packed kernels keep beside a bf16 output).
    pub fn held_by(&self, elem: Elem, len: usize) -> bool {
        let same = elem == self.elem || (self.elem == Elem::F32 && elem == Elem::Bf16);
        self.len == 0 || (same && len * elem.bytes() >= self.len * self.elem.bytes())
    }
}

/// `len` f32 elements.
fn f32s(len: usize) -> Need {
    Need { elem: Elem::F32, len }
}

/// `len` bf16 elements.
fn bf16s(len: usize) -> Need {
    Need { elem: Elem::Bf16, len }
}

/// `len` u32 elements.
fn u32s(len: usize) -> Need {
    Need { elem: Elem::U32, len }
}

/// One kernel launch over a 1-D grid of 1-D blocks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Launch {
    pub kernel: &'static str,
    /// Blocks; 0 when there is nothing to do (the launch is skipped).
    pub grid: u32,
    pub block: u32,
    pub params: Vec<Param>,
    /// What the launch reaches through buffer i (`Param::Buf(i)`, or a list's tensor's).
    pub bufs: Vec<Need>,
}

/// Threads per block of the elementwise kernels (grid-stride loops).
pub(crate) const ELEMENTWISE_BLOCK: u32 = 256;
/// Most blocks of an elementwise launch; the loops stride over the rest.
const MAX_BLOCKS: usize = 1 << 16;
/// Warps per block of the row kernels (one warp per row).
pub(crate) const WARPS: usize = 4;

fn buffers(n: usize) -> impl Iterator<Item = Param> {
    (0..n).map(Param::Buf)
}

fn elementwise_grid(n: usize) -> u32 {
    n.div_ceil(ELEMENTWISE_BLOCK as usize).min(MAX_BLOCKS) as u32
}

fn rows_grid(rows: usize) -> u32 {
    rows.div_ceil(WARPS) as u32
}

impl Launch {
    /// An error naming the kernel and the buffer unless each of `have` (the buffers' element types
    /// and lengths, in `bufs`' order) holds what the launch reaches.
    pub fn check_buffers(&self, have: &[(Elem, usize)]) -> Result<(), String> {
        if have.len() != self.bufs.len() {
            return Err(format!("{}: {} buffers for a launch of {}", self.kernel, have.len(), self.bufs.len()));
        }
        for (i, (need, &(elem, len))) in self.bufs.iter().zip(have).enumerate() {
            if !need.held_by(elem, len) {
                return Err(format!(
                    "{}: buffer {i} holds {len} {elem:?} elements, the launch reaches {} {:?}",
                    self.kernel, need.len, need.elem
                ));
            }
        }
        Ok(())
    }

    /// `kernel(buffers..., n)` over `n` f32 elements: inputs then the output.
    pub fn elementwise(kernel: &'static str, buffers_: usize, n: usize) -> Self {
        let mut params: Vec<Param> = buffers(buffers_).collect();
        params.push(Param::I64(n as i64));
        let bufs = vec![f32s(n); buffers_];
        Launch { kernel, grid: elementwise_grid(n), block: ELEMENTWISE_BLOCK, params, bufs }
    }

    /// `kernel(buffers..., rows, cols[, extra])`, one warp per row of f32 [rows, cols] buffers:
    /// `extra` is layer norm's eps or the softmax gradient's scale.
    pub fn rows(kernel: &'static str, buffers_: usize, rows: usize, cols: usize, extra: Option<f32>) -> Self {
        let mut params: Vec<Param> = buffers(buffers_).collect();
        params.extend([Param::I64(rows as i64), Param::I64(cols as i64)]);
        params.extend(extra.map(Param::F32));
        let bufs = vec![f32s(rows * cols); buffers_];
        Launch { kernel, grid: rows_grid(rows), block: 32 * WARPS as u32, params, bufs }
    }

    /// `distill_layer_norm_grad_f32(x, w, g, dx, rows, cols, eps)`, one warp per row.
    pub fn layer_norm_grad(rows: usize, cols: usize, eps: f32) -> Self {
        let mut l = Self::rows("distill_layer_norm_grad_f32", 4, rows, cols, Some(eps));
        l.bufs[1] = f32s(cols);
        l
    }

    /// `distill_masked_softmax_f32(x, bias, y, rows, cols, rows per batch, bias batch stride,
    /// bias row stride, q_len, scale)`.
    pub fn masked_softmax(rows: usize, cols: usize, strides: (usize, usize, usize, usize), scale: f32) -> Self {
        let (per_batch, batch_stride, row_stride, q_len) = strides;
        let mut params: Vec<Param> = buffers(3).collect();
        params.extend([rows, cols, per_batch, batch_stride, row_stride, q_len].map(|v| Param::I64(v as i64)));
        params.push(Param::F32(scale));
        // The bias of each batch (of `per_batch` rows): `batch_stride` values.
        let n = rows * cols;
        let bufs = vec![f32s(n), f32s(rows.div_ceil(per_batch.max(1)) * batch_stride), f32s(n)];
        Launch { kernel: "distill_masked_softmax_f32", grid: rows_grid(rows), block: 32 * WARPS as u32, params, bufs }
    }

    /// `distill_dropout_f32(x, y, n, seed, p, 1 / (1 - p))`.
    pub fn dropout(n: usize, seed: u64, p: f32) -> Self {
        let mut l = Self::elementwise("distill_dropout_f32", 2, n);
        l.params.extend([Param::U64(seed), Param::F32(p), Param::F32(1.0 / (1.0 - p))]);
        l
    }

    /// The gather / scatter kernels: `kernel(f32 input, u32 ids, out, n, dim, vocab)`, threads
    /// over n x dim: the gather from a [vocab, dim] table to [n, dim], the scatter the other way.
    pub fn rows_by_id(kernel: &'static str, n: usize, dim: usize, vocab: usize) -> Self {
        let mut params: Vec<Param> = buffers(3).collect();
        params.extend([n, dim, vocab].map(|v| Param::I64(v as i64)));
        let (table, rows) = (f32s(vocab * dim), f32s(n * dim));
        let bufs = if kernel.contains("scatter") { vec![rows, u32s(n), table] } else { vec![table, u32s(n), rows] };
        Launch { kernel, grid: elementwise_grid(n * dim), block: ELEMENTWISE_BLOCK, params, bufs }
    }

    /// `distill_adamw_f32(p, m, v, g, scale, n, decay, beta1, beta2, bc2, step, eps)`, in place;
    /// `scale` one f32 the gradient is multiplied by (the clipping coefficient).
    pub fn adamw(n: usize, c: [f32; 6]) -> Self {
        let mut params: Vec<Param> = buffers(5).collect();
        params.push(Param::I64(n as i64));
        params.extend(c.map(Param::F32));
        let bufs = vec![f32s(n), f32s(n), f32s(n), f32s(n), f32s(1)];
        Launch { kernel: "distill_adamw_f32", grid: elementwise_grid(n), block: ELEMENTWISE_BLOCK, params, bufs }
    }

    /// `distill_adamw_list_f32(list, scale, beta1, beta2, bc2, step, eps)` over up to [`LIST_LEN`]
    /// tensors of `n[t]` elements, each with its weight decay factor: buffers p, m, v, g per tensor,
    /// then `scale`. `c` = [beta1, beta2, bc2, step, eps].
    pub fn adamw_list(n: &[usize], decay: &[f32], c: [f32; 5]) -> Self {
        assert!(n.len() <= LIST_LEN && n.len() == decay.len(), "adamw list of {} tensors", n.len());
        let list = ListParam { per: 4, n: n.iter().map(|&x| x as i64).collect(), decay: decay.to_vec() };
        let mut params = vec![Param::List(Box::new(list)), Param::Buf(4 * n.len())];
        params.extend(c.map(Param::F32));
        let grid = elementwise_grid(n.iter().copied().max().unwrap_or(0));
        let mut bufs: Vec<Need> = n.iter().flat_map(|&n| [f32s(n); 4]).collect();
        bufs.push(f32s(1));
        Launch { kernel: "distill_adamw_list_f32", grid, block: ELEMENTWISE_BLOCK, params, bufs }
    }

    /// `distill_sum_squares_list_f32(list, acc)` over up to [`LIST_LEN`] gradients of `n[t]`
    /// elements: buffers g per tensor, then `acc`; at most 1,024 blocks (one atomic each).
    pub fn sum_squares_list(n: &[usize]) -> Self {
        assert!(n.len() <= LIST_LEN, "sum of squares list of {} tensors", n.len());
        let list = ListParam { per: 1, n: n.iter().map(|&x| x as i64).collect(), decay: vec![0.0; n.len()] };
        let params = vec![Param::List(Box::new(list)), Param::Buf(n.len())];
        let grid = elementwise_grid(n.iter().copied().max().unwrap_or(0)).min(1024);
        let bufs = n.iter().map(|&n| f32s(n)).chain([f32s(1)]).collect();
        Launch { kernel: "distill_sum_squares_list_f32", grid, block: ELEMENTWISE_BLOCK, params, bufs }
    }

    /// `distill_layer_norm_f32(x, w, b, y, rows, cols, eps, has_bias)`, one warp per row.
    pub fn layer_norm(rows: usize, cols: usize, eps: f32, has_bias: bool) -> Self {
        let mut l = Self::rows("distill_layer_norm_f32", 4, rows, cols, Some(eps));
        l.params.push(Param::I64(has_bias as i64));
        // The bias is read only with has_bias.
        l.bufs[1..3].copy_from_slice(&[f32s(cols), f32s(if has_bias { cols } else { 0 })]);
        l
    }

    /// `distill_layer_norm_wgrad_f32(x, g, out, rows, cols, eps)`: a block per chunk of rows.
    pub fn layer_norm_wgrad(rows: usize, cols: usize, eps: f32) -> Self {
        let mut params: Vec<Param> = buffers(3).collect();
        params.extend([Param::I64(rows as i64), Param::I64(cols as i64), Param::F32(eps)]);
        let bufs = vec![f32s(rows * cols), f32s(rows * cols), f32s(2 * cols)];
        Launch {
            kernel: "distill_layer_norm_wgrad_f32",
            grid: chunks_grid(rows),
            block: 32 * WARPS as u32,
            params,
            bufs,
        }
    }

    /// `distill_column_sum_f32(g, out, rows, cols)`: a block per chunk of rows.
    pub fn column_sum(rows: usize, cols: usize) -> Self {
        Self::column_sum_of("distill_column_sum_f32", f32s(rows * cols), rows, cols)
    }

    /// `distill_column_sum_bf16(g, out, rows, cols)`: as [`Launch::column_sum`] over a bf16 `g`.
    pub fn column_sum_bf16(rows: usize, cols: usize) -> Self {
        Self::column_sum_of("distill_column_sum_bf16", bf16s(rows * cols), rows, cols)
    }

    fn column_sum_of(kernel: &'static str, g: Need, rows: usize, cols: usize) -> Self {
        let mut params: Vec<Param> = buffers(2).collect();
        params.extend([Param::I64(rows as i64), Param::I64(cols as i64)]);
        Launch { kernel, grid: chunks_grid(rows), block: ELEMENTWISE_BLOCK, params, bufs: vec![g, f32s(cols)] }
    }

    /// `distill_add_norm_bf16(x, residual, params, y, rows, cols, eps)`, one warp per row.
    pub fn add_norm(rows: usize, cols: usize, eps: f32) -> Self {
        let mut l = Self::rows("distill_add_norm_bf16", 4, rows, cols, Some(eps));
        let n = rows * cols;
        l.bufs = vec![bf16s(n), bf16s(n), f32s(3 * cols), bf16s(n)];
        l
    }

    /// `distill_add_norm_sum_bf16(x, residual, params, out [2, rows, cols], rows, cols, eps)`.
    pub fn add_norm_sum(rows: usize, cols: usize, eps: f32) -> Self {
        let mut l = Self::add_norm(rows, cols, eps);
        l.kernel = "distill_add_norm_sum_bf16";
        l.bufs[3] = bf16s(2 * rows * cols);
        l
    }

    /// `distill_embed_norm_bf16(t0, t1, t2, i0, i1, i2, params, y, rows, cols, n0, n1, n2, tables,
    /// eps)`: a warp per token; `n` the tables' rows (the unused ones' any).
    pub fn embed_norm(rows: usize, cols: usize, n: [usize; 3], tables: usize, eps: f32) -> Self {
        let mut params: Vec<Param> = buffers(8).collect();
        params.extend([rows, cols, n[0], n[1], n[2], tables].map(|v| Param::I64(v as i64)));
        params.push(Param::F32(eps));
        // The tables past `tables` and their ids are not read.
        let used = |k: usize, need: Need| if k < tables { need } else { Need { len: 0, ..need } };
        let mut bufs: Vec<Need> = (0..3).map(|k| used(k, bf16s(n[k] * cols))).collect();
        bufs.extend((0..3).map(|k| used(k, u32s(rows))));
        bufs.extend([f32s(2 * cols), bf16s(rows * cols)]);
        Launch { kernel: "distill_embed_norm_bf16", grid: rows_grid(rows), block: 32 * WARPS as u32, params, bufs }
    }

    /// `distill_geglu_bf16(x, y, rows x inter, inter)`.
    pub fn geglu(rows: usize, inter: usize) -> Self {
        let mut l = Self::elementwise("distill_geglu_bf16", 2, rows * inter);
        l.params.push(Param::I64(inter as i64));
        l.bufs = vec![bf16s(2 * rows * inter), bf16s(rows * inter)];
        l
    }

    /// `distill_geglu_grad_bf16(g, x, dx, rows x inter, inter)`: the backward of [`Launch::geglu`].
    pub fn geglu_grad(rows: usize, inter: usize) -> Self {
        let mut l = Self::elementwise("distill_geglu_grad_bf16", 3, rows * inter);
        l.params.push(Param::I64(inter as i64));
        l.bufs = vec![bf16s(rows * inter), bf16s(2 * rows * inter), bf16s(2 * rows * inter)];
        l
    }

    /// `distill_bias_gelu_bf16(x, b, y, n, cols)`.
    pub fn bias_gelu(n: usize, cols: usize) -> Self {
        let mut l = Self::elementwise("distill_bias_gelu_bf16", 3, n);
        l.params.push(Param::I64(cols as i64));
        l.bufs = vec![bf16s(n), f32s(cols), bf16s(n)];
        l
    }

    /// `distill_bias_gelu_grad_bf16(g, x, b, dx, n, cols)`: the backward of [`Launch::bias_gelu`].
    pub fn bias_gelu_grad(n: usize, cols: usize) -> Self {
        let mut l = Self::elementwise("distill_bias_gelu_grad_bf16", 4, n);
        l.params.push(Param::I64(cols as i64));
        l.bufs = vec![bf16s(n), bf16s(n), f32s(cols), bf16s(n)];
        l
    }

    /// `distill_add_norm_train_f32(x, residual, params, y, rows, cols, eps, seed, p, scale)`, one
    /// warp per row (p = 0: no dropout).
    pub fn add_norm_train(rows: usize, cols: usize, eps: f32, seed: u64, p: f32) -> Self {
        let mut l = Self::rows("distill_add_norm_train_f32", 4, rows, cols, Some(eps));
        l.params.extend([Param::U64(seed), Param::F32(p), Param::F32(1.0 / (1.0 - p))]);
        l.bufs[0] = bf16s(rows * cols);
        l.bufs[2] = f32s(3 * cols);
        l
    }

    /// `distill_add_norm_train_grad_f32(x, residual, params, g, ds, sums, rows, cols, eps, seed,
    /// p, scale)`: a block per 16 rows (`sums` zeroed first).
    pub fn add_norm_train_grad(rows: usize, cols: usize, eps: f32, seed: u64, p: f32) -> Self {
        let mut params: Vec<Param> = buffers(6).collect();
        params.extend([Param::I64(rows as i64), Param::I64(cols as i64), Param::F32(eps)]);
        params.extend([Param::U64(seed), Param::F32(p), Param::F32(1.0 / (1.0 - p))]);
        let grid = rows.div_ceil(TRAIN_ROWS_PER_BLOCK) as u32;
        let n = rows * cols;
        let bufs = vec![bf16s(n), f32s(n), f32s(3 * cols), f32s(n), f32s(n), f32s(3 * cols)];
        Launch { kernel: "distill_add_norm_train_grad_f32", grid, block: 32 * WARPS as u32, params, bufs }
    }

    /// `distill_dropout_bf16_f32(x, y, n, seed, p, 1 / (1 - p))`: dropout's mask on an f32 x, y bf16.
    pub fn dropout_bf16(n: usize, seed: u64, p: f32) -> Self {
        let mut l = Self::dropout(n, seed, p);
        l.kernel = "distill_dropout_bf16_f32";
        l.bufs[1] = bf16s(n);
        l
    }

    /// `distill_bias_add_f32` or `distill_bias_add_bf16_f32` (x bf16): `(x, b, y, n, cols)`.
    pub fn bias_add(bf16_x: bool, n: usize, cols: usize) -> Self {
        let kernel = if bf16_x { "distill_bias_add_bf16_f32" } else { "distill_bias_add_f32" };
        let mut l = Self::elementwise(kernel, 3, n);
        l.params.push(Param::I64(cols as i64));
        l.bufs = vec![if bf16_x { bf16s(n) } else { f32s(n) }, f32s(cols), f32s(n)];
        l
    }
}

impl Launch {
    /// The rotary split (`distill_rotary_split_f32`) or its backward merge
    /// (`distill_rotary_merge_f32`): `(input, cos, sin, out, b, l, h, d)` over 3 b h l d elements.
    pub fn rotary(kernel: &'static str, b: usize, l: usize, h: usize, d: usize) -> Self {
        let n = 3 * b * l * h * d;
        let mut params: Vec<Param> = buffers(4).collect();
        params.extend([b, l, h, d].map(|v| Param::I64(v as i64)));
        let bufs = vec![f32s(n), f32s(l * d), f32s(l * d), f32s(n)];
        Launch { kernel, grid: elementwise_grid(n), block: ELEMENTWISE_BLOCK, params, bufs }
    }
}

/// Queries per block of the flash attention (`DISTILL_FA_WARPS` x `DISTILL_FA_QW` in kernels.cu).
const FLASH_QUERIES: usize = 64;

impl Launch {
    /// `distill_flash_attention_d{32,64}_bf16(q, k, v, bias, out, heads, len, scale, window)`: a
    /// block of 4 warps per 64 queries of one (batch, head). None for other head sizes.
    pub fn flash_attention(d: usize, b: usize, h: usize, l: usize, scale: f32, window: Option<usize>) -> Option<Self> {
        let kernel = match d {
            32 => "distill_flash_attention_d32_bf16",
            64 => "distill_flash_attention_d64_bf16",
            _ => return None,
        };
        let mut params: Vec<Param> = buffers(5).collect();
        params.extend([Param::I64(h as i64), Param::I64(l as i64), Param::F32(scale)]);
        params.push(Param::I64(window.map_or(-1, |w| w as i64)));
        let grid = (l.div_ceil(FLASH_QUERIES) * b * h) as u32;
        // q, k, v [B, H, L, D], the key bias [B, L], out [B, L, H D].
        let n = b * h * l * d;
        let bufs = vec![bf16s(n), bf16s(n), bf16s(n), f32s(b * l), bf16s(n)];
        Some(Launch { kernel, grid, block: 32 * WARPS as u32, params, bufs })
    }
}

impl Launch {
    /// `distill_flash_attention_packed_d{32,64}_bf16(qkv, qkv_bias, bias, out, heads, len, scale,
    /// window)`: as [`Launch::flash_attention`], q, k and v read from one [B, L, 3, H, D] product.
    /// With `rope`: `distill_flash_attention_packed_rope_d{32,64}_bf16(qkv, qkv_bias, rope, bias,
    /// out, ...)`, q and k rotated by the rotary embeddings `rope` [2, L, D] as they load.
    pub fn flash_attention_packed(
        d: usize,
        b: usize,
        h: usize,
        l: usize,
        scale: f32,
        window: Option<usize>,
        rope: bool,
    ) -> Option<Self> {
        let mut launch = Self::flash_attention(d, b, h, l, scale, window)?;
        launch.kernel = match (d, rope) {
            (32, false) => "distill_flash_attention_packed_d32_bf16",
            (_, false) => "distill_flash_attention_packed_d64_bf16",
            (32, true) => "distill_flash_attention_packed_rope_d32_bf16",
            (_, true) => "distill_flash_attention_packed_rope_d64_bf16",
        };
        // (qkv, qkv bias, key bias, out): one buffer fewer than q, k, v, bias, out; with the
        // rotary table as many.
        if !rope {
            launch.params.remove(4);
        }
        // qkv [B, L, 3, H, D], its bias [3 H D], the rotary table [2, L, D].
        let n = b * h * l * d;
        launch.bufs = vec![bf16s(3 * n), f32s(3 * h * d)];
        if rope {
            launch.bufs.push(f32s(2 * l * d));
        }
        launch.bufs.extend([f32s(b * l), bf16s(n)]);
        Some(launch)
    }
}

impl Launch {
    /// `distill_deberta_probs_bf16(qk, c2p, p2c, c2p_idx, p2c_idx, mask, out, heads, q_rows, len,
    /// pos, block_rows, inv_scale)`: a block per [`deberta_block_rows`] query rows of one of `bh`
    /// (batch x heads), a warp per row. `len` at most [`MAX_DEBERTA_LEN`].
    pub fn deberta_probs(bh: usize, heads: usize, q_rows: usize, len: usize, pos: usize, inv_scale: f32) -> Self {
        let block_rows = deberta_block_rows(q_rows, len);
        let mut params: Vec<Param> = buffers(7).collect();
        params.extend([heads, q_rows, len, pos, block_rows].map(|v| Param::I64(v as i64)));
        params.push(Param::F32(inv_scale));
        let grid = (bh * q_rows.div_ceil(block_rows)) as u32;
        // qk [BH, Q, L], c2p [BH, Q, P], p2c [BH, L, P], the buckets [L, L] each, the mask [B, L],
        // out [BH, Q, L].
        let rows = bh * q_rows;
        let bufs = vec![
            bf16s(rows * len),
            bf16s(rows * pos),
            bf16s(bh * len * pos),
            u32s(len * len),
            u32s(len * len),
            f32s(bh / heads.max(1) * len),
            bf16s(rows * len),
        ];
        Launch { kernel: "distill_deberta_probs_bf16", grid, block: 32 * WARPS as u32, params, bufs }
    }
}

/// Floats a DeBERTa probabilities block stages (`DISTILL_DEBERTA_STAGE`): its rows x (len + 2).
const DEBERTA_STAGE: usize = 8192;
/// The longest key row of the DeBERTa probabilities kernels (one query row in a block).
pub const MAX_DEBERTA_LEN: usize = DEBERTA_STAGE - 2;

/// The query rows of a DeBERTa probabilities block: up to 16 (the rows one 32-byte sector of a
/// key's p2c buckets serves), as many as the staging buffer holds at this length, no more than
/// there are.
pub fn deberta_block_rows(q_rows: usize, len: usize) -> usize {
    (DEBERTA_STAGE / (len + 2)).clamp(1, 16).min(q_rows.max(1))
}

impl Launch {
    /// `distill_deberta_probs_train_bf16(qk, c2p, p2c, c2p_idx, p2c_idx, mask, out, lse, heads,
    /// q_rows, len, pos, block_rows, inv_scale, seed, p, keep_scale)`: blocks as [`Self::deberta_probs`].
    // Allowed: one argument per parameter of the CUDA kernel it describes.
    #[allow(clippy::too_many_arguments)]
    pub fn deberta_probs_train(
        bh: usize,
        heads: usize,
        q_rows: usize,
        len: usize,
        pos: usize,
        inv_scale: f32,
        seed: u64,
        p: f32,
    ) -> Self {
        let mut l = Self::deberta_probs(bh, heads, q_rows, len, pos, inv_scale);
        l.kernel = "distill_deberta_probs_train_bf16";
        l.params.insert(7, Param::Buf(7));
        l.params.extend([Param::U64(seed), Param::F32(p), Param::F32(1.0 / (1.0 - p))]);
        // The log-sum-exp of each query row.
        l.bufs.push(f32s(bh * q_rows));
        l
    }

    /// `distill_deberta_probs_train_grad_bf16(qk, c2p, p2c, c2p_idx, p2c_idx, mask, lse, dout,
    /// dqk, dc2p, heads, q_rows, len, pos, block_rows, inv_scale, seed, p, keep_scale)`.
    // Allowed: one argument per parameter of the CUDA kernel it describes.
    #[allow(clippy::too_many_arguments)]
    pub fn deberta_probs_train_grad(
        bh: usize,
        heads: usize,
        q_rows: usize,
        len: usize,
        pos: usize,
        inv_scale: f32,
        seed: u64,
        p: f32,
    ) -> Self {
        let mut l = Self::deberta_probs(bh, heads, q_rows, len, pos, inv_scale);
        l.kernel = "distill_deberta_probs_train_grad_bf16";
        for i in 7..10 {
            l.params.insert(i, Param::Buf(i));
        }
        l.params.extend([Param::U64(seed), Param::F32(p), Param::F32(1.0 / (1.0 - p))]);
        // (.., mask, lse, dout, dqk, dc2p) where the forward wrote out.
        let rows = bh * q_rows;
        l.bufs.truncate(6);
        l.bufs.extend([f32s(rows), bf16s(rows * len), bf16s(rows * len), bf16s(rows * pos)]);
        l
    }

    /// `distill_deberta_p2c_grad_bf16(dqk, p2c_idx, dp2c, q_rows, len, pos, key_block)`: a block
    /// per [`deberta_key_block`] keys of one of `bh`; `pos` at most 1,024.
    pub fn deberta_p2c_grad(bh: usize, q_rows: usize, len: usize, pos: usize) -> Self {
        let key_block = deberta_key_block(pos);
        let mut params: Vec<Param> = buffers(3).collect();
        params.extend([q_rows, len, pos, key_block].map(|v| Param::I64(v as i64)));
        let grid = (bh * len.div_ceil(key_block)) as u32;
        let bufs = vec![bf16s(bh * q_rows * len), u32s(len * len), bf16s(bh * len * pos)];
        Launch { kernel: "distill_deberta_p2c_grad_bf16", grid, block: 32 * WARPS as u32, params, bufs }
    }
}

/// The keys of a [`Launch::deberta_p2c_grad`] block: 16, or the largest power of two (dividing
/// the block's 128 threads) whose buckets fit the staging buffer.
pub fn deberta_key_block(pos: usize) -> usize {
    let fit = (DEBERTA_STAGE / pos.max(1)).clamp(1, 16);
    1 << fit.ilog2()
}

/// The shape and settings of a training attention launch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attention {
    pub b: usize,
    pub h: usize,
    pub l: usize,
    pub d: usize,
    pub scale: f32,
    pub window: Option<usize>,
    pub seed: u64,
    pub p: f32,
}

impl Attention {
    fn kernel(&self, which: &str) -> Option<&'static str> {
        Some(match (which, self.d) {
            ("train", 32) => "distill_flash_attention_train_d32_f32",
            ("train", 64) => "distill_flash_attention_train_d64_f32",
            ("dq", 32) => "distill_flash_attention_dq_d32_f32",
            ("dq", 64) => "distill_flash_attention_dq_d64_f32",
            ("dkv", 32) => "distill_flash_attention_dkv_d32_f32",
            ("dkv", 64) => "distill_flash_attention_dkv_d64_f32",
            ("train_packed", 32) => "distill_flash_attention_train_packed_d32_bf16",
            ("train_packed", 64) => "distill_flash_attention_train_packed_d64_bf16",
            ("dq_packed", 32) => "distill_flash_attention_dq_packed_d32_bf16",
            ("dq_packed", 64) => "distill_flash_attention_dq_packed_d64_bf16",
            ("dkv_packed", 32) => "distill_flash_attention_dkv_packed_d32_bf16",
            ("dkv_packed", 64) => "distill_flash_attention_dkv_packed_d64_bf16",
            ("train_packed_rope", 32) => "distill_flash_attention_train_packed_rope_d32_bf16",
            ("train_packed_rope", 64) => "distill_flash_attention_train_packed_rope_d64_bf16",
            ("dq_packed_rope", 32) => "distill_flash_attention_dq_packed_rope_d32_bf16",
            ("dq_packed_rope", 64) => "distill_flash_attention_dq_packed_rope_d64_bf16",
            ("dkv_packed_rope", 32) => "distill_flash_attention_dkv_packed_rope_d32_bf16",
            ("dkv_packed_rope", 64) => "distill_flash_attention_dkv_packed_rope_d64_bf16",
            _ => return None,
        })
    }

    /// The launch of kernel `which` over buffers `bufs`.
    fn launch(&self, which: &str, bufs: Vec<Need>) -> Option<Launch> {
        let mut params: Vec<Param> = buffers(bufs.len()).collect();
        params.extend([Param::I64(self.h as i64), Param::I64(self.l as i64), Param::F32(self.scale)]);
        params.extend([Param::I64(self.window.map_or(-1, |w| w as i64)), Param::U64(self.seed), Param::F32(self.p)]);
        let grid = (self.l.div_ceil(FLASH_QUERIES) * self.b * self.h) as u32;
        Some(Launch { kernel: self.kernel(which)?, grid, block: 32 * WARPS as u32, params, bufs })
    }

    /// Elements of one of q, k, v, the context and their gradients ([B, H, L, D] or [B, L, H D]);
    /// of one per query row (the log-sum-exps, Δ).
    fn sizes(&self) -> (usize, usize) {
        (self.b * self.h * self.l * self.d, self.b * self.h * self.l)
    }

    /// The first buffers of the f32 kernels: q, k, v, the key bias [B, L].
    fn inputs(&self) -> Vec<Need> {
        let n = self.sizes().0;
        vec![f32s(n), f32s(n), f32s(n), f32s(self.b * self.l)]
    }

    /// The first buffers of the joined-product kernels: qkv [B, L, 3 H D] bf16, its bias, the
    /// rotary table [2, L, D] with `rope`, the key bias.
    fn packed_inputs(&self, rope: bool) -> Vec<Need> {
        let (n, hd) = (self.sizes().0, self.h * self.d);
        let mut bufs = vec![bf16s(3 * n), f32s(3 * hd)];
        if rope {
            bufs.push(f32s(2 * self.l * self.d));
        }
        bufs.push(f32s(self.b * self.l));
        bufs
    }

    /// The forward: `(q, k, v, bias, out, lse, heads, len, scale, window, seed, p)`.
    pub fn forward(&self) -> Option<Launch> {
        let (n, nl) = self.sizes();
        self.launch("train", [self.inputs(), vec![f32s(n), f32s(nl)]].concat())
    }

    /// dQ and Δ: `(q, k, v, bias, o, dout, lse, dq, delta, ..)`, a block per 64 queries.
    pub fn backward_dq(&self) -> Option<Launch> {
        let (n, nl) = self.sizes();
        self.launch("dq", [self.inputs(), vec![f32s(n), f32s(n), f32s(nl), f32s(n), f32s(nl)]].concat())
    }

    /// dK and dV: `(q, k, v, bias, dout, lse, delta, dk, dv, ..)`, a block per 64 keys.
    pub fn backward_dkv(&self) -> Option<Launch> {
        let (n, nl) = self.sizes();
        self.launch("dkv", [self.inputs(), vec![f32s(n), f32s(nl), f32s(nl), f32s(n), f32s(n)]].concat())
    }

    /// The forward from a joined product: `(qkv, qkv_bias, bias, out, lse, ..)` (out bf16); with
    /// `rope`, `(qkv, qkv_bias, rope, bias, out, lse, ..)`.
    pub fn forward_packed(&self, rope: bool) -> Option<Launch> {
        let (n, nl) = self.sizes();
        let which = if rope { "train_packed_rope" } else { "train_packed" };
        self.launch(which, [self.packed_inputs(rope), vec![bf16s(n), f32s(nl)]].concat())
    }

    /// dQ and Δ from a joined product: `(qkv, qkv_bias, [rope,] bias, o, dout, lse, dqkv, delta,
    /// ..)` (o, dout and dqkv bf16; dQ into dqkv's query part).
    pub fn backward_dq_packed(&self, rope: bool) -> Option<Launch> {
        let (n, nl) = self.sizes();
        let which = if rope { "dq_packed_rope" } else { "dq_packed" };
        let rest = vec![bf16s(n), bf16s(n), f32s(nl), bf16s(3 * n), f32s(nl)];
        self.launch(which, [self.packed_inputs(rope), rest].concat())
    }

    /// dK and dV from a joined product: `(qkv, qkv_bias, [rope,] bias, dout, lse, delta, dqkv,
    /// ..)` (into dqkv's key and value parts).
    pub fn backward_dkv_packed(&self, rope: bool) -> Option<Launch> {
        let (n, nl) = self.sizes();
        let which = if rope { "dkv_packed_rope" } else { "dkv_packed" };
        self.launch(which, [self.packed_inputs(rope), vec![bf16s(n), f32s(nl), f32s(nl), bf16s(3 * n)]].concat())
    }
}

/// Rows per block of the training add-norm's backward (`DISTILL_TRAIN_ROWS_PER_BLOCK`).
const TRAIN_ROWS_PER_BLOCK: usize = 16;

/// Rows per block of the column reductions (`DISTILL_ROWS_PER_BLOCK` in kernels.cu).
const ROWS_PER_BLOCK: usize = 16;

fn chunks_grid(rows: usize) -> u32 {
    rows.div_ceil(ROWS_PER_BLOCK) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C = op(A) op(B) + bias as cuBLAS defines it on column-major memory (the matrix sizes of
    /// A and B as cudarc's cublasLt layouts give them: k x m when A is transposed, m x k when not).
    fn cublas_reference(p: LtProduct, a: &[f32], b: &[f32], bias: &[f32]) -> Vec<f32> {
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let (lda, ldb, ldc) = (p.lda as usize, p.ldb as usize, p.ldc as usize);
        let (a_rows, a_cols) = if p.transa { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if p.transb { (n, k) } else { (k, n) };
        assert!(lda >= a_rows && ldb >= b_rows && ldc >= m);
        assert!(a.len() >= lda * (a_cols - 1) + a_rows && b.len() >= ldb * (b_cols - 1) + b_rows);
        let op_a = |i: usize, q: usize| if p.transa { a[q + i * lda] } else { a[i + q * lda] };
        let op_b = |q: usize, j: usize| if p.transb { b[j + q * ldb] } else { b[q + j * ldb] };
        let mut c = vec![f32::NAN; ldc * n];
        for j in 0..n {
            for i in 0..m {
                c[i + j * ldc] = (0..k).map(|q| op_a(i, q) * op_b(q, j)).sum::<f32>() + bias[i];
            }
        }
        c
    }

    /// The buffers a launch's parameters name: `Param::Buf(i)` and a list's tensors.
    fn named(l: &Launch) -> usize {
        l.params
            .iter()
            .map(|p| match p {
                Param::Buf(i) => i + 1,
                Param::List(list) => list.per * list.n.len(),
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn each_buffer_a_launch_names_has_its_reach() {
        let a = Attention { b: 2, h: 3, l: 70, d: 64, scale: 0.125, window: Some(5), seed: 1, p: 0.1 };
        let mut launches = vec![
            Launch::elementwise("distill_gelu_erf_f32", 2, 10),
            Launch::rows("distill_softmax_f32", 2, 3, 7, None),
            Launch::layer_norm_grad(3, 7, 1e-5),
            Launch::masked_softmax(30, 7, (15, 35, 7, 5), 0.5),
            Launch::dropout(10, 1, 0.1),
            Launch::rows_by_id("distill_gather_rows_f32", 4, 8, 11),
            Launch::rows_by_id("distill_scatter_add_rows_f32", 4, 8, 11),
            Launch::adamw(10, [1.0; 6]),
            Launch::adamw_list(&[3, 5], &[1.0, 0.9], [1.0; 5]),
            Launch::sum_squares_list(&[3, 5, 7]),
            Launch::layer_norm(3, 7, 1e-5, false),
            Launch::layer_norm_wgrad(3, 7, 1e-5),
            Launch::column_sum(3, 7),
            Launch::column_sum_bf16(3, 7),
            Launch::add_norm(3, 7, 1e-5),
            Launch::add_norm_sum(3, 7, 1e-5),
            Launch::embed_norm(3, 8, [5, 2, 1], 2, 1e-5),
            Launch::geglu(3, 8),
            Launch::geglu_grad(3, 8),
            Launch::bias_gelu(24, 8),
            Launch::bias_gelu_grad(24, 8),
            Launch::add_norm_train(3, 7, 1e-5, 1, 0.1),
            Launch::add_norm_train_grad(3, 7, 1e-5, 1, 0.1),
            Launch::dropout_bf16(10, 1, 0.1),
            Launch::bias_add(true, 21, 7),
            Launch::rotary("distill_rotary_split_f32", 2, 5, 3, 8),
            Launch::deberta_probs(6, 3, 40, 40, 16, 0.2),
            Launch::deberta_probs_train(6, 3, 40, 40, 16, 0.2, 1, 0.1),
            Launch::deberta_probs_train_grad(6, 3, 40, 40, 16, 0.2, 1, 0.1),
            Launch::deberta_p2c_grad(6, 40, 40, 16),
        ];
        for d in [32, 64] {
            launches.push(Launch::flash_attention(d, 2, 3, 70, 0.1, None).unwrap());
            for rope in [false, true] {
                launches.push(Launch::flash_attention_packed(d, 2, 3, 70, 0.1, Some(5), rope).unwrap());
            }
        }
        launches.extend([a.forward(), a.backward_dq(), a.backward_dkv()].map(Option::unwrap));
        for rope in [false, true] {
            launches.extend(
                [a.forward_packed(rope), a.backward_dq_packed(rope), a.backward_dkv_packed(rope)].map(Option::unwrap),
            );
        }
        for l in &launches {
            assert_eq!(named(l), l.bufs.len(), "{}: buffers named and described", l.kernel);
        }
    }

    #[test]
    fn a_buffer_shorter_than_the_reach_is_refused_with_its_number() {
        let l = Launch::bias_gelu(24, 8);
        let fit = [(Elem::Bf16, 24), (Elem::F32, 8), (Elem::Bf16, 24)];
        assert_eq!(l.check_buffers(&fit), Ok(()));
        // Longer is fine (a view into a larger allocation); shorter, another type or a missing
        // buffer is not.
        assert_eq!(l.check_buffers(&[(Elem::Bf16, 30), (Elem::F32, 8), (Elem::Bf16, 24)]), Ok(()));
        let short = l.check_buffers(&[(Elem::Bf16, 24), (Elem::F32, 8), (Elem::Bf16, 23)]).unwrap_err();
        assert_eq!(short, "distill_bias_gelu_bf16: buffer 2 holds 23 Bf16 elements, the launch reaches 24 Bf16");
        assert!(l.check_buffers(&[(Elem::Bf16, 24), (Elem::U32, 8), (Elem::Bf16, 24)]).is_err());
        assert!(l.check_buffers(&fit[..2]).is_err());
        // An f32 buffer may come as twice as many bf16 (the packed kernels' log-sum-exps), not
        // the other way round; an unread buffer as anything.
        let f = a_forward_packed();
        let mut held: Vec<(Elem, usize)> = f.bufs.iter().map(|n| (n.elem, n.len)).collect();
        let lse = held.len() - 1;
        held[lse] = (Elem::Bf16, 2 * f.bufs[lse].len);
        assert_eq!(f.check_buffers(&held), Ok(()));
        held[lse] = (Elem::Bf16, 2 * f.bufs[lse].len - 1);
        assert!(f.check_buffers(&held).is_err());
        let norm = Launch::layer_norm(3, 7, 1e-5, false);
        assert_eq!(norm.check_buffers(&[(Elem::F32, 21), (Elem::F32, 7), (Elem::U32, 0), (Elem::F32, 21)]), Ok(()));
    }

    fn a_forward_packed() -> Launch {
        let a = Attention { b: 2, h: 2, l: 9, d: 32, scale: 0.2, window: None, seed: 1, p: 0.0 };
        a.forward_packed(false).unwrap()
    }

    #[test]
    fn attention_tile_pairs_within_a_window() {
        // 256 tokens: 4 blocks x 8 tiles; ModernBERT's window of 64 each side keeps 4, 6, 6, 4.
        assert_eq!(attention_tile_pairs(256, None), 32);
        assert_eq!(attention_tile_pairs(256, Some(64)), 20);
        // 70 tokens, a window of 5: the second block (64..69) skips the first tile.
        assert_eq!(attention_tile_pairs(70, Some(5)), 5);
        assert_eq!(attention_tile_pairs(70, Some(1000)), 6);
    }

    #[test]
    fn the_cublaslt_product_of_a_linear_layer_is_x_times_w_transposed_plus_bias() {
        let (rows, k, n) = (5usize, 7usize, 3usize);
        let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.91).cos()).collect();
        let bias = [0.5f32, -1.0, 2.0];
        let c = cublas_reference(lt_product(rows, k, n), &w, &x, &bias);
        for r in 0..rows {
            for o in 0..n {
                let want = (0..k).map(|q| x[r * k + q] * w[o * k + q]).sum::<f32>() + bias[o];
                let got = c[r * n + o];
                assert!((got - want).abs() < 1e-5, "y[{r}][{o}]: {got} against {want}");
            }
        }
        assert_eq!(c.len(), rows * n, "C is y, row-major, nothing beside it");
    }
}
