//! Readers for the formats IR practitioners already have (see ../shared/REFERENCE.md):
//!
//! | format | lines |
//! |---|---|
//! | TREC run | `qid Q0 docid rank score tag` (whitespace separated) |
//! | qrels | `qid 0 docid rel` |
//! | MS MARCO TSV (collection, queries) | `id \t text` |
//! | candidate JSONL | `{"qid", "query", "candidates": [{"docid", "text", "score"?, "label"?}]}` |
//! | Hofstätter ensemble scores | `pos_score neg_score qid pos_pid neg_pid` |
//!
//! Every reader takes a `BufRead` and the file's name, and every error names the file and line.
//! Blank lines are skipped everywhere.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct FormatError {
    pub file: String,
    /// 1-based line number; 0 when the error is about the whole file.
    pub line: usize,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, FormatError>;

fn err(file: &str, line: usize, message: impl Into<String>) -> FormatError {
    FormatError { file: file.to_string(), line, message: message.into() }
}

/// Calls `f(line_number, line)` for every non-blank line (without its line ending).
fn for_each_line(mut reader: impl BufRead, file: &str, mut f: impl FnMut(usize, &str) -> Result<()>) -> Result<()> {
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        let read = reader.read_until(b'\n', &mut buf).map_err(|e| err(file, n + 1, format!("read failed: {e}")))?;
        if read == 0 {
            return Ok(());
        }
        n += 1;
        let line = std::str::from_utf8(&buf).map_err(|e| err(file, n, format!("not valid UTF-8: {e}")))?;
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        f(n, line)?;
    }
}

fn parse_f64(file: &str, n: usize, field: &str, value: &str) -> Result<f64> {
    let v: f64 = value.parse().map_err(|_| err(file, n, format!("{field} '{value}' is not a number")))?;
    if !v.is_finite() {
        return Err(err(file, n, format!("{field} '{value}' is not finite")));
    }
    Ok(v)
}

/// One retrieved document of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEntry {
    pub docid: String,
    /// The rank column as written in the file.
    pub rank: i64,
    pub score: f64,
    /// Line of the run file it came from (1-based), for messages.
    pub line: usize,
}

/// A query's ranked list.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedList {
    pub qid: String,
    /// Sorted as trec_eval sorts: score descending, ties by docid descending.
    pub entries: Vec<RunEntry>,
}

/// Sorts entries the way trec_eval ranks them: by score descending, ties broken by docid in
/// descending lexical order (trec_eval compares `strcmp(b.docno, a.docno)`).
pub fn sort_trec_eval(entries: &mut [RunEntry]) {
    entries.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| b.docid.cmp(&a.docid)));
}

/// Reads a TREC run. Queries keep the order of their first appearance; each list is sorted as
/// trec_eval ranks it. A document listed twice for a query is an error.
pub fn read_run(reader: impl BufRead, file: &str) -> Result<Vec<RankedList>> {
    let mut lists: Vec<RankedList> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut seen: HashSet<(usize, String)> = HashSet::new();
    for_each_line(reader, file, |n, line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() != 6 {
            return Err(err(
                file,
                n,
                format!("expected 6 columns `qid Q0 docid rank score tag`, found {}", cols.len()),
            ));
        }
        let rank: i64 = cols[3].parse().map_err(|_| err(file, n, format!("rank '{}' is not an integer", cols[3])))?;
        let score = parse_f64(file, n, "score", cols[4])?;
        let qi = *index.entry(cols[0].to_string()).or_insert_with(|| {
            lists.push(RankedList { qid: cols[0].to_string(), entries: Vec::new() });
            lists.len() - 1
        });
        if !seen.insert((qi, cols[2].to_string())) {
            return Err(err(file, n, format!("document '{}' listed twice for query '{}'", cols[2], cols[0])));
        }
        lists[qi].entries.push(RunEntry { docid: cols[2].to_string(), rank, score, line: n });
        Ok(())
    })?;
    for list in &mut lists {
        sort_trec_eval(&mut list.entries);
    }
    Ok(lists)
}

/// Relevance judgments: qid -> docid -> grade.
pub type Qrels = HashMap<String, HashMap<String, i32>>;

/// Reads TREC qrels (`qid iteration docid rel`).
pub fn read_qrels(reader: impl BufRead, file: &str) -> Result<Qrels> {
    let mut qrels: Qrels = HashMap::new();
    for_each_line(reader, file, |n, line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() != 4 {
            return Err(err(file, n, format!("expected 4 columns `qid 0 docid rel`, found {}", cols.len())));
        }
        let rel: i32 =
            cols[3].parse().map_err(|_| err(file, n, format!("relevance '{}' is not an integer", cols[3])))?;
        qrels.entry(cols[0].to_string()).or_default().insert(cols[2].to_string(), rel);
        Ok(())
    })?;
    Ok(qrels)
}

/// Calls `f(id, text)` for each line of an `id \t text` TSV, in file order; an empty id, a line
/// without a tab or an id seen twice is an error naming the line.
fn for_each_tsv(reader: impl BufRead, file: &str, mut f: impl FnMut(&str, &str)) -> Result<()> {
    let mut seen = HashSet::new();
    for_each_line(reader, file, |n, line| {
        let (id, text) =
            line.split_once('\t').ok_or_else(|| err(file, n, "expected `id<TAB>text`: no tab on this line"))?;
        let id = id.trim();
        if id.is_empty() {
            return Err(err(file, n, "empty id"));
        }
        if !seen.insert(id.to_string()) {
            return Err(err(file, n, format!("id '{id}' appears twice")));
        }
        f(id, text);
        Ok(())
    })
}

/// Reads an `id \t text` TSV (MS MARCO collections and query files). With `keep`, only those ids
/// are kept, so a large collection costs memory only for the documents a run retrieved.
pub fn read_tsv_texts(
    reader: impl BufRead,
    file: &str,
    keep: Option<&HashSet<String>>,
) -> Result<HashMap<String, String>> {
    let mut texts = HashMap::new();
    for_each_tsv(reader, file, |id, text| {
        if keep.is_none_or(|k| k.contains(id)) {
            texts.insert(id.to_string(), text.to_string());
        }
    })?;
    Ok(texts)
}

/// Reads an `id \t text` TSV in file order.
pub fn read_tsv_pairs(reader: impl BufRead, file: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for_each_tsv(reader, file, |id, text| pairs.push((id.to_string(), text.to_string())))?;
    Ok(pairs)
}

/// One candidate of a JSONL query line.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlCandidate {
    pub docid: String,
    pub text: String,
    #[serde(default)]
    pub score: Option<f64>,
    #[serde(default)]
    pub label: Option<i32>,
}

/// One query line of a candidate JSONL file.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlQuery {
    pub qid: String,
    pub query: String,
    pub candidates: Vec<JsonlCandidate>,
}

/// Reads candidate JSONL: one query with its candidates per line.
pub fn read_candidates_jsonl(reader: impl BufRead, file: &str) -> Result<Vec<JsonlQuery>> {
    let mut out = Vec::new();
    let mut qids = HashSet::new();
    for_each_line(reader, file, |n, line| {
        let q: JsonlQuery = serde_json::from_str(line).map_err(|e| err(file, n, format!("invalid query line: {e}")))?;
        if !qids.insert(q.qid.clone()) {
            return Err(err(file, n, format!("query '{}' appears twice", q.qid)));
        }
        let mut docids = HashSet::new();
        for c in &q.candidates {
            if !docids.insert(c.docid.as_str()) {
                return Err(err(file, n, format!("document '{}' listed twice for query '{}'", c.docid, q.qid)));
            }
            if let Some(s) = c.score {
                if !s.is_finite() {
                    return Err(err(file, n, format!("score of document '{}' is not finite", c.docid)));
                }
            }
        }
        out.push(q);
        Ok(())
    })?;
    Ok(out)
}

/// One row of Hofstätter et al.'s ensemble teacher file.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredTriple {
    pub pos_score: f64,
    pub neg_score: f64,
    pub qid: String,
    pub pos_id: String,
    pub neg_id: String,
}

/// Reads Hofstätter's ensemble scores: `pos_score neg_score qid pos_pid neg_pid` (tab or space
/// separated), calling `f` per row so that the ~40M-row file is never held as rows.
pub fn for_each_scored_triple(reader: impl BufRead, file: &str, mut f: impl FnMut(ScoredTriple)) -> Result<()> {
    for_each_line(reader, file, |n, line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() != 5 {
            return Err(err(
                file,
                n,
                format!("expected 5 columns `pos_score neg_score qid pos_pid neg_pid`, found {}", cols.len()),
            ));
        }
        f(ScoredTriple {
            pos_score: parse_f64(file, n, "pos_score", cols[0])?,
            neg_score: parse_f64(file, n, "neg_score", cols[1])?,
            qid: cols[2].to_string(),
            pos_id: cols[3].to_string(),
            neg_id: cols[4].to_string(),
        });
        Ok(())
    })
}

#[cfg(test)]
mod tests;
