//! The llama family: Llama / SmolLM2 (`llama`) and Qwen2 / Qwen2.5 (`qwen2`).
//!
//! Pre-norm blocks: `x += attn(norm(x))`, `x += ffn(norm(x))` with a SiLU-gated
//! FFN. Qwen2 adds biases to the q/k/v projections and rotates NEOX-style
//! (pairs i, i + d/2); Llama rotates adjacent pairs.

use super::config::{Arch, ModelConfig};
use super::transformer::{
    embed, norm_rows, output_logits, Activation, Attention, AttentionShape, Ffn, RowLayout, SeqBatch,
};
use super::weights::{Matrix, TensorLoader};
use super::ModelError;
use minnow_kernels::ops::{add_inplace, Rope};
use minnow_kernels::pool::ThreadPool;

struct Layer {
    attn_norm: Vec<f32>,
    attn: Attention,
    ffn_norm: Vec<f32>,
    ffn: Ffn,
}

pub struct Llama {
    cfg: ModelConfig,
    tok_embd: Matrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// The output head, or the embedding table when the two are tied.
    output: Matrix,
    rope: Rope,
}

impl Llama {
    pub fn load(cfg: ModelConfig, t: &TensorLoader) -> Result<Llama, ModelError> {
        let (e, v) = (cfg.n_embd, cfg.vocab_size);
        let tok_embd = t.matrix("token_embd.weight", v, e)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = |name: &str| format!("blk.{l}.{name}");
            let bias = if cfg.arch == Arch::Qwen2 {
                Some((
                    t.vector(&p("attn_q.bias"), cfg.q_dim())?,
                    t.vector(&p("attn_k.bias"), cfg.kv_dim())?,
                    t.vector(&p("attn_v.bias"), cfg.kv_dim())?,
                ))
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: t.vector(&p("attn_norm.weight"), e)?,
                attn: Attention {
                    wq: t.matrix(&p("attn_q.weight"), cfg.q_dim(), e)?,
                    wk: t.matrix(&p("attn_k.weight"), cfg.kv_dim(), e)?,
                    wv: t.matrix(&p("attn_v.weight"), cfg.kv_dim(), e)?,
                    wo: t.matrix(&p("attn_output.weight"), e, cfg.q_dim())?,
                    bias,
                    qk_norm: None,
                },
                ffn_norm: t.vector(&p("ffn_norm.weight"), e)?,
                ffn: Ffn {
                    gate: t.matrix(&p("ffn_gate.weight"), cfg.n_ff, e)?,
                    up: t.matrix(&p("ffn_up.weight"), cfg.n_ff, e)?,
                    down: t.matrix(&p("ffn_down.weight"), e, cfg.n_ff)?,
                },
            });
        }
        let output_norm = t.vector("output_norm.weight", e)?;
        let output = if t.has("output.weight") {
            t.matrix("output.weight", v, e)?
        } else {
            t.matrix("token_embd.weight", v, e)?
        };
        let rope = Rope::new(cfg.n_rot, cfg.rope_base, cfg.arch == Arch::Qwen2);
        Ok(Llama { cfg, tok_embd, layers, output_norm, output, rope })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn forward(&self, pool: &ThreadPool, seqs: &mut [SeqBatch]) -> Result<Vec<Vec<f32>>, ModelError> {
        let cfg = &self.cfg;
        let layout = RowLayout::new(seqs);
        let n = layout.n_rows();
        // x: the residual stream, [n, n_embd]
        let mut x = embed(&self.tok_embd, seqs.iter().flat_map(|s| s.tokens.iter().copied()), 1.0)?;
        let shape = AttentionShape {
            n_head: cfg.n_head,
            n_head_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
            rope: &self.rope,
            eps: cfg.norm_eps,
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
            window: None,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let h = norm_rows(&x, &layer.attn_norm, cfg.norm_eps);
            let a = layer.attn.forward(pool, l, &shape, &h, &layout, seqs)?;
            add_inplace(&mut x, &a);
            let h = norm_rows(&x, &layer.ffn_norm, cfg.norm_eps);
            let f = layer.ffn.forward(pool, Activation::Silu, &h, n)?;
            add_inplace(&mut x, &f);
        }
        output_logits(pool, &x, cfg.n_embd, &self.output_norm, cfg.norm_eps, &self.output, &layout, seqs)
    }
}
