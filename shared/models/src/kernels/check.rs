//! The fused kernels against the composite ops they replace (`distill-bench --check-kernels`
//! on a GPU, the unit test on the CPU).

use super::*;

/// A norm under check: (x, weight, bias) to its output.
type NormFn = dyn Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>;
/// One family of checks, run on a device.
type CheckFn = dyn Fn(&candle_core::Device, &mut Checks) -> Result<()>;
/// An elementwise op under check.
type UnaryFn = dyn Fn(&Tensor) -> Result<Tensor>;

thread_local! {
    /// The checks' random inputs: seeded at the start of each run, so that a check is the same
    /// computation every time (its margin, measured once, holds in CI).
    static RNG: std::cell::RefCell<rand_chacha::ChaCha8Rng> =
        std::cell::RefCell::new(<rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0));
}

fn seed_inputs(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed));
}

/// Uniform in [lo, hi), f32, from the seeded generator.
fn rand<S: Into<Shape>>(lo: f32, hi: f32, shape: S, dev: &candle_core::Device) -> Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f32> = RNG.with(|r| {
        (0..shape.elem_count()).map(|_| lo + (hi - lo) * rand::Rng::random::<f32>(&mut *r.borrow_mut())).collect()
    });
    Tensor::from_vec(v, shape, dev)
}

/// Standard normal, f32 (Box-Muller), from the seeded generator.
fn randn<S: Into<Shape>>(shape: S, dev: &candle_core::Device) -> Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f32> = RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..shape.elem_count())
            .map(|_| {
                let (u1, u2) =
                    (rand::Rng::random::<f32>(&mut *r).max(f32::MIN_POSITIVE), rand::Rng::random::<f32>(&mut *r));
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    });
    Tensor::from_vec(v, shape, dev)
}

/// Runs `f` fused and composite on `dev` on the same input and upstream gradient; returns the
/// largest absolute differences of the outputs and of the input gradients. Leaves the kernels at
/// their defaults.
fn compare(
    dev: &candle_core::Device,
    shape: &[usize],
    scale: f64,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(f32, f32)> {
    let x0 = (randn(shape, dev)? * scale)?;
    let run = |fused: bool| -> Result<(Tensor, Tensor)> {
        set_fused(fused);
        let x = candle_core::Var::from_tensor(&x0)?;
        let y = f(x.as_tensor());
        set_fused_default();
        let y = y?;
        // The same upstream gradient in both runs, shaped as the output: sin(0.37 i).
        let upstream = (Tensor::arange(0u32, y.elem_count() as u32, dev)?.to_dtype(DType::F32)? * 0.37)?
            .sin()?
            .reshape(y.shape())?;
        let grads = (&y * &upstream)?.sum_all()?.backward()?;
        let g = grads.get(x.as_tensor()).ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?.clone();
        Ok((y, g))
    };
    let (yf, gf) = run(true)?;
    let (yc, gc) = run(false)?;
    let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
    Ok((diff(&yf, &yc)?, diff(&gf, &gc)?))
}

/// As [`compare`] for an op with a weight and an optional shift over the last dimension
/// (`f(x, w, b)`): the largest differences of the outputs and of the gradients of x, w and b.
fn compare_with_weights(
    dev: &candle_core::Device,
    shape: &[usize],
    scale: f64,
    shift: bool,
    f: &NormFn,
) -> Result<(f32, [f32; 3])> {
    let cols = *shape.last().unwrap_or(&1);
    let x0 = (randn(shape, dev)? * scale)?;
    let w0 = randn(cols, dev)?.affine(0.5, 1.0)?;
    let b0 = randn(cols, dev)?;
    let run = |fused: bool| -> Result<(Tensor, [Tensor; 3])> {
        let (x, w, b) = (
            candle_core::Var::from_tensor(&x0)?,
            candle_core::Var::from_tensor(&w0)?,
            candle_core::Var::from_tensor(&b0)?,
        );
        set_fused(fused);
        let y = f(x.as_tensor(), w.as_tensor(), shift.then_some(b.as_tensor()));
        set_fused_default();
        let y = y?;
        let upstream = (Tensor::arange(0u32, y.elem_count() as u32, dev)?.to_dtype(DType::F32)? * 0.37)?
            .sin()?
            .reshape(y.shape())?;
        let grads = (&y * &upstream)?.sum_all()?.backward()?;
        let get = |v: &candle_core::Var| {
            grads.get(v.as_tensor()).cloned().unwrap_or_else(|| v.as_tensor().zeros_like().expect("zeros"))
        };
        Ok((y, [get(&x), get(&w), get(&b)]))
    };
    let (yf, gf) = run(true)?;
    let (yc, gc) = run(false)?;
    let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
    Ok((diff(&yf, &yc)?, [diff(&gf[0], &gc[0])?, diff(&gf[1], &gc[1])?, diff(&gf[2], &gc[2])?]))
}

/// A random key mask [B, 1, 1, L] (0, or -1e9 for about a fifth of the keys) and, with a window,
/// the full mask [B, 1, L, L] the composite reads (the mask plus the band).
fn attention_masks(dev: &candle_core::Device, b: usize, l: usize, window: Option<usize>) -> Result<(Tensor, Tensor)> {
    let keys = rand(0f32, 1.0, (b, 1, 1, l), dev)?;
    let mask = keys.ge(0.2)?.to_dtype(DType::F32)?.affine(1e9, -1e9)?;
    let full = match window {
        Some(w) => {
            let band: Vec<f32> = (0..l * l).map(|x| if (x / l).abs_diff(x % l) <= w { 0.0 } else { -1e9 }).collect();
            mask.broadcast_add(&Tensor::from_vec(band, (1, 1, l, l), dev)?)?
        }
        None => mask.clone(),
    };
    Ok((mask, full))
}

/// The groups of checks, in order: `core` (the kernels already proven on a GPU: GELU, softmax,
/// the normalisation, the masked softmax, dropout, and AdamW on CUDA), one per [`Unproven`]
/// family, `backbones` (whole BERT, ModernBERT and DeBERTa under autocast, every kernel on) and
/// `optimizer` (a family checked on CUDA only).
pub const CHECK_GROUPS: [&str; 11] = [
    "core",
    "embedding",
    "layer_norm",
    "bias_add",
    "rotary",
    "attention_scoring",
    "attention_training",
    "scoring_epilogues",
    "matmul_epilogues",
    "backbones",
    "optimizer",
];

/// The lines of a check run (one per check) and those over their tolerance (`bad`).
#[derive(Debug)]
pub struct Checks {
    pub lines: Vec<String>,
    pub bad: Vec<String>,
}

impl Checks {
    fn line(&mut self, line: String) {
        self.lines.push(line);
    }

    /// The last line is over its tolerance.
    fn fail(&mut self) {
        self.bad.push(self.lines.last().cloned().unwrap_or_default());
    }
}

/// The largest |a - b| over the largest |b| (bf16 outputs compared in f32): the bf16 rounding of
/// outputs of any size is about the same fraction of them.
fn relative_bf16(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    Ok((&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6))
}

/// [`relative_bf16`] of each fused result against its composite.
fn relative_each(fused: &[Tensor], composite: &[Tensor]) -> Result<Vec<f32>> {
    fused.iter().zip(composite).map(|(a, b)| relative_bf16(a, b)).collect()
}

/// Checks the fused kernels on `dev` against the composite ops they replace, the `groups` of
/// [`CHECK_GROUPS`] named (empty: all): values and gradients on several shapes, AdamW updates on
/// CUDA. One line per check, and those over their tolerance; a group that fails to run is a failed
/// check and the others still run. The fused kernels are switched process-wide while it runs:
/// call it alone (`distill-bench --check-kernels` on a GPU, one group per process in
/// scripts/bench/gpu-bench.sh, so that a kernel that faults cannot take the others' verdicts with
/// it; the unit test below on the CPU).
pub fn check_against_composite(dev: &candle_core::Device, groups: &[&str]) -> Result<Checks> {
    if let Some(g) = groups.iter().find(|g| !CHECK_GROUPS.contains(g)) {
        candle_core::bail!("unknown check group {g:?} (known: {})", CHECK_GROUPS.join(", "));
    }
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        let missing = cuda::missing_kernels();
        if !missing.is_empty() {
            candle_core::bail!("the embedded PTX lacks {missing:?}: a stale build; rebuild from a clean target/cuda");
        }
    }
    let mut c = Checks { lines: Vec::new(), bad: Vec::new() };
    let runs: [(&str, &CheckFn); 11] = [
        ("core", &check_core),
        ("embedding", &check_embedding),
        ("layer_norm", &check_layer_norm),
        ("bias_add", &check_bias_add),
        ("rotary", &check_rotary),
        ("attention_scoring", &check_attention_scoring),
        ("attention_training", &check_attention_training),
        ("scoring_epilogues", &check_scoring_epilogues),
        ("matmul_epilogues", &check_matmul_epilogues),
        ("backbones", &check_backbones),
        ("optimizer", &check_optimizer),
    ];
    for (i, (group, run)) in runs.into_iter().enumerate() {
        if groups.is_empty() || groups.contains(&group) {
            // Each group's inputs the same whichever groups run.
            seed_inputs(0x5eed + i as u64);
            if let Err(e) = run(dev, &mut c) {
                set_fused_default();
                crate::layers::autocast(None);
                c.line(format!("{group}: {e}"));
                c.fail();
            }
        }
    }
    Ok(c)
}

/// GELU, softmax, the normalisation, the masked softmax, dropout; AdamW on CUDA.
fn check_core(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    let shapes: [(Vec<usize>, f64); 5] = [
        (vec![3, 5, 384], 3.0),
        (vec![2, 12, 40, 40], 6.0),
        (vec![7], 1.0),
        (vec![4, 1536], 8.0),
        (vec![2, 3, 97, 1000], 4.0),
    ];
    for (shape, scale) in &shapes {
        let ops: [(&str, f32, f32, &UnaryFn); 3] = [
            ("gelu", 2e-5, 2e-5, &gelu_erf),
            ("softmax", 1e-5, 1e-5, &softmax_last_dim),
            ("normalize", 2e-5, 2e-4, &|x: &Tensor| normalize_last_dim(x, 1e-12)),
        ];
        for (name, tv, tg, f) in ops {
            let (v, g) = compare(dev, shape, *scale, f)?;
            c.line(format!("{name} {shape:?}: |values| {v:.1e}, |gradients| {g:.1e}"));
            if !(v < tv && g < tg) {
                c.fail();
            }
        }
    }
    // Attention probabilities with a key mask [B, 1, 1, K] and with a full mask [B, 1, Q, K].
    for (b, h, q, k, full) in [(3, 4, 17, 17, false), (2, 12, 64, 64, true), (2, 2, 5, 300, false)] {
        let keys = rand(0f32, 1.0, (b, 1, if full { q } else { 1 }, k), dev)?;
        let bias = keys.ge(0.3)?.to_dtype(DType::F32)?.affine(1e9, -1e9)?;
        let (v, g) = compare(dev, &[b, h, q, k], 4.0, |x| masked_softmax(x, &bias, 0.125))?;
        c.line(format!("masked softmax [{b}, {h}, {q}, {k}] full mask {full}: |values| {v:.1e}, |gradients| {g:.1e}"));
        if !(v < 1e-5 && g < 1e-5) {
            c.fail();
        }
    }
    // A masked attention row: -inf-like biases give zeros and no NaN; a strided input (a transpose).
    set_fused(true);
    let masked = softmax_last_dim(&Tensor::new(&[[1f32, 2.0, -1e9, -3.4e38]], dev)?);
    let strided = randn((6, 9), dev)?.t()?;
    let fused_strided = softmax_last_dim(&strided);
    set_fused(false);
    let composite_strided = softmax_last_dim(&strided);
    set_fused_default();
    let y: Vec<f32> = masked?.flatten_all()?.to_vec1()?;
    let ok = (y[0] - 0.268_941_43).abs() < 1e-6 && (y[1] - 0.731_058_6).abs() < 1e-6 && y[2] == 0.0 && y[3] == 0.0;
    c.line(format!("softmax of a masked row: {y:?}"));
    if !ok {
        c.fail();
    }
    let d = (fused_strided? - composite_strided?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    c.line(format!("softmax of a transposed input: |values| {d:.1e}"));
    if d >= 1e-6 {
        c.fail();
    }
    // Dropout: about p dropped, kept values scaled, the gradient through the same mask, the
    // same mask again from the same seed.
    {
        let x = (rand(0f32, 1.0, (64, 1000), dev)? + 0.5)?;
        let upstream = randn((64, 1000), dev)?;
        let var = candle_core::Var::from_tensor(&x)?;
        let y = dropout(var.as_tensor(), 0.1, 42)?;
        let grad = (&y * &upstream)?.sum_all()?.backward()?;
        let grad = grad.get(var.as_tensor()).ok_or_else(|| candle_core::Error::Msg("no dropout gradient".into()))?;
        let kept = y.ne(0f32)?.to_dtype(DType::F32)?;
        let dropped = 1.0 - kept.mean_all()?.to_scalar::<f32>()?;
        let values = ((&y - (&x * (1.0 / 0.9))? * &kept)?).abs()?.max_all()?.to_scalar::<f32>()?;
        let grads = ((grad - (&upstream * (1.0 / 0.9))? * &kept)?).abs()?.max_all()?.to_scalar::<f32>()?;
        let again = (dropout(&x, 0.1, 42)? - &y)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let other = (dropout(&x, 0.1, 43)? - &y)?.abs()?.max_all()?.to_scalar::<f32>()?;
        c.line(format!(
            "dropout p 0.1: dropped {dropped:.4}, |values| {values:.1e}, |gradients| {grads:.1e}, same seed {again:.1e}, other seed differs {}",
            other > 0.0
        ));
        if !((dropped - 0.1).abs() < 0.01 && values < 1e-6 && grads < 1e-6 && again == 0.0 && other > 0.0) {
            c.fail();
        }
    }
    if dev.is_cuda() {
        // The kernel per parameter tensor (the lists are the optimizer family's).
        let (p, s) = adamw_difference(dev, &[&[70], &[33, 70]], &|| set_unproven(&[]))?;
        c.line(format!("adamw, 3 steps: |parameters| {p:.1e}, |moments| {s:.1e}"));
        if !(p < 1e-6 && s < 1e-6) {
            c.fail();
        }
    }
    Ok(())
}

/// The optimizer over lists of tensors against the composite: the global gradient norm (squares,
/// sums, their stack) and AdamW; CUDA only (the CPU keeps the composite).
fn check_optimizer(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    if dev.is_cuda() {
        let grads = crate::optim::Grads(
            [vec![70usize], vec![33, 70], vec![1000, 300]]
                .into_iter()
                .map(|s| Ok(Some(randn(s.as_slice(), dev)?)))
                .collect::<Result<_>>()?,
        );
        let norm = |fused: bool| -> Result<f32> {
            set_fused(fused);
            let n = grads.global_norm_on_device();
            set_fused_default();
            n?.ok_or_else(|| candle_core::Error::Msg("no norm".into()))?.to_vec1::<f32>().map(|v| v[0])
        };
        let (f, composite) = (norm(true)?, norm(false)?);
        let d = (f - composite).abs() / composite;
        c.line(format!("global gradient norm, 3 gradients: relative {d:.1e}"));
        if d.is_nan() || d >= 1e-5 {
            c.fail();
        }
        // AdamW over 150 parameters in lists (three launches, the last part full): sizes from
        // one element to more than a grid of blocks covers, every other one without decay.
        let shapes: Vec<Vec<usize>> =
            (0..150).map(|i| if i % 50 == 7 { vec![2100, 9000] } else { vec![1 + (i * 37) % 700] }).collect();
        let shapes: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
        let (p, s) = adamw_difference(dev, &shapes, &|| set_fused(true))?;
        c.line(format!(
            "adamw over lists of 64 tensors, 150 parameters, 3 steps: |parameters| {p:.1e}, |moments| {s:.1e}"
        ));
        if !(p < 1e-6 && s < 1e-6) {
            c.fail();
        }
    }
    Ok(())
}

/// The embedding gather and the table gradient.
fn check_embedding(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    // Embedding rows and the table gradient, with repeated ids.
    {
        let ids = Tensor::new(&[[3u32, 7, 3, 49], [0, 7, 7, 12]], dev)?;
        let (v, g) = compare(dev, &[50, 24], 1.0, |t| embedding(t, &ids))?;
        c.line(format!("embedding rows, repeated ids: |values| {v:.1e}, |table gradients| {g:.1e}"));
        if !(v < 1e-6 && g < 1e-5) {
            c.fail();
        }
    }
    Ok(())
}

/// Layer norm with scale and shift (and without a shift, as ModernBERT's): the weights'
/// gradients too. 130 rows: three blocks of the column sums.
fn check_layer_norm(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    for (shape, scale) in [(vec![3, 5, 384], 3.0), (vec![4, 1536], 8.0), (vec![130, 33], 1.0)] {
        for shift in [true, false] {
            let (v, g) = compare_with_weights(dev, &shape, scale, shift, &|x, w, b| layer_norm(x, w, b, 1e-12))?;
            c.line(format!(
                "layer norm {shape:?} shift {shift}: |values| {v:.1e}, |gradients of x, w, b| {:.1e}, {:.1e}, {:.1e}",
                g[0], g[1], g[2]
            ));
            if !(v < 2e-5 && g[0] < 2e-4 && g[1] < 1e-4 && g[2] < 1e-4) {
                c.fail();
            }
        }
    }
    // A post-LN block's end in training under autocast (the bf16 product, its bias, dropout, the
    // f32 residual, the norm: one kernel each way) against the composite (the cast with the bias,
    // the dropout kernel with the same seed, the add, the norm): values and the gradients of the
    // product, the residual, the bias, the weight and the shift, relative to their largest.
    for (shape, with_bias, p) in [(vec![130usize, 768usize], true, 0.1f64), (vec![3, 5, 384], false, 0.0)] {
        let cols = *shape.last().unwrap_or(&1);
        let x0 = (randn(shape.as_slice(), dev)? * 3.0)?.to_dtype(DType::BF16)?;
        let r0 = randn(shape.as_slice(), dev)?;
        let (b0, w0, s0) = ((randn(cols, dev)? * 0.5)?, randn(cols, dev)?.affine(0.5, 1.0)?, randn(cols, dev)?);
        let n = x0.elem_count();
        let upstream =
            (Tensor::arange(0u32, n as u32, dev)?.to_dtype(DType::F32)? * 0.37)?.sin()?.reshape(shape.as_slice())?;
        let run = |fused: bool| -> Result<Vec<Tensor>> {
            let vars: Vec<candle_core::Var> =
                [&x0, &r0, &b0, &w0, &s0].into_iter().map(candle_core::Var::from_tensor).collect::<Result<_>>()?;
            let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let bias = with_bias.then_some(t[2]);
            crate::layers::autocast(Some(DType::BF16));
            set_fused(fused);
            let y = if fused {
                add_norm_for_training(t[0], bias, t[1], t[3], Some(t[4]), 1e-12, Some((p, 42)))
            } else {
                let b = bias.map_or_else(|| Tensor::zeros(cols, DType::F32, dev), |b| Ok(b.clone()));
                b.and_then(|b| bias_add(t[0], &b)).and_then(|h| {
                    let h = if p > 0.0 { dropout(&h, p, 42)? } else { h };
                    layer_norm(&(h + t[1])?, t[3], Some(t[4]), 1e-12)
                })
            };
            set_fused_default();
            crate::layers::autocast(None);
            let y = y?;
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            let mut out = vec![y];
            for (i, v) in vars.iter().enumerate() {
                match grads.get(v.as_tensor()) {
                    Some(g) => out.push(g.to_dtype(DType::F32)?),
                    None if i == 2 && !with_bias => out.push(Tensor::zeros(cols, DType::F32, dev)?),
                    None => candle_core::bail!("no gradient for operand {i}"),
                }
            }
            Ok(out)
        };
        let (f, composite) = (run(true)?, run(false)?);
        let d: Vec<f32> = relative_each(&f, &composite)?;
        c.line(format!(
            "add norm for training {shape:?} bias {with_bias} dropout {p}: relative |values| {:.1e}, |gradients of the product, residual, bias, w, shift| {:.1e}, {:.1e}, {:.1e}, {:.1e}, {:.1e}",
            d[0], d[1], d[2], d[3], d[4], d[5]
        ));
        // The product's gradient is bf16 on both sides (a step of 2^-8 relative where the two
        // round differently); the rest f32, summed in other orders.
        if !(f[0].dtype() == DType::F32 && d[0] < 1e-5 && d[1] < 1e-2 && d[2..].iter().all(|v| *v < 1e-4)) {
            c.fail();
        }
    }
    Ok(())
}

/// A linear layer's bias add (f32), and its autocast epilogue (bf16 matmul output to f32).
fn check_bias_add(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    for (shape, scale) in [(vec![3, 5, 384], 3.0), (vec![4, 1536], 8.0), (vec![130, 33], 1.0)] {
        let (v, g) = compare_with_weights(dev, &shape, scale, true, &|x, _, b| bias_add(x, b.expect("a bias")))?;
        c.line(format!("bias add {shape:?}: |values| {v:.1e}, |gradients of x, b| {:.1e}, {:.1e}", g[0], g[2]));
        if !(v < 1e-6 && g[0] < 1e-6 && g[2] < 1e-4) {
            c.fail();
        }
    }
    // The autocast epilogue of a linear layer: a bf16 matmul output back to f32 with its bias.
    {
        let x0 = randn((130, 300), dev)?.to_dtype(DType::BF16)?;
        let b0 = randn(300, dev)?;
        let upstream =
            (Tensor::arange(0u32, 130 * 300, dev)?.to_dtype(DType::F32)? * 0.37)?.sin()?.reshape((130, 300))?;
        let run = |fused: bool| -> Result<[Tensor; 3]> {
            let (x, b) = (candle_core::Var::from_tensor(&x0)?, candle_core::Var::from_tensor(&b0)?);
            set_fused(fused);
            let y = bias_add(x.as_tensor(), b.as_tensor());
            set_fused_default();
            let y = y?;
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            let get = |v: &candle_core::Var| {
                grads.get(v.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
            };
            Ok([y, get(&x)?.to_dtype(DType::F32)?, get(&b)?])
        };
        let (f, composite) = (run(true)?, run(false)?);
        let d: Vec<f32> = f
            .iter()
            .zip(&composite)
            .map(|(a, b)| (a - b)?.abs()?.max_all()?.to_scalar::<f32>())
            .collect::<Result<_>>()?;
        c.line(format!(
            "bias add from bf16 [130, 300]: |values| {:.1e}, |gradients of x, b| {:.1e}, {:.1e}",
            d[0], d[1], d[2]
        ));
        if !(f[0].dtype() == DType::F32 && d[0] < 1e-6 && d[1] < 1e-6 && d[2] < 1e-4) {
            c.fail();
        }
    }
    // The feed-forward's bias and GELU in training (bf16 product in, bf16 out for the next
    // product) against the composite: the cast to f32, the bias, GELU, the cast to bf16. Values
    // and the gradients of the product and the bias, relative to their largest (the kernel rounds
    // x's gradient to bf16 before the bias's column sum, the composite after).
    for (rows, cols) in [(130usize, 3072usize), (7, 300)] {
        let x0 = (randn((rows, cols), dev)? * 2.0)?.to_dtype(DType::BF16)?;
        let b0 = randn(cols, dev)?;
        let upstream = (Tensor::arange(0u32, (rows * cols) as u32, dev)?.to_dtype(DType::F32)? * 0.37)?
            .sin()?
            .reshape((rows, cols))?;
        let run = |fused: bool| -> Result<[Tensor; 3]> {
            let (x, b) = (candle_core::Var::from_tensor(&x0)?, candle_core::Var::from_tensor(&b0)?);
            let y = if fused {
                bias_gelu_for_training(x.as_tensor(), b.as_tensor())?
            } else {
                x.as_tensor().to_dtype(DType::F32)?.broadcast_add(b.as_tensor())?.gelu_erf()?.to_dtype(DType::BF16)?
            };
            let grads = (y.to_dtype(DType::F32)? * &upstream)?.sum_all()?.backward()?;
            let get = |v: &candle_core::Var| {
                grads.get(v.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
            };
            Ok([y, get(&x)?, get(&b)?])
        };
        let (f, composite) = (run(true)?, run(false)?);
        let d: Vec<f32> = f.iter().zip(&composite).map(|(a, b)| relative_bf16(a, b)).collect::<Result<_>>()?;
        c.line(format!(
            "bias + gelu for training bf16 [{rows}, {cols}]: relative |values| {:.1e}, |gradients of x, b| {:.1e}, {:.1e}",
            d[0], d[1], d[2]
        ));
        let dtypes = [f[0].dtype(), f[1].dtype(), f[2].dtype()] == [DType::BF16, DType::BF16, DType::F32];
        if !(dtypes && d.iter().all(|d| *d < 1e-2)) {
            c.fail();
        }
    }
    // GeGLU in training (ModernBERT's MLP: bf16 product in, bf16 out) against the composite: the
    // cast to f32, the halves, GELU, the product. Values and the product's gradient.
    for (rows, cols) in [(130usize, 2304usize), (7, 600)] {
        let x0 = (randn((rows, cols), dev)? * 2.0)?.to_dtype(DType::BF16)?;
        let upstream = (Tensor::arange(0u32, (rows * cols / 2) as u32, dev)?.to_dtype(DType::F32)? * 0.37)?
            .sin()?
            .reshape((rows, cols / 2))?;
        let run = |fused: bool| -> Result<[Tensor; 2]> {
            let x = candle_core::Var::from_tensor(&x0)?;
            let y = if fused {
                x.as_tensor().apply_op1(super::epilogues::Geglu)?
            } else {
                let h = x.as_tensor().to_dtype(DType::F32)?;
                (h.narrow(1, 0, cols / 2)?.gelu_erf()? * h.narrow(1, cols / 2, cols / 2)?)?
            };
            let grads = (y.to_dtype(DType::F32)? * &upstream)?.sum_all()?.backward()?;
            let dx = grads.get(x.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
            Ok([y, dx])
        };
        let (f, composite) = (run(true)?, run(false)?);
        let d = relative_each(&f, &composite)?;
        c.line(format!(
            "geglu for training bf16 [{rows}, {cols}]: relative |values| {:.1e}, |gradient of x| {:.1e}",
            d[0], d[1]
        ));
        if !([f[0].dtype(), f[1].dtype()] == [DType::BF16, DType::BF16] && d.iter().all(|d| *d < 1e-2)) {
            c.fail();
        }
    }
    Ok(())
}

/// Rotary embeddings with the head split.
fn check_rotary(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    // Rotary embeddings with the head split: q, k, v stacked, and the packed projection's gradient.
    for (b, len, h, d) in [(2usize, 9usize, 3usize, 8usize), (3, 40, 12, 64)] {
        let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / d as f32)).collect();
        let angles: Vec<f32> = (0..len * d).map(|k| (k / d) as f32 * inv[k % d % (d / 2)]).collect();
        let angles = Tensor::from_vec(angles, (len, d), dev)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let (v, g) = compare(dev, &[b, len, 3, h, d], 2.0, |x| {
            let (q, k, v) = rotary_qkv(x, &cos, &sin)?;
            Tensor::stack(&[q, k, v], 0)
        })?;
        c.line(format!("rotary q, k, v [{b}, {len}, 3, {h}, {d}]: |values| {v:.1e}, |gradients| {g:.1e}"));
        if !(v < 1e-5 && g < 1e-5) {
            c.fail();
        }
    }
    Ok(())
}

/// Flash-style attention for scoring against the composite.
fn check_attention_scoring(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    // Attention for scoring (bf16, no graph) against the composite: bf16 products and the masked
    // softmax, heads merged; with and without a window.
    for (b, h, l, d, window) in [(2usize, 3usize, 70usize, 32usize, None), (2, 12, 130, 64, Some(16))] {
        let qkv: Vec<Tensor> =
            (0..3).map(|_| randn((b, h, l, d), dev)?.to_dtype(DType::BF16)).collect::<Result<_>>()?;
        let (bias, full) = attention_masks(dev, b, l, window)?;
        let scale = 1.0 / (d as f64).sqrt();
        let composite = {
            let probs = masked_softmax(&qkv[0].matmul(&qkv[1].t()?.contiguous()?)?, &full, scale)?;
            probs.matmul(&qkv[2])?.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))?
        };
        set_fused(true);
        let flash =
            crate::layers::no_grad(|| flash_attention_for_scoring(&qkv[0], &qkv[1], &qkv[2], &bias, scale, window));
        set_fused_default();
        let flash = flash?.ok_or_else(|| candle_core::Error::Msg("flash attention did not apply".into()))?;
        let diff = relative_bf16(&flash, &composite)?;
        c.line(format!(
            "flash attention for scoring [{b}, {h}, {l}, {d}] window {window:?}: relative |values| {diff:.1e}"
        ));
        if diff >= 3e-2 {
            c.fail();
        }
    }
    // The same from one joined product [B, L, 3 H D] and its bias, read in place; and with q and
    // k rotated as they load (ModernBERT's rotary embeddings, its local window).
    for (b, h, l, d, rope, window) in [
        (2usize, 3usize, 70usize, 32usize, None, None),
        (2, 12, 130, 64, None, None),
        (2, 3, 70, 32, Some(10_000.0), Some(16usize)),
        (2, 12, 130, 64, Some(160_000.0), None),
    ] {
        let qkv = randn((b, l, 3 * h * d), dev)?.to_dtype(DType::BF16)?;
        let qkv_bias = (randn(3 * h * d, dev)? * 0.5)?.to_dtype(DType::BF16)?;
        let (bias, full) = attention_masks(dev, b, l, window)?;
        let scale = 1.0 / (d as f64).sqrt();
        let table = rope.map(|theta| crate::modernbert::rotary(l, d, theta, dev)).transpose()?;
        let composite = {
            let split = qkv.broadcast_add(&qkv_bias)?.reshape((b, l, 3, h, d))?;
            let part =
                |i: usize| -> Result<Tensor> { split.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous() };
            let (mut q, mut k, v) = (part(0)?, part(1)?, part(2)?);
            if let Some((cos, sin)) = &table {
                (q, k) = (apply_rotary(&q, cos, sin)?, apply_rotary(&k, cos, sin)?);
            }
            let probs = masked_softmax(&q.matmul(&k.t()?.contiguous()?)?, &full, scale)?;
            probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))?
        };
        let rope = table.map(|(cos, sin)| Tensor::stack(&[cos, sin], 0)).transpose()?;
        set_fused(true);
        let flash = crate::layers::no_grad(|| {
            let mask = bias.to_dtype(DType::BF16)?;
            flash_attention_for_scoring_packed(&qkv, Some(&qkv_bias), &mask, h, scale, window, rope.as_ref())
        });
        set_fused_default();
        let diff = relative_bf16(&flash?, &composite)?;
        let rotated = if rope.is_some() { ", q and k rotated" } else { "" };
        c.line(format!(
            "flash attention for scoring from a joined product [{b}, {l}, 3 x {h} x {d}]{rotated} window {window:?}: relative |values| {diff:.1e}"
        ));
        if diff >= 3e-2 {
            c.fail();
        }
    }
    check_deberta_probs(dev, c)
}

/// DeBERTa's disentangled attention probabilities for scoring (one kernel) against the composite
/// (gathers, scaling, sums, the masked softmax), all query rows and the first alone.
fn check_deberta_probs(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    let (b, h, l, span) = (2usize, 3usize, 70usize, 16i64);
    let bucket = |sign: i64| -> Result<Tensor> {
        let ids: Vec<u32> = (0..l * l)
            .map(|x| (sign * ((x / l) as i64 - (x % l) as i64) + span).clamp(0, 2 * span - 1) as u32)
            .collect();
        Tensor::from_vec(ids, (l, l), dev)
    };
    let (c2p_idx, p2c_idx) = (bucket(1)?, bucket(-1)?);
    let (bias, _) = attention_masks(dev, b, l, None)?;
    let scale = (3.0f64 * 64.0).sqrt();
    for q in [l, 1] {
        let p = 2 * span as usize;
        let bf16 = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
            (randn(shape, dev)? * 8.0)?.to_dtype(DType::BF16)
        };
        let (qk, c2p, p2c) = (bf16((b, h, q, l))?, bf16((b, h, q, p))?, bf16((b, h, l, p))?);
        let composite = {
            let whole = |t: &Tensor| t.reshape((1, 1, l, l))?.broadcast_as((b, h, l, l))?.contiguous();
            let (ci, pi) =
                (whole(&c2p_idx)?.narrow(2, 0, q)?.contiguous()?, whole(&p2c_idx)?.narrow(3, 0, q)?.contiguous()?);
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            let scores =
                ((f(&qk)? + f(&c2p)?.gather(&ci, D::Minus1)?)? + f(&p2c)?.gather(&pi, D::Minus1)?.transpose(2, 3)?)?;
            masked_softmax(&(scores / scale)?, &bias, 1.0)?
        };
        set_fused(true);
        let fused =
            crate::layers::no_grad(|| deberta_probs_for_scoring(&qk, &c2p, &p2c, &c2p_idx, &p2c_idx, &bias, scale));
        set_fused_default();
        let fused = fused?.ok_or_else(|| candle_core::Error::Msg("the DeBERTa kernel did not apply".into()))?;
        let diff = relative_bf16(&fused, &composite)?;
        c.line(format!(
            "deberta attention probabilities [{b}, {h}, {q}, {l}], {p} positions: relative |values| {diff:.1e}"
        ));
        if !(fused.dtype() == DType::BF16 && diff < 3e-2) {
            c.fail();
        }
    }
    Ok(())
}

/// DeBERTa's attention probabilities in training (one kernel each way, dropout inside) against
/// the composite (gathers, scaling, sums, the masked softmax, the dropout kernel with the same
/// seed): values and the gradients of the three terms; all query rows and the first alone.
fn check_deberta_probs_training(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    let (b, h, l, span) = (2usize, 3usize, 70usize, 16i64);
    let bucket = |sign: i64| -> Result<Tensor> {
        let ids: Vec<u32> = (0..l * l)
            .map(|x| (sign * ((x / l) as i64 - (x % l) as i64) + span).clamp(0, 2 * span - 1) as u32)
            .collect();
        Tensor::from_vec(ids, (l, l), dev)
    };
    let (c2p_idx, p2c_idx) = (bucket(1)?, bucket(-1)?);
    let (bias, _) = attention_masks(dev, b, l, None)?;
    let (scale, p, pos) = ((3.0f64 * 64.0).sqrt(), 0.1f64, 2 * span as usize);
    for q in [l, 1] {
        let inputs = [(b, h, q, l), (b, h, q, pos), (b, h, l, pos)]
            .into_iter()
            .map(|s| randn(s, dev)? * 8.0)
            .collect::<Result<Vec<Tensor>>>()?;
        let upstream = (Tensor::arange(0u32, (b * h * q * l) as u32, dev)?.to_dtype(DType::F32)? * 0.37)?
            .sin()?
            .reshape((b, h, q, l))?;
        let run = |fused: bool| -> Result<Vec<Tensor>> {
            let vars: Vec<candle_core::Var> =
                inputs.iter().map(candle_core::Var::from_tensor).collect::<Result<_>>()?;
            let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            crate::layers::autocast(Some(DType::BF16));
            set_fused(fused);
            let y = if fused {
                let bf = |x: &Tensor| x.to_dtype(DType::BF16);
                let (qk, c2p, p2c) = (bf(t[0])?, bf(t[1])?, bf(t[2])?);
                deberta_probs_for_training(&qk, &c2p, &p2c, &c2p_idx, &p2c_idx, &bias, scale, Some((p, 42)))
                    .and_then(|y| y.to_dtype(DType::F32))
            } else {
                let whole = |x: &Tensor| x.reshape((1, 1, l, l))?.broadcast_as((b, h, l, l))?.contiguous();
                let (ci, pi) =
                    (whole(&c2p_idx)?.narrow(2, 0, q)?.contiguous()?, whole(&p2c_idx)?.narrow(3, 0, q)?.contiguous()?);
                let scores =
                    ((t[0] + t[1].gather(&ci, D::Minus1)?)? + t[2].gather(&pi, D::Minus1)?.transpose(2, 3)?)?;
                masked_softmax(&(scores / scale)?, &bias, 1.0).and_then(|pr| dropout(&pr, p, 42))
            };
            set_fused_default();
            crate::layers::autocast(None);
            let y = y?;
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            let mut out = vec![y];
            for v in &vars {
                out.push(
                    grads.get(v.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?,
                );
            }
            Ok(out)
        };
        let (f, composite) = (run(true)?, run(false)?);
        let d = relative_each(&f, &composite)?;
        c.line(format!(
            "deberta attention probabilities for training [{b}, {h}, {q}, {l}], {pos} positions, dropout {p}: relative |values| {:.1e}, |gradients of qk, c2p, p2c| {:.1e}, {:.1e}, {:.1e}",
            d[0], d[1], d[2], d[3]
        ));
        if !d.iter().all(|d| *d < 3e-2) {
            c.fail();
        }
    }
    Ok(())
}

/// Flash-style attention for training (dropout inside) against the composite.
fn check_attention_training(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    // Attention in training under autocast: the flash kernels (dropout inside) against the
    // composite (bf16 products, the masked softmax, the fused dropout with the same seed): values
    // and the gradients of q, k and v.
    for (b, h, l, d, window, p) in
        [(2usize, 3usize, 70usize, 32usize, None, 0.1f64), (2, 4, 100, 64, Some(16usize), 0.0)]
    {
        let (mask, full) = attention_masks(dev, b, l, window)?;
        let scale = 1.0 / (d as f64).sqrt();
        let inputs: Vec<Tensor> = (0..3).map(|_| randn((b, h, l, d), dev)).collect::<Result<_>>()?;
        let upstream = (Tensor::arange(0u32, (b * l * h * d) as u32, dev)?.to_dtype(DType::F32)? * 0.37)?
            .sin()?
            .reshape((b, l, h * d))?;
        let run = |flash: bool| -> Result<Vec<Tensor>> {
            let vars: Vec<candle_core::Var> =
                inputs.iter().map(candle_core::Var::from_tensor).collect::<Result<_>>()?;
            let (q, k, v) = (vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor());
            crate::layers::autocast(Some(DType::BF16));
            let y = if flash {
                set_fused(true);
                let y = flash_attention_for_training(q, k, v, &mask, scale, window, Some((p, 42)));
                set_fused_default();
                y.and_then(|y| y.ok_or_else(|| candle_core::Error::Msg("flash attention did not apply".into())))
            } else {
                let probs = crate::layers::matmul_in(q, &k.t()?, DType::BF16)
                    .and_then(|s| masked_softmax(&s, &full, scale))
                    .and_then(|pr| if p > 0.0 { dropout(&pr, p, 42) } else { Ok(pr) });
                probs.and_then(|pr| {
                    crate::layers::matmul_in(&pr, v, DType::BF16)?.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))
                })
            };
            crate::layers::autocast(None);
            let y = y?;
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            let mut out = vec![y];
            for v in &vars {
                out.push(
                    grads.get(v.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?,
                );
            }
            Ok(out)
        };
        let (f, composite) = (run(true)?, run(false)?);
        let d4: Vec<f32> = relative_each(&f, &composite)?;
        c.line(format!(
            "flash attention for training [{b}, {h}, {l}, {d}] window {window:?} dropout {p}: relative |values| {:.1e}, |gradients of q, k, v| {:.1e}, {:.1e}, {:.1e}",
            d4[0], d4[1], d4[2], d4[3]
        ));
        if d4.iter().any(|x| x.is_nan() || *x >= 3e-2) {
            c.fail();
        }
    }
    // The same from one joined product [B, L, 3 H D] (bf16, as a product comes) and its bias,
    // read in place, the context bf16, the product's gradient written joined and the bias's a
    // column sum: against the bias add, the head split and the composite; and with q and k
    // rotated as they load (ModernBERT's rotary embeddings, undone on their gradients).
    for (b, h, l, d, window, p, theta) in [
        (2usize, 3usize, 70usize, 32usize, None, 0.1f64, None),
        (2, 4, 100, 64, Some(16usize), 0.0, None),
        (2, 3, 70, 32, Some(16), 0.1, Some(10_000.0)),
        (2, 4, 100, 64, None, 0.0, Some(160_000.0)),
    ] {
        let (mask, full) = attention_masks(dev, b, l, window)?;
        let scale = 1.0 / (d as f64).sqrt();
        let table = theta.map(|t| crate::modernbert::rotary(l, d, t, dev)).transpose()?;
        let rope = table.as_ref().map(|(cos, sin)| Tensor::stack(&[cos, sin], 0)).transpose()?;
        let hd = h * d;
        let product = randn((b, l, 3 * hd), dev)?;
        let qkv_bias = (randn(3 * hd, dev)? * 0.5)?;
        let upstream = (Tensor::arange(0u32, (b * l * hd) as u32, dev)?.to_dtype(DType::F32)? * 0.37)?
            .sin()?
            .reshape((b, l, hd))?;
        let run = |flash: bool| -> Result<Vec<Tensor>> {
            let (pv, bv) = (candle_core::Var::from_tensor(&product)?, candle_core::Var::from_tensor(&qkv_bias)?);
            crate::layers::autocast(Some(DType::BF16));
            let x = pv.as_tensor().to_dtype(DType::BF16);
            let y = if flash {
                set_fused(true);
                let y = x.and_then(|x| {
                    flash_attention_for_training_packed(
                        &x,
                        Some(bv.as_tensor()),
                        &mask,
                        h,
                        scale,
                        window,
                        Some((p, 42)),
                        rope.as_ref(),
                    )
                });
                set_fused_default();
                y.and_then(|y| y.to_dtype(DType::F32))
            } else {
                x.and_then(|x| x.to_dtype(DType::F32)?.broadcast_add(bv.as_tensor())?.reshape((b, l, 3, h, d)))
                    .and_then(|split| {
                        let part = |i: usize| -> Result<Tensor> {
                            split.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()
                        };
                        let (mut q, mut k, v) = (part(0)?, part(1)?, part(2)?);
                        if let Some((cos, sin)) = &table {
                            (q, k) = (apply_rotary(&q, cos, sin)?, apply_rotary(&k, cos, sin)?);
                        }
                        let pr = masked_softmax(&crate::layers::matmul_in(&q, &k.t()?, DType::BF16)?, &full, scale)?;
                        let pr = if p > 0.0 { dropout(&pr, p, 42)? } else { pr };
                        crate::layers::matmul_in(&pr, &v, DType::BF16)?
                            .transpose(1, 2)?
                            .contiguous()?
                            .reshape((b, l, hd))
                    })
            };
            crate::layers::autocast(None);
            let y = y?;
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            let mut out = vec![y];
            for v in [&pv, &bv] {
                out.push(
                    grads.get(v.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?,
                );
            }
            Ok(out)
        };
        let (f, composite) = (run(true)?, run(false)?);
        let d3: Vec<f32> = relative_each(&f, &composite)?;
        c.line(format!(
            "flash attention for training from a joined product [{b}, {l}, 3 x {h} x {d}]{} window {window:?} dropout {p}: relative |values| {:.1e}, |gradients of the product, its bias| {:.1e}, {:.1e}",
            if theta.is_some() { ", q and k rotated" } else { "" },
            d3[0], d3[1], d3[2]
        ));
        if d3.iter().any(|x| x.is_nan() || *x >= 3e-2) || f[1].dtype() != DType::F32 {
            c.fail();
        }
    }
    check_deberta_probs_training(dev, c)
}

/// The scoring epilogues in bf16 (no graph) against the composite: bias, residual and layer
/// norm (with and without the linear bias and the shift), and bias with GELU. Relative to the
/// largest composite value: the composite rounds the sums to bf16 on the way, the kernel not.
fn check_scoring_epilogues(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    let bf16 = |shape: &[usize], scale: f64| -> Result<Tensor> { (randn(shape, dev)? * scale)?.to_dtype(DType::BF16) };
    // The widths of the models: hidden sizes for the norms; BERT-base's 3,072 feed-forward and
    // ModernBERT-base's 2 x 1,152 GeGLU input are wider than a norm row may be (2,048), where the
    // norms take the composite and the elementwise epilogues must still take their kernels.
    for (shape, with_bias) in
        [(vec![3usize, 5, 384], true), (vec![130, 768], false), (vec![2, 7, 1024], true), (vec![9, 3072], true)]
    {
        let cols = *shape.last().unwrap_or(&1);
        let (x, residual) = (bf16(&shape, 2.0)?, bf16(&shape, 1.0)?);
        let bias = bf16(&[cols], 0.5)?;
        let w = (randn(cols, dev)?.affine(0.5, 1.0)?).to_dtype(DType::BF16)?;
        let shift = bf16(&[cols], 1.0)?;
        let run = |fused: bool| -> Result<Vec<Tensor>> {
            set_fused(fused);
            let y = crate::layers::no_grad(|| -> Result<Vec<Tensor>> {
                let (b, s) = (with_bias.then_some(&bias), with_bias.then_some(&shift));
                let norm = add_norm_for_scoring(&x, b, &residual, &w, s, 1e-12)?;
                let (sum, norm2) = add_norm_sum_for_scoring(&x, b, &residual, &w, s, 1e-12)?;
                Ok(vec![norm, sum, norm2, bias_gelu_for_scoring(&x, &bias)?, geglu_for_scoring(&x)?])
            });
            set_fused_default();
            y
        };
        // Which kernels the fused run takes: a check of a composite against itself proves nothing.
        set_fused(true);
        let took = crate::layers::no_grad(|| {
            [
                super::epilogues::add_norm_applies(&x, &residual, &w),
                super::epilogues::bias_gelu_applies(&x, &bias),
                super::epilogues::geglu_applies(&x),
            ]
        });
        set_fused_default();
        let (f, composite) = (run(true)?, run(false)?);
        let d: Vec<f32> = f.iter().zip(&composite).map(|(a, b)| relative_bf16(a, b)).collect::<Result<_>>()?;
        c.line(format!(
            "scoring epilogues bf16 {shape:?} bias and shift {with_bias}: relative |add + norm| {:.1e}, |sum, its norm| {:.1e}, {:.1e}, |bias + gelu| {:.1e}, |geglu| {:.1e}",
            d[0], d[1], d[2], d[3], d[4]
        ));
        let norms_fit = cols <= super::MAX_NORM_COLS;
        if took != [norms_fit, true, true] {
            c.line(format!("scoring epilogues bf16 {shape:?}: kernels taken (add-norm, bias-gelu, geglu) {took:?}"));
            c.fail();
        }
        if !(f.iter().all(|t| t.dtype() == DType::BF16) && d.iter().all(|d| *d < 3e-2)) {
            c.fail();
        }
    }
    check_embed_norm(dev, c)
}

/// Scoring's embeddings and their norm in one kernel against the composite (each table gathered,
/// added in bf16, the norm in f32): BERT-base's three tables (with an id past the word table:
/// zeros) and ModernBERT's one with a norm without shift.
fn check_embed_norm(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    for (sizes, cols, shift) in [(vec![1000usize, 512, 2], 768usize, true), (vec![500], 384, false)] {
        let tables: Vec<Tensor> =
            sizes.iter().map(|n| (randn((*n, cols), dev)? * 0.5)?.to_dtype(DType::BF16)).collect::<Result<_>>()?;
        let ids: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(k, n)| {
                let v: Vec<u32> =
                    (0..3 * 37).map(|i| if k == 0 && i == 40 { *n as u32 + 5 } else { (i * 13 % n) as u32 }).collect();
                Tensor::from_vec(v, (3, 37), dev)
            })
            .collect::<Result<_>>()?;
        let w = (randn(cols, dev)?.affine(0.5, 1.0)?).to_dtype(DType::BF16)?;
        let b = (randn(cols, dev)? * 0.5)?.to_dtype(DType::BF16)?;
        let b = shift.then_some(&b);
        let (t, i): (Vec<&Tensor>, Vec<&Tensor>) = (tables.iter().collect(), ids.iter().collect());
        set_fused(true);
        let took = crate::layers::no_grad(|| embed_norm_applies(&t, &i));
        let fused = crate::layers::no_grad(|| embed_norm_for_scoring(&t, &i, &w, b, 1e-12));
        set_fused_default();
        let fused = fused?;
        // The composite: an id past a table gathers zeros, as the kernel's (and the gather's).
        let mut sum: Option<Tensor> = None;
        for (table, ids) in tables.iter().zip(&ids) {
            let n = table.dim(0)?;
            let valid = ids.lt(n as u32)?;
            let rows = table.index_select(&valid.where_cond(ids, &ids.zeros_like()?)?.flatten_all()?, 0)?;
            let rows = valid.flatten_all()?.unsqueeze(1)?.to_dtype(DType::BF16)?.broadcast_mul(&rows)?;
            sum = Some(match sum {
                Some(s) => (s + rows)?,
                None => rows,
            });
        }
        let Some(sum) = sum else { candle_core::bail!("embed norm check: no tables") };
        let sum = sum.to_dtype(DType::F32)?;
        let b32 = b.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let composite = layer_norm(&sum, &w.to_dtype(DType::F32)?, b32.as_ref(), 1e-12)?.to_dtype(DType::BF16)?;
        let d = relative_bf16(&fused.reshape((3 * 37, cols))?, &composite)?;
        c.line(format!(
            "embeddings and their norm bf16, {} tables x {cols}: relative |against the composite| {d:.1e}",
            sizes.len()
        ));
        if !took || fused.dtype() != DType::BF16 || fused.dims() != [3, 37, cols] || d >= 2e-2 {
            c.fail();
        }
    }
    Ok(())
}

/// The feed-forward's product, bias and GELU as one cuBLASLt call (bf16, no graph) against the
/// composite (the bf16 product, then bias and GELU's erf form in f32, rounded) and both against
/// the f32 computation: widths of BERT-base, MiniLM and an odd one.
fn check_matmul_epilogues(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    for (x_shape, n) in [(vec![130usize, 768], 3072usize), (vec![3, 5, 384], 1536), (vec![7, 96], 40)] {
        let k = *x_shape.last().unwrap_or(&1);
        let x = randn(x_shape.as_slice(), dev)?.to_dtype(DType::BF16)?;
        let w = (randn((n, k), dev)? * (1.0 / (k as f64).sqrt()))?.to_dtype(DType::BF16)?;
        let b = (randn(n, dev)? * 0.5)?.to_dtype(DType::BF16)?;
        set_fused(true);
        let took = crate::layers::no_grad(|| super::epilogues::matmul_bias_gelu_applies(&x, &w, &b));
        let fused = crate::layers::no_grad(|| matmul_bias_gelu_for_scoring(&x, &w, &b));
        set_fused_default();
        let Some(fused) = fused? else {
            c.line(format!("matmul + bias + gelu {x_shape:?} x [{n}, {k}]: not taken (applies {took})"));
            c.fail();
            continue;
        };
        let composite = crate::layers::no_grad(|| -> Result<Tensor> {
            let product = x.broadcast_matmul(&w.t()?)?;
            bias_gelu_for_scoring(&product, &b)
        })?;
        let f32_ref = x
            .to_dtype(DType::F32)?
            .broadcast_matmul(&w.to_dtype(DType::F32)?.t()?)?
            .broadcast_add(&b.to_dtype(DType::F32)?)?
            .gelu_erf()?;
        let (d, df, dc) = (
            relative_bf16(&fused, &composite)?,
            relative_bf16(&fused, &f32_ref)?,
            relative_bf16(&composite, &f32_ref)?,
        );
        c.line(format!(
            "matmul + bias + gelu bf16 {x_shape:?} x [{n}, {k}]: relative |against the composite| {d:.1e}, |against f32| {df:.1e} (the composite's {dc:.1e})"
        ));
        if !(took
            && fused.dtype() == DType::BF16
            && fused.dims() == composite.dims()
            && d < 2e-2
            && df <= 2.0 * dc + 2e-3)
        {
            c.fail();
        }
    }
    Ok(())
}

/// Whole backbones under autocast, every fused kernel against none.
fn check_backbones(dev: &candle_core::Device, c: &mut Checks) -> Result<()> {
    // Whole backbones under autocast, every fused kernel against none: a BERT, a ModernBERT and a
    // DeBERTa-v3 of head size 32 (two layers, random weights; ModernBERT's second layer local with
    // a window of 8; DeBERTa with 16 position buckets), padded rows; the scores and the gradient
    // of every parameter.
    let config_of = |model_type: &str| match model_type {
        "bert" => {
            serde_json::json!({"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 128, "max_position_embeddings": 64, "type_vocab_size": 2, "pad_token_id": 0})
        }
        "deberta-v2" => serde_json::json!({"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64, "type_vocab_size": 0,
                "pad_token_id": 0, "relative_attention": true, "position_buckets": 16, "max_relative_positions": -1,
                "pos_att_type": ["p2c", "c2p"], "share_att_key": true, "position_biased_input": false,
                "norm_rel_ebd": "layer_norm", "pooler_hidden_size": 64, "layer_norm_eps": 1e-7}),
        _ => serde_json::json!({"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 96, "pad_token_id": 0, "local_attention": 16, "global_attn_every_n_layers": 2}),
    };
    for model_type in ["bert", "modernbert", "deberta-v2"] {
        let config = config_of(model_type);
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, dev);
        let (backbone, _) = crate::cross_encoder::Backbone::from_config(model_type, config, vb)
            .map_err(|e| candle_core::Error::Msg(format!("{model_type}: {e}")))?;
        // The matrices drawn again from the seeded generator (uniform within 1 / sqrt(fan-in), as
        // the loader's own initialisation); vectors are constants (zeros, ones) already.
        {
            let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            for name in names {
                let var = &data[name];
                if let &[rows, cols] = var.as_tensor().dims() {
                    let bound = 1.0 / (cols as f32).sqrt();
                    var.set(&rand(-bound, bound, (rows, cols), dev)?)?;
                }
            }
        }
        let (rows, len) = (3usize, 40usize);
        let ids = rand(1f32, 99.0, (rows, len), dev)?.to_dtype(DType::U32)?;
        let types = Tensor::zeros((rows, len), DType::U32, dev)?;
        let lengths = [40usize, 23, 31];
        let mask: Vec<u32> = (0..rows * len).map(|i| u32::from(i % len < lengths[i / len])).collect();
        let mask = Tensor::from_vec(mask, (rows, len), dev)?;
        let weights = Tensor::new(&[1f32, -2.0, 0.5], dev)?;
        let run = |fused: bool| -> Result<(Tensor, Vec<(String, Tensor)>)> {
            set_fused(fused);
            crate::layers::autocast(Some(DType::BF16));
            let scores = backbone.forward(&ids, &types, &mask, false);
            crate::layers::autocast(None);
            set_fused_default();
            let scores = scores?;
            let grads = (&scores * &weights)?.sum_all()?.backward()?;
            let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            let mut out = Vec::new();
            for (name, var) in data.iter() {
                let g = grads.get(var.as_tensor()).cloned();
                out.push((name.clone(), g.ok_or_else(|| candle_core::Error::Msg(format!("{name}: no gradient")))?));
            }
            Ok((scores, out))
        };
        // Which training kernels the fused run takes (counted; unless a caller counts already):
        // BERT's attention from the joined product and its block ends, ModernBERT's attention from
        // Wqkv's product and its GeGLU, each way.
        let counting = !candle_core::op_stats::enabled();
        if counting {
            candle_core::op_stats::take();
            candle_core::op_stats::set_enabled(true);
        }
        let fused_run = run(true);
        let taken: Vec<&str> = if counting {
            candle_core::op_stats::set_enabled(false);
            candle_core::op_stats::take()
                .into_iter()
                .filter(|((k, _), _)| *k == "custom")
                .map(|((_, n), _)| n)
                .collect()
        } else {
            Vec::new()
        };
        let ((sf, gf), (sc, gc)) = (fused_run?, run(false)?);
        let expected: &[&str] = match model_type {
            "bert" if counting => &[
                "distill-flash-attention-train",
                "distill-flash-attention-train-grad",
                "distill-add-norm-train",
                "distill-add-norm-train-grad",
            ],
            "deberta-v2" if counting => &[
                "distill-deberta-probs-train",
                "distill-deberta-probs-train-grad",
                "distill-add-norm-train",
                "distill-add-norm-train-grad",
            ],
            "modernbert" if counting => &[
                "distill-flash-attention-train",
                "distill-flash-attention-train-grad",
                "distill-geglu",
                "distill-geglu-grad",
            ],
            _ => &[],
        };
        if let Some(missing) = expected.iter().find(|k| !taken.contains(k)) {
            c.line(format!("{model_type} under autocast, all fused: {missing} not taken (took {taken:?})"));
            c.fail();
        }
        let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6))
        };
        // The scores against f32 (no autocast, no fused kernels): the fused path about as close as
        // the composite under autocast (this small random model's scores move by a few percent
        // with bf16 products either way), and close to it.
        let reference = {
            set_fused(false);
            let s = crate::layers::no_grad(|| backbone.forward(&ids, &types, &mask, false));
            set_fused_default();
            s?
        };
        let (fused_err, composite_err) = (rel(&sf, &reference)?, rel(&sc, &reference)?);
        let scores = rel(&sf, &sc)?;
        // Each gradient's difference over its own largest value, or over a hundredth of the
        // largest of all where it is smaller (the key bias's gradient is zero up to rounding:
        // softmax ignores a constant added to a row).
        let composite: std::collections::HashMap<_, _> = gc.into_iter().collect();
        let mut top = 0f32;
        for g in composite.values() {
            top = top.max(g.abs()?.max_all()?.to_scalar::<f32>()?);
        }
        let mut worst = (0f32, String::new());
        for (name, g) in &gf {
            let c = &composite[name];
            let floor = c.abs()?.max_all()?.to_scalar::<f32>()?.max(top * 1e-2).max(1e-12);
            let d = (g - c)?.abs()?.max_all()?.to_scalar::<f32>()? / floor;
            if d.is_nan() || d > worst.0 {
                worst = (d, name.clone());
            }
        }
        c.line(format!(
            "{model_type} of head size 32 under autocast, all fused: relative |scores| {scores:.1e} (from f32: fused {fused_err:.1e}, composite {composite_err:.1e}), worst |gradient| {:.1e} ({})",
            worst.0, worst.1
        ));
        if !(scores < 5e-2 && fused_err <= 2.0 * composite_err + 1e-2 && worst.0 < 5e-2) {
            c.fail();
        }
        // Scoring in bf16 (the weights in bf16, no graph): the fused path (BERT's and
        // ModernBERT's attention from the joined product, ModernBERT's rotary inside it and its
        // residual adds inside the next norm) against the composite; with the last layer for the
        // first token only and in full (ModernBERT's last MLP then ends in the final norm).
        // (A VarBuilder over a VarMap hands out its variables as they are: bf16 copies first.)
        let bf16_vars = candle_nn::VarMap::new();
        {
            let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            let mut copies = bf16_vars.data().lock().unwrap_or_else(|e| e.into_inner());
            for (name, var) in data.iter() {
                copies.insert(name.clone(), candle_core::Var::from_tensor(&var.as_tensor().to_dtype(DType::BF16)?)?);
            }
        }
        let vb = candle_nn::VarBuilder::from_varmap(&bf16_vars, DType::BF16, dev);
        let (scorer, _) = crate::cross_encoder::Backbone::from_config(model_type, config_of(model_type), vb)
            .map_err(|e| candle_core::Error::Msg(format!("{model_type}: {e}")))?;
        // Both against the f32 scores of the same weights: the fused path must be about as close
        // as the composite bf16 path (on scores this small both are some bf16 steps away; a wrong
        // rotation or a lost residual is off by the scores' size).
        for first_only in [true, false] {
            let score = |model: &crate::cross_encoder::Backbone, fused: bool| -> Result<Tensor> {
                set_fused(fused);
                crate::layers::first_token_only(first_only);
                let s = crate::layers::no_grad(|| model.forward(&ids, &types, &mask, false));
                crate::layers::first_token_only(true);
                set_fused_default();
                s
            };
            let reference = score(&backbone, false)?;
            let (fused, composite) =
                (rel(&score(&scorer, true)?, &reference)?, rel(&score(&scorer, false)?, &reference)?);
            c.line(format!(
                "{model_type} of head size 32 scoring in bf16, first token only {first_only}: relative |scores - f32| all fused {fused:.1e}, composite {composite:.1e}"
            ));
            if fused.is_nan() || fused > 2.0 * composite + 1e-2 {
                c.fail();
            }
        }
    }
    Ok(())
}

/// Largest absolute differences of parameters and moments after three AdamW steps fused (the
/// kernels `fused` turns on) and composite, from the same start and gradients: parameters of
/// `shapes`, named so that every other one is a bias (weight decay off) and the rest weights.
fn adamw_difference(dev: &candle_core::Device, shapes: &[&[usize]], fused: &dyn Fn()) -> Result<(f32, f32)> {
    use crate::optim::{AdamW, AdamWConfig, Grads};
    let names: Vec<String> =
        (0..shapes.len()).map(|i| format!("layer{i:03}.{}", if i % 2 == 0 { "bias" } else { "weight" })).collect();
    let start: Vec<Tensor> = shapes.iter().map(|s| randn(*s, dev)).collect::<Result<_>>()?;
    let grads: Vec<Vec<Tensor>> =
        (0..3).map(|_| shapes.iter().map(|s| randn(*s, dev)).collect::<Result<_>>()).collect::<Result<_>>()?;
    let run = |on: bool| -> Result<Vec<Tensor>> {
        let varmap = candle_nn::VarMap::new();
        {
            let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for (name, t) in names.iter().zip(&start) {
                data.insert(name.clone(), candle_core::Var::from_tensor(&t.copy()?)?);
            }
        }
        let mut opt = AdamW::new(&varmap, AdamWConfig { weight_decay: 0.1, ..Default::default() })?;
        if on {
            fused()
        } else {
            set_fused(false)
        }
        let mut result = Ok(());
        for (step, g) in grads.iter().enumerate() {
            // Parameters in name order, as the names are made. The last steps clipped by the
            // global norm, computed on the device (the fused update scales inside).
            let g = Grads(g.iter().map(|t| Some(t.clone())).collect());
            result = result.and_then(|_| match step {
                0 => opt.update(&g, 1e-2),
                _ => {
                    let clip = g.clip_on_device(5.0 * step as f64)?;
                    opt.update_scaled(&g, 1e-2, clip.as_ref().map(|(_, coef)| coef))
                }
            });
        }
        set_fused_default();
        result?;
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Tensor> = names.iter().map(|n| data[n].as_tensor().clone()).collect();
        let mut state: Vec<_> = opt.state().into_iter().collect();
        state.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(state.into_iter().map(|(_, t)| t));
        Ok(out)
    };
    let (fused, composite) = (run(true)?, run(false)?);
    let mut worst = [0f32; 2];
    for (i, (a, b)) in fused.iter().zip(&composite).enumerate() {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let slot = &mut worst[usize::from(i >= names.len())];
        *slot = slot.max(d);
    }
    Ok((worst[0], worst[1]))
}
