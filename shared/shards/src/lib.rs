//! The shard format that the teacher writes and the trainer reads. It knows nothing of models.
//!
//! A dataset is an object-store prefix holding
//!
//! ```text
//! part-00000-<run id>.parquet     zstd Parquet shards, rows of one layout (see [`schema`])
//! part-00001-<run id>.parquet
//! _progress/shard-00000.json      one record per finished shard, written put-if-absent as the
//! _progress/shard-00001.json      shard is closed: what a resumed writer continues from
//! _manifest.json                  written last, put-if-absent: the dataset is complete
//! ```
//!
//! A dataset labelled in parts holds one such dataset per part below `_parts/` and a manifest of
//! the whole (see [`parts`]).
//!
//! A dataset without `_manifest.json` is not readable as complete ([`DatasetReader::open`] refuses
//! it). The manifest lists every shard with its rows, bytes and SHA-256; the reader verifies them.
//! The layouts and their columns are documented in `docs/shards.md` and in [`schema`].

pub mod manifest;
pub mod parts;
pub mod reader;
pub mod rows;
pub mod schema;
pub mod writer;

pub use manifest::{Manifest, ShardInfo, MANIFEST_NAME};
pub use reader::{DatasetReader, GrowingDataset, NextShard};
pub use rows::{ListItem, ListRow, TripleRow};
pub use schema::{Layout, TeacherIdentity};
pub use writer::{DatasetWriter, Fence, Resume, WriterOptions};

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Store(#[from] distill_store::StoreError),
    #[error("{uri}: {message}")]
    Invalid { uri: String, message: String },
    #[error("{uri}: no committed manifest ({name} is missing): the dataset is incomplete or absent")]
    NotCommitted { uri: String, name: &'static str },
    #[error("{uri}: already holds a committed dataset (job {job_id})")]
    AlreadyCommitted { uri: String, job_id: String },
    #[error("{uri}: parquet: {source}")]
    Parquet { uri: String, source: parquet::errors::ParquetError },
    #[error("{uri}: arrow: {source}")]
    Arrow { uri: String, source: arrow::error::ArrowError },
    #[error("{uri}: not committed: {message}")]
    Fenced { uri: String, message: String },
}

pub type Result<T, E = ShardError> = std::result::Result<T, E>;
