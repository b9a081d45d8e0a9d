//! One OpenAI-compatible endpoint as the LLM teachers use it: bounded requests in flight, retries
//! with exponential backoff and jitter (a Retry-After header wins) on 429, 5xx, timeouts and
//! unusable answers, a per-request timeout, per-job counters, and a content-addressed answer cache
//! in object storage. The API key travels only in the Authorization header.

use bytes::Bytes;
use distill_store::{Location, StoreError};
use rand::Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

pub struct ClientConfig {
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub concurrency: usize,
    pub max_retries: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
    pub usd_per_million_prompt: f64,
    pub usd_per_million_completion: f64,
    pub cache: Option<Location>,
}

/// Why a request gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The endpoint refused the request as sent (HTTP 4xx other than 408/429): retrying cannot help,
    /// and every other request of the job would fail the same way.
    #[error("{0}")]
    Refused(String),
    /// Still failing after every retry (the last reason given).
    #[error("no usable answer after {attempts} attempts; last: {last}")]
    Exhausted { attempts: u32, last: String },
}

/// What happened to the requests of one teacher (a job), as the progress counters show them.
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub failures: AtomicU64,
    pub rate_limited: AtomicU64,
    pub server_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub malformed_answers: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub cache_hits: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub struct Client {
    cfg: ClientConfig,
    http: reqwest::Client,
    permits: Semaphore,
    pub counters: Counters,
}

/// Which attempt failed and why, and whether the server asked for a delay.
struct Failure {
    reason: String,
    retry_after: Option<Duration>,
}

impl Client {
    pub fn new(cfg: ClientConfig) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let permits = Semaphore::new(cfg.concurrency.max(1));
        Ok(Self { cfg, http, permits, counters: Counters::default() })
    }

    pub fn model(&self) -> &str {
        &self.cfg.model
    }

    /// The counters by name, with the estimated cost.
    pub fn snapshot(&self) -> BTreeMap<String, f64> {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let mut out = BTreeMap::new();
        for (name, v) in [
            ("requests", &c.requests),
            ("retries", &c.retries),
            ("failures", &c.failures),
            ("http_429", &c.rate_limited),
            ("http_5xx", &c.server_errors),
            ("timeouts", &c.timeouts),
            ("malformed_answers", &c.malformed_answers),
            ("prompt_tokens", &c.prompt_tokens),
            ("completion_tokens", &c.completion_tokens),
            ("cache_hits", &c.cache_hits),
        ] {
            out.insert(name.to_string(), get(v));
        }
        let cost = get(&c.prompt_tokens) * self.cfg.usd_per_million_prompt / 1e6
            + get(&c.completion_tokens) * self.cfg.usd_per_million_completion / 1e6;
        out.insert("cost_usd".into(), cost);
        out
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.cfg.base_url.trim_end_matches('/'), path)
    }

    /// The cache key of a request: what it asks and of whom (never the key it is asked with).
    fn cache_key(&self, path: &str, body: &Value) -> String {
        let mut h = Sha256::new();
        h.update(self.url(path).as_bytes());
        h.update(b"\n");
        h.update(body.to_string().as_bytes());
        let hex = hex::encode(h.finalize());
        format!("{}/{hex}.json", &hex[..2])
    }

    /// Sends `body` to `path` (e.g. `chat/completions`) until `accept` reads a usable answer from the
    /// response, or the retries run out. Answers `accept` takes are cached; a cached one is used
    /// without asking the endpoint.
    pub async fn call<T>(
        &self,
        path: &str,
        body: &Value,
        accept: impl Fn(&Value) -> Option<T>,
    ) -> Result<T, CallError> {
        let key = self.cache_key(path, body);
        if let Some(cache) = &self.cfg.cache {
            match cache.get(&key).await {
                Ok(bytes) => {
                    if let Some(t) = serde_json::from_slice::<Value>(&bytes).ok().as_ref().and_then(&accept) {
                        add(&self.counters.cache_hits, 1);
                        return Ok(t);
                    }
                }
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => tracing::warn!("LLM answer cache unreadable ({e}); asking the endpoint"),
            }
        }
        let attempts = self.cfg.max_retries + 1;
        let mut attempt = 0;
        loop {
            let failure = match self.attempt(path, body).await {
                Ok(response) => match accept(&response) {
                    Some(t) => {
                        if let Some(cache) = &self.cfg.cache {
                            if let Err(e) = cache.put(&key, Bytes::from(response.to_string())).await {
                                tracing::warn!("LLM answer cache not written ({e})");
                            }
                        }
                        return Ok(t);
                    }
                    None => {
                        add(&self.counters.malformed_answers, 1);
                        let text = crate::llm::prompts::answer_text(&response).unwrap_or("");
                        Failure { reason: format!("unusable answer: {:?}", clip(text, 200)), retry_after: None }
                    }
                },
                Err(Err(refused)) => {
                    add(&self.counters.failures, 1);
                    return Err(CallError::Refused(refused));
                }
                Err(Ok(f)) => f,
            };
            attempt += 1;
            if attempt >= attempts {
                add(&self.counters.failures, 1);
                return Err(CallError::Exhausted { attempts, last: failure.reason });
            }
            add(&self.counters.retries, 1);
            let delay = failure.retry_after.unwrap_or_else(|| backoff(&self.cfg, attempt - 1));
            tracing::debug!(attempt, delay_ms = delay.as_millis() as u64, reason = %failure.reason, "retrying LLM request");
            tokio::time::sleep(delay).await;
        }
    }

    /// One request. Ok: a 2xx JSON body. Err(Ok): worth retrying. Err(Err): refused for good.
    async fn attempt(&self, path: &str, body: &Value) -> Result<Value, Result<Failure, String>> {
        let _permit = self.permits.acquire().await.expect("never closed");
        add(&self.counters.requests, 1);
        let url = self.url(path);
        let mut req = self.http.post(&url).header("content-type", "application/json").body(body.to_string());
        if let Some(key) = &self.cfg.api_key {
            req = req.bearer_auth(key);
        }
        let response = match req.send().await {
            Ok(r) => r,
            Err(e) => return Err(Ok(self.transport_failure(&url, e))),
        };
        let status = response.status();
        let retry_after = response.headers().get(reqwest::header::RETRY_AFTER).and_then(parse_retry_after);
        let text = match read_capped(response, MAX_ANSWER_BYTES).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                add(&self.counters.malformed_answers, 1);
                let reason = format!("{url}: answer larger than {MAX_ANSWER_BYTES} bytes");
                return Err(Ok(Failure { reason, retry_after: None }));
            }
            Err(e) => return Err(Ok(self.transport_failure(&url, e))),
        };
        if status.is_success() {
            let value: Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    add(&self.counters.malformed_answers, 1);
                    return Err(Ok(Failure {
                        reason: format!("{url}: response is not JSON ({e})"),
                        retry_after: None,
                    }));
                }
            };
            let usage = &value["usage"];
            add(&self.counters.prompt_tokens, usage["prompt_tokens"].as_u64().unwrap_or(0));
            add(&self.counters.completion_tokens, usage["completion_tokens"].as_u64().unwrap_or(0));
            return Ok(value);
        }
        let reason = format!("{url}: HTTP {status}: {}", clip(&text, 300));
        match status.as_u16() {
            429 => {
                add(&self.counters.rate_limited, 1);
                Err(Ok(Failure { reason, retry_after }))
            }
            408 | 500..=599 => {
                add(&self.counters.server_errors, u64::from(status.is_server_error()));
                Err(Ok(Failure { reason, retry_after }))
            }
            _ => Err(Err(reason)),
        }
    }

    fn transport_failure(&self, url: &str, e: reqwest::Error) -> Failure {
        if e.is_timeout() {
            add(&self.counters.timeouts, 1);
            return Failure { reason: format!("{url}: no answer within {:?}", self.cfg.timeout), retry_after: None };
        }
        // reqwest's message names the URL; the key is only ever in a header.
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            reason.push_str(&format!(": {s}"));
            source = s.source();
        }
        Failure { reason, retry_after: None }
    }
}

/// Exponential backoff with "equal jitter": half of `initial * 2^retry` (capped) plus a random part
/// up to the other half.
fn backoff(cfg: &ClientConfig, retry: u32) -> Duration {
    let base = cfg.initial_backoff.saturating_mul(1u32 << retry.min(16)).min(cfg.max_backoff);
    let half = base / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// The largest answer read from an endpoint; a longer one is a failed attempt (an LLM's answer to
/// one window is a few kilobytes).
pub const MAX_ANSWER_BYTES: usize = 4 << 20;

/// The body as text, or None once it grows past `max` bytes (read no further).
async fn read_capped(mut response: reqwest::Response, max: usize) -> Result<Option<String>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > max {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(String::from_utf8_lossy(&body).into_owned()))
}

/// Retry-After as seconds or as an HTTP date; capped at 10 minutes.
fn parse_retry_after(v: &reqwest::header::HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    let d = match s.parse::<f64>() {
        // Clamped before the conversion: from_secs_f64 panics past u64 seconds (`Retry-After: 1e20`).
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs.min(600.0)),
        _ => httpdate::parse_http_date(s).ok()?.duration_since(std::time::SystemTime::now()).unwrap_or_default(),
    };
    Some(d.min(Duration::from_secs(600)))
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let h = |s: &str| reqwest::header::HeaderValue::from_str(s).unwrap();
        assert_eq!(parse_retry_after(&h("2")), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(&h("Wed, 21 Oct 2015 07:28:00 GMT")), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(&h("99999")), Some(Duration::from_secs(600)));
        assert_eq!(parse_retry_after(&h("soon")), None);
        assert_eq!(parse_retry_after(&h("1e20")), Some(Duration::from_secs(600)), "no panic past u64 seconds");
        assert_eq!(parse_retry_after(&h("inf")), None);
        assert_eq!(parse_retry_after(&h("NaN")), None);
    }

    #[test]
    fn backoff_grows_with_jitter_and_cap() {
        let cfg = ClientConfig {
            base_url: String::new(),
            model: String::new(),
            api_key: None,
            concurrency: 1,
            max_retries: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            timeout: Duration::from_secs(1),
            usd_per_million_prompt: 0.0,
            usd_per_million_completion: 0.0,
            cache: None,
        };
        for _ in 0..50 {
            let d0 = backoff(&cfg, 0);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
            let d2 = backoff(&cfg, 2);
            assert!(d2 >= Duration::from_millis(200) && d2 <= Duration::from_millis(400));
            let d9 = backoff(&cfg, 9);
            assert!(d9 >= Duration::from_millis(500) && d9 <= Duration::from_millis(1000));
        }
    }
}
