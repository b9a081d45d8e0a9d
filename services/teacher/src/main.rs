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
    /// Cross-encoder(s) the `Score` RPC uses (repeat, or comma-separated): directories, object-store
    /// prefixes or Hub ids. Loaded after start; health is NOT_SERVING until they are.
    #[arg(long = "score-model", env = "DISTILL_SCORE_MODELS", value_delimiter = ',')]
    score_models: Vec<String>,
    /// How the `Score` RPC combines several models: mean or znorm (per query).
    #[arg(long, env = "DISTILL_SCORE_COMBINATION", default_value = "mean", value_parser = ["mean", "znorm"])]
    score_combination: String,
    /// Token limit of the scoring models.
    #[arg(long, env = "DISTILL_SCORE_MAX_LENGTH", default_value_t = 512)]
    score_max_length: u32,
    /// Where model teachers and the scorer run: cpu, cuda or cuda:N (CUDA needs a binary built
    /// with `--features cuda`).
    #[arg(long, env = "DISTILL_DEVICE", default_value = "cpu")]
    device: String,
    /// An OpenAI-compatible endpoint LLM teachers may use, NAME=URL (up to the version, e.g.
    /// local=http://127.0.0.1:8080/v1); repeat, or comma-separated. Requests name it by NAME (or
    /// its URL); no other URL is reached.
    #[arg(long = "llm-endpoint", env = "DISTILL_LLM_ENDPOINTS", value_delimiter = ',')]
    llm_endpoints: Vec<String>,
    /// The API key of an --llm-endpoint: NAME=env:VAR (read at start) or NAME=file:PATH; repeat.
    #[arg(long = "llm-key", env = "DISTILL_LLM_KEYS", value_delimiter = ',')]
    llm_keys: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    distill_models::alloc::keep_freed_memory();
    let args = Args::parse();
    let device = distill_models::parse_device(&args.device)?;
    let cfg = args.service.setup(args.addr)?;
    let endpoints = distill_teacher::llm::endpoints::Endpoints::configure(&args.llm_endpoints, &args.llm_keys)?;
    tracing::info!(endpoints = ?endpoints, "LLM endpoints");
    tracing::info!(device = %distill_models::device_name(&device), "models run here");
    let scorer = (!args.score_models.is_empty()).then(|| distill_proto::CrossEncoderEnsemble {
        models: args.score_models.iter().map(|m| distill_store::absolutize(m)).collect(),
        combination: if args.score_combination == "znorm" {
            distill_proto::EnsembleCombination::ZnormMean
        } else {
            distill_proto::EnsembleCombination::Mean
        } as i32,
        max_length: args.score_max_length,
        ..Default::default()
    });
    let start = |setup| async move {
        let teacher = distill_teacher::service::Teacher::start(setup, device, endpoints).await?;
        let ready = scorer.and_then(|spec| teacher.load_scorer(spec));
        let jobs = teacher.jobs();
        let service = TeacherServiceServer::new(teacher)
            .max_decoding_message_size(distill_jobs::serving::MAX_REQUEST_BYTES)
            .max_encoding_message_size(distill_jobs::serving::MAX_RESPONSE_BYTES);
        Ok(distill_jobs::serving::Started { service, ready, jobs })
    };
    distill_jobs::serving::serve(cfg, start, distill_jobs::serving::shutdown_signal()).await
}
