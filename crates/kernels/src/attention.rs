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
//! The KV cache stores every position's heads side by side (`kv_stride`
//! values per position, this head's `head_dim` values at `kv_off`), so the
//! kernel walks it with a stride and never copies it. The scalar reference
//! is what any CPU runs; the AVX2 + FMA variant is picked at run time and
//! agrees with it to float rounding (checked in the tests below).
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
    #[cfg(target_arch = "x86_64")]
    if crate::formats::has_avx2_fma() {
        check(q, keys, values, layout, &span, out);
        // SAFETY: the features were just detected; bounds checked above.
        unsafe { avx2::attend(q, keys, values, layout, span, scale, scratch, out) };
        return;
    }
    // (The reference checks the bounds itself.)
    attend_ref(q, keys, values, layout, span, scale, scratch, out)
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

/// Softmax of a head's scores in place (`span` is never empty, so there is a
/// finite maximum unless the scores are NaN, which then spread to the
/// output). `e^x` is [`crate::ops::exp_poly`], the bits of the SIMD
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
mod avx2 {
    use super::{AttnScratch, KvLayout};
    use half::f16;
    use std::arch::x86_64::*;
    use std::ops::RangeInclusive;

    /// Output floats kept in registers while the values stream past: eight
    /// ymm accumulators.
    const OUT_CHUNK: usize = 64;

    /// # Safety
    /// AVX2 and FMA must be available; `super::check` must hold.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend(
        q: &[f32],
        keys: &[f16],
        values: &[f16],
        layout: KvLayout,
        span: RangeInclusive<usize>,
        scale: f32,
        scratch: &mut AttnScratch,
        out: &mut [f32],
    ) {
        let KvLayout { kv_stride, kv_off, head_dim: hd } = layout;
        let AttnScratch { q: q16, scores } = scratch;
        q16.clear();
        q16.extend_from_slice(q);
        round_f16_inplace(q16);
        let q = q16.as_slice();
        scores.clear();
        // Four positions at a time: one horizontal reduction for the four
        // scores instead of one each.
        let key = |j: usize| keys.as_ptr().add(j * kv_stride + kv_off) as *const u16;
        let (mut j, end) = (*span.start(), *span.end() + 1);
        while j + 4 <= end {
            let s = dot4(q.as_ptr(), [key(j), key(j + 1), key(j + 2), key(j + 3)], hd);
            scores.extend(s.iter().map(|&x| x * scale));
            j += 4;
        }
        while j < end {
            scores.push(dot(q.as_ptr(), key(j), hd) * scale);
            j += 1;
        }
        softmax(scores);
        round_f16_inplace(scores);
        let first = *span.start();
        let mut c = 0;
        while c < hd {
            let width = (hd - c).min(OUT_CHUNK);
            let mut acc = [_mm256_setzero_ps(); OUT_CHUNK / 8];
            let lanes = width / 8;
            let mut tail = [0f32; 8];
            for (i, &p) in scores.iter().enumerate() {
                let vj = values.as_ptr().add((first + i) * kv_stride + kv_off + c) as *const u16;
                let pv = _mm256_set1_ps(p);
                for (l, a) in acc.iter_mut().enumerate().take(lanes) {
                    *a = _mm256_fmadd_ps(pv, load_f16x8(vj.add(8 * l)), *a);
                }
                for (t, x) in tail.iter_mut().enumerate().take(width - 8 * lanes) {
                    *x += p * f16::from_bits(*vj.add(8 * lanes + t)).to_f32();
                }
            }
            for (l, a) in acc.iter().enumerate().take(lanes) {
                _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * l), *a);
            }
            out[c + 8 * lanes..c + width].copy_from_slice(&tail[..width - 8 * lanes]);
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

    /// `a·b[k]` for four f16 vectors `b[k]` of length `n`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot4(a: *const f32, b: [*const u16; 4], n: usize) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_loadu_ps(a.add(i));
            for k in 0..4 {
                acc[k] = _mm256_fmadd_ps(x, load_f16x8(b[k].add(i)), acc[k]);
            }
            i += 8;
        }
        // [Σ0 Σ1 Σ2 Σ3] from the four 8-lane sums: pairwise adds within
        // each 128-bit half, then the halves added.
        let h01 = _mm256_hadd_ps(acc[0], acc[1]);
        let h23 = _mm256_hadd_ps(acc[2], acc[3]);
        let h = _mm256_hadd_ps(h01, h23);
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        let mut out: [f32; 4] = std::mem::transmute(s);
        while i < n {
            for k in 0..4 {
                out[k] += *a.add(i) * f16::from_bits(*b[k].add(i)).to_f32();
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
