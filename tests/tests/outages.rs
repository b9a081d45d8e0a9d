//! Object-store outages: the S3 server (s3s-fs) is stopped in the middle of a labelling job, a
//! training job and an evaluation job and restarted on the same port and directory
//! `DISTILL_OUTAGE_SECONDS` later (default 60). The jobs wait (every S3 call retries with backoff
//! for up to 5 minutes) and end with the rows, weights and results of undisturbed runs.

use distill_e2e::*;
use distill_proto as pb;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(600);

fn outage() -> Duration {
    let seconds = std::env::var("DISTILL_OUTAGE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    Duration::from_secs(seconds)
}

/// Waits until `done(job)` holds for the job's progress.
async fn wait_until(client: &mut impl JobClient, id: &str, what: &str, done: impl Fn(&pb::Progress) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let job = client.job(id).await;
        assert!(!job.state().is_terminal(), "the job ended before {what}: make it longer");
        if done(&job.progress.unwrap_or_default()) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A dataset's rows as pyarrow reads them (its S3 settings passed to it, not set in this
/// process, whose tests run side by side with servers of their own).
fn rows(uri: &str, s3: &S3Server) -> serde_json::Value {
    read_with_pyarrow(uri, Some(s3))["rows"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_labelling_job_waits_out_an_s3_outage() {
    let mut s3 = S3Server::start("distill");
    let f = Fixture::new(400, 25);
    let bucket = format!("s3://{}", s3.bucket);
    let svc = Service::teacher(format!("{bucket}/teacher"), &["--allow-location", &bucket], &s3.env());
    let mut client = svc.client().await;
    let uri = format!("{bucket}/datasets/through-outage");
    let id = client.start_labeling(tiny_shards_spec(&f, &uri, 3, "outage")).await.unwrap().into_inner().id;
    wait_until(&mut client, &id, "5 shards were committed", |p| p.shards >= 5).await;
    s3.stop();
    tokio::time::sleep(outage()).await;
    let during = client.job(&id).await;
    assert!(!during.state().is_terminal(), "the job ended during the outage: {}", during.error);
    s3.restart();
    let job = wait_job(&mut client, &id, TIMEOUT).await;
    assert_succeeded(&job);
    assert_eq!(job.resumes, 0, "the same attempt went on");

    let full = format!("{bucket}/datasets/undisturbed");
    let full_id = client.start_labeling(tiny_shards_spec(&f, &full, 3, "outage")).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut client, &full_id, TIMEOUT).await);
    let (through, undisturbed) = (rows(&uri, &s3), rows(&full, &s3));
    assert!(undisturbed.as_array().is_some_and(|r| !r.is_empty()), "{undisturbed}");
    assert_eq!(through, undisturbed, "no row lost or written twice");
}

/// `--store-retry-timeout` bounds the wait: an outage longer than it fails the job loudly (naming
/// the store). The FAILED record, not writable during the outage, is written once the store is
/// back (a restarted service finds the job FAILED, not RUNNING), and ResumeJob finishes the job
/// with the undisturbed rows.
#[tokio::test(flavor = "multi_thread")]
async fn an_outage_longer_than_the_retry_timeout_fails_the_job_and_resume_finishes_it() {
    let mut s3 = S3Server::start("distill");
    let f = Fixture::new(400, 25);
    let bucket = format!("s3://{}", s3.bucket);
    let args = ["--allow-location", &bucket, "--store-retry-timeout", "2", "--single-replica"];
    let svc = Service::teacher(format!("{bucket}/teacher"), &args, &s3.env());
    let mut client = svc.client().await;
    let uri = format!("{bucket}/datasets/failed-by-outage");
    let id = client.start_labeling(tiny_shards_spec(&f, &uri, 3, "outage")).await.unwrap().into_inner().id;
    wait_until(&mut client, &id, "5 shards were committed", |p| p.shards >= 5).await;
    s3.stop();
    let stopped = Instant::now();
    let failed = loop {
        let job = client.job(&id).await;
        if job.state().is_terminal() {
            break job;
        }
        assert!(stopped.elapsed() < Duration::from_secs(60), "still {:?} after 60 s of outage", job.state());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("failed {:.1?} into the outage: {}", stopped.elapsed(), failed.error);
    assert_eq!(failed.state(), pb::JobState::Failed);
    assert!(failed.error.contains(&bucket), "the error names the store: {}", failed.error);
    // Past the retry timeout of the record's own write, then the store comes back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    s3.restart();
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(svc);
    let svc = Service::teacher(format!("{bucket}/teacher"), &args, &s3.env());
    let mut client = svc.client().await;
    let stored = client.job(&id).await;
    assert_eq!((stored.state(), stored.resumes), (pb::JobState::Failed, 0), "{}", stored.error);
    client.resume_job(pb::ResumeJobRequest { id: id.clone() }).await.unwrap();
    let job = wait_job(&mut client, &id, TIMEOUT).await;
    assert_succeeded(&job);
    assert_eq!(job.resumes, 1);

    let full = format!("{bucket}/datasets/undisturbed");
    let full_id = client.start_labeling(tiny_shards_spec(&f, &full, 3, "outage")).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut client, &full_id, TIMEOUT).await);
    assert_eq!(rows(&uri, &s3), rows(&full, &s3), "no row lost or written twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_training_job_waits_out_an_s3_outage() {
    let mut s3 = S3Server::start("distill");
    let f = Fixture::new(60, 10);
    let bucket = format!("s3://{}", s3.bucket);
    let allow = ["--allow-location", bucket.as_str()];
    let teacher = Service::teacher(format!("{bucket}/teacher"), &allow, &s3.env());
    let dataset = format!("{bucket}/datasets/train");
    let mut tc = teacher.client().await;
    let id = tc.start_labeling(tiny_shards_spec(&f, &dataset, 3, "train")).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut tc, &id, TIMEOUT).await);

    let trainer = Service::trainer(format!("{bucket}/trainer"), &allow, &s3.env());
    let mut client = trainer.trainer_client().await;
    let straight = client
        .start_training(bce_training_spec(&dataset, &format!("{bucket}/straight"), 80))
        .await
        .unwrap()
        .into_inner();
    assert_succeeded(&wait_job(&mut client, &straight.id, TIMEOUT).await);

    let job = client
        .start_training(bce_training_spec(&dataset, &format!("{bucket}/through"), 80))
        .await
        .unwrap()
        .into_inner();
    wait_until(&mut client, &job.id, "step 15", |p| p.done >= 15).await;
    s3.stop();
    tokio::time::sleep(outage()).await;
    s3.restart();
    let j = wait_job(&mut client, &job.id, TIMEOUT).await;
    assert_succeeded(&j);
    let final_weights = |run: &str| s3.file_of(&format!("{run}/final/model.safetensors"));
    assert_same_weights(final_weights("straight"), final_weights("through"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_evaluation_job_waits_out_an_s3_outage() {
    let mut s3 = S3Server::start("distill");
    let f = Fixture::new(3000, 25);
    let bucket = format!("s3://{}", s3.bucket);
    let trainer = Service::trainer(format!("{bucket}/trainer"), &["--allow-location", &bucket], &s3.env());
    let mut client = trainer.trainer_client().await;
    let spec = |output: &str| pb::EvaluationSpec {
        model: model_fixture("bert"),
        run: f.path("run.trec"),
        queries: f.path("queries.tsv"),
        collection: f.path("collection.tsv"),
        qrels: f.path("qrels.txt"),
        top_k: 10,
        metrics: vec!["ndcg@10".into(), "mrr@10".into()],
        max_length: 48,
        output_uri: output.to_string(),
        ..Default::default()
    };
    let job = client.start_evaluation(spec(&format!("{bucket}/through"))).await.unwrap().into_inner();
    wait_until(&mut client, &job.id, "5 queries were re-ranked", |p| p.done >= 5).await;
    s3.stop();
    tokio::time::sleep(outage()).await;
    s3.restart();
    assert_succeeded(&wait_job(&mut client, &job.id, TIMEOUT).await);
    let undisturbed = client.start_evaluation(spec(&format!("{bucket}/undisturbed"))).await.unwrap().into_inner();
    assert_succeeded(&wait_job(&mut client, &undisturbed.id, TIMEOUT).await);
    for file in ["run.trec", "metrics.json"] {
        let (a, b) = (s3.file_of(&format!("through/{file}")), s3.file_of(&format!("undisturbed/{file}")));
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{file} differs after the outage");
    }
}
