//! Scale-out labelling: one labelling job split in three parts (`LabelingSpec.partition`), each
//! run by its own teacher process on one S3 store (s3s-fs) against an LLM endpoint (a scripted
//! OpenAI-compatible server with a fixed latency per answer). One worker is killed mid-part and
//! restarted; the whole dataset is committed once, by the part that completes the set, with the
//! rows of an unpartitioned run, and a trainer trains from it. Wall times of 1 and 3 workers are
//! printed (the LLM's latency, not the 2 cores, bounds a worker here).

use distill_e2e::llm_server::ScriptedLlm;
use distill_e2e::*;
use distill_proto as pb;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(300);
const PARTS: u32 = 3;

fn llm_teacher(base_url: &str) -> pb::TeacherSpec {
    let llm = pb::LlmReranker {
        endpoint: Some(pb::LlmEndpoint {
            base_url: base_url.into(),
            model: "scripted-ranker".into(),
            api_key: String::new(),
            api_key_env: String::new(),
        }),
        mode: pb::LlmMode::Listwise as i32,
        concurrency: 1,
        max_retries: 2,
        initial_backoff_ms: 10,
        max_backoff_ms: 50,
        ..Default::default()
    };
    pb::TeacherSpec { teacher: Some(pb::teacher_spec::Teacher::Llm(llm)) }
}

/// Rows as pyarrow reads them, sorted (parts list their queries part by part).
fn sorted_rows(uri: &str, s3: &S3Server) -> Vec<String> {
    let dump = read_with_pyarrow(uri, Some(s3));
    let mut rows: Vec<String> = dump["rows"].as_array().unwrap().iter().map(|r| r.to_string()).collect();
    rows.sort();
    rows
}

/// A teacher worker on the shared store, under a fixed replica id.
fn worker(i: usize, bucket: &str, llm: &ScriptedLlm, s3: &S3Server) -> Service {
    let id = format!("worker-{i}");
    let endpoint = format!("scripted={}", llm.base_url);
    let args = ["--replica-id", &id, "--lease-ttl", "3", "--allow-location", bucket, "--llm-endpoint", &endpoint];
    Service::teacher(format!("{bucket}/teacher"), &args, &s3.env())
}

/// `distill label` of part `part` (detached) as the gRPC specs of this test have it, but without the
/// LLM answer cache (the earlier runs filled it).
fn cli_label_args(f: &Fixture, llm: &str, output: &str, part: usize) -> Vec<String> {
    let mut args = vec!["label".to_string()];
    args.extend(f.cli_source_args(true));
    let flags = "--positives-from-qrels --depth 20 --negatives 3 --seed 5 --teacher-kind llm --llm-model \
                 scripted-ranker --llm-concurrency 1 --llm-max-retries 2 --llm-max-fallback-ratio 0 --llm-no-cache \
                 --rows-per-shard 40 --detach";
    args.extend(flags.split_whitespace().map(String::from));
    args.extend(["--llm-url", llm, "--output", output].map(String::from));
    args.extend(["--partition".to_string(), format!("{part}/{PARTS}")]);
    args
}

async fn start(worker: &Service, spec: pb::LabelingSpec) -> String {
    worker.client().await.start_labeling(spec).await.unwrap().into_inner().id
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_split_in_three_parts_commits_the_rows_of_one_run() {
    let s3 = S3Server::start("distill");
    let bucket = format!("s3://{}", s3.bucket);
    let mut llm = ScriptedLlm::start(Duration::from_millis(25), Duration::ZERO).await;
    let f = Fixture::new(240, 20);
    let spec = |output: &str, part: Option<u32>| pb::LabelingSpec {
        teacher: Some(llm_teacher(&llm.base_url)),
        shards: Some(pb::ShardOptions { rows_per_shard: 40, bytes_per_shard: 0 }),
        partition: part.map(|index| pb::Partition { index, count: PARTS }),
        ..tiny_shards_spec(&f, output, 5, "parts")
    };
    let mut workers: Vec<Service> = (0..PARTS as usize).map(|i| worker(i, &bucket, &llm, &s3)).collect();

    // A part outside the count is refused, naming the field.
    let bad = spec(&format!("{bucket}/datasets/bad"), Some(PARTS));
    let e = workers[0].client().await.start_labeling(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("partition.index"), "{e}");

    // One worker, the whole job.
    let one = format!("{bucket}/datasets/one-worker");
    let started = Instant::now();
    let id = start(&workers[0], spec(&one, None)).await;
    assert_succeeded(&wait_job(&mut workers[0].client().await, &id, TIMEOUT).await);
    let one_worker = started.elapsed();

    // Three workers, a part each.
    let three = format!("{bucket}/datasets/three-workers");
    let started = Instant::now();
    let mut ids = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        ids.push(start(w, spec(&three, Some(i as u32))).await);
    }
    for (w, id) in workers.iter().zip(&ids) {
        assert_succeeded(&wait_job(&mut w.client().await, id, TIMEOUT).await);
    }
    let three_workers = started.elapsed();
    eprintln!("labelling 240 queries, LLM 25 ms per window: 1 worker {one_worker:.1?}, 3 workers {three_workers:.1?}");
    let whole = sorted_rows(&one, &s3);
    assert!(!whole.is_empty());
    assert_eq!(sorted_rows(&three, &s3), whole, "the parts' rows differ from one run's");

    // Three workers again, each part started with `distill label --partition I/3` while the LLM
    // endpoint is down: each fails (no window may fall back). The same commands, run again once it
    // is back (as Kubernetes retries a pod), resume the failed jobs; a third run follows them.
    let killed = format!("{bucket}/datasets/one-killed");
    let llm_url = llm.base_url.clone();
    let cli = |i: usize, workers: &[Service]| {
        let o = std::process::Command::new(bin("distill"))
            .args(["--teacher", &workers[i].url()])
            .args(cli_label_args(&f, &llm_url, &killed, i))
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{stderr}");
        (stdout.trim().to_string(), stderr.into_owned())
    };
    llm.stop().await;
    let ids: Vec<String> = (0..PARTS as usize).map(|i| cli(i, &workers).0).collect();
    for (w, id) in workers.iter().zip(&ids) {
        let job = wait_job(&mut w.client().await, id, TIMEOUT).await;
        assert!(job.state() == pb::JobState::Failed && job.error.contains("max_fallback_ratio"), "{job:?}");
    }
    llm.restart().await;
    for (i, id) in ids.iter().enumerate() {
        let (stdout, stderr) = cli(i, &workers);
        assert!(&stdout == id && stderr.contains("resuming it"), "{stdout} {stderr}");
    }
    let (stdout, stderr) = cli(1, &workers);
    assert!(stdout == ids[1] && stderr.contains("following it"), "{stdout} {stderr}");
    // The second worker killed mid-part and restarted under its replica id.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let job = workers[1].client().await.job(&ids[1]).await;
        assert!(!job.state().is_terminal(), "part 1 ended before it could be killed: make it longer");
        if job.progress.is_some_and(|p| p.shards >= 1) {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    workers.remove(1).kill();
    workers.insert(1, worker(1, &bucket, &llm, &s3));
    let mut jobs = Vec::new();
    for (w, id) in workers.iter().zip(&ids) {
        let job = wait_job(&mut w.client().await, id, TIMEOUT).await;
        assert_succeeded(&job);
        jobs.push(job);
    }
    assert_eq!(jobs[1].resumes, 2, "the failed part was resumed, and again after the kill");
    assert_eq!(sorted_rows(&killed, &s3), whole, "rows lost or written twice");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s3.file_of("datasets/one-killed/_manifest.json")).unwrap()).unwrap();
    let parts = manifest["extra"]["parts"].as_array().unwrap();
    assert_eq!(parts.len(), PARTS as usize);
    for (i, part) in parts.iter().enumerate() {
        assert_eq!(part["job_id"], ids[i].as_str(), "part {i}");
    }
    let first_shards: Vec<&str> =
        manifest["shards"].as_array().unwrap().iter().map(|s| s["path"].as_str().unwrap()).collect();
    assert!(first_shards[0].starts_with("_parts/00000-of-00003/"), "{first_shards:?}");

    // The whole trains.
    let trainer = Service::trainer(format!("{bucket}/trainer"), &["--allow-location", &bucket], &s3.env());
    let mut client = trainer.trainer_client().await;
    let id = client.start_training(bce_training_spec(&killed, &format!("{bucket}/students/parts"), 20)).await;
    let job = wait_job(&mut client, &id.unwrap().into_inner().id, TIMEOUT).await;
    assert_succeeded(&job);
}
