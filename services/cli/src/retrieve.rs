//! `distill retrieve`: a BM25 first stage (tantivy) over a `docid \t text` collection, writing the
//! top-k of each query as a TREC run (`qid Q0 docid rank score bm25`).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct RetrieveArgs {
    /// Collection TSV (`docid<TAB>text`; `.zst` is decompressed): a path or object-store URL.
    #[arg(long)]
    pub(crate) collection: String,
    /// Queries TSV (`qid<TAB>text`; `.zst` too).
    #[arg(long)]
    pub(crate) queries: String,
    /// Where to write the TREC run.
    #[arg(long)]
    pub(crate) output: PathBuf,
    /// Documents per query.
    #[arg(long, short = 'k', default_value_t = 100)]
    pub(crate) k: usize,
    /// Keep the index in this directory: built there the first time, opened after.
    #[arg(long)]
    pub(crate) index: Option<PathBuf>,
    /// Only the first N queries (in file order; 0: all).
    #[arg(long, default_value_t = 0)]
    pub(crate) max_queries: usize,
    #[arg(long, default_value = "bm25")]
    pub(crate) tag: String,
}

pub async fn run(a: RetrieveArgs) -> anyhow::Result<()> {
    let index = match &a.index {
        Some(dir) if dir.join("meta.json").is_file() => {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || distill_bm25::Bm25Index::open(&dir)).await??
        }
        _ => {
            let reader = distill_store::open_text(&a.collection).await?;
            let name = a.collection.clone();
            let dir = a.index.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<distill_bm25::Bm25Index> {
                let docs = distill_formats::read_tsv_pairs(reader, &name)?;
                let bar = ProgressBar::new(docs.len() as u64)
                    .with_style(ProgressStyle::with_template("indexing {bar:40} {pos}/{len} documents")?);
                let index = distill_bm25::Bm25Index::build(docs.into_iter().inspect(|_| bar.inc(1)), dir.as_deref())?;
                bar.finish();
                Ok(index)
            })
            .await??
        }
    };
    let mut queries = distill_formats::read_tsv_pairs(distill_store::open_text(&a.queries).await?, &a.queries)?;
    if a.max_queries > 0 {
        queries.truncate(a.max_queries);
    }
    let out = a.output.clone();
    let (k, tag) = (a.k, a.tag.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let file = std::fs::File::create(&out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
        let mut w = std::io::BufWriter::new(file);
        let bar = ProgressBar::new(queries.len() as u64)
            .with_style(ProgressStyle::with_template("retrieving {bar:40} {pos}/{len} queries")?);
        let mut empty = 0;
        for (qid, text) in &queries {
            let hits = index.search(text, k)?;
            empty += usize::from(hits.is_empty());
            for (rank, (docid, score)) in hits.iter().enumerate() {
                writeln!(w, "{qid} Q0 {docid} {} {score:.6} {tag}", rank + 1)?;
            }
            bar.inc(1);
        }
        bar.finish();
        w.flush()?;
        eprintln!(
            "{} queries over {} documents -> {} ({empty} queries matched nothing)",
            queries.len(),
            index.num_docs(),
            out.display()
        );
        Ok(())
    })
    .await??;
    Ok(())
}
