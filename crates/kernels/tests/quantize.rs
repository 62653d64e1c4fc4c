//! Quantize on write (`minnow_kernels::quantize`): every producible type
//! round-trips within its format's error, bit-identically to the block
//! type's own quantizer; exact rescaling of quantized tensors; the
//! `GgufWriter` extension writes files that read back to the same values;
//! and what cannot be encoded is an error that says why.

use bytemuck::Zeroable;
use minnow_gguf::{GgufFile, GgufWriter};
use minnow_kernels::formats::kquants::*;
use minnow_kernels::formats::legacy::*;
use minnow_kernels::formats::{self, float::BlockF16};
use minnow_kernels::quantize::{can_quantize, quantize, quantize_to_vec, scale_in_place, QuantizeOnWrite};
use minnow_kernels::GgmlType;
use proptest::prelude::*;

/// Dequantizes bytes of `ty` (copied to 4-aligned storage first, as the
/// block casts require).
fn deq(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let mut storage = vec![0u32; bytes.len().div_ceil(4)];
    bytemuck::cast_slice_mut::<u32, u8>(&mut storage)[..bytes.len()].copy_from_slice(bytes);
    let n = bytes.len() / ty.type_size() * ty.block_size();
    let mut out = vec![f32::NAN; n];
    formats::dequantize(ty, &bytemuck::cast_slice::<u32, u8>(&storage)[..bytes.len()], &mut out).unwrap();
    out
}

/// Weight-like values: mostly small, a few outliers.
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
            if i % 97 == 0 {
                u * 0.8
            } else {
                u * 0.1
            }
        })
        .collect()
}

const PRODUCIBLE: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// RMS error over RMS value that each type's round trip stays under.
fn max_rel_rms_error(ty: GgmlType) -> f64 {
    match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 1e-3,
        GgmlType::BF16 => 5e-3,
        GgmlType::Q8_0 => 0.02,
        GgmlType::Q5_0 | GgmlType::Q5_1 => 0.08,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => 0.16,
        GgmlType::Q5_K => 0.08,
        GgmlType::Q6_K => 0.04,
        GgmlType::Q3_K => 0.25,
        GgmlType::Q2_K => 0.35,
        _ => unreachable!(),
    }
}

fn rel_rms_error(a: &[f32], b: &[f32]) -> f64 {
    let err: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (err / norm).sqrt()
}

#[test]
fn every_producible_type_round_trips() {
    let x = weights(256 * 8, 1);
    for ty in PRODUCIBLE {
        assert!(can_quantize(ty), "{ty}");
        let bytes = quantize_to_vec(ty, &x).unwrap();
        assert_eq!(bytes.len() as u64, ty.bytes_for(x.len() as u64).unwrap(), "{ty}");
        let e = rel_rms_error(&x, &deq(ty, &bytes));
        eprintln!("{ty}: relative RMS error {e:.4}");
        assert!(e <= max_rel_rms_error(ty), "{ty}: relative RMS error {e}");
    }
    for ty in [GgmlType::Q8_1, GgmlType::Q8_K] {
        assert!(!can_quantize(ty), "{ty}");
        let err = quantize_to_vec(ty, &x).unwrap_err().to_string();
        assert!(err.contains(&format!("cannot quantize to {ty}")), "{err}");
    }
}

/// The dispatch adds nothing: its bytes are the block type's quantizer's.
#[test]
fn dispatch_is_the_block_quantizer() {
    let x = weights(512, 2);
    let mut q8 = vec![BlockQ8_0::zeroed(); 16];
    BlockQ8_0::quantize(&x, &mut q8);
    assert_eq!(quantize_to_vec(GgmlType::Q8_0, &x).unwrap(), bytemuck::cast_slice::<_, u8>(&q8));
    let mut q4 = vec![BlockQ4_0::zeroed(); 16];
    BlockQ4_0::quantize(&x, &mut q4);
    assert_eq!(quantize_to_vec(GgmlType::Q4_0, &x).unwrap(), bytemuck::cast_slice::<_, u8>(&q4));
    let mut q4k = vec![BlockQ4K::zeroed(); 2];
    BlockQ4K::quantize(&x, &mut q4k);
    assert_eq!(quantize_to_vec(GgmlType::Q4_K, &x).unwrap(), bytemuck::cast_slice::<_, u8>(&q4k));
    let mut f16 = vec![BlockF16::zeroed(); 512];
    BlockF16::quantize(&x, &mut f16);
    assert_eq!(quantize_to_vec(GgmlType::F16, &x).unwrap(), bytemuck::cast_slice::<_, u8>(&f16));
}

#[test]
fn bad_input_is_refused() {
    let err = |r: Result<Vec<u8>, minnow_kernels::formats::LayoutError>| r.unwrap_err().to_string();
    assert!(err(quantize_to_vec(GgmlType::Q8_0, &[0.0; 33])).contains("whole number"));
    assert!(err(quantize_to_vec(GgmlType::Q4_K, &[0.0; 32])).contains("whole number"));
    let mut x = vec![0.5f32; 64];
    x[40] = f32::NAN;
    assert!(err(quantize_to_vec(GgmlType::Q8_0, &x)).contains("value 40 is NaN"));
    x[40] = f32::INFINITY;
    assert!(err(quantize_to_vec(GgmlType::Q4_0, &x)).contains("value 40 is inf"));
    // Float types keep non-finite values as they are.
    let f = quantize_to_vec(GgmlType::F32, &x).unwrap();
    assert_eq!(deq(GgmlType::F32, &f)[40], f32::INFINITY);
    let mut short = vec![0u8; 33];
    let e = quantize(GgmlType::Q8_0, &[0.0; 32], &mut short).unwrap_err().to_string();
    assert!(e.contains("34 bytes") && e.contains("33"), "{e}");
}

/// Random bytes made into valid blocks: each f16 scale field set to a
/// finite value (random bits can be NaN or infinite).
fn random_blocks(ty: GgmlType, n_blocks: usize, seed: u64, scale_fields: &[usize]) -> Vec<u8> {
    let mut bytes: Vec<u8> =
        weights(n_blocks * ty.type_size(), seed).iter().map(|v| (v * 2550.0) as i32 as u8).collect();
    for (b, block) in bytes.chunks_exact_mut(ty.type_size()).enumerate() {
        for (j, &o) in scale_fields.iter().enumerate() {
            let v = half::f16::from_f32(0.001 * (1 + (b * 7 + j * 3) % 13) as f32);
            block[o..o + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    bytes
}

#[test]
fn scaling_by_a_power_of_two_is_exact_for_every_weight_format() {
    use std::mem::offset_of;
    let cases: Vec<(GgmlType, Vec<usize>)> = vec![
        (GgmlType::Q4_0, vec![offset_of!(BlockQ4_0, d)]),
        (GgmlType::Q4_1, vec![offset_of!(BlockQ4_1, d), offset_of!(BlockQ4_1, m)]),
        (GgmlType::Q5_0, vec![offset_of!(BlockQ5_0, d)]),
        (GgmlType::Q5_1, vec![offset_of!(BlockQ5_1, d), offset_of!(BlockQ5_1, m)]),
        (GgmlType::Q8_0, vec![offset_of!(BlockQ8_0, d)]),
        (GgmlType::Q2_K, vec![offset_of!(BlockQ2K, d), offset_of!(BlockQ2K, dmin)]),
        (GgmlType::Q3_K, vec![offset_of!(BlockQ3K, d)]),
        (GgmlType::Q4_K, vec![offset_of!(BlockQ4K, d), offset_of!(BlockQ4K, dmin)]),
        (GgmlType::Q5_K, vec![offset_of!(BlockQ5K, d), offset_of!(BlockQ5K, dmin)]),
        (GgmlType::Q6_K, vec![offset_of!(BlockQ6K, d)]),
        (GgmlType::F32, vec![]),
        (GgmlType::F16, vec![]),
        (GgmlType::BF16, vec![]),
    ];
    for (ty, fields) in cases {
        let n_blocks = 4 * 256 / ty.block_size();
        let bytes = if fields.is_empty() {
            quantize_to_vec(ty, &weights(n_blocks * ty.block_size(), 3)).unwrap()
        } else {
            random_blocks(ty, n_blocks, 3, &fields)
        };
        let before = deq(ty, &bytes);
        // Up, as upcycling scales (E/k ≥ 1); scaling down can leave f16's normal range.
        for factor in [4.0f32, 1.0, 2.0, 8.0] {
            let mut scaled = bytes.clone();
            scale_in_place(ty, &mut scaled, factor).unwrap();
            let after = deq(ty, &scaled);
            for (i, (a, b)) in before.iter().zip(&after).enumerate() {
                assert_eq!(a * factor, *b, "{ty} ×{factor}: element {i}");
            }
        }
        // Other factors: one f16 (or bf16) rounding of each scale. With a
        // min (x = d·s·q − dmin·m) the two rounded terms may nearly cancel,
        // so the bound is relative to the tensor's largest value.
        let mut scaled = bytes.clone();
        scale_in_place(ty, &mut scaled, 1.5).unwrap();
        let rel = if ty == GgmlType::BF16 { 1.0 / 256.0 } else { 1.0 / 2048.0 };
        let max = before.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in before.iter().zip(deq(ty, &scaled)) {
            assert!((a * 1.5 - b).abs() <= 2.0 * rel * 1.5 * max, "{ty} ×1.5: {a} → {b}");
        }
    }
}

#[test]
fn scaling_refuses_overflow_and_bad_input() {
    let mut q8 = quantize_to_vec(GgmlType::Q8_0, &[30000.0; 32]).unwrap();
    let e = scale_in_place(GgmlType::Q8_0, &mut q8, 1e6).unwrap_err().to_string();
    assert!(e.contains("overflows"), "{e}");
    let e = scale_in_place(GgmlType::Q8_0, &mut q8, f32::NAN).unwrap_err().to_string();
    assert!(e.contains("not finite"), "{e}");
    let e = scale_in_place(GgmlType::Q8_0, &mut [0u8; 35], 2.0).unwrap_err().to_string();
    assert!(e.contains("whole"), "{e}");
    let e = scale_in_place(GgmlType::Q8_K, &mut vec![0u8; 292], 2.0).unwrap_err().to_string();
    assert!(e.contains("not a weight format minnow can rescale"), "{e}");
}

/// Quantize on write: a file with tensors quantized by the writer extension
/// reads back to the values the quantizer produces, with the shapes given.
#[test]
fn writer_quantizes_on_write() {
    let x = weights(512 * 3, 4);
    let mut w = GgufWriter::new();
    for (name, ty) in [("q8", GgmlType::Q8_0), ("q4", GgmlType::Q4_0), ("q4k", GgmlType::Q4_K), ("f16", GgmlType::F16)]
    {
        w.add_tensor_quantized(name, &[512, 3], ty, &x).unwrap();
    }
    let file = GgufFile::from_bytes(w.to_bytes()).unwrap();
    for (name, ty) in [("q8", GgmlType::Q8_0), ("q4", GgmlType::Q4_0), ("q4k", GgmlType::Q4_K), ("f16", GgmlType::F16)]
    {
        let t = file.tensor(name).unwrap();
        assert_eq!((t.ty, t.dims.clone()), (ty, vec![512, 3]));
        let data = file.tensor_data(t);
        assert_eq!(data, &quantize_to_vec(ty, &x).unwrap()[..], "{name}");
        assert!(rel_rms_error(&x, &deq(ty, data)) <= max_rel_rms_error(ty), "{name}");
    }

    let err = |r: Result<(), minnow_gguf::GgufError>| r.unwrap_err().to_string();
    let mut w = GgufWriter::new();
    let e = err(w.add_tensor_quantized("a", &[512, 2], GgmlType::Q8_0, &x));
    assert!(e.contains("'a'") && e.contains("1536 values"), "{e}");
    let e = err(w.add_tensor_quantized("b", &[96, 16], GgmlType::Q4_K, &x));
    assert!(e.contains("'b'") && e.contains("block size 256"), "{e}");
    let e = err(w.add_tensor_quantized("c", &[512, 3], GgmlType::Q8_K, &x));
    assert!(e.contains("'c'") && e.contains("cannot quantize to Q8_K"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Requantizing what a format produced changes little: dequantize →
    /// quantize to the same type stays within the format's step of the
    /// first dequantization (what upcycling with noise does to kept types).
    #[test]
    fn requantizing_is_stable(seed in any::<u64>(), ty_index in 3usize..9) {
        let ty = PRODUCIBLE[ty_index];
        let x = weights(256 * 2, seed);
        let once = deq(ty, &quantize_to_vec(ty, &x).unwrap());
        let twice = deq(ty, &quantize_to_vec(ty, &once).unwrap());
        prop_assert!(rel_rms_error(&once, &twice) <= max_rel_rms_error(ty));
    }
}

/// With an importance per column, every weighted type puts its error where
/// it matters least: on rows whose first eight columns carry almost all the
/// importance, the weighted quantizer's importance-weighted squared error is
/// below the plain quantizer's (summed over the rows), and its bytes decode
/// to values within the type's usual error. Types without a weighted
/// quantizer give the plain bytes.
#[test]
fn an_importance_matrix_moves_the_error_to_unimportant_columns() {
    use minnow_kernels::quantize::{is_weighted, quantize_weighted_to_vec};
    let row = 512;
    let x = weights(row * 16, 7);
    let imp: Vec<f32> = (0..row).map(|c| if c % 32 < 8 { 100.0 } else { 0.01 }).collect();
    let weighted_err = |y: &[f32]| -> f64 {
        x.iter().zip(y).enumerate().map(|(i, (a, b))| imp[i % row] as f64 * ((a - b) as f64).powi(2)).sum()
    };
    for ty in PRODUCIBLE {
        let plain = quantize_to_vec(ty, &x).unwrap();
        let with = quantize_weighted_to_vec(ty, &x, &imp).unwrap();
        if !is_weighted(ty) {
            assert_eq!(plain, with, "{ty}");
            continue;
        }
        let (ep, ew) = (weighted_err(&deq(ty, &plain)), weighted_err(&deq(ty, &with)));
        eprintln!("{ty}: weighted error {ew:.3e} vs plain {ep:.3e}");
        assert!(ew < 0.9 * ep, "{ty}: weighted error {ew} not below plain {ep}");
        let e = rel_rms_error(&x, &deq(ty, &with));
        assert!(e <= 1.5 * max_rel_rms_error(ty), "{ty}: relative RMS error {e}");
    }
}
