//! AdamW over candle variables (moments kept on the host, exposed so
//! checkpoints save and restore them exactly), global gradient-norm
//! clipping, and the learning-rate schedule.
//!
//! AdamW (Loshchilov & Hutter): with gradient g at step t (1-based),
//! `m = β1·m + (1−β1)·g`, `v = β2·v + (1−β2)·g²`,
//! `w ← w − lr·( m/(1−β1ᵗ) / (sqrt(v/(1−β2ᵗ)) + ε) + λ·w )`.
//! Weight decay λ applies to matrices only (norm weights and biases are
//! left alone, the usual practice).

use anyhow::{Context, Result};
use candle_core::{backprop::GradStore, CpuStorage, InplaceOp1, Layout, Storage, Tensor, Var};
use std::sync::Mutex;

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

/// One trainable variable and its moments (host f32, shape of the
/// variable flattened).
pub struct Slot {
    pub name: String,
    pub var: Var,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct AdamW {
    pub p: AdamWParams,
    pub slots: Vec<Slot>,
    /// Updates applied so far (the t of the bias correction).
    pub t: u64,
}

/// Elements per thread task of the fused update.
const CHUNK: usize = 1 << 16;

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, p: AdamWParams) -> Result<AdamW> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let n = var.as_tensor().elem_count();
                Slot { name, var, m: vec![0.0; n], v: vec![0.0; n] }
            })
            .collect();
        Ok(AdamW { p, slots, t: 0 })
    }

    /// One update with the gradients `grads[i]` of `slots[i]` at learning
    /// rate `lr`, after scaling them so their global L2 norm is at most
    /// `max_norm` (no clipping when `max_norm <= 0`). Returns the norm
    /// before clipping.
    ///
    /// The update runs on the host as one fused pass per variable (split
    /// over threads): on a CPU that is several times faster than a dozen
    /// whole-tensor candle operations, each allocating a tensor the size of
    /// the model. The result is the same whatever the thread count: every
    /// element's arithmetic is independent, and the norm is summed in order.
    pub fn step(&mut self, grads: &[Tensor], lr: f64, max_norm: f64) -> Result<f64> {
        let mut sq = 0f64;
        for g in grads {
            sq += with_host_f32(g, |g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())?;
        }
        let norm = sq.sqrt();
        let g_scale = if max_norm > 0.0 && norm > max_norm { (max_norm / (norm + 1e-6)) as f32 } else { 1.0 };
        self.t += 1;
        let p = self.p;
        let threads = candle_core::utils::get_num_threads().max(1);
        for (s, g) in self.slots.iter_mut().zip(grads) {
            let t = s.var.as_tensor();
            let update = Update {
                g_scale,
                b1: p.beta1 as f32,
                b2: p.beta2 as f32,
                bc1: (1.0 - p.beta1.powi(self.t as i32)) as f32,
                bc2: (1.0 - p.beta2.powi(self.t as i32)) as f32,
                eps: p.eps as f32,
                lr: lr as f32,
                wd: if t.rank() >= 2 { p.weight_decay as f32 } else { 0.0 },
                threads,
            };
            with_host_f32(g, |g| {
                // In place on the variable's own storage: no copy of the
                // weights out and back, no fresh model-sized buffers (whose
                // page faults cost as much as the update itself).
                let op = InPlace { update, m: Mutex::new(&mut s.m), v: Mutex::new(&mut s.v), g };
                t.inplace_op1(&op).with_context(|| format!("AdamW update of '{}'", s.name))
            })??;
        }
        Ok(norm)
    }
}

/// One thread task of an update: chunks of the weights, both moments and
/// the gradient.
type Chunk<'a> = (((&'a mut [f32], &'a mut [f32]), &'a mut [f32]), &'a [f32]);

/// The arithmetic of one AdamW update (see the module doc).
#[derive(Clone, Copy)]
struct Update {
    g_scale: f32,
    b1: f32,
    b2: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
    lr: f32,
    wd: f32,
    threads: usize,
}

impl Update {
    /// Updates `w`, `m`, `v` with gradient `g`, split over threads in
    /// chunks; every element independent, so the result is the same for
    /// any thread count.
    fn apply(&self, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let u = *self;
        let tasks: Vec<_> =
            w.chunks_mut(CHUNK).zip(m.chunks_mut(CHUNK)).zip(v.chunks_mut(CHUNK)).zip(g.chunks(CHUNK)).collect();
        let per = tasks.len().div_ceil(u.threads).max(1);
        let mut groups: Vec<Vec<_>> = Vec::new();
        let mut it = tasks.into_iter().peekable();
        while it.peek().is_some() {
            groups.push(it.by_ref().take(per).collect());
        }
        let run = move |group: Vec<Chunk>| {
            for (((w, m), v), g) in group {
                for i in 0..w.len() {
                    let gi = g[i] * u.g_scale;
                    m[i] = u.b1 * m[i] + (1.0 - u.b1) * gi;
                    v[i] = u.b2 * v[i] + (1.0 - u.b2) * gi * gi;
                    let upd = (m[i] / u.bc1) / ((v[i] / u.bc2).sqrt() + u.eps) + u.wd * w[i];
                    w[i] -= u.lr * upd;
                }
            }
        };
        if groups.len() == 1 {
            run(groups.pop().expect("one group"));
            return;
        }
        rayon::scope(|sc| {
            for group in groups {
                sc.spawn(move |_| run(group));
            }
        });
    }
}

/// [`Update`] as a candle in-place op on a variable's storage. The moments
/// sit behind mutexes only because candle hands the op `&self`.
struct InPlace<'a> {
    update: Update,
    m: Mutex<&'a mut Vec<f32>>,
    v: Mutex<&'a mut Vec<f32>>,
    g: &'a [f32],
}

impl InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(all) = storage else {
            return Err(candle_core::Error::Msg("AdamW: the variable is not f32".into()));
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg("AdamW: the variable is not contiguous".into()));
        };
        let w = &mut all[start..end];
        let (mut m, mut v) = (self.m.lock().expect("not poisoned"), self.v.lock().expect("not poisoned"));
        if w.len() != m.len() || w.len() != self.g.len() {
            return Err(candle_core::Error::Msg(format!(
                "AdamW: {} weights, {} moments, {} gradients",
                w.len(),
                m.len(),
                self.g.len()
            )));
        }
        self.update.apply(w, &mut m, &mut v, self.g);
        Ok(())
    }
}

/// Calls `f` with a tensor's values as a host f32 slice: its own storage
/// when it is a contiguous CPU f32 tensor, else a copy.
fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(all)), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&all[start..end]));
        }
    }
    let copy: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(f(&copy))
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
