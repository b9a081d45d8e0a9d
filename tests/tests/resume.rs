//! Jobs survive the service: SIGKILL mid-job, restart, and the resumed job writes exactly the rows
//! of an uninterrupted run. Also cancellation.

use distill_e2e::*;
use distill_proto as pb;
use distill_shards::{DatasetReader, TripleRow};
use futures::TryStreamExt;
use std::time::{Duration, Instant};

fn spec(f: &Fixture, output: &str) -> pb::LabelingSpec {
    tiny_shards_spec(f, output, 11, "resume-test")
}

async fn rows(uri: &str) -> (distill_shards::Manifest, Vec<TripleRow>) {
    let reader = DatasetReader::open_uri(uri).await.unwrap();
    let batches: Vec<_> = reader.batches(64).try_collect().await.unwrap();
    (reader.manifest().clone(), batches.iter().flat_map(|b| TripleRow::from_batch(b).unwrap()).collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_service_resumes_the_job_with_the_same_rows() {
    let f = Fixture::new(3000, 25);
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let resumed_uri = out.path().join("resumed").to_str().unwrap().to_string();

    let svc = Service::teacher(state.path(), &[], &[]);
    let mut client = svc.client().await;
    let id = client.start_labeling(spec(&f, &resumed_uri)).await.unwrap().into_inner().id;
    // Wait for some committed shards, then SIGKILL in the middle of the job.
    let deadline = Instant::now() + Duration::from_secs(60);
    let at_kill = loop {
        let job = client.get_job(pb::GetJobRequest { id: id.clone() }).await.unwrap().into_inner();
        assert!(!job.state().is_terminal(), "the job ended before it could be killed: make the fixture bigger");
        let p = job.progress.unwrap_or_default();
        if p.shards >= 20 {
            break p;
        }
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    svc.kill();
    assert!(at_kill.done < f.queries as u64);
    assert!(DatasetReader::open_uri(&resumed_uri).await.is_err(), "no manifest yet");

    let svc = Service::teacher(state.path(), &[], &[]);
    let mut client = svc.client().await;
    let job = wait_job(&mut client, &id, Duration::from_secs(300)).await;
    assert_succeeded(&job);
    assert_eq!(job.resumes, 1);

    // The same spec, uninterrupted, on the restarted service.
    let full_uri = out.path().join("full").to_str().unwrap().to_string();
    let full_id = client.start_labeling(spec(&f, &full_uri)).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut client, &full_id, Duration::from_secs(300)).await);

    let (m_res, r_res) = rows(&resumed_uri).await;
    let (m_full, r_full) = rows(&full_uri).await;
    assert!(!r_full.is_empty());
    assert_eq!(r_res.len(), r_full.len(), "no duplicates, nothing lost");
    assert_eq!(r_res, r_full);
    let shard_sums =
        |m: &distill_shards::Manifest| m.shards.iter().map(|s| (s.rows, s.sha256.clone())).collect::<Vec<_>>();
    assert_eq!(shard_sums(&m_res), shard_sums(&m_full), "identical shards, byte for byte");
    assert_eq!(m_res.extra["counters"], m_full.extra["counters"], "counters survive the restart");
    // Nothing left over from the crash.
    let leftovers: Vec<_> = std::fs::read_dir(&resumed_uri)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet") && !m_res.shards.iter().any(|s| &s.path == n))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_job_stops_without_committing() {
    let f = Fixture::new(3000, 25);
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let uri = out.path().join("cancelled").to_str().unwrap().to_string();
    let svc = Service::teacher(state.path(), &[], &[]);
    let mut client = svc.client().await;
    let id = client.start_labeling(spec(&f, &uri)).await.unwrap().into_inner().id;
    // Follow the job's events until it has made progress, then cancel it.
    let mut events = client.watch_job(pb::WatchJobRequest { id: id.clone() }).await.unwrap().into_inner();
    loop {
        let e = events.message().await.unwrap().expect("stream stays open while the job runs");
        if let Some(pb::job_event::Event::Progress(p)) = e.event {
            if p.done > 0 {
                break;
            }
        }
    }
    client.cancel_job(pb::CancelJobRequest { id: id.clone() }).await.unwrap();
    let mut last = None;
    while let Some(e) = events.message().await.unwrap() {
        last = Some(e);
    }
    match last.and_then(|e| e.event) {
        Some(pb::job_event::Event::State(s)) => assert_eq!(s.state(), pb::JobState::Cancelled),
        other => panic!("the stream should end with the CANCELLED state, got {other:?}"),
    }
    let job = wait_job(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(job.state(), pb::JobState::Cancelled);
    assert!(job.progress.unwrap().done < f.queries as u64);
    assert!(DatasetReader::open_uri(&uri).await.is_err(), "a cancelled dataset is not committed");
    let err = client.get_job(pb::GetJobRequest { id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_job_resumed_ends_with_the_rows_of_an_undisturbed_run() {
    let f = Fixture::new(3000, 25);
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let uri = out.path().join("resumed").to_str().unwrap().to_string();
    let svc = Service::teacher(state.path(), &[], &[]);
    let mut client = svc.client().await;
    let id = client.start_labeling(spec(&f, &uri)).await.unwrap().into_inner().id;
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.job(&id).await.progress.unwrap_or_default().shards < 10 {
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client.cancel_job(pb::CancelJobRequest { id: id.clone() }).await.unwrap();
    let cancelled = wait_job(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(cancelled.state(), pb::JobState::Cancelled);
    let done_before = cancelled.progress.unwrap().done;

    let resumed = client.resume_job(pb::ResumeJobRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(resumed.resumes, 1);
    let job = wait_job(&mut client, &id, Duration::from_secs(300)).await;
    assert_succeeded(&job);
    assert!(done_before > 0 && done_before < f.queries as u64);
    let again = client.resume_job(pb::ResumeJobRequest { id: id.clone() }).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");

    let full = out.path().join("full").to_str().unwrap().to_string();
    let full_id = client.start_labeling(spec(&f, &full)).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut client, &full_id, Duration::from_secs(300)).await);
    let ((_, resumed_rows), (_, full_rows)) = (rows(&uri).await, rows(&full).await);
    assert_eq!(resumed_rows, full_rows, "no row lost or written twice");
}
