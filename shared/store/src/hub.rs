//! Model repositories on the Hugging Face Hub, for users who are online: `hf://org/name[@revision]`
//! (or a bare `org/name` that is not a local path) is downloaded once into a local cache and used
//! as a model directory. Files come from `{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}` (the
//! Hub's own download URLs, redirects followed); `HF_TOKEN` is sent as a bearer token for gated or
//! private repositories; `HF_ENDPOINT` (default https://huggingface.co) points at a mirror.

use crate::{Result, StoreError};
use object_store::http::HttpBuilder;
use object_store::{ClientOptions, ObjectStoreExt};
use std::path::PathBuf;

/// Files a cross-encoder directory needs, then those it may have.
const REQUIRED: &[&str] = &["config.json", "model.safetensors", "tokenizer.json"];
const OPTIONAL: &[&str] =
    &["tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json"];

#[derive(Debug, Clone, PartialEq)]
pub struct HubModel {
    pub repo: String,
    pub revision: String,
}

fn valid_part(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !s.starts_with('.')
}

/// A Hub model id, if `uri` is one: `hf://org/name[@rev]`, or `org/name[@rev]` when no such local
/// path exists.
pub fn parse(uri: &str) -> Option<HubModel> {
    let (explicit, id) = match uri.strip_prefix("hf://") {
        Some(rest) => (true, rest),
        None => (false, uri),
    };
    if !explicit
        && (uri.contains("://") || std::path::Path::new(uri).exists() || uri.starts_with('/') || uri.starts_with('.'))
    {
        return None;
    }
    let (repo, revision) = match id.split_once('@') {
        Some((r, rev)) => (r, rev),
        None => (id, "main"),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    let ok = (parts.len() == 2 || (explicit && parts.len() == 1))
        && parts.iter().all(|p| valid_part(p))
        && valid_part(revision);
    ok.then(|| HubModel { repo: repo.to_string(), revision: revision.to_string() })
}

fn cache_root() -> PathBuf {
    if let Ok(dir) = std::env::var("DISTILL_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var("HOME").map(PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    home.join(".cache").join("distill").join("hub")
}

/// Downloads the model's files (once) and returns the local directory holding them.
pub async fn download(model: &HubModel) -> Result<PathBuf> {
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let base = format!("{}/{}/resolve/{}", endpoint.trim_end_matches('/'), model.repo, model.revision);
    let dir = cache_root().join(model.repo.replace('/', "--")).join(&model.revision);
    let done = dir.join(".complete");
    if done.is_file() {
        return Ok(dir);
    }
    let invalid = |reason: String| StoreError::InvalidUri { uri: base.clone(), reason };
    let mut options = ClientOptions::new().with_allow_http(true);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        let mut headers = http::HeaderMap::new();
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| invalid("HF_TOKEN is not a valid header value".into()))?;
        headers.insert("authorization", value);
        options = options.with_default_headers(headers);
    }
    let store =
        HttpBuilder::new().with_url(&base).with_client_options(options).build().map_err(|e| invalid(e.to_string()))?;
    let io = |path: &std::path::Path, e: std::io::Error| StoreError::Io {
        uri: path.display().to_string(),
        source: Box::new(e),
    };
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    for (name, required) in REQUIRED.iter().map(|n| (n, true)).chain(OPTIONAL.iter().map(|n| (n, false))) {
        let url = format!("{base}/{name}");
        let bytes = match store.get(&object_store::path::Path::from(*name)).await {
            Ok(r) => r.bytes().await.map_err(|e| StoreError::Io { uri: url.clone(), source: Box::new(e) })?,
            Err(object_store::Error::NotFound { .. }) if !required => continue,
            Err(object_store::Error::NotFound { .. }) if *name == "model.safetensors" => {
                return Err(StoreError::NotFound {
                    uri: format!("{url} (sharded or non-safetensors checkpoints are not supported yet)"),
                })
            }
            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::NotFound { uri: url }),
            Err(e) => return Err(StoreError::Io { uri: url, source: Box::new(e) }),
        };
        let path = dir.join(name);
        std::fs::write(&path, &bytes).map_err(|e| io(&path, e))?;
    }
    std::fs::write(&done, b"").map_err(|e| io(&done, e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert_eq!(parse("hf://org/name"), Some(HubModel { repo: "org/name".into(), revision: "main".into() }));
        assert_eq!(parse("hf://org/name@v1.0"), Some(HubModel { repo: "org/name".into(), revision: "v1.0".into() }));
        assert_eq!(
            parse("cross-encoder/ms-marco-MiniLM-L6-v2"),
            Some(HubModel { repo: "cross-encoder/ms-marco-MiniLM-L6-v2".into(), revision: "main".into() })
        );
        assert_eq!(parse("hf://bert-base-uncased").map(|m| m.repo), Some("bert-base-uncased".into()));
        for not_hub in ["/abs/path", "./rel/dir", "s3://bucket/model", "a/b/c", "bert-base-uncased", "hf://a/../b", "."]
        {
            assert_eq!(parse(not_hub), None, "{not_hub}");
        }
    }
}
