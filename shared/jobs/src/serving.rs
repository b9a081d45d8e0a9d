//! Serving plumbing both services use: TLS from PEM files, binding and announcing the address,
//! shutdown on SIGTERM / Ctrl-C, and logging setup.

use std::net::SocketAddr;
use std::path::Path;
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// A server builder, speaking TLS when both a certificate and a key are given.
pub fn builder(tls_cert: Option<&Path>, tls_key: Option<&Path>) -> anyhow::Result<Server> {
    let builder = Server::builder();
    match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => {
            let cert = std::fs::read(cert).map_err(|e| anyhow::anyhow!("TLS certificate {}: {e}", cert.display()))?;
            let key = std::fs::read(key).map_err(|e| anyhow::anyhow!("TLS key {}: {e}", key.display()))?;
            Ok(builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?)
        }
        (None, None) => Ok(builder),
        _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key"),
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Prints `listening on <addr>` on stdout, so that callers binding port 0 learn the port.
pub fn announce(local: SocketAddr) {
    use std::io::Write;
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

/// Logs to stderr, as JSON lines when `json`; `RUST_LOG` filters (default `info`).
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if json {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
}

/// The flags both services take besides their address (each also read from the environment).
#[derive(clap::Args, Debug, Clone)]
pub struct ServiceArgs {
    /// Where the service keeps job records and default outputs: a path or object-store URL.
    #[arg(long, env = "DISTILL_STORE", default_value = "./distill-data")]
    pub store: String,
    /// File holding the bearer token clients must send; without it (or DISTILL_AUTH_TOKEN) no auth.
    #[arg(long, env = "DISTILL_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<std::path::PathBuf>,
    /// TLS certificate (PEM); with --tls-key, the service speaks TLS.
    #[arg(long, env = "DISTILL_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "DISTILL_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Jobs run at once; the rest wait QUEUED.
    #[arg(long, env = "DISTILL_MAX_CONCURRENT_JOBS", default_value_t = 1)]
    pub max_concurrent_jobs: usize,
    /// Log as JSON lines.
    #[arg(long, env = "DISTILL_LOG_JSON")]
    pub log_json: bool,
    /// Serve Prometheus metrics (`GET /metrics`) on this address, e.g. 0.0.0.0:9464.
    #[arg(long, env = "DISTILL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// A prefix requests may read and write besides the store (repeat, or comma-separated): a
    /// directory, file://, s3://bucket/prefix, memory://name, or hf://org (Hub models of org;
    /// hf:// for any). Anything else a request names is refused (PERMISSION_DENIED).
    #[arg(long = "allow-location", env = "DISTILL_ALLOW_LOCATIONS", value_delimiter = ',')]
    pub allow_locations: Vec<String>,
    /// Serve without a token on an address other than loopback (anyone who reaches the port may
    /// start jobs). Without it, such a service refuses to start.
    #[arg(long, env = "DISTILL_INSECURE")]
    pub insecure: bool,
    /// This replica's name among the services sharing the store (default: the host name, e.g. a
    /// pod's name): unique per running process, kept across its restarts.
    #[arg(long, env = "DISTILL_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Seconds a job's lease lasts unless its replica renews it (every third of it); a replica
    /// that died leaves its jobs to the others after this long.
    #[arg(long, env = "DISTILL_LEASE_TTL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub lease_ttl: u64,
    /// No other replica uses this store: run without leases (for a store that cannot do
    /// conditional writes; the service refuses such a store otherwise).
    #[arg(long, env = "DISTILL_SINGLE_REPLICA")]
    pub single_replica: bool,
    /// Seconds an S3 call keeps retrying (jittered backoff, 0.5 s growing to 15 s) through
    /// connection errors, timeouts, 5xx and throttling before the job fails: the longest store
    /// outage jobs wait out.
    #[arg(long, env = "DISTILL_STORE_RETRY_TIMEOUT", default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub store_retry_timeout: u64,
    /// Retries of one S3 call at most (within --store-retry-timeout).
    #[arg(long, env = "DISTILL_STORE_RETRIES", default_value_t = 100,
        value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub store_retries: u64,
}

/// What a service is started with, secrets resolved.
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub store: String,
    pub auth_token: Option<String>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    pub max_concurrent_jobs: usize,
    pub metrics_addr: Option<SocketAddr>,
    /// The locations requests may use: the operator's `--allow-location` entries and the store.
    pub allow: distill_store::access::AllowList,
    /// Who this replica is, for job leases; `None` with `--single-replica`.
    pub replica: Option<crate::lease::Replica>,
}

/// The largest gRPC request a service decodes (a `Score` request of many pairs; job specs are
/// small): larger ones answer RESOURCE_EXHAUSTED before anything is allocated for them.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
/// The largest response a service encodes.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// What a service's `start` gets: its store, job slots and the locations requests may use.
pub struct Setup {
    pub store: distill_store::Location,
    pub max_concurrent_jobs: usize,
    pub allow: std::sync::Arc<distill_store::access::AllowList>,
    /// Who this replica is, for job leases; `None`: the store's only replica.
    pub replica: Option<crate::lease::Replica>,
}

/// Refuses a service that anyone reaching its port could use: a non-loopback address without a
/// token, unless the operator says `--insecure`.
fn check_exposure(addr: SocketAddr, token: bool, insecure: bool) -> anyhow::Result<()> {
    if addr.ip().is_loopback() || token {
        return Ok(());
    }
    if insecure {
        tracing::warn!(addr = %addr, "serving without a token on a non-loopback address (--insecure)");
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen on {addr} without a token: anyone reaching it could start jobs. Set \
         DISTILL_AUTH_TOKEN or --auth-token-file (or listen on 127.0.0.1), or pass --insecure"
    )
}

impl ServiceArgs {
    /// Process setup every service binary does first: the TLS crypto provider, logging, and the
    /// auth token (read here and never logged).
    pub fn setup(self, addr: SocketAddr) -> anyhow::Result<ServerConfig> {
        // Both ring and aws-lc-rs are linked (object_store's HTTP stack); pick one for TLS.
        let _ = rustls::crypto::ring::default_provider().install_default();
        init_tracing(self.log_json);
        distill_store::set_retries(distill_store::Retries {
            max_retries: self.store_retries as usize,
            timeout: std::time::Duration::from_secs(self.store_retry_timeout),
        });
        let token = crate::auth::load_token(
            self.auth_token_file.as_deref(),
            std::env::var("DISTILL_AUTH_TOKEN").ok().as_deref(),
        )?;
        check_exposure(addr, token.is_some(), self.insecure)?;
        let mut allow = distill_store::access::AllowList::new(&self.allow_locations)
            .map_err(|e| anyhow::anyhow!("--allow-location: {e}"))?;
        allow.allow(&self.store).map_err(|e| anyhow::anyhow!("--store: {e}"))?;
        tracing::info!(addr = %addr, store = %self.store, tls = self.tls_cert.is_some(),
            allowed = ?self.allow_locations, "starting");
        Ok(ServerConfig {
            addr,
            store: self.store,
            auth_token: token,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            max_concurrent_jobs: self.max_concurrent_jobs,
            metrics_addr: self.metrics_addr,
            allow,
            replica: (!self.single_replica)
                .then(|| crate::lease::Replica::new(self.replica_id, std::time::Duration::from_secs(self.lease_ttl))),
        })
    }
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

/// What a service still has to load after it starts answering (a model); health says NOT_SERVING
/// until it resolves. An error stops the server.
pub type Ready = Option<futures::future::BoxFuture<'static, anyhow::Result<()>>>;

/// What a service's `start` gives `serve`: the gRPC service, what it still loads, its job table.
pub struct Started<S> {
    pub service: S,
    pub ready: Ready,
    pub jobs: std::sync::Arc<crate::table::Jobs>,
}

/// Reflection describing what this port serves: `service`, health and reflection itself (the
/// descriptor set holds both services' protos; the other service is not listed).
fn reflection_of(service: &str) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(distill_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(service)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
}

/// Serves one job service with gRPC health (NOT_SERVING until `start` has loaded the job table
/// and resumed unfinished jobs and its `Ready` has resolved, then SERVING) and reflection (v1 and
/// v1alpha, for older clients such as grpcurl 1.8), both
/// behind the bearer-token check (health excepted), until `shutdown` resolves. Prints
/// `listening on <addr>` once bound.
pub async fn serve<S, F, Fut>(
    cfg: ServerConfig,
    start: F,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()>
where
    F: FnOnce(Setup) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Started<S>>>,
    S: tonic::codegen::Service<HttpRequest, Response = HttpResponse, Error = std::convert::Infallible>
        + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    use tonic::service::interceptor::InterceptedService;
    let store = distill_store::Location::parse(&cfg.store)?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_service_status(S::NAME, tonic_health::ServingStatus::NotServing).await;
    let reflection = reflection_of(S::NAME).build_v1()?;
    let reflection_alpha = reflection_of(S::NAME).build_v1alpha()?;
    let auth = crate::auth::BearerAuth::new(cfg.auth_token.clone());
    let mut builder = builder(cfg.tls_cert.as_deref(), cfg.tls_key.as_deref())?.layer(crate::metrics::GrpcMetricsLayer);
    let (listener, local) = bind(cfg.addr).await?;

    let setup = Setup {
        store: store.clone(),
        max_concurrent_jobs: cfg.max_concurrent_jobs,
        allow: std::sync::Arc::new(cfg.allow),
        replica: cfg.replica,
    };
    let Started { service, ready, jobs } = start(setup).await?;
    if let Some(addr) = cfg.metrics_addr {
        let bound = crate::metrics::serve(addr, jobs).await?;
        tracing::info!(addr = %bound, "metrics on /metrics");
    }
    let check = auth.clone();
    let service = InterceptedService::new(service, move |r| check.check(r));
    let check = auth.clone();
    let reflection = InterceptedService::new(reflection, move |r| check.check(r));
    let check = auth.clone();
    let reflection_alpha = InterceptedService::new(reflection_alpha, move |r| check.check(r));
    if ready.is_none() {
        health_reporter.set_service_status(S::NAME, tonic_health::ServingStatus::Serving).await;
    }
    tracing::info!(addr = %local, store = %store, auth = auth.enabled(), service = S::NAME, "listening");
    announce(local);

    let serving = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown);
    let Some(ready) = ready else {
        serving.await?;
        return Ok(());
    };
    tokio::pin!(serving);
    tokio::select! {
        done = &mut serving => done?,
        loaded = ready => {
            loaded?;
            health_reporter.set_service_status(S::NAME, tonic_health::ServingStatus::Serving).await;
            tracing::info!(service = S::NAME, "ready");
            serving.await?
        }
    }
    Ok(())
}
