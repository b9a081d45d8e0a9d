//! Trust boundaries (docs/security.md), attacked as an untrusted gRPC client would, against the
//! real service binaries on 127.0.0.1: a client gets only what the operator allowed. No server
//! secret reaches a URL of the client's choosing (a recording sink on loopback sees nothing), no
//! file outside the allowed locations is read, written or deleted (a victim file is checked byte
//! for byte), a non-loopback bind without a token does not serve, absurd numbers are refused
//! without harm to the process, a panicking job ends FAILED, and a crash loop ends.

use distill_e2e::*;
use distill_proto as pb;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "server-secret-5d1c0b7e-must-stay-home";

/// A TCP server on loopback that records every byte any client sends it (HTTP, gRPC, anything).
struct Sink {
    addr: String,
    seen: Arc<Mutex<Vec<u8>>>,
    connections: Arc<Mutex<usize>>,
}

impl Sink {
    fn start() -> Sink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (seen, connections) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(0)));
        let (s, c) = (seen.clone(), connections.clone());
        std::thread::spawn(move || {
            for mut stream in listener.incoming().map_while(Result::ok) {
                *c.lock().unwrap() += 1;
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        s.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Sink { addr, seen, connections }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn assert_untouched(&self) {
        let seen = String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned();
        assert!(!seen.contains(SECRET), "a server secret reached the client's URL");
        assert_eq!(*self.connections.lock().unwrap(), 0, "the service connected to the client's URL: {seen:?}");
    }
}

fn denied(r: Result<tonic::Response<pb::Job>, tonic::Status>, field: &str) {
    let err = r.expect_err("a request outside the operator's grants must be refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{field}: {err:?}");
    assert!(err.message().starts_with(field), "{field}: {}", err.message());
    assert!(!err.message().contains(SECRET));
}

fn invalid(r: Result<tonic::Response<pb::Job>, tonic::Status>, field: &str) {
    let err = r.expect_err("an absurd number must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
    assert!(err.message().contains(field), "{field}: {}", err.message());
}

fn first_stage() -> Option<pb::TeacherSpec> {
    Some(pb::TeacherSpec { teacher: Some(pb::teacher_spec::Teacher::FirstStage(pb::FirstStageTeacher {})) })
}

fn labeling(f: &Fixture, output: &str) -> pb::LabelingSpec {
    pb::LabelingSpec {
        source: Some(f.trec_source(true)),
        sampling: Some(pb::Sampling { depth: 4, ..Default::default() }),
        layout: pb::OutputLayout::Triples as i32,
        teacher: first_stage(),
        output_uri: output.into(),
        ..Default::default()
    }
}

fn llm_teacher(base_url: &str, key_env: &str) -> Option<pb::TeacherSpec> {
    Some(pb::TeacherSpec {
        teacher: Some(pb::teacher_spec::Teacher::Llm(pb::LlmReranker {
            endpoint: Some(pb::LlmEndpoint {
                base_url: base_url.into(),
                model: "any".into(),
                api_key: String::new(),
                api_key_env: key_env.into(),
            }),
            mode: pb::LlmMode::Listwise as i32,
            ..Default::default()
        })),
    })
}

fn secret_env() -> Vec<(&'static str, String)> {
    ["SECRET_PROBE", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "DISTILL_TEACHER_TOKEN"]
        .into_iter()
        .map(|k| (k, SECRET.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_server_secret_goes_to_a_url_the_client_chose() {
    let sink = Sink::start();
    let f = Fixture::new(4, 4);
    let dir = tempfile::tempdir().unwrap();
    let configured = ScriptedLlmUrl::new();
    let endpoint = format!("ok={}", configured.0);
    let teacher = Service::teacher(dir.path().join("t"), &["--llm-endpoint", &endpoint], &secret_env());
    let mut client = teacher.client().await;
    let out = dir.path().join("out").to_string_lossy().into_owned();
    for (url, key_env, field) in [
        (format!("{}/v1", sink.url()), "SECRET_PROBE", "teacher.llm.endpoint.base_url"),
        (format!("{}/v1", sink.url()), "", "teacher.llm.endpoint.base_url"),
        ("ok".to_string(), "SECRET_PROBE", "teacher.llm.endpoint.api_key_env"),
        ("ok".to_string(), "AWS_SECRET_ACCESS_KEY", "teacher.llm.endpoint.api_key_env"),
    ] {
        let spec = pb::LabelingSpec { teacher: llm_teacher(&url, key_env), ..labeling(&f, &out) };
        denied(client.start_labeling(spec).await, field);
    }

    // The trainer's token for its teacher goes only to a teacher the operator allowed.
    let trainer = Service::trainer(dir.path().join("s"), &[], &secret_env());
    let spec = pb::TrainingSpec {
        teacher_job: Some(pb::TeacherJobRef { address: sink.url(), job_id: "x".into() }),
        backbone: model_fixture("bert"),
        objective: "margin_mse".into(),
        hyperparameters: Some(pb::Hyperparameters { max_steps: 2, ..Default::default() }),
        ..Default::default()
    };
    denied(trainer.trainer_client().await.start_training(spec).await, "teacher_job.address");
    tokio::time::sleep(Duration::from_millis(300)).await;
    sink.assert_untouched();
}

/// The URL of an endpoint nobody serves (configured, never reached in these tests).
struct ScriptedLlmUrl(String);

impl ScriptedLlmUrl {
    fn new() -> Self {
        Self(format!("http://127.0.0.1:{}/v1", free_port()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn files_outside_the_allowed_locations_are_not_touched() {
    let root = tempfile::tempdir().unwrap();
    let allowed = root.path().join("allowed");
    let victim = root.path().join("victim");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&victim).unwrap();
    let victim_shard = victim.join("part-00000.parquet");
    std::fs::write(&victim_shard, b"not a shard: the victim's own file").unwrap();
    std::fs::write(victim.join("secret.tsv"), format!("Q0\t{SECRET}\n")).unwrap();
    std::os::unix::fs::symlink(&victim, allowed.join("link")).unwrap();
    let f = Fixture::new(4, 4);
    for name in ["run.trec", "queries.tsv", "collection.tsv", "qrels.txt"] {
        std::fs::copy(f.path(name), allowed.join(name)).unwrap();
    }
    let a = |name: &str| allowed.join(name).to_string_lossy().into_owned();
    let v = victim.to_string_lossy().into_owned();
    let source = |collection: &str| pb::CandidateSource {
        source: Some(pb::candidate_source::Source::Trec(pb::TrecCandidates {
            run: a("run.trec"),
            queries: a("queries.tsv"),
            collection: collection.into(),
            qrels: a("qrels.txt"),
        })),
    };
    let spec =
        |collection: &str, output: &str| pb::LabelingSpec { source: Some(source(collection)), ..labeling(&f, output) };
    let grant = allowed.to_string_lossy().into_owned();
    let store = root.path().join("store");
    let teacher = Service::exact("distill-teacher", &store, &["--allow-location", &grant], &[]);
    let mut client = teacher.client().await;

    denied(client.start_labeling(spec(&format!("{v}/secret.tsv"), &a("out"))).await, "source.trec.collection");
    denied(client.start_labeling(spec("/etc/passwd", &a("out"))).await, "source.trec.collection");
    denied(client.start_labeling(spec(&a("collection.tsv"), &v)).await, "output_uri");
    denied(client.start_labeling(spec(&a("collection.tsv"), &format!("{grant}/../victim"))).await, "output_uri");
    denied(client.start_labeling(spec(&a("collection.tsv"), &a("link/out"))).await, "output_uri");
    denied(client.start_labeling(spec(&a("collection.tsv"), &format!("file://{v}"))).await, "output_uri");
    denied(client.start_labeling(spec(&a("collection.tsv"), "s3://any-bucket/x")).await, "output_uri");
    denied(client.start_labeling(spec(&a("collection.tsv"), "memory://grow")).await, "output_uri");
    let hub = pb::LabelingSpec {
        teacher: Some(pb::TeacherSpec {
            teacher: Some(pb::teacher_spec::Teacher::CrossEncoders(pb::CrossEncoderEnsemble {
                models: vec!["hf://someone/something".into()],
                ..Default::default()
            })),
        }),
        ..spec(&a("collection.tsv"), &a("out"))
    };
    denied(client.start_labeling(hub).await, "teacher.cross_encoders.models[0]");
    assert_eq!(std::fs::read(&victim_shard).unwrap(), b"not a shard: the victim's own file");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 2, "nothing was written beside the victim");

    // What the operator allowed still works.
    let job = client.start_labeling(spec(&a("collection.tsv"), &a("out"))).await.unwrap().into_inner();
    assert_succeeded(&wait_job(&mut client, &job.id, Duration::from_secs(60)).await);

    let trainer = Service::exact("distill-trainer", root.path().join("s"), &["--allow-location", &grant], &[]);
    let mut trainer_client = trainer.trainer_client().await;
    let train = |dataset: &str, backbone: &str, output: &str| pb::TrainingSpec {
        datasets: vec![dataset.into()],
        backbone: backbone.into(),
        objective: "margin_mse".into(),
        output_uri: output.into(),
        ..Default::default()
    };
    let fixture_bert = model_fixture("bert");
    denied(trainer_client.start_training(train(&v, &fixture_bert, &a("s"))).await, "datasets[0]");
    denied(trainer_client.start_training(train(&a("out"), &fixture_bert, &a("s"))).await, "backbone");
    denied(trainer_client.start_training(train(&a("out"), "hf://org/model", &a("s"))).await, "backbone");
    denied(trainer_client.start_training(train(&a("out"), &a("m"), &v)).await, "output_uri");
    let eval = pb::EvaluationSpec {
        model: a("m"),
        run: a("run.trec"),
        queries: a("queries.tsv"),
        collection: format!("{v}/secret.tsv"),
        qrels: a("qrels.txt"),
        ..Default::default()
    };
    denied(trainer_client.start_evaluation(eval).await, "collection");
    assert_eq!(std::fs::read(&victim_shard).unwrap(), b"not a shard: the victim's own file");
}

#[test]
fn a_service_reachable_from_the_network_needs_a_token() {
    let refused = std::process::Command::new(bin("distill-teacher"))
        .args(["--addr", "0.0.0.0:0", "--store"])
        .arg(tempfile::tempdir().unwrap().path())
        .env_remove("DISTILL_AUTH_TOKEN")
        .env_remove("DISTILL_AUTH_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(!refused.status.success(), "served on 0.0.0.0 without a token");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("DISTILL_AUTH_TOKEN") && stderr.contains("--insecure"), "{stderr}");
    assert!(!String::from_utf8_lossy(&refused.stdout).contains("listening on"));

    // With a token, or with --insecure said out loud, it serves.
    let dir = tempfile::tempdir().unwrap();
    let with_token =
        Service::exact("distill-trainer", dir.path().join("a"), &[], &[("DISTILL_AUTH_TOKEN", "t".into())]);
    drop(with_token);
    let insecure = Service::exact("distill-trainer", dir.path().join("b"), &["--insecure"], &[]);
    drop(insecure);
}

#[tokio::test(flavor = "multi_thread")]
async fn absurd_numbers_are_refused_and_the_process_lives_on() {
    let f = Fixture::new(4, 4);
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = Service::trainer(dir.path().join("s"), &[], &[]);
    let pid = trainer.child.id();
    let mut client = trainer.trainer_client().await;
    let spec = |h: pb::Hyperparameters| pb::TrainingSpec {
        datasets: vec![f.path("none")],
        backbone: model_fixture("bert"),
        objective: "margin_mse".into(),
        hyperparameters: Some(h),
        ..Default::default()
    };
    let max = u32::MAX;
    invalid(
        client.start_training(spec(pb::Hyperparameters { shuffle_buffer: max, ..Default::default() })).await,
        "hyperparameters.shuffle_buffer: 4294967295",
    );
    invalid(
        client.start_training(spec(pb::Hyperparameters { group_size: max, ..Default::default() })).await,
        "hyperparameters.group_size",
    );
    invalid(
        client.start_training(spec(pb::Hyperparameters { learning_rate: f64::INFINITY, ..Default::default() })).await,
        "hyperparameters.learning_rate",
    );
    let eval = pb::EvaluationSpec {
        model: model_fixture("bert"),
        run: f.path("run.trec"),
        queries: f.path("queries.tsv"),
        collection: f.path("collection.tsv"),
        qrels: f.path("qrels.txt"),
        metrics: vec![" ".into()],
        ..Default::default()
    };
    invalid(client.start_evaluation(eval.clone()).await, "metrics");
    invalid(client.start_evaluation(pb::EvaluationSpec { top_k: max, metrics: vec![], ..eval }).await, "top_k");

    let teacher = Service::teacher(dir.path().join("t"), &[], &[]);
    let mut labels = teacher.client().await;
    let out = dir.path().join("out").to_string_lossy().into_owned();
    let deep =
        pb::LabelingSpec { sampling: Some(pb::Sampling { depth: max, ..Default::default() }), ..labeling(&f, &out) };
    invalid(labels.start_labeling(deep).await, "sampling.depth");
    let shards = pb::LabelingSpec {
        shards: Some(pb::ShardOptions { rows_per_shard: u64::MAX, bytes_per_shard: 0 }),
        ..labeling(&f, &out)
    };
    invalid(labels.start_labeling(shards).await, "shards.rows_per_shard");

    assert!(trainer.child.try_wait().unwrap().is_none(), "the trainer died");
    assert_eq!(trainer.child.id(), pid);
    assert!(client.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_job_ends_failed_and_its_watchers_are_told() {
    let f = Fixture::new(4, 4);
    let dir = tempfile::tempdir().unwrap();
    let env = [("DISTILL_FAILPOINTS", "job-start=panic".to_string())];
    let teacher = Service::teacher(dir.path().join("t"), &[], &env);
    let mut client = teacher.client().await;
    let out = dir.path().join("out").to_string_lossy().into_owned();
    let job = client.start_labeling(labeling(&f, &out)).await.unwrap().into_inner();
    let mut events = client.watch_job(pb::WatchJobRequest { id: job.id.clone() }).await.unwrap().into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        let mut last = None;
        while let Some(e) = events.message().await.unwrap() {
            if let Some(pb::job_event::Event::State(s)) = e.event {
                last = Some(s);
            }
        }
        last
    })
    .await
    .expect("the WatchJob stream ends")
    .expect("a state event");
    assert_eq!(ended.state(), pb::JobState::Failed);
    assert!(ended.error.contains("panicked") && ended.error.contains("failpoint job-start"), "{}", ended.error);
    let job = client.get_job(pb::GetJobRequest { id: job.id }).await.unwrap().into_inner();
    assert_eq!(job.state(), pb::JobState::Failed);
}

/// Waits for a service process to end by itself; its exit status.
fn exited(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: the failpoint did not abort the service");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_crashes_its_service_at_every_resume_is_not_resumed_forever() {
    let f = Fixture::new(4, 4);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("t");
    let abort = [("DISTILL_FAILPOINTS", "job-start=abort".to_string())];
    let out = dir.path().join("out").to_string_lossy().into_owned();
    let mut svc = Service::teacher(&store, &[], &abort);
    // The job's first attempt aborts the process, perhaps before the answer leaves it.
    let _ = svc.client().await.start_labeling(labeling(&f, &out)).await;
    assert!(!exited(&mut svc.child, "attempt 1").success());
    // Each restart resumes the job, which aborts the process again: attempts 2 and 3.
    for attempt in 2..=3 {
        let mut restarted = std::process::Command::new(bin("distill-teacher"))
            .args(["--addr", "127.0.0.1:0", "--store"])
            .arg(&store)
            .args(["--allow-location", &std::env::temp_dir().to_string_lossy()])
            .env("DISTILL_FAILPOINTS", "job-start=abort")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        assert!(!exited(&mut restarted, &format!("attempt {attempt}")).success());
    }
    let svc = Service::teacher(&store, &[], &[]);
    let jobs = svc.client().await.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state(), pb::JobState::Failed, "{:?}", jobs[0]);
    assert!(jobs[0].error.contains("not resumed"), "{}", jobs[0].error);
    assert_eq!(jobs[0].attempts_without_progress, 3);
    assert_eq!(jobs[0].resumes, 2);
}
