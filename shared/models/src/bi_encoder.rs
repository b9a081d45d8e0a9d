//! A sentence-transformers bi-encoder as a teacher member: query and passage embedded separately
//! (the encoder's hidden states pooled by mean over real tokens, or the first token, as the
//! checkpoint's `1_Pooling/config.json` says), L2-normalised, scored by cosine similarity. Lets the
//! real all-MiniLM-L6-v2 teach where no cross-encoder checkpoint is at hand.

use crate::cross_encoder::{plan_passes, BatchStats, Batching, CrossEncoder};
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pooling {
    Mean,
    Cls,
}

pub struct BiEncoder {
    model: CrossEncoder,
    pub pooling: Pooling,
    pub model_type: String,
}

/// Whether `dir` holds a sentence-transformers bi-encoder (`modules.json` with a Pooling module).
pub fn is_bi_encoder(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("modules.json")).is_ok_and(|m| m.contains("sentence_transformers.models.Pooling"))
}

fn invalid(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Invalid { path: path.display().to_string(), message: message.into() }
}

impl BiEncoder {
    /// Loads the encoder of a sentence-transformers directory; texts are cut to `max_length` tokens
    /// or the checkpoint's own `max_seq_length`, whichever is smaller.
    pub fn load(dir: &Path, max_length: usize, device: &Device) -> Result<Self> {
        let pooling_path = dir.join("1_Pooling/config.json");
        let pooling = match std::fs::read(&pooling_path) {
            Err(_) => Pooling::Mean,
            Ok(raw) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&raw).map_err(|e| invalid(&pooling_path, format!("not JSON: {e}")))?;
                if v["pooling_mode_mean_tokens"].as_bool() == Some(true) {
                    Pooling::Mean
                } else if v["pooling_mode_cls_token"].as_bool() == Some(true) {
                    Pooling::Cls
                } else {
                    return Err(invalid(&pooling_path, "only mean and CLS pooling are supported"));
                }
            }
        };
        let own_max = std::fs::read(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .map_or(usize::MAX, |m| m as usize);
        let max_length = max_length.min(own_max);
        let model = CrossEncoder::load(dir, max_length, max_length, device)?;
        if !matches!(model.model_type.as_str(), "bert" | "roberta" | "xlm-roberta") {
            return Err(invalid(
                &dir.join("config.json"),
                format!("bi-encoder of model_type '{}': bert, roberta and xlm-roberta are supported", model.model_type),
            ));
        }
        let model_type = model.model_type.clone();
        Ok(Self { model, pooling, model_type })
    }

    /// Unit-length embeddings of `texts` (rows in input order), in length-sorted passes cut by
    /// `batching`.
    pub fn embed(&self, texts: &[&str], batching: Batching) -> Result<(Tensor, BatchStats)> {
        let tok = &self.model.tokenizer;
        let encoded: Vec<_> = texts.iter().map(|t| tok.encode_single(t)).collect::<Result<_>>()?;
        let lengths: Vec<usize> = encoded.iter().map(|(ids, _)| ids.len()).collect();
        let mut rows: Vec<Option<Tensor>> = vec![None; encoded.len()];
        let mut stats = BatchStats::default();
        for idx in plan_passes(&lengths, batching) {
            let b = tok.pad(idx.iter().map(|&i| &encoded[i]), &self.model.device)?;
            let pooled = crate::layers::no_grad(|| -> Result<Tensor> {
                let h = self.model.backbone.hidden_states(&b.input_ids, &b.token_type_ids, &b.attention_mask)?;
                let h = h.to_dtype(DType::F32)?;
                let pooled = match self.pooling {
                    Pooling::Cls => crate::bert::first_token(&h)?,
                    Pooling::Mean => {
                        // sentence-transformers: sum of real tokens' states over their count (>= 1e-9).
                        let mask = b.attention_mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
                        let summed = h.broadcast_mul(&mask)?.sum(1)?;
                        let count = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
                        summed.broadcast_div(&count)?
                    }
                };
                // Normalize: x / max(||x||, 1e-12), as torch.nn.functional.normalize.
                let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
                Ok(pooled.broadcast_div(&norm)?)
            })?;
            for (k, &i) in idx.iter().enumerate() {
                rows[i] = Some(pooled.get(k)?);
            }
            stats.record(&idx, &lengths);
        }
        let rows: Vec<Tensor> = rows.into_iter().map(|r| r.expect("every text embedded")).collect();
        if rows.is_empty() {
            return Ok((Tensor::zeros((0, 0), DType::F32, &self.model.device)?, stats));
        }
        Ok((Tensor::stack(&rows, 0)?, stats))
    }

    /// Cosine similarity of each pair (each distinct text embedded once).
    pub fn score_with<'a>(&self, pairs: &[(&'a str, &'a str)], batching: Batching) -> Result<(Vec<f32>, BatchStats)> {
        let mut index: HashMap<&'a str, usize> = HashMap::new();
        let mut texts: Vec<&'a str> = Vec::new();
        let mut ids = Vec::with_capacity(pairs.len());
        for &(q, p) in pairs {
            let mut slot = |t: &'a str| {
                *index.entry(t).or_insert_with(|| {
                    texts.push(t);
                    texts.len() - 1
                })
            };
            ids.push((slot(q), slot(p)));
        }
        let (emb, stats) = self.embed(&texts, batching)?;
        if ids.is_empty() {
            return Ok((Vec::new(), stats));
        }
        let emb: Vec<Vec<f32>> = emb.to_vec2()?;
        let scores = ids.iter().map(|&(q, p)| emb[q].iter().zip(&emb[p]).map(|(a, b)| a * b).sum::<f32>()).collect();
        Ok((scores, stats))
    }
}
