//! The trainer's fused CPU ops against candle's composite ops: the masked
//! attention softmax and the frozen-weight matmul give the same values and
//! the same input gradients, and the frozen matmul keeps no weight gradient.

use candle_core::{Device, Tensor, Var};
use minnow_distill::train::model::{frozen_matmul, masked_softmax, packed_mask, softmax_last};
use minnow_distill::train::rng::SplitMix64;

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.next_f32() * 4.0 - 2.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b): (Vec<f32>, Vec<f32>) =
        (a.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn masked_softmax_matches_softmax_of_scores_plus_mask() {
    // Two packed rows of 5 positions, 3 heads; row 0 holds two examples.
    let (b, h, t) = (2, 3, 5);
    let segment = [0, 0, 0, 1, 1, 0, 0, 0, 0, 0];
    let mask = packed_mask(&segment, b, t, &Device::Cpu).unwrap();
    let scores = Var::from_tensor(&random(&[b, h, t, t], 7)).unwrap();
    // A weight per output so the gradient is not trivially zero.
    let g = random(&[b, h, t, t], 8);

    let fused = masked_softmax(scores.as_tensor(), &mask).unwrap();
    let plain = softmax_last(&scores.as_tensor().broadcast_add(&mask).unwrap()).unwrap();
    assert!(max_diff(&fused, &plain) < 1e-6, "forward differs by {}", max_diff(&fused, &plain));
    // Masked entries are exactly zero.
    let f: Vec<f32> = fused.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(f[3], 0.0, "row 0 position 0 must not see position 3 (another example)");

    let gf = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let gp = (plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let (df, dp) = (gf.get(scores.as_tensor()).unwrap(), gp.get(scores.as_tensor()).unwrap());
    assert!(max_diff(df, dp) < 1e-6, "gradient differs by {}", max_diff(df, dp));
}

#[test]
fn frozen_matmul_matches_matmul_without_a_weight_gradient() {
    let x = Var::from_tensor(&random(&[6, 8], 1)).unwrap();
    let w = random(&[5, 8], 2);
    let frozen = frozen_matmul(x.as_tensor(), &w).unwrap();
    let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
    assert_eq!(frozen.dims(), &[6, 5]);
    assert!(max_diff(&frozen, &plain) < 1e-5);

    let gf = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let gp = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let (df, dp) = (gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap());
    assert!(max_diff(df, dp) < 1e-4, "input gradient differs by {}", max_diff(df, dp));
    // candle's matmul also stores a gradient for the (constant) weight; the
    // frozen one stores the input's alone.
    assert_eq!(gp.get_ids().count(), 2, "candle's matmul: input and weight gradients");
    assert_eq!(gf.get_ids().count(), 1, "frozen matmul: the input gradient only");
}

/// Values and gradients (for every input) of a fused op against its
/// composite reference, on random inputs of several shapes (rows that split
/// unevenly over threads included).
fn check_against_reference(
    name: &str,
    shapes: &[Vec<usize>],
    fused: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    for (k, shape) in [vec![1usize, 7], vec![5, 16], vec![37, 33]].iter().enumerate() {
        let inputs: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // `s` with its `usize::MAX` entries standing for the rows and the width.
                let dims: Vec<usize> = s
                    .iter()
                    .map(|&d| {
                        if d == usize::MAX {
                            shape[1]
                        } else if d == 0 {
                            shape[0]
                        } else {
                            d
                        }
                    })
                    .collect();
                Var::from_tensor(&random(&dims, 100 * k as u64 + i as u64)).unwrap()
            })
            .collect();
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (f, r) = (fused(&ts), reference(&ts));
        assert!(max_diff(&f, &r) < tol, "{name} {shape:?}: forward differs by {}", max_diff(&f, &r));
        let weight = random(f.dims(), 999);
        let gf = (f * &weight).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (r * &weight).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (a, b) = (gf.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
            assert!(max_diff(a, b) < tol, "{name} {shape:?}: gradient of input {i} differs by {}", max_diff(a, b));
        }
    }
}

#[test]
fn fused_rms_norm_matches_the_composite_one() {
    use minnow_distill::train::fused::{rms_norm, rms_norm_composite};
    // x [rows, width], w [width]
    check_against_reference(
        "rms_norm",
        &[vec![0, usize::MAX], vec![usize::MAX]],
        |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        |t| rms_norm_composite(&t[0], &t[1], 1e-5).unwrap(),
        1e-4,
    );
}

#[test]
fn fused_silu_mul_matches_the_composite_one() {
    use minnow_distill::train::fused::{silu_mul, silu_mul_composite};
    check_against_reference(
        "silu_mul",
        &[vec![0, usize::MAX], vec![0, usize::MAX]],
        |t| silu_mul(&t[0], &t[1]).unwrap(),
        |t| silu_mul_composite(&t[0], &t[1]).unwrap(),
        1e-5,
    );
}

#[test]
fn fused_log_softmax_matches_the_composite_one() {
    use minnow_distill::train::fused::{log_softmax_composite, log_softmax_last};
    check_against_reference(
        "log_softmax",
        &[vec![0, usize::MAX]],
        |t| log_softmax_last(&t[0]).unwrap(),
        |t| log_softmax_composite(&t[0]).unwrap(),
        1e-5,
    );
}

#[test]
fn fused_softmax_backward_matches_the_composite_one() {
    // The attention softmax without a mask goes through the fused forward and
    // backward; the composite form is exp / sum with autograd.
    check_against_reference(
        "softmax",
        &[vec![0, usize::MAX]],
        |t| softmax_last(&t[0]).unwrap(),
        |t| {
            let max = t[0].max_keepdim(1).unwrap().detach();
            let e = t[0].broadcast_sub(&max).unwrap().exp().unwrap();
            e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap()
        },
        1e-5,
    );
}

#[test]
fn fused_rope_matches_the_composite_one() {
    use minnow_distill::train::fused::rope;
    use minnow_distill::train::model::{rope_composite, rope_tables};
    // Two rows of 5 positions (the second row restarts at 0, as packing does), 3 heads.
    let (b, h, t) = (2, 3, 5);
    let pos: Vec<u32> = vec![0, 1, 2, 0, 1, 3, 4, 5, 6, 7];
    for (hd, n_rot, neox) in [(8, 8, true), (8, 8, false), (12, 8, true), (12, 8, false)] {
        let (cos, sin) = rope_tables(&pos, b, t, n_rot, 10000.0, &Device::Cpu).unwrap();
        let x = Var::from_tensor(&random(&[b, h, t, hd], 5)).unwrap();
        let fused = rope(x.as_tensor(), &cos, &sin, n_rot, neox).unwrap().expect("the CPU f32 path");
        let plain = rope_composite(x.as_tensor(), &cos, &sin, hd, n_rot, neox).unwrap();
        let what = format!("hd {hd}, n_rot {n_rot}, neox {neox}");
        assert!(max_diff(&fused, &plain) < 1e-6, "{what}: forward differs by {}", max_diff(&fused, &plain));
        let g = random(&[b, h, t, hd], 6);
        let gf = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (df, dp) = (gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap());
        assert!(max_diff(df, dp) < 1e-6, "{what}: gradient differs by {}", max_diff(df, dp));
    }
}

#[test]
fn fused_lora_linear_matches_the_composite_one_without_a_base_gradient() {
    use minnow_distill::train::fused::{lora_linear, lora_linear_composite};
    // Largest |difference| relative to the largest |value|: both forms sum
    // the same products in different orders.
    let rel = |a: &Tensor, b: &Tensor| {
        let m = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        max_diff(a, b) / m.max(1e-30)
    };
    let (inp, out, r, scale) = (33, 19, 4, 0.75);
    for (k, n) in [1usize, 5, 37].into_iter().enumerate() {
        let seed = 10 * k as u64;
        let x = Var::from_tensor(&random(&[n, inp], seed)).unwrap();
        let w = random(&[out, inp], seed + 1);
        let a = Var::from_tensor(&random(&[r, inp], seed + 2)).unwrap();
        // A non-zero B, so every term of the backward is live.
        let b = Var::from_tensor(&random(&[out, r], seed + 3)).unwrap();
        let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
        let fused = lora_linear(xt, &w, at, bt, scale).unwrap();
        let reference = lora_linear_composite(xt, &w, at, bt, scale).unwrap();
        assert_eq!(fused.dims(), &[n, out]);
        assert!(rel(&fused, &reference) < 1e-5, "n={n}: forward differs by {}", rel(&fused, &reference));
        let weight = random(&[n, out], 999);
        let gf = (fused * &weight).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &weight).unwrap().sum_all().unwrap().backward().unwrap();
        for (what, v) in [("x", xt), ("A", at), ("B", bt)] {
            let (df, dr) = (gf.get(v).unwrap(), gr.get(v).unwrap());
            assert!(rel(df, dr) < 1e-5, "n={n}: gradient of {what} differs by {}", rel(df, dr));
        }
        // No gradient for the frozen W (the composite's frozen matmul keeps none either).
        assert!(gf.get(&w).is_none(), "n={n}: the fused op keeps a gradient for W");
    }
}
