//! The losses against values worked out by hand: masked cross-entropy, the
//! top-k KL term (temperatures 1 and 2), its β = 0 and β = 1 edge cases, and
//! KL = 0 for identical distributions.

use candle_core::Device;
use minnow_distill::train::loss::{logits_tensor, loss_sum, masked_ce_mean, row_kl, LossTargets, TeacherTop};

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 1e-5, "{what}: {a} vs hand-computed {b}");
}

/// Row 0: logits [0, 0, ln 2] → p = [1/4, 1/4, 1/2]; target 2 → CE = ln 2.
/// Row 1: logits [ln 3, 0, 0] → p = [3/5, 1/5, 1/5]; target 1 → CE = ln 5.
/// Row 2: masked (would be CE = ln 5 / ... anything); must not count.
fn rows() -> Vec<Vec<f32>> {
    vec![vec![0.0, 0.0, 2f32.ln()], vec![3f32.ln(), 0.0, 0.0], vec![5.0, -3.0, 0.0]]
}

#[test]
fn masked_cross_entropy_matches_hand_computation() {
    let logits = logits_tensor(&rows(), &Device::Cpu).unwrap();
    let ce = masked_ce_mean(&logits, &[2, 1, 1], &[1.0, 1.0, 0.0]).unwrap();
    close(ce, (2f64.ln() + 5f64.ln()) / 2.0, "masked CE");
    // Unmasking row 2 changes the mean: the mask is really applied.
    let all = masked_ce_mean(&logits, &[2, 1, 1], &[1.0, 1.0, 1.0]).unwrap();
    let row2 = -((-3f64).exp() / (5f64.exp() + (-3f64).exp() + 1.0)).ln();
    close(all, (2f64.ln() + 5f64.ln() + row2) / 3.0, "unmasked CE");
}

/// Teacher top-2 ids [0, 1] with log-probs [ln 0.6, ln 0.2]: renormalised
/// p = [0.75, 0.25]. Student logits [0, 0, 0]: q = 1/3 each.
fn teacher_one_row() -> TeacherTop {
    TeacherTop { k: 2, ids: vec![0, 1], logprobs: vec![0.6f32.ln(), 0.2f32.ln()], has: vec![true] }
}

#[test]
fn kl_matches_hand_computation() {
    let logits = logits_tensor(&[vec![0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
    let kl: Vec<f32> = row_kl(&logits, &teacher_one_row(), 1.0).unwrap().to_vec1().unwrap();
    close(kl[0] as f64, 0.75 * (0.75f64 * 3.0).ln() + 0.25 * (0.25f64 * 3.0).ln(), "KL at τ=1");
    // τ = 2: p ∝ [√0.6, √0.2] = [√3, 1]/(√3+1); q still uniform; times τ² = 4.
    let kl2: Vec<f32> = row_kl(&logits, &teacher_one_row(), 2.0).unwrap().to_vec1().unwrap();
    let (p0, p1) = (3f64.sqrt() / (3f64.sqrt() + 1.0), 1.0 / (3f64.sqrt() + 1.0));
    close(kl2[0] as f64, 4.0 * (p0 * (3.0 * p0).ln() + p1 * (3.0 * p1).ln()), "KL at τ=2");
}

#[test]
fn kl_of_identical_distributions_is_zero() {
    // The teacher's top-k covers the whole (3-token) vocabulary with the
    // student's own log-probabilities.
    let z = [1.3f32, -0.4, 0.2];
    let lse = z.iter().map(|v| (*v as f64).exp()).sum::<f64>().ln();
    let lp: Vec<f32> = z.iter().map(|&v| (v as f64 - lse) as f32).collect();
    let t = TeacherTop { k: 3, ids: vec![0, 1, 2], logprobs: lp, has: vec![true] };
    let logits = logits_tensor(&[z.to_vec()], &Device::Cpu).unwrap();
    for tau in [1.0, 2.5] {
        let kl: Vec<f32> = row_kl(&logits, &t, tau).unwrap().to_vec1().unwrap();
        // Equal at every temperature: both sides are softmax(z/τ).
        assert!(kl[0].abs() < 1e-6, "KL of identical distributions at τ={tau} is {}", kl[0]);
    }
}

#[test]
fn beta_edges_select_ce_or_kl() {
    // Row 0 has a teacher distribution, row 1 does not.
    let logits = logits_tensor(&[vec![0.0, 0.0, 0.0], vec![0.0, 0.0, 2f32.ln()]], &Device::Cpu).unwrap();
    let teacher = TeacherTop {
        k: 2,
        ids: vec![0, 1, 0, 0],
        logprobs: vec![0.6f32.ln(), 0.2f32.ln(), f32::NEG_INFINITY, f32::NEG_INFINITY],
        has: vec![true, false],
    };
    let tg = LossTargets { targets: vec![2, 2], mask: vec![1.0, 1.0], teacher: Some(teacher) };
    let ce0 = 3f64.ln(); // uniform over 3, any target
    let ce1 = 2f64.ln();
    let kl0 = 0.75 * (0.75f64 * 3.0).ln() + 0.25 * (0.25f64 * 3.0).ln();
    let total = |beta: f64| loss_sum(&logits, &tg, beta, 1.0).unwrap().total.to_scalar::<f32>().unwrap() as f64;
    close(total(0.0), ce0 + ce1, "β = 0 is cross-entropy only");
    // β = 1: KL where the teacher exists, CE where it does not.
    close(total(1.0), kl0 + ce1, "β = 1 is KL only (on rows with a teacher)");
    close(total(0.3), 0.7 * ce0 + 0.3 * kl0 + ce1, "β = 0.3 mixes");
    let parts = loss_sum(&logits, &tg, 0.3, 1.0).unwrap();
    close(parts.kl_sum, kl0, "reported KL sum");
    assert_eq!((parts.n_rows, parts.n_kl_rows), (2.0, 1.0));
}
