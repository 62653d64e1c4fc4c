//! One head's attention for one query row over a span of cached keys and
//! values: scores `q·k_j · scale`, softmax, and the probability-weighted sum
//! of the values.
//!
//! Keys and values are f16, as in llama.cpp's default cache (half the
//! memory and bandwidth of f32), and the arithmetic is llama.cpp's for an
//! f16 cache: its f16 matrix products round the f32 operand to f16 too, so
//! the query is rounded to f16 before `q·k` and the softmax weights before
//! they weight the values; products and sums are f32. (Against exact f32
//! attention this left the agreement with llama.cpp's golden log-probabilities
//! unchanged within rounding noise on the four test models.)
//!
//! The kernel takes the cache as rows of `kv_stride` values with this head's
//! `head_dim` at `kv_off`, and walks it without copying. The engine's cache
//! is head-major (`kv_stride == head_dim`: one KV head's positions one
//! contiguous stream, which the hardware prefetcher follows; side by side,
//! a head's short piece of every row was read at half the speed). Heads that
//! share a KV head (grouped-query attention) go through [`attend_group`]
//! together, so each key and value is loaded and converted once for all of
//! them. The scalar reference is what any CPU runs; the AVX2 + FMA variant
//! is picked at run time and agrees with it to float rounding (checked in
//! the tests below).
//!
//! A decode step runs this `rows × heads` times and a batched step with long
//! contexts spends a real share of its time here (16 streams of a few
//! hundred tokens on SmolLM2: ~12% in the scalar build), which is why it is
//! a kernel and not a loop in the model code.

use half::f16;
use std::ops::RangeInclusive;

/// Scratch space for [`attend`], reused between calls so the decode loop
/// does not allocate.
#[derive(Default)]
pub struct AttnScratch {
    /// The query rounded to f16, [head_dim].
    q: Vec<f32>,
    /// Scores, then softmax weights, of the span's positions.
    scores: Vec<f32>,
}

/// `x` rounded to the nearest f16 (ties to even), back in f32.
#[inline]
fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Where one head's keys and values sit in the cache.
#[derive(Clone, Copy, Debug)]
pub struct KvLayout {
    /// Values per cached position (all KV heads).
    pub kv_stride: usize,
    /// This head's first value within a position.
    pub kv_off: usize,
    /// Values per head.
    pub head_dim: usize,
}

/// `out = Σ_j softmax(q·k_j · scale)_j · v_j` over positions `span`.
///
/// `q` and `out` hold `head_dim` floats; `keys` and `values` the cache rows
/// (`kv_stride` values per position).
pub fn attend(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
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
    keys: &[f16],
    values: &[f16],
    layout: KvLayout,
    span: RangeInclusive<usize>,
    scale: f32,
    scratch: &mut AttnScratch,
    outs: &mut [f32],
) {
    let hd = layout.head_dim;
    assert!(hd > 0 && qs.len().is_multiple_of(hd), "attend: the queries must be whole heads of head_dim floats");
    let n = qs.len() / hd;
    assert!((1..=MAX_GROUP).contains(&n), "attend: 1 to {MAX_GROUP} query heads per call, not {n}");
    assert_eq!(outs.len(), qs.len(), "attend: one output per query head");
    #[cfg(target_arch = "x86_64")]
    if crate::formats::has_avx2_fma() {
        // Every head has the same length (asserted above) and the same span.
        check(&qs[..hd], keys, values, layout, &span, &outs[..hd]);
        // SAFETY: the features were just detected; bounds checked above.
        unsafe {
            match n {
                1 => avx2::attend::<1>(qs, keys, values, layout, span, scale, scratch, outs),
                2 => avx2::attend::<2>(qs, keys, values, layout, span, scale, scratch, outs),
                _ => avx2::attend::<3>(qs, keys, values, layout, span, scale, scratch, outs),
            }
        }
        return;
    }
    // (The reference checks the bounds itself.)
    for (q, out) in qs.chunks_exact(hd).zip(outs.chunks_exact_mut(hd)) {
        attend_ref(q, keys, values, layout, span.clone(), scale, scratch, out)
    }
}

/// The scalar reference of [`attend`].
pub fn attend_ref(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    layout: KvLayout,
    span: RangeInclusive<usize>,
    scale: f32,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    check(q, keys, values, layout, &span, out);
    let KvLayout { kv_stride, kv_off, head_dim: hd } = layout;
    let AttnScratch { q: q16, scores } = scratch;
    q16.clear();
    q16.extend(q.iter().map(|&x| round_f16(x)));
    scores.clear();
    scores.extend(span.clone().map(|j| {
        let kj = &keys[j * kv_stride + kv_off..j * kv_stride + kv_off + hd];
        dot_ref(q16, kj) * scale
    }));
    softmax_ref(scores);
    out.iter_mut().for_each(|d| *d = 0.0);
    for (j, &p) in span.zip(scores.iter()) {
        let p = round_f16(p);
        let vj = &values[j * kv_stride + kv_off..j * kv_stride + kv_off + hd];
        for (d, x) in out.iter_mut().zip(vj) {
            *d += p * x.to_f32();
        }
    }
}

fn check(q: &[f32], keys: &[f16], values: &[f16], l: KvLayout, span: &RangeInclusive<usize>, out: &[f32]) {
    assert!(q.len() == l.head_dim && out.len() == l.head_dim, "attend: q/out must hold head_dim floats");
    assert!(l.kv_off + l.head_dim <= l.kv_stride, "attend: head outside the cache row");
    if !span.is_empty() {
        let end = (span.end() + 1) * l.kv_stride;
        assert!(keys.len() >= end && values.len() >= end, "attend: span beyond the cache");
    }
}

/// Softmax of a head's scores in place (NaN scores spread to the output; an
/// empty span leaves nothing to do). `e^x` is [`crate::ops::exp_poly`], the bits of the SIMD
/// kernel's eight-lane exp.
fn softmax_ref(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = crate::ops::exp_poly(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
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

#[cfg(target_arch = "x86_64")]
#[allow(
    clippy::needless_range_loop,
    reason = "SIMD loops index several arrays (registers per head, per lane) by one counter"
)]
mod avx2 {
    use super::{AttnScratch, KvLayout};
    use half::f16;
    use std::arch::x86_64::*;
    use std::ops::RangeInclusive;

    /// `G` heads' attention over one KV head's span (`super::attend_group`).
    /// Per head the same operations in the same order as for one head alone.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `super::check` must hold for every
    /// head; `qs` and `outs` hold `G × head_dim` floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend<const G: usize>(
        qs: &[f32],
        keys: &[f16],
        values: &[f16],
        layout: KvLayout,
        span: RangeInclusive<usize>,
        scale: f32,
        scratch: &mut AttnScratch,
        outs: &mut [f32],
    ) {
        let KvLayout { kv_stride, kv_off, head_dim: hd } = layout;
        let AttnScratch { q: q16, scores } = scratch;
        q16.clear();
        q16.extend_from_slice(qs);
        round_f16_inplace(q16);
        let q = q16.as_ptr();
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
        // Four positions at a time: one horizontal reduction for the four
        // scores of a head instead of one each.
        let key = |j: usize| keys.as_ptr().add(j * kv_stride + kv_off) as *const u16;
        let mut j = first;
        while j + 4 <= end {
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
        for s in scores.chunks_exact_mut(len) {
            softmax(s);
            round_f16_inplace(s);
        }
        // The weighted sum of the values, `width` output floats of every head
        // at a time in ymm accumulators (eight for one head; four each for
        // more, so they stay in the sixteen registers).
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

    /// [`super::softmax_ref`] with `e^x` eight lanes at a time (the same
    /// bits) and the sum in eight lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn softmax(x: &mut [f32]) {
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
    }

    /// Eight f16 (raw bits) as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_f16x8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// Rounds every element to the nearest f16 (ties to even, as
    /// `f16::from_f32`), in place.
    #[target_feature(enable = "avx2,fma,f16c")]
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
    #[target_feature(enable = "avx2,fma,f16c")]
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
    #[target_feature(enable = "avx2,fma,f16c")]
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

    #[test]
    fn simd_agrees_with_reference() {
        // Head dims of the test models (64, 256) and odd ones that exercise
        // the tails; spans from one position to a few hundred.
        for (hd, n_kv_heads, head) in [(64, 2, 1), (256, 1, 0), (80, 3, 2), (13, 2, 1), (7, 1, 0)] {
            for (first, last) in [(0, 0), (0, 5), (3, 40), (0, 300)] {
                let layout = KvLayout { kv_stride: hd * n_kv_heads, kv_off: hd * head, head_dim: hd };
                let keys = to_f16(&fill((last + 1) * layout.kv_stride, 1 + hd as u64));
                let values = to_f16(&fill((last + 1) * layout.kv_stride, 2 + last as u64));
                let q = fill(hd, 3);
                let scale = 1.0 / (hd as f32).sqrt();
                let (mut s1, mut s2) = (AttnScratch::default(), AttnScratch::default());
                let (mut o1, mut o2) = (vec![9.0; hd], vec![9.0; hd]);
                attend_ref(&q, &keys, &values, layout, first..=last, scale, &mut s1, &mut o1);
                attend(&q, &keys, &values, layout, first..=last, scale, &mut s2, &mut o2);
                for (a, b) in o1.iter().zip(&o2) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "hd {hd} span {first}..={last}: {a} vs {b}");
                }
            }
        }
    }

    /// Heads sharing a KV head, in one call: the same bits as one call per
    /// head (and, through `attend`, as the reference to rounding).
    #[test]
    fn group_is_per_head_bit_for_bit() {
        for hd in [64, 128, 13, 8] {
            for (first, last) in [(0, 0), (0, 2), (0, 5), (3, 40), (0, 300)] {
                let layout = KvLayout { kv_stride: hd, kv_off: 0, head_dim: hd };
                let keys = to_f16(&fill((last + 1) * hd, 11 + hd as u64));
                let values = to_f16(&fill((last + 1) * hd, 12 + last as u64));
                let scale = 1.0 / (hd as f32).sqrt();
                for g in 1..=MAX_GROUP {
                    let qs = fill(g * hd, 13 + g as u64);
                    let mut together = vec![9.0; g * hd];
                    let mut scratch = AttnScratch::default();
                    attend_group(&qs, &keys, &values, layout, first..=last, scale, &mut scratch, &mut together);
                    for h in 0..g {
                        let mut alone = vec![7.0; hd];
                        let q = &qs[h * hd..(h + 1) * hd];
                        attend(q, &keys, &values, layout, first..=last, scale, &mut scratch, &mut alone);
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&together[h * hd..(h + 1) * hd]), bits(&alone), "hd {hd} g {g} head {h}");
                    }
                }
            }
        }
    }

    #[test]
    fn an_empty_span_gives_zeros() {
        let layout = KvLayout { kv_stride: 8, kv_off: 0, head_dim: 8 };
        let kv = to_f16(&fill(16, 1));
        for g in 1..=MAX_GROUP {
            let mut out = vec![9.0; 8 * g];
            #[allow(clippy::reversed_empty_ranges)]
            attend_group(&fill(8 * g, 2), &kv, &kv, layout, 1..=0, 1.0, &mut AttnScratch::default(), &mut out);
            assert_eq!(out, vec![0.0; 8 * g]);
        }
        let mut out = vec![9.0; 8];
        #[allow(clippy::reversed_empty_ranges)]
        attend_ref(&fill(8, 2), &kv, &kv, layout, 1..=0, 1.0, &mut AttnScratch::default(), &mut out);
        assert_eq!(out, vec![0.0; 8]);
    }

    #[test]
    #[should_panic(expected = "query heads per call")]
    fn group_refuses_more_heads_than_it_holds() {
        let layout = KvLayout { kv_stride: 8, kv_off: 0, head_dim: 8 };
        let kv = to_f16(&fill(8, 1));
        let n = MAX_GROUP + 1;
        attend_group(
            &vec![0.0; 8 * n],
            &kv,
            &kv,
            layout,
            0..=0,
            1.0,
            &mut AttnScratch::default(),
            &mut vec![0.0; 8 * n],
        );
    }

    #[test]
    fn one_position_returns_its_value() {
        let layout = KvLayout { kv_stride: 8, kv_off: 0, head_dim: 8 };
        let keys = to_f16(&fill(8, 4));
        let values = to_f16(&fill(8, 5));
        let mut out = vec![0.0; 8];
        attend(&fill(8, 6), &keys, &values, layout, 0..=0, 0.3, &mut AttnScratch::default(), &mut out);
        let want: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
        assert_eq!(out, want);
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
        for f in [attend, attend_ref] {
            let mut exact = vec![0.0; 8];
            let mut near = vec![0.0; 8];
            f(&[1.0; 8], &keys, &values, layout, 0..=1, 1.0, &mut AttnScratch::default(), &mut exact);
            let q = 1.0 + 2f32.powi(-12);
            f(&[q; 8], &keys, &values, layout, 0..=1, 1.0, &mut AttnScratch::default(), &mut near);
            assert_eq!(exact, near);
            // softmax([4, -2]) weights, each rounded to f16, then 1*w0 + 3*w1.
            let w0 = 1.0 / (1.0 + (-6.0f32).exp());
            let (w0, w1) = (round_f16(w0), round_f16(1.0 - w0));
            assert!((exact[0] - (w0 + 3.0 * w1)).abs() < 1e-6, "{} vs {}", exact[0], w0 + 3.0 * w1);
        }
    }
}
