//! ELECTRA (discriminator) for sequence classification, mirroring transformers'
//! `modeling_electra.py`: the BERT encoder under `electra.` (with `embeddings_project` when
//! `embedding_size` != `hidden_size`), and `ElectraClassificationHead` on the first token:
//! dropout, `classifier.dense`, GELU, dropout, `classifier.out_proj`.

use crate::bert::{BertConfig, Encoder};
use crate::head::DenseHead;
use candle_core::{Result, Tensor};
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
    head: DenseHead,
}

impl ElectraCrossEncoder {
    pub fn load(vb: VarBuilder, config: &ElectraConfig) -> Result<Self> {
        let h = config.bert.hidden_size;
        let p = config.bert.classifier_dropout.unwrap_or(config.bert.hidden_dropout_prob);
        Ok(Self {
            encoder: Encoder::load(vb.pp("electra"), &config.bert, config.embedding_size.unwrap_or(h))?,
            head: DenseHead::load(vb, h, "gelu", p)?,
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
        self.head.forward(&self.encoder.forward_first_token(input_ids, token_type_ids, attention_mask, train)?, train)
    }
}
