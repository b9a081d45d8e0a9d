//! `distill label`: its arguments, the labelling spec they make, and starting the job, or
//! rejoining the teacher's job with the same spec when the command is run again (a Kubernetes pod
//! retried, a command repeated after a disconnect) instead of starting a second one, which the
//! first one's partial output would refuse.

use crate::client::Teacher;
use clap::ValueEnum;
use distill_proto as pb;
use distill_store::absolutize;

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum LayoutArg {
    Triples,
    Lists,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum TeacherArg {
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
pub enum LlmModeArg {
    /// RankGPT-style permutations over sliding windows (teacher ranks).
    Listwise,
    /// P("yes") per (query, passage) from logprobs.
    Pointwise,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum LlmApiArg {
    Chat,
    Completions,
}

/// The LLM teacher (`--teacher-kind llm`). The endpoint must be one the teacher service's operator
/// configured (`distill-teacher --llm-endpoint NAME=URL`); an empty one takes its `default`.
#[derive(clap::Args, Debug)]
pub struct LlmArgs {
    /// A configured endpoint: its NAME, or its URL (e.g. http://127.0.0.1:8080/v1).
    #[arg(long = "llm-url", env = "DISTILL_LLM_BASE_URL", default_value = "")]
    pub url: String,
    #[arg(long = "llm-model", env = "DISTILL_LLM_MODEL", default_value = "")]
    pub model: String,
    /// API key sent with the job (kept out of the stored job); or leave it to the service's environment.
    #[arg(long = "llm-api-key", env = "DISTILL_LLM_API_KEY", hide_env_values = true, default_value = "")]
    pub api_key: String,
    /// Only the configured endpoint's own key variable is accepted (the operator's --llm-key).
    #[arg(long = "llm-api-key-env", default_value = "")]
    pub api_key_env: String,
    #[arg(long = "llm-mode", value_enum, default_value = "listwise")]
    pub mode: LlmModeArg,
    #[arg(long = "llm-api", value_enum, default_value = "chat")]
    pub api: LlmApiArg,
    #[arg(long = "llm-window", default_value_t = 20)]
    pub window: u32,
    #[arg(long = "llm-stride", default_value_t = 10)]
    pub stride: u32,
    #[arg(long = "llm-max-words", default_value_t = 100)]
    pub max_words: u32,
    /// Requests in flight at once.
    #[arg(long = "llm-concurrency", default_value_t = 8)]
    pub concurrency: u32,
    #[arg(long = "llm-max-retries", default_value_t = 4)]
    pub max_retries: u32,
    #[arg(long = "llm-timeout-ms", default_value_t = 60_000)]
    pub timeout_ms: u32,
    /// Fail the job when more than this fraction of windows (pairs) failed after their retries
    /// (default 0.01; 1 never fails).
    #[arg(long = "llm-max-fallback-ratio")]
    pub max_fallback_ratio: Option<f32>,
    /// USD per million prompt / completion tokens, for the cost counter.
    #[arg(long = "llm-prompt-price", default_value_t = 0.0)]
    pub prompt_price: f64,
    #[arg(long = "llm-completion-price", default_value_t = 0.0)]
    pub completion_price: f64,
    /// The local LLM (`--teacher-kind local-llm`): a .gguf file or a directory holding one.
    #[arg(long = "llm-gguf", default_value = "")]
    pub gguf: String,
    /// Answer cache prefix (default: the service store's cache/llm).
    #[arg(long = "llm-cache", default_value = "")]
    pub cache: String,
    #[arg(long = "llm-no-cache")]
    pub no_cache: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum CombinationArg {
    /// Mean of raw scores.
    Mean,
    /// Mean of per-query z-scores.
    Znorm,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum TeacherFormatArg {
    /// `pos_score neg_score qid pos_pid neg_pid`
    Hofstatter,
    /// A TREC run of teacher scores (Rank-DistiLLM style).
    Trec,
}

#[derive(clap::Args, Debug)]
pub struct LabelArgs {
    /// TREC run of first-stage candidates.
    #[arg(long, requires_all = ["queries", "collection"], conflicts_with = "jsonl")]
    pub run: Option<String>,
    /// Queries TSV (`qid<TAB>text`).
    #[arg(long)]
    pub queries: Option<String>,
    /// Collection TSV (`docid<TAB>text`).
    #[arg(long)]
    pub collection: Option<String>,
    /// qrels (`qid 0 docid rel`).
    #[arg(long)]
    pub qrels: Option<String>,
    /// Candidates as JSONL instead of run + queries + collection.
    #[arg(long, required_unless_present = "run")]
    pub jsonl: Option<String>,
    #[arg(long, value_enum, default_value = "triples")]
    pub layout: LayoutArg,
    #[arg(long = "teacher-kind", value_enum, default_value = "first-stage")]
    pub teacher: TeacherArg,
    #[arg(long, required_if_eq("teacher", "precomputed"))]
    pub teacher_file: Option<String>,
    #[arg(long, value_enum, default_value = "hofstatter")]
    pub teacher_format: TeacherFormatArg,
    #[arg(long, default_value = "")]
    pub teacher_name: String,
    /// Cross-encoder of the ensemble (repeat): a model directory or object-store prefix.
    #[arg(long = "teacher-model", required_if_eq("teacher", "cross-encoders"))]
    pub teacher_models: Vec<String>,
    #[arg(long, value_enum, default_value = "mean")]
    pub combination: CombinationArg,
    /// Token limit of the teacher cross-encoders.
    #[arg(long, default_value_t = 512)]
    pub teacher_max_length: u32,
    /// The ensemble also counts the first stage's score as a member (hybrid teacher).
    #[arg(long)]
    pub with_first_stage: bool,
    /// Padded tokens per forward pass of the teacher cross-encoders (pairs sorted by length).
    #[arg(long, default_value_t = 8192)]
    pub teacher_batch_tokens: u32,
    #[command(flatten)]
    pub llm: LlmArgs,
    /// Candidates kept per query (0: all).
    #[arg(long, default_value_t = 0)]
    pub depth: u32,
    /// Negatives per positive (triples).
    #[arg(long, default_value_t = 1)]
    pub negatives: u32,
    /// Positives are the judged-relevant documents (needs --qrels or JSONL labels).
    #[arg(long)]
    pub positives_from_qrels: bool,
    #[arg(long, default_value_t = 1)]
    pub min_relevance: i32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Label only the first N queries (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_queries: u32,
    /// Dataset prefix (path or URL); default: in the service's store.
    #[arg(long, default_value = "")]
    pub output: String,
    #[arg(long, default_value_t = 0)]
    pub rows_per_shard: u64,
    #[arg(long, default_value_t = 0)]
    pub bytes_per_shard: u64,
    #[arg(long, default_value = "")]
    pub name: String,
    /// Label only part I of N (e.g. 0/3 .. 2/3; queries assigned by a hash of their id) into
    /// `<output>/_parts/`; the part that completes the set commits the whole dataset at --output.
    #[arg(long, value_parser = parse_partition)]
    pub partition: Option<pb::Partition>,
    /// Print the job id and return instead of following the job.
    #[arg(long)]
    pub detach: bool,
}

pub fn parse_partition(s: &str) -> Result<pb::Partition, String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/3")?;
    let number = |x: &str| x.trim().parse::<u32>().map_err(|e| format!("{x:?}: {e}"));
    let (index, count) = (number(i)?, number(n)?);
    if count == 0 || index >= count {
        return Err(format!("{s}: I must be below N, N at least 1"));
    }
    Ok(pb::Partition { index, count })
}

pub fn labeling_spec(a: &LabelArgs) -> pb::LabelingSpec {
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

/// `distill label`: starts (or rejoins) the job and follows it.
pub async fn run(args: &LabelArgs, conn: &crate::client::Connection) -> anyhow::Result<()> {
    let mut client = conn.teacher().await?;
    let job = start_or_rejoin(&mut client, labeling_spec(args)).await?;
    crate::jobs::follow(&mut client, job, "labelling", args.detach).await
}

/// Starts the labelling job `spec` describes, or rejoins the teacher's job with the same spec
/// (API key aside) and output: an unfinished one is followed, a FAILED one resumed from its
/// progress records. Anything else (none, or only succeeded or cancelled ones) starts a new job.
pub async fn start_or_rejoin(client: &mut Teacher, spec: pb::LabelingSpec) -> anyhow::Result<pb::Job> {
    match twin(client, &spec).await? {
        Some(job) if job.state() == pb::JobState::Failed => {
            eprintln!("job {} labelled this before and failed ({}): resuming it", job.id, job.error);
            Ok(client.resume_job(pb::ResumeJobRequest { id: job.id }).await?.into_inner())
        }
        Some(job) => {
            eprintln!("job {} already labels this into {}: following it", job.id, job.output_uri);
            Ok(job)
        }
        None => Ok(client.start_labeling(spec).await?.into_inner()),
    }
}

/// The newest unfinished or FAILED labelling job of the teacher with `spec` (API key aside) and
/// its output; none for a spec without an output (each such job writes a dataset of its own).
async fn twin(client: &mut Teacher, spec: &pb::LabelingSpec) -> anyhow::Result<Option<pb::Job>> {
    if spec.output_uri.is_empty() {
        return Ok(None);
    }
    let wanted = without_key(spec.clone());
    let jobs = client.list_jobs(pb::ListJobsRequest::default()).await?.into_inner().jobs;
    Ok(jobs.into_iter().rev().find(|j| {
        let same = match j.spec.as_ref().and_then(|s| s.spec.as_ref()) {
            Some(pb::job_spec::Spec::Labeling(l)) => without_key(l.clone()) == wanted,
            _ => false,
        };
        let open = !j.state().is_terminal() || j.state() == pb::JobState::Failed;
        same && open && j.output_uri == spec.output_uri
    }))
}

/// The spec as the teacher keeps it: an API key given in it is taken out when the job starts.
fn without_key(mut spec: pb::LabelingSpec) -> pb::LabelingSpec {
    if let Some(pb::teacher_spec::Teacher::Llm(l)) = spec.teacher.as_mut().and_then(|t| t.teacher.as_mut()) {
        if let Some(e) = l.endpoint.as_mut() {
            e.api_key.clear();
        }
    }
    spec
}
