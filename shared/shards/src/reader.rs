//! Streams record batches from every shard of a committed dataset, one shard in memory at a time
//! (plus one read ahead), verifying each shard's size and SHA-256 against the manifest.

use crate::manifest::{Manifest, ShardInfo, MANIFEST_NAME};
use crate::schema::{self, Layout};
use crate::writer::read_manifest;
use crate::{Result, ShardError};
use arrow::array::RecordBatch;
use bytes::Bytes;
use distill_store::Location;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sha2::{Digest, Sha256};

pub struct DatasetReader {
    loc: Location,
    manifest: Manifest,
}

impl DatasetReader {
    /// Opens a committed dataset; a prefix without a manifest is an error.
    pub async fn open(loc: Location) -> Result<Self> {
        let manifest = read_manifest(&loc)
            .await?
            .ok_or_else(|| ShardError::NotCommitted { uri: loc.uri().to_string(), name: MANIFEST_NAME })?;
        Ok(Self { loc, manifest })
    }

    pub async fn open_uri(uri: &str) -> Result<Self> {
        Self::open(Location::parse(uri)?).await
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn location(&self) -> &Location {
        &self.loc
    }

    /// Fetches one shard and checks it against the manifest.
    pub async fn fetch_shard(&self, shard: &ShardInfo) -> Result<Bytes> {
        fetch_verified(&self.loc, shard).await
    }

    fn decode(
        &self,
        shard: &ShardInfo,
        bytes: Bytes,
        batch_size: usize,
    ) -> Result<BoxStream<'static, Result<RecordBatch>>> {
        Ok(stream::iter(decode(&self.loc, shard, bytes, self.manifest.layout, batch_size)?).boxed())
    }

    /// All rows of the dataset, shard after shard in manifest order, as batches of at most
    /// `batch_size` rows.
    pub fn batches(&self, batch_size: usize) -> BoxStream<'_, Result<RecordBatch>> {
        stream::iter(self.manifest.shards.iter())
            .map(move |shard| async move { self.fetch_shard(shard).await.map(|b| (shard, b)) })
            .buffered(2)
            .and_then(move |(shard, bytes)| async move { self.decode(shard, bytes, batch_size) })
            .try_flatten()
            .boxed()
    }
}

/// Fetches one shard of the dataset at `loc` and checks its size and SHA-256 against `shard`.
pub async fn fetch_verified(loc: &Location, shard: &ShardInfo) -> Result<Bytes> {
    let uri = loc.uri_of(&shard.path);
    let bytes = loc.get(&shard.path).await?;
    if bytes.len() as u64 != shard.bytes {
        return Err(ShardError::Invalid {
            uri,
            message: format!("size {} differs from the record's {}", bytes.len(), shard.bytes),
        });
    }
    let sha = hex::encode(Sha256::digest(&bytes));
    if sha != shard.sha256 {
        return Err(ShardError::Invalid {
            uri,
            message: format!("checksum {sha} differs from the record's {}", shard.sha256),
        });
    }
    Ok(bytes)
}

/// Every column chunk the footer names lies inside the file: the parquet crate panics on a
/// negative offset or size while reading (found by fuzzing a mutated shard, fuzz/corpus/shard).
fn check_column_chunks(meta: &parquet::file::metadata::ParquetMetaData, len: u64) -> Result<(), String> {
    for (g, group) in meta.row_groups().iter().enumerate() {
        for (c, col) in group.columns().iter().enumerate() {
            let start = col.dictionary_page_offset().unwrap_or_else(|| col.data_page_offset());
            let size = col.compressed_size();
            let inside =
                start >= 0 && size >= 0 && (start as u64).checked_add(size as u64).is_some_and(|end| end <= len);
            if !inside {
                return Err(format!(
                    "row group {g}, column {c}: chunk at {start} of {size} bytes is outside the file ({len} bytes)"
                ));
            }
        }
    }
    Ok(())
}

/// Decodes a fetched shard of `layout` into batches of at most `batch_size` rows.
pub fn decode(
    loc: &Location,
    shard: &ShardInfo,
    bytes: Bytes,
    layout: Layout,
    batch_size: usize,
) -> Result<impl Iterator<Item = Result<RecordBatch>> + Send + 'static> {
    let uri = loc.uri_of(&shard.path);
    let len = bytes.len() as u64;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|source| ShardError::Parquet { uri: uri.clone(), source })?;
    schema::check(layout, builder.schema()).map_err(|message| ShardError::Invalid { uri: uri.clone(), message })?;
    check_column_chunks(builder.metadata(), len)
        .map_err(|message| ShardError::Invalid { uri: uri.clone(), message })?;
    let reader = builder
        .with_batch_size(batch_size)
        .build()
        .map_err(|source| ShardError::Parquet { uri: uri.clone(), source })?;
    Ok(Contained { inner: Some(reader), uri })
}

/// The batches of a Parquet reader, with a panic inside it turned into an error that ends the
/// shard: the parquet crate (60.1) panics on some malformed pages (a division by zero for a page
/// that claims no values; found by fuzzing, fuzz/corpus/shard), and a shard is untrusted input.
struct Contained<I> {
    inner: Option<I>,
    uri: String,
}

impl<I: Iterator<Item = std::result::Result<RecordBatch, arrow::error::ArrowError>>> Iterator for Contained<I> {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let inner = self.inner.as_mut()?;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.next())) {
            Ok(batch) => batch.map(|b| b.map_err(|source| ShardError::Arrow { uri: self.uri.clone(), source })),
            Err(panic) => {
                // The reader's state is unknown after a panic: nothing more is read from it.
                self.inner = None;
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let message = format!("the Parquet reader failed on this file: {why}");
                Some(Err(ShardError::Invalid { uri: self.uri.clone(), message }))
            }
        }
    }
}

/// What [`GrowingDataset::shard`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum NextShard {
    /// The shard is closed and can be read.
    Ready(ShardInfo),
    /// Not closed yet; the dataset is still being written.
    Pending,
    /// The dataset is committed and has no shard with this number.
    End,
}

/// A dataset a running job is still writing: each shard becomes readable when the writer closes
/// it (its progress record names it), all of them once the manifest is committed. Readers follow
/// it shard by shard, in the order the writer closes them, which is the manifest's order.
pub struct GrowingDataset {
    loc: Location,
}

impl GrowingDataset {
    pub fn new(loc: Location) -> Self {
        Self { loc }
    }

    pub fn location(&self) -> &Location {
        &self.loc
    }

    /// The shard with sequence number `seq` (0-based), if closed.
    pub async fn shard(&self, seq: usize) -> Result<NextShard> {
        if let Some(m) = read_manifest(&self.loc).await? {
            return Ok(m.shards.get(seq).cloned().map_or(NextShard::End, NextShard::Ready));
        }
        match crate::writer::progress_record(&self.loc, seq as u32).await? {
            Some(shard) => Ok(NextShard::Ready(shard)),
            None => Ok(NextShard::Pending),
        }
    }
}
