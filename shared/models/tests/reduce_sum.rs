//! The vendored candle-core's sum over a run of consecutive dims that stops before the last
//! (vendor/README.md): the same bits as candle's element-by-element path, which a view that is
//! not contiguous still takes, and the values of a sum written out here.

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
