//! What each fuzz target does with its input, shared by the cargo-fuzz targets (fuzz_targets/) and
//! the corpus replay test that CI runs on stable (tests/tests/fuzz_corpus.rs). A target passes when
//! its body returns: readers answer rows or an error, never a panic, an abort or a runaway
//! allocation.

use distill_proto::{EvaluationSpec, LabelingSpec, TrainingSpec};
use distill_shards::{Layout, ListRow, ShardInfo, TripleRow};
use prost::Message;
use std::sync::Arc;

/// What a target does with one input.
pub type Body = fn(&[u8]);

/// The targets, by name (as in fuzz/Cargo.toml and fuzz/corpus/).
pub const TARGETS: &[(&str, Body)] = &[
    ("trec_run", trec_run),
    ("qrels", qrels),
    ("tsv", tsv),
    ("jsonl", jsonl),
    ("hofstatter", hofstatter),
    ("llm_answer", llm_answer),
    ("shard", shard),
    ("spec", spec),
];

/// TREC runs (`qid Q0 docid rank score tag`): rows or an error naming file:line.
pub fn trec_run(data: &[u8]) {
    let _ = distill_formats::read_run(data, "fuzz.trec");
}

/// Qrels (`qid 0 docid rel`).
pub fn qrels(data: &[u8]) {
    let _ = distill_formats::read_qrels(data, "fuzz.qrels");
}

/// TSV texts (`id \t text`: collections, queries) and TSV pairs.
pub fn tsv(data: &[u8]) {
    let _ = distill_formats::read_tsv_texts(data, "fuzz.tsv", None);
    let _ = distill_formats::read_tsv_pairs(data, "fuzz.tsv");
}

/// Candidate lists as JSON lines.
pub fn jsonl(data: &[u8]) {
    let _ = distill_formats::read_candidates_jsonl(data, "fuzz.jsonl");
}

/// Hofstätter et al.'s teacher score TSV (`pos_score neg_score qid pos_pid neg_pid`).
pub fn hofstatter(data: &[u8]) {
    let _ = distill_formats::for_each_scored_triple(data, "fuzz.tsv", |_| {});
}

/// What an LLM endpoint answers: the permutation parser (first byte: the window size) on the raw
/// text, and the JSON readers (answer text, first-token logprobs, P(yes)) on it as a response body.
pub fn llm_answer(data: &[u8]) {
    use distill_teacher::llm::prompts;
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if let Some(p) = prompts::parse_permutation(&text, n as usize) {
        let mut seen = p.order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..n as usize).collect::<Vec<_>>(), "a permutation of the window");
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest) {
        let _ = prompts::answer_text(&value).map(|a| prompts::parse_permutation(a, n as usize));
        let logprobs = prompts::first_token_logprobs(&value);
        if let Some(p) = prompts::yes_probability(logprobs.iter().map(|(t, l)| (t.as_str(), *l))) {
            assert!((0.0..=1.0).contains(&p), "P(yes) = {p}");
        }
    }
}

/// Shards as the trainer reads them, past the checksum (a mutated Parquet file): the schema check,
/// the batches and the rows of either layout (first byte). `decode` contains the panics of the
/// parquet crate itself (they end the shard with an error); the panic hook is silenced meanwhile,
/// as libFuzzer's would abort on a panic even when it is caught. A panic that escapes still fails.
pub fn shard(data: &[u8]) {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    read_shard(data);
    std::panic::set_hook(hook);
}

fn read_shard(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let layout = if which % 2 == 0 { Layout::Triples } else { Layout::Lists };
    let loc = distill_store::Location::parse("memory://fuzz").expect("memory location");
    let info =
        ShardInfo { path: "part-00000.parquet".into(), rows: 0, bytes: rest.len() as u64, sha256: String::new() };
    let bytes = bytes::Bytes::copy_from_slice(rest);
    let Ok(batches) = distill_shards::reader::decode(&loc, &info, bytes, layout, 64) else {
        return;
    };
    for batch in batches.take(64) {
        let Ok(batch) = batch else {
            return;
        };
        match layout {
            Layout::Triples => drop(TripleRow::from_batch(&batch)),
            Layout::Lists => drop(ListRow::from_batch(&batch)),
        }
    }
}

/// Job specs as a gRPC client sends them: protobuf bytes decoded as a labelling, training or
/// evaluation spec (first byte) and checked as the services check them before a job exists:
/// bounds, grants (an allow list naming a directory that does not exist), validation.
pub fn spec(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let allow = Arc::new(distill_store::access::AllowList::new(&["/nonexistent-fuzz-root", "s3://fuzz"]).unwrap());
    match which % 3 {
        0 => {
            let Ok(spec) = LabelingSpec::decode(rest) else { return };
            let grants = distill_teacher::access::Grants { allow, ..Default::default() };
            let _ = distill_teacher::limits::check(&spec);
            if distill_teacher::access::check(&spec, &grants).is_ok() {
                let _ = distill_teacher::labeling::validate(&spec, &grants.endpoints);
            }
        }
        1 => {
            let Ok(spec) = TrainingSpec::decode(rest) else { return };
            let grants = distill_trainer::access::Grants { allow, ..Default::default() };
            if distill_trainer::limits::check_training(&spec).is_ok() && grants.check_training(&spec).is_ok() {
                let _ = distill_trainer::training::Hyper::from_spec(&spec);
            }
        }
        _ => {
            let Ok(spec) = EvaluationSpec::decode(rest) else { return };
            let grants = distill_trainer::access::Grants { allow, ..Default::default() };
            if grants.check_evaluation(&spec).is_ok() {
                let _ = distill_trainer::evaluation::validate(&spec, true);
            }
        }
    }
}
