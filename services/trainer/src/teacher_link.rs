//! Following a labelling job of a teacher service over gRPC, as any client would: where its
//! dataset is written, what it will hold, and whether it is still running.

use crate::objectives::DatasetFields;
use crate::Error;
use distill_proto::teacher_service_client::TeacherServiceClient;
use distill_proto::{job_spec, GetJobRequest, Job, JobKind, JobState, OutputLayout, TeacherJobRef};
use distill_shards::Layout;
use tonic::transport::Channel;

#[derive(Clone)]
pub struct TeacherJob {
    client: TeacherServiceClient<Channel>,
    pub job_id: String,
    pub address: String,
    token: Option<String>,
}

impl TeacherJob {
    pub async fn connect(r: &TeacherJobRef) -> Result<Self, Error> {
        if r.address.is_empty() || r.job_id.is_empty() {
            return Err(Error::InvalidArgument("teacher_job: address and job_id are both required".into()));
        }
        let client = TeacherServiceClient::connect(r.address.clone()).await.map_err(|e| {
            Error::InvalidArgument(format!("teacher_job: cannot reach the teacher at {}: {e}", r.address))
        })?;
        let token = std::env::var("DISTILL_TEACHER_TOKEN").ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        Ok(Self { client, job_id: r.job_id.clone(), address: r.address.clone(), token })
    }

    pub async fn job(&self) -> Result<Job, Error> {
        let mut req = tonic::Request::new(GetJobRequest { id: self.job_id.clone() });
        if let Some(t) = &self.token {
            let value = format!("Bearer {t}")
                .parse()
                .map_err(|_| Error::InvalidArgument("DISTILL_TEACHER_TOKEN is not a valid header value".into()))?;
            req.metadata_mut().insert("authorization", value);
        }
        let job = self.client.clone().get_job(req).await.map_err(|s| {
            Error::InvalidArgument(format!("teacher_job: {} at {}: {}", self.job_id, self.address, s.message()))
        })?;
        Ok(job.into_inner())
    }

    /// Fails when the teacher job ended without committing its dataset.
    pub async fn check_alive(&self) -> Result<(), Error> {
        let job = self.job().await?;
        match job.state() {
            JobState::Failed | JobState::Cancelled => Err(Error::InvalidInput(format!(
                "teacher job {} ended {:?} before committing its dataset{}",
                self.job_id,
                job.state(),
                if job.error.is_empty() { String::new() } else { format!(": {}", job.error) }
            ))),
            _ => Ok(()),
        }
    }
}

/// What a labelling job's dataset will hold, from its spec: the layout, and the fields an
/// objective is checked against before any shard exists.
pub fn planned(job: &Job) -> Result<(Layout, DatasetFields), Error> {
    let spec = match (job.kind(), job.spec.as_ref().and_then(|s| s.spec.as_ref())) {
        (JobKind::Labeling, Some(job_spec::Spec::Labeling(spec))) => spec,
        _ => return Err(Error::InvalidArgument(format!("teacher_job: {} is not a labelling job", job.id))),
    };
    let lists = spec.layout() == OutputLayout::Lists;
    let labels_given = match spec.source.as_ref().and_then(|s| s.source.as_ref()) {
        Some(distill_proto::candidate_source::Source::Trec(t)) => !t.qrels.is_empty(),
        Some(distill_proto::candidate_source::Source::Jsonl(_)) => true,
        None => false,
    };
    let fields = DatasetFields { lists, labels: !lists || labels_given, teacher_scores: true, teacher_ranks: lists };
    Ok((if lists { Layout::Lists } else { Layout::Triples }, fields))
}
