//! The job table: every job's record, its event channel and its cancellation token. Records are
//! persisted as `jobs/<id>.pb` (the `Job` message) in the service's store, so that a restarted
//! service knows its jobs and resumes the unfinished ones. Replicas sharing a store each run the
//! jobs whose lease they hold ([`crate::lease`]) and see the others' jobs through their records,
//! re-read every [`SYNC_PERIOD`]; a job whose holder stopped renewing is taken over.

use crate::lease::{Leases, Replica};
use crate::JobsError as Error;
use bytes::Bytes;
use distill_proto::{job_event, Job, JobEvent, JobKind, JobSpec, JobState, LogLine, Metric, Progress, StateChange};
use distill_store::Location;
use prost::Message;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// How often a replica re-reads the records (other replicas' jobs, cancel requests, expired leases).
pub const SYNC_PERIOD: Duration = Duration::from_secs(2);

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
    /// The lease term this replica holds for the job and when it expires; `None` when another
    /// replica runs it (or it is over). Without leases (one replica) every job is held.
    lease: Mutex<Option<(u64, i64)>>,
    /// The newest record could not be written (the store was unreachable): the keeper writes it
    /// again every [`SYNC_PERIOD`] until it lands, and a finished job keeps its lease till then.
    unsaved: AtomicBool,
}

impl JobEntry {
    fn new(job: Job) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Self::with_events(job, events, None)
    }

    /// An entry whose watchers are those of `events` (a job taken back after it was lost gets a
    /// fresh cancellation token, its watchers stay).
    fn with_events(job: Job, events: broadcast::Sender<JobEvent>, lease: Option<(u64, i64)>) -> Arc<Self> {
        Arc::new(Self {
            job: Mutex::new(job),
            events,
            cancel: CancellationToken::new(),
            persist_lock: Default::default(),
            lease: Mutex::new(lease),
            unsaved: Default::default(),
        })
    }

    fn lease(&self) -> Option<(u64, i64)> {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_lease(&self, lease: Option<(u64, i64)>) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = lease;
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
    /// `None`: this service is the store's only replica (`--single-replica`), every job is its own.
    leases: Option<Leases>,
    /// The version of each record as last read (so a sync reads only records that changed).
    seen: Mutex<HashMap<String, String>>,
}

impl Jobs {
    /// Loads the job records under `dir`. Returns the table and the jobs to resume (those that were
    /// queued or running when the service stopped and whose lease this replica got), already
    /// marked QUEUED with `resumes` counted. With `replica`, first checks that the store keeps
    /// put-if-absent writes (leases need them).
    pub async fn load(dir: Location, replica: Option<Replica>) -> Result<(Arc<Self>, Vec<Arc<JobEntry>>), Error> {
        let leases = replica.map(|r| Leases::new(&dir, r));
        if let Some(l) = &leases {
            l.check_store().await?;
        }
        let jobs = Arc::new(Self { dir: dir.clone(), entries: Default::default(), leases, seen: Default::default() });
        let mut resume = Vec::new();
        for id in jobs.record_ids().await? {
            if let Some(job) = jobs.read_record(&id).await? {
                resume.extend(jobs.adopt(job).await?);
            }
        }
        resume.sort_by_key(|e| e.snapshot().created_at_ms);
        Ok((jobs, resume))
    }

    /// The ids of the records under the table's directory.
    async fn record_ids(&self) -> Result<Vec<String>, Error> {
        let names = self.dir.list("").await?;
        Ok(names.iter().filter_map(|n| n.strip_suffix(".pb")).map(String::from).collect())
    }

    /// A job's record as stored; `None` when it is unreadable (logged) or gone.
    async fn read_record(&self, id: &str) -> Result<Option<Job>, Error> {
        let name = format!("{id}.pb");
        let bytes = match self.dir.get(&name).await {
            Ok(b) => b,
            Err(distill_store::StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match Job::decode(bytes) {
            Ok(job) => Ok(Some(job)),
            Err(e) => {
                tracing::error!(record = %self.dir.uri_of(&name), error = %e, "unreadable job record skipped");
                Ok(None)
            }
        }
    }

    /// Takes a stored record into the table. An unfinished job whose lease this replica gets is
    /// prepared to run here (returned); any other is shown as its record says.
    async fn adopt(&self, mut job: Job) -> Result<Option<Arc<JobEntry>>, Error> {
        let held = self.get(&job.id).ok().filter(|e| e.lease().is_some());
        if held.is_some() {
            return Ok(None); // running here: this replica's copy is the newest
        }
        let Some(lease) = self.claim_unfinished(&mut job).await? else {
            self.show(job);
            return Ok(None);
        };
        let unfinished = !stop_crash_loop(&mut job);
        if unfinished {
            job.set_state(JobState::Queued);
            job.resumes += 1;
        } else if job.finished_at_ms == 0 {
            job.finished_at_ms = now_ms();
        }
        let events = self.get(&job.id).map(|e| e.events.clone()).unwrap_or_else(|_| broadcast::channel(1024).0);
        let entry = JobEntry::with_events(job, events, Some(lease));
        self.insert(entry.clone());
        self.persist(&entry).await?;
        if !unfinished {
            self.release(&entry).await;
            return Ok(None);
        }
        Ok(Some(entry))
    }

    /// Shows another replica's job (or a finished one) as its record says, telling watchers
    /// what changed.
    fn show(&self, job: Job) {
        let Ok(entry) = self.get(&job.id) else {
            self.insert(JobEntry::new(job));
            return;
        };
        let before = entry.snapshot();
        entry.update(|j| *j = job.clone());
        if before.state != job.state || before.error != job.error {
            let change = StateChange { state: job.state, error: job.error.clone() };
            entry.emit(&job.id, job_event::Event::State(change));
        }
        if before.progress != job.progress {
            entry.emit(&job.id, job_event::Event::Progress(job.progress.clone().unwrap_or_default()));
        }
    }

    /// The lease of `job`, read as unfinished, for this replica, with `job` read again under it:
    /// a holder writes its job's last record before it lets the lease go, so a record read before
    /// the claim may be out of date (the job ended since). `None`, with `job` as it now is, when
    /// the job has ended or another replica holds it.
    async fn claim_unfinished(&self, job: &mut Job) -> Result<Option<(u64, i64)>, Error> {
        if job.state().is_terminal() {
            return Ok(None);
        }
        let Some(lease) = self.claim(&job.id).await? else { return Ok(None) };
        if let Some(current) = self.read_record(&job.id).await? {
            *job = current;
        }
        if !job.state().is_terminal() {
            return Ok(Some(lease));
        }
        if let Some(l) = &self.leases {
            l.release(&job.id).await?;
        }
        Ok(None)
    }

    /// `id`'s lease for this replica (term, expiry), or `None` when another holds it.
    async fn claim(&self, id: &str) -> Result<Option<(u64, i64)>, Error> {
        let Some(l) = &self.leases else { return Ok(Some((0, i64::MAX))) };
        let term = l.claim(id).await?;
        Ok(term.map(|t| (t, now_ms() + l.replica.ttl.as_millis() as i64)))
    }

    /// `ResumeJob`: a FAILED or CANCELLED job queued again on this replica (its record as stored
    /// is the one resumed), to continue from its progress records or checkpoints.
    pub async fn reopen(&self, id: &str) -> Result<Arc<JobEntry>, Error> {
        let entry = self.find(id).await?;
        if self.holds(&entry) && entry.snapshot().state().is_terminal() {
            // Ended here just now: its record may not say so yet (on its way, or not writable
            // while the store was unreachable). Written first, so that the record read says so.
            self.save_again(&entry).await?;
        }
        let mut job = self.read_record(id).await?.unwrap_or_else(|| entry.snapshot());
        if !matches!(job.state(), JobState::Failed | JobState::Cancelled) {
            let state = job.state().as_str_name().trim_start_matches("JOB_STATE_");
            return Err(Error::NotResumable(format!("job {id} is {state}: only FAILED or CANCELLED jobs resume")));
        }
        let Some(lease) = self.claim(id).await? else {
            return Err(Error::Conflict(format!("job {id}: another replica is resuming it")));
        };
        job.set_state(JobState::Queued);
        job.error.clear();
        job.finished_at_ms = 0;
        job.resumes += 1;
        job.attempts_without_progress = 0;
        let reopened = JobEntry::with_events(job, entry.events.clone(), Some(lease));
        self.insert(reopened.clone());
        self.persist(&reopened).await?;
        let change = StateChange { state: JobState::Queued as i32, error: String::new() };
        reopened.emit(id, job_event::Event::State(change));
        Ok(reopened)
    }

    fn insert(&self, entry: Arc<JobEntry>) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).insert(entry.id(), entry);
    }

    /// Whether this replica runs `entry`'s job (holds its lease).
    pub fn holds(&self, entry: &JobEntry) -> bool {
        entry.lease().is_some()
    }

    /// Ends this replica's lease of a finished job.
    async fn release(&self, entry: &JobEntry) {
        entry.set_lease(None);
        if let Some(l) = &self.leases {
            if let Err(e) = l.release(&entry.id()).await {
                tracing::warn!(job = %entry.id(), error = %e, "lease of a finished job not released (it expires)");
            }
        }
    }

    /// Keeps the records and this replica's leases and view of the others' jobs current: every
    /// [`SYNC_PERIOD`] it writes records that could not be written (the store was unreachable),
    /// renews held leases that are a third through their term (a lease that cannot be renewed
    /// before it expires is given up: the job is cancelled here and left to whoever takes it),
    /// re-reads the records, passes cancel requests on to their jobs, and takes over unfinished
    /// jobs whose lease expired, handing each to `run` (which returns false once the service is
    /// gone, ending this). Without leases it only writes what was not written.
    pub fn keep(self: &Arc<Self>, run: impl Fn(Arc<JobEntry>) -> bool + Send + 'static) {
        let jobs = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SYNC_PERIOD).await;
                let Some(jobs) = jobs.upgrade() else { return };
                jobs.save_unsaved().await;
                if jobs.leases.is_none() {
                    continue;
                }
                jobs.renew_all().await;
                let taken = match jobs.sync().await {
                    Ok(taken) => taken,
                    Err(e) => {
                        tracing::warn!(error = %e, "job records not re-read (the store is unreachable?)");
                        continue;
                    }
                };
                for entry in taken {
                    tracing::warn!(job = %entry.id(), "taking over a job another replica stopped running");
                    if !run(entry) {
                        return;
                    }
                }
            }
        });
    }

    /// Writes each record whose last write failed; a finished job's lease ends once its record
    /// says so.
    async fn save_unsaved(&self) {
        let unsaved: Vec<_> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.unsaved.load(Ordering::SeqCst))
            .cloned()
            .collect();
        for entry in unsaved {
            self.save_again(&entry).await.ok();
        }
    }

    /// Writes `entry`'s record again (it could not be written before), then ends the lease of a
    /// finished job.
    async fn save_again(&self, entry: &JobEntry) -> Result<(), Error> {
        self.persist(entry).await.inspect_err(|e| {
            tracing::warn!(job = %entry.id(), error = %e, "job record still not written (the store is unreachable?)")
        })?;
        tracing::info!(job = %entry.id(), "job record written (again)");
        if entry.snapshot().state().is_terminal() && self.holds(entry) {
            self.release(entry).await;
        }
        Ok(())
    }

    async fn renew_all(&self) {
        let Some(leases) = &self.leases else { return };
        let ttl = leases.replica.ttl.as_millis() as i64;
        let held: Vec<_> = self.entries.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for entry in held {
            let Some((term, expires)) = entry.lease() else { continue };
            if expires - now_ms() > ttl * 2 / 3 {
                continue;
            }
            match leases.renew(&entry.id(), term).await {
                Ok(Some(next)) => entry.set_lease(Some((next, now_ms() + ttl))),
                Ok(None) => self.lost(&entry, "another replica took it over"),
                Err(e) if expires - now_ms() < ttl / 6 => self.lost(&entry, &format!("could not renew: {e}")),
                Err(e) => tracing::warn!(job = %entry.id(), error = %e, "lease not renewed yet"),
            }
        }
    }

    /// Checks that this replica still holds `entry`'s job: called right before a write that commits
    /// the job's work (a shard's progress record, the manifest, a checkpoint), so that an attempt
    /// which lost its job to another replica stops before that write. A term with more than half
    /// its time left is proof enough (no replica claims an unexpired term); an older one is renewed
    /// first.
    pub async fn confirm(&self, entry: &JobEntry) -> Result<(), Error> {
        let Some(leases) = &self.leases else { return Ok(()) };
        let lost = || Error::Conflict(format!("job {}: another replica runs it now; this attempt stopped", entry.id()));
        let Some((term, expires)) = entry.lease() else { return Err(lost()) };
        let ttl = leases.replica.ttl.as_millis() as i64;
        if expires - now_ms() > ttl / 2 {
            // Nobody may claim a term before it expires: a fresh one needs no round trip.
            return Ok(());
        }
        match leases.renew(&entry.id(), term).await? {
            Some(next) => {
                entry.set_lease(Some((next, now_ms() + ttl)));
                Ok(())
            }
            None => {
                self.lost(entry, "another replica took it over");
                Err(lost())
            }
        }
    }

    /// This replica stops running `entry`'s job: no more writes of its record, its work cancelled.
    fn lost(&self, entry: &JobEntry, why: &str) {
        tracing::warn!(job = %entry.id(), why, "job lease lost: stopping the job here");
        entry.set_lease(None);
        entry.cancel.cancel();
    }

    /// Re-reads the records: other replicas' jobs shown as they are, cancel requests for jobs
    /// held here obeyed, and the unfinished jobs this replica could claim returned.
    async fn sync(&self) -> Result<Vec<Arc<JobEntry>>, Error> {
        let listing = self.dir.list_versions("").await?;
        for id in listing.iter().filter_map(|(n, _)| n.strip_suffix(".cancel")) {
            if let Ok(entry) = self.get(id) {
                if self.holds(&entry) {
                    crate::cancel(self, id).await?;
                    self.dir.delete(&format!("{id}.cancel")).await?;
                }
            }
        }
        let mut taken = Vec::new();
        for (name, version) in listing {
            let Some(id) = name.strip_suffix(".pb") else { continue };
            let entry = self.get(id).ok();
            let held = entry.as_ref().is_some_and(|e| self.holds(e));
            // Re-read what changed, and unfinished jobs (their lease may have expired).
            let unfinished = entry.is_none_or(|e| !e.snapshot().state().is_terminal());
            let changed = self.seen.lock().unwrap_or_else(|e| e.into_inner()).get(id) != Some(&version);
            if held || !(changed || unfinished) {
                continue;
            }
            if let Some(job) = self.read_record(id).await? {
                taken.extend(self.adopt(job).await?);
            }
            self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), version);
        }
        Ok(taken)
    }

    /// Asks the replica running `entry`'s job to cancel it (it reads the request within a sync).
    pub async fn request_cancel(&self, entry: &JobEntry) -> Result<(), Error> {
        self.dir.put(&format!("{}.cancel", entry.id()), Bytes::from_static(b"")).await?;
        Ok(())
    }

    /// A job by id: from the table, else from the store (another replica's job created since the
    /// last sync). Ids are the services' own (UUIDs): anything else is not found.
    pub async fn find(&self, id: &str) -> Result<Arc<JobEntry>, Error> {
        if let Ok(entry) = self.get(id) {
            return Ok(entry);
        }
        let plausible = !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if plausible {
            if let Some(job) = self.read_record(id).await? {
                self.show(job);
            }
        }
        self.get(id)
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
        let Some(lease) = self.claim(&id).await? else {
            return Err(Error::Conflict(format!("job {id}: another replica holds its lease")));
        };
        let (events, _) = broadcast::channel(1024);
        let entry = JobEntry::with_events(job, events, Some(lease));
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

    /// Writes the record, if this replica still holds the job (a replica that lost it must not
    /// overwrite what the new holder writes).
    async fn persist(&self, entry: &JobEntry) -> Result<(), Error> {
        let _guard = entry.persist_lock.lock().await;
        if !self.holds(entry) {
            tracing::warn!(job = %entry.id(), "record not written: another replica holds the job now");
            return Ok(());
        }
        let job = entry.snapshot();
        let written = self.dir.put(&format!("{}.pb", job.id), Bytes::from(job.encode_to_vec())).await;
        entry.unsaved.store(written.is_err(), Ordering::SeqCst);
        Ok(written?)
    }

    async fn persist_logged(&self, entry: &JobEntry) {
        if let Err(e) = self.persist(entry).await {
            tracing::error!(job = %entry.id(), error = %e, "could not persist job record (written again later)");
        }
    }

    /// Moves a job to `state` (with `error` for FAILED), records the times, persists and tells
    /// the watchers.
    pub async fn set_state(&self, entry: &JobEntry, state: JobState, error: &str) {
        if !self.holds(entry) {
            tracing::info!(job = %entry.id(), state = ?state, "state not set: another replica holds the job");
            return;
        }
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
        // A finished job whose record could not be written keeps its lease (no other replica
        // resumes it) until the keeper has written the record.
        if state.is_terminal() && !entry.unsaved.load(Ordering::SeqCst) {
            self.release(entry).await;
        }
        entry.emit(&job.id, job_event::Event::State(StateChange { state: state as i32, error: error.to_string() }));
    }

    /// Updates the progress counters; `persist` also writes the record (at shard commits).
    pub async fn set_progress(&self, entry: &JobEntry, progress: Progress, persist: bool) {
        if !self.holds(entry) {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use distill_proto::{job_spec, LabelingSpec};

    fn replica(id: &str, ttl_ms: u64) -> Option<Replica> {
        Some(Replica::new(Some(id.into()), Duration::from_millis(ttl_ms)))
    }

    #[tokio::test]
    async fn an_attempt_that_lost_its_job_writes_nothing_more() {
        let dir = Location::parse("memory://table-fence/jobs").unwrap();
        let (a, _) = Jobs::load(dir.clone(), replica("a", 300)).await.unwrap();
        let spec = JobSpec { spec: Some(job_spec::Spec::Labeling(LabelingSpec::default())) };
        let entry = a.create(JobKind::Labeling, spec, "memory://x".into(), "j1".into()).await.unwrap();
        a.set_state(&entry, JobState::Running, "").await;
        a.confirm(&entry).await.expect("a holds its job");
        // a stalls past its lease; b loads the store and takes the job over.
        tokio::time::sleep(Duration::from_millis(350)).await;
        let (b, resume) = Jobs::load(dir.clone(), replica("b", 60_000)).await.unwrap();
        assert_eq!(resume.len(), 1, "b resumes the job");
        let err = a.confirm(&entry).await.unwrap_err();
        assert!(matches!(err, Error::Conflict(_)), "{err}");
        assert!(entry.cancel.is_cancelled(), "a's attempt is told to stop");
        a.set_state(&entry, JobState::Failed, "late").await;
        let stored = Job::decode(dir.get("j1.pb").await.unwrap()).unwrap();
        assert_eq!(stored.state(), JobState::Queued, "b's record stands");
        assert_eq!(stored.resumes, 1);
        assert!(b.holds(&b.get("j1").unwrap()));
    }

    #[tokio::test]
    async fn a_job_read_as_running_just_before_it_failed_is_not_taken_over() {
        let dir = Location::parse("memory://table-stale/jobs").unwrap();
        let (a, _) = Jobs::load(dir.clone(), replica("a", 60_000)).await.unwrap();
        let spec = JobSpec { spec: Some(job_spec::Spec::Labeling(LabelingSpec::default())) };
        let entry = a.create(JobKind::Labeling, spec, "memory://x".into(), "j1".into()).await.unwrap();
        a.set_state(&entry, JobState::Running, "").await;
        let (b, resume) = Jobs::load(dir.clone(), replica("b", 60_000)).await.unwrap();
        assert!(resume.is_empty(), "a holds the job");
        // b reads the record while the job runs; the job fails and a lets its lease go; then b
        // handles what it read (its sync is slower than the failure).
        let stale = Job::decode(dir.get("j1.pb").await.unwrap()).unwrap();
        a.set_state(&entry, JobState::Failed, "the teacher is down").await;
        assert!(b.adopt(stale).await.unwrap().is_none(), "b must not resume a failed job");
        let stored = Job::decode(dir.get("j1.pb").await.unwrap()).unwrap();
        assert_eq!((stored.state(), stored.resumes), (JobState::Failed, 0));
        assert_eq!(b.get("j1").unwrap().snapshot().state(), JobState::Failed, "b shows the record as it is");
        // ResumeJob on a still works: the lease b claimed for its check is free again.
        let reopened = a.reopen("j1").await.unwrap();
        assert_eq!(reopened.snapshot().state(), JobState::Queued);
    }
}
