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

/// `x + y` after pairing their i32 lanes (unpack lo/hi): lane sums of x
/// and y interleaved, two lanes of each per 128-bit half.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pair_sum_32(x: __m256i, y: __m256i) -> __m256i {
    _mm256_add_epi32(_mm256_unpacklo_epi32(x, y), _mm256_unpackhi_epi32(x, y))
}

/// As `pair_sum_32` with 64-bit halves.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pair_sum_64(x: __m256i, y: __m256i) -> __m256i {
    _mm256_add_epi32(_mm256_unpacklo_epi64(x, y), _mm256_unpackhi_epi64(x, y))
}

/// The sum of the eight i32 lanes of each of `s[0..4]`, as the four lanes
/// of one 128-bit vector (a transpose-and-add: 11 single-µop shuffles and
/// adds for four vectors, where four separate horizontal sums take 20).
///
/// The multi-token k-quant kernels reduce each token's integer sum for a
/// super-block this way, so that the float work per super-block (convert,
/// scale, accumulate) is one instruction for all four tokens.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn lane_sums_x4(s: [__m256i; 4]) -> __m128i {
    let e = half_lane_sums(s);
    _mm_add_epi32(_mm256_castsi256_si128(e), _mm256_extracti128_si256::<1>(e))
}

/// The transpose-and-add stage shared by [`lane_sums_x4`] and
/// [`lane_sums_x8`]: `[Σ s0, Σ s1, Σ s2, Σ s3]` over the low 128-bit halves'
/// lanes in the low half, over the high halves' lanes in the high half.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn half_lane_sums(s: [__m256i; 4]) -> __m256i {
    pair_sum_64(pair_sum_32(s[0], s[1]), pair_sum_32(s[2], s[3]))
}

/// [`lane_sums_x4`] of `s` in the low half and of `m` in the high half.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn lane_sums_x8(s: [__m256i; 4], m: [__m256i; 4]) -> __m256i {
    let (e, f) = (half_lane_sums(s), half_lane_sums(m));
    _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(e, f), _mm256_permute2x128_si256::<0x31>(e, f))
}

/// The sums of the eight i32 lanes of `s` and of `m`, in lanes 0 and 1
/// (lanes 2 and 3 hold partial sums; callers ignore them).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn lane_sums_x2(s: __m256i, m: __m256i) -> __m128i {
    // [s0+s1, m0+m1, s2+s3, m2+m3 | s4+s5, m4+m5, s6+s7, m6+m7]
    let a = pair_sum_32(s, m);
    let b = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
    _mm_add_epi32(b, _mm_unpackhi_epi64(b, b))
}

/// The sum of the eight i32 lanes of `s`, in every lane.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn lane_sum_x1(s: __m256i) -> __m128i {
    let b = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let b = _mm_add_epi32(b, _mm_shuffle_epi32::<0x4E>(b));
    _mm_add_epi32(b, _mm_shuffle_epi32::<0xB1>(b))
}
