//! The gRPC face of the trainer: training and evaluation jobs, and job control.

use crate::access::Grants;
use crate::evaluation::{self, EvalData};
use crate::training::{self, Outcome};
use crate::Error;
use bytes::Bytes;
use distill_jobs::{JobEntry, Jobs};
use distill_proto::trainer_service_server::TrainerService;
use distill_proto::{
    job_spec, CancelJobRequest, EvaluationSpec, GetJobRequest, Job, JobKind, JobSpec, JobState, ListJobsRequest,
    ListJobsResponse, Progress, ResumeJobRequest, TrainingSpec, WatchJobRequest,
};
use distill_store::Location;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

pub struct TrainerState {
    jobs: Arc<Jobs>,
    store: Location,
    permits: Arc<Semaphore>,
    /// Where training and evaluation run (`--device`).
    device: candle_core::Device,
    /// The locations and teachers requests may use.
    grants: Grants,
}

/// The gRPC handle (cheap to clone).
#[derive(Clone)]
pub struct Trainer(Arc<TrainerState>);

impl Trainer {
    /// The job table (for metrics).
    pub fn jobs(&self) -> Arc<Jobs> {
        self.0.jobs.clone()
    }

    /// Loads the job table from `store` and resumes the jobs a previous run left unfinished
    /// (training resumes from its newest checkpoint).
    pub async fn start(
        setup: distill_jobs::serving::Setup,
        device: candle_core::Device,
        teachers: crate::teacher_link::TeacherLinks,
    ) -> Result<Self, Error> {
        let (jobs, resume) = Jobs::load(setup.store.child("jobs"), setup.replica.clone()).await?;
        let permits = Arc::new(Semaphore::new(setup.max_concurrent_jobs.max(1)));
        let grants = Grants { allow: setup.allow, teachers };
        let state = Arc::new(TrainerState { jobs, store: setup.store, permits, device, grants });
        for entry in resume {
            tracing::info!(job = %entry.id(), "resuming job after restart");
            state.clone().spawn(entry);
        }
        // Jobs of replicas that stopped renewing their leases, taken over.
        let service = Arc::downgrade(&state);
        state.jobs.keep(move |entry| service.upgrade().map(|s| s.spawn(entry)).is_some());
        Ok(Self(state))
    }
}

enum Done {
    Ok(String),
    Cancelled,
}

impl TrainerState {
    fn spawn(self: Arc<Self>, entry: Arc<JobEntry>) {
        tokio::spawn(async move {
            let _permit = self.permits.clone().acquire_owned().await;
            if entry.cancel.is_cancelled() {
                return;
            }
            self.jobs.set_state(&entry, JobState::Running, "").await;
            let result = distill_jobs::contain_panics(self.run(entry.clone()))
                .await
                .unwrap_or_else(|panic| Err(Error::Internal(panic)));
            match result {
                Ok(Done::Ok(message)) => {
                    self.jobs.log(&entry, "info", message);
                    self.jobs.set_state(&entry, JobState::Succeeded, "").await
                }
                Ok(Done::Cancelled) => self.jobs.set_state(&entry, JobState::Cancelled, "").await,
                Err(e) => self.jobs.set_state(&entry, JobState::Failed, &e.to_string()).await,
            }
        });
    }

    /// A job's work, from its record (a resumed job is checked against the grants again: the
    /// operator may have narrowed them since).
    async fn run(&self, entry: Arc<JobEntry>) -> Result<Done, Error> {
        distill_jobs::faults::hit("job-start");
        let job = entry.snapshot();
        self.grants.location("output_uri", &job.output_uri)?;
        let out = Location::parse(&job.output_uri)?;
        match job.spec.and_then(|s| s.spec) {
            Some(job_spec::Spec::Training(spec)) => {
                self.grants.check_training(&spec)?;
                self.train(spec, out, entry).await
            }
            Some(job_spec::Spec::Evaluation(spec)) => {
                self.grants.check_evaluation(&spec)?;
                self.evaluate(spec, out, entry).await
            }
            _ => Err(Error::Internal("not a trainer job".into())),
        }
    }

    async fn train(&self, spec: TrainingSpec, output: Location, entry: Arc<JobEntry>) -> Result<Done, Error> {
        let prepared = training::prepare(&spec, &self.grants).await?;
        let jobs = self.jobs.clone();
        let job = training::JobContext { jobs, entry, runtime: tokio::runtime::Handle::current() };
        let out = output.clone();
        let device = self.device.clone();
        let outcome = tokio::task::spawn_blocking(move || training::run(prepared, out, job, device))
            .await
            .map_err(|e| Error::Internal(format!("training thread: {e}")))??;
        Ok(match outcome {
            Outcome::Finished { steps, best } => Done::Ok(match best {
                Some(b) => format!(
                    "trained {steps} steps; exported {} and {} (best {} = {:.4} at step {})",
                    output.child("final").uri(),
                    output.child("best").uri(),
                    b.metric,
                    b.value,
                    b.step
                ),
                None => format!("trained {steps} steps; exported {}", output.child("final").uri()),
            }),
            Outcome::Cancelled => Done::Cancelled,
        })
    }

    async fn evaluate(&self, spec: EvaluationSpec, output: Location, entry: Arc<JobEntry>) -> Result<Done, Error> {
        let data = Arc::new(EvalData::load(&spec).await?);
        let model_dir = distill_store::materialize_dir(&spec.model).await?;
        let jobs = self.jobs.clone();
        let handle = tokio::runtime::Handle::current();
        let e = entry.clone();
        let max_q = if spec.max_query_length == 0 { 32 } else { spec.max_query_length as usize };
        let max_len = if spec.max_length == 0 { 256 } else { spec.max_length as usize };
        let batch = if spec.batch_size == 0 { 32 } else { spec.batch_size as usize };
        let d = data.clone();
        let device = self.device.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<Option<_>, Error> {
            let data = d;
            let model = distill_models::CrossEncoder::load(&model_dir, max_q, max_len, &device)?;
            let run = data.rerank(&model, batch, |done, total| {
                let p =
                    Progress { done: done as u64, total: total as u64, unit: "queries".into(), ..Default::default() };
                handle.block_on(jobs.set_progress(&e, p, false));
                // Cancelled: stop after this query.
                if e.cancel.is_cancelled() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
            let Some(run) = run else { return Ok(None) };
            let first_stage = data.measure(&data.run);
            let reranked = data.measure(&run);
            Ok(Some((run, first_stage, reranked)))
        })
        .await
        .map_err(|e| Error::Internal(format!("evaluation thread: {e}")))??;
        let Some((run, first_stage, reranked)) = result else {
            return Ok(Done::Cancelled);
        };
        self.jobs.confirm(&entry).await?;
        output.put("run.trec", Bytes::from(evaluation::format_run(&run, "distill"))).await?;
        let as_map = |v: &[(String, f64)]| v.iter().cloned().collect::<HashMap<String, f64>>();
        let metrics = serde_json::json!({
            "model": spec.model, "run": spec.run, "queries": run.len(), "top_k": data.top_k,
            "metrics": as_map(&reranked), "first_stage": as_map(&first_stage),
        });
        output.put("metrics.json", Bytes::from(serde_json::to_vec_pretty(&metrics).expect("JSON"))).await?;
        let mut counters = HashMap::new();
        for (name, v) in &reranked {
            self.jobs.metric(&entry, name, *v, 0);
            counters.insert(name.clone(), *v);
        }
        let p = Progress {
            done: run.len() as u64,
            total: run.len() as u64,
            unit: "queries".into(),
            counters,
            ..Default::default()
        };
        self.jobs.set_progress(&entry, p, true).await;
        let summary: Vec<String> = reranked.iter().map(|(n, v)| format!("{n}={v:.4}")).collect();
        Ok(Done::Ok(format!("evaluated {} queries: {}; wrote {}", run.len(), summary.join(" "), output.uri())))
    }

    async fn create(
        &self,
        kind: JobKind,
        spec: job_spec::Spec,
        output_uri: &str,
        default_dir: &str,
    ) -> Result<Job, Error> {
        let id = uuid::Uuid::now_v7().to_string();
        let output = if output_uri.is_empty() {
            self.store.child(&format!("{default_dir}/{id}")).uri().to_string()
        } else {
            output_uri.to_string()
        };
        Location::parse(&output).map_err(|e| Error::InvalidArgument(format!("output_uri: {e}")))?;
        let entry = self.jobs.create(kind, JobSpec { spec: Some(spec) }, output, id).await?;
        Ok(entry.snapshot())
    }
}

#[tonic::async_trait]
impl TrainerService for Trainer {
    async fn start_training(&self, request: Request<TrainingSpec>) -> Result<Response<Job>, Status> {
        let spec = request.into_inner();
        // The grants first (nothing is opened outside them), then everything that can be checked
        // before queueing: hyper-parameters and their bounds, datasets, objective against them,
        // backbone, evaluation files.
        self.0.grants.check_training(&spec)?;
        training::prepare(&spec, &self.0.grants).await?;
        let out = spec.output_uri.clone();
        let job = self.0.create(JobKind::Training, job_spec::Spec::Training(spec), &out, "training").await?;
        self.0.clone().spawn(self.0.jobs.get(&job.id)?);
        Ok(Response::new(job))
    }

    async fn start_evaluation(&self, request: Request<EvaluationSpec>) -> Result<Response<Job>, Status> {
        let spec = request.into_inner();
        self.0.grants.check_evaluation(&spec)?;
        evaluation::validate(&spec, true)?;
        let out = spec.output_uri.clone();
        let job = self.0.create(JobKind::Evaluation, job_spec::Spec::Evaluation(spec), &out, "evaluations").await?;
        self.0.clone().spawn(self.0.jobs.get(&job.id)?);
        Ok(Response::new(job))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.0.jobs.find(&request.into_inner().id).await.map_err(Error::from)?.snapshot()))
    }

    type WatchJobStream = distill_jobs::EventStream;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        Ok(Response::new(distill_jobs::watch(self.0.jobs.find(&request.into_inner().id).await.map_err(Error::from)?)))
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(distill_jobs::cancel(&self.0.jobs, &request.into_inner().id).await.map_err(Error::from)?))
    }

    async fn resume_job(&self, request: Request<ResumeJobRequest>) -> Result<Response<Job>, Status> {
        let entry = self.0.jobs.reopen(&request.into_inner().id).await.map_err(Error::from)?;
        self.0.clone().spawn(entry.clone());
        Ok(Response::new(entry.snapshot()))
    }

    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        Ok(Response::new(distill_jobs::list(&self.0.jobs, request.into_inner().state())))
    }
}
