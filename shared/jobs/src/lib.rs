//! What the teacher and the trainer share to run background jobs over gRPC: the job table
//! (persisted records, resumed after a restart), the `WatchJob` event stream, `CancelJob` and
//! `ListJobs`, bearer-token auth, and the serving plumbing (TLS, bind-and-announce, shutdown,
//! logging).

pub mod auth;
pub mod bounds;
pub mod faults;
pub mod lease;
pub mod metrics;
pub mod serving;
pub mod table;

pub use table::{now_ms, JobEntry, Jobs};

use distill_proto::{job_event, Job, JobEvent, JobState, ListJobsResponse, StateChange};
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::broadcast;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("job '{0}' not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotResumable(String),
    #[error(transparent)]
    Store(#[from] distill_store::StoreError),
}

impl From<JobsError> for Status {
    fn from(e: JobsError) -> Self {
        match e {
            JobsError::NotFound(_) => Status::not_found(e.to_string()),
            JobsError::Conflict(_) => Status::aborted(e.to_string()),
            JobsError::NotResumable(_) => Status::failed_precondition(e.to_string()),
            JobsError::Store(_) => Status::internal(e.to_string()),
        }
    }
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

fn snapshot_events(job: &Job) -> Vec<JobEvent> {
    let now = now_ms();
    let mut events = vec![JobEvent {
        job_id: job.id.clone(),
        time_ms: now,
        event: Some(job_event::Event::State(StateChange { state: job.state, error: job.error.clone() })),
    }];
    if let Some(p) = &job.progress {
        events.push(JobEvent {
            job_id: job.id.clone(),
            time_ms: now,
            event: Some(job_event::Event::Progress(p.clone())),
        });
    }
    events
}

/// The `WatchJob` stream: the job's current state and progress first, then its events until it
/// ends. A spawned task feeds it through a channel, so a client that goes away is noticed.
pub fn watch(entry: Arc<JobEntry>) -> EventStream {
    // Subscribe before the snapshot so that nothing falls between them.
    let mut rx = entry.subscribe();
    let job = entry.snapshot();
    let (tx, out) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        for e in snapshot_events(&job) {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        if job.state().is_terminal() {
            return;
        }
        loop {
            let event = match rx.recv().await {
                Ok(e) => e,
                // A slow watcher missed events: send the current state instead.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let job = entry.snapshot();
                    for e in snapshot_events(&job) {
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    if job.state().is_terminal() {
                        return;
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let terminal = matches!(&event.event, Some(job_event::Event::State(s)) if s.state().is_terminal());
            if tx.send(Ok(event)).await.is_err() || terminal {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))
}

/// `CancelJob`: a queued job is cancelled at once, a running one at its next check; one that
/// another replica runs, when that replica reads the request (within a sync period).
pub async fn cancel(jobs: &Jobs, id: &str) -> Result<Job, JobsError> {
    let entry = jobs.find(id).await?;
    let job = entry.snapshot();
    if !job.state().is_terminal() && !jobs.holds(&entry) {
        jobs.request_cancel(&entry).await?;
    } else if !job.state().is_terminal() {
        entry.cancel.cancel();
        if job.state() == JobState::Queued {
            jobs.set_state(&entry, JobState::Cancelled, "").await;
        }
    }
    Ok(entry.snapshot())
}

/// `ListJobs`: all jobs, or those in one state.
pub fn list(jobs: &Jobs, state: JobState) -> ListJobsResponse {
    let state = (state != JobState::Unspecified).then_some(state);
    ListJobsResponse { jobs: jobs.list(state) }
}

/// The message a panic carried.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs a job's work; a panic inside it becomes `Err` with the panic's message, so that the job
/// ends FAILED instead of staying RUNNING with no worker (tokio would only end the task).
pub async fn contain_panics<T>(work: impl std::future::Future<Output = T>) -> Result<T, String> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .map_err(|p| format!("the job panicked: {}", panic_message(p.as_ref())))
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_panic_becomes_an_error_with_its_message() {
        let out = super::contain_panics(async { panic!("Retry-After out of range") }).await;
        let err: String = out.unwrap_err();
        assert!(err.contains("Retry-After out of range"), "{err}");
        assert_eq!(super::contain_panics(async { 7 }).await, Ok(7));
    }
}
