//! The llama family: Llama / SmolLM2 (`llama`), Qwen2 / Qwen2.5 (`qwen2`),
//! and their mixture-of-experts variants: Mixtral (`llama` with
//! `expert_count` > 0), Qwen2-MoE (`qwen2moe`) and Qwen3-MoE (`qwen3moe`).
//!
//! Pre-norm blocks: `x += attn(norm(x))`, `x += ffn(norm(x))` with a SiLU-gated
//! FFN, dense or a mixture of experts (`moe.rs`). Qwen2 and Qwen2-MoE add
//! biases to the q/k/v projections; Qwen3-MoE RMS-normalises each query and
//! key head and has a head width of its own (so the query width need not be
//! n_embd). The Qwen families rotate NEOX-style (pairs i, i + d/2); Llama
//! rotates adjacent pairs.
//!
//! The MoE variants live here rather than in a file of their own because
//! they differ from their dense relatives only in which attention options
//! are on and in the FFN of each layer: one forward pass with an FFN that is
//! either kind reads better than two copies of it.

use super::config::{Arch, ModelConfig};
use super::moe::{MoeFfn, RouterStats};
use super::transformer::{
    embed_into, norm_rows_into, output_logits, Activation, Attention, AttentionShape, Ffn, RowLayout, RunState,
    SeqBatch,
};
use super::weights::{embedding_and_head, Matrix, TensorLoader};
use super::ModelError;
use crate::lora::LoraRows;
use minnow_kernels::ops::{add_inplace, Rope};
use minnow_kernels::pool::ThreadPool;
use std::sync::Arc;

/// A layer's feed-forward network.
#[allow(clippy::large_enum_variant, reason = "one per layer: boxing would save nothing that matters")]
enum FfnKind {
    Dense(Ffn),
    Moe(MoeFfn),
}

struct Layer {
    attn_norm: Vec<f32>,
    attn: Attention,
    ffn_norm: Vec<f32>,
    ffn: FfnKind,
}

pub struct Llama {
    cfg: ModelConfig,
    /// The embedding table (shared with `output` when the two are tied).
    tok_embd: Arc<Matrix>,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// The output head, or the embedding table when the two are tied.
    output: Arc<Matrix>,
    rope: Rope,
}

impl Llama {
    pub fn load(cfg: ModelConfig, t: &TensorLoader) -> Result<Llama, ModelError> {
        let (e, v) = (cfg.n_embd, cfg.vocab_size);
        let (tok_embd, output) = embedding_and_head(t, v, e)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = |name: &str| format!("blk.{l}.{name}");
            let bias = if matches!(cfg.arch, Arch::Qwen2 | Arch::Qwen2Moe) {
                Some((
                    t.vector(&p("attn_q.bias"), cfg.q_dim())?,
                    t.vector(&p("attn_k.bias"), cfg.kv_dim())?,
                    t.vector(&p("attn_v.bias"), cfg.kv_dim())?,
                ))
            } else {
                None
            };
            let qk_norm = if cfg.arch == Arch::Qwen3Moe {
                let hd = cfg.head_dim;
                Some((t.vector(&p("attn_q_norm.weight"), hd)?, t.vector(&p("attn_k_norm.weight"), hd)?))
            } else {
                None
            };
            let ffn = match &cfg.moe {
                Some(moe) => FfnKind::Moe(MoeFfn::load(t, l, e, moe)?),
                None => FfnKind::Dense(Ffn {
                    gate: t.matrix(&p("ffn_gate.weight"), cfg.n_ff, e)?,
                    up: t.matrix(&p("ffn_up.weight"), cfg.n_ff, e)?,
                    down: t.matrix(&p("ffn_down.weight"), e, cfg.n_ff)?,
                }),
            };
            layers.push(Layer {
                attn_norm: t.vector(&p("attn_norm.weight"), e)?,
                attn: Attention {
                    wq: t.matrix(&p("attn_q.weight"), cfg.q_dim(), e)?,
                    wk: t.matrix(&p("attn_k.weight"), cfg.kv_dim(), e)?,
                    wv: t.matrix(&p("attn_v.weight"), cfg.kv_dim(), e)?,
                    wo: t.matrix(&p("attn_output.weight"), e, cfg.q_dim())?,
                    bias,
                    qk_norm,
                },
                ffn_norm: t.vector(&p("ffn_norm.weight"), e)?,
                ffn,
            });
        }
        let output_norm = t.vector("output_norm.weight", e)?;
        let neox = matches!(cfg.arch, Arch::Qwen2 | Arch::Qwen2Moe | Arch::Qwen3Moe);
        let rope = Rope::new(cfg.n_rot, cfg.rope_base, neox);
        Ok(Llama { cfg, tok_embd, layers, output_norm, output, rope })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub(crate) fn output_head(&self) -> &Matrix {
        &self.output
    }

    /// Routing counts of every MoE layer, `None` for a dense model.
    pub fn router_stats(&self) -> Option<RouterStats> {
        let moe = self.cfg.moe.as_ref()?;
        let counts = self
            .layers
            .iter()
            .map(|layer| match &layer.ffn {
                FfnKind::Moe(m) => m.counts(),
                FfnKind::Dense(_) => Vec::new(),
            })
            .collect();
        Some(RouterStats { experts_per_token: moe.n_expert_used, counts })
    }

    pub fn reset_router_stats(&self) {
        for layer in &self.layers {
            if let FfnKind::Moe(m) = &layer.ffn {
                m.reset_counts();
            }
        }
    }

    /// The forward pass of the batch `seqs` laid out as `layout`, on the
    /// activation buffers `st`.
    pub fn forward(
        &self,
        pool: &ThreadPool,
        seqs: &mut [SeqBatch],
        layout: &RowLayout,
        st: &mut RunState,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let cfg = &self.cfg;
        let n = layout.n_rows();
        // st.x: the residual stream, [n, n_embd]
        embed_into(&self.tok_embd, seqs.iter().flat_map(|s| s.tokens.iter().copied()), 1.0, &mut st.x)?;
        let angles = self.rope.angles(&layout.positions());
        let shape = AttentionShape {
            n_head: cfg.n_head,
            n_head_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
            rope: &angles,
            eps: cfg.norm_eps,
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
            window: None,
        };
        let lora = LoraRows::new(seqs);
        for (l, layer) in self.layers.iter().enumerate() {
            norm_rows_into(&st.x, &layer.attn_norm, cfg.norm_eps, &mut st.h);
            layer.attn.forward(pool, l, &shape, st, layout, seqs, &lora)?;
            add_inplace(&mut st.x, &st.out);
            norm_rows_into(&st.x, &layer.ffn_norm, cfg.norm_eps, &mut st.h);
            match &layer.ffn {
                FfnKind::Dense(ffn) => {
                    let gate_up = [&mut st.gate, &mut st.up];
                    ffn.forward_into(pool, Activation::Silu, &st.h, n, gate_up, &mut st.out, Some((&lora, l)))?
                }
                FfnKind::Moe(moe) => st.out = moe.forward(pool, &st.h, n)?,
            }
            add_inplace(&mut st.x, &st.out);
        }
        output_logits(pool, &st.x, cfg.n_embd, &self.output_norm, cfg.norm_eps, &self.output, layout, seqs)
    }
}
