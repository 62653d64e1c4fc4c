//! The pieces every architecture family shares, written once: the batch a
//! forward pass runs on, token embedding, attention (projections, optional
//! biases and q/k norms, RoPE, KV cache, causal or sliding-window softmax
//! attention), the gated feed-forward network, and the output head.
//!
//! All activations are row-major `[n_rows, width]` f32 buffers, one row per
//! token of the batch; a batch may hold tokens of several sequences.

use super::weights::Matrix;
use super::ModelError;
use crate::kv_cache::KvCache;
use crate::lora::{LoraAdapter, LoraRows, Proj};
use minnow_kernels::attention_batch::{attend_batch, Heads};
use minnow_kernels::matmul::{matmul, matmul_each, matmul_many, ActBuffer, Product, QMatrix};
use minnow_kernels::ops::{self, RopeAngles};
use minnow_kernels::pool::ThreadPool;
use std::cell::RefCell;
use std::ops::RangeInclusive;

/// Which logits a sequence of a batch wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (prompt chunks whose logits nobody reads).
    None,
    /// The last token's only (generation).
    Last,
    /// Every token's (perplexity, speculative verification).
    All,
    /// Not logits: the last token's final hidden state after the output
    /// norm, shape `[n_embd]`, for a caller that applies (part of) the output
    /// head itself ([`super::Model::output_head`]; a draft model scoring
    /// only the tokens it is likely to draft).
    Hidden,
}

/// One sequence's part of a batched forward pass.
pub struct SeqBatch<'a> {
    /// New tokens; they take positions `cache.len() ..`.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: Logits,
    /// The LoRA adapter this sequence runs with (`None`: the base model).
    pub adapter: Option<&'a LoraAdapter>,
}

/// Where each row of the batch belongs.
pub(crate) struct RowLayout {
    /// (sequence index, position) of each row, shape [n_rows].
    pub rows: Vec<(usize, usize)>,
    /// First row of each sequence, shape [n_seqs + 1].
    pub seq_start: Vec<usize>,
}

impl RowLayout {
    pub fn new(seqs: &[SeqBatch]) -> RowLayout {
        let mut rows = Vec::new();
        let mut seq_start = vec![0];
        for (s, seq) in seqs.iter().enumerate() {
            let start = seq.cache.len();
            rows.extend((0..seq.tokens.len()).map(|i| (s, start + i)));
            seq_start.push(rows.len());
        }
        RowLayout { rows, seq_start }
    }

    pub fn n_rows(&self) -> usize {
        self.rows.len()
    }

    /// Each row's position in its sequence, shape [n_rows].
    pub fn positions(&self) -> Vec<usize> {
        self.rows.iter().map(|&(_, pos)| pos).collect()
    }
}

thread_local! {
    /// Quantized-activation scratch of the thread that calls `mm`.
    static ACTS: RefCell<ActBuffer> = RefCell::new(ActBuffer::default());
    /// The same for `mm_many`, one buffer per matrix.
    static ACTS_MANY: RefCell<Vec<ActBuffer>> = const { RefCell::new(Vec::new()) };
}

/// The activations of a forward pass (llama2.c's `RunState`), shapes for a
/// batch of `n` rows. A thread's first forward pass allocates them and every
/// layer of every later one reuses them (growing them for a larger batch),
/// so a decode step allocates no activations per layer and prompt chunks do
/// not fault fresh pages in for every layer. Each thread that runs forward
/// passes has its own ([`with_run_state`]).
#[derive(Default)]
pub(crate) struct RunState {
    /// The residual stream, [n, n_embd].
    pub x: Vec<f32>,
    /// A block's normed input, [n, n_embd].
    pub h: Vec<f32>,
    /// Queries, [n, n_head × head_dim].
    pub q: Vec<f32>,
    /// New keys and values, [n, n_head_kv × head_dim] each.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Attention output before its projection, [n, n_head × head_dim].
    pub att: Vec<f32>,
    /// FFN gate (then the gated activation) and up, [n, n_ff] each.
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    /// A block's output (attention projection, FFN or MoE), [n, n_embd].
    pub out: Vec<f32>,
}

thread_local! {
    static RUN_STATE: RefCell<RunState> = RefCell::new(RunState::default());
}

/// Runs `f` with this thread's [`RunState`].
pub(crate) fn with_run_state<R>(f: impl FnOnce(&mut RunState) -> R) -> R {
    RUN_STATE.with(|st| match st.try_borrow_mut() {
        Ok(mut st) => f(&mut st),
        // A forward pass inside another on the same thread (none does
        // this today) gets buffers of its own rather than a panic.
        Err(_) => f(&mut RunState::default()),
    })
}

/// `buf` resized to `len` floats (its capacity kept), for a kernel that
/// writes every element.
fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    buf
}

/// `out = x · Wᵀ` for `n` rows: x [n, w.cols] → out [n, w.rows].
pub(crate) fn mm(pool: &ThreadPool, w: &Matrix, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
    mm_q(pool, &w.q(), x, n)
}

/// [`mm`] into `out` (resized to [n, w.rows]).
pub(crate) fn mm_into(
    pool: &ThreadPool,
    w: &Matrix,
    x: &[f32],
    n: usize,
    out: &mut Vec<f32>,
) -> Result<(), ModelError> {
    let w = w.q();
    let out = sized(out, n * w.rows);
    ACTS.with(|acts| matmul(pool, &w, x, n, out, &mut acts.borrow_mut())).map_err(ModelError::from)
}

/// `mm` for a matrix given as the kernels see it (e.g. one expert's slice of
/// a 3-D expert tensor).
pub(crate) fn mm_q(pool: &ThreadPool, w: &QMatrix, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
    let mut out = vec![0f32; n * w.rows];
    ACTS.with(|acts| matmul(pool, w, x, n, &mut out, &mut acts.borrow_mut())).map_err(ModelError::from)?;
    Ok(out)
}

/// `mm` of several matrices with the same input `x` [n, cols], in one job
/// of the pool (`matmul_many`), into `outs` (each resized to [n, w.rows]).
pub(crate) fn mm_many_into<const K: usize>(
    pool: &ThreadPool,
    ws: [&Matrix; K],
    x: &[f32],
    n: usize,
    outs: [&mut Vec<f32>; K],
) -> Result<(), ModelError> {
    let qs = ws.map(|w| w.q());
    let refs: [&QMatrix; K] = std::array::from_fn(|i| &qs[i]);
    let mut i = 0;
    let mut slices: [&mut [f32]; K] = outs.map(|o| {
        let s = sized(o, n * qs[i].rows);
        i += 1;
        s
    });
    matmul_many_acts(pool, x, n, &refs, &mut slices)
}

/// `matmul_many` with this thread's activation buffers.
fn matmul_many_acts<const K: usize>(
    pool: &ThreadPool,
    x: &[f32],
    n: usize,
    refs: &[&QMatrix; K],
    slices: &mut [&mut [f32]; K],
) -> Result<(), ModelError> {
    ACTS_MANY
        .with(|acts| {
            let mut acts = acts.borrow_mut();
            if acts.len() < K {
                acts.resize_with(K, ActBuffer::default);
            }
            matmul_many(pool, x, n, refs, slices, &mut acts)
        })
        .map_err(ModelError::from)
}

/// Several products, each with its own input, in one job of the pool
/// (`matmul_each`), with this thread's activation buffers: e.g. every
/// chosen expert's gate and up, then every chosen expert's down.
pub(crate) fn mm_each(pool: &ThreadPool, products: &mut [Product]) -> Result<(), ModelError> {
    ACTS_MANY
        .with(|acts| {
            let mut acts = acts.borrow_mut();
            if acts.len() < products.len() {
                acts.resize_with(products.len(), ActBuffer::default);
            }
            matmul_each(pool, products, &mut acts)
        })
        .map_err(ModelError::from)
}

/// Adds `bias` to every row of `x`.
pub(crate) fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        ops::add_inplace(row, bias);
    }
}

/// RMSNorm of every row of `x` with weight `w` → new buffer.
pub(crate) fn norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::new();
    norm_rows_into(x, w, eps, &mut out);
    out
}

/// [`norm_rows`] into `out` (resized to `x`'s length).
pub(crate) fn norm_rows_into(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    for (o, r) in sized(out, x.len()).chunks_exact_mut(w.len()).zip(x.chunks_exact(w.len())) {
        ops::rms_norm(r, w, eps, o);
    }
}

/// Looks up the embedding rows of `tokens` into `out`, [n, n_embd].
pub(crate) fn embed_into(
    table: &Matrix,
    tokens: impl Iterator<Item = u32>,
    scale: f32,
    out: &mut Vec<f32>,
) -> Result<(), ModelError> {
    out.clear();
    let mut row = vec![0f32; table.cols];
    for t in tokens {
        if t as usize >= table.rows {
            return Err(ModelError::new(format!("token id {t} is outside the vocabulary of {} tokens", table.rows)));
        }
        table.row_f32(t as usize, &mut row)?;
        if scale != 1.0 {
            row.iter_mut().for_each(|v| *v *= scale);
        }
        out.extend_from_slice(&row);
    }
    Ok(())
}

/// Weights of one attention block.
pub(crate) struct Attention {
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    /// Biases of the projections (Qwen2), shapes [q_dim], [kv_dim], [kv_dim].
    pub bias: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    /// Per-head RMSNorm weights of queries and keys, shape [head_dim] (Gemma 3).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
}

/// Shape and position encoding of one attention layer.
pub(crate) struct AttentionShape<'a> {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// The rotation of each row of the batch, shape [n_rows, ..].
    pub rope: &'a RopeAngles,
    pub eps: f32,
    /// Softmax scale of q·k.
    pub scale: f32,
    /// Keys further back than this many positions are masked (Gemma 3
    /// local layers): a token at position p sees positions p-window+1 ..= p.
    pub window: Option<usize>,
}

impl Attention {
    /// Runs self-attention of layer `layer` on the normed input `st.h`
    /// [n_rows, n_embd], appending the new keys and values to each
    /// sequence's cache; leaves the output projection in `st.out` [n_rows,
    /// n_embd].
    pub fn forward(
        &self,
        pool: &ThreadPool,
        layer: usize,
        shape: &AttentionShape,
        st: &mut RunState,
        layout: &RowLayout,
        seqs: &mut [SeqBatch],
        lora: &LoraRows,
    ) -> Result<(), ModelError> {
        let n = layout.n_rows();
        let hd = shape.head_dim;
        let q_dim = shape.n_head * hd;
        let kv_dim = shape.n_head_kv * hd;
        let RunState { h, q, k, v, att, out, .. } = st;
        crate::imatrix::record(layer, &[Proj::Q, Proj::K, Proj::V], h, n);
        mm_many_into(pool, [&self.wq, &self.wk, &self.wv], h, n, [&mut *q, &mut *k, &mut *v])?;
        lora.apply_many(pool, layer, h, [(Proj::Q, &mut q[..]), (Proj::K, &mut k[..]), (Proj::V, &mut v[..])]);
        if let Some((bq, bk, bv)) = &self.bias {
            add_bias(q, bq);
            add_bias(k, bk);
            add_bias(v, bv);
        }
        if let Some((qn, kn)) = &self.qk_norm {
            q.chunks_exact_mut(hd).for_each(|head| ops::rms_norm_inplace(head, qn, shape.eps));
            k.chunks_exact_mut(hd).for_each(|head| ops::rms_norm_inplace(head, kn, shape.eps));
        }
        for r in 0..n {
            shape.rope.apply(r, &mut q[r * q_dim..(r + 1) * q_dim], hd);
            shape.rope.apply(r, &mut k[r * kv_dim..(r + 1) * kv_dim], hd);
        }
        for (s, seq) in seqs.iter_mut().enumerate() {
            let (a, b) = (layout.seq_start[s], layout.seq_start[s + 1]);
            seq.cache.append(layer, &k[a * kv_dim..b * kv_dim], &v[a * kv_dim..b * kv_dim]);
        }

        // Attention proper: each row over its span of its sequence's cache
        // (the window's last positions on a sliding-window layer).
        let spans: Vec<RangeInclusive<usize>> = layout
            .rows
            .iter()
            .map(|&(_, pos)| {
                let first = shape.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                first..=pos
            })
            .collect();
        let caches: Vec<&KvCache> = seqs.iter().map(|s| &*s.cache).collect();
        let kv = |r: usize, kv_head: usize| {
            let c = caches[layout.rows[r].0];
            (c.keys(layer, kv_head), c.values(layer, kv_head))
        };
        let heads = Heads { n_head: shape.n_head, n_head_kv: shape.n_head_kv, head_dim: hd, scale: shape.scale };
        let att = sized(att, n * q_dim);
        attend_batch(pool, heads, q, &spans, &kv, att);
        crate::imatrix::record(layer, &[Proj::O], att, n);
        mm_into(pool, &self.wo, att, n, out)?;
        lora.apply(pool, layer, Proj::O, att, out);
        Ok(())
    }
}

/// The activation of a gated feed-forward network.
#[derive(Clone, Copy)]
pub(crate) enum Activation {
    Silu,
    GeluTanh,
}

/// Weights of a gated FFN: `down(act(gate(x)) * up(x))`.
pub(crate) struct Ffn {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

impl Ffn {
    /// x [n, n_embd] → `out` [n, n_embd], with the gate and up activations
    /// in `gate_up`; `lora`: the batch's adapters and this FFN's layer.
    pub fn forward_into(
        &self,
        pool: &ThreadPool,
        act: Activation,
        x: &[f32],
        n: usize,
        [gate, up]: [&mut Vec<f32>; 2],
        out: &mut Vec<f32>,
        lora: Option<(&LoraRows, usize)>,
    ) -> Result<(), ModelError> {
        if let Some((_, layer)) = lora {
            crate::imatrix::record(layer, &[Proj::Gate, Proj::Up], x, n);
        }
        mm_many_into(pool, [&self.gate, &self.up], x, n, [&mut *gate, &mut *up])?;
        if let Some((lora, layer)) = lora {
            lora.apply_many(pool, layer, x, [(Proj::Gate, &mut gate[..]), (Proj::Up, &mut up[..])]);
        }
        match act {
            Activation::Silu => ops::gated_silu(gate, up),
            Activation::GeluTanh => ops::gated_gelu(gate, up),
        }
        if let Some((_, layer)) = lora {
            crate::imatrix::record(layer, &[Proj::Down], gate, n);
        }
        mm_into(pool, &self.down, gate, n, out)?;
        if let Some((lora, layer)) = lora {
            lora.apply(pool, layer, Proj::Down, gate, out);
        }
        Ok(())
    }
}

/// Final norm and output projection for the rows whose logits were asked
/// for; returns each sequence's logits, shape [rows wanted, vocab].
pub(crate) fn output_logits(
    pool: &ThreadPool,
    x: &[f32],
    n_embd: usize,
    norm: &[f32],
    eps: f32,
    head: &Matrix,
    layout: &RowLayout,
    seqs: &[SeqBatch],
) -> Result<Vec<Vec<f32>>, ModelError> {
    // Rows through the head, and each sequence's count of them; sequences
    // asking for the hidden state get their normed last row instead.
    let mut picked: Vec<usize> = Vec::new();
    let mut counts = Vec::new();
    let mut hidden: Vec<Option<Vec<f32>>> = Vec::with_capacity(seqs.len());
    for (s, seq) in seqs.iter().enumerate() {
        let (a, b) = (layout.seq_start[s], layout.seq_start[s + 1]);
        let rows: Vec<usize> = match seq.logits {
            Logits::None | Logits::Hidden => vec![],
            Logits::Last if b > a => vec![b - 1],
            Logits::Last => vec![],
            Logits::All => (a..b).collect(),
        };
        hidden.push(
            (seq.logits == Logits::Hidden && b > a).then(|| norm_rows(&x[(b - 1) * n_embd..b * n_embd], norm, eps)),
        );
        counts.push(rows.len());
        picked.extend(rows);
    }
    let mut hx = Vec::with_capacity(picked.len() * n_embd);
    for &r in &picked {
        hx.extend_from_slice(&x[r * n_embd..(r + 1) * n_embd]);
    }
    let hx = norm_rows(&hx, norm, eps);
    // The head's importance is its input at every position read, whether
    // or not its logits were asked for (an imatrix run asks for none).
    if crate::imatrix::collecting() {
        let n = layout.n_rows();
        crate::imatrix::record_named(|| "output.weight".to_string(), &norm_rows(&x[..n * n_embd], norm, eps), n);
    }
    let mut logits = if picked.is_empty() { Vec::new() } else { mm(pool, head, &hx, picked.len())? };
    let vocab = head.rows;
    let mut out = Vec::with_capacity(seqs.len());
    let mut at = 0;
    for (c, h) in counts.into_iter().zip(hidden) {
        match h {
            Some(h) => out.push(h),
            // One sequence takes every row (decoding alone): hand over the
            // buffer rather than copy the vocabulary's logits.
            None if c == 0 => out.push(Vec::new()),
            None if c == picked.len() => out.push(std::mem::take(&mut logits)),
            None => out.push(logits[at * vocab..(at + c) * vocab].to_vec()),
        }
        at += c;
    }
    Ok(out)
}
