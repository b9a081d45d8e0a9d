//! Building blocks from differentiable ops: each has a backward through candle's autograd.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `y = x Wᵀ + b` with HF's `weight` [out, in] and `bias` [out].
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(vb: VarBuilder, inp: usize, out: usize, bias: bool) -> Result<Self> {
        let bound = 1.0 / (inp as f64).sqrt();
        let weight = vb.get_with_hints((out, inp), "weight", candle_nn::Init::Uniform { lo: -bound, up: bound })?;
        let bias = if bias { Some(vb.get_with_hints(out, "bias", candle_nn::Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Layer normalisation over the last dimension, composed of mean / variance ops (the fused
/// candle op has no backward).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64, bias: bool) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        let bias = if bias { Some(vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = normed.broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Softmax over the last dimension; the max is a constant shift, so it is detached.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Dropout that is active only in training.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        candle_nn::ops::dropout(x, p as f32)
    } else {
        Ok(x.clone())
    }
}

/// Embedding lookup (index_select, whose backward scatters into the table).
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Tensor,
}

impl Embedding {
    pub fn load(vb: VarBuilder, n: usize, dim: usize) -> Result<Self> {
        let table = vb.get_with_hints((n, dim), "weight", candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 })?;
        Ok(Self { table })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let shape = ids.dims().to_vec();
        let flat = self.table.index_select(&ids.flatten_all()?, 0)?;
        let mut out = shape;
        out.push(self.table.dim(1)?);
        flat.reshape(out)
    }
}
