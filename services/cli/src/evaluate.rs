//! `distill evaluate` (an evaluation job on the trainer) and the evaluation flags `distill train`
//! shares: the run to re-rank and what it is measured with.

use distill_proto as pb;
use distill_store::absolutize;

/// The run an evaluation re-ranks and what it is measured with.
#[derive(clap::Args, Debug)]
pub struct EvalSource {
    /// TREC run to re-rank.
    #[arg(long = "eval-run", requires_all = ["eval_queries", "eval_collection", "eval_qrels"])]
    pub eval_run: Option<String>,
    #[arg(long)]
    pub eval_queries: Option<String>,
    #[arg(long)]
    pub eval_collection: Option<String>,
    #[arg(long)]
    pub eval_qrels: Option<String>,
    /// Re-rank this many per query.
    #[arg(long, default_value_t = 100)]
    pub top_k: u32,
    #[arg(long, default_value = "ndcg@10,mrr@10")]
    pub metrics: String,
    /// Evaluate only the first N queries of the run (0: all).
    #[arg(long, default_value_t = 0)]
    pub eval_max_queries: u32,
}

impl EvalSource {
    pub fn spec(
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
pub struct EvaluateArgs {
    /// The re-ranker: a Hugging Face model directory or object-store prefix.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub eval: EvalSource,
    #[arg(long, default_value_t = 32)]
    pub max_query_length: u32,
    #[arg(long, default_value_t = 256)]
    pub max_length: u32,
    /// run.trec and metrics.json go to --output.
    #[command(flatten)]
    pub job: crate::jobs::JobArgs,
}

/// `distill evaluate`: starts the job and follows it.
pub async fn run(args: &EvaluateArgs, conn: &crate::client::Connection) -> anyhow::Result<()> {
    let spec = args.eval.spec(&args.model, args.max_query_length, args.max_length, &args.job.output, &args.job.name);
    let spec = spec.ok_or_else(|| {
        anyhow::anyhow!("--eval-run, --eval-queries, --eval-collection and --eval-qrels are required")
    })?;
    let mut client = conn.trainer().await?;
    let job = client.start_evaluation(spec).await?.into_inner();
    crate::jobs::follow(&mut client, job, "evaluation", args.job.detach).await
}
