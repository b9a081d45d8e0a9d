//! LLM re-rankers behind an OpenAI-compatible endpoint, as teachers.
//!
//! - Listwise (RankGPT/RankZephyr): each query's list is re-ranked by sliding windows from the bottom
//!   to the top; each window's answer is a permutation, parsed and repaired (`prompts.rs`). A window
//!   that cannot be ranked after the retries keeps its order and is counted (`fallback_windows`).
//!   The teacher score of the candidate at final position p of n is n - p (its rank is p + 1).
//! - Pointwise: one request per (query, passage); the score is P("yes") from the first answer token's
//!   logprobs. A pair without a usable answer after the retries has no score (`unscored_pairs`).
//!
//! Requests, retries, backoff, the answer cache and the counters are the client's (`client.rs`).

pub mod client;
pub mod endpoints;
pub mod local;
pub mod prompts;

use crate::candidates::{Candidate, QueryCandidates};
use crate::error::Error;
use crate::teachers::{Scores, Teacher};
use client::{CallError, Client, ClientConfig};
use distill_proto::{LlmApi, LlmMode, LlmReranker};
use distill_shards::TeacherIdentity;
use distill_store::Location;
use futures::future::BoxFuture;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What a teacher may need from the service that builds it.
#[derive(Clone, Default)]
pub struct TeacherContext {
    /// The service's store (default home of caches).
    pub store: Option<Location>,
    /// The API key the job was started with (kept apart from the job spec).
    pub api_key: Option<String>,
    /// Where model teachers run (the service's `--device`; None: the CPU).
    pub device: Option<candle_core::Device>,
    /// The LLM endpoints the operator configured (the only ones requests may use).
    pub endpoints: std::sync::Arc<endpoints::Endpoints>,
}

impl TeacherContext {
    pub fn device(&self) -> candle_core::Device {
        self.device.clone().unwrap_or(candle_core::Device::Cpu)
    }
}

fn or_default(v: u32, default: u32) -> u32 {
    if v == 0 {
        default
    } else {
        v
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub fn mode_of(spec: &LlmReranker) -> LlmMode {
    LlmMode::try_from(spec.mode).unwrap_or(LlmMode::Unspecified)
}

/// Checks an LLM teacher spec before a job is created: its endpoint must be one the operator
/// configured.
pub fn validate(spec: &LlmReranker, endpoints: &endpoints::Endpoints) -> Result<(), Error> {
    let bad = |field: &str, why: &str| Err(Error::InvalidArgument(format!("teacher.llm.{field}: {why}")));
    let mode = mode_of(spec);
    if mode == LlmMode::Unspecified {
        return bad("mode", "unspecified (LISTWISE or POINTWISE)");
    }
    let api = LlmApi::try_from(spec.api).unwrap_or(LlmApi::Unspecified);
    if mode == LlmMode::Listwise && api == LlmApi::Completions {
        return bad("api", "listwise ranking uses chat/completions (CHAT)");
    }
    let window = or_default(spec.window_size, 20);
    if window < 2 {
        return bad("window_size", "at least 2 passages per window");
    }
    if or_default(spec.stride, 10) > window {
        return bad("stride", &format!("{} is larger than the window ({window})", spec.stride));
    }
    let endpoint = spec.endpoint.clone().unwrap_or_default();
    endpoints.resolve(&endpoint)?;
    if endpoint.model.is_empty() && env("DISTILL_LLM_MODEL").is_none() {
        return bad("endpoint.model", "empty, and DISTILL_LLM_MODEL is not set");
    }
    if let Some(r) = spec.max_fallback_ratio {
        if !(0.0..=1.0).contains(&r) {
            return bad("max_fallback_ratio", &format!("{r} is not a fraction in [0, 1]"));
        }
    }
    for (field, price) in [
        ("usd_per_million_prompt_tokens", spec.usd_per_million_prompt_tokens),
        ("usd_per_million_completion_tokens", spec.usd_per_million_completion_tokens),
    ] {
        if !price.is_finite() || price < 0.0 {
            return bad(field, "must be a finite price >= 0");
        }
    }
    if !spec.cache_uri.is_empty() {
        Location::parse(&spec.cache_uri).map_err(|e| Error::InvalidArgument(format!("teacher.llm.cache_uri: {e}")))?;
    }
    Ok(())
}

enum Mode {
    Listwise { window: usize, stride: usize, max_tokens: u32 },
    Pointwise { completions: bool },
}

pub struct LlmTeacher {
    identity: TeacherIdentity,
    client: Client,
    mode: Mode,
    max_words: usize,
    temperature: f32,
    concurrency: usize,
    repaired: AtomicU64,
    /// Windows ranked (listwise) or pairs asked (pointwise), and those that failed.
    attempted: AtomicU64,
    fallback_windows: AtomicU64,
    unscored_pairs: AtomicU64,
    max_fallback_ratio: f64,
}

impl LlmTeacher {
    pub async fn build(spec: &LlmReranker, ctx: &TeacherContext) -> Result<Self, Error> {
        validate(spec, &ctx.endpoints)?;
        let endpoint = spec.endpoint.clone().unwrap_or_default();
        let configured = ctx.endpoints.resolve(&endpoint)?;
        let base_url = configured.url.clone();
        let model = if endpoint.model.is_empty() {
            env("DISTILL_LLM_MODEL")
                .ok_or_else(|| Error::InvalidArgument("teacher.llm.endpoint.model: empty".into()))?
        } else {
            endpoint.model
        };
        // The client's own key (sent only to this configured endpoint), else the operator's.
        let api_key = ctx.api_key.clone().filter(|k| !k.is_empty()).or_else(|| configured.key().map(String::from));
        let cache = if spec.no_cache {
            None
        } else if !spec.cache_uri.is_empty() {
            Some(Location::parse(&spec.cache_uri)?)
        } else {
            ctx.store.as_ref().map(|s| s.child("cache/llm"))
        };
        let concurrency = or_default(spec.concurrency, 8) as usize;
        let window = or_default(spec.window_size, 20) as usize;
        let mode = match mode_of(spec) {
            LlmMode::Listwise => Mode::Listwise {
                window,
                stride: or_default(spec.stride, 10) as usize,
                max_tokens: or_default(spec.max_completion_tokens, window as u32 * 5 + 20),
            },
            _ => Mode::Pointwise { completions: LlmApi::try_from(spec.api) == Ok(LlmApi::Completions) },
        };
        let max_words = or_default(spec.max_passage_words, 100) as usize;
        let (kind, mode_details) = match &mode {
            Mode::Listwise { window, stride, max_tokens } => (
                "llm_listwise",
                json!({"mode": "listwise", "window_size": window, "stride": stride, "max_completion_tokens": max_tokens}),
            ),
            Mode::Pointwise { completions } => (
                "llm_pointwise",
                json!({"mode": "pointwise", "api": if *completions { "completions" } else { "chat" }}),
            ),
        };
        let mut details = json!({
            "base_url": base_url, "model": model, "max_passage_words": max_words,
            "temperature": spec.temperature,
            "prompt": if matches!(mode, Mode::Listwise { .. }) { "rankgpt" } else { "yes_no" },
        });
        details.as_object_mut().expect("object").extend(mode_details.as_object().expect("object").clone());
        let identity = TeacherIdentity {
            kind: kind.into(),
            name: if spec.name.is_empty() { model.clone() } else { spec.name.clone() },
            details,
        };
        let client = Client::new(ClientConfig {
            base_url,
            model,
            api_key,
            concurrency,
            max_retries: if spec.max_retries == 0 { 4 } else { spec.max_retries },
            initial_backoff: Duration::from_millis(or_default(spec.initial_backoff_ms, 500) as u64),
            max_backoff: Duration::from_millis(or_default(spec.max_backoff_ms, 20_000) as u64),
            timeout: Duration::from_millis(or_default(spec.request_timeout_ms, 60_000) as u64),
            usd_per_million_prompt: spec.usd_per_million_prompt_tokens,
            usd_per_million_completion: spec.usd_per_million_completion_tokens,
            cache,
        })
        .map_err(Error::Internal)?;
        Ok(Self {
            identity,
            client,
            mode,
            max_words,
            temperature: spec.temperature,
            concurrency,
            repaired: AtomicU64::new(0),
            attempted: AtomicU64::new(0),
            fallback_windows: AtomicU64::new(0),
            unscored_pairs: AtomicU64::new(0),
            max_fallback_ratio: spec.max_fallback_ratio.map_or(0.01, f64::from),
        })
    }

    /// Final order of `candidates` (indices), from first-stage order through the sliding windows.
    async fn rank(
        &self,
        query: &str,
        candidates: &[Candidate],
        window: usize,
        stride: usize,
        max_tokens: u32,
    ) -> Result<Vec<usize>, Error> {
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        for (start, end) in prompts::windows(candidates.len(), window, stride) {
            let passages: Vec<String> = order[start..end]
                .iter()
                .map(|&i| prompts::truncate_words(&candidates[i].text, self.max_words))
                .collect();
            let body = json!({
                "model": self.client.model(),
                "messages": prompts::listwise_messages(query, &passages),
                "temperature": self.temperature,
                "max_tokens": max_tokens,
            });
            let n = end - start;
            self.attempted.fetch_add(1, Ordering::Relaxed);
            let answer = self
                .client
                .call("chat/completions", &body, |r| {
                    prompts::answer_text(r).and_then(|a| prompts::parse_permutation(a, n))
                })
                .await;
            match answer {
                Ok(p) => {
                    if p.repaired() {
                        self.repaired.fetch_add(1, Ordering::Relaxed);
                    }
                    let ranked: Vec<usize> = p.order.iter().map(|&k| order[start + k]).collect();
                    order[start..end].copy_from_slice(&ranked);
                }
                Err(CallError::Refused(e)) => return Err(Error::Teacher(format!("LLM endpoint refused: {e}"))),
                Err(e @ CallError::Exhausted { .. }) => {
                    self.fallback_windows.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("window {start}..{end} keeps its order: {e}");
                }
            }
        }
        Ok(order)
    }

    async fn pointwise(
        &self,
        query: &str,
        candidates: &[Candidate],
        completions: bool,
    ) -> Result<Vec<Option<f64>>, Error> {
        let model = self.client.model();
        let asks = candidates.iter().map(|c| {
            let passage = prompts::truncate_words(&c.text, self.max_words);
            let (path, body) = if completions {
                (
                    "completions",
                    json!({
                        "model": model, "prompt": prompts::pointwise_prompt(query, &passage),
                        "max_tokens": 1, "temperature": self.temperature, "logprobs": 5,
                    }),
                )
            } else {
                (
                    "chat/completions",
                    json!({
                        "model": model, "messages": prompts::pointwise_messages(query, &passage),
                        "max_tokens": 1, "temperature": self.temperature, "logprobs": true, "top_logprobs": 5,
                    }),
                )
            };
            async move {
                self.client
                    .call(path, &body, |r| {
                        let c = prompts::first_token_logprobs(r);
                        prompts::yes_probability(c.iter().map(|(t, l)| (t.as_str(), *l)))
                    })
                    .await
            }
        });
        let mut scores = Vec::with_capacity(candidates.len());
        self.attempted.fetch_add(candidates.len() as u64, Ordering::Relaxed);
        for answer in futures::future::join_all(asks).await {
            match answer {
                Ok(p) => scores.push(Some(p)),
                Err(CallError::Refused(e)) => return Err(Error::Teacher(format!("LLM endpoint refused: {e}"))),
                Err(_) => {
                    self.unscored_pairs.fetch_add(1, Ordering::Relaxed);
                    scores.push(None);
                }
            }
        }
        Ok(scores)
    }
}

impl LlmTeacher {
    /// The counters an outage shows in (what failed, what was asked) and how the error names them.
    fn outage_counters(&self) -> (&'static str, &'static str, &'static str) {
        match self.mode {
            Mode::Listwise { .. } => ("fallback_windows", "windows", "windows kept the first-stage order"),
            Mode::Pointwise { .. } => ("unscored_pairs", "pairs", "pairs went unscored"),
        }
    }

    /// Windows that fell back (listwise) or pairs left unscored (pointwise) since it was built.
    fn failed(&self) -> u64 {
        match self.mode {
            Mode::Listwise { .. } => self.fallback_windows.load(Ordering::Relaxed),
            Mode::Pointwise { .. } => self.unscored_pairs.load(Ordering::Relaxed),
        }
    }
}

impl Teacher for LlmTeacher {
    fn identity(&self) -> TeacherIdentity {
        self.identity.clone()
    }

    fn parallelism(&self) -> usize {
        self.concurrency
    }

    fn check_outage(&self, carried: &BTreeMap<String, f64>, remaining: u64) -> Result<(), Error> {
        let (failed_key, asked_key, what) = self.outage_counters();
        let before = |k: &str| carried.get(k).copied().unwrap_or(0.0) as u64;
        let failed = before(failed_key) + self.failed();
        let attempted = before(asked_key) + self.attempted.load(Ordering::Relaxed);
        // Each query still to come asks at least once: the fewest asks the job can end with.
        let at_least = attempted + remaining;
        if failed as f64 <= self.max_fallback_ratio * at_least as f64 {
            return Ok(());
        }
        Err(Error::Teacher(format!(
            "the LLM endpoint failed too often: {failed} of {attempted} {what} after their retries, more than \
             max_fallback_ratio {} allows; see the service's log for the errors, then ResumeJob (answers \
             already received are cached)",
            self.max_fallback_ratio
        )))
    }

    fn counters(&self) -> BTreeMap<String, f64> {
        let mut c = self.client.snapshot();
        match self.mode {
            Mode::Listwise { .. } => {
                c.insert("repaired_permutations".into(), self.repaired.load(Ordering::Relaxed) as f64);
            }
            Mode::Pointwise { .. } => {}
        }
        let (failed_key, asked_key, _) = self.outage_counters();
        c.insert(failed_key.into(), self.failed() as f64);
        c.insert(asked_key.into(), self.attempted.load(Ordering::Relaxed) as f64);
        c
    }

    fn score<'a>(
        &'a self,
        query: &'a QueryCandidates,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Result<Scores, Error>> {
        Box::pin(async move {
            match self.mode {
                Mode::Listwise { window, stride, max_tokens } => {
                    // A listwise teacher ranks a query's own list; documents outside it (relevant ones the
                    // first stage missed) get no listwise score.
                    if !std::ptr::eq(candidates.as_ptr(), query.candidates.as_ptr()) {
                        return Ok(vec![None; candidates.len()].into());
                    }
                    let order = self.rank(&query.query, candidates, window, stride, max_tokens).await?;
                    let n = order.len();
                    let mut scores = vec![None; n];
                    for (position, &i) in order.iter().enumerate() {
                        scores[i] = Some((n - position) as f64);
                    }
                    Ok(scores.into())
                }
                Mode::Pointwise { completions } => {
                    Ok(self.pointwise(&query.query, candidates, completions).await?.into())
                }
            }
        })
    }
}
