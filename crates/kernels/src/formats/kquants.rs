//! The ggml "k-quant" formats: super-blocks of 256 weights with per-sub-block
//! scales (and, for the "affine" formats, mins), bit-exact with ggml's
//! `block_q*_K` structs so GGUF tensor bytes can be cast to them directly.
//!
//! | type         | bytes | layout (ggml field order)                            | weight                    |
//! |--------------|-------|------------------------------------------------------|---------------------------|
//! | [`BlockQ2K`] | 84    | `scales[16]` (lo: scale, hi: min), `qs[64]`, d, dmin     | `d*sc*q - dmin*m`, q∈0..3 |
//! | [`BlockQ3K`] | 110   | `hmask[32]`, `qs[64]`, `scales[12]` (16×6 bit), d          | `d*(sc-32)*(q-4)`, q∈0..7 |
//! | [`BlockQ4K`] | 144   | d, dmin, `scales[12]` (8×6-bit scale, 8×6-bit min), `qs[128]` | `d*sc*q - dmin*m`, q∈0..15 |
//! | [`BlockQ5K`] | 176   | d, dmin, `scales[12]`, `qh[32]`, `qs[128]`                  | `d*sc*q - dmin*m`, q∈0..31 |
//! | [`BlockQ6K`] | 210   | `ql[128]`, `qh[64]`, `scales: i8[16]`, d                   | `d*sc*(q-32)`, q∈0..63    |
//! | [`BlockQ8K`] | 292   | d: f32, `qs: i8[256]`, `bsums: i16[16]`                  | activations: `d*q`        |
//!
//! f16 fields are stored as their raw `u16` bits so every block is plain old
//! data (`bytemuck::Pod`, alignment 2; Q8_K has alignment 4 for its f32).
//!
//! Every weight format is multiplied with activations quantized to
//! [`BlockQ8K`], as llama.cpp does. Its `bsums` (the sum of each run of 16
//! quants) let the dot products fold the per-sub-block offsets (the mins of
//! Q2_K/Q4_K/Q5_K, the implicit -4 / -32 of Q3_K / Q6_K) into one small
//! product per block instead of touching every element twice.
//!
//! Each format lives in its own file with three implementations side by side:
//! `dequantize` (the scalar definition of the format), `vec_dot_ref` (scalar,
//! integer sums per sub-block then float scales, the same arithmetic as
//! ggml's reference so results track llama.cpp), and an AVX2+FMA `vec_dot`
//! chosen at run time. The SIMD kernels all follow one pattern: unsigned
//! quants × signed Q8 bytes with `maddubs` (→ i16 pairs), × the sub-block
//! scale with `madd` (→ i32), integer accumulation within a super-block.
//! Q2_K, Q3_K and Q5_K then do one FMA into f32 lanes per super-block and one
//! horizontal sum per row. Q4_K and Q6_K — the bulk of Q4_K_M files — reduce
//! each super-block's integer sum exactly first and scale that in f32, so
//! that their multi-token kernels can reduce four tokens' sums with one
//! transpose-and-add and scale them with one FMA: the per-token float work
//! was a third of their prompt-processing time.

mod q2k;
mod q3k;
mod q4k;
mod q5k;
mod q6k;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use q2k::BlockQ2K;
pub use q3k::BlockQ3K;
pub use q4k::BlockQ4K;
pub use q5k::BlockQ5K;
pub(crate) use q6k::q6_place;
pub use q6k::BlockQ6K;

use super::ActBlock;

/// Elements per k-quant super-block.
pub const QK_K: usize = 256;

pub(crate) use super::f16_to_f32;

pub(crate) use super::has_avx2_fma;

/// Unpacks the 12-byte `scales` field shared by Q4_K and Q5_K into eight
/// 6-bit scales and eight 6-bit mins (ggml's `get_scale_min_k4`).
///
/// Bytes 0..4 hold scales 0..3 in their low 6 bits, bytes 4..8 mins 0..3;
/// bytes 8..12 hold the low nibbles of scales 4..7 (low half) and mins 4..7
/// (high half), whose top two bits are the top bits of bytes 0..4 / 4..8.
/// Done four bytes at a time in u32s, since the SIMD kernels call it per
/// super-block.
#[inline(always)]
pub(crate) fn unpack_scale_min_k4(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let u0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let u1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let u2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let sc_lo = u0 & 0x3f3f_3f3f;
    let mn_lo = u1 & 0x3f3f_3f3f;
    let sc_hi = (u2 & 0x0f0f_0f0f) | (((u0 >> 6) & 0x0303_0303) << 4);
    let mn_hi = ((u2 >> 4) & 0x0f0f_0f0f) | (((u1 >> 6) & 0x0303_0303) << 4);
    let sc = (sc_lo as u64 | (sc_hi as u64) << 32).to_le_bytes();
    let mn = (mn_lo as u64 | (mn_hi as u64) << 32).to_le_bytes();
    (sc, mn)
}

/// Inverse of `unpack_scale_min_k4`: packs 6-bit scales and mins.
pub(crate) fn pack_scale_min_k4(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
    }
    s
}

/// The Q8_K activation block: 256 activations as `d * qs[i]`, plus the sum
/// of each run of 16 quants (`bsums`), which the weight formats use to apply
/// their per-sub-block offsets without a pass over the elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);
const _: () = assert!(std::mem::align_of::<BlockQ8K>() == 4);

impl ActBlock for BlockQ8K {
    const BLOCK: usize = QK_K;

    /// ggml's `quantize_row_q8_K_ref`, bit for bit: the scale comes from the
    /// element of largest magnitude *with its sign* (`iscale = -127/max`, so
    /// that element maps to -127 and no quant is ever -128), quants round to
    /// nearest with ties to even (ggml's `nearest_int`), `d = 1/iscale`.
    ///
    /// This runs on every activation row before a k-quant matmul, so it has
    /// an AVX2 version (`quantize_q8k_avx2`), bit-identical to the scalar
    /// `quantize_q8k_block`.
    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K, "Q8_K quantize: length mismatch");
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA; lengths checked.
            return unsafe { quantize_q8k_avx2(x, out) };
        }
        for (xb, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            quantize_q8k_block(xb, y);
        }
    }
}

/// The scalar Q8_K quantization of one block (see `BlockQ8K::quantize`).
fn quantize_q8k_block(xb: &[f32], y: &mut BlockQ8K) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in xb {
        let a = v.abs();
        if a > amax {
            amax = a;
            max = v;
        }
    }
    if amax == 0.0 {
        // ggml leaves bsums unset here; zero is what they would sum to.
        *y = bytemuck::Zeroable::zeroed();
        return;
    }
    let iscale = -127.0f32 / max;
    for (q, &v) in y.qs.iter_mut().zip(xb) {
        *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    q8k_bsums(y);
    y.d = 1.0 / iscale;
}

fn q8k_bsums(y: &mut BlockQ8K) {
    for (s, qs) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
        *s = qs.iter().map(|&q| q as i16).sum();
    }
}

/// AVX2 Q8_K quantization, bit-identical to [`quantize_q8k_block`]:
/// the same `amax` (a lane-wise max of |x| ignoring NaNs as the scalar `>`
/// does, then the first element of that magnitude as `max`), the same f32
/// `iscale * v`, and `vroundps` to nearest-even, which is `round_ties_even`.
/// Blocks where the vector conversion could differ from Rust's saturating
/// `as i32` (a NaN or infinite element, or a non-finite `iscale` from a tiny
/// `max`) go to the scalar code.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len() * 256`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_q8k_avx2(x: &[f32], out: &mut [BlockQ8K]) {
    use std::arch::x86_64::*;
    for (xb, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        let mut unordered = _mm256_setzero_ps();
        for k in 0..QK_K / 8 {
            let v = _mm256_loadu_ps(p.add(8 * k));
            // max_ps returns its second operand when either is NaN: NaNs
            // never displace the running max, as in the scalar `a > amax`.
            m = _mm256_max_ps(_mm256_andnot_ps(sign, v), m);
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        if amax == 0.0 || !amax.is_finite() || _mm256_movemask_ps(unordered) != 0 {
            quantize_q8k_block(xb, y);
            continue;
        }
        // The first element with |v| == amax is the one the scalar loop keeps.
        let amax_v = _mm256_set1_ps(amax);
        let mut max = 0.0f32;
        for k in 0..QK_K / 8 {
            let a = _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * k)));
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(a, amax_v));
            if hit != 0 {
                max = xb[8 * k + hit.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127.0f32 / max;
        if !iscale.is_finite() {
            quantize_q8k_block(xb, y);
            continue;
        }
        // |iscale * v| ≤ 127 (up to rounding, never reaching 127.5), so the
        // conversions and saturating packs are exact, as `.min(127) as i8` is.
        let is = _mm256_set1_ps(iscale);
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for c in 0..QK_K / 32 {
            let mut q = [_mm256_setzero_si256(); 4];
            for (k, q) in q.iter_mut().enumerate() {
                let v = _mm256_loadu_ps(p.add(32 * c + 8 * k));
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(is, v));
                *q = _mm256_cvtps_epi32(r);
            }
            let q16a = _mm256_packs_epi32(q[0], q[1]);
            let q16b = _mm256_packs_epi32(q[2], q[3]);
            let q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16a, q16b), perm);
            _mm256_storeu_si256(y.qs.as_mut_ptr().add(32 * c) as *mut __m256i, q8);
        }
        q8k_bsums(y);
        y.d = 1.0 / iscale;
    }
}

impl BlockQ8K {
    /// Dequantizes activation blocks (`out.len() == blocks.len() * 256`);
    /// for tests and debugging, the kernels never need it.
    pub fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K, "Q8_K dequantize: length mismatch");
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            for (o, &q) in y.iter_mut().zip(&b.qs) {
                *o = b.d * q as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 Q8_K quantizer is bit-identical to the scalar one: at exact
    /// rounding ties, on ordinary data, with repeated and opposite-signed
    /// extremes, and on the blocks it hands back to the scalar code.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q8k_quantize_simd_matches_scalar() {
        if !has_avx2_fma() {
            return;
        }
        let mut blocks: Vec<Vec<f32>> = Vec::new();
        // max = -127 → iscale = 1: every k + 0.5 is an exact tie.
        blocks.push((0..QK_K).map(|i| if i == 3 { -127.0 } else { (i % 253) as f32 * 0.5 - 63.0 }).collect());
        // Opposite-signed equal extremes: the first one sets the sign.
        blocks.push(
            (0..QK_K)
                .map(|i| match i {
                    7 => 2.5,
                    9 => -2.5,
                    _ => (i as f32).sin(),
                })
                .collect(),
        );
        blocks.push(
            (0..QK_K)
                .map(|i| match i {
                    7 => -2.5,
                    200 => 2.5,
                    _ => (i as f32).cos(),
                })
                .collect(),
        );
        // Pseudo-random data at several scales.
        let mut s = 0x1234_5678_9abc_def0u64;
        for scale in [1e-30f32, 1e-3, 1.0, 7.5, 1e4, 3e38] {
            blocks.push(
                (0..QK_K)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                    })
                    .collect(),
            );
        }
        // Zeros, a NaN, an infinity, a subnormal max (iscale overflows).
        blocks.push(vec![0.0; QK_K]);
        blocks.push((0..QK_K).map(|i| if i == 5 { f32::NAN } else { i as f32 }).collect());
        blocks.push((0..QK_K).map(|i| if i == 5 { f32::NEG_INFINITY } else { i as f32 }).collect());
        blocks.push((0..QK_K).map(|i| if i == 1 { 1e-40 } else { 0.0 }).collect());
        let x: Vec<f32> = blocks.concat();
        let n = x.len() / QK_K;
        let mut want = vec![bytemuck::Zeroable::zeroed(); n];
        for (xb, y) in x.chunks_exact(QK_K).zip(want.iter_mut()) {
            quantize_q8k_block(xb, y);
        }
        let mut got: Vec<BlockQ8K> = vec![bytemuck::Zeroable::zeroed(); n];
        // SAFETY: AVX2 and FMA checked above; lengths match.
        unsafe { quantize_q8k_avx2(&x, &mut got) };
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.d.to_bits(), w.d.to_bits(), "block {k}: d");
            assert_eq!(g.qs, w.qs, "block {k}: qs");
            assert_eq!(g.bsums, w.bsums, "block {k}: bsums");
        }
        assert!(want[0].qs.contains(&2), "ties must be present");
    }

    #[test]
    fn f16_conversion_matches_half_for_every_value() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}: {got} vs {want}");
            }
        }
    }
}
