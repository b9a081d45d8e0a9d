//! `distill shards inspect`: a dataset's manifest, schema, shards and first rows.

use distill_shards::{DatasetReader, Layout, ListRow, TripleRow};
use futures::TryStreamExt;

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("null".into(), |v| v.to_string())
}

pub async fn inspect(uri: &str, rows: usize) -> anyhow::Result<()> {
    let reader = DatasetReader::open_uri(&distill_store::absolutize(uri)).await?;
    let m = reader.manifest();
    println!("dataset:  {}", reader.location());
    println!("layout:   {}", m.layout.name());
    println!("teacher:  {}", serde_json::to_string(&m.teacher)?);
    println!("job:      {}", m.job_id);
    println!("rows:     {}  bytes: {}  shards: {}", m.rows, m.bytes, m.shards.len());
    println!("schema:");
    for f in distill_shards::schema::fields(m.layout) {
        println!("  {:<16} {}{}", f.name(), f.data_type(), if f.is_nullable() { " (nullable)" } else { "" });
    }
    println!("shards:");
    for s in &m.shards {
        println!("  {}  rows={} bytes={} sha256={}", s.path, s.rows, s.bytes, s.sha256);
    }
    if rows == 0 {
        return Ok(());
    }
    println!("first {rows} rows:");
    let mut batches = reader.batches(rows);
    let mut shown = 0;
    while shown < rows {
        let Some(batch) = batches.try_next().await? else {
            break;
        };
        match m.layout {
            Layout::Triples => {
                for r in TripleRow::from_batch(&batch).map_err(anyhow::Error::msg)?.into_iter().take(rows - shown) {
                    println!(
                        "  {} {:?} | + {} score={} label={} {:?} | - {} score={} label={} {:?}",
                        r.query_id,
                        cut(&r.query, 40),
                        r.pos_id,
                        opt(r.pos_score),
                        opt(r.pos_label),
                        cut(&r.pos_text, 40),
                        r.neg_id,
                        opt(r.neg_score),
                        opt(r.neg_label),
                        cut(&r.neg_text, 40)
                    );
                    shown += 1;
                }
            }
            Layout::Lists => {
                for r in ListRow::from_batch(&batch).map_err(anyhow::Error::msg)?.into_iter().take(rows - shown) {
                    println!("  {} {:?} ({} candidates)", r.query_id, cut(&r.query, 60), r.items.len());
                    for i in r.items.iter().take(5) {
                        println!(
                            "      {} score={} teacher_rank={} label={} {:?}",
                            i.doc_id,
                            i.teacher_score,
                            i.teacher_rank,
                            opt(i.label),
                            cut(&i.text, 50)
                        );
                    }
                    shown += 1;
                }
            }
        }
    }
    Ok(())
}
