//! Attention for a whole batch on the thread pool: every row's query heads
//! over its span of the cache, split into tasks as evenly as the work
//! allows, the way [`crate::matmul`] splits a product.
//!
//! A task is one row, one KV head, one part of the query heads sharing it
//! (near-equal, at most [`MAX_GROUP`]: [`attend_group_part`] reads the KV
//! head's keys and values once for all of them) and one part of the row's
//! span ([`span_parts`]: at most [`SPAN_PART`](crate::attention::SPAN_PART)
//! positions, so that a decode step's few KV heads still spread evenly over
//! the threads). A row whose span is one part writes its heads' slice of the
//! output directly; the parts of a longer one go to partial buffers and are
//! merged exactly after ([`merge_parts`]). Which thread runs a task never
//! changes its result: the split depends on the spans alone.

use crate::attention::{
    attend_group_part, merge_parts, span_parts, AttnScratch, KvLayout, KvRows, PartStats, MAX_GROUP,
};
use crate::pool::{SharedMut, ThreadPool};
use std::cell::RefCell;
use std::ops::RangeInclusive;

/// The heads of one attention layer.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (`n_head` is a multiple of it: grouped-query attention).
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Softmax scale of q·k.
    pub scale: f32,
}

thread_local! {
    /// Each worker thread's attention scratch, reused across tasks and steps.
    static SCRATCH: RefCell<AttnScratch> = RefCell::new(AttnScratch::default());
}

/// One task; see the module doc. `partial`: offsets of its output and
/// statistics in the partial buffers when its row's span has several parts.
struct Task {
    row: usize,
    kv_head: usize,
    head_part: usize,
    span: RangeInclusive<usize>,
    partial: Option<(usize, usize)>,
}

/// Attention of every row of a batch: `q` [n_rows, n_head × head_dim]
/// (already rotated), row `r` attending to cache positions `spans[r]` of the
/// keys and values `kv(r, kv_head)` gives for it (head-major: `head_dim`
/// elements a position); writes `out` [n_rows, n_head × head_dim].
pub fn attend_batch<'c>(
    pool: &ThreadPool,
    heads: Heads,
    q: &[f32],
    spans: &[RangeInclusive<usize>],
    kv: &(dyn Fn(usize, usize) -> (KvRows<'c>, KvRows<'c>) + Sync),
    out: &mut [f32],
) {
    let Heads { n_head, n_head_kv, head_dim: hd, scale } = heads;
    let q_dim = n_head * hd;
    let n = spans.len();
    assert!(n_head_kv > 0 && n_head.is_multiple_of(n_head_kv), "attend_batch: query heads must group over KV heads");
    assert_eq!(q.len(), n * q_dim, "attend_batch: q must be [n_rows, n_head * head_dim]");
    assert_eq!(out.len(), n * q_dim, "attend_batch: out must be [n_rows, n_head * head_dim]");
    let group = n_head / n_head_kv;
    let head_parts = group.div_ceil(MAX_GROUP);
    let mut tasks = Vec::new();
    // Rows split into several span parts: (row, parts, first partial float, first statistic).
    let mut split_rows = Vec::new();
    let (mut n_partials, mut n_stats) = (0, 0);
    for (r, span) in spans.iter().enumerate() {
        let parts: Vec<RangeInclusive<usize>> = span_parts(span.clone()).collect();
        let split = parts.len() > 1;
        if split {
            split_rows.push((r, parts.len(), n_partials, n_stats));
        }
        for kv_head in 0..n_head_kv {
            for head_part in 0..head_parts {
                for (k, span) in parts.iter().enumerate() {
                    let partial = split.then_some((n_partials + k * q_dim, n_stats + k * n_head));
                    tasks.push(Task { row: r, kv_head, head_part, span: span.clone(), partial });
                }
            }
        }
        if split {
            n_partials += parts.len() * q_dim;
            n_stats += parts.len() * n_head;
        }
    }
    let mut partials = vec![0f32; n_partials];
    let mut stats = vec![PartStats::default(); n_stats];
    let (out_ptr, partials_ptr, stats_ptr) =
        (SharedMut::new(out.as_mut_ptr()), SharedMut::new(partials.as_mut_ptr()), SharedMut::new(stats.as_mut_ptr()));
    pool.parallel_for(tasks.len(), 1, &|range| {
        for task in &tasks[range] {
            let Task { row: r, kv_head, head_part, ref span, partial } = *task;
            // Query heads [h0, h1) of the `group` sharing this KV head.
            let first_head = kv_head * group;
            let h0 = first_head + head_part * group / head_parts;
            let h1 = first_head + (head_part + 1) * group / head_parts;
            let (keys, values) = kv(r, kv_head);
            let qs = &q[r * q_dim + h0 * hd..r * q_dim + h1 * hd];
            let layout = KvLayout { kv_stride: hd, kv_off: 0, head_dim: hd };
            // SAFETY: this task alone writes these heads' slice of its row's
            // output (or of its part's partial output) and their statistics;
            // the buffers outlive the parallel loop.
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
                attend_group_part(qs, keys, values, layout, span.clone(), scale, scratch, dst, own_stats);
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
        let stats = &stats[st..st + parts * n_head];
        merge_parts(partials, stats, hd, &mut out[r * q_dim..(r + 1) * q_dim]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::attend;
    use crate::mix::SplitMix64;
    use half::f16;

    /// The batch gives, bit for bit, what [`attend`] gives head by head, on
    /// one thread or two: grouped heads (a group larger than `MAX_GROUP`
    /// too), spans inside one part and spans split into several, a span
    /// not starting at 0 (a sliding window).
    #[test]
    fn batch_is_attend_per_head_on_any_thread_count() {
        let mut rng = SplitMix64::new(7);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect() };
        for (n_head, n_head_kv) in [(9, 3), (8, 1), (4, 4)] {
            let hd = 64;
            let heads = Heads { n_head, n_head_kv, head_dim: hd, scale: 0.125 };
            let spans = [0..=0, 0..=700, 300..=1300, 5..=40];
            let len = 1301;
            // Per row and KV head: its keys and values, [len, hd].
            let cache: Vec<Vec<(Vec<f16>, Vec<f16>)>> = (0..spans.len())
                .map(|_| {
                    (0..n_head_kv)
                        .map(|_| {
                            let k = rand(len * hd).into_iter().map(f16::from_f32).collect();
                            let v = rand(len * hd).into_iter().map(f16::from_f32).collect();
                            (k, v)
                        })
                        .collect()
                })
                .collect();
            let q = rand(spans.len() * n_head * hd);
            let kv = |r: usize, h: usize| (KvRows::F16(&cache[r][h].0), KvRows::F16(&cache[r][h].1));
            let mut want = vec![0f32; q.len()];
            let mut scratch = AttnScratch::default();
            let layout = KvLayout { kv_stride: hd, kv_off: 0, head_dim: hd };
            for (r, span) in spans.iter().enumerate() {
                for h in 0..n_head {
                    let at = (r * n_head + h) * hd;
                    let (k, v) = kv(r, h / (n_head / n_head_kv));
                    attend(&q[at..at + hd], k, v, layout, span.clone(), 0.125, &mut scratch, &mut want[at..at + hd]);
                }
            }
            for threads in [1, 2] {
                let mut got = vec![0f32; q.len()];
                attend_batch(&ThreadPool::new(threads), heads, &q, &spans, &kv, &mut got);
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{n_head}/{n_head_kv} heads on {threads} threads differ from attend"
                );
            }
        }
    }
}
