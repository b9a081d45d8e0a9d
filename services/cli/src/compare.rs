//! `distill compare`: runs against a baseline (the first `--run`) on the same queries, with a
//! significance test per metric: per-query values as `distill eval` computes them, then a paired
//! t-test or Fisher's randomization test (`distill_eval::significance`), optionally corrected for
//! the number of runs compared.

use clap::ValueEnum;
use distill_eval::significance::{self, Correction};
use distill_eval::Evaluation;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq)]
pub enum TestArg {
    /// Paired two-sided t-test (scipy's ttest_rel).
    T,
    /// Fisher's randomization test (paired sign flips), seeded.
    Randomization,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum CorrectionArg {
    None,
    Bonferroni,
    Holm,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq)]
pub enum FormatArg {
    Table,
    Json,
}

/// Runs compared at most, and randomization permutations at most.
const MAX_RUNS: usize = 100;
const MAX_PERMUTATIONS: u32 = 10_000_000;

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    #[arg(long)]
    qrels: String,
    /// A TREC run; repeat: the first is the baseline every other is compared with.
    #[arg(long = "run", required = true, num_args = 1)]
    runs: Vec<String>,
    /// Comma-separated, as `distill eval --metrics`.
    #[arg(long, default_value = "ndcg@10")]
    metrics: String,
    #[arg(long, value_enum, default_value = "t")]
    test: TestArg,
    /// Sign flips drawn by the randomization test (above 20 queries; up to 20 all are counted).
    #[arg(long, default_value_t = 100_000)]
    permutations: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Correction of each metric's p-values for the number of runs compared with the baseline.
    #[arg(long, value_enum, default_value = "none")]
    correction: CorrectionArg,
    /// A difference is significant when its (corrected) p-value is below this.
    #[arg(long, default_value_t = 0.05)]
    alpha: f64,
    #[arg(long, value_enum, default_value = "table")]
    format: FormatArg,
}

/// One run against the baseline on one metric.
#[derive(Debug, serde::Serialize)]
struct Comparison {
    metric: String,
    baseline: String,
    run: String,
    queries: usize,
    mean_baseline: f64,
    mean_run: f64,
    delta: f64,
    p_value: f64,
    test: &'static str,
    significant: bool,
}

pub async fn run(args: &CompareArgs) -> anyhow::Result<()> {
    check(args)?;
    let metrics = distill_eval::parse_metrics(&args.metrics)?;
    let qrels = distill_formats::read_qrels(distill_store::open_text(&args.qrels).await?, &args.qrels)?;
    let mut evaluations = Vec::new();
    for path in &args.runs {
        let run = distill_formats::read_run(distill_store::open_text(path).await?, path)?;
        evaluations.push(distill_eval::evaluate(&run, &qrels, &metrics, false));
    }
    let mut comparisons = Vec::new();
    for m in 0..metrics.len() {
        comparisons.extend(compare_metric(args, &evaluations, m));
    }
    match args.format {
        FormatArg::Json => println!("{}", serde_json::json!({ "comparisons": comparisons })),
        FormatArg::Table => print_table(args, &comparisons),
    }
    Ok(())
}

fn check(args: &CompareArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs.len() >= 2, "--run: give the baseline and at least one run to compare with it");
    anyhow::ensure!(args.runs.len() <= MAX_RUNS, "--run: {} runs, at most {MAX_RUNS}", args.runs.len());
    anyhow::ensure!(
        (1..=MAX_PERMUTATIONS).contains(&args.permutations),
        "--permutations: {} is outside 1..={MAX_PERMUTATIONS}",
        args.permutations
    );
    anyhow::ensure!(args.alpha > 0.0 && args.alpha < 1.0, "--alpha: {} is not between 0 and 1", args.alpha);
    Ok(())
}

/// Every run against the baseline on metric `m`, p-values corrected together.
fn compare_metric(args: &CompareArgs, evaluations: &[Evaluation], m: usize) -> Vec<Comparison> {
    let base = &evaluations[0];
    let mut out: Vec<Comparison> = Vec::new();
    for (e, path) in evaluations.iter().zip(&args.runs).skip(1) {
        let (a, b) = paired(base, e, m, path);
        let p = match args.test {
            TestArg::T => significance::paired_t(&a, &b).1,
            TestArg::Randomization => significance::randomization(&a, &b, args.permutations, args.seed),
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        out.push(Comparison {
            metric: base.metrics[m].clone(),
            baseline: args.runs[0].clone(),
            run: path.clone(),
            queries: a.len(),
            mean_baseline: mean(&a),
            mean_run: mean(&b),
            delta: mean(&b) - mean(&a),
            p_value: p,
            test: if args.test == TestArg::T { "t" } else { "randomization" },
            significant: false,
        });
    }
    let correction = match args.correction {
        CorrectionArg::None => Correction::None,
        CorrectionArg::Bonferroni => Correction::Bonferroni,
        CorrectionArg::Holm => Correction::Holm,
    };
    let corrected = significance::correct(&out.iter().map(|c| c.p_value).collect::<Vec<_>>(), correction);
    for (c, p) in out.iter_mut().zip(corrected) {
        c.p_value = p;
        c.significant = p < args.alpha;
    }
    out
}

/// The values of metric `m` of the queries both evaluations have, in the baseline's order; says
/// on stderr when either has queries the other lacks.
fn paired<'a>(base: &'a Evaluation, other: &'a Evaluation, m: usize, path: &str) -> (Vec<f64>, Vec<f64>) {
    let values = |e: &'a Evaluation| e.per_query.iter().map(move |(q, v)| (q.as_str(), v[m]));
    let (a, b) = significance::on_common_queries(values(base), values(other));
    if a.len() != base.per_query.len() || a.len() != other.per_query.len() {
        eprintln!(
            "{path}: compared on the {} queries both runs have (baseline {}, this run {})",
            a.len(),
            base.per_query.len(),
            other.per_query.len()
        );
    }
    (a, b)
}

fn print_table(args: &CompareArgs, comparisons: &[Comparison]) {
    println!("baseline: {}", args.runs[0]);
    println!("{:<12} {:<40} {:>8} {:>8} {:>9} {:>9}", "metric", "run", "mean", "delta", "p", "");
    for c in comparisons {
        let mark = if c.significant { "*" } else { "" };
        println!("{:<12} {:<40} {:>8.4} {:>+8.4} {:>9.4} {:>9}", c.metric, c.run, c.mean_run, c.delta, c.p_value, mark);
    }
    let test = if args.test == TestArg::T { "paired t-test" } else { "randomization test" };
    println!("* p < {} ({test}, correction: {:?})", args.alpha, args.correction);
}
