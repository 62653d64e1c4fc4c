//! Tests of the legacy quantized formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
//! the activation blocks Q8_0/Q8_1) and the float formats.
//!
//! Two kinds of evidence:
//! - hand-computed blocks and golden bytes, which pin the *layout* to ggml's
//!   (self-consistency alone would pass with any consistent layout);
//! - property tests over random blocks: SIMD dot vs scalar reference, scalar
//!   reference vs a plain f64 dot of the dequantized data, and quantize →
//!   dequantize round trips within the format's step.

use bytemuck::Zeroable;
use minnow_kernels::formats::float::{BlockBF16, BlockF16, BlockF32};
use minnow_kernels::formats::legacy::*;
use minnow_kernels::formats::{self, ActBlock, BlockFormat};
use minnow_kernels::GgmlType;
use proptest::prelude::*;

fn h(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

fn hf(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Bytes copied into 2-aligned storage, as GGUF tensor data is.
fn aligned(bytes: &[u8]) -> Vec<u16> {
    assert_eq!(bytes.len() % 2, 0);
    let mut v = vec![0u16; bytes.len() / 2];
    bytemuck::cast_slice_mut::<u16, u8>(&mut v).copy_from_slice(bytes);
    v
}

fn deq_bytes(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / ty.type_size() * ty.block_size();
    let mut out = vec![f32::NAN; n];
    let storage = aligned(bytes);
    formats::dequantize(ty, bytemuck::cast_slice(&storage), &mut out).unwrap();
    out
}

fn deq<B: BlockFormat>(b: &[B]) -> Vec<f32> {
    let mut out = vec![f32::NAN; b.len() * B::BLOCK];
    B::dequantize(b, &mut out);
    out
}

// ---------------------------------------------------------------------------
// Layout: sizes agree with GgmlType, and hand-computed blocks.

#[test]
fn sizes_match_ggml() {
    fn check<B: BlockFormat>() {
        assert_eq!(std::mem::size_of::<B>(), B::TYPE.type_size(), "{}", B::TYPE);
        assert_eq!(B::BLOCK, B::TYPE.block_size(), "{}", B::TYPE);
        assert!(std::mem::align_of::<B>() <= 4);
    }
    check::<BlockF32>();
    check::<BlockF16>();
    check::<BlockBF16>();
    check::<BlockQ4_0>();
    check::<BlockQ4_1>();
    check::<BlockQ5_0>();
    check::<BlockQ5_1>();
    check::<BlockQ8_0>();
    assert_eq!(std::mem::size_of::<BlockQ8_1>(), GgmlType::Q8_1.type_size());
    assert_eq!(<BlockQ8_1 as ActBlock>::BLOCK, GgmlType::Q8_1.block_size());
}

#[test]
fn q4_0_hand_block() {
    // d = 0.5 (f16 0x3800, little-endian 00 38); every byte 0xF8: low nibble
    // 8 → (8-8)·0.5 = 0 for elements 0..16, high nibble 15 → 7·0.5 = 3.5 for
    // elements 16..32.
    let mut bytes = vec![0x00, 0x38];
    bytes.extend([0xF8u8; 16]);
    let mut want = vec![0.0f32; 16];
    want.extend([3.5f32; 16]);
    assert_eq!(deq_bytes(GgmlType::Q4_0, &bytes), want);

    // qs[j] = j | (15 - j) << 4: element j = (j - 8)·d, element 16 + j = (7 - j)·d.
    let b = BlockQ4_0 { d: h(0.25), qs: std::array::from_fn(|j| j as u8 | (15 - j as u8) << 4) };
    let want: Vec<f32> =
        (0..32).map(|i| if i < 16 { (i as f32 - 8.0) * 0.25 } else { (7.0 - (i - 16) as f32) * 0.25 }).collect();
    assert_eq!(deq(&[b]), want);
}

#[test]
fn q4_1_hand_block() {
    // d = 0.25, m = -1: element j = 0.25·j - 1, element 16 + j = 0.25·(15 - j) - 1.
    let mut bytes = vec![0x00, 0x34, 0x00, 0xBC]; // f16 0.25, -1.0
    bytes.extend((0..16u8).map(|j| j | (15 - j) << 4));
    let want: Vec<f32> =
        (0..32).map(|i| if i < 16 { 0.25 * i as f32 - 1.0 } else { 0.25 * (31 - i) as f32 - 1.0 }).collect();
    assert_eq!(deq_bytes(GgmlType::Q4_1, &bytes), want);
}

#[test]
fn q5_0_hand_block() {
    // d = 1; qh bytes 01 00 01 80 → u32 0x8001_0001: fifth bits of elements
    // 0, 16 and 31. qs[j] = 0xF1: low nibble 1, high nibble 15.
    let mut bytes = vec![0x00, 0x3C, 0x01, 0x00, 0x01, 0x80];
    bytes.extend([0xF1u8; 16]);
    let mut want = vec![0.0f32; 32];
    for (i, w) in want.iter_mut().enumerate() {
        let low = if i < 16 { 1 } else { 15 };
        let hi = if matches!(i, 0 | 16 | 31) { 16 } else { 0 };
        *w = (low + hi - 16) as f32;
    }
    assert_eq!(want[0], 1.0);
    assert_eq!(want[1], -15.0);
    assert_eq!(want[16], 15.0);
    assert_eq!(want[17], -1.0);
    assert_eq!(want[31], 15.0);
    assert_eq!(deq_bytes(GgmlType::Q5_0, &bytes), want);
}

#[test]
fn q5_1_hand_block() {
    // d = 0.5, m = 2; qh = 0xFFFF_0000: elements 16..32 have the fifth bit.
    // qs[j] = j | j << 4 → element j = 0.5·j + 2, element 16 + j = 0.5·(16 + j) + 2.
    let mut bytes = vec![0x00, 0x38, 0x00, 0x40, 0x00, 0x00, 0xFF, 0xFF];
    bytes.extend((0..16u8).map(|j| j | j << 4));
    let want: Vec<f32> = (0..32).map(|i| 0.5 * i as f32 + 2.0).collect();
    assert_eq!(deq_bytes(GgmlType::Q5_1, &bytes), want);
}

#[test]
fn q8_0_hand_block() {
    // d = 2; qs = -127, -1, 0, 1, 2, ... as two's complement bytes.
    let qs: Vec<i8> = [-127i8, -1, 0].into_iter().chain(1..30).collect();
    let mut bytes = vec![0x00, 0x40];
    bytes.extend(qs.iter().map(|&q| q as u8));
    let want: Vec<f32> = qs.iter().map(|&q| 2.0 * q as f32).collect();
    assert_eq!(deq_bytes(GgmlType::Q8_0, &bytes), want);
}

#[test]
fn float_hand_values() {
    // F16 1.0 = 3C00, -2.5 = C100; BF16 1.0 = 3F80, -2.5 = C020; F32 little-endian.
    assert_eq!(deq_bytes(GgmlType::F16, &[0x00, 0x3C, 0x00, 0xC1]), vec![1.0, -2.5]);
    assert_eq!(deq_bytes(GgmlType::BF16, &[0x80, 0x3F, 0x20, 0xC0]), vec![1.0, -2.5]);
    let f32_bytes: Vec<u8> = [1.5f32, -0.25].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(deq_bytes(GgmlType::F32, &f32_bytes), vec![1.5, -0.25]);
}

#[test]
fn byte_dispatch_rejects_bad_lengths() {
    let storage = aligned(&[0u8; 20]);
    let bytes: &[u8] = bytemuck::cast_slice(&storage);
    let mut out = vec![0.0; 32];
    // 19 bytes is not a whole Q4_0 block.
    assert!(formats::dequantize(GgmlType::Q4_0, &bytes[..19], &mut out).is_err());
    // One block but room for two.
    let mut out2 = vec![0.0; 64];
    assert!(formats::dequantize(GgmlType::Q4_0, &bytes[..18], &mut out2).is_err());
    assert!(formats::dequantize(GgmlType::Q4_0, &bytes[..18], &mut out).is_ok());
}

#[test]
fn hand_dots() {
    // Q4_0 (0 ×16, 3.5 ×16) · Q8_0 (d = 1, all q = 1) = 16 · 3.5 = 56.
    let w = [BlockQ4_0 { d: h(0.5), qs: [0xF8; 16] }];
    let a = [BlockQ8_0 { d: h(1.0), qs: [1; 32] }];
    assert_eq!(BlockQ4_0::vec_dot_ref(&w, &a), 56.0);
    assert_eq!(BlockQ4_0::vec_dot(&w, &a), 56.0);

    // Q4_1 d = 1, m = 1, all q = 0 → every x = 1; Q8_1 d = 0.5, q = 2 → y = 1,
    // s = 0.5·64 = 32. The whole dot is the min term: 32.
    let w = [BlockQ4_1 { d: h(1.0), m: h(1.0), qs: [0; 16] }];
    let a = [BlockQ8_1 { d: h(0.5), s: h(32.0), qs: [2; 32] }];
    assert_eq!(BlockQ4_1::vec_dot_ref(&w, &a), 32.0);
    assert_eq!(BlockQ4_1::vec_dot(&w, &a), 32.0);

    // Q5_0 with only element 31's fifth bit set, all low bits 0: x = -16
    // everywhere but x[31] = 0. Against y = i: -16 · Σ_{i<31} i = -7440.
    let w = [BlockQ5_0 { d: h(1.0), qh: [0, 0, 0, 0x80], qs: [0; 16] }];
    let a = [BlockQ8_0 { d: h(1.0), qs: std::array::from_fn(|i| i as i8) }];
    assert_eq!(BlockQ5_0::vec_dot_ref(&w, &a), -7440.0);
    assert_eq!(BlockQ5_0::vec_dot(&w, &a), -7440.0);

    // Q5_1 d = 1, m = -16 with all fifth bits and low bits 15: x = 31 - 16 = 15;
    // y = 1 (d = 1, s = 32): 15·32 = 480.
    let w = [BlockQ5_1 { d: h(1.0), m: h(-16.0), qh: [0xFF; 4], qs: [0xFF; 16] }];
    let a = [BlockQ8_1 { d: h(1.0), s: h(32.0), qs: [1; 32] }];
    assert_eq!(BlockQ5_1::vec_dot_ref(&w, &a), 480.0);
    assert_eq!(BlockQ5_1::vec_dot(&w, &a), 480.0);

    // Q8_0 extremes, including a -128 weight: Σ (-128·127 + 127·-127 ...).
    let w = [BlockQ8_0 { d: h(1.0), qs: std::array::from_fn(|i| if i % 2 == 0 { -128 } else { 127 }) }];
    let a = [BlockQ8_0 { d: h(1.0), qs: std::array::from_fn(|i| if i % 2 == 0 { 127 } else { -127 }) }];
    let want = 16.0 * (-128.0 * 127.0 - 127.0 * 127.0);
    assert_eq!(BlockQ8_0::vec_dot_ref(&w, &a), want);
    assert_eq!(BlockQ8_0::vec_dot(&w, &a), want);
}

// ---------------------------------------------------------------------------
// Quantizers: golden bytes and exact round trips of on-grid data.

#[test]
fn q4_0_quantize_golden_bytes() {
    // x = (j % 16)·0.5 - 4: the largest magnitude is -4, so d = -4 / -8 = 0.5
    // and q = j % 16 exactly, giving qs[j] = j | j << 4.
    let x: Vec<f32> = (0..32).map(|i| (i % 16) as f32 * 0.5 - 4.0).collect();
    let mut b = [BlockQ4_0::zeroed()];
    BlockQ4_0::quantize(&x, &mut b);
    let mut want = vec![0x00u8, 0x38];
    want.extend((0..16u8).map(|j| j | j << 4));
    assert_eq!(bytemuck::bytes_of(&b[0]), &want[..]);
    assert_eq!(deq(&b), x);

    // With the largest magnitude positive, d is negative: x = 4 → q = 0.
    let x: Vec<f32> = (0..32).map(|i| 4.0 - (i % 16) as f32 * 0.5).collect();
    BlockQ4_0::quantize(&x, &mut b);
    assert_eq!(hf(b[0].d), -0.5);
    assert_eq!(deq(&b), x);
}

#[test]
fn q8_0_quantize_golden_bytes() {
    // amax = 63.5 → d = 0.5 exactly; x = q·0.5.
    let q: Vec<i8> = (0..32).map(|i| if i == 7 { 127 } else { (i * 7 - 110) as i8 }).collect();
    let x: Vec<f32> = q.iter().map(|&q| q as f32 * 0.5).collect();
    let mut b = [BlockQ8_0::zeroed()];
    BlockQ8_0::quantize(&x, &mut b);
    let mut want = vec![0x00u8, 0x38];
    want.extend(q.iter().map(|&q| q as u8));
    assert_eq!(bytemuck::bytes_of(&b[0]), &want[..]);

    // Q8_1 is the same plus s = d·Σq.
    let mut b1 = [BlockQ8_1::zeroed()];
    BlockQ8_1::quantize(&x, &mut b1);
    assert_eq!((b1[0].d, b1[0].qs), (b[0].d, b[0].qs));
    let sum: i32 = q.iter().map(|&q| q as i32).sum();
    assert_eq!(hf(b1[0].s), 0.5 * sum as f32);
}

#[test]
fn on_grid_round_trips_are_exact() {
    // Q4_1: m = 1, d = 0.25, q = i % 16 (both ends present).
    let x: Vec<f32> = (0..32).map(|i| 1.0 + 0.25 * ((i * 7) % 16) as f32).collect();
    let mut b = [BlockQ4_1::zeroed()];
    BlockQ4_1::quantize(&x, &mut b);
    assert_eq!((hf(b[0].d), hf(b[0].m)), (0.25, 1.0));
    assert_eq!(deq(&b), x);

    // Q5_0: x = (q - 16)·0.25, q = 0..32 (largest magnitude -4 at q = 0).
    let x: Vec<f32> = (0..32).map(|i| (((i * 5) % 32) as f32 - 16.0) * 0.25).collect();
    let mut b = [BlockQ5_0::zeroed()];
    BlockQ5_0::quantize(&x, &mut b);
    assert_eq!(hf(b[0].d), 0.25);
    assert_eq!(deq(&b), x);

    // Q5_1: m = -2, d = 0.125, q = 0..32.
    let x: Vec<f32> = (0..32).map(|i| -2.0 + 0.125 * ((i * 3) % 32) as f32).collect();
    let mut b = [BlockQ5_1::zeroed()];
    BlockQ5_1::quantize(&x, &mut b);
    assert_eq!((hf(b[0].d), hf(b[0].m)), (0.125, -2.0));
    assert_eq!(deq(&b), x);

    // All zeros quantize to d = 0 and come back as zeros.
    let z = [0.0f32; 32];
    let mut b = [BlockQ4_0::zeroed()];
    BlockQ4_0::quantize(&z, &mut b);
    assert_eq!(deq(&b), z);
    let mut b = [BlockQ8_0::zeroed()];
    BlockQ8_0::quantize(&z, &mut b);
    assert_eq!(deq(&b), z);
}

// ---------------------------------------------------------------------------
// Property tests, generic over the formats.

/// What the tests need to know about a weight format beyond `BlockFormat`.
trait Weight: BlockFormat + std::fmt::Debug
where
    Self::Dot: Act,
{
    /// A block from random bytes, with the f16 scale (and min) set to `d`, `m`.
    fn make(raw: &[u8; 32], d: f32, m: f32) -> Self;
    /// Quants as integers (offset applied for the `_0` formats).
    fn q(&self) -> [i8; 32];
    /// `(d, m)` as f32, `m = 0` for formats without a min.
    fn dm(&self) -> (f32, f32);
    fn quantize(x: &[f32], out: &mut [Self]);
    /// Round-trip error bound as a multiple of |d| (see `round_trip`).
    const ERR_STEPS: f32;
}

/// What the tests need to know about an activation block.
trait Act: ActBlock + std::fmt::Debug {
    fn make(d: f32, qs: [i8; 32]) -> Self;
    fn d(&self) -> f32;
    fn qs(&self) -> &[i8; 32];
    /// `s` for Q8_1; `d·Σq` (exact) for Q8_0, which stores no sum.
    fn s(&self) -> f32;
}

impl Act for BlockQ8_0 {
    fn make(d: f32, qs: [i8; 32]) -> Self {
        BlockQ8_0 { d: h(d), qs }
    }
    fn d(&self) -> f32 {
        hf(self.d)
    }
    fn qs(&self) -> &[i8; 32] {
        &self.qs
    }
    fn s(&self) -> f32 {
        self.d() * self.qs.iter().map(|&q| q as i32).sum::<i32>() as f32
    }
}

impl Act for BlockQ8_1 {
    fn make(d: f32, qs: [i8; 32]) -> Self {
        let sum: i32 = qs.iter().map(|&q| q as i32).sum();
        BlockQ8_1 { d: h(d), s: h(hf(h(d)) * sum as f32), qs }
    }
    fn d(&self) -> f32 {
        hf(self.d)
    }
    fn qs(&self) -> &[i8; 32] {
        &self.qs
    }
    fn s(&self) -> f32 {
        hf(self.s)
    }
}

fn nib(raw: &[u8; 32]) -> [u8; 16] {
    raw[..16].try_into().unwrap()
}

fn qh(raw: &[u8; 32]) -> [u8; 4] {
    raw[16..20].try_into().unwrap()
}

impl Weight for BlockQ4_0 {
    fn make(raw: &[u8; 32], d: f32, _: f32) -> Self {
        BlockQ4_0 { d: h(d), qs: nib(raw) }
    }
    fn q(&self) -> [i8; 32] {
        self.quants()
    }
    fn dm(&self) -> (f32, f32) {
        (hf(self.d), 0.0)
    }
    fn quantize(x: &[f32], out: &mut [Self]) {
        BlockQ4_0::quantize(x, out)
    }
    // The end opposite the largest magnitude is clamped at q = 15, a whole
    // step short; everything else is within half a step.
    const ERR_STEPS: f32 = 1.01;
}

impl Weight for BlockQ4_1 {
    fn make(raw: &[u8; 32], d: f32, m: f32) -> Self {
        BlockQ4_1 { d: h(d), m: h(m), qs: nib(raw) }
    }
    fn q(&self) -> [i8; 32] {
        self.quants()
    }
    fn dm(&self) -> (f32, f32) {
        (hf(self.d), hf(self.m))
    }
    fn quantize(x: &[f32], out: &mut [Self]) {
        BlockQ4_1::quantize(x, out)
    }
    // Half a step plus f16 rounding of d (≤ 15·2⁻¹¹ steps); m's rounding is
    // added separately.
    const ERR_STEPS: f32 = 0.51;
}

impl Weight for BlockQ5_0 {
    fn make(raw: &[u8; 32], d: f32, _: f32) -> Self {
        BlockQ5_0 { d: h(d), qh: qh(raw), qs: nib(raw) }
    }
    fn q(&self) -> [i8; 32] {
        self.quants()
    }
    fn dm(&self) -> (f32, f32) {
        (hf(self.d), 0.0)
    }
    fn quantize(x: &[f32], out: &mut [Self]) {
        BlockQ5_0::quantize(x, out)
    }
    const ERR_STEPS: f32 = 1.01;
}

impl Weight for BlockQ5_1 {
    fn make(raw: &[u8; 32], d: f32, m: f32) -> Self {
        BlockQ5_1 { d: h(d), m: h(m), qh: qh(raw), qs: nib(raw) }
    }
    fn q(&self) -> [i8; 32] {
        self.quants()
    }
    fn dm(&self) -> (f32, f32) {
        (hf(self.d), hf(self.m))
    }
    fn quantize(x: &[f32], out: &mut [Self]) {
        BlockQ5_1::quantize(x, out)
    }
    const ERR_STEPS: f32 = 0.52;
}

impl Weight for BlockQ8_0 {
    fn make(raw: &[u8; 32], d: f32, _: f32) -> Self {
        // Any byte, -128 included: weights from other quantizers may hold it.
        BlockQ8_0 { d: h(d), qs: raw.map(|b| b as i8) }
    }
    fn q(&self) -> [i8; 32] {
        self.qs
    }
    fn dm(&self) -> (f32, f32) {
        (hf(self.d), 0.0)
    }
    fn quantize(x: &[f32], out: &mut [Self]) {
        BlockQ8_0::quantize(x, out)
    }
    // Half a step plus f16 rounding of d (≤ 127·2⁻¹¹ ≈ 0.06 steps).
    const ERR_STEPS: f32 = 0.57;
}

/// Σ over blocks of |dx·dy|·Σ|q·y| + |m·s|: the size of the terms the dot
/// adds up, which sets the scale of any f32 rounding in it.
fn magnitude<W: Weight>(w: &[W], a: &[W::Dot]) -> f64
where
    W::Dot: Act,
{
    w.iter()
        .zip(a)
        .map(|(x, y)| {
            let (d, m) = x.dm();
            let qy: i64 = x.q().iter().zip(y.qs()).map(|(&q, &v)| (q as i64 * v as i64).abs()).sum();
            (d as f64 * y.d() as f64).abs() * qy as f64 + (m as f64 * y.s() as f64).abs()
        })
        .sum()
}

fn deq_act<A: Act>(a: &[A]) -> Vec<f64> {
    a.iter().flat_map(|b| b.qs().map(|q| b.d() as f64 * q as f64)).collect()
}

/// (a) SIMD vs reference and (b) reference vs an f64 dot of dequantized data.
fn check_dots<W: Weight>(w: &[W], a: &[W::Dot]) -> Result<(), TestCaseError>
where
    W::Dot: Act,
{
    let mag = magnitude(w, a);
    let tol = 1e-5 * mag + 1e-30;
    let r = W::vec_dot_ref(w, a) as f64;
    let s = W::vec_dot(w, a) as f64;
    prop_assert!((r - s).abs() <= tol, "simd {s} vs ref {r}, tol {tol}");

    let wd = deq(w);
    let ad = deq_act(a);
    let exact: f64 = wd.iter().zip(&ad).map(|(&x, &y)| x as f64 * y).sum();
    // The reference uses the stored s for Σ m·y; s is d·Σq rounded to f16,
    // which is the one place it may differ from the dequantized data by more
    // than f32 rounding. Bound that difference per block.
    let s_slack: f64 = w
        .iter()
        .zip(a)
        .map(|(x, y)| {
            let sum: i64 = y.qs().iter().map(|&q| q as i64).sum();
            (x.dm().1 as f64 * (y.s() as f64 - y.d() as f64 * sum as f64)).abs()
        })
        .sum();
    prop_assert!((r - exact).abs() <= tol + s_slack, "ref {r} vs dequantized {exact}, tol {tol} + {s_slack}");
    Ok(())
}

/// Uniform f32 in `lo..hi` on a 2²⁴-point grid. (Not proptest's own float
/// ranges: their samplers trip a debug assertion now and then.)
fn uniform(lo: f32, hi: f32) -> impl Strategy<Value = f32> + Clone {
    (0u32..1 << 24).prop_map(move |k| lo + (hi - lo) * (k as f32 / (1u32 << 24) as f32))
}

/// A nonzero scale with a random sign, kept where f16 is normal.
fn scale() -> impl Strategy<Value = f32> {
    (uniform(1e-3, 2.0), any::<bool>()).prop_map(|(v, neg)| if neg { -v } else { v })
}

/// Random weight blocks and activations for up to 40 blocks (odd, even and
/// zero counts all exercise the two-at-a-time loop differently).
#[allow(clippy::type_complexity)]
fn case() -> impl Strategy<Value = (Vec<(f32, f32, [u8; 32])>, Vec<f32>, Vec<(f32, Vec<i8>)>)> {
    (0usize..40).prop_flat_map(|n| {
        (
            prop::collection::vec((scale(), uniform(-4.0, 4.0), any::<[u8; 32]>()), n),
            prop::collection::vec(uniform(-10.0, 10.0), n * 32),
            prop::collection::vec((scale(), prop::collection::vec(-127i8..=127, 32)), n),
        )
    })
}

fn run_dots<W: Weight>(wp: &[(f32, f32, [u8; 32])], x: &[f32], ap: &[(f32, Vec<i8>)]) -> Result<(), TestCaseError>
where
    W::Dot: Act,
{
    let w: Vec<W> = wp.iter().map(|(d, m, raw)| W::make(raw, *d, *m)).collect();
    // Activations as the engine makes them: quantized from f32.
    let mut a = vec![W::Dot::zeroed(); w.len()];
    W::Dot::quantize(x, &mut a);
    check_dots(&w, &a)?;
    // And raw random quants, to reach bit patterns the quantizer rarely makes.
    let a: Vec<W::Dot> = ap.iter().map(|(d, q)| W::Dot::make(*d, q[..].try_into().unwrap())).collect();
    check_dots(&w, &a)
}

/// (c) quantize → dequantize within `ERR_STEPS` steps (+ f16 rounding of m).
fn run_round_trip<W: Weight>(x: &[f32]) -> Result<(), TestCaseError>
where
    W::Dot: Act,
{
    let mut b = vec![W::zeroed(); x.len() / 32];
    W::quantize(x, &mut b);
    let y = deq(&b);
    for (i, (blk, (xs, ys))) in b.iter().zip(x.chunks(32).zip(y.chunks(32))).enumerate() {
        let (d, m) = blk.dm();
        let bound = W::ERR_STEPS * d.abs() + m.abs() * 2f32.powi(-11) + 1e-6;
        for (j, (&a, &q)) in xs.iter().zip(ys).enumerate() {
            prop_assert!((a - q).abs() <= bound, "block {i} elem {j}: {a} → {q}, bound {bound}, {blk:?}");
        }
    }
    // And via the byte-level dispatch, identically.
    prop_assert_eq!(deq_bytes(W::TYPE, bytemuck::cast_slice(&b)), y);
    Ok(())
}

/// Random rows to quantize: per block a magnitude in 0.01..100 and values in
/// ±magnitude, possibly all shifted by an offset (the `_1` formats care).
fn rows() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        (uniform(0.01, 100.0), uniform(-1.0, 1.0), prop::collection::vec(uniform(-1.0, 1.0), 32)),
        0..12,
    )
    .prop_map(|blocks| {
        blocks.into_iter().flat_map(|(mag, off, v)| v.into_iter().map(move |u| (u + off) * mag)).collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn dots_q4_0((wp, x, ap) in case()) { run_dots::<BlockQ4_0>(&wp, &x, &ap)?; }
    #[test]
    fn dots_q4_1((wp, x, ap) in case()) { run_dots::<BlockQ4_1>(&wp, &x, &ap)?; }
    #[test]
    fn dots_q5_0((wp, x, ap) in case()) { run_dots::<BlockQ5_0>(&wp, &x, &ap)?; }
    #[test]
    fn dots_q5_1((wp, x, ap) in case()) { run_dots::<BlockQ5_1>(&wp, &x, &ap)?; }
    #[test]
    fn dots_q8_0((wp, x, ap) in case()) { run_dots::<BlockQ8_0>(&wp, &x, &ap)?; }

    #[test]
    fn round_trip_q4_0(x in rows()) { run_round_trip::<BlockQ4_0>(&x)?; }
    #[test]
    fn round_trip_q4_1(x in rows()) { run_round_trip::<BlockQ4_1>(&x)?; }
    #[test]
    fn round_trip_q5_0(x in rows()) { run_round_trip::<BlockQ5_0>(&x)?; }
    #[test]
    fn round_trip_q5_1(x in rows()) { run_round_trip::<BlockQ5_1>(&x)?; }
    #[test]
    fn round_trip_q8_0(x in rows()) { run_round_trip::<BlockQ8_0>(&x)?; }

    /// The activation quantizers: Q8_1's s is d·Σq to f16 precision, and both
    /// round trip within ~half a step.
    #[test]
    fn act_quantizers(x in rows()) {
        let n = x.len() / 32;
        let mut a0 = vec![BlockQ8_0::zeroed(); n];
        let mut a1 = vec![BlockQ8_1::zeroed(); n];
        <BlockQ8_0 as ActBlock>::quantize(&x, &mut a0);
        <BlockQ8_1 as ActBlock>::quantize(&x, &mut a1);
        let mut y1 = vec![0.0; x.len()];
        BlockQ8_1::dequantize(&a1, &mut y1);
        prop_assert_eq!(deq(&a0), y1);
        for (b0, b1) in a0.iter().zip(&a1) {
            prop_assert_eq!((b0.d, b0.qs), (b1.d, b1.qs));
            prop_assert!(b1.qs.iter().all(|&q| q != -128));
            let exact = b1.d() as f64 * b1.qs.iter().map(|&q| q as f64).sum::<f64>();
            prop_assert!((b1.s() as f64 - exact).abs() <= exact.abs() * 2f64.powi(-10) + 1e-7,
                "s {} vs d·Σq {}", b1.s(), exact);
        }
    }

    /// Float formats: SIMD vs reference over random lengths (all tails).
    #[test]
    fn float_dots(v in prop::collection::vec((uniform(-100.0, 100.0), uniform(-10.0, 10.0)), 0..300)) {
        let (w, a): (Vec<f32>, Vec<f32>) = v.into_iter().unzip();
        let a: Vec<BlockF32> = a.into_iter().map(BlockF32).collect();
        let w32: Vec<BlockF32> = w.iter().map(|&x| BlockF32(x)).collect();
        let mut w16 = vec![BlockF16(0); w.len()];
        BlockF16::quantize(&w, &mut w16);
        let mut wb = vec![BlockBF16(0); w.len()];
        BlockBF16::quantize(&w, &mut wb);
        let mag: f32 = w.iter().zip(&a).map(|(x, y)| (x * y.0).abs()).sum();
        let tol = 1e-5 * mag + 1e-30;
        let pairs = [
            (BlockF32::vec_dot(&w32, &a), BlockF32::vec_dot_ref(&w32, &a)),
            (BlockF16::vec_dot(&w16, &a), BlockF16::vec_dot_ref(&w16, &a)),
            (BlockBF16::vec_dot(&wb, &a), BlockBF16::vec_dot_ref(&wb, &a)),
        ];
        for (s, r) in pairs {
            prop_assert!((s - r).abs() <= tol, "simd {} vs ref {}", s, r);
        }
        // Rounding to f16 / bf16 and back stays within half an ulp.
        let y16 = deq(&w16);
        let yb = deq(&wb);
        prop_assert_eq!(deq_bytes(GgmlType::F16, bytemuck::cast_slice(&w16)), y16.clone());
        prop_assert_eq!(deq_bytes(GgmlType::BF16, bytemuck::cast_slice(&wb)), yb.clone());
        for ((&x, &p), &q) in w.iter().zip(&y16).zip(&yb) {
            prop_assert!((x - p).abs() <= x.abs() * 2f32.powi(-11) + 2f32.powi(-25));
            prop_assert!((x - q).abs() <= x.abs() * 2f32.powi(-8));
        }
    }
}
