//! LoRA adapters at inference, kept apart from the base weights so one base
//! serves many adapters in one batch (the S-LoRA / Punica idea, on CPU).
//!
//! An adapter holds, for some of a layer's seven projections (q, k, v, o,
//! gate, up, down), a low-rank pair A [r, in] and B [out, r]; the adapted
//! projection is `W·x + scale·B·(A·x)` with `scale = alpha / r × the user's
//! scale`, the pairs applied in f16 (half the bytes a step reads; see
//! `minnow_kernels::lowrank`). The base product runs once for every row of a batch
//! (`matmul_many`); then `LoraRows::apply` adds each row's correction for
//! the adapter of the sequence the row belongs to (or none).
//!
//! Two formats are read: llama.cpp's LoRA GGUF (`general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, tensors named after the
//! base tensor with `.lora_a` / `.lora_b`), which `llama-cli --lora` and
//! `llama-server --lora` read and `distill train --adapter-out` writes; and
//! Hugging Face PEFT's directory (`adapter_config.json` +
//! `adapter_model.safetensors`, Hugging Face tensor names), which
//! `distill train --peft-out` writes. The two differ in one more way than
//! names: llama.cpp stores a llama-family model's q and k rows permuted
//! (each head's two rotary halves interleaved), so a PEFT adapter's B rows
//! for q and k are permuted the same way on reading ([`hf_to_gguf_rows`])
//! and back on writing ([`gguf_to_hf_rows`]).

use crate::model::{ModelConfig, SeqBatch};
use minnow_gguf::{GgmlType, GgufFile};
use minnow_kernels::lowrank::{lowrank_add_group, GROUP};
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
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
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

/// One projection's adapter, kept only as the kernel reads it: A and Bᵀ
/// in f16 (a server holds many adapters; f32 copies would triple each).
#[derive(Debug, Clone)]
pub struct LowRank {
    pub rank: usize,
    /// The projection's input width.
    pub cols: usize,
    /// The projection's output width.
    pub rows: usize,
    /// A as f16 bits, [rank, cols].
    a16: Vec<u16>,
    /// Bᵀ as f16 bits, [rank, rows].
    bt16: Vec<u16>,
}

impl LowRank {
    /// A [rank, cols] and B [rows, rank], row-major.
    pub fn new(rank: usize, cols: usize, rows: usize, a: Vec<f32>, b: Vec<f32>) -> LowRank {
        assert!(a.len() == rank * cols && b.len() == rows * rank, "LowRank: A or B does not have its shape");
        let h = |v: f32| half::f16::from_f32(v).to_bits();
        let mut bt16 = vec![0u16; rows * rank];
        for o in 0..rows {
            for k in 0..rank {
                bt16[k * rows + o] = h(b[o * rank + k]);
            }
        }
        let a16 = a.iter().map(|&v| h(v)).collect();
        LowRank { rank, cols, rows, a16, bt16 }
    }

    /// A [rank, cols] as the kernel multiplies with it (rounded to f16).
    pub fn a(&self) -> Vec<f32> {
        self.a16.iter().map(|&v| half::f16::from_bits(v).to_f32()).collect()
    }

    /// B [rows, rank] as the kernel multiplies with it (rounded to f16).
    pub fn b(&self) -> Vec<f32> {
        let mut b = vec![0f32; self.rows * self.rank];
        for k in 0..self.rank {
            for o in 0..self.rows {
                b[o * self.rank + k] = half::f16::from_bits(self.bt16[k * self.rows + o]).to_f32();
            }
        }
        b
    }

    /// `out += scale · B·(A·x)` for one row (A and B rounded to f16).
    #[cfg(test)]
    fn add(&self, scale: f32, x: &[f32], out: &mut [f32], t: &mut Vec<f32>) {
        minnow_kernels::lowrank::lowrank_add(&self.a16, &self.bt16, self.rank, scale, x, out, t);
    }
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
                pairs.push((l, p, LowRank::new(rank, cols, rows, read(ta)?, read(tb)?)));
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

    /// Reads an adapter from `path`: a PEFT directory or a LoRA GGUF file.
    pub fn open(path: &Path, name: &str, user_scale: f32, cfg: &ModelConfig) -> anyhow::Result<LoraAdapter> {
        if path.is_dir() {
            LoraAdapter::load_peft(path, name, user_scale, cfg)
        } else {
            LoraAdapter::load(path, name, user_scale, cfg)
        }
    }

    /// Reads a Hugging Face PEFT LoRA directory made for a model of `cfg`
    /// (`adapter_config.json`: `r`, `lora_alpha`, `use_rslora`;
    /// `adapter_model.safetensors`: `…layers.N.self_attn.q_proj.lora_A.weight`
    /// [r, in] and `lora_B` [out, r] in F32, F16 or BF16).
    pub fn load_peft(dir: &Path, name: &str, user_scale: f32, cfg: &ModelConfig) -> anyhow::Result<LoraAdapter> {
        use anyhow::{bail, Context};
        let d = dir.display();
        let conf: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("adapter_config.json")).with_context(|| format!("{d}: adapter_config.json"))?,
        )
        .with_context(|| format!("{d}: adapter_config.json is not JSON"))?;
        if conf.get("peft_type").and_then(|v| v.as_str()).is_some_and(|t| t != "LORA") {
            bail!("{d} is a {} adapter; only LoRA is supported", conf["peft_type"]);
        }
        if conf.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            bail!("{d} is a DoRA adapter; only plain LoRA is supported");
        }
        for per_module in ["rank_pattern", "alpha_pattern"] {
            if conf.get(per_module).and_then(|v| v.as_object()).is_some_and(|m| !m.is_empty()) {
                bail!("{d}: `{per_module}` gives modules their own rank or alpha; minnow reads adapters with one `r` and `lora_alpha`");
            }
        }
        let r = conf.get("r").and_then(|v| v.as_u64()).context(format!("{d}: adapter_config.json has no `r`"))?;
        let alpha = conf.get("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(r as f64) as f32;
        let rslora = conf.get("use_rslora").and_then(|v| v.as_bool()) == Some(true);
        let bytes = std::fs::read(dir.join("adapter_model.safetensors"))
            .with_context(|| format!("{d}: adapter_model.safetensors"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{d}: adapter_model.safetensors: {e}"))?;
        let mut pairs = Vec::new();
        let mut used = 0;
        for l in 0..cfg.n_layer {
            for p in Proj::ALL {
                let stem = peft_stem(l, p);
                let find = |ab: &str| {
                    st.names()
                        .into_iter()
                        .find(|n| n.ends_with(&format!("{stem}.lora_{ab}.weight")))
                        .map(str::to_string)
                };
                let (na, nb) = match (find("A"), find("B")) {
                    (None, None) => continue,
                    (Some(a), Some(b)) => (a, b),
                    _ => bail!("{d}: {stem} has only one of lora_A and lora_B"),
                };
                used += 2;
                let (rows, cols) = p.shape(cfg);
                let read = |n: &str| -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
                    let t = st.tensor(n).map_err(|e| anyhow::anyhow!("{d}: {n}: {e}"))?;
                    let v = match t.dtype() {
                        safetensors::Dtype::F32 => {
                            t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
                        }
                        safetensors::Dtype::F16 => {
                            t.data().chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
                        }
                        safetensors::Dtype::BF16 => {
                            t.data().chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
                        }
                        other => bail!("{d}: {n} is {other:?}; adapters are read in F32, F16 or BF16"),
                    };
                    Ok((t.shape().to_vec(), v))
                };
                let ((sa, a), (sb, mut b)) = (read(&na)?, read(&nb)?);
                let rank = r as usize;
                if sa != [rank, cols] || sb != [rows, rank] {
                    bail!("{d}: {stem} adapter shapes {sa:?} and {sb:?} do not fit this model's {rows}×{cols} weight");
                }
                if let Some(heads) = permuted_heads(cfg, p) {
                    b = hf_to_gguf_rows(&b, heads, rank);
                }
                pairs.push((l, p, LowRank::new(rank, cols, rows, a, b)));
            }
        }
        if pairs.is_empty() {
            bail!("{d} adapts none of this model's projections (…layers.N.self_attn.q_proj.lora_A.weight …)");
        }
        if used != st.names().len() {
            bail!("{d} holds tensors this {} model has no place for (more layers, or other modules)", cfg.arch.name());
        }
        // rsLoRA scales by alpha/sqrt(r) where plain LoRA takes alpha/r.
        let alpha = if rslora { alpha * (r as f32).sqrt() } else { alpha };
        LoraAdapter::new(name, alpha, user_scale, cfg.n_layer, pairs).map_err(|e| anyhow::anyhow!("{d}: {e}"))
    }

    /// The pair adapting projection `p` of layer `layer`, if any.
    pub fn get(&self, layer: usize, p: Proj) -> Option<&LowRank> {
        self.layers.get(layer)?[p as usize].as_ref()
    }
}

/// Hugging Face's module path of projection `p` in layer `layer`
/// (`model.layers.3.self_attn.q_proj`), as PEFT names its tensors (after
/// its `base_model.model.` prefix).
pub fn peft_stem(layer: usize, p: Proj) -> String {
    let m = match p {
        Proj::Q => "self_attn.q_proj",
        Proj::K => "self_attn.k_proj",
        Proj::V => "self_attn.v_proj",
        Proj::O => "self_attn.o_proj",
        Proj::Gate => "mlp.gate_proj",
        Proj::Up => "mlp.up_proj",
        Proj::Down => "mlp.down_proj",
    };
    format!("model.layers.{layer}.{m}")
}

/// The PEFT module name of projection `p` (`q_proj`), for `target_modules`.
pub fn peft_module(p: Proj) -> &'static str {
    match p {
        Proj::Q => "q_proj",
        Proj::K => "k_proj",
        Proj::V => "v_proj",
        Proj::O => "o_proj",
        Proj::Gate => "gate_proj",
        Proj::Up => "up_proj",
        Proj::Down => "down_proj",
    }
}

/// For a projection whose output rows llama.cpp stores permuted (q and k of
/// the llama architecture, whose rotary pairs are interleaved in GGUF), the
/// number of heads it has; `None` for the others.
pub fn permuted_heads(cfg: &ModelConfig, p: Proj) -> Option<usize> {
    if cfg.arch != crate::model::Arch::Llama {
        return None;
    }
    match p {
        Proj::Q => Some(cfg.n_head),
        Proj::K => Some(cfg.n_head_kv),
        _ => None,
    }
}

/// Rows [heads × head_dim, width] from Hugging Face's order (per head, the
/// first rotary half, then the second) to llama.cpp's (the halves
/// interleaved): GGUF row `h·hd + 2i + j` is HF row `h·hd + j·hd/2 + i`.
pub fn hf_to_gguf_rows(m: &[f32], heads: usize, width: usize) -> Vec<f32> {
    permute_rows(m, heads, width, true)
}

/// The inverse of [`hf_to_gguf_rows`].
pub fn gguf_to_hf_rows(m: &[f32], heads: usize, width: usize) -> Vec<f32> {
    permute_rows(m, heads, width, false)
}

fn permute_rows(m: &[f32], heads: usize, width: usize, to_gguf: bool) -> Vec<f32> {
    let rows = m.len() / width;
    let hd = rows / heads;
    let mut out = vec![0f32; m.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let (g, f) = (h * hd + 2 * i + j, h * hd + j * (hd / 2) + i);
                let (dst, src) = if to_gguf { (g, f) } else { (f, g) };
                out[dst * width..(dst + 1) * width].copy_from_slice(&m[src * width..(src + 1) * width]);
            }
        }
    }
    out
}

/// Multiply-adds below which a projection's corrections run on the calling
/// thread: about 30 µs of work, a few pool hand-offs' worth.
const SERIAL_WORK: usize = 1 << 17;

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
        self.apply_many(pool, layer, x, [(p, out)]);
    }

    /// [`apply`](Self::apply) for several projections of the same input
    /// (q, k, v; gate, up), in one hand-off to the pool.
    pub fn apply_many<const K: usize>(
        &self,
        pool: &ThreadPool,
        layer: usize,
        x: &[f32],
        outs: [(Proj, &mut [f32]); K],
    ) {
        let outs: Vec<(Proj, SharedMut<f32>, usize)> = outs
            .into_iter()
            .filter(|(p, _)| self.rows.iter().any(|a| a.and_then(|a| a.get(layer, *p)).is_some()))
            .map(|(p, o)| (p, SharedMut::new(o.as_mut_ptr()), o.len() / self.rows.len()))
            .collect();
        if outs.is_empty() {
            return;
        }
        let n = self.rows.len();
        let cols = x.len() / n;
        // Rows grouped by adapter (in row order within each), cut into
        // groups of up to GROUP: a group reads its adapter's pair once for
        // all its rows.
        let mut by_adapter: Vec<(*const LoraAdapter, Vec<usize>)> = Vec::new();
        for (r, a) in self.rows.iter().enumerate() {
            let Some(a) = a else { continue };
            let key = *a as *const LoraAdapter;
            match by_adapter.iter_mut().find(|(k, _)| *k == key) {
                Some((_, rows)) => rows.push(r),
                None => by_adapter.push((key, vec![r])),
            }
        }
        let groups: Vec<&[usize]> = by_adapter.iter().flat_map(|(_, rows)| rows.chunks(GROUP)).collect();
        // Task i: group i % groups.len() of projection i / groups.len().
        let n_groups = groups.len();
        let run = |range: std::ops::Range<usize>| {
            for i in range {
                let (group, (p, ptr, rows)) = (groups[i % n_groups], outs[i / n_groups]);
                let a = self.rows[group[0]].expect("grouped rows have an adapter");
                let Some(lr) = a.get(layer, p) else { continue };
                let xs: Vec<&[f32]> = group.iter().map(|&r| &x[r * cols..(r + 1) * cols]).collect();
                // SAFETY: each (projection, row) is written by the one task
                // whose group holds the row; rows r·rows .. (r+1)·rows lie
                // inside that projection's output and differ between rows.
                let mut os: Vec<&mut [f32]> = group
                    .iter()
                    .map(|&r| unsafe { std::slice::from_raw_parts_mut(ptr.get().add(r * rows), rows) })
                    .collect();
                lowrank_add_group(&lr.a16, &lr.bt16, lr.rank, a.scale, &xs, &mut os);
            }
        };
        // A few rows' corrections cost less than handing them to the pool.
        let per_row: usize = outs.iter().map(|&(_, _, rows)| cols + rows).sum();
        let work: usize = self.rows.iter().flatten().map(|a| a.rank * per_row).sum();
        if work < SERIAL_WORK || n_groups * outs.len() == 1 {
            run(0..n_groups * outs.len());
        } else {
            pool.parallel_for(n_groups * outs.len(), 1, &run);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_permutation_round_trips_and_interleaves_halves() {
        // 2 heads of head_dim 4, width 1: HF rows [h0: a0 a1 | b0 b1, h1: ...].
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let g = hf_to_gguf_rows(&hf, 2, 1);
        assert_eq!(g, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(gguf_to_hf_rows(&g, 2, 1), hf);
        let wide: Vec<f32> = (0..48).map(|x| x as f32 * 0.5).collect();
        assert_eq!(gguf_to_hf_rows(&hf_to_gguf_rows(&wide, 3, 2), 3, 2), wide);
    }

    #[test]
    fn a_row_gets_scale_b_a_x() {
        // A [2, 3], B [2, 2]: B·(A·x) by hand.
        let lr = LowRank::new(2, 3, 2, vec![1., 0., 2., 0., 1., -1.], vec![1., 1., 0., 3.]);
        let x = [1.0, 2.0, 3.0];
        // A·x = [7, -1]; scaled by 0.5: [3.5, -0.5]; B·t = [3.0, -1.5].
        let mut out = vec![10.0, 20.0];
        lr.add(0.5, &x, &mut out, &mut Vec::new());
        assert_eq!(out, vec![13.0, 18.5]);
    }
}
