//! `distill health`: asks a service's gRPC health endpoint, for container health checks
//! (Dockerfile HEALTHCHECK, compose); Kubernetes uses its own gRPC probes.

use crate::client::Connection;
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// The service's address (http:// or https://). Default: the DISTILL_ADDR the service in this
    /// container listens on, with 0.0.0.0 / [::] read as localhost (https when DISTILL_TLS_CERT is set).
    #[arg(long)]
    addr: Option<String>,
    /// Ask for one gRPC service (e.g. distill.v1.TrainerService, which is SERVING once its jobs are
    /// loaded); default: the server as a whole.
    #[arg(long, default_value = "")]
    service: String,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

/// The address a service started with `DISTILL_ADDR=listen` answers on from inside its container.
pub fn local_address(listen: &str, tls: bool) -> String {
    let (host, port) = listen.rsplit_once(':').unwrap_or((listen, "50051"));
    let host = match host {
        "0.0.0.0" | "" => "127.0.0.1",
        "[::]" => "[::1]",
        h => h,
    };
    format!("{}://{host}:{port}", if tls { "https" } else { "http" })
}

/// Ok when the service answers SERVING; an error naming the status otherwise.
pub async fn run(args: HealthArgs, conn: &Connection) -> anyhow::Result<()> {
    let addr = match args.addr {
        Some(a) => a,
        None => local_address(
            &std::env::var("DISTILL_ADDR").unwrap_or_else(|_| "127.0.0.1:50051".into()),
            std::env::var_os("DISTILL_TLS_CERT").is_some(),
        ),
    };
    let what = if args.service.is_empty() { addr.clone() } else { format!("{addr} {}", args.service) };
    let ask = async {
        let channel = conn.channel(&addr).await?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest { service: args.service.clone() })
            .await
            .map_err(|s| anyhow::anyhow!("{what}: {:?}: {}", s.code(), s.message()))?;
        anyhow::Ok(reply.into_inner().status())
    };
    let status = tokio::time::timeout(Duration::from_secs(args.timeout), ask)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}: no health answer within {} s", args.timeout))??;
    match status {
        ServingStatus::Serving => {
            println!("{what}: SERVING");
            Ok(())
        }
        s => anyhow::bail!("{what}: {}", s.as_str_name()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn listen_addresses_map_to_local_ones() {
        assert_eq!(super::local_address("0.0.0.0:50052", false), "http://127.0.0.1:50052");
        assert_eq!(super::local_address("[::]:50051", true), "https://[::1]:50051");
        assert_eq!(super::local_address("10.0.0.5:7000", false), "http://10.0.0.5:7000");
    }
}
