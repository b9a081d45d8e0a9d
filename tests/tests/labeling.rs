//! Labelling end to end: the real teacher binary on 127.0.0.1, driven over gRPC, writing to a local
//! directory and to a real S3 server, read back with the project's reader and with pyarrow.

use distill_e2e::*;
use distill_proto as pb;
use distill_shards::{DatasetReader, ListRow, TripleRow};
use futures::TryStreamExt;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// The run as trec_eval ranks it, computed here independently of the service's reader.
fn expected_run(f: &Fixture) -> Vec<(String, Vec<(String, f64)>)> {
    let text = std::fs::read_to_string(f.path("run.trec")).unwrap();
    let mut order = Vec::new();
    let mut lists: HashMap<String, Vec<(String, f64)>> = HashMap::new();
    for line in text.lines() {
        let c: Vec<&str> = line.split_whitespace().collect();
        if !lists.contains_key(c[0]) {
            order.push(c[0].to_string());
        }
        lists.entry(c[0].to_string()).or_default().push((c[2].to_string(), c[4].parse().unwrap()));
    }
    order
        .into_iter()
        .map(|q| {
            let mut l = lists.remove(&q).unwrap();
            l.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then_with(|| b.0.cmp(&a.0)));
            (q, l)
        })
        .collect()
}

fn qrels(f: &Fixture) -> HashMap<(String, String), i32> {
    std::fs::read_to_string(f.path("qrels.txt"))
        .unwrap()
        .lines()
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            ((c[0].to_string(), c[2].to_string()), c[3].parse().unwrap())
        })
        .collect()
}

fn spec(f: &Fixture, layout: pb::OutputLayout, output: &str) -> pb::LabelingSpec {
    pb::LabelingSpec {
        source: Some(f.trec_source(true)),
        sampling: Some(pb::Sampling {
            depth: 10,
            negatives_per_query: 3,
            positives_from_qrels: true,
            seed: 7,
            ..Default::default()
        }),
        layout: layout as i32,
        teacher: Some(pb::TeacherSpec {
            teacher: Some(pb::teacher_spec::Teacher::FirstStage(pb::FirstStageTeacher {})),
        }),
        output_uri: output.to_string(),
        shards: Some(pb::ShardOptions { rows_per_shard: 16, bytes_per_shard: 0 }),
        name: String::new(),
        partition: None,
    }
}

async fn label(svc: &Service, spec: pb::LabelingSpec) -> pb::Job {
    let mut client = svc.client().await;
    let job = client.start_labeling(spec).await.expect("start labelling").into_inner();
    let job = wait_job(&mut client, &job.id, JOB_TIMEOUT).await;
    assert_succeeded(&job);
    job
}

async fn read_triples(uri: &str) -> (distill_shards::Manifest, Vec<TripleRow>) {
    let reader = DatasetReader::open_uri(uri).await.unwrap();
    let batches: Vec<_> = reader.batches(7).try_collect().await.unwrap();
    (reader.manifest().clone(), batches.iter().flat_map(|b| TripleRow::from_batch(b).unwrap()).collect())
}

async fn read_lists(uri: &str) -> (distill_shards::Manifest, Vec<ListRow>) {
    let reader = DatasetReader::open_uri(uri).await.unwrap();
    let batches: Vec<_> = reader.batches(7).try_collect().await.unwrap();
    (reader.manifest().clone(), batches.iter().flat_map(|b| ListRow::from_batch(b).unwrap()).collect())
}

fn check_lists(f: &Fixture, rows: &[ListRow]) {
    let run = expected_run(f);
    let qrels = qrels(f);
    assert_eq!(rows.len(), f.queries);
    for ((qid, list), row) in run.iter().zip(rows) {
        assert_eq!(&row.query_id, qid);
        assert_eq!(row.items.len(), 10, "depth 10");
        for (i, ((docid, score), item)) in list.iter().zip(&row.items).enumerate() {
            assert_eq!(&item.doc_id, docid);
            assert_eq!(item.teacher_score, *score, "scores match the input run");
            assert_eq!(item.teacher_rank, i as i32 + 1);
            assert_eq!(item.label, qrels.get(&(qid.clone(), docid.clone())).copied());
            assert!(item.text.starts_with(&format!("passage {}", spell(docid[1..].parse().unwrap()))));
        }
    }
}

fn check_triples(f: &Fixture, rows: &[TripleRow]) {
    let run: HashMap<(String, String), f64> = expected_run(f)
        .into_iter()
        .flat_map(|(q, l)| l.into_iter().take(10).map(move |(d, s)| ((q.clone(), d), s)))
        .collect();
    let qrels = qrels(f);
    let positives: HashSet<&str> = qrels.iter().filter(|(_, &r)| r >= 1).map(|((q, _), _)| q.as_str()).collect();
    assert_eq!(rows.len(), positives.len() * 3, "3 negatives per positive, one positive per judged query");
    for r in rows {
        let key = |d: &str| (r.query_id.clone(), d.to_string());
        assert_eq!(qrels.get(&key(&r.pos_id)), Some(&2));
        assert_eq!(r.pos_label, Some(2));
        assert_eq!(r.pos_score, run.get(&key(&r.pos_id)).copied(), "positive score is the run's (null if unretrieved)");
        assert_eq!(r.neg_score, Some(run[&key(&r.neg_id)]), "negative comes from the top 10 with its run score");
        assert_ne!(qrels.get(&key(&r.neg_id)).copied().unwrap_or(0).min(1), 1, "no relevant negative");
    }
    assert!(rows.iter().any(|r| r.pos_score.is_none()), "the fixture has unretrieved positives");
}

/// A JSON list of numbers (None: null).
fn floats(v: &serde_json::Value) -> Option<Vec<f64>> {
    v.as_array().map(|a| a.iter().map(|x| x.as_f64().unwrap()).collect())
}

fn py_triples(v: &serde_json::Value) -> Vec<TripleRow> {
    let s = |r: &serde_json::Value, k: &str| r[k].as_str().unwrap().to_string();
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| TripleRow {
            query_id: s(r, "query_id"),
            query: s(r, "query"),
            pos_id: s(r, "pos_id"),
            pos_text: s(r, "pos_text"),
            pos_score: r["pos_score"].as_f64(),
            pos_label: r["pos_label"].as_i64().map(|x| x as i32),
            neg_id: s(r, "neg_id"),
            neg_text: s(r, "neg_text"),
            neg_score: r["neg_score"].as_f64(),
            neg_label: r["neg_label"].as_i64().map(|x| x as i32),
            pos_member_scores: floats(&r["pos_member_scores"]),
            neg_member_scores: floats(&r["neg_member_scores"]),
        })
        .collect()
}

fn py_lists(v: &serde_json::Value) -> Vec<ListRow> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let arr = |k: &str| r[k].as_array().unwrap().clone();
            let (ids, texts, scores, ranks, labels) =
                (arr("doc_ids"), arr("doc_texts"), arr("teacher_scores"), arr("teacher_ranks"), arr("labels"));
            ListRow {
                query_id: r["query_id"].as_str().unwrap().into(),
                query: r["query"].as_str().unwrap().into(),
                items: (0..ids.len())
                    .map(|i| distill_shards::ListItem {
                        doc_id: ids[i].as_str().unwrap().into(),
                        text: texts[i].as_str().unwrap().into(),
                        teacher_score: scores[i].as_f64().unwrap(),
                        teacher_rank: ranks[i].as_i64().unwrap() as i32,
                        label: labels[i].as_i64().map(|x| x as i32),
                        member_scores: r["member_scores"].as_array().and_then(|m| floats(&m[i])),
                    })
                    .collect(),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn labels_both_layouts_into_a_directory_and_pyarrow_reads_them() {
    let f = Fixture::new(40, 25);
    let state = tempfile::tempdir().unwrap();
    let svc = Service::teacher(state.path(), &[], &[]);
    let out = tempfile::tempdir().unwrap();

    let triples_uri = out.path().join("triples").to_str().unwrap().to_string();
    let job = label(&svc, spec(&f, pb::OutputLayout::Triples, &triples_uri)).await;
    let (manifest, rows) = read_triples(&triples_uri).await;
    check_triples(&f, &rows);
    assert!(manifest.shards.len() > 1, "rolled into several shards");
    assert_eq!(job.progress.as_ref().unwrap().rows, rows.len() as u64);
    assert_eq!(job.progress.as_ref().unwrap().done, f.queries as u64);
    let py = read_with_pyarrow(&triples_uri, None);
    assert_eq!(py["layout"], "triples");
    assert_eq!(py_triples(&py), rows, "pyarrow reads the same rows");
    assert!(py["metadata"]["distill.teacher"].as_str().unwrap().contains("first_stage"));

    let lists_uri = format!("file://{}", out.path().join("lists").display());
    label(&svc, spec(&f, pb::OutputLayout::Lists, &lists_uri)).await;
    let (_, rows) = read_lists(&lists_uri).await;
    check_lists(&f, &rows);
    assert_eq!(py_lists(&read_with_pyarrow(&lists_uri, None)), rows);

    // The default output lives in the service's store; a second job on a committed output is refused.
    let mut client = svc.client().await;
    let err = client.start_labeling(spec(&f, pb::OutputLayout::Lists, &lists_uri)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let job = label(&svc, spec(&f, pb::OutputLayout::Lists, "")).await;
    assert!(job.output_uri.starts_with(&format!("file://{}/datasets/", state.path().display())), "{}", job.output_uri);
    let listed = client.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(listed.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn labels_into_a_real_s3_server() {
    let s3 = S3Server::start("distill");
    let f = Fixture::new(30, 20);
    // The service's own store is on S3 too.
    let store_uri = format!("s3://{}/state", s3.bucket);
    let bucket = format!("s3://{}", s3.bucket);
    let svc = Service::teacher(&store_uri, &["--allow-location", &bucket], &s3.env());
    for (k, v) in s3.env() {
        // The test process reads the same bucket with the project's reader.
        std::env::set_var(k, v);
    }
    let triples_uri = format!("s3://{}/datasets/triples", s3.bucket);
    label(&svc, spec(&f, pb::OutputLayout::Triples, &triples_uri)).await;
    let (manifest, rows) = read_triples(&triples_uri).await;
    check_triples(&f, &rows);
    assert!(manifest.shards.len() > 1);
    assert_eq!(py_triples(&read_with_pyarrow(&triples_uri, Some(&s3))), rows);

    let lists_uri = format!("s3://{}/datasets/lists", s3.bucket);
    label(&svc, spec(&f, pb::OutputLayout::Lists, &lists_uri)).await;
    let (_, rows) = read_lists(&lists_uri).await;
    check_lists(&f, &rows);
    assert_eq!(py_lists(&read_with_pyarrow(&lists_uri, Some(&s3))), rows);

    // Put-if-absent holds on S3 too: of two commits of the same object, one wins.
    let loc = distill_store::Location::parse(&format!("s3://{}/commit-test", s3.bucket)).unwrap();
    loc.put_if_absent("x.json", "1".into()).await.unwrap();
    let second = loc.put_if_absent("x.json", "2".into()).await;
    assert!(matches!(second, Err(distill_store::StoreError::AlreadyExists { .. })), "{second:?}");
    assert_eq!(loc.get("x.json").await.unwrap(), "1");

    // Job records live in the S3 store: a restarted service still lists them.
    drop(svc);
    let svc = Service::teacher(&store_uri, &["--allow-location", &bucket], &s3.env());
    let jobs = svc.client().await.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|j| j.state() == pb::JobState::Succeeded));
}
