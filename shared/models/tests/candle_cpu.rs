//! The vendored candle-core's CPU changes (vendor/README.md): the sum over a run of consecutive
//! dims that stops before the last (the same bits as candle's element-by-element path, which a
//! view that is not contiguous still takes, and the values of a sum written out here), and erf and
//! exp without branches (against libm in f64).

use candle_core::{Device, Tensor};

fn values(dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

#[test]
fn sums_over_leading_and_middle_dims_equal_the_strided_path() {
    for (dims, reduce) in [
        (vec![6, 5], vec![0]),
        (vec![4, 3, 5], vec![0, 1]),
        (vec![4, 3, 5], vec![1]),
        (vec![2, 3, 4, 5], vec![1, 2]),
        (vec![2, 3, 4, 5], vec![0]),
        (vec![3, 1, 5], vec![0, 1]),
    ] {
        let t = values(&dims);
        let rank = dims.len();
        // The same values in a layout that is not contiguous: candle's general path.
        let strided = t.transpose(0, rank - 1).unwrap().contiguous().unwrap().transpose(0, rank - 1).unwrap();
        assert!(t.is_contiguous() && !strided.is_contiguous());
        let fast = t.sum_keepdim(reduce.clone()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let slow = strided.sum_keepdim(reduce.clone()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast), bits(&slow), "{dims:?} over {reduce:?}");
        // Written out: each output element the sum of the inputs that share its kept indexes.
        let flat = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut want = vec![0f64; fast.len()];
        let kept_index = |mut i: usize| {
            let (mut out, mut scale) = (0, 1);
            for d in (0..rank).rev() {
                let k = i % dims[d];
                i /= dims[d];
                if !reduce.contains(&d) {
                    out += k * scale;
                    scale *= dims[d];
                }
            }
            out
        };
        for (i, x) in flat.iter().enumerate() {
            want[kept_index(i)] += *x as f64;
        }
        for (got, want) in fast.iter().zip(&want) {
            assert!((*got as f64 - want).abs() < 1e-4, "{dims:?} over {reduce:?}: {got} vs {want}");
        }
    }
}

#[test]
fn erf_and_exp_without_branches_stay_within_their_stated_error() {
    use candle_core::cpu::erf::{erf_f32, erf_f64, exp_f32};
    let (mut erf_worst, mut exp_worst) = (0f64, 0f64);
    for i in -200_000..=200_000 {
        let x = i as f32 * 5e-5; // [-10, 10]
        erf_worst = erf_worst.max((erf_f32(x) as f64 - erf_f64(x as f64)).abs());
        let y = i as f32 * 4.436e-4; // [-88.72, 88.72]
        if y >= -86.0 {
            let want = (y as f64).exp();
            exp_worst = exp_worst.max(((exp_f32(y) as f64 - want) / want).abs());
        }
    }
    assert!(erf_worst < 5e-7, "erf: {erf_worst:e}");
    assert!(exp_worst < 3e-7, "exp: {exp_worst:e} relative");
    assert_eq!(erf_f32(0.0), 0.0);
    assert_eq!((erf_f32(12.0), erf_f32(-12.0)), (1.0, -1.0));
    assert_eq!((exp_f32(-87.0), exp_f32(f32::NEG_INFINITY), exp_f32(0.0)), (0.0, 0.0, 1.0));
    assert_eq!((exp_f32(88.8), exp_f32(f32::INFINITY)), (f32::INFINITY, f32::INFINITY));
    assert!(exp_f32(88.72).is_finite() && exp_f32(f32::NAN).is_nan());
    // candle's exp op on f32 goes through it.
    let t = Tensor::new(&[-1e9f32, -1.0, 0.0, 2.5], &Device::Cpu).unwrap();
    let want: Vec<f32> = [-1e9f32, -1.0, 0.0, 2.5].iter().map(|&x| exp_f32(x)).collect();
    assert_eq!(t.exp().unwrap().to_vec1::<f32>().unwrap(), want);
    // GELU through candle's op, against the definition in f64.
    let xs: Vec<f32> = (-400..=400).map(|i| i as f32 / 50.0).collect();
    let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
    let gelu = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
    for (x, g) in xs.iter().zip(gelu) {
        let x = *x as f64;
        let want = 0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2));
        assert!((g as f64 - want).abs() < 1e-6 * (1.0 + x.abs()), "gelu({x}) = {g}, want {want}");
    }
}
