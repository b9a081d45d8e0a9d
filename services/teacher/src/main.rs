//! `distill-teacher`: the labelling service.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "distill-teacher", version, about = "Labels candidate lists with a teacher and writes Parquet shards")]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "DISTILL_ADDR", default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    /// Where the service keeps job records and default outputs: a path or object-store URL.
    #[arg(long, env = "DISTILL_STORE", default_value = "./distill-data")]
    store: String,
    /// File holding the bearer token clients must send; without it (or DISTILL_AUTH_TOKEN) no auth.
    #[arg(long, env = "DISTILL_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// TLS certificate (PEM); with --tls-key, the service speaks TLS.
    #[arg(long, env = "DISTILL_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "DISTILL_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Labelling jobs run at once; the rest wait QUEUED.
    #[arg(long, env = "DISTILL_MAX_CONCURRENT_JOBS", default_value_t = 2)]
    max_concurrent_jobs: usize,
    /// Log as JSON lines.
    #[arg(long, env = "DISTILL_LOG_JSON")]
    log_json: bool,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Both ring and aws-lc-rs are linked (object_store's HTTP stack); pick one for TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    // The token is read here and never logged.
    let token = distill_teacher::auth::load_token(
        args.auth_token_file.as_deref(),
        std::env::var("DISTILL_AUTH_TOKEN").ok().as_deref(),
    )?;
    tracing::info!(addr = %args.addr, store = %args.store, tls = args.tls_cert.is_some(), "starting");
    let cfg = distill_teacher::server::ServerConfig {
        addr: args.addr,
        store: args.store,
        auth_token: token,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        max_concurrent_jobs: args.max_concurrent_jobs,
    };
    distill_teacher::server::serve(cfg, shutdown_signal()).await
}
