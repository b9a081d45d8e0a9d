//! Re-ranking evaluation: the first `top_k` documents of each query of a TREC run are scored by a
//! cross-encoder and re-sorted (the rest keep their order below them), then measured exactly as
//! trec_eval does (`distill-eval`). Writes `run.trec` and `metrics.json`.

use crate::Error;
use distill_eval::{evaluate, parse_metrics, Metric};
use distill_formats::{read_qrels, read_run, read_tsv_texts, Qrels, RankedList, RunEntry};
use distill_models::CrossEncoder;
use distill_proto::EvaluationSpec;
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

pub const DEFAULT_METRICS: &str = "ndcg@10,mrr@10";

/// The run, texts and judgments of an evaluation, loaded once (a training job evaluates often).
pub struct EvalData {
    pub run: Vec<RankedList>,
    pub queries: HashMap<String, String>,
    pub docs: HashMap<String, String>,
    pub qrels: Qrels,
    pub metrics: Vec<Metric>,
    pub top_k: usize,
}

pub fn metrics_of(spec: &EvaluationSpec) -> Result<Vec<Metric>, Error> {
    let list = if spec.metrics.is_empty() { DEFAULT_METRICS.to_string() } else { spec.metrics.join(",") };
    let metrics = parse_metrics(&list).map_err(|e| Error::InvalidArgument(format!("metrics: {e}")))?;
    if metrics.is_empty() {
        return Err(Error::InvalidArgument(format!("metrics: {:?} names no metric (e.g. ndcg@10)", spec.metrics)));
    }
    Ok(metrics)
}

/// Checks the fields a spec needs, before a job is queued.
pub fn validate(spec: &EvaluationSpec, needs_model: bool) -> Result<(), Error> {
    crate::limits::check_evaluation(spec, if needs_model { "" } else { "evaluation." })?;
    for (name, value) in
        [("run", &spec.run), ("queries", &spec.queries), ("collection", &spec.collection), ("qrels", &spec.qrels)]
    {
        if value.trim().is_empty() {
            return Err(Error::InvalidArgument(format!("evaluation.{name} is required")));
        }
    }
    if needs_model && spec.model.trim().is_empty() {
        return Err(Error::InvalidArgument("model is required".into()));
    }
    metrics_of(spec)?;
    Ok(())
}

impl EvalData {
    pub async fn load(spec: &EvaluationSpec) -> Result<Self, Error> {
        let metrics = metrics_of(spec)?;
        let top_k = if spec.top_k == 0 { 100 } else { spec.top_k as usize };
        let mut run = read_run(distill_store::open_text(&spec.run).await?, &spec.run)?;
        if spec.max_queries > 0 {
            run.truncate(spec.max_queries as usize);
        }
        let qrels = read_qrels(distill_store::open_text(&spec.qrels).await?, &spec.qrels)?;
        let wanted_q: HashSet<String> = run.iter().map(|l| l.qid.clone()).collect();
        let queries = read_tsv_texts(distill_store::open_text(&spec.queries).await?, &spec.queries, Some(&wanted_q))?;
        let wanted_d: HashSet<String> =
            run.iter().flat_map(|l| l.entries.iter().take(top_k).map(|e| e.docid.clone())).collect();
        let docs =
            read_tsv_texts(distill_store::open_text(&spec.collection).await?, &spec.collection, Some(&wanted_d))?;
        for list in &run {
            if !queries.contains_key(&list.qid) {
                return Err(Error::InvalidInput(format!(
                    "{}: query '{}' of the run has no text",
                    spec.queries, list.qid
                )));
            }
            if let Some(e) = list.entries.iter().take(top_k).find(|e| !docs.contains_key(&e.docid)) {
                return Err(Error::InvalidInput(format!(
                    "{}: document '{}' (run line {}) has no text",
                    spec.collection, e.docid, e.line
                )));
            }
        }
        Ok(Self { run, queries, docs, qrels, metrics, top_k })
    }

    /// The run re-ranked by `model`: the top `top_k` get the model's scores and rank first, the
    /// rest follow in their original order. `progress` is told (queries done, total) after each
    /// query and may stop the work there (`Break`: the job was cancelled), giving `None`.
    pub fn rerank(
        &self,
        model: &CrossEncoder,
        batch_size: usize,
        mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Option<Vec<RankedList>>, Error> {
        let mut out = Vec::with_capacity(self.run.len());
        for (i, list) in self.run.iter().enumerate() {
            let q = &self.queries[&list.qid];
            let head: Vec<&RunEntry> = list.entries.iter().take(self.top_k).collect();
            let pairs: Vec<(&str, &str)> = head.iter().map(|e| (q.as_str(), self.docs[&e.docid].as_str())).collect();
            let scores = model.score(&pairs, batch_size)?;
            let mut entries: Vec<RunEntry> = head
                .iter()
                .zip(&scores)
                .map(|(e, s)| RunEntry { docid: e.docid.clone(), rank: 0, score: *s as f64, line: e.line })
                .collect();
            distill_formats::sort_trec_eval(&mut entries);
            // The tail keeps its order, below every re-ranked score.
            let floor = entries.last().map_or(0.0, |e| e.score);
            let tail = list.entries.iter().skip(self.top_k).enumerate().map(|(j, e)| RunEntry {
                docid: e.docid.clone(),
                rank: 0,
                score: floor - 1.0 - j as f64,
                line: e.line,
            });
            entries.extend(tail);
            for (r, e) in entries.iter_mut().enumerate() {
                e.rank = r as i64 + 1;
            }
            out.push(RankedList { qid: list.qid.clone(), entries });
            if progress(i + 1, self.run.len()).is_break() {
                return Ok(None);
            }
        }
        Ok(Some(out))
    }

    /// Mean of each metric over the queries (trec_eval's averages, judged queries only).
    pub fn measure(&self, run: &[RankedList]) -> Vec<(String, f64)> {
        let e = evaluate(run, &self.qrels, &self.metrics, false);
        e.metrics.into_iter().zip(e.means).collect()
    }
}

/// A run in TREC format.
pub fn format_run(run: &[RankedList], tag: &str) -> String {
    let mut s = String::new();
    for list in run {
        for e in &list.entries {
            s.push_str(&format!("{} Q0 {} {} {} {}\n", list.qid, e.docid, e.rank, e.score, tag));
        }
    }
    s
}
