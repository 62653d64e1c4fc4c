//! The unquantized formats: F32, F16 and BF16.
//!
//! Each is a one-element "block" (`BLOCK = 1`) so the float formats go
//! through the same [`BlockFormat`] machinery as the quantized ones. All three
//! are multiplied with plain f32 activations ([`BlockF32`] is their `Dot`
//! type and the identity [`ActBlock`]): unlike llama.cpp, which rounds the
//! activations to f16 for F16 weights, we keep them in f32 — it costs nothing
//! measurable (the dot is bound by loading the weights) and is more accurate.
//!
//! F16 and BF16 are stored as raw `u16` bits rather than `half` types so the
//! blocks are plain `bytemuck::Pod` with alignment 2, exactly like the bytes
//! of a GGUF tensor. F16 → f32 is exact (`half` in the reference, F16C's
//! `vcvtph2ps` in the SIMD path); BF16 → f32 is exact too (the bits shifted
//! left by 16), so the SIMD and reference dots differ only in summation order.

use super::has_avx2_fma;
use super::{ActBlock, BlockFormat};
use crate::GgmlType;
use bytemuck::{Pod, Zeroable};

/// One f32 element. Also the activation block of the float formats.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct BlockF32(pub f32);

/// One IEEE half-precision element, as raw bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockF16(pub u16);

/// One bfloat16 element (the top half of an f32), as raw bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockBF16(pub u16);

const _: () = assert!(std::mem::size_of::<BlockF32>() == 4);
const _: () = assert!(std::mem::size_of::<BlockF16>() == 2);
const _: () = assert!(std::mem::size_of::<BlockBF16>() == 2);
const _: () = assert!(std::mem::align_of::<BlockF16>() == 2);
const _: () = assert!(std::mem::align_of::<BlockBF16>() == 2);

impl BlockF16 {
    /// The element as f32 (exact).
    #[inline]
    pub fn to_f32(self) -> f32 {
        super::f16_to_f32(self.0)
    }

    /// Rounds `x` to f16 (round to nearest even, as ggml's `GGML_FP32_TO_FP16`).
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len(), "F16 quantize: length mismatch");
        for (o, &v) in out.iter_mut().zip(x) {
            *o = BlockF16(half::f16::from_f32(v).to_bits());
        }
    }
}

impl BlockBF16 {
    /// The element as f32 (exact).
    #[inline]
    pub fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }

    /// Rounds `x` to bf16 (round to nearest even; NaN stays NaN), as ggml's
    /// `GGML_FP32_TO_BF16`.
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len(), "BF16 quantize: length mismatch");
        for (o, &v) in out.iter_mut().zip(x) {
            *o = BlockBF16(half::bf16::from_f32(v).to_bits());
        }
    }
}

impl ActBlock for BlockF32 {
    const BLOCK: usize = 1;
    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len(), "F32 quantize: length mismatch");
        out.copy_from_slice(bytemuck::cast_slice(x));
    }
}

impl BlockFormat for BlockF32 {
    const TYPE: GgmlType = GgmlType::F32;
    const BLOCK: usize = 1;
    type Dot = BlockF32;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(blocks.len(), out.len(), "F32 dequantize: length mismatch");
        out.copy_from_slice(bytemuck::cast_slice(blocks));
    }

    fn vec_dot_ref(w: &[Self], a: &[BlockF32]) -> f32 {
        assert_eq!(w.len(), a.len(), "F32 dot: length mismatch");
        w.iter().zip(a).map(|(w, a)| w.0 * a.0).sum()
    }

    fn vec_dot(w: &[Self], a: &[BlockF32]) -> f32 {
        assert_eq!(w.len(), a.len(), "F32 dot: length mismatch");
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU supports the enabled features; lengths are equal.
            return unsafe { avx2::dot_f32(bytemuck::cast_slice(w), bytemuck::cast_slice(a)) };
        }
        Self::vec_dot_ref(w, a)
    }
}

impl BlockFormat for BlockF16 {
    const TYPE: GgmlType = GgmlType::F16;
    const BLOCK: usize = 1;
    type Dot = BlockF32;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(blocks.len(), out.len(), "F16 dequantize: length mismatch");
        for (o, b) in out.iter_mut().zip(blocks) {
            *o = b.to_f32();
        }
    }

    fn vec_dot_ref(w: &[Self], a: &[BlockF32]) -> f32 {
        assert_eq!(w.len(), a.len(), "F16 dot: length mismatch");
        w.iter().zip(a).map(|(w, a)| w.to_f32() * a.0).sum()
    }

    fn vec_dot(w: &[Self], a: &[BlockF32]) -> f32 {
        assert_eq!(w.len(), a.len(), "F16 dot: length mismatch");
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU supports the enabled features; lengths are equal.
            return unsafe { avx2::dot_f16(bytemuck::cast_slice(w), bytemuck::cast_slice(a)) };
        }
        Self::vec_dot_ref(w, a)
    }
}

impl BlockFormat for BlockBF16 {
    const TYPE: GgmlType = GgmlType::BF16;
    const BLOCK: usize = 1;
    type Dot = BlockF32;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(blocks.len(), out.len(), "BF16 dequantize: length mismatch");
        for (o, b) in out.iter_mut().zip(blocks) {
            *o = b.to_f32();
        }
    }

    fn vec_dot_ref(w: &[Self], a: &[BlockF32]) -> f32 {
        assert_eq!(w.len(), a.len(), "BF16 dot: length mismatch");
        w.iter().zip(a).map(|(w, a)| w.to_f32() * a.0).sum()
    }

    fn vec_dot(w: &[Self], a: &[BlockF32]) -> f32 {
        assert_eq!(w.len(), a.len(), "BF16 dot: length mismatch");
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU supports the enabled features; lengths are equal.
            return unsafe { avx2::dot_bf16(bytemuck::cast_slice(w), bytemuck::cast_slice(a)) };
        }
        Self::vec_dot_ref(w, a)
    }
}

/// AVX2 + FMA (+ F16C) dot products. Each is the same loop: widen 8 weights
/// to f32, FMA into one of four independent accumulators (so four FMAs are in
/// flight and the 4-cycle FMA latency is hidden), then an 8-wide step and a
/// scalar tail, and a single horizontal sum at the end. The reference for each
/// is the matching `vec_dot_ref` above.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The shared loop; `load(i)` widens weights `i..i+8` to f32 and
    /// `scalar(i)` converts one weight.
    #[inline(always)]
    unsafe fn dot_with(n: usize, a: &[f32], load: impl Fn(usize) -> __m256, scalar: impl Fn(usize) -> f32) -> f32 {
        debug_assert_eq!(a.len(), n);
        let ap = a.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let j = i + 8 * k;
                *acc = _mm256_fmadd_ps(load(j), _mm256_loadu_ps(ap.add(j)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load(i), _mm256_loadu_ps(ap.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum(s);
        while i < n {
            sum += scalar(i) * a[i];
            i += 1;
        }
        sum
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `w.len() == a.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32(w: &[f32], a: &[f32]) -> f32 {
        assert_eq!(w.len(), a.len());
        let wp = w.as_ptr();
        dot_with(w.len(), a, |i| _mm256_loadu_ps(wp.add(i)), |i| w[i])
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w.len() == a.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_f16(w: &[u16], a: &[f32]) -> f32 {
        assert_eq!(w.len(), a.len());
        let wp = w.as_ptr();
        dot_with(
            w.len(),
            a,
            |i| _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i).cast())),
            |i| half::f16::from_bits(w[i]).to_f32(),
        )
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `w.len() == a.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_bf16(w: &[u16], a: &[f32]) -> f32 {
        assert_eq!(w.len(), a.len());
        let wp = w.as_ptr();
        dot_with(
            w.len(),
            a,
            // bf16 is the high half of an f32: zero-extend to 32 bits, shift up.
            |i| {
                let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(wp.add(i).cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
            },
            |i| f32::from_bits((w[i] as u32) << 16),
        )
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::hsum as hsum_avx2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_exact() {
        assert_eq!(BlockF16(0x3C00).to_f32(), 1.0);
        assert_eq!(BlockF16(0xC000).to_f32(), -2.0);
        assert_eq!(BlockF16(0x0001).to_f32(), 2f32.powi(-24)); // smallest subnormal
        assert_eq!(BlockBF16(0x3F80).to_f32(), 1.0);
        assert_eq!(BlockBF16(0xC040).to_f32(), -3.0);
    }

    #[test]
    fn simd_matches_reference_all_lengths() {
        // Every length 0..80 exercises the 32-wide loop, the 8-wide loop and
        // the scalar tail in each combination.
        for n in 0..80usize {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.125).collect();
            let a: Vec<BlockF32> = (0..n).map(|i| BlockF32(((i * 11 % 17) as f32 - 8.0) * 0.25)).collect();
            let w32: Vec<BlockF32> = x.iter().map(|&v| BlockF32(v)).collect();
            let mut w16 = vec![BlockF16(0); n];
            BlockF16::quantize(&x, &mut w16);
            let mut wb = vec![BlockBF16(0); n];
            BlockBF16::quantize(&x, &mut wb);
            // These values are exact in every format and every partial sum is
            // a small multiple of 1/32, so all summation orders agree exactly.
            let want = BlockF32::vec_dot_ref(&w32, &a);
            assert_eq!(BlockF32::vec_dot(&w32, &a), want, "f32 n={n}");
            assert_eq!(BlockF16::vec_dot(&w16, &a), want, "f16 n={n}");
            assert_eq!(BlockF16::vec_dot_ref(&w16, &a), want, "f16 ref n={n}");
            assert_eq!(BlockBF16::vec_dot(&wb, &a), want, "bf16 n={n}");
            assert_eq!(BlockBF16::vec_dot_ref(&wb, &a), want, "bf16 ref n={n}");
        }
    }
}
