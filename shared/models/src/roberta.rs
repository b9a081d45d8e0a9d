//! RoBERTa and XLM-RoBERTa for sequence classification, mirroring transformers'
//! `modeling_roberta.py` / `modeling_xlm_roberta.py` (the same model): the BERT encoder under
//! `roberta.` with positions counted from `padding_idx + 1` (`create_position_ids_from_input_ids`),
//! no pooler, and `RobertaClassificationHead` on the first token (`<s>`): dropout,
//! `classifier.dense`, tanh, dropout, `classifier.out_proj`.

use crate::bert::{BertConfig, Encoder};
use crate::head::DenseHead;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

pub struct RobertaCrossEncoder {
    pub config: BertConfig,
    encoder: Encoder,
    head: DenseHead,
}

impl RobertaCrossEncoder {
    /// The encoder under the head (hidden states, for bi-encoders).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }
}

impl RobertaCrossEncoder {
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        let padding_idx = config.pad_token_id.unwrap_or(1);
        let p = config.classifier_dropout.unwrap_or(config.hidden_dropout_prob);
        Ok(Self {
            encoder: Encoder::load(vb.pp("roberta"), config, h)?.with_roberta_positions(padding_idx),
            head: DenseHead::load(vb, h, "tanh", p)?,
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
