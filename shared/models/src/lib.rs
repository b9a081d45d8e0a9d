//! Cross-encoder backbones, written from differentiable candle ops only (candle-transformers'
//! fused softmax / layer norm / rotary ops have no backward; `kernels` has fused CPU ones that do), keeping Hugging Face weight names so
//! that `*ForSequenceClassification` checkpoints load and save without renaming.
//!
//! Architectures, one file each, dispatched on `config.json`'s `model_type`: BERT (covers
//! MiniLM), ELECTRA, RoBERTa / XLM-RoBERTa, DeBERTa-v2/v3, ModernBERT.

pub mod alloc;
pub mod bert;
pub mod bi_encoder;
pub mod checkpoint;
pub mod cross_encoder;
pub mod deberta;
pub mod device;
pub mod electra;
pub mod gguf_llm;
pub mod head;
pub mod kernels;
pub mod layers;
pub mod modernbert;
pub mod optim;
pub mod roberta;
pub mod tokenize;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub use bi_encoder::BiEncoder;
pub use cross_encoder::{BatchStats, Batching, CrossEncoder};
pub use device::{device_name, parse_device, parse_precision};

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
