//! Turns one scored query into shard rows. Everything here depends only on the query, its scores
//! and the seed, never on what was labelled before: that is what lets a resumed job produce the
//! rows of an uninterrupted one.

use crate::candidates::{Candidate, QueryCandidates};
use distill_shards::{ListItem, ListRow, TripleRow};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy)]
pub struct SamplingParams {
    pub negatives: usize,
    pub positives_from_qrels: bool,
    pub min_relevance: i32,
    pub seed: u64,
}

impl SamplingParams {
    pub fn from_proto(s: &distill_proto::Sampling) -> Self {
        Self {
            negatives: (s.negatives_per_query as usize).max(1),
            positives_from_qrels: s.positives_from_qrels,
            min_relevance: if s.min_relevance <= 0 { 1 } else { s.min_relevance },
            seed: s.seed,
        }
    }
}

/// Why a query gave no rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    NoPositive,
    NoNegative,
    NoScoredCandidate,
}

impl Skip {
    pub fn counter(self) -> &'static str {
        match self {
            Skip::NoPositive => "skipped_no_positive",
            Skip::NoNegative => "skipped_no_negative",
            Skip::NoScoredCandidate => "skipped_no_scored_candidate",
        }
    }
}

/// FNV-1a: a stable hash (the std hasher may change between releases), so seeds stay meaningful.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

fn query_rng(seed: u64, qid: &str) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ fnv1a(qid))
}

/// 1-based teacher ranks of the scored candidates: score descending, ties by docid descending
/// (trec_eval's order). Unscored candidates get None.
pub fn teacher_ranks(candidates: &[Candidate], scores: &[Option<f64>]) -> Vec<Option<i32>> {
    let mut order: Vec<usize> = (0..candidates.len()).filter(|&i| scores[i].is_some()).collect();
    order.sort_by(|&a, &b| {
        scores[b].unwrap().total_cmp(&scores[a].unwrap()).then_with(|| candidates[b].docid.cmp(&candidates[a].docid))
    });
    let mut ranks = vec![None; candidates.len()];
    for (r, i) in order.into_iter().enumerate() {
        ranks[i] = Some(r as i32 + 1);
    }
    ranks
}

/// The `lists` row of a query: its scored candidates in first-stage order. Returns the row (None if
/// nothing was scored) and how many candidates were dropped for lack of a teacher score.
pub fn list_row(q: &QueryCandidates, scores: &[Option<f64>]) -> (Result<ListRow, Skip>, usize) {
    let ranks = teacher_ranks(&q.candidates, scores);
    let items: Vec<ListItem> = q
        .candidates
        .iter()
        .zip(scores.iter().zip(&ranks))
        .filter_map(|(c, (s, r))| {
            Some(ListItem {
                doc_id: c.docid.clone(),
                text: c.text.clone(),
                teacher_score: (*s)?,
                teacher_rank: (*r)?,
                label: c.label,
                member_scores: None,
            })
        })
        .collect();
    let unscored = q.candidates.len() - items.len();
    if items.is_empty() {
        return (Err(Skip::NoScoredCandidate), unscored);
    }
    (Ok(ListRow { query_id: q.qid.clone(), query: q.query.clone(), items }), unscored)
}

/// The `triples` rows of a query. Positives: judged-relevant documents (retrieved ones first, in
/// first-stage order, then unretrieved ones) when `positives_from_qrels`, else the teacher's top
/// candidate. Negatives: for each positive, `negatives` candidates drawn without replacement from
/// the candidates that are neither positive nor judged relevant.
pub fn triple_rows(
    q: &QueryCandidates,
    scores: &[Option<f64>],
    unretrieved_scores: &[Option<f64>],
    p: &SamplingParams,
) -> Result<Vec<TripleRow>, Skip> {
    let relevant = |c: &Candidate| c.label.is_some_and(|l| l >= p.min_relevance);
    let mut positives: Vec<(&Candidate, Option<f64>)> = Vec::new();
    if p.positives_from_qrels {
        positives.extend(q.candidates.iter().zip(scores).filter(|(c, _)| relevant(c)).map(|(c, s)| (c, *s)));
        positives.extend(q.unretrieved_relevant.iter().zip(unretrieved_scores).map(|(c, s)| (c, *s)));
    } else {
        let ranks = teacher_ranks(&q.candidates, scores);
        if let Some(top) = ranks.iter().position(|r| *r == Some(1)) {
            positives.push((&q.candidates[top], scores[top]));
        }
    }
    if positives.is_empty() {
        return Err(Skip::NoPositive);
    }
    let pool: Vec<usize> = (0..q.candidates.len())
        .filter(|&i| {
            let c = &q.candidates[i];
            !relevant(c) && !positives.iter().any(|(pc, _)| pc.docid == c.docid)
        })
        .collect();
    if pool.is_empty() {
        return Err(Skip::NoNegative);
    }
    let mut rng = query_rng(p.seed, &q.qid);
    let mut rows = Vec::new();
    for (pos, pos_score) in positives {
        for j in sample(&mut rng, pool.len(), p.negatives.min(pool.len())) {
            let i = pool[j];
            let neg = &q.candidates[i];
            rows.push(TripleRow {
                query_id: q.qid.clone(),
                query: q.query.clone(),
                pos_id: pos.docid.clone(),
                pos_text: pos.text.clone(),
                pos_score,
                pos_label: pos.label,
                neg_id: neg.docid.clone(),
                neg_text: neg.text.clone(),
                neg_score: scores[i],
                neg_label: neg.label,
                pos_member_scores: None,
                neg_member_scores: None,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, score: f64, label: Option<i32>) -> Candidate {
        Candidate { docid: id.into(), text: format!("text {id}"), first_stage_score: Some(score), label }
    }

    fn query() -> QueryCandidates {
        QueryCandidates {
            qid: "q1".into(),
            query: "what".into(),
            candidates: vec![
                cand("a", 3.0, None),
                cand("b", 5.0, Some(2)),
                cand("c", 1.0, Some(0)),
                cand("d", 3.0, None),
            ],
            unretrieved_relevant: vec![cand("z", 0.0, Some(1))],
        }
    }

    fn params(n: usize, qrels: bool) -> SamplingParams {
        SamplingParams { negatives: n, positives_from_qrels: qrels, min_relevance: 1, seed: 7 }
    }

    #[test]
    fn ranks_follow_scores_with_ties_by_docid_descending() {
        let q = query();
        let s: Vec<_> = q.candidates.iter().map(|c| c.first_stage_score).collect();
        assert_eq!(teacher_ranks(&q.candidates, &s), [Some(3), Some(1), Some(4), Some(2)]);
        let partial = [Some(1.0), None, Some(2.0), None];
        assert_eq!(teacher_ranks(&q.candidates, &partial), [Some(2), None, Some(1), None]);
    }

    #[test]
    fn triples_from_qrels_use_every_relevant_document_and_never_a_relevant_negative() {
        let q = query();
        let s: Vec<_> = q.candidates.iter().map(|c| c.first_stage_score).collect();
        let rows = triple_rows(&q, &s, &[None], &params(2, true)).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows.iter().map(|r| r.pos_id.as_str()).collect::<Vec<_>>(), ["b", "b", "z", "z"]);
        assert!(rows.iter().all(|r| ["a", "c", "d"].contains(&r.neg_id.as_str())));
        assert_eq!(rows[2].pos_score, None);
        assert_eq!(rows, triple_rows(&q, &s, &[None], &params(2, true)).unwrap(), "deterministic");
        let other_seed = SamplingParams { seed: 8, ..params(2, true) };
        let draws: Vec<_> = (0..20)
            .map(|seed| triple_rows(&q, &s, &[None], &SamplingParams { seed, ..other_seed }).unwrap()[0].neg_id.clone())
            .collect();
        assert!(draws.iter().any(|d| d != &draws[0]), "the seed changes the draw");
    }

    #[test]
    fn triples_without_qrels_take_the_teachers_top_candidate() {
        let q = query();
        let s = [Some(9.0), Some(1.0), Some(0.5), None];
        let rows = triple_rows(&q, &s, &[None], &params(10, false)).unwrap();
        assert!(rows.iter().all(|r| r.pos_id == "a" && r.pos_score == Some(9.0)));
        // b is judged relevant, so it is no negative; d has no score but can be one.
        let mut negs: Vec<_> = rows.iter().map(|r| r.neg_id.as_str()).collect();
        negs.sort();
        assert_eq!(negs, ["c", "d"]);
    }

    #[test]
    fn skips_are_reported() {
        let mut q = query();
        q.unretrieved_relevant.clear();
        for c in &mut q.candidates {
            c.label = None;
        }
        let s = vec![Some(1.0); 4];
        assert_eq!(triple_rows(&q, &s, &[], &params(1, true)), Err(Skip::NoPositive));
        q.candidates.truncate(1);
        assert_eq!(triple_rows(&q, &s[..1], &[], &params(1, false)), Err(Skip::NoNegative));
        assert_eq!(list_row(&q, &[None]).0, Err(Skip::NoScoredCandidate));
    }

    #[test]
    fn lists_keep_first_stage_order_and_drop_unscored() {
        let q = query();
        let (row, unscored) = list_row(&q, &[Some(1.0), None, Some(3.0), Some(2.0)]);
        let row = row.unwrap();
        assert_eq!(unscored, 1);
        let got: Vec<_> = row.items.iter().map(|i| (i.doc_id.as_str(), i.teacher_rank, i.label)).collect();
        assert_eq!(got, [("a", 3, None), ("c", 1, Some(0)), ("d", 2, None)]);
    }
}
