//! AdamW with its state in the open (candle's keeps it private), so that a trainer can checkpoint
//! and resume it, plus the gradient plumbing a trainer needs: accumulation and clipping by global
//! norm.
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay, Loshchilov & Hutter):
//! ```text
//! θ ← θ − lr·λ·θ
//! m ← β₁m + (1−β₁)g        v ← β₂v + (1−β₂)g²
//! θ ← θ − lr · (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)
//! ```
//! Biases and normalisation weights get no decay, as Hugging Face's Trainer does.

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Whether a parameter is exempt from weight decay (biases, LayerNorm / norm weights).
pub fn no_decay(name: &str) -> bool {
    name.ends_with(".bias") || name.contains("LayerNorm") || name.contains("layer_norm") || name.contains("norm.")
}

struct Param {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates taken so far (t in the bias corrections).
    pub step: u64,
    params: Vec<Param>,
    /// A one on the parameters' device: the fused update's scale when nothing is clipped.
    one: Option<Tensor>,
}

/// Gradients aligned with an optimizer's parameters (None: the parameter got none).
pub struct Grads(pub Vec<Option<Tensor>>);

impl AdamW {
    /// One moment pair per variable of `varmap`, in name order (so that state files are stable).
    pub fn new(varmap: &VarMap, config: AdamWConfig) -> Result<Self> {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut params = Vec::with_capacity(names.len());
        for name in names {
            let var = data[name].clone();
            // Two allocations: the fused update writes the moments in place.
            let m = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            let v = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            params.push(Param { name: name.clone(), decay: !no_decay(name), m, v, var });
        }
        Ok(Self { config, step: 0, params, one: None })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// This step's gradients from a backward pass, in parameter order.
    pub fn grads(&self, store: &GradStore) -> Grads {
        Grads(self.params.iter().map(|p| store.get(p.var.as_tensor()).cloned()).collect())
    }

    /// One update with learning rate `lr` (the schedule's value for this step).
    pub fn update(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        self.update_scaled(grads, lr, None)
    }

    /// One update with the gradients multiplied by `scale` (one f32 on the parameters' device, the
    /// clipping coefficient of [`Grads::clip_on_device`]) first: on CUDA inside the fused update,
    /// so that clipping needs no host read between the backward pass and the update.
    pub fn update_scaled(&mut self, grads: &Grads, lr: f64, scale: Option<&Tensor>) -> Result<()> {
        let Some(first) = self.params.first() else { return Ok(()) };
        let scale = scale.map(|s| s.to_dtype(DType::F32)?.reshape(1)).transpose()?;
        let fused_scale = match (&scale, &self.one) {
            (Some(s), _) => s.clone(),
            (None, Some(one)) => one.clone(),
            (None, None) => {
                let one = Tensor::ones(1, DType::F32, first.var.device())?;
                self.one = Some(one.clone());
                one
            }
        };
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let decay = |p: &Param| if p.decay && c.weight_decay > 0.0 { 1.0 - lr * c.weight_decay } else { 1.0 };
        // On CUDA: every parameter in one launch per 64 (kernels::adamw_list) where that applies.
        let listed: Vec<(&Param, Tensor)> = self
            .params
            .iter()
            .zip(&grads.0)
            .filter_map(|(p, g)| g.as_ref().map(|g| (p, g)))
            .map(|(p, g)| Ok((p, g.to_dtype(DType::F32)?.detach().contiguous()?)))
            .collect::<Result<_>>()?;
        let items: Vec<_> = listed.iter().map(|(p, g)| (p.var.as_tensor(), &p.m, &p.v, g, decay(p))).collect();
        if crate::kernels::adamw_list(&items, &fused_scale, [c.beta1, c.beta2, bc2, lr / bc1, c.eps])? {
            return Ok(());
        }
        drop(items);
        drop(listed);
        // The scale as a number for the in-place CPU update: read once per step, not per tensor.
        let cpu_scale = if first.var.device().is_cpu() { Some(fused_scale.to_vec1::<f32>()?[0]) } else { None };
        for (p, g) in self.params.iter_mut().zip(&grads.0) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?.detach();
            let decay = decay(p);
            // On CUDA: one fused kernel, in place (kernels::adamw_step); the composite below is its reference.
            if p.var.dtype() == DType::F32
                && crate::kernels::adamw_step(
                    p.var.as_tensor(),
                    &p.m,
                    &p.v,
                    &g.contiguous()?,
                    &fused_scale,
                    decay,
                    c.beta1,
                    c.beta2,
                    bc2,
                    lr / bc1,
                    c.eps,
                )?
            {
                continue;
            }
            if let (DType::F32, Some(s)) = (p.var.dtype(), cpu_scale) {
                let k = [decay, c.beta1, c.beta2, bc2, lr / bc1, c.eps].map(|x| x as f32);
                update_on_cpu(p.var.as_tensor(), &p.m, &p.v, &g.contiguous()?, s, k)?;
                continue;
            }
            let g = match &scale {
                Some(s) => g.broadcast_mul(s)?,
                None => g,
            };
            let theta = p.var.as_tensor().detach();
            let theta =
                if p.decay && c.weight_decay > 0.0 { theta.affine(1.0 - lr * c.weight_decay, 0.0)? } else { theta };
            p.m = ((&p.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&p.v / bc2)?.sqrt()? + c.eps)?;
            let next = (theta - ((&p.m / denom)? * (lr / bc1))?)?;
            p.var.set(&next.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<param>`, `v.<param>`), for a checkpoint: copies, since
    /// the fused update writes the moments in place.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::with_capacity(self.params.len() * 2);
        for p in &self.params {
            let copy = |t: &Tensor| t.copy().unwrap_or_else(|_| t.clone());
            out.insert(format!("m.{}", p.name), copy(&p.m));
            out.insert(format!("v.{}", p.name), copy(&p.v));
        }
        out
    }

    /// Restores the moments written by [`AdamW::state`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> std::result::Result<(), String> {
        for p in &mut self.params {
            for (kind, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                let key = format!("{kind}.{}", p.name);
                let t = tensors.get(&key).ok_or_else(|| format!("optimizer state lacks '{key}'"))?;
                if t.dims() != slot.dims() {
                    return Err(format!(
                        "optimizer state '{key}' has shape {:?}, the parameter {:?}",
                        t.dims(),
                        slot.dims()
                    ));
                }
                // A copy of its own (the fused update writes it in place).
                *slot = t
                    .to_dtype(DType::F32)
                    .and_then(|t| t.to_device(p.var.device()))
                    .and_then(|t| t.copy())
                    .map_err(|e| e.to_string())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// One AdamW update of an f32 parameter on the CPU, in place and in one pass over its elements
/// (the composite in [`AdamW::update_scaled`] makes about fifteen, each a new tensor), chunks in
/// parallel; the arithmetic of the CUDA kernel (`adamw_at` in kernels.cu). `k` = [weight decay
/// factor, beta1, beta2, bc2, lr / bc1, eps]; `s` multiplies the gradient first.
fn update_on_cpu(param: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, s: f32, k: [f32; 6]) -> Result<()> {
    use rayon::prelude::*;
    let [decay, beta1, beta2, bc2, step, eps] = k;
    let (g_storage, g_layout) = g.storage_and_layout();
    let g = match (&*g_storage, g_layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(c), Some((a, b))) => &c.as_slice::<f32>()?[a..b],
        _ => candle_core::bail!("adamw: the gradient is not a contiguous f32 CPU tensor"),
    };
    in_place(param, |p| {
        in_place(m, |m| {
            in_place(v, |v| {
                if [p.len(), m.len(), v.len()].iter().any(|&n| n != g.len()) {
                    candle_core::bail!("adamw: parameter, moments and gradient of different sizes");
                }
                const CHUNK: usize = 64 * 1024;
                p.par_chunks_mut(CHUNK)
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(((p, m), v), g)| {
                        for i in 0..p.len() {
                            let gi = g[i] * s;
                            m[i] = beta1 * m[i] + (1.0 - beta1) * gi;
                            v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi;
                            p[i] = p[i] * decay - step * (m[i] / ((v[i] / bc2).sqrt() + eps));
                        }
                    });
                Ok(())
            })
        })
    })
}

/// Runs `f` on the elements of `t` (a contiguous f32 CPU tensor), in place: `t` and every tensor
/// sharing its storage see the change (as `Var::set` does).
fn in_place(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    struct Op<F>(std::cell::RefCell<Option<F>>);
    impl<F: FnOnce(&mut [f32]) -> Result<()>> candle_core::InplaceOp1 for Op<F> {
        fn name(&self) -> &'static str {
            "adamw-in-place"
        }
        fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> Result<()> {
            let (candle_core::CpuStorage::F32(data), Some((a, b))) = (storage, layout.contiguous_offsets()) else {
                candle_core::bail!("adamw: not a contiguous f32 tensor")
            };
            let f = self.0.borrow_mut().take().expect("an in-place op runs once");
            f(&mut data[a..b])
        }
    }
    t.inplace_op1(&Op(std::cell::RefCell::new(Some(f))))
}

impl Grads {
    /// Adds another micro-batch's gradients (gradient accumulation).
    pub fn accumulate(&mut self, other: Grads) -> Result<()> {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = match (a.take(), b) {
                (Some(x), Some(y)) => Some((x + y)?),
                (x, y) => x.or(y),
            };
        }
        Ok(())
    }

    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for g in self.0.iter_mut().flatten() {
            *g = (&*g * factor)?;
        }
        Ok(())
    }

    /// The global L2 norm over all gradients (one device-to-host read, not one per tensor).
    pub fn global_norm(&self) -> Result<f64> {
        let sums: Vec<Tensor> =
            self.0.iter().flatten().map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()).collect::<Result<_>>()?;
        if sums.is_empty() {
            return Ok(0.0);
        }
        Ok((Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()? as f64).sqrt())
    }

    /// The global L2 norm as a tensor of one element on the gradients' device: no host read
    /// (None without gradients).
    pub fn global_norm_on_device(&self) -> Result<Option<Tensor>> {
        // One accumulator and one launch per 64 gradients where the fused kernels run (CUDA).
        let grads: Vec<&Tensor> = self.0.iter().flatten().collect();
        if let Some(first) = grads.first() {
            let acc = Tensor::zeros(1, DType::F32, first.device())?;
            if crate::kernels::sum_squares_list_into(&acc, &grads)? {
                return Ok(Some(acc.sqrt()?));
            }
        }
        let sums: Vec<Tensor> =
            self.0.iter().flatten().map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()).collect::<Result<_>>()?;
        if sums.is_empty() {
            return Ok(None);
        }
        Some(Tensor::stack(&sums, 0)?.sum_all()?.sqrt()?.reshape(1)).transpose()
    }

    /// Clipping by global norm as `torch.nn.utils.clip_grad_norm_` does, without a host read:
    /// (the norm before, the coefficient min(1, max_norm / (norm + 1e-6))), each one element on the
    /// device, for [`AdamW::update_scaled`]; None without gradients or with `max_norm` <= 0 (no
    /// clipping). The gradients are left as they are (the update scales them).
    pub fn clip_on_device(&self, max_norm: f64) -> Result<Option<(Tensor, Tensor)>> {
        if max_norm <= 0.0 {
            return Ok(None);
        }
        let Some(norm) = self.global_norm_on_device()? else { return Ok(None) };
        let coef = (norm.affine(1.0, 1e-6)?.recip()? * max_norm)?.clamp(0f32, 1f32)?;
        Ok(Some((norm, coef)))
    }

    /// Clips by global norm as `torch.nn.utils.clip_grad_norm_` does; returns the norm before.
    pub fn clip(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        let coef = max_norm / (norm + 1e-6);
        if max_norm > 0.0 && coef < 1.0 {
            self.scale(coef)?;
        }
        Ok(norm)
    }

    /// Whether any gradient is NaN or infinite.
    pub fn non_finite(&self) -> Result<bool> {
        Ok(!self.global_norm()?.is_finite())
    }
}
