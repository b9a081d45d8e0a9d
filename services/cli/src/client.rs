//! Connecting to a service: address, optional TLS (custom CA) and the bearer token.

use distill_proto::teacher_service_client::TeacherServiceClient;
use distill_proto::trainer_service_client::TrainerServiceClient;
use distill_proto::{
    CancelJobRequest, GetJobRequest, Job, JobEvent, JobState, ListJobsRequest, ResumeJobRequest, WatchJobRequest,
};
use std::path::PathBuf;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// Teacher service address (http:// or https://).
    #[arg(long = "teacher", env = "DISTILL_TEACHER_ADDR", default_value = "http://127.0.0.1:50051", global = true)]
    pub teacher_addr: String,
    /// Trainer service address (http:// or https://).
    #[arg(long = "trainer", env = "DISTILL_TRAINER_ADDR", default_value = "http://127.0.0.1:50052", global = true)]
    pub trainer_addr: String,
    /// Bearer token sent to the services.
    #[arg(long, env = "DISTILL_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, env = "DISTILL_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for https:// addresses.
    #[arg(long, env = "DISTILL_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Teacher = TeacherServiceClient<InterceptedService<Channel, Bearer>>;
pub type Trainer = TrainerServiceClient<InterceptedService<Channel, Bearer>>;

/// Job control, which both services offer.
#[tonic::async_trait]
pub trait JobControl: Send {
    async fn get(&mut self, id: &str) -> Result<Job, tonic::Status>;
    async fn watch(&mut self, id: &str) -> Result<tonic::Streaming<JobEvent>, tonic::Status>;
    async fn cancel(&mut self, id: &str) -> Result<Job, tonic::Status>;
    async fn resume(&mut self, id: &str) -> Result<Job, tonic::Status>;
    async fn list(&mut self, state: JobState) -> Result<Vec<Job>, tonic::Status>;
}

macro_rules! job_control {
    ($client:ty) => {
        #[tonic::async_trait]
        impl JobControl for $client {
            async fn get(&mut self, id: &str) -> Result<Job, tonic::Status> {
                Ok(self.get_job(GetJobRequest { id: id.to_string() }).await?.into_inner())
            }
            async fn watch(&mut self, id: &str) -> Result<tonic::Streaming<JobEvent>, tonic::Status> {
                Ok(self.watch_job(WatchJobRequest { id: id.to_string() }).await?.into_inner())
            }
            async fn cancel(&mut self, id: &str) -> Result<Job, tonic::Status> {
                Ok(self.cancel_job(CancelJobRequest { id: id.to_string() }).await?.into_inner())
            }
            async fn resume(&mut self, id: &str) -> Result<Job, tonic::Status> {
                Ok(self.resume_job(ResumeJobRequest { id: id.to_string() }).await?.into_inner())
            }
            async fn list(&mut self, state: JobState) -> Result<Vec<Job>, tonic::Status> {
                Ok(self.list_jobs(ListJobsRequest { state: state as i32 }).await?.into_inner().jobs)
            }
        }
    };
}
job_control!(Teacher);
job_control!(Trainer);

impl Connection {
    fn bearer(&self) -> anyhow::Result<Bearer> {
        let token = match (&self.token_file, &self.token) {
            (Some(f), _) => {
                Some(std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("token file {}: {e}", f.display()))?)
            }
            (None, t) => t.clone(),
        };
        let value = match token.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
            Some(t) => Some(
                format!("Bearer {t}").parse().map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?,
            ),
            None => None,
        };
        Ok(Bearer(value))
    }

    pub async fn channel(&self, addr: &str) -> anyhow::Result<Channel> {
        let mut endpoint =
            Endpoint::from_shared(addr.to_string()).map_err(|e| anyhow::anyhow!("address {addr}: {e}"))?;
        if addr.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.ca_cert {
                let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("CA certificate {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        endpoint.connect().await.map_err(|e| anyhow::anyhow!("cannot reach {addr}: {e}"))
    }

    pub async fn trainer(&self) -> anyhow::Result<Trainer> {
        let channel = self.channel(&self.trainer_addr).await?;
        Ok(TrainerServiceClient::with_interceptor(channel, self.bearer()?))
    }

    pub async fn teacher(&self) -> anyhow::Result<Teacher> {
        let channel = self.channel(&self.teacher_addr).await?;
        Ok(TeacherServiceClient::with_interceptor(channel, self.bearer()?))
    }
}
