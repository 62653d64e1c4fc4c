//! Duplicate detection for `synth`: exact duplicates after case and
//! whitespace folding, near-duplicates by MinHash over word 3-shingles
//! (checked against the true Jaccard similarity), and seeds count too.

use minnow_distill::synth::{estimated_jaccard, minhash, shingles, Dedup};

const BASE: &str = "Hi, this is Jonas Schmidt from the Prague office. Please send four wireless mouses at 310 dollars each, \
                    delivered to our warehouse on Dlouha street by the twelfth of December. Thank you and best regards.";

fn true_jaccard(a: &str, b: &str) -> f64 {
    let (a, b) = (shingles(a), shingles(b));
    a.intersection(&b).count() as f64 / a.union(&b).count() as f64
}

#[test]
fn exact_duplicates_fold_case_and_whitespace() {
    let mut d = Dedup::new(0.7);
    d.add(BASE);
    let shouty = BASE.to_uppercase().replace(' ', "  \n ");
    assert_eq!(d.check(&shouty), Some("exact duplicate"));
}

#[test]
fn one_changed_word_is_a_near_duplicate_a_new_order_is_not() {
    let mut d = Dedup::new(0.6);
    d.add(BASE);
    let tweaked = BASE.replace("four", "five");
    assert!(true_jaccard(BASE, &tweaked) > 0.8);
    assert_eq!(d.check(&tweaked), Some("near duplicate"));
    let other = "Dear sales, we confirm the purchase of ten noise-cancelling headsets at 149.5 USD each. \
                 Deliver to Beirut on the 19th of January. Best, Hana Schmidt";
    assert!(true_jaccard(BASE, other) < 0.1);
    assert_eq!(d.check(other), None);
}

#[test]
fn minhash_estimates_the_jaccard_similarity() {
    // Pairs over a range of overlaps: the last k words replaced.
    let words: Vec<&str> = BASE.split_whitespace().collect();
    for k in [0, 2, 5, 10, 20, words.len()] {
        let mut other: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        let n = other.len();
        for (i, w) in other.iter_mut().enumerate().skip(n - k) {
            *w = format!("replaced{i}");
        }
        let other = other.join(" ");
        let (t, e) = (true_jaccard(BASE, &other), estimated_jaccard(&minhash(BASE), &minhash(&other)));
        // 64 hashes: standard error at most 0.0625; four of them is generous
        // yet still fails an estimator that is off.
        assert!((t - e).abs() <= 0.25, "k={k}: true {t:.3}, estimated {e:.3}");
    }
    assert_eq!(estimated_jaccard(&minhash(BASE), &minhash(BASE)), 1.0);
}

#[test]
fn seeds_count_as_already_seen() {
    let mut d = Dedup::new(0.7);
    for seed in [BASE, "Liam Okafor here. For the Osaka team we'd like 12 whiteboards at 79 USD apiece, by June 7th."] {
        d.add(seed);
    }
    assert_eq!(
        d.check("liam okafor here. for the osaka team we'd like 12 whiteboards at 79 usd apiece, by june 7th."),
        Some("exact duplicate")
    );
    assert_eq!(
        d.check("Liam Okafor here. For the Osaka team we'd like 12 whiteboards at 79 USD apiece, by June 8th."),
        Some("near duplicate")
    );
}
