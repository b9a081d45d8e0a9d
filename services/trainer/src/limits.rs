//! The bounds of every number in a training or evaluation spec (docs/security.md), checked before
//! a job is created: INVALID_ARGUMENT naming the field, its value and the bound.

use crate::Error;
use distill_jobs::bounds::{at_most, within, MAX_BATCH_PAIRS, MAX_SEQUENCE_TOKENS, MAX_TOKENS_PER_PASS};
use distill_proto::{EvaluationSpec, TrainingSpec};

/// Groups per micro-batch, passages per group, groups held for shuffling.
pub const MAX_GROUP_SIZE: u64 = 1024;
pub const MAX_SHUFFLE_BUFFER: u64 = 1_000_000;
/// Steps, warm-up steps, and the checkpoint and evaluation intervals.
pub const MAX_STEPS: u64 = 1_000_000_000;
pub const MAX_EPOCHS: u64 = 10_000;
pub const MAX_ACCUMULATION: u64 = 1024;
pub const MAX_DATASETS: u64 = 1024;
pub const MAX_BACKBONE_LAYERS: u64 = 256;
/// Documents re-ranked per query, metrics per evaluation, queries per evaluation.
pub const MAX_TOP_K: u64 = 10_000;
pub const MAX_METRICS: u64 = 64;
pub const MAX_EVAL_QUERIES: u64 = 10_000_000;
/// Learning rates: any finite one up to this is harmless to the process (a rate that blows the
/// weights up ends the job FAILED at the first non-finite loss, which tests use).
pub const MAX_LEARNING_RATE: f64 = 1e30;

fn invalid(e: String) -> Error {
    Error::InvalidArgument(e)
}

/// Every number of a training spec within its bound.
pub fn check_training(spec: &TrainingSpec) -> Result<(), Error> {
    let h = spec.hyperparameters.clone().unwrap_or_default();
    let f = |name: &str| format!("hyperparameters.{name}");
    at_most(&f("batch_size"), h.batch_size.into(), MAX_BATCH_PAIRS).map_err(invalid)?;
    at_most(&f("group_size"), h.group_size.into(), MAX_GROUP_SIZE).map_err(invalid)?;
    at_most(&f("max_steps"), h.max_steps, MAX_STEPS).map_err(invalid)?;
    at_most(&f("epochs"), h.epochs.into(), MAX_EPOCHS).map_err(invalid)?;
    at_most(&f("warmup_steps"), h.warmup_steps, MAX_STEPS).map_err(invalid)?;
    at_most(&f("gradient_accumulation"), h.gradient_accumulation.into(), MAX_ACCUMULATION).map_err(invalid)?;
    at_most(&f("max_query_length"), h.max_query_length.into(), MAX_SEQUENCE_TOKENS).map_err(invalid)?;
    at_most(&f("max_length"), h.max_length.into(), MAX_SEQUENCE_TOKENS).map_err(invalid)?;
    at_most(&f("shuffle_buffer"), h.shuffle_buffer.into(), MAX_SHUFFLE_BUFFER).map_err(invalid)?;
    within(&f("learning_rate"), h.learning_rate, 0.0, MAX_LEARNING_RATE).map_err(invalid)?;
    within(&f("temperature"), h.temperature, 0.0, 1000.0).map_err(invalid)?;
    within(&f("weight_decay"), h.weight_decay.unwrap_or(0.0), 0.0, 10.0).map_err(invalid)?;
    within(&f("max_grad_norm"), h.max_grad_norm.unwrap_or(0.0), 0.0, 1e6).map_err(invalid)?;
    // One micro-batch's tokens, with the defaults the job would use (8 groups of 8, 256 tokens).
    let or = |v: u32, d: u64| if v == 0 { d } else { v as u64 };
    let tokens = or(h.batch_size, 8) * or(h.group_size, 8) * or(h.max_length, 256);
    at_most(&f("batch_size x group_size x max_length"), tokens, MAX_TOKENS_PER_PASS).map_err(invalid)?;
    at_most("datasets (count)", spec.datasets.len() as u64, MAX_DATASETS).map_err(invalid)?;
    at_most("eval_every_steps", spec.eval_every_steps, MAX_STEPS).map_err(invalid)?;
    at_most("checkpoint_every_steps", spec.checkpoint_every_steps, MAX_STEPS).map_err(invalid)?;
    at_most("backbone_layers", spec.backbone_layers.into(), MAX_BACKBONE_LAYERS).map_err(invalid)?;
    if let Some(e) = &spec.evaluation {
        check_evaluation(e, "evaluation.")?;
    }
    Ok(())
}

/// Every number of an evaluation spec within its bound (`prefix` names where the spec sits).
pub fn check_evaluation(spec: &EvaluationSpec, prefix: &str) -> Result<(), Error> {
    let f = |name: &str| format!("{prefix}{name}");
    at_most(&f("top_k"), spec.top_k.into(), MAX_TOP_K).map_err(invalid)?;
    at_most(&f("metrics (count)"), spec.metrics.len() as u64, MAX_METRICS).map_err(invalid)?;
    at_most(&f("batch_size"), spec.batch_size.into(), MAX_BATCH_PAIRS).map_err(invalid)?;
    at_most(&f("max_query_length"), spec.max_query_length.into(), MAX_SEQUENCE_TOKENS).map_err(invalid)?;
    at_most(&f("max_length"), spec.max_length.into(), MAX_SEQUENCE_TOKENS).map_err(invalid)?;
    at_most(&f("max_queries"), spec.max_queries.into(), MAX_EVAL_QUERIES).map_err(invalid)?;
    let or = |v: u32, d: u64| if v == 0 { d } else { v as u64 };
    let tokens = or(spec.batch_size, 32) * or(spec.max_length, 256);
    at_most(&f("batch_size x max_length"), tokens, MAX_TOKENS_PER_PASS).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_proto::Hyperparameters;

    #[test]
    fn absurd_numbers_are_refused_with_field_and_bound() {
        let spec = |h: Hyperparameters| TrainingSpec { hyperparameters: Some(h), ..Default::default() };
        assert!(check_training(&spec(Hyperparameters::default())).is_ok());
        let e = check_training(&spec(Hyperparameters { shuffle_buffer: u32::MAX, ..Default::default() })).unwrap_err();
        assert!(e.to_string().contains("hyperparameters.shuffle_buffer: 4294967295"), "{e}");
        let e = check_training(&spec(Hyperparameters { group_size: u32::MAX, ..Default::default() })).unwrap_err();
        assert!(e.to_string().contains("group_size"), "{e}");
        let big = Hyperparameters { batch_size: 4096, group_size: 1024, max_length: 512, ..Default::default() };
        assert!(check_training(&spec(big)).unwrap_err().to_string().contains("x max_length"));
        let nan = Hyperparameters { learning_rate: f64::NAN, ..Default::default() };
        assert!(check_training(&spec(nan)).is_err());
        let eval = EvaluationSpec { top_k: u32::MAX, ..Default::default() };
        assert!(check_evaluation(&eval, "").unwrap_err().to_string().contains("top_k"));
    }
}
