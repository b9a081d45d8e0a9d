//! The two-layer classification head ELECTRA and RoBERTa share (`ElectraClassificationHead`,
//! `RobertaClassificationHead`): on the first token, dropout, `classifier.dense`, an activation
//! (GELU for ELECTRA, tanh for RoBERTa), dropout, `classifier.out_proj` to one logit.

use crate::bert::{activation, first_token};
use crate::layers::{dropout, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

pub struct DenseHead {
    dense: Linear,
    out_proj: Linear,
    activation: &'static str,
    dropout: f64,
}

impl DenseHead {
    /// Weights `classifier.dense.*` and `classifier.out_proj.*` under `vb`.
    pub fn load(vb: VarBuilder, hidden: usize, activation: &'static str, dropout: f64) -> Result<Self> {
        Ok(Self {
            dense: Linear::load(vb.pp("classifier.dense"), hidden, hidden, true)?,
            out_proj: Linear::load(vb.pp("classifier.out_proj"), hidden, 1, true)?,
            activation,
            dropout,
        })
    }

    /// One f32 score per sequence of `hidden` [B, L, H].
    pub fn forward(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        let x = dropout(&first_token(hidden)?, self.dropout, train)?;
        let x = activation(self.activation, &self.dense.forward(&x)?)?;
        let logits = self.out_proj.forward(&dropout(&x, self.dropout, train)?)?;
        logits.squeeze(D::Minus1)?.to_dtype(DType::F32)
    }
}
