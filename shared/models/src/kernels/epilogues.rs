//! Scoring epilogues (forward only: scoring keeps no graph): a post-LN block's linear bias,
//! residual and layer norm in one kernel, the sum and its norm for pre-LN blocks, bias + GELU, and
//! GeGLU; bf16 on CUDA (`kernels.cu`), bf16 or f32 CPU twins.

use super::*;

/// (x, residual, params [3, cols]) -> LN(x + bias + residual) w + shift per row, with params =
/// (the linear layer's bias, the norm's weight, its shift); x and residual bf16 (or f32 on the
/// CPU), out in their dtype, math in f32. Forward only: scoring keeps no graph.
pub(super) struct AddNorm {
    pub(super) eps: f32,
    /// The sums too: out [2, ..] = (x + bias + residual in x's dtype, the norm of that).
    pub(super) sum: bool,
}

impl CustomOp3 for AddNorm {
    fn name(&self) -> &'static str {
        "distill-add-norm"
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
        let (x, r) = (widened(s1, l1, self.name())?, widened(s2, l2, self.name())?);
        same_len(&x, &r, self.name())?;
        let p = vector(s3, l3, 3 * cols, self.name())?;
        let (bias, w, shift) = (&p[..cols], &p[cols..2 * cols], &p[2 * cols..]);
        let bf16 = matches!(s1, CpuStorage::BF16(_));
        // The sum as the residual stream keeps it (rounded to bf16 for bf16 activations).
        let sums = map_rows2(&x, &r, cols, |y, x, r| {
            for (i, (y, (x, r))) in y.iter_mut().zip(x.iter().zip(r)).enumerate() {
                let t = x + bias[i] + r;
                *y = if self.sum && bf16 { half::bf16::from_f32(t).to_f32() } else { t };
            }
        });
        let y = map_rows(&sums, cols, |y, v| {
            let (mean, rstd) = moments(v, self.eps);
            for (i, (y, v)) in y.iter_mut().zip(v).enumerate() {
                *y = (v - mean) * rstd * w[i] + shift[i];
            }
        });
        if !self.sum {
            return Ok((narrowed(y, s1), l1.shape().clone()));
        }
        let mut shape = vec![2];
        shape.extend(l1.dims());
        Ok((narrowed([sums, y].concat(), s1), shape.into()))
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
        if l1.shape() != l2.shape() || l3.shape().elem_count() != 3 * last_dim(l1) {
            candle_core::bail!("{}: {:?}, {:?}, {:?}", self.name(), l1.dims(), l2.dims(), l3.dims());
        }
        cuda::add_norm((s1, l1), (s2, l2), (s3, l3), self.eps, self.sum)
    }
}

/// (t0, t1, t2) -> LN(t0[ids 0] + t1[ids 1] + t2[ids 2]) w + shift: scoring's embeddings and
/// their norm in one pass, the first `ids.len()` (1-3) tables [n_k, cols] used (the others repeat
/// the first), each gathered by its ids (u32, one shape; an id past the table gives zeros), each
/// add rounded to the tables' dtype (bf16, as the composite's adds; f32 too on the CPU), the norm in
/// f32, params [2 cols] = (w, shift) f32, out [ids.., cols] in the tables' dtype. Forward only.
pub(super) struct EmbedNorm {
    pub(super) ids: Vec<Tensor>,
    pub(super) params: Tensor,
    pub(super) eps: f32,
}

impl CustomOp3 for EmbedNorm {
    fn name(&self) -> &'static str {
        "distill-embed-norm"
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
        let tables = [widened(s1, l1, self.name())?, widened(s2, l2, self.name())?, widened(s3, l3, self.name())?];
        let ids: Vec<Vec<u32>> = candle_core::op_stats::uncounted(|| {
            self.ids.iter().map(|t| t.flatten_all()?.to_vec1::<u32>()).collect::<Result<_>>()
        })?;
        let p = f32_data(&self.params)?;
        if p.len() != 2 * cols {
            candle_core::bail!("{}: {} norm parameters for {cols} columns", self.name(), p.len());
        }
        let (w, shift) = p.split_at(cols);
        let bf16 = matches!(s1, CpuStorage::BF16(_));
        let round = |x: f32| if bf16 { half::bf16::from_f32(x).to_f32() } else { x };
        let rows = ids[0].len();
        let mut sums = vec![0f32; rows * cols];
        for (r, sum) in sums.chunks_mut(cols).enumerate() {
            for (k, (table, ids)) in tables.iter().zip(&ids).enumerate() {
                let id = ids[r] as usize;
                let row = (id < table.len() / cols).then(|| &table[id * cols..(id + 1) * cols]);
                for (c, s) in sum.iter_mut().enumerate() {
                    let v = row.map_or(0.0, |row| row[c]);
                    *s = if k == 0 { v } else { round(*s + v) };
                }
            }
        }
        let y = map_rows(&sums, cols, |y, v| {
            let (mean, rstd) = moments(v, self.eps);
            for (i, (y, v)) in y.iter_mut().zip(v).enumerate() {
                *y = (v - mean) * rstd * w[i] + shift[i];
            }
        });
        let mut shape = self.ids[0].dims().to_vec();
        shape.push(cols);
        Ok((narrowed(y, s1), shape.into()))
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
        let cols = last_dim(l1);
        if [l2, l3].iter().any(|l| last_dim(l) != cols) || self.params.elem_count() != 2 * cols {
            candle_core::bail!("{}: tables {:?} {:?} {:?}", self.name(), l1.dims(), l2.dims(), l3.dims());
        }
        cuda::embed_norm([(s1, l1), (s2, l2), (s3, l3)], &self.ids, &self.params, self.eps)
    }
}

/// Whether [`embed_norm_for_scoring`] runs its kernel: 1-3 tables of one dtype and width, ids of
/// one shape, [`norm_epilogues_on`] (no graph kept, bf16 on CUDA, rows of at most 2,048).
pub fn embed_norm_applies(tables: &[&Tensor], ids: &[&Tensor]) -> bool {
    let Some(first) = tables.first() else { return false };
    (1..=3).contains(&tables.len())
        && ids.len() == tables.len()
        && norm_epilogues_on(first)
        && tables.iter().all(|t| t.rank() == 2 && t.dtype() == first.dtype() && t.dims()[1] == first.dims()[1])
        && ids.iter().all(|i| i.dims() == ids[0].dims())
}

/// Scoring's embeddings and their norm in one kernel: LN(Σ_k tables[k][ids[k]]) w + shift, in
/// the tables' dtype (see [`EmbedNorm`]). Call where [`embed_norm_applies`] holds (an error
/// otherwise); the composite gathers, adds and runs the norm.
pub fn embed_norm_for_scoring(
    tables: &[&Tensor],
    ids: &[&Tensor],
    w: &Tensor,
    shift: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    if !embed_norm_applies(tables, ids) || w.elem_count() != tables[0].dim(1)? {
        candle_core::bail!(
            "embed norm for scoring: does not apply to {} tables, a norm of {:?}",
            tables.len(),
            w.dims()
        );
    }
    let cols = w.elem_count();
    let zeros = Tensor::zeros(cols, DType::F32, w.device())?;
    let params = Tensor::cat(&[w.to_dtype(DType::F32)?, shift.map_or(Ok(zeros), |s| s.to_dtype(DType::F32))?], 0)?;
    let ids = ids.iter().map(|i| i.to_dtype(DType::U32)?.contiguous()).collect::<Result<Vec<_>>>()?;
    let op = EmbedNorm { ids, params, eps: eps as f32 };
    // The unused tables repeat the first (never read).
    let t = |k: usize| tables.get(k).unwrap_or(&tables[0]).contiguous();
    t(0)?.apply_op3_no_bwd(&t(1)?, &t(2)?, &op)
}

/// (x, b) -> gelu_erf(x + b) over the last dimension, x bf16 (or f32 on the CPU), b f32, out in
/// x's dtype. Forward only.
pub(super) struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "distill-bias-gelu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(l1);
        let x = widened(s1, l1, self.name())?;
        let b = vector(s2, l2, cols, self.name())?;
        let y = map_rows(&x, cols, |y, x| {
            for (i, (y, &x)) in y.iter_mut().zip(x).enumerate() {
                let v = x + b[i];
                *y = 0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2));
            }
        });
        Ok((narrowed(y, s1), l1.shape().clone()))
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
        cuda::bias_gelu((s1, l1), (s2, l2))
    }

    /// Training ([`bias_gelu_for_training`]): x's gradient from one kernel that recomputes
    /// x + b (nothing stored but x, the product the next layer's backward keeps anyway), in x's
    /// dtype; the bias's gradient its column sum, in f32.
    fn bwd(&self, x: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(x.dtype())?.contiguous()?;
        let dx = g.apply_op3_no_bwd(&x.contiguous()?, &b.contiguous()?, &BiasGeluGrad)?;
        let db = dx.apply_op1_no_bwd(&ColumnSum)?.to_dtype(b.dtype())?;
        Ok((Some(dx), Some(db)))
    }
}

/// (g, x, b) -> g gelu'(x + b) over the last dimension, in x's dtype (bf16; f32 too on the CPU),
/// b f32: the backward of [`BiasGelu`].
pub(super) struct BiasGeluGrad;

impl CustomOp3 for BiasGeluGrad {
    fn name(&self) -> &'static str {
        "distill-bias-gelu-grad"
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
        let cols = last_dim(l2);
        let (g, x) = (widened(s1, l1, self.name())?, widened(s2, l2, self.name())?);
        same_len(&g, &x, self.name())?;
        let b = vector(s3, l3, cols, self.name())?;
        let dx = g.iter().zip(x.iter()).enumerate().map(|(i, (g, x))| g * gelu_erf_slope(x + b[i % cols])).collect();
        Ok((narrowed(dx, s2), l2.shape().clone()))
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
        if l3.shape().elem_count() != last_dim(l2) || l1.shape() != l2.shape() {
            candle_core::bail!("{}: g {:?}, x {:?}, a bias of {:?}", self.name(), l1.dims(), l2.dims(), l3.dims());
        }
        cuda::bias_gelu_grad((s1, l1), (s2, l2), (s3, l3))
    }
}

/// Whether [`bias_gelu_for_training`] applies to a feed-forward input `x` (f32 activations) and
/// its bias under the current autocast: products in bf16, f32 weights, the `bias_add` family on
/// for the device.
pub fn bias_gelu_for_training_on(x: &Tensor, bias: &Tensor) -> bool {
    x.dtype() == DType::F32
        && bias.dtype() == DType::F32
        && crate::layers::compute_dtype(DType::F32) == DType::BF16
        && unproven_on(x, Unproven::BiasAdd)
}

/// The feed-forward's bias and GELU in training under autocast: `x` a bf16 product (the layer's
/// output without its bias), `bias` f32 -> gelu(x + bias) in bf16, the next product's input as it
/// is: one pass where the f32 bias add, the f32 GELU and the cast for the next product were three
/// (and their backward three more). The backward: one kernel for x's gradient, recomputing
/// x + bias, and a column sum for the bias's. Call where [`bias_gelu_for_training_on`] holds.
pub fn bias_gelu_for_training(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::BF16 || bias.elem_count() != x.dim(D::Minus1)? {
        candle_core::bail!(
            "bias gelu for training: a bf16 product and its bias, got {:?} {:?} and {:?}",
            x.dtype(),
            x.dims(),
            bias.dims()
        );
    }
    x.contiguous()?.apply_op2(&bias.to_dtype(DType::F32)?.contiguous()?, BiasGelu)
}

/// Whether the scoring epilogues ([`add_norm_for_scoring`], [`bias_gelu_for_scoring`]) run for
/// activations like `x`: no graph kept, bf16 (on CUDA; f32 too on the CPU), the family on for the
/// device (the norm epilogues also need rows of at most 2,048).
pub fn scoring_epilogues_on(x: &Tensor) -> bool {
    let dtype_ok = x.dtype() == DType::BF16 || (x.dtype() == DType::F32 && x.device().is_cpu());
    dtype_ok && !crate::layers::grad_enabled() && unproven_on(x, Unproven::ScoringEpilogues)
}

/// [`scoring_epilogues_on`] for the norm epilogues, whose kernels hold a row in shared memory
/// (at most `MAX_NORM_COLS` columns); the elementwise ones (bias + GELU, GeGLU) take any width.
fn norm_epilogues_on(x: &Tensor) -> bool {
    scoring_epilogues_on(x) && x.dim(D::Minus1).is_ok_and(|c| c <= MAX_NORM_COLS)
}

/// Whether [`add_norm_for_scoring`] and [`add_norm_sum_for_scoring`] run their kernel for these
/// operands (else the composite).
pub(super) fn add_norm_applies(x: &Tensor, residual: &Tensor, w: &Tensor) -> bool {
    norm_epilogues_on(x) && residual.dtype() == x.dtype() && x.dim(D::Minus1).is_ok_and(|c| c == w.elem_count())
}

/// Whether [`bias_gelu_for_scoring`] runs its kernel for these operands.
pub(super) fn bias_gelu_applies(x: &Tensor, bias: &Tensor) -> bool {
    scoring_epilogues_on(x) && x.dim(D::Minus1).is_ok_and(|c| c == bias.elem_count())
}

/// Whether [`geglu_for_scoring`] runs its kernel for this input.
pub(super) fn geglu_applies(x: &Tensor) -> bool {
    scoring_epilogues_on(x) && x.dim(D::Minus1).is_ok_and(|c| c % 2 == 0)
}

/// A post-LN block's end for scoring, one kernel: LN(x + bias + residual) w + shift, where x is
/// a linear layer's product without its bias. Where [`scoring_epilogues_on`] does not hold, the
/// composite (the bias, the residual, then [`layer_norm`] in f32, back to x's dtype).
pub fn add_norm_for_scoring(
    x: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
    w: &Tensor,
    shift: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    if !add_norm_applies(x, residual, w) {
        return Ok(add_norm_composite(x, bias, residual, w, shift, eps)?.1);
    }
    let params = norm_params(bias, w, shift, x.dim(D::Minus1)?, x.device())?;
    x.contiguous()?.apply_op3_no_bwd(&residual.contiguous()?, &params, &AddNorm { eps: eps as f32, sum: false })
}

/// The composite of the add-norm epilogues: (x + bias + residual in x's dtype, its layer norm
/// computed in f32 and returned in x's dtype).
fn add_norm_composite(
    x: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
    w: &Tensor,
    shift: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let sum = match bias {
        Some(b) => x.broadcast_add(&b.to_dtype(x.dtype())?)?,
        None => x.clone(),
    };
    let sum = (sum + residual)?;
    let shift = shift.map(|s| s.to_dtype(DType::F32)).transpose()?;
    let norm = layer_norm(&sum.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, shift.as_ref(), eps)?;
    let norm = norm.to_dtype(x.dtype())?;
    Ok((sum, norm))
}

/// (the linear bias, the norm's weight, its shift) as one f32 [3 cols], zeros where absent.
fn norm_params(
    bias: Option<&Tensor>,
    w: &Tensor,
    shift: Option<&Tensor>,
    cols: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let zeros = || Tensor::zeros(cols, DType::F32, dev);
    Tensor::cat(
        &[
            bias.map_or_else(zeros, |b| b.to_dtype(DType::F32))?,
            w.to_dtype(DType::F32)?,
            shift.map_or_else(zeros, |s| s.to_dtype(DType::F32))?,
        ],
        0,
    )
}

/// A pre-LN block's residual add and the next norm for scoring, one kernel: (x + bias +
/// residual, and its layer norm), x a linear layer's product without its bias. The composite
/// where [`scoring_epilogues_on`] does not hold.
pub fn add_norm_sum_for_scoring(
    x: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
    w: &Tensor,
    shift: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    if !add_norm_applies(x, residual, w) {
        return add_norm_composite(x, bias, residual, w, shift, eps);
    }
    let params = norm_params(bias, w, shift, x.dim(D::Minus1)?, x.device())?;
    let out =
        x.contiguous()?.apply_op3_no_bwd(&residual.contiguous()?, &params, &AddNorm { eps: eps as f32, sum: true })?;
    Ok((out.get(0)?, out.get(1)?))
}

/// x [.., 2 inter] = (input | gate) -> gelu_erf(input) gate [.., inter] (ModernBERT's GeGLU), in
/// x's dtype, math in f32. Forward only.
pub(super) struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "distill-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(l);
        if !cols.is_multiple_of(2) {
            candle_core::bail!("{}: an odd last dimension {cols}", self.name());
        }
        let x = widened(s, l, self.name())?;
        let inter = cols / 2;
        let mut y = vec![0f32; x.len() / 2];
        y.par_chunks_mut(inter).zip(x.par_chunks(cols)).for_each(|(y, x)| {
            let (a, g) = x.split_at(inter);
            for ((y, &a), &g) in y.iter_mut().zip(a).zip(g) {
                *y = 0.5 * a * (1.0 + erf(a * FRAC_1_SQRT_2)) * g;
            }
        });
        let mut shape = l.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = inter;
        }
        Ok((narrowed(y, s), shape.into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        if last_dim(l) % 2 != 0 {
            candle_core::bail!("{}: an odd last dimension {:?}", self.name(), l.dims());
        }
        cuda::geglu(s, l)
    }

    /// Training ([`geglu_for_training`]): one kernel, from x (the product the layer keeps
    /// anyway) and the output's gradient, both halves' gradients in x's dtype.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(x.dtype())?.contiguous()?;
        Ok(Some(g.apply_op2_no_bwd(&x.contiguous()?, &GegluGrad)?))
    }
}

/// (g [.., inter], x [.., 2 inter]) -> dx [.., 2 inter] = (g gate gelu'(input), g gelu(input)), in
/// x's dtype (bf16; f32 too on the CPU), math in f32: the backward of [`Geglu`].
pub(super) struct GegluGrad;

impl CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "distill-geglu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (inter, cols) = (last_dim(l1), last_dim(l2));
        let (g, x) = (widened(s1, l1, self.name())?, widened(s2, l2, self.name())?);
        if cols != 2 * inter || g.len() * 2 != x.len() {
            candle_core::bail!("{}: a gradient of {:?} for an input of {:?}", self.name(), l1.dims(), l2.dims());
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(cols).zip(x.par_chunks(cols).zip(g.par_chunks(inter))).for_each(|(dx, (x, g))| {
            let (da, dg) = dx.split_at_mut(inter);
            for c in 0..inter {
                let (a, gate) = (x[c], x[inter + c]);
                let cdf = 0.5 * (1.0 + erf(a * FRAC_1_SQRT_2));
                da[c] = g[c] * gate * gelu_erf_slope(a);
                dg[c] = g[c] * a * cdf;
            }
        });
        Ok((narrowed(dx, s2), l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if last_dim(l2) != 2 * last_dim(l1) || l2.shape().elem_count() != 2 * l1.shape().elem_count() {
            candle_core::bail!("{}: a gradient of {:?} for an input of {:?}", self.name(), l1.dims(), l2.dims());
        }
        cuda::geglu_grad((s1, l1), (s2, l2))
    }
}

/// Whether [`geglu_for_training`] applies to a product `x` under the current autocast: x bf16
/// with an even last dimension, a graph kept, products in bf16, the `bias_add` family on for the
/// device.
pub fn geglu_for_training_on(x: &Tensor) -> bool {
    x.dtype() == DType::BF16
        && x.dim(D::Minus1).is_ok_and(|c| c % 2 == 0)
        && crate::layers::grad_enabled()
        && crate::layers::compute_dtype(DType::F32) == DType::BF16
        && unproven_on(x, Unproven::BiasAdd)
}

/// GeGLU in training under autocast (ModernBERT's MLP): `x` the bf16 product [.., 2 inter] =
/// (input | gate) -> gelu(input) gate in bf16, the next product's input as it is: one kernel
/// where the cast to f32, the halves' copies, GELU, the product and the cast back were five (and
/// their backward as many); its backward one kernel from x. Call where [`geglu_for_training_on`]
/// holds.
pub fn geglu_for_training(x: &Tensor) -> Result<Tensor> {
    if !geglu_for_training_on(x) {
        candle_core::bail!("geglu for training: does not apply to {:?} {:?}", x.dtype(), x.dims());
    }
    x.contiguous()?.apply_op1(Geglu)
}

/// GeGLU for scoring, one kernel where [`scoring_epilogues_on`] holds (no split copies); else
/// the halves, [`gelu_erf`] and the product.
pub fn geglu_for_scoring(x: &Tensor) -> Result<Tensor> {
    if !geglu_applies(x) {
        let cols = x.dim(D::Minus1)?;
        let (input, gate) = (x.narrow(D::Minus1, 0, cols / 2)?, x.narrow(D::Minus1, cols / 2, cols / 2)?);
        return gelu_erf(&input)? * gate;
    }
    x.contiguous()?.apply_op1_no_bwd(&Geglu)
}

/// The feed-forward's bias and GELU (erf form) for scoring, one kernel where
/// [`scoring_epilogues_on`] holds; else the bias then [`gelu_erf`].
pub fn bias_gelu_for_scoring(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !bias_gelu_applies(x, bias) {
        return gelu_erf(&x.broadcast_add(&bias.to_dtype(x.dtype())?)?);
    }
    x.contiguous()?.apply_op2_no_bwd(&bias.to_dtype(DType::F32)?.contiguous()?, &BiasGelu)
}

// ---------------------------------------------------------------------------------------------
// Scoring: the feed-forward's product with its bias and GELU in one cuBLASLt call

/// (x [.., k], w [n, k], b [n]) -> gelu(x wᵀ + b) [.., n] as cuBLASLt's GELU_BIAS epilogue gives
/// it: the product summed in f32, the bias and GELU (its tanh form) on the f32 sum, rounded once to
/// bf16. bf16 on CUDA (one cuBLASLt call) and on the CPU (its twin). Forward only.
pub(super) struct MatmulBiasGelu;

/// GELU's tanh form, 0.5 v (1 + tanh(sqrt(2 / pi) (v + 0.044715 v³))): cuBLASLt's GELU epilogue
/// (it differs from the erf form by at most 4.1e-4, under bf16's rounding of outputs near 1).
fn gelu_tanh(v: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * v * (1.0 + (SQRT_2_OVER_PI * (v + 0.044_715 * v * v * v)).tanh())
}

impl CustomOp3 for MatmulBiasGelu {
    fn name(&self) -> &'static str {
        "distill-matmul-bias-gelu"
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
        let (rows, k, n, shape) = product_shape(l1, l2, l3, self.name())?;
        let (x, w) = (widened(s1, l1, self.name())?, widened(s2, l2, self.name())?);
        let bias = widened(s3, l3, self.name())?;
        let cpu = &candle_core::Device::Cpu;
        let xw = Tensor::from_slice(&x, (rows, k), cpu)?.matmul(&Tensor::from_slice(&w, (n, k), cpu)?.t()?)?;
        let y = map_rows(&xw.flatten_all()?.to_vec1::<f32>()?, n, |y, v| {
            for (i, (y, v)) in y.iter_mut().zip(v).enumerate() {
                *y = gelu_tanh(v + bias[i]);
            }
        });
        Ok((narrowed(y, s1), shape))
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
        let (rows, k, n, shape) = product_shape(l1, l2, l3, self.name())?;
        Ok((cuda::matmul_bias_gelu((s1, l1), (s2, l2), (s3, l3), rows, k, n)?, shape))
    }
}

/// (rows, k, n, the output's shape) of x [.., k] times w [n, k]ᵀ plus b [n].
fn product_shape(l1: &Layout, l2: &Layout, l3: &Layout, op: &str) -> Result<(usize, usize, usize, Shape)> {
    let k = last_dim(l1);
    let &[n, wk] = l2.dims() else { candle_core::bail!("{op}: a weight of {:?}", l2.dims()) };
    if wk != k || l3.shape().elem_count() != n {
        candle_core::bail!("{op}: x {:?}, weight {:?}, bias {:?}", l1.dims(), l2.dims(), l3.dims());
    }
    let mut dims = l1.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok((l1.shape().elem_count() / k.max(1), k, n, dims.into()))
}

/// Whether [`matmul_bias_gelu_for_scoring`] runs its fused product for these operands.
/// bf16 only, on the CPU too: f32 scoring keeps GELU's erf form.
pub(super) fn matmul_bias_gelu_applies(x: &Tensor, w: &Tensor, bias: &Tensor) -> bool {
    x.dtype() == DType::BF16
        && w.dtype() == x.dtype()
        && !crate::layers::grad_enabled()
        && unproven_on(x, Unproven::MatmulEpilogues)
        && matches!(w.dims(), &[n, k] if x.dim(D::Minus1).is_ok_and(|c| c == k) && bias.elem_count() == n)
}

/// A feed-forward's first linear layer and GELU for scoring, gelu(x wᵀ + b) (w [n, k] as HF stores
/// it), as one cuBLASLt call with its GELU epilogue (family `matmul_epilogues`): the [.., n]
/// product is written once, GELU'd, where the product then [`bias_gelu_for_scoring`] write and
/// read it again. GELU is cuBLASLt's tanh form (within 4.1e-4 of the erf form BERT's "gelu"
/// names; bf16 output rounds at 3.9e-3 of values near 1). None where it does not apply (the
/// caller takes the product and [`bias_gelu_for_scoring`]).
pub fn matmul_bias_gelu_for_scoring(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    if !matmul_bias_gelu_applies(x, w, bias) {
        return Ok(None);
    }
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, bias.to_dtype(x.dtype())?.contiguous()?);
    // Counted as the product it is (its flops; its operands and output once), not as a custom op.
    let y = candle_core::op_stats::uncounted(|| x.apply_op3_no_bwd(&w, &b, &MatmulBiasGelu))?;
    let (rows, (n, k)) = (x.elem_count() / w.dim(1)?.max(1), w.dims2()?);
    let bytes = (rows * k + n * k + n + rows * n) * x.dtype().size_in_bytes();
    candle_core::op_stats::record_op("matmul", "bf16+bias+gelu", bytes, 2 * rows * n * k);
    Ok(Some(y))
}

// ---------------------------------------------------------------------------------------------
// Training epilogue: a post-LN block's end under autocast

/// The widest row of the training add-norm kernels (`DISTILL_TRAIN_NORM_COLS`: BERT-large's 1,024).
const MAX_TRAIN_NORM_COLS: usize = 1024;

/// (x, residual, params [3, cols]) -> LN(dropout(x + bias) + residual) w + shift per row, with
/// params = (the linear layer's bias, the norm's weight, its shift): training under autocast, x
/// the bf16 product (f32 too on the CPU), residual and out f32, math in f32; dropout (`p`, `seed`)
/// with the mask [`dropout`] draws over x's [rows, cols]. The backward recomputes the pre-norm
/// sums from x and the residual (nothing stored but the output).
pub(super) struct AddNormTrain {
    pub(super) eps: f32,
    pub(super) seed: u64,
    pub(super) p: f32,
}

/// An `AddNormTrain`'s operands as f32: (x widened, residual, bias/weight/bias params, cols).
type Operands<'a> = (std::borrow::Cow<'a, [f32]>, &'a [f32], &'a [f32], usize);

impl AddNormTrain {
    /// The pre-norm sums dropout(x + bias) + residual, f32.
    fn sums(&self, x: &[f32], r: &[f32], bias: &[f32]) -> Vec<f32> {
        let cols = bias.len();
        x.par_iter()
            .zip(r.par_iter())
            .enumerate()
            .map(|(i, (x, r))| (x + bias[i % cols]) * kept(self.seed, self.p, i) + r)
            .collect()
    }

    /// The operands as f32 (x widened), checked: (x, residual, params, cols).
    fn operands<'a>(
        &self,
        (s1, l1): (&'a CpuStorage, &Layout),
        (s2, l2): (&'a CpuStorage, &Layout),
        (s3, l3): (&'a CpuStorage, &Layout),
        op: &str,
    ) -> Result<Operands<'a>> {
        let cols = last_dim(l1);
        let (x, r) = (widened(s1, l1, op)?, slice(s2, l2, op)?);
        same_len(&x, r, op)?;
        Ok((x, r, vector(s3, l3, 3 * cols, op)?, cols))
    }
}

impl CustomOp3 for AddNormTrain {
    fn name(&self) -> &'static str {
        "distill-add-norm-train"
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
        let (x, r, p, cols) = self.operands((s1, l1), (s2, l2), (s3, l3), self.name())?;
        let (w, shift) = (&p[cols..2 * cols], &p[2 * cols..]);
        let y = map_rows(&self.sums(&x, r, &p[..cols]), cols, |y, v| {
            let (mean, rstd) = moments(v, self.eps);
            for (i, (y, v)) in y.iter_mut().zip(v).enumerate() {
                *y = (v - mean) * rstd * w[i] + shift[i];
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
        if l1.shape() != l2.shape() || l3.shape().elem_count() != 3 * last_dim(l1) {
            candle_core::bail!("{}: {:?}, {:?}, {:?}", self.name(), l1.dims(), l2.dims(), l3.dims());
        }
        cuda::add_norm_train((s1, l1), (s2, l2), (s3, l3), self.eps, self.seed, self.p)
    }

    /// One kernel for the residual's gradient and the three column sums (the linear bias, the
    /// norm's weight and shift), one for the product's gradient (the mask, in x's dtype).
    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = residual.elem_count();
        let op = AddNormTrainGrad { eps: self.eps, seed: self.seed, p: self.p, grad: grad.contiguous()? };
        let out = x.contiguous()?.apply_op3_no_bwd(&residual.contiguous()?, &params.contiguous()?, &op)?;
        let dres = out.narrow(0, 0, n)?.reshape(residual.shape())?;
        let dparams = out.narrow(0, n, params.elem_count())?;
        let dx = dres.apply_op1_no_bwd(&DropoutTo { seed: self.seed, p: self.p, dtype: x.dtype() })?;
        Ok((Some(dx), Some(dres), Some(dparams)))
    }
}

/// The backward of [`AddNormTrain`]: (x, residual, params) -> f32 [rows cols + 3 cols]: the
/// residual's gradient ds (the norm's input gradient), then the column sums (the linear bias's
/// Σ ds·mask, the weight's Σ g x̂, the shift's Σ g), from the output's gradient `grad`.
pub(super) struct AddNormTrainGrad {
    pub(super) eps: f32,
    pub(super) seed: u64,
    pub(super) p: f32,
    pub(super) grad: Tensor,
}

impl CustomOp3 for AddNormTrainGrad {
    fn name(&self) -> &'static str {
        "distill-add-norm-train-grad"
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
        let fwd = AddNormTrain { eps: self.eps, seed: self.seed, p: self.p };
        let (x, r, p, cols) = fwd.operands((s1, l1), (s2, l2), (s3, l3), self.name())?;
        let g = f32_data(&self.grad)?;
        same_len(&x, &g, self.name())?;
        let w = &p[cols..2 * cols];
        let sums = fwd.sums(&x, r, &p[..cols]);
        let xhat = map_rows(&sums, cols, |y, v| {
            let (mean, rstd) = moments(v, self.eps);
            y.iter_mut().zip(v).for_each(|(y, v)| *y = (v - mean) * rstd);
        });
        let rstd: Vec<f32> = sums.par_chunks(cols).map(|v| moments(v, self.eps).1).collect();
        let mut out = map_rows2(&xhat, &g, cols, |d, xh, g| {
            let n = cols as f32;
            let g_mean = g.iter().zip(w).map(|(g, w)| g * w).sum::<f32>() / n;
            let gx_mean = g.iter().zip(w).zip(xh).map(|((g, w), x)| g * w * x).sum::<f32>() / n;
            for (i, d) in d.iter_mut().enumerate() {
                *d = g[i] * w[i] - g_mean - xh[i] * gx_mean;
            }
        });
        out.par_chunks_mut(cols).zip(rstd.par_iter()).for_each(|(d, r)| d.iter_mut().for_each(|d| *d *= r));
        let mut col = vec![0f32; 3 * cols];
        for (i, ((d, xh), g)) in out.iter().zip(&xhat).zip(g.iter()).enumerate() {
            let c = i % cols;
            col[c] += d * kept(self.seed, self.p, i);
            col[cols + c] += g * xh;
            col[2 * cols + c] += g;
        }
        out.extend(col);
        let len = out.len();
        Ok((CpuStorage::F32(out), len.into()))
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
        if l1.shape() != l2.shape() || l3.shape().elem_count() != 3 * last_dim(l1) {
            candle_core::bail!("{}: {:?}, {:?}, {:?}", self.name(), l1.dims(), l2.dims(), l3.dims());
        }
        cuda::add_norm_train_grad((s1, l1), (s2, l2), (s3, l3), &self.grad, self.eps, self.seed, self.p)
    }
}

/// Dropout's mask (`seed`, `p`) on an f32 gradient, out in `dtype` (bf16: the product's gradient).
pub(super) struct DropoutTo {
    pub(super) seed: u64,
    pub(super) p: f32,
    pub(super) dtype: DType,
}

impl CustomOp1 for DropoutTo {
    fn name(&self) -> &'static str {
        "distill-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let y: Vec<f32> = x.par_iter().enumerate().map(|(i, x)| x * kept(self.seed, self.p, i)).collect();
        Ok((
            if self.dtype == DType::BF16 { narrowed(y, &CpuStorage::BF16(vec![])) } else { CpuStorage::F32(y) },
            l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.dtype != DType::BF16 {
            candle_core::bail!("{}: bf16 out only on CUDA", self.name());
        }
        cuda::dropout_bf16(s, l, self.seed, self.p)
    }
}

/// Whether [`add_norm_for_training`] runs its kernels for a product `x` and the `residual` stream:
/// a graph kept, bf16 autocast (x bf16, the residual f32), rows of at most 1,024, the `layer_norm`
/// family on for the device.
pub fn add_norm_for_training_on(x: &Tensor, residual: &Tensor) -> bool {
    x.dtype() == DType::BF16
        && residual.dtype() == DType::F32
        && x.dims() == residual.dims()
        && x.dim(D::Minus1).is_ok_and(|c| c <= MAX_TRAIN_NORM_COLS)
        && crate::layers::grad_enabled()
        && crate::layers::compute_dtype(DType::F32) == DType::BF16
        && unproven_on(residual, Unproven::LayerNorm)
}

/// A post-LN block's end in training under autocast, one kernel each way: LN(dropout(x + bias) +
/// residual) w + shift with `x` a linear layer's bf16 product without its `bias`, the residual
/// stream f32, out f32; `dropout` (p, seed) with [`dropout`]'s mask. Where the bias add (with
/// the cast to f32), the dropout, the residual add and the norm were four passes forward (and
/// the norm's input kept), and their gradients five back, the backward is one kernel for the
/// residual's gradient and the column sums of the bias, weight and shift, and one for the
/// product's gradient in bf16. Call where [`add_norm_for_training_on`] holds.
// Allowed: the operands of the fused op as its CUDA kernel takes them.
#[allow(clippy::too_many_arguments)]
pub fn add_norm_for_training(
    x: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
    w: &Tensor,
    shift: Option<&Tensor>,
    eps: f64,
    dropout: Option<(f64, u64)>,
) -> Result<Tensor> {
    if !add_norm_for_training_on(x, residual) || w.elem_count() != x.dim(D::Minus1)? {
        candle_core::bail!(
            "add norm for training: does not apply to a product {:?} {:?} and a residual {:?} {:?}",
            x.dtype(),
            x.dims(),
            residual.dtype(),
            residual.dims()
        );
    }
    let params = norm_params(bias, w, shift, x.dim(D::Minus1)?, x.device())?;
    let (p, seed) = dropout.filter(|(p, _)| *p > 0.0).unwrap_or((0.0, 0));
    let op = AddNormTrain { eps: eps as f32, seed, p: p as f32 };
    x.contiguous()?.apply_op3(&residual.contiguous()?, &params, op)
}
