//! `distill-trainer`: the training and evaluation service.

use clap::Parser;
use distill_proto::trainer_service_server::TrainerServiceServer;
use std::net::SocketAddr;

#[derive(Parser, Debug)]
#[command(
    name = "distill-trainer",
    version,
    about = "Trains student re-rankers on teacher shards, evaluates them, exports Hugging Face checkpoints"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "DISTILL_ADDR", default_value = "127.0.0.1:50052")]
    addr: SocketAddr,
    #[command(flatten)]
    service: distill_jobs::serving::ServiceArgs,
    /// Where training and evaluation run: cpu, cuda or cuda:N (CUDA needs a binary built with
    /// `--features cuda`).
    #[arg(long, env = "DISTILL_DEVICE", default_value = "cpu")]
    device: String,
    /// A teacher service training jobs may follow (`teacher_job.address`), e.g.
    /// http://teacher:50051; repeat, or comma-separated. DISTILL_TEACHER_TOKEN is sent only there.
    #[arg(long = "allow-teacher", env = "DISTILL_ALLOW_TEACHERS", value_delimiter = ',')]
    allow_teachers: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    distill_models::alloc::keep_freed_memory();
    let args = Args::parse();
    let device = distill_models::parse_device(&args.device)?;
    let cfg = args.service.setup(args.addr)?;
    tracing::info!(device = %distill_models::device_name(&device), "models run here");
    let teachers = distill_trainer::teacher_link::TeacherLinks::configure(&args.allow_teachers)?;
    let start = |setup| async move {
        let trainer = distill_trainer::service::Trainer::start(setup, device, teachers).await?;
        let jobs = trainer.jobs();
        let service = TrainerServiceServer::new(trainer)
            .max_decoding_message_size(distill_jobs::serving::MAX_REQUEST_BYTES)
            .max_encoding_message_size(distill_jobs::serving::MAX_RESPONSE_BYTES);
        Ok(distill_jobs::serving::Started { service, ready: None, jobs })
    };
    distill_jobs::serving::serve(cfg, start, distill_jobs::serving::shutdown_signal()).await
}
