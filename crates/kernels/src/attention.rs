//! One head's attention for one query row over a span of cached keys and
//! values: scores `q·k_j · scale`, softmax, and the probability-weighted sum
//! of the values.
//!
//! The cache comes in two formats ([`KvRows`]), as llama.cpp's
//! `--cache-type-k/-v`:
//!
//! - **f16**, the default: half the memory and bandwidth of f32, and the
//!   arithmetic of llama.cpp's f16 cache: its f16 matrix products round the
//!   f32 operand to f16 too, so the query is rounded to f16 before `q·k` and
//!   the softmax weights before they weight the values; products and sums
//!   are f32. (Against exact f32 attention this left the agreement with
//!   llama.cpp's golden log-probabilities unchanged within rounding noise on
//!   the four test models.)
//! - **q8_0**: llama.cpp's Q8_0 values (each run of 32 elements is 8-bit
//!   quants times one f16 scale), 1.125 bytes per element here with the
//!   scale held as f32 beside the quants. Half the bytes again, which is
//!   what a decode step at long context waits for. Keys are scored as
//!   llama.cpp scores a Q8_0 cache: the query is quantized to Q8_0 as well and
//!   each block's integer dot product is exact; values are widened to f32 and
//!   weighted by the f32 softmax weights.
//!
//! A long span is attended in parts of at most [`SPAN_PART`] positions,
//! split at multiples of it ([`span_parts`]): each part's softmax on its own
//! maximum, the parts merged exactly afterwards ([`merge_parts`]; the
//! "flash-decoding" split). [`crate::attention_batch`] runs the parts of one
//! row as separate tasks, so a decode step's attention spreads evenly over the threads even
//! when there are fewer KV heads than threads can balance (SmolLM2: three).
//! The split depends on the span alone, never on the thread count, so the
//! results do not either; a span inside one part is attended as a whole.
//!
//! The kernel takes the cache as rows of `kv_stride` elements with this
//! head's `head_dim` at `kv_off`, and walks it without copying. The engine's
//! cache is head-major (`kv_stride == head_dim`: one KV head's positions one
//! contiguous stream, which the hardware prefetcher follows; side by side, a
//! head's short piece of every row was read at half the speed). Heads that
//! share a KV head (grouped-query attention) go through [`attend_group`]
//! together, so each key and value is loaded and converted once for all of
//! them. The scalar reference is what any CPU runs; the SIMD kernels (for
//! AVX2 and FMA, and the same code built with AVX-512 VL and VNNI:
//! `simd_kernels!`) are picked at run time and agree with it to float
//! rounding, the q8_0 key scores bit for bit (checked in the tests below).
//!
//! A decode step runs this `rows × heads` times and a batched step with long
//! contexts spends a real share of its time here (16 streams of a few
//! hundred tokens on SmolLM2: ~12% in the scalar build), which is why it is
//! a kernel and not a loop in the model code.

use crate::formats::legacy::BlockQ8_0;
use half::f16;
use std::ops::RangeInclusive;

/// Elements per scale of the q8_0 cache format (a Q8_0 block).
pub const Q8_BLOCK: usize = 32;

/// Most positions one part of a span holds ([`span_parts`]). Against 256,
/// SmolLM2 decode at depth 1024 vs 64, steps alternating in one process:
/// -18.0% / -17.9% vs -20.7% / -19.0% (q8_0 cache), -21.2% / -20.4% vs
/// -23.3% / -22.7% (f16): fewer, longer streams and merges; the parts of
/// three KV heads still spread over two threads.
pub const SPAN_PART: usize = 512;

/// The parts a span is attended in: split at the multiples of
/// [`SPAN_PART`], in order (none for an empty span).
pub fn span_parts(span: RangeInclusive<usize>) -> impl Iterator<Item = RangeInclusive<usize>> {
    let (first, last) = (*span.start(), *span.end());
    // Part indices first / SPAN_PART ..= last / SPAN_PART, none when empty.
    let end = if first <= last { last / SPAN_PART + 1 } else { first / SPAN_PART };
    (first / SPAN_PART..end).map(move |k| (k * SPAN_PART).max(first)..=((k + 1) * SPAN_PART - 1).min(last))
}

/// What one head's attention over a part of a span leaves for
/// [`merge_parts`]: the part's largest score and the sum of
/// `e^(score - max)` over the part.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PartStats {
    pub max: f32,
    pub sum: f32,
}

/// One KV head's cached keys or values in one of the cache formats: rows of
/// [`KvLayout::kv_stride`] elements.
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    /// f16 elements.
    F16(&'a [f16]),
    /// llama.cpp's q8_0: element `i` is `quants[i] * scales[i / 32]`.
    /// `quants` holds whole blocks of 32, one scale each (f16 values held as
    /// f32, so SIMD code loads eight at once); quants are in [-127, 127], as
    /// Q8_0 quantization gives.
    Q8_0 { quants: &'a [i8], scales: &'a [f32] },
}

impl KvRows<'_> {
    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            KvRows::F16(x) => x.len(),
            KvRows::Q8_0 { quants, .. } => quants.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first element's address and the bytes per element (a q8_0
    /// element's scale aside): what a prefetch needs.
    #[cfg(target_arch = "x86_64")]
    fn bytes(&self) -> (*const u8, usize) {
        match self {
            KvRows::F16(x) => (x.as_ptr().cast(), 2),
            KvRows::Q8_0 { quants, .. } => (quants.as_ptr().cast(), 1),
        }
    }
}

/// How far ahead of the keys being scored the SIMD kernels prefetch (in
/// bytes of the KV head's stream). A decode step finds the cache in memory,
/// not in cache; the hardware prefetcher alone left the kernel waiting on
/// loads (SmolLM2 at depth 1024 with a q8_0 cache, decode steps alternating
/// with depth 64 in one process: -23.2% / -25.6% slower than depth 64
/// without, -20.3% to -21.9% with 1 to 10 KiB ahead and the values below).
/// The values of the positions being scored are prefetched too, so the
/// value pass finds them in L1/L2.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 4096;

/// Scratch space for [`attend`], reused between calls so the decode loop
/// does not allocate.
#[derive(Default)]
pub struct AttnScratch {
    /// The queries, rounded to f16 (f16 keys), [heads, head_dim].
    q: Vec<f32>,
    /// The queries quantized (q8_0 keys), [heads, head_dim / 32].
    q8: Vec<BlockQ8_0>,
    /// Scores, then softmax weights, of the span's positions, [heads, span].
    scores: Vec<f32>,
    /// A span's parts' outputs, [parts, heads × head_dim], and their
    /// statistics, [parts, heads] ([`attend_group`] over several parts).
    partials: Vec<f32>,
    part_stats: Vec<PartStats>,
}

/// `x` rounded to the nearest f16 (ties to even), back in f32.
#[inline]
fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Where one head's keys and values sit in the cache.
#[derive(Clone, Copy, Debug)]
pub struct KvLayout {
    /// Elements per cached position (all KV heads).
    pub kv_stride: usize,
    /// This head's first element within a position.
    pub kv_off: usize,
    /// Elements per head.
    pub head_dim: usize,
}

/// `out = Σ_j softmax(q·k_j · scale)_j · v_j` over positions `span`.
///
/// `q` and `out` hold `head_dim` floats; `keys` and `values` the cache rows
/// (`kv_stride` elements per position).
pub fn attend(
    q: &[f32],
    keys: KvRows,
    values: KvRows,
    layout: KvLayout,
    span: RangeInclusive<usize>,
    scale: f32,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    attend_group(q, keys, values, layout, span, scale, scratch, out)
}

/// Most query heads one [`attend_group`] call takes: the AVX2 kernel keeps
/// four accumulators per head in registers while the keys stream past.
pub const MAX_GROUP: usize = 3;

/// [`attend`] for up to [`MAX_GROUP`] query heads sharing one KV head
/// (grouped-query attention): `qs` and `outs` hold the heads one after the
/// other, `n × head_dim` floats. Each key and value is loaded and converted
/// once for all of them rather than once per head; each head's arithmetic is
/// [`attend`]'s, in the same order, so the results are the same bits.
pub fn attend_group(
    qs: &[f32],
    keys: KvRows,
    values: KvRows,
    layout: KvLayout,
    span: RangeInclusive<usize>,
    scale: f32,
    scratch: &mut AttnScratch,
    outs: &mut [f32],
) {
    in_parts(span, layout.head_dim, scratch, outs, |part, scratch, out, stats| {
        attend_group_part(qs, keys, values, layout, part, scale, scratch, out, stats)
    })
}

/// Runs `attend_part` (span part, scratch, that part's outputs and
/// statistics) over each part of `span` and merges them into `outs` (whole
/// heads of `head_dim`); a span of one part goes straight into `outs`.
fn in_parts(
    span: RangeInclusive<usize>,
    head_dim: usize,
    scratch: &mut AttnScratch,
    outs: &mut [f32],
    mut attend_part: impl FnMut(RangeInclusive<usize>, &mut AttnScratch, &mut [f32], &mut [PartStats]),
) {
    let n_heads = outs.len() / head_dim.max(1);
    let n_parts = span_parts(span.clone()).count();
    if n_parts <= 1 {
        let mut stats = [PartStats::default(); MAX_GROUP];
        return attend_part(span, scratch, outs, &mut stats[..n_heads.min(MAX_GROUP)]);
    }
    let (mut partials, mut part_stats) =
        (std::mem::take(&mut scratch.partials), std::mem::take(&mut scratch.part_stats));
    partials.resize(n_parts * outs.len(), 0.0);
    part_stats.resize(n_parts * n_heads, PartStats::default());
    for ((part, out), stats) in
        span_parts(span).zip(partials.chunks_exact_mut(outs.len())).zip(part_stats.chunks_exact_mut(n_heads))
    {
        attend_part(part, scratch, out, stats);
    }
    merge_parts(&partials, &part_stats, head_dim, outs);
    (scratch.partials, scratch.part_stats) = (partials, part_stats);
}

/// Merges the attention of a span's parts: `partials` holds each part's
/// output of every head, [parts, heads × head_dim], `stats` their
/// statistics, [parts, heads]; `out` gets the heads' attention over the
/// whole span, [heads × head_dim]. Part `c` weighs `e^(max_c - max) · sum_c`
/// of the whole softmax's total (its outputs are already normalized within
/// the part), added in part order.
pub fn merge_parts(partials: &[f32], stats: &[PartStats], head_dim: usize, out: &mut [f32]) {
    let width = out.len();
    let n_heads = width / head_dim;
    assert!(n_heads > 0 && width == n_heads * head_dim, "merge_parts: out must be whole heads");
    let n_parts = stats.len() / n_heads;
    assert!(
        stats.len() == n_parts * n_heads && partials.len() == n_parts * width,
        "merge_parts: one output per part and head"
    );
    for h in 0..n_heads {
        let head = |c: usize| stats[c * n_heads + h];
        let max = (0..n_parts).map(|c| head(c).max).fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = (0..n_parts).map(|c| crate::ops::exp_poly(head(c).max - max) * head(c).sum).sum();
        let out = &mut out[h * head_dim..(h + 1) * head_dim];
        out.fill(0.0);
        for c in 0..n_parts {
            let w = crate::ops::exp_poly(head(c).max - max) * head(c).sum / total;
            let part = &partials[c * width + h * head_dim..c * width + (h + 1) * head_dim];
            for (o, &x) in out.iter_mut().zip(part) {
                *o += w * x;
            }
        }
    }
}

/// [`attend_group`] over a span that is one part of a longer one (or a
/// whole span, but then without the split): the heads' attention normalized
/// within `span`, and in `stats` (one per head) what [`merge_parts`] needs.
#[allow(clippy::too_many_arguments, reason = "attend_group's arguments and the part's statistics")]
pub fn attend_group_part(
    qs: &[f32],
    keys: KvRows,
    values: KvRows,
    layout: KvLayout,
    span: RangeInclusive<usize>,
    scale: f32,
    scratch: &mut AttnScratch,
    outs: &mut [f32],
    stats: &mut [PartStats],
) {
    let hd = layout.head_dim;
    assert!(hd > 0 && qs.len().is_multiple_of(hd), "attend: the queries must be whole heads of head_dim floats");
    let n = qs.len() / hd;
    assert!((1..=MAX_GROUP).contains(&n), "attend: 1 to {MAX_GROUP} query heads per call, not {n}");
    assert_eq!(outs.len(), qs.len(), "attend: one output per query head");
    assert_eq!(stats.len(), n, "attend: one part statistic per query head");
    #[cfg(target_arch = "x86_64")]
    {
        use crate::formats::{simd_level, SimdLevel};
        let level = simd_level();
        if level >= SimdLevel::Avx2 && simd_handles(keys, layout) {
            // Every head has the same length (asserted above) and the same span.
            check(&qs[..hd], keys, values, layout, &span, &outs[..hd]);
            macro_rules! run {
                ($m:ident) => {
                    match n {
                        1 => $m::attend::<1>(qs, keys, values, layout, span, scale, scratch, outs, stats),
                        2 => $m::attend::<2>(qs, keys, values, layout, span, scale, scratch, outs, stats),
                        _ => $m::attend::<3>(qs, keys, values, layout, span, scale, scratch, outs, stats),
                    }
                };
            }
            // SAFETY: the level's features were detected; bounds checked above.
            unsafe {
                if level >= SimdLevel::Avx512Vnni {
                    run!(avx512)
                } else {
                    run!(avx2)
                }
            }
            return;
        }
    }
    // (The reference checks the bounds itself.)
    for ((q, out), stats) in qs.chunks_exact(hd).zip(outs.chunks_exact_mut(hd)).zip(stats) {
        *stats = attend_part_ref(q, keys, values, layout, span.clone(), scale, scratch, out)
    }
}

/// The scalar reference of [`attend`]: the span's parts, merged.
pub fn attend_ref(
    q: &[f32],
    keys: KvRows,
    values: KvRows,
    layout: KvLayout,
    span: RangeInclusive<usize>,
    scale: f32,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    in_parts(span, layout.head_dim, scratch, out, |part, scratch, out, stats| {
        stats[0] = attend_part_ref(q, keys, values, layout, part, scale, scratch, out)
    })
}

/// The scalar reference of one head's [`attend_group_part`].
fn attend_part_ref(
    q: &[f32],
    keys: KvRows,
    values: KvRows,
    layout: KvLayout,
    span: RangeInclusive<usize>,
    scale: f32,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) -> PartStats {
    check(q, keys, values, layout, &span, out);
    let KvLayout { kv_stride, kv_off, head_dim: hd } = layout;
    let AttnScratch { q: q16, q8, scores, .. } = scratch;
    let row = |j: usize| j * kv_stride + kv_off..j * kv_stride + kv_off + hd;
    scores.clear();
    match keys {
        KvRows::F16(keys) => {
            q16.clear();
            q16.extend(q.iter().map(|&x| round_f16(x)));
            scores.extend(span.clone().map(|j| dot_ref(q16, &keys[row(j)]) * scale));
        }
        KvRows::Q8_0 { quants, scales } => {
            quantize_query(q, q8);
            scores.extend(span.clone().map(|j| {
                let r = row(j);
                let blocks = r.start / Q8_BLOCK..r.end / Q8_BLOCK;
                dot_q8_ref(q8, &quants[r], &scales[blocks]) * scale
            }));
        }
    }
    let stats = softmax_ref(scores);
    out.iter_mut().for_each(|d| *d = 0.0);
    for (j, &p) in span.zip(scores.iter()) {
        match values {
            KvRows::F16(values) => {
                let p = round_f16(p);
                for (d, x) in out.iter_mut().zip(&values[row(j)]) {
                    *d += p * x.to_f32();
                }
            }
            KvRows::Q8_0 { quants, scales } => {
                let r = row(j);
                for ((d, x), c) in
                    out.chunks_mut(Q8_BLOCK).zip(quants[r.clone()].chunks(Q8_BLOCK)).zip(r.step_by(Q8_BLOCK))
                {
                    let w = p * scales[c / Q8_BLOCK];
                    for (d, &x) in d.iter_mut().zip(x) {
                        *d += w * x as f32;
                    }
                }
            }
        }
    }
    stats
}

/// One head's query as Q8_0 blocks (`head_dim / 32` of them).
fn quantize_query(q: &[f32], out: &mut Vec<BlockQ8_0>) {
    out.clear();
    out.resize(q.len() / Q8_BLOCK, BlockQ8_0 { d: 0, qs: [0; Q8_BLOCK] });
    BlockQ8_0::quantize(q, out);
}

/// Appends `x` (whole blocks of 32) to q8_0 cache rows: each block
/// quantized as Q8_0 (scale `max|x| / 127` rounded to f16, quants rounded
/// to nearest), its quants to `quants` and its scale to `scales`.
pub fn extend_q8_0(x: &[f32], quants: &mut Vec<i8>, scales: &mut Vec<f32>) {
    assert!(x.len().is_multiple_of(Q8_BLOCK), "q8_0 cache rows hold whole blocks of {Q8_BLOCK}");
    let mut block = BlockQ8_0 { d: 0, qs: [0; Q8_BLOCK] };
    for x in x.chunks_exact(Q8_BLOCK) {
        BlockQ8_0::quantize(x, std::slice::from_mut(&mut block));
        quants.extend_from_slice(&block.qs);
        scales.push(f16::from_bits(block.d).to_f32());
    }
}

/// `q·k` for a Q8_0 query and one position's q8_0 key: per block the exact
/// integer dot product, times the key's scale, times the query's; the blocks
/// added in order. (The SIMD kernel computes the same operations in the same
/// order, so the scores are the same bits.)
fn dot_q8_ref(q: &[BlockQ8_0], k: &[i8], k_scales: &[f32]) -> f32 {
    let mut blocks = q.iter().zip(k.chunks_exact(Q8_BLOCK)).zip(k_scales).map(|((qb, kb), &dk)| {
        let isum: i32 = qb.qs.iter().zip(kb).map(|(&a, &b)| a as i32 * b as i32).sum();
        (isum as f32 * dk) * f16::from_bits(qb.d).to_f32()
    });
    let first = blocks.next().unwrap_or(0.0);
    blocks.fold(first, |sum, x| sum + x)
}

fn check(q: &[f32], keys: KvRows, values: KvRows, l: KvLayout, span: &RangeInclusive<usize>, out: &[f32]) {
    assert!(q.len() == l.head_dim && out.len() == l.head_dim, "attend: q/out must hold head_dim floats");
    assert!(l.kv_off + l.head_dim <= l.kv_stride, "attend: head outside the cache row");
    for rows in [keys, values] {
        if let KvRows::Q8_0 { quants, scales } = rows {
            assert!(
                [l.kv_stride, l.kv_off, l.head_dim].iter().all(|x| x.is_multiple_of(Q8_BLOCK)),
                "attend: a q8_0 cache needs rows and heads of whole 32-element blocks"
            );
            assert_eq!(quants.len(), scales.len() * Q8_BLOCK, "attend: one q8_0 scale per 32 quants");
        }
    }
    if !span.is_empty() {
        let end = (span.end() + 1) * l.kv_stride;
        assert!(keys.len() >= end && values.len() >= end, "attend: span beyond the cache");
    }
}

/// Softmax of a head's scores in place (NaN scores spread to the output; an
/// empty span leaves nothing to do), returning the maximum and the sum of
/// the exponentials. `e^x` is [`crate::ops::exp_poly`], the bits of the SIMD
/// kernel's eight-lane exp.
fn softmax_ref(x: &mut [f32]) -> PartStats {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = crate::ops::exp_poly(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
    PartStats { max, sum }
}

/// Dot product with an f16 vector, with eight partial sums (so the loop
/// vectorizes).
fn dot_ref(a: &[f32], b: &[f16]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y.to_f32()).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Whether the SIMD kernels cover the cache: q8_0 keys are scored eight
/// (position, block) pairs at a time, so a head must be 1, 2, 4 or 8 blocks
/// (head_dim 32 to 256; the reference takes the others).
#[cfg(target_arch = "x86_64")]
fn simd_handles(keys: KvRows, layout: KvLayout) -> bool {
    match keys {
        KvRows::F16(_) => true,
        KvRows::Q8_0 { .. } => {
            let hd = layout.head_dim;
            hd.is_multiple_of(Q8_BLOCK) && [1, 2, 4, 8].contains(&(hd / Q8_BLOCK))
        }
    }
}

/// The q8_0 key scoring's integer dot products, per instruction set: each
/// key block is first turned into unsigned bytes once (`key_bytes_*`), then
/// dotted with each head's signed query block (`key_dot_*`), 32 byte products
/// summed in groups of four into eight i32 lanes, exactly (no overflow: the
/// quants are at most 127 in magnitude). AVX2 multiplies |k| by q with k's
/// sign (`maddubs` pairs into i16, `madd` pairs of those); VNNI takes
/// k + 128 as the unsigned bytes (one `vpdpbusd`, no per-head sign step) and
/// the kernel subtracts 128·Σq afterwards (`KEY_OFFSET`).
#[cfg(target_arch = "x86_64")]
mod key_dots {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn key_bytes_avx2(k: __m256i) -> __m256i {
        _mm256_abs_epi8(k)
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn key_dot_avx2(abs_k: __m256i, k: __m256i, q: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(abs_k, _mm256_sign_epi8(q, k)), _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn key_bytes_vnni(k: __m256i) -> __m256i {
        _mm256_xor_si256(k, _mm256_set1_epi8(-128))
    }

    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    #[inline]
    pub(super) unsafe fn key_dot_vnni(k_plus_128: __m256i, _k: __m256i, q: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), k_plus_128, q)
    }
}

/// The SIMD kernels, written once and compiled twice: for AVX2 + FMA + F16C
/// (sixteen vector registers) and with AVX-512 VL and VNNI as well (the same
/// 256-bit code with thirty-two registers, where the grouped value pass keeps
/// all its accumulators without spilling, and `vpdpbusd` for the q8_0 key
/// dot products). The two give the same bits: the same operations in the
/// same order, and exact integer sums.
macro_rules! simd_kernels {
    ($module:ident, $features:literal, $key_bytes:ident, $key_dot:ident, $key_offset:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[allow(
            clippy::needless_range_loop,
            reason = "SIMD loops index several arrays (registers per head, per lane) by one counter"
        )]
        mod $module {
            #[allow(unused_imports, reason = "each instance uses one of the two")]
            use super::key_dots::*;
            /// What the key bytes `key_dot` takes add to the key quants.
            const KEY_OFFSET: i32 = $key_offset;
            use super::{AttnScratch, KvLayout, KvRows, PartStats, PREFETCH_AHEAD, Q8_BLOCK};
            use crate::formats::legacy::BlockQ8_0;
            use half::f16;
            use std::arch::x86_64::*;
            use std::ops::RangeInclusive;

            /// `G` heads' attention over one KV head's span (`super::attend_group`).
            /// Per head the same operations in the same order as for one head alone.
            ///
            /// # Safety
            /// AVX2 and FMA must be available; `super::check` must hold for every
            /// head and `handles` for the cache; `qs` and `outs` hold `G × head_dim`
            /// floats.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments, reason = "attend_group_part's arguments")]
            pub(super) unsafe fn attend<const G: usize>(
                qs: &[f32],
                keys: KvRows,
                values: KvRows,
                layout: KvLayout,
                span: RangeInclusive<usize>,
                scale: f32,
                scratch: &mut AttnScratch,
                outs: &mut [f32],
                stats: &mut [PartStats],
            ) {
                let hd = layout.head_dim;
                let AttnScratch { q: q16, q8, scores, .. } = scratch;
                let (first, end) = (*span.start(), *span.end() + 1);
                let len = end.saturating_sub(first);
                if len == 0 {
                    // Nothing to attend to: zeros, as the reference gives.
                    outs.fill(0.0);
                    return;
                }
                // Head h's scores at scores[h * len ..][..len].
                scores.clear();
                scores.resize(G * len, 0.0);
                match keys {
                    KvRows::F16(keys) => {
                        q16.clear();
                        q16.extend_from_slice(qs);
                        round_f16_inplace(q16);
                        scores_f16::<G>(q16, keys, layout, first, len, scale, scores, values.bytes());
                    }
                    KvRows::Q8_0 { quants, scales } => {
                        let nb = hd / Q8_BLOCK;
                        q8.clear();
                        q8.resize(G * nb, BlockQ8_0 { d: 0, qs: [0; Q8_BLOCK] });
                        for (q, blocks) in qs.chunks_exact(hd).zip(q8.chunks_exact_mut(nb)) {
                            BlockQ8_0::quantize(q, blocks);
                        }
                        scores_q8_any::<G>(q8, quants, scales, layout, first, len, scale, scores, values.bytes());
                    }
                }
                for (s, stats) in scores.chunks_exact_mut(len).zip(stats) {
                    *stats = softmax(s);
                    if let KvRows::F16(_) = values {
                        round_f16_inplace(s);
                    }
                }
                match values {
                    KvRows::F16(values) => values_f16::<G>(values, layout, first, scores, outs),
                    KvRows::Q8_0 { quants, scales } => values_q8::<G>(quants, scales, layout, first, scores, outs),
                }
            }

            /// Scores against f16 keys, `q16` the queries rounded to f16.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments, reason = "the queries, the cache, the span, the scores")]
            unsafe fn scores_f16<const G: usize>(
                q16: &[f32],
                keys: &[f16],
                layout: KvLayout,
                first: usize,
                len: usize,
                scale: f32,
                scores: &mut [f32],
                values: (*const u8, usize),
            ) {
                let KvLayout { kv_stride, kv_off, head_dim: hd } = layout;
                let q = q16.as_ptr();
                let end = first + len;
                // Four positions at a time: one horizontal reduction for the four
                // scores of a head instead of one each.
                let key = |j: usize| keys.as_ptr().wrapping_add(j * kv_stride + kv_off) as *const u16;
                let mut j = first;
                let ahead = PREFETCH_AHEAD.div_ceil(2 * hd);
                while j + 4 <= end {
                    for k in 0..4 {
                        prefetch(key(j + k + ahead).cast(), 2 * hd);
                        prefetch(values.0.wrapping_add(((j + k) * kv_stride + kv_off) * values.1), hd * values.1);
                    }
                    let s = dot4::<G>(q, hd, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
                    for (h, s) in s.iter().enumerate() {
                        for (k, &x) in s.iter().enumerate() {
                            scores[h * len + j - first + k] = x * scale;
                        }
                    }
                    j += 4;
                }
                while j < end {
                    for h in 0..G {
                        scores[h * len + j - first] = dot(q.add(h * hd), key(j), hd) * scale;
                    }
                    j += 1;
                }
            }

            /// `scores_q8` for the head's block count (1, 2, 4 or 8: `handles`).
            ///
            /// # Safety
            /// As `attend`'s.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments, reason = "scores_q8's arguments")]
            pub(super) unsafe fn scores_q8_any<const G: usize>(
                q8: &[BlockQ8_0],
                quants: &[i8],
                scales: &[f32],
                layout: KvLayout,
                first: usize,
                len: usize,
                scale: f32,
                scores: &mut [f32],
                values: (*const u8, usize),
            ) {
                // Direct calls, not a function pointer picked first: through a
                // pointer this ran three times slower (SmolLM2 at depth 1,024).
                match layout.head_dim / Q8_BLOCK {
                    1 => scores_q8::<G, 1>(q8, quants, scales, layout, first, len, scale, scores, values),
                    2 => scores_q8::<G, 2>(q8, quants, scales, layout, first, len, scale, scores, values),
                    4 => scores_q8::<G, 4>(q8, quants, scales, layout, first, len, scale, scores, values),
                    _ => scores_q8::<G, 8>(q8, quants, scales, layout, first, len, scale, scores, values),
                }
            }

            /// Scores against q8_0 keys (`q8`: each head's query as Q8_0 blocks),
            /// the same operations as `super::dot_q8_ref`. Eight (position, block)
            /// pairs at a time: each pair's 32 key bytes are loaded once for all
            /// heads, and a head's eight exact integer sums come out of one
            /// horizontal reduction, then take their scales as one vector.
            /// (Inlined into `scores_q8_any`, whose features it runs with.)
            #[allow(clippy::too_many_arguments, reason = "the queries, the cache, the span, the scores")]
            unsafe fn scores_q8<const G: usize, const NB: usize>(
                q8: &[BlockQ8_0],
                quants: &[i8],
                scales: &[f32],
                layout: KvLayout,
                first: usize,
                len: usize,
                scale: f32,
                scores: &mut [f32],
                values: (*const u8, usize),
            ) {
                let KvLayout { kv_stride, kv_off, head_dim: hd } = layout;
                debug_assert_eq!(hd, NB * Q8_BLOCK);
                let nb = NB; // blocks per head: a constant, so the pair arithmetic below folds
                let per = 8 / nb; // positions per eight pairs
                let end = first + len;
                // Pair i of a group of eight is block i % nb of position i / nb.
                // KEY_OFFSET · Σq of each pair's query block, to take back
                // from the integer sums.
                let offset: [__m256i; G] = std::array::from_fn(|h| {
                    let o: [i32; 8] = std::array::from_fn(|i| {
                        KEY_OFFSET * q8[h * nb + i % nb].qs.iter().map(|&x| x as i32).sum::<i32>()
                    });
                    _mm256_loadu_si256(o.as_ptr().cast())
                });
                let dq: [__m256; G] = std::array::from_fn(|h| {
                    let d: [f32; 8] = std::array::from_fn(|i| f16::from_bits(q8[h * nb + i % nb].d).to_f32());
                    _mm256_loadu_ps(d.as_ptr())
                });
                let kq =
                    |j: usize, b: usize| quants.as_ptr().add(j * kv_stride + kv_off + b * Q8_BLOCK) as *const __m256i;
                let mut j = first;
                let ahead = PREFETCH_AHEAD.div_ceil(hd);
                while j + per <= end {
                    for k in 0..per {
                        let row = (j + k) * kv_stride + kv_off;
                        prefetch(quants.as_ptr().wrapping_add(row + ahead * kv_stride).cast(), hd);
                        prefetch(values.0.wrapping_add(row * values.1), hd * values.1);
                    }
                    // Integer sums, reduced two pairs at a time to keep few live.
                    let mut quads = [[_mm256_setzero_si256(); 2]; G];
                    for half in 0..2 {
                        let mut twos = [[_mm256_setzero_si256(); 2]; G];
                        for two in 0..2 {
                            let mut sums = [[_mm256_setzero_si256(); 2]; G];
                            for one in 0..2 {
                                let i = half * 4 + two * 2 + one;
                                let k = _mm256_loadu_si256(kq(j + i / nb, i % nb));
                                let kb = $key_bytes(k);
                                for h in 0..G {
                                    let qv = _mm256_loadu_si256(q8[h * nb + i % nb].qs.as_ptr() as *const __m256i);
                                    sums[h][one] = $key_dot(kb, k, qv);
                                }
                            }
                            for h in 0..G {
                                twos[h][two] = _mm256_hadd_epi32(sums[h][0], sums[h][1]);
                            }
                        }
                        for h in 0..G {
                            quads[h][half] = _mm256_hadd_epi32(twos[h][0], twos[h][1]);
                        }
                    }
                    // The eight pairs' scales, in pair order.
                    let ks = if kv_stride == hd {
                        _mm256_loadu_ps(scales.as_ptr().add((j * kv_stride + kv_off) / Q8_BLOCK))
                    } else {
                        let s: [f32; 8] =
                            std::array::from_fn(|i| scales[((j + i / nb) * kv_stride + kv_off) / Q8_BLOCK + i % nb]);
                        _mm256_loadu_ps(s.as_ptr())
                    };
                    for h in 0..G {
                        // Each 128-bit lane of quads holds four pairs' partial sums
                        // (low: elements 0-3 of each pair's lanes, high: 4-7).
                        let (a, b) = (quads[h][0], quads[h][1]);
                        let lo = _mm256_permute2x128_si256(a, b, 0x20);
                        let hi = _mm256_permute2x128_si256(a, b, 0x31);
                        let isum = _mm256_sub_epi32(_mm256_add_epi32(lo, hi), offset[h]);
                        let v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), ks), dq[h]);
                        let out = scores.as_mut_ptr().add(h * len + j - first);
                        if NB == 1 {
                            _mm256_storeu_ps(out, _mm256_mul_ps(v, _mm256_set1_ps(scale)));
                        } else if NB == 2 {
                            // Adjacent pairs added: [v0+v1, v2+v3, ..] in each
                            // 128-bit lane, the lanes' first halves joined.
                            let t = _mm256_hadd_ps(v, v);
                            let t = _mm_movelh_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
                            _mm_storeu_ps(out, _mm_mul_ps(t, _mm_set1_ps(scale)));
                        } else {
                            let v: [f32; 8] = std::mem::transmute(v);
                            for p in 0..per {
                                let mut s = v[p * nb];
                                for b in 1..nb {
                                    s += v[p * nb + b];
                                }
                                *out.add(p) = s * scale;
                            }
                        }
                    }
                    j += per;
                }
                while j < end {
                    let r = j * kv_stride + kv_off;
                    for h in 0..G {
                        let s =
                            super::dot_q8_ref(&q8[h * nb..(h + 1) * nb], &quants[r..r + hd], &scales[r / Q8_BLOCK..]);
                        scores[h * len + j - first] = s * scale;
                    }
                    j += 1;
                }
            }

            /// The weighted sum of f16 values, `width` output floats of every head
            /// at a time in ymm accumulators (eight for one head; four each for
            /// more, so they stay in the sixteen registers).
            #[target_feature(enable = $features)]
            unsafe fn values_f16<const G: usize>(
                values: &[f16],
                layout: KvLayout,
                first: usize,
                scores: &[f32],
                outs: &mut [f32],
            ) {
                let KvLayout { kv_stride, kv_off, head_dim: hd } = layout;
                let len = scores.len() / G;
                let chunk = if G == 1 { 64 } else { 32 };
                let mut c = 0;
                while c < hd {
                    let width = (hd - c).min(chunk);
                    let lanes = width / 8;
                    let mut acc = [[_mm256_setzero_ps(); 8]; G];
                    let mut tail = [[0f32; 8]; G];
                    for i in 0..len {
                        let vj = values.as_ptr().add((first + i) * kv_stride + kv_off + c) as *const u16;
                        for l in 0..lanes {
                            let v = load_f16x8(vj.add(8 * l));
                            for h in 0..G {
                                let p = _mm256_set1_ps(*scores.get_unchecked(h * len + i));
                                acc[h][l] = _mm256_fmadd_ps(p, v, acc[h][l]);
                            }
                        }
                        for t in 0..width - 8 * lanes {
                            let x = f16::from_bits(*vj.add(8 * lanes + t)).to_f32();
                            for h in 0..G {
                                tail[h][t] += scores[h * len + i] * x;
                            }
                        }
                    }
                    for h in 0..G {
                        let out = outs.as_mut_ptr().add(h * hd + c);
                        for l in 0..lanes {
                            _mm256_storeu_ps(out.add(8 * l), acc[h][l]);
                        }
                        for t in 0..width - 8 * lanes {
                            *out.add(8 * lanes + t) = tail[h][t];
                        }
                    }
                    c += width;
                }
            }

            /// The weighted sum of q8_0 values: per position and block the weight
            /// times the block's scale, then eight quants at a time widened to f32
            /// and accumulated. Two blocks of output per pass for one head (eight
            /// accumulators), one for more (four each).
            #[target_feature(enable = $features)]
            unsafe fn values_q8<const G: usize>(
                quants: &[i8],
                scales: &[f32],
                layout: KvLayout,
                first: usize,
                scores: &[f32],
                outs: &mut [f32],
            ) {
                let KvLayout { kv_stride, kv_off, head_dim: hd } = layout;
                let nb = hd / Q8_BLOCK;
                let mut b = 0;
                while b < nb {
                    if G == 1 && b + 2 <= nb {
                        values_q8_pass::<G, 2>(
                            quants,
                            scales,
                            kv_stride,
                            kv_off + b * Q8_BLOCK,
                            hd,
                            first,
                            scores,
                            outs,
                            b,
                        );
                        b += 2;
                    } else {
                        values_q8_pass::<G, 1>(
                            quants,
                            scales,
                            kv_stride,
                            kv_off + b * Q8_BLOCK,
                            hd,
                            first,
                            scores,
                            outs,
                            b,
                        );
                        b += 1;
                    }
                }
            }

            /// `B` blocks of every head's output, starting at block `b0` of the head
            /// (element `off` of a cache row).
            #[target_feature(enable = $features)]
            #[inline]
            #[allow(clippy::too_many_arguments, reason = "the cache, where the pass starts, and the outputs")]
            unsafe fn values_q8_pass<const G: usize, const B: usize>(
                quants: &[i8],
                scales: &[f32],
                kv_stride: usize,
                off: usize,
                hd: usize,
                first: usize,
                scores: &[f32],
                outs: &mut [f32],
                b0: usize,
            ) {
                let len = scores.len() / G;
                let mut acc = [[[_mm256_setzero_ps(); 4]; B]; G];
                for i in 0..len {
                    let at = (first + i) * kv_stride + off;
                    for b in 0..B {
                        let d = *scales.get_unchecked(at / Q8_BLOCK + b);
                        let w: [__m256; G] =
                            std::array::from_fn(|h| _mm256_set1_ps(*scores.get_unchecked(h * len + i) * d));
                        let vq = quants.as_ptr().add(at + b * Q8_BLOCK);
                        for l in 0..4 {
                            let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                vq.add(8 * l) as *const __m128i
                            )));
                            for h in 0..G {
                                acc[h][b][l] = _mm256_fmadd_ps(w[h], v, acc[h][b][l]);
                            }
                        }
                    }
                }
                for h in 0..G {
                    for b in 0..B {
                        let out = outs.as_mut_ptr().add(h * hd + (b0 + b) * Q8_BLOCK);
                        for l in 0..4 {
                            _mm256_storeu_ps(out.add(8 * l), acc[h][b][l]);
                        }
                    }
                }
            }

            /// [`super::softmax_ref`] with `e^x` eight lanes at a time (the same
            /// bits) and the sum in eight lanes.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn softmax(x: &mut [f32]) -> PartStats {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let m = _mm256_set1_ps(max);
                let mut lanes = _mm256_setzero_ps();
                let mut chunks = x.chunks_exact_mut(8);
                for c in &mut chunks {
                    let e = crate::ops::simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
                    _mm256_storeu_ps(c.as_mut_ptr(), e);
                    lanes = _mm256_add_ps(lanes, e);
                }
                let mut sum = crate::formats::float::hsum_avx2(lanes);
                for v in chunks.into_remainder() {
                    *v = crate::ops::exp_poly(*v - max);
                    sum += *v;
                }
                let inv = 1.0 / sum;
                x.iter_mut().for_each(|v| *v *= inv);
                PartStats { max, sum }
            }

            /// Asks for the cache lines of the `bytes` bytes at `p` (a
            /// prefetch never faults, so `p` may point past the cache).
            #[inline(always)]
            unsafe fn prefetch(p: *const u8, bytes: usize) {
                let mut at = 0;
                while at < bytes {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at).cast());
                    at += 64;
                }
            }

            /// Eight f16 (raw bits) as f32.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn load_f16x8(p: *const u16) -> __m256 {
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
            }

            /// Rounds every element to the nearest f16 (ties to even, as
            /// `f16::from_f32`), in place.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn round_f16_inplace(x: &mut [f32]) {
                let mut chunks = x.chunks_exact_mut(8);
                for c in &mut chunks {
                    let v = _mm256_loadu_ps(c.as_ptr());
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                    _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
                }
                for v in chunks.into_remainder() {
                    *v = super::round_f16(*v);
                }
            }

            /// `a_h·b[k]` for four f16 vectors `b[k]` of length `n` and `G` f32
            /// vectors `a_h` (at `a + h·n`): each `b[k]` chunk loaded once for all.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn dot4<const G: usize>(a: *const f32, n: usize, b: [*const u16; 4]) -> [[f32; 4]; G] {
                let mut acc = [[_mm256_setzero_ps(); 4]; G];
                let mut i = 0;
                while i + 8 <= n {
                    for k in 0..4 {
                        let y = load_f16x8(b[k].add(i));
                        for h in 0..G {
                            acc[h][k] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(h * n + i)), y, acc[h][k]);
                        }
                    }
                    i += 8;
                }
                let mut out = [[0f32; 4]; G];
                for h in 0..G {
                    // [Σ0 Σ1 Σ2 Σ3] from the four 8-lane sums: pairwise adds within
                    // each 128-bit half, then the halves added.
                    let h01 = _mm256_hadd_ps(acc[h][0], acc[h][1]);
                    let h23 = _mm256_hadd_ps(acc[h][2], acc[h][3]);
                    let s = _mm256_hadd_ps(h01, h23);
                    out[h] = std::mem::transmute::<__m128, [f32; 4]>(_mm_add_ps(
                        _mm256_castps256_ps128(s),
                        _mm256_extractf128_ps(s, 1),
                    ));
                }
                while i < n {
                    for h in 0..G {
                        for k in 0..4 {
                            out[h][k] += *a.add(h * n + i) * f16::from_bits(*b[k].add(i)).to_f32();
                        }
                    }
                    i += 1;
                }
                out
            }

            /// `a·b` for an f16 vector `b` of length `n`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn dot(a: *const f32, b: *const u16, n: usize) -> f32 {
                let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut i = 0;
                while i + 16 <= n {
                    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), load_f16x8(b.add(i)), s0);
                    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i + 8)), load_f16x8(b.add(i + 8)), s1);
                    i += 16;
                }
                if i + 8 <= n {
                    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), load_f16x8(b.add(i)), s0);
                    i += 8;
                }
                let s = _mm256_add_ps(s0, s1);
                let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let h = _mm_add_ss(h, _mm_movehdup_ps(h));
                let mut sum = _mm_cvtss_f32(h);
                while i < n {
                    sum += *a.add(i) * f16::from_bits(*b.add(i)).to_f32();
                    i += 1;
                }
                sum
            }
        }
    };
}

simd_kernels!(avx2, "avx2,fma,f16c", key_bytes_avx2, key_dot_avx2, 0);
simd_kernels!(avx512, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", key_bytes_vnni, key_dot_vnni, 128);

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random fill in [-1, 1).
    fn fill(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Cache rows in one format.
    enum Rows {
        F16(Vec<f16>),
        Q8 { quants: Vec<i8>, scales: Vec<f32> },
    }

    impl Rows {
        fn new(x: &[f32], q8: bool) -> Rows {
            if q8 {
                let (mut quants, mut scales) = (Vec::new(), Vec::new());
                extend_q8_0(x, &mut quants, &mut scales);
                Rows::Q8 { quants, scales }
            } else {
                Rows::F16(to_f16(x))
            }
        }

        fn kv(&self) -> KvRows<'_> {
            match self {
                Rows::F16(x) => KvRows::F16(x),
                Rows::Q8 { quants, scales } => KvRows::Q8_0 { quants, scales },
            }
        }

        /// The element values the cache holds.
        fn values(&self) -> Vec<f32> {
            match self {
                Rows::F16(x) => x.iter().map(|v| v.to_f32()).collect(),
                Rows::Q8 { quants, scales } => {
                    quants.iter().enumerate().map(|(i, &q)| q as f32 * scales[i / 32]).collect()
                }
            }
        }
    }

    /// Every (keys, values) format pair: f16 and q8_0 each way.
    const FORMATS: [(bool, bool); 4] = [(false, false), (true, true), (true, false), (false, true)];

    #[test]
    fn simd_agrees_with_reference() {
        // Head dims of the test models (64, 128, 256), odd ones that exercise
        // the f16 tails and a q8_0 head of three blocks (the reference's);
        // spans from one position to a few hundred, heads inside wider rows.
        for (k8, v8) in FORMATS {
            let q8 = k8 || v8;
            let shapes: &[(usize, usize, usize)] = if q8 {
                &[(64, 2, 1), (128, 1, 0), (256, 1, 0), (32, 3, 2), (96, 2, 1)]
            } else {
                &[(64, 2, 1), (256, 1, 0), (80, 3, 2), (13, 2, 1), (7, 1, 0)]
            };
            for &(hd, n_kv_heads, head) in shapes {
                for (first, last) in [(0, 0), (0, 5), (3, 40), (0, 300), (1, 18), (200, 1100)] {
                    let layout = KvLayout { kv_stride: hd * n_kv_heads, kv_off: hd * head, head_dim: hd };
                    let keys = Rows::new(&fill((last + 1) * layout.kv_stride, 1 + hd as u64), k8);
                    let values = Rows::new(&fill((last + 1) * layout.kv_stride, 2 + last as u64), v8);
                    let q = fill(hd, 3);
                    let scale = 1.0 / (hd as f32).sqrt();
                    let (mut s1, mut s2) = (AttnScratch::default(), AttnScratch::default());
                    let (mut o1, mut o2) = (vec![9.0; hd], vec![9.0; hd]);
                    attend_ref(&q, keys.kv(), values.kv(), layout, first..=last, scale, &mut s1, &mut o1);
                    attend(&q, keys.kv(), values.kv(), layout, first..=last, scale, &mut s2, &mut o2);
                    for (a, b) in o1.iter().zip(&o2) {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                            "k8 {k8} v8 {v8} hd {hd} span {first}..={last}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// The q8_0 scores are exact integer sums and the same float operations
    /// in the same order: the SIMD kernel's equal the reference's bit for bit.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn q8_scores_are_the_reference_bits() {
        if !crate::formats::has_avx2_fma() {
            return;
        }
        for (hd, stride) in [(32, 32), (64, 64), (128, 128), (256, 256), (64, 192)] {
            let nb = hd / Q8_BLOCK;
            let (first, len) = (2, 77);
            let layout = KvLayout { kv_stride: stride, kv_off: stride - hd, head_dim: hd };
            let Rows::Q8 { quants, scales } = Rows::new(&fill((first + len) * stride, hd as u64), true) else {
                unreachable!()
            };
            let qs = fill(3 * hd, 5);
            let mut q8 = vec![BlockQ8_0 { d: 0, qs: [0; Q8_BLOCK] }; 3 * nb];
            BlockQ8_0::quantize(&qs, &mut q8);
            type Scores =
                unsafe fn(&[BlockQ8_0], &[i8], &[f32], KvLayout, usize, usize, f32, &mut [f32], (*const u8, usize));
            let mut builds: Vec<(&str, Scores)> = vec![("avx2", avx2::scores_q8_any::<3>)];
            if crate::formats::SimdLevel::detected() >= crate::formats::SimdLevel::Avx512Vnni {
                builds.push(("avx512", avx512::scores_q8_any::<3>));
            }
            for (build, scores) in builds {
                let mut simd = vec![0f32; 3 * len];
                // SAFETY: the build's features were detected; the cache holds the span.
                unsafe { scores(&q8, &quants, &scales, layout, first, len, 0.125, &mut simd, (std::ptr::null(), 1)) };
                for h in 0..3 {
                    for i in 0..len {
                        let r = (first + i) * stride + stride - hd;
                        let want = dot_q8_ref(&q8[h * nb..(h + 1) * nb], &quants[r..r + hd], &scales[r / 32..]) * 0.125;
                        assert_eq!(
                            simd[h * len + i].to_bits(),
                            want.to_bits(),
                            "{build} hd {hd} head {h} position {i}"
                        );
                    }
                }
            }
        }
    }

    /// A q8_0 cache gives the attention of the f16 cache to within its
    /// quantization error (8 bits: about 1% of a block's largest value).
    #[test]
    fn q8_0_is_near_f16() {
        for hd in [64, 128] {
            let layout = KvLayout { kv_stride: hd, kv_off: 0, head_dim: hd };
            let (k, v) = (fill(500 * hd, 21), fill(500 * hd, 22));
            // Peaked scores, so the softmax does not average the error away.
            let q: Vec<f32> = fill(hd, 23).iter().map(|x| 4.0 * x).collect();
            let mut exact = vec![0.0; hd];
            let f16 = (Rows::new(&k, false), Rows::new(&v, false));
            attend(&q, f16.0.kv(), f16.1.kv(), layout, 0..=499, 0.125, &mut AttnScratch::default(), &mut exact);
            for (k8, v8) in [(true, true), (true, false), (false, true)] {
                let (keys, values) = (Rows::new(&k, k8), Rows::new(&v, v8));
                let mut out = vec![0.0; hd];
                attend(&q, keys.kv(), values.kv(), layout, 0..=499, 0.125, &mut AttnScratch::default(), &mut out);
                let err = out.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let size = exact.iter().map(|a| a.abs()).fold(0f32, f32::max);
                assert!(err <= 0.02 * size, "hd {hd} k8 {k8} v8 {v8}: max error {err} of {size}");
                assert!(err > 0.0, "the quantized cache should not be exact");
            }
        }
    }

    #[test]
    fn spans_split_at_multiples_of_the_part() {
        let parts = |a: usize, b: usize| span_parts(a..=b).collect::<Vec<_>>();
        let p = SPAN_PART;
        assert_eq!(parts(0, 0), vec![0..=0]);
        assert_eq!(parts(0, p - 1), vec![0..=p - 1]);
        assert_eq!(parts(p - 6, p + 4), vec![p - 6..=p - 1, p..=p + 4]);
        assert_eq!(parts(0, 4 * p - 1), vec![0..=p - 1, p..=2 * p - 1, 2 * p..=3 * p - 1, 3 * p..=4 * p - 1]);
        #[allow(clippy::reversed_empty_ranges)]
        let empty = span_parts(5..=4).count();
        assert_eq!(empty, 0);
        // Contiguous, in order, within the span, for many spans.
        for (a, b) in [(3, 900), (511, 512), (700, 2000), (1, 1), (5, 3000)] {
            let p = parts(a, b);
            assert_eq!((*p[0].start(), *p[p.len() - 1].end()), (a, b));
            assert!(p.windows(2).all(|w| w[1].start() == &(w[0].end() + 1)));
            assert!(p.iter().all(|r| r.end() - r.start() < SPAN_PART));
        }
    }

    /// A span of several parts, merged, is the attention over the whole
    /// span: against softmax attention in f64 over the cached (f16) keys and
    /// values with the query rounded to f16, up to the f16 rounding of the
    /// weights (a relative 2^-11 each).
    #[test]
    fn merged_parts_are_whole_span_attention() {
        let hd = 64;
        let layout = KvLayout { kv_stride: hd, kv_off: 0, head_dim: hd };
        let (first, last) = (37, 1400);
        let (keys, values) =
            (Rows::new(&fill((last + 1) * hd, 31), false), Rows::new(&fill((last + 1) * hd, 32), false));
        let q: Vec<f32> = fill(hd, 33).iter().map(|x| 3.0 * x).collect();
        let (k, v) = (keys.values(), values.values());
        let scores: Vec<f64> = (first..=last)
            .map(|j| (0..hd).map(|d| round_f16(q[d]) as f64 * k[j * hd + d] as f64).sum::<f64>() * 0.125)
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        let want: Vec<f64> = (0..hd)
            .map(|d| (first..=last).zip(&scores).map(|(j, s)| (s - max).exp() / total * v[j * hd + d] as f64).sum())
            .collect();
        for f in [attend, attend_ref] {
            let mut out = vec![0.0; hd];
            f(&q, keys.kv(), values.kv(), layout, first..=last, 0.125, &mut AttnScratch::default(), &mut out);
            for (a, b) in out.iter().zip(&want) {
                assert!((*a as f64 - b).abs() <= 1e-3 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    /// The AVX2 and AVX-512 builds of the kernels: the same bits.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_builds_agree_bit_for_bit() {
        use crate::formats::SimdLevel;
        if SimdLevel::detected() < SimdLevel::Avx512Vnni {
            return;
        }
        for (k8, v8) in FORMATS {
            let hd = 64;
            let layout = KvLayout { kv_stride: hd, kv_off: 0, head_dim: hd };
            let keys = Rows::new(&fill(300 * hd, 41), k8);
            let values = Rows::new(&fill(300 * hd, 42), v8);
            let qs = fill(3 * hd, 43);
            let (mut a, mut b) = (vec![0.0; 3 * hd], vec![0.0; 3 * hd]);
            let (mut sa, mut sb) = ([PartStats::default(); 3], [PartStats::default(); 3]);
            let mut scratch = AttnScratch::default();
            // SAFETY: AVX-512 VNNI (and so AVX2) detected; the cache holds the span.
            unsafe {
                avx2::attend::<3>(&qs, keys.kv(), values.kv(), layout, 3..=250, 0.125, &mut scratch, &mut a, &mut sa);
                avx512::attend::<3>(&qs, keys.kv(), values.kv(), layout, 3..=250, 0.125, &mut scratch, &mut b, &mut sb);
            }
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "k8 {k8} v8 {v8}");
            assert_eq!(sa, sb);
        }
    }

    /// Heads sharing a KV head, in one call: the same bits as one call per
    /// head (and, through `attend`, as the reference to rounding).
    #[test]
    fn group_is_per_head_bit_for_bit() {
        for (k8, v8) in FORMATS {
            let dims: &[usize] = if k8 || v8 { &[64, 128, 32, 256] } else { &[64, 128, 13, 8] };
            for &hd in dims {
                for (first, last) in [(0, 0), (0, 2), (0, 5), (3, 40), (0, 300), (100, 1300)] {
                    let layout = KvLayout { kv_stride: hd, kv_off: 0, head_dim: hd };
                    let keys = Rows::new(&fill((last + 1) * hd, 11 + hd as u64), k8);
                    let values = Rows::new(&fill((last + 1) * hd, 12 + last as u64), v8);
                    let (keys, values) = (keys.kv(), values.kv());
                    let scale = 1.0 / (hd as f32).sqrt();
                    for g in 1..=MAX_GROUP {
                        let qs = fill(g * hd, 13 + g as u64);
                        let mut together = vec![9.0; g * hd];
                        let mut scratch = AttnScratch::default();
                        attend_group(&qs, keys, values, layout, first..=last, scale, &mut scratch, &mut together);
                        for h in 0..g {
                            let mut alone = vec![7.0; hd];
                            let q = &qs[h * hd..(h + 1) * hd];
                            attend(q, keys, values, layout, first..=last, scale, &mut scratch, &mut alone);
                            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                            let what = format!("k8 {k8} v8 {v8} hd {hd} g {g} head {h}");
                            assert_eq!(bits(&together[h * hd..(h + 1) * hd]), bits(&alone), "{what}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_empty_span_gives_zeros() {
        for (k8, v8) in FORMATS {
            let layout = KvLayout { kv_stride: 32, kv_off: 0, head_dim: 32 };
            let (keys, values) = (Rows::new(&fill(64, 1), k8), Rows::new(&fill(64, 3), v8));
            let (keys, values) = (keys.kv(), values.kv());
            for g in 1..=MAX_GROUP {
                let mut out = vec![9.0; 32 * g];
                #[allow(clippy::reversed_empty_ranges)]
                attend_group(&fill(32 * g, 2), keys, values, layout, 1..=0, 1.0, &mut AttnScratch::default(), &mut out);
                assert_eq!(out, vec![0.0; 32 * g]);
            }
            let mut out = vec![9.0; 32];
            #[allow(clippy::reversed_empty_ranges)]
            attend_ref(&fill(32, 2), keys, values, layout, 1..=0, 1.0, &mut AttnScratch::default(), &mut out);
            assert_eq!(out, vec![0.0; 32]);
        }
    }

    #[test]
    #[should_panic(expected = "query heads per call")]
    fn group_refuses_more_heads_than_it_holds() {
        let layout = KvLayout { kv_stride: 8, kv_off: 0, head_dim: 8 };
        let kv = to_f16(&fill(8, 1));
        let n = MAX_GROUP + 1;
        let kv = KvRows::F16(&kv);
        attend_group(&vec![0.0; 8 * n], kv, kv, layout, 0..=0, 1.0, &mut AttnScratch::default(), &mut vec![0.0; 8 * n]);
    }

    #[test]
    #[should_panic(expected = "whole 32-element blocks")]
    fn q8_0_refuses_heads_of_part_blocks() {
        let layout = KvLayout { kv_stride: 48, kv_off: 0, head_dim: 48 };
        let (quants, scales) = (vec![0i8; 96], vec![1f32; 3]);
        let kv = KvRows::Q8_0 { quants: &quants, scales: &scales };
        attend(&[0.0; 48], kv, kv, layout, 0..=0, 1.0, &mut AttnScratch::default(), &mut [0.0; 48]);
    }

    #[test]
    fn one_position_returns_its_value() {
        for (k8, v8) in FORMATS {
            let layout = KvLayout { kv_stride: 32, kv_off: 0, head_dim: 32 };
            let (keys, values) = (Rows::new(&fill(32, 4), k8), Rows::new(&fill(32, 5), v8));
            let mut out = vec![0.0; 32];
            attend(&fill(32, 6), keys.kv(), values.kv(), layout, 0..=0, 0.3, &mut AttnScratch::default(), &mut out);
            assert_eq!(out, values.values(), "k8 {k8} v8 {v8}");
        }
    }

    fn to_f16(x: &[f32]) -> Vec<f16> {
        x.iter().map(|&v| f16::from_f32(v)).collect()
    }

    /// The f16 arithmetic itself: the query and the softmax weights are
    /// rounded to f16 (llama.cpp's f16 products do the same), so a query
    /// that is not an f16 value gives the score of its rounded value. Two
    /// positions whose keys differ: with q = 1 + 2^-12 (rounds to 1.0) the
    /// weights are exactly those of q = 1.
    #[test]
    fn query_and_weights_are_rounded_to_f16() {
        let layout = KvLayout { kv_stride: 8, kv_off: 0, head_dim: 8 };
        let keys = to_f16(&[[0.5f32; 8], [-0.25f32; 8]].concat());
        let values = to_f16(&[[1.0f32; 8], [3.0f32; 8]].concat());
        let (keys, values) = (KvRows::F16(&keys), KvRows::F16(&values));
        for f in [attend, attend_ref] {
            let mut exact = vec![0.0; 8];
            let mut near = vec![0.0; 8];
            f(&[1.0; 8], keys, values, layout, 0..=1, 1.0, &mut AttnScratch::default(), &mut exact);
            let q = 1.0 + 2f32.powi(-12);
            f(&[q; 8], keys, values, layout, 0..=1, 1.0, &mut AttnScratch::default(), &mut near);
            assert_eq!(exact, near);
            // softmax([4, -2]) weights, each rounded to f16, then 1*w0 + 3*w1.
            let w0 = 1.0 / (1.0 + (-6.0f32).exp());
            let (w0, w1) = (round_f16(w0), round_f16(1.0 - w0));
            assert!((exact[0] - (w0 + 3.0 * w1)).abs() < 1e-6, "{} vs {}", exact[0], w0 + 3.0 * w1);
        }
    }
}
