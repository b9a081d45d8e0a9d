//! The LLM endpoints the operator configured (`--llm-endpoint NAME=URL`, `--llm-key NAME=env:VAR`
//! or `NAME=file:PATH`), the only places an LLM teacher sends requests and keys to. A request
//! names an endpoint (`endpoint.base_url` = NAME, or a URL equal to a configured one's); it cannot
//! name a server environment variable, so no client can make the service send its secrets away.
//!
//! `DISTILL_LLM_BASE_URL` (else `OPENAI_BASE_URL`) in the service's environment configures one more
//! endpoint named `default`, keyed by `DISTILL_LLM_API_KEY` (else `OPENAI_API_KEY`).

use crate::error::Error;
use distill_proto::LlmEndpoint;

/// One configured endpoint. Its key never leaves the process except to this URL.
#[derive(Clone)]
pub struct Endpoint {
    pub name: String,
    /// Up to and including the version, without a trailing slash.
    pub url: String,
    key: Option<String>,
    /// The variable the key came from, if any (a request may name it, and only it).
    key_env: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={} (key: {})", self.name, self.url, if self.key.is_some() { "set" } else { "none" })
    }
}

impl Endpoint {
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

/// The configured endpoints.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    list: Vec<Endpoint>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

fn normalise(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

fn parse_url(name: &str, url: &str) -> anyhow::Result<String> {
    match url::Url::parse(url.trim()) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(normalise(url)),
        _ => anyhow::bail!("--llm-endpoint {name}: {url:?} is not an http(s) URL"),
    }
}

/// A key source: `env:VAR` or `file:PATH`; returns the key and the variable's name.
fn read_key(name: &str, source: &str) -> anyhow::Result<(String, Option<String>)> {
    if let Some(var) = source.strip_prefix("env:") {
        let key = env(var).ok_or_else(|| anyhow::anyhow!("--llm-key {name}: {var} is not set"))?;
        return Ok((key, Some(var.to_string())));
    }
    if let Some(path) = source.strip_prefix("file:") {
        let key = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--llm-key {name}: key file {path}: {e}"))?
            .trim()
            .to_string();
        anyhow::ensure!(!key.is_empty(), "--llm-key {name}: key file {path} is empty");
        return Ok((key, None));
    }
    anyhow::bail!("--llm-key {name}: {source:?} is neither env:VAR nor file:PATH")
}

impl Endpoints {
    /// From the operator's flags (`NAME=URL` and `NAME=env:VAR|file:PATH` entries) and the
    /// environment's `default` endpoint.
    pub fn configure(endpoints: &[String], keys: &[String]) -> anyhow::Result<Self> {
        let mut list = Vec::new();
        // An empty item is none: DISTILL_LLM_ENDPOINTS="" (compose's default) names no endpoint.
        for entry in endpoints.iter().filter(|e| !e.trim().is_empty()) {
            let (name, url) =
                entry.split_once('=').ok_or_else(|| anyhow::anyhow!("--llm-endpoint {entry:?}: NAME=URL expected"))?;
            let name = name.trim();
            anyhow::ensure!(!name.is_empty() && !name.contains("://"), "--llm-endpoint {entry:?}: NAME=URL expected");
            anyhow::ensure!(list.iter().all(|e: &Endpoint| e.name != name), "--llm-endpoint {name}: given twice");
            list.push(Endpoint { name: name.into(), url: parse_url(name, url)?, key: None, key_env: None });
        }
        if let Some(url) = env("DISTILL_LLM_BASE_URL").or_else(|| env("OPENAI_BASE_URL")) {
            if list.iter().all(|e| e.name != "default") {
                let key_env = ["DISTILL_LLM_API_KEY", "OPENAI_API_KEY"].into_iter().find(|v| env(v).is_some());
                list.push(Endpoint {
                    name: "default".into(),
                    url: parse_url("default", &url)?,
                    key: key_env.and_then(env),
                    key_env: key_env.map(String::from),
                });
            }
        }
        for entry in keys.iter().filter(|e| !e.trim().is_empty()) {
            let (name, source) =
                entry.split_once('=').ok_or_else(|| anyhow::anyhow!("--llm-key {entry:?}: NAME=env:VAR expected"))?;
            let endpoint = list
                .iter_mut()
                .find(|e| e.name == name.trim())
                .ok_or_else(|| anyhow::anyhow!("--llm-key {name}: no --llm-endpoint of that name"))?;
            let (key, key_env) = read_key(name, source.trim())?;
            endpoint.key = Some(key);
            endpoint.key_env = key_env;
        }
        Ok(Self { list })
    }

    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|e| e.name.clone()).collect()
    }

    /// The configured endpoint a request names: by NAME or by an equal URL; an empty name takes
    /// `default`, or the only endpoint there is. `api_key_env` may only name that endpoint's own.
    pub fn resolve(&self, requested: &LlmEndpoint) -> Result<&Endpoint, Error> {
        let denied = |what: String| Err(Error::PermissionDenied(format!("teacher.llm.endpoint.{what}")));
        let wanted = requested.base_url.trim();
        let found = if wanted.is_empty() {
            let only = (self.list.len() == 1).then(|| &self.list[0]);
            self.list.iter().find(|e| e.name == "default").or(only)
        } else {
            self.list.iter().find(|e| e.name == wanted || e.url == normalise(wanted))
        };
        let Some(endpoint) = found else {
            let configured = if self.list.is_empty() { "none".to_string() } else { self.names().join(", ") };
            let what = if wanted.is_empty() { "(empty)" } else { wanted };
            return denied(format!(
                "base_url: {what} is not an endpoint this teacher is configured with (the operator's \
                 --llm-endpoint NAME=URL; configured: {configured})"
            ));
        };
        let key_env = requested.api_key_env.trim();
        if !key_env.is_empty() && endpoint.key_env.as_deref() != Some(key_env) {
            return denied(format!(
                "api_key_env: a request cannot name the server's environment variables; the operator \
                 gives endpoint {} its key (--llm-key {}=env:VAR)",
                endpoint.name, endpoint.name
            ));
        }
        Ok(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(base_url: &str, key_env: &str) -> LlmEndpoint {
        LlmEndpoint { base_url: base_url.into(), api_key_env: key_env.into(), ..Default::default() }
    }

    #[test]
    fn requests_reach_only_configured_endpoints() {
        std::env::set_var("DISTILL_TEST_LLM_KEY_A", "sk-a");
        let eps = Endpoints::configure(
            &["local=http://127.0.0.1:8080/v1/".into(), "openai=https://api.openai.com/v1".into()],
            &["openai=env:DISTILL_TEST_LLM_KEY_A".into()],
        )
        .unwrap();
        assert_eq!(eps.resolve(&ask("local", "")).unwrap().url, "http://127.0.0.1:8080/v1");
        assert_eq!(eps.resolve(&ask("http://127.0.0.1:8080/v1", "")).unwrap().name, "local");
        assert_eq!(eps.resolve(&ask("https://api.openai.com/v1/", "")).unwrap().key(), Some("sk-a"));
        assert!(matches!(eps.resolve(&ask("http://evil.example/v1", "")), Err(Error::PermissionDenied(_))));
        assert!(matches!(eps.resolve(&ask("", "")), Err(Error::PermissionDenied(_))), "two endpoints, none default");
        assert!(matches!(eps.resolve(&ask("local", "HOME")), Err(Error::PermissionDenied(_))));
        assert!(eps.resolve(&ask("openai", "DISTILL_TEST_LLM_KEY_A")).is_ok(), "its own variable");
        assert!(format!("{eps:?}").contains("key: set") && !format!("{eps:?}").contains("sk-a"));
    }

    #[test]
    fn an_empty_list_names_no_endpoint() {
        // DISTILL_LLM_ENDPOINTS="" as docker-compose.yml passes it when the user sets nothing.
        let eps = Endpoints::configure(&["".into()], &[" ".into()]).unwrap();
        assert!(matches!(eps.resolve(&ask("local", "")), Err(Error::PermissionDenied(_))));
    }

    #[test]
    fn bad_configuration_is_refused() {
        assert!(Endpoints::configure(&["local".into()], &[]).is_err());
        assert!(Endpoints::configure(&["local=ftp://x".into()], &[]).is_err());
        assert!(Endpoints::configure(&["a=http://x/v1".into()], &["b=env:X".into()]).is_err());
        assert!(Endpoints::configure(&["a=http://x/v1".into()], &["a=HOME".into()]).is_err());
    }
}
