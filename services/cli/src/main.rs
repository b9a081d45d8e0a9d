//! `distill`: the command-line client of the distill services.

mod client;
mod jobs;
mod score;
mod shards;

use clap::{Parser, Subcommand, ValueEnum};
use distill_proto as pb;
use distill_store::absolutize;

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
    Label(LabelArgs),
    /// List, show, follow or cancel jobs.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Metrics of an existing run against qrels, as trec_eval computes them.
    Eval(EvalArgs),
    /// Score (query, passage) JSON lines with a cross-encoder directory.
    Score(score::ScoreArgs),
    /// Look into datasets of shards.
    Shards {
        #[command(subcommand)]
        command: ShardsCommand,
    },
}

#[derive(Subcommand, Debug)]
enum JobsCommand {
    List {
        /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
    },
    Get { id: String },
    Watch { id: String },
    Cancel { id: String },
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

#[derive(clap::Args, Debug)]
struct EvalArgs {
    #[arg(long)]
    qrels: String,
    #[arg(long)]
    run: String,
    /// Comma-separated: ndcg@k, ndcg, mrr@k (rr@k), map, map@k, recall@k, p@k; `(rel=N)` sets the
    /// relevance threshold of binary measures.
    #[arg(long, default_value = "ndcg@10,mrr@10,map,recall@100")]
    metrics: String,
    /// Also print each query's values (`qid<TAB>metric<TAB>value`), as `trec_eval -q`.
    #[arg(long)]
    per_query: bool,
    /// Count judged queries missing from the run as 0, as `trec_eval -c`.
    #[arg(long)]
    complete: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum LayoutArg {
    Triples,
    Lists,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum TeacherArg {
    /// The run's own scores.
    FirstStage,
    /// Scores from --teacher-file.
    Precomputed,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum TeacherFormatArg {
    /// `pos_score neg_score qid pos_pid neg_pid`
    Hofstatter,
    /// A TREC run of teacher scores (Rank-DistiLLM style).
    Trec,
}

#[derive(clap::Args, Debug)]
struct LabelArgs {
    /// TREC run of first-stage candidates.
    #[arg(long, requires_all = ["queries", "collection"], conflicts_with = "jsonl")]
    run: Option<String>,
    /// Queries TSV (`qid<TAB>text`).
    #[arg(long)]
    queries: Option<String>,
    /// Collection TSV (`docid<TAB>text`).
    #[arg(long)]
    collection: Option<String>,
    /// qrels (`qid 0 docid rel`).
    #[arg(long)]
    qrels: Option<String>,
    /// Candidates as JSONL instead of run + queries + collection.
    #[arg(long, required_unless_present = "run")]
    jsonl: Option<String>,
    #[arg(long, value_enum, default_value = "triples")]
    layout: LayoutArg,
    #[arg(long = "teacher-kind", value_enum, default_value = "first-stage")]
    teacher: TeacherArg,
    #[arg(long, required_if_eq("teacher", "precomputed"))]
    teacher_file: Option<String>,
    #[arg(long, value_enum, default_value = "hofstatter")]
    teacher_format: TeacherFormatArg,
    #[arg(long, default_value = "")]
    teacher_name: String,
    /// Candidates kept per query (0: all).
    #[arg(long, default_value_t = 0)]
    depth: u32,
    /// Negatives per positive (triples).
    #[arg(long, default_value_t = 1)]
    negatives: u32,
    /// Positives are the judged-relevant documents (needs --qrels or JSONL labels).
    #[arg(long)]
    positives_from_qrels: bool,
    #[arg(long, default_value_t = 1)]
    min_relevance: i32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Label only the first N queries (0: all).
    #[arg(long, default_value_t = 0)]
    max_queries: u32,
    /// Dataset prefix (path or URL); default: in the service's store.
    #[arg(long, default_value = "")]
    output: String,
    #[arg(long, default_value_t = 0)]
    rows_per_shard: u64,
    #[arg(long, default_value_t = 0)]
    bytes_per_shard: u64,
    #[arg(long, default_value = "")]
    name: String,
    /// Print the job id and return instead of following the job.
    #[arg(long)]
    detach: bool,
}

fn labeling_spec(a: &LabelArgs) -> pb::LabelingSpec {
    let path = |p: &Option<String>| p.as_deref().map(absolutize).unwrap_or_default();
    let source = if let Some(jsonl) = &a.jsonl {
        pb::candidate_source::Source::Jsonl(pb::JsonlCandidates { path: absolutize(jsonl) })
    } else {
        pb::candidate_source::Source::Trec(pb::TrecCandidates {
            run: path(&a.run),
            queries: path(&a.queries),
            collection: path(&a.collection),
            qrels: path(&a.qrels),
        })
    };
    let teacher = match a.teacher {
        TeacherArg::FirstStage => pb::teacher_spec::Teacher::FirstStage(pb::FirstStageTeacher {}),
        TeacherArg::Precomputed => pb::teacher_spec::Teacher::Precomputed(pb::PrecomputedTeacher {
            path: path(&a.teacher_file),
            format: match a.teacher_format {
                TeacherFormatArg::Hofstatter => pb::PrecomputedFormat::HofstatterTsv,
                TeacherFormatArg::Trec => pb::PrecomputedFormat::TrecRun,
            } as i32,
            name: a.teacher_name.clone(),
        }),
    };
    pb::LabelingSpec {
        source: Some(pb::CandidateSource { source: Some(source) }),
        sampling: Some(pb::Sampling {
            depth: a.depth,
            negatives_per_query: a.negatives,
            positives_from_qrels: a.positives_from_qrels,
            seed: a.seed,
            min_relevance: a.min_relevance,
            max_queries: a.max_queries,
        }),
        layout: match a.layout {
            LayoutArg::Triples => pb::OutputLayout::Triples,
            LayoutArg::Lists => pb::OutputLayout::Lists,
        } as i32,
        teacher: Some(pb::TeacherSpec { teacher: Some(teacher) }),
        output_uri: absolutize(&a.output),
        shards: Some(pb::ShardOptions { rows_per_shard: a.rows_per_shard, bytes_per_shard: a.bytes_per_shard }),
        name: a.name.clone(),
    }
}

fn parse_state(s: &str) -> anyhow::Result<pb::JobState> {
    Ok(match s {
        "queued" => pb::JobState::Queued,
        "running" => pb::JobState::Running,
        "succeeded" => pb::JobState::Succeeded,
        "failed" => pb::JobState::Failed,
        "cancelled" => pb::JobState::Cancelled,
        other => anyhow::bail!("unknown state '{other}'"),
    })
}

async fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    let metrics = distill_eval::parse_metrics(&args.metrics)?;
    let run = distill_formats::read_run(distill_store::open_text(&args.run).await?, &args.run)?;
    let qrels = distill_formats::read_qrels(distill_store::open_text(&args.qrels).await?, &args.qrels)?;
    let e = distill_eval::evaluate(&run, &qrels, &metrics, args.complete);
    if args.per_query {
        for (qid, values) in &e.per_query {
            for (m, v) in e.metrics.iter().zip(values) {
                println!("{qid}\t{m}\t{v:.4}");
            }
        }
    }
    for (m, v) in e.metrics.iter().zip(&e.means) {
        println!("{m}\t{v:.4}");
    }
    eprintln!("{} queries evaluated", e.per_query.len());
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Label(args) => {
            let mut client = cli.conn.teacher().await?;
            let job = client.start_labeling(labeling_spec(&args)).await?.into_inner();
            if args.detach {
                println!("{}", job.id);
                return Ok(());
            }
            eprintln!("labelling job {} started", job.id);
            let job = jobs::watch(&mut client, &job.id).await?;
            jobs::conclude(&job)
        }
        Command::Jobs { command } => {
            let mut client = cli.conn.teacher().await?;
            match command {
                JobsCommand::List { state } => {
                    let state = state.as_deref().map(parse_state).transpose()?.unwrap_or(pb::JobState::Unspecified);
                    let list = client.list_jobs(pb::ListJobsRequest { state: state as i32 }).await?.into_inner();
                    jobs::print_table(&list.jobs);
                    Ok(())
                }
                JobsCommand::Get { id } => {
                    jobs::print_job(&client.get_job(pb::GetJobRequest { id }).await?.into_inner());
                    Ok(())
                }
                JobsCommand::Watch { id } => {
                    let job = jobs::watch(&mut client, &id).await?;
                    jobs::conclude(&job)
                }
                JobsCommand::Cancel { id } => {
                    let job = client.cancel_job(pb::CancelJobRequest { id }).await?.into_inner();
                    println!("job {}: {}", job.id, jobs::state_name(job.state()));
                    Ok(())
                }
            }
        }
        Command::Eval(args) => eval(&args).await,
        Command::Score(args) => tokio::task::spawn_blocking(move || score::run(&args)).await?,
        Command::Shards { command: ShardsCommand::Inspect { uri, rows } } => shards::inspect(&uri, rows).await,
    }
}

#[tokio::main]
async fn main() {
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
