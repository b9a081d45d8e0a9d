//! Fused CPU kernels with their backward, as candle custom ops: GELU (erf form), softmax over the
//! last dimension, and the normalisation step of layer norm. Each replaces a chain of candle ops
//! (one pass over memory instead of four to eight, rows split over threads) and is checked against
//! the composite it replaces, values and gradients (tests below). Off by default: on the 2-core
//! development VM they measured slower than candle's composite ops (scalar `exp` per element
//! against candle's vectorised maps; docs/perf.md), so they are opt-in (`set_fused(true)`,
//! `DISTILL_FUSED_KERNELS=1`, `distill-bench --fused`) until they are vectorised. When on, f32 on
//! the CPU takes the fused path; other dtypes and devices take the composite.
//!
//! Layer norm with its scale and shift (one kernel forward; the input gradient and both weight
//! gradients one kernel each) and a linear layer's bias add (its gradient one coalesced column
//! sum, where candle reduces over leading dimensions with strided reads) follow the same pattern.
//!
//! Layout: this file holds the switches, the ops and their CPU kernels; `attention.rs` the
//! flash-style attention (scoring; training with its backward); `epilogues.rs` the scoring
//! epilogues (forward only); `kernels.cu` the CUDA kernels;
//! `launch.rs` each launch's grid, block and arguments (pure); `cuda.rs` runs those on candle's
//! storage; `check.rs` the comparison with the composite ops (`distill-bench --check-kernels`);
//! `emulated.rs` (tests) runs the same launches of the same CUDA source on the CPU through
//! `distill-cuda-emu` against the CPU kernels.
//!
//! On CUDA the same ops run as our kernels (`kernels.cu`, compiled to PTX by build.rs), on by
//! default there once proven on a GPU: candle's composites launch four to eight kernels per op,
//! each a pass over memory, and its AdamW is twelve launches per parameter ([`adamw_step`] is
//! one). The kernels not yet run on a GPU ([`Unproven`], by family) are off there until
//! `distill-bench --check-kernels` passes on one. `DISTILL_FUSED_KERNELS=0` (or
//! `set_fused(false)`) returns to the composites everywhere, `=1` turns every kernel on (the CPU
//! kernels too), a list of families turns those on.
//!
//! Scoring (no graph, bf16) has forward-only epilogues: a post-LN block's bias, residual and
//! layer norm in one kernel ([`add_norm_for_scoring`]), the sum and its norm for pre-LN blocks
//! ([`add_norm_sum_for_scoring`]), bias + GELU ([`bias_gelu_for_scoring`]) and GeGLU
//! ([`geglu_for_scoring`]); the attention reads BERT's joined q/k/v product in place
//! ([`flash_attention_for_scoring_packed`]).
//!
//! candle's own fused ops (`softmax_last_dim`, `layer_norm`) have no backward; these do:
//! - GELU: y = x Φ(x), dy/dx = Φ(x) + x φ(x)
//! - softmax: y = exp(x - max) / Σ exp(x - max), dx = y ⊙ (g - Σ g ⊙ y)
//! - normalise: x̂ = (x - μ) / σ with σ = sqrt(var + eps), dx = (g - mean(g) - x̂ mean(g ⊙ x̂)) / σ

use candle_core::cpu::erf::exp_f32;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Defines `$name($args)` that runs `$body` (inline functions only) compiled for the widest
/// vectors this CPU has: AVX-512, else AVX2 with FMA, else the build's baseline (SSE2), chosen at
/// run time.
macro_rules! widest_vectors {
    ($name: ident ($($arg: ident: $t: ty),*) $body: block) => {
        fn $name($($arg: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $t),*) $body
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $t),*) $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just now).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked just now).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}

/// The CPU kernels (off by default) and the CUDA kernels (on by default).
static FUSED_CPU: AtomicBool = AtomicBool::new(false);
static FUSED_CUDA: AtomicBool = AtomicBool::new(true);
/// The CPU kernels measured faster than candle's composites where no gradient is kept (the
/// attention probabilities for scoring: docs/perf.md, "CPU against PyTorch"): on by default, off
/// with the composites everywhere (`set_fused(false)`, `DISTILL_FUSED_KERNELS=0`).
static FASTER_CPU: AtomicBool = AtomicBool::new(true);
/// The CUDA kernels not yet run on a GPU, by family: off there by default until `distill-bench
/// --check-kernels` has passed on one. Their CUDA source runs in the emulated tests and their CPU
/// twins pass the composite checks. Each family can be turned on alone (`set_unproven`,
/// `DISTILL_FUSED_KERNELS=layer_norm,bias_add`, `distill-bench --kernels layer_norm,bias_add`), so
/// that one family failing on a GPU does not keep the others from being timed; `set_fused(true)`
/// and `DISTILL_FUSED_KERNELS=1` turn them all on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unproven {
    /// The embedding gather and its scatter-add gradient.
    Embedding,
    /// Layer norm with its scale and shift, and both weight gradients.
    LayerNorm,
    /// A linear layer's bias add (under autocast its whole epilogue) and the bias gradient.
    BiasAdd,
    /// Rotary embeddings fused with ModernBERT's head split.
    Rotary,
    /// Flash-style attention for scoring (bf16).
    AttentionScoring,
    /// Flash-style attention for training under autocast, with its backward and dropout.
    AttentionTraining,
    /// Scoring in bf16: a post-LN block's bias, residual and layer norm in one kernel; the
    /// feed-forward's bias and GELU in one.
    ScoringEpilogues,
    /// Scoring in bf16 on CUDA: the feed-forward's product, bias and GELU as one cuBLASLt call
    /// (its GELU epilogue).
    MatmulEpilogues,
    /// The optimizer over lists of tensors: the global gradient norm and the AdamW update, one
    /// launch per 64 parameter tensors.
    Optimizer,
}

impl Unproven {
    pub const ALL: [Unproven; 9] = [
        Unproven::Embedding,
        Unproven::LayerNorm,
        Unproven::BiasAdd,
        Unproven::Rotary,
        Unproven::AttentionScoring,
        Unproven::AttentionTraining,
        Unproven::ScoringEpilogues,
        Unproven::MatmulEpilogues,
        Unproven::Optimizer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Unproven::Embedding => "embedding",
            Unproven::LayerNorm => "layer_norm",
            Unproven::BiasAdd => "bias_add",
            Unproven::Rotary => "rotary",
            Unproven::AttentionScoring => "attention_scoring",
            Unproven::AttentionTraining => "attention_training",
            Unproven::ScoringEpilogues => "scoring_epilogues",
            Unproven::MatmulEpilogues => "matmul_epilogues",
            Unproven::Optimizer => "optimizer",
        }
    }

    fn bit(self) -> u32 {
        1 << self as u32
    }

    /// A comma-separated list of family names (`layer_norm,bias_add`; empty: none).
    pub fn parse_list(list: &str) -> std::result::Result<Vec<Unproven>, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                Unproven::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
                    let names: Vec<_> = Unproven::ALL.iter().map(|f| f.name()).collect();
                    format!("unknown kernel family {s:?} (known: {})", names.join(", "))
                })
            })
            .collect()
    }
}

const ALL_UNPROVEN: u32 = (1 << Unproven::ALL.len()) - 1;
static UNPROVEN_CUDA: AtomicU32 = AtomicU32::new(0);
static FROM_ENV: std::sync::Once = std::sync::Once::new();

/// Turns the fused kernels on or off for the whole process, on every device (the composite ops
/// are the reference).
pub fn set_fused(on: bool) {
    FROM_ENV.call_once(|| {});
    FUSED_CPU.store(on, Ordering::Relaxed);
    FASTER_CPU.store(on, Ordering::Relaxed);
    FUSED_CUDA.store(on, Ordering::Relaxed);
    UNPROVEN_CUDA.store(if on { ALL_UNPROVEN } else { 0 }, Ordering::Relaxed);
}

/// Back to the defaults: composite on the CPU, fused on CUDA (the kernels proven on a GPU).
pub fn set_fused_default() {
    set_fused(false);
    FUSED_CUDA.store(true, Ordering::Relaxed);
    FASTER_CPU.store(true, Ordering::Relaxed);
}

/// The defaults, plus these families of the CUDA kernels not yet proven on a GPU.
pub fn set_unproven(families: &[Unproven]) {
    set_fused_default();
    UNPROVEN_CUDA.store(families.iter().fold(0, |bits, f| bits | f.bit()), Ordering::Relaxed);
}

/// `DISTILL_FUSED_KERNELS`: 1 (every kernel, on the CPU too), 0 (candle's composites everywhere)
/// or a list of [`Unproven`] families to turn on with the defaults.
fn from_env() {
    FROM_ENV.call_once(|| match std::env::var("DISTILL_FUSED_KERNELS").as_deref() {
        Ok("1") => {
            FUSED_CPU.store(true, Ordering::Relaxed);
            UNPROVEN_CUDA.store(ALL_UNPROVEN, Ordering::Relaxed);
        }
        Ok("0") => {
            FUSED_CUDA.store(false, Ordering::Relaxed);
            FASTER_CPU.store(false, Ordering::Relaxed);
        }
        Ok(list) => match Unproven::parse_list(list) {
            Ok(families) => UNPROVEN_CUDA.store(families.iter().fold(0, |bits, f| bits | f.bit()), Ordering::Relaxed),
            Err(e) => tracing::warn!("DISTILL_FUSED_KERNELS: {e}; the defaults stay"),
        },
        Err(_) => {}
    });
}

fn fused_for(x: &Tensor) -> bool {
    from_env();
    x.dtype() == DType::F32
        && match x.device() {
            candle_core::Device::Cpu => FUSED_CPU.load(Ordering::Relaxed),
            candle_core::Device::Cuda(_) => cfg!(feature = "cuda") && FUSED_CUDA.load(Ordering::Relaxed),
            _ => false,
        }
}

/// Whether `x` (f32, on the CPU, in a forward pass that keeps no graph) takes a CPU kernel that
/// is faster than the composite there (see [`FASTER_CPU`]), or every fused kernel is on.
fn faster_on_cpu(x: &Tensor) -> bool {
    from_env();
    x.dtype() == DType::F32
        && x.device().is_cpu()
        && (FUSED_CPU.load(Ordering::Relaxed) || (FASTER_CPU.load(Ordering::Relaxed) && !crate::layers::grad_enabled()))
}

/// Whether a family of the kernels not yet proven on a GPU runs on `x`'s device: on the CPU with
/// the fused kernels, on CUDA with them and the family turned on.
fn unproven_on(x: &Tensor, family: Unproven) -> bool {
    from_env();
    match x.device() {
        candle_core::Device::Cpu => FUSED_CPU.load(Ordering::Relaxed),
        candle_core::Device::Cuda(_) => {
            cfg!(feature = "cuda")
                && FUSED_CUDA.load(Ordering::Relaxed)
                && UNPROVEN_CUDA.load(Ordering::Relaxed) & family.bit() != 0
        }
        _ => false,
    }
}

/// As [`fused_for`] (f32), for a family of the kernels not yet proven on a GPU.
fn fused_unproven_for(x: &Tensor, family: Unproven) -> bool {
    x.dtype() == DType::F32 && unproven_on(x, family)
}

/// Rows handed to one thread at a time: big enough that scheduling is noise.
const MIN_CHUNK: usize = 16 * 1024;

fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: the input is not contiguous"),
    }
}

/// A tensor's elements as f32 (bf16 widened), contiguous.
fn widened<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<std::borrow::Cow<'a, [f32]>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: not contiguous")))?;
    Ok(match s {
        CpuStorage::F32(v) => std::borrow::Cow::Borrowed(&v[a..b]),
        CpuStorage::BF16(v) => std::borrow::Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect()),
        _ => candle_core::bail!("{op}: f32 or bf16 only"),
    })
}

/// f32 values stored in `like`'s dtype (bf16 rounded to nearest even).
fn narrowed(v: Vec<f32>, like: &CpuStorage) -> CpuStorage {
    match like {
        CpuStorage::BF16(_) => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

/// A tensor the CPU twin reads besides its operands (not counted by `op_stats`: the CUDA kernel
/// reads it in place).
fn f32_data(t: &Tensor) -> Result<Vec<f32>> {
    candle_core::op_stats::uncounted(|| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1())
}

fn same_len(a: &[f32], b: &[f32], op: &str) -> Result<()> {
    if a.len() != b.len() {
        candle_core::bail!("{op}: {} and {} elements", a.len(), b.len());
    }
    Ok(())
}

/// Rows of `dim` elements per parallel task, about MIN_CHUNK elements each.
fn rows_per_task(dim: usize) -> usize {
    (MIN_CHUNK / dim.max(1)).max(1) * dim.max(1)
}

/// `f(out_row, x_row)` over rows of `dim` elements, rows split over threads.
fn map_rows(x: &[f32], dim: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let chunk = rows_per_task(dim);
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(out, x)| {
        // Rows divide the length except in elementwise use (`dim` = a chunk), where the last is short.
        for (out, x) in out.chunks_mut(dim).zip(x.chunks(dim)) {
            f(out, x)
        }
    });
    out
}

/// `f(out_row, a_row, b_row)` over rows of `dim` elements of two inputs of one shape.
fn map_rows2(a: &[f32], b: &[f32], dim: usize, f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    let chunk = rows_per_task(dim);
    out.par_chunks_mut(chunk).zip(a.par_chunks(chunk).zip(b.par_chunks(chunk))).for_each(|(out, (a, b))| {
        for ((out, a), b) in out.chunks_mut(dim).zip(a.chunks(dim)).zip(b.chunks(dim)) {
            f(out, a, b)
        }
    });
    out
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

// ---------------------------------------------------------------------------------------------
// GELU

/// erf(x) from erfc's Chebyshev fit in Numerical Recipes (fractional error < 1.2e-7), in f32.
#[inline]
fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2π)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// The derivative of GELU (erf form) at x: Φ(x) + x φ(x).
fn gelu_erf_slope(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp()
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "distill-gelu-erf"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::elementwise("distill_gelu_erf_f32", &[(s, l)], self.name())
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let y = map_rows(x, x.len().clamp(1, MIN_CHUNK), |y, x| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfGrad)?))
    }
}

/// (x, g) -> g (Φ(x) + x φ(x))
struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "distill-gelu-erf-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::elementwise("distill_gelu_erf_grad_f32", &[(s1, l1), (s2, l2)], self.name())
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        same_len(x, g, self.name())?;
        let dx = map_rows2(x, g, x.len().clamp(1, MIN_CHUNK), |dx, x, g| {
            for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                *dx = g * gelu_erf_slope(x);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// GELU, erf form (BERT's `gelu`), with its backward.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fused_for(x) {
        return x.contiguous()?.apply_op1(GeluErf);
    }
    if faster_on_cpu(x) {
        return x.contiguous()?.apply_op1_no_bwd(&GeluErfScoring);
    }
    x.gelu_erf()
}

/// GELU (erf) for scoring on the CPU: candle's formula and erf, compiled for the widest vectors
/// the CPU has (candle's map runs at the build's baseline, SSE2). No backward.
struct GeluErfScoring;

widest_vectors!(gelu_erf_widest(y: &mut [f32], x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = (candle_core::cpu::erf::erf_f32(x * FRAC_1_SQRT_2) + 1.0) * 0.5 * x;
    }
});

impl CustomOp1 for GeluErfScoring {
    fn name(&self) -> &'static str {
        "distill-gelu-erf-scoring"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let y = map_rows(x, x.len().clamp(1, MIN_CHUNK), gelu_erf_widest);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "distill-softmax-last-dim"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rows("distill_softmax_f32", &[(s, l)], None, self.name())
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let y = map_rows(x, last_dim(l), |y, x| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp();
                sum += *y;
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|y| *y *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad { scale: 1.0 })?))
    }
}

/// (y, g) -> scale · y ⊙ (g - Σ g ⊙ y) per row (the scale of a [`masked_softmax`]'s input)
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "distill-softmax-last-dim-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rows("distill_softmax_grad_f32", &[(s1, l1), (s2, l2)], Some(self.scale), self.name())
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        same_len(y, g, self.name())?;
        let dx = map_rows2(y, g, last_dim(l1), |dx, y, g| {
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *dx = self.scale * y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over the last dimension with its backward; computed in f32 whatever the input's dtype.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    if !fused_for(&x) {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        return e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dtype);
    }
    x.contiguous()?.apply_op1(Softmax)?.to_dtype(dtype)
}

// ---------------------------------------------------------------------------------------------
// Attention probabilities: softmax(scores · scale + mask bias)

/// `bias` [B, 1, Q or 1, K] as the kernels read it: (rows per batch, batch stride, row stride).
fn bias_strides(scores: &Layout, bias: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (s, b) = (scores.dims(), bias.dims());
    if s.len() != 4 || b.len() != 4 || b[0] != s[0] || b[1] != 1 || !(b[2] == 1 || b[2] == s[2]) || b[3] != s[3] {
        candle_core::bail!("masked softmax: scores {s:?} and mask bias {b:?} (expected [B, 1, Q or 1, K])");
    }
    Ok((s[1] * s[2], b[2] * b[3], if b[2] == 1 { 0 } else { b[3] }, s[2]))
}

struct MaskedSoftmax {
    scale: f32,
}

/// One row of [`MaskedSoftmax`]: `y = softmax(x · scale + b)`, in loops without calls or a serial
/// sum, so that each vectorises.
#[inline(always)]
fn masked_softmax_row(y: &mut [f32], x: &[f32], b: &[f32], scale: f32) {
    for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
        *y = x * scale + b;
    }
    let max = y.iter().fold(f32::NEG_INFINITY, |m, &y| m.max(y));
    let max = if max == f32::NEG_INFINITY { 0.0 } else { max };
    y.iter_mut().for_each(|y| *y = exp_f32(*y - max));
    let inv = 1.0 / lanes_sum(y);
    y.iter_mut().for_each(|y| *y *= inv);
}

widest_vectors!(masked_softmax_row_widest(y: &mut [f32], x: &[f32], b: &[f32], scale: f32) {
    masked_softmax_row(y, x, b, scale)
});

/// The sum of `x` in eight interleaved partial sums (a serial f32 sum does not vectorise).
fn lanes_sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "distill-masked-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, bias) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let (per_batch, batch_stride, row_stride, q_len) = bias_strides(l1, l2)?;
        let cols = last_dim(l1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(cols).zip(x.par_chunks(cols)).enumerate().for_each(|(row, (y, x))| {
            let start = (row / per_batch) * batch_stride + (row % q_len) * row_stride;
            let b = &bias[start..start + cols];
            masked_softmax_row_widest(y, x, b, self.scale);
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let strides = bias_strides(l1, l2)?;
        cuda::masked_softmax(s1, l1, s2, l2, strides, self.scale)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad { scale: self.scale })?;
        Ok((Some(dx), None))
    }
}

/// Attention probabilities `softmax(scores · scale + bias)` over the last dimension, computed in
/// f32 and returned in the scores' dtype (f32 under autocast, whose matmuls return f32; bf16 in
/// bf16 scoring), with the backward to the scores (the mask bias is a constant).
/// `scores` [B, H, Q, K], `bias` [B, 1, Q or 1, K] (0 for keys to attend, very negative for
/// masked ones). Fused: one pass instead of scale, broadcast add and softmax's four.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = scores.dtype();
    let scores = scores.to_dtype(DType::F32)?;
    let bias = bias.to_dtype(DType::F32)?.detach();
    let probs = if !(fused_for(&scores) || faster_on_cpu(&scores)) {
        softmax_last_dim(&scores.affine(scale, 0.0)?.broadcast_add(&bias)?)?
    } else {
        scores.contiguous()?.apply_op2(&bias.contiguous()?, MaskedSoftmax { scale: scale as f32 })?
    };
    probs.to_dtype(dtype)
}

// ---------------------------------------------------------------------------------------------
// Dropout

/// splitmix64 of (seed, i) as a uniform in [0, 1) with 24 bits (the CUDA kernel's formula).
/// Dropout's keep-scale of element `i` (the mask of [`dropout`] with `seed`): 1 without dropout.
pub(super) fn kept(seed: u64, p: f32, i: usize) -> f32 {
    if p <= 0.0 {
        1.0
    } else if uniform(seed, i as u64) >= p {
        1.0 / (1.0 - p)
    } else {
        0.0
    }
}

fn uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Inverted dropout whose mask is a function of (seed, element index): its backward is the same
/// op on the gradient, so no mask is stored.
struct Dropout {
    seed: u64,
    p: f32,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "distill-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let scale = 1.0 / (1.0 - self.p);
        let y =
            x.iter().enumerate().map(|(i, &x)| if uniform(self.seed, i as u64) >= self.p { x * scale } else { 0.0 });
        Ok((CpuStorage::F32(y.collect()), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::dropout(s, l, self.seed, self.p)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Dropout { seed: self.seed, p: self.p })?))
    }
}

/// Whether [`dropout`] applies to `x` (f32 on a device whose fused kernels are on).
pub fn fused_dropout_for(x: &Tensor) -> bool {
    fused_for(x)
}

/// Inverted dropout (kept values scaled by 1 / (1 - p)) with the mask drawn from `seed`: one
/// pass, and its backward regenerates the mask. A caller seeds it from its own generator, so
/// seeded training draws the same masks on a resume.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout { seed, p: p as f32 })
}

// ---------------------------------------------------------------------------------------------
// Embedding lookup

fn ids_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [u32]> {
    let data = s.as_slice::<u32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: the ids are not contiguous"),
    }
}

fn table_dims(l: &Layout, op: &str) -> Result<(usize, usize)> {
    match l.dims() {
        [vocab, dim] => Ok((*vocab, *dim)),
        d => candle_core::bail!("{op}: the table is {d:?}, expected [vocabulary, dimension]"),
    }
}

/// (table [V, D], ids u32) -> rows [ids..., D]; the backward scatters into the table's gradient.
struct Gather;

impl CustomOp2 for Gather {
    fn name(&self) -> &'static str {
        "distill-gather-rows"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (table, ids) = (slice(s1, l1, self.name())?, ids_slice(s2, l2, self.name())?);
        let (vocab, dim) = table_dims(l1, self.name())?;
        let mut out = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                candle_core::bail!("{}: id {id} is outside the vocabulary of {vocab}", self.name());
            }
            out.extend_from_slice(&table[id * dim..(id + 1) * dim]);
        }
        let mut shape = l2.dims().to_vec();
        shape.push(dim);
        Ok((CpuStorage::F32(out), shape.into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (vocab, dim) = table_dims(l1, self.name())?;
        let n = l2.shape().elem_count();
        let out = cuda::rows_by_id("distill_gather_rows_f32", s1, l1, s2, l2, n * dim, false, n, dim, vocab)?;
        let mut shape = l2.dims().to_vec();
        shape.push(dim);
        Ok((out, shape.into()))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (vocab, dim) = table.dims2()?;
        let g = grad.reshape((ids.elem_count(), dim))?.contiguous()?;
        Ok((Some(g.apply_op2_no_bwd(&ids.flatten_all()?.contiguous()?, &ScatterRows { vocab })?), None))
    }
}

/// (g [N, D], ids [N]) -> [vocab, D] with row ids[t] += g[t].
struct ScatterRows {
    vocab: usize,
}

impl CustomOp2 for ScatterRows {
    fn name(&self) -> &'static str {
        "distill-scatter-add-rows"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, ids) = (slice(s1, l1, self.name())?, ids_slice(s2, l2, self.name())?);
        let dim = last_dim(l1);
        let mut out = vec![0f32; self.vocab * dim];
        for (row, &id) in g.chunks(dim).zip(ids) {
            let id = id as usize;
            if id < self.vocab {
                out[id * dim..(id + 1) * dim].iter_mut().zip(row).for_each(|(o, g)| *o += g);
            }
        }
        Ok((CpuStorage::F32(out), (self.vocab, dim).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dim = last_dim(l1);
        let n = l2.shape().elem_count();
        let out = cuda::rows_by_id(
            "distill_scatter_add_rows_f32",
            s1,
            l1,
            s2,
            l2,
            self.vocab * dim,
            true,
            n,
            dim,
            self.vocab,
        )?;
        Ok((out, (self.vocab, dim).into()))
    }
}

/// `table[ids]`: rows of an f32 table [V, D] for u32 ids of any shape, [ids..., D], with a
/// backward that scatters the rows' gradients into one table-sized gradient (candle's
/// index_select backward is an index_add that measured 2.3 ms per table on the H100).
/// Falls back to `index_select` where the fused kernels are off or the table is not f32.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if !fused_unproven_for(table, Unproven::Embedding) || ids.dtype() != DType::U32 {
        let mut shape = ids.dims().to_vec();
        shape.push(table.dim(1)?);
        return table.index_select(&ids.flatten_all()?, 0)?.reshape(shape);
    }
    table.contiguous()?.apply_op2(&ids.contiguous()?, Gather)
}

// ---------------------------------------------------------------------------------------------
// Layer-norm normalisation

/// Mean and 1/σ of a row (two passes, as the composite computes them).
#[inline]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct Normalize {
    eps: f32,
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "distill-normalize-last-dim"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rows("distill_normalize_f32", &[(s, l)], Some(self.eps), self.name())
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let y = map_rows(x, last_dim(l), |y, x| {
            let (mean, rstd) = moments(x, self.eps);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - mean) * rstd;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &NormalizeGrad { eps: self.eps })?))
    }
}

/// (x, g) -> (g - mean(g) - x̂ mean(g ⊙ x̂)) / σ per row
struct NormalizeGrad {
    eps: f32,
}

impl CustomOp2 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "distill-normalize-last-dim-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rows("distill_normalize_grad_f32", &[(s1, l1), (s2, l2)], Some(self.eps), self.name())
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        same_len(x, g, self.name())?;
        let dx = map_rows2(x, g, last_dim(l1), |dx, x, g| {
            let (mean, rstd) = moments(x, self.eps);
            let n = x.len() as f32;
            let g_mean = g.iter().sum::<f32>() / n;
            let gx_mean = x.iter().zip(g).map(|(x, g)| (x - mean) * rstd * g).sum::<f32>() / n;
            for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                *dx = (g - g_mean - (x - mean) * rstd * gx_mean) * rstd;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension (f32), with its backward.
pub fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused_for(x) {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        return centered.broadcast_div(&(var + eps)?.sqrt()?);
    }
    x.contiguous()?.apply_op1(Normalize { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// Layer norm with its scale and shift; the bias of a linear layer

/// The widest row the fused layer norm takes: its weight gradient sums a block's rows in shared
/// memory (`DISTILL_MAX_COLS` in kernels.cu).
const MAX_NORM_COLS: usize = 2048;

/// A vector of `cols` elements (a norm's weight, a bias).
fn vector<'a>(s: &'a CpuStorage, l: &Layout, cols: usize, op: &str) -> Result<&'a [f32]> {
    let v = slice(s, l, op)?;
    if v.len() != cols {
        candle_core::bail!("{op}: a vector of {} for rows of {cols}", v.len());
    }
    Ok(v)
}

/// (x, w, b) -> x̂ w + b per row (+ b only when `has_bias`).
struct LayerNormOp {
    eps: f32,
    has_bias: bool,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "distill-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(l1);
        let x = slice(s1, l1, self.name())?;
        let (w, b) = (vector(s2, l2, cols, self.name())?, vector(s3, l3, cols, self.name())?);
        let y = map_rows(x, cols, |y, x| {
            let (mean, rstd) = moments(x, self.eps);
            for (i, (y, &x)) in y.iter_mut().zip(x).enumerate() {
                *y = (x - mean) * rstd * w[i] + if self.has_bias { b[i] } else { 0.0 };
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if l2.shape().elem_count() != last_dim(l1) || l3.shape().elem_count() != last_dim(l1) {
            candle_core::bail!("{}: weights of {:?} for {:?}", self.name(), l2.dims(), l1.dims());
        }
        cuda::layer_norm((s1, l1), (s2, l2), (s3, l3), self.eps, self.has_bias)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &LayerNormGrad { eps: self.eps })?;
        let wb = x.apply_op2_no_bwd(&g, &LayerNormWGrad { eps: self.eps })?;
        let db = if self.has_bias { Some(wb.get(1)?) } else { None };
        Ok((Some(dx), Some(wb.get(0)?), db))
    }
}

/// (x, w, g) -> dx: the normalisation's gradient of g ⊙ w.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "distill-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(l1);
        let (x, w, g) = (slice(s1, l1, self.name())?, vector(s2, l2, cols, self.name())?, slice(s3, l3, self.name())?);
        same_len(x, g, self.name())?;
        let dx = map_rows2(x, g, cols, |dx, x, g| {
            let (mean, rstd) = moments(x, self.eps);
            let n = x.len() as f32;
            let g_mean = g.iter().zip(w).map(|(g, w)| g * w).sum::<f32>() / n;
            let gx_mean = x.iter().zip(g).zip(w).map(|((x, g), w)| (x - mean) * rstd * g * w).sum::<f32>() / n;
            for (i, ((dx, &x), &g)) in dx.iter_mut().zip(x).zip(g).enumerate() {
                *dx = (g * w[i] - g_mean - (x - mean) * rstd * gx_mean) * rstd;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if l1.shape() != l3.shape() || l2.shape().elem_count() != last_dim(l1) {
            candle_core::bail!("{}: {:?}, {:?}, {:?}", self.name(), l1.dims(), l2.dims(), l3.dims());
        }
        cuda::layer_norm_grad((s1, l1), (s2, l2), (s3, l3), self.eps)
    }
}

/// (x, g) -> [Σ_rows g ⊙ x̂ ; Σ_rows g]: the weight and bias gradients of layer norm, [2, cols].
struct LayerNormWGrad {
    eps: f32,
}

impl CustomOp2 for LayerNormWGrad {
    fn name(&self) -> &'static str {
        "distill-layer-norm-weight-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        same_len(x, g, self.name())?;
        let cols = last_dim(l1);
        let mut out = vec![0f32; 2 * cols];
        let (dw, db) = out.split_at_mut(cols);
        for (x, g) in x.chunks(cols).zip(g.chunks(cols)) {
            let (mean, rstd) = moments(x, self.eps);
            for i in 0..cols {
                dw[i] += g[i] * (x[i] - mean) * rstd;
                db[i] += g[i];
            }
        }
        Ok((CpuStorage::F32(out), (2, cols).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: {:?} and {:?}", self.name(), l1.dims(), l2.dims());
        }
        cuda::layer_norm_wgrad(s1, l1, s2, l2, self.eps)
    }
}

/// Layer norm over the last dimension with scale `w` and optional shift `b`: one kernel
/// forward; backward one kernel for the input's gradient and one for both weight gradients
/// (column sums in one pass, where candle sums over the leading dimensions with strided reads).
/// Falls back to the composite ([`normalize_last_dim`], scale, shift) where the kernels are off,
/// a dtype is not f32 or rows are wider than 2,048.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let cols = x.dim(D::Minus1)?;
    let f32s = w.dtype() == DType::F32 && b.is_none_or(|b| b.dtype() == DType::F32);
    if !fused_unproven_for(x, Unproven::LayerNorm) || !f32s || cols > MAX_NORM_COLS || w.elem_count() != cols {
        let y = normalize_last_dim(x, eps)?.broadcast_mul(w)?;
        return match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let op = LayerNormOp { eps: eps as f32, has_bias: b.is_some() };
    let b = match b {
        Some(b) => b.contiguous()?,
        // Never read (has_bias is false); its gradient is None.
        None => w.detach(),
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &b, op)
}

/// (x, b) -> x + b over the last dimension, in f32; x f32, or bf16 (an autocast matmul's output:
/// the cast back to f32 and the bias in one pass). The bias's gradient is a column sum; x's is
/// the upstream gradient (cast to bf16 for a bf16 x, as the cast's backward would).
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "distill-bias-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(l1);
        let b = vector(s2, l2, cols, self.name())?;
        let add = |y: &mut [f32], x: &[f32]| {
            for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                *y = x + b;
            }
        };
        let y = match s1 {
            CpuStorage::BF16(data) => {
                let Some((start, end)) = l1.contiguous_offsets() else {
                    candle_core::bail!("{}: the input is not contiguous", self.name());
                };
                let x: Vec<f32> = data[start..end].iter().map(|v| v.to_f32()).collect();
                map_rows(&x, cols, add)
            }
            _ => map_rows(slice(s1, l1, self.name())?, cols, add),
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if l2.shape().elem_count() != last_dim(l1) {
            candle_core::bail!("{}: a bias of {:?} for {:?}", self.name(), l2.dims(), l1.dims());
        }
        cuda::bias_add(s1, l1, s2, l2)
    }

    fn bwd(&self, x: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad.contiguous()?.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(grad.to_dtype(x.dtype())?), Some(db)))
    }
}

/// g [.., cols] (f32 or bf16) -> [cols] f32, the sum over every other dimension.
pub(super) struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "distill-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = widened(s, l, self.name())?;
        let cols = last_dim(l);
        let mut out = vec![0f32; cols];
        for row in g.chunks(cols) {
            out.iter_mut().zip(row).for_each(|(o, g)| *o += g);
        }
        Ok((CpuStorage::F32(out), cols.into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::column_sum(s, l)
    }
}

/// `x + b` with `b` [cols] broadcast over the leading dimensions of `x` [.., cols], in `b`'s
/// dtype: `x.to_dtype(b.dtype()) + b`. Fused (x f32 or bf16, b f32): one kernel, the cast of a
/// bf16 matmul output included (a linear layer's epilogue under autocast), and the bias's
/// gradient one coalesced column sum. Otherwise the composite cast and `broadcast_add`.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let cols = x.dim(D::Minus1)?;
    let fits = matches!(x.dtype(), DType::F32 | DType::BF16) && b.rank() == 1 && b.elem_count() == cols;
    if !fused_unproven_for(b, Unproven::BiasAdd) || !fits {
        return x.to_dtype(b.dtype())?.broadcast_add(b);
    }
    x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
}

// ---------------------------------------------------------------------------------------------
// Rotary embeddings with the head split

/// [b, l, h, d] of a packed projection [B, L, 3, H, D] (split) or of its gradient [3, B, H, L, D]
/// (merge).
fn rotary_dims(l: &Layout, merge: bool, op: &str) -> Result<[usize; 4]> {
    match (merge, l.dims()) {
        (false, &[b, len, 3, h, d]) | (true, &[3, b, h, len, d]) if d % 2 == 0 => Ok([b, len, h, d]),
        (_, dims) => candle_core::bail!("{op}: {dims:?} is not a packed q, k, v projection with an even head size"),
    }
}

/// Split: (qkv [B, L, 3, H, D], cos [L, D], sin [L, D]) -> [3, B, H, L, D] with q and k rotated,
/// `x cos + rotate_half(x) sin`. Merge (the split's backward): (g [3, B, H, L, D], cos, sin) ->
/// [B, L, 3, H, D] rotated by -sin.
struct Rotary {
    merge: bool,
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        if self.merge {
            "distill-rotary-merge"
        } else {
            "distill-rotary-split"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [b, l, h, d] = rotary_dims(l1, self.merge, self.name())?;
        let (x, cos, sin) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        if cos.len() != l * d || sin.len() != l * d {
            candle_core::bail!("{}: cos and sin of {} and {} values for {l} x {d}", self.name(), cos.len(), sin.len());
        }
        let (half, sign) = (d / 2, if self.merge { -1.0 } else { 1.0 });
        let mut out = vec![0f32; x.len()];
        // One output row of d values at a time; its source row in the other layout.
        out.par_chunks_mut(d).enumerate().for_each(|(r, out)| {
            let (part, batch, head, pos) = if self.merge {
                (r / h % 3, r / (3 * h * l), r % h, r / (3 * h) % l)
            } else {
                (r / (b * h * l), r / (h * l) % b, r / l % h, r % l)
            };
            let src = if self.merge {
                (((part * b + batch) * h + head) * l + pos) * d
            } else {
                (((batch * l + pos) * 3 + part) * h + head) * d
            };
            let x = &x[src..src + d];
            let (c, s) = (&cos[pos * d..(pos + 1) * d], &sin[pos * d..(pos + 1) * d]);
            for i in 0..d {
                out[i] = if part == 2 {
                    x[i]
                } else {
                    let other = if i < half { -x[i + half] } else { x[i - half] };
                    x[i] * c[i] + other * s[i] * sign
                };
            }
        });
        let shape: Shape = if self.merge { (b, l, 3, h, d).into() } else { (3, b, h, l, d).into() };
        Ok((CpuStorage::F32(out), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let [b, l, h, d] = rotary_dims(l1, self.merge, self.name())?;
        if l2.shape().elem_count() != l * d || l3.shape().elem_count() != l * d {
            candle_core::bail!("{}: cos {:?} and sin {:?} for {l} x {d}", self.name(), l2.dims(), l3.dims());
        }
        let (kernel, shape): (&'static str, Shape) = if self.merge {
            ("distill_rotary_merge_f32", (b, l, 3, h, d).into())
        } else {
            ("distill_rotary_split_f32", (3, b, h, l, d).into())
        };
        cuda::rotary(kernel, (s1, l1), (s2, l2), (s3, l3), [b, l, h, d], shape)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.merge {
            candle_core::bail!("{}: no backward (it is the split's backward)", self.name());
        }
        Ok((Some(grad.contiguous()?.apply_op3_no_bwd(cos, sin, &Rotary { merge: true })?), None, None))
    }
}

/// `x cos + rotate_half(x) sin` with `rotate_half(x) = [-x2, x1]` over the last dimension, in f32
/// (the composite).
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let half = x.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)?;
    (x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?.to_dtype(dtype)
}

/// q, k and v [B, H, L, D] (contiguous) from a packed projection `qkv` [B, L, 3, H, D], with
/// rotary embeddings (`cos`, `sin` [L, D], f32) applied to q and k. Fused: one kernel each way
/// (the head split's copies and the rotation's six ops in one pass). The composite (narrow,
/// transpose, copy, rotate) where the kernels are off or qkv is not f32.
pub fn rotary_qkv(qkv: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let packed = matches!(qkv.dims(), &[_, _, 3, _, d] if d % 2 == 0);
    if packed && fused_unproven_for(qkv, Unproven::Rotary) && cos.dtype() == DType::F32 && sin.dtype() == DType::F32 {
        let out = qkv.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rotary { merge: false })?;
        return Ok((out.get(0)?, out.get(1)?, out.get(2)?));
    }
    let part = |i: usize| -> Result<Tensor> { qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous() };
    Ok((apply_rotary(&part(0)?, cos, sin)?, apply_rotary(&part(1)?, cos, sin)?, part(2)?))
}

// ---------------------------------------------------------------------------------------------
// AdamW

/// One AdamW update of `param` (a variable) with its moments `m`, `v` and gradient `g` times
/// `scale` (one f32 on the device: a clipping coefficient), all f32, contiguous and on one CUDA
/// device, in place, as one kernel: `θ ← θ·decay`, the moments, then
/// `θ ← θ - step · m / (sqrt(v / bc2) + eps)`. Returns false (nothing done) where the fused
/// kernel does not apply (CPU, another dtype, kernels off), and the caller takes the composite
/// path. `m` and `v` must own their storage (no tensor shares it).
// Allowed: AdamW's state and hyperparameters, as the fused kernel takes them; unused without CUDA.
#[allow(clippy::too_many_arguments, unused_variables)]
pub fn adamw_step(
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    scale: &Tensor,
    decay: f64,
    beta1: f64,
    beta2: f64,
    bc2: f64,
    step: f64,
    eps: f64,
) -> Result<bool> {
    if !param.device().is_cuda() || !fused_for(param) || [m, v, g, scale].iter().any(|t| t.dtype() != DType::F32) {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    {
        cuda::adamw(param, m, v, g, scale, [decay, beta1, beta2, bc2, step, eps].map(|x| x as f32))?;
        Ok(true)
    }
    #[cfg(not(feature = "cuda"))]
    Ok(false)
}

/// [`adamw_step`] for a list of parameters at once: one launch per 64 tensors on CUDA (their
/// pointers passed in the launch's parameters, as PyTorch's fused AdamW), where the per-tensor
/// kernel takes one launch each. `items` = (parameter, m, v, gradient, weight decay factor), all
/// f32, contiguous, on one CUDA device. Returns false (nothing done) where it does not apply
/// (CPU, another dtype, the `optimizer` family off): the caller updates them one at a time.
#[allow(unused_variables)]
pub fn adamw_list(
    items: &[(&Tensor, &Tensor, &Tensor, &Tensor, f64)],
    scale: &Tensor,
    [beta1, beta2, bc2, step, eps]: [f64; 5],
) -> Result<bool> {
    let Some(first) = items.first() else { return Ok(true) };
    if !first.0.device().is_cuda()
        || !fused_unproven_for(first.0, Unproven::Optimizer)
        || scale.dtype() != DType::F32
        || items
            .iter()
            .any(|(p, m, v, g, _)| [p, m, v, g].iter().any(|t| t.dtype() != DType::F32 || !t.is_contiguous()))
    {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    {
        let items: Vec<_> = items.iter().map(|&(p, m, v, g, d)| (p, m, v, g, d as f32)).collect();
        cuda::adamw_list(&items, scale, [beta1, beta2, bc2, step, eps].map(|x| x as f32))?;
        Ok(true)
    }
    #[cfg(not(feature = "cuda"))]
    Ok(false)
}

/// `acc` (one f32 on the device, zeroed by the caller) += Σ g² over all of `grads`, in place: the
/// global gradient norm in one launch per 64 gradients on CUDA (the composite takes a square, a
/// sum and a copy per gradient and their stack). Returns false (nothing done) where it does not
/// apply (CPU, another dtype, the `optimizer` family off): the caller takes the composite. `acc`
/// must own its storage.
#[allow(unused_variables)]
pub fn sum_squares_list_into(acc: &Tensor, grads: &[&Tensor]) -> Result<bool> {
    let Some(first) = grads.first() else { return Ok(true) };
    if !first.device().is_cuda()
        || !fused_unproven_for(first, Unproven::Optimizer)
        || acc.dtype() != DType::F32
        || grads.iter().any(|g| g.dtype() != DType::F32 || !g.is_contiguous())
    {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    {
        cuda::sum_squares_list(acc, grads)?;
        Ok(true)
    }
    #[cfg(not(feature = "cuda"))]
    Ok(false)
}

mod attention;
mod check;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(test)]
mod emulated;
mod epilogues;
mod launch;
pub use attention::{
    deberta_probs_fit, deberta_probs_for_scoring, deberta_probs_for_training, deberta_probs_for_training_on,
    deberta_probs_on, flash_attention_for_scoring, flash_attention_for_scoring_packed, flash_attention_for_training,
    flash_attention_for_training_packed, flash_scoring_packed_on, flash_training_packed_on,
};
#[cfg(test)]
use attention::{
    DebertaProbs, DebertaProbsTrain, DebertaProbsTrainGrad, FlashAttention, FlashAttentionPacked, FlashTrain,
    FlashTrainGrad, FlashTrainPacked, FlashTrainPackedGrad,
};
pub use check::{check_against_composite, Checks, CHECK_GROUPS};
pub use epilogues::{
    add_norm_for_scoring, add_norm_for_training, add_norm_for_training_on, add_norm_sum_for_scoring,
    bias_gelu_for_scoring, bias_gelu_for_training, bias_gelu_for_training_on, embed_norm_applies,
    embed_norm_for_scoring, geglu_for_scoring, geglu_for_training, geglu_for_training_on, matmul_bias_gelu_for_scoring,
    scoring_epilogues_on,
};
#[cfg(test)]
use epilogues::{
    AddNorm, AddNormTrain, AddNormTrainGrad, BiasGelu, BiasGeluGrad, DropoutTo, EmbedNorm, Geglu, GegluGrad,
};
use launch as launch_shape;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    // set_fused is process-wide: the comparisons run in one test so that they never interleave.
    #[test]
    fn fused_kernels_match_the_composite_ops_in_values_and_gradients() {
        let checks = check_against_composite(&Device::Cpu, &[]).unwrap();
        assert!(checks.bad.is_empty(), "{:?}", checks.bad);
        assert_eq!(checks.lines.len(), 74, "{:?}", checks.lines);
        // One group alone runs only its checks; an unknown group is an error naming the known.
        let rotary = check_against_composite(&Device::Cpu, &["rotary"]).unwrap();
        assert_eq!(rotary.lines.len(), 2, "{:?}", rotary.lines);
        assert!(rotary.lines.iter().all(|l| l.starts_with("rotary")), "{:?}", rotary.lines);
        let err = check_against_composite(&Device::Cpu, &["flash"]).unwrap_err().to_string();
        assert!(err.contains("\"flash\"") && err.contains("attention_training"), "{err}");
    }

    #[test]
    fn kernel_families_parse_from_a_list_and_name_the_known_ones_on_a_typo() {
        assert_eq!(
            Unproven::parse_list("layer_norm, attention_scoring,").unwrap(),
            [Unproven::LayerNorm, Unproven::AttentionScoring]
        );
        assert!(Unproven::parse_list("").unwrap().is_empty());
        let err = Unproven::parse_list("layer_norm,rotery").unwrap_err();
        assert!(err.contains("\"rotery\"") && err.contains("rotary"), "{err}");
        for f in Unproven::ALL {
            assert_eq!(Unproven::parse_list(f.name()).unwrap(), [f]);
        }
    }

    #[test]
    fn erf_is_within_its_error_bound() {
        // Reference values of erf (Abramowitz & Stegun table 7.1).
        for (x, e) in [
            (0.0f32, 0.0f32),
            (0.1, 0.112_462_916),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
            (3.5, 0.999_999_3),
        ] {
            assert!((erf(x) - e).abs() < 3e-7, "erf({x}) = {} vs {e}", erf(x));
            assert!((erf(-x) + e).abs() < 3e-7);
        }
    }
}
