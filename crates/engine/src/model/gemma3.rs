//! Gemma 3.
//!
//! Differences from the llama family: embeddings scaled by √n_embd; per-head
//! RMSNorm of queries and keys; RMSNorm after attention and after the FFN as
//! well as before; a GELU-gated FFN; and five sliding-window (local) layers
//! for every global one, the local layers with their own RoPE base.

use super::config::ModelConfig;
use super::transformer::{
    embed_into, norm_rows_into, output_logits, Activation, Attention, AttentionShape, Ffn, RowLayout, RunState,
    SeqBatch,
};
use super::weights::{embedding_and_head, Matrix, TensorLoader};
use super::ModelError;
use crate::lora::LoraRows;
use minnow_kernels::ops::{add_inplace, rms_norm_inplace, Rope};
use minnow_kernels::pool::ThreadPool;
use std::sync::Arc;

struct Layer {
    attn_norm: Vec<f32>,
    attn: Attention,
    post_attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    ffn: Ffn,
    post_ffn_norm: Vec<f32>,
}

pub struct Gemma3 {
    cfg: ModelConfig,
    /// The embedding table (shared with `output` when the two are tied).
    tok_embd: Arc<Matrix>,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    output: Arc<Matrix>,
    rope_global: Rope,
    rope_local: Rope,
}

impl Gemma3 {
    pub fn load(cfg: ModelConfig, t: &TensorLoader) -> Result<Gemma3, ModelError> {
        let (e, v, hd) = (cfg.n_embd, cfg.vocab_size, cfg.head_dim);
        let (tok_embd, output) = embedding_and_head(t, v, e)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = |name: &str| format!("blk.{l}.{name}");
            layers.push(Layer {
                attn_norm: t.vector(&p("attn_norm.weight"), e)?,
                attn: Attention {
                    wq: t.matrix(&p("attn_q.weight"), cfg.q_dim(), e)?,
                    wk: t.matrix(&p("attn_k.weight"), cfg.kv_dim(), e)?,
                    wv: t.matrix(&p("attn_v.weight"), cfg.kv_dim(), e)?,
                    wo: t.matrix(&p("attn_output.weight"), e, cfg.q_dim())?,
                    bias: None,
                    qk_norm: Some((t.vector(&p("attn_q_norm.weight"), hd)?, t.vector(&p("attn_k_norm.weight"), hd)?)),
                },
                post_attn_norm: t.vector(&p("post_attention_norm.weight"), e)?,
                ffn_norm: t.vector(&p("ffn_norm.weight"), e)?,
                ffn: Ffn {
                    gate: t.matrix(&p("ffn_gate.weight"), cfg.n_ff, e)?,
                    up: t.matrix(&p("ffn_up.weight"), cfg.n_ff, e)?,
                    down: t.matrix(&p("ffn_down.weight"), e, cfg.n_ff)?,
                },
                post_ffn_norm: t.vector(&p("post_ffw_norm.weight"), e)?,
            });
        }
        let output_norm = t.vector("output_norm.weight", e)?;
        let rope_global = Rope::new(cfg.n_rot, cfg.rope_base, true);
        let rope_local = Rope::new(cfg.n_rot, cfg.rope_base_local, true);
        Ok(Gemma3 { cfg, tok_embd, layers, output_norm, output, rope_global, rope_local })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub(crate) fn output_head(&self) -> &Matrix {
        &self.output
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
        let e = cfg.n_embd;
        // st.x: the residual stream, [n, n_embd]
        let scale = (e as f32).sqrt();
        embed_into(&self.tok_embd, seqs.iter().flat_map(|s| s.tokens.iter().copied()), scale, &mut st.x)?;
        let positions = layout.positions();
        let (angles_local, angles_global) = (self.rope_local.angles(&positions), self.rope_global.angles(&positions));
        let lora = LoraRows::new(seqs);
        for (l, layer) in self.layers.iter().enumerate() {
            let local = cfg.is_sliding(l);
            let shape = AttentionShape {
                n_head: cfg.n_head,
                n_head_kv: cfg.n_head_kv,
                head_dim: cfg.head_dim,
                rope: if local { &angles_local } else { &angles_global },
                eps: cfg.norm_eps,
                scale: 1.0 / (cfg.head_dim as f32).sqrt(),
                window: if local { cfg.sliding_window } else { None },
            };
            norm_rows_into(&st.x, &layer.attn_norm, cfg.norm_eps, &mut st.h);
            layer.attn.forward(pool, l, &shape, st, layout, seqs, &lora)?;
            st.out.chunks_exact_mut(e).for_each(|r| rms_norm_inplace(r, &layer.post_attn_norm, cfg.norm_eps));
            add_inplace(&mut st.x, &st.out);
            norm_rows_into(&st.x, &layer.ffn_norm, cfg.norm_eps, &mut st.h);
            let gate_up = [&mut st.gate, &mut st.up];
            layer.ffn.forward_into(pool, Activation::GeluTanh, &st.h, n, gate_up, &mut st.out, Some((&lora, l)))?;
            st.out.chunks_exact_mut(e).for_each(|r| rms_norm_inplace(r, &layer.post_ffn_norm, cfg.norm_eps));
            add_inplace(&mut st.x, &st.out);
        }
        output_logits(pool, &st.x, e, &self.output_norm, cfg.norm_eps, &self.output, layout, seqs)
    }
}
