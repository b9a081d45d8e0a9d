//! The rolling, resumable dataset writer.
//!
//! Rows arrive in *units* (a labelling job's unit is a query). A shard is closed only at a unit
//! boundary, once it reaches the row or byte target, and its progress record
//! (`_progress/shard-NNNNN.json`, put-if-absent) names the number of units whose rows are all in
//! closed shards: the cursor. A writer opened again on the same prefix by the same job continues
//! from the last recorded cursor and drops shard files that no record names (a crash while a shard
//! was being written), so that a resumed run writes exactly the rows of an uninterrupted one.

use crate::manifest::{Manifest, ShardInfo, FORMAT_NAME, MANIFEST_NAME};
use crate::rows::{ListRow, Rows, TripleRow};
use crate::schema::{self, Layout, TeacherIdentity};
use crate::{Result, ShardError};
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use distill_store::{Location, StoreError};
use futures::future::BoxFuture;
use object_store::buffered::BufWriter;
use parquet::arrow::async_writer::AsyncFileWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};

const PROGRESS_DIR: &str = "_progress";

/// Asked right before each commit (a progress record, the manifest): an error stops the writer
/// there (the job's lease was lost to another attempt).
pub type Fence = Arc<dyn Fn() -> BoxFuture<'static, std::result::Result<(), String>> + Send + Sync>;

#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    /// Close a shard once it holds at least this many rows (at a unit boundary).
    pub rows_per_shard: u64,
    /// ... or about this many bytes.
    pub bytes_per_shard: u64,
    /// Rows buffered before they are handed to the Parquet writer as one record batch.
    pub batch_rows: usize,
    /// Rows per Parquet row group (bounds the reader's memory per batch).
    pub row_group_rows: usize,
    /// Which attempt of the job writes (0 for the first): shard files of different attempts have
    /// different names, so an attempt that has lost its job to another replica cannot overwrite
    /// the new attempt's shards.
    pub attempt: u32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self { rows_per_shard: 100_000, bytes_per_shard: 128 << 20, batch_rows: 1024, row_group_rows: 8192, attempt: 0 }
    }
}

/// What a progress record holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ProgressRecord {
    seq: u32,
    job_id: String,
    cursor: u64,
    shard: ShardInfo,
    /// The producer's own state at `cursor` (counters), handed back on resume.
    #[serde(default)]
    state: serde_json::Value,
}

/// Where a reopened writer continues: units before `cursor` are in closed shards; `state` is what
/// the producer recorded with the last closed shard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resume {
    pub cursor: u64,
    pub state: serde_json::Value,
}

#[derive(Default)]
struct Digested {
    hasher: Sha256,
    bytes: u64,
}

/// Forwards Parquet bytes to the object-store writer and hashes them on the way.
struct HashingWriter {
    inner: BufWriter,
    digest: Arc<Mutex<Digested>>,
}

impl AsyncFileWriter for HashingWriter {
    fn write(&mut self, bs: Bytes) -> BoxFuture<'_, parquet::errors::Result<()>> {
        {
            let mut d = self.digest.lock().unwrap_or_else(|e| e.into_inner());
            d.hasher.update(&bs);
            d.bytes += bs.len() as u64;
        }
        self.inner.write(bs)
    }

    fn complete(&mut self) -> BoxFuture<'_, parquet::errors::Result<()>> {
        self.inner.complete()
    }
}

struct OpenShard {
    seq: u32,
    name: String,
    writer: AsyncArrowWriter<HashingWriter>,
    digest: Arc<Mutex<Digested>>,
    rows: u64,
}

pub struct DatasetWriter {
    loc: Location,
    layout: Layout,
    schema: SchemaRef,
    teacher: TeacherIdentity,
    opts: WriterOptions,
    job_id: String,
    props: WriterProperties,
    shards: Vec<ShardInfo>,
    current: Option<OpenShard>,
    buffer: Rows,
    buffer_bytes: usize,
    cursor: u64,
    state: serde_json::Value,
    fence: Option<Fence>,
}

fn shard_name(seq: u32, job_id: &str, attempt: u32) -> String {
    match attempt {
        0 => format!("part-{seq:05}-{job_id}.parquet"),
        a => format!("part-{seq:05}-{job_id}-a{a}.parquet"),
    }
}

fn progress_name(seq: u32) -> String {
    format!("{PROGRESS_DIR}/shard-{seq:05}.json")
}

/// The shard a closed progress record names, if the record exists.
pub(crate) async fn progress_record(loc: &Location, seq: u32) -> Result<Option<ShardInfo>> {
    let name = progress_name(seq);
    match loc.get(&name).await {
        Ok(bytes) => serde_json::from_slice::<ProgressRecord>(&bytes).map(|r| Some(r.shard)).map_err(|e| {
            ShardError::Invalid { uri: loc.uri_of(&name), message: format!("not a valid progress record: {e}") }
        }),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads the manifest at `loc`, if one is committed.
pub(crate) async fn read_manifest(loc: &Location) -> Result<Option<Manifest>> {
    match loc.get(MANIFEST_NAME).await {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| ShardError::Invalid {
            uri: loc.uri_of(MANIFEST_NAME),
            message: format!("not a valid manifest: {e}"),
        }),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// How many of `records` (in order) name a shard whose size and SHA-256 are those recorded; the
/// first that does not (lost, cut short or overwritten by a crash) ends the run.
async fn intact_prefix(loc: &Location, records: &[ProgressRecord]) -> Result<usize> {
    for (i, r) in records.iter().enumerate() {
        let bytes = match loc.get(&r.shard.path).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => return Ok(i),
            Err(e) => return Err(e.into()),
        };
        if bytes.len() as u64 != r.shard.bytes || hex::encode(Sha256::digest(&bytes)) != r.shard.sha256 {
            tracing::warn!(shard = %loc.uri_of(&r.shard.path), "recorded shard is not as recorded: written again");
            return Ok(i);
        }
    }
    Ok(records.len())
}

impl DatasetWriter {
    /// Opens a writer on `loc` for `job_id`. Returns the writer and where to continue from
    /// (cursor 0 for a new dataset). Fails if the prefix holds a committed dataset or another job's
    /// partial output.
    pub async fn open(
        loc: Location,
        layout: Layout,
        teacher: TeacherIdentity,
        opts: WriterOptions,
        job_id: &str,
    ) -> Result<(Self, Resume)> {
        if let Some(m) = read_manifest(&loc).await? {
            return Err(ShardError::AlreadyCommitted { uri: loc.uri().to_string(), job_id: m.job_id });
        }
        let mut records = Vec::new();
        for name in loc.list(PROGRESS_DIR).await? {
            let bytes = loc.get(&name).await?;
            let rec: ProgressRecord = serde_json::from_slice(&bytes).map_err(|e| ShardError::Invalid {
                uri: loc.uri_of(&name),
                message: format!("not a valid progress record: {e}"),
            })?;
            if rec.job_id != job_id {
                return Err(ShardError::Invalid {
                    uri: loc.uri().to_string(),
                    message: format!("holds the partial output of job {}; choose another output", rec.job_id),
                });
            }
            records.push(rec);
        }
        records.sort_by_key(|r| r.seq);
        // Only an unbroken run of records from shard 0, each naming a shard that is there whole,
        // counts.
        let mut kept: Vec<ProgressRecord> =
            records.into_iter().enumerate().take_while(|(i, r)| r.seq as usize == *i).map(|(_, r)| r).collect();
        kept.truncate(intact_prefix(&loc, &kept).await?);
        let resume = kept.last().map_or(Resume::default(), |r| Resume { cursor: r.cursor, state: r.state.clone() });
        let shards: Vec<ShardInfo> = kept.iter().map(|r| r.shard.clone()).collect();
        // Records past a gap, and shard files that no kept record names, are leftovers of a crash.
        for name in loc.list(PROGRESS_DIR).await? {
            if !kept.iter().any(|r| progress_name(r.seq) == name) {
                loc.delete(&name).await?;
            }
        }
        for name in loc.list("").await? {
            if name.starts_with("part-") && name.ends_with(".parquet") && !shards.iter().any(|s| s.path == name) {
                loc.delete(&name).await?;
            }
        }
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("valid zstd level")))
            .set_max_row_group_row_count(Some(opts.row_group_rows))
            .build();
        let writer = Self {
            schema: schema::schema(layout, &teacher),
            buffer: Rows::new(layout),
            loc,
            layout,
            teacher,
            opts,
            job_id: job_id.to_string(),
            props,
            shards,
            current: None,
            buffer_bytes: 0,
            cursor: resume.cursor,
            state: resume.state.clone(),
            fence: None,
        };
        Ok((writer, resume))
    }

    /// Asks `fence` before every commit.
    pub fn fenced(mut self, fence: Fence) -> Self {
        self.fence = Some(fence);
        self
    }

    // `&mut self`, not `&self`: the future stays `Send` (the writer is not `Sync`).
    async fn check_fence(&mut self) -> Result<()> {
        match &self.fence {
            Some(fence) => {
                fence().await.map_err(|message| ShardError::Fenced { uri: self.loc.uri().to_string(), message })
            }
            None => Ok(()),
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Rows in closed shards plus rows not yet closed.
    pub fn rows(&self) -> u64 {
        self.shards.iter().map(|s| s.rows).sum::<u64>()
            + self.current.as_ref().map_or(0, |c| c.rows)
            + self.buffer.len() as u64
    }

    /// Closed shards so far.
    pub fn shards(&self) -> &[ShardInfo] {
        &self.shards
    }

    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    fn wrong_layout(&self, given: Layout) -> ShardError {
        ShardError::Invalid {
            uri: self.loc.uri().to_string(),
            message: format!("{} rows given to a {} dataset", given.name(), self.layout.name()),
        }
    }

    pub fn append_triples(&mut self, rows: impl IntoIterator<Item = TripleRow>) -> Result<()> {
        let Rows::Triples(buf) = &mut self.buffer else {
            return Err(self.wrong_layout(Layout::Triples));
        };
        for row in rows {
            self.buffer_bytes += row.estimated_bytes();
            buf.push(row);
        }
        Ok(())
    }

    pub fn append_lists(&mut self, rows: impl IntoIterator<Item = ListRow>) -> Result<()> {
        let Rows::Lists(buf) = &mut self.buffer else {
            return Err(self.wrong_layout(Layout::Lists));
        };
        for row in rows {
            self.buffer_bytes += row.estimated_bytes();
            buf.push(row);
        }
        Ok(())
    }

    fn parquet_err(&self, name: &str, source: parquet::errors::ParquetError) -> ShardError {
        ShardError::Parquet { uri: self.loc.uri_of(name), source }
    }

    async fn flush_buffer(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        if self.current.is_none() {
            let seq = self.shards.len() as u32;
            let name = shard_name(seq, &self.job_id, self.opts.attempt);
            let digest = Arc::new(Mutex::new(Digested::default()));
            let inner = BufWriter::new(self.loc.store().clone(), self.loc.path(&name));
            let writer = AsyncArrowWriter::try_new(
                HashingWriter { inner, digest: digest.clone() },
                self.schema.clone(),
                Some(self.props.clone()),
            )
            .map_err(|e| self.parquet_err(&name, e))?;
            self.current = Some(OpenShard { seq, name, writer, digest, rows: 0 });
        }
        let batch = self.buffer.take_batch(&self.schema);
        self.buffer_bytes = 0;
        let shard = self.current.as_mut().expect("opened above");
        shard.rows += batch.num_rows() as u64;
        if let Err(e) = shard.writer.write(&batch).await {
            let name = shard.name.clone();
            return Err(self.parquet_err(&name, e));
        }
        Ok(())
    }

    async fn close_shard(&mut self) -> Result<Option<ShardInfo>> {
        self.flush_buffer().await?;
        let Some(shard) = self.current.take() else {
            return Ok(None);
        };
        shard.writer.close().await.map_err(|e| self.parquet_err(&shard.name, e))?;
        // Durable before a progress record names it.
        self.loc.sync(&shard.name).await?;
        let (sha256, bytes) = {
            let d = shard.digest.lock().unwrap_or_else(|e| e.into_inner());
            (hex::encode(d.hasher.clone().finalize()), d.bytes)
        };
        let info = ShardInfo { path: shard.name, rows: shard.rows, bytes, sha256 };
        let record = ProgressRecord {
            seq: shard.seq,
            job_id: self.job_id.clone(),
            cursor: self.cursor,
            shard: info.clone(),
            state: self.state.clone(),
        };
        let json = serde_json::to_vec_pretty(&record).expect("record serializes");
        self.check_fence().await?;
        self.loc.put_if_absent(&progress_name(shard.seq), Bytes::from(json)).await?;
        self.shards.push(info.clone());
        Ok(Some(info))
    }

    /// Marks the end of a unit: every row of the first `cursor` units has been appended, and
    /// `state` is the producer's state after them. Closes the shard (and returns it) when it has
    /// reached its target.
    pub async fn end_unit(&mut self, cursor: u64, state: serde_json::Value) -> Result<Option<ShardInfo>> {
        self.cursor = cursor;
        self.state = state;
        if self.buffer.len() >= self.opts.batch_rows {
            self.flush_buffer().await?;
        }
        let (rows, bytes) = match &self.current {
            Some(c) => (
                c.rows + self.buffer.len() as u64,
                (c.writer.bytes_written() + c.writer.in_progress_size() + self.buffer_bytes) as u64,
            ),
            None => (self.buffer.len() as u64, self.buffer_bytes as u64),
        };
        if rows > 0 && (rows >= self.opts.rows_per_shard || bytes >= self.opts.bytes_per_shard) {
            return self.close_shard().await;
        }
        Ok(None)
    }

    /// Closes the last shard and commits the manifest (put-if-absent). Progress records are removed
    /// once the manifest is committed.
    pub async fn commit(mut self, extra: serde_json::Value) -> Result<Manifest> {
        self.close_shard().await?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let manifest = Manifest {
            format: FORMAT_NAME.to_string(),
            format_version: schema::FORMAT_VERSION,
            layout: self.layout,
            teacher: self.teacher.clone(),
            job_id: self.job_id.clone(),
            rows: self.shards.iter().map(|s| s.rows).sum(),
            bytes: self.shards.iter().map(|s| s.bytes).sum(),
            shards: self.shards.clone(),
            created_at_ms: now.as_millis() as i64,
            extra,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        self.check_fence().await?;
        match self.loc.put_if_absent(MANIFEST_NAME, Bytes::from(json)).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists { .. }) => {
                let job_id = read_manifest(&self.loc).await?.map(|m| m.job_id).unwrap_or_default();
                return Err(ShardError::AlreadyCommitted { uri: self.loc.uri().to_string(), job_id });
            }
            Err(e) => return Err(e.into()),
        }
        for name in self.loc.list(PROGRESS_DIR).await? {
            self.loc.delete(&name).await?;
        }
        Ok(manifest)
    }
}
