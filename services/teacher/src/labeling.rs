//! The labelling job: read candidates, score them with the teacher, sample rows, write shards.

use crate::candidates::{self, QueryCandidates};
use crate::error::Error;
use crate::llm::TeacherContext;
use crate::partition::Part;
use crate::sampling::{self, SamplingParams};
use crate::teachers;
use distill_jobs::{JobEntry, Jobs};
use distill_proto::{candidate_source::Source, LabelingSpec, OutputLayout, Progress};
use distill_shards::{DatasetReader, DatasetWriter, Fence, Layout, Manifest, ShardError, WriterOptions};
use distill_store::Location;
use futures::stream::{BoxStream, StreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub enum Outcome {
    /// The dataset's manifest (boxed: the outcome moves between tasks).
    Committed(Box<Manifest>),
    Cancelled,
}

pub fn layout_of(spec: &LabelingSpec) -> Result<Layout, Error> {
    match OutputLayout::try_from(spec.layout).unwrap_or(OutputLayout::Unspecified) {
        OutputLayout::Triples => Ok(Layout::Triples),
        OutputLayout::Lists => Ok(Layout::Lists),
        OutputLayout::Unspecified => Err(Error::InvalidArgument("layout: unspecified (TRIPLES or LISTS)".into())),
    }
}

fn require(field: &str, value: &str) -> Result<(), Error> {
    if value.trim().is_empty() {
        return Err(Error::InvalidArgument(format!("{field}: empty")));
    }
    if distill_store::is_local(value) {
        let path = value.strip_prefix("file://").unwrap_or(value);
        if !std::path::Path::new(path).is_file() {
            return Err(Error::InvalidArgument(format!("{field}: {path}: no such file")));
        }
    } else {
        Location::parse(value).map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))?;
    }
    Ok(())
}

/// Checks a spec before a job is created: everything that makes a request wrong as sent.
pub fn validate(spec: &LabelingSpec, endpoints: &crate::llm::endpoints::Endpoints) -> Result<(), Error> {
    crate::limits::check(spec)?;
    layout_of(spec)?;
    Part::of(spec)?;
    match spec.source.as_ref().and_then(|s| s.source.as_ref()) {
        None => return Err(Error::InvalidArgument("source: no candidate source given (trec or jsonl)".into())),
        Some(Source::Trec(t)) => {
            require("source.trec.run", &t.run)?;
            require("source.trec.queries", &t.queries)?;
            require("source.trec.collection", &t.collection)?;
            if !t.qrels.is_empty() {
                require("source.trec.qrels", &t.qrels)?;
            }
        }
        Some(Source::Jsonl(j)) => require("source.jsonl.path", &j.path)?,
    }
    teachers::validate(spec.teacher.as_ref(), endpoints)?;
    if let Some(distill_proto::teacher_spec::Teacher::Precomputed(p)) =
        spec.teacher.as_ref().and_then(|t| t.teacher.as_ref())
    {
        require("teacher.precomputed.path", &p.path)?;
    }
    if !spec.output_uri.is_empty() {
        Location::parse(&spec.output_uri).map_err(|e| Error::InvalidArgument(format!("output_uri: {e}")))?;
    }
    Ok(())
}

/// The writer's fence: before each commit, this replica still holds the job's lease.
fn lease_fence(jobs: &Arc<Jobs>, entry: &Arc<JobEntry>) -> Fence {
    let (jobs, entry) = (jobs.clone(), entry.clone());
    Arc::new(move || {
        let (jobs, entry) = (jobs.clone(), entry.clone());
        Box::pin(async move { jobs.confirm(&entry).await.map_err(|e| e.to_string()) })
    })
}

fn writer_options(spec: &LabelingSpec) -> WriterOptions {
    let mut opts = WriterOptions::default();
    if let Some(s) = &spec.shards {
        if s.rows_per_shard > 0 {
            opts.rows_per_shard = s.rows_per_shard;
        }
        if s.bytes_per_shard > 0 {
            opts.bytes_per_shard = s.bytes_per_shard;
        }
    }
    opts.batch_rows = opts.batch_rows.min(opts.rows_per_shard as usize).max(1);
    opts
}

fn progress(done: u64, total: u64, writer: &DatasetWriter, counters: &BTreeMap<String, f64>) -> Progress {
    Progress {
        done,
        total,
        unit: "queries".into(),
        rows: writer.rows(),
        shards: writer.shards().len() as u64,
        bytes: writer.bytes(),
        counters: counters.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    }
}

/// Each document's member scores (ensembles), by docid.
fn member_scores<'a>(
    q: &'a QueryCandidates,
    scores: &'a teachers::Scores,
    extra: &'a teachers::Scores,
) -> std::collections::HashMap<&'a str, &'a Vec<f64>> {
    let list = q.candidates.iter().zip(&scores.members);
    let more = q.unretrieved_relevant.iter().zip(&extra.members);
    list.chain(more).map(|(c, m)| (c.docid.as_str(), m)).collect()
}

/// `counters` (the job's, with the teacher's as they were when the job last resumed) plus what the
/// teacher counted since.
fn merged(counters: &BTreeMap<String, f64>, teacher: &dyn teachers::Teacher) -> BTreeMap<String, f64> {
    let mut out = counters.clone();
    for (k, v) in teacher.counters() {
        *out.entry(k).or_default() += v;
    }
    out
}

/// A labelling job as its worker sees it: the spec, the job's id and record, what teachers need,
/// and its cancellation.
#[derive(Clone, Copy)]
pub struct LabelingJob<'a> {
    pub spec: &'a LabelingSpec,
    pub id: &'a str,
    pub ctx: &'a TeacherContext,
    pub jobs: &'a Arc<Jobs>,
    pub entry: &'a Arc<JobEntry>,
    pub cancel: &'a CancellationToken,
}

/// Runs (or resumes) a labelling job to its committed dataset at `output`; a partitioned job
/// labels its part into a dataset of its own below `output`, then commits the whole if every part
/// has.
pub async fn run(job: LabelingJob<'_>, output: Location) -> Result<Outcome, Error> {
    let Some(part) = Part::of(job.spec)? else {
        return label(job, output).await;
    };
    let outcome = label(job, part.output(&output)).await?;
    if matches!(outcome, Outcome::Committed(_)) {
        part.finish(&output, job.jobs, job.entry).await?;
    }
    Ok(outcome)
}

/// Labels the spec's queries (its part's, for a partitioned job) into the dataset at `output`.
async fn label(job: LabelingJob<'_>, output: Location) -> Result<Outcome, Error> {
    let LabelingJob { spec, id: job_id, ctx, jobs, entry, cancel } = job;
    let layout = layout_of(spec)?;
    let sampling_spec = spec.sampling.unwrap_or_default();
    let params = SamplingParams::from_proto(&sampling_spec);
    let source = spec.source.clone().unwrap_or_default();
    let teacher_spec = spec.teacher.clone().unwrap_or_default();

    jobs.log(entry, "info", "reading candidates");
    let mut queries = candidates::load(&source, &sampling_spec).await?;
    if let Some(part) = Part::of(spec)? {
        queries = part.select(queries);
        jobs.log(entry, "info", format!("part {} of {}: {} of the queries", part.index, part.count, queries.len()));
    }
    let total = queries.len() as u64;
    jobs.log(entry, "info", format!("{total} queries; loading teacher"));
    let teacher = teachers::build(&teacher_spec, ctx).await?;

    let opts = WriterOptions { attempt: entry.snapshot().resumes, ..writer_options(spec) };
    let opened = DatasetWriter::open(output.clone(), layout, teacher.identity(), opts, job_id).await;
    let (writer, resume) = match opened {
        Ok(w) => w,
        // Committed by this job before a restart could record it: the work is done.
        Err(ShardError::AlreadyCommitted { job_id: ref owner, .. }) if owner == job_id => {
            let reader = DatasetReader::open(output).await?;
            return Ok(Outcome::Committed(Box::new(reader.manifest().clone())));
        }
        Err(e) => return Err(e.into()),
    };
    let mut writer = writer.fenced(lease_fence(jobs, entry));
    let mut counters: BTreeMap<String, f64> = serde_json::from_value(resume.state.clone()).unwrap_or_default();
    // What earlier attempts counted (an outage's failures among them), as their last record had it.
    let carried = counters.clone();
    if resume.cursor > 0 {
        jobs.log(entry, "info", format!("resuming after {} queries already in committed shards", resume.cursor));
    }
    jobs.set_progress(entry, progress(resume.cursor, total, &writer, &counters), true).await;

    let mut last_report = Instant::now();
    let teacher_ref = teacher.as_ref();
    let todo: Vec<(usize, &QueryCandidates)> = queries.iter().enumerate().skip(resume.cursor as usize).collect();
    let mut scored = scoring(teacher_ref, todo);
    let mut ready: std::collections::VecDeque<(usize, &QueryCandidates, QueryScores)> = Default::default();
    loop {
        if ready.is_empty() {
            let next = tokio::select! {
                _ = cancel.cancelled() => return Ok(Outcome::Cancelled),
                next = scored.next() => next,
            };
            let Some((chunk, result)) = next else { break };
            let results = result?;
            if results.len() != chunk.len() {
                return Err(Error::Internal(format!(
                    "the teacher scored {} of {} queries",
                    results.len(),
                    chunk.len()
                )));
            }
            ready.extend(chunk.into_iter().zip(results).map(|((i, q), r)| (i, q, r)));
        }
        let Some((i, q, scores)) = ready.pop_front() else { break };
        append_rows(&mut writer, &params, q, &scores, &mut counters)?;
        let done = i as u64 + 1;
        teacher_ref.check_outage(&carried, total - done)?;
        let all = merged(&counters, teacher_ref);
        let closed = writer.end_unit(done, serde_json::to_value(&all).expect("counters serialize")).await?;
        if closed.is_some() || last_report.elapsed() > Duration::from_millis(200) {
            jobs.set_progress(entry, progress(done, total, &writer, &all), closed.is_some()).await;
            last_report = Instant::now();
        }
        tokio::task::yield_now().await;
    }
    drop(scored);
    let counters = merged(&counters, teacher_ref);
    let extra = manifest_extra(spec, &params, total, &counters)?;
    let manifest = writer.commit(extra).await?;
    let p = Progress {
        done: total,
        total,
        unit: "queries".into(),
        rows: manifest.rows,
        shards: manifest.shards.len() as u64,
        bytes: manifest.bytes,
        counters: counters.into_iter().collect(),
    };
    jobs.set_progress(entry, p, true).await;
    Ok(Outcome::Committed(Box::new(manifest)))
}

/// A query's teacher scores: of its candidates, and of its relevant documents the first stage
/// missed.
type QueryScores = (teachers::Scores, teachers::Scores);
/// Scored chunks of queries, in source order: the chunk (index, query) and its scores.
type Scored<'a> = BoxStream<'a, (Vec<(usize, &'a QueryCandidates)>, Result<Vec<QueryScores>, Error>)>;

/// Queries are scored in calls of `queries_per_call` (a model ensemble packs their pairs by
/// length), `parallelism` calls at a time (an LLM teacher's requests overlap), and come back in
/// source order, so that the cursor stays a prefix of the source.
fn scoring<'a>(teacher: &'a dyn teachers::Teacher, todo: Vec<(usize, &'a QueryCandidates)>) -> Scored<'a> {
    let mut pending: Vec<futures::future::BoxFuture<'a, _>> = Vec::new();
    for chunk in todo.chunks(teacher.queries_per_call().max(1)) {
        let chunk = chunk.to_vec();
        pending.push(Box::pin(async move {
            let qs: Vec<&QueryCandidates> = chunk.iter().map(|(_, q)| *q).collect();
            let result = teacher.score_queries(&qs).await;
            (chunk, result)
        }));
    }
    futures::stream::iter(pending).buffered(teacher.parallelism().max(1)).boxed()
}

/// Appends the rows of query `q` in the writer's layout (each with its members' scores), or
/// counts why it has none.
fn append_rows(
    writer: &mut DatasetWriter,
    params: &SamplingParams,
    q: &QueryCandidates,
    (scores, extra): &QueryScores,
    counters: &mut BTreeMap<String, f64>,
) -> Result<(), Error> {
    let members = member_scores(q, scores, extra);
    let members_of = |docid: &str| members.get(docid).map(|m| m.to_vec());
    match writer.layout() {
        Layout::Triples => match sampling::triple_rows(q, &scores.combined, &extra.combined, params) {
            Ok(mut rows) => {
                for r in &mut rows {
                    r.pos_member_scores = members_of(&r.pos_id);
                    r.neg_member_scores = members_of(&r.neg_id);
                }
                writer.append_triples(rows)?
            }
            Err(skip) => *counters.entry(skip.counter().into()).or_default() += 1.0,
        },
        Layout::Lists => {
            let (row, unscored) = sampling::list_row(q, &scores.combined);
            if unscored > 0 {
                *counters.entry("unscored_candidates".into()).or_default() += unscored as f64;
            }
            match row {
                Ok(mut row) => {
                    for item in &mut row.items {
                        item.member_scores = members_of(&item.doc_id);
                    }
                    writer.append_lists([row])?
                }
                Err(skip) => *counters.entry(skip.counter().into()).or_default() += 1.0,
            }
        }
    }
    Ok(())
}

/// What the manifest records of the job: its source, sampling, queries, counters (and part).
fn manifest_extra(
    spec: &LabelingSpec,
    params: &SamplingParams,
    total: u64,
    counters: &BTreeMap<String, f64>,
) -> Result<serde_json::Value, Error> {
    let sampling = spec.sampling.unwrap_or_default();
    let mut extra = serde_json::json!({
        "source": match spec.source.as_ref().and_then(|s| s.source.as_ref()) {
            Some(Source::Trec(t)) => serde_json::json!({"run": t.run, "queries": t.queries, "collection": t.collection, "qrels": t.qrels}),
            Some(Source::Jsonl(j)) => serde_json::json!({"jsonl": j.path}),
            None => serde_json::Value::Null,
        },
        "sampling": {
            "depth": sampling.depth,
            "negatives_per_query": params.negatives,
            "positives_from_qrels": params.positives_from_qrels,
            "min_relevance": params.min_relevance,
            "seed": params.seed,
            "max_queries": sampling.max_queries,
        },
        "queries": total,
        "counters": counters,
    });
    if let Some(part) = Part::of(spec)? {
        extra["partition"] = serde_json::json!({"index": part.index, "count": part.count});
    }
    Ok(extra)
}
