//! Which locations a service may touch on behalf of a request: its own store and the prefixes the
//! operator allows (`--allow-location`). A request's location is checked before any job exists:
//!
//! - local paths and `file://` URLs are made absolute and canonical first (each existing prefix
//!   through `realpath`, so `..` and symlinks cannot leave an allowed directory), then compared
//!   component by component with the allowed directories;
//! - `s3://bucket/prefix` and `memory://name/prefix` compare scheme, bucket (or name) and path
//!   segments; `..` and `.` segments are refused;
//! - Hub ids (`hf://org/name`, or a bare `org/name` that is no local path) are allowed by
//!   `hf://org` (one organisation) or `hf://` (any).
//!
//! A symlink swapped in after the check is not caught (the job opens the path later); operators
//! who share a directory with untrusted local users should allow object-store prefixes instead.

use std::path::{Component, Path, PathBuf};

/// A location refused by the allow list, or (`invalid`) one that cannot be read as a location at
/// all (a malformed request rather than a forbidden one).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{what}")]
pub struct Denied {
    pub what: String,
    pub invalid: bool,
}

impl Denied {
    fn outside(what: String) -> Self {
        Self { what, invalid: false }
    }

    fn malformed(uri: &str, reason: impl std::fmt::Display) -> Self {
        Self { what: format!("invalid location '{uri}': {reason}"), invalid: true }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Prefix {
    Local(PathBuf),
    Url {
        scheme: String,
        host: String,
        segments: Vec<String>,
    },
    /// `None`: any Hub id; `Some(org)`: that organisation's (or that user's) repositories.
    Hub(Option<String>),
}

/// The operator's allow list; empty allows nothing.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    prefixes: Vec<Prefix>,
}

/// The absolute, canonical form of a local path: every existing prefix resolved by the file
/// system (symlinks followed), the rest (not yet created) resolved lexically.
pub fn canonical_local(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")).join(path)
    };
    let mut cur = PathBuf::from("/");
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                cur.pop();
            }
            Component::Normal(part) => {
                cur.push(part);
                if let Ok(real) = std::fs::canonicalize(&cur) {
                    cur = real;
                }
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    cur
}

fn url_parts(uri: &str) -> Result<(String, String, Vec<String>), Denied> {
    let bad = |why: &str| Denied::malformed(uri, why);
    let url = url::Url::parse(uri).map_err(|e| bad(&e.to_string()))?;
    let scheme = match url.scheme() {
        "s3" | "s3a" => "s3",
        "memory" => "memory",
        other => return Err(bad(&format!("unsupported scheme '{other}'"))),
    };
    let host = url.host_str().unwrap_or("").to_string();
    // The raw path: `url` already folded `..` away, which would hide an escape attempt.
    let raw = uri.split_once("://").map(|(_, r)| r).unwrap_or("");
    let raw_path = raw.split_once('/').map(|(_, p)| p).unwrap_or("");
    let raw_path = raw_path.split(['?', '#']).next().unwrap_or("");
    let mut segments = Vec::new();
    for seg in raw_path.split('/').filter(|s| !s.is_empty()) {
        if seg == ".." || seg == "." || seg.contains("%2e") || seg.contains("%2E") {
            return Err(Denied::outside(format!("{uri}: '.' and '..' segments are not allowed")));
        }
        segments.push(seg.to_string());
    }
    Ok((scheme.to_string(), host, segments))
}

impl Prefix {
    /// Reads an operator's entry: a path, `file://`, `s3://`, `memory://` or `hf://` prefix.
    fn parse(entry: &str) -> Result<Self, Denied> {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(Denied::malformed(entry, "empty"));
        }
        if let Some(org) = entry.strip_prefix("hf://") {
            let org = org.trim_matches('/');
            return Ok(Prefix::Hub((!org.is_empty()).then(|| org.to_string())));
        }
        if crate::is_local(entry) {
            let path = crate::local_path(entry).map_err(|e| Denied::malformed(entry, e))?;
            return Ok(Prefix::Local(canonical_local(&path)));
        }
        let (scheme, host, segments) = url_parts(entry)?;
        Ok(Prefix::Url { scheme, host, segments })
    }
}

impl AllowList {
    /// The operator's entries (`--allow-location`), each a prefix.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Result<Self, Denied> {
        let prefixes = entries.iter().map(|e| Prefix::parse(e.as_ref())).collect::<Result<_, _>>()?;
        Ok(Self { prefixes })
    }

    /// Adds one more prefix (the service's own store).
    pub fn allow(&mut self, entry: &str) -> Result<(), Denied> {
        self.prefixes.push(Prefix::parse(entry)?);
        Ok(())
    }

    /// Whether `uri` (a local path or an object-store URL) lies under an allowed prefix.
    pub fn check(&self, uri: &str) -> Result<(), Denied> {
        let uri = uri.trim();
        let denied = || Denied::outside(format!("{uri} is outside the locations this service may use"));
        if uri.is_empty() {
            return Err(Denied::malformed(uri, "empty"));
        }
        if crate::is_local(uri) {
            let path = crate::local_path(uri).map_err(|e| Denied::malformed(uri, e))?;
            let path = canonical_local(&path);
            let ok = self.prefixes.iter().any(|p| matches!(p, Prefix::Local(dir) if path.starts_with(dir)));
            return if ok { Ok(()) } else { Err(denied()) };
        }
        let (scheme, host, segments) = url_parts(uri)?;
        let ok = self.prefixes.iter().any(|p| match p {
            Prefix::Url { scheme: s, host: h, segments: segs } => {
                *s == scheme && *h == host && segments.len() >= segs.len() && segments[..segs.len()] == segs[..]
            }
            _ => false,
        });
        if ok {
            Ok(())
        } else {
            Err(denied())
        }
    }

    /// Like `check`, for a model: a location, or a Hub id (which counts as one).
    pub fn check_model(&self, model: &str) -> Result<(), Denied> {
        let Some(hub) = crate::hub::parse(model.trim()) else {
            return self.check(model);
        };
        let org = hub.repo.split('/').next().unwrap_or("");
        let ok = self.prefixes.iter().any(|p| match p {
            Prefix::Hub(None) => true,
            Prefix::Hub(Some(o)) => o == org || *o == hub.repo,
            _ => false,
        });
        if ok {
            Ok(())
        } else {
            Err(Denied::outside(format!("Hub model {} is outside the locations this service may use", hub.repo)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_are_compared_after_resolving_dots_and_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("allowed");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
        let list = AllowList::new(&[allowed.to_str().unwrap()]).unwrap();
        let a = allowed.to_str().unwrap();
        assert!(list.check(&format!("{a}/data/run.trec")).is_ok());
        assert!(list.check(&format!("file://{a}/new/dir")).is_ok());
        assert!(list.check(&format!("{a}/../outside/x")).is_err());
        assert!(list.check(&format!("{a}/new/../../outside/x")).is_err());
        assert!(list.check(&format!("{a}/link/x")).is_err(), "a symlink out of the allowed directory");
        assert!(list.check(&format!("{a}-sibling/x")).is_err(), "a string prefix is not a directory prefix");
        assert!(list.check("/etc/passwd").is_err());
    }

    #[test]
    fn object_store_prefixes_compare_segments() {
        let list = AllowList::new(&["s3://bucket/datasets", "memory://tests"]).unwrap();
        assert!(list.check("s3://bucket/datasets/a/part-0.parquet").is_ok());
        assert!(list.check("s3a://bucket/datasets").is_ok());
        assert!(list.check("s3://bucket/datasets2/a").is_err());
        assert!(list.check("s3://bucket/other").is_err());
        assert!(list.check("s3://other-bucket/datasets").is_err());
        assert!(list.check("s3://bucket/datasets/../secrets").is_err());
        assert!(list.check("s3://bucket/datasets/%2e%2e/secrets").is_err());
        assert!(list.check("memory://tests/x").is_ok());
        assert!(list.check("memory://other").is_err());
        assert!(list.check("http://169.254.169.254/latest").unwrap_err().invalid, "not a location at all");
        assert!(!list.check("s3://bucket/other").unwrap_err().invalid);
    }

    #[test]
    fn hub_ids_need_an_hf_entry() {
        let none = AllowList::new(&["s3://bucket"]).unwrap();
        assert!(none.check_model("hf://cross-encoder/ms-marco-MiniLM-L6-v2").is_err());
        let org = AllowList::new(&["hf://cross-encoder"]).unwrap();
        assert!(org.check_model("hf://cross-encoder/ms-marco-MiniLM-L6-v2").is_ok());
        assert!(org.check_model("cross-encoder/ms-marco-MiniLM-L6-v2@main").is_ok());
        assert!(org.check_model("hf://someone/else").is_err());
        let any = AllowList::new(&["hf://"]).unwrap();
        assert!(any.check_model("hf://someone/else").is_ok());
        assert!(any.check_model("/etc").is_err(), "a path is a location, not a Hub id");
    }

    #[test]
    fn an_empty_list_allows_nothing() {
        let list = AllowList::default();
        assert!(list.check("/tmp").is_err());
        assert!(list.check("").is_err());
    }
}
