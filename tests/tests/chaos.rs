//! Chaos, bounded and on loopback: two replicas of each service share one S3 store (s3s-fs) and
//! are killed with SIGKILL at random moments (at least 10 kills of each service, each restarted
//! under its replica id), the S3 server is stopped three times and the LLM endpoint the labelling
//! jobs ask (a scripted OpenAI-compatible server) once, while labelling and then training jobs
//! run. Every job ends SUCCEEDED (a job stopped by design, as a crash loop or by an LLM outage, is
//! resumed with ResumeJob), each dataset with the rows and each student with the weights of an
//! undisturbed run. The moments are seeded (`DISTILL_CHAOS_SEED`, printed).

use distill_e2e::llm_server::ScriptedLlm;
use distill_e2e::*;
use distill_proto as pb;
use std::time::{Duration, Instant};

const KILLS: usize = 10;
const OUTAGES: usize = 3;
const LLM_OUTAGES: usize = 1;
const TIMEOUT: Duration = Duration::from_secs(600);

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Two replicas of one service on one store, restarted under the same replica id when killed.
struct Replicas {
    trainer: bool,
    store: String,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    running: [Option<Service>; 2],
    kills: usize,
}

impl Replicas {
    fn start(trainer: bool, store: String, args: Vec<String>, env: Vec<(&'static str, String)>) -> Replicas {
        let mut r = Replicas { trainer, store, args, env, running: [None, None], kills: 0 };
        for i in 0..2 {
            r.running[i] = Some(r.spawn(i));
        }
        r
    }

    fn spawn(&self, i: usize) -> Service {
        let id = format!("{}-{i}", if self.trainer { "trainer" } else { "teacher" });
        let mut args = vec!["--replica-id", &id, "--lease-ttl", "3"];
        args.extend(self.args.iter().map(String::as_str));
        match self.trainer {
            true => Service::trainer(&self.store, &args, &self.env),
            false => Service::teacher(&self.store, &args, &self.env),
        }
    }

    /// SIGKILL one replica (at random), then start it again.
    fn kill_one(&mut self, rng: &mut Rng) {
        let i = rng.below(2) as usize;
        self.running[i] = None;
        self.kills += 1;
        self.running[i] = Some(self.spawn(i));
    }

    fn url(&self, rng: &mut Rng) -> String {
        self.running[rng.below(2) as usize].as_ref().expect("running").url()
    }
}

/// A job's record as one of the replicas (at random) answers it.
async fn job(replicas: &Replicas, rng: &mut Rng, id: &str) -> pb::Job {
    let url = replicas.url(rng);
    let request = pb::GetJobRequest { id: id.into() };
    let answer = match replicas.trainer {
        true => pb::trainer_service_client::TrainerServiceClient::connect(url).await.unwrap().get_job(request).await,
        false => pb::teacher_service_client::TeacherServiceClient::connect(url).await.unwrap().get_job(request).await,
    };
    answer.unwrap_or_else(|e| panic!("get_job {id}: {e}")).into_inner()
}

/// ResumeJob through one of the replicas (at random), unless it was resumed already.
async fn resume(replicas: &Replicas, rng: &mut Rng, id: &str) {
    let url = replicas.url(rng);
    let request = pb::ResumeJobRequest { id: id.into() };
    let answer = match replicas.trainer {
        true => pb::trainer_service_client::TrainerServiceClient::connect(url).await.unwrap().resume_job(request).await,
        false => {
            pb::teacher_service_client::TeacherServiceClient::connect(url).await.unwrap().resume_job(request).await
        }
    };
    match answer {
        // Another replica's view was older than the store's (records are re-read every 2 s): the
        // job was resumed already.
        Err(e) if e.code() == tonic::Code::FailedPrecondition => {}
        other => drop(other.unwrap_or_else(|e| panic!("resume_job {id}: {e}"))),
    }
}

/// What fails besides the replicas: the S3 server (three outages in all) and, while labelling, the
/// LLM endpoint (once, while a job runs).
struct Faults {
    s3: S3Server,
    llm: ScriptedLlm,
    outages: usize,
    llm_outages: usize,
    /// Labelling jobs the LLM outage failed (by design: more windows fell back than allowed).
    llm_failed: usize,
}

impl Faults {
    /// An S3 outage of 1.5 to 3.5 s, perhaps (one chance in five while any are left).
    async fn maybe_s3_outage(&mut self, rng: &mut Rng) -> bool {
        if self.outages >= OUTAGES || rng.below(5) != 0 {
            return false;
        }
        self.s3.stop();
        tokio::time::sleep(Duration::from_millis(1500 + rng.below(2000))).await;
        self.s3.restart();
        self.outages += 1;
        true
    }

    /// The LLM endpoint away for 1.5 to 3.5 s.
    async fn llm_outage(&mut self, rng: &mut Rng) {
        self.llm.stop().await;
        tokio::time::sleep(Duration::from_millis(1500 + rng.below(2000))).await;
        self.llm.restart().await;
        self.llm_outages += 1;
    }
}

/// Jobs started by `start` (with a fresh output each) run while `replicas` are killed at random
/// moments and the store goes away now and then (and, with `llm`, the LLM endpoint once, after two
/// kills and while a job runs), until every job ended and the kills are done. A job stopped by
/// design (killed three times before it made progress, as a crash loop; failed by the LLM outage)
/// is resumed with ResumeJob. Returns the jobs (all SUCCEEDED).
async fn under_chaos(
    replicas: &mut Replicas,
    faults: &mut Faults,
    rng: &mut Rng,
    llm: bool,
    mut start: impl AsyncFnMut(&str, usize) -> String,
) -> Vec<pb::Job> {
    let mut running = vec![start(&replicas.url(rng), 0).await];
    let mut done = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    let mut seen_running = false;
    while !running.is_empty() || replicas.kills < KILLS {
        assert!(Instant::now() < deadline, "chaos did not end: {} kills, jobs {running:?}", replicas.kills);
        if llm && faults.llm_outages < LLM_OUTAGES && seen_running && replicas.kills >= 2 {
            faults.llm_outage(rng).await;
        } else {
            tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
            if !faults.maybe_s3_outage(rng).await && replicas.kills < KILLS {
                replicas.kill_one(rng);
            }
        }
        let mut still = Vec::new();
        seen_running = false;
        for id in running {
            let j = job(replicas, rng, &id).await;
            match j.state() {
                pb::JobState::Succeeded => done.push(j),
                pb::JobState::Running => {
                    seen_running = true;
                    still.push(id);
                }
                // Killed before it made progress three times in a row: ended as a crash loop
                // would be, by design; resumed by hand.
                pb::JobState::Failed if j.error.starts_with("not resumed") => {
                    resume(replicas, rng, &id).await;
                    still.push(id);
                }
                // Too many windows fell back while the LLM endpoint was away: failed loudly, by
                // design; resumed, it asks again what its cache lacks.
                pb::JobState::Failed if j.error.contains("max_fallback_ratio") => {
                    faults.llm_failed += 1;
                    resume(replicas, rng, &id).await;
                    still.push(id);
                }
                s if s.is_terminal() => panic!("job {id} ended {s:?} under chaos: {}", j.error),
                _ => still.push(id),
            }
        }
        running = still;
        if running.is_empty() && replicas.kills < KILLS {
            running.push(start(&replicas.url(rng), done.len()).await);
        }
    }
    done
}

/// The labelling jobs' teacher: the scripted LLM, listwise (every window answered in reverse,
/// unlike the first stage's order a fallback keeps), cached in the service's store, with quick
/// retries so that an outage fails windows, and no window allowed to fall back (the default
/// allows 1%, and rows equal an undisturbed run's only where none did).
fn llm_teacher(base_url: &str) -> pb::TeacherSpec {
    let llm = pb::LlmReranker {
        endpoint: Some(pb::LlmEndpoint {
            base_url: base_url.into(),
            model: "scripted-ranker".into(),
            api_key: "chaos-key".into(),
            api_key_env: String::new(),
        }),
        mode: pb::LlmMode::Listwise as i32,
        concurrency: 2,
        max_retries: 2,
        initial_backoff_ms: 10,
        max_backoff_ms: 50,
        request_timeout_ms: 2000,
        max_fallback_ratio: Some(0.0),
        ..Default::default()
    };
    pb::TeacherSpec { teacher: Some(pb::teacher_spec::Teacher::Llm(llm)) }
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_finish_exactly_once_through_kills_and_outages() {
    let day = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 86_400;
    let seed = std::env::var("DISTILL_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(day);
    eprintln!("chaos seed {seed} (DISTILL_CHAOS_SEED={seed} repeats it)");
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let started = Instant::now();
    let s3 = S3Server::start("distill");
    let bucket = format!("s3://{}", s3.bucket);
    let llm = ScriptedLlm::start(Duration::from_millis(20), Duration::ZERO).await;
    let llm_url = llm.base_url.clone();
    let f = Fixture::new(600, 20);
    let allow = vec!["--allow-location".to_string(), bucket.clone()];
    let llm_args = [allow.clone(), vec!["--llm-endpoint".into(), format!("scripted={llm_url}")]].concat();
    let mut teachers = Replicas::start(false, format!("{bucket}/teacher"), llm_args.clone(), s3.env());
    let mut trainers = Replicas::start(true, format!("{bucket}/trainer"), allow.clone(), s3.env());
    let mut faults = Faults { s3, llm, outages: 0, llm_outages: 0, llm_failed: 0 };
    let label_spec = |output: &str| pb::LabelingSpec {
        teacher: Some(llm_teacher(&llm_url)),
        ..tiny_shards_spec(&f, output, 9, "chaos")
    };

    let label = async |url: &str, n: usize| {
        let mut client = pb::teacher_service_client::TeacherServiceClient::connect(url.to_string()).await.unwrap();
        let spec = label_spec(&format!("{bucket}/datasets/chaos-{n}"));
        client.start_labeling(spec).await.unwrap().into_inner().id
    };
    let labelled = under_chaos(&mut teachers, &mut faults, &mut rng, true, label).await;
    let train = async |url: &str, n: usize| {
        let mut client = pb::trainer_service_client::TrainerServiceClient::connect(url.to_string()).await.unwrap();
        let spec =
            bce_training_spec(&format!("{bucket}/datasets/chaos-0"), &format!("{bucket}/students/chaos-{n}"), 150);
        client.start_training(spec).await.unwrap().into_inner().id
    };
    let trained = under_chaos(&mut trainers, &mut faults, &mut rng, false, train).await;
    while faults.outages < OUTAGES {
        faults.s3.stop();
        tokio::time::sleep(Duration::from_secs(2)).await;
        faults.s3.restart();
        faults.outages += 1;
    }
    let resumes = |jobs: &[pb::Job]| jobs.iter().map(|j| j.resumes).sum::<u32>();
    eprintln!(
        "chaos: {} teacher and {} trainer kills, {} S3 outages, {} LLM outage ({} labelling jobs failed by it, \
         resumed), {} labelling jobs ({} resumes) and {} training jobs ({} resumes), {} LLM requests, {:.0?}",
        teachers.kills,
        trainers.kills,
        faults.outages,
        faults.llm_outages,
        faults.llm_failed,
        labelled.len(),
        resumes(&labelled),
        trained.len(),
        resumes(&trained),
        faults.llm.requests(),
        started.elapsed()
    );
    assert!(resumes(&labelled) > 0 && resumes(&trained) > 0, "no kill hit a running job");
    assert_eq!(faults.llm_outages, LLM_OUTAGES, "the LLM endpoint was not taken away");
    assert!(faults.llm_failed > 0, "the LLM outage failed no labelling job: it did not hit one");
    let s3 = &faults.s3;

    // Undisturbed runs of the same specs, on a calm replica.
    let llm_args: Vec<&str> = llm_args.iter().map(String::as_str).collect();
    let calm = Service::teacher(format!("{bucket}/calm-teacher"), &llm_args, &s3.env());
    let mut client = calm.client().await;
    let spec = label_spec(&format!("{bucket}/datasets/undisturbed"));
    let id = client.start_labeling(spec).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut client, &id, TIMEOUT).await);
    let undisturbed = read_with_pyarrow(&format!("{bucket}/datasets/undisturbed"), Some(s3))["rows"].clone();
    assert!(undisturbed.as_array().is_some_and(|r| !r.is_empty()));
    // A window that fell back keeps the first stage's order: rows labelled in that order differ.
    let spec = tiny_shards_spec(&f, &format!("{bucket}/datasets/first-stage"), 9, "chaos");
    let id = client.start_labeling(spec).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut client, &id, TIMEOUT).await);
    let first_stage = read_with_pyarrow(&format!("{bucket}/datasets/first-stage"), Some(s3))["rows"].clone();
    assert_ne!(first_stage, undisturbed, "the LLM's labels equal the first stage's: a fallback would go unseen");
    for n in 0..labelled.len() {
        let rows = read_with_pyarrow(&format!("{bucket}/datasets/chaos-{n}"), Some(s3))["rows"].clone();
        if rows != undisturbed {
            let (a, b) = (rows.as_array().unwrap(), undisturbed.as_array().unwrap());
            eprintln!("chaos-{n}: {} rows, undisturbed {}", a.len(), b.len());
            for (x, y) in a.iter().zip(b).filter(|(x, y)| x != y).take(5) {
                eprintln!("chaos: {x}\nundisturbed: {y}");
            }
        }
        assert_eq!(rows, undisturbed, "dataset chaos-{n}: rows lost or written twice");
    }
    let calm = Service::trainer(format!("{bucket}/calm-trainer"), &["--allow-location", &bucket], &s3.env());
    let mut client = calm.trainer_client().await;
    let spec = bce_training_spec(&format!("{bucket}/datasets/chaos-0"), &format!("{bucket}/students/undisturbed"), 150);
    let id = client.start_training(spec).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut client, &id, TIMEOUT).await);
    let final_weights = |run: &str| s3.file_of(&format!("students/{run}/final/model.safetensors"));
    for n in 0..trained.len() {
        assert_same_weights(final_weights("undisturbed"), final_weights(&format!("chaos-{n}")));
    }
}
