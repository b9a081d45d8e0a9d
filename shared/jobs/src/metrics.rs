//! Prometheus metrics of a service, on their own port (`--metrics-addr`, `GET /metrics`):
//!
//! - `distill_grpc_requests_total{method,code}` and `distill_grpc_request_duration_seconds{method}`
//!   (a tower layer around every gRPC service; time to the response head, so a WatchJob stream
//!   counts until its first message);
//! - `distill_jobs{kind,state}`: the job table by kind and state;
//! - `distill_job_rows_written_total`, `distill_job_shards_written_total`,
//!   `distill_job_bytes_written_total`, `distill_job_work_done_total{kind,unit}` (queries labelled,
//!   training steps, queries evaluated) and `distill_job_counter_total{name}` (every job counter
//!   summed: LLM `requests`, `retries`, `prompt_tokens`, `completion_tokens`, `cache_hits`, ensemble
//!   `forward_passes`, `padded_tokens`, skips, ...), all derived from the persisted job progress, so
//!   they survive restarts;
//! - `distill_pairs_scored_total`: pairs answered by the teacher's Score RPC.

use crate::table::Jobs;
use distill_proto::{JobKind, JobState};
use futures::future::BoxFuture;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

pub struct Metrics {
    registry: Registry,
    grpc_requests: IntCounterVec,
    grpc_seconds: HistogramVec,
    pub pairs_scored: IntCounter,
}

/// The process's metrics (one service per process).
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let grpc_requests = IntCounterVec::new(
        Opts::new("distill_grpc_requests_total", "gRPC requests by method and status code"),
        &["method", "code"],
    )
    .expect("valid metric");
    let grpc_seconds = HistogramVec::new(
        HistogramOpts::new("distill_grpc_request_duration_seconds", "gRPC request latency (to the response head)")
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
        &["method"],
    )
    .expect("valid metric");
    let pairs_scored =
        IntCounter::new("distill_pairs_scored_total", "pairs scored by the Score RPC").expect("valid metric");
    registry.register(Box::new(grpc_requests.clone())).expect("registered once");
    registry.register(Box::new(grpc_seconds.clone())).expect("registered once");
    registry.register(Box::new(pairs_scored.clone())).expect("registered once");
    Metrics { registry, grpc_requests, grpc_seconds, pairs_scored }
});

fn kind_name(k: JobKind) -> &'static str {
    match k {
        JobKind::Labeling => "labeling",
        JobKind::Training => "training",
        JobKind::Evaluation => "evaluation",
        _ => "unspecified",
    }
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        _ => "unspecified",
    }
}

/// Escapes a label value for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The text exposition: the registry's families, then those derived from the job table.
pub fn render(jobs: &Jobs) -> String {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&METRICS.registry.gather(), &mut buf).expect("text encoding");
    let mut out = String::from_utf8(buf).expect("utf-8");
    let all = jobs.list(None);
    let mut by_state: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for kind in [JobKind::Labeling, JobKind::Training, JobKind::Evaluation] {
        for state in [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
            by_state.insert((kind_name(kind), state_name(state)), 0);
        }
    }
    let (mut rows, mut shards, mut bytes) = (0u64, 0u64, 0u64);
    let mut work: BTreeMap<(&str, String), u64> = BTreeMap::new();
    let mut counters: BTreeMap<String, f64> = BTreeMap::new();
    for j in &all {
        *by_state.entry((kind_name(j.kind()), state_name(j.state()))).or_default() += 1;
        if let Some(p) = &j.progress {
            rows += p.rows;
            shards += p.shards;
            bytes += p.bytes;
            *work.entry((kind_name(j.kind()), p.unit.clone())).or_default() += p.done;
            for (k, v) in &p.counters {
                *counters.entry(k.clone()).or_default() += v;
            }
        }
    }
    let _ =
        writeln!(out, "# HELP distill_jobs Jobs in the service's table by kind and state.\n# TYPE distill_jobs gauge");
    for ((k, s), n) in &by_state {
        let _ = writeln!(out, "distill_jobs{{kind=\"{k}\",state=\"{s}\"}} {n}");
    }
    for (name, help, v) in [
        ("distill_job_rows_written_total", "Shard rows written by labelling jobs.", rows),
        ("distill_job_shards_written_total", "Shards written by labelling jobs.", shards),
        ("distill_job_bytes_written_total", "Shard bytes written by labelling jobs.", bytes),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP distill_job_work_done_total Units of work done by jobs (queries labelled, training steps, ...).\n\
         # TYPE distill_job_work_done_total counter"
    );
    for ((k, unit), n) in &work {
        let _ = writeln!(out, "distill_job_work_done_total{{kind=\"{k}\",unit=\"{}\"}} {n}", label(unit));
    }
    let _ = writeln!(
        out,
        "# HELP distill_job_counter_total Job counters summed over jobs (LLM requests, retries, tokens, ...).\n\
         # TYPE distill_job_counter_total counter"
    );
    for (k, v) in &counters {
        let _ = writeln!(out, "distill_job_counter_total{{name=\"{}\"}} {v}", label(k));
    }
    out
}

/// Serves `GET /metrics` on `addr` until the process ends; returns the bound address.
pub async fn serve(addr: SocketAddr, jobs: Arc<Jobs>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics: cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let jobs = jobs.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], render(&jobs)) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    Ok(local)
}

/// The tower layer that counts and times gRPC requests.
#[derive(Clone, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
}

/// The gRPC methods the services serve (from the descriptor set), health and reflection.
static KNOWN_METHODS: LazyLock<std::collections::HashSet<String>> = LazyLock::new(|| {
    use prost::Message;
    let mut known: std::collections::HashSet<String> = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let set = prost_types::FileDescriptorSet::decode(distill_proto::v1::FILE_DESCRIPTOR_SET).expect("descriptor set");
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                known.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
            }
        }
    }
    known
});

/// The method label: a method the services know, else "other". The path comes from the client
/// before auth, so anything else must not become a label (the series would grow without bound).
fn method_of(path: &str) -> String {
    if KNOWN_METHODS.contains(path) {
        path.trim_start_matches('/').to_string()
    } else {
        "other".into()
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_of(req.uri().path());
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            // Errors travel in a trailers-only response (grpc-status in the head); success has it
            // in the trailers, after the head.
            let code = match &res {
                Ok(r) => r.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_string(),
                Err(_) => "transport".into(),
            };
            let m = &*METRICS;
            m.grpc_requests.with_label_values(&[method.as_str(), code.as_str()]).inc();
            m.grpc_seconds.with_label_values(&[method.as_str()]).observe(start.elapsed().as_secs_f64());
            res
        })
    }
}
