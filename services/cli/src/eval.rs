//! `distill eval`: metrics of an existing run against qrels, as trec_eval computes them (locally).

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub qrels: String,
    #[arg(long)]
    pub run: String,
    /// Comma-separated: ndcg@k, ndcg, mrr@k (rr@k), map, map@k, recall@k, p@k; `(rel=N)` sets the
    /// relevance threshold of binary measures.
    #[arg(long, default_value = "ndcg@10,mrr@10,map,recall@100")]
    pub metrics: String,
    /// Also print each query's values (`qid<TAB>metric<TAB>value`), as `trec_eval -q`.
    #[arg(long)]
    pub per_query: bool,
    /// Count judged queries missing from the run as 0, as `trec_eval -c`.
    #[arg(long)]
    pub complete: bool,
}

pub async fn run(args: &EvalArgs) -> anyhow::Result<()> {
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
