//! ModernBERT for sequence classification, mirroring transformers' `modeling_modernbert.py`:
//! token embeddings + norm (no position embeddings), pre-norm layers (the first without an
//! attention norm) with a fused `Wqkv`, rotary embeddings (`rope_theta` per layer type), attention
//! that alternates between global and a sliding window (`|i - j| <= local_attention / 2`), a GeGLU
//! MLP (`Wi` -> input, gate; `act(input) * gate` -> `Wo`), no biases by default, a final norm, and
//! the classification head: CLS or mean pooling, `head.dense`, activation, `head.norm`, dropout,
//! `classifier`. Rotary and softmax are composed of differentiable ops.

use crate::bert::activation;
use crate::kernels::{flash_attention_for_scoring, flash_attention_for_training};
use crate::layers::{composite_attention, dropout, Embedding, LayerNorm, Linear};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Debug, Clone, serde::Deserialize)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub norm_bias: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub classifier_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_activation: String,
    #[serde(default = "default_act")]
    pub classifier_activation: String,
    #[serde(default = "default_pooling")]
    pub classifier_pooling: String,
    #[serde(default)]
    pub embedding_dropout: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub mlp_dropout: f64,
    #[serde(default)]
    pub classifier_dropout: f64,
    #[serde(default = "default_local")]
    pub local_attention: usize,
    #[serde(default = "default_every")]
    pub global_attn_every_n_layers: usize,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub global_rope_theta: Option<f64>,
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu".into()
}
fn default_pooling() -> String {
    "cls".into()
}
fn default_local() -> usize {
    128
}
fn default_every() -> usize {
    3
}

impl ModernBertConfig {
    fn sliding(&self, layer: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(layer).is_some_and(|t| t == "sliding_attention"),
            None => !layer.is_multiple_of(self.global_attn_every_n_layers.max(1)),
        }
    }

    /// RoPE base of full (global) and sliding (local) layers.
    fn thetas(&self) -> (f64, f64) {
        let from = |kind: &str| self.rope_parameters.as_ref().and_then(|p| p[kind]["rope_theta"].as_f64());
        (
            from("full_attention").or(self.global_rope_theta).unwrap_or(160_000.0),
            from("sliding_attention").or(self.local_rope_theta).unwrap_or(10_000.0),
        )
    }
}

struct Layer {
    attn_norm: Option<LayerNorm>,
    wqkv: Linear,
    wo: Linear,
    mlp_norm: LayerNorm,
    wi: Linear,
    mlp_wo: Linear,
    sliding: bool,
}

pub struct ModernBertCrossEncoder {
    pub config: ModernBertConfig,
    embeddings: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    head_dense: Linear,
    head_norm: LayerNorm,
    classifier: Linear,
}

/// `[cos, sin]` of rotary embeddings for positions 0..len, [len, head_dim] each (f32).
pub(crate) fn rotary(len: usize, head_dim: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> =
        (0..head_dim / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32).collect();
    let inv = Tensor::from_vec(inv, (1, head_dim / 2), device)?;
    let pos = Tensor::arange(0u32, len as u32, device)?.to_dtype(DType::F32)?.reshape((len, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    let emb = Tensor::cat(&[&freqs, &freqs], 1)?;
    Ok((emb.cos()?, emb.sin()?))
}

impl ModernBertCrossEncoder {
    pub fn load(vb: VarBuilder, config: &ModernBertConfig) -> Result<Self> {
        let (h, eps, nb) = (config.hidden_size, config.norm_eps, config.norm_bias);
        let m = vb.pp("model");
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = m.pp(format!("layers.{i}"));
            layers.push(Layer {
                attn_norm: if i == 0 { None } else { Some(LayerNorm::load(l.pp("attn_norm"), h, eps, nb)?) },
                wqkv: Linear::load(l.pp("attn.Wqkv"), h, 3 * h, config.attention_bias)?,
                wo: Linear::load(l.pp("attn.Wo"), h, h, config.attention_bias)?,
                mlp_norm: LayerNorm::load(l.pp("mlp_norm"), h, eps, nb)?,
                wi: Linear::load(l.pp("mlp.Wi"), h, 2 * config.intermediate_size, config.mlp_bias)?,
                mlp_wo: Linear::load(l.pp("mlp.Wo"), config.intermediate_size, h, config.mlp_bias)?,
                sliding: config.sliding(i),
            });
        }
        Ok(Self {
            embeddings: Embedding::load(m.pp("embeddings.tok_embeddings"), config.vocab_size, h)?,
            emb_norm: LayerNorm::load(m.pp("embeddings.norm"), h, eps, nb)?,
            layers,
            final_norm: LayerNorm::load(m.pp("final_norm"), h, eps, nb)?,
            head_dense: Linear::load(vb.pp("head.dense"), h, h, config.classifier_bias)?,
            head_norm: LayerNorm::load(vb.pp("head.norm"), h, eps, nb)?,
            classifier: Linear::load(vb.pp("classifier"), h, 1, true)?,
            config: config.clone(),
        })
    }

    /// The rest of a layer after attention: the output projection added to the residual `x`,
    /// then the gated MLP on its norm added again. `x` and `ctx` [B, rows, H].
    fn mlp_block(&self, layer: &Layer, x: &Tensor, ctx: &Tensor, train: bool) -> Result<Tensor> {
        let cfg = &self.config;
        if !train && crate::kernels::scoring_epilogues_on(ctx) {
            let (x, glu) = self.mlp_for_scoring(layer, x, ctx)?;
            return &x + layer.mlp_wo.forward(&glu)?;
        }
        // (The context is bf16 from the packed training attention: the projection comes back in
        // the residual stream's dtype.)
        let x = (x + dropout(&layer.wo.forward_as(ctx, x.dtype())?, cfg.attention_dropout, train)?)?;
        let normed = layer.mlp_norm.forward(&x)?;
        // Training under autocast: GeGLU on Wi's bf16 product in one kernel each way, its bf16
        // output Wo's input as it is.
        let glu = match (cfg.hidden_activation.as_str(), layer.wi.bias()) {
            ("gelu", None) => {
                let product = layer.wi.product(&normed)?;
                if crate::kernels::geglu_for_training_on(&product) {
                    crate::kernels::geglu_for_training(&product)?
                } else {
                    self.glu(&product.to_dtype(normed.dtype())?)?
                }
            }
            _ => self.glu(&layer.wi.forward(&normed)?)?,
        };
        &x + layer.mlp_wo.forward_as(&dropout(&glu, cfg.mlp_dropout, train)?, x.dtype())?
    }

    /// The gated activation of Wi's output `inner` [.., 2 I] = (input | gate): act(input) gate.
    fn glu(&self, inner: &Tensor) -> Result<Tensor> {
        let n = self.config.intermediate_size;
        activation(&self.config.hidden_activation, &inner.narrow(D::Minus1, 0, n)?)? * inner.narrow(D::Minus1, n, n)?
    }

    /// [`Self::mlp_block`] for scoring, where `kernels::scoring_epilogues_on` holds, without its
    /// last residual add: the residual add and the MLP's norm in one kernel (wo's bias inside),
    /// the GeGLU in one; returns (the residual stream after attention, the GeGLU's output). The
    /// caller adds `mlp.Wo`'s product to the first with the next norm (one kernel again).
    fn mlp_for_scoring(&self, layer: &Layer, x: &Tensor, ctx: &Tensor) -> Result<(Tensor, Tensor)> {
        let cfg = &self.config;
        let (x, normed) = layer.mlp_norm.add_norm_sum(&layer.wo.product(ctx)?, layer.wo.bias(), x)?;
        let inner = layer.wi.forward(&normed)?;
        let glu = match cfg.hidden_activation.as_str() {
            "gelu" => crate::kernels::geglu_for_scoring(&inner)?,
            act => {
                let n = cfg.intermediate_size;
                (activation(act, &inner.narrow(D::Minus1, 0, n)?)? * inner.narrow(D::Minus1, n, n)?)?
            }
        };
        Ok((x, glu))
    }

    /// One score per sequence; `token_type_ids` are ignored (ModernBERT has none).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        _token_type_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (bsz, len) = input_ids.dims2()?;
        let dev = input_ids.device();
        let heads = cfg.num_attention_heads;
        let hd = cfg.hidden_size / heads;
        let compute = crate::layers::compute_dtype(self.embeddings.dtype());
        let mut x = dropout(&self.emb_norm.embed(&[(&self.embeddings, input_ids)])?, cfg.embedding_dropout, train)?;

        // Additive masks: padding keys [B, 1, 1, L] everywhere; for the composite attention of the
        // sliding layers also the keys beyond the window, [B, 1, L, L] (made when first needed).
        let pad = attention_mask.to_dtype(DType::F32)?.affine(1e9, -1e9)?.reshape((bsz, 1, 1, len))?;
        let window = (cfg.local_attention / 2) as i64;
        let local_mask = std::cell::OnceCell::new();
        let mask = |sliding: bool| -> Result<Tensor> {
            if !sliding {
                return Ok(pad.clone());
            }
            if let Some(m) = local_mask.get() {
                return Ok(Tensor::clone(m));
            }
            let band: Vec<f32> = (0..len * len)
                .map(|k| if ((k / len) as i64 - (k % len) as i64).abs() <= window { 0.0 } else { -1e9 })
                .collect();
            let m = pad.broadcast_add(&Tensor::from_vec(band, (1, 1, len, len), dev)?)?;
            Ok(local_mask.get_or_init(|| m).clone())
        };
        let (global_theta, local_theta) = cfg.thetas();
        let ropes = [rotary(len, hd, global_theta, dev)?, rotary(len, hd, local_theta, dev)?];
        let scale = 1.0 / (hd as f64).sqrt();
        // Scoring in bf16: attention straight from Wqkv's product, q and k rotated as they load
        // (one kernel: no rotation passes, no head-split copies); the tables [2, L, D] per theta.
        let packed = !train && !crate::layers::grad_enabled() && crate::kernels::flash_scoring_packed_on(&x, hd);
        // Training under autocast likewise (the rotation undone on q's and k's gradients).
        let packed_train = (train || crate::layers::grad_enabled()) && crate::kernels::flash_training_packed_on(&x, hd);
        let rope_tables = if packed || packed_train {
            Some(ropes.iter().map(|(c, s)| Tensor::stack(&[c, s], 0)).collect::<Result<Vec<_>>>()?)
        } else {
            None
        };

        // With CLS pooling only the first token's final state is read: the last layer needs every
        // token's key and value but the query, attention and MLP of the first token only.
        let first_only = cfg.classifier_pooling != "mean" && crate::layers::first_token_only_on();
        let last = self.layers.len().saturating_sub(1);
        // Scoring: a layer's MLP output not yet added to the residual stream (`mlp.Wo`'s product,
        // its bias, the stream): the next norm adds it (one kernel: the sum and its norm).
        let mut pending: Option<(Tensor, Option<Tensor>, Tensor)> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if !crate::layers::grad_enabled() {
                x = x.detach();
            }
            let which = layer.sliding as usize;
            let normed = match (&layer.attn_norm, pending.take()) {
                (Some(n), Some((product, bias, stream))) => {
                    let (sum, normed) = n.add_norm_sum(&product, bias.as_ref(), &stream)?;
                    x = sum;
                    normed
                }
                (None, Some((product, bias, stream))) => {
                    let product = match bias {
                        Some(b) => product.broadcast_add(&b.to_dtype(product.dtype())?)?,
                        None => product,
                    };
                    x = (stream + product)?;
                    x.clone()
                }
                (Some(n), None) => n.forward(&x)?,
                (None, None) => x.clone(),
            };
            let window = layer.sliding.then_some(window as usize);
            if let (Some(tables), false) = (&rope_tables, first_only && i == last) {
                let qkv = layer.wqkv.product(&normed)?;
                if packed_train {
                    let p = cfg.attention_dropout;
                    let drop = (train && p > 0.0).then(|| (p, crate::layers::dropout_seed()));
                    let ctx = crate::kernels::flash_attention_for_training_packed(
                        &qkv,
                        layer.wqkv.bias(),
                        &pad,
                        heads,
                        scale,
                        window,
                        drop,
                        Some(&tables[which]),
                    )?;
                    x = self.mlp_block(layer, &x, &ctx, train)?;
                    continue;
                }
                let ctx = crate::kernels::flash_attention_for_scoring_packed(
                    &qkv,
                    layer.wqkv.bias(),
                    &pad,
                    heads,
                    scale,
                    window,
                    Some(&tables[which]),
                )?;
                if crate::kernels::scoring_epilogues_on(&ctx) {
                    let (stream, glu) = self.mlp_for_scoring(layer, &x, &ctx)?;
                    pending = Some((layer.mlp_wo.product(&glu)?, layer.mlp_wo.bias().cloned(), stream));
                } else {
                    x = self.mlp_block(layer, &x, &ctx, train)?;
                }
                continue;
            }
            let qkv = layer.wqkv.forward(&normed)?.reshape((bsz, len, 3, heads, hd))?;
            let (cos, sin) = &ropes[which];
            // The head split with q and k rotated (one kernel where the fused kernels run).
            let (q, k, v) = crate::kernels::rotary_qkv(&qkv, cos, sin)?;
            if first_only && i == last {
                let q = q.narrow(2, 0, 1)?.contiguous()?;
                let mask = mask(layer.sliding)?;
                let mask = if mask.dim(2)? == 1 { mask } else { mask.narrow(2, 0, 1)? };
                let ctx = composite_attention(&q, &k, &v, &mask, scale, compute, (cfg.attention_dropout, train))?;
                x = self.mlp_block(layer, &x.narrow(1, 0, 1)?, &ctx, train)?;
                break;
            }
            // Flash-style attention where it applies (training under autocast, scoring in bf16;
            // the local layers' band as its window), else the products and the masked softmax.
            let flash = if train || crate::layers::grad_enabled() {
                let p = cfg.attention_dropout;
                let drop = (train && p > 0.0).then(|| (p, crate::layers::dropout_seed()));
                flash_attention_for_training(&q, &k, &v, &pad, scale, window, drop)?
            } else {
                flash_attention_for_scoring(&q, &k, &v, &pad, scale, window)?
            };
            let ctx = match flash {
                Some(ctx) => ctx,
                None => composite_attention(
                    &q,
                    &k,
                    &v,
                    &mask(layer.sliding)?,
                    scale,
                    compute,
                    (cfg.attention_dropout, train),
                )?,
            };
            x = self.mlp_block(layer, &x, &ctx, train)?;
        }
        let x = match pending {
            Some((product, bias, stream)) => self.final_norm.add_norm_sum(&product, bias.as_ref(), &stream)?.1,
            None => self.final_norm.forward(&x)?,
        };
        let pooled = if cfg.classifier_pooling == "mean" {
            let m = attention_mask.to_dtype(x.dtype())?.unsqueeze(2)?;
            x.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)?
        } else {
            crate::bert::first_token(&x)?
        };
        let pooled =
            self.head_norm.forward(&activation(&cfg.classifier_activation, &self.head_dense.forward(&pooled)?)?)?;
        let logits = self.classifier.forward(&dropout(&pooled, cfg.classifier_dropout, train)?)?;
        logits.squeeze(D::Minus1)?.to_dtype(DType::F32)
    }
}
