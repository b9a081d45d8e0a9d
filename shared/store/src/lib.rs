//! Where data lives. Every path a user gives (inputs, datasets, the services' own state) is either a
//! plain local path or an object-store URL:
//!
//! - `file:///abs/dir` or `/abs/dir` or `rel/dir`: the local file system (the default);
//! - `memory://name`: an in-process store, shared by every location with the same name (tests);
//! - `s3://bucket/prefix`: S3 or MinIO, configured from the environment the way the AWS tools read
//!   it (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
//!   `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`; plain `http://` endpoints are allowed).

pub mod access;
pub mod hub;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{memory::InMemory, path::Path, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Cursor};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid location '{uri}': {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("{uri}: not found")]
    NotFound { uri: String },
    #[error("{uri}: already exists")]
    AlreadyExists { uri: String },
    #[error("{uri}: {source}")]
    Io { uri: String, source: Box<dyn std::error::Error + Send + Sync> },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A prefix in an object store, with the URI it was parsed from (for messages).
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    uri: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri)
    }
}

fn memory_store(name: &str) -> Arc<InMemory> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let mut stores = STORES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    stores.entry(name.to_string()).or_insert_with(|| Arc::new(InMemory::new())).clone()
}

fn invalid(uri: &str, reason: impl ToString) -> StoreError {
    StoreError::InvalidUri { uri: uri.to_string(), reason: reason.to_string() }
}

/// How S3 calls retry (connection errors, timeouts, 5xx, throttling): with jittered backoff from
/// 0.5 s growing up to 15 s between tries, for up to `timeout` after the first try and at most
/// `max_retries` retries. A job waits out a store outage that long and fails only after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retries {
    pub max_retries: usize,
    pub timeout: std::time::Duration,
}

impl Retries {
    /// 100 retries within 300 s (object_store advises under 5 minutes, as requests are signed
    /// once): the time bound is the one that counts.
    pub const DEFAULT: Retries = Retries { max_retries: 100, timeout: std::time::Duration::from_secs(300) };

    /// The default with `DISTILL_STORE_RETRIES` and `DISTILL_STORE_RETRY_TIMEOUT` (seconds) read
    /// where set: what the CLI and tools use; the services take them as flags (`--store-retries`,
    /// `--store-retry-timeout`, which read the same variables) and call [`set_retries`].
    fn from_env() -> Retries {
        let number = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
        Retries {
            max_retries: number("DISTILL_STORE_RETRIES").map_or(Self::DEFAULT.max_retries, |n| n as usize),
            timeout: number("DISTILL_STORE_RETRY_TIMEOUT")
                .map_or(Self::DEFAULT.timeout, std::time::Duration::from_secs),
        }
    }
}

static RETRIES: OnceLock<Retries> = OnceLock::new();

/// Sets how S3 locations parsed from now on retry, once per process (a service's flags, at
/// startup). Returns false, changing nothing, when they were set already.
pub fn set_retries(retries: Retries) -> bool {
    RETRIES.set(retries).is_ok()
}

/// The pause before the first retry of an S3 call, and the longest between two.
const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_millis(500);
const LONGEST_BACKOFF: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs a write, and again while it fails cut off in transit ([`cut_off_in_transit`]), with the
/// backoff and time bound of [`Retries`]. object_store retries a request whose connection broke or
/// timed out only when the request is idempotent, and a PUT is not to it (the first try may have
/// reached the store); ours may be sent again: `put` writes the same bytes, and `put_if_absent`
/// counts an object holding its bytes as its own write.
async fn resend_cut_off<T, F: std::future::Future<Output = object_store::Result<T>>>(
    write: impl Fn() -> F,
) -> object_store::Result<T> {
    let bound = RETRIES.get_or_init(Retries::from_env).timeout;
    let started = std::time::Instant::now();
    let mut pause = FIRST_BACKOFF;
    loop {
        match write().await {
            Err(e) if cut_off_in_transit(&e) && started.elapsed() + pause < bound => {
                tracing::info!(error = %e, "a write was cut off in transit: sending it again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_BACKOFF);
            }
            done => return done,
        }
    }
}

/// Whether `e` is a request that broke off or timed out after it was sent (no answer came).
fn cut_off_in_transit(e: &object_store::Error) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<HttpError>() {
            return matches!(h.kind(), HttpErrorKind::Interrupted | HttpErrorKind::Timeout);
        }
        source = s.source();
    }
    false
}

fn retry_config() -> object_store::RetryConfig {
    let r = *RETRIES.get_or_init(Retries::from_env);
    object_store::RetryConfig {
        max_retries: r.max_retries,
        retry_timeout: r.timeout,
        backoff: object_store::BackoffConfig { init_backoff: FIRST_BACKOFF, max_backoff: LONGEST_BACKOFF, base: 3.0 },
    }
}

/// Whether `uri` names something on the local file system (a plain path or `file://`).
pub fn is_local(uri: &str) -> bool {
    !uri.contains("://") || uri.starts_with("file://")
}

/// Makes a plain relative path absolute against the current directory; URLs pass unchanged.
/// Clients call this before sending a path to a service that runs elsewhere.
pub fn absolutize(uri: &str) -> String {
    if uri.is_empty() || uri.contains("://") {
        return uri.to_string();
    }
    let p = std::path::Path::new(uri);
    if p.is_absolute() {
        return uri.to_string();
    }
    match std::env::current_dir() {
        Ok(cwd) => cwd.join(p).to_string_lossy().into_owned(),
        Err(_) => uri.to_string(),
    }
}

/// The file-system path a local URI (plain path or `file://`) names.
pub fn local_path(uri: &str) -> Result<std::path::PathBuf> {
    let raw = if let Some(rest) = uri.strip_prefix("file://") {
        let url = url::Url::parse(&format!("file://{rest}")).map_err(|e| invalid(uri, e))?;
        url.to_file_path().map_err(|_| invalid(uri, "not an absolute file path"))?
    } else {
        std::path::PathBuf::from(absolutize(uri))
    };
    Ok(raw)
}

impl Location {
    /// Parses a local path or an object-store URL.
    pub fn parse(uri: &str) -> Result<Self> {
        let uri = uri.trim();
        if uri.is_empty() {
            return Err(invalid(uri, "empty"));
        }
        if is_local(uri) {
            let path = local_path(uri)?;
            let prefix = Path::from_absolute_path(&path).map_err(|e| invalid(uri, e))?;
            let store = Arc::new(object_store::local::LocalFileSystem::new());
            return Ok(Self { store, prefix, uri: format!("file://{}", path.display()) });
        }
        let url = url::Url::parse(uri).map_err(|e| invalid(uri, e))?;
        let prefix = Path::parse(url.path().trim_start_matches('/')).map_err(|e| invalid(uri, e))?;
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "memory" => memory_store(url.host_str().unwrap_or("")),
            "s3" | "s3a" => {
                let bucket = url.host_str().ok_or_else(|| invalid(uri, "missing bucket"))?;
                let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
                let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
                    .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .ok();
                if let Some(endpoint) = endpoint {
                    if endpoint.starts_with("http://") {
                        builder = builder.with_allow_http(true);
                    }
                    builder = builder.with_endpoint(endpoint);
                }
                if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
                    builder = builder.with_region("us-east-1");
                } else if let Ok(region) = std::env::var("AWS_REGION") {
                    builder = builder.with_region(region);
                }
                builder = builder.with_retry(retry_config());
                Arc::new(builder.build().map_err(|e| invalid(uri, e))?)
            }
            other => {
                return Err(invalid(uri, format!("unsupported scheme '{other}' (use file://, memory:// or s3://)")))
            }
        };
        Ok(Self { store, prefix, uri: uri.trim_end_matches('/').to_string() })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The object path of `name` below this prefix (`name` may contain `/`).
    pub fn path(&self, name: &str) -> Path {
        let mut p = self.prefix.clone();
        for part in name.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    /// The location of `name` below this prefix.
    pub fn child(&self, name: &str) -> Location {
        Location {
            store: self.store.clone(),
            prefix: self.path(name),
            uri: format!("{}/{}", self.uri, name.trim_matches('/')),
        }
    }

    /// The URI of `name` below this prefix, for messages.
    pub fn uri_of(&self, name: &str) -> String {
        format!("{}/{}", self.uri, name.trim_matches('/'))
    }

    fn err(&self, name: &str, e: object_store::Error) -> StoreError {
        let uri = if name.is_empty() { self.uri.clone() } else { self.uri_of(name) };
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound { uri },
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
                StoreError::AlreadyExists { uri }
            }
            other => StoreError::Io { uri, source: Box::new(other) },
        }
    }

    /// Reads a whole object below this prefix.
    pub async fn get(&self, name: &str) -> Result<Bytes> {
        let path = if name.is_empty() { self.prefix.clone() } else { self.path(name) };
        let res = self.store.get(&path).await.map_err(|e| self.err(name, e))?;
        res.bytes().await.map_err(|e| self.err(name, e))
    }

    /// Reads the object at this location itself.
    pub async fn get_self(&self) -> Result<Bytes> {
        self.get("").await
    }

    /// Writes (or replaces) an object, durably (see [`Location::sync`]).
    pub async fn put(&self, name: &str, data: Bytes) -> Result<()> {
        let path = self.path(name);
        resend_cut_off(|| self.store.put(&path, PutPayload::from(data.clone())))
            .await
            .map_err(|e| self.err(name, e))?;
        self.sync(name).await
    }

    /// Makes what was written at `name` durable: on the local file system the file and its
    /// directory are fsync'd (a rename is durable only once its directory is); object stores
    /// answer a write only once it is durable.
    pub async fn sync(&self, name: &str) -> Result<()> {
        if !self.uri.starts_with("file://") {
            return Ok(());
        }
        let path = std::path::Path::new("/").join(self.path(name).as_ref());
        let synced = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::File::open(&path)?.sync_all()?;
            match path.parent() {
                Some(dir) => std::fs::File::open(dir)?.sync_all(),
                None => Ok(()),
            }
        });
        let io = |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Io { uri: self.uri_of(name), source: e };
        synced.await.map_err(|e| io(Box::new(e)))?.map_err(|e| io(Box::new(e)))
    }

    /// Writes an object only if nothing is there yet; `AlreadyExists` otherwise. This is the commit
    /// primitive: of two writers, exactly one wins. An object already holding exactly `data` counts
    /// as written: a retried request whose first try reached the store (the answer was lost in an
    /// outage) finds its own write.
    pub async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        let path = self.path(name);
        match resend_cut_off(|| self.store.put_opts(&path, PutPayload::from(data.clone()), opts.clone())).await {
            Ok(_) => {}
            Err(e) => {
                let err = self.err(name, e);
                let ours = matches!(err, StoreError::AlreadyExists { .. }) && self.get(name).await.ok() == Some(data);
                if !ours {
                    return Err(err);
                }
            }
        }
        self.sync(name).await
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.store.delete(&self.path(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(name, e)),
        }
    }

    pub async fn exists(&self, name: &str) -> Result<bool> {
        match self.store.head(&self.path(name)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Names (relative to this prefix) of the objects directly below `dir` (not recursive), sorted.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>> {
        Ok(self.list_versions(dir).await?.into_iter().map(|(name, _)| name).collect())
    }

    /// Like [`Location::list`], each name with its version: the object's ETag where the store
    /// gives one, else its modification time and size (a changed object has another version).
    pub async fn list_versions(&self, dir: &str) -> Result<Vec<(String, String)>> {
        let base = if dir.is_empty() { self.prefix.clone() } else { self.path(dir) };
        let listing = self.store.list_with_delimiter(Some(&base)).await.map_err(|e| self.err(dir, e))?;
        let mut names: Vec<(String, String)> = listing
            .objects
            .into_iter()
            .filter_map(|m| {
                let rel: Vec<_> = m.location.prefix_match(&self.prefix)?.map(|p| p.as_ref().to_string()).collect();
                let version =
                    m.e_tag.clone().unwrap_or_else(|| format!("{}/{}", m.last_modified.timestamp_micros(), m.size));
                Some((rel.join("/"), version))
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every object path below this prefix, recursively.
    async fn all_paths(&self) -> Result<Vec<Path>> {
        self.store.list(Some(&self.prefix)).map_ok(|m| m.location).try_collect().await.map_err(|e| self.err("", e))
    }

    /// Names (relative to this prefix) of every object below it, recursively, sorted.
    pub async fn list_recursive(&self) -> Result<Vec<String>> {
        let objects = self.all_paths().await?;
        let mut names: Vec<String> = objects
            .iter()
            .filter_map(|p| {
                Some(p.prefix_match(&self.prefix)?.map(|c| c.as_ref().to_string()).collect::<Vec<_>>().join("/"))
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Copies every object below this prefix into the local directory `dir` (recursively,
    /// keeping relative names); returns how many files were written.
    pub async fn download_to(&self, dir: &std::path::Path) -> Result<usize> {
        let objects = self.all_paths().await?;
        let mut n = 0;
        for path in objects {
            let Some(rel) = path.prefix_match(&self.prefix) else {
                continue;
            };
            let rel: Vec<String> = rel.map(|p| p.as_ref().to_string()).collect();
            let rel = rel.join("/");
            let bytes = self.get(&rel).await?;
            let target = dir.join(&rel);
            let io = |e: std::io::Error| StoreError::Io { uri: target.display().to_string(), source: Box::new(e) };
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            std::fs::write(&target, &bytes).map_err(io)?;
            n += 1;
        }
        Ok(n)
    }

    /// Uploads the files directly inside the local directory `dir` below this prefix.
    pub async fn upload_dir(&self, dir: &std::path::Path) -> Result<usize> {
        let io = |e: std::io::Error| StoreError::Io { uri: dir.display().to_string(), source: Box::new(e) };
        let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(io)?.collect::<std::io::Result<_>>().map_err(io)?;
        entries.sort_by_key(|e| e.file_name());
        let mut n = 0;
        for e in entries {
            if !e.file_type().map_err(io)?.is_file() {
                continue;
            }
            let bytes = std::fs::read(e.path()).map_err(io)?;
            self.put(&e.file_name().to_string_lossy(), Bytes::from(bytes)).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Removes every object below this prefix.
    pub async fn delete_all(&self) -> Result<()> {
        let objects = self.all_paths().await?;
        for path in objects {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err(path.as_ref(), e)),
            }
        }
        // A file system keeps the directories: those left empty go too.
        if self.uri.starts_with("file://") {
            remove_empty_dirs(&local_path(&self.uri)?);
        }
        Ok(())
    }
}

/// Removes `dir` and the directories below it that hold no file (best effort: one that gained a
/// file meanwhile stays).
fn remove_empty_dirs(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A local directory holding what `uri` names: a local path as it is; an object-store prefix is
/// downloaded once into a cache directory below the system temp dir (keyed by the URI); a Hugging
/// Face Hub model id (`hf://org/name`, or `org/name` that is no local path) is downloaded once
/// into the hub cache (see [`hub`]).
pub async fn materialize_dir(uri: &str) -> Result<std::path::PathBuf> {
    if let Some(model) = hub::parse(uri) {
        return hub::download(&model).await;
    }
    if is_local(uri) {
        let path = local_path(uri)?;
        if !path.is_dir() {
            return Err(StoreError::NotFound { uri: path.display().to_string() });
        }
        return Ok(path);
    }
    let loc = Location::parse(uri)?;
    use sha2::Digest;
    let key = hex::encode(&sha2::Sha256::digest(loc.uri().as_bytes())[..8]);
    let dir = std::env::temp_dir().join("distill-models").join(key);
    let done = dir.join(".complete");
    if done.is_file() {
        return Ok(dir);
    }
    let n = loc.download_to(&dir).await?;
    if n == 0 {
        return Err(StoreError::NotFound { uri: loc.uri().to_string() });
    }
    std::fs::write(&done, b"").map_err(|e| StoreError::Io { uri: done.display().to_string(), source: Box::new(e) })?;
    Ok(dir)
}

/// Opens a text file for line reading: local files are streamed from disk, remote objects are
/// fetched whole; a name ending in `.zst` is decompressed (zstd) on the way.
pub async fn open_text(uri: &str) -> Result<Box<dyn BufRead + Send>> {
    let zst = uri.ends_with(".zst");
    let io = |e: std::io::Error| StoreError::Io { uri: uri.to_string(), source: Box::new(e) };
    if is_local(uri) {
        let path = local_path(uri)?;
        let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound { uri: path.display().to_string() },
            _ => StoreError::Io { uri: path.display().to_string(), source: Box::new(e) },
        })?;
        if zst {
            let decoder = zstd::stream::read::Decoder::new(file).map_err(io)?;
            return Ok(Box::new(BufReader::with_capacity(1 << 20, decoder)));
        }
        return Ok(Box::new(BufReader::with_capacity(1 << 20, file)));
    }
    let loc = Location::parse(uri)?;
    let bytes = loc.get_self().await?;
    if zst {
        let decoder = zstd::stream::read::Decoder::new(Cursor::new(bytes)).map_err(io)?;
        return Ok(Box::new(BufReader::new(decoder)));
    }
    Ok(Box::new(Cursor::new(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[tokio::test]
    async fn zstd_text_is_read_decompressed_from_disk_and_object_stores() {
        let dir = tempfile::tempdir().unwrap();
        let text = "a\t1\nb\t2\n".repeat(1000);
        let packed = zstd::encode_all(text.as_bytes(), 3).unwrap();
        let path = dir.path().join("x.tsv.zst");
        std::fs::write(&path, &packed).unwrap();
        let mut got = String::new();
        open_text(path.to_str().unwrap()).await.unwrap().read_to_string(&mut got).unwrap();
        assert_eq!(got, text);
        let loc = Location::parse("memory://zst-test/").unwrap();
        loc.put("y.tsv.zst", Bytes::from(packed)).await.unwrap();
        let mut got = String::new();
        open_text(&loc.uri_of("y.tsv.zst")).await.unwrap().read_to_string(&mut got).unwrap();
        assert_eq!(got, text);
        // A corrupt file fails reading, naming nothing silently.
        std::fs::write(&path, b"not zstd at all").unwrap();
        let mut sink = String::new();
        let r = match open_text(path.to_str().unwrap()).await {
            Ok(mut r) => r.read_to_string(&mut sink).map(|_| ()),
            Err(_) => Err(std::io::Error::other("open failed")),
        };
        assert!(r.is_err());
    }

    #[test]
    fn writes_cut_off_in_transit_are_told_apart_from_other_failures() {
        use object_store::client::{HttpError, HttpErrorKind};
        let failed = |kind| object_store::Error::Generic {
            store: "S3",
            source: Box::new(HttpError::new(kind, std::io::Error::from(std::io::ErrorKind::ConnectionReset))),
        };
        assert!(cut_off_in_transit(&failed(HttpErrorKind::Interrupted)));
        assert!(cut_off_in_transit(&failed(HttpErrorKind::Timeout)));
        assert!(!cut_off_in_transit(&failed(HttpErrorKind::Decode)));
        assert!(!cut_off_in_transit(&object_store::Error::NotFound { path: "x".into(), source: "gone".into() }));
    }

    #[tokio::test]
    async fn local_put_if_absent_commits_once() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::parse(dir.path().to_str().unwrap()).unwrap();
        loc.put_if_absent("a/b.json", Bytes::from_static(b"1")).await.unwrap();
        let again = loc.put_if_absent("a/b.json", Bytes::from_static(b"2")).await;
        assert!(matches!(again, Err(StoreError::AlreadyExists { .. })), "{again:?}");
        assert_eq!(loc.get("a/b.json").await.unwrap(), Bytes::from_static(b"1"));
        assert_eq!(loc.list("a").await.unwrap(), vec!["a/b.json".to_string()]);
        // The same bytes again: a retry finding its own earlier write.
        loc.put_if_absent("a/b.json", Bytes::from_static(b"1")).await.unwrap();
    }

    #[tokio::test]
    async fn deleting_a_local_prefix_leaves_no_empty_directories() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::parse(dir.path().to_str().unwrap()).unwrap();
        for name in ["ckpt/step-1/a", "ckpt/step-1/deep/b", "ckpt/step-2/a"] {
            loc.put(name, Bytes::from_static(b"x")).await.unwrap();
        }
        loc.child("ckpt/step-1").delete_all().await.unwrap();
        assert!(!dir.path().join("ckpt/step-1").exists());
        assert!(dir.path().join("ckpt/step-2/a").is_file());
    }

    #[tokio::test]
    async fn memory_locations_with_the_same_name_share_data() {
        let a = Location::parse("memory://shared-test/x").unwrap();
        a.put("k", Bytes::from_static(b"v")).await.unwrap();
        let b = Location::parse("memory://shared-test/x").unwrap();
        assert_eq!(b.get("k").await.unwrap(), Bytes::from_static(b"v"));
        assert!(matches!(b.get("missing").await, Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn bad_schemes_are_named() {
        let err = Location::parse("ftp://x/y").unwrap_err().to_string();
        assert!(err.contains("unsupported scheme 'ftp'"), "{err}");
    }
}
