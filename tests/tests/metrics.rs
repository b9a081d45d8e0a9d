//! Prometheus metrics on their own port: gRPC requests and latency, the job table by state, and the
//! job-derived counters (rows and shards written, work done), scraped over real HTTP.

use distill_e2e::*;
use distill_proto as pb;
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` as a Prometheus scraper would; samples by their full name with labels.
async fn scrape(port: u16) -> HashMap<String, f64> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("metrics port");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let (head, text) = body.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_lowercase().contains("content-type: text/plain"), "{head}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn teacher_metrics_count_requests_jobs_and_rows() {
    let f = Fixture::new(10, 6);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let svc = Service::teacher(dir.path().join("store"), &["--metrics-addr", &format!("127.0.0.1:{port}")], &[]);
    let before = scrape(port).await;
    assert_eq!(before["distill_jobs{kind=\"labeling\",state=\"succeeded\"}"], 0.0);
    let mut client = svc.client().await;
    let spec = pb::LabelingSpec {
        source: Some(f.trec_source(true)),
        sampling: Some(pb::Sampling { positives_from_qrels: true, negatives_per_query: 2, ..Default::default() }),
        layout: pb::OutputLayout::Triples as i32,
        teacher: Some(pb::TeacherSpec {
            teacher: Some(pb::teacher_spec::Teacher::FirstStage(pb::FirstStageTeacher {})),
        }),
        shards: Some(pb::ShardOptions { rows_per_shard: 5, bytes_per_shard: 0 }),
        ..Default::default()
    };
    let id = client.start_labeling(spec).await.unwrap().into_inner().id;
    let job = wait_job(&mut client, &id, Duration::from_secs(60)).await;
    assert_succeeded(&job);
    let bad = client.get_job(pb::GetJobRequest { id: "no-such-job".into() }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::NotFound);
    let m = scrape(port).await;
    let p = job.progress.unwrap();
    assert_eq!(m["distill_jobs{kind=\"labeling\",state=\"succeeded\"}"], 1.0);
    assert_eq!(m["distill_job_rows_written_total"], p.rows as f64);
    assert_eq!(m["distill_job_shards_written_total"], p.shards as f64);
    assert!(p.shards >= 2);
    assert_eq!(m["distill_job_work_done_total{kind=\"labeling\",unit=\"queries\"}"], 10.0);
    assert_eq!(m["distill_grpc_requests_total{code=\"0\",method=\"distill.v1.TeacherService/StartLabeling\"}"], 1.0);
    // NotFound is gRPC code 5.
    assert_eq!(m["distill_grpc_requests_total{code=\"5\",method=\"distill.v1.TeacherService/GetJob\"}"], 1.0);
    let polls = m["distill_grpc_requests_total{code=\"0\",method=\"distill.v1.TeacherService/GetJob\"}"];
    assert!(polls >= 1.0);
    assert_eq!(
        m["distill_grpc_request_duration_seconds_count{method=\"distill.v1.TeacherService/GetJob\"}"],
        polls + 1.0
    );
    assert_eq!(
        m["distill_grpc_request_duration_seconds_bucket{method=\"distill.v1.TeacherService/GetJob\",le=\"+Inf\"}"],
        polls + 1.0
    );
    // The job-derived metrics come from the persisted table: a restarted service reports the same.
    drop(svc);
    let port2 = free_port();
    let _svc = Service::teacher(dir.path().join("store"), &["--metrics-addr", &format!("127.0.0.1:{port2}")], &[]);
    let again = scrape(port2).await;
    assert_eq!(again["distill_job_rows_written_total"], p.rows as f64);
    assert_eq!(again["distill_jobs{kind=\"labeling\",state=\"succeeded\"}"], 1.0);
}
