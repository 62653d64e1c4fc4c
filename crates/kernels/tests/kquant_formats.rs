//! Tests of the k-quant block formats (Q2_K..Q6_K weights, Q8_K activations).
//!
//! Three kinds of evidence, because each alone can be fooled:
//! - hand-built blocks with known values, so the *layout* (which bits of
//!   which byte make which element) is checked against ggml's definition,
//!   not only against our own other functions;
//! - property tests that the scalar reference dot product agrees with a
//!   plain f64 dot of the dequantized operands (so `vec_dot_ref` and
//!   `dequantize` describe the same format);
//! - property tests that the SIMD `vec_dot` agrees with `vec_dot_ref`.

use minnow_kernels::formats::kquants::*;
use minnow_kernels::formats::{self, ActBlock, BlockFormat};
use minnow_kernels::GgmlType;
use proptest::prelude::*;

const ONE: u16 = 0x3C00; // f16 1.0

fn deq<B: BlockFormat>(b: &[B]) -> Vec<f32> {
    let mut out = vec![0.0; b.len() * B::BLOCK];
    B::dequantize(b, &mut out);
    out
}

fn quantize_acts(x: &[f32]) -> Vec<BlockQ8K> {
    let mut a = vec![bytemuck::Zeroable::zeroed(); x.len() / 256];
    BlockQ8K::quantize(x, &mut a);
    a
}

fn deq_acts(a: &[BlockQ8K]) -> Vec<f32> {
    let mut out = vec![0.0; a.len() * 256];
    BlockQ8K::dequantize(a, &mut out);
    out
}

/// Dequantizes through the byte-level dispatch and checks it matches the
/// typed call.
fn deq_via_bytes<B: BlockFormat>(ty: GgmlType, b: &[B]) -> Vec<f32> {
    let mut out = vec![0.0; b.len() * 256];
    formats::dequantize(ty, bytemuck::cast_slice(b), &mut out).unwrap();
    assert_eq!(out, deq(b), "byte-level dispatch disagrees with {ty}");
    out
}

fn zeroed<B: bytemuck::Zeroable>() -> B {
    B::zeroed()
}

// ---------------------------------------------------------------- layout

#[test]
fn block_sizes_match_ggml() {
    use std::mem::size_of;
    assert_eq!(size_of::<BlockQ2K>(), GgmlType::Q2_K.type_size());
    assert_eq!(size_of::<BlockQ3K>(), GgmlType::Q3_K.type_size());
    assert_eq!(size_of::<BlockQ4K>(), GgmlType::Q4_K.type_size());
    assert_eq!(size_of::<BlockQ5K>(), GgmlType::Q5_K.type_size());
    assert_eq!(size_of::<BlockQ6K>(), GgmlType::Q6_K.type_size());
    assert_eq!(size_of::<BlockQ8K>(), GgmlType::Q8_K.type_size());
    assert!(formats::is_supported_weight(GgmlType::Q4_K));
    assert!(formats::is_supported_weight(GgmlType::Q6_K));
}

#[test]
fn q4k_uniform_block() {
    // d=1, dmin=0, all eight scales 1 (and mins 0), all nibbles 3.
    let mut b: BlockQ4K = zeroed();
    b.d = ONE;
    b.scales = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1];
    b.qs = [0x33; 128];
    assert!(deq_via_bytes(GgmlType::Q4_K, &[b]).iter().all(|&v| v == 3.0));
}

#[test]
fn q4k_scale_min_unpacking() {
    // Distinct 6-bit scales and mins, packed by hand from ggml's layout:
    // bytes 0..4 = sc[0..4] | (sc[4..8] >> 4) << 6,
    // bytes 4..8 = mn[0..4] | (mn[4..8] >> 4) << 6,
    // bytes 8..12 = (sc[4..8] & 15) | (mn[4..8] & 15) << 4.
    let sc = [10, 20, 30, 40, 50, 60, 33, 17];
    let mn = [1, 2, 3, 4, 63, 48, 16, 5];
    let mut b: BlockQ4K = zeroed();
    b.d = ONE;
    b.dmin = ONE;
    b.scales = [202, 212, 158, 104, 193, 194, 67, 4, 242, 12, 1, 81];
    b.qs = [0x21; 128]; // even sub-blocks (low nibbles) q=1, odd q=2
    let y = deq_via_bytes(GgmlType::Q4_K, &[b]);
    for (i, &v) in y.iter().enumerate() {
        let j = i / 32;
        let q = if j % 2 == 0 { 1.0 } else { 2.0 };
        assert_eq!(v, sc[j] as f32 * q - mn[j] as f32, "element {i}");
    }
}

#[test]
fn q4k_nibble_positions() {
    // qs[32c + l] low nibble → element 64c + l, high nibble → 64c + 32 + l.
    let mut b: BlockQ4K = zeroed();
    b.d = ONE;
    b.scales = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1];
    b.qs[64 + 7] = 0x5A;
    b.qs[127] = 0xF0;
    let y = deq(&[b]);
    for (i, &v) in y.iter().enumerate() {
        let want = match i {
            135 => 10.0, // 128 + 7, low nibble of qs[71]
            167 => 5.0,  // 128 + 32 + 7, high nibble
            255 => 15.0, // high nibble of the last byte
            _ => 0.0,
        };
        assert_eq!(v, want, "element {i}");
    }
}

#[test]
fn q5k_fifth_bit_positions() {
    // Fifth bit of element 32j + l is bit j of qh[l].
    let mut b: BlockQ5K = zeroed();
    b.d = ONE;
    b.scales = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1];
    b.qh[3] = 0b0000_0101; // elements 3 and 64+3
    b.qh[10] = 0x80; // element 7*32 + 10
    b.qs[0] = 0x74; // element 0 ← 4, element 32 ← 7
    let y = deq_via_bytes(GgmlType::Q5_K, &[b]);
    for (i, &v) in y.iter().enumerate() {
        let want = match i {
            0 => 4.0,
            32 => 7.0,
            3 | 67 | 234 => 16.0,
            _ => 0.0,
        };
        assert_eq!(v, want, "element {i}");
    }
    // With mins: same packing as Q4_K.
    b.dmin = ONE;
    b.scales = [202, 212, 158, 104, 193, 194, 67, 4, 242, 12, 1, 81];
    let mn = [1, 2, 3, 4, 63, 48, 16, 5];
    let sc = [10, 20, 30, 40, 50, 60, 33, 17];
    let y = deq(&[b]);
    assert_eq!(y[1], -(mn[0] as f32));
    assert_eq!(y[32], sc[1] as f32 * 7.0 - mn[1] as f32);
    assert_eq!(y[234], sc[7] as f32 * 16.0 - mn[7] as f32);
}

#[test]
fn q6k_layout() {
    let mut b: BlockQ6K = zeroed();
    b.d = ONE;
    b.scales = std::array::from_fn(|j| j as i8 - 8);
    // All quants 0 → every weight is -32 * scale.
    let y = deq_via_bytes(GgmlType::Q6_K, &[b]);
    for (i, &v) in y.iter().enumerate() {
        assert_eq!(v, -32.0 * ((i / 16) as f32 - 8.0), "element {i}");
    }
    // Spot bits: ql[l] low/high nibble → elements l / 64+l, ql[32+l] →
    // 32+l / 96+l, qh[l] bit pairs 0..4 → elements l, 32+l, 64+l, 96+l;
    // the second half (elements 128..) uses ql[64..], qh[32..].
    b.scales = [1; 16];
    b.ql[5] = 0x93;
    b.qh[7] = 0b11_10_01_00;
    b.ql[32 + 3] = 0x5A;
    b.ql[64] = 0x01;
    b.qh[32 + 1] = 0b11_00_00_00;
    let y = deq(&[b]);
    for (i, &v) in y.iter().enumerate() {
        let q = match i {
            5 => 3,
            69 => 9,
            39 => 16,
            71 => 32,
            103 => 48,
            35 => 10,
            99 => 5,
            128 => 1,
            225 => 48, // 128 + 96 + 1
            _ => 0,
        };
        assert_eq!(v, (q - 32) as f32, "element {i}");
    }
}

#[test]
fn q3k_layout() {
    // Scale j = 4j + 1 (stored biased by 32), packed by hand: low nibble of
    // scale j in byte j%8 (low nibble for j < 8, high for j ≥ 8), top two
    // bits (j/4 here) at bits 2*(j/4) of byte 8 + j%4.
    let mut b: BlockQ3K = zeroed();
    b.d = ONE;
    b.scales = [0x11, 0x55, 0x99, 0xDD, 0x11, 0x55, 0x99, 0xDD, 0xE4, 0xE4, 0xE4, 0xE4];
    // qs = 0, hmask = 0 → q = 0 - 4 everywhere.
    let y = deq_via_bytes(GgmlType::Q3_K, &[b]);
    for (i, &v) in y.iter().enumerate() {
        let sc = 4 * (i / 16) as i32 + 1 - 32;
        assert_eq!(v, (-4 * sc) as f32, "element {i}");
    }
    // Bit positions, with all third bits set (q = low bits) except one.
    b.scales = [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0xAA, 0xAA, 0xAA, 0xAA]; // all 33 → 1
    b.hmask = [0xFF; 32];
    b.qs[32 + 5] = 0b11_10_01_00; // elements 128+5, +32, +64, +96 ← 0, 1, 2, 3
    b.hmask[9] = !(1 << 5); // bit 4n+k = 5: n=1, k=1 → element 128+32+9 loses its +4
    let y = deq(&[b]);
    for (i, &v) in y.iter().enumerate() {
        let q = match i {
            165 => 1,
            197 => 2,
            229 => 3,
            169 => -4,
            _ => 0,
        };
        assert_eq!(v, q as f32, "element {i}");
    }
}

#[test]
fn q2k_layout() {
    let mut b: BlockQ2K = zeroed();
    b.d = ONE;
    b.dmin = ONE;
    b.scales = std::array::from_fn(|j| j as u8 | ((15 - j as u8) << 4));
    let y = deq_via_bytes(GgmlType::Q2_K, &[b]);
    for (i, &v) in y.iter().enumerate() {
        assert_eq!(v, -(15.0 - (i / 16) as f32), "element {i}");
    }
    b.qs = [0xFF; 64];
    let y = deq(&[b]);
    for (i, &v) in y.iter().enumerate() {
        let j = (i / 16) as f32;
        assert_eq!(v, 3.0 * j - (15.0 - j), "element {i}");
    }
    b.scales = [0x01; 16];
    b.qs = [0; 64];
    b.qs[32 + 5] = 0b11_10_01_00;
    let y = deq(&[b]);
    for (i, &v) in y.iter().enumerate() {
        let q = match i {
            165 => 1,
            197 => 2,
            229 => 3,
            _ => 0,
        };
        assert_eq!(v, q as f32, "element {i}");
    }
}

#[test]
fn q8k_known_values() {
    // Largest magnitude is x[255] = 155: ggml's iscale = -127/max maps it
    // to -127 (whatever its sign), so d is negative here.
    let x: Vec<f32> = (0..256).map(|i| i as f32 - 100.0).collect();
    let a = quantize_acts(&x);
    let iscale = -127.0f32 / 155.0;
    assert_eq!(a[0].d, 1.0 / iscale);
    assert_eq!(a[0].qs[255], -127);
    assert_eq!(a[0].qs[100], 0);
    assert_eq!(a[0].qs[0], (iscale * -100.0f32).round() as i8);
    for j in 0..16 {
        let s: i32 = a[0].qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
        assert_eq!(a[0].bsums[j] as i32, s);
    }
    // Largest magnitude negative: it still maps to -127, d flips sign.
    let a = quantize_acts(&x.iter().map(|v| -v).collect::<Vec<_>>());
    assert_eq!(a[0].qs[255], -127);
    assert_eq!(a[0].d, -155.0 / -127.0);
    // Ties round to even, as ggml's nearest_int (max = -127 makes iscale 1).
    let mut x = [0.0f32; 256];
    x[..4].copy_from_slice(&[-127.0, 2.5, -0.5, 3.5]);
    let a = quantize_acts(&x);
    assert_eq!(a[0].d, 1.0);
    assert_eq!(a[0].qs[..4], [-127, 2, 0, 4]);
    // All zero: d = 0, quants 0.
    let a = quantize_acts(&[0.0; 256]);
    assert_eq!(a[0].d, 0.0);
    assert!(a[0].qs.iter().all(|&q| q == 0) && a[0].bsums.iter().all(|&s| s == 0));
}

#[test]
fn q4k_quantize_exact_grid() {
    // Values on a 4-bit grid with a zero min round-trip up to the f16
    // rounding of d (relative 2^-11, times the 6-bit scale).
    let x: Vec<f32> = (0..512).map(|i| ((i * 7) % 16) as f32 * 0.5).collect();
    let mut b = vec![zeroed::<BlockQ4K>(); 2];
    BlockQ4K::quantize(&x, &mut b);
    let y = deq(&b);
    for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
        assert!((a - b).abs() <= 7.5 * 1e-3, "element {i}: {a} vs {b}");
    }
}

#[test]
fn simd_path_present() {
    // Not an assertion: the SIMD-vs-reference properties below are vacuous
    // on a CPU without AVX2+FMA, so say which path ran.
    #[cfg(target_arch = "x86_64")]
    eprintln!("avx2+fma: {}", is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
}

// ---------------------------------------------------------------- properties

/// Random bytes as `n` blocks of `B`.
fn blocks_from_bytes<B: bytemuck::Pod>(bytes: &[u8]) -> Vec<B> {
    let mut v = vec![B::zeroed(); bytes.len() / std::mem::size_of::<B>()];
    bytemuck::cast_slice_mut::<B, u8>(&mut v).copy_from_slice(bytes);
    v
}

fn f16_bits(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}

/// `(n_blocks, raw bytes, per-block (d, dmin), activations)`.
fn case(size: usize) -> impl Strategy<Value = (Vec<u8>, Vec<(f32, f32)>, Vec<f32>)> {
    (1usize..4).prop_flat_map(move |n| {
        (
            proptest::collection::vec(any::<u8>(), n * size),
            proptest::collection::vec((-0.05f32..0.05, 0.0f32..0.02), n),
            proptest::collection::vec(-4.0f32..4.0, n * 256),
        )
    })
}

/// (a) SIMD agrees with the reference; (b) the reference agrees with the
/// f64 dot of the dequantized weights and activations.
fn check_dot<B: BlockFormat<Dot = BlockQ8K>>(w: &[B], x: &[f32]) -> Result<(), TestCaseError> {
    let a = quantize_acts(x);
    let wf = deq(w);
    let af = deq_acts(&a);
    let exact: f64 = wf.iter().zip(&af).map(|(&p, &q)| p as f64 * q as f64).sum();
    let mag: f64 = wf.iter().zip(&af).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
    let r = B::vec_dot_ref(w, &a) as f64;
    let s = B::vec_dot(w, &a) as f64;
    let tol = 1e-4 * mag + 1e-6;
    prop_assert!((r - exact).abs() <= tol, "{}: ref {r} vs dequantized dot {exact} (Σ|p| {mag})", B::TYPE);
    prop_assert!((s - r).abs() <= tol, "{}: simd {s} vs ref {r} (Σ|p| {mag})", B::TYPE);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn q4k_dot((bytes, ds, x) in case(144)) {
        let mut w: Vec<BlockQ4K> = blocks_from_bytes(&bytes);
        for (b, &(d, m)) in w.iter_mut().zip(&ds) { b.d = f16_bits(d); b.dmin = f16_bits(m); }
        check_dot(&w, &x)?;
    }

    #[test]
    fn q6k_dot((bytes, ds, x) in case(210)) {
        let mut w: Vec<BlockQ6K> = blocks_from_bytes(&bytes);
        for (b, &(d, _)) in w.iter_mut().zip(&ds) { b.d = f16_bits(d); }
        check_dot(&w, &x)?;
    }

    #[test]
    fn q5k_dot((bytes, ds, x) in case(176)) {
        let mut w: Vec<BlockQ5K> = blocks_from_bytes(&bytes);
        for (b, &(d, m)) in w.iter_mut().zip(&ds) { b.d = f16_bits(d); b.dmin = f16_bits(m); }
        check_dot(&w, &x)?;
    }

    #[test]
    fn q3k_dot((bytes, ds, x) in case(110)) {
        let mut w: Vec<BlockQ3K> = blocks_from_bytes(&bytes);
        for (b, &(d, _)) in w.iter_mut().zip(&ds) { b.d = f16_bits(d); }
        check_dot(&w, &x)?;
    }

    #[test]
    fn q2k_dot((bytes, ds, x) in case(84)) {
        let mut w: Vec<BlockQ2K> = blocks_from_bytes(&bytes);
        for (b, &(d, m)) in w.iter_mut().zip(&ds) { b.d = f16_bits(d); b.dmin = f16_bits(m); }
        check_dot(&w, &x)?;
    }

    /// Raw Q8_K blocks (any quant, including -128, which quantize never
    /// makes) so the SIMD kernels' saturation-free claims are exercised at
    /// the extremes; bsums kept consistent with the quants.
    #[test]
    fn simd_matches_ref_on_extreme_acts(
        wbytes in proptest::collection::vec(any::<u8>(), 210 * 2),
        qs in proptest::collection::vec(prop_oneof![Just(-128i8), Just(127i8), any::<i8>()], 512),
    ) {
        let mut a = vec![zeroed::<BlockQ8K>(); 2];
        for (k, b) in a.iter_mut().enumerate() {
            b.d = 0.01;
            b.qs.copy_from_slice(&qs[256 * k..256 * k + 256]);
            for j in 0..16 {
                b.bsums[j] = b.qs[16 * j..16 * j + 16].iter().map(|&q| q as i16).sum();
            }
        }
        fn go<B: BlockFormat<Dot = BlockQ8K>>(w: &[B], a: &[BlockQ8K]) -> Result<(), TestCaseError> {
            let (r, s) = (B::vec_dot_ref(w, a), B::vec_dot(w, a));
            let mag: f32 = deq(w).iter().zip(deq_acts(a)).map(|(p, q)| (p * q).abs()).sum();
            prop_assert!((r - s).abs() <= 1e-5 * mag, "{}: {s} vs {r} (Σ|p| {mag})", B::TYPE);
            Ok(())
        }
        fn blocks<B: bytemuck::Pod>(bytes: &[u8], set_d: impl Fn(&mut B)) -> Vec<B> {
            let n = bytes.len() / std::mem::size_of::<B>();
            let mut w: Vec<B> = blocks_from_bytes(&bytes[..n * std::mem::size_of::<B>()]);
            w.truncate(2);
            w.iter_mut().for_each(set_d);
            w
        }
        let one = |b: &mut u16| *b = ONE;
        go(&blocks::<BlockQ2K>(&wbytes, |b| { one(&mut b.d); one(&mut b.dmin) }), &a)?;
        go(&blocks::<BlockQ3K>(&wbytes, |b| one(&mut b.d)), &a)?;
        go(&blocks::<BlockQ4K>(&wbytes, |b| { one(&mut b.d); one(&mut b.dmin) }), &a)?;
        go(&blocks::<BlockQ5K>(&wbytes, |b| { one(&mut b.d); one(&mut b.dmin) }), &a)?;
        go(&blocks::<BlockQ6K>(&wbytes, |b| one(&mut b.d)), &a)?;
    }

    /// (c) Q8_K: every element within half a step, quants in range, bsums
    /// are the sums of the quants.
    #[test]
    fn q8k_roundtrip(x in proptest::collection::vec(-100.0f32..100.0, 256 * 2)) {
        let a = quantize_acts(&x);
        let y = deq_acts(&a);
        for (k, b) in a.iter().enumerate() {
            let amax = x[256 * k..256 * k + 256].iter().fold(0.0f32, |m, v| m.max(v.abs()));
            prop_assert!((b.d.abs() - amax / 127.0).abs() <= 1e-6 * amax);
            prop_assert!(b.qs.iter().all(|&q| q != -128));
            for j in 0..16 {
                let s: i32 = b.qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
                prop_assert_eq!(b.bsums[j] as i32, s);
            }
            for i in 256 * k..256 * k + 256 {
                prop_assert!((x[i] - y[i]).abs() <= 0.5001 * b.d.abs(), "element {i}: {} vs {}", x[i], y[i]);
            }
        }
    }

    /// (c) Q4_K quantize: sub-blocks of different spreads and offsets (as
    /// real weights have); the error is bounded by about one quantization
    /// step of the block, and the RMS error by a fraction of it.
    #[test]
    fn q4k_quantize_roundtrip(
        spreads in proptest::collection::vec((0.01f32..1.0, -1.0f32..1.0), 16),
        u in proptest::collection::vec(-1.0f32..1.0, 512),
    ) {
        let x: Vec<f32> = u.iter().enumerate().map(|(i, &v)| {
            let (s, o) = spreads[i / 32];
            o * s + v * s
        }).collect();
        let mut b = vec![zeroed::<BlockQ4K>(); 2];
        BlockQ4K::quantize(&x, &mut b);
        let y = deq_via_bytes(GgmlType::Q4_K, &b);
        for k in 0..2 {
            let xs = &x[256 * k..256 * k + 256];
            let ys = &y[256 * k..256 * k + 256];
            // The coarsest sub-block's step; 6-bit scales make finer
            // sub-blocks no worse than this.
            let step = (0..8).map(|j| {
                let s = &xs[32 * j..32 * j + 32];
                let lo = s.iter().copied().fold(0.0f32, f32::min);
                let hi = s.iter().copied().fold(f32::MIN, f32::max);
                (hi - lo) / 15.0
            }).fold(0.0f32, f32::max);
            let mut se = 0.0f32;
            for (i, (&a, &q)) in xs.iter().zip(ys).enumerate() {
                prop_assert!((a - q).abs() <= step, "block {k} element {i}: {a} vs {q} (step {step})");
                se += (a - q) * (a - q);
            }
            let rms = (se / 256.0).sqrt();
            prop_assert!(rms <= 0.35 * step, "block {k}: rms {rms} vs step {step}");
        }
    }

    /// (d) Q5_K and Q6_K quantize: the same kind of data; each element is
    /// within one step of the coarsest sub-block, the RMS error a fraction
    /// of it, and the more bits the smaller the error (Q6_K < Q5_K < Q4_K).
    #[test]
    fn q5k_q6k_quantize_roundtrip(
        spreads in proptest::collection::vec((0.01f32..1.0, -1.0f32..1.0), 8),
        u in proptest::collection::vec(-1.0f32..1.0, 256),
    ) {
        let x: Vec<f32> = u.iter().enumerate().map(|(i, &v)| {
            let (s, o) = spreads[i / 32];
            o * s + v * s
        }).collect();
        let rms = |y: &[f32]| (x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / 256.0).sqrt();
        let mut b4 = vec![zeroed::<BlockQ4K>(); 1];
        BlockQ4K::quantize(&x, &mut b4);
        let mut b5 = vec![zeroed::<BlockQ5K>(); 1];
        BlockQ5K::quantize(&x, &mut b5);
        let mut b6 = vec![zeroed::<BlockQ6K>(); 1];
        BlockQ6K::quantize(&x, &mut b6);
        let (y4, y5, y6) =
            (deq_via_bytes(GgmlType::Q4_K, &b4), deq_via_bytes(GgmlType::Q5_K, &b5), deq_via_bytes(GgmlType::Q6_K, &b6));
        // Q5_K: a 31-level step of the widest sub-block.
        let step5 = (0..8).map(|j| {
            let s = &x[32 * j..32 * j + 32];
            let lo = s.iter().copied().fold(0.0f32, f32::min);
            let hi = s.iter().copied().fold(f32::MIN, f32::max);
            (hi - lo) / 31.0
        }).fold(0.0f32, f32::max);
        // Q6_K: symmetric, 32 levels each side of the largest magnitude.
        let step6 = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 31.0;
        for i in 0..256 {
            prop_assert!((x[i] - y5[i]).abs() <= step5, "Q5_K element {i}: {} vs {} (step {step5})", x[i], y5[i]);
            prop_assert!((x[i] - y6[i]).abs() <= step6, "Q6_K element {i}: {} vs {} (step {step6})", x[i], y6[i]);
        }
        prop_assert!(rms(&y5) <= 0.35 * step5, "Q5_K rms {} vs step {step5}", rms(&y5));
        prop_assert!(rms(&y6) <= 0.35 * step6, "Q6_K rms {} vs step {step6}", rms(&y6));
        prop_assert!(rms(&y6) <= rms(&y5) * 1.05 && rms(&y5) <= rms(&y4) * 1.05,
            "more bits, less error: Q4_K {} Q5_K {} Q6_K {}", rms(&y4), rms(&y5), rms(&y6));
    }

    /// (e) Q2_K and Q3_K quantize: the same kind of data; each element is
    /// within one step of the coarsest sub-block (Q2_K: 3 levels over the
    /// 16-element sub-block's range; Q3_K: symmetric, 4 levels on the long
    /// side of the block's largest magnitude), the RMS error a fraction of
    /// it.
    #[test]
    fn q2k_q3k_quantize_roundtrip(
        spreads in proptest::collection::vec((0.01f32..1.0, -1.0f32..1.0), 16),
        u in proptest::collection::vec(-1.0f32..1.0, 256),
    ) {
        let x: Vec<f32> = u.iter().enumerate().map(|(i, &v)| {
            let (s, o) = spreads[i / 16];
            o * s + v * s
        }).collect();
        let rms = |y: &[f32]| (x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / 256.0).sqrt();
        let mut b2 = vec![zeroed::<BlockQ2K>(); 1];
        BlockQ2K::quantize(&x, &mut b2);
        let mut b3 = vec![zeroed::<BlockQ3K>(); 1];
        BlockQ3K::quantize(&x, &mut b3);
        let (y2, y3) = (deq_via_bytes(GgmlType::Q2_K, &b2), deq_via_bytes(GgmlType::Q3_K, &b3));
        let step2 = (0..16).map(|j| {
            let s = &x[16 * j..16 * j + 16];
            let lo = s.iter().copied().fold(0.0f32, f32::min);
            let hi = s.iter().copied().fold(f32::MIN, f32::max);
            (hi - lo) / 3.0
        }).fold(0.0f32, f32::max);
        let step3 = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 3.0;
        for i in 0..256 {
            prop_assert!((x[i] - y2[i]).abs() <= step2, "Q2_K element {i}: {} vs {} (step {step2})", x[i], y2[i]);
            prop_assert!((x[i] - y3[i]).abs() <= step3, "Q3_K element {i}: {} vs {} (step {step3})", x[i], y3[i]);
        }
        prop_assert!(rms(&y2) <= 0.35 * step2, "Q2_K rms {} vs step {step2}", rms(&y2));
        prop_assert!(rms(&y3) <= 0.35 * step3, "Q3_K rms {} vs step {step3}", rms(&y3));
    }
}
