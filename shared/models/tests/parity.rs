//! Parity with transformers for each architecture (fixtures: scripts/fixtures/backbones_reference.py):
//! token ids exactly, logits within 1e-4, and every parameter's gradient of a ranking loss within
//! 1e-3 relative of PyTorch's.

use candle_core::{Device, Tensor};
use distill_models::CrossEncoder;
use std::path::PathBuf;

fn load(arch: &str) -> (CrossEncoder, serde_json::Value) {
    load_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(arch))
}

fn load_dir(dir: &std::path::Path) -> (CrossEncoder, serde_json::Value) {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let model = CrossEncoder::load(
        dir,
        r["max_query_length"].as_u64().unwrap() as usize,
        r["max_length"].as_u64().unwrap() as usize,
        &Device::Cpu,
    )
    .unwrap();
    assert!(model.report.missing.is_empty(), "{:?}", model.report);
    (model, r)
}

fn pairs(r: &serde_json::Value) -> Vec<(String, String)> {
    serde_json::from_value(r["pairs"].clone()).unwrap()
}

fn check_ids(arch: &str) {
    let (model, r) = load(arch);
    for (i, (q, p)) in pairs(&r).iter().enumerate() {
        let (ids, types) = model.tokenizer.encode_pair(q, p).unwrap();
        let want: Vec<u32> = serde_json::from_value(r["input_ids"][i].clone()).unwrap();
        let want_types: Vec<u32> = serde_json::from_value(r["token_type_ids"][i].clone()).unwrap();
        assert_eq!(ids, want, "{arch} pair {i}");
        assert_eq!(types, want_types, "{arch} pair {i}");
    }
}

fn logits(model: &CrossEncoder, r: &serde_json::Value) -> Tensor {
    let ps = pairs(r);
    let refs: Vec<(&str, &str)> = ps.iter().map(|(q, p)| (q.as_str(), p.as_str())).collect();
    let b = model.tokenizer.batch(&refs, &Device::Cpu).unwrap();
    model.backbone.forward(&b.input_ids, &b.token_type_ids, &b.attention_mask, false).unwrap()
}

fn check_logits(arch: &str) {
    let (model, r) = load(arch);
    let got: Vec<f32> = logits(&model, &r).to_vec1().unwrap();
    let want: Vec<f64> = serde_json::from_value(r["logits"].clone()).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((*g as f64 - w).abs() < 1e-4, "{arch} pair {i}: {g} vs transformers {w}");
    }
}

/// InfoNCE over the batch as one group, the first pair positive, plus BCE (as in the fixture
/// script), so that the head's bias, to which a softmax is blind, gets a gradient too.
fn ranking_loss(l: &Tensor) -> Tensor {
    let logp = distill_models::layers::softmax_last_dim(&l.unsqueeze(0).unwrap()).unwrap().log().unwrap();
    let infonce = logp.narrow(1, 0, 1).unwrap().neg().unwrap().sum_all().unwrap();
    let n = l.dim(0).unwrap();
    let target = Tensor::from_vec((0..n).map(|i| if i == 0 { 1f32 } else { 0.0 }).collect(), n, &Device::Cpu).unwrap();
    let softplus =
        (l.relu().unwrap() + (l.abs().unwrap().neg().unwrap().exp().unwrap() + 1.0).unwrap().log().unwrap()).unwrap();
    let bce = (softplus - (target * l).unwrap()).unwrap().mean_all().unwrap();
    (infonce + bce).unwrap()
}

fn check_gradients(arch: &str) {
    let (model, r) = load(arch);
    let l = logits(&model, &r);
    let loss = ranking_loss(&l);
    assert!((loss.to_scalar::<f32>().unwrap() as f64 - r["loss"].as_f64().unwrap()).abs() < 1e-4, "{arch} loss");
    let grads = loss.backward().unwrap();
    let data = model.varmap.data().lock().unwrap();
    let reference = r["grads"].as_object().unwrap();
    assert_eq!(data.len(), reference.len(), "{arch}: same parameters as transformers");
    for (name, var) in data.iter() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{arch} {name} received no gradient"));
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f64> =
            serde_json::from_value(reference[name].clone()).unwrap_or_else(|_| panic!("{name} not in reference"));
        let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff = g.iter().zip(&want).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>().sqrt();
        if name.ends_with("attention.self.key.bias") {
            // q·(k + b) shifts every score of a query row by the same q·b, which softmax ignores:
            // the exact gradient is 0 and both sides hold only rounding noise.
            let ours = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            assert!(ours < 1e-5 && norm < 1e-5, "{arch} {name}: {ours} / {norm}");
            continue;
        }
        assert!(g.iter().any(|x| *x != 0.0), "{arch} {name}: zero gradient");
        assert!(diff <= 1e-3 * norm, "{arch} {name}: relative gradient error {}", diff / norm);
    }
}

#[test]
fn bert_token_ids_logits_and_gradients_match_transformers() {
    check_ids("bert");
    check_logits("bert");
    check_gradients("bert");
}

#[test]
fn electra_token_ids_logits_and_gradients_match_transformers() {
    check_ids("electra");
    check_logits("electra");
    check_gradients("electra");
}

#[test]
fn roberta_token_ids_logits_and_gradients_match_transformers() {
    check_ids("roberta");
    check_logits("roberta");
    check_gradients("roberta");
}

#[test]
fn xlm_roberta_token_ids_logits_and_gradients_match_transformers() {
    check_ids("xlm-roberta");
    check_logits("xlm-roberta");
    check_gradients("xlm-roberta");
}

#[test]
fn modernbert_token_ids_logits_and_gradients_match_transformers() {
    check_ids("modernbert");
    check_logits("modernbert");
    check_gradients("modernbert");
}

#[test]
fn deberta_v3_token_ids_logits_and_gradients_match_transformers() {
    check_ids("deberta");
    check_logits("deberta");
    check_gradients("deberta");
}

/// Token-budget scoring (pairs sorted by length, passes cut by padded tokens) gives transformers'
/// logits in input order, in several passes, with less padding than one pass over all pairs.
#[test]
fn token_budget_scoring_keeps_order_and_values() {
    for arch in ["bert", "electra", "roberta", "xlm-roberta", "deberta", "modernbert"] {
        let (model, r) = load(arch);
        let ps = pairs(&r);
        let refs: Vec<(&str, &str)> = ps.iter().map(|(q, p)| (q.as_str(), p.as_str())).collect();
        let want: Vec<f64> = serde_json::from_value(r["logits"].clone()).unwrap();
        let longest = refs.iter().map(|(q, p)| model.tokenizer.encode_pair(q, p).unwrap().0.len()).max().unwrap();
        let budget = distill_models::Batching { max_pairs: 64, max_tokens: longest * 2 };
        let (got, stats) = model.score_with(&refs, budget).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 1e-4, "{arch} pair {i}: {g} vs transformers {w}");
        }
        assert!(stats.passes >= 2, "{arch}: {stats:?}");
        assert!(stats.padded_tokens <= (refs.len() * longest) as u64, "{arch}: {stats:?}");
        assert!(stats.tokens <= stats.padded_tokens);
    }
}

/// Keeping the first N layers gives transformers' logits for `from_pretrained(dir, num_hidden_layers=N)`
/// (fixture: scripts/fixtures/truncated_reference.py), and the export says N layers.
#[test]
fn truncated_backbones_match_transformers() {
    for arch in ["bert", "modernbert", "deberta"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(arch);
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let t: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("truncated.json")).unwrap()).unwrap();
        let n = t["num_hidden_layers"].as_u64().unwrap() as usize;
        let model = CrossEncoder::load_layers(
            &dir,
            r["max_query_length"].as_u64().unwrap() as usize,
            r["max_length"].as_u64().unwrap() as usize,
            &Device::Cpu,
            candle_core::DType::F32,
            Some(n),
        )
        .unwrap();
        assert!(model.report.missing.is_empty());
        assert!(model.report.unexpected.iter().any(|u| u.contains(&format!(".{n}."))), "{arch}: later layers unused");
        let got: Vec<f32> = logits(&model, &r).to_vec1().unwrap();
        let want: Vec<f64> = serde_json::from_value(t["logits"].clone()).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 1e-4, "{arch} ({n} layers) pair {i}: {g} vs transformers {w}");
        }
        let out = tempfile::tempdir().unwrap();
        model.save(out.path()).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["num_hidden_layers"], serde_json::json!(n));
        let err =
            CrossEncoder::load_layers(&dir, 8, 32, &Device::Cpu, candle_core::DType::F32, Some(99)).err().unwrap();
        assert!(err.to_string().contains("cannot keep 99"), "{err}");
    }
}

/// Mixed precision (bf16 matmuls, f32 master weights): the same parameters get f32 gradients
/// close to the fp32 ones, and the logits stay close, for every architecture.
#[test]
fn bf16_autocast_trains_f32_master_weights_close_to_fp32() {
    for arch in ["bert", "electra", "roberta", "deberta", "modernbert"] {
        let (model, r) = load(arch);
        let l32 = logits(&model, &r);
        let g32 = ranking_loss(&l32).backward().unwrap();
        distill_models::layers::autocast(Some(candle_core::DType::BF16));
        let l16 = logits(&model, &r);
        let g16 = ranking_loss(&l16).backward().unwrap();
        distill_models::layers::autocast(None);
        assert_eq!(l16.dtype(), candle_core::DType::F32);
        // The fixtures' weights are drawn large on purpose (std 0.4), which bf16 feels more than
        // real checkpoints do (docs/perf.md: 1e-2 to 7e-2 here, for PyTorch's autocast too).
        let (a, b): (Vec<f32>, Vec<f32>) = (l32.to_vec1().unwrap(), l16.to_vec1().unwrap());
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let logit_err = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / scale).fold(0f32, f32::max);
        assert!(logit_err < 0.1, "{arch}: bf16 logits off by {logit_err} of the largest");
        let data = model.varmap.data().lock().unwrap();
        let (mut num, mut den) = (0f64, 0f64);
        for (name, var) in data.iter() {
            assert_eq!(var.dtype(), candle_core::DType::F32, "{arch} {name}: master weight not f32");
            let want = g32.get(var.as_tensor()).unwrap();
            let got = g16.get(var.as_tensor()).unwrap_or_else(|| panic!("{arch} {name}: no gradient under bf16"));
            assert_eq!(got.dtype(), candle_core::DType::F32, "{arch} {name}");
            let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            num += g.iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
            den += w.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
        }
        let rel = (num / den).sqrt();
        eprintln!("{arch}: bf16 logits {logit_err:.2e}, gradients {rel:.2e} (relative to fp32)");
        assert!(rel < 0.15, "{arch}: bf16 gradients {rel} relative to fp32's");
    }
}

/// A max length past the position table (the tiny BERT fixture has 64 positions) is cut to what
/// the model takes instead of indexing past the table: a long pair scores as at 64 tokens.
#[test]
fn max_length_is_cut_to_the_position_table() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert");
    let long = "word ".repeat(300);
    let pairs = [("a query", long.as_str())];
    let wide = CrossEncoder::load(&dir, 8, 512, &Device::Cpu).unwrap();
    let fit = CrossEncoder::load(&dir, 8, 64, &Device::Cpu).unwrap();
    let (a, b) = (wide.score(&pairs, 4).unwrap(), fit.score(&pairs, 4).unwrap());
    assert_eq!(a, b);
    let cfg = serde_json::json!({"max_position_embeddings": 514, "pad_token_id": 1});
    assert_eq!(distill_models::cross_encoder::position_limit("xlm-roberta", &cfg), Some(512));
    assert_eq!(distill_models::cross_encoder::position_limit("modernbert", &cfg), None);
}

/// The last layer run for the first token only (the default: the head reads nothing else) gives
/// the scores and every parameter's gradient of the full last layer, on every architecture and on
/// ModernBERT with CLS pooling too (its fixture pools by mean, which keeps the full layer).
#[test]
fn the_last_layer_for_the_first_token_only_matches_the_full_layer() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cls = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures.join("modernbert")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, cls.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = cls.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["classifier_pooling"] = "cls".into();
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let dirs = ["bert", "electra", "roberta", "xlm-roberta", "deberta"].map(|a| fixtures.join(a));
    for dir in dirs.iter().map(PathBuf::as_path).chain([cls.path()]) {
        let (model, r) = load_dir(dir);
        let run = |first_only: bool| {
            distill_models::layers::first_token_only(first_only);
            let l = logits(&model, &r);
            distill_models::layers::first_token_only(true);
            let grads = ranking_loss(&l).backward().unwrap();
            let data = model.varmap.data().lock().unwrap();
            let g: Vec<(String, Vec<f32>)> = data
                .iter()
                .map(|(name, var)| {
                    let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{dir:?} {name}: no gradient"));
                    (name.clone(), g.flatten_all().unwrap().to_vec1().unwrap())
                })
                .collect();
            (l.to_vec1::<f32>().unwrap(), g)
        };
        let ((lf, gf), (la, ga)) = (run(true), run(false));
        for (i, (a, b)) in lf.iter().zip(&la).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{dir:?} pair {i}: {a} vs the full layer's {b}");
        }
        // Relative to each gradient, with a floor of a millionth of the largest (the key bias's
        // gradient is zero up to rounding: softmax ignores a constant added to a row).
        let norm = |g: &[f32]| g.iter().map(|x| x * x).sum::<f32>().sqrt();
        let top = ga.iter().map(|(_, g)| norm(g)).fold(0f32, f32::max);
        for ((name, a), (_, b)) in gf.iter().zip(&ga) {
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt();
            assert!(
                diff <= 1e-4 * norm(b) + 1e-6 * top,
                "{dir:?} {name}: {diff} against a gradient of norm {} (largest {top})",
                norm(b)
            );
        }
    }
}
