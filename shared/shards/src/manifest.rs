//! The manifest: the commit record of a dataset.

use crate::schema::{Layout, TeacherIdentity};

pub const MANIFEST_NAME: &str = "_manifest.json";
pub const FORMAT_NAME: &str = "distill-shards";

/// One shard file of a dataset.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    /// File name relative to the dataset prefix.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub layout: Layout,
    pub teacher: TeacherIdentity,
    /// The job (or writer run) that produced the dataset.
    pub job_id: String,
    pub rows: u64,
    pub bytes: u64,
    pub shards: Vec<ShardInfo>,
    pub created_at_ms: i64,
    /// Producer-specific facts (source files, sampling, counters).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}
