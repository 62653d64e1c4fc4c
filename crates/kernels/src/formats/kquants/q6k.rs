//! Q6_K: 256 weights in 210 bytes (6.5625 bits per weight).
//!
//! Sixteen sub-blocks of 16, each with a signed 8-bit scale; weight
//! `= d*sc[j]*(q-32)` with `q` a 6-bit quant: low 4 bits in `ql`, high 2 bits
//! in `qh`. The block is two halves of 128 elements; half `n` uses
//! `ql[64n..64n+64]`, `qh[32n..32n+32]`, scales `8n..8n+8`. Within a half,
//! element `32k + l` (k = 0..4, l = 0..32) takes its low bits from
//! `ql[l + 32*(k&1)]` (low nibble for k < 2, high for k ≥ 2) and its high
//! bits from bits `2k..2k+2` of `qh[l]`.

use super::{f16_to_f32, BlockQ8K, QK_K};
use crate::formats::fit::fit_symmetric;
use crate::formats::{simd_level, BlockFormat, GroupScales, SimdLevel};
use crate::GgmlType;

/// ggml's `block_q6_K`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ6K {
    /// Low 4 bits of the quants.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits of the quants.
    pub qh: [u8; QK_K / 4],
    /// Signed 8-bit scale per 16 elements.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale (f16 bits).
    pub d: u16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::align_of::<BlockQ6K>() == 2);

/// Where element `i` of a block keeps its quant: its low 4 bits in
/// `ql[.0]` at bit `.1` (0 or 4), its high 2 bits in `qh[.2]` at bit `.3`.
/// For i = 128n + 32k + l: `ql[64n + 32(k & 1) + l]`, low half when k < 2,
/// and bits 2k of `qh[32n + l]`; so elements 4c..4c + 4 sit in four
/// consecutive bytes of each, at the same bits.
#[inline(always)]
pub(crate) fn q6_place(i: usize) -> (usize, u32, usize, u32) {
    let (n, r) = (i / 128, i % 128);
    let (k, l) = (r / 32, r % 32);
    (64 * n + l + 32 * (k & 1), if k < 2 { 0 } else { 4 }, 32 * n + l, 2 * k as u32)
}

/// The unsigned 6-bit quant (0..64) of element `i` of a block.
#[inline(always)]
fn q6(b: &BlockQ6K, i: usize) -> u8 {
    let (lo_at, lo_shift, hi_at, hi_shift) = q6_place(i);
    ((b.ql[lo_at] >> lo_shift) & 0xF) | (((b.qh[hi_at] >> hi_shift) & 3) << 4)
}

impl BlockQ6K {
    /// Quantizes `x` (`x.len() == out.len() * 256`) to Q6_K: per
    /// 16-element sub-block, the scale (among steps that put its largest
    /// magnitude at −32 down to −24, each re-fit by least squares to the
    /// quants it gives) with the least squared error; the sixteen scales
    /// then go to 8 bits against the super-block's `d` (f16), and the quants
    /// are re-derived from the scales actually stored.
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        Self::quantize_weighted(x, None, out)
    }

    /// [`quantize`](Self::quantize) with each element's importance
    /// (`imp.len() == x.len()`) weighing its error in the scale fits.
    pub fn quantize_weighted(x: &[f32], imp: Option<&[f32]>, out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K, "Q6_K quantize: length mismatch");
        for (k, (xb, b)) in x.chunks_exact(QK_K).zip(out.iter_mut()).enumerate() {
            let mut scales = [0.0f32; 16];
            for (j, s) in scales.iter_mut().enumerate() {
                let at = k * QK_K + 16 * j;
                *s = fit_symmetric(&xb[16 * j..16 * j + 16], 32, imp.map(|w| &w[at..at + 16]));
            }
            let max = scales.iter().fold(0.0f32, |m, s| m.max(s.abs()));
            let d = half::f16::from_f32(max / 127.0);
            let df = d.to_f32();
            b.d = d.to_bits();
            b.ql = [0; QK_K / 2];
            b.qh = [0; QK_K / 4];
            for (j, &s) in scales.iter().enumerate() {
                let sc = if df > 0.0 { (s / df).round().clamp(-128.0, 127.0) } else { 0.0 };
                b.scales[j] = sc as i8;
                let step = df * sc;
                for (i, &v) in xb.iter().enumerate().skip(16 * j).take(16) {
                    let q = if step != 0.0 { (v / step).round().clamp(-32.0, 31.0) as i32 + 32 } else { 32 } as u8;
                    let (lo_at, lo_shift, hi_at, hi_shift) = q6_place(i);
                    b.ql[lo_at] |= (q & 0xF) << lo_shift;
                    b.qh[hi_at] |= (q >> 4) << hi_shift;
                }
            }
        }
    }
}

impl BlockFormat for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6_K;
    const BLOCK: usize = QK_K;
    type Dot = BlockQ8K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K, "Q6_K dequantize: length mismatch");
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let d = f16_to_f32(b.d);
            for (i, o) in y.iter_mut().enumerate() {
                *o = d * b.scales[i / 16] as f32 * (q6(b, i) as i32 - 32) as f32;
            }
        }
    }

    /// Per super-block: `d*Σ_j sc[j]*Σ (q-32)*q8`, the inner sums in
    /// integers (as ggml's reference does, with the -32 applied per element).
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len(), "Q6_K vec_dot: block count mismatch");
        let mut sum = 0.0f32;
        for (x, y) in w.iter().zip(a) {
            let mut isum = 0i32;
            for j in 0..16 {
                let s: i32 = (16 * j..16 * j + 16).map(|i| (q6(x, i) as i32 - 32) * y.qs[i] as i32).sum();
                isum += x.scales[j] as i32 * s;
            }
            sum += y.d * f16_to_f32(x.d) * isum as f32;
        }
        sum
    }

    fn vec_dot(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len(), "Q6_K vec_dot: block count mismatch");
        #[cfg(target_arch = "x86_64")]
        match simd_level() {
            // SAFETY: the CPU has the level's features (`simd_level` never
            // exceeds what was detected).
            SimdLevel::Avx512Vnni => return unsafe { vec_dot_vnni(w, a) },
            SimdLevel::Avx2 => return unsafe { vec_dot_avx2(w, a) },
            SimdLevel::Scalar => {}
        }
        Self::vec_dot_ref(w, a)
    }

    fn vec_dot_multi<const N: usize>(w: &[Self], a: [&[BlockQ8K]; N], _scales: &[GroupScales], out: &mut [f32; N]) {
        for a in &a {
            assert_eq!(w.len(), a.len(), "Q6_K vec_dot: block count mismatch");
        }
        #[cfg(target_arch = "x86_64")]
        match simd_level() {
            // SAFETY: as in `vec_dot`; the lengths were checked above.
            SimdLevel::Avx512Vnni => return *out = unsafe { vec_dot_multi_vnni(w, a) },
            SimdLevel::Avx2 => return *out = unsafe { vec_dot_multi_avx2(w, a) },
            SimdLevel::Scalar => {}
        }
        for (o, a) in out.iter_mut().zip(a) {
            *o = Self::vec_dot_ref(w, a);
        }
    }
}

/// AVX2 version of [`BlockQ6K::vec_dot_ref`].
///
/// `maddubs` wants unsigned × signed bytes, so the quants go in unbiased
/// (0..64) and the -32 is taken out afterwards in one go:
/// `Σ sc*(q-32)*q8 = Σ sc*q*q8 - 32*Σ_j sc[j]*bsums[j]`. That integer sum is
/// exact in i32 lanes; it is reduced to one integer per super-block and only
/// then scaled and accumulated in f32 (lane 0 of `acc`), the same float
/// operations [`vec_dot_multi_avx2`] does in token t's lane, so the two
/// agree to the bit.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn vec_dot_avx2(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    dot_body::<false>(w, a)
}

/// [`vec_dot_avx2`] with AVX-512 VNNI's `vpdpwssd` (scale multiply and
/// accumulate in one instruction): the same integers, the same result.
///
/// # Safety
/// The CPU must support AVX2, FMA, AVX-512 F/BW/VL and VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn vec_dot_vnni(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    dot_body::<true>(w, a)
}

/// `sum + Σ pairs of p·s` in i32 lanes: `madd` + add, or one `vpdpwssd`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn madd_add<const VNNI: bool>(
    sum: std::arch::x86_64::__m256i,
    p: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    if VNNI {
        _mm256_dpwssd_epi32(sum, p, s)
    } else {
        _mm256_add_epi32(sum, _mm256_madd_epi16(p, s))
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_body<const VNNI: bool>(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    use super::simd::*;
    use std::arch::x86_64::*;

    let mut acc = _mm_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        let xd = f16_to_f32(x.d);
        let sc_all = all_scales(x);
        let mut sumi = _mm256_setzero_si256();
        for n in 0..2 {
            let (q, sc) = decode_half(x, n);
            for (k, &qk) in q.iter().enumerate() {
                // q ≤ 63, |q8| ≤ 127: pair sums ≤ 16002, no i16 saturation.
                let p = _mm256_maddubs_epi16(qk, load256(y.qs.as_ptr().add(128 * n + 32 * k)));
                let s = _mm256_shuffle_epi8(sc, pick_i16(2 * k, 2 * k + 1));
                sumi = madd_add::<VNNI>(sumi, p, s);
            }
        }
        // |isum| ≤ 16*128*(63*127*16 + 32*16*127) < 2^29: exact in i32.
        let isum = _mm256_sub_epi32(sumi, offset_term(y, sc_all));
        let scale = _mm_set1_ps(y.d * xd);
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(lane_sum_x1(isum)), scale, acc);
    }
    _mm_cvtss_f32(acc)
}

/// The sixteen signed scales as i16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn all_scales(x: &BlockQ6K) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_cvtepi8_epi16(_mm_loadu_si128(x.scales.as_ptr() as *const __m128i))
}

/// `32 * Σ_j sc[j] * bsums[j]` in eight i32 lanes: the -32 of every quant.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn offset_term(y: &BlockQ8K, sc_all: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
    use super::simd::load256;
    use std::arch::x86_64::*;
    _mm256_slli_epi32::<5>(_mm256_madd_epi16(load256(y.bsums.as_ptr()), sc_all))
}

/// Half `n` of a super-block (128 weights): its 6-bit quants as four
/// vectors of 32 bytes (element order matching the activations at
/// `128*n + 32*k`), and its eight scales as i16 in both 128-bit halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode_half(x: &BlockQ6K, n: usize) -> ([std::arch::x86_64::__m256i; 4], std::arch::x86_64::__m256i) {
    use super::simd::*;
    use std::arch::x86_64::*;
    let m4 = _mm256_set1_epi8(0x0F);
    let m3 = _mm256_set1_epi8(0x03);
    let sc_bytes: [u8; 16] = bytemuck::cast(x.scales);
    let sc = bcast_i8x8_as_i16(sc_bytes[8 * n..8 * n + 8].try_into().unwrap());
    let ql0 = load256(x.ql.as_ptr().add(64 * n));
    let ql1 = load256(x.ql.as_ptr().add(64 * n + 32));
    let qh = load256(x.qh.as_ptr().add(32 * n));
    // 16-bit shifts are fine: every value is masked to bits that came from
    // its own byte.
    let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m3));
    let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_slli_epi16::<2>(m3)));
    let h2 = _mm256_and_si256(qh, _mm256_slli_epi16::<4>(m3));
    let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(qh, _mm256_slli_epi16::<6>(m3)));
    let q = [
        _mm256_or_si256(_mm256_and_si256(ql0, m4), h0),
        _mm256_or_si256(_mm256_and_si256(ql1, m4), h1),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), h2),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4), h3),
    ];
    (q, sc)
}

/// [`vec_dot_avx2`] of one weight row against N ≤ 4 activation rows,
/// decoding each super-block (6-bit quants, scales) once. Token t's integer
/// sum is formed as in `vec_dot_avx2`; the four are reduced together
/// (`simd::lane_sums_x4`) and scaled and accumulated with one FMA, lane t doing
/// what lane 0 does there, so `out[t]` is bit-identical to
/// `vec_dot_avx2(w, a[t])`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; every `a[t]` as long as `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn vec_dot_multi_avx2<const N: usize>(w: &[BlockQ6K], a: [&[BlockQ8K]; N]) -> [f32; N] {
    multi_body::<N, false>(w, a)
}

/// [`vec_dot_multi_avx2`] with `vpdpwssd`, as [`vec_dot_vnni`].
///
/// # Safety
/// The CPU must support AVX2, FMA, AVX-512 F/BW/VL and VNNI; every `a[t]` as
/// long as `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn vec_dot_multi_vnni<const N: usize>(w: &[BlockQ6K], a: [&[BlockQ8K]; N]) -> [f32; N] {
    multi_body::<N, true>(w, a)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn multi_body<const N: usize, const VNNI: bool>(w: &[BlockQ6K], a: [&[BlockQ8K]; N]) -> [f32; N] {
    use super::simd::*;
    use std::arch::x86_64::*;

    const { assert!(N >= 1 && N <= 4) };
    for a in &a {
        assert_eq!(w.len(), a.len());
    }
    let mut acc = _mm_setzero_ps();
    for (i, x) in w.iter().enumerate() {
        let xd = f16_to_f32(x.d);
        let sc_all = all_scales(x);
        // Tokens past N keep zero sums (and zero scales below).
        let mut sumi = [_mm256_setzero_si256(); 4];
        for n in 0..2 {
            let (q, sc) = decode_half(x, n);
            for (k, &qk) in q.iter().enumerate() {
                let s = _mm256_shuffle_epi8(sc, pick_i16(2 * k, 2 * k + 1));
                for t in 0..N {
                    let q8 = load256(a[t].get_unchecked(i).qs.as_ptr().add(128 * n + 32 * k));
                    let p = _mm256_maddubs_epi16(qk, q8);
                    sumi[t] = madd_add::<VNNI>(sumi[t], p, s);
                }
            }
        }
        for t in 0..N {
            sumi[t] = _mm256_sub_epi32(sumi[t], offset_term(a[t].get_unchecked(i), sc_all));
        }
        let yd = |t: usize| if t < N { a[t].get_unchecked(i).d } else { 0.0 };
        let scale = _mm_mul_ps(_mm_setr_ps(yd(0), yd(1), yd(2), yd(3)), _mm_set1_ps(xd));
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(lane_sums_x4(sumi)), scale, acc);
    }
    let mut lanes = [0.0f32; 4];
    _mm_storeu_ps(lanes.as_mut_ptr(), acc);
    std::array::from_fn(|t| lanes[t])
}
