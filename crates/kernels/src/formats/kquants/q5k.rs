//! Q5_K: 256 weights in 176 bytes (5.5 bits per weight).
//!
//! Q4_K plus a fifth bit: eight sub-blocks of 32 with 6-bit scales and mins
//! (packed exactly as Q4_K's), weight `= d*sc[j]*q - dmin*m[j]`, `q` 5-bit.
//! The low nibbles are laid out as Q4_K's `qs`; the fifth bit of element
//! `32j + l` is bit `j` of `qh[l]`.

use super::q4k::ScaleMinCodes;
use super::{f16_to_f32, has_avx2_fma, pack_scale_min_k4, unpack_scale_min_k4, BlockQ8K, QK_K};
use crate::formats::BlockFormat;
use crate::GgmlType;

/// ggml's `block_q5_K`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ5K {
    /// Super-block scale for the scales (f16 bits).
    pub d: u16,
    /// Super-block scale for the mins (f16 bits).
    pub dmin: u16,
    /// Eight 6-bit scales and eight 6-bit mins, packed as in Q4_K.
    pub scales: [u8; 12],
    /// Fifth bits.
    pub qh: [u8; QK_K / 8],
    /// Low 4 bits of the quants.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::align_of::<BlockQ5K>() == 2);

/// The 5-bit quant (0..32) of element `i` of a block.
#[inline(always)]
fn q5(b: &BlockQ5K, i: usize) -> u8 {
    let (j, l) = (i / 32, i % 32);
    let lo = (b.qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF;
    let hi = (b.qh[l] >> j) & 1;
    lo | (hi << 4)
}

impl BlockQ5K {
    /// Quantizes `x` (`x.len() == out.len() * 256`) to Q5_K: scales and
    /// mins as Q4_K's quantizer fits them, for 5-bit quants.
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        Self::quantize_weighted(x, None, out)
    }

    /// [`quantize`](Self::quantize) with each element's importance
    /// (`imp.len() == x.len()`) weighing its error in the fits.
    pub fn quantize_weighted(x: &[f32], imp: Option<&[f32]>, out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K, "Q5_K quantize: length mismatch");
        for (k, (xb, b)) in x.chunks_exact(QK_K).zip(out.iter_mut()).enumerate() {
            let c = ScaleMinCodes::<8>::fit(xb, 31, 63, imp.map(|w| &w[k * QK_K..(k + 1) * QK_K]));
            b.d = c.d.to_bits();
            b.dmin = c.dmin.to_bits();
            b.scales = pack_scale_min_k4(&c.ls, &c.lm);
            b.qs = [0; QK_K / 2];
            b.qh = [0; QK_K / 8];
            for i in 0..QK_K {
                let q = c.quant(xb, i);
                let (j, l) = (i / 32, i % 32);
                b.qs[32 * (j / 2) + l] |= (q & 0xF) << (4 * (j % 2));
                b.qh[l] |= (q >> 4) << j;
            }
        }
    }
}

impl BlockFormat for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5_K;
    const BLOCK: usize = QK_K;
    type Dot = BlockQ8K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K, "Q5_K dequantize: length mismatch");
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let d = f16_to_f32(b.d);
            let dmin = f16_to_f32(b.dmin);
            let (sc, mn) = unpack_scale_min_k4(&b.scales);
            for (i, o) in y.iter_mut().enumerate() {
                let j = i / 32;
                *o = d * sc[j] as f32 * q5(b, i) as f32 - dmin * mn[j] as f32;
            }
        }
    }

    /// As Q4_K's: `d*Σ_j sc[j]*Σ q*q8 - dmin*Σ_j m[j]*Σ q8` per super-block.
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len(), "Q5_K vec_dot: block count mismatch");
        let mut sum = 0.0f32;
        for (x, y) in w.iter().zip(a) {
            let (sc, mn) = unpack_scale_min_k4(&x.scales);
            let mut isum = 0i32;
            let mut msum = 0i32;
            for j in 0..8 {
                let s: i32 = (32 * j..32 * j + 32).map(|i| q5(x, i) as i32 * y.qs[i] as i32).sum();
                isum += sc[j] as i32 * s;
                msum += mn[j] as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32);
            }
            sum += y.d * f16_to_f32(x.d) * isum as f32 - y.d * f16_to_f32(x.dmin) * msum as f32;
        }
        sum
    }

    fn vec_dot(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len(), "Q5_K vec_dot: block count mismatch");
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { vec_dot_avx2(w, a) };
        }
        Self::vec_dot_ref(w, a)
    }
}

/// AVX2 version of [`BlockQ5K::vec_dot_ref`]: Q4_K's kernel with the fifth
/// bit OR-ed in at bit 4 before `maddubs`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn vec_dot_avx2(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    use super::simd::*;
    use std::arch::x86_64::*;

    let m4 = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm256_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        let d = y.d * f16_to_f32(x.d);
        let dmin = y.d * f16_to_f32(x.dmin);
        let (sc, mn) = unpack_scale_min_k4(&x.scales);

        // Min term, as in Q4_K: mins repeated twice to match 16-wide bsums.
        let mn8 = _mm_cvtsi64_si128(i64::from_le_bytes(mn));
        let mn16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn8, mn8));
        let pm = _mm256_madd_epi16(load256(y.bsums.as_ptr()), mn16);
        acc_m = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(pm), acc_m);

        let sc16 = bcast_u8x8_as_i16(sc);
        // qh shifted right by 2 per chunk so chunk c's bits are always bits 0
        // and 1 of each byte; the 16-bit shift drags bits in from the next
        // byte only above bit 5, never into the two bits read.
        let mut qh = load256(x.qh.as_ptr());
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q4 = load256(x.qs.as_ptr().add(32 * c));
            let h0 = _mm256_and_si256(_mm256_slli_epi16::<4>(qh), bit4);
            let h1 = _mm256_and_si256(_mm256_slli_epi16::<3>(qh), bit4);
            qh = _mm256_srli_epi16::<2>(qh);
            let lo = _mm256_or_si256(_mm256_and_si256(q4, m4), h0);
            let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4), h1);
            let y0 = load256(y.qs.as_ptr().add(64 * c));
            let y1 = load256(y.qs.as_ptr().add(64 * c + 32));
            // q ≤ 31, |q8| ≤ 128: pair sums ≤ 7936, no i16 saturation.
            let p0 = _mm256_maddubs_epi16(lo, y0);
            let p1 = _mm256_maddubs_epi16(hi, y1);
            let s0 = _mm256_shuffle_epi8(sc16, pick_i16(2 * c, 2 * c));
            let s1 = _mm256_shuffle_epi8(sc16, pick_i16(2 * c + 1, 2 * c + 1));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p0, s0));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p1, s1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_f32(_mm256_sub_ps(acc, acc_m))
}
