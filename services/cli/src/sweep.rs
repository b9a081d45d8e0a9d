//! `distill sweep`: a grid of students (objectives x backbones x layers x learning rates x seeds x
//! datasets), each trained and then evaluated through the trainer service, at most
//! `--concurrency` cells at a time. Resumable: a cell whose evaluation is written is not run
//! again, nor the training of one whose export is. The results as the study lays them out:
//! `results.md` and `results.json`, rows objectives, columns the other settings, mean ± std over
//! seeds, marked where a cell differs significantly (paired t-test over the test queries on the
//! seeds' mean per query, p < 0.05) from the BCE row (†) and from the first stage (‡); and
//! `results.svg`, the means as bars with ± std whiskers; `learning_curves.svg`, every cell's
//! training loss against steps (its `metrics.jsonl`), smoothed.

use crate::client::{Connection, JobControl, Trainer};
use crate::evaluate::EvalSource;
use crate::train::HyperArgs;
use distill_eval::significance::paired_t;
use distill_proto as pb;
use distill_store::{absolutize, Location};
use futures::StreamExt;
use std::collections::BTreeMap;

/// Cells one sweep may hold.
const MAX_CELLS: usize = 1_000;

#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// A committed dataset to train on (repeat: each is a setting of the grid).
    #[arg(long = "dataset", required = true)]
    datasets: Vec<String>,
    /// A starting model (repeat: each is a setting of the grid).
    #[arg(long = "backbone", required = true)]
    backbones: Vec<String>,
    /// Comma-separated objectives (rows of the table); bce, if among them, is the reference row.
    #[arg(long, value_delimiter = ',', required = true)]
    objectives: Vec<String>,
    /// Comma-separated: keep the backbone's first N layers (0: all).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    layers: Vec<u32>,
    /// Comma-separated learning rates.
    #[arg(long, value_delimiter = ',', default_value = "2e-5")]
    lrs: Vec<f64>,
    /// Comma-separated seeds: each cell is trained once per seed (mean ± std over them).
    #[arg(long, value_delimiter = ',', default_value = "42")]
    seeds: Vec<u64>,
    #[arg(long)]
    freeze_word_embeddings: bool,
    #[command(flatten)]
    hyper: HyperArgs,
    #[command(flatten)]
    eval: EvalSource,
    /// Where the cells and the results go: a directory or object-store prefix the trainer may
    /// write (cells/<cell>/student, cells/<cell>/eval, results.md, results.json).
    #[arg(long)]
    output: String,
    /// Cells run at once (each a training job, then an evaluation job).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
}

/// One student of the grid.
#[derive(Debug, Clone, serde::Serialize)]
struct Cell {
    objective: String,
    backbone: usize,
    layers: u32,
    lr: f64,
    seed: u64,
    dataset: usize,
}

impl Cell {
    fn id(&self) -> String {
        let Cell { objective, backbone, layers, lr, seed, dataset } = self;
        format!("{objective}_b{backbone}_l{layers}_lr{lr:e}_s{seed}_d{dataset}")
    }

    /// The cell's column of the table: everything but the objective and the seed.
    fn setting(&self) -> Setting {
        (self.dataset, self.backbone, self.layers, format!("{:e}", self.lr))
    }
}

pub async fn run(args: &SweepArgs, conn: &Connection) -> anyhow::Result<()> {
    let cells = grid(args)?;
    let out = Location::parse(&absolutize(&args.output))?;
    let trainer = conn.trainer().await?;
    eprintln!("{} cells, {} at a time, in {}", cells.len(), args.concurrency, out.uri());
    let outcomes: Vec<anyhow::Result<bool>> = futures::stream::iter(cells.iter())
        .map(|cell| run_cell(trainer.clone(), args, &out, cell))
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let before = outcomes.iter().filter(|o| matches!(o, Ok(false))).count();
    let failed: Vec<String> = outcomes.into_iter().filter_map(|o| o.err()).map(|e| format!("{e:#}")).collect();
    eprintln!("{} cells run now, {before} done before, {} failed", cells.len() - before - failed.len(), failed.len());
    anyhow::ensure!(failed.is_empty(), "{} cells failed:\n{}", failed.len(), failed.join("\n"));
    let table = results(args, &out, &cells).await?;
    println!("{table}");
    Ok(())
}

/// Every cell of the grid, checked against the bounds.
fn grid(a: &SweepArgs) -> anyhow::Result<Vec<Cell>> {
    anyhow::ensure!(
        a.eval.eval_run.is_some(),
        "--eval-run, --eval-queries, --eval-collection and --eval-qrels are required"
    );
    anyhow::ensure!((1..=64).contains(&a.concurrency), "--concurrency: {} is outside 1..=64", a.concurrency);
    let mut cells = Vec::new();
    for dataset in 0..a.datasets.len() {
        for backbone in 0..a.backbones.len() {
            for &layers in &a.layers {
                for &lr in &a.lrs {
                    for objective in &a.objectives {
                        for &seed in &a.seeds {
                            let objective = objective.trim().to_string();
                            cells.push(Cell { objective, backbone, layers, lr, seed, dataset });
                        }
                    }
                }
            }
        }
    }
    anyhow::ensure!(cells.len() <= MAX_CELLS, "{} cells: at most {MAX_CELLS}", cells.len());
    Ok(cells)
}

/// Trains and evaluates one cell unless done before. Returns whether anything ran.
async fn run_cell(mut trainer: Trainer, a: &SweepArgs, out: &Location, cell: &Cell) -> anyhow::Result<bool> {
    let id = cell.id();
    let dir = out.child(&format!("cells/{id}"));
    if dir.child("eval").exists("metrics.json").await? {
        return Ok(false);
    }
    let student = dir.child("student");
    if !student.child("final").exists("model.safetensors").await? {
        let spec = pb::TrainingSpec {
            datasets: vec![absolutize(&a.datasets[cell.dataset])],
            backbone: absolutize(&a.backbones[cell.backbone]),
            backbone_layers: cell.layers,
            freeze_word_embeddings: a.freeze_word_embeddings,
            objective: cell.objective.clone(),
            hyperparameters: Some(a.hyper.with(cell.lr, cell.seed)),
            output_uri: student.uri().to_string(),
            name: format!("sweep {id}"),
            ..Default::default()
        };
        let job = trainer.start_training(spec).await?.into_inner();
        finish(&mut trainer, job, &id, "training").await?;
    }
    let model = student.uri_of("final");
    let name = format!("sweep {id}");
    let spec = a.eval.spec(&model, a.hyper.max_query_length, a.hyper.max_length, dir.child("eval").uri(), &name);
    let job = trainer.start_evaluation(spec.expect("checked in grid()")).await?.into_inner();
    finish(&mut trainer, job, &id, "evaluation").await?;
    Ok(true)
}

/// Waits for a job quietly (cells run side by side); an error naming the cell unless it succeeded.
async fn finish(trainer: &mut Trainer, job: pb::Job, id: &str, what: &str) -> anyhow::Result<()> {
    eprintln!("{id}: {what} job {}", job.id);
    loop {
        let now = trainer.get(&job.id).await?;
        match now.state() {
            pb::JobState::Succeeded => return Ok(()),
            s if s.is_terminal() => anyhow::bail!("{id}: {what} job {} ended {s:?}: {}", now.id, now.error),
            _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    }
}

/// Each query's values of the metrics for a run file (as `distill eval` has them).
async fn per_query(
    run: &str,
    qrels: &distill_formats::Qrels,
    metrics: &[distill_eval::Metric],
) -> anyhow::Result<PerQuery> {
    let run = distill_formats::read_run(distill_store::open_text(run).await?, run)?;
    Ok(distill_eval::evaluate(&run, qrels, metrics, false).per_query.into_iter().collect())
}

/// The metric's mean over queries of each seed's run, and each query's value averaged over seeds.
struct Aggregate {
    per_seed: Vec<f64>,
    per_query: BTreeMap<String, f64>,
}

fn aggregate(runs: &[PerQuery], m: usize) -> Aggregate {
    let per_seed = runs.iter().map(|r| mean_std(&column(r, m)).0).collect();
    let mut per_query: BTreeMap<String, f64> = BTreeMap::new();
    for r in runs {
        for (q, v) in r {
            *per_query.entry(q.clone()).or_default() += v[m] / runs.len() as f64;
        }
    }
    Aggregate { per_seed, per_query }
}

/// Mean and sample standard deviation (0 for one value).
fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = if x.len() > 1 { x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// The p-value of a paired t-test of `b` against `a` over the queries both have.
fn p_value<'a>(a: &'a BTreeMap<String, f64>, b: &'a BTreeMap<String, f64>) -> f64 {
    let values = |m: &'a BTreeMap<String, f64>| m.iter().map(|(q, v)| (q.as_str(), *v));
    let (x, y) = distill_eval::significance::on_common_queries(values(a), values(b));
    paired_t(&x, &y).1
}

/// A column of the table: (dataset, backbone, layers, learning rate).
type Setting = (usize, usize, u32, String);
/// Each query's values of the metrics asked, by query id.
type PerQuery = BTreeMap<String, Vec<f64>>;
/// The seeds' per-query values of each (objective, setting).
type Runs = BTreeMap<(String, Setting), Vec<PerQuery>>;

/// Reads every cell's evaluation, writes results.json and results.md, returns the table.
async fn results(a: &SweepArgs, out: &Location, cells: &[Cell]) -> anyhow::Result<String> {
    let metrics = distill_eval::parse_metrics(&a.eval.metrics)?;
    let qrels_path = absolutize(a.eval.eval_qrels.as_deref().unwrap_or_default());
    let qrels = distill_formats::read_qrels(distill_store::open_text(&qrels_path).await?, &qrels_path)?;
    let run_path = absolutize(a.eval.eval_run.as_deref().unwrap_or_default());
    let first_stage = aggregate(&[per_query(&run_path, &qrels, &metrics).await?], 0);
    let mut runs = Runs::new();
    let mut cell_json = Vec::new();
    for cell in cells {
        let run = out.child(&format!("cells/{}/eval", cell.id())).uri_of("run.trec");
        let values = per_query(&run, &qrels, &metrics).await?;
        let means: BTreeMap<&str, f64> = metrics
            .iter()
            .enumerate()
            .map(|(m, metric)| (metric.name.as_str(), mean_std(&column(&values, m)).0))
            .collect();
        cell_json.push(serde_json::json!({"id": cell.id(), "cell": cell, "metrics": means}));
        runs.entry((cell.objective.clone(), cell.setting())).or_default().push(values);
    }
    let mut settings: Vec<Setting> = cells.iter().map(Cell::setting).collect();
    settings.sort();
    settings.dedup();
    let (md, table_json) = table(a, &metrics[0].name, &settings, &runs, &first_stage);
    let bars: Vec<(String, f64, f64)> = table_json
        .iter()
        .zip(a.objectives.iter().flat_map(|o| settings.iter().map(move |s| (o, s))))
        .map(|(row, (o, s))| {
            let label =
                if settings.len() > 1 { format!("{} · {}", o.trim(), column_name(a, s)) } else { o.trim().into() };
            (label, row["mean"].as_f64().unwrap_or(f64::NAN), row["std"].as_f64().unwrap_or(0.0))
        })
        .collect();
    let svg = bars_svg(&metrics[0].name, &bars, mean_std(&first_stage.per_seed).0);
    out.put("results.svg", svg.into_bytes().into()).await?;
    out.put("learning_curves.svg", learning_curves(out, cells).await?.into_bytes().into()).await?;
    let json = serde_json::json!({
        "metric": metrics[0].name, "first_stage": mean_std(&first_stage.per_seed).0,
        "cells": cell_json, "table": table_json,
    });
    out.put("results.json", serde_json::to_vec_pretty(&json)?.into()).await?;
    out.put("results.md", md.clone().into_bytes().into()).await?;
    Ok(md)
}

/// Weight of the previous value in the learning curves' exponential moving average.
const SMOOTHING: f64 = 0.8;

/// Every cell's training loss against steps (from its `metrics.jsonl`), smoothed, on one chart.
async fn learning_curves(out: &Location, cells: &[Cell]) -> anyhow::Result<String> {
    let mut series = Vec::new();
    for cell in cells {
        let history = match out.child(&format!("cells/{}/student", cell.id())).get("metrics.jsonl").await {
            Ok(bytes) => bytes,
            Err(distill_store::StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        series.push((cell.id(), smoothed(&loss_points(&history))));
    }
    let refs: Vec<(&str, &[(f64, f64)])> = series.iter().map(|(n, p)| (n.as_str(), p.as_slice())).collect();
    let title = format!("training loss (moving average, weight {SMOOTHING} on the past)");
    Ok(distill_eval::plot::line_chart(&title, "step", "loss", &refs))
}

/// The (step, loss) records of a trainer's `metrics.jsonl` (lines that are not JSON skipped).
fn loss_points(jsonl: &[u8]) -> Vec<(f64, f64)> {
    String::from_utf8_lossy(jsonl)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| Some((r["step"].as_f64()?, r["loss"].as_f64()?)))
        .collect()
}

/// An exponential moving average of the y values ([`SMOOTHING`] on the past), starting at the first.
fn smoothed(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut avg = None;
    points
        .iter()
        .map(|&(x, y)| {
            let a = avg.map_or(y, |a: f64| SMOOTHING * a + (1.0 - SMOOTHING) * y);
            avg = Some(a);
            (x, a)
        })
        .collect()
}

/// Metric `m` of every query.
fn column(values: &PerQuery, m: usize) -> Vec<f64> {
    values.values().map(|v| v[m]).collect()
}

/// The table (markdown) and its cells (JSON): a row per objective, a column per setting.
fn table(
    a: &SweepArgs,
    metric: &str,
    settings: &[Setting],
    runs: &Runs,
    first_stage: &Aggregate,
) -> (String, Vec<serde_json::Value>) {
    let objectives: Vec<String> = a.objectives.iter().map(|o| o.trim().to_string()).collect();
    let has_bce = objectives.iter().any(|o| o == "bce");
    let first = format!("{:.4}", mean_std(&first_stage.per_seed).0);
    let mut rows: Vec<Vec<String>> =
        vec![std::iter::once("first stage".to_string()).chain(settings.iter().map(|_| first.clone())).collect()];
    let mut json = Vec::new();
    for o in &objectives {
        let mut row = vec![o.clone()];
        for s in settings {
            let agg = aggregate(&runs[&(o.clone(), s.clone())], 0);
            let (mean, std) = mean_std(&agg.per_seed);
            let p_first = p_value(&first_stage.per_query, &agg.per_query);
            let bce = || aggregate(&runs[&("bce".to_string(), s.clone())], 0);
            let p_bce = (o != "bce" && has_bce).then(|| p_value(&bce().per_query, &agg.per_query));
            let dagger = if p_bce.is_some_and(|p| p < 0.05) { "†" } else { "" };
            let ddagger = if p_first < 0.05 { "‡" } else { "" };
            row.push(format!("{mean:.4} ± {std:.4}{dagger}{ddagger}"));
            json.push(serde_json::json!({
                "objective": o, "setting": s, "mean": mean, "std": std, "seeds": agg.per_seed,
                "p_vs_first_stage": p_first, "p_vs_bce": p_bce,
            }));
        }
        rows.push(row);
    }
    let header: Vec<String> =
        std::iter::once("objective".to_string()).chain(settings.iter().map(|s| column_name(a, s))).collect();
    let mut md = format!("| {} |\n|{}|\n", header.join(" | "), vec!["---"; header.len()].join("|"));
    for r in &rows {
        md.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    md.push_str(&format!(
        "\n{metric}, mean ± std over {} seeds; † differs from bce, ‡ from the first stage (paired t-test over \
         the test queries on the seeds' mean per query, p < 0.05)\n",
        a.seeds.len()
    ));
    (md, json)
}

/// Horizontal bars of each cell's mean (label, mean, std) with a ± std whisker, on a 0..1 axis,
/// the first stage's value as a dashed line.
fn bars_svg(metric: &str, bars: &[(String, f64, f64)], first_stage: f64) -> String {
    use std::fmt::Write;
    let (left, width, bar_h, gap, top) = (220.0, 500.0, 16.0, 8.0, 40.0);
    let x = |v: f64| left + width * v.clamp(0.0, 1.0);
    let bottom = top + (bar_h + gap) * bars.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" \
         font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"14\">{metric}: mean ± std over seeds</text>\n",
        left + width + 60.0,
        bottom + 40.0
    );
    for (i, (label, mean, std)) in bars.iter().enumerate() {
        let y = top + (bar_h + gap) * i as f64;
        let label = label.replace('&', "&amp;").replace('<', "&lt;");
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{label}</text>", left - 8.0, y + 12.0);
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{bar_h}\" fill=\"#3b6ea8\"/>",
            x(*mean) - left
        );
        let (lo, hi, mid) = (x(mean - std), x(mean + std), y + bar_h / 2.0);
        let _ = writeln!(
            s,
            "<line class=\"whisker\" x1=\"{lo:.1}\" y1=\"{mid}\" x2=\"{hi:.1}\" y2=\"{mid}\" stroke=\"black\"/>"
        );
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{}\">{mean:.4}</text>", hi + 4.0, y + 12.0);
    }
    let fx = x(first_stage);
    let _ = writeln!(
        s,
        "<line x1=\"{fx:.1}\" y1=\"{}\" x2=\"{fx:.1}\" y2=\"{bottom}\" stroke=\"#333\" stroke-dasharray=\"4 3\"/>\n\
         <text x=\"{fx:.1}\" y=\"{}\" text-anchor=\"middle\">first stage {first_stage:.4}</text>\n</svg>",
        top - 6.0,
        bottom + 16.0
    );
    s
}

/// A column's name: the settings that vary across the grid (or "all").
fn column_name(a: &SweepArgs, (dataset, backbone, layers, lr): &Setting) -> String {
    let last = |p: &str| p.trim_end_matches('/').rsplit('/').next().unwrap_or(p).to_string();
    let mut parts = Vec::new();
    if a.datasets.len() > 1 {
        parts.push(last(&a.datasets[*dataset]));
    }
    if a.backbones.len() > 1 {
        parts.push(last(&a.backbones[*backbone]));
    }
    if a.layers.len() > 1 {
        parts.push(format!("{layers} layers"));
    }
    if a.lrs.len() > 1 {
        parts.push(format!("lr {lr}"));
    }
    if parts.is_empty() {
        "all".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_curves_are_a_moving_average_of_the_loss_records() {
        let jsonl = b"{\"step\": 10, \"loss\": 1.0}\nnot json\n{\"step\": 10, \"eval_ndcg@10\": 0.5}\n{\"step\": 20, \"loss\": 0.0}\n";
        let points = loss_points(jsonl);
        assert_eq!(points, vec![(10.0, 1.0), (20.0, 0.0)]);
        let s = smoothed(&points);
        assert_eq!(s[0], (10.0, 1.0));
        assert!((s[1].1 - SMOOTHING).abs() < 1e-12, "{s:?}");
    }
}
