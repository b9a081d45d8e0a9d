//! Attention, flash-style (kernels.cu's `flash_*`): for scoring in bf16 and for training under
//! autocast (with its backward and attention dropout), the ops and their exact CPU twins.

use super::*;
use launch::MAX_DEBERTA_LEN;

/// softmax(q kᵀ · scale + key bias) v over (q, k, v) [B, H, L, D] bf16, out [B, L, H D] bf16 (heads
/// merged). The key bias [B, 1, 1, L] (f32) and the window are the op's own; no backward.
pub(super) struct FlashAttention {
    pub(super) bias: Tensor,
    pub(super) scale: f32,
    pub(super) window: Option<usize>,
}

fn attention_dims(q: &Layout, k: &Layout, v: &Layout, op: &str) -> Result<[usize; 4]> {
    match q.dims() {
        &[b, h, l, d] if k.dims() == q.dims() && v.dims() == q.dims() => Ok([b, h, l, d]),
        dims => {
            candle_core::bail!("{op}: q {dims:?}, k {:?}, v {:?} (expected three [B, H, L, D])", k.dims(), v.dims())
        }
    }
}

/// The exact attention of the flash kernels (softmax in f32) over q, k, v [B, H, L, D] (bf16
/// values, widened), key bias [B, L]; out [B, L, H D] in bf16.
fn flash_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
    [b, h, l, d]: [usize; 4],
    scale: f32,
    window: Option<usize>,
) -> Vec<half::bf16> {
    let mut out = vec![half::bf16::ZERO; b * l * h * d];
    // One (batch, query) row of H D outputs at a time.
    out.par_chunks_mut(h * d).enumerate().for_each(|(row, out)| {
        let (batch, i) = (row / l, row % l);
        let mut p = vec![0f32; l];
        for head in 0..h {
            let base = (batch * h + head) * l * d;
            let qi = &q[base + i * d..base + (i + 1) * d];
            for (j, p) in p.iter_mut().enumerate() {
                let near = window.is_none_or(|w| i.abs_diff(j) <= w) && bias[batch * l + j] > MASKED;
                let kj = &k[base + j * d..base + (j + 1) * d];
                let dot: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                *p = if near { dot * scale + bias[batch * l + j] } else { f32::NEG_INFINITY };
            }
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let max = if max == f32::NEG_INFINITY { 0.0 } else { max };
            p.iter_mut().for_each(|p| *p = (*p - max).exp());
            let sum: f32 = p.iter().sum();
            for c in 0..d {
                let o: f32 = p.iter().enumerate().map(|(j, p)| p * v[base + j * d + c]).sum();
                out[head * d + c] = half::bf16::from_f32(if sum > 0.0 { o / sum } else { 0.0 });
            }
        }
    });
    out
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "distill-flash-attention"
    }

    /// The reference: exact softmax in f32 from the bf16 inputs.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [b, h, l, d] = attention_dims(l1, l2, l3, self.name())?;
        let read = |s: &CpuStorage, lay: &Layout| -> Result<Vec<f32>> {
            let data = s.as_slice::<half::bf16>()?;
            match lay.contiguous_offsets() {
                Some((x, y)) => Ok(data[x..y].iter().map(|v| v.to_f32()).collect()),
                None => candle_core::bail!("{}: an input is not contiguous", self.name()),
            }
        };
        let (q, k, v) = (read(s1, l1)?, read(s2, l2)?, read(s3, l3)?);
        let bias = f32_data(&self.bias)?;
        let out = flash_cpu(&q, &k, &v, &bias, [b, h, l, d], self.scale, self.window);
        Ok((CpuStorage::BF16(out), (b, l, h * d).into()))
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
        let dims = attention_dims(l1, l2, l3, self.name())?;
        cuda::flash_attention((s1, l1), (s2, l2), (s3, l3), &self.bias, dims, self.scale, self.window)
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        candle_core::bail!("{}: attention for scoring has no backward", self.name())
    }
}

/// The dropout scale of attention probability (i, j) of head `bh`: 0 or 1 / (1 - p) as the
/// kernels draw it (the mask [`dropout`] draws over materialised [B, H, L, L] probabilities).
fn keep_scale(seed: u64, p: f32, bh: usize, i: usize, j: usize, l: usize) -> f32 {
    if p <= 0.0 {
        1.0
    } else if uniform(seed, ((bh * l + i) * l + j) as u64) >= p {
        1.0 / (1.0 - p)
    } else {
        0.0
    }
}

/// One (batch, head)'s attention probabilities on the CPU, exact f32: P [L, L] (0 where masked)
/// and the rows' log-sum-exp (`lse`; given, P is recomputed from it as the backward does).
fn attention_probs(
    q: &[f32],
    k: &[f32],
    bias: &[f32],
    a: &launch_shape::Attention,
    bh: usize,
    lse: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let (l, d, batch) = (a.l, a.d, bh / a.h);
    let base = bh * l * d;
    let mut p = vec![0f32; l * l];
    let mut out_lse = vec![f32::INFINITY; l];
    for i in 0..l {
        let qi = &q[base + i * d..base + (i + 1) * d];
        let row = &mut p[i * l..(i + 1) * l];
        for (j, s) in row.iter_mut().enumerate() {
            let near = a.window.is_none_or(|w| i.abs_diff(j) <= w) && bias[batch * l + j] > MASKED;
            let dot: f32 = qi.iter().zip(&k[base + j * d..base + (j + 1) * d]).map(|(x, y)| x * y).sum();
            *s = if near { dot * a.scale + bias[batch * l + j] } else { f32::NEG_INFINITY };
        }
        let lse_i = match lse {
            Some(given) => given[bh * l + i],
            None => {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if m == f32::NEG_INFINITY {
                    f32::INFINITY
                } else {
                    m + row.iter().map(|s| (s - m).exp()).sum::<f32>().ln()
                }
            }
        };
        row.iter_mut().for_each(|s| *s = if *s == f32::NEG_INFINITY { 0.0 } else { (*s - lse_i).exp() });
        out_lse[i] = lse_i;
    }
    (p, out_lse)
}

/// Training attention (autocast): (q, k, v [B, H, L, D] f32) -> packed [B L H D + B H L]: the
/// context [B, L, H, D] then the rows' log-sum-exp [B, H, L] (for the backward). Attention
/// dropout inside (`p`, `seed`).
pub(super) struct FlashTrain {
    pub(super) bias: Tensor,
    pub(super) shape: launch_shape::Attention,
}

/// The training attention on the CPU, exact f32 from q, k, v [B, H, L, D]: the context
/// [B, L, H, D] and the rows' log-sum-exp [B, H, L].
fn train_cpu(q: &[f32], k: &[f32], v: &[f32], bias: &[f32], a: &launch_shape::Attention) -> (Vec<f32>, Vec<f32>) {
    let (n, nh) = (a.b * a.h * a.l * a.d, a.b * a.h);
    let per: Vec<(Vec<f32>, Vec<f32>)> = (0..nh)
        .into_par_iter()
        .map(|bh| {
            let (p, lse) = attention_probs(q, k, bias, a, bh, None);
            let mut o = vec![0f32; a.l * a.d];
            for i in 0..a.l {
                for j in 0..a.l {
                    let w = p[i * a.l + j] * keep_scale(a.seed, a.p, bh, i, j, a.l);
                    if w != 0.0 {
                        let vj = &v[(bh * a.l + j) * a.d..(bh * a.l + j + 1) * a.d];
                        o[i * a.d..(i + 1) * a.d].iter_mut().zip(vj).for_each(|(o, v)| *o += w * v);
                    }
                }
            }
            (o, lse)
        })
        .collect();
    let (mut out, mut lses) = (vec![0f32; n], vec![0f32; nh * a.l]);
    for (bh, (o, lse)) in per.into_iter().enumerate() {
        let (batch, head) = (bh / a.h, bh % a.h);
        for i in 0..a.l {
            let at = ((batch * a.l + i) * a.h + head) * a.d;
            out[at..at + a.d].copy_from_slice(&o[i * a.d..(i + 1) * a.d]);
        }
        lses[bh * a.l..(bh + 1) * a.l].copy_from_slice(&lse);
    }
    (out, lses)
}

impl CustomOp3 for FlashTrain {
    fn name(&self) -> &'static str {
        "distill-flash-attention-train"
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
        let a = self.shape;
        attention_dims(l1, l2, l3, self.name())?;
        let (q, k, v) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let (mut out, lse) = train_cpu(q, k, v, &f32_data(&self.bias)?, &a);
        out.extend(lse);
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
        attention_dims(l1, l2, l3, self.name())?;
        cuda::flash_train((s1, l1), (s2, l2), (s3, l3), &self.bias, self.shape)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let a = self.shape;
        let n = a.b * a.h * a.l * a.d;
        let dout = grad.narrow(0, 0, n)?.contiguous()?;
        let op = FlashTrainGrad { bias: self.bias.clone(), packed: res.contiguous()?, dout, shape: a };
        let g = q.apply_op3_no_bwd(k, v, &op)?;
        // dQ's kernel: S, dP, dS K; dK/dV's: Sᵀ, Pᵀ dO, dPᵀ, dSᵀ Q.
        count_products(op.name(), a.b * a.h, a.l, a.d, 7, a.window);
        Ok((Some(g.get(0)?), Some(g.get(1)?), Some(g.get(2)?)))
    }
}

/// The training attention's backward: (q, k, v) -> [3, B, H, L, D] = dq, dk, dv, from the
/// forward's packed output and the context's gradient `dout` [B L H D].
pub(super) struct FlashTrainGrad {
    pub(super) bias: Tensor,
    pub(super) packed: Tensor,
    pub(super) dout: Tensor,
    pub(super) shape: launch_shape::Attention,
}

/// The training attention's backward on the CPU, exact f32: (q, k, v [B, H, L, D]), the context
/// `o` and its gradient `dout` [B, L, H, D], the log-sum-exp [B, H, L] -> [dq, dk, dv] ([3, B, H,
/// L, D]).
fn train_grad_cpu(
    [q, k, v]: [&[f32]; 3],
    bias: &[f32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    a: &launch_shape::Attention,
) -> Vec<f32> {
    let (l, d, n) = (a.l, a.d, a.b * a.h * a.l * a.d);
    let per: Vec<[Vec<f32>; 3]> = (0..a.b * a.h)
        .into_par_iter()
        .map(|bh| {
            let (batch, head) = (bh / a.h, bh % a.h);
            let (p, _) = attention_probs(q, k, bias, a, bh, Some(lse));
            let row = |t: &[f32], i: usize| -> Vec<f32> {
                let at = ((batch * l + i) * a.h + head) * d;
                t[at..at + d].to_vec()
            };
            let (mut dq, mut dk, mut dv) = (vec![0f32; l * d], vec![0f32; l * d], vec![0f32; l * d]);
            for i in 0..l {
                let (doi, oi) = (row(dout, i), row(o, i));
                let delta: f32 = doi.iter().zip(&oi).map(|(x, y)| x * y).sum();
                for j in 0..l {
                    let pij = p[i * l + j];
                    if pij == 0.0 {
                        continue;
                    }
                    let z = keep_scale(a.seed, a.p, bh, i, j, l);
                    let vj = &v[(bh * l + j) * d..(bh * l + j + 1) * d];
                    let dp = doi.iter().zip(vj).map(|(x, y)| x * y).sum::<f32>() * z;
                    let ds = pij * (dp - delta) * a.scale;
                    let (qi, kj) =
                        (&q[(bh * l + i) * d..(bh * l + i + 1) * d], &k[(bh * l + j) * d..(bh * l + j + 1) * d]);
                    for c in 0..d {
                        dq[i * d + c] += ds * kj[c];
                        dk[j * d + c] += ds * qi[c];
                        dv[j * d + c] += pij * z * doi[c];
                    }
                }
            }
            [dq, dk, dv]
        })
        .collect();
    let mut out = vec![0f32; 3 * n];
    for (bh, parts) in per.into_iter().enumerate() {
        for (which, part) in parts.into_iter().enumerate() {
            out[which * n + bh * l * d..which * n + (bh + 1) * l * d].copy_from_slice(&part);
        }
    }
    out
}

impl CustomOp3 for FlashTrainGrad {
    fn name(&self) -> &'static str {
        "distill-flash-attention-train-grad"
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
        let a = self.shape;
        attention_dims(l1, l2, l3, self.name())?;
        let (q, k, v) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let (bias, packed, dout) = (f32_data(&self.bias)?, f32_data(&self.packed)?, f32_data(&self.dout)?);
        let (o, lse) = packed.split_at(a.b * a.h * a.l * a.d);
        let out = train_grad_cpu([q, k, v], &bias, o, lse, &dout, &a);
        Ok((CpuStorage::F32(out), (3, a.b, a.h, a.l, a.d).into()))
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
        attention_dims(l1, l2, l3, self.name())?;
        cuda::flash_train_grad((s1, l1), (s2, l2), (s3, l3), &self.bias, &self.packed, &self.dout, self.shape)
    }
}

/// Attention in training under autocast, flash-style where it applies: f32 q, k, v [B, H, L, D]
/// with D 32 or 64 (bf16 products inside, as autocast's matmuls), a key mask `bias` [B, 1, 1, L],
/// bf16 autocast on this thread, the fused kernels on for the device. Returns the context
/// [B, L, H D] (f32) with its backward (dq, dk, dv: two kernels, the probabilities recomputed),
/// attention dropout inside (`dropout`: (p, seed), the mask [`dropout`] would draw over the
/// materialised probabilities with that seed). None where it does not apply.
pub fn flash_attention_for_training(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    window: Option<usize>,
    dropout: Option<(f64, u64)>,
) -> Result<Option<Tensor>> {
    let autocast = crate::layers::compute_dtype(DType::F32) == DType::BF16;
    let fits = match q.dims() {
        &[b, _, l, d] => FLASH_HEAD_DIMS.contains(&d) && bias.dims() == [b, 1, 1, l],
        _ => false,
    };
    if !autocast
        || !fits
        || !unproven_on(q, Unproven::AttentionTraining)
        || [q, k, v].iter().any(|t| t.dtype() != DType::F32)
    {
        return Ok(None);
    }
    let (b, h, l, d) = q.dims4()?;
    let (p, seed) = dropout.filter(|(p, _)| *p > 0.0).unwrap_or((0.0, 0));
    let shape = launch_shape::Attention { b, h, l, d, scale: scale as f32, window, seed, p: p as f32 };
    let op = FlashTrain { bias: bias.to_dtype(DType::F32)?.contiguous()?, shape };
    let name = op.name();
    let packed = q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
    count_products(name, b * h, l, d, 2, window);
    Ok(Some(packed.narrow(0, 0, b * l * h * d)?.reshape((b, l, h * d))?))
}

/// Counts the matrix products of a flash-attention op named `name` (`products` per pair of a
/// block of 64 queries and a tile of 32 keys that the kernels compute, each [64 x D] by [D x 32],
/// for each of `bh` batch x heads; with a window only the pairs within it) with its operation, so
/// that op-stats' bound has their flops.
fn count_products(name: &'static str, bh: usize, l: usize, d: usize, products: usize, window: Option<usize>) {
    let pairs = launch_shape::attention_tile_pairs(l, window);
    candle_core::op_stats::record_flops("custom", name, 2 * products * bh * pairs * 64 * 32 * d);
}

/// A key bias at or below this masks the key out of the flash kernels' softmax entirely
/// (`DISTILL_MASKED` in kernels.cu; the masks are 0 or -1e9). A row with every key masked gives
/// zeros there, where the composite averages the masked values (such rows are padding).
const MASKED: f32 = -1.0e4;

/// Head sizes with a flash-attention kernel.
const FLASH_HEAD_DIMS: [usize; 2] = [32, 64];

/// Attention for scoring, flash-style where it applies: no autograd graph being kept
/// ([`crate::layers::no_grad`]), bf16 q, k, v [B, H, L, D] with D 32 or 64, a key mask `bias`
/// [B, 1, 1, L] (0 to attend, very negative not to), the fused kernels on for the device; then
/// the context [B, L, H D] in bf16, one kernel, no [B, H, L, L] scores in memory. `window`:
/// keys within that distance only (ModernBERT's local layers). None where it does not apply (the
/// caller runs the composite).
pub fn flash_attention_for_scoring(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    let on = unproven_on(q, Unproven::AttentionScoring);
    let fits = match q.dims() {
        &[b, _, l, d] => FLASH_HEAD_DIMS.contains(&d) && bias.dims() == [b, 1, 1, l],
        _ => false,
    };
    if !on || !fits || crate::layers::grad_enabled() || [q, k, v].iter().any(|t| t.dtype() != DType::BF16) {
        return Ok(None);
    }
    let op = FlashAttention { bias: bias.to_dtype(DType::F32)?.contiguous()?, scale: scale as f32, window };
    let out = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    let (b, h, l, d) = q.dims4()?;
    count_products(op.name(), b * h, l, d, 2, window);
    Ok(Some(out))
}

/// softmax(q kᵀ · scale + key bias) v with q, k, v read from one linear layer's product
/// [B, L, 3 H D] (query, key, value side by side, as BERT's joined projection) plus its bias
/// [3 H D] f32, added in f32 and rounded to bf16 as each value is read (what a bf16 bias add before
/// the split gives). With `rope` ([2, L, D] f32: cos, sin), q and k are rotated after that, in f32
/// from the rounded values and rounded again (what the bf16 product, then the rotation in f32
/// back to bf16 gives: ModernBERT). Out [B, L, H D] bf16; no backward.
pub(super) struct FlashAttentionPacked {
    pub(super) bias: Tensor,
    pub(super) heads: usize,
    pub(super) scale: f32,
    pub(super) window: Option<usize>,
    pub(super) rope: Option<Tensor>,
}

impl FlashAttentionPacked {
    fn dims(&self, qkv: &Layout, qkv_bias: &Layout) -> Result<[usize; 4]> {
        match qkv.dims() {
            &[b, l, n] if n % (3 * self.heads) == 0 && qkv_bias.shape().elem_count() == n => {
                Ok([b, self.heads, l, n / (3 * self.heads)])
            }
            dims => candle_core::bail!(
                "distill-flash-attention-packed: qkv {dims:?} and a bias of {:?} for {} heads",
                qkv_bias.dims(),
                self.heads
            ),
        }
    }
}

/// A rotary table [2, L, D] (cos, sin) as f32, checked against the length and head size.
fn rope_table(rope: &Tensor, l: usize, d: usize, op: &str) -> Result<Vec<f32>> {
    if rope.dims() != [2, l, d] {
        candle_core::bail!("{op}: a rotary table of {:?} for length {l}, head size {d}", rope.dims());
    }
    f32_data(rope)
}

/// Which way [`rotate_qk`] goes.
#[derive(Clone, Copy, PartialEq)]
enum Rotation {
    /// r_c = x_c cos_c + rotate_half(x)_c sin_c (rotate_half(x) = [-x2, x1]), rounded to bf16 as
    /// the kernels' tiles are.
    Forward,
    /// Its adjoint on a gradient: dx_c = dr_c cos_c + (c < D/2 ? dr_{c+D/2} sin_{c+D/2} :
    /// -dr_{c-D/2} sin_{c-D/2}), in f32.
    Backward,
}

/// q and k (the first two of `split`, [B, H, L, D] each) rotated by the table `rope` [2, L, D],
/// or a rotation's gradient taken back.
fn rotate_qk(split: &mut [Vec<f32>], rope: &[f32], l: usize, d: usize, way: Rotation) {
    let (cos, sin) = rope.split_at(l * d);
    let h = d / 2;
    for x in &mut split[..2] {
        x.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
            let pos = i % l;
            let (c, s) = (&cos[pos * d..(pos + 1) * d], &sin[pos * d..(pos + 1) * d]);
            let out: Vec<f32> = (0..d)
                .map(|j| match way {
                    Rotation::Forward => {
                        let other = if j < h { -row[j + h] } else { row[j - h] };
                        half::bf16::from_f32(row[j] * c[j] + other * s[j]).to_f32()
                    }
                    Rotation::Backward => {
                        let other = if j < h { row[j + h] * s[j + h] } else { -row[j - h] * s[j - h] };
                        row[j] * c[j] + other
                    }
                })
                .collect();
            row.copy_from_slice(&out);
        });
    }
}

/// A joined query/key/value product [B, L, 3, H, D] split into q, k, v [B, H, L, D] each, its bias
/// [3 H D] added and each value rounded to bf16 (as the kernels read it).
fn split_joined(qkv: &[f32], qkv_bias: &[f32], [b, h, l, d]: [usize; 4]) -> [Vec<f32>; 3] {
    let mut split = [0; 3].map(|_| vec![0f32; b * h * l * d]);
    for (i, x) in qkv.iter().enumerate() {
        let (row, col) = (i / (3 * h * d), i % (3 * h * d));
        let (batch, pos) = (row / l, row % l);
        let (which, head, c) = (col / (h * d), col % (h * d) / d, col % d);
        split[which][((batch * h + head) * l + pos) * d + c] = half::bf16::from_f32(x + qkv_bias[col]).to_f32();
    }
    split
}

impl CustomOp2 for FlashAttentionPacked {
    fn name(&self) -> &'static str {
        "distill-flash-attention-packed"
    }

    /// The reference: the bias added and rounded to bf16, the heads split, then [`flash_cpu`].
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let [b, h, l, d] = self.dims(l1, l2)?;
        let qkv = widened(s1, l1, self.name())?;
        let qkv_bias = vector(s2, l2, 3 * h * d, self.name())?;
        let mut split = split_joined(&qkv, qkv_bias, [b, h, l, d]);
        if let Some(rope) = &self.rope {
            let rope = rope_table(rope, l, d, self.name())?;
            rotate_qk(&mut split, &rope, l, d, Rotation::Forward);
        }
        let bias = f32_data(&self.bias)?;
        let out = flash_cpu(&split[0], &split[1], &split[2], &bias, [b, h, l, d], self.scale, self.window);
        Ok((CpuStorage::BF16(out), (b, l, h * d).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.dims(l1, l2)?;
        cuda::flash_attention_packed((s1, l1), (s2, l2), &self.bias, self.rope.as_ref(), dims, self.scale, self.window)
    }
}

/// Whether [`flash_attention_for_scoring_packed`] runs for activations like `x` with heads of
/// `head_dim`: no graph kept, bf16, a head size with a kernel, the family on for the device.
pub fn flash_scoring_packed_on(x: &Tensor, head_dim: usize) -> bool {
    x.dtype() == DType::BF16
        && FLASH_HEAD_DIMS.contains(&head_dim)
        && !crate::layers::grad_enabled()
        && unproven_on(x, Unproven::AttentionScoring)
}

/// Attention for scoring straight from a joined query/key/value product `qkv` [B, L, 3 H D]
/// (bf16, without its bias) and that bias [3 H D]: one kernel, no bias pass, no head-split
/// copies, no [B, H, L, L] scores; key mask `bias` [B, 1, 1, L]. `rope` [2, L, D] f32 (cos, sin):
/// q and k rotated as they load (ModernBERT), no rotation passes. Out [B, L, H D] bf16. Call
/// where [`flash_scoring_packed_on`] holds (an error otherwise).
pub fn flash_attention_for_scoring_packed(
    qkv: &Tensor,
    qkv_bias: Option<&Tensor>,
    bias: &Tensor,
    heads: usize,
    scale: f64,
    window: Option<usize>,
    rope: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, l, n) = qkv.dims3()?;
    if !flash_scoring_packed_on(qkv, n / (3 * heads).max(1)) || bias.dims() != [b, 1, 1, l] {
        candle_core::bail!(
            "flash attention (packed): does not apply to {:?} with a mask of {:?}",
            qkv.dims(),
            bias.dims()
        );
    }
    let qkv_bias = match qkv_bias {
        Some(t) => t.to_dtype(DType::F32)?.contiguous()?,
        None => Tensor::zeros(n, DType::F32, qkv.device())?,
    };
    let rope = rope.map(|r| r.to_dtype(DType::F32)?.contiguous()).transpose()?;
    let op = FlashAttentionPacked {
        bias: bias.to_dtype(DType::F32)?.contiguous()?,
        heads,
        scale: scale as f32,
        window,
        rope,
    };
    let out = qkv.contiguous()?.apply_op2_no_bwd(&qkv_bias, &op)?;
    count_products(op.name(), b * heads, l, n / (3 * heads), 2, window);
    Ok(out)
}

/// Training attention under autocast straight from a joined query/key/value product: (qkv
/// [B, L, 3 H D] bf16, its bias [3 H D] f32) -> bf16 [B L H D + 2 B H L]: the context
/// [B, L, H, D] in bf16 (the output projection's input as it is), then the rows' log-sum-exp
/// [B, H, L] for the backward, as f32 bits in two bf16 slots each (low half first). The bias is
/// added in f32 and rounded to bf16 as each value is read (a bf16 bias add before the split);
/// attention dropout inside. No bias pass, no head-split copies; the backward writes the joined
/// product's gradient (and the bias's, a column sum of it).
pub(super) struct FlashTrainPacked {
    pub(super) bias: Tensor,
    pub(super) shape: launch_shape::Attention,
    /// Whether the bias is the layer's (else zeros, and no gradient for it).
    pub(super) has_bias: bool,
    /// Rotary embeddings for q and k [2, L, D] (cos, sin; f32), or none.
    pub(super) rope: Option<Tensor>,
}

/// The [B, H, L, D] of a joined product `qkv` [B, L, 3 H D] with its bias [3 H D] for a training
/// attention of shape `a`.
fn joined_dims(a: &launch_shape::Attention, qkv: &Layout, qkv_bias: &Layout, op: &str) -> Result<[usize; 4]> {
    let n = 3 * a.h * a.d;
    if qkv.dims() != [a.b, a.l, n] || qkv_bias.shape().elem_count() != n {
        candle_core::bail!(
            "{op}: qkv {:?} with a bias of {:?} for [{}, {}, 3 x {} x {}]",
            qkv.dims(),
            qkv_bias.dims(),
            a.b,
            a.l,
            a.h,
            a.d
        );
    }
    Ok([a.b, a.h, a.l, a.d])
}

/// q, k, v (each [B, H, L, D], row-major) and the rotary table, if any.
type SplitQkv = ([Vec<f32>; 3], Option<Vec<f32>>);

/// q, k, v [B, H, L, D] of the operands (qkv, qkv_bias) of a packed training attention of shape
/// `a`, q and k rotated where `rope` is given; and the rotary table.
fn split_operands(
    a: &launch_shape::Attention,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    rope: Option<&Tensor>,
    op: &str,
) -> Result<SplitQkv> {
    let dims = joined_dims(a, l1, l2, op)?;
    let mut split = split_joined(&widened(s1, l1, op)?, vector(s2, l2, 3 * a.h * a.d, op)?, dims);
    let rope = rope.map(|r| rope_table(r, a.l, a.d, op)).transpose()?;
    if let Some(r) = &rope {
        rotate_qk(&mut split, r, a.l, a.d, Rotation::Forward);
    }
    Ok((split, rope))
}

/// The log-sum-exp rows as f32 bits in bf16 slots, two per value, low half first.
fn lse_to_slots(lse: &[f32]) -> impl Iterator<Item = half::bf16> + '_ {
    lse.iter().flat_map(|x| {
        let bits = x.to_bits();
        [half::bf16::from_bits(bits as u16), half::bf16::from_bits((bits >> 16) as u16)]
    })
}

/// The inverse of [`lse_to_slots`].
pub(super) fn lse_from_slots(slots: &[half::bf16]) -> Vec<f32> {
    slots.chunks_exact(2).map(|p| f32::from_bits(p[0].to_bits() as u32 | (p[1].to_bits() as u32) << 16)).collect()
}

impl CustomOp2 for FlashTrainPacked {
    fn name(&self) -> &'static str {
        "distill-flash-attention-train"
    }

    /// The reference: the bias added and rounded to bf16, the heads split, then [`train_cpu`].
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = self.shape;
        let ([q, k, v], _) = split_operands(&a, (s1, l1), (s2, l2), self.rope.as_ref(), self.name())?;
        let (o, lse) = train_cpu(&q, &k, &v, &f32_data(&self.bias)?, &a);
        let mut out: Vec<half::bf16> = o.into_iter().map(half::bf16::from_f32).collect();
        out.extend(lse_to_slots(&lse));
        let len = out.len();
        Ok((CpuStorage::BF16(out), len.into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        joined_dims(&self.shape, l1, l2, self.name())?;
        cuda::flash_train_packed((s1, l1), (s2, l2), &self.bias, self.rope.as_ref(), self.shape)
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        qkv_bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let a = self.shape;
        let dout = grad.narrow(0, 0, a.b * a.l * a.h * a.d)?.contiguous()?;
        let op = FlashTrainPackedGrad {
            bias: self.bias.clone(),
            packed: res.contiguous()?,
            dout,
            shape: a,
            rope: self.rope.clone(),
        };
        let dqkv = qkv.apply_op2_no_bwd(qkv_bias, &op)?;
        count_products(op.name(), a.b * a.h, a.l, a.d, 7, a.window);
        let dbias = if self.has_bias { Some(dqkv.apply_op1_no_bwd(&ColumnSum)?) } else { None };
        Ok((Some(dqkv), dbias))
    }
}

/// The backward of [`FlashTrainPacked`]: (qkv, qkv_bias) -> the joined product's gradient
/// [B, L, 3 H D] bf16, from the forward's output `packed` and the context's gradient `dout`
/// [B, L, H D] bf16.
pub(super) struct FlashTrainPackedGrad {
    pub(super) bias: Tensor,
    pub(super) packed: Tensor,
    pub(super) dout: Tensor,
    pub(super) shape: launch_shape::Attention,
    pub(super) rope: Option<Tensor>,
}

impl CustomOp2 for FlashTrainPackedGrad {
    fn name(&self) -> &'static str {
        "distill-flash-attention-train-grad"
    }

    /// The reference: [`train_grad_cpu`] on the split, its gradients joined and rounded to bf16.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = self.shape;
        let ([q, k, v], rope) = split_operands(&a, (s1, l1), (s2, l2), self.rope.as_ref(), self.name())?;
        let n = a.b * a.h * a.l * a.d;
        let packed: Vec<half::bf16> =
            candle_core::op_stats::uncounted(|| self.packed.flatten_all()?.to_dtype(DType::BF16)?.to_vec1())?;
        if packed.len() != n + 2 * a.b * a.h * a.l {
            candle_core::bail!("{}: a forward output of {} for {:?}", self.name(), packed.len(), l1.dims());
        }
        let o: Vec<f32> = packed[..n].iter().map(|x| x.to_f32()).collect();
        let lse = lse_from_slots(&packed[n..]);
        let g = train_grad_cpu([&q, &k, &v], &f32_data(&self.bias)?, &o, &lse, &f32_data(&self.dout)?, &a);
        let g = match &rope {
            Some(r) => {
                let mut parts: Vec<Vec<f32>> = g.chunks(n).map(|c| c.to_vec()).collect();
                rotate_qk(&mut parts, r, a.l, a.d, Rotation::Backward);
                parts.concat()
            }
            None => g,
        };
        let (h, l, d) = (a.h, a.l, a.d);
        let mut out = vec![half::bf16::ZERO; 3 * n];
        for (i, x) in g.iter().enumerate() {
            let (which, bh, pos, c) = (i / n, i % n / (l * d), i % (l * d) / d, i % d);
            let (batch, head) = (bh / h, bh % h);
            out[((batch * l + pos) * 3 + which) * h * d + head * d + c] = half::bf16::from_f32(*x);
        }
        Ok((CpuStorage::BF16(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        joined_dims(&self.shape, l1, l2, self.name())?;
        cuda::flash_train_packed_grad(
            (s1, l1),
            (s2, l2),
            &self.bias,
            self.rope.as_ref(),
            &self.packed,
            &self.dout,
            self.shape,
        )
    }
}

/// Whether [`flash_attention_for_training_packed`] runs for activations like `x` with heads of
/// `head_dim`: bf16 autocast on this thread, a head size with a kernel, the family on for the
/// device.
pub fn flash_training_packed_on(x: &Tensor, head_dim: usize) -> bool {
    crate::layers::compute_dtype(DType::F32) == DType::BF16
        && FLASH_HEAD_DIMS.contains(&head_dim)
        && unproven_on(x, Unproven::AttentionTraining)
}

/// Attention in training under autocast straight from a joined query/key/value product `qkv`
/// [B, L, 3 H D] (bf16, without its bias) and that bias [3 H D] (f32): softmax(q kᵀ · scale + key
/// mask) v with attention dropout (`dropout`: (p, seed), the mask [`crate::layers::dropout`]'s
/// kernel would draw over the materialised probabilities), the bias added as the values load.
/// With `rope` ([2, L, D] f32: cos, sin), q and k are rotated as they load (ModernBERT) and the
/// rotation is taken back on their gradients. Out [B, L, H D] bf16; its backward gives the
/// product's gradient in bf16 (two kernels, the probabilities recomputed) and the bias's (a
/// column sum). No bias pass, no head-split copies, no rotation passes either way. Call where
/// [`flash_training_packed_on`] holds (an error otherwise).
// Allowed: the operands of the fused op as its CUDA kernel takes them.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_for_training_packed(
    qkv: &Tensor,
    qkv_bias: Option<&Tensor>,
    bias: &Tensor,
    heads: usize,
    scale: f64,
    window: Option<usize>,
    dropout: Option<(f64, u64)>,
    rope: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, l, n) = qkv.dims3()?;
    let d = n / (3 * heads).max(1);
    if !flash_training_packed_on(qkv, d)
        || qkv.dtype() != DType::BF16
        || n != 3 * heads * d
        || bias.dims() != [b, 1, 1, l]
    {
        candle_core::bail!(
            "flash attention for training (packed): does not apply to {:?} ({:?}) with a mask of {:?}",
            qkv.dims(),
            qkv.dtype(),
            bias.dims()
        );
    }
    let (p, seed) = dropout.filter(|(p, _)| *p > 0.0).unwrap_or((0.0, 0));
    let shape = launch_shape::Attention { b, h: heads, l, d, scale: scale as f32, window, seed, p: p as f32 };
    let (qkv_bias, has_bias) = match qkv_bias {
        Some(t) => (t.to_dtype(DType::F32)?.contiguous()?, true),
        None => (Tensor::zeros(n, DType::F32, qkv.device())?, false),
    };
    let rope = rope.map(|r| r.to_dtype(DType::F32)?.contiguous()).transpose()?;
    let op = FlashTrainPacked { bias: bias.to_dtype(DType::F32)?.contiguous()?, shape, has_bias, rope };
    let name = op.name();
    let packed = qkv.contiguous()?.apply_op2(&qkv_bias, op)?;
    count_products(name, b * heads, l, d, 2, window);
    packed.narrow(0, 0, b * l * heads * d)?.reshape((b, l, heads * d))
}

/// DeBERTa's disentangled attention probabilities for scoring: (qk [B, H, Q, L] = q kᵀ, c2p
/// [B, H, Q, P] = q and the position keys, p2c [B, H, L, P] = k and the position queries, bf16)
/// -> softmax over j of (qk[i, j] + c2p[i, c2p_idx[i, j]] + p2c[j, p2c_idx[j, i]]) / scale +
/// mask[b, j], bf16 [B, H, Q, L]; the bucket indices [L, L] u32 (query row i of Q reads row i of
/// c2p_idx and column i of p2c_idx: the first rows), the key mask [B, L] f32. No backward.
#[derive(Clone)]
pub(super) struct DebertaProbs {
    pub(super) c2p_idx: Tensor,
    pub(super) p2c_idx: Tensor,
    pub(super) mask: Tensor,
    pub(super) scale: f32,
}

impl DebertaProbs {
    /// [bh, heads, q_rows, len, pos] from the operands' layouts.
    fn dims(&self, qk: &Layout, c2p: &Layout, p2c: &Layout) -> Result<[usize; 5]> {
        match (qk.dims(), c2p.dims(), p2c.dims(), self.mask.dims()) {
            (&[b, h, q, l], &[b2, h2, q2, p], &[b3, h3, l3, p3], &[b4, l4])
                if (b, h, q) == (b2, h2, q2) && (b, h, l, p) == (b3, h3, l3, p3) && (b, l) == (b4, l4) && q <= l =>
            {
                Ok([b * h, h, q, l, p])
            }
            _ => candle_core::bail!(
                "distill-deberta-probs: qk {:?}, c2p {:?}, p2c {:?}, mask {:?}",
                qk.dims(),
                c2p.dims(),
                p2c.dims(),
                self.mask.dims()
            ),
        }
    }
}

impl CustomOp3 for DebertaProbs {
    fn name(&self) -> &'static str {
        "distill-deberta-probs"
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
        let [bh, heads, q_rows, len, pos] = self.dims(l1, l2, l3)?;
        let (qk, c2p, p2c) =
            (widened(s1, l1, self.name())?, widened(s2, l2, self.name())?, widened(s3, l3, self.name())?);
        let index =
            |t: &Tensor| -> Result<Vec<u32>> { candle_core::op_stats::uncounted(|| t.flatten_all()?.to_vec1::<u32>()) };
        let (ci, pi, mask) = (index(&self.c2p_idx)?, index(&self.p2c_idx)?, f32_data(&self.mask)?);
        if ci.len() != len * len || pi.len() != len * len || ci.iter().chain(&pi).any(|&x| x as usize >= pos) {
            candle_core::bail!(
                "{}: indices of {} and {} for {len} keys and {pos} positions",
                self.name(),
                ci.len(),
                pi.len()
            );
        }
        let inv = 1.0 / self.scale;
        let mut out = Vec::with_capacity(bh * q_rows * len);
        for row in 0..bh * q_rows {
            let (b_h, i) = (row / q_rows, row % q_rows);
            let m = &mask[(b_h / heads) * len..(b_h / heads + 1) * len];
            let s: Vec<f32> = (0..len)
                .map(|j| {
                    let c = c2p[row * pos + ci[i * len + j] as usize];
                    let p = p2c[(b_h * len + j) * pos + pi[j * len + i] as usize];
                    (qk[row * len + j] + c + p) * inv + m[j]
                })
                .collect();
            let top = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let e: Vec<f32> = s.iter().map(|x| (x - top).exp()).collect();
            let sum: f32 = e.iter().sum();
            out.extend(e.iter().map(|x| half::bf16::from_f32(x / sum)));
        }
        Ok((CpuStorage::BF16(out), l1.shape().clone()))
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
        let dims = self.dims(l1, l2, l3)?;
        cuda::deberta_probs(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            &self.c2p_idx,
            &self.p2c_idx,
            &self.mask,
            dims,
            1.0 / self.scale,
        )
    }
}

/// Whether [`deberta_probs_for_scoring`] runs for queries like `q`: no graph kept, bf16, the
/// `attention_scoring` family on for the device.
pub fn deberta_probs_on(q: &Tensor) -> bool {
    q.dtype() == DType::BF16 && !crate::layers::grad_enabled() && unproven_on(q, Unproven::AttentionScoring)
}

/// DeBERTa's attention probabilities for scoring in one kernel where it applies (no graph kept,
/// bf16 products, the `attention_scoring` family on for the device): softmax over the keys of
/// (qk + the c2p term gathered by `c2p_idx` + the p2c term gathered by `p2c_idx`, transposed) /
/// `scale` + the key mask, with `qk` [B, H, Q, L] = q kᵀ, `c2p` [B, H, Q, P] = q and the position
/// keys, `p2c` [B, H, L, P] = k and the position queries, the bucket indices [L, L] u32 and the
/// key mask `bias` [B, 1, 1, L]. None where it does not apply (the caller gathers, adds and runs
/// the masked softmax).
// Allowed: the operands of the fused op as its CUDA kernel takes them.
#[allow(clippy::too_many_arguments)]
pub fn deberta_probs_for_scoring(
    qk: &Tensor,
    c2p: &Tensor,
    p2c: &Tensor,
    c2p_idx: &Tensor,
    p2c_idx: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    if !deberta_probs_on(qk)
        || [c2p, p2c].iter().any(|t| t.dtype() != DType::BF16)
        || bias.rank() != 4
        || bias.dim(3)? > MAX_DEBERTA_LEN
    {
        return Ok(None);
    }
    let (b, l) = (bias.dim(0)?, bias.dim(3)?);
    let op = DebertaProbs {
        c2p_idx: c2p_idx.to_dtype(DType::U32)?.contiguous()?,
        p2c_idx: p2c_idx.to_dtype(DType::U32)?.contiguous()?,
        mask: bias.to_dtype(DType::F32)?.reshape((b, l))?.contiguous()?,
        scale: scale as f32,
    };
    Ok(Some(qk.contiguous()?.apply_op3_no_bwd(&c2p.contiguous()?, &p2c.contiguous()?, &op)?))
}

/// An offset in bf16 slots rounded up to even, where f32 bits may follow (4-byte aligned).
fn even(n: usize) -> usize {
    n + n % 2
}

/// f32 values as bits in bf16 slots, two per value, low half first (the kernels write f32 into a
/// bf16 buffer's tail this way; see [`lse_to_slots`]).
fn f32_from_slots(slots: &[half::bf16]) -> Vec<f32> {
    lse_from_slots(slots)
}

/// DeBERTa's raw attention scores on the CPU, exact f32: row r = (bh, i) of `s` [rows, len] =
/// (qk + c2p[i, c2p_idx[i, j]] + p2c[j, p2c_idx[j, i]]) / scale + mask[b, j] (the kernels'
/// `deberta_score`).
// Allowed: the operands of the fused op as its CUDA kernel takes them.
#[allow(clippy::too_many_arguments)]
fn deberta_scores_cpu(
    qk: &[f32],
    c2p: &[f32],
    p2c: &[f32],
    ci: &[u32],
    pi: &[u32],
    mask: &[f32],
    [bh, heads, q_rows, len, pos]: [usize; 5],
    inv: f32,
) -> Vec<f32> {
    let mut s = vec![0f32; bh * q_rows * len];
    s.par_chunks_mut(len).enumerate().for_each(|(row, s)| {
        let (b_h, i) = (row / q_rows, row % q_rows);
        let m = &mask[(b_h / heads) * len..(b_h / heads + 1) * len];
        for (j, s) in s.iter_mut().enumerate() {
            let c = c2p[row * pos + ci[i * len + j] as usize];
            let p = p2c[(b_h * len + j) * pos + pi[j * len + i] as usize];
            *s = (qk[row * len + j] + c + p) * inv + m[j];
        }
    });
    s
}

impl DebertaProbs {
    /// The operands widened and the bucket indices and mask read and checked: (qk, c2p, p2c,
    /// c2p_idx, p2c_idx, mask, dims).
    // Allowed: the seven checked operands, named in the doc comment above.
    #[allow(clippy::type_complexity)]
    fn operands(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
        op: &str,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>, Vec<u32>, Vec<u32>, Vec<f32>, [usize; 5])> {
        let dims = self.dims(l1, l2, l3)?;
        let [_, _, _, len, pos] = dims;
        let index =
            |t: &Tensor| -> Result<Vec<u32>> { candle_core::op_stats::uncounted(|| t.flatten_all()?.to_vec1::<u32>()) };
        let (ci, pi, mask) = (index(&self.c2p_idx)?, index(&self.p2c_idx)?, f32_data(&self.mask)?);
        if ci.len() != len * len || pi.len() != len * len || ci.iter().chain(&pi).any(|&x| x as usize >= pos) {
            candle_core::bail!("{op}: indices of {} and {} for {len} keys and {pos} positions", ci.len(), pi.len());
        }
        let w = |s, l| -> Result<Vec<f32>> { Ok(widened(s, l, op)?.into_owned()) };
        Ok((w(s1, l1)?, w(s2, l2)?, w(s3, l3)?, ci, pi, mask, dims))
    }
}

/// DeBERTa's attention probabilities in training under autocast: (qk, c2p, p2c bf16, as
/// [`DebertaProbs`]) -> bf16 [rows len (even) + 2 rows]: the probabilities with attention dropout
/// (`p`, `seed`: the mask [`crate::layers::dropout`]'s kernel draws over the [B, H, Q, L]
/// probabilities), then the rows' log-sum-exp as f32 bits. Its backward gives the three terms'
/// gradients in bf16 (one kernel, the probabilities recomputed from the log-sum-exp; the c2p
/// buckets summed per row, the p2c buckets by atomics) — no [B, H, L, L] gathers, scatters,
/// scaling, f32 softmax or casts.
pub(super) struct DebertaProbsTrain {
    pub(super) probs: DebertaProbs,
    pub(super) seed: u64,
    pub(super) p: f32,
}

impl DebertaProbsTrain {
    fn keep(&self, i: usize) -> f32 {
        kept(self.seed, self.p, i)
    }
}

impl CustomOp3 for DebertaProbsTrain {
    fn name(&self) -> &'static str {
        "distill-deberta-probs-train"
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
        let (qk, c2p, p2c, ci, pi, mask, dims) = self.probs.operands((s1, l1), (s2, l2), (s3, l3), self.name())?;
        let [bh, _, q_rows, len, _] = dims;
        let rows = bh * q_rows;
        let s = deberta_scores_cpu(&qk, &c2p, &p2c, &ci, &pi, &mask, dims, 1.0 / self.probs.scale);
        let lse: Vec<f32> = s
            .chunks(len)
            .map(|r| {
                let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                m + r.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
            })
            .collect();
        let mut out: Vec<half::bf16> =
            s.iter().enumerate().map(|(k, x)| half::bf16::from_f32((x - lse[k / len]).exp() * self.keep(k))).collect();
        out.resize(even(rows * len), half::bf16::ZERO);
        out.extend(lse_to_slots(&lse));
        let n = out.len();
        Ok((CpuStorage::BF16(out), n.into()))
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
        let dims = self.probs.dims(l1, l2, l3)?;
        cuda::deberta_probs_train((s1, l1), (s2, l2), (s3, l3), self, dims)
    }

    fn bwd(
        &self,
        qk: &Tensor,
        c2p: &Tensor,
        p2c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n_qk, n_c2p, n_p2c) = (qk.elem_count(), c2p.elem_count(), p2c.elem_count());
        let op = DebertaProbsTrainGrad {
            fwd: DebertaProbsTrain { probs: self.probs.clone(), seed: self.seed, p: self.p },
            packed: res.contiguous()?,
            dout: grad.narrow(0, 0, n_qk)?.contiguous()?,
        };
        let g = qk.contiguous()?.apply_op3_no_bwd(&c2p.contiguous()?, &p2c.contiguous()?, &op)?;
        let dqk = g.narrow(0, 0, n_qk)?.reshape(qk.shape())?;
        let dc2p = g.narrow(0, n_qk, n_c2p)?.reshape(c2p.shape())?;
        let dp2c = g.narrow(0, n_qk + n_c2p, n_p2c)?.reshape(p2c.shape())?;
        Ok((Some(dqk), Some(dc2p), Some(dp2c)))
    }
}

/// The backward of [`DebertaProbsTrain`]: (qk, c2p, p2c) -> bf16 [dqk | dc2p | dp2c], from the
/// forward's output `packed` and the dropped probabilities' gradient `dout`. dp2c sums dqk as
/// rounded to bf16 (as the kernel reads it back), in f32, then rounds.
pub(super) struct DebertaProbsTrainGrad {
    pub(super) fwd: DebertaProbsTrain,
    pub(super) packed: Tensor,
    pub(super) dout: Tensor,
}

impl CustomOp3 for DebertaProbsTrainGrad {
    fn name(&self) -> &'static str {
        "distill-deberta-probs-train-grad"
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
        let (qk, c2p, p2c, ci, pi, mask, dims) = self.fwd.probs.operands((s1, l1), (s2, l2), (s3, l3), self.name())?;
        let [bh, _, q_rows, len, pos] = dims;
        let rows = bh * q_rows;
        let inv = 1.0 / self.fwd.probs.scale;
        let s = deberta_scores_cpu(&qk, &c2p, &p2c, &ci, &pi, &mask, dims, inv);
        let packed: Vec<half::bf16> =
            candle_core::op_stats::uncounted(|| self.packed.flatten_all()?.to_dtype(DType::BF16)?.to_vec1())?;
        if packed.len() != even(rows * len) + 2 * rows {
            candle_core::bail!("{}: a forward output of {} for {dims:?}", self.name(), packed.len());
        }
        let lse = f32_from_slots(&packed[even(rows * len)..]);
        let dout = f32_data(&self.dout)?;
        let mut dqk = vec![0f32; rows * len];
        let mut dc2p = vec![0f32; rows * pos];
        let mut dp2c = vec![0f32; bh * len * pos];
        for row in 0..rows {
            let (b_h, i) = (row / q_rows, row % q_rows);
            let pr: Vec<f32> = (0..len).map(|j| (s[row * len + j] - lse[row]).exp()).collect();
            let dp: Vec<f32> = (0..len).map(|j| dout[row * len + j] * self.fwd.keep(row * len + j)).collect();
            let delta: f32 = pr.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for j in 0..len {
                let ds = pr[j] * (dp[j] - delta) * inv;
                dqk[row * len + j] = ds;
                dc2p[row * pos + ci[i * len + j] as usize] += ds;
                dp2c[(b_h * len + j) * pos + pi[j * len + i] as usize] += half::bf16::from_f32(ds).to_f32();
            }
        }
        let out: Vec<half::bf16> = dqk.into_iter().chain(dc2p).chain(dp2c).map(half::bf16::from_f32).collect();
        let n = out.len();
        Ok((CpuStorage::BF16(out), n.into()))
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
        let dims = self.fwd.probs.dims(l1, l2, l3)?;
        cuda::deberta_probs_train_grad((s1, l1), (s2, l2), (s3, l3), self, dims)
    }
}

/// Whether [`deberta_probs_for_training`] runs for queries like `q`: bf16 autocast on this
/// thread, a graph kept, the `attention_training` family on for the device.
pub fn deberta_probs_for_training_on(q: &Tensor) -> bool {
    crate::layers::compute_dtype(DType::F32) == DType::BF16
        && crate::layers::grad_enabled()
        && unproven_on(q, Unproven::AttentionTraining)
}

/// DeBERTa's attention probabilities in training under autocast, one kernel each way: as
/// [`deberta_probs_for_scoring`] (qk, c2p, p2c bf16; the same scores) with attention dropout
/// (`dropout`: (p, seed)), out bf16 [B, H, Q, L] (the product with v's input as it is); the
/// backward gives the gradients of qk, c2p and p2c in bf16. Where [`deberta_probs_fit`] holds. Call where
/// [`deberta_probs_for_training_on`] holds (an error otherwise).
// Allowed: the operands of the fused op as its CUDA kernel takes them.
#[allow(clippy::too_many_arguments)]
pub fn deberta_probs_for_training(
    qk: &Tensor,
    c2p: &Tensor,
    p2c: &Tensor,
    c2p_idx: &Tensor,
    p2c_idx: &Tensor,
    bias: &Tensor,
    scale: f64,
    dropout: Option<(f64, u64)>,
) -> Result<Tensor> {
    let bf16 = [qk, c2p, p2c].iter().all(|t| t.dtype() == DType::BF16);
    if !deberta_probs_for_training_on(qk)
        || !bf16
        || bias.rank() != 4
        || !deberta_probs_fit(bias.dim(3)?, c2p.dim(D::Minus1)?)
    {
        candle_core::bail!(
            "deberta probs for training: does not apply to qk {:?} {:?}, c2p {:?}, a mask {:?}",
            qk.dtype(),
            qk.dims(),
            c2p.dims(),
            bias.dims()
        );
    }
    let (b, l) = (bias.dim(0)?, bias.dim(3)?);
    let probs = DebertaProbs {
        c2p_idx: c2p_idx.to_dtype(DType::U32)?.contiguous()?,
        p2c_idx: p2c_idx.to_dtype(DType::U32)?.contiguous()?,
        mask: bias.to_dtype(DType::F32)?.reshape((b, l))?.contiguous()?,
        scale: scale as f32,
    };
    let (p, seed) = dropout.filter(|(p, _)| *p > 0.0).unwrap_or((0.0, 0));
    let op = DebertaProbsTrain { probs, seed, p: p as f32 };
    let out = qk.contiguous()?.apply_op3(&c2p.contiguous()?, &p2c.contiguous()?, op)?;
    out.narrow(0, 0, qk.elem_count())?.reshape(qk.shape())
}

/// The most position buckets of [`deberta_probs_for_training`]'s backward (`DISTILL_DEBERTA_MAX_POS`).
const MAX_DEBERTA_POS: usize = 1024;

/// Whether the DeBERTa probabilities kernels take `len` keys and `pos` position buckets (up to
/// [`MAX_DEBERTA_LEN`] keys, staged in a block's shared memory; up to 1,024 buckets).
pub fn deberta_probs_fit(len: usize, pos: usize) -> bool {
    len <= MAX_DEBERTA_LEN && pos <= MAX_DEBERTA_POS
}
