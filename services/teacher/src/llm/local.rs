//! The local LLM teacher: a GGUF model run in this process (`distill_models::gguf_llm`), pointwise.
//! Prompts run one at a time on the calling worker thread (`block_in_place`); the model keeps no
//! state between prompts.

use super::prompts;
use crate::candidates::{Candidate, QueryCandidates};
use crate::error::Error;
use crate::teachers::{Scores, Teacher};
use distill_models::gguf_llm::GgufLlm;
use distill_proto::LocalLlm;
use distill_shards::TeacherIdentity;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub struct LocalLlmTeacher {
    identity: TeacherIdentity,
    model: Mutex<GgufLlm>,
    max_words: usize,
    pairs: AtomicU64,
    prompt_tokens: AtomicU64,
    millis: AtomicU64,
}

pub fn validate(spec: &LocalLlm) -> Result<(), Error> {
    if spec.model.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "teacher.local_llm.model: empty (a .gguf file or a directory holding one)".into(),
        ));
    }
    Ok(())
}

/// The .gguf file `uri` names: the file itself, or the first .gguf (by name) in a directory or
/// object-store prefix.
async fn gguf_file(uri: &str) -> Result<PathBuf, Error> {
    let field = |e: String| Error::InvalidArgument(format!("teacher.local_llm.model: {e}"));
    if distill_store::is_local(uri) {
        let path = distill_store::local_path(uri).map_err(|e| field(e.to_string()))?;
        if path.is_file() {
            return Ok(path);
        }
    }
    let dir = distill_store::materialize_dir(uri).await.map_err(|e| field(e.to_string()))?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| field(format!("{}: {e}", dir.display())))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    found.sort();
    found.into_iter().next().ok_or_else(|| field(format!("{uri}: no .gguf file there")))
}

impl LocalLlmTeacher {
    pub async fn load(spec: &LocalLlm, device: &candle_core::Device) -> Result<Self, Error> {
        validate(spec)?;
        let path = gguf_file(&spec.model).await?;
        let file = path.clone();
        let device = device.clone();
        let model = tokio::task::spawn_blocking(move || GgufLlm::load(&file, &device))
            .await
            .map_err(|e| Error::Internal(format!("model loading task: {e}")))?
            .map_err(|e| Error::InvalidArgument(format!("teacher.local_llm.model: {e}")))?;
        let file_name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let max_words = if spec.max_passage_words == 0 { 100 } else { spec.max_passage_words as usize };
        Ok(Self {
            identity: TeacherIdentity {
                kind: "local_llm_pointwise".into(),
                name: if spec.name.is_empty() { file_name.clone() } else { spec.name.clone() },
                details: serde_json::json!({
                    "model": spec.model, "file": file_name, "architecture": model.architecture,
                    "chatml": model.chatml, "max_passage_words": max_words, "prompt": "yes_no",
                }),
            },
            model: Mutex::new(model),
            max_words,
            pairs: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            millis: AtomicU64::new(0),
        })
    }

    fn judge(&self, query: &str, candidates: &[Candidate]) -> Result<Vec<Option<f64>>, Error> {
        let mut model = self.model.lock().unwrap_or_else(|e| e.into_inner());
        let start = std::time::Instant::now();
        let mut out = Vec::with_capacity(candidates.len());
        for c in candidates {
            let passage = prompts::truncate_words(&c.text, self.max_words);
            let text = model.prompt(prompts::POINTWISE_SYSTEM, &prompts::pointwise_prompt(query, &passage));
            let ids = model.tokenize(&text).map_err(|e| Error::Teacher(format!("local LLM: {e}")))?;
            let logits = model.next_token_logits(&ids).map_err(|e| Error::Teacher(format!("local LLM: {e}")))?;
            out.push(Some(model.yes_probability_of(&logits)));
            self.prompt_tokens.fetch_add(ids.len() as u64, Ordering::Relaxed);
        }
        self.pairs.fetch_add(candidates.len() as u64, Ordering::Relaxed);
        self.millis.fetch_add(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        Ok(out)
    }
}

impl Teacher for LocalLlmTeacher {
    fn identity(&self) -> TeacherIdentity {
        self.identity.clone()
    }

    fn counters(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([
            ("pairs_judged".to_string(), self.pairs.load(Ordering::Relaxed) as f64),
            ("prompt_tokens".to_string(), self.prompt_tokens.load(Ordering::Relaxed) as f64),
            ("model_seconds".to_string(), self.millis.load(Ordering::Relaxed) as f64 / 1000.0),
        ])
    }

    fn score<'a>(
        &'a self,
        query: &'a QueryCandidates,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Result<Scores, Error>> {
        Box::pin(async move { Ok(tokio::task::block_in_place(|| self.judge(&query.query, candidates))?.into()) })
    }
}
