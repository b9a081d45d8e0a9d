//! Teachers: whatever gives a score to each (query, candidate). Model teachers (cross-encoder
//! ensembles, LLM re-rankers) implement the same trait.

use crate::candidates::{Candidate, QueryCandidates};
use crate::error::Error;
use distill_formats as formats;
use distill_proto::{teacher_spec::Teacher as TeacherKind, PrecomputedFormat, TeacherSpec};
use distill_shards::TeacherIdentity;
use futures::future::BoxFuture;
use std::collections::HashMap;

pub trait Teacher: Send + Sync {
    fn identity(&self) -> TeacherIdentity;
    /// One score per candidate of `query` (in order); None where the teacher has no score.
    fn score<'a>(
        &'a self,
        query: &'a QueryCandidates,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Result<Vec<Option<f64>>, Error>>;
}

/// The first stage's own scores are the teacher's.
pub struct FirstStage;

impl Teacher for FirstStage {
    fn identity(&self) -> TeacherIdentity {
        TeacherIdentity { kind: "first_stage".into(), name: "first_stage".into(), details: serde_json::Value::Null }
    }

    fn score<'a>(
        &'a self,
        _query: &'a QueryCandidates,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Result<Vec<Option<f64>>, Error>> {
        Box::pin(async move { Ok(candidates.iter().map(|c| c.first_stage_score).collect()) })
    }
}

/// Scores someone already computed, keyed by (qid, docid).
pub struct Precomputed {
    identity: TeacherIdentity,
    scores: HashMap<String, HashMap<String, f64>>,
}

impl Precomputed {
    pub async fn load(path: &str, format: PrecomputedFormat, name: &str) -> Result<Self, Error> {
        let reader = distill_store::open_text(path).await?;
        let file = path.to_string();
        let scores = tokio::task::spawn_blocking(move || -> formats::Result<HashMap<String, HashMap<String, f64>>> {
            let mut scores: HashMap<String, HashMap<String, f64>> = HashMap::new();
            match format {
                PrecomputedFormat::HofstatterTsv => formats::for_each_scored_triple(reader, &file, |t| {
                    let q = scores.entry(t.qid).or_default();
                    q.entry(t.pos_id).or_insert(t.pos_score);
                    q.entry(t.neg_id).or_insert(t.neg_score);
                })?,
                PrecomputedFormat::TrecRun => {
                    for list in formats::read_run(reader, &file)? {
                        scores.insert(list.qid, list.entries.into_iter().map(|e| (e.docid, e.score)).collect());
                    }
                }
                PrecomputedFormat::Unspecified => unreachable!("validated before loading"),
            }
            Ok(scores)
        })
        .await
        .map_err(|e| Error::Internal(format!("teacher file task failed: {e}")))?
        .map_err(Error::Format)?;
        let name = if name.is_empty() { path.rsplit('/').next().unwrap_or(path).to_string() } else { name.to_string() };
        let format_name = match format {
            PrecomputedFormat::HofstatterTsv => "hofstatter_tsv",
            _ => "trec_run",
        };
        Ok(Self {
            identity: TeacherIdentity {
                kind: "precomputed".into(),
                name,
                details: serde_json::json!({"path": path, "format": format_name}),
            },
            scores,
        })
    }
}

impl Teacher for Precomputed {
    fn identity(&self) -> TeacherIdentity {
        self.identity.clone()
    }

    fn score<'a>(
        &'a self,
        query: &'a QueryCandidates,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Result<Vec<Option<f64>>, Error>> {
        Box::pin(async move {
            let q = self.scores.get(&query.qid);
            Ok(candidates.iter().map(|c| q.and_then(|q| q.get(&c.docid).copied())).collect())
        })
    }
}

/// Checks a teacher spec without loading anything.
pub fn validate(spec: Option<&TeacherSpec>) -> Result<(), Error> {
    match spec.and_then(|t| t.teacher.as_ref()) {
        None => Err(Error::InvalidArgument("teacher: no teacher given (first_stage or precomputed)".into())),
        Some(TeacherKind::FirstStage(_)) => Ok(()),
        Some(TeacherKind::Precomputed(p)) => {
            if p.path.trim().is_empty() {
                return Err(Error::InvalidArgument("teacher.precomputed.path: empty".into()));
            }
            if PrecomputedFormat::try_from(p.format).unwrap_or(PrecomputedFormat::Unspecified)
                == PrecomputedFormat::Unspecified
            {
                return Err(Error::InvalidArgument(
                    "teacher.precomputed.format: unspecified (HOFSTATTER_TSV or TREC_RUN)".into(),
                ));
            }
            Ok(())
        }
    }
}

/// Builds the teacher a spec names.
pub async fn build(spec: &TeacherSpec) -> Result<Box<dyn Teacher>, Error> {
    validate(Some(spec))?;
    match spec.teacher.as_ref().expect("validated") {
        TeacherKind::FirstStage(_) => Ok(Box::new(FirstStage)),
        TeacherKind::Precomputed(p) => {
            let format = PrecomputedFormat::try_from(p.format).expect("validated");
            Ok(Box::new(Precomputed::load(&p.path, format, &p.name).await?))
        }
    }
}
