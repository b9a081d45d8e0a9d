//! Object-store outages: the S3 server (s3s-fs) is stopped in the middle of a labelling job, a
//! training job and an evaluation job and restarted on the same port and directory
//! `DISTILL_OUTAGE_SECONDS` later (default 60). The jobs wait (every S3 call retries with backoff
//! for up to 5 minutes) and end with the rows, weights and results of undisturbed runs.

use distill_e2e::*;
use distill_proto as pb;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// A TCP proxy in front of the S3 server that, once told to, holds PUTs of progress records: it
/// neither passes them on nor answers, so that the client's request times out (object_store's
/// default request timeout, 30 s).
struct CuttingProxy {
    endpoint: String,
    /// PUTs still to cut off.
    to_cut: Arc<AtomicUsize>,
}

impl CuttingProxy {
    async fn start(upstream: &str) -> CuttingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let to_cut = Arc::new(AtomicUsize::new(0));
        let (cuts, upstream) = (to_cut.clone(), upstream.trim_start_matches("http://").to_string());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(Self::pipe(client, upstream.clone(), cuts.clone()));
            }
        });
        CuttingProxy { endpoint, to_cut }
    }

    async fn pipe(mut client: tokio::net::TcpStream, upstream: String, cuts: Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
        let (mut from_client, mut from_server) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
        loop {
            tokio::select! {
                read = client.read(&mut from_client) => {
                    let Ok(n @ 1..) = read else { return };
                    let take = || cuts.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1)).is_ok();
                    if is_progress_put(&from_client[..n]) && take() {
                        // Never passed on nor answered: the client's request times out.
                        while let Ok(1..) = client.read(&mut from_client).await {}
                        return;
                    }
                    if server.write_all(&from_client[..n]).await.is_err() {
                        return;
                    }
                }
                read = server.read(&mut from_server) => {
                    let Ok(n @ 1..) = read else { return };
                    if client.write_all(&from_server[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Whether `request` starts a PUT of a shard's progress record (`_progress/…json`, put-if-absent).
fn is_progress_put(request: &[u8]) -> bool {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    line.starts_with("PUT ")
        && line.split(' ').nth(1).is_some_and(|p| p.contains("/_progress/") && p.ends_with(".json"))
}

/// A write cut off in transit (here: no answer within the request timeout) is sent again:
/// object_store leaves such a PUT to its caller (to it a PUT is not idempotent: the first may have
/// been written); distill's writes may be repeated (a put-if-absent finds its own bytes). Without
/// that, the shard's commit fails the job. The job goes on in the same attempt with the undisturbed rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_labelling_job_sends_writes_cut_off_in_transit_again() {
    let s3 = S3Server::start("distill");
    let proxy = CuttingProxy::start(&s3.endpoint).await;
    let f = Fixture::new(400, 25);
    let bucket = format!("s3://{}", s3.bucket);
    let env: Vec<(&str, String)> = s3
        .env()
        .into_iter()
        .map(|(k, v)| if k == "AWS_ENDPOINT_URL" { (k, proxy.endpoint.clone()) } else { (k, v) })
        .collect();
    let svc = Service::teacher(format!("{bucket}/teacher"), &["--allow-location", &bucket], &env);
    let mut client = svc.client().await;
    let uri = format!("{bucket}/datasets/cut-off");
    let id = client.start_labeling(tiny_shards_spec(&f, &uri, 3, "cut")).await.unwrap().into_inner().id;
    wait_until(&mut client, &id, "2 shards were committed", |p| p.shards >= 2).await;
    proxy.to_cut.store(1, Ordering::SeqCst);
    let job = wait_job(&mut client, &id, TIMEOUT).await;
    assert_succeeded(&job);
    assert_eq!(job.resumes, 0, "the same attempt went on");
    assert_eq!(proxy.to_cut.load(Ordering::SeqCst), 0, "the cut happened: make the job longer");

    let full = format!("{bucket}/datasets/undisturbed");
    let full_id = client.start_labeling(tiny_shards_spec(&f, &full, 3, "cut")).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut client, &full_id, TIMEOUT).await);
    assert_eq!(rows(&uri, &s3), rows(&full, &s3), "no row lost or written twice");
}
