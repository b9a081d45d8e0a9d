//! BERT (and MiniLM) for sequence classification with one label, mirroring transformers'
//! `modeling_bert.py`: embeddings (word + position + token type, LayerNorm, dropout), post-LN
//! encoder layers, tanh pooler on [CLS], linear `classifier`.

use crate::kernels::{
    flash_attention_for_scoring, flash_attention_for_scoring_packed, flash_attention_for_training,
    flash_attention_for_training_packed,
};
use crate::layers::{composite_attention, dropout, Embedding, LayerNorm, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Debug, Clone, serde::Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

pub(crate) fn activation(name: &str, x: &Tensor) -> Result<Tensor> {
    match name {
        "gelu" => crate::kernels::gelu_erf(x),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => x.gelu(),
        "relu" => x.relu(),
        "tanh" => x.tanh(),
        other => candle_core::bail!("unsupported hidden_act '{other}'"),
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// The BERT encoder (embeddings and layers), shared by BERT and ELECTRA.
pub struct Encoder {
    config: BertConfig,
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    /// ELECTRA: embeddings narrower than the hidden size are projected up.
    project: Option<Linear>,
    /// RoBERTa / XLM-R: positions count real tokens from `padding_idx + 1`; padding gets
    /// `padding_idx` (transformers' `create_position_ids_from_input_ids`).
    position_padding_idx: Option<u32>,
    layers: Vec<Layer>,
}

pub struct BertCrossEncoder {
    pub config: BertConfig,
    encoder: Encoder,
    pooler: Linear,
    classifier: Linear,
}

impl Encoder {
    /// Weights under `vb` with HF's names (`embeddings.*`, `encoder.layer.N.*`, and
    /// `embeddings_project` when `embedding_size` differs from the hidden size).
    pub fn load(vb: VarBuilder, config: &BertConfig, embedding_size: usize) -> Result<Self> {
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let e = vb.pp("embeddings");
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            layers.push(Layer {
                query: Linear::load(l.pp("attention.self.query"), h, h, true)?,
                key: Linear::load(l.pp("attention.self.key"), h, h, true)?,
                value: Linear::load(l.pp("attention.self.value"), h, h, true)?,
                attn_out: Linear::load(l.pp("attention.output.dense"), h, h, true)?,
                attn_norm: LayerNorm::load(l.pp("attention.output.LayerNorm"), h, eps, true)?,
                intermediate: Linear::load(l.pp("intermediate.dense"), h, config.intermediate_size, true)?,
                output: Linear::load(l.pp("output.dense"), config.intermediate_size, h, true)?,
                out_norm: LayerNorm::load(l.pp("output.LayerNorm"), h, eps, true)?,
            });
        }
        let project = if embedding_size != h {
            Some(Linear::load(vb.pp("embeddings_project"), embedding_size, h, true)?)
        } else {
            None
        };
        Ok(Self {
            word: Embedding::load(e.pp("word_embeddings"), config.vocab_size, embedding_size)?,
            position: Embedding::load(e.pp("position_embeddings"), config.max_position_embeddings, embedding_size)?,
            token_type: Embedding::load(e.pp("token_type_embeddings"), config.type_vocab_size, embedding_size)?,
            emb_norm: LayerNorm::load(e.pp("LayerNorm"), embedding_size, eps, true)?,
            project,
            position_padding_idx: None,
            layers,
            config: config.clone(),
        })
    }

    /// Positions as RoBERTa numbers them (see `position_padding_idx`).
    pub fn with_roberta_positions(mut self, padding_idx: u32) -> Self {
        self.position_padding_idx = Some(padding_idx);
        self
    }

    /// Hidden states [B, L, H]: `input_ids`, `token_type_ids` [B, L] u32, `attention_mask`
    /// [B, L] (1 token, 0 padding). Dropout is active when `train`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.run(input_ids, token_type_ids, attention_mask, train, false)
    }

    /// The first token's hidden state only, [B, 1, H] (what a cross-encoder's head reads), equal
    /// to `forward`'s first row: the last layer needs every token's key and value but only the
    /// first token's query, attention, output projection, norms and feed-forward, so it runs
    /// those on one row per sequence instead of L (about 5/6 of the last layer's work saved:
    /// 14% of MiniLM-L6's matmuls, 7% of BERT-base's). Gradients flow as through `forward`.
    pub fn forward_first_token(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let first_only = crate::layers::first_token_only_on();
        let x = self.run(input_ids, token_type_ids, attention_mask, train, first_only)?;
        if first_only {
            Ok(x)
        } else {
            x.narrow(1, 0, 1)
        }
    }

    fn run(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
        first_only: bool,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (bsz, len) = input_ids.dims2()?;
        let positions = match self.position_padding_idx {
            None => Tensor::arange(0u32, len as u32, input_ids.device())?.unsqueeze(0)?.broadcast_as((bsz, len))?,
            Some(pad) => {
                let real = attention_mask.to_dtype(DType::F32)?;
                ((real.cumsum(1)? * &real)? + pad as f64)?.to_dtype(DType::U32)?
            }
        };
        let positions = positions.contiguous()?;
        let rows = [(&self.word, input_ids), (&self.position, &positions), (&self.token_type, token_type_ids)];
        let mut x = dropout(&self.emb_norm.embed(&rows)?, cfg.hidden_dropout_prob, train)?;
        if let Some(project) = &self.project {
            x = project.forward(&x)?;
        }
        // Padding keys get a very negative bias: exp of it is 0, as with transformers' dtype-min mask.
        let dtype = x.dtype();
        let bias = attention_mask.to_dtype(dtype)?.affine(1e9, -1e9)?.reshape((bsz, 1, 1, len))?;
        let heads = cfg.num_attention_heads;
        let head_dim = cfg.hidden_size / heads;
        // The weights' dtype: where matmuls run (bf16 under mixed precision, activations in f32).
        let compute = crate::layers::compute_dtype(self.word.dtype());
        let scale = 1.0 / (head_dim as f64).sqrt();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            // Weights are variables, so every op records its inputs for backprop; under no_grad,
            // cutting the graph at each layer frees the previous layer's activations.
            if !crate::layers::grad_enabled() {
                x = x.detach();
            }
            let heads_of = |t: Tensor, rows: usize| -> Result<Tensor> {
                t.reshape((bsz, rows, heads, head_dim))?.transpose(1, 2)?.contiguous()
            };
            if first_only && i == last {
                // Keys and values of every token, the query of the first: [B, heads, 1, D].
                let kv = Linear::concat(&[&layer.key, &layer.value])?
                    .forward(&x)?
                    .reshape((bsz, len, 2, heads, head_dim))?;
                let split =
                    |i: usize| -> Result<Tensor> { kv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous() };
                let (k, v) = (split(0)?, split(1)?);
                let first = x.narrow(1, 0, 1)?.contiguous()?;
                let q = heads_of(layer.query.forward(&first)?, 1)?;
                let p = cfg.attention_probs_dropout_prob;
                let ctx = composite_attention(&q, &k, &v, &bias, scale, compute, (p, train))?;
                x = self.feed_forward(layer, &ctx, &first, train)?;
                break;
            }
            // Query, key and value as one product [B, L, 3 H]; for scoring in bf16 and for
            // training under autocast the attention kernel reads it as it is (the bias added as
            // it loads; in training the backward writes the product's gradient joined), else it
            // is split into heads [B, heads, L, D].
            let joined = Linear::concat(&[&layer.query, &layer.key, &layer.value])?;
            let grad = train || crate::layers::grad_enabled();
            if grad && crate::kernels::flash_training_packed_on(&x, head_dim) {
                let p = cfg.attention_probs_dropout_prob;
                let drop = (train && p > 0.0).then(|| (p, crate::layers::dropout_seed()));
                let product = joined.product(&x)?;
                let ctx = flash_attention_for_training_packed(
                    &product,
                    joined.bias(),
                    &bias,
                    heads,
                    scale,
                    None,
                    drop,
                    None,
                )?;
                x = self.feed_forward(layer, &ctx, &x, train)?;
                continue;
            }
            if !train && crate::kernels::flash_scoring_packed_on(&x, head_dim) {
                let ctx = flash_attention_for_scoring_packed(
                    &joined.product(&x)?,
                    joined.bias(),
                    &bias,
                    heads,
                    scale,
                    None,
                    None,
                )?;
                x = self.feed_forward(layer, &ctx, &x, train)?;
                continue;
            }
            let qkv = joined.forward(&x)?.reshape((bsz, len, 3, heads, head_dim))?;
            let split = |i: usize| -> Result<Tensor> { qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous() };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            // Flash-style attention where it applies (training under autocast, scoring in bf16:
            // kernels::flash_attention_for_*), else the products and the masked softmax.
            let flash = if grad {
                let p = cfg.attention_probs_dropout_prob;
                let drop = (train && p > 0.0).then(|| (p, crate::layers::dropout_seed()));
                flash_attention_for_training(&q, &k, &v, &bias, scale, None, drop)?
            } else {
                flash_attention_for_scoring(&q, &k, &v, &bias, scale, None)?
            };
            let ctx = match flash {
                Some(ctx) => ctx,
                None => {
                    let p = cfg.attention_probs_dropout_prob;
                    composite_attention(&q, &k, &v, &bias, scale, compute, (p, train))?
                }
            };
            x = self.feed_forward(layer, &ctx, &x, train)?;
        }
        Ok(x)
    }

    /// The rest of a layer after attention (see [`post_ln_block`]).
    fn feed_forward(&self, layer: &Layer, ctx: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        let cfg = &self.config;
        let block = PostLn {
            attn_out: &layer.attn_out,
            attn_norm: &layer.attn_norm,
            intermediate: &layer.intermediate,
            output: &layer.output,
            out_norm: &layer.out_norm,
        };
        post_ln_block(&block, &cfg.hidden_act, cfg.hidden_dropout_prob, ctx, residual, train)
    }
}

/// The part of a post-LN transformer layer after attention (BERT, ELECTRA, RoBERTa, DeBERTa).
pub(crate) struct PostLn<'a> {
    pub attn_out: &'a Linear,
    pub attn_norm: &'a LayerNorm,
    pub intermediate: &'a Linear,
    pub output: &'a Linear,
    pub out_norm: &'a LayerNorm,
}

/// The output projection of the attention's context `ctx`, the residual and its norm, the
/// feed-forward block, its residual and norm; `ctx` and `residual` (the layer's input) [B, rows,
/// H]. Scoring in bf16 puts each linear layer's bias into the kernel after its product (the
/// residual and the norm; GELU) where `kernels::scoring_epilogues_on` holds.
pub(crate) fn post_ln_block(
    l: &PostLn,
    hidden_act: &str,
    dropout_p: f64,
    ctx: &Tensor,
    residual: &Tensor,
    train: bool,
) -> Result<Tensor> {
    if !train && crate::kernels::scoring_epilogues_on(ctx) {
        let attn = l.attn_norm.add_norm(&l.attn_out.product(ctx)?, l.attn_out.bias(), residual)?;
        let inter = match (hidden_act, l.intermediate.bias()) {
            // The product, bias and GELU as one cuBLASLt call where that runs, else the product
            // then one kernel for the bias and GELU.
            ("gelu", Some(b)) => match crate::kernels::matmul_bias_gelu_for_scoring(&attn, l.intermediate.weight(), b)?
            {
                Some(inter) => inter,
                None => crate::kernels::bias_gelu_for_scoring(&l.intermediate.product(&attn)?, b)?,
            },
            _ => activation(hidden_act, &l.intermediate.forward(&attn)?)?,
        };
        return l.out_norm.add_norm(&l.output.product(&inter)?, l.output.bias(), &attn);
    }
    // Each linear layer's product, then its bias, dropout, the residual and the norm (one kernel
    // each way in training under autocast: LayerNorm::add_norm_for_training). The context is
    // bf16 from the packed training attention.
    let attn =
        l.attn_norm.add_norm_for_training(&l.attn_out.product(ctx)?, l.attn_out.bias(), residual, dropout_p, train)?;
    let inter = match (hidden_act, l.intermediate.bias()) {
        // Training under autocast: the bias and GELU on the bf16 product in one kernel, its bf16
        // output the next product's input as it is.
        ("gelu", Some(b)) if crate::kernels::bias_gelu_for_training_on(&attn, b) => {
            crate::kernels::bias_gelu_for_training(&l.intermediate.product(&attn)?, b)?
        }
        _ => activation(hidden_act, &l.intermediate.forward(&attn)?)?,
    };
    l.out_norm.add_norm_for_training(&l.output.product(&inter)?, l.output.bias(), &attn, dropout_p, train)
}

/// The first token's hidden state, [B, H].
pub fn first_token(hidden: &Tensor) -> Result<Tensor> {
    hidden.narrow(1, 0, 1)?.squeeze(1)?.contiguous()
}

impl BertCrossEncoder {
    /// The encoder under the head (hidden states, for bi-encoders).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// Creates (or looks up) every weight under its HF name: `bert.*` and `classifier.*`.
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            encoder: Encoder::load(vb.pp("bert"), config, h)?,
            pooler: Linear::load(vb.pp("bert.pooler.dense"), h, h, true)?,
            classifier: Linear::load(vb.pp("classifier"), h, 1, true)?,
            config: config.clone(),
        })
    }

    /// One score per pair (see [`Encoder::forward`] for the inputs).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let x = self.encoder.forward_first_token(input_ids, token_type_ids, attention_mask, train)?;
        let pooled = self.pooler.forward(&first_token(&x)?)?.tanh()?;
        let p = self.config.classifier_dropout.unwrap_or(self.config.hidden_dropout_prob);
        let logits = self.classifier.forward(&dropout(&pooled, p, train)?)?;
        logits.squeeze(D::Minus1)?.to_dtype(DType::F32)
    }
}
