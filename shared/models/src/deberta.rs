//! DeBERTa-v2/v3 for sequence classification, mirroring transformers' `modeling_deberta_v2.py`:
//! embeddings (word; position only with `position_biased_input`; token types only when
//! `type_vocab_size` > 0; `embed_proj` when `embedding_size` differs) times the attention mask,
//! post-norm layers with disentangled attention — content→content, content→position (c2p) and
//! position→content (p2c) scores over log-bucketed relative positions
//! (`make_log_bucket_position`), relative embeddings normalised by the encoder's `LayerNorm`
//! (`norm_rel_ebd`), keys shared with the content projections (`share_att_key`), all scaled by
//! `sqrt(head_dim * (1 + #pos types))` — then `ContextPooler` (first token, dense, activation) and
//! `classifier`. Gathers are differentiable (`gather`'s backward scatters).

use crate::bert::{activation, first_token};
use crate::kernels::masked_softmax;
use crate::layers::{dropout, matmul_in, Embedding, LayerNorm, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Debug, Clone, serde::Deserialize)]
pub struct DebertaV2Config {
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
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub relative_attention: bool,
    #[serde(default = "default_neg")]
    pub max_relative_positions: i64,
    #[serde(default = "default_neg")]
    pub position_buckets: i64,
    #[serde(default)]
    pub pos_att_type: Option<serde_json::Value>,
    #[serde(default)]
    pub share_att_key: bool,
    #[serde(default = "default_true")]
    pub position_biased_input: bool,
    #[serde(default)]
    pub norm_rel_ebd: Option<String>,
    #[serde(default)]
    pub embedding_size: Option<usize>,
    #[serde(default)]
    pub pooler_hidden_size: Option<usize>,
    #[serde(default = "default_act")]
    pub pooler_hidden_act: String,
    #[serde(default)]
    pub pooler_dropout: f64,
    #[serde(default)]
    pub cls_dropout: Option<f64>,
    #[serde(default)]
    pub conv_kernel_size: usize,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_max_pos() -> usize {
    512
}
fn default_eps() -> f64 {
    1e-7
}
fn default_neg() -> i64 {
    -1
}
fn default_true() -> bool {
    true
}

impl DebertaV2Config {
    /// `pos_att_type`, given as a list or a `|`-separated string.
    fn pos_types(&self) -> Vec<String> {
        match &self.pos_att_type {
            Some(serde_json::Value::Array(v)) => {
                v.iter().filter_map(|x| x.as_str()).map(|s| s.trim().to_lowercase()).collect()
            }
            Some(serde_json::Value::String(s)) => s.split('|').map(|s| s.trim().to_lowercase()).collect(),
            _ => vec![],
        }
    }

    fn max_relative(&self) -> i64 {
        if self.max_relative_positions < 1 {
            self.max_position_embeddings as i64
        } else {
            self.max_relative_positions
        }
    }

    /// Half the number of relative embeddings (`att_span`).
    fn span(&self) -> i64 {
        if self.position_buckets > 0 {
            self.position_buckets
        } else {
            self.max_relative()
        }
    }
}

/// transformers' `make_log_bucket_position` for one relative position.
fn log_bucket(rel: i64, bucket_size: i64, max_position: i64) -> i64 {
    let mid = bucket_size / 2;
    let abs = if rel < mid && rel > -mid { mid - 1 } else { rel.abs() };
    if abs <= mid {
        return rel;
    }
    let log_pos = ((abs as f64 / mid as f64).ln() / ((max_position - 1) as f64 / mid as f64).ln() * (mid - 1) as f64)
        .ceil() as i64
        + mid;
    log_pos * rel.signum()
}

/// Relative positions `i - j` of an `len`-token sequence, bucketed, as [len, len].
fn relative_positions(len: usize, cfg: &DebertaV2Config) -> Vec<i64> {
    let mut out = Vec::with_capacity(len * len);
    for i in 0..len as i64 {
        for j in 0..len as i64 {
            let rel = i - j;
            out.push(if cfg.position_buckets > 0 {
                log_bucket(rel, cfg.position_buckets, cfg.max_relative())
            } else {
                rel
            });
        }
    }
    out
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    pos_key: Option<Linear>,
    pos_query: Option<Linear>,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

pub struct DebertaV2CrossEncoder {
    pub config: DebertaV2Config,
    word: Embedding,
    position: Option<Embedding>,
    token_type: Option<Embedding>,
    embed_proj: Option<Linear>,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    rel_embeddings: Option<Embedding>,
    rel_norm: Option<LayerNorm>,
    pooler: Linear,
    classifier: Linear,
}

impl DebertaV2CrossEncoder {
    pub fn load(vb: VarBuilder, config: &DebertaV2Config) -> Result<Self> {
        if config.conv_kernel_size > 0 {
            candle_core::bail!("DeBERTa with a convolution layer (conv_kernel_size > 0) is not supported");
        }
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let e_size = config.embedding_size.unwrap_or(h);
        let d = vb.pp("deberta");
        let e = d.pp("embeddings");
        let types = config.pos_types();
        let separate = !config.share_att_key && config.relative_attention;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = d.pp(format!("encoder.layer.{i}"));
            let s = l.pp("attention.self");
            layers.push(Layer {
                query: Linear::load(s.pp("query_proj"), h, h, true)?,
                key: Linear::load(s.pp("key_proj"), h, h, true)?,
                value: Linear::load(s.pp("value_proj"), h, h, true)?,
                pos_key: if separate && types.iter().any(|t| t == "c2p") {
                    Some(Linear::load(s.pp("pos_key_proj"), h, h, true)?)
                } else {
                    None
                },
                pos_query: if separate && types.iter().any(|t| t == "p2c") {
                    Some(Linear::load(s.pp("pos_query_proj"), h, h, true)?)
                } else {
                    None
                },
                attn_out: Linear::load(l.pp("attention.output.dense"), h, h, true)?,
                attn_norm: LayerNorm::load(l.pp("attention.output.LayerNorm"), h, eps, true)?,
                intermediate: Linear::load(l.pp("intermediate.dense"), h, config.intermediate_size, true)?,
                output: Linear::load(l.pp("output.dense"), config.intermediate_size, h, true)?,
                out_norm: LayerNorm::load(l.pp("output.LayerNorm"), h, eps, true)?,
            });
        }
        let norm_rel = config
            .norm_rel_ebd
            .as_deref()
            .unwrap_or("none")
            .to_lowercase()
            .split('|')
            .any(|s| s.trim() == "layer_norm");
        let pooler_size = config.pooler_hidden_size.unwrap_or(h);
        Ok(Self {
            word: Embedding::load(e.pp("word_embeddings"), config.vocab_size, e_size)?,
            position: if config.position_biased_input {
                Some(Embedding::load(e.pp("position_embeddings"), config.max_position_embeddings, e_size)?)
            } else {
                None
            },
            token_type: if config.type_vocab_size > 0 {
                Some(Embedding::load(e.pp("token_type_embeddings"), config.type_vocab_size, e_size)?)
            } else {
                None
            },
            embed_proj: if e_size != h { Some(Linear::load(e.pp("embed_proj"), e_size, h, false)?) } else { None },
            emb_norm: LayerNorm::load(e.pp("LayerNorm"), h, eps, true)?,
            layers,
            rel_embeddings: if config.relative_attention {
                Some(Embedding::load(d.pp("encoder.rel_embeddings"), 2 * config.span() as usize, h)?)
            } else {
                None
            },
            rel_norm: if config.relative_attention && norm_rel {
                Some(LayerNorm::load(d.pp("encoder.LayerNorm"), h, eps, true)?)
            } else {
                None
            },
            pooler: Linear::load(vb.pp("pooler.dense"), pooler_size, pooler_size, true)?,
            classifier: Linear::load(vb.pp("classifier"), pooler_size, 1, true)?,
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
        let cfg = &self.config;
        let (bsz, len) = input_ids.dims2()?;
        let dev = input_ids.device();
        let heads = cfg.num_attention_heads;
        let hd = cfg.hidden_size / heads;
        let compute = crate::layers::compute_dtype(self.word.dtype());

        let pos = match &self.position {
            Some(_) => {
                Some(Tensor::arange(0u32, len as u32, dev)?.unsqueeze(0)?.broadcast_as((bsz, len))?.contiguous()?)
            }
            None => None,
        };
        let mut rows = vec![(&self.word, input_ids)];
        if let (Some(p), Some(pos)) = (&self.position, &pos) {
            rows.push((p, pos));
        }
        if let Some(t) = &self.token_type {
            rows.push((t, token_type_ids));
        }
        let normed = match &self.embed_proj {
            Some(proj) => self.emb_norm.forward(&proj.forward(&crate::layers::sum_embeddings(&rows)?)?)?,
            None => self.emb_norm.embed(&rows)?,
        };
        let mask_f = attention_mask.to_dtype(DType::F32)?;
        let x = normed.broadcast_mul(&mask_f.to_dtype(normed.dtype())?.unsqueeze(2)?)?;
        let mut x = dropout(&x, cfg.hidden_dropout_prob, train)?;

        let types = cfg.pos_types();
        let (c2p, p2c) = (types.iter().any(|t| t == "c2p"), types.iter().any(|t| t == "p2c"));
        let scale = ((hd * (1 + c2p as usize + p2c as usize)) as f64).sqrt();
        let bias = mask_f.affine(1e9, -1e9)?.reshape((bsz, 1, 1, len))?;
        let rel = match &self.rel_embeddings {
            Some(r) => {
                let table = r.table().clone();
                let table = match &self.rel_norm {
                    Some(n) => n.forward(&table)?,
                    None => table,
                };
                Some(dropout(&table, cfg.hidden_dropout_prob, train)?)
            }
            None => None,
        };
        let span = cfg.span();
        // The relative-position buckets [L, L] for c2p and p2c; broadcast over batch and heads
        // (the gathers want them whole) only where the composite runs.
        let index = |sign: i64| -> Result<Tensor> {
            let ids: Vec<u32> =
                relative_positions(len, cfg).iter().map(|r| (sign * r + span).clamp(0, 2 * span - 1) as u32).collect();
            Tensor::from_vec(ids, (len, len), dev)
        };
        let (c2p_buckets, p2c_buckets) = (index(1)?, index(-1)?);
        let whole = std::cell::OnceCell::new();
        let gather_indices = || -> Result<(Tensor, Tensor)> {
            if let Some(w) = whole.get() {
                return Ok(Clone::clone(w));
            }
            let full = |t: &Tensor| t.reshape((1, 1, len, len))?.broadcast_as((bsz, heads, len, len))?.contiguous();
            let w = (full(&c2p_buckets)?, full(&p2c_buckets)?);
            Ok(whole.get_or_init(|| w).clone())
        };

        // Only the first token's final state is read (the pooler's): the last layer needs every
        // token's key and value but the query, attention and the rest for the first token only
        // (row 0 of the relative-position indices).
        let last = if crate::layers::first_token_only_on() { self.layers.len().saturating_sub(1) } else { usize::MAX };
        for (i, layer) in self.layers.iter().enumerate() {
            if !crate::layers::grad_enabled() {
                x = x.detach();
            }
            let split = |t: Tensor, n: usize| -> Result<Tensor> {
                t.reshape((n, len_of(&t)?, heads, hd))?.transpose(1, 2)?.contiguous()
            };
            let first_only = i == last;
            let residual = if first_only { x.narrow(1, 0, 1)?.contiguous()? } else { x.clone() };
            let rows = residual.dim(1)?;
            let q = split(layer.query.forward(&residual)?, bsz)?;
            let k = split(layer.key.forward(&x)?, bsz)?;
            let v = split(layer.value.forward(&x)?, bsz)?;
            // From the attention probabilities on: their product with v, the heads merged, the
            // post-LN block.
            let rest_of_layer = |probs: &Tensor| -> Result<Tensor> {
                let ctx = matmul_in(probs, &v, compute)?.transpose(1, 2)?.contiguous()?.reshape((
                    bsz,
                    rows,
                    cfg.hidden_size,
                ))?;
                let block = crate::bert::PostLn {
                    attn_out: &layer.attn_out,
                    attn_norm: &layer.attn_norm,
                    intermediate: &layer.intermediate,
                    output: &layer.output,
                    out_norm: &layer.out_norm,
                };
                crate::bert::post_ln_block(&block, &cfg.hidden_act, cfg.hidden_dropout_prob, &ctx, &residual, train)
            };
            // Both relative terms, scoring in bf16 or training under autocast: the three products in
            // bf16 and the probabilities from one kernel (it gathers, adds, scales and normalises;
            // in training with dropout inside and a backward kernel: kernels::deberta_probs_for_*).
            let training = crate::kernels::deberta_probs_for_training_on(&q);
            let fit = crate::kernels::deberta_probs_fit(len, 2 * span as usize);
            if let (Some(rel), true, true) = (&rel, c2p && p2c && fit, training || crate::kernels::deberta_probs_on(&q))
            {
                let bf16 = |t: &Tensor| t.to_dtype(DType::BF16);
                let proj = |l: &Linear| -> Result<Tensor> { bf16(&split(l.forward(&rel.unsqueeze(0)?)?, 1)?) };
                let (pos_key, pos_query) = (
                    proj(layer.pos_key.as_ref().unwrap_or(&layer.key))?,
                    proj(layer.pos_query.as_ref().unwrap_or(&layer.query))?,
                );
                let (qb, kb) = (bf16(&q)?, bf16(&k)?);
                let by_positions = |x: &Tensor, p: &Tensor| {
                    x.matmul(&p.broadcast_as((bsz, heads, 2 * span as usize, hd))?.t()?.contiguous()?)
                };
                let qk = qb.matmul(&bf16(&k.t()?)?)?;
                let (c2p_att, p2c_att) = (by_positions(&qb, &pos_key)?, by_positions(&kb, &pos_query)?);
                let (cb, pb) = (&c2p_buckets, &p2c_buckets);
                let probs = if training {
                    let p = cfg.attention_probs_dropout_prob;
                    let drop = (train && p > 0.0).then(|| (p, crate::layers::dropout_seed()));
                    Some(crate::kernels::deberta_probs_for_training(
                        &qk, &c2p_att, &p2c_att, cb, pb, &bias, scale, drop,
                    )?)
                } else {
                    crate::kernels::deberta_probs_for_scoring(&qk, &c2p_att, &p2c_att, cb, pb, &bias, scale)?
                };
                if let Some(probs) = probs {
                    x = rest_of_layer(&probs)?;
                    continue;
                }
            }
            let (c2p_index, p2c_index) = gather_indices()?;
            let mut scores = (matmul_in(&q, &k.t()?, compute)? / scale)?;
            if let Some(rel) = &rel {
                // [1, heads, 2 span, hd]
                let proj = |l: &Linear| -> Result<Tensor> { split(l.forward(&rel.unsqueeze(0)?)?, 1) };
                if c2p {
                    let pos_key = proj(layer.pos_key.as_ref().unwrap_or(&layer.key))?;
                    let att = matmul_in(
                        &q,
                        &pos_key.broadcast_as((bsz, heads, 2 * span as usize, hd))?.t()?.contiguous()?,
                        compute,
                    )?;
                    let index = if first_only { c2p_index.narrow(2, 0, 1)?.contiguous()? } else { c2p_index.clone() };
                    scores = (scores + (att.contiguous()?.gather(&index, D::Minus1)? / scale)?)?;
                }
                if p2c {
                    let pos_query = proj(layer.pos_query.as_ref().unwrap_or(&layer.query))?;
                    let att = matmul_in(
                        &k,
                        &pos_query.broadcast_as((bsz, heads, 2 * span as usize, hd))?.t()?.contiguous()?,
                        compute,
                    )?;
                    // Row i of the result reads att[j, p2c_index[j, i]]: for the first row alone
                    // the index's first column.
                    let index = if first_only { p2c_index.narrow(3, 0, 1)?.contiguous()? } else { p2c_index.clone() };
                    let att = att.contiguous()?.gather(&index, D::Minus1)?.transpose(2, 3)?;
                    scores = (scores + (att / scale)?)?;
                }
            }
            let probs = dropout(&masked_softmax(&scores, &bias, 1.0)?, cfg.attention_probs_dropout_prob, train)?;
            x = rest_of_layer(&probs)?;
        }
        let cls = dropout(&first_token(&x)?, cfg.pooler_dropout, train)?;
        let pooled = activation(&cfg.pooler_hidden_act, &self.pooler.forward(&cls)?)?;
        let p = cfg.cls_dropout.unwrap_or(cfg.hidden_dropout_prob);
        let logits = self.classifier.forward(&dropout(&pooled, p, train)?)?;
        logits.squeeze(D::Minus1)?.to_dtype(DType::F32)
    }
}

fn len_of(t: &Tensor) -> Result<usize> {
    t.dim(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_buckets_match_transformers() {
        // transformers' make_log_bucket_position on the same inputs (printed with torch).
        let rel = [0, 5, -5, 127, -127, 128, -128, 129, 200, 300, -300, 511, -511, 1000];
        let want = [0, 5, -5, 127, -127, 128, -128, 129, 169, 207, -207, 255, -255, 317];
        assert_eq!(rel.map(|r| super::log_bucket(r, 256, 512)), want);
        let rel = [0, 3, -3, 4, 5, -6, 9, 20, -20, 40];
        let want = [0, 3, -3, 4, 5, -5, 5, 6, -6, 7];
        assert_eq!(rel.map(|r| super::log_bucket(r, 8, 64)), want);
    }
}
