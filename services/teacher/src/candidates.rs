//! Candidate lists: what a labelling job reads before any teacher scores it.

use crate::error::Error;
use distill_formats as formats;
use distill_proto::{candidate_source::Source, CandidateSource, Sampling};
use std::collections::{HashMap, HashSet};

/// One retrieved passage.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub docid: String,
    pub text: String,
    /// The first stage's score, when the source has one.
    pub first_stage_score: Option<f64>,
    /// Relevance grade from qrels or the JSONL `label`; None when unjudged.
    pub label: Option<i32>,
}

/// A query with its candidates in first-stage order, plus judged documents the first stage missed
/// (only loaded when positives come from qrels).
#[derive(Debug, Clone, PartialEq)]
pub struct QueryCandidates {
    pub qid: String,
    pub query: String,
    pub candidates: Vec<Candidate>,
    pub unretrieved_relevant: Vec<Candidate>,
}

fn file_name(uri: &str) -> String {
    uri.to_string()
}

async fn parse_file<T: Send + 'static>(
    uri: &str,
    parse: impl FnOnce(Box<dyn std::io::BufRead + Send>, &str) -> formats::Result<T> + Send + 'static,
) -> Result<T, Error> {
    let reader = distill_store::open_text(uri).await?;
    let name = file_name(uri);
    tokio::task::spawn_blocking(move || parse(reader, &name))
        .await
        .map_err(|e| Error::Internal(format!("parser task failed: {e}")))?
        .map_err(Error::Format)
}

/// Reads the candidate source of a spec, applying `depth` and `max_queries`.
pub async fn load(source: &CandidateSource, sampling: &Sampling) -> Result<Vec<QueryCandidates>, Error> {
    let depth = if sampling.depth == 0 { usize::MAX } else { sampling.depth as usize };
    let max_queries = if sampling.max_queries == 0 { usize::MAX } else { sampling.max_queries as usize };
    let min_rel = if sampling.min_relevance <= 0 { 1 } else { sampling.min_relevance };
    match source.source.as_ref() {
        None => Err(Error::InvalidArgument("source: no candidate source given (trec or jsonl)".into())),
        Some(Source::Jsonl(j)) => {
            let queries = parse_file(&j.path, formats::read_candidates_jsonl).await?;
            Ok(queries
                .into_iter()
                .take(max_queries)
                .map(|q| QueryCandidates {
                    qid: q.qid,
                    query: q.query,
                    candidates: q
                        .candidates
                        .into_iter()
                        .take(depth)
                        .map(|c| Candidate { docid: c.docid, text: c.text, first_stage_score: c.score, label: c.label })
                        .collect(),
                    unretrieved_relevant: Vec::new(),
                })
                .collect())
        }
        Some(Source::Trec(t)) => {
            let mut run = parse_file(&t.run, formats::read_run).await?;
            run.truncate(max_queries);
            for list in &mut run {
                list.entries.truncate(depth);
            }
            let qrels =
                if t.qrels.is_empty() { HashMap::new() } else { parse_file(&t.qrels, formats::read_qrels).await? };
            let qids: HashSet<String> = run.iter().map(|l| l.qid.clone()).collect();
            let mut docids: HashSet<String> =
                run.iter().flat_map(|l| l.entries.iter().map(|e| e.docid.clone())).collect();
            if sampling.positives_from_qrels {
                for qid in &qids {
                    if let Some(judged) = qrels.get(qid) {
                        docids.extend(judged.iter().filter(|(_, &r)| r >= min_rel).map(|(d, _)| d.clone()));
                    }
                }
            }
            let queries = parse_file(&t.queries, move |r, f| formats::read_tsv_texts(r, f, Some(&qids))).await?;
            let keep = docids.clone();
            let mut collection =
                parse_file(&t.collection, move |r, f| formats::read_tsv_texts(r, f, Some(&keep))).await?;
            let mut out = Vec::with_capacity(run.len());
            for list in run {
                let Some(query) = queries.get(&list.qid) else {
                    let line = list.entries.first().map_or(0, |e| e.line);
                    return Err(Error::InvalidInput(format!(
                        "{}:{line}: query '{}' has no text in {}",
                        t.run, list.qid, t.queries
                    )));
                };
                let judged = qrels.get(&list.qid);
                let label = |docid: &str| judged.and_then(|j| j.get(docid).copied());
                let mut candidates = Vec::with_capacity(list.entries.len());
                let mut retrieved = HashSet::new();
                for e in &list.entries {
                    let Some(text) = collection.get(&e.docid) else {
                        return Err(Error::InvalidInput(format!(
                            "{}:{}: document '{}' (query '{}') is not in {}",
                            t.run, e.line, e.docid, list.qid, t.collection
                        )));
                    };
                    retrieved.insert(e.docid.clone());
                    candidates.push(Candidate {
                        docid: e.docid.clone(),
                        text: text.clone(),
                        first_stage_score: Some(e.score),
                        label: label(&e.docid),
                    });
                }
                let mut unretrieved_relevant = Vec::new();
                if sampling.positives_from_qrels {
                    let mut missing: Vec<(&String, &i32)> = judged
                        .into_iter()
                        .flatten()
                        .filter(|(d, &r)| r >= min_rel && !retrieved.contains(*d))
                        .collect();
                    missing.sort();
                    for (docid, &rel) in missing {
                        let Some(text) = collection.get(docid) else {
                            return Err(Error::InvalidInput(format!(
                                "{}: relevant document '{docid}' of query '{}' is not in {}",
                                t.qrels, list.qid, t.collection
                            )));
                        };
                        unretrieved_relevant.push(Candidate {
                            docid: docid.clone(),
                            text: text.clone(),
                            first_stage_score: None,
                            label: Some(rel),
                        });
                    }
                }
                out.push(QueryCandidates { qid: list.qid, query: query.clone(), candidates, unretrieved_relevant });
            }
            collection.clear();
            Ok(out)
        }
    }
}
