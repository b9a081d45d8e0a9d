//! AdamW, accumulation and clipping against torch.optim.AdamW + clip_grad_norm_ on the same
//! parameters and gradients (fixture from scripts/fixtures/optim_reference.py).

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use distill_models::optim::{AdamW, AdamWConfig, Grads};

fn fixture() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/optim.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn adamw_with_clipping_and_accumulation_matches_pytorch() {
    against_pytorch(false);
}

/// The same with the norm and the clipping coefficient computed on the device and the
/// coefficient applied by the update (no host read between backward and update).
#[test]
fn adamw_with_clipping_on_the_device_matches_pytorch() {
    against_pytorch(true);
}

fn against_pytorch(on_device: bool) {
    let fx = fixture();
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let mut shapes: Vec<(String, Vec<usize>)> = fx["shapes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(n, s)| (n.clone(), s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
        .collect();
    shapes.sort();
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, shape) in &shapes {
            let t = Tensor::from_vec(floats(&fx["initial"][name]), shape.as_slice(), &dev).unwrap();
            data.insert(name.clone(), Var::from_tensor(&t).unwrap());
        }
    }
    let wd = fx["weight_decay"].as_f64().unwrap();
    let mut opt = AdamW::new(&varmap, AdamWConfig { weight_decay: wd, ..Default::default() }).unwrap();
    let names: Vec<String> = opt.names().map(String::from).collect();
    for (k, step) in fx["steps"].as_array().unwrap().iter().enumerate() {
        let mut total: Option<Grads> = None;
        for micro in step["grads"].as_array().unwrap() {
            let g = Grads(
                names
                    .iter()
                    .map(|n| {
                        let shape = &shapes.iter().find(|(m, _)| m == n).unwrap().1;
                        Some(Tensor::from_vec(floats(&micro[n]), shape.as_slice(), &dev).unwrap())
                    })
                    .collect(),
            );
            match &mut total {
                Some(t) => t.accumulate(g).unwrap(),
                None => total = Some(g),
            }
        }
        let mut grads = total.unwrap();
        let (max_norm, lr) = (fx["max_norm"].as_f64().unwrap(), step["lr"].as_f64().unwrap());
        let norm = if on_device {
            let (norm, coef) = grads.clip_on_device(max_norm).unwrap().expect("gradients to clip");
            opt.update_scaled(&grads, lr, Some(&coef)).unwrap();
            norm.to_vec1::<f32>().unwrap()[0] as f64
        } else {
            let norm = grads.clip(max_norm).unwrap();
            opt.update(&grads, lr).unwrap();
            norm
        };
        let want_norm = step["norm"].as_f64().unwrap();
        assert!((norm - want_norm).abs() < 1e-4 * want_norm, "step {k}: norm {norm} vs {want_norm}");
        let data = varmap.data().lock().unwrap();
        for name in &names {
            let got = data[name].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = floats(&step["params"][name]);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-5 * w.abs().max(1.0), "step {k} {name}[{i}]: {g} vs pytorch {w}");
            }
        }
    }
    assert_eq!(opt.step, 5);
}

#[test]
fn optimizer_state_round_trips() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    varmap
        .data()
        .lock()
        .unwrap()
        .insert("w".into(), Var::from_tensor(&Tensor::new(&[1f32, -2.0, 3.0], &dev).unwrap()).unwrap());
    let mut a = AdamW::new(&varmap, AdamWConfig::default()).unwrap();
    let g = Grads(vec![Some(Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap())]);
    a.update(&g, 0.1).unwrap();
    let mut b = AdamW::new(&varmap, AdamWConfig::default()).unwrap();
    b.load_state(&a.state(), a.step).unwrap();
    for (k, t) in a.state() {
        let d = (&t - &b.state()[&k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
    assert_eq!(b.step, 1);
    let mut missing = a.state();
    missing.remove("v.w");
    let err = b.load_state(&missing, 1).unwrap_err();
    assert!(err.contains("lacks 'v.w'"), "{err}");
}
