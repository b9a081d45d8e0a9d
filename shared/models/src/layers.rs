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

thread_local! {
    /// Whether forward passes on this thread keep the graph for a backward pass (see [`no_grad`]).
    static GRAD_ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };

    /// The dropout masks' generator on this thread, when seeded (training that must be
    /// reproducible and resumable); otherwise candle's own random source is used.
    static DROPOUT_RNG: std::cell::RefCell<Option<rand_chacha::ChaCha8Rng>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` without keeping the autograd graph, as `torch.no_grad()`: the models cut the graph
/// between layers, so scoring holds one layer's activations at a time instead of all of them.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let before = GRAD_ENABLED.with(|g| g.replace(false));
    let out = f();
    GRAD_ENABLED.with(|g| g.set(before));
    out
}

/// Whether the graph is being kept on this thread.
pub fn grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Seeds this thread's dropout masks (`None` returns to candle's unseeded generator). A trainer
/// seeds each step from (seed, step), so a resumed run draws the same masks as an uninterrupted one.
pub fn seed_dropout(seed: Option<u64>) {
    use rand::SeedableRng;
    DROPOUT_RNG.with(|r| *r.borrow_mut() = seed.map(rand_chacha::ChaCha8Rng::seed_from_u64));
}

/// Dropout that is active only in training (inverted: kept values are scaled by 1 / (1 - p)).
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    let seeded = DROPOUT_RNG.with(|r| {
        r.borrow_mut().as_mut().map(|rng| {
            use rand::Rng;
            let keep = 1.0 / (1.0 - p) as f32;
            (0..x.elem_count()).map(|_| if rng.random::<f32>() >= p as f32 { keep } else { 0.0 }).collect::<Vec<f32>>()
        })
    });
    match seeded {
        Some(mask) => x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?,
        None => candle_nn::ops::dropout(x, p as f32),
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
