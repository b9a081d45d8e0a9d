use super::*;
use candle_core::{Device, Var};

fn fixture() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/objectives.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn tensor(v: &serde_json::Value, dtype: DType) -> Tensor {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    let (q, g) = (rows.len(), rows[0].len());
    let flat: Vec<f64> = rows.into_iter().flatten().collect();
    Tensor::from_vec(flat, (q, g), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn objective(name: &str, temperature: f64) -> Objective {
    match name.parse::<Objective>().unwrap() {
        Objective::InfoNce { .. } => Objective::InfoNce { temperature },
        Objective::AdrMse { .. } => Objective::AdrMse { temperature },
        Objective::KlDiv { .. } => Objective::KlDiv { temperature },
        o => o,
    }
}

/// Loss and d loss / d scores in `dtype`.
fn run(case: &serde_json::Value, name: &str, dtype: DType) -> (f64, Vec<Vec<f64>>) {
    let scores = Var::from_tensor(&tensor(&case["scores"], dtype)).unwrap();
    let labels = if name == "ranknet" { &case["graded"] } else { &case["labels"] };
    let groups = ScoreGroups {
        scores: scores.as_tensor().clone(),
        mask: tensor(&case["mask"], dtype),
        labels: Some(tensor(labels, dtype)),
        teacher_scores: Some(tensor(&case["teacher_scores"], dtype)),
        teacher_ranks: Some(tensor(&case["teacher_ranks"], dtype)),
    };
    let loss = objective(name, case["temperature"].as_f64().unwrap()).loss(&groups).unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads.get(&scores).expect("scores receive a gradient");
    (
        loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
        grad.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
    )
}

fn close(a: f64, b: f64, rel: f64, scale: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(scale)
}

/// Every objective's loss and gradient match PyTorch (scripts/fixtures/objectives_reference.py)
/// within 1e-5 relative, on ragged groups, ties, pairs, extreme scores and temperatures.
#[test]
fn losses_and_gradients_match_pytorch() {
    let fx = fixture();
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        let cname = case["name"].as_str().unwrap();
        for (name, want) in case["objectives"].as_object().unwrap() {
            let (loss, grad) = run(case, name, DType::F64);
            let want_loss = want["loss"].as_f64().unwrap();
            assert!(close(loss, want_loss, 1e-5, 1e-12), "{cname}/{name}: loss {loss} vs PyTorch {want_loss}");
            let want_grad: Vec<Vec<f64>> = serde_json::from_value(want["grad"].clone()).unwrap();
            let gmax = want_grad.iter().flatten().fold(0f64, |a, b| a.max(b.abs()));
            for (i, (row, wrow)) in grad.iter().zip(&want_grad).enumerate() {
                for (j, (g, w)) in row.iter().zip(wrow).enumerate() {
                    assert!(
                        close(*g, *w, 1e-5, (gmax * 1e-3).max(1e-12)),
                        "{cname}/{name}: grad[{i}][{j}] {g} vs PyTorch {w}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 6 * 9);
}

/// Padding contributes nothing: gradients at masked slots are exactly 0.
#[test]
fn padding_gets_no_gradient() {
    let fx = fixture();
    let case = &fx["cases"][1];
    let mask: Vec<Vec<f64>> = serde_json::from_value(case["mask"].clone()).unwrap();
    for name in case["objectives"].as_object().unwrap().keys() {
        let (_, grad) = run(case, name, DType::F64);
        for (row, mrow) in grad.iter().zip(&mask) {
            for (g, m) in row.iter().zip(mrow) {
                if *m == 0.0 {
                    assert_eq!(*g, 0.0, "{name}");
                }
            }
        }
    }
}

/// In f32 (training precision), scores of magnitude 1e4 give finite losses and gradients.
#[test]
fn no_nan_or_inf_at_1e4_in_f32() {
    let fx = fixture();
    let case = fx["cases"].as_array().unwrap().iter().find(|c| c["name"] == "extreme").unwrap();
    for name in case["objectives"].as_object().unwrap().keys() {
        let (loss, grad) = run(case, name, DType::F32);
        assert!(loss.is_finite(), "{name}: {loss}");
        assert!(grad.iter().flatten().all(|g| g.is_finite()), "{name}");
    }
}

#[test]
fn objectives_refuse_datasets_without_their_fields() {
    let labels_only = DatasetFields { lists: false, labels: true, teacher_scores: false, teacher_ranks: false };
    let err = Objective::MarginMse.check(&labels_only).unwrap_err().to_string();
    assert_eq!(err, "margin_mse needs teacher scores; the dataset has triples, labels");
    assert!(Objective::Bce.check(&labels_only).is_ok());
    let triples = DatasetFields { lists: false, labels: false, teacher_scores: true, teacher_ranks: false };
    let err = Objective::DistillRankNet.check(&triples).unwrap_err().to_string();
    assert_eq!(
        err,
        "distill_ranknet needs lists with teacher ranks (the lists layout); the dataset has triples, teacher scores"
    );
    let bare_lists = DatasetFields { lists: true, labels: false, teacher_scores: false, teacher_ranks: false };
    let err = Objective::InfoNce { temperature: 1.0 }.check(&bare_lists).unwrap_err().to_string();
    assert!(err.ends_with("the dataset has lists with no labels or teacher scores"), "{err}");
    assert!("bogus".parse::<Objective>().is_err());
    assert_eq!("margin-mse".parse::<Objective>().unwrap(), Objective::MarginMse);
}

/// MarginMSE, ADR-MSE, BCE and MSE agree with sentence-transformers' own cross-encoder losses (6.x)
/// on the same scores (some run in f32 there, hence the tolerance).
#[test]
fn agrees_with_sentence_transformers_implementations() {
    let fx = fixture();
    let st = &fx["sentence_transformers"]["values"];
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        let cname = case["name"].as_str().unwrap();
        for (name, want) in st[cname].as_object().unwrap() {
            let (loss, _) = run(case, name, DType::F64);
            let want = want.as_f64().unwrap();
            assert!(close(loss, want, 2e-6, 1e-6), "{cname}/{name}: {loss} vs sentence-transformers {want}");
            checked += 1;
        }
    }
    assert!(checked >= 19, "{checked}");
}
