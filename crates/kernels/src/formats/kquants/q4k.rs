//! Q4_K: 256 weights in 144 bytes (4.5 bits per weight).
//!
//! Eight sub-blocks of 32, each with a 6-bit scale and a 6-bit min; weight
//! `= d*sc[j]*q - dmin*m[j]` with `q` a 4-bit quant. `qs` is four 32-byte
//! chunks, chunk `c` holding sub-block `2c` in its low nibbles and `2c+1` in
//! its high nibbles (so one 32-byte load feeds two sub-blocks in SIMD).

use super::{f16_to_f32, has_avx2_fma, pack_scale_min_k4, unpack_scale_min_k4, BlockQ8K, QK_K};
use crate::formats::fit::fit_scale_min;
use crate::formats::{BlockFormat, GroupScales};
use crate::GgmlType;

/// ggml's `block_q4_K`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4K {
    /// Super-block scale for the scales (f16 bits).
    pub d: u16,
    /// Super-block scale for the mins (f16 bits).
    pub dmin: u16,
    /// Eight 6-bit scales and eight 6-bit mins, packed (see
    /// `unpack_scale_min_k4`).
    pub scales: [u8; 12],
    /// 4-bit quants.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::align_of::<BlockQ4K>() == 2);

impl BlockFormat for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4_K;
    const BLOCK: usize = QK_K;
    type Dot = BlockQ8K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K, "Q4_K dequantize: length mismatch");
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let d = f16_to_f32(b.d);
            let dmin = f16_to_f32(b.dmin);
            let (sc, mn) = unpack_scale_min_k4(&b.scales);
            for c in 0..4 {
                let q = &b.qs[32 * c..32 * c + 32];
                let (d1, m1) = (d * sc[2 * c] as f32, dmin * mn[2 * c] as f32);
                let (d2, m2) = (d * sc[2 * c + 1] as f32, dmin * mn[2 * c + 1] as f32);
                let y = &mut y[64 * c..64 * c + 64];
                for l in 0..32 {
                    y[l] = d1 * (q[l] & 0xF) as f32 - m1;
                    y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
    }

    /// Per super-block: `d*Σ_j sc[j]*Σ q*q8 - dmin*Σ_j m[j]*Σ q8`, the inner
    /// sums in integers, the sums of q8 taken from `bsums`.
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len(), "Q4_K vec_dot: block count mismatch");
        let mut sum = 0.0f32;
        for (x, y) in w.iter().zip(a) {
            let (sc, mn) = unpack_scale_min_k4(&x.scales);
            let mut isum = 0i32;
            let mut msum = 0i32;
            for j in 0..8 {
                let (c, shift) = (j / 2, 4 * (j % 2));
                let q = &x.qs[32 * c..32 * c + 32];
                let q8 = &y.qs[32 * j..32 * j + 32];
                let s: i32 = q.iter().zip(q8).map(|(&q, &v)| ((q >> shift) & 0xF) as i32 * v as i32).sum();
                isum += sc[j] as i32 * s;
                msum += mn[j] as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32);
            }
            sum += y.d * f16_to_f32(x.d) * isum as f32 - y.d * f16_to_f32(x.dmin) * msum as f32;
        }
        sum
    }

    fn vec_dot(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len(), "Q4_K vec_dot: block count mismatch");
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { vec_dot_avx2(w, a) };
        }
        Self::vec_dot_ref(w, a)
    }

    fn vec_dot_multi<const N: usize>(w: &[Self], a: [&[BlockQ8K]; N], _scales: &[GroupScales], out: &mut [f32; N]) {
        for a in &a {
            assert_eq!(w.len(), a.len(), "Q4_K vec_dot: block count mismatch");
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            *out = unsafe { vec_dot_multi_avx2(w, a) };
            return;
        }
        for (o, a) in out.iter_mut().zip(a) {
            *o = Self::vec_dot_ref(w, a);
        }
    }
}

/// AVX2 version of [`BlockQ4K::vec_dot_ref`].
///
/// Per super-block, both integer sums of the reference — `isum = Σ_j sc[j]
/// Σ q*q8` and `msum = Σ_j m[j] * bsums` — are formed exactly in i32 lanes
/// and reduced to two integers, which are then scaled and accumulated in
/// f32: lane 0 of `acc` gathers `y.d*d * isum`, lane 1 `y.d*(-dmin) *
/// msum`, and the result is their sum. [`vec_dot_multi_avx2`] does the same
/// float operations for each of its tokens in its own lanes, so the two agree
/// to the bit; that layout is what lets it scale four tokens' sums with one
/// instruction.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn vec_dot_avx2(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    use super::simd::*;
    use std::arch::x86_64::*;

    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        let xd = f16_to_f32(x.d);
        let xdmin = f16_to_f32(x.dmin);
        let (sc, mn) = unpack_scale_min_k4(&x.scales);
        let pm = _mm256_madd_epi16(load256(y.bsums.as_ptr()), widen_mins(mn));
        let sc16 = bcast_u8x8_as_i16(sc);
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let (lo, hi) = nibbles(load256(x.qs.as_ptr().add(32 * c)), m4);
            let (s0, s1) = sub_block_scales(sc16, c);
            // q ≤ 15, |q8| ≤ 127: pair sums ≤ 3810, no i16 saturation.
            let p0 = _mm256_maddubs_epi16(lo, load256(y.qs.as_ptr().add(64 * c)));
            let p1 = _mm256_maddubs_epi16(hi, load256(y.qs.as_ptr().add(64 * c + 32)));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p0, s0));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p1, s1));
        }
        // [isum, msum, -, -]; |isum| ≤ 8*63*15*127*32 < 2^25, exact in i32.
        let tot = _mm_cvtepi32_ps(lane_sums_x2(sumi, pm));
        let scale = _mm_mul_ps(_mm_set1_ps(y.d), _mm_setr_ps(xd, -xdmin, 0.0, 0.0));
        acc = _mm_fmadd_ps(tot, scale, acc);
    }
    _mm_cvtss_f32(acc) + _mm_cvtss_f32(_mm_movehdup_ps(acc))
}

/// The eight 6-bit mins as sixteen i16, each repeated twice: `bsums` hold
/// sums of 16 quants, mins cover 32, so `madd(bsums, mins)` gives
/// `m[j] * (bsums[2j] + bsums[2j+1])` in lane j.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn widen_mins(mn: [u8; 8]) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let mn8 = _mm_cvtsi64_si128(i64::from_le_bytes(mn));
    _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn8, mn8))
}

/// The low and high nibbles of 32 quant bytes: sub-blocks 2c and 2c+1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn nibbles(
    q4: std::arch::x86_64::__m256i,
    m4: std::arch::x86_64::__m256i,
) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    (_mm256_and_si256(q4, m4), _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4))
}

/// The scales of sub-blocks 2c and 2c+1, each broadcast to sixteen i16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn sub_block_scales(
    sc16: std::arch::x86_64::__m256i,
    c: usize,
) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    use super::simd::pick_i16;
    use std::arch::x86_64::*;
    (_mm256_shuffle_epi8(sc16, pick_i16(2 * c, 2 * c)), _mm256_shuffle_epi8(sc16, pick_i16(2 * c + 1, 2 * c + 1)))
}

/// [`vec_dot_avx2`] of one weight row against N ≤ 4 activation rows,
/// decoding each super-block (scales, mins, nibbles) once.
///
/// Token t's integer sums are formed exactly as in `vec_dot_avx2`; the
/// per-token reductions are one transpose-and-add (`simd::lane_sums_x8`) giving
/// `[isum t0..t3 | msum t0..t3]`, and one FMA scales and accumulates all
/// eight, lane t and 4+t doing for token t what lanes 0 and 1 do in
/// `vec_dot_avx2`. So `out[t]` is bit-identical to `vec_dot_avx2(w, a[t])`
/// (`tests/multi_dot.rs`).
///
/// # Safety
/// The CPU must support AVX2 and FMA; every `a[t]` as long as `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn vec_dot_multi_avx2<const N: usize>(w: &[BlockQ4K], a: [&[BlockQ8K]; N]) -> [f32; N] {
    use super::simd::*;
    use std::arch::x86_64::*;

    const { assert!(N >= 1 && N <= 4) };
    for a in &a {
        assert_eq!(w.len(), a.len());
    }
    let m4 = _mm256_set1_epi8(0x0F);
    // Lanes 0..4: Σ y.d*d*isum of tokens 0..4; lanes 4..8: Σ y.d*(-dmin)*msum.
    let mut acc = _mm256_setzero_ps();
    for (i, x) in w.iter().enumerate() {
        let xd = f16_to_f32(x.d);
        let xdmin = f16_to_f32(x.dmin);
        let (sc, mn) = unpack_scale_min_k4(&x.scales);
        let mn16 = widen_mins(mn);
        // Tokens past N keep zero sums (and zero scales below).
        let mut pm = [_mm256_setzero_si256(); 4];
        for t in 0..N {
            pm[t] = _mm256_madd_epi16(load256(a[t].get_unchecked(i).bsums.as_ptr()), mn16);
        }
        let sc16 = bcast_u8x8_as_i16(sc);
        let mut sumi = [_mm256_setzero_si256(); 4];
        for c in 0..4 {
            let (lo, hi) = nibbles(load256(x.qs.as_ptr().add(32 * c)), m4);
            let (s0, s1) = sub_block_scales(sc16, c);
            for t in 0..N {
                let yq = a[t].get_unchecked(i).qs.as_ptr();
                let p0 = _mm256_maddubs_epi16(lo, load256(yq.add(64 * c)));
                let p1 = _mm256_maddubs_epi16(hi, load256(yq.add(64 * c + 32)));
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p0, s0));
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p1, s1));
            }
        }
        let tot = _mm256_cvtepi32_ps(lane_sums_x8(sumi, pm));
        let yd = |t: usize| if t < N { a[t].get_unchecked(i).d } else { 0.0 };
        let yd4 = _mm_setr_ps(yd(0), yd(1), yd(2), yd(3));
        let xs = _mm256_set_m128(_mm_set1_ps(-xdmin), _mm_set1_ps(xd));
        acc = _mm256_fmadd_ps(tot, _mm256_mul_ps(_mm256_set_m128(yd4, yd4), xs), acc);
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    std::array::from_fn(|t| lanes[t] + lanes[4 + t])
}

impl BlockQ4K {
    /// Quantizes `x` (`x.len() == out.len() * 256`) to Q4_K: scales and
    /// mins as `ScaleMinCodes::fit` finds them for 4-bit quants.
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        Self::quantize_weighted(x, None, out)
    }

    /// [`quantize`](Self::quantize) with each element's importance
    /// (`imp.len() == x.len()`) weighing its error in the fits.
    pub fn quantize_weighted(x: &[f32], imp: Option<&[f32]>, out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K, "Q4_K quantize: length mismatch");
        for (k, (xb, b)) in x.chunks_exact(QK_K).zip(out.iter_mut()).enumerate() {
            let c = ScaleMinCodes::<8>::fit(xb, 15, 63, imp.map(|w| &w[k * QK_K..(k + 1) * QK_K]));
            b.d = c.d.to_bits();
            b.dmin = c.dmin.to_bits();
            b.scales = pack_scale_min_k4(&c.ls, &c.lm);
            b.qs = [0; QK_K / 2];
            for j in 0..8 {
                let (c_, shift) = (j / 2, 4 * (j % 2));
                for l in 0..32 {
                    b.qs[32 * c_ + l] |= c.quant(xb, 32 * j + l) << shift;
                }
            }
        }
    }
}

/// The super-block of a scale/min k-quant fitted: `d`, `dmin` and each of
/// its `N` sub-blocks' scale and min codes, for quants in `0..=nmax` —
/// Q4_K and Q5_K: eight sub-blocks of 32 with 6-bit codes; Q2_K: sixteen
/// of 16 with 4-bit codes.
pub(crate) struct ScaleMinCodes<const N: usize> {
    pub d: half::f16,
    pub dmin: half::f16,
    pub ls: [u8; N],
    pub lm: [u8; N],
    nmax: f32,
}

impl<const N: usize> ScaleMinCodes<N> {
    /// Elements per sub-block.
    const SUB: usize = QK_K / N;

    /// Each sub-block gets a least-squares scale/min fit (`fit_scale_min`);
    /// the `N` scales and `N` mins are then quantized to codes in
    /// `0..=code_max` against the super-block's `d`/`dmin` (stored as f16),
    /// and the quants are re-derived from the scales actually stored
    /// ([`quant`](Self::quant)), so rounding of the scales does not compound.
    pub fn fit(xb: &[f32], nmax: u8, code_max: u8, imp: Option<&[f32]>) -> Self {
        let sub = Self::SUB;
        let nmaxf = nmax as f32;
        let cmax = code_max as f32;
        let mut scales = [0.0f32; N];
        let mut mins = [0.0f32; N];
        for j in 0..N {
            let r = sub * j..sub * j + sub;
            (scales[j], mins[j]) = fit_scale_min(&xb[r.clone()], nmax, imp.map(|w| &w[r]));
        }
        // d and dmin must leave every sub-block's covering codes (see
        // `choose_codes`) within range, so they bound the covering
        // scale/min as well as the fitted ones, rounded up in f16.
        let mut max_scale = 0.0f32;
        let mut max_min = 0.0f32;
        for j in 0..N {
            let s = &xb[sub * j..sub * j + sub];
            let lo = s.iter().copied().fold(0.0f32, f32::min);
            let hi = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            max_scale = max_scale.max(scales[j]).max((hi - lo) / nmaxf);
            max_min = max_min.max(mins[j]).max(-lo);
        }
        let d = f16_at_least(max_scale / cmax);
        let dmin = f16_at_least(max_min / cmax);
        let (df, dminf) = (d.to_f32(), dmin.to_f32());
        let code = |v: f32, step: f32| -> u8 {
            if step > 0.0 {
                (v / step).round().clamp(0.0, cmax) as u8
            } else {
                0
            }
        };
        let mut ls = [0u8; N];
        let mut lm = [0u8; N];
        for j in 0..N {
            let r = sub * j..sub * j + sub;
            let fitted = (code(scales[j], df), code(mins[j], dminf));
            let steps = Steps { df, dminf, nmax: nmaxf, code_max: cmax };
            (ls[j], lm[j]) = choose_codes(&xb[r.clone()], fitted, steps, imp.map(|w| &w[r]));
        }
        ScaleMinCodes { d, dmin, ls, lm, nmax: nmaxf }
    }

    /// The quant of element `i` of the super-block `xb` under the stored codes.
    pub fn quant(&self, xb: &[f32], i: usize) -> u8 {
        let j = i / Self::SUB;
        let step = self.d.to_f32() * self.ls[j] as f32;
        let off = self.dmin.to_f32() * self.lm[j] as f32;
        if step > 0.0 {
            ((xb[i] + off) / step).round().clamp(0.0, self.nmax) as u8
        } else {
            0
        }
    }
}

/// A super-block's stored steps and ranges: a sub-block's scale is
/// `df·code`, its min `dminf·code`, codes in `0..=code_max`, quants in
/// `0..=nmax`.
#[derive(Clone, Copy)]
struct Steps {
    df: f32,
    dminf: f32,
    nmax: f32,
    code_max: f32,
}

/// The smallest f16 not below `v` (for finite, non-negative `v`).
fn f16_at_least(v: f32) -> half::f16 {
    let h = half::f16::from_f32(v);
    if h.to_f32() < v {
        half::f16::from_bits(h.to_bits() + 1)
    } else {
        h
    }
}

/// Reconstruction of `x` with scale code `ls` and min code `lm`: returns
/// (largest absolute error, sum of squared errors) with each element at its
/// nearest level.
fn code_error(x: &[f32], ls: u8, lm: u8, st: Steps, imp: Option<&[f32]>) -> (f32, f32) {
    let step = st.df * ls as f32;
    let off = st.dminf * lm as f32;
    let (mut max_err, mut sq) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = if step > 0.0 { ((v + off) / step).round().clamp(0.0, st.nmax) } else { 0.0 };
        let e = (step * q - off - v).abs();
        max_err = max_err.max(e);
        sq += imp.map_or(1.0, |w| w[i]) * e * e;
    }
    (max_err, sq)
}

/// Picks the (scale, min) codes of one sub-block once `d`/`dmin` are fixed.
/// Rounding the fitted scale and min to codes independently can leave the
/// sub-block's range uncovered (a scale rounded down makes the top level
/// fall short by up to `nmax` half-codes), so the neighbours of the rounded
/// codes and the codes that just cover `[min(lo, 0), hi]` are tried too.
/// Among candidates whose worst element is within one level of the
/// sub-block's own step (the covering codes always are), the one with the
/// least squared error wins. With importances the worst-element bound is
/// dropped: an element of a column that is never active may then take a
/// large error, if that buys the active columns a smaller one.
fn choose_codes(x: &[f32], fitted: (u8, u8), st: Steps, imp: Option<&[f32]>) -> (u8, u8) {
    let lo = x.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
    let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let cmax = st.code_max;
    // Covering codes: the min code rounded up (so -off <= lo), then the
    // smallest scale code whose top level reaches hi.
    let lm_cover = if st.dminf > 0.0 { (-lo / st.dminf).ceil().clamp(0.0, cmax) as u8 } else { 0 };
    let off_cover = st.dminf * lm_cover as f32;
    let ls_cover = if st.df > 0.0 { ((hi + off_cover) / (st.nmax * st.df)).ceil().clamp(0.0, cmax) as u8 } else { 0 };
    let bound = ((hi - lo) / st.nmax).max(st.df).max(st.dminf);
    let mut best = (ls_cover, lm_cover);
    let mut best_sq = code_error(x, ls_cover, lm_cover, st, imp).1;
    let (fs, fm) = (fitted.0 as i32, fitted.1 as i32);
    let range = 0..=cmax as i32;
    for ls in [fs - 1, fs, fs + 1, ls_cover as i32] {
        for lm in [fm - 1, fm, fm + 1, lm_cover as i32] {
            if !range.contains(&ls) || !range.contains(&lm) {
                continue;
            }
            let (ls, lm) = (ls as u8, lm as u8);
            let (max_err, sq) = code_error(x, ls, lm, st, imp);
            if (imp.is_some() || max_err <= bound) && sq < best_sq {
                best = (ls, lm);
                best_sq = sq;
            }
        }
    }
    best
}
