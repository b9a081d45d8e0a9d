//! Building blocks from differentiable ops: each has a backward through candle's autograd.

use candle_core::{DType, Module, Result, Tensor};
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

impl Linear {
    /// The layers side by side: one product whose output is theirs concatenated over the last
    /// dimension (BERT's query, key and value as one matmul: the input read and, under
    /// autocast, cast once, and its gradient one product instead of three summed). The
    /// weights stay the layers' own variables (their HF names), joined per call; the joined
    /// weight's gradient splits back to each.
    pub fn concat(parts: &[&Linear]) -> Result<Linear> {
        let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
        let bias = if parts.iter().all(|l| l.bias.is_some()) {
            let biases: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        } else if parts.iter().all(|l| l.bias.is_none()) {
            None
        } else {
            candle_core::bail!("linear concat: some layers have a bias and some do not")
        };
        Ok(Linear { weight: Tensor::cat(&weights, 0)?, bias })
    }
}

impl Linear {
    /// The product alone, x Wᵀ, in the dtype matmuls run in ([`compute_dtype`]), for a kernel
    /// that adds the bias itself (`kernels::add_norm_for_scoring`, `kernels::bias_gelu_for_scoring`).
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        let compute = compute_dtype(self.weight.dtype());
        let dims = x.dims();
        let (inp, lead) = match dims.split_last() {
            Some((inp, lead)) => (*inp, lead),
            None => candle_core::bail!("linear: a scalar input"),
        };
        let rows: usize = lead.iter().product();
        let y = x.to_dtype(compute)?.reshape((rows, inp))?.matmul(&self.weight.to_dtype(compute)?.t()?)?;
        let mut out = lead.to_vec();
        out.push(y.dim(1)?);
        y.reshape(out)
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight, [out, in] as HF stores it.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    /// Mixed precision as autocast does it: with bf16 weights and f32 activations the product
    /// runs in bf16 and comes back as f32; with one dtype throughout nothing is cast.
    /// Under [`autocast`] the f32 master weight is cast for the product (its gradient flows back
    /// to the f32 variable through the cast).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_as(x, x.dtype())
    }
}

impl Linear {
    /// As [`Module::forward`], the output in `act` (a bf16 input whose output joins an f32
    /// residual stream under autocast).
    pub fn forward_as(&self, x: &Tensor, act: DType) -> Result<Tensor> {
        // One 2-D product over all leading dimensions (its weight gradient is one GEMM too,
        // where a batched product would write a partial gradient per batch and sum them).
        let y = self.product(x)?;
        match &self.bias {
            // The cast back to the activations' dtype and the bias in one kernel where the fused
            // kernels run (the bias's gradient a coalesced column sum).
            Some(b) => crate::kernels::bias_add(&y, &b.to_dtype(act)?),
            None => y.to_dtype(act),
        }
    }
}

/// `a @ b` computed in `dtype` (from [`compute_dtype`]: bf16 under mixed precision), result in
/// the dtype of `a`.
pub fn matmul_in(a: &Tensor, b: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    a.to_dtype(dtype)?.matmul(&b.to_dtype(dtype)?)?.to_dtype(a.dtype())
}

/// Attention from candle's ops: softmax(q kᵀ · scale + mask) (dropout p in training) times v,
/// the products in `compute`; q [B, heads, Q, D], k and v [B, heads, L, D], `mask` additive and
/// broadcast to [B, heads, Q, L]. The heads merged: [B, Q, heads D].
pub fn composite_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    compute: DType,
    (p, train): (f64, bool),
) -> Result<Tensor> {
    let (b, heads, rows, d) = q.dims4()?;
    let scores = matmul_in(q, &k.t()?, compute)?;
    let probs = dropout(&crate::kernels::masked_softmax(&scores, mask, scale)?, p, train)?;
    matmul_in(&probs, v, compute)?.transpose(1, 2)?.contiguous()?.reshape((b, rows, heads * d))
}

/// Layer normalisation over the last dimension with its backward (`kernels::layer_norm`:
/// candle's fused layer norm has none).
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
    /// Computed in f32 whatever the input's dtype; out in the weights' dtype. Under autocast the
    /// weights are f32 master weights, so the residual stream after the first norm stays f32 (as
    /// PyTorch's autocast runs layer norm); with bf16 weights (bf16 scoring) the stream is bf16,
    /// as in a bf16 PyTorch model, and no casts surround each matmul.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One kernel each way where the fused kernels run (`kernels::layer_norm`), else the
        // normalisation, scale and shift.
        let bias = self.bias.as_ref().map(|b| b.to_dtype(DType::F32)).transpose()?;
        let w = self.weight.to_dtype(DType::F32)?;
        crate::kernels::layer_norm(&x.to_dtype(DType::F32)?, &w, bias.as_ref(), self.eps)?.to_dtype(self.weight.dtype())
    }
}

impl LayerNorm {
    /// The norm of a sum of embedding rows (`rows`: each table with its ids, one shape): for
    /// scoring one kernel (`kernels::embed_norm_for_scoring`) where `kernels::embed_norm_applies`
    /// holds, else the rows gathered and added in the tables' dtype ([`sum_embeddings`]), then
    /// this norm.
    pub fn embed(&self, rows: &[(&Embedding, &Tensor)]) -> Result<Tensor> {
        let tables: Vec<&Tensor> = rows.iter().map(|(e, _)| e.table()).collect();
        let ids: Vec<&Tensor> = rows.iter().map(|(_, i)| *i).collect();
        if crate::kernels::embed_norm_applies(&tables, &ids) && self.weight.dtype() == tables[0].dtype() {
            return crate::kernels::embed_norm_for_scoring(&tables, &ids, &self.weight, self.bias.as_ref(), self.eps);
        }
        self.forward(&sum_embeddings(rows)?)
    }

    /// The norm of `x + bias + residual` for scoring (`x` a linear layer's product without its
    /// `bias`): one kernel where `kernels::scoring_epilogues_on` holds, else the composite.
    pub fn add_norm(&self, x: &Tensor, bias: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
        crate::kernels::add_norm_for_scoring(x, bias, residual, &self.weight, self.bias.as_ref(), self.eps)
    }

    /// The norm of `dropout(x + bias) + residual` in training under autocast (`x` a linear
    /// layer's bf16 product without its `bias`, the residual stream f32; `dropout` (p, seed)):
    /// one kernel each way (`kernels::add_norm_for_training`) where
    /// `kernels::add_norm_for_training_on` holds, else the composite (the bias add back to f32,
    /// the dropout, the add and the norm).
    pub fn add_norm_for_training(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        residual: &Tensor,
        dropout_p: f64,
        train: bool,
    ) -> Result<Tensor> {
        if crate::kernels::add_norm_for_training_on(x, residual) {
            let drop = (train && dropout_p > 0.0).then(dropout_seed).map(|seed| (dropout_p, seed));
            return crate::kernels::add_norm_for_training(
                x,
                bias,
                residual,
                &self.weight,
                self.bias.as_ref(),
                self.eps,
                drop,
            );
        }
        let h = match bias {
            Some(b) => crate::kernels::bias_add(x, &b.to_dtype(residual.dtype())?)?,
            None => x.to_dtype(residual.dtype())?,
        };
        self.forward(&(dropout(&h, dropout_p, train)? + residual)?)
    }

    /// As [`LayerNorm::add_norm`], also returning the sum (a pre-LN block's residual stream):
    /// (x + bias + residual, its norm).
    pub fn add_norm_sum(&self, x: &Tensor, bias: Option<&Tensor>, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        crate::kernels::add_norm_sum_for_scoring(x, bias, residual, &self.weight, self.bias.as_ref(), self.eps)
    }
}

/// Softmax over the last dimension; the max is a constant shift, so it is detached.
/// Computed in f32 whatever the input's dtype.
/// (A fused kernel on the CPU, `kernels::softmax_last_dim`.)
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    crate::kernels::softmax_last_dim(x)
}

thread_local! {
    /// The dtype matmuls run in on this thread, whatever the weights' (see [`autocast`]).
    static AUTOCAST: std::cell::Cell<Option<DType>> = const { std::cell::Cell::new(None) };
}

/// Mixed-precision training as PyTorch's autocast: with `Some(BF16)`, forward passes on this
/// thread run every matmul in bf16 while the variables (master weights), layer norms, softmax,
/// the residual stream and the objective stay f32. `None` turns it off. A trainer sets it on
/// its training thread (through [`TrainingModes`]); scoring in bf16 loads bf16 weights instead.
pub fn autocast(dtype: Option<DType>) {
    AUTOCAST.with(|a| a.set(dtype));
}

/// The dtype a matmul with weights of dtype `weights` runs in on this thread.
pub fn compute_dtype(weights: DType) -> DType {
    AUTOCAST.with(|a| a.get()).unwrap_or(weights)
}

thread_local! {
    /// Whether forward passes on this thread keep the graph for a backward pass (see [`no_grad`]).
    static GRAD_ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };

    /// The dropout masks' generator on this thread, when seeded (training that must be
    /// reproducible and resumable); otherwise candle's own random source is used.
    static DROPOUT_RNG: std::cell::RefCell<Option<rand_chacha::ChaCha8Rng>> = const { std::cell::RefCell::new(None) };
}

thread_local! {
    /// Whether cross-encoders on this thread run their last layer for the first token only (see
    /// [`first_token_only`]).
    static FIRST_TOKEN_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// A cross-encoder's head reads the first token's final state only, so its last layer runs the
/// query, attention, output projection, norms and feed-forward for that token alone (keys and
/// values for all): the same scores and gradients for less work. On by default; `false` runs the
/// full last layer on this thread (the check that both agree, and the benchmark's baseline).
pub fn first_token_only(on: bool) {
    FIRST_TOKEN_ONLY.with(|f| f.set(on));
}

/// Whether the last layer runs for the first token only on this thread.
pub fn first_token_only_on() -> bool {
    FIRST_TOKEN_ONLY.with(|f| f.get())
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

/// A seed for a dropout mask drawn by a kernel (a function of the seed and the element's index):
/// from this thread's generator when seeded (reproducible, resumable), otherwise random.
pub fn dropout_seed() -> u64 {
    DROPOUT_RNG.with(|r| r.borrow_mut().as_mut().map(rand::Rng::random::<u64>)).unwrap_or_else(rand::random)
}

/// Dropout that is active only in training (inverted: kept values are scaled by 1 / (1 - p)).
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    if crate::kernels::fused_dropout_for(x) {
        // One kernel, the mask a function of a seed (from this thread's generator when seeded).
        return crate::kernels::dropout(x, p, dropout_seed());
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
    /// The vocabulary table (`word_embeddings`, ModernBERT's `tok_embeddings`), which
    /// [`freeze_word_embeddings`] detaches.
    words: bool,
}

thread_local! {
    /// Whether forward passes on this thread detach the vocabulary tables (see [`freeze_word_embeddings`]).
    static WORDS_FROZEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Forward passes on this thread read the word-embedding tables detached: they get no gradient
/// (the optimizer then leaves them as they are) and the backward pass skips the dense
/// vocabulary-sized gradient. A trainer sets it on its training thread.
pub fn freeze_word_embeddings(on: bool) {
    WORDS_FROZEN.with(|f| f.set(on));
}

/// The modes a training job sets on the thread that runs it ([`autocast`],
/// [`freeze_word_embeddings`], [`seed_dropout`]), put back to their defaults when dropped: at the
/// job's end, an early return or a panic. A job runs on a pooled thread; without this, the next
/// job on that thread (an evaluation) would score under the previous one's bf16 autocast.
pub struct TrainingModes(());

impl TrainingModes {
    pub fn set(autocast_to: Option<DType>, frozen_words: bool) -> TrainingModes {
        autocast(autocast_to);
        freeze_word_embeddings(frozen_words);
        TrainingModes(())
    }
}

impl Drop for TrainingModes {
    fn drop(&mut self) {
        autocast(None);
        freeze_word_embeddings(false);
        seed_dropout(None);
    }
}

/// The sum of embedding rows, each table gathered by its ids, added in order in the tables' dtype.
pub fn sum_embeddings(rows: &[(&Embedding, &Tensor)]) -> Result<Tensor> {
    let Some(((first, ids), rest)) = rows.split_first() else { candle_core::bail!("no embedding tables") };
    let mut x = first.forward(ids)?;
    for (e, ids) in rest {
        x = (x + e.forward(ids)?)?;
    }
    Ok(x)
}

impl Embedding {
    pub fn load(vb: VarBuilder, n: usize, dim: usize) -> Result<Self> {
        let prefix = vb.prefix();
        let words = prefix.ends_with("word_embeddings") || prefix.ends_with("tok_embeddings");
        let table = vb.get_with_hints((n, dim), "weight", candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 })?;
        Ok(Self { table, words })
    }

    pub fn dtype(&self) -> DType {
        self.table.dtype()
    }

    /// The embedding table [n, dim] (DeBERTa projects its relative embeddings directly).
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let frozen = self.words && WORDS_FROZEN.with(|f| f.get());
        let table = if frozen { self.table.detach() } else { self.table.clone() };
        // index_select, or where the fused kernels run a gather whose backward is one scatter.
        crate::kernels::embedding(&table, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modes() -> (DType, bool) {
        (compute_dtype(DType::F32), WORDS_FROZEN.with(|f| f.get()))
    }

    /// A training job's modes last as long as its guard, also when the job panics: the pooled
    /// thread then runs the next job (an evaluation) in f32 with trainable embeddings.
    #[test]
    fn training_modes_end_with_their_guard() {
        {
            let _modes = TrainingModes::set(Some(DType::BF16), true);
            assert_eq!(modes(), (DType::BF16, true));
        }
        assert_eq!(modes(), (DType::F32, false));
        let panicked = std::panic::catch_unwind(|| {
            let _modes = TrainingModes::set(Some(DType::BF16), true);
            panic!("a job that panics");
        });
        assert!(panicked.is_err());
        assert_eq!(modes(), (DType::F32, false));
    }
}
