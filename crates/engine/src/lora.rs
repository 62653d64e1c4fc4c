//! LoRA adapters at inference, kept apart from the base weights so one base
//! serves many adapters in one batch (the S-LoRA / Punica idea, on CPU).
//!
//! An adapter holds, for some of a layer's seven projections (q, k, v, o,
//! gate, up, down), a low-rank pair A [r, in] and B [out, r]; the adapted
//! projection is `W·x + scale·B·(A·x)` with `scale = alpha / r × the user's
//! scale`. The base product runs once for every row of a batch
//! (`matmul_many`); then `LoraRows::apply` adds each row's correction for
//! the adapter of the sequence the row belongs to (or none).
//!
//! The file format is llama.cpp's LoRA GGUF (`general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, tensors named after the
//! base tensor with `.lora_a` / `.lora_b`), which `llama-cli --lora` and
//! `llama-server --lora` read and `distill train --adapter-out` writes.

use crate::model::{ModelConfig, SeqBatch};
use minnow_gguf::{GgmlType, GgufFile};
use minnow_kernels::pool::{SharedMut, ThreadPool};
use std::path::Path;

/// The projections an adapter may touch, in the order `LoraAdapter` keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The GGUF tensor stem (`blk.N.<stem>.weight`).
    pub fn stem(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    /// (out, in) of this projection in a model of `cfg`.
    fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let e = cfg.n_embd;
        match self {
            Proj::Q => (cfg.q_dim(), e),
            Proj::K | Proj::V => (cfg.kv_dim(), e),
            Proj::O => (e, cfg.q_dim()),
            Proj::Gate | Proj::Up => (cfg.n_ff, e),
            Proj::Down => (e, cfg.n_ff),
        }
    }
}

/// One projection's adapter: A [rank, cols] and B [rows, rank], f32.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub rank: usize,
    /// The projection's input width.
    pub cols: usize,
    /// The projection's output width.
    pub rows: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

impl LowRank {
    /// `out += scale · B·(A·x)` for one row.
    fn add(&self, scale: f32, x: &[f32], out: &mut [f32], t: &mut Vec<f32>) {
        t.clear();
        t.extend(self.a.chunks_exact(self.cols).map(|a| scale * dot(a, x)));
        for (o, b) in out.iter_mut().zip(self.b.chunks_exact(self.rank)) {
            *o += dot(b, t);
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four partial sums: the compiler vectorizes this form.
    let mut s = [0f32; 4];
    let (ac, bc) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..4 {
            s[k] += x[k] * y[k];
        }
    }
    s[0] + s[1] + s[2] + s[3] + tail
}

/// A loaded adapter: its name (what requests' `model` picks it by), scale,
/// and per layer the projections it adapts.
#[derive(Debug)]
pub struct LoraAdapter {
    pub name: String,
    /// `alpha / rank × the user's scale`: what B·A is multiplied by.
    pub scale: f32,
    pub alpha: f32,
    pub rank: usize,
    /// [n_layer][7], in [`Proj::ALL`] order.
    layers: Vec<[Option<LowRank>; 7]>,
}

impl LoraAdapter {
    /// Builds an adapter from its pairs, keyed by (layer, projection).
    pub fn new(
        name: impl Into<String>,
        alpha: f32,
        user_scale: f32,
        n_layer: usize,
        pairs: Vec<(usize, Proj, LowRank)>,
    ) -> Result<LoraAdapter, String> {
        let rank = pairs.first().map(|p| p.2.rank).ok_or("the adapter has no tensors")?;
        let mut layers: Vec<[Option<LowRank>; 7]> = (0..n_layer).map(|_| Default::default()).collect();
        for (l, p, lr) in pairs {
            if lr.rank != rank {
                return Err(format!("blk.{l}.{}: rank {} differs from the adapter's {rank}", p.stem(), lr.rank));
            }
            let slot = layers.get_mut(l).ok_or(format!("layer {l} is past the model's {n_layer}"))?;
            slot[p as usize] = Some(lr);
        }
        Ok(LoraAdapter { name: name.into(), scale: alpha / rank as f32 * user_scale, alpha, rank, layers })
    }

    /// Reads a llama.cpp LoRA GGUF made for a model of `cfg`. Refuses, in
    /// one line, an adapter for another architecture or shape.
    pub fn load(path: &Path, name: &str, user_scale: f32, cfg: &ModelConfig) -> anyhow::Result<LoraAdapter> {
        use anyhow::{bail, Context};
        let f = GgufFile::open(path).with_context(|| format!("LoRA adapter {}", path.display()))?;
        let d = path.display();
        let s = |k: &str| f.get(k).and_then(|v| v.as_str()).map(str::to_string);
        if s("general.type").as_deref() != Some("adapter") || s("adapter.type").as_deref() != Some("lora") {
            bail!("{d} is not a LoRA adapter (general.type = adapter, adapter.type = lora)");
        }
        let arch = s("general.architecture").unwrap_or_default();
        if arch != cfg.arch.name() {
            bail!("{d} is an adapter for a {arch} model, not for this {} model", cfg.arch.name());
        }
        let alpha = f.get("adapter.lora.alpha").and_then(|v| v.as_f64());
        let mut pairs = Vec::new();
        for l in 0..cfg.n_layer {
            for p in Proj::ALL {
                let base = format!("blk.{l}.{}.weight", p.stem());
                let (ta, tb) = (f.tensor(&format!("{base}.lora_a")), f.tensor(&format!("{base}.lora_b")));
                let (ta, tb) = match (ta, tb) {
                    (None, None) => continue,
                    (Some(a), Some(b)) => (a, b),
                    _ => bail!("{d}: {base} has only one of .lora_a and .lora_b"),
                };
                let (rows, cols) = p.shape(cfg);
                // ggml order: lora_a is [in, r] (r rows of `in`), lora_b [r, out].
                let rank = *ta.dims.get(1).unwrap_or(&0) as usize;
                if ta.dims != [cols as u64, rank as u64] || tb.dims != [rank as u64, rows as u64] || rank == 0 {
                    bail!(
                        "{d}: {base} adapter shapes {:?} and {:?} do not fit this model's {rows}×{cols} weight",
                        ta.dims,
                        tb.dims
                    );
                }
                let read = |t: &minnow_gguf::TensorInfo| -> anyhow::Result<Vec<f32>> {
                    if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                        bail!("{d}: {} is {}; adapters are read in F32, F16 or BF16", t.name, t.ty);
                    }
                    let mut out = vec![0f32; t.n_elements() as usize];
                    minnow_kernels::formats::dequantize(t.ty, f.tensor_data(t), &mut out)
                        .map_err(|e| anyhow::anyhow!("{d}: {}: {e}", t.name))?;
                    Ok(out)
                };
                pairs.push((l, p, LowRank { rank, cols, rows, a: read(ta)?, b: read(tb)? }));
            }
        }
        if pairs.is_empty() {
            bail!("{d} adapts none of this model's projections (blk.N.attn_q.weight.lora_a …)");
        }
        let rank = pairs[0].2.rank;
        // llama.cpp's rule: without an alpha the scale is the user's alone.
        let alpha = alpha.map_or(rank as f32, |a| a as f32);
        LoraAdapter::new(name, alpha, user_scale, cfg.n_layer, pairs).map_err(|e| anyhow::anyhow!("{d}: {e}"))
    }

    /// The pair adapting projection `p` of layer `layer`, if any.
    pub fn get(&self, layer: usize, p: Proj) -> Option<&LowRank> {
        self.layers.get(layer)?[p as usize].as_ref()
    }
}

/// The adapter of each row of a batch (from its sequence's).
pub(crate) struct LoraRows<'a> {
    rows: Vec<Option<&'a LoraAdapter>>,
}

impl<'a> LoraRows<'a> {
    pub fn new(seqs: &[SeqBatch<'a>]) -> LoraRows<'a> {
        if seqs.iter().all(|s| s.adapter.is_none()) {
            return LoraRows { rows: Vec::new() };
        }
        LoraRows { rows: seqs.iter().flat_map(|s| std::iter::repeat_n(s.adapter, s.tokens.len())).collect() }
    }

    /// Adds to `out` [n, p's out] each row's correction for projection `p`
    /// of `layer` from input `x` [n, p's in]; rows without an adapter (or
    /// whose adapter leaves `p` alone) are untouched.
    pub fn apply(&self, pool: &ThreadPool, layer: usize, p: Proj, x: &[f32], out: &mut [f32]) {
        if self.rows.iter().all(|a| a.and_then(|a| a.get(layer, p)).is_none()) {
            return;
        }
        let n = self.rows.len();
        let (cols, rows) = (x.len() / n, out.len() / n);
        let out_ptr = SharedMut::new(out.as_mut_ptr());
        pool.parallel_for(n, 1, &|range| {
            let mut t = Vec::new();
            for r in range {
                let Some((a, lr)) = self.rows[r].and_then(|a| Some((a, a.get(layer, p)?))) else { continue };
                // SAFETY: each row r is written by the one task that holds
                // it; rows r·rows .. (r+1)·rows lie inside `out`.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(r * rows), rows) };
                lr.add(a.scale, &x[r * cols..(r + 1) * cols], o, &mut t);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_gets_scale_b_a_x() {
        // A [2, 3], B [2, 2]: B·(A·x) by hand.
        let lr = LowRank { rank: 2, cols: 3, rows: 2, a: vec![1., 0., 2., 0., 1., -1.], b: vec![1., 1., 0., 3.] };
        let x = [1.0, 2.0, 3.0];
        // A·x = [7, -1]; scaled by 0.5: [3.5, -0.5]; B·t = [3.0, -1.5].
        let mut out = vec![10.0, 20.0];
        lr.add(0.5, &x, &mut out, &mut Vec::new());
        assert_eq!(out, vec![13.0, 18.5]);
    }
}
