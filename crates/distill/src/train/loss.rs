//! The training losses: masked cross-entropy on the answer tokens and a KL
//! term against the teacher's stored top-k distribution.
//!
//! # Definitions
//!
//! For one answer position with student logits `z` (over the whole
//! vocabulary V), target token `y`, and — when the record carries them — the
//! teacher's top-k ids `S` with log-probabilities `ℓ_i`:
//!
//! - `CE = −log softmax(z)_y`
//! - teacher distribution at temperature `τ`, renormalised over its top k:
//!   `p_i = exp(ℓ_i/τ) / Σ_{j∈S} exp(ℓ_j/τ)` for `i ∈ S`
//! - student distribution at temperature `τ` over the full vocabulary:
//!   `q = softmax(z/τ)`
//! - `KL = τ² · Σ_{i∈S} p_i · (log p_i − log q_i)`. The `τ²` keeps the
//!   gradient's size independent of `τ` (Hinton et al.). `KL ≥ 0`, and it is
//!   0 exactly when `q` puts all its mass on `S` in the teacher's
//!   proportions.
//! - per position: `loss = (1−β)·CE + β·KL` where the teacher distribution
//!   exists, `loss = CE` where it does not (a record without log-probs, or
//!   positions past where the teacher's tokens and the student's
//!   tokenization of the answer agree).
//!
//! A step's loss is the sum over all its answer positions divided by their
//! count (across all micro-batches of the step), so gradient accumulation
//! gives the gradient of the mean over the step's tokens.

use super::model::log_softmax_last;
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor, D};

/// The teacher's top-k at each loss row, flattened: ids and log-probs of
/// shape `[M*k]`; rows without a teacher distribution have `has[r] = 0`.
#[derive(Debug, Clone)]
pub struct TeacherTop {
    pub k: usize,
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub has: Vec<bool>,
}

/// What the loss compares the logits of M rows against.
#[derive(Debug, Clone)]
pub struct LossTargets {
    /// Target token per row, shape `[M]`.
    pub targets: Vec<u32>,
    /// 1 for rows that count, 0 for masked rows (prompt, padding), shape `[M]`.
    pub mask: Vec<f32>,
    pub teacher: Option<TeacherTop>,
}

/// The sum of the loss over the counted rows (a scalar tensor to
/// backpropagate) and its parts as plain numbers.
pub struct LossSum {
    /// Σ over counted rows of the mixed loss, scalar.
    pub total: Tensor,
    /// Σ CE over counted rows.
    pub ce_sum: f64,
    /// Σ KL over counted rows that have a teacher distribution.
    pub kl_sum: f64,
    /// Counted rows, and those with a teacher distribution.
    pub n_rows: f64,
    pub n_kl_rows: f64,
}

/// Cross-entropy of each row: logits `[M, V]`, targets `[M]` → `[M]`.
pub fn row_ce(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let m = targets.len();
    let lsm = log_softmax_last(logits)?;
    let idx = Tensor::from_vec(targets.to_vec(), (m, 1), logits.device())?;
    Ok(lsm.gather(&idx, 1)?.squeeze(1)?.neg()?)
}

/// Teacher distribution per row at temperature `tau`: (p [M*k], Σ p·log p [M]).
/// Rows without a teacher get all zeros.
fn teacher_probs(t: &TeacherTop, tau: f64) -> (Vec<f32>, Vec<f32>) {
    let mut p = vec![0f32; t.ids.len()];
    let mut plogp = vec![0f32; t.has.len()];
    for (r, &has) in t.has.iter().enumerate() {
        if !has {
            continue;
        }
        let l = &t.logprobs[r * t.k..(r + 1) * t.k];
        let max = l.iter().copied().fold(f64::NEG_INFINITY, |a, b| a.max(b as f64 / tau));
        let z: f64 = l.iter().map(|&v| (v as f64 / tau - max).exp()).sum();
        let mut acc = 0f64;
        for (i, &v) in l.iter().enumerate() {
            let logp = v as f64 / tau - max - z.ln();
            let pi = logp.exp();
            p[r * t.k + i] = pi as f32;
            if pi > 0.0 {
                acc += pi * logp;
            }
        }
        plogp[r] = acc as f32;
    }
    (p, plogp)
}

/// KL of each row (see the module doc), shape `[M]`; 0 for rows without a
/// teacher distribution.
pub fn row_kl(logits: &Tensor, t: &TeacherTop, tau: f64) -> Result<Tensor> {
    let m = t.has.len();
    ensure!(t.ids.len() == m * t.k && t.logprobs.len() == m * t.k, "teacher top-k has the wrong shape");
    let dev = logits.device();
    let (p, plogp) = teacher_probs(t, tau);
    let lq = log_softmax_last(&(logits / tau)?)?; // [M, V]
    let ids = Tensor::from_vec(t.ids.clone(), (m, t.k), dev)?;
    let lq_s = lq.gather(&ids, 1)?; // [M, k]
    let p = Tensor::from_vec(p, (m, t.k), dev)?;
    let cross = (p * lq_s)?.sum(D::Minus1)?; // Σ p·log q, [M]
    let plogp = Tensor::from_vec(plogp, m, dev)?;
    Ok(((plogp - cross)? * (tau * tau))?)
}

/// The mixed loss summed over the counted rows of `logits` [M, V].
pub fn loss_sum(logits: &Tensor, tg: &LossTargets, beta: f64, tau: f64) -> Result<LossSum> {
    let m = tg.targets.len();
    ensure!(logits.dim(0)? == m && tg.mask.len() == m, "loss targets do not match the logits' rows");
    let dev = logits.device();
    let mask = Tensor::from_vec(tg.mask.clone(), m, dev)?;
    let ce = row_ce(logits, &tg.targets)?;
    let ce_sum = (&ce * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
    let n_rows: f64 = tg.mask.iter().map(|&v| v as f64).sum();
    match (&tg.teacher, beta > 0.0) {
        (Some(t), true) => {
            let has: Vec<f32> = t.has.iter().zip(&tg.mask).map(|(&h, &w)| if h { w } else { 0.0 }).collect();
            let n_kl_rows = has.iter().map(|&v| v as f64).sum();
            let has_t = Tensor::from_vec(has.clone(), m, dev)?;
            let kl = row_kl(logits, t, tau)?;
            let kl_sum = (&kl * &has_t)?.sum_all()?.to_scalar::<f32>()? as f64;
            // CE weight per row: 1 − β where the teacher exists, 1 elsewhere.
            let ce_w: Vec<f32> = has.iter().zip(&tg.mask).map(|(&h, &w)| w - (beta as f32) * h).collect();
            let ce_w = Tensor::from_vec(ce_w, m, dev)?;
            let total = ((ce * ce_w)?.sum_all()? + ((kl * has_t)?.sum_all()? * beta)?)?;
            Ok(LossSum { total, ce_sum, kl_sum, n_rows, n_kl_rows })
        }
        _ => Ok(LossSum { total: (ce * mask)?.sum_all()?, ce_sum, kl_sum: 0.0, n_rows, n_kl_rows: 0.0 }),
    }
}

/// Mean masked cross-entropy of logits [M, V] (convenience for evaluation
/// and tests).
pub fn masked_ce_mean(logits: &Tensor, targets: &[u32], mask: &[f32]) -> Result<f64> {
    let s = loss_sum(logits, &LossTargets { targets: targets.to_vec(), mask: mask.to_vec(), teacher: None }, 0.0, 1.0)?;
    ensure!(s.n_rows > 0.0, "no rows to average over");
    Ok(s.ce_sum / s.n_rows)
}

/// Logits as a tensor from host rows (tests, small cases): [M, V].
pub fn logits_tensor(rows: &[Vec<f32>], device: &Device) -> Result<Tensor> {
    let v = rows.first().map_or(0, |r| r.len());
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), v), device)?)
}
