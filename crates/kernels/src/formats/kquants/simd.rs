//! AVX2 helpers shared by the k-quant dot-product kernels.
//!
//! Everything here is `#[target_feature(enable = "avx2,fma")]` + `#[inline]`
//! so it inlines into the kernels (which carry the same features); a plain
//! `#[inline(always)]` helper without the feature would be compiled as a
//! call to a non-inlined intrinsic wrapper and lose most of the speed.

use std::arch::x86_64::*;

/// Sum of the eight f32 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn hsum_f32(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Unaligned 32-byte load (block fields are only 2-byte aligned).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn load256<T>(p: *const T) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// A `shuffle_epi8` control that broadcasts i16 lane `lo` (0..8) across the
/// low 128-bit half and i16 lane `hi` across the high half. Used with a
/// register holding the same eight i16 scales in both halves: for the
/// formats with 16-element sub-blocks, one 32-byte vector of quants spans two
/// sub-blocks, one per half, after `maddubs` too (its i16 results stay in
/// the half their bytes came from).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn pick_i16(lo: usize, hi: usize) -> __m256i {
    let ctl = |i: usize| (((2 * i + 1) << 8) | (2 * i)) as i16;
    _mm256_set_m128i(_mm_set1_epi16(ctl(hi)), _mm_set1_epi16(ctl(lo)))
}

/// Eight bytes (zero- or sign-extended by `widen`) as eight i16 in both
/// 128-bit halves of a register, ready for [`pick_i16`].
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn bcast_u8x8_as_i16(bytes: [u8; 8]) -> __m256i {
    let v = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(i64::from_le_bytes(bytes)));
    _mm256_broadcastsi128_si256(v)
}

/// As [`bcast_u8x8_as_i16`] for signed bytes.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn bcast_i8x8_as_i16(bytes: [u8; 8]) -> __m256i {
    let v = _mm_cvtepi8_epi16(_mm_cvtsi64_si128(i64::from_le_bytes(bytes)));
    _mm256_broadcastsi128_si256(v)
}
