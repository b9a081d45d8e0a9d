//! `distill score`: scores `{"query", "passage"}` JSON lines with a cross-encoder directory (or a
//! sentence-transformers bi-encoder: cosine similarity) and writes one line per pair with a
//! `"score"` field, in input order.

use distill_models::bi_encoder::is_bi_encoder;
use distill_models::{Batching, BiEncoder, CrossEncoder};
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json), an
    /// object-store prefix holding one, or a Hub model id (`hf://org/name[@revision]`).
    #[arg(long)]
    pub model: String,
    /// JSON lines with "query" and "passage"; other fields are kept in the output.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the scored lines (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 512)]
    max_length: usize,
    #[arg(long, default_value_t = 64)]
    max_query_length: usize,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, env = "DISTILL_DEVICE", default_value = "cpu")]
    device: String,
    /// fp32, or bf16 (cross-encoders: bf16 weights and matmuls, f32 norms and softmax).
    #[arg(long, default_value = "fp32")]
    precision: String,
}

/// Scores with the model in the local directory `dir` (what `a.model` names, materialised).
/// Scores a batch of (query, passage) pairs, in order.
type Scorer = Box<dyn Fn(&[(&str, &str)]) -> distill_models::Result<Vec<f32>>>;

pub fn run(a: &ScoreArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let device = distill_models::parse_device(&a.device)?;
    let dtype = distill_models::parse_precision(&a.precision)?.unwrap_or(candle_core::DType::F32);
    let batching = Batching { max_pairs: a.batch_size, max_tokens: usize::MAX };
    let scorer: Scorer = if is_bi_encoder(dir) {
        if dtype != candle_core::DType::F32 {
            anyhow::bail!("--precision {}: bi-encoders score in fp32 only", a.precision);
        }
        let model = BiEncoder::load(dir, a.max_length, &device)?;
        eprintln!("{}: a sentence-transformers bi-encoder; scores are cosine similarities", a.model);
        Box::new(move |pairs| Ok(model.score_with(pairs, batching)?.0))
    } else {
        let model = CrossEncoder::load_as(dir, a.max_query_length, a.max_length, &device, dtype)?;
        if model.new_head() {
            eprintln!("warning: {} has no classification head; a new random head was initialised", a.model);
        }
        Box::new(move |pairs| Ok(model.score_with(pairs, batching)?.0))
    };
    let name = a.input.display().to_string();
    let file = std::fs::File::open(&a.input).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let mut rows: Vec<serde_json::Map<String, serde_json::Value>> = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| anyhow::anyhow!("{name}:{}: {e}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{name}:{}: not a JSON object: {e}", n + 1))?;
        for field in ["query", "passage"] {
            if !row.get(field).is_some_and(|v| v.is_string()) {
                anyhow::bail!("{name}:{}: missing string field \"{field}\"", n + 1);
            }
        }
        rows.push(row);
    }
    let pairs: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["query"].as_str().unwrap_or_default(), r["passage"].as_str().unwrap_or_default()))
        .collect();
    let started = std::time::Instant::now();
    let scores = scorer(&pairs)?;
    let took = started.elapsed().as_secs_f64();
    eprintln!("scored {} pairs in {took:.2} s ({:.1} pairs/s)", pairs.len(), pairs.len() as f64 / took);
    let mut out: Box<dyn Write> = match &a.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    for (mut row, score) in rows.into_iter().zip(scores) {
        row.insert("score".into(), serde_json::json!(score));
        writeln!(out, "{}", serde_json::Value::Object(row))?;
    }
    out.flush()?;
    Ok(())
}
