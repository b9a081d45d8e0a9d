//! `distill-teacher`: the labelling service.

use clap::Parser;
use distill_proto::teacher_service_server::TeacherServiceServer;
use std::net::SocketAddr;

#[derive(Parser, Debug)]
#[command(name = "distill-teacher", version, about = "Labels candidate lists with a teacher and writes Parquet shards")]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "DISTILL_ADDR", default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    #[command(flatten)]
    service: distill_jobs::serving::ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = args.service.setup(args.addr)?;
    let start = |store, jobs| async move {
        Ok(TeacherServiceServer::new(distill_teacher::service::Teacher::start(store, jobs).await?))
    };
    distill_jobs::serving::serve(cfg, start, distill_jobs::serving::shutdown_signal()).await
}
