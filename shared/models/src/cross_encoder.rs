//! A cross-encoder loaded from a Hugging Face directory: `config.json` (dispatched on
//! `model_type`), `model.safetensors`, `tokenizer.json`.

use crate::bert::{BertConfig, BertCrossEncoder};
use crate::electra::{ElectraConfig, ElectraCrossEncoder};
use crate::checkpoint::{load_safetensors, LoadReport};
use crate::tokenize::PairTokenizer;
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::path::Path;

pub const SUPPORTED: &[&str] = &["bert", "electra"];
const PLANNED: &[&str] = &["roberta", "xlm-roberta", "deberta-v2", "modernbert"];

pub enum Backbone {
    Bert(BertCrossEncoder),
    Electra(ElectraCrossEncoder),
}

impl Backbone {
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Backbone::Bert(m) => m.forward(ids, types, mask, train),
            Backbone::Electra(m) => m.forward(ids, types, mask, train),
        }
    }
}

pub struct CrossEncoder {
    pub backbone: Backbone,
    pub tokenizer: PairTokenizer,
    /// The trainable variables, under their HF names.
    pub varmap: VarMap,
    /// What loading found: a missing head means a new, randomly initialised one.
    pub report: LoadReport,
    pub model_type: String,
    pub device: Device,
}

fn invalid(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Invalid { path: path.display().to_string(), message: message.into() }
}

impl CrossEncoder {
    pub fn load(dir: &Path, max_query_length: usize, max_length: usize, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(invalid(dir, "not a model directory"));
        }
        let config_path = dir.join("config.json");
        let raw = std::fs::read(&config_path).map_err(|e| invalid(&config_path, e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| invalid(&config_path, format!("not JSON: {e}")))?;
        let model_type = value["model_type"].as_str().ok_or_else(|| invalid(&config_path, "no model_type"))?.to_string();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let (backbone, pad_id) = match model_type.as_str() {
            "bert" => {
                let cfg: BertConfig =
                    serde_json::from_value(value).map_err(|e| invalid(&config_path, format!("not a BERT config: {e}")))?;
                let pad = cfg.pad_token_id;
                (Backbone::Bert(BertCrossEncoder::load(vb, &cfg)?), pad)
            }
            "electra" => {
                let cfg: ElectraConfig =
                    serde_json::from_value(value).map_err(|e| invalid(&config_path, format!("not an ELECTRA config: {e}")))?;
                let pad = cfg.bert.pad_token_id;
                (Backbone::Electra(ElectraCrossEncoder::load(vb, &cfg)?), pad)
            }
            t if PLANNED.contains(&t) => {
                return Err(invalid(&config_path, format!("model_type '{t}' is not supported yet (supported: {})", SUPPORTED.join(", "))))
            }
            t => return Err(invalid(&config_path, format!("unsupported model_type '{t}' (supported: {})", SUPPORTED.join(", ")))),
        };
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(invalid(&weights, "missing (safetensors weights are required)"));
        }
        let report = load_safetensors(&varmap, &weights, device)?;
        let encoder_missing: Vec<_> = report.missing.iter().filter(|n| !n.starts_with("classifier.")).collect();
        // (ELECTRA's head is `classifier.dense` + `classifier.out_proj`: also a new head when absent.)
        if !encoder_missing.is_empty() {
            return Err(invalid(&weights, format!("weights missing for {encoder_missing:?}")));
        }
        let tokenizer = PairTokenizer::from_file(&dir.join("tokenizer.json"), max_query_length, max_length, pad_id)?;
        Ok(Self { backbone, tokenizer, varmap, report, model_type, device: device.clone() })
    }

    /// Whether the classification head was initialised here rather than loaded.
    pub fn new_head(&self) -> bool {
        self.report.missing.iter().any(|n| n.starts_with("classifier."))
    }

    /// Scores pairs in batches of `batch_size`, in input order.
    pub fn score(&self, pairs: &[(&str, &str)], batch_size: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(batch_size.max(1)) {
            let b = self.tokenizer.batch(chunk, &self.device)?;
            let s = self.backbone.forward(&b.input_ids, &b.token_type_ids, &b.attention_mask, false)?;
            out.extend(s.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}
