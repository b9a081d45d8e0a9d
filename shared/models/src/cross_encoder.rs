//! A cross-encoder loaded from a Hugging Face directory: `config.json` (dispatched on
//! `model_type`), `model.safetensors`, `tokenizer.json`.

use crate::bert::{BertConfig, BertCrossEncoder};
use crate::checkpoint::{load_safetensors, LoadReport};
use crate::deberta::{DebertaV2Config, DebertaV2CrossEncoder};
use crate::electra::{ElectraConfig, ElectraCrossEncoder};
use crate::modernbert::{ModernBertConfig, ModernBertCrossEncoder};
use crate::roberta::RobertaCrossEncoder;
use crate::tokenize::PairTokenizer;
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::path::{Path, PathBuf};

pub const SUPPORTED: &[&str] = &["bert", "electra", "roberta", "xlm-roberta", "deberta-v2", "modernbert"];
const PLANNED: &[&str] = &[];

pub enum Backbone {
    Bert(BertCrossEncoder),
    Electra(ElectraCrossEncoder),
    /// RoBERTa and XLM-RoBERTa.
    Roberta(RobertaCrossEncoder),
    ModernBert(ModernBertCrossEncoder),
    /// DeBERTa-v2 and -v3.
    Deberta(DebertaV2CrossEncoder),
}

impl Backbone {
    /// Builds the architecture `model_type` from its `config.json` value, creating (or looking up)
    /// its variables in `vb`; returns the padding token id too.
    pub fn from_config(model_type: &str, config: serde_json::Value, vb: VarBuilder) -> Result<(Self, Option<u32>)> {
        let bad = |message: String| ModelError::Invalid { path: "config.json".into(), message };
        match model_type {
            "bert" => {
                let cfg: BertConfig =
                    serde_json::from_value(config).map_err(|e| bad(format!("not a BERT config: {e}")))?;
                Ok((Backbone::Bert(BertCrossEncoder::load(vb, &cfg)?), cfg.pad_token_id))
            }
            "electra" => {
                let cfg: ElectraConfig =
                    serde_json::from_value(config).map_err(|e| bad(format!("not an ELECTRA config: {e}")))?;
                Ok((Backbone::Electra(ElectraCrossEncoder::load(vb, &cfg)?), cfg.bert.pad_token_id))
            }
            "roberta" | "xlm-roberta" => {
                let cfg: BertConfig =
                    serde_json::from_value(config).map_err(|e| bad(format!("not a RoBERTa config: {e}")))?;
                let pad = Some(cfg.pad_token_id.unwrap_or(1));
                Ok((Backbone::Roberta(RobertaCrossEncoder::load(vb, &cfg)?), pad))
            }
            "deberta-v2" => {
                let cfg: DebertaV2Config =
                    serde_json::from_value(config).map_err(|e| bad(format!("not a DeBERTa-v2 config: {e}")))?;
                let pad = cfg.pad_token_id;
                Ok((Backbone::Deberta(DebertaV2CrossEncoder::load(vb, &cfg)?), pad))
            }
            "modernbert" => {
                let cfg: ModernBertConfig =
                    serde_json::from_value(config).map_err(|e| bad(format!("not a ModernBERT config: {e}")))?;
                let pad = cfg.pad_token_id;
                Ok((Backbone::ModernBert(ModernBertCrossEncoder::load(vb, &cfg)?), pad))
            }
            t if PLANNED.contains(&t) => {
                Err(bad(format!("model_type '{t}' is not supported yet (supported: {})", SUPPORTED.join(", "))))
            }
            t => Err(bad(format!("unsupported model_type '{t}' (supported: {})", SUPPORTED.join(", ")))),
        }
    }

    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Backbone::Bert(m) => m.forward(ids, types, mask, train),
            Backbone::Electra(m) => m.forward(ids, types, mask, train),
            Backbone::Roberta(m) => m.forward(ids, types, mask, train),
            Backbone::ModernBert(m) => m.forward(ids, types, mask, train),
            Backbone::Deberta(m) => m.forward(ids, types, mask, train),
        }
    }
}

impl Backbone {
    /// The encoder's hidden states [B, L, H] (no head): BERT and RoBERTa-family encoders.
    pub fn hidden_states(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match self {
            Backbone::Bert(m) => Ok(m.encoder().forward(ids, types, mask, false)?),
            Backbone::Roberta(m) => Ok(m.encoder().forward(ids, types, mask, false)?),
            _ => Err(ModelError::Invalid {
                path: "config.json".into(),
                message: "bi-encoders are supported for bert, roberta and xlm-roberta encoders".into(),
            }),
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
    /// The directory it was loaded from and its `config.json`, for saving.
    pub source: PathBuf,
    pub config: serde_json::Value,
}

/// Tokenizer files a saved checkpoint carries over from its source.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spm.model",
    "sentencepiece.bpe.model",
];

/// Names of the sequence-classification head (ModernBERT's is `head.*` + `classifier.*`,
/// DeBERTa's `pooler.*` + `classifier.*`).
fn is_head(name: &str) -> bool {
    name.starts_with("classifier.") || name.starts_with("head.") || name.starts_with("pooler.")
}

fn architecture(model_type: &str) -> &'static str {
    match model_type {
        "electra" => "ElectraForSequenceClassification",
        "roberta" => "RobertaForSequenceClassification",
        "xlm-roberta" => "XLMRobertaForSequenceClassification",
        "deberta-v2" => "DebertaV2ForSequenceClassification",
        "modernbert" => "ModernBertForSequenceClassification",
        _ => "BertForSequenceClassification",
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Invalid { path: path.display().to_string(), message: message.into() }
}

/// The longest input a model with absolute position embeddings takes: `max_position_embeddings`
/// (BERT, ELECTRA, DeBERTa with `position_biased_input`), less `pad_token_id + 1` where
/// positions start after the padding index (RoBERTa, XLM-R). None for relative or rotary
/// positions (DeBERTa-v3, ModernBERT).
pub fn position_limit(model_type: &str, config: &serde_json::Value) -> Option<usize> {
    let table = config["max_position_embeddings"].as_u64()? as usize;
    match model_type {
        "bert" | "electra" => Some(table),
        "roberta" | "xlm-roberta" | "camembert" => {
            Some(table.saturating_sub(config["pad_token_id"].as_u64().unwrap_or(1) as usize + 1))
        }
        "deberta-v2" | "deberta" if config["position_biased_input"].as_bool().unwrap_or(true) => Some(table),
        _ => None,
    }
}

impl CrossEncoder {
    pub fn load(dir: &Path, max_query_length: usize, max_length: usize, device: &Device) -> Result<Self> {
        Self::load_as(dir, max_query_length, max_length, device, DType::F32)
    }

    /// Loads with weights in `dtype` (bf16 for GPU scoring; training keeps f32 master weights).
    pub fn load_as(
        dir: &Path,
        max_query_length: usize,
        max_length: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::load_layers(dir, max_query_length, max_length, device, dtype, None)
    }

    /// Loads keeping only the first `layers` encoder layers (a smaller student from a larger
    /// checkpoint, as transformers' `from_pretrained(dir, num_hidden_layers=N)`); the config it
    /// exports says so.
    pub fn load_layers(
        dir: &Path,
        max_query_length: usize,
        max_length: usize,
        device: &Device,
        dtype: DType,
        layers: Option<usize>,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(invalid(dir, "not a model directory"));
        }
        let config_path = dir.join("config.json");
        let raw = std::fs::read(&config_path).map_err(|e| invalid(&config_path, e.to_string()))?;
        let mut value: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| invalid(&config_path, format!("not JSON: {e}")))?;
        if let Some(n) = layers {
            let have =
                value["num_hidden_layers"].as_u64().ok_or_else(|| invalid(&config_path, "no num_hidden_layers"))?;
            if n == 0 || n as u64 > have {
                return Err(invalid(&config_path, format!("cannot keep {n} of its {have} layers")));
            }
            value["num_hidden_layers"] = serde_json::json!(n);
        }
        let model_type =
            value["model_type"].as_str().ok_or_else(|| invalid(&config_path, "no model_type"))?.to_string();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let (backbone, pad_id) = Backbone::from_config(&model_type, value.clone(), vb).map_err(|e| match e {
            ModelError::Invalid { message, .. } => invalid(&config_path, message),
            e => e,
        })?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(invalid(&weights, "missing (safetensors weights are required)"));
        }
        let report = load_safetensors(&varmap, &weights, device)?;
        let encoder_missing: Vec<_> = report.missing.iter().filter(|n| !is_head(n)).collect();
        // (ELECTRA's head is `classifier.dense` + `classifier.out_proj`: also a new head when absent.)
        if !encoder_missing.is_empty() {
            return Err(invalid(&weights, format!("weights missing for {encoder_missing:?}")));
        }
        // Longer inputs than the position table holds would index past it: cut to what the
        // model takes (as transformers' tokenizers do with `model_max_length`).
        let max_length = position_limit(&model_type, &value).map_or(max_length, |limit| max_length.min(limit));
        let tokenizer = PairTokenizer::from_file(&dir.join("tokenizer.json"), max_query_length, max_length, pad_id)?;
        Ok(Self {
            backbone,
            tokenizer,
            varmap,
            report,
            model_type,
            device: device.clone(),
            source: dir.to_path_buf(),
            config: value,
        })
    }

    /// Whether the classification head was initialised here rather than loaded.
    pub fn new_head(&self) -> bool {
        self.report.missing.iter().any(|n| is_head(n))
    }

    /// Re-initialises the variables loading did not find (a new head) from `seed`, as Hugging
    /// Face does: weights ~ N(0, initializer_range), biases 0. Makes a new head reproducible.
    pub fn init_missing(&self, seed: u64) -> Result<()> {
        use rand::{Rng, SeedableRng};
        let std = self.config["initializer_range"].as_f64().unwrap_or(0.02);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for name in &self.report.missing {
            let var = &data[name];
            let n = var.elem_count();
            let values: Vec<f32> = if name.ends_with("bias") {
                vec![0.0; n]
            } else {
                // Box-Muller normals.
                (0..n)
                    .map(|_| {
                        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
                    })
                    .collect()
            };
            var.set(&Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Every variable by its Hugging Face name.
    pub fn tensors(&self) -> std::collections::HashMap<String, Tensor> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    }

    /// Saves a Hugging Face checkpoint into `dir`: `model.safetensors` (the
    /// `*ForSequenceClassification` names, one label), `config.json`, and the tokenizer files of
    /// the source directory, so that transformers and sentence-transformers load it as it is.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |p: &Path, e: std::io::Error| invalid(p, e.to_string());
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        candle_core::safetensors::save(&self.tensors(), dir.join("model.safetensors"))?;
        let mut config = self.config.clone();
        config["architectures"] = serde_json::json!([architecture(&self.model_type)]);
        config["id2label"] = serde_json::json!({"0": "LABEL_0"});
        config["label2id"] = serde_json::json!({"LABEL_0": 0});
        if let Some(obj) = config.as_object_mut() {
            obj.remove("num_labels");
        }
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("JSON value")).map_err(|e| io(&path, e))?;
        for name in TOKENIZER_FILES {
            let from = self.source.join(name);
            if from.is_file() && from != dir.join(name) {
                std::fs::copy(&from, dir.join(name)).map_err(|e| io(&from, e))?;
            }
        }
        Ok(())
    }

    /// Scores pairs in batches of `batch_size`, in input order.
    pub fn score(&self, pairs: &[(&str, &str)], batch_size: usize) -> Result<Vec<f32>> {
        Ok(self.score_with(pairs, Batching { max_pairs: batch_size, max_tokens: usize::MAX })?.0)
    }

    /// Scores pairs in input order, in forward passes cut by `batching`: the pairs are sorted by
    /// length (longest first) and each pass takes as many as fit `max_tokens` padded tokens (at most
    /// `max_pairs`), so little work goes to padding.
    pub fn score_with(&self, pairs: &[(&str, &str)], batching: Batching) -> Result<(Vec<f32>, BatchStats)> {
        let encoded: Vec<_> = pairs.iter().map(|(q, p)| self.tokenizer.encode_pair(q, p)).collect::<Result<_>>()?;
        let lengths: Vec<usize> = encoded.iter().map(|(ids, _)| ids.len()).collect();
        let mut out = vec![0f32; encoded.len()];
        let mut stats = BatchStats::default();
        for rows in plan_passes(&lengths, batching) {
            let b = self.tokenizer.pad(rows.iter().map(|&i| &encoded[i]), &self.device)?;
            let s = crate::layers::no_grad(|| {
                self.backbone.forward(&b.input_ids, &b.token_type_ids, &b.attention_mask, false)
            })?;
            for (k, score) in s.to_vec1::<f32>()?.into_iter().enumerate() {
                out[rows[k]] = score;
            }
            stats.record(&rows, &lengths);
        }
        Ok((out, stats))
    }
}

/// How scoring cuts pairs into forward passes.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_pairs: usize,
    /// Padded tokens per pass (pairs x longest pair).
    pub max_tokens: usize,
}

/// What scoring computed: forward passes, real tokens and tokens including padding.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchStats {
    pub passes: u64,
    pub tokens: u64,
    pub padded_tokens: u64,
}

/// Cuts items of the given token lengths into forward passes: longest first, each pass taking as
/// many as fit `max_tokens` padded tokens (at most `max_pairs`, at least one). Returns item indices.
pub fn plan_passes(lengths: &[usize], batching: Batching) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut passes = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let width = lengths[order[start]].max(1);
        let fit = (batching.max_tokens / width).clamp(1, batching.max_pairs.max(1));
        let end = (start + fit).min(order.len());
        passes.push(order[start..end].to_vec());
        start = end;
    }
    passes
}

impl BatchStats {
    /// Counts one pass over `rows` (indices into `lengths`), padded to its longest.
    pub fn record(&mut self, rows: &[usize], lengths: &[usize]) {
        let width = rows.iter().map(|&i| lengths[i]).max().unwrap_or(0);
        self.passes += 1;
        self.tokens += rows.iter().map(|&i| lengths[i] as u64).sum::<u64>();
        self.padded_tokens += (rows.len() * width) as u64;
    }
}
