//! Behaviour of the token sampler through its public API: greedy decoding,
//! seeding, statistical correctness, each filter, the penalties, parameter
//! validation, and robustness against arbitrary logits and parameters.

use minnow_engine::sampler::{Sampler, SamplingParams};
use proptest::prelude::*;

/// Temperature 1, no truncation, no penalties: sampling from plain softmax.
fn plain(seed: u64) -> SamplingParams {
    SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed, ..SamplingParams::greedy() }
}

/// Reference softmax in f64 with the standard library's `exp`.
fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
    let e: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / t).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn ids(d: &[(u32, f32)]) -> Vec<u32> {
    d.iter().map(|&(t, _)| t).collect()
}

fn assert_probs_close(d: &[(u32, f32)], want: &[(u32, f64)]) {
    assert_eq!(ids(d), want.iter().map(|&(t, _)| t).collect::<Vec<_>>());
    for (&(_, p), &(_, w)) in d.iter().zip(want) {
        assert!((p as f64 - w).abs() < 1e-6, "{d:?} vs {want:?}");
    }
}

fn entropy(d: &[(u32, f32)]) -> f64 {
    d.iter().filter(|&&(_, p)| p > 0.0).map(|&(_, p)| -(p as f64) * (p as f64).ln()).sum()
}

/// The logits of a distribution with the given probabilities.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

// ---------------------------------------------------------------- greedy

#[test]
fn greedy_picks_argmax() {
    let mut s = Sampler::new(SamplingParams::greedy());
    assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9]), 1);
    assert_eq!(s.sample(&[-5.0, -4.0, -6.0]), 1);
    assert_eq!(s.distribution(&[0.1, 3.0, -2.0]), vec![(1, 1.0)]);
}

#[test]
fn greedy_ties_go_to_lowest_id() {
    let mut s = Sampler::new(SamplingParams::greedy());
    assert_eq!(s.sample(&[1.0, 7.0, 3.0, 7.0, 7.0]), 1);
    assert_eq!(s.sample(&[2.0, 2.0]), 0);
}

#[test]
fn greedy_ignores_nan_and_falls_back_deterministically() {
    let mut s = Sampler::new(SamplingParams::greedy());
    assert_eq!(s.sample(&[f32::NAN, 1.0, f32::NAN, 2.0]), 3);
    assert_eq!(s.sample(&[f32::NAN, f32::NAN]), 0);
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 5]), 0);
    assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::INFINITY, f32::INFINITY]), 1);
}

#[test]
fn greedy_is_independent_of_seed() {
    let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 * 0.01).collect();
    let want = Sampler::new(SamplingParams::greedy()).sample(&logits);
    for seed in 0..20 {
        let mut s = Sampler::new(SamplingParams { seed, ..SamplingParams::greedy() });
        assert_eq!(s.sample(&logits), want);
    }
}

#[test]
fn top_k_one_is_greedy() {
    let mut state = 12345u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) % 64) as f32 * 0.25 // coarse values: plenty of ties
    };
    for round in 0..200 {
        let logits: Vec<f32> = (0..50).map(|_| next()).collect();
        let mut greedy = Sampler::new(SamplingParams::greedy());
        let mut k1 = Sampler::new(SamplingParams { top_k: 1, seed: round, ..SamplingParams::default() });
        let g = greedy.sample(&logits);
        assert_eq!(k1.sample(&logits), g);
        assert_eq!(k1.distribution(&logits), vec![(g, 1.0)]);
    }
}

// ---------------------------------------------------------------- seeding

fn run(params: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
    let mut s = Sampler::new(params);
    (0..n).map(|_| s.sample(logits)).collect()
}

#[test]
fn same_seed_gives_same_sequence() {
    let logits: Vec<f32> = (0..500).map(|i| (i % 17) as f32 * 0.1).collect();
    let params = SamplingParams {
        seed: 42,
        top_k: 100,
        top_p: 0.9,
        repeat_penalty: 1.1,
        presence_penalty: 0.2,
        ..SamplingParams::default()
    };
    let a = run(params.clone(), &logits, 200);
    let b = run(params, &logits, 200);
    assert_eq!(a, b);
    // A real draw, not a constant.
    assert!(a.iter().any(|&t| t != a[0]));
}

#[test]
fn different_seeds_give_different_sequences() {
    let flat = vec![0.0f32; 1000];
    let seqs: Vec<Vec<u32>> = (0..10).map(|seed| run(plain(seed), &flat, 200)).collect();
    for i in 0..seqs.len() {
        for j in i + 1..seqs.len() {
            assert_ne!(seqs[i], seqs[j], "seeds {i} and {j}");
        }
    }
}

#[test]
fn reset_and_clone_replay_the_stream() {
    let logits = vec![0.0f32; 64];
    let mut s = Sampler::new(plain(9));
    let first: Vec<u32> = (0..20).map(|_| s.sample(&logits)).collect();
    let mut fork = s.clone();
    let next: Vec<u32> = (0..20).map(|_| s.sample(&logits)).collect();
    assert_eq!((0..20).map(|_| fork.sample(&logits)).collect::<Vec<_>>(), next);
    s.reset();
    assert_eq!((0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>(), first);
}

/// Pins the exact output stream for a fixed seed. The sampler promises the
/// same tokens on every platform and version; if this fails after a change,
/// that change altered seeded outputs for every user. The values were
/// reproduced by an independent re-implementation of the documented pipeline
/// (xoshiro256** seeded by splitmix64, softmax at T, min-p, top-p over the
/// descending order, inverse-CDF draw in that order).
#[test]
fn seeded_stream_is_pinned() {
    let logits: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
    let params = SamplingParams { seed: 1234, ..SamplingParams::default() };
    let got = run(params, &logits, 16);
    let pinned: Vec<u32> = PINNED.to_vec();
    assert_eq!(got, pinned, "seeded output stream changed");
}

const PINNED: [u32; 16] = [21, 2, 23, 7, 21, 24, 20, 4, 3, 6, 20, 5, 4, 6, 22, 2];

// ---------------------------------------------------------------- statistics

/// Empirical frequencies over 20k draws match softmax, by a chi-square test.
/// The seed is fixed so the test is deterministic; the bound is the 99.9%
/// quantile, so an honest sampler passes it for almost every seed (and a
/// biased one, e.g. off by one bucket or not exponentiating, fails by far).
#[test]
fn frequencies_match_softmax() {
    let logits = [1.0f32, 0.5, 0.0, -0.5, -1.0, 2.0, 0.25, -2.0];
    let want = softmax(&logits, 1.0);
    let n = 20_000;
    for seed in [3u64, 77, 2024] {
        let mut s = Sampler::new(plain(seed));
        let mut counts = [0usize; 8];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        let chi2: f64 = counts
            .iter()
            .zip(&want)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        // chi-square, 7 degrees of freedom, p = 0.001.
        assert!(chi2 < 24.32, "seed {seed}: chi2 = {chi2}, counts {counts:?}");
    }
}

#[test]
fn frequencies_match_distribution_after_filters() {
    // The draw follows `distribution` also when filters are active.
    let logits: Vec<f32> = (0..20).map(|i| (i as f32 * 0.7).cos() * 1.5).collect();
    let params =
        SamplingParams { temperature: 0.7, top_k: 12, top_p: 0.9, min_p: 0.05, seed: 5, ..SamplingParams::greedy() };
    let dist = Sampler::new(params.clone()).distribution(&logits);
    let mut s = Sampler::new(params);
    let n = 20_000;
    let mut counts = [0usize; 20];
    for _ in 0..n {
        counts[s.sample(&logits) as usize] += 1;
    }
    let kept: Vec<u32> = ids(&dist);
    for (t, &c) in counts.iter().enumerate() {
        if !kept.contains(&(t as u32)) {
            assert_eq!(c, 0, "token {t} was filtered out but drawn");
        }
    }
    let chi2: f64 = dist
        .iter()
        .map(|&(t, p)| {
            let e = p as f64 * n as f64;
            (counts[t as usize] as f64 - e).powi(2) / e
        })
        .sum();
    let df = dist.len() - 1;
    assert!(df >= 2, "{dist:?}");
    // Generous bound: 99.9% quantile is below 3 * df + 12 for df <= 20.
    assert!(chi2 < (3 * df + 12) as f64, "chi2 = {chi2}, df = {df}");
}

#[test]
fn distribution_is_softmax_without_filters() {
    let logits = [0.3f32, -1.2, 2.2, 0.0, 1.1];
    let want = softmax(&logits, 1.0);
    let d = Sampler::new(plain(0)).distribution(&logits);
    let mut want_sorted: Vec<(u32, f64)> = want.iter().enumerate().map(|(i, &p)| (i as u32, p)).collect();
    want_sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
    assert_probs_close(&d, &want_sorted);
    let total: f32 = d.iter().map(|&(_, p)| p).sum();
    assert!((total - 1.0).abs() < 1e-6);
}

// ---------------------------------------------------------------- filters

#[test]
fn top_k_keeps_exactly_the_k_best() {
    let logits = [3.0f32, 1.0, 2.0, 0.0, -1.0];
    let params = SamplingParams { top_k: 2, ..plain(0) };
    let d = Sampler::new(params).distribution(&logits);
    let sm = softmax(&[3.0, 2.0], 1.0);
    assert_probs_close(&d, &[(0, sm[0]), (2, sm[1])]);
}

#[test]
fn top_k_ties_keep_lowest_ids() {
    let params = SamplingParams { top_k: 2, ..plain(0) };
    let d = Sampler::new(params).distribution(&[0.0, 1.0, 1.0, 1.0]);
    assert_probs_close(&d, &[(1, 0.5), (2, 0.5)]);
}

#[test]
fn top_k_larger_than_vocab_is_off() {
    let logits = [0.5f32, 0.1, -0.3];
    let params = SamplingParams { top_k: 10, ..plain(0) };
    assert_eq!(Sampler::new(params).distribution(&logits).len(), 3);
}

const PROBS: [f64; 5] = [0.05, 0.5, 0.15, 0.3, 0.0001];

fn with(top_p: f32, min_p: f32) -> Vec<(u32, f32)> {
    let params = SamplingParams { top_p, min_p, ..plain(0) };
    Sampler::new(params).distribution(&logits_of(&PROBS))
}

fn renorm(keep: &[u32]) -> Vec<(u32, f64)> {
    let s: f64 = keep.iter().map(|&t| PROBS[t as usize]).sum();
    keep.iter().map(|&t| (t, PROBS[t as usize] / s)).collect()
}

#[test]
fn top_p_keeps_smallest_prefix_reaching_p() {
    // Sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05), 4 (0.0001). Cumulative:
    // 0.5, 0.8, 0.95, 1.0, ~1.0 (a little over, PROBS sums to 1.0001).
    assert_probs_close(&with(0.4, 0.0), &renorm(&[1]));
    assert_probs_close(&with(0.75, 0.0), &renorm(&[1, 3]));
    assert_probs_close(&with(0.85, 0.0), &renorm(&[1, 3, 2]));
    assert_probs_close(&with(0.97, 0.0), &renorm(&[1, 3, 2, 0]));
    assert_probs_close(&with(1.0, 0.0), &renorm(&[1, 3, 2, 0, 4]));
}

#[test]
fn top_p_keeps_at_least_one_token() {
    assert_probs_close(&with(1e-9, 0.0), &[(1, 1.0)]);
    // Clamped, not trusted: 0 and negative mean "the top token only".
    assert_probs_close(&with(0.0, 0.0), &[(1, 1.0)]);
    assert_probs_close(&with(-3.0, 0.0), &[(1, 1.0)]);
}

#[test]
fn top_p_on_a_large_vocab_matches_a_full_sort() {
    // Exercises the progressive partial sort on a 150k vocabulary.
    let n = 150_000;
    let mut state = 7u64;
    let logits: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64 * 12.0) as f32
        })
        .collect();
    let sm = softmax(&logits, 1.0);
    for &p in &[0.3f32, 0.9, 0.99] {
        let d = Sampler::new(SamplingParams { top_p: p, ..plain(0) }).distribution(&logits);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| sm[b].total_cmp(&sm[a]).then(a.cmp(&b)));
        let mut cum = 0.0;
        let mut keep = n;
        for (i, &t) in order.iter().enumerate() {
            cum += sm[t];
            if cum >= p as f64 {
                keep = i + 1;
                break;
            }
        }
        assert_eq!(d.len(), keep, "top_p {p}");
        let want: Vec<u32> = order[..keep].iter().map(|&t| t as u32).collect();
        assert_eq!(ids(&d), want, "top_p {p}");
    }
}

#[test]
fn min_p_drops_tokens_below_fraction_of_max() {
    // max prob 0.5: min_p 0.2 → threshold 0.1 drops tokens 0 and 4.
    assert_probs_close(&with(1.0, 0.2), &renorm(&[1, 3, 2]));
    // threshold 0.25 keeps 1 and 3.
    assert_probs_close(&with(1.0, 0.5), &renorm(&[1, 3]));
    // threshold 0.0005 only drops token 4.
    assert_probs_close(&with(1.0, 0.001), &renorm(&[1, 3, 2, 0]));
    // min_p 1 keeps the top token (and would keep exact ties).
    assert_probs_close(&with(1.0, 1.0), &[(1, 1.0)]);
}

#[test]
fn top_p_and_min_p_combine_as_the_shorter_prefix() {
    assert_probs_close(&with(0.97, 0.2), &renorm(&[1, 3, 2]));
    assert_probs_close(&with(0.75, 0.2), &renorm(&[1, 3]));
}

#[test]
fn top_k_then_top_p_uses_probabilities_after_top_k() {
    // After top-k 3, tokens 1, 3, 2 renormalise to 0.526, 0.316, 0.158: the
    // cumulative is 0.842 after two. Over the whole vocabulary it would be
    // 0.80, so top-p 0.82 tells the two readings apart.
    let dist =
        |top_p: f32| Sampler::new(SamplingParams { top_k: 3, top_p, ..plain(0) }).distribution(&logits_of(&PROBS));
    assert_probs_close(&dist(0.82), &renorm(&[1, 3]));
    assert_probs_close(&dist(0.85), &renorm(&[1, 3, 2]));
}

#[test]
fn defaults_are_llama_cpp_like_and_filter() {
    let p = SamplingParams::default();
    assert_eq!(
        (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.repeat_last_n),
        (0.8, 40, 0.95, 0.05, 1.0, 64)
    );
    assert_eq!((p.presence_penalty, p.frequency_penalty, p.seed), (0.0, 0.0, 0));
    assert!(p.validate().is_ok());
    assert!(SamplingParams::greedy().validate().is_ok());
    let logits: Vec<f32> = (0..1000).map(|i| -(i as f32) * 0.01).collect();
    let d = Sampler::new(p).distribution(&logits);
    assert!(d.len() <= 40 && !d.is_empty());
}

#[test]
fn serde_fills_missing_fields_with_defaults() {
    let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0, "seed": 7}"#).unwrap();
    assert_eq!(p, SamplingParams { temperature: 0.0, seed: 7, ..SamplingParams::default() });
    let round: SamplingParams = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(round, p);
}

// ---------------------------------------------------------------- temperature

#[test]
fn temperature_scales_entropy() {
    let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0, -3.0];
    let h = |t: f32| entropy(&Sampler::new(SamplingParams { temperature: t, ..plain(0) }).distribution(&logits));
    let hs: Vec<f64> = [0.1, 0.5, 1.0, 2.0, 10.0].iter().map(|&t| h(t)).collect();
    for w in hs.windows(2) {
        assert!(w[0] < w[1], "entropy must grow with temperature: {hs:?}");
    }
    // Limits: very low → nearly one-hot; very high → nearly uniform.
    assert!(h(0.01) < 1e-6);
    assert!((h(1e4) - (6f64).ln()).abs() < 1e-3);
    // Matches softmax(logits / T).
    let d = Sampler::new(SamplingParams { temperature: 0.5, ..plain(0) }).distribution(&logits);
    let sm = softmax(&logits, 0.5);
    for (t, p) in d {
        assert!((p as f64 - sm[t as usize]).abs() < 1e-6);
    }
}

// ---------------------------------------------------------------- penalties

#[test]
fn repeat_penalty_divides_positive_and_multiplies_negative() {
    let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, ..SamplingParams::greedy() });
    for t in [0, 1, 2, 0] {
        s.accept(t);
    }
    let mut l = [4.0f32, -3.0, 0.0, 1.5];
    s.penalize(&mut l);
    // Token 0 seen twice but penalised once; token 3 unseen.
    assert_eq!(l, [2.0, -6.0, 0.0, 1.5]);
}

#[test]
fn repeat_penalty_changes_greedy_choice() {
    let mut s = Sampler::new(SamplingParams { repeat_penalty: 1.5, ..SamplingParams::greedy() });
    let logits = [3.0f32, 2.5, 0.0];
    assert_eq!(s.sample(&logits), 0); // sample records 0
    assert_eq!(s.sample(&logits), 1); // 3.0 / 1.5 = 2.0 < 2.5
    assert_eq!(s.sample(&logits), 0); // 2.0 vs 2.5 / 1.5
}

#[test]
fn repeat_penalty_only_counts_last_n() {
    let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, repeat_last_n: 2, ..SamplingParams::greedy() });
    for t in [0, 1, 2] {
        s.accept(t);
    }
    let mut l = [4.0f32, 4.0, 4.0, 4.0];
    s.penalize(&mut l);
    assert_eq!(l, [4.0, 2.0, 2.0, 4.0]);

    // repeat_last_n = 0: nothing is repeat-penalised.
    let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, repeat_last_n: 0, ..SamplingParams::greedy() });
    s.accept(0);
    let mut l = [4.0f32];
    s.penalize(&mut l);
    assert_eq!(l, [4.0]);
}

#[test]
fn presence_and_frequency_penalties_subtract() {
    let mut s = Sampler::new(SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: 0.25,
        // The window does not limit presence/frequency: whole history counts.
        repeat_last_n: 1,
        ..SamplingParams::greedy()
    });
    for t in [3, 1, 3, 3, 0] {
        s.accept(t);
    }
    let mut l = [1.0f32, 1.0, 1.0, 1.0, 1.0];
    s.penalize(&mut l);
    assert_eq!(l, [1.0 - 0.75, 1.0 - 0.75, 1.0, 1.0 - 0.5 - 0.75, 1.0]);
}

#[test]
fn negative_presence_penalty_encourages() {
    let mut s = Sampler::new(SamplingParams { presence_penalty: -1.0, ..SamplingParams::greedy() });
    s.accept(2);
    assert_eq!(s.sample(&[1.0, 1.5, 1.0]), 2);
}

#[test]
fn penalties_ignore_out_of_vocab_history() {
    let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, presence_penalty: 1.0, ..SamplingParams::greedy() });
    s.accept(1_000_000);
    s.accept(u32::MAX);
    let mut l = [1.0f32, 2.0];
    s.penalize(&mut l);
    assert_eq!(l, [1.0, 2.0]);
    assert_eq!(s.sample(&l), 1);
}

#[test]
fn sample_does_not_modify_callers_logits_and_distribution_does_not_record() {
    let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, ..plain(1) });
    let logits = vec![1.0f32, 2.0, 3.0];
    let copy = logits.clone();
    let before = s.distribution(&logits);
    assert_eq!(s.distribution(&logits), before);
    let t = s.sample(&logits);
    assert_eq!(logits, copy);
    // The sampled token is now penalised.
    let after = s.distribution(&logits);
    let p = |d: &[(u32, f32)]| d.iter().find(|e| e.0 == t).unwrap().1;
    assert!(p(&after) < p(&before));
}

// ---------------------------------------------------------------- validate

#[test]
fn validate_names_each_bad_parameter() {
    let ok = SamplingParams::default();
    let cases: Vec<(SamplingParams, &str)> = vec![
        (SamplingParams { temperature: -0.1, ..ok.clone() }, "temperature"),
        (SamplingParams { temperature: f32::NAN, ..ok.clone() }, "temperature"),
        (SamplingParams { temperature: f32::INFINITY, ..ok.clone() }, "temperature"),
        (SamplingParams { top_p: 0.0, ..ok.clone() }, "top_p"),
        (SamplingParams { top_p: 1.01, ..ok.clone() }, "top_p"),
        (SamplingParams { top_p: f32::NAN, ..ok.clone() }, "top_p"),
        (SamplingParams { min_p: -0.01, ..ok.clone() }, "min_p"),
        (SamplingParams { min_p: 1.5, ..ok.clone() }, "min_p"),
        (SamplingParams { min_p: f32::NAN, ..ok.clone() }, "min_p"),
        (SamplingParams { repeat_penalty: 0.0, ..ok.clone() }, "repeat_penalty"),
        (SamplingParams { repeat_penalty: -1.0, ..ok.clone() }, "repeat_penalty"),
        (SamplingParams { repeat_penalty: f32::INFINITY, ..ok.clone() }, "repeat_penalty"),
        (SamplingParams { presence_penalty: f32::NAN, ..ok.clone() }, "presence_penalty"),
        (SamplingParams { frequency_penalty: f32::NEG_INFINITY, ..ok.clone() }, "frequency_penalty"),
    ];
    for (p, name) in cases {
        let err = p.validate().expect_err(name);
        assert!(err.to_string().contains(name) && err.param == name, "{err:?} should name {name}");
    }
    // Boundaries that are valid.
    for p in [
        SamplingParams { temperature: 0.0, ..ok.clone() },
        SamplingParams { top_p: 1.0, ..ok.clone() },
        SamplingParams { min_p: 0.0, ..ok.clone() },
        SamplingParams { min_p: 1.0, ..ok.clone() },
        SamplingParams { presence_penalty: -2.0, frequency_penalty: 2.0, ..ok.clone() },
        SamplingParams { top_k: 0, repeat_last_n: 0, ..ok.clone() },
    ] {
        assert!(p.validate().is_ok(), "{p:?}");
    }
}

// ---------------------------------------------------------------- robustness

#[test]
fn non_finite_logits_do_not_panic() {
    let mut s = Sampler::new(plain(3));
    // +inf tokens share all the mass.
    let l = [0.0, f32::INFINITY, f32::NAN, f32::INFINITY, 100.0];
    assert_probs_close(&s.distribution(&l), &[(1, 0.5), (3, 0.5)]);
    for _ in 0..50 {
        let t = s.sample(&l);
        assert!(t == 1 || t == 3);
    }
    // NaN is -inf.
    let l = [f32::NAN, 0.0, f32::NAN];
    assert_eq!(s.distribution(&l), vec![(1, 1.0)]);
    // Nothing viable: raw argmax, else token 0.
    assert_eq!(s.sample(&[f32::NAN; 7]), 0);
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 7]), 0);
    assert_eq!(s.distribution(&[f32::NEG_INFINITY; 7]), vec![(0, 1.0)]);
    // Extreme but finite logits.
    let l = [f32::MAX, -f32::MAX, f32::MIN_POSITIVE];
    assert_eq!(s.distribution(&l), vec![(0, 1.0)]);
    // Empty vocab: no id is valid; 0 rather than a panic.
    assert_eq!(s.sample(&[]), 0);
    assert!(s.distribution(&[]).is_empty());
}

#[test]
fn penalties_that_kill_every_token_fall_back_to_raw_argmax() {
    let mut s = Sampler::new(SamplingParams { frequency_penalty: f32::MAX, ..plain(0) });
    for _ in 0..4 {
        s.accept(0);
        s.accept(1);
    }
    assert_eq!(s.sample(&[1.0, 2.0]), 1);
}

#[test]
fn large_vocab_with_default_params() {
    let n = 151_936;
    let logits: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.001).sin() * 8.0).collect();
    let mut s = Sampler::new(SamplingParams { seed: 11, repeat_penalty: 1.1, ..SamplingParams::default() });
    for _ in 0..100 {
        assert!((s.sample(&logits) as usize) < n);
    }
    // No truncation at all: the whole vocab survives, sorted.
    let d = Sampler::new(plain(0)).distribution(&logits);
    assert_eq!(d.len(), n);
    assert!(d.windows(2).all(|w| w[0].1 >= w[1].1));
}

fn arb_logit() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -30.0f32..30.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => prop::num::f32::ANY,
    ]
}

fn arb_f32_param() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -0.5f32..2.0,
        1 => Just(0.0f32),
        1 => Just(1.0f32),
        1 => prop::num::f32::ANY,
    ]
}

prop_compose! {
    fn arb_params()(
        temperature in arb_f32_param(),
        top_k in prop_oneof![Just(0usize), 0usize..20, Just(usize::MAX)],
        top_p in arb_f32_param(),
        min_p in arb_f32_param(),
        repeat_penalty in arb_f32_param(),
        repeat_last_n in prop_oneof![0usize..8, Just(usize::MAX)],
        presence_penalty in arb_f32_param(),
        frequency_penalty in arb_f32_param(),
        seed in any::<u64>(),
    ) -> SamplingParams {
        SamplingParams {
            temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
            presence_penalty, frequency_penalty, seed,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_panics_and_returns_in_vocab_ids(
        logits in prop::collection::vec(arb_logit(), 1..200),
        params in arb_params(),
        history in prop::collection::vec(0u32..250, 0..20),
    ) {
        let mut s = Sampler::new(params);
        for t in history {
            s.accept(t);
        }
        for _ in 0..4 {
            let d = s.distribution(&logits);
            prop_assert!(!d.is_empty());
            prop_assert!(d.iter().all(|&(t, p)| (t as usize) < logits.len() && p.is_finite() && p > 0.0));
            prop_assert!(d.windows(2).all(|w| w[0].1 >= w[1].1));
            let total: f32 = d.iter().map(|&(_, p)| p).sum();
            prop_assert!((total - 1.0).abs() < 1e-3, "total {}", total);
            let t = s.sample(&logits);
            prop_assert!((t as usize) < logits.len());
            // The sampled token is one the distribution allows.
            prop_assert!(d.iter().any(|&(id, _)| id == t), "{} not in {:?}", t, d);
        }
    }

    #[test]
    fn determinism_under_random_inputs(
        logits in prop::collection::vec(arb_logit(), 1..100),
        params in arb_params(),
    ) {
        let a = run(params.clone(), &logits, 10);
        let b = run(params, &logits, 10);
        prop_assert_eq!(a, b);
    }
}
