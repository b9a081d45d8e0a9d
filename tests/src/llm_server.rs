//! A scripted OpenAI-compatible server on 127.0.0.1 for the LLM teacher tests: real HTTP, answers
//! computed from the prompt, and faults injected by directives written into the query text:
//!
//! | directive  | first attempt of each prompt            | later attempts |
//! |------------|------------------------------------------|----------------|
//! | `#429`     | 429 with `Retry-After: 1`                | answered       |
//! | `#500`     | 500                                      | answered       |
//! | `#timeout` | answered only after `timeout_sleep`      | answered       |
//! | `#bad`     | 200 with no passage id in the answer     | answered       |
//! | `#partial` | 200, `[2] > [2] > [99] > [1]` (repaired) | same           |
//! | `#dead`    | 500                                      | 500            |
//! | `#refuse`  | 401                                      | 401            |
//!
//! Passages carry their relevance as `grade=N`: listwise answers sort a window by grade (highest
//! first, stable), pointwise answers give P(yes) = sigmoid(N - 2) as first-token logprobs. A
//! window in which no passage has a grade is answered in reverse order, so that an answer always
//! differs from the first stage's order (which a window that fell back keeps).
//!
//! `stop` takes the endpoint away (the port refuses connections, kept-alive ones are closed) and
//! `restart` brings it back on the same port, for outage tests.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    /// Tokens reported in the usage of answers that reached the client (200s sent in time).
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Authorization headers seen.
    pub authorization: Mutex<Vec<String>>,
    /// Attempt times per prompt (hash of the request body).
    pub attempts: Mutex<HashMap<String, Vec<Instant>>>,
    /// Attempt times of prompts whose query carries a directive, by directive.
    pub by_directive: Mutex<HashMap<String, Vec<Instant>>>,
}

pub struct ScriptedLlm {
    pub base_url: String,
    pub stats: Arc<Stats>,
    addr: std::net::SocketAddr,
    script: Arc<Script>,
    server: tokio::task::JoinHandle<()>,
    stop: Arc<tokio::sync::Notify>,
}

impl Drop for ScriptedLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct Script {
    latency: Duration,
    timeout_sleep: Duration,
    stats: Arc<Stats>,
}

impl ScriptedLlm {
    /// Serves with `latency` before every answer; `#timeout` prompts first wait `timeout_sleep`.
    pub async fn start(latency: Duration, timeout_sleep: Duration) -> ScriptedLlm {
        let stats = Arc::new(Stats::default());
        let script = Arc::new(Script { latency, timeout_sleep, stats: stats.clone() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(tokio::sync::Notify::new());
        let server = serve(listener, script.clone(), stop.clone());
        ScriptedLlm { base_url: format!("http://{addr}/v1"), stats, addr, script, server, stop }
    }

    /// Takes the endpoint away: answers in flight are finished, kept-alive connections closed and
    /// the port closed, so that requests fail until `restart`.
    pub async fn stop(&mut self) {
        self.stop.notify_one();
        (&mut self.server).await.unwrap();
    }

    /// Serves again on the same port.
    pub async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.server = serve(listener, self.script.clone(), self.stop.clone());
    }

    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::SeqCst)
    }
}

fn serve(
    listener: tokio::net::TcpListener,
    script: Arc<Script>,
    stop: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(handle))
        .route("/v1/completions", post(handle))
        .with_state(script);
    tokio::spawn(async move {
        let stopped = async move { stop.notified().await };
        axum::serve(listener, app).with_graceful_shutdown(stopped).await.unwrap();
    })
}

struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// All text the request carries (messages or prompt).
fn prompt_text(body: &Value) -> String {
    match body["messages"].as_array() {
        Some(ms) => ms.iter().filter_map(|m| m["content"].as_str()).collect::<Vec<_>>().join("\n"),
        None => body["prompt"].as_str().unwrap_or("").to_string(),
    }
}

fn grade(text: &str) -> Option<i64> {
    text.split_whitespace().find_map(|w| w.strip_prefix("grade=")).and_then(|g| g.parse().ok())
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

const DIRECTIVES: [&str; 7] = ["#429", "#500", "#timeout", "#bad", "#partial", "#dead", "#refuse"];

async fn handle(State(s): State<Arc<Script>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let stats = &s.stats;
    stats.requests.fetch_add(1, Ordering::SeqCst);
    let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(stats);
    if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        stats.authorization.lock().unwrap().push(a.to_string());
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "body is not JSON").into_response();
    };
    let key = hex::encode(Sha256::digest(&body));
    let attempt = {
        let mut a = stats.attempts.lock().unwrap();
        let times = a.entry(key).or_default();
        times.push(Instant::now());
        times.len() - 1
    };
    let text = prompt_text(&request);
    let directive = DIRECTIVES.iter().find(|d| text.contains(*d)).copied();
    if let Some(d) = directive {
        stats.by_directive.lock().unwrap().entry(d.to_string()).or_default().push(Instant::now());
    }
    tokio::time::sleep(s.latency).await;
    match (directive, attempt) {
        (Some("#429"), 0) => {
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], "slow down").into_response();
        }
        (Some("#500"), 0) | (Some("#dead"), _) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response();
        }
        (Some("#refuse"), _) => return (StatusCode::UNAUTHORIZED, "invalid api key").into_response(),
        (Some("#timeout"), 0) => {
            tokio::time::sleep(s.timeout_sleep).await;
            return json_response(answer(&request, &uri, "[1]", None));
        }
        _ => {}
    }
    let pointwise = request["max_tokens"].as_u64() == Some(1);
    let content = if pointwise {
        String::new()
    } else if directive == Some("#bad") && attempt == 0 {
        "I cannot rank these passages, sorry.".to_string()
    } else if directive == Some("#partial") {
        "[2] > [2] > [99] > [1]".to_string()
    } else {
        // Window passages are the user turns `[k] text`.
        let mut passages: Vec<(usize, Option<i64>)> = Vec::new();
        for m in request["messages"].as_array().into_iter().flatten() {
            let c = m["content"].as_str().unwrap_or("");
            if m["role"] == "user" {
                if let Some(rest) = c.strip_prefix('[') {
                    if let Some((id, p)) = rest.split_once("] ") {
                        if let Ok(id) = id.parse::<usize>() {
                            passages.push((id, grade(p)));
                        }
                    }
                }
            }
        }
        if passages.iter().all(|(_, g)| g.is_none()) {
            passages.reverse();
        }
        passages.sort_by_key(|(_, g)| -g.unwrap_or(0));
        passages.iter().map(|(id, _)| format!("[{id}]")).collect::<Vec<_>>().join(" > ")
    };
    let grade_of_passage = if pointwise { Some(grade(&text).unwrap_or(0)) } else { None };
    let prompt_tokens = body.len() as u64 / 4;
    let completion_tokens = if pointwise { 1 } else { content.len() as u64 / 3 + 1 };
    stats.prompt_tokens.fetch_add(prompt_tokens, Ordering::SeqCst);
    stats.completion_tokens.fetch_add(completion_tokens, Ordering::SeqCst);
    let mut v = answer(&request, &uri, &content, grade_of_passage);
    v["usage"] = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens});
    json_response(v)
}

fn json_response(v: Value) -> Response {
    ([("content-type", "application/json")], v.to_string()).into_response()
}

/// An OpenAI-shaped answer: chat or completions by path; with first-token logprobs for pointwise.
fn answer(request: &Value, uri: &Uri, content: &str, grade: Option<i64>) -> Value {
    let chat = uri.path().ends_with("chat/completions");
    let model = request["model"].clone();
    let Some(g) = grade else {
        return json!({
            "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        });
    };
    let p = sigmoid(g as f64 - 2.0);
    let (yes, no) = (p.ln(), (1.0 - p).ln());
    let first = if p >= 0.5 { "Yes" } else { "No" };
    if chat {
        json!({
            "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": first}, "finish_reason": "length",
                "logprobs": {"content": [{"token": first, "logprob": if p >= 0.5 { yes } else { no },
                    "top_logprobs": [{"token": "Yes", "logprob": yes}, {"token": "No", "logprob": no},
                                     {"token": "Maybe", "logprob": -30.0}]}]}}],
        })
    } else {
        json!({
            "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": format!(" {first}"), "finish_reason": "length",
                "logprobs": {"tokens": [format!(" {first}")], "top_logprobs": [{" Yes": yes, " No": no, " Maybe": -30.0}]}}],
        })
    }
}
