//! `distill`: the command-line client of the distill services.

mod client;
mod compare;
mod demo;
mod health;
mod jobs;
mod label;
mod retrieve;
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
    /// Start a training job on the trainer service and follow it.
    Train(TrainArgs),
    /// Start an evaluation job (re-rank a TREC run with a model) on the trainer service and follow it.
    Evaluate(EvaluateArgs),
    /// List, show, follow or cancel jobs.
    Jobs {
        /// Which service's jobs.
        #[arg(long, value_enum, default_value = "teacher")]
        service: ServiceArg,
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Metrics of an existing run against qrels, as trec_eval computes them.
    Eval(EvalArgs),
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
enum JobsCommand {
    List {
        /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
    },
    Get {
        id: String,
    },
    Watch {
        id: String,
    },
    Cancel {
        id: String,
    },
    /// Queue a FAILED or CANCELLED job again (it continues where it stopped) and follow it.
    Resume {
        id: String,
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
enum ServiceArg {
    Teacher,
    Trainer,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum ScheduleArg {
    Linear,
    Cosine,
    Constant,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Committed dataset (repeat for several): a path or object-store URL.
    #[arg(long = "dataset", required_unless_present = "teacher_job")]
    datasets: Vec<String>,
    /// Instead of --dataset: follow this labelling job of the teacher service (--teacher) while it
    /// runs, training on its shards as they are written (needs --max-steps).
    #[arg(long, conflicts_with = "datasets")]
    teacher_job: Option<String>,
    /// The student's starting weights: a Hugging Face model directory or object-store prefix.
    #[arg(long)]
    backbone: String,
    /// Keep only the backbone's first N encoder layers (0: all).
    #[arg(long, default_value_t = 0)]
    backbone_layers: u32,
    /// Keep the word embeddings as the backbone has them (no gradient, no update).
    #[arg(long)]
    freeze_word_embeddings: bool,
    /// bce, hinge, infonce, margin_mse, distill_ranknet, adr_mse, mse, ranknet, kl_div.
    #[arg(long)]
    objective: String,
    #[arg(long, default_value_t = 2e-5)]
    lr: f64,
    #[arg(long, default_value_t = 8)]
    batch_size: u32,
    /// Passages per query (lists layout).
    #[arg(long, default_value_t = 8)]
    group_size: u32,
    /// Optimizer steps (0: --epochs passes over the data).
    #[arg(long, default_value_t = 0)]
    max_steps: u64,
    #[arg(long, default_value_t = 1)]
    epochs: u32,
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    #[arg(long, value_enum, default_value = "linear")]
    schedule: ScheduleArg,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Clip gradients to this global norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 1)]
    accumulation: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 32)]
    max_query_length: u32,
    #[arg(long, default_value_t = 256)]
    max_length: u32,
    /// Temperature of infonce / kl_div / adr_mse.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1024)]
    shuffle_buffer: u32,
    /// fp32, or bf16: mixed precision (bf16 matmuls, f32 master weights and optimizer state), for GPUs.
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
    precision: String,
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
    /// Evaluate every N steps (and at the end) on --eval-run; 0: only at the end.
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    #[command(flatten)]
    eval: EvalSource,
    /// The metric that picks the best model (default: the first of --metrics).
    #[arg(long, default_value = "")]
    validation_metric: String,
    /// Where checkpoints, metrics and exports go; default: in the service's store.
    #[arg(long, default_value = "")]
    output: String,
    #[arg(long, default_value = "")]
    name: String,
    #[arg(long)]
    detach: bool,
}

/// The run an evaluation re-ranks and what it is measured with.
#[derive(clap::Args, Debug)]
struct EvalSource {
    /// TREC run to re-rank.
    #[arg(long = "eval-run", requires_all = ["eval_queries", "eval_collection", "eval_qrels"])]
    eval_run: Option<String>,
    #[arg(long)]
    eval_queries: Option<String>,
    #[arg(long)]
    eval_collection: Option<String>,
    #[arg(long)]
    eval_qrels: Option<String>,
    /// Re-rank this many per query.
    #[arg(long, default_value_t = 100)]
    top_k: u32,
    #[arg(long, default_value = "ndcg@10,mrr@10")]
    metrics: String,
    /// Evaluate only the first N queries of the run (0: all).
    #[arg(long, default_value_t = 0)]
    eval_max_queries: u32,
}

impl EvalSource {
    fn spec(
        &self,
        model: &str,
        max_query_length: u32,
        max_length: u32,
        output: &str,
        name: &str,
    ) -> Option<pb::EvaluationSpec> {
        let path = |p: &Option<String>| p.as_deref().map(absolutize).unwrap_or_default();
        Some(pb::EvaluationSpec {
            model: if model.is_empty() { String::new() } else { absolutize(model) },
            run: path(&Some(self.eval_run.clone()?)),
            queries: path(&self.eval_queries),
            collection: path(&self.eval_collection),
            qrels: path(&self.eval_qrels),
            top_k: self.top_k,
            metrics: self.metrics.split(',').map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect(),
            output_uri: absolutize(output),
            batch_size: 32,
            max_query_length,
            max_length,
            name: name.to_string(),
            max_queries: self.eval_max_queries,
        })
    }
}

#[derive(clap::Args, Debug)]
struct EvaluateArgs {
    /// The re-ranker: a Hugging Face model directory or object-store prefix.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    eval: EvalSource,
    #[arg(long, default_value_t = 32)]
    max_query_length: u32,
    #[arg(long, default_value_t = 256)]
    max_length: u32,
    /// Where run.trec and metrics.json go; default: in the service's store.
    #[arg(long, default_value = "")]
    output: String,
    #[arg(long, default_value = "")]
    name: String,
    #[arg(long)]
    detach: bool,
}

fn training_spec(a: &TrainArgs, teacher_addr: &str) -> pb::TrainingSpec {
    pb::TrainingSpec {
        teacher_job: a
            .teacher_job
            .as_ref()
            .map(|id| pb::TeacherJobRef { address: teacher_addr.to_string(), job_id: id.clone() }),
        datasets: a.datasets.iter().map(|d| absolutize(d)).collect(),
        backbone: absolutize(&a.backbone),
        backbone_layers: a.backbone_layers,
        freeze_word_embeddings: a.freeze_word_embeddings,
        objective: a.objective.clone(),
        hyperparameters: Some(pb::Hyperparameters {
            learning_rate: a.lr,
            batch_size: a.batch_size,
            group_size: a.group_size,
            max_steps: a.max_steps,
            epochs: a.epochs,
            warmup_steps: a.warmup_steps,
            schedule: match a.schedule {
                ScheduleArg::Linear => pb::LrSchedule::Linear,
                ScheduleArg::Cosine => pb::LrSchedule::Cosine,
                ScheduleArg::Constant => pb::LrSchedule::Constant,
            } as i32,
            weight_decay: Some(a.weight_decay),
            max_grad_norm: Some(a.max_grad_norm),
            gradient_accumulation: a.accumulation,
            seed: a.seed,
            max_query_length: a.max_query_length,
            max_length: a.max_length,
            temperature: a.temperature,
            shuffle_buffer: a.shuffle_buffer,
            precision: a.precision.clone(),
        }),
        evaluation: a.eval.spec("", a.max_query_length, a.max_length, "", ""),
        eval_every_steps: a.eval_every,
        validation_metric: a.validation_metric.clone(),
        checkpoint_every_steps: a.checkpoint_every,
        output_uri: absolutize(&a.output),
        name: a.name.clone(),
    }
}

/// Follows a job just started, with a progress bar (or prints its id with --detach).
async fn follow(client: &mut impl client::JobControl, job: pb::Job, what: &str, detach: bool) -> anyhow::Result<()> {
    if detach {
        println!("{}", job.id);
        return Ok(());
    }
    eprintln!("{what} job {} started", job.id);
    let job = jobs::watch(client, &job.id).await?;
    jobs::conclude(&job)
}

async fn job_command(client: &mut impl client::JobControl, command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::List { state } => {
            let state = state.as_deref().map(parse_state).transpose()?.unwrap_or(pb::JobState::Unspecified);
            jobs::print_table(&client.list(state).await?);
            Ok(())
        }
        JobsCommand::Get { id } => {
            jobs::print_job(&client.get(&id).await?);
            Ok(())
        }
        JobsCommand::Watch { id } => {
            let job = jobs::watch(client, &id).await?;
            jobs::conclude(&job)
        }
        JobsCommand::Cancel { id } => {
            let job = client.cancel(&id).await?;
            println!("job {}: {}", job.id, jobs::state_name(job.state()));
            Ok(())
        }
        JobsCommand::Resume { id } => {
            let job = client.resume(&id).await?;
            eprintln!("job {} resumed (attempt {})", job.id, job.resumes + 1);
            let job = jobs::watch(client, &job.id).await?;
            jobs::conclude(&job)
        }
    }
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
    /// An ensemble of cross-encoders (--teacher-model, repeated).
    CrossEncoders,
    /// An LLM re-ranker behind an OpenAI-compatible endpoint (--llm-*).
    Llm,
    /// A GGUF LLM run inside the teacher service, pointwise (--llm-gguf).
    LocalLlm,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum LlmModeArg {
    /// RankGPT-style permutations over sliding windows (teacher ranks).
    Listwise,
    /// P("yes") per (query, passage) from logprobs.
    Pointwise,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum LlmApiArg {
    Chat,
    Completions,
}

/// The LLM teacher (`--teacher-kind llm`). The endpoint must be one the teacher service's operator
/// configured (`distill-teacher --llm-endpoint NAME=URL`); an empty one takes its `default`.
#[derive(clap::Args, Debug)]
struct LlmArgs {
    /// A configured endpoint: its NAME, or its URL (e.g. http://127.0.0.1:8080/v1).
    #[arg(long = "llm-url", env = "DISTILL_LLM_BASE_URL", default_value = "")]
    url: String,
    #[arg(long = "llm-model", env = "DISTILL_LLM_MODEL", default_value = "")]
    model: String,
    /// API key sent with the job (kept out of the stored job); or leave it to the service's environment.
    #[arg(long = "llm-api-key", env = "DISTILL_LLM_API_KEY", hide_env_values = true, default_value = "")]
    api_key: String,
    /// Only the configured endpoint's own key variable is accepted (the operator's --llm-key).
    #[arg(long = "llm-api-key-env", default_value = "")]
    api_key_env: String,
    #[arg(long = "llm-mode", value_enum, default_value = "listwise")]
    mode: LlmModeArg,
    #[arg(long = "llm-api", value_enum, default_value = "chat")]
    api: LlmApiArg,
    #[arg(long = "llm-window", default_value_t = 20)]
    window: u32,
    #[arg(long = "llm-stride", default_value_t = 10)]
    stride: u32,
    #[arg(long = "llm-max-words", default_value_t = 100)]
    max_words: u32,
    /// Requests in flight at once.
    #[arg(long = "llm-concurrency", default_value_t = 8)]
    concurrency: u32,
    #[arg(long = "llm-max-retries", default_value_t = 4)]
    max_retries: u32,
    #[arg(long = "llm-timeout-ms", default_value_t = 60_000)]
    timeout_ms: u32,
    /// Fail the job when more than this fraction of windows (pairs) failed after their retries
    /// (default 0.01; 1 never fails).
    #[arg(long = "llm-max-fallback-ratio")]
    max_fallback_ratio: Option<f32>,
    /// USD per million prompt / completion tokens, for the cost counter.
    #[arg(long = "llm-prompt-price", default_value_t = 0.0)]
    prompt_price: f64,
    #[arg(long = "llm-completion-price", default_value_t = 0.0)]
    completion_price: f64,
    /// The local LLM (`--teacher-kind local-llm`): a .gguf file or a directory holding one.
    #[arg(long = "llm-gguf", default_value = "")]
    gguf: String,
    /// Answer cache prefix (default: the service store's cache/llm).
    #[arg(long = "llm-cache", default_value = "")]
    cache: String,
    #[arg(long = "llm-no-cache")]
    no_cache: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum CombinationArg {
    /// Mean of raw scores.
    Mean,
    /// Mean of per-query z-scores.
    Znorm,
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
    /// Cross-encoder of the ensemble (repeat): a model directory or object-store prefix.
    #[arg(long = "teacher-model", required_if_eq("teacher", "cross-encoders"))]
    teacher_models: Vec<String>,
    #[arg(long, value_enum, default_value = "mean")]
    combination: CombinationArg,
    /// Token limit of the teacher cross-encoders.
    #[arg(long, default_value_t = 512)]
    teacher_max_length: u32,
    /// The ensemble also counts the first stage's score as a member (hybrid teacher).
    #[arg(long)]
    with_first_stage: bool,
    /// Padded tokens per forward pass of the teacher cross-encoders (pairs sorted by length).
    #[arg(long, default_value_t = 8192)]
    teacher_batch_tokens: u32,
    #[command(flatten)]
    llm: LlmArgs,
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
    /// Label only part I of N (e.g. 0/3 .. 2/3; queries assigned by a hash of their id) into
    /// `<output>/_parts/`; the part that completes the set commits the whole dataset at --output.
    #[arg(long, value_parser = parse_partition)]
    partition: Option<pb::Partition>,
    /// Print the job id and return instead of following the job.
    #[arg(long)]
    detach: bool,
}

fn parse_partition(s: &str) -> Result<pb::Partition, String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/3")?;
    let number = |x: &str| x.trim().parse::<u32>().map_err(|e| format!("{x:?}: {e}"));
    let (index, count) = (number(i)?, number(n)?);
    if count == 0 || index >= count {
        return Err(format!("{s}: I must be below N, N at least 1"));
    }
    Ok(pb::Partition { index, count })
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
        TeacherArg::CrossEncoders => pb::teacher_spec::Teacher::CrossEncoders(pb::CrossEncoderEnsemble {
            models: a.teacher_models.iter().map(|m| absolutize(m)).collect(),
            combination: match a.combination {
                CombinationArg::Mean => pb::EnsembleCombination::Mean,
                CombinationArg::Znorm => pb::EnsembleCombination::ZnormMean,
            } as i32,
            batch_size: 32,
            max_query_length: 64,
            max_length: a.teacher_max_length,
            name: a.teacher_name.clone(),
            max_batch_tokens: a.teacher_batch_tokens,
            include_first_stage: a.with_first_stage,
        }),
        TeacherArg::LocalLlm => pb::teacher_spec::Teacher::LocalLlm(pb::LocalLlm {
            model: absolutize(&a.llm.gguf),
            max_passage_words: a.llm.max_words,
            name: a.teacher_name.clone(),
        }),
        TeacherArg::Llm => {
            let l = &a.llm;
            pb::teacher_spec::Teacher::Llm(pb::LlmReranker {
                endpoint: Some(pb::LlmEndpoint {
                    base_url: l.url.clone(),
                    model: l.model.clone(),
                    api_key: l.api_key.clone(),
                    api_key_env: l.api_key_env.clone(),
                }),
                mode: match l.mode {
                    LlmModeArg::Listwise => pb::LlmMode::Listwise,
                    LlmModeArg::Pointwise => pb::LlmMode::Pointwise,
                } as i32,
                api: match l.api {
                    LlmApiArg::Chat => pb::LlmApi::Chat,
                    LlmApiArg::Completions => pb::LlmApi::Completions,
                } as i32,
                window_size: l.window,
                stride: l.stride,
                max_passage_words: l.max_words,
                concurrency: l.concurrency,
                max_retries: l.max_retries,
                request_timeout_ms: l.timeout_ms,
                max_fallback_ratio: l.max_fallback_ratio,
                usd_per_million_prompt_tokens: l.prompt_price,
                usd_per_million_completion_tokens: l.completion_price,
                cache_uri: if l.cache.is_empty() { String::new() } else { absolutize(&l.cache) },
                no_cache: l.no_cache,
                name: a.teacher_name.clone(),
                ..Default::default()
            })
        }
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
        partition: a.partition,
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
            let job = label::start_or_rejoin(&mut client, labeling_spec(&args)).await?;
            follow(&mut client, job, "labelling", args.detach).await
        }
        Command::Train(args) => {
            let mut client = cli.conn.trainer().await?;
            let job = client.start_training(training_spec(&args, &cli.conn.teacher_addr)).await?.into_inner();
            follow(&mut client, job, "training", args.detach).await
        }
        Command::Evaluate(args) => {
            let spec = args
                .eval
                .spec(&args.model, args.max_query_length, args.max_length, &args.output, &args.name)
                .ok_or_else(|| {
                    anyhow::anyhow!("--eval-run, --eval-queries, --eval-collection and --eval-qrels are required")
                })?;
            let mut client = cli.conn.trainer().await?;
            let job = client.start_evaluation(spec).await?.into_inner();
            follow(&mut client, job, "evaluation", args.detach).await
        }
        Command::Jobs { service: ServiceArg::Teacher, command } => {
            job_command(&mut cli.conn.teacher().await?, command).await
        }
        Command::Jobs { service: ServiceArg::Trainer, command } => {
            job_command(&mut cli.conn.trainer().await?, command).await
        }
        Command::Eval(args) => eval(&args).await,
        Command::Compare(args) => compare::run(&args).await,
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
