//! Datasets written in parts: one labelling job split across N workers, each writing a dataset of
//! its own below the same prefix, and the whole committed once, when every part is.
//!
//! ```text
//! _parts/00000-of-00003/part-00000-<job>.parquet, _progress/..., _manifest.json   part 0
//! _parts/00001-of-00003/...                                                        part 1
//! _parts/00002-of-00003/...                                                        part 2
//! _manifest.json     the whole: every part's shards, part 0's first, each in its own order
//! ```
//!
//! Whichever part commits last writes the whole's manifest (put-if-absent, so exactly one lands;
//! a part that finds it written takes it as done). A part that commits sees every part committed
//! before it, as the store reads its own and others' writes (S3 is strongly consistent): so of two
//! parts that commit at once, at least the later one finds all parts and commits the whole.

use crate::manifest::{Manifest, ShardInfo, FORMAT_NAME, MANIFEST_NAME};
use crate::writer::read_manifest;
use crate::{Result, ShardError};
use bytes::Bytes;
use distill_store::{Location, StoreError};
use std::collections::BTreeMap;

pub const PARTS_DIR: &str = "_parts";
/// Parts one dataset may be split into.
pub const MAX_PARTS: u32 = 10_000;

/// Where part `index` of `count` writes, below the dataset's prefix.
pub fn part_dir(index: u32, count: u32) -> String {
    format!("{PARTS_DIR}/{index:05}-of-{count:05}")
}

/// Which of `count` parts the unit `key` (a query id) belongs to: the first 8 bytes of its SHA-256,
/// modulo `count`, the same on every machine and in every version.
pub fn part_of(key: &str, count: u32) -> u32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let head = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (head % u64::from(count.max(1))) as u32
}

/// Commits the dataset at `loc` from its `count` parts if each is committed; `None` while some
/// part is not. Idempotent: an already committed whole is returned as it is.
pub async fn commit_parts(loc: &Location, count: u32) -> Result<Option<Manifest>> {
    if let Some(whole) = read_manifest(loc).await? {
        return Ok(Some(whole));
    }
    let mut parts = Vec::with_capacity(count as usize);
    for index in 0..count {
        match read_manifest(&loc.child(&part_dir(index, count))).await? {
            Some(m) => parts.push(m),
            None => return Ok(None),
        }
    }
    let whole = combine(loc, &parts, count)?;
    let json = serde_json::to_vec_pretty(&whole).expect("manifest serializes");
    match loc.put_if_absent(MANIFEST_NAME, Bytes::from(json)).await {
        Ok(()) => Ok(Some(whole)),
        // Another part committed it first.
        Err(StoreError::AlreadyExists { .. }) => read_manifest(loc).await,
        Err(e) => Err(e.into()),
    }
}

/// The whole's manifest from its parts' (in part order), which must agree on everything but the
/// queries they hold.
fn combine(loc: &Location, parts: &[Manifest], count: u32) -> Result<Manifest> {
    let first = &parts[0];
    for (index, part) in parts.iter().enumerate() {
        let differs = |what: &str| ShardError::Invalid {
            uri: loc.uri_of(&part_dir(index as u32, count)),
            message: format!("its {what} differs from part 0's: the parts are not of one labelling job"),
        };
        if part.layout != first.layout {
            return Err(differs("layout"));
        }
        if part.teacher != first.teacher {
            return Err(differs("teacher"));
        }
        for key in ["source", "sampling"] {
            if part.extra.get(key) != first.extra.get(key) {
                return Err(differs(key));
            }
        }
    }
    let shards: Vec<ShardInfo> = parts
        .iter()
        .enumerate()
        .flat_map(|(index, part)| {
            let dir = part_dir(index as u32, count);
            part.shards.iter().map(move |s| ShardInfo { path: format!("{dir}/{}", s.path), ..s.clone() })
        })
        .collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Ok(Manifest {
        format: FORMAT_NAME.to_string(),
        format_version: first.format_version,
        layout: first.layout,
        teacher: first.teacher.clone(),
        job_id: parts.iter().map(|p| p.job_id.as_str()).collect::<Vec<_>>().join("+"),
        rows: parts.iter().map(|p| p.rows).sum(),
        bytes: parts.iter().map(|p| p.bytes).sum(),
        shards,
        created_at_ms: now.as_millis() as i64,
        extra: combined_extra(parts),
    })
}

/// Source and sampling as the parts have them; queries and counters summed; each part's job,
/// rows and shards.
fn combined_extra(parts: &[Manifest]) -> serde_json::Value {
    let mut counters: BTreeMap<String, f64> = BTreeMap::new();
    for part in parts {
        for (name, value) in part.extra["counters"].as_object().into_iter().flatten() {
            *counters.entry(name.clone()).or_default() += value.as_f64().unwrap_or(0.0);
        }
    }
    let summary: Vec<serde_json::Value> = parts
        .iter()
        .enumerate()
        .map(|(index, p)| serde_json::json!({"index": index, "job_id": p.job_id, "rows": p.rows, "shards": p.shards.len()}))
        .collect();
    serde_json::json!({
        "source": parts[0].extra["source"],
        "sampling": parts[0].extra["sampling"],
        "queries": parts.iter().map(|p| p.extra["queries"].as_u64().unwrap_or(0)).sum::<u64>(),
        "counters": counters,
        "parts": summary,
    })
}
