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
use minnow_kernels::attention::{
    attend_group_part, merge_parts, span_parts, AttnScratch, KvLayout, PartStats, MAX_GROUP,
};
use minnow_kernels::matmul::{matmul, matmul_many, ActBuffer, QMatrix};
use minnow_kernels::ops::{self, RopeAngles};
use minnow_kernels::pool::{SharedMut, ThreadPool};
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
    /// Attention scratch (rounded query, scores) of each pool thread.
    static SCRATCH: RefCell<AttnScratch> = RefCell::new(AttnScratch::default());
}

/// `out = x · Wᵀ` for `n` rows: x [n, w.cols] → out [n, w.rows].
pub(crate) fn mm(pool: &ThreadPool, w: &Matrix, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
    mm_q(pool, &w.q(), x, n)
}

/// `mm` for a matrix given as the kernels see it (e.g. one expert's slice of
/// a 3-D expert tensor).
pub(crate) fn mm_q(pool: &ThreadPool, w: &QMatrix, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
    let mut out = vec![0f32; n * w.rows];
    ACTS.with(|acts| matmul(pool, w, x, n, &mut out, &mut acts.borrow_mut()))
        .map_err(|e| ModelError::new(e.to_string()))?;
    Ok(out)
}

/// `mm` of several matrices with the same input `x` [n, cols], in one job of
/// the pool (`matmul_many`): → one output per matrix, [n, w.rows].
pub(crate) fn mm_many<const K: usize>(
    pool: &ThreadPool,
    ws: [&Matrix; K],
    x: &[f32],
    n: usize,
) -> Result<[Vec<f32>; K], ModelError> {
    mm_many_q(pool, ws.map(|w| w.q()), x, n)
}

/// `mm_many` for matrices given as the kernels see them (e.g. one expert's
/// gate and up).
pub(crate) fn mm_many_q<const K: usize>(
    pool: &ThreadPool,
    qs: [QMatrix; K],
    x: &[f32],
    n: usize,
) -> Result<[Vec<f32>; K], ModelError> {
    let mut outs: [Vec<f32>; K] = std::array::from_fn(|i| vec![0f32; n * qs[i].rows]);
    let refs: [&QMatrix; K] = std::array::from_fn(|i| &qs[i]);
    let mut slices: [&mut [f32]; K] = outs.each_mut().map(|o| o.as_mut_slice());
    ACTS_MANY
        .with(|acts| {
            let mut acts = acts.borrow_mut();
            if acts.len() < K {
                acts.resize_with(K, ActBuffer::default);
            }
            matmul_many(pool, x, n, &refs, &mut slices, &mut acts)
        })
        .map_err(|e| ModelError::new(e.to_string()))?;
    Ok(outs)
}

/// Adds `bias` to every row of `x`.
pub(crate) fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        ops::add_inplace(row, bias);
    }
}

/// RMSNorm of every row of `x` with weight `w` → new buffer.
pub(crate) fn norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (o, r) in out.chunks_exact_mut(w.len()).zip(x.chunks_exact(w.len())) {
        ops::rms_norm(r, w, eps, o);
    }
    out
}

/// Looks up the embedding rows of `tokens` → [n, n_embd].
pub(crate) fn embed(table: &Matrix, tokens: impl Iterator<Item = u32>, scale: f32) -> Result<Vec<f32>, ModelError> {
    let mut out = Vec::new();
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
    Ok(out)
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

/// One attention task of a forward pass: query heads
/// `[head_part]` of the heads sharing KV head `kv_head`, of row `row`, over
/// `span`; `partial` is where its output and statistics go when the row's
/// span has several parts (offsets into the partial buffers), else `None`.
struct AttnTask {
    row: usize,
    kv_head: usize,
    head_part: usize,
    span: RangeInclusive<usize>,
    partial: Option<(usize, usize)>,
}

impl Attention {
    /// Runs self-attention of layer `layer` on the normed input `h` [n_rows,
    /// n_embd], appending the new keys and values to each sequence's cache;
    /// returns the output projection [n_rows, n_embd].
    pub fn forward(
        &self,
        pool: &ThreadPool,
        layer: usize,
        shape: &AttentionShape,
        h: &[f32],
        layout: &RowLayout,
        seqs: &mut [SeqBatch],
    ) -> Result<Vec<f32>, ModelError> {
        let n = layout.n_rows();
        let hd = shape.head_dim;
        let q_dim = shape.n_head * hd;
        let kv_dim = shape.n_head_kv * hd;
        // q [n, q_dim], k and v [n, kv_dim]
        let [mut q, mut k, mut v] = mm_many(pool, [&self.wq, &self.wk, &self.wv], h, n)?;
        if let Some((bq, bk, bv)) = &self.bias {
            add_bias(&mut q, bq);
            add_bias(&mut k, bk);
            add_bias(&mut v, bv);
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

        // Attention proper, as tasks: one per row, KV head, part of the
        // query heads sharing that KV head (near-equal, at most MAX_GROUP:
        // `attend_group` reads the KV head's keys and values once for all of
        // them) and part of the row's span (`span_parts`: at most SPAN_PART
        // positions, so that a decode step's few KV heads still spread
        // evenly over the threads). A row whose span is one part writes its
        // heads' slices of `out` [n, q_dim] directly; the parts of a longer
        // one go to `partials` and are merged after.
        let caches: Vec<&KvCache> = seqs.iter().map(|s| &*s.cache).collect();
        let group = shape.n_head / shape.n_head_kv;
        let head_parts = group.div_ceil(MAX_GROUP);
        let mut tasks = Vec::new();
        // Per row split into several span parts: (row, parts, first partial float, first statistic).
        let mut split_rows = Vec::new();
        let (mut n_partials, mut n_stats) = (0, 0);
        for (r, &(_, pos)) in layout.rows.iter().enumerate() {
            let first = match shape.window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            let parts: Vec<RangeInclusive<usize>> = span_parts(first..=pos).collect();
            let split = parts.len() > 1;
            if split {
                split_rows.push((r, parts.len(), n_partials, n_stats));
            }
            for kv_head in 0..shape.n_head_kv {
                for head_part in 0..head_parts {
                    for (k, span) in parts.iter().enumerate() {
                        let partial = split.then_some((n_partials + k * q_dim, n_stats + k * shape.n_head));
                        tasks.push(AttnTask { row: r, kv_head, head_part, span: span.clone(), partial });
                    }
                }
            }
            if split {
                n_partials += parts.len() * q_dim;
                n_stats += parts.len() * shape.n_head;
            }
        }
        let mut out = vec![0f32; n * q_dim];
        let mut partials = vec![0f32; n_partials];
        let mut stats = vec![PartStats::default(); n_stats];
        let (out_ptr, partials_ptr, stats_ptr) = (
            SharedMut::new(out.as_mut_ptr()),
            SharedMut::new(partials.as_mut_ptr()),
            SharedMut::new(stats.as_mut_ptr()),
        );
        pool.parallel_for(tasks.len(), 1, &|range| {
            for task in &tasks[range] {
                let AttnTask { row: r, kv_head, head_part, ref span, partial } = *task;
                // Query heads [h0, h1) of the `group` sharing this KV head.
                let first_head = kv_head * group;
                let h0 = first_head + head_part * group / head_parts;
                let h1 = first_head + (head_part + 1) * group / head_parts;
                let (s, _) = layout.rows[r];
                let keys = caches[s].keys(layer, kv_head);
                let values = caches[s].values(layer, kv_head);
                let qs = &q[r * q_dim + h0 * hd..r * q_dim + h1 * hd];
                let kv = KvLayout { kv_stride: hd, kv_off: 0, head_dim: hd };
                // SAFETY: this task alone writes these heads' slice of its
                // row's output (or of its part's partial output) and their
                // statistics; the buffers outlive the parallel loop.
                let dst = unsafe {
                    let at = match partial {
                        None => out_ptr.get().add(r * q_dim + h0 * hd),
                        Some((p, _)) => partials_ptr.get().add(p + h0 * hd),
                    };
                    std::slice::from_raw_parts_mut(at, (h1 - h0) * hd)
                };
                let mut own_stats = [PartStats::default(); MAX_GROUP];
                let own_stats = &mut own_stats[..h1 - h0];
                SCRATCH.with(|scratch| {
                    let scratch = &mut scratch.borrow_mut();
                    attend_group_part(qs, keys, values, kv, span.clone(), shape.scale, scratch, dst, own_stats);
                });
                if let Some((_, st)) = partial {
                    // SAFETY: as above, these heads' statistics of this part.
                    let st = unsafe { std::slice::from_raw_parts_mut(stats_ptr.get().add(st + h0), h1 - h0) };
                    st.copy_from_slice(own_stats);
                }
            }
        });
        for &(r, parts, p, st) in &split_rows {
            let partials = &partials[p..p + parts * q_dim];
            let stats = &stats[st..st + parts * shape.n_head];
            merge_parts(partials, stats, hd, &mut out[r * q_dim..(r + 1) * q_dim]);
        }
        mm(pool, &self.wo, &out, n)
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
    /// x [n, n_embd] → [n, n_embd].
    pub fn forward(&self, pool: &ThreadPool, act: Activation, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        let [mut g, u] = mm_many(pool, [&self.gate, &self.up], x, n)?;
        match act {
            Activation::Silu => ops::gated_silu(&mut g, &u),
            Activation::GeluTanh => ops::gated_gelu(&mut g, &u),
        }
        mm(pool, &self.down, &g, n)
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
