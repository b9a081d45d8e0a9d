//! A BM25 first stage for users who have none: a tantivy index over a `docid \t text` collection
//! (English stemming, lower-casing), searched with the query's terms as a disjunction and ranked by
//! tantivy's BM25 (k1 = 1.2, b = 0.75). `distill retrieve` writes its top-k as a TREC run.

use std::path::Path;
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, STORED, STRING};
use tantivy::tokenizer::TokenStream;
use tantivy::{Index, IndexReader, TantivyDocument, Term};

#[derive(Debug, thiserror::Error)]
pub enum Bm25Error {
    #[error("BM25 index: {0}")]
    Index(#[from] tantivy::TantivyError),
    #[error("BM25 index at {path}: {message}")]
    Dir { path: String, message: String },
}

pub type Result<T> = std::result::Result<T, Bm25Error>;

pub struct Bm25Index {
    index: Index,
    reader: IndexReader,
    docid: Field,
    text: Field,
}

const ANALYZER: &str = "en_stem";

fn schema() -> (Schema, Field, Field) {
    let mut b = Schema::builder();
    let docid = b.add_text_field("docid", STRING | STORED);
    let text = b.add_text_field(
        "text",
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default().set_tokenizer(ANALYZER).set_index_option(IndexRecordOption::WithFreqs),
        ),
    );
    (b.build(), docid, text)
}

impl Bm25Index {
    /// Indexes `docs` in memory, or into `dir` (created; must be empty) to reuse with [`open`].
    pub fn build(docs: impl IntoIterator<Item = (String, String)>, dir: Option<&Path>) -> Result<Self> {
        let (schema, docid, text) = schema();
        let index = match dir {
            None => Index::create_in_ram(schema),
            Some(d) => {
                std::fs::create_dir_all(d)
                    .map_err(|e| Bm25Error::Dir { path: d.display().to_string(), message: e.to_string() })?;
                Index::create_in_dir(d, schema)?
            }
        };
        let mut writer = index.writer_with_num_threads::<TantivyDocument>(1, 100_000_000)?;
        for (id, body) in docs {
            let mut doc = TantivyDocument::default();
            doc.add_text(docid, &id);
            doc.add_text(text, &body);
            writer.add_document(doc)?;
        }
        writer.commit()?;
        let reader = index.reader()?;
        Ok(Self { index, reader, docid, text })
    }

    /// Opens an index [`build`] wrote to `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = Index::open_in_dir(dir)?;
        let (_, docid, text) = schema();
        let reader = index.reader()?;
        Ok(Self { index, reader, docid, text })
    }

    pub fn num_docs(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// The `k` best documents for `query` by BM25: (docid, score), best first; ties by docid.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<(String, f32)>> {
        let mut analyzer = self.index.tokenizers().get(ANALYZER).expect("en_stem is registered");
        let mut stream = analyzer.token_stream(query);
        let mut terms: Vec<Term> = Vec::new();
        while stream.advance() {
            let t = Term::from_field_text(self.text, &stream.token().text);
            if !terms.contains(&t) {
                terms.push(t);
            }
        }
        if terms.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let clauses: Vec<(Occur, Box<dyn Query>)> = terms
            .into_iter()
            .map(|t| (Occur::Should, Box::new(TermQuery::new(t, IndexRecordOption::WithFreqs)) as Box<dyn Query>))
            .collect();
        let searcher = self.reader.searcher();
        // One more than asked, so that ties at the cut can be ordered by docid as trec_eval would.
        let top = searcher.search(&BooleanQuery::new(clauses), &TopDocs::with_limit(k + 1))?;
        let mut hits: Vec<(String, f32)> = Vec::with_capacity(top.len());
        for (score, address) in top {
            let doc: TantivyDocument = searcher.doc(address)?;
            let id = doc.get_first(self.docid).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            hits.push((id, score));
        }
        hits.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        hits.truncate(k);
        Ok(hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> Vec<(String, String)> {
        [
            ("d1", "xz-utils provides XZ-format compression utilities"),
            ("d2", "a real-time strategy game of ancient warfare"),
            ("d3", "compression library for the gzip format; compressing files quickly"),
            ("d4", "games and more games"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    #[test]
    fn ranks_by_bm25_with_stemming() {
        let idx = Bm25Index::build(docs(), None).unwrap();
        assert_eq!(idx.num_docs(), 4);
        let hits = idx.search("Compressing files!", 10).unwrap();
        // "compressing" and "compression" share the stem; d3 also has "files".
        assert_eq!(hits.iter().map(|h| h.0.as_str()).collect::<Vec<_>>(), ["d3", "d1"]);
        assert!(hits[0].1 > hits[1].1);
        let hits = idx.search("strategy game", 1).unwrap();
        assert_eq!(hits[0].0, "d2");
        assert!(idx.search("", 10).unwrap().is_empty());
        assert!(idx.search("zzzz", 10).unwrap().is_empty());
    }

    /// tantivy's BM25 for one term: idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl)),
    /// idf = ln(1 + (N - n + 0.5) / (n + 0.5)), with dl in tokens.
    #[test]
    fn single_term_score_is_the_bm25_formula() {
        let idx = Bm25Index::build(docs(), None).unwrap();
        let hits = idx.search("games", 10).unwrap();
        // Token counts: "real-time" and "xz-utils" are two tokens each.
        let lens = [7.0f32, 8.0, 9.0, 4.0];
        let avgdl = lens.iter().sum::<f32>() / 4.0;
        let (n, df) = (4.0f32, 2.0f32);
        let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
        let bm25 = |tf: f32, dl: f32| idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / avgdl));
        let want = [("d4", bm25(2.0, 4.0)), ("d2", bm25(1.0, 8.0))];
        for ((id, s), (wid, ws)) in hits.iter().zip(want) {
            assert_eq!(id, wid);
            assert!((s - ws).abs() < 1e-4 * ws, "{id}: {s} vs {ws}");
        }
    }
}
