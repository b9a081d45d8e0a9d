//! The trainer service: streams teacher shards, trains a student cross-encoder with the chosen
//! objective, checkpoints and resumes, evaluates re-rankers as trec_eval does, exports Hugging
//! Face checkpoints — as background jobs that can be watched, cancelled, and that survive restarts.
//!
//! ```text
//!  StartTraining ─► jobs (table, persisted in <store>/jobs) ─► training::prepare (datasets, objective check, backbone)
//!                                                              training::run (blocking thread)
//!                                                               │ data::spawn_producer  (shards → groups → shuffle → tokenize)
//!                                                               │ model forward/backward (distill-models), objectives
//!                                                               │ AdamW (own state), schedule, clipping, accumulation
//!                                                               │ evaluation::EvalData  (periodic re-ranking, best model)
//!                                                               └ checkpoints/, metrics.jsonl, loss.svg, final/, best/
//!  StartEvaluation ─► evaluation (re-rank a TREC run, trec_eval metrics, run.trec + metrics.json)
//! ```

pub mod access;
pub mod data;
pub mod error;
pub mod evaluation;
pub mod limits;
pub mod objectives;
pub mod service;
pub mod teacher_link;
pub mod training;

pub use error::Error;
