//! The teacher service: takes first-stage candidate lists, scores them with a teacher and writes
//! scored triples or lists as Parquet shards (see `distill-shards`), as background jobs that can be
//! watched, cancelled, and that resume after a restart.
//!
//! ```text
//!  StartLabeling ─► jobs (table, persisted in <store>/jobs) ─► labeling::run
//!                                                               │ candidates::load   (run+queries+collection+qrels | JSONL)
//!                                                               │ teachers::build    (first_stage | precomputed | cross_encoders | llm)
//!                                                               │ sampling           (per-query, seeded: resumable)
//!                                                               │ DatasetWriter      (rolling shards, progress records, manifest)
//!                                                               └ partition          (a part's queries; the whole committed by the last part)
//! ```

pub mod access;
pub mod candidates;
pub mod error;
pub mod labeling;
pub mod limits;
pub mod llm;
pub mod partition;
pub mod sampling;
pub mod service;
pub mod teachers;

pub use error::Error;
