//! Streams record batches from every shard of a committed dataset, one shard in memory at a time
//! (plus one read ahead), verifying each shard's size and SHA-256 against the manifest.

use crate::manifest::{Manifest, ShardInfo, MANIFEST_NAME};
use crate::schema;
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
        let uri = self.loc.uri_of(&shard.path);
        let bytes = self.loc.get(&shard.path).await?;
        if bytes.len() as u64 != shard.bytes {
            return Err(ShardError::Invalid {
                uri,
                message: format!("size {} differs from the manifest's {}", bytes.len(), shard.bytes),
            });
        }
        let sha = hex::encode(Sha256::digest(&bytes));
        if sha != shard.sha256 {
            return Err(ShardError::Invalid {
                uri,
                message: format!("checksum {sha} differs from the manifest's {}", shard.sha256),
            });
        }
        Ok(bytes)
    }

    /// Decodes a fetched shard into batches of at most `batch_size` rows.
    fn decode(
        &self,
        shard: &ShardInfo,
        bytes: Bytes,
        batch_size: usize,
    ) -> Result<BoxStream<'static, Result<RecordBatch>>> {
        let uri = self.loc.uri_of(&shard.path);
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .map_err(|source| ShardError::Parquet { uri: uri.clone(), source })?;
        schema::check(self.manifest.layout, builder.schema())
            .map_err(|message| ShardError::Invalid { uri: uri.clone(), message })?;
        let reader = builder
            .with_batch_size(batch_size)
            .build()
            .map_err(|source| ShardError::Parquet { uri: uri.clone(), source })?;
        Ok(stream::iter(reader.map(move |b| b.map_err(|source| ShardError::Arrow { uri: uri.clone(), source })))
            .boxed())
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
