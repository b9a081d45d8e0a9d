//! ELECTRA (discriminator) for sequence classification, mirroring transformers'
//! `modeling_electra.py`: the BERT encoder under `electra.` (with `embeddings_project` when
//! `embedding_size` != `hidden_size`), and `ElectraClassificationHead` on the first token:
//! dropout, `classifier.dense`, GELU, dropout, `classifier.out_proj`.

use crate::bert::{activation, first_token, BertConfig, Encoder};
use crate::layers::{dropout, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Debug, Clone, serde::Deserialize)]
pub struct ElectraConfig {
    #[serde(flatten)]
    pub bert: BertConfig,
    #[serde(default)]
    pub embedding_size: Option<usize>,
}

pub struct ElectraCrossEncoder {
    pub config: ElectraConfig,
    encoder: Encoder,
    dense: Linear,
    out_proj: Linear,
}

impl ElectraCrossEncoder {
    pub fn load(vb: VarBuilder, config: &ElectraConfig) -> Result<Self> {
        let h = config.bert.hidden_size;
        Ok(Self {
            encoder: Encoder::load(vb.pp("electra"), &config.bert, config.embedding_size.unwrap_or(h))?,
            dense: Linear::load(vb.pp("classifier.dense"), h, h, true)?,
            out_proj: Linear::load(vb.pp("classifier.out_proj"), h, 1, true)?,
            config: config.clone(),
        })
    }

    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let cfg = &self.config.bert;
        let x = self.encoder.forward(input_ids, token_type_ids, attention_mask, train)?;
        let p = cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob);
        let x = dropout(&first_token(&x)?, p, train)?;
        let x = activation("gelu", &self.dense.forward(&x)?)?;
        let logits = self.out_proj.forward(&dropout(&x, p, train)?)?;
        logits.squeeze(D::Minus1)?.to_dtype(DType::F32)
    }
}
