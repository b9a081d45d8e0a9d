//! Training objectives on groups of scores, written from differentiable candle ops only.
//!
//! A batch is `Q` queries by `G` group slots: student scores `s: [Q, G]`, a mask `m: [Q, G]`
//! (1 for a real candidate, 0 for padding of a ragged group), and what an objective needs: binary
//! or graded `labels`, `teacher_scores` `t`, or 1-based `teacher_ranks` `r`. Padding never
//! contributes to a loss or a gradient. In groups built from triples the positive sits at slot 0.
//!
//! Reductions: pointwise losses (`bce`, `mse`, `adr_mse`) average over real entries, pairwise
//! losses (`hinge`, `margin_mse`, `ranknet`, `distill_ranknet`) over the pairs they form, listwise
//! losses (`infonce`, `kl_div`) over queries. Every log-sigmoid, softplus and log-softmax is
//! computed in its stable form, so scores of magnitude 1e4 give finite losses and gradients.

use candle_core::{DType, Result, Tensor, D};

/// A finite stand-in for -inf in masked softmaxes (exp of it is exactly 0).
const MASKED: f64 = -1e30;

/// A batch of score groups with what objectives may need.
#[derive(Debug, Clone)]
pub struct ScoreGroups {
    pub scores: Tensor,
    pub mask: Tensor,
    pub labels: Option<Tensor>,
    pub teacher_scores: Option<Tensor>,
    pub teacher_ranks: Option<Tensor>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    Bce,
    Hinge { margin: f64 },
    InfoNce { temperature: f64 },
    MarginMse,
    DistillRankNet,
    AdrMse { temperature: f64 },
    Mse,
    RankNet,
    KlDiv { temperature: f64 },
}

/// What a dataset offers, for checking an objective against it before training starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetFields {
    /// `lists` layout (else `triples`, whose slot 0 is the positive).
    pub lists: bool,
    pub labels: bool,
    pub teacher_scores: bool,
    pub teacher_ranks: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    #[error("unknown objective '{0}' (expected bce, hinge, infonce, margin_mse, distill_ranknet, adr_mse, mse, ranknet, kl_div)")]
    Unknown(String),
    #[error("{objective} needs {needs}; the dataset has {has}")]
    MissingField { objective: &'static str, needs: &'static str, has: String },
    #[error("{objective}: the batch has no {field}")]
    MissingInput { objective: &'static str, field: &'static str },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl std::str::FromStr for Objective {
    type Err = ObjectiveError;
    fn from_str(s: &str) -> std::result::Result<Self, ObjectiveError> {
        Ok(match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "bce" => Objective::Bce,
            "hinge" => Objective::Hinge { margin: 1.0 },
            "infonce" | "info_nce" => Objective::InfoNce { temperature: 1.0 },
            "margin_mse" | "marginmse" => Objective::MarginMse,
            "distill_ranknet" => Objective::DistillRankNet,
            "adr_mse" => Objective::AdrMse { temperature: 1.0 },
            "mse" => Objective::Mse,
            "ranknet" => Objective::RankNet,
            "kl_div" | "kl" | "listnet" => Objective::KlDiv { temperature: 1.0 },
            other => return Err(ObjectiveError::Unknown(other.to_string())),
        })
    }
}

fn softplus(x: &Tensor) -> Result<Tensor> {
    // max(x, 0) + log(1 + exp(-|x|))
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    softplus(&x.neg()?)?.neg()?.exp()
}

/// Sum of `values` over the entries where `weights` is 1, divided by their count (1 if none).
fn weighted_mean(values: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let count = weights.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    (values * weights)?.sum_all()?.affine(1.0 / count.max(1.0), 0.0)
}

/// `x[:, i] - x[:, j]` as `[Q, G, G]`.
fn pair_diff(x: &Tensor) -> Result<Tensor> {
    x.unsqueeze(2)?.broadcast_sub(&x.unsqueeze(1)?)
}

/// 1 where both `i` and `j` are real, `[Q, G, G]`.
fn pair_mask(mask: &Tensor) -> Result<Tensor> {
    mask.unsqueeze(2)?.broadcast_mul(&mask.unsqueeze(1)?)
}

/// Replaces padded entries by 0 so that nothing infinite or NaN flows from them.
fn zero_padding(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    mask.gt(0.5)?.where_cond(x, &x.zeros_like()?)
}

/// Row-wise log-softmax of `x` over the real entries (padded entries get a finite, very negative
/// value whose exp is 0).
fn masked_log_softmax(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let filled = mask.gt(0.5)?.where_cond(x, &x.ones_like()?.affine(MASKED, 0.0)?)?;
    let max = filled.max_keepdim(D::Minus1)?.detach();
    let shifted = filled.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

fn positive_and_negatives(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let g = x.dim(1)?;
    Ok((x.narrow(1, 0, 1)?, x.narrow(1, 1, g - 1)?))
}

impl Objective {
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Bce => "bce",
            Objective::Hinge { .. } => "hinge",
            Objective::InfoNce { .. } => "infonce",
            Objective::MarginMse => "margin_mse",
            Objective::DistillRankNet => "distill_ranknet",
            Objective::AdrMse { .. } => "adr_mse",
            Objective::Mse => "mse",
            Objective::RankNet => "ranknet",
            Objective::KlDiv { .. } => "kl_div",
        }
    }

    /// Checks that a dataset carries what this objective needs, so that a job fails at once with a
    /// clear message instead of at its first batch.
    pub fn check(&self, d: &DatasetFields) -> std::result::Result<(), ObjectiveError> {
        let (ok, needs) = match self {
            // Triples give the positive at slot 0; lists need labels to find it.
            Objective::Bce | Objective::Hinge { .. } | Objective::InfoNce { .. } => {
                (!d.lists || d.labels, "relevance labels to pick the positive of each list")
            }
            Objective::MarginMse | Objective::Mse | Objective::KlDiv { .. } => (d.teacher_scores, "teacher scores"),
            Objective::DistillRankNet | Objective::AdrMse { .. } => {
                (d.lists && d.teacher_ranks, "lists with teacher ranks (the lists layout)")
            }
            Objective::RankNet => (d.labels, "graded relevance labels"),
        };
        if ok {
            return Ok(());
        }
        let mut has = vec![if d.lists { "lists" } else { "triples" }];
        if d.labels {
            has.push("labels");
        }
        if d.teacher_scores {
            has.push("teacher scores");
        }
        if d.teacher_ranks {
            has.push("teacher ranks");
        }
        let has = if has.len() == 1 { format!("{} with no labels or teacher scores", has[0]) } else { has.join(", ") };
        Err(ObjectiveError::MissingField { objective: self.name(), needs, has })
    }

    fn need<'a>(&self, t: &'a Option<Tensor>, field: &'static str) -> std::result::Result<&'a Tensor, ObjectiveError> {
        t.as_ref().ok_or(ObjectiveError::MissingInput { objective: self.name(), field })
    }

    /// The loss of a batch, a scalar.
    pub fn loss(&self, b: &ScoreGroups) -> std::result::Result<Tensor, ObjectiveError> {
        let s = zero_padding(&b.scores, &b.mask)?;
        let m = &b.mask;
        Ok(match *self {
            Objective::Bce => bce(&s, m, self.need(&b.labels, "labels")?)?,
            Objective::Hinge { margin } => hinge(&s, m, margin)?,
            Objective::InfoNce { temperature } => infonce(&s, m, temperature)?,
            Objective::MarginMse => margin_mse(&s, m, self.need(&b.teacher_scores, "teacher scores")?)?,
            Objective::DistillRankNet => distill_ranknet(&s, m, self.need(&b.teacher_ranks, "teacher ranks")?)?,
            Objective::AdrMse { temperature } => {
                adr_mse(&s, m, self.need(&b.teacher_ranks, "teacher ranks")?, temperature)?
            }
            Objective::Mse => mse(&s, m, self.need(&b.teacher_scores, "teacher scores")?)?,
            Objective::RankNet => ranknet(&s, m, self.need(&b.labels, "labels")?)?,
            Objective::KlDiv { temperature } => {
                kl_div(&s, m, self.need(&b.teacher_scores, "teacher scores")?, temperature)?
            }
        })
    }
}

/// Binary cross-entropy on logits, pointwise: `y = 1` for labels > 0, else 0;
/// `loss = mean_{real i} [ softplus(s_i) - y_i s_i ]` (= -y log σ(s) - (1-y) log(1-σ(s))).
pub fn bce(s: &Tensor, mask: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let y = labels.gt(0.0)?.to_dtype(s.dtype())?;
    weighted_mean(&(softplus(s)? - (y * s)?)?, mask)
}

/// Pairwise hinge with the positive at slot 0:
/// `loss = mean_{real j ≥ 1} max(0, margin - (s_0 - s_j))`.
pub fn hinge(s: &Tensor, mask: &Tensor, margin: f64) -> Result<Tensor> {
    let (pos, neg) = positive_and_negatives(s)?;
    let (_, neg_mask) = positive_and_negatives(mask)?;
    let d = pos.broadcast_sub(&neg)?;
    weighted_mean(&d.neg()?.affine(1.0, margin)?.relu()?, &neg_mask)
}

/// InfoNCE / softmax cross-entropy with the positive at slot 0 and temperature `T`:
/// `loss = mean_q [ -log softmax(s_q / T)_0 ]` over the real entries of each group.
pub fn infonce(s: &Tensor, mask: &Tensor, temperature: f64) -> Result<Tensor> {
    let logp = masked_log_softmax(&s.affine(1.0 / temperature, 0.0)?, mask)?;
    logp.narrow(1, 0, 1)?.neg()?.mean_all()
}

/// MarginMSE (Hofstätter et al.), every negative against the positive at slot 0:
/// `loss = mean_{real j ≥ 1} ((s_0 - s_j) - (t_0 - t_j))²`.
pub fn margin_mse(s: &Tensor, mask: &Tensor, t: &Tensor) -> Result<Tensor> {
    let t = zero_padding(t, mask)?;
    let (sp, sn) = positive_and_negatives(s)?;
    let (tp, tn) = positive_and_negatives(&t)?;
    let (_, neg_mask) = positive_and_negatives(mask)?;
    let diff = (sp.broadcast_sub(&sn)? - tp.broadcast_sub(&tn)?)?;
    weighted_mean(&diff.sqr()?, &neg_mask)
}

/// RankNet on the pairs `(i, j)` of real entries with `order(i, j)`:
/// `mean over those pairs of -log σ(s_i - s_j)`.
fn pairwise_logistic(s: &Tensor, mask: &Tensor, ordered: &Tensor) -> Result<Tensor> {
    let pairs = (pair_mask(mask)? * ordered.to_dtype(s.dtype())?)?;
    weighted_mean(&softplus(&pair_diff(s)?.neg()?)?, &pairs)
}

/// DistillRankNet: every pair the teacher orders, `r_i < r_j` (ties give no pair):
/// `loss = mean_{(i,j): r_i < r_j} -log σ(s_i - s_j)`.
pub fn distill_ranknet(s: &Tensor, mask: &Tensor, ranks: &Tensor) -> Result<Tensor> {
    let r = zero_padding(ranks, mask)?;
    pairwise_logistic(s, mask, &pair_diff(&r)?.lt(0.0)?)
}

/// RankNet on graded labels: `loss = mean_{(i,j): y_i > y_j} -log σ(s_i - s_j)`.
pub fn ranknet(s: &Tensor, mask: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let y = zero_padding(labels, mask)?;
    pairwise_logistic(s, mask, &pair_diff(&y)?.gt(0.0)?)
}

/// ADR-MSE: approximate ranks `π_i = 1 + Σ_{real j ≠ i} σ((s_j - s_i) / T)` regressed on the
/// teacher ranks with a log2 discount: `loss = mean_{real i} (π_i - r_i)² / log2(r_i + 1)`.
pub fn adr_mse(s: &Tensor, mask: &Tensor, ranks: &Tensor, temperature: f64) -> Result<Tensor> {
    let g = s.dim(1)?;
    let off_diagonal = Tensor::eye(g, s.dtype(), s.device())?.affine(-1.0, 1.0)?;
    let pairs = pair_mask(mask)?.broadcast_mul(&off_diagonal.unsqueeze(0)?)?;
    // pair_diff(s)[i, j] = s_i - s_j, so σ((s_j - s_i) / T) = σ(-diff / T).
    let beats = sigmoid(&pair_diff(s)?.affine(-1.0 / temperature, 0.0)?)?;
    let approx = ((beats * pairs)?.sum(2)? + 1.0)?;
    // Padded ranks become 1 so that log2(r + 1) stays finite; their weight is 0.
    let r = mask.gt(0.5)?.where_cond(&ranks.to_dtype(s.dtype())?, &s.ones_like()?)?;
    let discount = (r.clone() + 1.0)?.log()?.affine(1.0 / std::f64::consts::LN_2, 0.0)?;
    weighted_mean(&(approx - r)?.sqr()?.div(&discount)?, mask)
}

/// Pointwise distillation: `loss = mean_{real i} (s_i - t_i)²`.
pub fn mse(s: &Tensor, mask: &Tensor, t: &Tensor) -> Result<Tensor> {
    let t = zero_padding(t, mask)?;
    weighted_mean(&(s - t)?.sqr()?, mask)
}

/// KL divergence / ListNet with temperature `T`: with `p = softmax(t / T)` and
/// `q = softmax(s / T)` over each group's real entries,
/// `loss = mean_q Σ_i p_i (log p_i - log q_i)`.
pub fn kl_div(s: &Tensor, mask: &Tensor, t: &Tensor, temperature: f64) -> Result<Tensor> {
    let t = zero_padding(t, mask)?;
    let log_p = masked_log_softmax(&t.affine(1.0 / temperature, 0.0)?, mask)?;
    let log_q = masked_log_softmax(&s.affine(1.0 / temperature, 0.0)?, mask)?;
    let p = (log_p.exp()? * mask)?;
    (p * (log_p - log_q)?)?.sum(1)?.mean_all()
}

#[cfg(test)]
mod tests;
