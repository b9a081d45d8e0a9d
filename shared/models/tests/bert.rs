//! BERT parity with transformers (fixture: scripts/fixtures/backbones_reference.py): token ids
//! exactly, logits within 1e-4, and gradients of a ranking loss within 1e-3 relative.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use distill_models::bert::{BertConfig, BertCrossEncoder};
use distill_models::checkpoint::load_safetensors;
use distill_models::tokenize::PairTokenizer;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert")
}

fn reference() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir().join("reference.json")).unwrap()).unwrap()
}

fn setup() -> (VarMap, BertCrossEncoder, PairTokenizer, serde_json::Value) {
    let r = reference();
    let cfg: BertConfig = serde_json::from_slice(&std::fs::read(dir().join("config.json")).unwrap()).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = BertCrossEncoder::load(vb, &cfg).unwrap();
    let report = load_safetensors(&varmap, &dir().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(report.missing.is_empty(), "{report:?}");
    let tok = PairTokenizer::from_file(
        &dir().join("tokenizer.json"),
        r["max_query_length"].as_u64().unwrap() as usize,
        r["max_length"].as_u64().unwrap() as usize,
        cfg.pad_token_id,
    )
    .unwrap();
    (varmap, model, tok, r)
}

fn pairs(r: &serde_json::Value) -> Vec<(String, String)> {
    serde_json::from_value(r["pairs"].clone()).unwrap()
}

#[test]
fn token_ids_match_the_hf_fast_tokenizer() {
    let (_, _, tok, r) = setup();
    for (i, (q, p)) in pairs(&r).iter().enumerate() {
        let (ids, types) = tok.encode_pair(q, p).unwrap();
        let want: Vec<u32> = serde_json::from_value(r["input_ids"][i].clone()).unwrap();
        let want_types: Vec<u32> = serde_json::from_value(r["token_type_ids"][i].clone()).unwrap();
        assert_eq!(ids, want, "pair {i}");
        assert_eq!(types, want_types, "pair {i}");
    }
}

fn logits(model: &BertCrossEncoder, tok: &PairTokenizer, r: &serde_json::Value) -> Tensor {
    let ps = pairs(r);
    let refs: Vec<(&str, &str)> = ps.iter().map(|(q, p)| (q.as_str(), p.as_str())).collect();
    let b = tok.batch(&refs, &Device::Cpu).unwrap();
    model.forward(&b.input_ids, &b.token_type_ids, &b.attention_mask, false).unwrap()
}

#[test]
fn logits_match_transformers() {
    let (_, model, tok, r) = setup();
    let got: Vec<f32> = logits(&model, &tok, &r).to_vec1().unwrap();
    let want: Vec<f64> = serde_json::from_value(r["logits"].clone()).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((*g as f64 - w).abs() < 1e-4, "pair {i}: {g} vs transformers {w}");
    }
}

#[test]
fn every_parameter_gets_the_pytorch_gradient() {
    let (varmap, model, tok, r) = setup();
    let l = logits(&model, &tok, &r);
    // InfoNCE over the batch as one group, the first pair positive, plus BCE (as in the fixture
    // script), so that the classifier bias gets a gradient too.
    let logp = distill_models::layers::softmax_last_dim(&l.unsqueeze(0).unwrap()).unwrap().log().unwrap();
    let infonce = logp.narrow(1, 0, 1).unwrap().neg().unwrap().sum_all().unwrap();
    let n = l.dim(0).unwrap();
    let target = Tensor::from_vec((0..n).map(|i| if i == 0 { 1f32 } else { 0.0 }).collect(), n, &Device::Cpu).unwrap();
    let softplus = (l.relu().unwrap() + (l.abs().unwrap().neg().unwrap().exp().unwrap() + 1.0).unwrap().log().unwrap()).unwrap();
    let bce = (softplus - (target * &l).unwrap()).unwrap().mean_all().unwrap();
    let loss = (infonce + bce).unwrap();
    let want_loss = r["loss"].as_f64().unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() as f64 - want_loss).abs() < 1e-4);
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let reference = r["grads"].as_object().unwrap();
    assert_eq!(data.len(), reference.len(), "same parameters as transformers");
    for (name, var) in data.iter() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} received no gradient"));
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f64> = serde_json::from_value(reference[name].clone()).unwrap_or_else(|_| panic!("{name} not in reference"));
        let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff = g.iter().zip(&want).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>().sqrt();
        if name.ends_with("attention.self.key.bias") {
            // q·(k + b) shifts every score of a query row by the same q·b, which softmax ignores:
            // the exact gradient is 0 and both sides hold only rounding noise.
            let ours = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            assert!(ours < 1e-5 && norm < 1e-5, "{name}: {ours} / {norm}");
            continue;
        }
        assert!(g.iter().any(|x| *x != 0.0), "{name}: zero gradient");
        assert!(diff <= 1e-3 * norm, "{name}: relative gradient error {}", diff / norm);
    }
}
