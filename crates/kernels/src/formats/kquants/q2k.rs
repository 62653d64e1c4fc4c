//! Q2_K: 256 weights in 84 bytes (2.625 bits per weight).
//!
//! Sixteen sub-blocks of 16, each with a 4-bit scale (low nibble of
//! `scales[j]`) and a 4-bit min (high nibble); weight
//! `= d*sc[j]*q - dmin*m[j]` with `q` a 2-bit quant. `qs` is laid out as
//! Q3_K's: half `n` (128 elements) uses `qs[32n..32n+32]`, element
//! `128n + 32k + l` taking bits `2k..2k+2` of `qs[32n + l]`.

use super::q4k::ScaleMinCodes;
use super::{f16_to_f32, has_avx2_fma, BlockQ8K, QK_K};
use crate::formats::BlockFormat;
use crate::GgmlType;

/// ggml's `block_q2_K`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ2K {
    /// Per 16 elements: scale in the low nibble, min in the high nibble.
    pub scales: [u8; QK_K / 16],
    /// 2-bit quants.
    pub qs: [u8; QK_K / 4],
    /// Super-block scale for the scales (f16 bits).
    pub d: u16,
    /// Super-block scale for the mins (f16 bits).
    pub dmin: u16,
}
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);
const _: () = assert!(std::mem::align_of::<BlockQ2K>() == 2);

/// The 2-bit quant (0..4) of element `i` of a block.
#[inline(always)]
fn q2(b: &BlockQ2K, i: usize) -> u8 {
    let (n, r) = (i / 128, i % 128);
    let (k, l) = (r / 32, r % 32);
    (b.qs[32 * n + l] >> (2 * k)) & 3
}

impl BlockQ2K {
    /// Quantizes `x` (`x.len() == out.len() * 256`) to Q2_K: each
    /// 16-element sub-block's scale and min fitted as Q4_K's are, for 2-bit
    /// quants, then coded in 4 bits against the super-block's `d`/`dmin`.
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        Self::quantize_weighted(x, None, out)
    }

    /// [`quantize`](Self::quantize) with each element's importance
    /// (`imp.len() == x.len()`) weighing its error in the fits.
    pub fn quantize_weighted(x: &[f32], imp: Option<&[f32]>, out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K, "Q2_K quantize: length mismatch");
        for (k, (xb, b)) in x.chunks_exact(QK_K).zip(out.iter_mut()).enumerate() {
            let c = ScaleMinCodes::<16>::fit(xb, 3, 15, imp.map(|w| &w[k * QK_K..(k + 1) * QK_K]));
            b.d = c.d.to_bits();
            b.dmin = c.dmin.to_bits();
            b.scales = std::array::from_fn(|j| c.ls[j] | (c.lm[j] << 4));
            b.qs = [0; QK_K / 4];
            for i in 0..QK_K {
                let (n, r) = (i / 128, i % 128);
                let (kk, l) = (r / 32, r % 32);
                b.qs[32 * n + l] |= c.quant(xb, i) << (2 * kk);
            }
        }
    }
}

impl BlockFormat for BlockQ2K {
    const TYPE: GgmlType = GgmlType::Q2_K;
    const BLOCK: usize = QK_K;
    type Dot = BlockQ8K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K, "Q2_K dequantize: length mismatch");
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let d = f16_to_f32(b.d);
            let dmin = f16_to_f32(b.dmin);
            for (i, o) in y.iter_mut().enumerate() {
                let s = b.scales[i / 16];
                *o = d * (s & 0xF) as f32 * q2(b, i) as f32 - dmin * (s >> 4) as f32;
            }
        }
    }

    /// Per super-block: `d*Σ_j sc[j]*Σ q*q8 - dmin*Σ_j m[j]*bsums[j]`.
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len(), "Q2_K vec_dot: block count mismatch");
        let mut sum = 0.0f32;
        for (x, y) in w.iter().zip(a) {
            let mut isum = 0i32;
            let mut msum = 0i32;
            for j in 0..16 {
                let s: i32 = (16 * j..16 * j + 16).map(|i| q2(x, i) as i32 * y.qs[i] as i32).sum();
                isum += (x.scales[j] & 0xF) as i32 * s;
                msum += (x.scales[j] >> 4) as i32 * y.bsums[j] as i32;
            }
            sum += y.d * f16_to_f32(x.d) * isum as f32 - y.d * f16_to_f32(x.dmin) * msum as f32;
        }
        sum
    }

    fn vec_dot(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len(), "Q2_K vec_dot: block count mismatch");
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { vec_dot_avx2(w, a) };
        }
        Self::vec_dot_ref(w, a)
    }
}

/// AVX2 version of [`BlockQ2K::vec_dot_ref`].
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn vec_dot_avx2(w: &[BlockQ2K], a: &[BlockQ8K]) -> f32 {
    use super::simd::*;
    use std::arch::x86_64::*;

    let m3 = _mm256_set1_epi8(0x03);
    let m4 = _mm_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm256_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        let d = y.d * f16_to_f32(x.d);
        let dmin = y.d * f16_to_f32(x.dmin);

        let sc_mn = _mm_loadu_si128(x.scales.as_ptr() as *const __m128i);
        let sc = _mm_and_si128(sc_mn, m4);
        let mn = _mm_and_si128(_mm_srli_epi16::<4>(sc_mn), m4);
        // Min term: one min per 16 elements, matching bsums one to one.
        let pm = _mm256_madd_epi16(load256(y.bsums.as_ptr()), _mm256_cvtepu8_epi16(mn));
        acc_m = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(pm), acc_m);

        let sc_halves = [
            _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sc)),
            _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_srli_si128::<8>(sc))),
        ];
        let mut sumi = _mm256_setzero_si256();
        for (n, &sch) in sc_halves.iter().enumerate() {
            let mut qs = load256(x.qs.as_ptr().add(32 * n));
            for k in 0..4 {
                let q = _mm256_and_si256(qs, m3);
                qs = _mm256_srli_epi16::<2>(qs);
                let q8 = load256(y.qs.as_ptr().add(128 * n + 32 * k));
                // q ≤ 3, |q8| ≤ 128: pair sums ≤ 768, no i16 saturation.
                let p = _mm256_maddubs_epi16(q, q8);
                let s = _mm256_shuffle_epi8(sch, pick_i16(2 * k, 2 * k + 1));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_f32(_mm256_sub_ps(acc, acc_m))
}
