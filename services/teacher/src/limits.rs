//! The bounds of every number in a labelling spec (docs/security.md), checked before a job is
//! created: INVALID_ARGUMENT naming the field, its value and the bound.

use crate::error::Error;
use distill_jobs::bounds::{at_most, within, MAX_BATCH_PAIRS, MAX_SEQUENCE_TOKENS, MAX_TOKENS_PER_PASS};
use distill_proto::{teacher_spec::Teacher, LabelingSpec, LlmReranker};

/// Candidates kept per query, negatives per positive.
pub const MAX_DEPTH: u64 = 10_000;
pub const MAX_NEGATIVES: u64 = 1_000;
/// Queries one job labels.
pub const MAX_QUERIES: u64 = 100_000_000;
/// Relevance grades counted as positive.
pub const MAX_RELEVANCE: i64 = 1_000;
/// Members of a cross-encoder ensemble.
pub const MAX_ENSEMBLE_MODELS: u64 = 16;
/// Words of a passage in an LLM prompt; passages in one listwise window.
pub const MAX_PASSAGE_WORDS: u64 = 4_096;
pub const MAX_WINDOW: u64 = 100;
/// LLM requests in flight, retries of one request, and the timers (milliseconds).
pub const MAX_CONCURRENCY: u64 = 256;
pub const MAX_RETRIES: u64 = 20;
pub const MAX_BACKOFF_MS: u64 = 600_000;
pub const MAX_TIMEOUT_MS: u64 = 600_000;
pub const MAX_COMPLETION_TOKENS: u64 = 32_768;
/// Rows and bytes of one shard.
pub const MAX_ROWS_PER_SHARD: u64 = 10_000_000;
pub const MAX_BYTES_PER_SHARD: u64 = 4 << 30;

fn invalid(e: String) -> Error {
    Error::InvalidArgument(e)
}

/// Every number of a labelling spec within its bound.
pub fn check(spec: &LabelingSpec) -> Result<(), Error> {
    let s = spec.sampling.unwrap_or_default();
    at_most("sampling.depth", s.depth.into(), MAX_DEPTH).map_err(invalid)?;
    at_most("sampling.negatives_per_query", s.negatives_per_query.into(), MAX_NEGATIVES).map_err(invalid)?;
    at_most("sampling.max_queries", s.max_queries.into(), MAX_QUERIES).map_err(invalid)?;
    if s.min_relevance.unsigned_abs() as i64 > MAX_RELEVANCE {
        return Err(invalid(format!(
            "sampling.min_relevance: {} is outside [-{MAX_RELEVANCE}, {MAX_RELEVANCE}]",
            s.min_relevance
        )));
    }
    let shards = spec.shards.unwrap_or_default();
    at_most("shards.rows_per_shard", shards.rows_per_shard, MAX_ROWS_PER_SHARD).map_err(invalid)?;
    at_most("shards.bytes_per_shard", shards.bytes_per_shard, MAX_BYTES_PER_SHARD).map_err(invalid)?;
    match spec.teacher.as_ref().and_then(|t| t.teacher.as_ref()) {
        Some(Teacher::CrossEncoders(e)) => {
            let f = |n: &str| format!("teacher.cross_encoders.{n}");
            at_most(&f("models (count)"), e.models.len() as u64, MAX_ENSEMBLE_MODELS).map_err(invalid)?;
            at_most(&f("batch_size"), e.batch_size.into(), MAX_BATCH_PAIRS).map_err(invalid)?;
            at_most(&f("max_query_length"), e.max_query_length.into(), MAX_SEQUENCE_TOKENS).map_err(invalid)?;
            at_most(&f("max_length"), e.max_length.into(), MAX_SEQUENCE_TOKENS).map_err(invalid)?;
            at_most(&f("max_batch_tokens"), e.max_batch_tokens.into(), MAX_TOKENS_PER_PASS).map_err(invalid)?;
        }
        Some(Teacher::LocalLlm(l)) => {
            at_most("teacher.local_llm.max_passage_words", l.max_passage_words.into(), MAX_PASSAGE_WORDS)
                .map_err(invalid)?;
        }
        Some(Teacher::Llm(l)) => check_llm(l)?,
        _ => {}
    }
    Ok(())
}

fn check_llm(l: &LlmReranker) -> Result<(), Error> {
    let f = |n: &str| format!("teacher.llm.{n}");
    for (name, value, max) in [
        ("window_size", l.window_size.into(), MAX_WINDOW),
        ("stride", l.stride.into(), MAX_WINDOW),
        ("max_passage_words", l.max_passage_words.into(), MAX_PASSAGE_WORDS),
        ("concurrency", l.concurrency.into(), MAX_CONCURRENCY),
        ("max_retries", l.max_retries.into(), MAX_RETRIES),
        ("initial_backoff_ms", l.initial_backoff_ms.into(), MAX_BACKOFF_MS),
        ("max_backoff_ms", l.max_backoff_ms.into(), MAX_BACKOFF_MS),
        ("request_timeout_ms", l.request_timeout_ms.into(), MAX_TIMEOUT_MS),
        ("max_completion_tokens", l.max_completion_tokens.into(), MAX_COMPLETION_TOKENS),
    ] {
        at_most(&f(name), value, max).map_err(invalid)?;
    }
    within(&f("temperature"), l.temperature.into(), 0.0, 2.0).map_err(invalid)?;
    within(&f("usd_per_million_prompt_tokens"), l.usd_per_million_prompt_tokens, 0.0, 1e6).map_err(invalid)?;
    within(&f("usd_per_million_completion_tokens"), l.usd_per_million_completion_tokens, 0.0, 1e6).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_proto::{Sampling, TeacherSpec};

    #[test]
    fn absurd_numbers_are_refused_with_field_and_bound() {
        assert!(check(&LabelingSpec::default()).is_ok());
        let spec =
            LabelingSpec { sampling: Some(Sampling { depth: u32::MAX, ..Default::default() }), ..Default::default() };
        assert!(check(&spec).unwrap_err().to_string().contains("sampling.depth: 4294967295"));
        let llm = |l: LlmReranker| LabelingSpec {
            teacher: Some(TeacherSpec { teacher: Some(Teacher::Llm(l)) }),
            ..Default::default()
        };
        let e = check(&llm(LlmReranker { concurrency: u32::MAX, ..Default::default() })).unwrap_err();
        assert!(e.to_string().contains("teacher.llm.concurrency"), "{e}");
        let e = check(&llm(LlmReranker { temperature: f32::NAN, ..Default::default() })).unwrap_err();
        assert!(e.to_string().contains("temperature"), "{e}");
    }
}
