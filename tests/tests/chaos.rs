//! Chaos, bounded and on loopback: two replicas of each service share one S3 store (s3s-fs) and
//! are killed with SIGKILL at random moments (at least 10 kills of each service, each restarted
//! under its replica id) and the S3 server is stopped three times, while labelling and then
//! training jobs run. Every job ends SUCCEEDED, each dataset with the rows and each student with
//! the weights of an undisturbed run. The moments are seeded (`DISTILL_CHAOS_SEED`, printed).

use distill_e2e::*;
use distill_proto as pb;
use std::time::{Duration, Instant};

const KILLS: usize = 10;
const OUTAGES: usize = 3;
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
    allow: String,
    env: Vec<(&'static str, String)>,
    running: [Option<Service>; 2],
    kills: usize,
}

impl Replicas {
    fn start(trainer: bool, store: String, allow: String, env: Vec<(&'static str, String)>) -> Replicas {
        let mut r = Replicas { trainer, store, allow, env, running: [None, None], kills: 0 };
        for i in 0..2 {
            r.running[i] = Some(r.spawn(i));
        }
        r
    }

    fn spawn(&self, i: usize) -> Service {
        let id = format!("{}-{i}", if self.trainer { "trainer" } else { "teacher" });
        let args = ["--replica-id", &id, "--lease-ttl", "3", "--allow-location", &self.allow];
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

/// Jobs started by `start` (with a fresh output each) run while `replicas` are killed at random
/// moments and the store goes away now and then, until every job ended and the kills are done.
/// A job stopped as a crash loop (killed three times before it made progress) is resumed with
/// ResumeJob. Returns the jobs (all SUCCEEDED).
async fn under_chaos(
    replicas: &mut Replicas,
    s3: &mut S3Server,
    rng: &mut Rng,
    outages: &mut usize,
    mut start: impl AsyncFnMut(&str, usize) -> String,
) -> Vec<pb::Job> {
    let mut running = vec![start(&replicas.url(rng), 0).await];
    let mut done = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while !running.is_empty() || replicas.kills < KILLS {
        assert!(Instant::now() < deadline, "chaos did not end: {} kills, jobs {running:?}", replicas.kills);
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        if *outages < OUTAGES && rng.below(5) == 0 {
            s3.stop();
            tokio::time::sleep(Duration::from_millis(1500 + rng.below(2000))).await;
            s3.restart();
            *outages += 1;
        } else if replicas.kills < KILLS {
            replicas.kill_one(rng);
        }
        let mut still = Vec::new();
        for id in running {
            let j = job(replicas, rng, &id).await;
            match j.state() {
                pb::JobState::Succeeded => done.push(j),
                // Killed before it made progress three times in a row: ended as a crash loop
                // would be, by design; resumed by hand.
                pb::JobState::Failed if j.error.starts_with("not resumed") => {
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

#[tokio::test(flavor = "multi_thread")]
async fn jobs_finish_exactly_once_through_kills_and_outages() {
    let day = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 86_400;
    let seed = std::env::var("DISTILL_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(day);
    eprintln!("chaos seed {seed} (DISTILL_CHAOS_SEED={seed} repeats it)");
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let started = Instant::now();
    let mut s3 = S3Server::start("distill");
    let bucket = format!("s3://{}", s3.bucket);
    let f = Fixture::new(600, 20);
    let mut teachers = Replicas::start(false, format!("{bucket}/teacher"), bucket.clone(), s3.env());
    let mut trainers = Replicas::start(true, format!("{bucket}/trainer"), bucket.clone(), s3.env());
    let mut outages = 0;

    let label = async |url: &str, n: usize| {
        let mut client = pb::teacher_service_client::TeacherServiceClient::connect(url.to_string()).await.unwrap();
        let spec = tiny_shards_spec(&f, &format!("{bucket}/datasets/chaos-{n}"), 9, "chaos");
        client.start_labeling(spec).await.unwrap().into_inner().id
    };
    let labelled = under_chaos(&mut teachers, &mut s3, &mut rng, &mut outages, label).await;
    let train = async |url: &str, n: usize| {
        let mut client = pb::trainer_service_client::TrainerServiceClient::connect(url.to_string()).await.unwrap();
        let spec =
            bce_training_spec(&format!("{bucket}/datasets/chaos-0"), &format!("{bucket}/students/chaos-{n}"), 150);
        client.start_training(spec).await.unwrap().into_inner().id
    };
    let trained = under_chaos(&mut trainers, &mut s3, &mut rng, &mut outages, train).await;
    while outages < OUTAGES {
        s3.stop();
        tokio::time::sleep(Duration::from_secs(2)).await;
        s3.restart();
        outages += 1;
    }
    let resumes = |jobs: &[pb::Job]| jobs.iter().map(|j| j.resumes).sum::<u32>();
    eprintln!(
        "chaos: {} teacher and {} trainer kills, {outages} S3 outages, {} labelling jobs ({} resumes) and {} \
         training jobs ({} resumes), {:.0?}",
        teachers.kills,
        trainers.kills,
        labelled.len(),
        resumes(&labelled),
        trained.len(),
        resumes(&trained),
        started.elapsed()
    );
    assert!(resumes(&labelled) > 0 && resumes(&trained) > 0, "no kill hit a running job");

    // Undisturbed runs of the same specs, on a calm replica.
    let calm = Service::teacher(format!("{bucket}/calm-teacher"), &["--allow-location", &bucket], &s3.env());
    let mut client = calm.client().await;
    let spec = tiny_shards_spec(&f, &format!("{bucket}/datasets/undisturbed"), 9, "chaos");
    let id = client.start_labeling(spec).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut client, &id, TIMEOUT).await);
    let undisturbed = read_with_pyarrow(&format!("{bucket}/datasets/undisturbed"), Some(&s3))["rows"].clone();
    assert!(undisturbed.as_array().is_some_and(|r| !r.is_empty()));
    for n in 0..labelled.len() {
        let rows = read_with_pyarrow(&format!("{bucket}/datasets/chaos-{n}"), Some(&s3))["rows"].clone();
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
