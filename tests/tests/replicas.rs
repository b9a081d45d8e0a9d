//! Two replicas of a service on one store: each job runs on exactly one (the holder of its lease),
//! both answer for every job, a job whose replica dies is taken over and ends with the rows of an
//! undisturbed run, and a cancel sent to either replica reaches the job.

use distill_e2e::*;
use distill_proto as pb;
use distill_shards::{DatasetReader, TripleRow};
use futures::TryStreamExt;
use std::time::{Duration, Instant};

fn spec(f: &Fixture, output: &str) -> pb::LabelingSpec {
    tiny_shards_spec(f, output, 5, "replica-test")
}

fn replica(store: &std::path::Path, id: &str) -> Service {
    Service::teacher(store, &["--replica-id", id, "--lease-ttl", "3"], &[])
}

async fn rows(uri: &str) -> Vec<TripleRow> {
    let reader = DatasetReader::open_uri(uri).await.unwrap();
    let batches: Vec<_> = reader.batches(64).try_collect().await.unwrap();
    batches.iter().flat_map(|b| TripleRow::from_batch(b).unwrap()).collect()
}

async fn get(
    client: &mut pb::teacher_service_client::TeacherServiceClient<tonic::transport::Channel>,
    id: &str,
) -> pb::Job {
    client.get_job(pb::GetJobRequest { id: id.into() }).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_on_one_replica_and_moves_when_it_dies() {
    let f = Fixture::new(3000, 25);
    let store = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let uri = out.path().join("moved").to_str().unwrap().to_string();
    let (a, b) = (replica(store.path(), "a"), replica(store.path(), "b"));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let id = ca.start_labeling(spec(&f, &uri)).await.unwrap().into_inner().id;

    // Both answer for the job; only a runs it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = get(&mut cb, &id).await;
        assert!(!seen.state().is_terminal(), "the job ended before a was killed: make the fixture bigger");
        if seen.progress.unwrap_or_default().shards >= 10 {
            break;
        }
        assert!(Instant::now() < deadline, "b never saw progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = cb.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert!(listed.iter().any(|j| j.id == id), "b lists a's job");
    assert!(!b.log.lock().unwrap().contains("taking over"), "b took a job a still runs");

    a.kill();
    let job = wait_job(&mut cb, &id, Duration::from_secs(300)).await;
    assert_succeeded(&job);
    assert_eq!(job.resumes, 1, "taken over once");
    assert!(b.log.lock().unwrap().contains("taking over"));

    // The same spec, undisturbed, on b alone.
    let full = out.path().join("full").to_str().unwrap().to_string();
    let full_id = cb.start_labeling(spec(&f, &full)).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut cb, &full_id, Duration::from_secs(300)).await);
    // Shards of the second attempt carry its number: the first attempt cannot overwrite them.
    let manifest = DatasetReader::open_uri(&uri).await.unwrap().manifest().clone();
    let names: Vec<&str> = manifest.shards.iter().map(|s| s.path.as_str()).collect();
    assert!(names.first().is_some_and(|n| n.ends_with(&format!("{id}.parquet"))), "{names:?}");
    assert!(names.last().is_some_and(|n| n.ends_with(&format!("{id}-a1.parquet"))), "{names:?}");
    let (moved, undisturbed) = (rows(&uri).await, rows(&full).await);
    assert!(!undisturbed.is_empty());
    assert_eq!(moved, undisturbed, "no row lost or written twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_sent_to_the_other_replica_reaches_the_job() {
    let f = Fixture::new(3000, 25);
    let store = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let uri = out.path().join("cancelled").to_str().unwrap().to_string();
    let (a, b) = (replica(store.path(), "a"), replica(store.path(), "b"));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let id = ca.start_labeling(spec(&f, &uri)).await.unwrap().into_inner().id;
    // b's watch follows a's job through the store.
    let mut events = cb.watch_job(pb::WatchJobRequest { id: id.clone() }).await.unwrap().into_inner();
    cb.cancel_job(pb::CancelJobRequest { id: id.clone() }).await.unwrap();
    let job = wait_job(&mut ca, &id, Duration::from_secs(60)).await;
    assert_eq!(job.state(), pb::JobState::Cancelled, "{}", job.error);
    let mut last = None;
    let follow = async {
        while let Some(e) = events.message().await.unwrap() {
            last = e.event;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), follow).await.expect("b's watch ends with the job");
    assert!(matches!(last, Some(pb::job_event::Event::State(s)) if s.state() == pb::JobState::Cancelled));
    assert!(DatasetReader::open_uri(&uri).await.is_err(), "a cancelled dataset is not committed");
}
