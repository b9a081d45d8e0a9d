//! The gRPC face of the teacher: job control and direct scoring.

use crate::access::{self, Grants};
use crate::error::Error;
use crate::labeling::{self, Outcome};
use crate::llm::TeacherContext;
use crate::teachers::Teacher as _;
use distill_jobs::{JobEntry, Jobs};
use distill_proto::teacher_service_server::TeacherService;
use distill_proto::{
    job_spec, CancelJobRequest, GetJobRequest, Job, JobKind, JobSpec, JobState, LabelingSpec, ListJobsRequest,
    ListJobsResponse, ResumeJobRequest, ScoreRequest, ScoreResponse, WatchJobRequest,
};
use distill_store::Location;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

/// The service's state: its job table, store and job slots.
pub struct TeacherState {
    jobs: Arc<Jobs>,
    store: Location,
    permits: Arc<Semaphore>,
    /// The `Score` RPC's ensemble: configured or not, set once loaded.
    scorer_configured: std::sync::atomic::AtomicBool,
    scorer: tokio::sync::OnceCell<Arc<crate::teachers::Ensemble>>,
    /// Where model teachers and the scorer run (`--device`).
    device: candle_core::Device,
    /// The locations and LLM endpoints requests may use.
    grants: Grants,
}

/// The gRPC handle (cheap to clone).
#[derive(Clone)]
pub struct Teacher(Arc<TeacherState>);

impl Teacher {
    /// Loads the job table from `store` and resumes the jobs a previous run left unfinished.
    pub async fn start(
        setup: distill_jobs::serving::Setup,
        device: candle_core::Device,
        endpoints: crate::llm::endpoints::Endpoints,
    ) -> Result<Self, Error> {
        let (jobs, resume) = Jobs::load(setup.store.child("jobs"), setup.replica.clone()).await?;
        let state = Arc::new(TeacherState {
            jobs,
            store: setup.store,
            permits: Arc::new(Semaphore::new(setup.max_concurrent_jobs.max(1))),
            scorer_configured: Default::default(),
            scorer: Default::default(),
            device,
            grants: Grants { allow: setup.allow, endpoints: Arc::new(endpoints) },
        });
        for entry in resume {
            tracing::info!(job = %entry.id(), "resuming job after restart");
            state.clone().spawn(entry);
        }
        // Jobs of replicas that stopped renewing their leases, taken over.
        let service = Arc::downgrade(&state);
        state.jobs.keep(move |entry| service.upgrade().map(|s| s.spawn(entry)).is_some());
        Ok(Self(state))
    }

    /// The job table (for metrics).
    pub fn jobs(&self) -> Arc<Jobs> {
        self.0.jobs.clone()
    }

    /// Loads the `Score` RPC's ensemble; the future resolves once it can answer.
    pub fn load_scorer(&self, spec: distill_proto::CrossEncoderEnsemble) -> distill_jobs::serving::Ready {
        self.0.scorer_configured.store(true, std::sync::atomic::Ordering::SeqCst);
        let state = self.0.clone();
        Some(Box::pin(async move {
            let ensemble = crate::teachers::Ensemble::load(&spec, &state.device).await.map_err(|e| {
                anyhow::anyhow!("--score-model: {}", e.to_string().replace("teacher.cross_encoders.", ""))
            })?;
            tracing::info!(teacher = %ensemble.identity().name, "scorer loaded");
            let _ = state.scorer.set(Arc::new(ensemble));
            Ok(())
        }))
    }
}

/// Pairs per `Score` request at most.
const MAX_SCORE_PAIRS: usize = 100_000;

impl TeacherState {
    fn spawn(self: Arc<Self>, entry: Arc<JobEntry>) {
        tokio::spawn(async move {
            let _permit = self.permits.clone().acquire_owned().await;
            let job = entry.snapshot();
            if entry.cancel.is_cancelled() {
                return;
            }
            self.jobs.set_state(&entry, JobState::Running, "").await;
            let result = distill_jobs::contain_panics(self.run(&job, &entry))
                .await
                .unwrap_or_else(|panic| Err(Error::Internal(panic)));
            // The job is over: its API key is no longer needed.
            if let Err(e) = self.secrets().delete(&job.id).await {
                tracing::warn!(job = %job.id, "API key of a finished job not deleted: {e}");
            }
            match result {
                Ok(Outcome::Committed(m)) => {
                    self.jobs.log(&entry, "info", format!("committed {} rows in {} shards", m.rows, m.shards.len()));
                    self.jobs.set_state(&entry, JobState::Succeeded, "").await
                }
                Ok(Outcome::Cancelled) => self.jobs.set_state(&entry, JobState::Cancelled, "").await,
                Err(e) => self.jobs.set_state(&entry, JobState::Failed, &e.to_string()).await,
            }
        });
    }
}

impl TeacherState {
    /// A job's work, from its record (a resumed job is checked against the grants again: the
    /// operator may have narrowed them since).
    async fn run(&self, job: &Job, entry: &Arc<JobEntry>) -> Result<Outcome, Error> {
        distill_jobs::faults::hit("job-start");
        let Some(job_spec::Spec::Labeling(spec)) = job.spec.as_ref().and_then(|s| s.spec.as_ref()) else {
            return Err(Error::Internal("not a labelling job".into()));
        };
        access::check(spec, &self.grants)?;
        self.grants.location("output_uri", &job.output_uri)?;
        let ctx = TeacherContext {
            store: Some(self.store.clone()),
            api_key: self.secret(&job.id).await,
            device: Some(self.device.clone()),
            endpoints: self.grants.endpoints.clone(),
        };
        let output = Location::parse(&job.output_uri)?;
        let job =
            labeling::LabelingJob { spec, id: &job.id, ctx: &ctx, jobs: &self.jobs, entry, cancel: &entry.cancel };
        labeling::run(job, output).await
    }

    /// Where API keys given in job specs wait for their job (so it can resume after a restart); never
    /// returned by any RPC. Prefer giving the service the key in its environment (`api_key_env`).
    fn secrets(&self) -> Location {
        self.store.child("secrets")
    }

    async fn secret(&self, job_id: &str) -> Option<String> {
        let bytes = self.secrets().get(job_id).await.ok()?;
        String::from_utf8(bytes.to_vec()).ok()
    }
}

/// Takes the API key out of a spec: the stored and returned job never holds it.
fn take_api_key(spec: &mut LabelingSpec) -> Option<String> {
    match spec.teacher.as_mut().and_then(|t| t.teacher.as_mut()) {
        Some(distill_proto::teacher_spec::Teacher::Llm(l)) => {
            let key = std::mem::take(&mut l.endpoint.as_mut()?.api_key);
            (!key.is_empty()).then_some(key)
        }
        _ => None,
    }
}

#[tonic::async_trait]
impl TeacherService for Teacher {
    async fn start_labeling(&self, request: Request<LabelingSpec>) -> Result<Response<Job>, Status> {
        let mut spec = request.into_inner();
        // The grants first: validation opens files, which must not happen outside them.
        access::check(&spec, &self.0.grants)?;
        labeling::validate(&spec, &self.0.grants.endpoints)?;
        let api_key = take_api_key(&mut spec);
        let id = uuid::Uuid::now_v7().to_string();
        let output = if spec.output_uri.is_empty() {
            self.0.store.child(&format!("datasets/{id}")).uri().to_string()
        } else {
            spec.output_uri.clone()
        };
        // Refuse an output that already holds a committed dataset before queueing anything.
        let loc = Location::parse(&output).map_err(Error::from)?;
        if loc.exists(distill_shards::MANIFEST_NAME).await.map_err(Error::from)? {
            return Err(
                Error::FailedPrecondition(format!("output_uri: {output} already holds a committed dataset")).into()
            );
        }
        if let Some(key) = api_key {
            self.0.secrets().put(&id, key.into_bytes().into()).await.map_err(Error::from)?;
        }
        let entry = self
            .0
            .jobs
            .create(JobKind::Labeling, JobSpec { spec: Some(job_spec::Spec::Labeling(spec)) }, output, id)
            .await?;
        let job = entry.snapshot();
        self.0.clone().spawn(entry);
        Ok(Response::new(job))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.0.jobs.find(&request.into_inner().id).await?.snapshot()))
    }

    type WatchJobStream = distill_jobs::EventStream;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        Ok(Response::new(distill_jobs::watch(self.0.jobs.find(&request.into_inner().id).await?)))
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(distill_jobs::cancel(&self.0.jobs, &request.into_inner().id).await?))
    }

    async fn resume_job(&self, request: Request<ResumeJobRequest>) -> Result<Response<Job>, Status> {
        let entry = self.0.jobs.reopen(&request.into_inner().id).await?;
        self.0.clone().spawn(entry.clone());
        Ok(Response::new(entry.snapshot()))
    }

    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        Ok(Response::new(distill_jobs::list(&self.0.jobs, request.into_inner().state())))
    }

    async fn score(&self, request: Request<ScoreRequest>) -> Result<Response<ScoreResponse>, Status> {
        if !self.0.scorer_configured.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Unimplemented(
                "this teacher service has no scorer: start it with --score-model DIR (repeat for an ensemble)".into(),
            )
            .into());
        }
        let Some(scorer) = self.0.scorer.get().cloned() else {
            return Err(Status::unavailable("the scoring models are still loading (health: NOT_SERVING)"));
        };
        let pairs: Vec<(String, String)> =
            request.into_inner().pairs.into_iter().map(|p| (p.query, p.passage)).collect();
        if pairs.len() > MAX_SCORE_PAIRS {
            return Err(Error::InvalidArgument(format!(
                "pairs: {} pairs in one request, at most {MAX_SCORE_PAIRS}",
                pairs.len()
            ))
            .into());
        }
        let teacher = scorer.identity().name;
        distill_jobs::metrics::METRICS.pairs_scored.inc_by(pairs.len() as u64);
        let (combined, members) = tokio::task::spawn_blocking(move || scorer.score_pairs(&pairs))
            .await
            .map_err(|e| Error::Internal(format!("scoring task: {e}")))??;
        Ok(Response::new(ScoreResponse {
            scores: combined.into_iter().map(|s| s as f32).collect(),
            teacher,
            members: members
                .into_iter()
                .map(|m| distill_proto::MemberScores { scores: m.into_iter().map(|s| s as f32).collect() })
                .collect(),
        }))
    }
}
