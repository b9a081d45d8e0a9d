//! `distill`: the command-line client of the distill services.

mod client;
mod compare;
mod demo;
mod eval;
mod evaluate;
mod health;
mod jobs;
mod label;
mod retrieve;
mod score;
mod shards;
mod sweep;
mod train;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "distill", version, about = "Distil strong re-rankers into small cross-encoders")]
struct Cli {
    #[command(flatten)]
    conn: client::Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a labelling job on the teacher service and follow it.
    Label(label::LabelArgs),
    /// Start a training job on the trainer service and follow it.
    Train(train::TrainArgs),
    /// Start an evaluation job (re-rank a TREC run with a model) on the trainer service and follow it.
    Evaluate(evaluate::EvaluateArgs),
    /// List, show, follow or cancel jobs.
    Jobs {
        /// Which service's jobs.
        #[arg(long, value_enum, default_value = "teacher")]
        service: ServiceArg,
        #[command(subcommand)]
        command: jobs::JobsCommand,
    },
    /// Metrics of an existing run against qrels, as trec_eval computes them.
    Eval(eval::EvalArgs),
    /// A grid of students (objectives x backbones x layers x learning rates x seeds x datasets)
    /// trained and evaluated on the trainer service, tabled with significance marks.
    Sweep(sweep::SweepArgs),
    /// Runs against a baseline run with significance tests (paired t-test or randomization).
    Compare(compare::CompareArgs),
    /// Score (query, passage) JSON lines with a cross-encoder directory.
    Score(score::ScoreArgs),
    /// BM25 first stage (tantivy) over a TSV collection: the top-k of each query as a TREC run.
    Retrieve(retrieve::RetrieveArgs),
    /// The whole system on the bundled Debian collection: BM25, a teacher, three students, a table.
    Demo(demo::DemoArgs),
    /// Ask a service's gRPC health endpoint (container health checks): exit 0 when SERVING.
    Health(health::HealthArgs),
    /// Look into datasets of shards.
    Shards {
        #[command(subcommand)]
        command: ShardsCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ShardsCommand {
    /// Print a committed dataset's schema, shard list and first rows.
    Inspect {
        uri: String,
        #[arg(long, default_value_t = 5)]
        rows: usize,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum ServiceArg {
    Teacher,
    Trainer,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Label(args) => label::run(&args, &cli.conn).await,
        Command::Train(args) => train::run(&args, &cli.conn).await,
        Command::Evaluate(args) => evaluate::run(&args, &cli.conn).await,
        Command::Jobs { service: ServiceArg::Teacher, command } => {
            jobs::job_command(&mut cli.conn.teacher().await?, command).await
        }
        Command::Jobs { service: ServiceArg::Trainer, command } => {
            jobs::job_command(&mut cli.conn.trainer().await?, command).await
        }
        Command::Eval(args) => eval::run(&args).await,
        Command::Compare(args) => compare::run(&args).await,
        Command::Sweep(args) => sweep::run(&args, &cli.conn).await,
        Command::Retrieve(args) => retrieve::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Health(args) => health::run(args, &cli.conn).await,
        Command::Score(args) => {
            let dir = distill_store::materialize_dir(&args.model).await.map_err(|e| anyhow::anyhow!("--model: {e}"))?;
            tokio::task::spawn_blocking(move || score::run(&args, &dir)).await?
        }
        Command::Shards { command: ShardsCommand::Inspect { uri, rows } } => shards::inspect(&uri, rows).await,
    }
}

#[tokio::main]
async fn main() {
    distill_models::alloc::keep_freed_memory();
    let cli = Cli::parse();
    // Both ring and aws-lc-rs are linked (object_store's HTTP stack); pick one for TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Err(e) = run(cli).await {
        match e.downcast_ref::<tonic::Status>() {
            Some(s) => eprintln!("error: {:?}: {}", s.code(), s.message()),
            None => eprintln!("error: {e:#}"),
        }
        std::process::exit(1);
    }
}
