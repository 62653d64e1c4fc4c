//! AdamW over candle tensors, with its moments exposed so checkpoints can
//! save and restore them exactly, plus the learning-rate schedule and global
//! gradient-norm clipping.
//!
//! AdamW (Loshchilov & Hutter): with gradient g at step t (1-based),
//! `m = β1·m + (1−β1)·g`, `v = β2·v + (1−β2)·g²`,
//! `w ← w − lr·( m/(1−β1ᵗ) / (sqrt(v/(1−β2ᵗ)) + ε) + λ·w )`.
//! Weight decay λ applies to matrices only (norm weights and biases are
//! left alone, the usual practice).

use anyhow::{Context, Result};
use candle_core::{backprop::GradStore, Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One trainable variable and its moments.
pub struct Slot {
    pub name: String,
    pub var: Var,
    pub m: Tensor,
    pub v: Tensor,
}

pub struct AdamW {
    pub p: AdamWParams,
    pub slots: Vec<Slot>,
    /// Updates applied so far (the t of the bias correction).
    pub t: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, p: AdamWParams) -> Result<AdamW> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let z = var.as_tensor().zeros_like()?;
                Ok(Slot { name, var, m: z.clone(), v: z })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { p, slots, t: 0 })
    }

    /// One update with the gradients `grads[i]` of `slots[i]` at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let p = self.p;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        for (s, g) in self.slots.iter_mut().zip(grads) {
            s.m = ((&s.m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            s.v = ((&s.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&s.m / bc1)?;
            let v_hat = (&s.v / bc2)?;
            let mut upd = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let w = s.var.as_tensor();
            if p.weight_decay > 0.0 && w.rank() >= 2 {
                upd = (upd + (w * p.weight_decay)?)?;
            }
            let new_w = (w - (upd * lr)?)?;
            s.var.set(&new_w)?;
        }
        Ok(())
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear
/// warm-up from `lr/warmup` to `lr` over the first `warmup` steps, then a
/// cosine from `lr` down to `min_ratio·lr` at the last step.
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    let min = lr * min_ratio;
    min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Adds this micro-batch's gradients into `acc` (one per slot, created on
/// first use). A variable the loss does not reach gets a zero gradient.
pub fn accumulate(acc: &mut Vec<Tensor>, slots: &[Slot], grads: &GradStore) -> Result<()> {
    let fresh = acc.is_empty();
    for (i, s) in slots.iter().enumerate() {
        let g = match grads.get(s.var.as_tensor()) {
            Some(g) => g.clone(),
            None => s.var.as_tensor().zeros_like()?,
        };
        if fresh {
            acc.push(g);
        } else {
            acc[i] = (&acc[i] + g).with_context(|| format!("gradient of '{}'", s.name))?;
        }
    }
    Ok(())
}

/// Scales the gradients so their global L2 norm is at most `max_norm`
/// (no-op when `max_norm <= 0`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let f = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * f)?;
        }
    }
    Ok(norm)
}
