//! LoRA: low-rank adapters on chosen weight matrices, merged on export.
//!
//! For a frozen matrix W [out, in], the adapter is A [r, in] and B [out, r];
//! the layer computes `x·Wᵀ + (alpha/r)·(x·Aᵀ)·Bᵀ`, which equals `x·(W +
//! (alpha/r)·B·A)ᵀ` — the merged weight export writes. B starts at zero (the
//! adapted model starts as the base model); A starts uniform in
//! ±1/sqrt(in) from the run's seed, so its gradient path is live from the
//! first step.

use super::rng::SplitMix64;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::BTreeMap;

/// The short module names users give (`--lora-targets q,k,v,o,gate,up,down`)
/// and the GGUF tensor each stands for.
pub const TARGETS: [(&str, &str); 7] = [
    ("q", "attn_q"),
    ("k", "attn_k"),
    ("v", "attn_v"),
    ("o", "attn_output"),
    ("gate", "ffn_gate"),
    ("up", "ffn_up"),
    ("down", "ffn_down"),
];

/// Parses a comma-separated target list into GGUF tensor stems (`attn_q`).
pub fn parse_targets(list: &str) -> Result<Vec<&'static str>> {
    let mut out = Vec::new();
    for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match TARGETS.iter().find(|(short, stem)| *short == t || *stem == t) {
            Some((_, stem)) => {
                if !out.contains(stem) {
                    out.push(*stem)
                }
            }
            None => bail!("unknown LoRA target '{t}': use a comma-separated subset of q,k,v,o,gate,up,down"),
        }
    }
    if out.is_empty() {
        bail!("no LoRA targets given: use a comma-separated subset of q,k,v,o,gate,up,down");
    }
    Ok(out)
}

/// One adapter: A [r, in], B [out, r].
struct Adapter {
    a: Var,
    b: Var,
}

/// All adapters of a model, keyed by the adapted tensor's GGUF name.
pub struct LoraSet {
    pub rank: usize,
    pub alpha: f64,
    adapters: BTreeMap<String, Adapter>,
}

impl LoraSet {
    /// Adapters for `weights` (name, [out, in]) with the given rank and alpha.
    pub fn new(
        weights: &[(String, (usize, usize))],
        rank: usize,
        alpha: f64,
        seed: u64,
        device: &Device,
    ) -> Result<LoraSet> {
        if rank == 0 {
            bail!("--lora-rank must be at least 1");
        }
        let mut adapters = BTreeMap::new();
        for (i, (name, (out, inp))) in weights.iter().enumerate() {
            if rank > (*out).min(*inp) {
                bail!("--lora-rank {rank} exceeds the size of '{name}' ({out}×{inp})");
            }
            let mut rng = SplitMix64::new(seed ^ 0x10a4_0000 ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let bound = 1.0 / (*inp as f32).sqrt();
            let a: Vec<f32> = (0..rank * inp).map(|_| (rng.next_f32() * 2.0 - 1.0) * bound).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (rank, *inp), device)?)?;
            let b = Var::from_tensor(&Tensor::zeros((*out, rank), candle_core::DType::F32, device)?)?;
            adapters.insert(name.clone(), Adapter { a, b });
        }
        Ok(LoraSet { rank, alpha, adapters })
    }

    fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The adapted tensors' names.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.adapters.keys().map(String::as_str)
    }

    /// The adapter variables, named `<tensor>.lora_a` / `.lora_b`.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for (name, ad) in &self.adapters {
            v.push((format!("{name}.lora_a"), ad.a.clone()));
            v.push((format!("{name}.lora_b"), ad.b.clone()));
        }
        v
    }

    /// The adapter of `name` as (A [r, in], B [out, r], scale), if it has one.
    pub fn adapter(&self, name: &str) -> Option<(&Tensor, &Tensor, f64)> {
        self.adapters.get(name).map(|ad| (ad.a.as_tensor(), ad.b.as_tensor(), self.scale()))
    }

    /// Each adapter as (adapted tensor's GGUF name, A [r, in], B [out, r]).
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &Tensor, &Tensor)> {
        self.adapters.iter().map(|(n, ad)| (n.as_str(), ad.a.as_tensor(), ad.b.as_tensor()))
    }

    /// `scale·B·A` [out, in] for `name`, `None` when it has no adapter.
    pub fn delta(&self, name: &str) -> Result<Option<Tensor>> {
        match self.adapters.get(name) {
            None => Ok(None),
            Some(ad) => Ok(Some((ad.b.as_tensor().matmul(ad.a.as_tensor())? * self.scale())?)),
        }
    }
}
