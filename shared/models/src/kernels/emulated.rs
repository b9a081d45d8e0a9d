//! The CUDA kernels themselves (kernels.cu compiled for the CPU by `distill-cuda-emu`), launched
//! with the descriptions of launch.rs that the CUDA path runs, against the CPU implementations
//! of the same ops in mod.rs: the CUDA code's indexing, warp reductions, argument order and
//! launch geometry are tested here without a GPU (the GPU check, `distill-bench
//! --check-kernels`, compares against candle's composite ops on the card).

use super::launch::{Elem, Launch, Param};
use super::*;
use candle_core::{CustomOp1, CustomOp2, Device, Tensor};
use distill_cuda_emu::Arg;

enum Buf {
    F32(Vec<f32>),
    U32(Vec<u32>),
    /// bf16 bits
    Bf16(Vec<u16>),
}

impl Buf {
    fn f32(&self) -> &[f32] {
        match self {
            Buf::F32(v) => v,
            _ => panic!("not an f32 buffer"),
        }
    }

    fn held(&self) -> (Elem, usize) {
        match self {
            Buf::F32(v) => (Elem::F32, v.len()),
            Buf::U32(v) => (Elem::U32, v.len()),
            Buf::Bf16(v) => (Elem::Bf16, v.len()),
        }
    }

    fn bits(&self) -> &[u16] {
        match self {
            Buf::Bf16(v) => v,
            _ => panic!("not a bf16 buffer"),
        }
    }
}

/// Runs `launch` in the emulator with `bufs` as its buffers.
fn run(launch: &Launch, bufs: &mut [Buf]) {
    run_at(launch, bufs, &[]);
}

/// [`run`] with each buffer passed from element `offsets[i]` on (0 past the list): a view that
/// starts mid-allocation, as a narrowed tensor's does (no longer 16-byte aligned).
///
/// Each buffer must hold exactly what the launch reaches (`Launch::bufs`, which the CUDA path
/// checks its buffers against): with AddressSanitizer a kernel reaching one element further
/// fails. A buffer the launch does not touch is passed as a null pointer.
fn run_at(launch: &Launch, bufs: &mut [Buf], offsets: &[usize]) {
    assert_eq!(bufs.len(), launch.bufs.len(), "{}: buffers passed and buffers of the launch", launch.kernel);
    for (i, (need, buf)) in launch.bufs.iter().zip(bufs.iter()).enumerate() {
        let (elem, len) = buf.held();
        let len = len - offsets.get(i).copied().unwrap_or(0);
        assert!(
            need.len == 0 || (elem == need.elem && len == need.len),
            "{}: buffer {i} holds {len} {elem:?} elements, the launch reaches {} {:?}",
            launch.kernel,
            need.len,
            need.elem
        );
    }
    if launch.grid == 0 {
        return;
    }
    let args = launch
        .params
        .iter()
        .map(|p| match p {
            Param::Buf(i) => {
                let at = offsets.get(*i).copied().unwrap_or(0);
                let unused = launch.bufs[*i].len == 0;
                match &mut bufs[*i] {
                    Buf::F32(_) if unused => Arg::F32(std::ptr::null_mut()),
                    Buf::U32(_) if unused => Arg::U32(std::ptr::null_mut()),
                    Buf::Bf16(_) if unused => Arg::Bf16(std::ptr::null_mut()),
                    Buf::F32(v) => Arg::F32(v[at..].as_mut_ptr()),
                    Buf::U32(v) => Arg::U32(v[at..].as_mut_ptr()),
                    Buf::Bf16(v) => Arg::Bf16(v[at..].as_mut_ptr()),
                }
            }
            Param::I64(v) => Arg::I64(*v),
            Param::U64(v) => Arg::U64(*v),
            Param::F32(v) => Arg::Float(*v),
            Param::List(l) => {
                let list = l.fill(|i| match &mut bufs[i] {
                    Buf::F32(v) => v.as_mut_ptr() as u64,
                    _ => panic!("a list of f32 tensors"),
                });
                // SAFETY: TensorList is repr(C), 2,824 bytes: 353 words.
                let words: [u64; 353] = unsafe { std::mem::transmute(list) };
                Arg::Struct(words.to_vec())
            }
        })
        .collect();
    // SAFETY: every buffer holds what the launch reaches (checked above); the unused are null.
    unsafe { distill_cuda_emu::launch(launch.kernel, [launch.grid, 1, 1], [launch.block, 1, 1], args) }
        .unwrap_or_else(|e| panic!("{}: {e}", launch.kernel));
}

/// Deterministic values in about [-scale, scale].
fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 * 0.7131 + seed as f32 * 1.37).sin() * 43_758.547).fract() * 2.0 * scale).collect()
}

fn cpu1(op: impl CustomOp1, x: &[f32], shape: &[usize]) -> Vec<f32> {
    let t = Tensor::from_slice(x, shape, &Device::Cpu).unwrap();
    t.apply_op1_no_bwd(&op).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn cpu2(op: impl CustomOp2, a: &[f32], sa: &[usize], b: &Tensor) -> Vec<f32> {
    let t = Tensor::from_slice(a, sa, &Device::Cpu).unwrap();
    t.apply_op2_no_bwd(b, &op).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn tensor(x: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(x, shape, &Device::Cpu).unwrap()
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (i, d) = got.iter().zip(want).map(|(g, w)| (g - w).abs()).enumerate().fold((0, 0f32), |(bi, bd), (i, d)| {
        if d > bd || d.is_nan() {
            (i, d)
        } else {
            (bi, bd)
        }
    });
    assert!(d <= tol, "{what}: element {i}: {} against {} (tolerance {tol})", got[i], want[i]);
}

#[test]
fn gelu_and_its_gradient() {
    // 1,000 elements: four blocks, the last one partly idle.
    for n in [1000usize, 7] {
        let x = values(n, 1, 4.0);
        let g = values(n, 2, 1.0);
        let mut bufs = [Buf::F32(x.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::elementwise("distill_gelu_erf_f32", 2, n), &mut bufs);
        // The CPU kernel's erf is a fit (fractional error < 1.2e-7), the CUDA one libm's.
        assert_close("gelu", bufs[1].f32(), &cpu1(GeluErf, &x, &[n]), 1e-5);
        let mut bufs = [Buf::F32(x.clone()), Buf::F32(g.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::elementwise("distill_gelu_erf_grad_f32", 3, n), &mut bufs);
        assert_close("gelu grad", bufs[2].f32(), &cpu2(GeluErfGrad, &x, &[n], &tensor(&g, &[n])), 1e-5);
    }
}

#[test]
fn softmax_and_its_gradient() {
    // Rows not a multiple of the warps per block; columns under, at and over a warp's width.
    for (rows, cols) in [(10usize, 100usize), (3, 32), (5, 7), (2, 384)] {
        let n = rows * cols;
        let x = values(n, 3, 6.0);
        let g = values(n, 4, 1.0);
        let mut bufs = [Buf::F32(x.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::rows("distill_softmax_f32", 2, rows, cols, None), &mut bufs);
        let y = bufs[1].f32().to_vec();
        assert_close("softmax", &y, &cpu1(Softmax, &x, &[rows, cols]), 1e-6);
        let mut bufs = [Buf::F32(y.clone()), Buf::F32(g.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::rows("distill_softmax_grad_f32", 3, rows, cols, Some(0.125)), &mut bufs);
        let want = cpu2(SoftmaxGrad { scale: 0.125 }, &y, &[rows, cols], &tensor(&g, &[rows, cols]));
        assert_close("softmax grad", bufs[2].f32(), &want, 1e-6);
    }
}

#[test]
fn masked_softmax_reads_the_mask_in_place() {
    // Scores [B, H, Q, K] with a padding mask [B, 1, 1, K] and a full mask [B, 1, Q, K]; one
    // row of the full mask has every key masked (the kernel's -inf guard).
    let (b, h, q, k) = (2usize, 3usize, 5usize, 7usize);
    let x = values(b * h * q * k, 5, 4.0);
    for mask_rows in [1usize, q] {
        let mut bias: Vec<f32> = (0..b * mask_rows * k).map(|i| if i % 5 == 4 { -1e9 } else { 0.0 }).collect();
        if mask_rows == q {
            bias[k..2 * k].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
        }
        let (sx, sb) = ([b, h, q, k], [b, 1, mask_rows, k]);
        let strides = bias_strides(&Layout::contiguous(&sx[..]), &Layout::contiguous(&sb[..])).unwrap();
        let mut bufs = [Buf::F32(x.clone()), Buf::F32(bias.clone()), Buf::F32(vec![f32::NAN; x.len()])];
        run(&Launch::masked_softmax(b * h * q, k, strides, 0.3), &mut bufs);
        let want = cpu2(MaskedSoftmax { scale: 0.3 }, &x, &sx, &tensor(&bias, &sb));
        let got = bufs[2].f32();
        // A fully masked row is NaN on both sides (0 / 0); compare the rest.
        let keep: Vec<usize> = (0..got.len()).filter(|&i| !want[i].is_nan()).collect();
        let pick = |v: &[f32]| keep.iter().map(|&i| v[i]).collect::<Vec<f32>>();
        assert_close(&format!("masked softmax, mask rows {mask_rows}"), &pick(got), &pick(&want), 1e-6);
        assert_eq!(got.iter().filter(|v| v.is_nan()).count(), want.iter().filter(|v| v.is_nan()).count());
    }
}

#[test]
fn layer_norm_normalisation_and_its_gradient() {
    for (rows, cols) in [(9usize, 384usize), (4, 33)] {
        let n = rows * cols;
        let x: Vec<f32> = values(n, 6, 3.0).iter().enumerate().map(|(i, v)| v + (i / cols) as f32).collect();
        let g = values(n, 7, 1.0);
        let mut bufs = [Buf::F32(x.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::rows("distill_normalize_f32", 2, rows, cols, Some(1e-12)), &mut bufs);
        assert_close("normalize", bufs[1].f32(), &cpu1(Normalize { eps: 1e-12 }, &x, &[rows, cols]), 2e-5);
        let mut bufs = [Buf::F32(x.clone()), Buf::F32(g.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::rows("distill_normalize_grad_f32", 3, rows, cols, Some(1e-5)), &mut bufs);
        let want = cpu2(NormalizeGrad { eps: 1e-5 }, &x, &[rows, cols], &tensor(&g, &[rows, cols]));
        assert_close("normalize grad", bufs[2].f32(), &want, 2e-5);
    }
}

#[test]
fn dropout_draws_the_cpu_mask() {
    let n = 3000;
    let x = values(n, 8, 2.0);
    let mut bufs = [Buf::F32(x.clone()), Buf::F32(vec![f32::NAN; n])];
    run(&Launch::dropout(n, 42, 0.1), &mut bufs);
    let want = cpu1(Dropout { seed: 42, p: 0.1 }, &x, &[n]);
    assert_close("dropout", bufs[1].f32(), &want, 1e-6);
    let dropped = want.iter().filter(|v| **v == 0.0).count();
    assert!((200..400).contains(&dropped), "{dropped} of {n} dropped at p = 0.1");
}

#[test]
fn embedding_gather_and_scatter() {
    let (vocab, dim) = (11usize, 40usize);
    let table = values(vocab * dim, 9, 1.0);
    // Repeated ids, so the scatter's atomic adds meet on one row.
    let ids: Vec<u32> = vec![3, 0, 10, 3, 3, 7, 0, 1, 3];
    let n = ids.len();
    let mut bufs = [Buf::F32(table.clone()), Buf::U32(ids.clone()), Buf::F32(vec![f32::NAN; n * dim])];
    run(&Launch::rows_by_id("distill_gather_rows_f32", n, dim, vocab), &mut bufs);
    let id_t = Tensor::from_slice(&ids, n, &Device::Cpu).unwrap();
    assert_close("gather", bufs[2].f32(), &cpu2(Gather, &table, &[vocab, dim], &id_t), 0.0);

    let g = values(n * dim, 10, 1.0);
    let mut bufs = [Buf::F32(g.clone()), Buf::U32(ids), Buf::F32(vec![0.0; vocab * dim])];
    run(&Launch::rows_by_id("distill_scatter_add_rows_f32", n, dim, vocab), &mut bufs);
    assert_close("scatter", bufs[2].f32(), &cpu2(ScatterRows { vocab }, &g, &[n, dim], &id_t), 1e-6);
}

#[test]
fn adamw_updates_in_place_as_the_composite() {
    let n = 700;
    let (p, m, v, g) = (values(n, 11, 1.0), values(n, 12, 0.1), values(n, 13, 0.01), values(n, 14, 1.0));
    let v: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    let c = [0.999f32, 0.9, 0.999, 0.5, 1e-3, 1e-8];
    // The gradient scaled by a clipping coefficient read on the device.
    let scale = 0.25f32;
    let mut bufs =
        [Buf::F32(p.clone()), Buf::F32(m.clone()), Buf::F32(v.clone()), Buf::F32(g.clone()), Buf::F32(vec![scale])];
    run(&Launch::adamw(n, c), &mut bufs);
    let [decay, b1, b2, bc2, step, eps] = c;
    let g: Vec<f32> = g.iter().map(|g| g * scale).collect();
    for i in 0..n {
        let mi = b1 * m[i] + (1.0 - b1) * g[i];
        let vi = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let pi = p[i] * decay - step * (mi / ((vi / bc2).sqrt() + eps));
        assert!((bufs[1].f32()[i] - mi).abs() < 1e-6 && (bufs[2].f32()[i] - vi).abs() < 1e-6, "moments at {i}");
        assert!((bufs[0].f32()[i] - pi).abs() < 1e-6, "parameter at {i}: {} against {pi}", bufs[0].f32()[i]);
    }
}

#[test]
fn adamw_list_updates_every_tensor_in_place() {
    // Three tensors, each its own decay; a grid smaller than the largest needs (the stride loop)
    // and the small tensors' blocks going round the grid.
    let sizes = [700usize, 5, 2000];
    let decay = [0.999f32, 1.0, 0.99];
    let c = [0.9f32, 0.999, 0.5, 1e-3, 1e-8];
    let scale = 0.25f32;
    let mut bufs = Vec::new();
    let mut start = Vec::new();
    for (t, &n) in sizes.iter().enumerate() {
        let s = 10 * t as u32;
        let v: Vec<f32> = values(n, s + 3, 0.01).iter().map(|x| x.abs()).collect();
        start.push([values(n, s + 1, 1.0), values(n, s + 2, 0.1), v, values(n, s + 4, 1.0)]);
        bufs.extend(start[t].iter().map(|x| Buf::F32(x.clone())));
    }
    bufs.push(Buf::F32(vec![scale]));
    let mut launch = Launch::adamw_list(&sizes, &decay, c);
    launch.grid = 3;
    run(&launch, &mut bufs);
    let [b1, b2, bc2, step, eps] = c;
    for (t, [p, m, v, g]) in start.iter().enumerate() {
        for i in 0..sizes[t] {
            let gi = g[i] * scale;
            let mi = b1 * m[i] + (1.0 - b1) * gi;
            let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
            let pi = p[i] * decay[t] - step * (mi / ((vi / bc2).sqrt() + eps));
            let got = [bufs[4 * t].f32()[i], bufs[4 * t + 1].f32()[i], bufs[4 * t + 2].f32()[i]];
            assert!((got[1] - mi).abs() < 1e-6 && (got[2] - vi).abs() < 1e-6, "moments of tensor {t} at {i}");
            assert!((got[0] - pi).abs() < 1e-6, "tensor {t} at {i}: {} against {pi}", got[0]);
        }
        assert_eq!(bufs[4 * t + 3].f32(), g.as_slice(), "gradient {t} left as it was");
    }
}

#[test]
fn sum_squares_list_over_gradients() {
    // Several gradients into one accumulator, with a capped grid (the stride loop) and sizes
    // from part of one block to many.
    let sizes = [70usize, 1000, 3, 30_000];
    let mut bufs: Vec<Buf> = sizes.iter().enumerate().map(|(i, &n)| Buf::F32(values(n, 40 + i as u32, 1.0))).collect();
    let want: f64 = bufs.iter().map(|b| b.f32().iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>()).sum();
    bufs.push(Buf::F32(vec![0.5]));
    let mut launch = Launch::sum_squares_list(&sizes);
    assert_eq!(launch.grid, 118);
    launch.grid = 5;
    run(&launch, &mut bufs);
    let got = bufs[sizes.len()].f32()[0] as f64 - 0.5;
    assert!((got - want).abs() / want < 1e-5, "sum of squares {got} against {want}");
    assert!(Launch::sum_squares_list(&[300_000_000]).grid <= 1024);
}

#[test]
fn layer_norm_with_weights_and_their_gradients() {
    // 150 rows: ten blocks of the column sums, the last one part full.
    for (rows, cols, has_bias) in [(150usize, 48usize, true), (5, 384, false)] {
        let n = rows * cols;
        let x = values(n, 15, 2.0);
        let (w, b, g) = (values(cols, 16, 1.0), values(cols, 17, 1.0), values(n, 18, 1.0));
        let shape = [rows, cols];
        let op = || LayerNormOp { eps: 1e-5, has_bias };
        let mut bufs = [Buf::F32(x.clone()), Buf::F32(w.clone()), Buf::F32(b.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::layer_norm(rows, cols, 1e-5, has_bias), &mut bufs);
        let want = tensor(&x, &shape).apply_op3_no_bwd(&tensor(&w, &[cols]), &tensor(&b, &[cols]), &op()).unwrap();
        assert_close("layer norm", bufs[3].f32(), &want.flatten_all().unwrap().to_vec1().unwrap(), 2e-5);

        let mut bufs = [Buf::F32(x.clone()), Buf::F32(w.clone()), Buf::F32(g.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::layer_norm_grad(rows, cols, 1e-5), &mut bufs);
        let want = tensor(&x, &shape)
            .apply_op3_no_bwd(&tensor(&w, &[cols]), &tensor(&g, &shape), &LayerNormGrad { eps: 1e-5 })
            .unwrap();
        assert_close("layer norm grad", bufs[3].f32(), &want.flatten_all().unwrap().to_vec1().unwrap(), 2e-5);

        let mut bufs = [Buf::F32(x.clone()), Buf::F32(g.clone()), Buf::F32(vec![0.0; 2 * cols])];
        run(&Launch::layer_norm_wgrad(rows, cols, 1e-5), &mut bufs);
        let want = cpu2(LayerNormWGrad { eps: 1e-5 }, &x, &shape, &tensor(&g, &shape));
        assert_close("layer norm weight grads", bufs[2].f32(), &want, 1e-4);
    }
}

#[test]
fn bias_add_and_its_column_sum() {
    // 64 columns: bf16 x 8 elements a load; 300 and 7 one at a time.
    for (rows, cols) in [(130usize, 300usize), (3, 7), (5, 64)] {
        let n = rows * cols;
        let (x, b) = (values(n, 19, 1.0), values(cols, 20, 1.0));
        let mut bufs = [Buf::F32(x.clone()), Buf::F32(b.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::bias_add(false, n, cols), &mut bufs);
        assert_close("bias add", bufs[2].f32(), &cpu2(BiasAdd, &x, &[rows, cols], &tensor(&b, &[cols])), 0.0);

        // From a bf16 input (an autocast matmul's output): cast and bias in one pass.
        let xb: Vec<half::bf16> = x.iter().map(|v| half::bf16::from_f32(*v)).collect();
        let mut bufs =
            [Buf::Bf16(xb.iter().map(|v| v.to_bits()).collect()), Buf::F32(b.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::bias_add(true, n, cols), &mut bufs);
        let xt = Tensor::from_vec(xb, (rows, cols), &Device::Cpu).unwrap();
        let want: Vec<f32> =
            xt.apply_op2_no_bwd(&tensor(&b, &[cols]), &BiasAdd).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_close("bias add from bf16", bufs[2].f32(), &want, 0.0);
        let composite: Vec<f32> = xt
            .to_dtype(DType::F32)
            .unwrap()
            .broadcast_add(&tensor(&b, &[cols]))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_close("bias add from bf16 against the composite", &want, &composite, 0.0);

        let mut bufs = [Buf::F32(x.clone()), Buf::F32(vec![0.0; cols])];
        run(&Launch::column_sum(rows, cols), &mut bufs);
        assert_close("column sum", bufs[1].f32(), &cpu1(ColumnSum, &x, &[rows, cols]), 1e-4);
    }
}

/// f32 values as bf16 bits and as the bf16 tensor of those values.
fn bf16_bits(x: &[f32], shape: &[usize]) -> (Vec<u16>, Tensor) {
    let v: Vec<half::bf16> = x.iter().map(|v| half::bf16::from_f32(*v)).collect();
    (v.iter().map(|v| v.to_bits()).collect(), Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
}

fn widen(bits: &Buf) -> Vec<f32> {
    let Buf::Bf16(v) = bits else { panic!("not a bf16 buffer") };
    v.iter().map(|v| half::bf16::from_bits(*v).to_f32()).collect()
}

#[test]
fn scoring_embeddings_and_their_norm() {
    // Three tables at 768 columns (8 a load), an id past the word table (zeros); one table at 100
    // columns (one a load), two at 384; 7 tokens (not a multiple of the warps per block).
    for (tables, cols) in [(3usize, 768usize), (1, 100), (2, 384)] {
        let rows = 7;
        let sizes = [50usize, 20, 2];
        let parts: Vec<(Vec<u16>, Tensor)> =
            (0..3).map(|k| bf16_bits(&values(sizes[k] * cols, 61 + k as u32, 1.0), &[sizes[k], cols])).collect();
        let ids: Vec<Vec<u32>> = (0..3)
            .map(|k| (0..rows).map(|r| if k == 0 && r == 3 { 57 } else { ((r * 7 + k) % sizes[k]) as u32 }).collect())
            .collect();
        let mut params = values(cols, 64, 0.5).iter().map(|w| w + 1.0).collect::<Vec<f32>>();
        params.extend(values(cols, 65, 1.0));
        let id_t: Vec<Tensor> =
            ids[..tables].iter().map(|v| Tensor::from_vec(v.clone(), rows, &Device::Cpu).unwrap()).collect();
        let op = EmbedNorm { ids: id_t, params: tensor(&params, &[2 * cols]), eps: 1e-12 };
        let t = |k: usize| parts[if k < tables { k } else { 0 }].1.clone();
        let want = t(0).apply_op3_no_bwd(&t(1), &t(2), &op).unwrap();
        assert_eq!(want.dims(), [rows, cols]);
        let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let table = |k: usize| Buf::Bf16(parts[if k < tables { k } else { 0 }].0.clone());
        let mut bufs = [
            table(0),
            table(1),
            table(2),
            Buf::U32(ids[0].clone()),
            Buf::U32(ids[1].clone()),
            Buf::U32(ids[2].clone()),
            Buf::F32(params.clone()),
            Buf::Bf16(vec![0x7fc0; rows * cols]),
        ];
        let n = [0, 1, 2].map(|k| if k < tables { sizes[k] } else { sizes[0] });
        run(&Launch::embed_norm(rows, cols, n, tables, 1e-12), &mut bufs);
        let got = widen(&bufs[7]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 8e-3 * w.abs().max(1.0), "embed norm {tables} x {cols} at {i}: {g} against {w}");
        }
        // The sum the norm saw: for the id past the table, the other tables alone.
        if tables == 3 {
            let sum = |r: usize, c: usize| -> f32 {
                let at = |k: usize| {
                    let id = ids[k][r] as usize;
                    if id < sizes[k] {
                        half::bf16::from_bits(parts[k].0[id * cols + c]).to_f32()
                    } else {
                        0.0
                    }
                };
                let r1 = half::bf16::from_f32(at(0) + at(1)).to_f32();
                half::bf16::from_f32(r1 + at(2)).to_f32()
            };
            let v: Vec<f32> = (0..cols).map(|c| sum(3, c)).collect();
            let mean = v.iter().sum::<f32>() / cols as f32;
            let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / cols as f32;
            let y0 = (v[0] - mean) / (var + 1e-12).sqrt() * params[0] + params[cols];
            assert!((want[3 * cols] - y0).abs() <= 8e-3 * y0.abs().max(1.0), "{} against {y0}", want[3 * cols]);
        }
    }
}

#[test]
fn scoring_epilogues_add_norm_and_bias_gelu() {
    // Rows not a multiple of the warps per block; 1,000 columns (not a multiple of 32); 36 columns
    // (the elementwise kernels one element at a time: not a multiple of 8, nor half of it).
    for (rows, cols) in [(7usize, 384usize), (5, 1000), (2, 32), (3, 36)] {
        let n = rows * cols;
        let (xb, xt) = bf16_bits(&values(n, 41, 3.0), &[rows, cols]);
        let (rb, rt) = bf16_bits(&values(n, 42, 1.0), &[rows, cols]);
        let mut params = values(cols, 43, 0.5);
        params.extend(values(cols, 44, 1.0).iter().map(|w| w + 1.0));
        params.extend(values(cols, 45, 1.0));
        let mut bufs = [Buf::Bf16(xb.clone()), Buf::Bf16(rb), Buf::F32(params.clone()), Buf::Bf16(vec![0x7fc0; n])];
        run(&Launch::add_norm(rows, cols, 1e-12), &mut bufs);
        let want =
            xt.apply_op3_no_bwd(&rt, &tensor(&params, &[3 * cols]), &AddNorm { eps: 1e-12, sum: false }).unwrap();
        assert_eq!(want.dtype(), DType::BF16);
        let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // The same f32 formula summed in another order: at most a bf16 rounding step apart.
        let got = widen(&bufs[3]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 8e-3 * w.abs().max(1.0), "add norm [{rows}, {cols}] {i}: {g} against {w}");
        }

        // With the sums written too: [2, rows, cols].
        let rb = bufs[1].bits().to_vec();
        let mut bufs = [Buf::Bf16(xb.clone()), Buf::Bf16(rb), Buf::F32(params.clone()), Buf::Bf16(vec![0x7fc0; 2 * n])];
        run(&Launch::add_norm_sum(rows, cols, 1e-12), &mut bufs);
        let want = xt.apply_op3_no_bwd(&rt, &tensor(&params, &[3 * cols]), &AddNorm { eps: 1e-12, sum: true }).unwrap();
        assert_eq!(want.dims(), [2, rows, cols]);
        let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = widen(&bufs[3]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 8e-3 * w.abs().max(1.0), "add norm sum [{rows}, {cols}] {i}: {g} against {w}");
        }

        // GeGLU: the row's halves as input and gate.
        let mut bufs = [Buf::Bf16(xb.clone()), Buf::Bf16(vec![0x7fc0; n / 2])];
        run(&Launch::geglu(rows, cols / 2), &mut bufs);
        let want = xt.apply_op1_no_bwd(&Geglu).unwrap();
        assert_eq!(want.dims(), [rows, cols / 2]);
        let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = widen(&bufs[1]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 8e-3 * w.abs().max(1.0), "geglu [{rows}, {cols}] {i}: {g} against {w}");
        }
        // Its backward (training): both halves' gradients from x and the output's gradient.
        let (gb, gt) = bf16_bits(&values(n / 2, 47, 1.0), &[rows, cols / 2]);
        let mut bufs = [Buf::Bf16(gb), Buf::Bf16(xb.clone()), Buf::Bf16(vec![0x7fc0; n])];
        run(&Launch::geglu_grad(rows, cols / 2), &mut bufs);
        let want = gt.apply_op2_no_bwd(&xt, &GegluGrad).unwrap();
        assert_eq!(want.dims(), [rows, cols]);
        let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = widen(&bufs[2]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 8e-3 * w.abs().max(1.0), "geglu backward [{rows}, {cols}] {i}: {g} against {w}");
        }

        let b = values(cols, 46, 1.0);
        let mut bufs = [Buf::Bf16(xb), Buf::F32(b.clone()), Buf::Bf16(vec![0x7fc0; n])];
        run(&Launch::bias_gelu(n, cols), &mut bufs);
        let want = xt.apply_op2_no_bwd(&tensor(&b, &[cols]), &BiasGelu).unwrap();
        let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = widen(&bufs[2]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 8e-3 * w.abs().max(1.0), "bias gelu [{rows}, {cols}] {i}: {g} against {w}");
        }

        // Its backward in training: x's gradient from the output's (bf16), then the bias's as
        // the column sum of a bf16 gradient.
        let (gb, gt) = bf16_bits(&values(n, 47, 1.0), &[rows, cols]);
        let xb = bufs[0].bits().to_vec();
        let mut bufs = [Buf::Bf16(gb), Buf::Bf16(xb), Buf::F32(b.clone()), Buf::Bf16(vec![0x7fc0; n])];
        run(&Launch::bias_gelu_grad(n, cols), &mut bufs);
        let want = gt.apply_op3_no_bwd(&xt, &tensor(&b, &[cols]), &BiasGeluGrad).unwrap();
        assert_eq!(want.dtype(), DType::BF16);
        let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = widen(&bufs[3]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 8e-3 * w.abs().max(1.0), "bias gelu grad [{rows}, {cols}] {i}: {g} against {w}");
        }
        let dx = bufs[3].bits().to_vec();
        let mut bufs = [Buf::Bf16(dx), Buf::F32(vec![0.0; cols])];
        run(&Launch::column_sum_bf16(rows, cols), &mut bufs);
        let dxt = Tensor::from_vec(
            got.iter().map(|v| half::bf16::from_f32(*v)).collect::<Vec<_>>(),
            (rows, cols),
            &Device::Cpu,
        )
        .unwrap();
        let want: Vec<f32> = dxt.apply_op1_no_bwd(&ColumnSum).unwrap().to_vec1().unwrap();
        assert_close("column sum of bf16", bufs[1].f32(), &want, 1e-4);
    }
}

#[test]
fn rotary_split_and_merge() {
    let (b, l, h, d) = (2usize, 5usize, 3usize, 8usize);
    let n = 3 * b * l * h * d;
    let x = values(n, 21, 1.0);
    let angles = values(l * d, 22, 3.0);
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    for (merge, kernel, shape) in
        [(false, "distill_rotary_split_f32", [b, l, 3, h, d]), (true, "distill_rotary_merge_f32", [3, b, h, l, d])]
    {
        let mut bufs = [Buf::F32(x.clone()), Buf::F32(cos.clone()), Buf::F32(sin.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::rotary(kernel, b, l, h, d), &mut bufs);
        let want = tensor(&x, &shape)
            .apply_op3_no_bwd(&tensor(&cos, &[l, d]), &tensor(&sin, &[l, d]), &Rotary { merge })
            .unwrap();
        assert_close(kernel, bufs[3].f32(), &want.flatten_all().unwrap().to_vec1().unwrap(), 1e-6);
    }
}

#[test]
fn flash_attention_for_scoring() {
    // 70 queries and keys: two blocks of 64 queries (the second mostly idle) and three key tiles
    // of 32 (the last part full); masked keys; a window as ModernBERT's local layers use.
    // Also q, k and v each one element into its allocation (not 16-byte aligned: the tiles are
    // loaded an element at a time instead of 8).
    let (b, h, l) = (2usize, 3usize, 70usize);
    for (d, window, at) in [(32usize, None, 0usize), (32, Some(5), 0), (64, None, 0), (64, Some(5), 0), (32, None, 1)] {
        let n = b * h * l * d;
        let bits = |seed: u32| -> Vec<u16> {
            values(n, seed, 1.0).iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect()
        };
        let (q, k, v) = (bits(23), bits(24), bits(25));
        let bias: Vec<f32> = (0..b * l).map(|i| if i % 7 == 3 || i >= l + 60 { -1e9 } else { 0.0 }).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let launch = Launch::flash_attention(d, b, h, l, scale, window).expect("a kernel for 32 and 64");
        let padded = |x: &[u16]| [vec![0x7fc0u16; at], x.to_vec()].concat();
        let mut bufs = [
            Buf::Bf16(padded(&q)),
            Buf::Bf16(padded(&k)),
            Buf::Bf16(padded(&v)),
            Buf::F32(bias.clone()),
            Buf::Bf16(vec![0x7fc0; n]),
        ];
        run_at(&launch, &mut bufs, &[at, at, at]);
        let Buf::Bf16(got) = &bufs[4] else { unreachable!() };
        let got: Vec<f32> = got.iter().map(|v| half::bf16::from_bits(*v).to_f32()).collect();
        let t = |x: &[u16]| {
            let x: Vec<half::bf16> = x.iter().map(|v| half::bf16::from_bits(*v)).collect();
            Tensor::from_vec(x, (b, h, l, d), &Device::Cpu).unwrap()
        };
        let op = FlashAttention { bias: tensor(&bias, &[b, 1, 1, l]), scale, window };
        let want = t(&q).apply_op3_no_bwd(&t(&k), &t(&v), &op).unwrap();
        let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // The kernel rounds the probabilities to bf16 before the second product.
        assert_close(&format!("flash attention d {d} window {window:?} from element {at}"), &got, &want, 1.5e-2);
    }
    assert!(Launch::flash_attention(48, 1, 1, 8, 1.0, None).is_none());
}

#[test]
fn flash_attention_for_scoring_from_a_joined_product() {
    // q, k and v side by side in one [B, L, 3, H, D] product with its bias: the kernel reads them
    // in place, the CPU twin splits them after the bias.
    let (b, h, l) = (2usize, 3usize, 70usize);
    for d in [32usize, 64] {
        let n = b * l * 3 * h * d;
        let (qkv, qkv_t) = bf16_bits(&values(n, 47, 1.0), &[b, l, 3 * h * d]);
        let qkv_bias = values(3 * h * d, 48, 0.5);
        let bias: Vec<f32> = (0..b * l).map(|i| if i % 7 == 3 || i >= l + 60 { -1e9 } else { 0.0 }).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let out = b * l * h * d;
        // Without and with rotary embeddings on q and k (cos, sin [2, L, D]; a window as
        // ModernBERT's local layers have); and the product one element into its allocation (not
        // 16-byte aligned: the tiles are loaded and rotated an element at a time).
        for (rope, window, at) in [(None, None, 0usize), (Some(10_000.0), Some(16usize), 0), (Some(10_000.0), None, 1)]
        {
            let table = rope.map(|theta| {
                let (cos, sin) = crate::modernbert::rotary(l, d, theta, &candle_core::Device::Cpu).unwrap();
                Tensor::stack(&[cos, sin], 0).unwrap()
            });
            let launch = Launch::flash_attention_packed(d, b, h, l, scale, window, rope.is_some())
                .expect("a kernel for 32 and 64");
            let mut bufs = vec![Buf::Bf16([vec![0x7fc0u16; at], qkv.clone()].concat()), Buf::F32(qkv_bias.clone())];
            if let Some(t) = &table {
                bufs.push(Buf::F32(t.flatten_all().unwrap().to_vec1().unwrap()));
            }
            bufs.extend([Buf::F32(bias.clone()), Buf::Bf16(vec![0x7fc0; out])]);
            run_at(&launch, &mut bufs, &[at]);
            let got = widen(bufs.last().unwrap());
            let op = FlashAttentionPacked { bias: tensor(&bias, &[b, 1, 1, l]), heads: h, scale, window, rope: table };
            let want = qkv_t.apply_op2_no_bwd(&tensor(&qkv_bias, &[3 * h * d]), &op).unwrap();
            let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            // Values up to ~2.2 (the bias shifts v): the probabilities' bf16 rounding and one bf16
            // step of the output (1/64 at 2).
            let what = format!("flash attention from a joined product, d {d} rope {rope:?} from element {at}");
            assert_close(&what, &got, &want, 2.5e-2);
        }
    }
    assert!(Launch::flash_attention_packed(48, 1, 1, 8, 1.0, None, false).is_none());
}

/// Largest |got - want| over the largest |want|.
fn relative(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale
}

#[test]
fn flash_attention_for_training_and_its_backward() {
    let (b, h, l) = (2usize, 2usize, 70usize);
    for (d, window, p) in [(32usize, None, 0.0f32), (64, Some(5usize), 0.0), (32, None, 0.2), (64, None, 0.1)] {
        let a = launch_shape::Attention { b, h, l, d, scale: 1.0 / (d as f32).sqrt(), window, seed: 7, p };
        let (n, nl) = (b * h * l * d, b * h * l);
        let (q, k, v) = (values(n, 26, 1.0), values(n, 27, 1.0), values(n, 28, 1.0));
        let bias: Vec<f32> = (0..b * l).map(|i| if i % 9 == 4 || i >= l + 61 { -1e9 } else { 0.0 }).collect();
        let what = format!("d {d} window {window:?} p {p}");
        // The CPU implementation, the reference for both directions.
        let t = |x: &[f32]| tensor(x, &[b, h, l, d]);
        let op = FlashTrain { bias: tensor(&bias, &[b, 1, 1, l]), shape: a };
        let packed: Vec<f32> = t(&q).apply_op3_no_bwd(&t(&k), &t(&v), &op).unwrap().to_vec1().unwrap();

        let mut bufs = [
            Buf::F32(q.clone()),
            Buf::F32(k.clone()),
            Buf::F32(v.clone()),
            Buf::F32(bias.clone()),
            Buf::F32(vec![f32::NAN; n]),
            Buf::F32(vec![f32::NAN; nl]),
        ];
        run(&a.forward().unwrap(), &mut bufs);
        let out_err = relative(bufs[4].f32(), &packed[..n]);
        if out_err >= 2e-2 {
            let (got, want) = (bufs[4].f32(), &packed[..n]);
            let worst = (0..n).max_by(|&x, &y| (got[x] - want[x]).abs().total_cmp(&(got[y] - want[y]).abs())).unwrap();
            let (row, c) = (worst / d, worst % d);
            panic!(
                "forward {what}: {out_err}; worst at batch {} query {} head {} dim {c}: {} against {}",
                row / (l * h),
                row / h % l,
                row % h,
                got[worst],
                want[worst]
            );
        }
        // Rows with every key masked have an infinite log-sum-exp (zero probabilities) on both sides.
        for (i, (got, want)) in bufs[5].f32().iter().zip(&packed[n..]).enumerate() {
            let same = if want.is_infinite() { got == want } else { (got - want).abs() < 5e-2 };
            assert!(same, "log-sum-exp {what}: row {i}: {got} against {want}");
        }

        // The backward from the CPU forward's output, so each direction is tested on its own.
        let dout = values(n, 29, 1.0);
        let grad_op = FlashTrainGrad {
            bias: tensor(&bias, &[b, 1, 1, l]),
            packed: tensor(&packed, &[n + nl]),
            dout: tensor(&dout, &[b, l, h * d]),
            shape: a,
        };
        let want: Vec<f32> =
            t(&q).apply_op3_no_bwd(&t(&k), &t(&v), &grad_op).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let mut bufs = [
            Buf::F32(q.clone()),
            Buf::F32(k.clone()),
            Buf::F32(v.clone()),
            Buf::F32(bias.clone()),
            Buf::F32(packed[..n].to_vec()),
            Buf::F32(dout.clone()),
            Buf::F32(packed[n..].to_vec()),
            Buf::F32(vec![f32::NAN; n]),
            Buf::F32(vec![f32::NAN; nl]),
        ];
        run(&a.backward_dq().unwrap(), &mut bufs);
        let dq = bufs[7].f32().to_vec();
        let delta = bufs[8].f32().to_vec();
        let mut bufs = [
            Buf::F32(q.clone()),
            Buf::F32(k.clone()),
            Buf::F32(v.clone()),
            Buf::F32(bias.clone()),
            Buf::F32(dout.clone()),
            Buf::F32(packed[n..].to_vec()),
            Buf::F32(delta),
            Buf::F32(vec![f32::NAN; n]),
            Buf::F32(vec![f32::NAN; n]),
        ];
        run(&a.backward_dkv().unwrap(), &mut bufs);
        for (name, got, want) in
            [("dq", &dq[..], &want[..n]), ("dk", bufs[7].f32(), &want[n..2 * n]), ("dv", bufs[8].f32(), &want[2 * n..])]
        {
            let err = relative(got, want);
            assert!(err < 3e-2, "{name} {what}: {err}");
        }
    }
}

#[test]
fn flash_attention_for_training_from_a_joined_product_and_its_backward() {
    // q, k, v side by side in one bf16 [B, L, 3, H, D] product with its bias; out and the
    // gradients bf16, the gradient written into the joined layout (dQ by one kernel, dK and dV by
    // the other, into one buffer that starts as NaN: a part neither writes fails).
    let (b, h, l) = (2usize, 2usize, 70usize);
    // Without and with rotary embeddings on q and k (ModernBERT: the rotation undone on their
    // gradients as the tiles are stored).
    for (d, window, p, theta) in [
        (32usize, None, 0.0f32, None),
        (64, Some(5usize), 0.1, None),
        (64, None, 0.2, None),
        (32, Some(16), 0.1, Some(10_000.0)),
        (64, None, 0.0, Some(160_000.0)),
    ] {
        let a = launch_shape::Attention { b, h, l, d, scale: 1.0 / (d as f32).sqrt(), window, seed: 11, p };
        let (n, nl, hd) = (b * h * l * d, b * h * l, h * d);
        let table = theta.map(|theta| {
            let (cos, sin) = crate::modernbert::rotary(l, d, theta, &candle_core::Device::Cpu).unwrap();
            Tensor::stack(&[cos, sin], 0).unwrap()
        });
        let rope: Vec<Buf> = table.iter().map(|t| Buf::F32(t.flatten_all().unwrap().to_vec1().unwrap())).collect();
        let with_rope = |mut bufs: Vec<Buf>, rope: &[Buf]| -> Vec<Buf> {
            if let Some(Buf::F32(r)) = rope.first() {
                bufs.insert(2, Buf::F32(r.clone()));
            }
            bufs
        };
        let (qkv, qkv_t) = bf16_bits(&values(3 * n, 71, 1.0), &[b, l, 3 * hd]);
        let qkv_bias = values(3 * hd, 72, 0.5);
        let bias: Vec<f32> = (0..b * l).map(|i| if i % 9 == 4 || i >= l + 61 { -1e9 } else { 0.0 }).collect();
        let what = format!("d {d} window {window:?} p {p} rope {theta:?}");
        let mask = tensor(&bias, &[b, 1, 1, l]);
        let op = FlashTrainPacked { bias: mask.clone(), shape: a, has_bias: true, rope: table.clone() };
        let packed = qkv_t.apply_op2_no_bwd(&tensor(&qkv_bias, &[3 * hd]), &op).unwrap();
        let packed_bits: Vec<u16> = packed.to_vec1::<half::bf16>().unwrap().iter().map(|x| x.to_bits()).collect();
        let want_o: Vec<f32> = packed_bits[..n].iter().map(|x| half::bf16::from_bits(*x).to_f32()).collect();
        let want_lse = super::attention::lse_from_slots(&packed.to_vec1::<half::bf16>().unwrap()[n..]);

        let mut bufs = with_rope(
            vec![
                Buf::Bf16(qkv.clone()),
                Buf::F32(qkv_bias.clone()),
                Buf::F32(bias.clone()),
                Buf::Bf16(vec![0x7fc0; n]),
                Buf::F32(vec![f32::NAN; nl]),
            ],
            &rope,
        );
        run(&a.forward_packed(theta.is_some()).unwrap(), &mut bufs);
        let lse_got = bufs.pop().unwrap();
        let err = relative(&widen(&bufs.pop().unwrap()), &want_o);
        assert!(err < 2e-2, "forward {what}: {err}");
        for (i, (got, want)) in lse_got.f32().iter().zip(&want_lse).enumerate() {
            let same = if want.is_infinite() { got == want } else { (got - want).abs() < 5e-2 };
            assert!(same, "log-sum-exp {what}: row {i}: {got} against {want}");
        }

        // The backward from the CPU forward's output.
        let (dout, dout_t) = bf16_bits(&values(n, 73, 1.0), &[b, l, hd]);
        let grad_op = FlashTrainPackedGrad { bias: mask, packed: packed.clone(), dout: dout_t, shape: a, rope: table };
        let want = qkv_t.apply_op2_no_bwd(&tensor(&qkv_bias, &[3 * hd]), &grad_op).unwrap();
        let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let lse =
            Buf::F32(packed_bits[n..].chunks(2).map(|x| f32::from_bits(x[0] as u32 | (x[1] as u32) << 16)).collect());
        let mut bufs = with_rope(
            vec![
                Buf::Bf16(qkv.clone()),
                Buf::F32(qkv_bias.clone()),
                Buf::F32(bias.clone()),
                Buf::Bf16(packed_bits[..n].to_vec()),
                Buf::Bf16(dout.clone()),
                lse,
                Buf::Bf16(vec![0x7fc0; 3 * n]),
                Buf::F32(vec![f32::NAN; nl]),
            ],
            &rope,
        );
        run(&a.backward_dq_packed(theta.is_some()).unwrap(), &mut bufs);
        let delta = bufs.pop().unwrap();
        let dqkv = bufs.pop().unwrap();
        let lse = bufs.pop().unwrap();
        let mut bufs = with_rope(
            vec![
                Buf::Bf16(qkv.clone()),
                Buf::F32(qkv_bias.clone()),
                Buf::F32(bias.clone()),
                Buf::Bf16(dout),
                lse,
                delta,
                dqkv,
            ],
            &rope,
        );
        run(&a.backward_dkv_packed(theta.is_some()).unwrap(), &mut bufs);
        let got = widen(bufs.last().unwrap());
        // Each part (columns of q, k, v in every row) on its own.
        let part = |x: &[f32], which: usize| -> Vec<f32> {
            x.chunks(3 * hd).flat_map(|row| row[which * hd..(which + 1) * hd].to_vec()).collect()
        };
        for (which, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
            let err = relative(&part(&got, which), &part(&want, which));
            assert!(err < 3e-2, "{name} {what}: {err}");
        }
    }
}

#[test]
fn training_add_norm_and_its_backward() {
    // Rows not a multiple of the warps or of a backward block's 16; 100 columns (not a multiple
    // of 32) and BERT-base's 768; without and with dropout.
    for (rows, cols, p) in [(37usize, 100usize, 0.0f32), (37, 768, 0.1), (5, 1024, 0.2)] {
        let n = rows * cols;
        let (x, x_t) = bf16_bits(&values(n, 81, 3.0), &[rows, cols]);
        let res = values(n, 82, 1.0);
        let params: Vec<f32> =
            [values(cols, 83, 0.5), values(cols, 84, 0.5).iter().map(|w| w + 1.0).collect(), values(cols, 85, 0.5)]
                .concat();
        let (eps, seed) = (1e-12f32, 9u64);
        let what = format!("{rows} x {cols} p {p}");
        let (res_t, params_t) = (tensor(&res, &[rows, cols]), tensor(&params, &[3 * cols]));
        let want: Vec<f32> = x_t
            .apply_op3_no_bwd(&res_t, &params_t, &AddNormTrain { eps, seed, p })
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut bufs =
            [Buf::Bf16(x.clone()), Buf::F32(res.clone()), Buf::F32(params.clone()), Buf::F32(vec![f32::NAN; n])];
        run(&Launch::add_norm_train(rows, cols, eps, seed, p), &mut bufs);
        assert_close(&format!("add norm for training {what}"), bufs[3].f32(), &want, 1e-4);

        let g = values(n, 86, 1.0);
        let op = AddNormTrainGrad { eps, seed, p, grad: tensor(&g, &[rows, cols]) };
        let want: Vec<f32> = x_t.apply_op3_no_bwd(&res_t, &params_t, &op).unwrap().to_vec1().unwrap();
        let mut bufs = [
            Buf::Bf16(x.clone()),
            Buf::F32(res.clone()),
            Buf::F32(params.clone()),
            Buf::F32(g),
            Buf::F32(vec![f32::NAN; n]),
            Buf::F32(vec![0.0; 3 * cols]),
        ];
        run(&Launch::add_norm_train_grad(rows, cols, eps, seed, p), &mut bufs);
        let err = relative(bufs[4].f32(), &want[..n]);
        assert!(err < 1e-4, "add norm backward, the residual's gradient {what}: {err}");
        for (i, name) in ["bias", "weight", "shift"].into_iter().enumerate() {
            let (got, want) = (&bufs[5].f32()[i * cols..(i + 1) * cols], &want[n + i * cols..n + (i + 1) * cols]);
            let err = relative(got, want);
            assert!(err < 1e-4, "add norm backward, the {name}'s gradient {what}: {err}");
        }

        // The product's gradient: the mask on ds, rounded to bf16.
        let ds = want[..n].to_vec();
        let want = tensor(&ds, &[rows, cols])
            .apply_op1_no_bwd(&DropoutTo { seed, p, dtype: DType::BF16 })
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut bufs = [Buf::F32(ds), Buf::Bf16(vec![0x7fc0; n])];
        run(&Launch::dropout_bf16(n, seed, p), &mut bufs);
        assert_eq!(widen(&bufs[1]), want, "dropout to bf16 {what}");
        if p > 0.0 {
            let dropped = want.iter().filter(|v| **v == 0.0).count() as f32 / n as f32;
            assert!((dropped - p).abs() < 0.05, "{what}: {dropped} dropped");
        }
    }
}

#[test]
fn deberta_probs_gather_add_and_normalise_as_the_twin() {
    // Two batches x 3 heads, 40 keys, 16 positions; all query rows (blocks of 16, 16 and 8), then
    // the first alone (the last layer's first token): row i reads row i of the c2p buckets and
    // column i of p2c's. Then 600 keys: 13 rows a block fit the staging buffer (13, 13, 4 of 30).
    for (b, h, l, p, q) in [(2usize, 3usize, 40usize, 16usize, 40usize), (2, 3, 40, 16, 1), (1, 1, 600, 16, 30)] {
        assert_eq!(super::launch::deberta_block_rows(q, l), [16, 1, 13][(q == 1) as usize + 2 * (l == 600) as usize]);
        let c2p_idx: Vec<u32> = (0..l * l).map(|x| ((x / l) as i64 - (x % l) as i64 + 8).clamp(0, 15) as u32).collect();
        let p2c_idx: Vec<u32> = (0..l * l).map(|x| ((x % l) as i64 - (x / l) as i64 + 8).clamp(0, 15) as u32).collect();
        let mask: Vec<f32> = (0..b * l).map(|i| if i % 9 == 4 || i >= l + 30 { -1e9 } else { 0.0 }).collect();
        let idx = |v: &[u32]| Tensor::from_vec(v.to_vec(), (l, l), &Device::Cpu).unwrap();
        let (qk, qk_t) = bf16_bits(&values(b * h * q * l, 61, 3.0), &[b, h, q, l]);
        let (c2p, c2p_t) = bf16_bits(&values(b * h * q * p, 62, 3.0), &[b, h, q, p]);
        let (p2c, p2c_t) = bf16_bits(&values(b * h * l * p, 63, 3.0), &[b, h, l, p]);
        let scale = 5.0f32;
        let mut bufs = [
            Buf::Bf16(qk),
            Buf::Bf16(c2p),
            Buf::Bf16(p2c),
            Buf::U32(c2p_idx.clone()),
            Buf::U32(p2c_idx.clone()),
            Buf::F32(mask.clone()),
            Buf::Bf16(vec![0x7fc0; b * h * q * l]),
        ];
        run(&Launch::deberta_probs(b * h, h, q, l, p, 1.0 / scale), &mut bufs);
        let op = DebertaProbs { c2p_idx: idx(&c2p_idx), p2c_idx: idx(&p2c_idx), mask: tensor(&mask, &[b, l]), scale };
        let want = qk_t.apply_op3_no_bwd(&c2p_t, &p2c_t, &op).unwrap();
        let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = widen(&bufs[6]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 4e-3 * w.abs().max(1e-2), "deberta probs q {q} at {i}: {g} against {w}");
        }
        // Each row sums to one.
        for row in got.chunks(l) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 2e-2, "a row sums to {}", row.iter().sum::<f32>());
        }
    }
}

#[test]
fn deberta_probs_for_training_and_the_backward() {
    // All query rows (blocks of 16, 16 and 8) and the first alone; with dropout and without; and
    // 600 keys (blocks of 13 rows). The backward's dp2c buckets collect from other rows (in the
    // block from the staged dS, other blocks' by atomics), its dc2p from its own (shared memory).
    let (b, h, p) = (2usize, 3usize, 16usize);
    let bits = |t: &Tensor| -> Vec<u16> { t.to_vec1::<half::bf16>().unwrap().iter().map(|x| x.to_bits()).collect() };
    let as_f32 =
        |v: &[u16]| -> Vec<f32> { v.chunks(2).map(|x| f32::from_bits(x[0] as u32 | (x[1] as u32) << 16)).collect() };
    let widened = |v: &[u16]| -> Vec<f32> { v.iter().map(|x| half::bf16::from_bits(*x).to_f32()).collect() };
    for (l, q, drop) in [(40usize, 40usize, 0.0f32), (40, 40, 0.1), (40, 1, 0.1), (600, 30, 0.1)] {
        let c2p_idx: Vec<u32> = (0..l * l).map(|x| ((x / l) as i64 - (x % l) as i64 + 8).clamp(0, 15) as u32).collect();
        let p2c_idx: Vec<u32> = (0..l * l).map(|x| ((x % l) as i64 - (x / l) as i64 + 8).clamp(0, 15) as u32).collect();
        let mask: Vec<f32> = (0..b * l).map(|i| if i % 9 == 4 || i >= l + 30 { -1e9 } else { 0.0 }).collect();
        let idx = |v: &[u32]| Tensor::from_vec(v.to_vec(), (l, l), &Device::Cpu).unwrap();
        let rows = b * h * q;
        let (qk, qk_t) = bf16_bits(&values(rows * l, 91, 3.0), &[b, h, q, l]);
        let (c2p, c2p_t) = bf16_bits(&values(rows * p, 92, 3.0), &[b, h, q, p]);
        let (p2c, p2c_t) = bf16_bits(&values(b * h * l * p, 93, 3.0), &[b, h, l, p]);
        let scale = 5.0f32;
        let what = format!("len {l} q {q} dropout {drop}");
        let probs =
            DebertaProbs { c2p_idx: idx(&c2p_idx), p2c_idx: idx(&p2c_idx), mask: tensor(&mask, &[b, l]), scale };
        let op = DebertaProbsTrain { probs, seed: 5, p: drop };
        let packed = qk_t.apply_op3_no_bwd(&c2p_t, &p2c_t, &op).unwrap();
        let packed_bits = bits(&packed);
        let lse_at = rows * l + (rows * l) % 2;
        let mut bufs = [
            Buf::Bf16(qk.clone()),
            Buf::Bf16(c2p.clone()),
            Buf::Bf16(p2c.clone()),
            Buf::U32(c2p_idx.clone()),
            Buf::U32(p2c_idx.clone()),
            Buf::F32(mask.clone()),
            Buf::Bf16(vec![0x7fc0; rows * l]),
            Buf::F32(vec![f32::NAN; rows]),
        ];
        run(&Launch::deberta_probs_train(b * h, h, q, l, p, 1.0 / scale, 5, drop), &mut bufs);
        let want = widened(&packed_bits[..rows * l]);
        for (i, (g, w)) in widen(&bufs[6]).iter().zip(&want).enumerate() {
            // (One bf16 step: exp(s - lse) rounds where the scoring kernel divides by the sum.)
            assert!(
                (g - w).abs() <= 8e-3 * w.abs().max(1e-2),
                "deberta probs (training) {what} at {i}: {g} against {w}"
            );
        }
        let lse = as_f32(&packed_bits[lse_at..]);
        assert_close(&format!("deberta log-sum-exp {what}"), bufs[7].f32(), &lse, 1e-4);

        // The backward from the twin's forward.
        let (dout, dout_t) = bf16_bits(&values(rows * l, 94, 1.0), &[rows * l]);
        let grad = DebertaProbsTrainGrad { fwd: op, packed: packed.clone(), dout: dout_t };
        let want = bits(&qk_t.apply_op3_no_bwd(&c2p_t, &p2c_t, &grad).unwrap());
        let at = rows * (l + p);
        let mut bufs = [
            Buf::Bf16(qk),
            Buf::Bf16(c2p),
            Buf::Bf16(p2c),
            Buf::U32(c2p_idx.clone()),
            Buf::U32(p2c_idx.clone()),
            Buf::F32(mask.clone()),
            Buf::F32(lse),
            Buf::Bf16(dout),
            Buf::Bf16(vec![0x7fc0; rows * l]),
            Buf::Bf16(vec![0x7fc0; rows * p]),
        ];
        run(&Launch::deberta_probs_train_grad(b * h, h, q, l, p, 1.0 / scale, 5, drop), &mut bufs);
        // dp2c: dS summed down the query rows, from the kernel's dqk; and from the twin's (the
        // same bf16 values: only the order of the f32 sums differs).
        let p2c_grad = |dqk: Vec<u16>| {
            let mut bufs = [Buf::Bf16(dqk), Buf::U32(p2c_idx.clone()), Buf::Bf16(vec![0x7fc0; b * h * l * p])];
            run(&Launch::deberta_p2c_grad(b * h, q, l, p), &mut bufs);
            widen(&bufs[2])
        };
        let Buf::Bf16(dqk) = &bufs[8] else { unreachable!() };
        let parts = [
            ("dqk", widen(&bufs[8]), widened(&want[..rows * l])),
            ("dc2p", widen(&bufs[9]), widened(&want[rows * l..at])),
            ("dp2c", p2c_grad(dqk.clone()), widened(&want[at..])),
        ];
        for (name, got, want) in parts {
            let err = relative(&got, &want);
            assert!(err < 1e-2, "deberta backward {name} {what}: {err}");
        }
        let err = relative(&p2c_grad(want[..rows * l].to_vec()), &widened(&want[at..]));
        assert!(err < 2e-3, "deberta backward dp2c from the twin's dS {what}: {err}");
        assert_eq!(want.len(), at + b * h * l * p);
    }
}
