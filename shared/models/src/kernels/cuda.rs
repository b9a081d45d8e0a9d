//! Launching the kernels of `kernels.cu` on candle's CUDA storage: every launch is a
//! [`Launch`] description (launch.rs, the same the CPU-emulated tests run) and [`run`] turns it
//! into one cudarc launch.
use super::launch::{Elem, Launch, Param, TensorList, LIST_LEN};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{Activation, CudaBlasLT, Matmul, MatmulConfig};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "distill-kernels";
/// Every kernel this module launches.
const KERNELS: [&str; 60] = [
    "distill_deberta_probs_bf16",
    "distill_deberta_probs_train_bf16",
    "distill_deberta_probs_train_grad_bf16",
    "distill_deberta_p2c_grad_bf16",
    "distill_gelu_erf_f32",
    "distill_gelu_erf_grad_f32",
    "distill_softmax_f32",
    "distill_masked_softmax_f32",
    "distill_softmax_grad_f32",
    "distill_normalize_f32",
    "distill_normalize_grad_f32",
    "distill_dropout_f32",
    "distill_gather_rows_f32",
    "distill_scatter_add_rows_f32",
    "distill_adamw_f32",
    "distill_adamw_list_f32",
    "distill_sum_squares_list_f32",
    "distill_layer_norm_f32",
    "distill_layer_norm_grad_f32",
    "distill_layer_norm_wgrad_f32",
    "distill_column_sum_f32",
    "distill_column_sum_bf16",
    "distill_bias_add_f32",
    "distill_bias_add_bf16_f32",
    "distill_add_norm_bf16",
    "distill_bias_gelu_bf16",
    "distill_bias_gelu_grad_bf16",
    "distill_add_norm_train_f32",
    "distill_add_norm_train_grad_f32",
    "distill_dropout_bf16_f32",
    "distill_add_norm_sum_bf16",
    "distill_embed_norm_bf16",
    "distill_geglu_bf16",
    "distill_geglu_grad_bf16",
    "distill_rotary_split_f32",
    "distill_rotary_merge_f32",
    "distill_flash_attention_d32_bf16",
    "distill_flash_attention_d64_bf16",
    "distill_flash_attention_packed_d32_bf16",
    "distill_flash_attention_packed_d64_bf16",
    "distill_flash_attention_packed_rope_d32_bf16",
    "distill_flash_attention_packed_rope_d64_bf16",
    "distill_flash_attention_train_d32_f32",
    "distill_flash_attention_train_d64_f32",
    "distill_flash_attention_dq_d32_f32",
    "distill_flash_attention_dq_d64_f32",
    "distill_flash_attention_dkv_d32_f32",
    "distill_flash_attention_dkv_d64_f32",
    "distill_flash_attention_train_packed_d32_bf16",
    "distill_flash_attention_train_packed_d64_bf16",
    "distill_flash_attention_dq_packed_d32_bf16",
    "distill_flash_attention_dq_packed_d64_bf16",
    "distill_flash_attention_dkv_packed_d32_bf16",
    "distill_flash_attention_dkv_packed_d64_bf16",
    "distill_flash_attention_train_packed_rope_d32_bf16",
    "distill_flash_attention_train_packed_rope_d64_bf16",
    "distill_flash_attention_dq_packed_rope_d32_bf16",
    "distill_flash_attention_dq_packed_rope_d64_bf16",
    "distill_flash_attention_dkv_packed_rope_d32_bf16",
    "distill_flash_attention_dkv_packed_rope_d64_bf16",
];

/// The kernels this code launches that the embedded PTX lacks: a binary built while
/// kernels.cu changed can embed an older PTX (cargo decides at the start of a build whether
/// build.rs reruns).
pub fn missing_kernels() -> Vec<&'static str> {
    KERNELS.into_iter().filter(|k| !PTX.contains(&format!(".entry {k}("))).collect()
}

/// A buffer argument of a launch.
enum Buf<'a> {
    View(CudaView<'a, f32>),
    Out(&'a CudaSlice<f32>),
    Ids(CudaView<'a, u32>),
    Bf16(CudaView<'a, half::bf16>),
    Bf16Out(&'a CudaSlice<half::bf16>),
}

impl Buf<'_> {
    /// The element type and the length of the buffer.
    fn held(&self) -> (Elem, usize) {
        match self {
            Buf::View(v) => (Elem::F32, v.len()),
            Buf::Out(s) => (Elem::F32, s.len()),
            Buf::Ids(v) => (Elem::U32, v.len()),
            Buf::Bf16(v) => (Elem::Bf16, v.len()),
            Buf::Bf16Out(s) => (Elem::Bf16, s.len()),
        }
    }
}

/// Runs `launch` with `bufs` as its buffers (`Param::Buf(i)` is `bufs[i]`), after checking that
/// each holds what the launch reaches.
fn run(dev: &CudaDevice, launch: &Launch, bufs: &[Buf]) -> Result<()> {
    let held: Vec<(Elem, usize)> = bufs.iter().map(Buf::held).collect();
    launch.check_buffers(&held).map_err(candle_core::Error::Msg)?;
    if launch.grid == 0 {
        return Ok(());
    }
    let func = dev.get_or_load_custom_func(launch.kernel, MODULE, PTX)?;
    // The list arguments (by value), with their tensors' device pointers; the guards live until
    // the launch is queued.
    let stream = dev.cuda_stream();
    let mut guards = Vec::new();
    let mut lists = Vec::new();
    for p in &launch.params {
        if let Param::List(l) = p {
            let mut missing = None;
            let list = l.fill(|i| match bufs.get(i) {
                Some(Buf::View(v)) => {
                    let (ptr, guard) = v.device_ptr(&stream);
                    guards.push(guard);
                    ptr
                }
                _ => {
                    missing = Some(i);
                    0
                }
            });
            if let Some(i) = missing {
                candle_core::bail!("{}: buffer {i} of the list is not an f32 tensor", launch.kernel);
            }
            lists.push(list);
        }
    }
    let mut lists = lists.iter();
    let mut b = func.builder();
    for p in &launch.params {
        match p {
            Param::Buf(i) => match bufs.get(*i) {
                Some(Buf::View(v)) => b.arg(v),
                Some(Buf::Out(s)) => b.arg(*s),
                Some(Buf::Ids(v)) => b.arg(v),
                Some(Buf::Bf16(v)) => b.arg(v),
                Some(Buf::Bf16Out(s)) => b.arg(*s),
                None => candle_core::bail!("{}: no buffer {i}", launch.kernel),
            },
            Param::I64(v) => b.arg(v),
            Param::U64(v) => b.arg(v),
            Param::F32(v) => b.arg(v),
            Param::List(_) => b.arg(lists.next().expect("one list filled per list parameter")),
        };
    }
    let cfg = LaunchConfig { grid_dim: (launch.grid, 1, 1), block_dim: (launch.block, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the descriptions in launch.rs follow the kernels' signatures and reaches (checked
    // against kernels.cu by the emulated tests, under AddressSanitizer too) and every buffer
    // holds what the launch reaches (checked above).
    unsafe { b.launch(cfg) }.w()?;
    drop(guards);
    Ok(())
}

// SAFETY: repr(C), plain integers and floats: kernels.cu's DistillTensorList (its size asserted
// on both sides), which the kernel reads as passed.
unsafe impl DeviceRepr for TensorList {}

fn view<'a>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, f32>> {
    let slice = s.as_cuda_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("{op}: the input is not contiguous"),
    }
}

fn bf16_view<'a>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, half::bf16>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<half::bf16>()?.slice(a..b)),
        None => candle_core::bail!("{op}: an input is not contiguous"),
    }
}

fn inputs<'a>(args: &[(&'a CudaStorage, &Layout)], op: &str) -> Result<Vec<Buf<'a>>> {
    let n = args[0].1.shape().elem_count();
    if args.iter().any(|(_, l)| l.shape().elem_count() != n) {
        candle_core::bail!("{op}: inputs of different sizes");
    }
    args.iter().map(|(s, l)| Ok(Buf::View(view(s, l, op)?))).collect()
}

/// `kernel(inputs..., out, n)` over all elements.
pub fn elementwise(kernel: &'static str, args: &[(&CudaStorage, &Layout)], op: &str) -> Result<(CudaStorage, Shape)> {
    let dev = args[0].0.device().clone();
    let n = args[0].1.shape().elem_count();
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(n)? };
    let mut bufs = inputs(args, op)?;
    bufs.push(Buf::Out(&out));
    run(&dev, &Launch::elementwise(kernel, bufs.len(), n), &bufs)?;
    drop(bufs);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), args[0].1.shape().clone()))
}

/// `kernel(inputs..., out, rows, cols[, extra])`, one warp per row of the last dimension.
pub fn rows(
    kernel: &'static str,
    args: &[(&CudaStorage, &Layout)],
    extra: Option<f32>,
    op: &str,
) -> Result<(CudaStorage, Shape)> {
    let dev = args[0].0.device().clone();
    let n = args[0].1.shape().elem_count();
    let cols = super::last_dim(args[0].1);
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(n)? };
    let mut bufs = inputs(args, op)?;
    bufs.push(Buf::Out(&out));
    run(&dev, &Launch::rows(kernel, bufs.len(), n / cols, cols, extra), &bufs)?;
    drop(bufs);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), args[0].1.shape().clone()))
}

/// `distill_masked_softmax_f32`: one warp per row of the scores.
pub fn masked_softmax(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    strides: (usize, usize, usize, usize),
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let n = l1.shape().elem_count();
    let cols = super::last_dim(l1);
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(n)? };
    let bufs = [Buf::View(view(s1, l1, "masked softmax")?), Buf::View(view(s2, l2, "masked softmax")?), Buf::Out(&out)];
    run(&dev, &Launch::masked_softmax(n / cols, cols, strides, scale), &bufs)?;
    drop(bufs);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
}

/// `distill_dropout_f32` over all elements.
pub fn dropout(s: &CudaStorage, l: &Layout, seed: u64, p: f32) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let n = l.shape().elem_count();
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(n)? };
    let bufs = [Buf::View(view(s, l, "dropout")?), Buf::Out(&out)];
    run(&dev, &Launch::dropout(n, seed, p), &bufs)?;
    drop(bufs);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
}

/// The gather / scatter kernels: `kernel(f32 input, u32 ids, out, n, dim, vocab)` over an
/// output of `out_len` elements (zeroed first when `zeroed`), threads over n x dim.
// Allowed: one argument per parameter of the CUDA kernel it launches.
#[allow(clippy::too_many_arguments)]
pub fn rows_by_id(
    kernel: &'static str,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    out_len: usize,
    zeroed: bool,
    n: usize,
    dim: usize,
    vocab: usize,
) -> Result<CudaStorage> {
    let dev = s1.device().clone();
    let ids = match l2.contiguous_offsets() {
        Some((a, b)) => s2.as_cuda_slice::<u32>()?.slice(a..b),
        None => candle_core::bail!("{kernel}: the ids are not contiguous"),
    };
    // SAFETY: either zeroed, or every element written by the gather.
    let out = if zeroed { dev.alloc_zeros::<f32>(out_len)? } else { unsafe { dev.alloc::<f32>(out_len)? } };
    let bufs = [Buf::View(view(s1, l1, kernel)?), Buf::Ids(ids), Buf::Out(&out)];
    run(&dev, &Launch::rows_by_id(kernel, n, dim, vocab), &bufs)?;
    drop(bufs);
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// The AdamW kernel over one parameter, writing the parameter and both moments in place.
pub fn adamw(param: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, scale: &Tensor, c: [f32; 6]) -> Result<()> {
    let n = param.elem_count();
    if [m, v, g].iter().any(|t| t.elem_count() != n) || scale.elem_count() != 1 {
        candle_core::bail!("adamw: parameter and state of different sizes, or a scale of {:?}", scale.dims());
    }
    // Read guards: the kernel writes through the parameter's and the moments' pointers. No
    // other tensor shares their storage (the optimizer owns m and v; the variable's storage
    // is written only here and by Var::set), and candle runs one stream, so nothing reads them
    // while the kernel runs out of order.
    let guards = [param, m, v, g, scale].map(|t| t.storage_and_layout());
    let (bufs, dev) = views(&guards, "adamw")?;
    run(&dev, &Launch::adamw(n, c), &bufs)
}

/// One AdamW update of each tensor (parameter, m, v, gradient, weight decay factor) in place,
/// [`LIST_LEN`] tensors per launch; `scale` one f32 the gradients are multiplied by. `c` = [beta1,
/// beta2, bc2, step, eps].
pub fn adamw_list(items: &[(&Tensor, &Tensor, &Tensor, &Tensor, f32)], scale: &Tensor, c: [f32; 5]) -> Result<()> {
    if scale.elem_count() != 1 {
        candle_core::bail!("adamw: a scale of {:?}", scale.dims());
    }
    for chunk in items.chunks(LIST_LEN) {
        let mut n = Vec::with_capacity(chunk.len());
        let mut tensors = Vec::with_capacity(4 * chunk.len() + 1);
        for &(p, m, v, g, _) in chunk {
            if [m, v, g].iter().any(|t| t.elem_count() != p.elem_count()) {
                candle_core::bail!("adamw: parameter and state of different sizes ({:?})", p.dims());
            }
            n.push(p.elem_count());
            tensors.extend([p, m, v, g]);
        }
        tensors.push(scale);
        let decay: Vec<f32> = chunk.iter().map(|i| i.4).collect();
        // Read guards, as `adamw`: the kernel writes through the parameters' and moments' pointers.
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let (bufs, dev) = views(&guards, "adamw")?;
        run(&dev, &Launch::adamw_list(&n, &decay, c), &bufs)?;
    }
    Ok(())
}

/// acc (one f32) += Σ g² over all of `grads`, in place, [`LIST_LEN`] gradients per launch.
pub fn sum_squares_list(acc: &Tensor, grads: &[&Tensor]) -> Result<()> {
    if acc.elem_count() != 1 {
        candle_core::bail!("sum of squares: an accumulator of {:?}", acc.dims());
    }
    for chunk in grads.chunks(LIST_LEN) {
        let n: Vec<usize> = chunk.iter().map(|g| g.elem_count()).collect();
        let guards: Vec<_> = chunk.iter().copied().chain([acc]).map(|t| t.storage_and_layout()).collect();
        let (bufs, dev) = views(&guards, "sum of squares")?;
        run(&dev, &Launch::sum_squares_list(&n), &bufs)?;
    }
    Ok(())
}

/// f32 views of the tensors behind `guards` (contiguous, on one CUDA device) and that device.
fn views<'a, S: std::ops::Deref<Target = Storage>>(
    guards: &'a [(S, &'a Layout)],
    op: &str,
) -> Result<(Vec<Buf<'a>>, CudaDevice)> {
    let mut bufs = Vec::with_capacity(guards.len());
    let mut dev = None;
    for (storage, layout) in guards {
        let Storage::Cuda(s) = &**storage else { candle_core::bail!("{op}: not a CUDA tensor") };
        bufs.push(Buf::View(view(s, layout, op)?));
        dev.get_or_insert_with(|| s.device().clone());
    }
    Ok((bufs, dev.ok_or_else(|| candle_core::Error::Msg(format!("{op}: no tensors")))?))
}

/// The cuBLASLt handle of `dev` (one per device, on candle's stream, with cudarc's workspace).
fn blas_lt(dev: &CudaDevice) -> Result<Arc<CudaBlasLT>> {
    static HANDLES: Mutex<Vec<(DeviceId, Arc<CudaBlasLT>)>> = Mutex::new(Vec::new());
    let mut handles = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, lt)) = handles.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(lt.clone());
    }
    let lt = Arc::new(CudaBlasLT::new(dev.cuda_stream()).map_err(|e| candle_core::Error::Cuda(Box::new(e)))?);
    handles.push((dev.id(), lt.clone()));
    Ok(lt)
}

/// gelu(x wᵀ + b), bf16, as one cuBLASLt product with its GELU_BIAS epilogue: x [rows, k], w [n, k]
/// and b [n] contiguous bf16; out [rows, n] (launch.rs's `lt_product` maps the row-major layer
/// onto cuBLAS's column-major product).
pub fn matmul_bias_gelu(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    rows: usize,
    k: usize,
    n: usize,
) -> Result<CudaStorage> {
    const OP: &str = "matmul + bias + gelu";
    let dev = s1.device().clone();
    let (x, w, b) = (bf16_view(s1, l1, OP)?, bf16_view(s2, l2, OP)?, bf16_view(s3, l3, OP)?);
    // SAFETY: every element is written by the product.
    let mut out = unsafe { dev.alloc::<half::bf16>(rows * n)? };
    if rows > 0 && n > 0 {
        let p = super::launch::lt_product(rows, k, n);
        let cfg = MatmulConfig {
            transa: p.transa,
            transb: p.transb,
            transc: false,
            m: p.m,
            n: p.n,
            k: p.k,
            alpha: 1.0,
            lda: p.lda,
            ldb: p.ldb,
            beta: 0.0,
            ldc: p.ldc,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        // SAFETY: the views hold k x n, k x rows and n elements (product_shape checked the
        // shapes), out rows x n: what the configuration reads and writes.
        unsafe { blas_lt(&dev)?.matmul(cfg, &w, &x, &mut out, Some(&b), Some(&Activation::Gelu)) }
            .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Runs `launch` on `ins` plus a new output of `len` elements (zeroed first when `zeroed`, for
/// the kernels that accumulate into it; otherwise the kernel writes every element).
fn with_output(dev: &CudaDevice, launch: &Launch, ins: Vec<Buf>, len: usize, zeroed: bool) -> Result<CudaSlice<f32>> {
    // SAFETY: either zeroed, or every element written by the kernel.
    let out = if zeroed { dev.alloc_zeros::<f32>(len)? } else { unsafe { dev.alloc::<f32>(len)? } };
    {
        // A new vector, whose buffers need live only as long as `out`'s borrow.
        let mut bufs = ins;
        bufs.push(Buf::Out(&out));
        run(dev, launch, &bufs)?;
    }
    Ok(out)
}

fn rows_cols(l: &Layout) -> (usize, usize) {
    let cols = super::last_dim(l);
    (l.shape().elem_count() / cols, cols)
}

/// The scoring epilogue of a post-LN block: (x, residual, params [3, cols]) -> LN(x + bias +
/// residual) w + shift, bf16 in and out; with `sum`, [2, ..] = (the sums, their norms).
pub fn add_norm(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    eps: f32,
    sum: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (rows, cols) = rows_cols(l1);
    let op = "add norm";
    let (launch, parts) =
        if sum { (Launch::add_norm_sum(rows, cols, eps), 2) } else { (Launch::add_norm(rows, cols, eps), 1) };
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<half::bf16>(parts * rows * cols)? };
    let bufs = [
        Buf::Bf16(bf16_view(s1, l1, op)?),
        Buf::Bf16(bf16_view(s2, l2, op)?),
        Buf::View(view(s3, l3, op)?),
        Buf::Bf16Out(&out),
    ];
    run(&dev, &launch, &bufs)?;
    drop(bufs);
    let mut shape = if sum { vec![2] } else { vec![] };
    shape.extend(l1.dims());
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape.into()))
}

/// Scoring embeddings: the tables (1-3, bf16 [n, cols]; the unused ones repeat the first), their
/// ids (u32, [rows] each), params [2, cols] f32 -> LN(Σ gathered rows) w + shift, bf16 [rows, cols].
pub fn embed_norm(
    tables: [(&CudaStorage, &Layout); 3],
    ids: &[Tensor],
    params: &Tensor,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let op = "embed norm";
    let (dev, cols) = (tables[0].0.device().clone(), rows_cols(tables[0].1).1);
    let rows = ids[0].elem_count();
    let mut bufs = Vec::with_capacity(8);
    for (s, l) in tables {
        bufs.push(Buf::Bf16(bf16_view(s, l, op)?));
    }
    let guards: Vec<_> = (0..3).map(|k| ids[k.min(ids.len() - 1)].storage_and_layout()).collect();
    for (storage, layout) in &guards {
        let Storage::Cuda(c) = &**storage else { candle_core::bail!("{op}: ids not on the GPU") };
        match layout.contiguous_offsets() {
            Some((a, b)) => bufs.push(Buf::Ids(c.as_cuda_slice::<u32>()?.slice(a..b))),
            None => candle_core::bail!("{op}: ids not contiguous"),
        }
    }
    let (ps, pl) = params.storage_and_layout();
    bufs.push(Buf::View(view(cuda_of(&ps, op)?, pl, op)?));
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<half::bf16>(rows * cols)? };
    bufs.push(Buf::Bf16Out(&out));
    let n = tables.map(|(_, l)| l.dims()[0]);
    run(&dev, &Launch::embed_norm(rows, cols, n, ids.len(), eps), &bufs)?;
    drop(bufs);
    let mut shape = ids[0].dims().to_vec();
    shape.push(cols);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape.into()))
}

/// GeGLU for scoring: x [.., 2 inter] bf16 -> gelu(input) gate [.., inter], bf16.
pub fn geglu(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let (rows, cols) = rows_cols(l);
    let inter = cols / 2;
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<half::bf16>(rows * inter)? };
    let bufs = [Buf::Bf16(bf16_view(s, l, "geglu")?), Buf::Bf16Out(&out)];
    run(&dev, &Launch::geglu(rows, inter), &bufs)?;
    drop(bufs);
    let mut shape = l.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = inter;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape.into()))
}

/// The feed-forward's bias and GELU for scoring: (x bf16, b f32) -> gelu(x + b), bf16.
pub fn bias_gelu((s1, l1): (&CudaStorage, &Layout), (s2, l2): (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (rows, cols) = rows_cols(l1);
    let op = "bias gelu";
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<half::bf16>(rows * cols)? };
    let bufs = [Buf::Bf16(bf16_view(s1, l1, op)?), Buf::View(view(s2, l2, op)?), Buf::Bf16Out(&out)];
    run(&dev, &Launch::bias_gelu(rows * cols, cols), &bufs)?;
    drop(bufs);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
}

/// The training epilogue of a post-LN block: (x bf16, residual f32, params [3, cols] f32) ->
/// LN(dropout(x + bias) + residual) w + shift, f32.
pub fn add_norm_train(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    eps: f32,
    seed: u64,
    p: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (rows, cols) = rows_cols(l1);
    let op = "add norm (training)";
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(rows * cols)? };
    let bufs =
        [Buf::Bf16(bf16_view(s1, l1, op)?), Buf::View(view(s2, l2, op)?), Buf::View(view(s3, l3, op)?), Buf::Out(&out)];
    run(&dev, &Launch::add_norm_train(rows, cols, eps, seed, p), &bufs)?;
    drop(bufs);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
}

/// Its backward: (x, residual, params) and the output's gradient -> f32 [rows cols + 3 cols]: the
/// residual's gradient, then the column sums of the bias, the weight and the shift.
// Allowed: one argument per parameter of the CUDA kernel it launches.
#[allow(clippy::too_many_arguments)]
pub fn add_norm_train_grad(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    grad: &Tensor,
    eps: f32,
    seed: u64,
    p: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (rows, cols) = rows_cols(l1);
    let (n, op) = (rows * cols, "add norm backward (training)");
    let (gs, gl) = grad.storage_and_layout();
    // SAFETY: the kernel writes every ds; the sums it adds to are zeroed here.
    let mut out = unsafe { dev.alloc::<f32>(n + 3 * cols)? };
    dev.cuda_stream().memset_zeros(&mut out.slice_mut(n..n + 3 * cols)).w()?;
    {
        let bufs = [
            Buf::Bf16(bf16_view(s1, l1, op)?),
            Buf::View(view(s2, l2, op)?),
            Buf::View(view(s3, l3, op)?),
            Buf::View(view(cuda_of(&gs, op)?, gl, op)?),
            Buf::View(out.slice(0..n)),
            Buf::View(out.slice(n..n + 3 * cols)),
        ];
        run(&dev, &Launch::add_norm_train_grad(rows, cols, eps, seed, p), &bufs)?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), (n + 3 * cols).into()))
}

/// Dropout's mask on an f32 gradient, out bf16.
pub fn dropout_bf16(s: &CudaStorage, l: &Layout, seed: u64, p: f32) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let n = l.shape().elem_count();
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<half::bf16>(n)? };
    let bufs = [Buf::View(view(s, l, "dropout (bf16)")?), Buf::Bf16Out(&out)];
    run(&dev, &Launch::dropout_bf16(n, seed, p), &bufs)?;
    drop(bufs);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
}

/// GeGLU's backward: (g [rows, inter] bf16, x [rows, 2 inter] bf16) -> dx [rows, 2 inter] bf16.
pub fn geglu_grad(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (rows, inter) = rows_cols(l1);
    let op = "geglu backward";
    // SAFETY: every element is written by the kernel (both halves of each row).
    let out = unsafe { dev.alloc::<half::bf16>(rows * 2 * inter)? };
    let bufs = [Buf::Bf16(bf16_view(s1, l1, op)?), Buf::Bf16(bf16_view(s2, l2, op)?), Buf::Bf16Out(&out)];
    run(&dev, &Launch::geglu_grad(rows, inter), &bufs)?;
    drop(bufs);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l2.shape().clone()))
}

/// Layer norm with scale and shift: (x, w, b) -> y.
// Allowed: one argument per parameter of the CUDA kernel it launches.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    eps: f32,
    has_bias: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (rows, cols) = rows_cols(l1);
    let op = "layer norm";
    let ins = vec![Buf::View(view(s1, l1, op)?), Buf::View(view(s2, l2, op)?), Buf::View(view(s3, l3, op)?)];
    let out = with_output(&dev, &Launch::layer_norm(rows, cols, eps, has_bias), ins, rows * cols, false)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
}

/// The input gradient of layer norm: (x, w, g) -> dx.
pub fn layer_norm_grad(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (rows, cols) = rows_cols(l1);
    let op = "layer norm grad";
    let ins = vec![Buf::View(view(s1, l1, op)?), Buf::View(view(s2, l2, op)?), Buf::View(view(s3, l3, op)?)];
    let launch = Launch::layer_norm_grad(rows, cols, eps);
    let out = with_output(&dev, &launch, ins, rows * cols, false)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
}

/// Layer norm's weight and bias gradients: (x, g) -> [2, cols].
pub fn layer_norm_wgrad(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (rows, cols) = rows_cols(l1);
    let op = "layer norm weight grad";
    let ins = vec![Buf::View(view(s1, l1, op)?), Buf::View(view(s2, l2, op)?)];
    let out = with_output(&dev, &Launch::layer_norm_wgrad(rows, cols, eps), ins, 2 * cols, true)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), (2, cols).into()))
}

/// Sums over every dimension but the last: g [.., cols] -> [cols].
pub fn column_sum(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let (rows, cols) = rows_cols(l);
    let op = "column sum";
    let (ins, launch) = if s.dtype() == candle_core::DType::BF16 {
        (vec![Buf::Bf16(bf16_view(s, l, op)?)], Launch::column_sum_bf16(rows, cols))
    } else {
        (vec![Buf::View(view(s, l, op)?)], Launch::column_sum(rows, cols))
    };
    let out = with_output(&dev, &launch, ins, cols, true)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), cols.into()))
}

/// The training bias + GELU's backward: (g bf16, x bf16, b f32) -> dx bf16.
pub fn bias_gelu_grad(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (rows, cols) = rows_cols(l2);
    let op = "bias gelu grad";
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<half::bf16>(rows * cols)? };
    let bufs = [
        Buf::Bf16(bf16_view(s1, l1, op)?),
        Buf::Bf16(bf16_view(s2, l2, op)?),
        Buf::View(view(s3, l3, op)?),
        Buf::Bf16Out(&out),
    ];
    run(&dev, &Launch::bias_gelu_grad(rows * cols, cols), &bufs)?;
    drop(bufs);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l2.shape().clone()))
}

/// x + b over the last dimension, in f32 (x f32 or bf16).
pub fn bias_add(s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (rows, cols) = rows_cols(l1);
    let op = "bias add";
    let bf16_x = s1.dtype() == candle_core::DType::BF16;
    let x = if bf16_x { Buf::Bf16(bf16_view(s1, l1, op)?) } else { Buf::View(view(s1, l1, op)?) };
    let ins = vec![x, Buf::View(view(s2, l2, op)?)];
    let out = with_output(&dev, &Launch::bias_add(bf16_x, rows * cols, cols), ins, rows * cols, false)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
}

/// The rotary split or merge: (input, cos, sin) -> out of `out_shape` (3 b h l d elements).
pub fn rotary(
    kernel: &'static str,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    [b, l, h, d]: [usize; 4],
    out_shape: Shape,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let ins =
        vec![Buf::View(view(s1, l1, kernel)?), Buf::View(view(s2, l2, kernel)?), Buf::View(view(s3, l3, kernel)?)];
    let out = with_output(&dev, &Launch::rotary(kernel, b, l, h, d), ins, 3 * b * l * h * d, false)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), out_shape))
}

/// Attention for scoring: (q, k, v [B, H, L, D] bf16, key bias [B, 1, 1, L] f32) -> [B, L, H D] bf16.
// Allowed: one argument per parameter of the CUDA kernel it launches.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    bias: &Tensor,
    [b, h, l, d]: [usize; 4],
    scale: f32,
    window: Option<usize>,
) -> Result<(CudaStorage, Shape)> {
    let op = "flash attention";
    let Some(launch) = super::launch::Launch::flash_attention(d, b, h, l, scale, window) else {
        candle_core::bail!("{op}: no kernel for head size {d}");
    };
    let inputs =
        vec![Buf::Bf16(bf16_view(s1, l1, op)?), Buf::Bf16(bf16_view(s2, l2, op)?), Buf::Bf16(bf16_view(s3, l3, op)?)];
    flash_scoring(&launch, inputs, bias, [b, h, l, d], op)
}

/// Runs a flash-attention-for-scoring launch on `inputs` then the key bias and a new [B, L, H D]
/// bf16 output.
fn flash_scoring(
    launch: &Launch,
    inputs: Vec<Buf>,
    bias: &Tensor,
    [b, h, l, d]: [usize; 4],
    op: &str,
) -> Result<(CudaStorage, Shape)> {
    let (bias_storage, bias_layout) = bias.storage_and_layout();
    let Storage::Cuda(bias_cuda) = &*bias_storage else { candle_core::bail!("{op}: the mask is not on the GPU") };
    let dev = bias_cuda.device().clone();
    // SAFETY: the kernel writes every element (every query row of every head).
    let out = unsafe { dev.alloc::<half::bf16>(b * l * h * d)? };
    {
        // A new vector, whose buffers need live only as long as the mask's and `out`'s borrows.
        let mut bufs: Vec<Buf> = inputs;
        bufs.push(Buf::View(view(bias_cuda, bias_layout, op)?));
        bufs.push(Buf::Bf16Out(&out));
        run(&dev, launch, &bufs)?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), (b, l, h * d).into()))
}

/// Elements `range` of a contiguous f32 tensor's storage.
fn view_range<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    range: std::ops::Range<usize>,
    op: &str,
) -> Result<CudaView<'a, f32>> {
    match l.contiguous_offsets() {
        Some((a, b)) if a + range.end <= b => Ok(s.as_cuda_slice::<f32>()?.slice(a + range.start..a + range.end)),
        _ => candle_core::bail!("{op}: not contiguous, or shorter than {}", range.end),
    }
}

/// A CUDA tensor's storage, held while a kernel reads it.
fn cuda_of<'a>(guard: &'a candle_core::Storage, op: &str) -> Result<&'a CudaStorage> {
    match guard {
        Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("{op}: a tensor is not on the GPU"),
    }
}

/// The training attention's forward: (q, k, v [B, H, L, D] f32) -> packed [B L H D + B H L].
pub fn flash_train(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    bias: &Tensor,
    a: super::launch::Attention,
) -> Result<(CudaStorage, Shape)> {
    let op = "flash attention (training)";
    let Some(launch) = a.forward() else { candle_core::bail!("{op}: no kernel for head size {}", a.d) };
    let (n, nl) = (a.b * a.h * a.l * a.d, a.b * a.h * a.l);
    let dev = s1.device().clone();
    let (bs, bl) = bias.storage_and_layout();
    // SAFETY: the kernel writes every output row and every log-sum-exp.
    let out = unsafe { dev.alloc::<f32>(n + nl)? };
    {
        let bufs = [
            Buf::View(view(s1, l1, op)?),
            Buf::View(view(s2, l2, op)?),
            Buf::View(view(s3, l3, op)?),
            Buf::View(view(cuda_of(&bs, op)?, bl, op)?),
            Buf::View(out.slice(0..n)),
            Buf::View(out.slice(n..n + nl)),
        ];
        run(&dev, &launch, &bufs)?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), (n + nl).into()))
}

/// The training attention's backward: (q, k, v) -> [3, B, H, L, D] (dq, dk, dv) from the packed
/// forward output and the context's gradient.
pub fn flash_train_grad(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    bias: &Tensor,
    packed: &Tensor,
    dout: &Tensor,
    a: super::launch::Attention,
) -> Result<(CudaStorage, Shape)> {
    let op = "flash attention backward";
    let (Some(dq_launch), Some(dkv_launch)) = (a.backward_dq(), a.backward_dkv()) else {
        candle_core::bail!("{op}: no kernel for head size {}", a.d)
    };
    let (n, nl) = (a.b * a.h * a.l * a.d, a.b * a.h * a.l);
    let dev = s1.device().clone();
    let ((bs, bl), (ps, pl), (ds, dl)) =
        (bias.storage_and_layout(), packed.storage_and_layout(), dout.storage_and_layout());
    let (bias_s, packed_s, dout_s) = (cuda_of(&bs, op)?, cuda_of(&ps, op)?, cuda_of(&ds, op)?);
    // SAFETY: the kernels write every row of dq, dk, dv and every Δ.
    let out = unsafe { dev.alloc::<f32>(3 * n)? };
    let delta = unsafe { dev.alloc::<f32>(nl)? };
    {
        let inputs = || -> Result<Vec<Buf>> {
            Ok(vec![
                Buf::View(view(s1, l1, op)?),
                Buf::View(view(s2, l2, op)?),
                Buf::View(view(s3, l3, op)?),
                Buf::View(view(bias_s, bl, op)?),
            ])
        };
        let mut bufs = inputs()?;
        bufs.extend([
            Buf::View(view_range(packed_s, pl, 0..n, op)?),
            Buf::View(view(dout_s, dl, op)?),
            Buf::View(view_range(packed_s, pl, n..n + nl, op)?),
            Buf::View(out.slice(0..n)),
            Buf::Out(&delta),
        ]);
        run(&dev, &dq_launch, &bufs)?;
        let mut bufs = inputs()?;
        bufs.extend([
            Buf::View(view(dout_s, dl, op)?),
            Buf::View(view_range(packed_s, pl, n..n + nl, op)?),
            Buf::Out(&delta),
            Buf::View(out.slice(n..2 * n)),
            Buf::View(out.slice(2 * n..3 * n)),
        ]);
        run(&dev, &dkv_launch, &bufs)?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), (3, a.b, a.h, a.l, a.d).into()))
}

/// Elements `range` of a contiguous bf16 tensor's storage.
fn bf16_range<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    range: std::ops::Range<usize>,
    op: &str,
) -> Result<CudaView<'a, half::bf16>> {
    match l.contiguous_offsets() {
        Some((a, b)) if a + range.end <= b => {
            Ok(s.as_cuda_slice::<half::bf16>()?.slice(a + range.start..a + range.end))
        }
        _ => candle_core::bail!("{op}: not contiguous, or shorter than {}", range.end),
    }
}

/// The training attention's forward from a joined product: (qkv [B, L, 3 H D] bf16, its bias
/// [3 H D] f32) -> bf16 [B L H D + 2 B H L]: the context, then the log-sum-exp as f32 bits.
pub fn flash_train_packed(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    bias: &Tensor,
    rope: Option<&Tensor>,
    a: super::launch::Attention,
) -> Result<(CudaStorage, Shape)> {
    let op = "flash attention (training, packed)";
    let Some(launch) = a.forward_packed(rope.is_some()) else {
        candle_core::bail!("{op}: no kernel for head size {}", a.d)
    };
    let (n, nl) = (a.b * a.h * a.l * a.d, a.b * a.h * a.l);
    let dev = s1.device().clone();
    let (bs, bl) = bias.storage_and_layout();
    let rope = rope.map(|t| t.storage_and_layout());
    // SAFETY: the kernel writes every output row and every log-sum-exp (its f32 at an even
    // offset: n is a multiple of the head size).
    let out = unsafe { dev.alloc::<half::bf16>(n + 2 * nl)? };
    {
        let mut bufs = vec![Buf::Bf16(bf16_view(s1, l1, op)?), Buf::View(view(s2, l2, op)?)];
        if let Some((rs, rl)) = &rope {
            bufs.push(Buf::View(view(cuda_of(rs, op)?, rl, op)?));
        }
        bufs.extend([
            Buf::View(view(cuda_of(&bs, op)?, bl, op)?),
            Buf::Bf16(out.slice(0..n)),
            Buf::Bf16(out.slice(n..n + 2 * nl)),
        ]);
        run(&dev, &launch, &bufs)?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), (n + 2 * nl).into()))
}

/// The packed training attention's backward: (qkv, qkv_bias) -> the product's gradient
/// [B, L, 3 H D] bf16, from the forward's output `packed` and the context's gradient `dout` (bf16).
// Allowed: one argument per parameter of the CUDA kernel it launches.
#[allow(clippy::too_many_arguments)]
pub fn flash_train_packed_grad(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    bias: &Tensor,
    rope: Option<&Tensor>,
    packed: &Tensor,
    dout: &Tensor,
    a: super::launch::Attention,
) -> Result<(CudaStorage, Shape)> {
    let op = "flash attention backward (packed)";
    let with_rope = rope.is_some();
    let (Some(dq_launch), Some(dkv_launch)) = (a.backward_dq_packed(with_rope), a.backward_dkv_packed(with_rope))
    else {
        candle_core::bail!("{op}: no kernel for head size {}", a.d)
    };
    let (n, nl) = (a.b * a.h * a.l * a.d, a.b * a.h * a.l);
    let dev = s1.device().clone();
    let ((bs, bl), (ps, pl), (ds, dl)) =
        (bias.storage_and_layout(), packed.storage_and_layout(), dout.storage_and_layout());
    let (bias_s, packed_s, dout_s) = (cuda_of(&bs, op)?, cuda_of(&ps, op)?, cuda_of(&ds, op)?);
    let rope = rope.map(|t| t.storage_and_layout());
    // SAFETY: the two kernels write every element between them (dQ; dK and dV) and every Δ.
    let out = unsafe { dev.alloc::<half::bf16>(3 * n)? };
    let delta = unsafe { dev.alloc::<f32>(nl)? };
    {
        let inputs = || -> Result<Vec<Buf>> {
            let mut bufs = vec![Buf::Bf16(bf16_view(s1, l1, op)?), Buf::View(view(s2, l2, op)?)];
            if let Some((rs, rl)) = &rope {
                bufs.push(Buf::View(view(cuda_of(rs, op)?, rl, op)?));
            }
            bufs.push(Buf::View(view(bias_s, bl, op)?));
            Ok(bufs)
        };
        let mut bufs = inputs()?;
        bufs.extend([
            Buf::Bf16(bf16_range(packed_s, pl, 0..n, op)?),
            Buf::Bf16(bf16_view(dout_s, dl, op)?),
            Buf::Bf16(bf16_range(packed_s, pl, n..n + 2 * nl, op)?),
            Buf::Bf16Out(&out),
            Buf::Out(&delta),
        ]);
        run(&dev, &dq_launch, &bufs)?;
        let mut bufs = inputs()?;
        bufs.extend([
            Buf::Bf16(bf16_view(dout_s, dl, op)?),
            Buf::Bf16(bf16_range(packed_s, pl, n..n + 2 * nl, op)?),
            Buf::Out(&delta),
            Buf::Bf16Out(&out),
        ]);
        run(&dev, &dkv_launch, &bufs)?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
}

/// Attention for scoring from one packed product: (qkv [B, L, 3 H D] bf16, its bias [3 H D] f32),
/// key bias [B, 1, 1, L] f32, rotary embeddings for q and k `rope` [2, L, D] f32 (or none) ->
/// [B, L, H D] bf16.
// Allowed: one argument per parameter of the CUDA kernel it launches.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_packed(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    bias: &Tensor,
    rope: Option<&Tensor>,
    [b, h, l, d]: [usize; 4],
    scale: f32,
    window: Option<usize>,
) -> Result<(CudaStorage, Shape)> {
    let op = "flash attention (packed)";
    let Some(launch) = super::launch::Launch::flash_attention_packed(d, b, h, l, scale, window, rope.is_some()) else {
        candle_core::bail!("{op}: no kernel for head size {d}");
    };
    let rope = rope.map(|t| t.storage_and_layout());
    let mut inputs = vec![Buf::Bf16(bf16_view(s1, l1, op)?), Buf::View(view(s2, l2, op)?)];
    if let Some((storage, layout)) = &rope {
        let Storage::Cuda(r) = &**storage else { candle_core::bail!("{op}: the rotary table is not on the GPU") };
        inputs.push(Buf::View(view(r, layout, op)?));
    }
    flash_scoring(&launch, inputs, bias, [b, h, l, d], op)
}

/// DeBERTa's disentangled attention probabilities for scoring: (qk [BH, Q, L], c2p [BH, Q, P],
/// p2c [BH, L, P], bf16), the bucket indices [L, L] u32 each, the key mask [B, L] f32 -> [BH, Q, L]
/// bf16.
// Allowed: one argument per parameter of the CUDA kernel it launches.
#[allow(clippy::too_many_arguments)]
pub fn deberta_probs(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    c2p_idx: &Tensor,
    p2c_idx: &Tensor,
    mask: &Tensor,
    [bh, heads, q_rows, len, pos]: [usize; 5],
    inv_scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let op = "deberta probs";
    let guards = [c2p_idx, p2c_idx, mask].map(|t| t.storage_and_layout());
    let aux = deberta_aux(&guards, op)?;
    let dev = s1.device().clone();
    // SAFETY: every element is written by the kernel (every key of every query row).
    let out = unsafe { dev.alloc::<half::bf16>(bh * q_rows * len)? };
    {
        let mut bufs = vec![
            Buf::Bf16(bf16_view(s1, l1, op)?),
            Buf::Bf16(bf16_view(s2, l2, op)?),
            Buf::Bf16(bf16_view(s3, l3, op)?),
        ];
        bufs.extend(aux);
        bufs.push(Buf::Bf16Out(&out));
        run(&dev, &Launch::deberta_probs(bh, heads, q_rows, len, pos, inv_scale), &bufs)?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
}

/// The bucket indices (u32) and the mask (f32) of a DeBERTa op as launch buffers, with the guards
/// that keep them borrowed.
fn deberta_aux<'a, G: std::ops::Deref<Target = Storage>>(
    guards: &'a [(G, &'a Layout); 3],
    op: &str,
) -> Result<Vec<Buf<'a>>> {
    let mut aux = Vec::with_capacity(3);
    for (i, (storage, layout)) in guards.iter().enumerate() {
        let Storage::Cuda(c) = &**storage else { candle_core::bail!("{op}: an index or the mask is not on the GPU") };
        aux.push(if i < 2 {
            match layout.contiguous_offsets() {
                Some((a, b)) => Buf::Ids(c.as_cuda_slice::<u32>()?.slice(a..b)),
                None => candle_core::bail!("{op}: an index is not contiguous"),
            }
        } else {
            Buf::View(view(c, layout, op)?)
        });
    }
    Ok(aux)
}

/// DeBERTa's probabilities in training: (qk, c2p, p2c bf16) -> bf16 [rows len (even) + 2 rows]
/// (the dropped probabilities, then the log-sum-exp as f32 bits).
pub fn deberta_probs_train(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    op_: &super::attention::DebertaProbsTrain,
    [bh, heads, q_rows, len, pos]: [usize; 5],
) -> Result<(CudaStorage, Shape)> {
    let op = "deberta probs (training)";
    let d = &op_.probs;
    let guards = [&d.c2p_idx, &d.p2c_idx, &d.mask].map(|t| t.storage_and_layout());
    let aux = deberta_aux(&guards, op)?;
    let (rows, dev) = (bh * q_rows, s1.device().clone());
    let at = (rows * len).div_ceil(2) * 2;
    // SAFETY: every probability and every log-sum-exp is written by the kernel (the pad slot is
    // never read).
    let out = unsafe { dev.alloc::<half::bf16>(at + 2 * rows)? };
    {
        let mut bufs = vec![
            Buf::Bf16(bf16_view(s1, l1, op)?),
            Buf::Bf16(bf16_view(s2, l2, op)?),
            Buf::Bf16(bf16_view(s3, l3, op)?),
        ];
        bufs.extend(aux);
        bufs.extend([Buf::Bf16(out.slice(0..rows * len)), Buf::Bf16(out.slice(at..at + 2 * rows))]);
        let launch = Launch::deberta_probs_train(bh, heads, q_rows, len, pos, 1.0 / d.scale, op_.seed, op_.p);
        run(&dev, &launch, &bufs)?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), (at + 2 * rows).into()))
}

/// Its backward: (qk, c2p, p2c) -> bf16 [dqk | dc2p | dp2c], two kernels (the second sums dqk
/// down the query rows into p2c's buckets).
pub fn deberta_probs_train_grad(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    op_: &super::attention::DebertaProbsTrainGrad,
    [bh, heads, q_rows, len, pos]: [usize; 5],
) -> Result<(CudaStorage, Shape)> {
    let op = "deberta probs backward (training)";
    let (f, d) = (&op_.fwd, &op_.fwd.probs);
    let guards = [&d.c2p_idx, &d.p2c_idx, &d.mask].map(|t| t.storage_and_layout());
    let aux = deberta_aux(&guards, op)?;
    let p2c_idx = deberta_aux(&guards, op)?.swap_remove(1);
    let ((ps, pl), (gs, gl)) = (op_.packed.storage_and_layout(), op_.dout.storage_and_layout());
    let (packed_s, dout_s) = (cuda_of(&ps, op)?, cuda_of(&gs, op)?);
    let (rows, dev) = (bh * q_rows, s1.device().clone());
    let lse_at = (rows * len).div_ceil(2) * 2;
    let (n_qk, n_c2p, n_p2c) = (rows * len, rows * pos, bh * len * pos);
    // SAFETY: the first kernel writes every dqk and dc2p element, the second every dp2c element.
    let out = unsafe { dev.alloc::<half::bf16>(n_qk + n_c2p + n_p2c)? };
    {
        let mut bufs = vec![
            Buf::Bf16(bf16_view(s1, l1, op)?),
            Buf::Bf16(bf16_view(s2, l2, op)?),
            Buf::Bf16(bf16_view(s3, l3, op)?),
        ];
        bufs.extend(aux);
        bufs.extend([
            Buf::Bf16(bf16_range(packed_s, pl, lse_at..lse_at + 2 * rows, op)?),
            Buf::Bf16(bf16_view(dout_s, gl, op)?),
            Buf::Bf16(out.slice(0..n_qk)),
            Buf::Bf16(out.slice(n_qk..n_qk + n_c2p)),
        ]);
        let launch = Launch::deberta_probs_train_grad(bh, heads, q_rows, len, pos, 1.0 / d.scale, f.seed, f.p);
        run(&dev, &launch, &bufs)?;
        let bufs = [Buf::Bf16(out.slice(0..n_qk)), p2c_idx, Buf::Bf16(out.slice(n_qk + n_c2p..))];
        run(&dev, &Launch::deberta_p2c_grad(bh, q_rows, len, pos), &bufs)?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), (n_qk + n_c2p + n_p2c).into()))
}
