//! Metrics of a ranked run against relevance judgments, as trec_eval computes them — pure
//! functions of a run and qrels.
//!
//! - Ranking: documents by score descending, ties broken by docid descending (trec_eval's
//!   `comp_sim_docno`); the run file's rank column is ignored, as trec_eval ignores it.
//! - Queries: those that appear in both the run and the qrels (trec_eval without `-c`). A query
//!   judged but with no relevant document counts, with 0 for every metric.
//! - Relevant: grade ≥ `rel` (default 1). nDCG uses linear gain (the grade; negative grades give 0)
//!   with the discount `1 / log2(rank + 1)`, and the ideal ranking of all judged documents.
//!
//! | name | trec_eval | value per query |
//! |---|---|---|
//! | `ndcg@k` | `ndcg_cut_k` | DCG@k / ideal DCG@k |
//! | `ndcg` | `ndcg` | over the whole ranking |
//! | `rr@k`, `mrr@k` | `recip_rank` on the top k | 1 / rank of the first relevant document |
//! | `map`, `ap` | `map` | mean of precision at each relevant document, over all relevant |
//! | `map@k` | `map_cut_k` | the same, counting only the top k |
//! | `recall@k` | `recall_k` | relevant in the top k / all relevant |
//! | `p@k` | `P_k` | relevant in the top k / k |
//!
//! [`significance`] compares runs' per-query values: paired t-test, randomization test,
//! corrections for several comparisons. [`plot`] draws loss and metric curves as SVG.

pub mod plot;
pub mod significance;

use distill_formats::{sort_trec_eval, Qrels, RankedList};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("unknown metric '{0}' (expected ndcg, ndcg@k, rr@k, mrr@k, map, map@k, recall@k, p@k)")]
pub struct UnknownMetric(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Measure {
    Ndcg(Option<usize>),
    ReciprocalRank(Option<usize>),
    AveragePrecision(Option<usize>),
    Recall(usize),
    Precision(usize),
}

/// A measure with its relevance threshold, parsed from names like `ndcg@10` or `map`.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub measure: Measure,
    /// Lowest grade counted as relevant (binary measures).
    pub rel: i32,
}

impl std::str::FromStr for Metric {
    type Err = UnknownMetric;
    fn from_str(s: &str) -> Result<Self, UnknownMetric> {
        let name = s.trim().to_ascii_lowercase();
        let bad = || UnknownMetric(s.trim().to_string());
        // `map(rel=2)`, `p(rel=2)@10` or `p@10(rel=2)`: a relevance threshold other than 1.
        let mut rel = 1;
        let mut plain = name.clone();
        if let Some(start) = name.find("(rel=") {
            let end = name[start..].find(')').ok_or_else(bad)? + start;
            rel = name[start + 5..end].parse().map_err(|_| bad())?;
            plain = format!("{}{}", &name[..start], &name[end + 1..]);
        }
        let (base, k) = match plain.split_once('@') {
            Some((b, k)) => (b, Some(k.parse::<usize>().ok().filter(|&k| k > 0).ok_or_else(bad)?)),
            None => (plain.as_str(), None),
        };
        let measure = match (base, k) {
            ("ndcg", k) if rel == 1 => Measure::Ndcg(k),
            ("rr" | "mrr" | "recip_rank", k) => Measure::ReciprocalRank(k),
            ("map" | "ap", k) => Measure::AveragePrecision(k),
            ("recall" | "r", Some(k)) => Measure::Recall(k),
            ("p" | "precision", Some(k)) => Measure::Precision(k),
            _ => return Err(bad()),
        };
        Ok(Metric { name, measure, rel })
    }
}

/// Parses a comma-separated list of metric names.
pub fn parse_metrics(list: &str) -> Result<Vec<Metric>, UnknownMetric> {
    list.split(',').filter(|s| !s.trim().is_empty()).map(str::parse).collect()
}

fn ndcg(ranked: &[i32], judged: &HashMap<String, i32>, k: Option<usize>) -> f64 {
    let k = k.unwrap_or(usize::MAX);
    let dcg: f64 = ranked.iter().take(k).enumerate().map(|(i, &g)| g.max(0) as f64 / (i as f64 + 2.0).log2()).sum();
    let mut ideal: Vec<i32> = judged.values().copied().filter(|&g| g > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal.iter().take(k).enumerate().map(|(i, &g)| g as f64 / (i as f64 + 2.0).log2()).sum();
    if idcg > 0.0 {
        dcg / idcg
    } else {
        0.0
    }
}

/// The value of `metric` for one query: `grades` are the judged grades of the ranked documents in
/// rank order (unjudged = 0), `judged` the query's qrels.
fn value(metric: &Metric, grades: &[i32], judged: &HashMap<String, i32>) -> f64 {
    let relevant = |g: i32| g >= metric.rel;
    let num_rel = judged.values().filter(|&&g| relevant(g)).count();
    match metric.measure {
        Measure::Ndcg(k) => ndcg(grades, judged, k),
        Measure::ReciprocalRank(k) => grades
            .iter()
            .take(k.unwrap_or(usize::MAX))
            .position(|&g| relevant(g))
            .map_or(0.0, |i| 1.0 / (i as f64 + 1.0)),
        Measure::AveragePrecision(k) => {
            if num_rel == 0 {
                return 0.0;
            }
            let mut found = 0;
            let mut sum = 0.0;
            for (i, &g) in grades.iter().take(k.unwrap_or(usize::MAX)).enumerate() {
                if relevant(g) {
                    found += 1;
                    sum += found as f64 / (i as f64 + 1.0);
                }
            }
            sum / num_rel as f64
        }
        Measure::Recall(k) => {
            if num_rel == 0 {
                return 0.0;
            }
            grades.iter().take(k).filter(|&&g| relevant(g)).count() as f64 / num_rel as f64
        }
        Measure::Precision(k) => grades.iter().take(k).filter(|&&g| relevant(g)).count() as f64 / k as f64,
    }
}

/// Per-query values and means of some metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Metric names in the order asked.
    pub metrics: Vec<String>,
    /// Mean over the evaluated queries, per metric.
    pub means: Vec<f64>,
    /// (qid, values per metric), in run order.
    pub per_query: Vec<(String, Vec<f64>)>,
}

impl Evaluation {
    pub fn mean(&self, name: &str) -> Option<f64> {
        self.metrics.iter().position(|m| m == name).map(|i| self.means[i])
    }
}

/// Evaluates a run (as read by `distill_formats::read_run`) against qrels. Without `complete`,
/// as trec_eval: the queries in both; with it, as `trec_eval -c`: judged queries missing from the
/// run count too, with 0 (they follow the run's queries, sorted by qid).
pub fn evaluate(run: &[RankedList], qrels: &Qrels, metrics: &[Metric], complete: bool) -> Evaluation {
    let mut per_query = Vec::new();
    for list in run {
        let Some(judged) = qrels.get(&list.qid) else {
            continue;
        };
        let mut entries = list.entries.clone();
        sort_trec_eval(&mut entries);
        let grades: Vec<i32> = entries.iter().map(|e| judged.get(&e.docid).copied().unwrap_or(0)).collect();
        per_query.push((list.qid.clone(), metrics.iter().map(|m| value(m, &grades, judged)).collect::<Vec<_>>()));
    }
    if complete {
        let in_run: std::collections::HashSet<&str> = run.iter().map(|l| l.qid.as_str()).collect();
        let mut missing: Vec<&String> = qrels.keys().filter(|q| !in_run.contains(q.as_str())).collect();
        missing.sort();
        for qid in missing {
            per_query.push((qid.clone(), metrics.iter().map(|m| value(m, &[], &qrels[qid])).collect()));
        }
    }
    let n = per_query.len().max(1) as f64;
    let means = (0..metrics.len()).map(|i| per_query.iter().map(|(_, v)| v[i]).sum::<f64>() / n).collect();
    Evaluation { metrics: metrics.iter().map(|m| m.name.clone()).collect(), means, per_query }
}

#[cfg(test)]
mod tests;
