//! Following a labelling job of a teacher service over gRPC, as any client would: where its
//! dataset is written, what it will hold, and whether it is still running.

use crate::objectives::DatasetFields;
use crate::Error;
use distill_proto::teacher_service_client::TeacherServiceClient;
use distill_proto::{job_spec, GetJobRequest, Job, JobKind, JobState, OutputLayout, TeacherJobRef};
use distill_shards::Layout;
use tonic::transport::Channel;

/// The teacher services the operator lets training jobs follow (`--allow-teacher`): the trainer
/// sends its DISTILL_TEACHER_TOKEN there, and nowhere else.
#[derive(Clone, Debug, Default)]
pub struct TeacherLinks {
    allowed: Vec<String>,
}

/// How long connecting to a teacher may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one call to a teacher may take.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn normalise(address: &str) -> String {
    address.trim().trim_end_matches('/').to_ascii_lowercase()
}

impl TeacherLinks {
    /// From `--allow-teacher` entries: http:// or https:// addresses.
    pub fn configure(entries: &[String]) -> anyhow::Result<Self> {
        let mut allowed = Vec::new();
        for e in entries.iter().filter(|e| !e.trim().is_empty()) {
            match url::Url::parse(e.trim()) {
                Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {}
                _ => anyhow::bail!("--allow-teacher {e:?}: an http(s)://host:port address expected"),
            }
            allowed.push(normalise(e));
        }
        Ok(Self { allowed })
    }

    /// Refuses an address the operator did not list (PERMISSION_DENIED naming the field).
    pub fn check(&self, address: &str) -> Result<(), Error> {
        if self.allowed.contains(&normalise(address)) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "teacher_job.address: {address} is not a teacher this trainer may follow (the operator's \
             --allow-teacher / DISTILL_ALLOW_TEACHERS; allowed: {})",
            if self.allowed.is_empty() { "none".to_string() } else { self.allowed.join(", ") }
        )))
    }
}

/// TLS towards an https:// teacher: the CA certificate (PEM) the operator names in
/// DISTILL_TEACHER_CA_CERT (for a private CA), else none beyond the system's.
fn teacher_tls() -> Result<tonic::transport::ClientTlsConfig, String> {
    let tls = tonic::transport::ClientTlsConfig::new();
    match std::env::var("DISTILL_TEACHER_CA_CERT").ok().filter(|p| !p.trim().is_empty()) {
        Some(path) => {
            let pem = std::fs::read(&path).map_err(|e| format!("DISTILL_TEACHER_CA_CERT {path}: {e}"))?;
            Ok(tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)))
        }
        None => Ok(tls),
    }
}

#[derive(Clone)]
pub struct TeacherJob {
    client: TeacherServiceClient<Channel>,
    pub job_id: String,
    pub address: String,
    token: Option<String>,
}

impl TeacherJob {
    pub async fn connect(r: &TeacherJobRef, links: &TeacherLinks) -> Result<Self, Error> {
        if r.address.is_empty() || r.job_id.is_empty() {
            return Err(Error::InvalidArgument("teacher_job: address and job_id are both required".into()));
        }
        links.check(&r.address)?;
        let unreachable =
            |e: String| Error::InvalidArgument(format!("teacher_job: cannot reach the teacher at {}: {e}", r.address));
        let endpoint = tonic::transport::Endpoint::from_shared(r.address.clone())
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let endpoint = if r.address.starts_with("https://") {
            endpoint.tls_config(teacher_tls().map_err(&unreachable)?).map_err(|e| unreachable(e.to_string()))?
        } else {
            endpoint
        };
        let client = TeacherServiceClient::new(endpoint.connect().await.map_err(|e| unreachable(e.to_string()))?);
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
