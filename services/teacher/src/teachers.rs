//! Teachers: whatever gives a score to each (query, candidate). Model teachers (cross-encoder
//! ensembles, LLM re-rankers) implement the same trait.

use crate::candidates::{Candidate, QueryCandidates};
use crate::error::Error;
use crate::llm::{LlmTeacher, TeacherContext};
use distill_formats as formats;
use distill_proto::{teacher_spec::Teacher as TeacherKind, PrecomputedFormat, TeacherSpec};
use distill_shards::TeacherIdentity;
use futures::future::BoxFuture;
use std::collections::{BTreeMap, HashMap};

/// A teacher's answer for some candidates (in their order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scores {
    /// The teacher score of each candidate; None where the teacher has none.
    pub combined: Vec<Option<f64>>,
    /// Each candidate's member scores, for teachers made of several (an ensemble); else empty.
    pub members: Vec<Vec<f64>>,
}

impl From<Vec<Option<f64>>> for Scores {
    fn from(combined: Vec<Option<f64>>) -> Self {
        Scores { combined, members: Vec::new() }
    }
}

pub trait Teacher: Send + Sync {
    fn identity(&self) -> TeacherIdentity;
    /// Queries worth scoring at once (the labelling job keeps this many in flight; results are
    /// written in source order).
    fn parallelism(&self) -> usize {
        1
    }
    /// The teacher's own counters since it was built (requests, retries, tokens, ...).
    fn counters(&self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    /// Fails when the teacher's endpoint failed more often than the job allows, even if each of
    /// the `remaining` queries still to come went well; `carried` holds the job's counters from
    /// its earlier attempts (as its last progress record has them), which count too.
    fn check_outage(&self, _carried: &BTreeMap<String, f64>, _remaining: u64) -> Result<(), Error> {
        Ok(())
    }
    /// One score per candidate of `query` (in order); None where the teacher has no score.
    fn score<'a>(
        &'a self,
        query: &'a QueryCandidates,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Result<Scores, Error>>;
    /// Queries worth scoring in one [`Teacher::score_queries`] call (a model ensemble packs the
    /// pairs of several queries into passes of similar length, so little work goes to padding).
    fn queries_per_call(&self) -> usize {
        1
    }
    /// Each query's scores of its candidates and of its unretrieved relevant documents.
    fn score_queries<'a>(
        &'a self,
        queries: &'a [&'a QueryCandidates],
    ) -> BoxFuture<'a, Result<Vec<(Scores, Scores)>, Error>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(queries.len());
            for q in queries {
                let scores = self.score(q, &q.candidates).await?;
                let extra = if q.unretrieved_relevant.is_empty() {
                    Scores::default()
                } else {
                    self.score(q, &q.unretrieved_relevant).await?
                };
                out.push((scores, extra));
            }
            Ok(out)
        })
    }
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
    ) -> BoxFuture<'a, Result<Scores, Error>> {
        Box::pin(async move { Ok(candidates.iter().map(|c| c.first_stage_score).collect::<Vec<_>>().into()) })
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
    ) -> BoxFuture<'a, Result<Scores, Error>> {
        Box::pin(async move {
            let q = self.scores.get(&query.qid);
            Ok(candidates.iter().map(|c| q.and_then(|q| q.get(&c.docid).copied())).collect::<Vec<_>>().into())
        })
    }
}

/// Checks a teacher spec without loading anything.
pub fn validate(spec: Option<&TeacherSpec>, endpoints: &crate::llm::endpoints::Endpoints) -> Result<(), Error> {
    match spec.and_then(|t| t.teacher.as_ref()) {
        None => Err(Error::InvalidArgument(
            "teacher: no teacher given (first_stage, precomputed, cross_encoders, llm or local_llm)".into(),
        )),
        Some(TeacherKind::Llm(l)) => crate::llm::validate(l, endpoints),
        Some(TeacherKind::LocalLlm(l)) => crate::llm::local::validate(l),
        Some(TeacherKind::FirstStage(_)) => Ok(()),
        Some(TeacherKind::CrossEncoders(e)) => {
            if e.models.is_empty() {
                return Err(Error::InvalidArgument("teacher.cross_encoders.models: at least one model".into()));
            }
            if let Some((i, _)) = e.models.iter().enumerate().find(|(_, m)| m.trim().is_empty()) {
                return Err(Error::InvalidArgument(format!("teacher.cross_encoders.models[{i}]: empty")));
            }
            Ok(())
        }
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
pub async fn build(spec: &TeacherSpec, ctx: &TeacherContext) -> Result<Box<dyn Teacher>, Error> {
    validate(Some(spec), &ctx.endpoints)?;
    match spec.teacher.as_ref().expect("validated") {
        TeacherKind::FirstStage(_) => Ok(Box::new(FirstStage)),
        TeacherKind::Precomputed(p) => {
            let format = PrecomputedFormat::try_from(p.format).expect("validated");
            Ok(Box::new(Precomputed::load(&p.path, format, &p.name).await?))
        }
        TeacherKind::CrossEncoders(e) => Ok(Box::new(Ensemble::load(e, &ctx.device()).await?)),
        TeacherKind::Llm(l) => Ok(Box::new(LlmTeacher::build(l, ctx).await?)),
        TeacherKind::LocalLlm(l) => Ok(Box::new(crate::llm::local::LocalLlmTeacher::load(l, &ctx.device()).await?)),
    }
}

/// Cross-encoders scoring every (query, candidate), their scores combined per candidate by mean
/// (Hofstätter et al.'s ensemble) or by mean of per-query z-scores. The models run on the calling
/// worker thread inside `block_in_place`, so the async runtime keeps serving.
pub struct Ensemble {
    identity: TeacherIdentity,
    members: Vec<Member>,
    znorm: bool,
    /// The first stage's score is a member too (hybrid teacher).
    first_stage: bool,
    batching: distill_models::Batching,
    stats: std::sync::Mutex<distill_models::BatchStats>,
}

/// One model of an ensemble: a cross-encoder, or a sentence-transformers bi-encoder (cosine of
/// mean-pooled embeddings).
enum Member {
    Cross(distill_models::CrossEncoder),
    Bi(distill_models::BiEncoder),
}

impl Member {
    fn score_with(
        &self,
        pairs: &[(&str, &str)],
        batching: distill_models::Batching,
    ) -> distill_models::Result<(Vec<f32>, distill_models::BatchStats)> {
        match self {
            Member::Cross(m) => m.score_with(pairs, batching),
            Member::Bi(m) => m.score_with(pairs, batching),
        }
    }

    fn model_type(&self) -> &str {
        match self {
            Member::Cross(m) => &m.model_type,
            Member::Bi(m) => &m.model_type,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Member::Cross(_) => "cross_encoder",
            Member::Bi(_) => "bi_encoder",
        }
    }
}

/// `(x - mean) / std` of each of `xs`, with the mean and (population) standard deviation of
/// `reference`; all zeros when the reference scores are all equal.
pub fn znorm(xs: &[f64], reference: &[f64]) -> Vec<f64> {
    let n = reference.len().max(1) as f64;
    let mean = reference.iter().sum::<f64>() / n;
    let std = (reference.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    xs.iter().map(|x| if std > 0.0 { (x - mean) / std } else { 0.0 }).collect()
}

impl Ensemble {
    /// Loads every member onto `device`.
    pub async fn load(spec: &distill_proto::CrossEncoderEnsemble, device: &candle_core::Device) -> Result<Self, Error> {
        let max_q = if spec.max_query_length == 0 { 64 } else { spec.max_query_length as usize };
        let max_len = if spec.max_length == 0 { 512 } else { spec.max_length as usize };
        let mut members = Vec::with_capacity(spec.models.len());
        let mut names = Vec::new();
        for (i, uri) in spec.models.iter().enumerate() {
            let dir = distill_store::materialize_dir(uri)
                .await
                .map_err(|e| Error::InvalidArgument(format!("teacher.cross_encoders.models[{i}]: {e}")))?;
            let device = device.clone();
            let model = tokio::task::spawn_blocking(move || -> distill_models::Result<Member> {
                if distill_models::bi_encoder::is_bi_encoder(&dir) {
                    Ok(Member::Bi(distill_models::BiEncoder::load(&dir, max_len, &device)?))
                } else {
                    Ok(Member::Cross(distill_models::CrossEncoder::load(&dir, max_q, max_len, &device)?))
                }
            })
            .await
            .map_err(|e| Error::Internal(format!("model loading task: {e}")))?
            .map_err(|e| Error::InvalidArgument(format!("teacher.cross_encoders.models[{i}]: {e}")))?;
            if let Member::Cross(m) = &model {
                if m.new_head() {
                    return Err(Error::InvalidArgument(format!(
                        "teacher.cross_encoders.models[{i}]: {uri} has no classification head (not a cross-encoder, \
                         nor a sentence-transformers bi-encoder with a modules.json)"
                    )));
                }
            }
            names.push(uri.trim_end_matches('/').rsplit('/').next().unwrap_or(uri).to_string());
            members.push(model);
        }
        let combination = distill_proto::EnsembleCombination::try_from(spec.combination)
            .unwrap_or(distill_proto::EnsembleCombination::Unspecified);
        let znorm = combination == distill_proto::EnsembleCombination::ZnormMean;
        let mut kinds: Vec<&str> = members.iter().map(|m| m.kind()).collect();
        if spec.include_first_stage {
            names.push("first_stage".into());
            kinds.push("first_stage");
        }
        let name = if spec.name.is_empty() { names.join("+") } else { spec.name.clone() };
        Ok(Self {
            identity: TeacherIdentity {
                kind: "cross_encoder_ensemble".into(),
                name,
                details: serde_json::json!({
                    "models": spec.models, "combination": if znorm { "znorm_mean" } else { "mean" },
                    "max_query_length": max_q, "max_length": max_len,
                    "member_names": names,
                    "model_types": members.iter().map(|m| m.model_type().to_string()).collect::<Vec<_>>(),
                    "member_kinds": kinds,
                }),
            },
            members,
            znorm,
            first_stage: spec.include_first_stage,
            batching: distill_models::Batching {
                max_pairs: if spec.batch_size == 0 { 32 } else { spec.batch_size as usize },
                max_tokens: if spec.max_batch_tokens == 0 { 8192 } else { spec.max_batch_tokens as usize },
            },
            stats: Default::default(),
        })
    }

    /// Each member's raw scores of `candidates`.
    /// With `include_first_stage`, the first stage's scores are one more member (last); a document
    /// the first stage did not retrieve gets the lowest score of the query's list.
    fn member_scores(&self, q: &QueryCandidates, candidates: &[Candidate]) -> Result<Vec<Vec<f64>>, Error> {
        let pairs: Vec<(&str, &str)> = candidates.iter().map(|c| (q.query.as_str(), c.text.as_str())).collect();
        let mut members = self.raw_scores(&pairs)?;
        if self.first_stage {
            let floor = q.candidates.iter().filter_map(|c| c.first_stage_score).fold(f64::INFINITY, f64::min);
            let floor = if floor.is_finite() { floor } else { 0.0 };
            members.push(candidates.iter().map(|c| c.first_stage_score.unwrap_or(floor)).collect());
        }
        Ok(members)
    }

    /// Each member's raw scores of `pairs`.
    fn raw_scores(&self, pairs: &[(&str, &str)]) -> Result<Vec<Vec<f64>>, Error> {
        self.members
            .iter()
            .map(|m| {
                let (scores, stats) = m
                    .score_with(pairs, self.batching)
                    .map_err(|e| Error::Internal(format!("cross-encoder scoring: {e}")))?;
                let mut total = self.stats.lock().expect("stats lock");
                total.passes += stats.passes;
                total.tokens += stats.tokens;
                total.padded_tokens += stats.padded_tokens;
                Ok(scores.into_iter().map(f64::from).collect())
            })
            .collect()
    }

    /// Scores free pairs (the `Score` RPC): combined scores (z-scores taken over the pairs sharing a
    /// query) and each pair's member scores.
    pub fn score_pairs(&self, pairs: &[(String, String)]) -> Result<(Vec<f64>, Vec<Vec<f64>>), Error> {
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(q, p)| (q.as_str(), p.as_str())).collect();
        let members: Vec<Vec<f64>> = self.raw_scores(&refs)?;
        let per_member: Vec<Vec<f64>> = if !self.znorm {
            members.clone()
        } else {
            let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
            for (i, (q, _)) in pairs.iter().enumerate() {
                groups.entry(q.as_str()).or_default().push(i);
            }
            members
                .iter()
                .map(|s| {
                    let mut out = vec![0.0; s.len()];
                    for idx in groups.values() {
                        let xs: Vec<f64> = idx.iter().map(|&i| s[i]).collect();
                        for (&i, z) in idx.iter().zip(znorm(&xs, &xs)) {
                            out[i] = z;
                        }
                    }
                    out
                })
                .collect()
        };
        let k = per_member.len() as f64;
        let combined = (0..pairs.len()).map(|i| per_member.iter().map(|s| s[i]).sum::<f64>() / k).collect();
        Ok((combined, (0..pairs.len()).map(|i| members.iter().map(|s| s[i]).collect()).collect()))
    }

    fn combine(&self, q: &QueryCandidates, candidates: &[Candidate]) -> Result<Scores, Error> {
        if candidates.is_empty() {
            return Ok(Scores::default());
        }
        let members = self.member_scores(q, candidates)?;
        let same_list = std::ptr::eq(candidates.as_ptr(), q.candidates.as_ptr());
        let list = if self.znorm && !same_list && !q.candidates.is_empty() {
            Some(self.member_scores(q, &q.candidates)?)
        } else {
            None
        };
        Ok(self.combined(members, list.as_deref()))
    }

    /// Combines each member's raw scores of some candidates; with z-norm, standardised with the
    /// statistics of `list` (the members' scores of the query's whole list) when the candidates are
    /// not that list (relevant documents the first stage missed), else with their own.
    fn combined(&self, members: Vec<Vec<f64>>, list: Option<&[Vec<f64>]>) -> Scores {
        let n = members.first().map_or(0, |m| m.len());
        let per_member: Vec<Vec<f64>> = match (self.znorm, list) {
            (false, _) => members.clone(),
            (true, None) => members.iter().map(|s| znorm(s, s)).collect(),
            (true, Some(list)) => members.iter().zip(list).map(|(s, l)| znorm(s, l)).collect(),
        };
        let k = per_member.len() as f64;
        Scores {
            combined: (0..n).map(|i| Some(per_member.iter().map(|s| s[i]).sum::<f64>() / k)).collect(),
            // The members' raw scores, as each model gave them.
            members: (0..n).map(|i| members.iter().map(|s| s[i]).collect()).collect(),
        }
    }

    /// All pairs of several queries (their lists and unretrieved relevant documents) scored in one
    /// call per member, then split and combined per query exactly as [`Ensemble::combine`] does.
    fn combine_queries(&self, queries: &[&QueryCandidates]) -> Result<Vec<(Scores, Scores)>, Error> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for q in queries {
            let docs = q.candidates.iter().chain(&q.unretrieved_relevant);
            pairs.extend(docs.map(|c| (q.query.as_str(), c.text.as_str())));
        }
        let raw = self.raw_scores(&pairs)?;
        let mut at = 0;
        let mut out = Vec::with_capacity(queries.len());
        for q in queries {
            let (n, m) = (q.candidates.len(), q.unretrieved_relevant.len());
            let take = |from: usize, len: usize, cands: &[Candidate]| -> Vec<Vec<f64>> {
                let mut members: Vec<Vec<f64>> = raw.iter().map(|s| s[from..from + len].to_vec()).collect();
                if self.first_stage {
                    let floor = q.candidates.iter().filter_map(|c| c.first_stage_score).fold(f64::INFINITY, f64::min);
                    let floor = if floor.is_finite() { floor } else { 0.0 };
                    members.push(cands.iter().map(|c| c.first_stage_score.unwrap_or(floor)).collect());
                }
                members
            };
            let list = take(at, n, &q.candidates);
            let extra = take(at + n, m, &q.unretrieved_relevant);
            at += n + m;
            let scores = if n == 0 { Scores::default() } else { self.combined(list.clone(), None) };
            let extra_scores = match (m, n) {
                (0, _) => Scores::default(),
                (_, 0) => self.combined(extra, None),
                _ => self.combined(extra, Some(&list)),
            };
            out.push((scores, extra_scores));
        }
        Ok(out)
    }
}

impl Teacher for Ensemble {
    fn identity(&self) -> TeacherIdentity {
        self.identity.clone()
    }

    fn counters(&self) -> BTreeMap<String, f64> {
        let s = *self.stats.lock().expect("stats lock");
        BTreeMap::from([
            ("forward_passes".to_string(), s.passes as f64),
            ("tokens".to_string(), s.tokens as f64),
            ("padded_tokens".to_string(), s.padded_tokens as f64),
        ])
    }

    fn score<'a>(
        &'a self,
        query: &'a QueryCandidates,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Result<Scores, Error>> {
        Box::pin(async move { tokio::task::block_in_place(|| self.combine(query, candidates)) })
    }

    fn queries_per_call(&self) -> usize {
        8
    }

    fn score_queries<'a>(
        &'a self,
        queries: &'a [&'a QueryCandidates],
    ) -> BoxFuture<'a, Result<Vec<(Scores, Scores)>, Error>> {
        Box::pin(async move { tokio::task::block_in_place(|| self.combine_queries(queries)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(docid: &str, text: &str, first_stage: Option<f64>) -> Candidate {
        Candidate { docid: docid.into(), text: text.into(), first_stage_score: first_stage, label: None }
    }

    /// Scoring several queries in one call (pairs packed by length across queries) gives each
    /// query the scores that scoring it alone gives, unretrieved relevant documents included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_scored_together_equal_queries_scored_alone() {
        let bert = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/models/tests/fixtures/bert");
        for znorm in [true, false] {
            let spec = distill_proto::CrossEncoderEnsemble {
                models: vec![bert.into(), bert.into()],
                combination: if znorm {
                    distill_proto::EnsembleCombination::ZnormMean
                } else {
                    distill_proto::EnsembleCombination::Mean
                } as i32,
                max_length: 64,
                batch_size: 3,
                include_first_stage: true,
                ..Default::default()
            };
            let e = Ensemble::load(&spec, &candle_core::Device::Cpu).await.unwrap();
            let queries = [
                QueryCandidates {
                    qid: "1".into(),
                    query: "what is a window manager".into(),
                    candidates: vec![
                        cand("a", "a window manager draws the frames of windows", Some(12.0)),
                        cand("b", "chess across three boards", Some(7.5)),
                        cand(
                            "c",
                            "a tiling window manager for X11 with a long description of its many features",
                            Some(9.0),
                        ),
                    ],
                    unretrieved_relevant: vec![cand("d", "the X11 window manager inspired by plan 9", None)],
                },
                QueryCandidates {
                    qid: "2".into(),
                    query: "chess".into(),
                    candidates: vec![],
                    unretrieved_relevant: vec![],
                },
                QueryCandidates {
                    qid: "3".into(),
                    query: "midi converter".into(),
                    candidates: vec![
                        cand("e", "converts ABC to MIDI and back", Some(3.0)),
                        cand("f", "midi", Some(2.0)),
                    ],
                    unretrieved_relevant: vec![],
                },
            ];
            let refs: Vec<&QueryCandidates> = queries.iter().collect();
            let together = e.score_queries(&refs).await.unwrap();
            assert_eq!(together.len(), 3);
            for (q, (scores, extra)) in queries.iter().zip(&together) {
                let alone = e.score(q, &q.candidates).await.unwrap();
                let alone_extra = e.score(q, &q.unretrieved_relevant).await.unwrap();
                for (a, b) in [(scores, &alone), (extra, &alone_extra)] {
                    assert_eq!(a.combined.len(), b.combined.len(), "query {}", q.qid);
                    for (x, y) in a.combined.iter().zip(&b.combined) {
                        assert!(
                            (x.unwrap() - y.unwrap()).abs() < 1e-5,
                            "query {} znorm {znorm}: {x:?} vs {y:?}",
                            q.qid
                        );
                    }
                    for (x, y) in a.members.iter().flatten().zip(b.members.iter().flatten()) {
                        assert!((x - y).abs() < 1e-5);
                    }
                }
            }
            // The unretrieved document is standardised with the list's statistics, not its own
            // (alone it would be 0 for every member).
            assert!(together[0].1.combined[0].unwrap().abs() > 1e-3 || !znorm);
        }
    }
}
