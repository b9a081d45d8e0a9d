//! Fused CPU kernels with their backward, as candle custom ops: GELU (erf form), softmax over the
//! last dimension, and the normalisation step of layer norm. Each replaces a chain of candle ops
//! (one pass over memory instead of four to eight, rows split over threads) and is checked against
//! the composite it replaces, values and gradients (tests below). Off by default: on the 2-core
//! development VM they measured slower than candle's composite ops (scalar `exp` per element
//! against candle's vectorised maps; docs/perf.md), so they are opt-in (`set_fused(true)`,
//! `DISTILL_FUSED_KERNELS=1`, `distill-bench --fused`) until they are vectorised. When on, f32 on
//! the CPU takes the fused path; other dtypes and devices take the composite.
//!
//! candle's own fused ops (`softmax_last_dim`, `layer_norm`) have no backward; these do:
//! - GELU: y = x Φ(x), dy/dx = Φ(x) + x φ(x)
//! - softmax: y = exp(x - max) / Σ exp(x - max), dx = y ⊙ (g - Σ g ⊙ y)
//! - normalise: x̂ = (x - μ) / σ with σ = sqrt(var + eps), dx = (g - mean(g) - x̂ mean(g ⊙ x̂)) / σ

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

static FUSED: AtomicBool = AtomicBool::new(false);
static FROM_ENV: std::sync::Once = std::sync::Once::new();

/// Turns the fused kernels on or off for the whole process (the composite ops are the reference).
pub fn set_fused(on: bool) {
    FROM_ENV.call_once(|| {});
    FUSED.store(on, Ordering::Relaxed);
}

fn fused_for(x: &Tensor) -> bool {
    FROM_ENV
        .call_once(|| FUSED.store(std::env::var("DISTILL_FUSED_KERNELS").is_ok_and(|v| v == "1"), Ordering::Relaxed));
    FUSED.load(Ordering::Relaxed) && x.device().is_cpu() && x.dtype() == DType::F32
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
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2π)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_28;

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "distill-gelu-erf"
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

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        same_len(x, g, self.name())?;
        let dx = map_rows2(x, g, x.len().clamp(1, MIN_CHUNK), |dx, x, g| {
            for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
                let pdf = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
                *dx = g * (cdf + x * pdf);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// GELU, erf form (BERT's `gelu`), with its backward.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fused_for(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(GeluErf)
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "distill-softmax-last-dim"
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
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// (y, g) -> y ⊙ (g - Σ g ⊙ y) per row
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "distill-softmax-last-dim-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        same_len(y, g, self.name())?;
        let dx = map_rows2(y, g, last_dim(l1), |dx, y, g| {
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *dx = y * (g - dot);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Runs `f` fused and composite on the same input and upstream gradient; returns the largest
    /// absolute differences of the outputs and of the input gradients.
    fn compare(shape: &[usize], scale: f64, f: impl Fn(&Tensor) -> Result<Tensor>) -> (f32, f32) {
        let dev = Device::Cpu;
        let x0 = (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let run = |fused: bool| {
            set_fused(fused);
            let x = Var::from_tensor(&x0).unwrap();
            let y = f(x.as_tensor()).unwrap();
            let loss = (&y * &upstream).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            set_fused(false);
            (y, grads.get(x.as_tensor()).expect("a gradient").clone())
        };
        let (yf, gf) = run(true);
        let (yc, gc) = run(false);
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        (diff(&yf, &yc), diff(&gf, &gc))
    }

    // set_fused is process-wide: the comparisons run in one test so that they never interleave.
    #[test]
    fn fused_kernels_match_the_composite_ops_in_values_and_gradients() {
        for (shape, scale) in [(vec![3, 5, 384], 3.0), (vec![2, 12, 40, 40], 6.0), (vec![7], 1.0), (vec![4, 1536], 8.0)]
        {
            let (v, g) = compare(&shape, scale, gelu_erf);
            assert!(v < 2e-5 && g < 2e-5, "gelu {shape:?}: values {v}, gradients {g}");
            let (v, g) = compare(&shape, scale, softmax_last_dim);
            assert!(v < 1e-5 && g < 1e-5, "softmax {shape:?}: values {v}, gradients {g}");
            let (v, g) = compare(&shape, scale, |x| normalize_last_dim(x, 1e-12));
            assert!(v < 2e-5 && g < 2e-4, "normalize {shape:?}: values {v}, gradients {g}");
        }
        // A masked attention row: -inf-like biases give zeros and no NaN.
        let x = Tensor::new(&[[1f32, 2.0, -1e9, -3.4e38]], &Device::Cpu).unwrap();
        set_fused(true);
        let y: Vec<f32> = softmax_last_dim(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        set_fused(false);
        assert!((y[0] - 0.268_941_43).abs() < 1e-6 && (y[1] - 0.731_058_6).abs() < 1e-6 && y[2] == 0.0 && y[3] == 0.0);
        // Strided inputs (a transpose) are made contiguous first.
        let x = Tensor::randn(0f32, 1.0, (6, 9), &Device::Cpu).unwrap().t().unwrap();
        let reference = softmax_last_dim(&x).unwrap();
        set_fused(true);
        let fused = softmax_last_dim(&x).unwrap();
        set_fused(false);
        let d = (fused - reference).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn erf_is_within_its_error_bound() {
        // Reference values of erf (Abramowitz & Stegun table 7.1).
        for (x, e) in [
            (0.0f32, 0.0f32),
            (0.1, 0.112_462_916),
            (0.5, 0.520_499_88),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
            (3.5, 0.999_999_26),
        ] {
            assert!((erf(x) - e).abs() < 3e-7, "erf({x}) = {} vs {e}", erf(x));
            assert!((erf(-x) + e).abs() < 3e-7);
        }
    }
}
