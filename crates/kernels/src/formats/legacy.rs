//! ggml's "legacy" 32-element quantized formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! and the activation blocks Q8_0 and Q8_1.
//!
//! The structs are byte-for-byte ggml's `block_q*` layouts, so a GGUF tensor's
//! bytes can be cast straight to a slice of them (see [`super::cast_blocks`]).
//! f16 fields are kept as raw `u16` bits so every block is `bytemuck::Pod`
//! with alignment 2 (GGUF only guarantees that much for block data).
//!
//! Layout shared by all the 4- and 5-bit formats: `qs[j]` holds element `j`
//! in its low nibble and element `j + 16` in its high nibble. The 5-bit
//! formats keep the fifth bit of element `i` in bit `i` of the little-endian
//! `u32` `qh`.
//!
//! | format | bytes | element `i`                        | dot with |
//! |--------|-------|------------------------------------|----------|
//! | Q4_0   | 18    | `d * (q - 8)`                      | Q8_0     |
//! | Q4_1   | 20    | `d * q + m`                        | Q8_1     |
//! | Q5_0   | 22    | `d * (q - 16)` (q has 5 bits)      | Q8_0     |
//! | Q5_1   | 24    | `d * q + m`    (q has 5 bits)      | Q8_1     |
//! | Q8_0   | 34    | `d * q` (q: i8)                    | Q8_0     |
//! | Q8_1   | 36    | `d * q`, and `s = d * Σq`          | —        |
//!
//! Dot products follow ggml: per block an exact integer dot of the quants,
//! then one float scale (`dx * dy`), plus for the `_1` formats the min term
//! `m * s`, which is where Q8_1's precomputed `s` earns its keep. Doing it this
//! way (rather than dequantizing to f32) is both the fast path and what makes
//! our numbers track llama.cpp's.
//!
//! Quantizers reproduce ggml's reference `quantize_row_*_ref` functions
//! (same scale choice, same rounding), so files we write round-trip with
//! llama.cpp's.
//!
//! The SIMD kernels live in the `avx2` module at the bottom, each beside the
//! scalar reference it must agree with (`vec_dot_ref` in the trait impls).

#![allow(non_camel_case_types)]

use super::fit::{fit_scale_min, fit_symmetric};
use super::{f16_to_f32, ActBlock, BlockFormat, GroupScales};
use crate::GgmlType;
use bytemuck::{Pod, Zeroable};

/// Elements per block in every legacy format.
pub const QK: usize = 32;

/// 4-bit quants with one scale: `x = d * (q - 8)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// Scale, f16 bits.
    pub d: u16,
    /// Elements 0..16 in the low nibbles, 16..32 in the high nibbles.
    pub qs: [u8; QK / 2],
}

/// 4-bit quants with scale and min: `x = d * q + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4_1 {
    /// Scale, f16 bits.
    pub d: u16,
    /// Min (the value of q = 0), f16 bits.
    pub m: u16,
    pub qs: [u8; QK / 2],
}

/// 5-bit quants with one scale: `x = d * (q - 16)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ5_0 {
    /// Scale, f16 bits.
    pub d: u16,
    /// Fifth bits: bit `i` of `u32::from_le_bytes(qh)` belongs to element `i`.
    pub qh: [u8; 4],
    /// Low four bits, laid out as in Q4_0.
    pub qs: [u8; QK / 2],
}

/// 5-bit quants with scale and min: `x = d * q + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ5_1 {
    pub d: u16,
    pub m: u16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 8-bit quants: `x = d * q`. A weight format and the activation block of
/// Q4_0, Q5_0 and Q8_0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; QK],
}

/// 8-bit quants plus `s = d * Σ qs`: the activation block of Q4_1 and Q5_1,
/// whose min term `Σ m * y = m * s` then costs one multiply per block.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8_1 {
    pub d: u16,
    /// `d * Σ qs` (computed with the unrounded f32 `d`, as ggml does), f16 bits.
    pub s: u16,
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);
const _: () = assert!(std::mem::align_of::<BlockQ4_0>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ4_1>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ5_0>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ5_1>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ8_0>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ8_1>() == 2);

/// f32 → f16 bits, round to nearest even (ggml's `GGML_FP32_TO_FP16`).
#[inline]
fn to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// Exact integer dot of two blocks of quants.
#[inline]
fn idot(x: &[i8; QK], y: &[i8; QK]) -> i32 {
    x.iter().zip(y).map(|(&a, &b)| a as i32 * b as i32).sum()
}

fn check_len(what: &str, elems: usize, blocks: usize) {
    assert_eq!(elems, blocks * QK, "{what}: {elems} elements for {blocks} blocks of {QK}");
}

// ---------------------------------------------------------------------------
// Unpacking: each weight block's quants as 32 small integers (offset already
// applied for the `_0` formats). Shared by `dequantize` and `vec_dot_ref`, so
// the two references cannot disagree about the layout.

impl BlockQ4_0 {
    /// The 32 quants, `q - 8`, in element order.
    pub fn quants(&self) -> [i8; QK] {
        let mut q = [0i8; QK];
        for j in 0..QK / 2 {
            q[j] = (self.qs[j] & 0x0F) as i8 - 8;
            q[j + QK / 2] = (self.qs[j] >> 4) as i8 - 8;
        }
        q
    }
}

impl BlockQ4_1 {
    /// The 32 quants (0..=15) in element order.
    pub fn quants(&self) -> [i8; QK] {
        let mut q = [0i8; QK];
        for j in 0..QK / 2 {
            q[j] = (self.qs[j] & 0x0F) as i8;
            q[j + QK / 2] = (self.qs[j] >> 4) as i8;
        }
        q
    }
}

/// The 5-bit quants (0..=31) of a Q5 block's `qh` and `qs`.
fn quants5(qh: [u8; 4], qs: &[u8; QK / 2]) -> [i8; QK] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0i8; QK];
    for j in 0..QK / 2 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + QK / 2)) & 1) as u8;
        q[j] = ((qs[j] & 0x0F) | h0 << 4) as i8;
        q[j + QK / 2] = ((qs[j] >> 4) | h1 << 4) as i8;
    }
    q
}

/// Packs 32 5-bit quants (0..=31) into `(qh, qs)`.
fn pack5(q: &[u8; QK]) -> ([u8; 4], [u8; QK / 2]) {
    let mut qh = 0u32;
    let mut qs = [0u8; QK / 2];
    for j in 0..QK / 2 {
        let (a, b) = (q[j], q[j + QK / 2]);
        qs[j] = (a & 0x0F) | (b & 0x0F) << 4;
        qh |= ((a >> 4) as u32 & 1) << j;
        qh |= ((b >> 4) as u32 & 1) << (j + QK / 2);
    }
    (qh.to_le_bytes(), qs)
}

impl BlockQ5_0 {
    /// The 32 quants, `q - 16`, in element order.
    pub fn quants(&self) -> [i8; QK] {
        let mut q = quants5(self.qh, &self.qs);
        for q in &mut q {
            *q -= 16;
        }
        q
    }
}

impl BlockQ5_1 {
    /// The 32 quants (0..=31) in element order.
    pub fn quants(&self) -> [i8; QK] {
        quants5(self.qh, &self.qs)
    }
}

// ---------------------------------------------------------------------------
// Quantizers, following ggml's `quantize_row_*_ref`.

/// `(max |x|, the x with that magnitude)`; the sign matters to the `_0`
/// formats, which map the extreme element to the end of the quant range.
fn abs_max(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

#[inline]
fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

impl BlockQ4_0 {
    /// Quantizes `x` (`x.len() == 32 * out.len()`) as ggml does: `d = max / -8`
    /// where `max` is the element of largest magnitude, so it lands exactly on
    /// q = 0 and the other side gets the extra level.
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        check_len("Q4_0 quantize", x.len(), out.len());
        for (x, b) in x.chunks_exact(QK).zip(out) {
            let (_, max) = abs_max(x);
            let d = max / -8.0;
            let id = inv(d);
            b.d = to_f16(d);
            for j in 0..QK / 2 {
                // `as i8` truncates toward zero like C's (int8_t) cast.
                let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
                let q1 = ((x[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
                b.qs[j] = q0 | q1 << 4;
            }
        }
    }
}

impl BlockQ4_1 {
    /// Quantizes with `m = min`, `d = (max - min) / 15`.
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        check_len("Q4_1 quantize", x.len(), out.len());
        for (x, b) in x.chunks_exact(QK).zip(out) {
            let (min, max) = min_max(x);
            let d = (max - min) / 15.0;
            let id = inv(d);
            b.d = to_f16(d);
            b.m = to_f16(min);
            for j in 0..QK / 2 {
                let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
                let q1 = (((x[j + QK / 2] - min) * id + 0.5) as i8).min(15) as u8;
                b.qs[j] = q0 | q1 << 4;
            }
        }
    }
}

impl BlockQ5_0 {
    /// Quantizes with `d = max / -16` (see [`BlockQ4_0::quantize`]).
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        check_len("Q5_0 quantize", x.len(), out.len());
        for (x, b) in x.chunks_exact(QK).zip(out) {
            let (_, max) = abs_max(x);
            let d = max / -16.0;
            let id = inv(d);
            let mut q = [0u8; QK];
            for (q, &v) in q.iter_mut().zip(x) {
                *q = ((v * id + 16.5) as i8).min(31) as u8;
            }
            b.d = to_f16(d);
            (b.qh, b.qs) = pack5(&q);
        }
    }
}

impl BlockQ5_1 {
    /// Quantizes with `m = min`, `d = (max - min) / 31`.
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        check_len("Q5_1 quantize", x.len(), out.len());
        for (x, b) in x.chunks_exact(QK).zip(out) {
            let (min, max) = min_max(x);
            let d = (max - min) / 31.0;
            let id = inv(d);
            let mut q = [0u8; QK];
            for (q, &v) in q.iter_mut().zip(x) {
                // ggml has no clamp here; (max - min) * id can round to just
                // over 31, and 31.5+ would still truncate to 31, but clamp
                // anyway so a 6th bit can never leak into the packing.
                *q = (((v - min) * id + 0.5) as u8).min(31);
            }
            b.d = to_f16(d);
            b.m = to_f16(min);
            (b.qh, b.qs) = pack5(&q);
        }
    }
}

// With an importance per element (an importance matrix's, for `minnow
// quantize --imatrix`), the block's scale (and min) are fitted by weighted
// least squares instead (`formats::fit`), and the quants re-derived from the
// f16 values stored. Without one, the ggml reference quantizers above.

/// A symmetric format's block (`x ≈ d·q`, q ∈ −n..=n−1) fitted with
/// importance `w`: returns the f16 scale and the quants, biased by `n`.
fn fit_block_symmetric(x: &[f32], w: &[f32], n: u8) -> (u16, [u8; QK]) {
    let d = to_f16(fit_symmetric(x, n, Some(w)));
    let id = inv(f16_to_f32(d));
    let (lo, hi) = (-(n as f32), n as f32 - 1.0);
    let q = std::array::from_fn(|i| ((x[i] * id).round().clamp(lo, hi) + n as f32) as u8);
    (d, q)
}

/// An offset format's block (`x ≈ d·q + m`, q ∈ 0..=nmax) fitted with
/// importance `w` (`m ≤ 0`: the fit keeps 0 in range, as weight blocks of
/// 32 straddle it): returns the f16 `d`, `m` and the quants.
fn fit_block_offset(x: &[f32], w: &[f32], nmax: u8) -> (u16, u16, [u8; QK]) {
    let (scale, min) = fit_scale_min(x, nmax, Some(w));
    let (d, m) = (to_f16(scale), to_f16(-min));
    let (id, mf) = (inv(f16_to_f32(d)), f16_to_f32(m));
    let q = std::array::from_fn(|i| ((x[i] - mf) * id).round().clamp(0.0, nmax as f32) as u8);
    (d, m, q)
}

/// Packs 32 4-bit quants as the Q4 formats store them.
fn pack4(q: &[u8; QK]) -> [u8; QK / 2] {
    std::array::from_fn(|j| q[j] | q[j + QK / 2] << 4)
}

macro_rules! weighted {
    ($block:ty, $name:literal, |$x:ident, $w:ident, $b:ident| $body:block) => {
        impl $block {
            #[doc = concat!("Quantizes `x` to ", $name, " with each element's importance")]
            /// (`imp.len() == x.len()`) weighing its error in the block's fit.
            pub fn quantize_weighted(x: &[f32], imp: &[f32], out: &mut [Self]) {
                check_len(concat!($name, " quantize"), x.len(), out.len());
                assert_eq!(imp.len(), x.len(), concat!($name, " quantize: one importance per element"));
                for (($x, $w), $b) in x.chunks_exact(QK).zip(imp.chunks_exact(QK)).zip(out) $body
            }
        }
    };
}

weighted!(BlockQ4_0, "Q4_0", |x, w, b| {
    let (d, q) = fit_block_symmetric(x, w, 8);
    b.d = d;
    b.qs = pack4(&q);
});
weighted!(BlockQ5_0, "Q5_0", |x, w, b| {
    let (d, q) = fit_block_symmetric(x, w, 16);
    b.d = d;
    (b.qh, b.qs) = pack5(&q);
});
weighted!(BlockQ4_1, "Q4_1", |x, w, b| {
    let (d, m, q) = fit_block_offset(x, w, 15);
    (b.d, b.m) = (d, m);
    b.qs = pack4(&q);
});
weighted!(BlockQ5_1, "Q5_1", |x, w, b| {
    let (d, m, q) = fit_block_offset(x, w, 31);
    (b.d, b.m) = (d, m);
    (b.qh, b.qs) = pack5(&q);
});

/// Symmetric 8-bit quantization of one block: `d = amax / 127`,
/// `q = round(x / d)` (ties away from zero, C's `roundf`); returns `d`.
/// Never produces -128, which the SIMD dot kernels rely on (see
/// `avx2::dot_signed`). Reference for `avx2::quantize_q8_block`.
#[inline]
fn quantize_q8(x: &[f32], qs: &mut [i8; QK]) -> f32 {
    let (amax, _) = abs_max(x);
    let d = amax / 127.0;
    let id = inv(d);
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    d
}

/// Reference Q8_0 quantization of whole blocks.
fn quantize_q8_0_ref(x: &[f32], out: &mut [BlockQ8_0]) {
    for (x, b) in x.chunks_exact(QK).zip(out) {
        let d = quantize_q8(x, &mut b.qs);
        b.d = to_f16(d);
    }
}

/// Reference Q8_1 quantization of whole blocks.
fn quantize_q8_1_ref(x: &[f32], out: &mut [BlockQ8_1]) {
    for (x, b) in x.chunks_exact(QK).zip(out) {
        let d = quantize_q8(x, &mut b.qs);
        let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
        b.d = to_f16(d);
        b.s = to_f16(sum as f32 * d);
    }
}

impl BlockQ8_0 {
    /// Quantizes `x` (`x.len() == 32 * out.len()`). This runs on every
    /// activation vector before a matvec, so it has an AVX2 version too,
    /// bit-identical to the reference (`quantize_q8`).
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        check_len("Q8_0 quantize", x.len(), out.len());
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the CPU has AVX2, FMA and F16C; lengths checked.
            return unsafe { avx2::quantize_q8_0(x, out) };
        }
        quantize_q8_0_ref(x, out)
    }
}

impl ActBlock for BlockQ8_0 {
    const BLOCK: usize = QK;
    fn quantize(x: &[f32], out: &mut [Self]) {
        BlockQ8_0::quantize(x, out)
    }
    fn scales_f32(&self) -> (f32, f32) {
        (f16_to_f32(self.d), 0.0)
    }
}

impl BlockQ8_1 {
    /// Quantizes like Q8_0 and records `s = d * Σ q`.
    pub fn quantize(x: &[f32], out: &mut [Self]) {
        check_len("Q8_1 quantize", x.len(), out.len());
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the CPU has AVX2, FMA and F16C; lengths checked.
            return unsafe { avx2::quantize_q8_1(x, out) };
        }
        quantize_q8_1_ref(x, out)
    }

    /// Reference dequantization (`out.len() == 32 * blocks.len()`).
    pub fn dequantize(blocks: &[Self], out: &mut [f32]) {
        check_len("Q8_1 dequantize", out.len(), blocks.len());
        for (b, out) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = f16_to_f32(b.d);
            for (o, &q) in out.iter_mut().zip(&b.qs) {
                *o = d * q as f32;
            }
        }
    }
}

impl ActBlock for BlockQ8_1 {
    const BLOCK: usize = QK;
    fn quantize(x: &[f32], out: &mut [Self]) {
        BlockQ8_1::quantize(x, out)
    }
    fn scales_f32(&self) -> (f32, f32) {
        (f16_to_f32(self.d), f16_to_f32(self.s))
    }
}

// ---------------------------------------------------------------------------
// BlockFormat impls: scalar references, and run-time dispatch to AVX2.

/// Picks the AVX2 kernel when the CPU has it, else the reference.
macro_rules! simd_or_ref {
    ($w:ident, $a:ident, $kernel:ident) => {{
        assert_eq!($w.len(), $a.len(), "dot: {} weight blocks, {} activation blocks", $w.len(), $a.len());
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the CPU has AVX2, FMA and F16C; lengths are equal.
            return unsafe { avx2::$kernel($w, $a) };
        }
        Self::vec_dot_ref($w, $a)
    }};
}

/// `vec_dot_multi` through the AVX2 multi-row kernel when the CPU has it
/// (for up to four rows; more go one by one through `vec_dot`), else one
/// `vec_dot_ref` per activation row (what `vec_dot` would do).
macro_rules! simd_or_ref_multi {
    ($w:ident, $a:ident, $scales:ident, $out:ident, $kernel:ident) => {{
        for a in &$a {
            assert_eq!($w.len(), a.len(), "dot: {} weight blocks, {} activation blocks", $w.len(), a.len());
        }
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            if N <= avx2::MAX_ROWS {
                assert_eq!($scales.len(), $w.len(), "dot: one GroupScales per block");
                // SAFETY: the CPU has AVX2, FMA and F16C; N ≤ 4; lengths
                // are equal.
                *$out = unsafe { avx2::$kernel($w, $a, $scales) };
                return;
            }
            for (o, a) in $out.iter_mut().zip($a) {
                *o = Self::vec_dot($w, a);
            }
            return;
        }
        for (o, a) in $out.iter_mut().zip($a) {
            *o = Self::vec_dot_ref($w, a);
        }
    }};
}

/// The scalar references, shared by the formats with a scale only (`_0`,
/// Q8_0; dotted with Q8_0) and those with a scale and a min (`_1`; dotted
/// with Q8_1). `parts` gives a block's f16 scale (and min) and its quants,
/// offset applied.
fn dequantize_0<B>(what: &str, blocks: &[B], out: &mut [f32], parts: impl Fn(&B) -> (u16, [i8; QK])) {
    check_len(what, out.len(), blocks.len());
    for (b, out) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let (d, quants) = parts(b);
        let d = f16_to_f32(d);
        for (o, q) in out.iter_mut().zip(quants) {
            *o = d * q as f32;
        }
    }
}

fn dequantize_1<B>(what: &str, blocks: &[B], out: &mut [f32], parts: impl Fn(&B) -> (u16, u16, [i8; QK])) {
    check_len(what, out.len(), blocks.len());
    for (b, out) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let (d, m, quants) = parts(b);
        let (d, m) = (f16_to_f32(d), f16_to_f32(m));
        for (o, q) in out.iter_mut().zip(quants) {
            *o = d * q as f32 + m;
        }
    }
}

/// Σ dx dy Σ q y.
fn dot_ref_0<B>(what: &str, w: &[B], a: &[BlockQ8_0], parts: impl Fn(&B) -> (u16, [i8; QK])) -> f32 {
    assert_eq!(w.len(), a.len(), "{what} dot: length mismatch");
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let (d, quants) = parts(x);
        sum += idot(&quants, &y.qs) as f32 * f16_to_f32(d) * f16_to_f32(y.d);
    }
    sum
}

/// Σ (dx q + m)(dy y) = Σ dx dy Σ q y + m s.
fn dot_ref_1<B>(what: &str, w: &[B], a: &[BlockQ8_1], parts: impl Fn(&B) -> (u16, u16, [i8; QK])) -> f32 {
    assert_eq!(w.len(), a.len(), "{what} dot: length mismatch");
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let (d, m, quants) = parts(x);
        let sumi = idot(&quants, &y.qs);
        sum += f16_to_f32(d) * f16_to_f32(y.d) * sumi as f32 + f16_to_f32(m) * f16_to_f32(y.s);
    }
    sum
}

impl BlockFormat for BlockQ4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    const BLOCK: usize = QK;
    type Dot = BlockQ8_0;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        dequantize_0("Q4_0 dequantize", blocks, out, |b| (b.d, b.quants()))
    }

    fn vec_dot_ref(w: &[Self], a: &[BlockQ8_0]) -> f32 {
        dot_ref_0("Q4_0", w, a, |b| (b.d, b.quants()))
    }

    fn vec_dot(w: &[Self], a: &[BlockQ8_0]) -> f32 {
        simd_or_ref!(w, a, dot_q4_0)
    }

    fn vec_dot_multi<const N: usize>(w: &[Self], a: [&[BlockQ8_0]; N], scales: &[GroupScales], out: &mut [f32; N]) {
        simd_or_ref_multi!(w, a, scales, out, dot_q4_0_multi)
    }
}

impl BlockFormat for BlockQ4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    const BLOCK: usize = QK;
    type Dot = BlockQ8_1;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        dequantize_1("Q4_1 dequantize", blocks, out, |b| (b.d, b.m, b.quants()))
    }

    fn vec_dot_ref(w: &[Self], a: &[BlockQ8_1]) -> f32 {
        dot_ref_1("Q4_1", w, a, |b| (b.d, b.m, b.quants()))
    }

    fn vec_dot(w: &[Self], a: &[BlockQ8_1]) -> f32 {
        simd_or_ref!(w, a, dot_q4_1)
    }

    fn vec_dot_multi<const N: usize>(w: &[Self], a: [&[BlockQ8_1]; N], scales: &[GroupScales], out: &mut [f32; N]) {
        simd_or_ref_multi!(w, a, scales, out, dot_q4_1_multi)
    }
}

impl BlockFormat for BlockQ5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const BLOCK: usize = QK;
    type Dot = BlockQ8_0;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        dequantize_0("Q5_0 dequantize", blocks, out, |b| (b.d, b.quants()))
    }

    fn vec_dot_ref(w: &[Self], a: &[BlockQ8_0]) -> f32 {
        dot_ref_0("Q5_0", w, a, |b| (b.d, b.quants()))
    }

    fn vec_dot(w: &[Self], a: &[BlockQ8_0]) -> f32 {
        simd_or_ref!(w, a, dot_q5_0)
    }

    fn vec_dot_multi<const N: usize>(w: &[Self], a: [&[BlockQ8_0]; N], scales: &[GroupScales], out: &mut [f32; N]) {
        simd_or_ref_multi!(w, a, scales, out, dot_q5_0_multi)
    }
}

impl BlockFormat for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const BLOCK: usize = QK;
    type Dot = BlockQ8_1;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        dequantize_1("Q5_1 dequantize", blocks, out, |b| (b.d, b.m, b.quants()))
    }

    fn vec_dot_ref(w: &[Self], a: &[BlockQ8_1]) -> f32 {
        dot_ref_1("Q5_1", w, a, |b| (b.d, b.m, b.quants()))
    }

    fn vec_dot(w: &[Self], a: &[BlockQ8_1]) -> f32 {
        simd_or_ref!(w, a, dot_q5_1)
    }

    fn vec_dot_multi<const N: usize>(w: &[Self], a: [&[BlockQ8_1]; N], scales: &[GroupScales], out: &mut [f32; N]) {
        simd_or_ref_multi!(w, a, scales, out, dot_q5_1_multi)
    }
}

impl BlockFormat for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const BLOCK: usize = QK;
    type Dot = BlockQ8_0;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        dequantize_0("Q8_0 dequantize", blocks, out, |b| (b.d, b.qs))
    }

    fn vec_dot_ref(w: &[Self], a: &[BlockQ8_0]) -> f32 {
        dot_ref_0("Q8_0", w, a, |b| (b.d, b.qs))
    }

    fn vec_dot(w: &[Self], a: &[BlockQ8_0]) -> f32 {
        simd_or_ref!(w, a, dot_q8_0)
    }

    fn vec_dot_multi<const N: usize>(w: &[Self], a: [&[BlockQ8_0]; N], scales: &[GroupScales], out: &mut [f32; N]) {
        simd_or_ref_multi!(w, a, scales, out, dot_q8_0_multi)
    }
}

// ---------------------------------------------------------------------------

/// AVX2 + FMA + F16C kernels. Shape of every kernel, per block:
///
/// 1. Expand the weight quants to 32 bytes in element order (nibbles → bytes,
///    `qh` bits → 0x10s), giving *unsigned* quants `u` wherever possible.
/// 2. `vpmaddubsw(u, y)` multiplies unsigned × signed bytes and adds pairs to
///    i16 (no saturation: |pair| ≤ 2·31·128 < 2¹⁵); for the `_0` formats the
///    offset is removed in i16 with a second `vpmaddubsw(offset, y)` — cheaper
///    than ggml's sign-flip trick and safe for any `y`.
/// 3. `vpmaddwd` with ones → 8 i32 partial sums → f32, then one FMA with the
///    block's broadcast `dx·dy` into a running __m256 accumulator.
///
/// Blocks go two per iteration into two accumulators so consecutive FMAs do
/// not wait on each other; one horizontal sum at the very end. The `_1`
/// formats add the min term `m·s` in a separate 4-wide accumulator.
///
/// Integer parts are exact, so these differ from the references only by f32
/// rounding in the scale products and the summation order.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1, GroupScales, QK};
    use crate::formats::float::hsum_avx2 as hsum;
    use std::arch::x86_64::*;

    /// The 32 nibbles of `qs` as bytes in element order: low nibbles
    /// (elements 0..16) in the low 128-bit lane, high nibbles in the high lane.
    #[inline(always)]
    unsafe fn nibbles(qs: &[u8; QK / 2]) -> __m256i {
        let v = _mm_loadu_si128(qs.as_ptr().cast());
        let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// `0x10` in byte `i` where bit `i` of `qh` is set, else 0: the fifth bits
    /// of a Q5 block moved into place.
    #[inline(always)]
    unsafe fn fifth_bits(qh: [u8; 4]) -> __m256i {
        _mm256_and_si256(fifth_mask(qh), _mm256_set1_epi8(0x10))
    }

    /// 0xFF in byte `i` where bit `i` of `qh` is set, else 0.
    #[inline(always)]
    unsafe fn fifth_mask(qh: [u8; 4]) -> __m256i {
        // Byte i gets a copy of qh byte i/8 ...
        let v = _mm256_set1_epi32(u32::from_le_bytes(qh) as i32);
        let spread = _mm256_setr_epi64x(
            0x0000_0000_0000_0000,
            0x0101_0101_0101_0101,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
        );
        let bytes = _mm256_shuffle_epi8(v, spread);
        // ... then keeps only bit i%8 and compares, giving 0xFF / 0x00.
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select)
    }

    #[inline(always)]
    unsafe fn load_i8(qs: &[i8; QK]) -> __m256i {
        _mm256_loadu_si256(qs.as_ptr().cast())
    }

    /// Pairwise i16 sums → 8 f32 lanes, each the sum of 4 products.
    #[inline(always)]
    unsafe fn i16_pairs_to_f32(p: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }

    /// Σ u·y in 8 f32 lanes, `u` unsigned (≤ 127 keeps pairs in i16).
    #[inline(always)]
    unsafe fn dot_unsigned(u: __m256i, y: __m256i) -> __m256 {
        i16_pairs_to_f32(_mm256_maddubs_epi16(u, y))
    }

    /// Σ (u - off)·y in 8 f32 lanes, `u` and `off` unsigned ≤ 31.
    #[inline(always)]
    unsafe fn dot_offset(u: __m256i, off: __m256i, y: __m256i) -> __m256 {
        let p = _mm256_sub_epi16(_mm256_maddubs_epi16(u, y), _mm256_maddubs_epi16(off, y));
        i16_pairs_to_f32(p)
    }

    /// Σ x·y in 8 f32 lanes for signed x and y, by moving x's sign onto y:
    /// |x|·(±y). Exact unless y holds -128 where x < 0 (−(−128) wraps); our
    /// Q8 quantizers never produce -128.
    #[inline(always)]
    unsafe fn dot_signed(x: __m256i, y: __m256i) -> __m256 {
        dot_unsigned(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    /// `f16_to_f32(xd) · f16_to_f32(yd)` in all 8 lanes.
    #[inline(always)]
    unsafe fn scale(xd: u16, yd: u16) -> __m256 {
        let h = _mm_cvtph_ps(_mm_cvtsi32_si128((xd as u32 | (yd as u32) << 16) as i32));
        _mm256_broadcastss_ps(_mm_mul_ss(h, _mm_movehdup_ps(h)))
    }

    /// For the `_1` formats: `(dx·dy in all 8 lanes, [dx·dy, m·s, ..])`.
    #[inline(always)]
    unsafe fn scale_min(xd: u16, xm: u16, yd: u16, ys: u16) -> (__m256, __m128) {
        let bits = xd as u64 | (xm as u64) << 16 | (yd as u64) << 32 | (ys as u64) << 48;
        let h = _mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64)); // [dx, m, dy, s]
        let p = _mm_mul_ps(h, _mm_movehl_ps(h, h)); // [dx·dy, m·s, ..]
        (_mm256_broadcastss_ps(p), p)
    }

    /// Runs `block(i, acc) -> acc` over `0..n`, alternating two accumulators.
    /// The closures passed in are defined inside `#[target_feature]` functions,
    /// so they inherit the features and inline to straight-line code (checked
    /// in the disassembly: no calls in the loops). Routing one through a
    /// non-inlined generic such as `array::map` loses that: the intrinsics
    /// become calls and the kernel runs ~10× slower.
    #[inline(always)]
    unsafe fn blocks2(n: usize, mut block: impl FnMut(usize, __m256) -> __m256) -> f32 {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 2 <= n {
            acc0 = block(i, acc0);
            acc1 = block(i + 1, acc1);
            i += 2;
        }
        if i < n {
            acc0 = block(i, acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// One block of Q8 quantization; returns `(d, Σq)`. Reference:
    /// `super::quantize_q8`, which it matches bit for bit: the same f32
    /// max, division and multiply, and `roundf`'s ties-away rounding done
    /// as `trunc(v + copysign(0.49999997, v))` (the largest float below ½,
    /// so that values just under a half do not round up).
    #[inline(always)]
    unsafe fn quantize_q8_block(x: &[f32], qs: &mut [i8; QK]) -> (f32, i32) {
        debug_assert_eq!(x.len(), QK);
        // (Plain loops, not `array::map`: closures called through `map` are
        // not inlined here and lose the target features.)
        let p = x.as_ptr();
        let sign = _mm256_set1_ps(-0.0);
        let mut v = [_mm256_setzero_ps(); 4];
        let mut m = _mm256_setzero_ps();
        for (k, v) in v.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(p.add(8 * k));
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *v));
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(super::inv(d));
        let half = _mm256_set1_ps(0.499_999_97);
        let mut q = [_mm256_setzero_si256(); 4];
        for (q, &v) in q.iter_mut().zip(&v) {
            let s = _mm256_mul_ps(v, id);
            let r = _mm256_add_ps(s, _mm256_or_ps(half, _mm256_and_ps(sign, s)));
            *q = _mm256_cvttps_epi32(r); // truncation = the rounding step
        }
        // i32 → i8: the packs interleave 128-bit lanes; the permute undoes it.
        let q16a = _mm256_packs_epi32(q[0], q[1]);
        let q16b = _mm256_packs_epi32(q[2], q[3]);
        let q8 = _mm256_packs_epi16(q16a, q16b);
        let q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs.as_mut_ptr().cast(), q8);
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01));
        (d, _mm_cvtsi128_si32(sum))
    }

    /// f32 → f16 bits with F16C, round to nearest even: the same as
    /// `super::to_f16`, minus `half`'s run-time dispatch per call.
    #[inline(always)]
    unsafe fn to_f16(x: f32) -> u16 {
        _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x))) as u16
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available; `x.len() == 32 * out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
        assert_eq!(x.len(), out.len() * QK);
        for (x, b) in x.chunks_exact(QK).zip(out) {
            let (d, _) = quantize_q8_block(x, &mut b.qs);
            b.d = to_f16(d);
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available; `x.len() == 32 * out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
        assert_eq!(x.len(), out.len() * QK);
        for (x, b) in x.chunks_exact(QK).zip(out) {
            let (d, sum) = quantize_q8_block(x, &mut b.qs);
            b.d = to_f16(d);
            b.s = to_f16(sum as f32 * d);
        }
    }

    /// Reference: `BlockQ4_0::vec_dot_ref`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_0(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
        assert_eq!(w.len(), a.len());
        let eight = _mm256_set1_epi8(8);
        blocks2(w.len(), |i, acc| {
            let (x, y) = (w.get_unchecked(i), a.get_unchecked(i));
            let q = dot_offset(nibbles(&x.qs), eight, load_i8(&y.qs));
            _mm256_fmadd_ps(scale(x.d, y.d), q, acc)
        })
    }

    /// Reference: `BlockQ4_1::vec_dot_ref`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
        assert_eq!(w.len(), a.len());
        let mut mins = _mm_setzero_ps();
        let sum = blocks2(w.len(), |i, acc| {
            let (x, y) = (w.get_unchecked(i), a.get_unchecked(i));
            let (d, p) = scale_min(x.d, x.m, y.d, y.s);
            mins = _mm_add_ps(mins, p);
            let q = dot_unsigned(nibbles(&x.qs), load_i8(&y.qs));
            _mm256_fmadd_ps(d, q, acc)
        });
        sum + _mm_cvtss_f32(_mm_movehdup_ps(mins))
    }

    /// Reference: `BlockQ5_0::vec_dot_ref`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q5_0(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
        assert_eq!(w.len(), a.len());
        let sixteen = _mm256_set1_epi8(16);
        blocks2(w.len(), |i, acc| {
            let (x, y) = (w.get_unchecked(i), a.get_unchecked(i));
            let u = _mm256_or_si256(nibbles(&x.qs), fifth_bits(x.qh));
            let q = dot_offset(u, sixteen, load_i8(&y.qs));
            _mm256_fmadd_ps(scale(x.d, y.d), q, acc)
        })
    }

    /// Reference: `BlockQ5_1::vec_dot_ref`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q5_1(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
        assert_eq!(w.len(), a.len());
        let mut mins = _mm_setzero_ps();
        let sum = blocks2(w.len(), |i, acc| {
            let (x, y) = (w.get_unchecked(i), a.get_unchecked(i));
            let (d, p) = scale_min(x.d, x.m, y.d, y.s);
            mins = _mm_add_ps(mins, p);
            let u = _mm256_or_si256(nibbles(&x.qs), fifth_bits(x.qh));
            let q = dot_unsigned(u, load_i8(&y.qs));
            _mm256_fmadd_ps(d, q, acc)
        });
        sum + _mm_cvtss_f32(_mm_movehdup_ps(mins))
    }

    /// Reference: `BlockQ8_0::vec_dot_ref`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
        assert_eq!(w.len(), a.len());
        blocks2(w.len(), |i, acc| {
            let (x, y) = (w.get_unchecked(i), a.get_unchecked(i));
            let q = dot_signed(load_i8(&x.qs), load_i8(&y.qs));
            _mm256_fmadd_ps(scale(x.d, y.d), q, acc)
        })
    }

    // -----------------------------------------------------------------------
    // Multi-row kernels: one weight row against N ≤ 4 activation rows.
    //
    // Each weight block is decoded once (nibbles, fifth bits, |x|, its f16
    // scale) and applied to every activation row. The rows' scales arrive
    // as f32 in a `GroupScales` per block (converted once per matmul: the
    // values `cvtph` gives), and the N products `dx·dy` (and `m·s`) come from
    // one vector multiply: lane t holds exactly the f32 product the
    // single-row kernel's `scale` / `scale_min` computes for row t. Every
    // other operation on row t's data is the single-row kernel's: the same
    // integer dot (so the same eight i32 lanes), the same FMA into the same
    // one of two accumulators (`blocks2_multi` alternates them as `blocks2`
    // does) and the same final horizontal sum. So `out[t]` is bit-identical
    // to the single-row kernel on `a[t]`, which keeps matmul batch-invariant.

    /// Most activation rows one multi-row kernel call takes.
    pub(super) const MAX_ROWS: usize = 4;

    /// [`blocks2`] for N rows at once: `block(i, accs)` updates the N
    /// accumulators for block `i`; block `i` goes to the accumulator
    /// `blocks2` would give it, and the results are reduced as `blocks2`
    /// reduces them.
    #[inline(always)]
    unsafe fn blocks2_multi<const N: usize>(n: usize, mut block: impl FnMut(usize, &mut [__m256; N])) -> [f32; N] {
        let mut acc0 = [_mm256_setzero_ps(); N];
        let mut acc1 = [_mm256_setzero_ps(); N];
        let mut i = 0;
        while i + 2 <= n {
            block(i, &mut acc0);
            block(i + 1, &mut acc1);
            i += 2;
        }
        if i < n {
            block(i, &mut acc0);
        }
        let mut out = [0.0f32; N];
        for t in 0..N {
            out[t] = hsum(_mm256_add_ps(acc0[t], acc1[t]));
        }
        out
    }

    /// The `_0` formats' multi-row loop: `unpack(x)` gives a weight block's
    /// quants and its f16 scale bits once, `dot(q, y)` the integer dot with
    /// one row's block as in the single-row kernel.
    ///
    /// (`target_feature` + `inline` rather than `inline(always)`: the closure
    /// this hands to `blocks2_multi` must carry the features to be inlined.)
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn multi_0<W, const N: usize>(
        w: &[W],
        a: [&[BlockQ8_0]; N],
        sc: &[GroupScales],
        unpack: impl Fn(&W) -> ((__m256i, __m256i), u16),
        dot: impl Fn((__m256i, __m256i), __m256i) -> __m256,
    ) -> [f32; N] {
        debug_assert!(N <= MAX_ROWS);
        blocks2_multi(w.len(), |i, acc| {
            let (q, xd) = unpack(w.get_unchecked(i));
            let dx = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(xd as i32)));
            // dx·dy_t for the N rows: the f32 products `scale` forms.
            let d = _mm_mul_ps(_mm_set1_ps(dx), _mm_load_ps(sc.get_unchecked(i).d.as_ptr()));
            let mut ds = [0.0f32; 4];
            _mm_storeu_ps(ds.as_mut_ptr(), d);
            for t in 0..N {
                let p = dot(q, load_i8(&a[t].get_unchecked(i).qs));
                acc[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&ds[t]), p, acc[t]);
            }
        })
    }

    /// The `_1` formats' multi-row loop: `unpack(x)` gives a weight block's
    /// unsigned quants and its `(d, m)` f16 bits (d low) once. The min terms
    /// `m·s` of all rows accumulate in one vector, row t in lane 2t+1, each
    /// lane in block order from zero as the single-row kernel's lane 1 does.
    ///
    /// (`target_feature` + `inline` rather than `inline(always)`: the closure
    /// this hands to `blocks2_multi` must carry the features to be inlined.)
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn multi_1<W, const N: usize>(
        w: &[W],
        a: [&[BlockQ8_1]; N],
        sc: &[GroupScales],
        unpack: impl Fn(&W) -> (__m256i, u32),
    ) -> [f32; N] {
        debug_assert!(N <= MAX_ROWS);
        // Lane t: Σ over blocks of m·s_t, in block order from zero, as the
        // single-row kernel's lane 1.
        let mut mins = _mm_setzero_ps();
        let mut sum = blocks2_multi(w.len(), |i, acc| {
            let (u, xdm) = unpack(w.get_unchecked(i));
            let xdm = _mm_cvtph_ps(_mm_cvtsi32_si128(xdm as i32)); // [dx, m, 0, 0]
            let g = sc.get_unchecked(i);
            let p = _mm_mul_ps(_mm_broadcastss_ps(xdm), _mm_load_ps(g.d.as_ptr()));
            let m = _mm_permute_ps::<0b0101_0101>(xdm);
            mins = _mm_add_ps(mins, _mm_mul_ps(m, _mm_load_ps(g.s.as_ptr())));
            let p: [f32; 4] = std::mem::transmute(p);
            for t in 0..N {
                let q = dot_unsigned(u, load_i8(&a[t].get_unchecked(i).qs));
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), q, acc[t]);
            }
        });
        let mins: [f32; 4] = std::mem::transmute(mins);
        for t in 0..N {
            sum[t] += mins[t];
        }
        sum
    }

    /// The integer dot of the `_0` formats' multi-row kernels: Σ s·y in the
    /// eight i32 lanes `dot_offset(u, off, y)` gives, where `s = u - off`
    /// (|s| ≤ 16) are the signed quants, with the weight side shared by all
    /// rows: `|s|` (unsigned) against `y` carrying the sign of `s`, one sign
    /// and one multiply per row (`dot_offset` takes two multiplies and a
    /// subtraction). Each i16 pair is exactly `s₀y₀ + s₁y₁` (≤ 2·16·127, no
    /// saturation), the pair `dot_offset` forms as `(u₀y₀ + u₁y₁) − (off·y₀
    /// + off·y₁)`, so the results are bit-identical; exact for every `y` but
    /// −128 against a negative `s`, which our Q8 quantizers never produce
    /// (as [`dot_signed`]).
    #[inline(always)]
    unsafe fn dot_abs_shared((abs, s): (__m256i, __m256i), y: __m256i) -> __m256 {
        dot_unsigned(abs, _mm256_sign_epi8(y, s))
    }

    /// The shared part of [`dot_abs_shared`] for signed quants `s`: `(|s|, s)`.
    #[inline(always)]
    unsafe fn abs_quants(s: __m256i) -> (__m256i, __m256i) {
        (_mm256_sign_epi8(s, s), s)
    }

    /// Multi-row [`dot_q4_0`].
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; N ≤ 4; every `a[t]` as long
    /// as `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_0_multi<const N: usize>(
        w: &[BlockQ4_0],
        a: [&[BlockQ8_0]; N],
        sc: &[GroupScales],
    ) -> [f32; N] {
        let eight = _mm256_set1_epi8(8);
        multi_0(w, a, sc, |x| (abs_quants(_mm256_sub_epi8(nibbles(&x.qs), eight)), x.d), |q, y| dot_abs_shared(q, y))
    }

    /// Multi-row [`dot_q4_1`].
    ///
    /// # Safety
    /// As [`dot_q4_0_multi`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1_multi<const N: usize>(
        w: &[BlockQ4_1],
        a: [&[BlockQ8_1]; N],
        sc: &[GroupScales],
    ) -> [f32; N] {
        multi_1(w, a, sc, |x| (nibbles(&x.qs), x.d as u32 | (x.m as u32) << 16))
    }

    /// Multi-row [`dot_q5_0`].
    ///
    /// # Safety
    /// As [`dot_q4_0_multi`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q5_0_multi<const N: usize>(
        w: &[BlockQ5_0],
        a: [&[BlockQ8_0]; N],
        sc: &[GroupScales],
    ) -> [f32; N] {
        multi_0(
            w,
            a,
            sc,
            |x| {
                // s = u - 16 directly: the quant itself where the fifth bit
                // is set, else nibble - 16 = nibble | 0xF0 (as i8).
                let high = _mm256_andnot_si256(fifth_mask(x.qh), _mm256_set1_epi8(-16));
                let s = _mm256_or_si256(nibbles(&x.qs), high);
                (abs_quants(s), x.d)
            },
            |q, y| dot_abs_shared(q, y),
        )
    }

    /// Multi-row [`dot_q5_1`].
    ///
    /// # Safety
    /// As [`dot_q4_0_multi`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q5_1_multi<const N: usize>(
        w: &[BlockQ5_1],
        a: [&[BlockQ8_1]; N],
        sc: &[GroupScales],
    ) -> [f32; N] {
        multi_1(w, a, sc, |x| {
            let u = _mm256_or_si256(nibbles(&x.qs), fifth_bits(x.qh));
            (u, x.d as u32 | (x.m as u32) << 16)
        })
    }

    /// Multi-row [`dot_q8_0`]: `|x|` is taken once per block.
    ///
    /// # Safety
    /// As [`dot_q4_0_multi`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0_multi<const N: usize>(
        w: &[BlockQ8_0],
        a: [&[BlockQ8_0]; N],
        sc: &[GroupScales],
    ) -> [f32; N] {
        multi_0(
            w,
            a,
            sc,
            |x| {
                let xq = load_i8(&x.qs);
                ((_mm256_sign_epi8(xq, xq), xq), x.d)
            },
            // dot_signed(xq, y), with |x| shared.
            |(ax, xq), y| dot_unsigned(ax, _mm256_sign_epi8(y, xq)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack5_round_trips() {
        let q: [u8; QK] = std::array::from_fn(|i| (i as u8 * 7 + 3) % 32);
        let (qh, qs) = pack5(&q);
        assert_eq!(quants5(qh, &qs).map(|v| v as u8), q);
    }

    /// The SIMD activation quantizers are bit-identical to the references,
    /// including at the exact halves where `roundf` and round-to-even differ
    /// and just below them.
    #[test]
    fn q8_quantize_simd_matches_reference() {
        let mut x: Vec<f32> = Vec::new();
        // amax = 127 → d = 1 exactly, so x·id hits the halves exactly.
        for k in 0..8 {
            x.push(127.0);
            for j in 1..QK as i32 {
                let h = (j - 16) as f32 + 0.5 + k as f32 * 3.0;
                x.push(match k % 3 {
                    0 => h,
                    1 => -h,
                    _ => f32::from_bits(h.abs().to_bits() - 1) * if j % 2 == 0 { 1.0 } else { -1.0 },
                });
            }
        }
        // Arbitrary scales, and an all-zero block.
        x.extend((0..QK * 20).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1.37e-3 * (1 + i / QK) as f32));
        x.extend([0.0; QK]);
        let n = x.len() / QK;
        let (mut a, mut b) = (vec![BlockQ8_0::zeroed(); n], vec![BlockQ8_0::zeroed(); n]);
        quantize_q8_0_ref(&x, &mut a);
        BlockQ8_0::quantize(&x, &mut b);
        assert_eq!(a, b);
        let (mut a, mut b) = (vec![BlockQ8_1::zeroed(); n], vec![BlockQ8_1::zeroed(); n]);
        quantize_q8_1_ref(&x, &mut a);
        BlockQ8_1::quantize(&x, &mut b);
        assert_eq!(a, b);
        assert_eq!(a[0].qs[2], -14); // -13.5 rounds away from zero
        assert_eq!(a[0].qs[1], -15); // -14.5
        assert_eq!(a[0].qs[17], 2); // 1.5
    }

    #[test]
    fn q8_quantize_never_makes_minus_128() {
        let x: Vec<f32> = (0..QK).map(|i| -1.0 - i as f32 * 1e-7).collect();
        let mut b = [BlockQ8_0::zeroed()];
        BlockQ8_0::quantize(&x, &mut b);
        assert!(b[0].qs.iter().all(|&q| q >= -127));
    }
}
