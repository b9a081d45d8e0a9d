//! The job table: every job's record, its event channel and its cancellation token. Records are
//! persisted as `jobs/<id>.pb` (the `Job` message) in the service's store, so that a restarted
//! service knows its jobs and resumes the unfinished ones.

use crate::JobsError as Error;
use bytes::Bytes;
use distill_proto::{job_event, Job, JobEvent, JobKind, JobSpec, JobState, LogLine, Metric, Progress, StateChange};
use distill_store::Location;
use prost::Message;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// One job: its current record, the events its watchers receive, and how to cancel it.
pub struct JobEntry {
    job: Mutex<Job>,
    events: broadcast::Sender<JobEvent>,
    pub cancel: CancellationToken,
    /// Serialises writes of the record so an older snapshot never overwrites a newer one.
    persist_lock: tokio::sync::Mutex<()>,
}

impl JobEntry {
    fn new(job: Job) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            job: Mutex::new(job),
            events,
            cancel: CancellationToken::new(),
            persist_lock: Default::default(),
        })
    }

    pub fn snapshot(&self) -> Job {
        self.job.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn id(&self) -> String {
        self.snapshot().id
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    fn update(&self, f: impl FnOnce(&mut Job)) -> Job {
        let mut job = self.job.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut job);
        job.clone()
    }

    fn emit(&self, id: &str, event: job_event::Event) {
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(JobEvent { job_id: id.to_string(), time_ms: now_ms(), event: Some(event) });
    }
}

/// Attempts in a row without progress after which an unfinished job is not resumed again.
pub const MAX_ATTEMPTS_WITHOUT_PROGRESS: u32 = 3;

/// Counts the attempt that just ended (the service stopped while the job was unfinished); a job
/// whose last attempts in a row did no work is ended FAILED instead of being resumed forever (a
/// crash loop: each restart would run into the same abort). Returns whether it was stopped.
fn stop_crash_loop(job: &mut Job) -> bool {
    let done = job.progress.as_ref().map_or(0, |p| p.done);
    if job.state() != JobState::Running {
        // Stopped while waiting for a job slot: no attempt ran.
        return false;
    }
    if done <= job.done_at_attempt_start {
        job.attempts_without_progress += 1;
    } else {
        job.attempts_without_progress = 0;
    }
    if job.attempts_without_progress < MAX_ATTEMPTS_WITHOUT_PROGRESS {
        return false;
    }
    job.set_state(JobState::Failed);
    job.error = format!(
        "not resumed: its last {} attempts ended with the service stopping or crashing before any \
         work was done (at {done} {}); see the service's log",
        job.attempts_without_progress,
        job.progress.as_ref().map_or("", |p| p.unit.as_str())
    );
    true
}

pub struct Jobs {
    dir: Location,
    entries: Mutex<HashMap<String, Arc<JobEntry>>>,
}

impl Jobs {
    /// Loads the job records under `dir`. Returns the table and the jobs to resume (those that were
    /// queued or running when the service stopped), already marked QUEUED with `resumes` counted.
    pub async fn load(dir: Location) -> Result<(Arc<Self>, Vec<Arc<JobEntry>>), Error> {
        let jobs = Arc::new(Self { dir: dir.clone(), entries: Mutex::new(HashMap::new()) });
        let mut resume = Vec::new();
        for name in dir.list("").await? {
            if !name.ends_with(".pb") {
                continue;
            }
            let bytes = dir.get(&name).await?;
            let mut job = match Job::decode(bytes) {
                Ok(job) => job,
                Err(e) => {
                    tracing::error!(record = %dir.uri_of(&name), error = %e, "unreadable job record skipped");
                    continue;
                }
            };
            let unfinished = !job.state().is_terminal() && !stop_crash_loop(&mut job);
            if unfinished {
                job.set_state(JobState::Queued);
                job.resumes += 1;
            }
            let stopped = job.state() == JobState::Failed && job.finished_at_ms == 0;
            if stopped {
                job.finished_at_ms = now_ms();
            }
            let entry = JobEntry::new(job);
            jobs.entries.lock().unwrap_or_else(|e| e.into_inner()).insert(entry.id(), entry.clone());
            if unfinished || stopped {
                jobs.persist(&entry).await?;
            }
            if unfinished {
                resume.push(entry);
            }
        }
        resume.sort_by_key(|e| e.snapshot().created_at_ms);
        Ok((jobs, resume))
    }

    /// Records a new QUEUED job.
    pub async fn create(
        &self,
        kind: JobKind,
        spec: JobSpec,
        output_uri: String,
        id: String,
    ) -> Result<Arc<JobEntry>, Error> {
        let job = Job {
            id: id.clone(),
            kind: kind as i32,
            state: JobState::Queued as i32,
            spec: Some(spec),
            progress: Some(Progress::default()),
            created_at_ms: now_ms(),
            output_uri,
            ..Default::default()
        };
        let entry = JobEntry::new(job);
        self.persist(&entry).await?;
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).insert(id, entry.clone());
        Ok(entry)
    }

    pub fn get(&self, id: &str) -> Result<Arc<JobEntry>, Error> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// All jobs (optionally in one state), oldest first.
    pub fn list(&self, state: Option<JobState>) -> Vec<Job> {
        let mut jobs: Vec<Job> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.snapshot())
            .filter(|j| state.is_none_or(|s| j.state() == s))
            .collect();
        jobs.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then_with(|| a.id.cmp(&b.id)));
        jobs
    }

    async fn persist(&self, entry: &JobEntry) -> Result<(), Error> {
        let _guard = entry.persist_lock.lock().await;
        let job = entry.snapshot();
        self.dir.put(&format!("{}.pb", job.id), Bytes::from(job.encode_to_vec())).await?;
        Ok(())
    }

    async fn persist_logged(&self, entry: &JobEntry) {
        if let Err(e) = self.persist(entry).await {
            tracing::error!(job = %entry.id(), error = %e, "could not persist job record");
        }
    }

    /// Moves a job to `state` (with `error` for FAILED), records the times, persists and tells
    /// the watchers.
    pub async fn set_state(&self, entry: &JobEntry, state: JobState, error: &str) {
        let job = entry.update(|j| {
            j.set_state(state);
            j.error = error.to_string();
            match state {
                JobState::Running => {
                    j.started_at_ms = now_ms();
                    j.done_at_attempt_start = j.progress.as_ref().map_or(0, |p| p.done);
                }
                s if s.is_terminal() => j.finished_at_ms = now_ms(),
                _ => {}
            }
        });
        tracing::info!(job = %job.id, state = ?state, error, "job state");
        self.persist_logged(entry).await;
        entry.emit(&job.id, job_event::Event::State(StateChange { state: state as i32, error: error.to_string() }));
    }

    /// Updates the progress counters; `persist` also writes the record (at shard commits).
    pub async fn set_progress(&self, entry: &JobEntry, progress: Progress, persist: bool) {
        let job = entry.update(|j| j.progress = Some(progress.clone()));
        if persist {
            self.persist_logged(entry).await;
        }
        entry.emit(&job.id, job_event::Event::Progress(progress));
    }

    /// Tells the watchers a metric's value at a step (training loss, evaluation metrics).
    pub fn metric(&self, entry: &JobEntry, name: &str, value: f64, step: u64) {
        entry.emit(&entry.id(), job_event::Event::Metric(Metric { name: name.to_string(), value, step }));
    }

    pub fn log(&self, entry: &JobEntry, level: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(job = %entry.id(), level, "{message}");
        entry.emit(&entry.id(), job_event::Event::Log(LogLine { level: level.to_string(), message }));
    }
}
