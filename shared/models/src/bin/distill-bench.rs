//! `distill-bench`: scoring and training throughput of the cross-encoder backbones, the numbers to
//! put next to `../shared/bench/pytorch_baseline.py` (same shapes, same batch, same step: forward,
//! MarginMSE-like loss on pairs, backward, clipping, AdamW) run on the same machine.
//!
//! ```text
//! distill-bench --device cuda:0 --shapes minilm-l6,bert-base,electra-base --seq 256
//! distill-bench --device cpu --model path/to/all-MiniLM-L6-v2 --modes score --score-batch 32
//! ```
//! Prints one JSON object per (model, mode) and a table; `--json FILE` writes them all.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use distill_models::cross_encoder::Backbone;
use distill_models::optim::{AdamW, AdamWConfig};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(name = "distill-bench", about = "Cross-encoder scoring and training throughput")]
struct Args {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Random-init shapes: minilm-l6 (-l3, -l2), bert-base, electra-base, deberta-v3-base, modernbert-base.
    #[arg(long, value_delimiter = ',', default_value = "minilm-l6,bert-base,electra-base")]
    shapes: Vec<String>,
    /// A Hugging Face model directory to bench instead of the shapes (its config and weights).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "score,train")]
    modes: Vec<String>,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    #[arg(long, default_value_t = 512)]
    score_batch: usize,
    #[arg(long, default_value_t = 64)]
    train_batch: usize,
    /// Scoring weights and activations: f32 or bf16.
    #[arg(long, default_value = "f32")]
    score_dtype: String,
    /// Training precision: fp32, or bf16 (mixed: bf16 matmuls, f32 master weights and optimizer state).
    #[arg(long, default_value = "fp32")]
    train_precision: String,
    /// Training leaves the word-embedding table as it is (no gradient, no update).
    #[arg(long)]
    freeze_word_embeddings: bool,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Also time the training step's forward and forward + backward alone (where the time goes).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    breakdown: bool,
    /// Which kernels (`kernels/`): auto (on CUDA the fused kernels already proven on a GPU, on the
    /// CPU candle's composite ops), fused (every fused kernel), composite, or auto plus a list of
    /// the families not yet proven on a GPU (`layer_norm,bias_add`: embedding, layer_norm,
    /// bias_add, rotary, attention_scoring, attention_training), to measure what they bring.
    #[arg(long, default_value = "auto")]
    kernels: String,
    /// Cross-encoders run their last layer for the first token only (the head reads nothing
    /// else; `false`: the full last layer, to measure what it saves).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    first_token_only: bool,
    /// Instead of timing: count what one iteration dispatches to the backend, after one untimed
    /// (on CUDA each operation is about one kernel launch): operations, bytes read and written,
    /// matmul flops, by kind (`candle_core::op_stats`); `scripts/bench/op-stats.py` runs it at two
    /// batch sizes and extrapolates to the benchmark's.
    #[arg(long)]
    op_stats: bool,
    /// With --op-stats: also time each operation (waiting for the device before each, so the
    /// run is slower than a timed one): per kind its milliseconds, achieved bandwidth and
    /// TFLOP/s (`scripts/bench/op-stats.py --counted`).
    #[arg(long)]
    op_times: bool,
    /// Instead of timing: check the fused kernels against the composite ops on --device (values
    /// and gradients; AdamW updates on CUDA) and exit non-zero on a difference.
    #[arg(long)]
    check_kernels: bool,
    /// With --check-kernels: only these groups (core, embedding, layer_norm, bias_add, rotary,
    /// attention_scoring, attention_training, scoring_epilogues, matmul_epilogues, backbones, optimizer).
    #[arg(long, value_delimiter = ',')]
    check_only: Vec<String>,
    /// Instead of timing: score the pairs of these parity fixtures (model directories holding a
    /// reference.json from transformers, fp32) on --device in --score-dtype and report the largest
    /// relative difference to the reference logits.
    #[arg(long, value_delimiter = ',')]
    parity: Vec<std::path::PathBuf>,
    /// For a parity fixture holding only a head (`classifier.safetensors`, as the all-MiniLM-L6-v2
    /// fixture): the model directory it goes on.
    #[arg(long)]
    parity_base: Option<std::path::PathBuf>,
}

/// Scores each fixture's pairs on `dev` in `dtype`; prints and returns the worst relative error.
fn parity(
    dirs: &[std::path::PathBuf],
    base: Option<&std::path::Path>,
    dev: &Device,
    dtype: DType,
) -> anyhow::Result<f64> {
    let mut worst = 0f64;
    for dir in dirs {
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json"))?)?;
        let max_q = r["max_query_length"].as_u64().unwrap_or(32) as usize;
        let max_len = r["max_length"].as_u64().unwrap_or(256) as usize;
        let head = dir.join("classifier.safetensors");
        let model = if dir.join("config.json").is_file() {
            distill_models::CrossEncoder::load_as(dir, max_q, max_len, dev, dtype)?
        } else {
            let base =
                base.ok_or_else(|| anyhow::anyhow!("{}: a head-only fixture needs --parity-base", dir.display()))?;
            let m = distill_models::CrossEncoder::load_as(base, max_q, max_len, dev, dtype)?;
            distill_models::checkpoint::load_safetensors(&m.varmap, &head, dev)?;
            m
        };
        let pairs: Vec<(String, String)> = serde_json::from_value(r["pairs"].clone())?;
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(q, p)| (q.as_str(), p.as_str())).collect();
        let got = model.score(&refs, 64)?;
        let want: Vec<f64> = serde_json::from_value(r["logits"].clone())?;
        let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-6);
        let err = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs() / scale).fold(0f64, f64::max);
        println!(
            "{}: {} pairs, max |{dtype:?} - fp32 transformers| / max|logit| = {err:.2e}",
            dir.display(),
            want.len()
        );
        worst = worst.max(err);
    }
    Ok(worst)
}

fn shape_config(name: &str) -> anyhow::Result<(String, serde_json::Value)> {
    let bert = |h: usize, layers: usize, inter: usize| {
        serde_json::json!({"vocab_size": 30522, "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": 12,
            "intermediate_size": inter, "max_position_embeddings": 512, "type_vocab_size": 2, "pad_token_id": 0})
    };
    Ok(match name {
        "minilm-l6" => ("bert".into(), bert(384, 6, 1536)),
        // MiniLM cut to its first 3 or 2 layers (`backbone_layers`), the demo's CPU students.
        "minilm-l3" => ("bert".into(), bert(384, 3, 1536)),
        "minilm-l2" => ("bert".into(), bert(384, 2, 1536)),
        "bert-base" => ("bert".into(), bert(768, 12, 3072)),
        "electra-base" => {
            let mut c = bert(768, 12, 3072);
            c["embedding_size"] = 768.into();
            ("electra".into(), c)
        }
        // The shapes of ../shared/bench/pytorch_baseline.py.
        "deberta-v3-base" => (
            "deberta-v2".into(),
            serde_json::json!({"vocab_size": 128100, "hidden_size": 768,
            "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
            "relative_attention": true, "position_buckets": 256, "norm_rel_ebd": "layer_norm", "share_att_key": true,
            "pos_att_type": ["p2c", "c2p"], "max_relative_positions": -1, "position_biased_input": false,
            "type_vocab_size": 0, "pad_token_id": 0}),
        ),
        "modernbert-base" => (
            "modernbert".into(),
            serde_json::json!({"vocab_size": 50368, "hidden_size": 768,
            "intermediate_size": 1152, "num_hidden_layers": 22, "num_attention_heads": 12, "pad_token_id": 50283}),
        ),
        other => anyhow::bail!(
            "unknown shape '{other}' (minilm-l6, minilm-l3, minilm-l2, bert-base, electra-base, deberta-v3-base, modernbert-base)"
        ),
    })
}

/// Median seconds of `iters` timed calls after `warmup` untimed ones.
fn timed(dev: &Device, warmup: usize, iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

/// One warm-up call of `f`, then the operations one more call dispatches (`candle_core::op_stats`)
/// by phase: `f` calls `phase(name)` at the end of each. Largest traffic first, with totals. With
/// `timing`, each operation also timed on that device (`op_stats::set_timing`).
fn counted(
    timing: Option<&candle_core::Device>,
    mut f: impl FnMut(&mut dyn FnMut(&'static str)) -> anyhow::Result<()>,
) -> anyhow::Result<serde_json::Value> {
    use candle_core::op_stats;
    f(&mut |_| ())?;
    if let Some(dev) = timing {
        dev.synchronize()?;
        let dev = dev.clone();
        op_stats::set_timing(Some(Box::new(move || {
            let _ = dev.synchronize();
        })));
    }
    op_stats::take();
    op_stats::set_enabled(true);
    let mut phases = Vec::new();
    let r = f(&mut |name| phases.push((name, op_stats::take())));
    op_stats::set_enabled(false);
    op_stats::set_timing(None);
    r?;
    let sum =
        |ops: &[(_, op_stats::OpStat)], f: fn(&op_stats::OpStat) -> u64| ops.iter().map(|(_, s)| f(s)).sum::<u64>();
    let mut totals = [0u64; 4];
    let phases: Vec<serde_json::Value> = phases
        .into_iter()
        .map(|(phase, mut ops)| {
            ops.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(b.1.calls.cmp(&a.1.calls)));
            let t = [sum(&ops, |s| s.calls), sum(&ops, |s| s.bytes), sum(&ops, |s| s.flops), sum(&ops, |s| s.nanos)];
            for (total, x) in totals.iter_mut().zip(t) {
                *total += x;
            }
            let ops: Vec<serde_json::Value> = ops
                .iter()
                .map(|((kind, name), s)| {
                    serde_json::json!({"kind": kind, "name": name, "calls": s.calls, "bytes": s.bytes, "flops": s.flops, "ns": s.nanos})
                })
                .collect();
            serde_json::json!({"phase": phase, "calls": t[0], "bytes": t[1], "flops": t[2], "ns": t[3], "ops": ops})
        })
        .collect();
    Ok(
        serde_json::json!({"calls": totals[0], "bytes": totals[1], "flops": totals[2], "ns": totals[3], "phases": phases}),
    )
}

fn counted_row(
    mut row: serde_json::Value,
    model: &str,
    mode: &str,
    batch: usize,
    seq: usize,
    kernels: &str,
) -> serde_json::Value {
    for (k, v) in [
        ("model", model.into()),
        ("mode", mode.into()),
        ("batch", batch.into()),
        ("seq", seq.into()),
        ("kernels", kernels.into()),
    ] {
        row[k] = v;
    }
    row
}

struct Built {
    backbone: Backbone,
    varmap: VarMap,
    params: usize,
    vocab: usize,
}

fn build(name: &str, model: Option<&std::path::Path>, dtype: DType, dev: &Device) -> anyhow::Result<Built> {
    let (model_type, config) = match model {
        Some(dir) => {
            let config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
            (config["model_type"].as_str().unwrap_or_default().to_string(), config)
        }
        None => shape_config(name)?,
    };
    let vocab = config["vocab_size"].as_u64().unwrap_or(30522) as usize;
    let varmap = VarMap::new();
    let (backbone, _) = Backbone::from_config(&model_type, config, VarBuilder::from_varmap(&varmap, dtype, dev))?;
    if let Some(dir) = model {
        distill_models::checkpoint::load_safetensors(&varmap, &dir.join("model.safetensors"), dev)?;
    }
    let params = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    Ok(Built { backbone, varmap, params, vocab })
}

fn random_ids(vocab: usize, batch: usize, seq: usize, dev: &Device) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let ids: Vec<u32> =
        (0..batch * seq).map(|i| 1000 + ((i as u64 * 2654435761) % (vocab as u64 - 1001)) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, seq), dev)?;
    let types = Tensor::zeros((batch, seq), DType::U32, dev)?;
    let mask = Tensor::ones((batch, seq), DType::U32, dev)?;
    Ok((ids, types, mask))
}

/// Sets which kernels run (`--kernels`); returns how the table names the choice.
fn set_kernels(choice: &str, dev: &Device) -> anyhow::Result<String> {
    Ok(match choice {
        "auto" => {
            distill_models::kernels::set_fused_default();
            if dev.is_cuda() { "fused (proven on a GPU)" } else { "composite" }.to_string()
        }
        "fused" => {
            distill_models::kernels::set_fused(true);
            "fused".to_string()
        }
        "composite" => {
            distill_models::kernels::set_fused(false);
            "composite".to_string()
        }
        list => {
            let families = distill_models::kernels::Unproven::parse_list(list)
                .map_err(|e| anyhow::anyhow!("--kernels {list}: auto, fused, composite or a list of families: {e}"))?;
            distill_models::kernels::set_unproven(&families);
            list.to_string()
        }
    })
}

/// `--check-kernels`: the fused kernels against the composite ops on `dev`.
fn check_kernels(args: &Args, dev: &Device) -> anyhow::Result<()> {
    let groups: Vec<&str> = args.check_only.iter().map(String::as_str).collect();
    let checks = distill_models::kernels::check_against_composite(dev, &groups)?;
    for line in &checks.lines {
        println!("{line}");
    }
    let on = distill_models::device_name(dev);
    anyhow::ensure!(
        checks.bad.is_empty(),
        "fused kernels differ from the composite ops on {on}: {}",
        checks.bad.join("; ")
    );
    println!("fused kernels match the composite ops on {on}");
    Ok(())
}

/// What one benchmark row is about.
struct Bench<'a> {
    args: &'a Args,
    name: &'a str,
    dev: &'a Device,
    kernels: &'a str,
}

/// Scoring throughput (or, with `--op-stats`, what one batch dispatches).
fn bench_score(b: &Bench, dtype: DType) -> anyhow::Result<serde_json::Value> {
    let args = b.args;
    let built = build(b.name, args.model.as_deref(), dtype, b.dev)?;
    let (ids, types, mask) = random_ids(built.vocab, args.score_batch, args.seq, b.dev)?;
    let score = || -> anyhow::Result<()> {
        distill_models::layers::no_grad(|| built.backbone.forward(&ids, &types, &mask, false))?;
        Ok(())
    };
    let mode = format!("score-{}", args.score_dtype);
    if args.op_stats {
        let row = counted(args.op_times.then_some(b.dev), |phase| {
            score()?;
            phase("forward");
            Ok(())
        })?;
        return Ok(counted_row(row, b.name, &mode, args.score_batch, args.seq, b.kernels));
    }
    let t = timed(b.dev, args.warmup, args.iters, score)?;
    let n = args.score_batch as f64;
    Ok(serde_json::json!({"model": b.name, "mode": mode, "params": built.params,
        "batch": args.score_batch, "seq": args.seq, "s": t, "pairs_per_s": n / t, "kernels": b.kernels,
        "first_token_only": args.first_token_only,
        "tflops": 2.0 * built.params as f64 * n * args.seq as f64 / t / 1e12}))
}

/// Training-step throughput: forward, a MarginMSE-like loss on pairs, backward, clipping as the
/// trainer does it (the norm and the coefficient on the device, the update scaling inside: no
/// host read in the step) and AdamW; with `--op-stats`, what one step dispatches by phase.
fn bench_train(b: &Bench) -> anyhow::Result<serde_json::Value> {
    let args = b.args;
    let built = build(b.name, args.model.as_deref(), DType::F32, b.dev)?;
    let mut opt = AdamW::new(&built.varmap, AdamWConfig { weight_decay: 0.0, ..Default::default() })?;
    let (ids, types, mask) = random_ids(built.vocab, args.train_batch, args.seq, b.dev)?;
    let target = Tensor::randn(0f32, 1.0, args.train_batch / 2, b.dev)?;
    let _modes = distill_models::layers::TrainingModes::set(
        distill_models::parse_precision(&args.train_precision)?,
        args.freeze_word_embeddings,
    );
    let loss = || -> anyhow::Result<Tensor> {
        let s = built.backbone.forward(&ids, &types, &mask, true)?.reshape((args.train_batch / 2, 2))?;
        let margin = (s.narrow(1, 0, 1)?.squeeze(1)? - s.narrow(1, 1, 1)?.squeeze(1)?)?;
        Ok((margin - &target)?.sqr()?.mean_all()?)
    };
    let mut update = |g: &candle_core::backprop::GradStore| -> anyhow::Result<()> {
        let grads = opt.grads(g);
        let clip = grads.clip_on_device(1.0)?;
        opt.update_scaled(&grads, 1e-5, clip.as_ref().map(|(_, coef)| coef))?;
        Ok(())
    };
    let mode = format!("train-{}", args.train_precision);
    if args.op_stats {
        let row = counted(args.op_times.then_some(b.dev), |phase| {
            let l = loss()?;
            phase("forward");
            let g = l.backward()?;
            phase("backward");
            update(&g)?;
            phase("optimizer");
            Ok(())
        })?;
        return Ok(counted_row(row, b.name, &mode, args.train_batch, args.seq, b.kernels));
    }
    let t = timed(b.dev, args.warmup, args.iters, || update(&loss()?.backward()?))?;
    let (fwd, fwd_bwd) = if args.breakdown { breakdown(b, &loss)? } else { (f64::NAN, f64::NAN) };
    let n = args.train_batch as f64;
    Ok(serde_json::json!({"model": b.name, "mode": mode, "params": built.params, "batch": args.train_batch,
        "seq": args.seq, "s": t, "pairs_per_s": n / t, "kernels": b.kernels,
        "first_token_only": args.first_token_only, "forward_s": fwd, "backward_s": fwd_bwd - fwd, "optimizer_s": t - fwd_bwd,
        "tflops": 6.0 * built.params as f64 * n * args.seq as f64 / t / 1e12}))
}

/// Where a training step's time goes: the forward pass (keeping the graph), and forward + backward.
fn breakdown(b: &Bench, loss: &dyn Fn() -> anyhow::Result<Tensor>) -> anyhow::Result<(f64, f64)> {
    let iters = b.args.iters.min(5);
    let fwd = timed(b.dev, 1, iters, || loss().map(drop))?;
    let fwd_bwd = timed(b.dev, 1, iters, || loss()?.backward().map(drop).map_err(Into::into))?;
    Ok((fwd, fwd_bwd))
}

/// The tables printed after the JSON lines.
fn print_tables(rows: &[serde_json::Value], op_stats: bool) {
    if op_stats {
        println!(
            "\n{:<16} {:<15} {:>6} {:>10} {:>12} {:>10}",
            "model", "mode", "batch", "operations", "GB moved", "matmul TF"
        );
        for r in rows {
            println!(
                "{:<16} {:<15} {:>6} {:>10} {:>12.3} {:>10.3}",
                r["model"].as_str().unwrap_or_default(),
                r["mode"].as_str().unwrap_or_default(),
                r["batch"].as_u64().unwrap_or_default(),
                r["calls"].as_u64().unwrap_or_default(),
                r["bytes"].as_f64().unwrap_or_default() / 1e9,
                r["flops"].as_f64().unwrap_or_default() / 1e12
            );
        }
    }
    println!("\n{:<16} {:<15} {:>9} {:>10} {:>8}", "model", "mode", "params(M)", "pairs/s", "TFLOP/s");
    for r in rows.iter().filter(|r| r.get("pairs_per_s").is_some()) {
        println!(
            "{:<16} {:<15} {:>9.1} {:>10.0} {:>8.2}",
            r["model"].as_str().unwrap_or_default(),
            r["mode"].as_str().unwrap_or_default(),
            r["params"].as_f64().unwrap_or_default() / 1e6,
            r["pairs_per_s"].as_f64().unwrap_or_default(),
            r["tflops"].as_f64().unwrap_or_default()
        );
    }
}

fn main() -> anyhow::Result<()> {
    distill_models::alloc::keep_freed_memory();
    let args = Args::parse();
    let dev = distill_models::parse_device(&args.device)?;
    let kernels = set_kernels(&args.kernels, &dev)?;
    distill_models::layers::first_token_only(args.first_token_only);
    if args.check_kernels {
        return check_kernels(&args, &dev);
    }
    let score_dtype = match args.score_dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        s => anyhow::bail!("--score-dtype {s}: f32 or bf16"),
    };
    if !args.parity.is_empty() {
        let worst = parity(&args.parity, args.parity_base.as_deref(), &dev, score_dtype)?;
        anyhow::ensure!(worst <= 1e-2, "parity: {worst:.2e} exceeds 1e-2");
        return Ok(());
    }
    let names: Vec<String> = match &args.model {
        Some(dir) => vec![dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into())],
        None => args.shapes.clone(),
    };
    let mut rows = Vec::new();
    for name in &names {
        let bench = Bench { args: &args, name, dev: &dev, kernels: &kernels };
        if args.modes.iter().any(|m| m == "score") {
            rows.push(bench_score(&bench, score_dtype)?);
            println!("{}", rows[rows.len() - 1]);
        }
        if args.modes.iter().any(|m| m == "train") {
            rows.push(bench_train(&bench)?);
            println!("{}", rows[rows.len() - 1]);
        }
    }
    print_tables(&rows, args.op_stats);
    if let Some(path) = &args.json {
        let device = format!("{:?}", dev.location());
        std::fs::write(path, serde_json::to_string_pretty(&serde_json::json!({"device": device, "rows": rows}))?)?;
    }
    Ok(())
}
