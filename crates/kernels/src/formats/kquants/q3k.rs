//! Q3_K: 256 weights in 110 bytes (3.4375 bits per weight).
//!
//! Sixteen sub-blocks of 16, each with a 6-bit scale stored biased by 32;
//! weight `= d*(sc[j]-32)*(q-4)` with `q` a 3-bit quant: two low bits in
//! `qs`, the third in `hmask`. The block is two halves of 128 elements; half
//! `n` uses `qs[32n..32n+32]`, element `128n + 32k + l` (k = 0..4, l = 0..32)
//! taking bits `2k..2k+2` of `qs[32n + l]` and bit `4n + k` of `hmask[l]`.
//! (ggml writes the third bit inverted: a *clear* bit means subtract 4.)

use super::{f16_to_f32, has_avx2_fma, BlockQ8K, QK_K};
use crate::formats::fit::fit_symmetric;
use crate::formats::BlockFormat;
use crate::GgmlType;

/// ggml's `block_q3_K`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ3K {
    /// Third bits of the quants.
    pub hmask: [u8; QK_K / 8],
    /// Low 2 bits of the quants.
    pub qs: [u8; QK_K / 4],
    /// Sixteen 6-bit scales, packed (see `unpack_scales`).
    pub scales: [u8; 12],
    /// Super-block scale (f16 bits).
    pub d: u16,
}
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);
const _: () = assert!(std::mem::align_of::<BlockQ3K>() == 2);

/// Unpacks the sixteen 6-bit scales and removes their bias of 32.
///
/// Scale `j` has its low nibble in byte `j % 8` (low nibble for j < 8, high
/// for j ≥ 8) and its top two bits at bits `2*(j/4)..` of byte `8 + j%4`.
/// Done four scales at a time in u32s, as the SIMD kernel calls it per block.
#[inline(always)]
pub(crate) fn unpack_scales(s: &[u8; 12]) -> [i8; 16] {
    const K2: u32 = 0x0303_0303;
    const K4: u32 = 0x0f0f_0f0f;
    let a0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let a1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let t = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let r = [
        (a0 & K4) | ((t & K2) << 4),
        (a1 & K4) | (((t >> 2) & K2) << 4),
        ((a0 >> 4) & K4) | (((t >> 4) & K2) << 4),
        ((a1 >> 4) & K4) | (((t >> 6) & K2) << 4),
    ];
    let bytes: [u8; 16] = bytemuck::cast(r.map(u32::to_le));
    bytes.map(|b| b as i8 - 32)
}

/// Packs sixteen 6-bit scale codes (0..64, the bias of 32 already added)
/// the way [`unpack_scales`] reads them.
fn pack_scales(codes: &[u8; 16]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for (j, &v) in codes.iter().enumerate() {
        s[j % 8] |= (v & 0xF) << (4 * (j / 8));
        s[8 + j % 4] |= (v >> 4) << (2 * (j / 4));
    }
    s
}

impl BlockQ3K {
    /// Quantizes `x` (`x.len() == out.len() * 256`) to Q3_K: per
    /// 16-element sub-block a symmetric scale for quants −4..=3 (fitted as
    /// Q6_K's are); the sixteen scales then go to 6-bit signed codes
    /// against the super-block's `d` (f16), and the quants are re-derived
    /// from the scales actually stored.
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        Self::quantize_weighted(x, None, out)
    }

    /// [`quantize`](Self::quantize) with each element's importance
    /// (`imp.len() == x.len()`) weighing its error in the scale fits.
    pub fn quantize_weighted(x: &[f32], imp: Option<&[f32]>, out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K, "Q3_K quantize: length mismatch");
        for (k, (xb, b)) in x.chunks_exact(QK_K).zip(out.iter_mut()).enumerate() {
            let scales: [f32; 16] = std::array::from_fn(|j| {
                let at = k * QK_K + 16 * j;
                fit_symmetric(&xb[16 * j..16 * j + 16], 4, imp.map(|w| &w[at..at + 16]))
            });
            // The largest-magnitude scale goes to code −32 (as the quants'
            // largest magnitude goes to −4): the asymmetric range's long end.
            let max = scales.iter().copied().fold(0.0f32, |m, s| if s.abs() > m.abs() { s } else { m });
            let d = half::f16::from_f32(-max / 32.0);
            let df = d.to_f32();
            let codes: [i8; 16] =
                std::array::from_fn(|j| if df != 0.0 { (scales[j] / df).round().clamp(-32.0, 31.0) as i8 } else { 0 });
            b.d = d.to_bits();
            b.scales = pack_scales(&codes.map(|c| (c as i32 + 32) as u8));
            b.qs = [0; QK_K / 4];
            b.hmask = [0; QK_K / 8];
            for (i, &v) in xb.iter().enumerate() {
                let step = df * codes[i / 16] as f32;
                let q = if step != 0.0 { (v / step).round().clamp(-4.0, 3.0) as i32 + 4 } else { 4 } as u8;
                let (n, r) = (i / 128, i % 128);
                let (kk, l) = (r / 32, r % 32);
                b.qs[32 * n + l] |= (q & 3) << (2 * kk);
                b.hmask[l] |= (q >> 2) << (4 * n + kk);
            }
        }
    }
}

/// The signed quant (-4..4) of element `i` of a block.
#[inline(always)]
fn q3(b: &BlockQ3K, i: usize) -> i8 {
    let (n, r) = (i / 128, i % 128);
    let (k, l) = (r / 32, r % 32);
    let lo = (b.qs[32 * n + l] >> (2 * k)) & 3;
    let hi = (b.hmask[l] >> (4 * n + k)) & 1;
    (lo | (hi << 2)) as i8 - 4
}

impl BlockFormat for BlockQ3K {
    const TYPE: GgmlType = GgmlType::Q3_K;
    const BLOCK: usize = QK_K;
    type Dot = BlockQ8K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K, "Q3_K dequantize: length mismatch");
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let d = f16_to_f32(b.d);
            let sc = unpack_scales(&b.scales);
            for (i, o) in y.iter_mut().enumerate() {
                *o = d * sc[i / 16] as f32 * q3(b, i) as f32;
            }
        }
    }

    /// Per super-block: `d*Σ_j (sc[j]-32)*Σ (q-4)*q8`, inner sums in integers.
    fn vec_dot_ref(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len(), "Q3_K vec_dot: block count mismatch");
        let mut sum = 0.0f32;
        for (x, y) in w.iter().zip(a) {
            let sc = unpack_scales(&x.scales);
            let mut isum = 0i32;
            for (j, &scale) in sc.iter().enumerate() {
                let s: i32 = (16 * j..16 * j + 16).map(|i| q3(x, i) as i32 * y.qs[i] as i32).sum();
                isum += scale as i32 * s;
            }
            sum += y.d * f16_to_f32(x.d) * isum as f32;
        }
        sum
    }

    fn vec_dot(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len(), "Q3_K vec_dot: block count mismatch");
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { vec_dot_avx2(w, a) };
        }
        Self::vec_dot_ref(w, a)
    }
}

/// AVX2 version of [`BlockQ3K::vec_dot_ref`].
///
/// The quants go into `maddubs` unbiased (`lo | hi<<2`, 0..8) and the -4 is
/// taken out once per block: `Σ sc*(q-4)*q8 = Σ sc*q*q8 - 4*Σ_j sc[j]*bsums[j]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn vec_dot_avx2(w: &[BlockQ3K], a: &[BlockQ8K]) -> f32 {
    use super::simd::*;
    use std::arch::x86_64::*;

    let m3 = _mm256_set1_epi8(0x03);
    let bit2 = _mm256_set1_epi8(0x04);
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        let d = y.d * f16_to_f32(x.d);
        let sc_bytes: [u8; 16] = bytemuck::cast(unpack_scales(&x.scales));

        // 4 * Σ_j sc[j] * bsums[j], in 8 i32 lanes.
        let sc_all = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc_bytes.as_ptr() as *const __m128i));
        let corr = _mm256_madd_epi16(load256(y.bsums.as_ptr()), sc_all);

        // hmask shifted right by one per 32 elements, so the bit for the
        // current step is always bit 0 of each byte (total shift ≤ 7, so the
        // 16-bit shift never brings the neighbouring byte's bits down to it).
        let mut hm = load256(x.hmask.as_ptr());
        let mut sumi = _mm256_setzero_si256();
        for n in 0..2 {
            let sc = bcast_i8x8_as_i16(sc_bytes[8 * n..8 * n + 8].try_into().unwrap());
            let mut qs = load256(x.qs.as_ptr().add(32 * n));
            for k in 0..4 {
                let lo = _mm256_and_si256(qs, m3);
                let hi = _mm256_and_si256(_mm256_slli_epi16::<2>(hm), bit2);
                qs = _mm256_srli_epi16::<2>(qs);
                hm = _mm256_srli_epi16::<1>(hm);
                let q8 = load256(y.qs.as_ptr().add(128 * n + 32 * k));
                // q ≤ 7, |q8| ≤ 128: pair sums ≤ 1792, no i16 saturation.
                let p = _mm256_maddubs_epi16(_mm256_or_si256(lo, hi), q8);
                let s = _mm256_shuffle_epi8(sc, pick_i16(2 * k, 2 * k + 1));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
            }
        }
        sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32::<2>(corr));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_f32(acc)
}
