//! Serving: the teacher service behind optional bearer auth and TLS, plus gRPC health (SERVING
//! once the job table is loaded and unfinished jobs resumed) and reflection.

use crate::auth::BearerAuth;
use crate::service::Teacher;
use distill_proto::teacher_service_server::TeacherServiceServer;
use distill_store::Location;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};

pub struct ServerConfig {
    pub addr: SocketAddr,
    /// The service's own state: job records and default dataset outputs.
    pub store: String,
    pub auth_token: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_concurrent_jobs: usize,
}

/// Runs the server until `shutdown` resolves. Prints `listening on <addr>` on stdout once bound,
/// so that callers binding port 0 learn the port.
pub async fn serve(cfg: ServerConfig, shutdown: impl std::future::Future<Output = ()> + Send) -> anyhow::Result<()> {
    let store = Location::parse(&cfg.store)?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_not_serving::<TeacherServiceServer<Teacher>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(distill_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let auth = BearerAuth::new(cfg.auth_token.clone());
    let mut builder = Server::builder();
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        let cert = std::fs::read(cert).map_err(|e| anyhow::anyhow!("TLS certificate {}: {e}", cert.display()))?;
        let key = std::fs::read(key).map_err(|e| anyhow::anyhow!("TLS key {}: {e}", key.display()))?;
        builder = builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
    } else if cfg.tls_cert.is_some() || cfg.tls_key.is_some() {
        anyhow::bail!("TLS needs both --tls-cert and --tls-key");
    }

    let listener = tokio::net::TcpListener::bind(cfg.addr).await?;
    let local = listener.local_addr()?;

    let teacher = Teacher::start(store.clone(), cfg.max_concurrent_jobs).await?;
    let check = auth.clone();
    let teacher_svc = TeacherServiceServer::with_interceptor(teacher, move |r| check.check(r));
    let check = auth.clone();
    let reflection = InterceptedService::new(reflection, move |r| check.check(r));
    health_reporter.set_serving::<TeacherServiceServer<Teacher>>().await;
    tracing::info!(addr = %local, store = %store, auth = auth.enabled(), "teacher service ready");
    println!("listening on {local}");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(teacher_svc)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

