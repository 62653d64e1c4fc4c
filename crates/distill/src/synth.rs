//! `minnow distill synth`: the teacher writes new inputs for a task from a
//! description and a few seed inputs (self-instruct style), and only varied,
//! plausible ones are kept.
//!
//! Each request shows the teacher the task and a few seeds picked at random
//! and asks for one new input. A candidate is dropped when it is
//! - outside the length bounds,
//! - a refusal ("I'm sorry, ..."),
//! - in another script than the seeds (a share-of-Latin-letters heuristic),
//! - an exact duplicate (after case and whitespace folding) of a seed or of
//!   a kept input,
//! - a near-duplicate: MinHash over word 3-shingles estimates its Jaccard
//!   similarity to every seed and kept input; at `max_similarity` or more it
//!   goes.
//!
//! Seeds often share a fixed instruction ("Extract the order ... Message:")
//! around the varying part; that common prefix is taken off before the
//! teacher sees them and before comparing (it would make everything look
//! alike), and put back on every kept input.
//!
//! Kept inputs go to a [`RecordLog`] as `{"id", "prompt"}`, so a killed run
//! continues like `label` does.

use crate::data::{last_user_text, read_inputs, InputRecord, RecordLog};
use crate::teacher::{GenSettings, Job, Teacher};
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use minnow_engine::chat::ChatMessage;
use minnow_kernels::mix::{fnv1a, SplitMix64};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

pub struct Filters {
    pub min_chars: usize,
    pub max_chars: usize,
    /// Estimated Jaccard similarity (word 3-shingles) at which a candidate
    /// counts as a near-duplicate.
    pub max_similarity: f64,
}

pub struct SynthConfig {
    pub task: String,
    pub seeds: PathBuf,
    pub output: PathBuf,
    /// Kept inputs to end with.
    pub count: usize,
    pub seeds_per_request: usize,
    pub settings: GenSettings,
    pub filters: Filters,
    pub progress: bool,
}

#[derive(Debug, Default)]
pub struct SynthSummary {
    pub already: usize,
    pub kept: usize,
    pub requests: usize,
    /// Why candidates were dropped, with counts.
    pub dropped: BTreeMap<&'static str, usize>,
    pub secs: f64,
}

/// Rounds in a row that keep nothing before giving up.
const MAX_BARREN_ROUNDS: usize = 3;

pub fn synth(cfg: &SynthConfig, teacher: &dyn Teacher) -> Result<SynthSummary> {
    if cfg.count == 0 {
        bail!("--count must be at least 1");
    }
    if cfg.seeds_per_request == 0 {
        bail!("--seeds-per-request must be at least 1");
    }
    let seeds: Vec<String> = read_inputs(&cfg.seeds)?.iter().map(|i| last_user_text(&i.messages).to_string()).collect();
    if seeds.is_empty() {
        bail!("{}: no seed inputs", cfg.seeds.display());
    }
    let prefix = common_prefix(&seeds);
    let bodies: Vec<&str> = seeds.iter().map(|s| &s[prefix.len()..]).collect();
    let (mut log, recovered) = RecordLog::<InputRecord>::open(&cfg.output)?;
    let mut dedup = Dedup::new(cfg.filters.max_similarity);
    for b in &bodies {
        dedup.add(b);
    }
    for r in &recovered.records {
        let p = r.prompt.as_deref().unwrap_or("");
        dedup.add(p.strip_prefix(prefix.as_str()).unwrap_or(p));
    }
    let latin = mean(bodies.iter().map(|b| latin_share(b)));
    let mut sum = SynthSummary { already: log.len(), ..Default::default() };
    let bar = bar(cfg.progress, cfg.count, log.len());
    let t0 = Instant::now();
    let (mut round, mut barren) = (0u64, 0);
    while log.len() < cfg.count {
        let want = cfg.count - log.len();
        // Over-ask: some candidates will be dropped.
        let n = (want + want / 2).clamp(2, 64);
        let jobs: Vec<Job> = (0..n)
            .map(|i| {
                // Per job, distinct seeds and a distinct sampling seed: the
                // start depends on what is done, so a rerun does not redo
                // a previous run's (dropped) candidates in the same order.
                let key = (log.len() as u64) << 32 | round << 16 | i as u64;
                Job { index: i, messages: request(&cfg.task, &bodies, cfg.seeds_per_request, key) }
            })
            .collect();
        let kept_before = log.len();
        let base_seed = cfg.settings.seed.wrapping_add((log.len() as u64) << 20 | round << 8);
        let settings = GenSettings { seed: base_seed, ..cfg.settings.clone() };
        sum.requests += n;
        teacher.answer_all(jobs, &settings, &mut |_, r| {
            let Ok(a) = r else {
                *sum.dropped.entry("teacher error").or_default() += 1;
                return Ok(());
            };
            if log.len() >= cfg.count {
                return Ok(());
            }
            let body = clean(&a.text);
            if let Some(why) = reject(&body, &cfg.filters, latin, &mut dedup) {
                *sum.dropped.entry(why).or_default() += 1;
                return Ok(());
            }
            let rec = InputRecord {
                id: Some(format!("synth-{:06}", log.len() + 1)),
                prompt: Some(format!("{prefix}{body}")),
                messages: None,
            };
            log.append(&rec)?;
            dedup.add(&body);
            sum.kept += 1;
            bar.inc(1);
            Ok(())
        })?;
        round += 1;
        barren = if log.len() == kept_before { barren + 1 } else { 0 };
        if barren >= MAX_BARREN_ROUNDS {
            bail!(
                "{} rounds in a row kept no new input ({:?} dropped so far); raise --temperature, loosen --max-similarity or give more varied seeds",
                MAX_BARREN_ROUNDS,
                sum.dropped
            );
        }
    }
    bar.finish_and_clear();
    sum.secs = t0.elapsed().as_secs_f64();
    Ok(sum)
}

pub fn describe(s: &SynthSummary, output: &std::path::Path) -> String {
    format!(
        "kept {} new inputs in {:.1} s from {} requests ({} were already there; dropped: {:?}); in {}",
        s.kept,
        s.secs,
        s.requests,
        s.already,
        s.dropped,
        output.display()
    )
}

/// The request for one new input.
fn request(task: &str, bodies: &[&str], k: usize, key: u64) -> Vec<ChatMessage> {
    let mut rng = SplitMix64::new(key ^ 0x9e37_79b9_7f4a_7c15);
    let mut picked: Vec<usize> = Vec::new();
    let k = k.min(bodies.len());
    while picked.len() < k {
        let i = (rng.next_u64() % bodies.len() as u64) as usize;
        if !picked.contains(&i) {
            picked.push(i);
        }
    }
    let mut text = format!("You write new inputs for this task: {task}\n\nExamples of inputs:\n");
    for (n, &i) in picked.iter().enumerate() {
        text += &format!("\nExample {}:\n{}\n", n + 1, bodies[i].trim());
    }
    text += "\nWrite one new input of the same kind that differs from the examples: other names, items, numbers, places and wording. Reply with the new input only, no title, no explanation.";
    vec![ChatMessage::new("user", text)]
}

/// Takes off what a model tends to wrap an answer in: quotes, a label such
/// as "New input:", surrounding whitespace.
fn clean(text: &str) -> String {
    let mut t = text.trim();
    for label in ["New input:", "Input:", "Example:", "Message:"] {
        if t.len() >= label.len() && t[..label.len()].eq_ignore_ascii_case(label) {
            t = t[label.len()..].trim();
        }
    }
    let t = t.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(t);
    t.trim().to_string()
}

/// Why a candidate is dropped, if it is.
fn reject(body: &str, f: &Filters, seed_latin: f64, dedup: &mut Dedup) -> Option<&'static str> {
    let chars = body.chars().count();
    if chars < f.min_chars {
        return Some("too short");
    }
    if chars > f.max_chars {
        return Some("too long");
    }
    if is_refusal(body) {
        return Some("refusal");
    }
    if (latin_share(body) - seed_latin).abs() > 0.3 {
        return Some("other language");
    }
    dedup.check(body)
}

fn is_refusal(t: &str) -> bool {
    let head: String = t.chars().take(80).collect::<String>().to_lowercase();
    ["i'm sorry", "i am sorry", "i cannot", "i can't", "i can not", "as an ai", "i'm unable", "i am unable", "i won't"]
        .iter()
        .any(|p| head.contains(p))
}

/// Latin letters among all letters (1.0 for text without letters).
fn latin_share(t: &str) -> f64 {
    let (mut letters, mut latin) = (0usize, 0usize);
    for c in t.chars().filter(|c| c.is_alphabetic()) {
        letters += 1;
        // Basic Latin, Latin-1 Supplement and Latin Extended-A/B.
        latin += (c.is_ascii_alphabetic() || ('\u{c0}'..='\u{24f}').contains(&c)) as usize;
    }
    if letters == 0 {
        1.0
    } else {
        latin as f64 / letters as f64
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        1.0
    } else {
        s / n as f64
    }
}

/// The longest prefix every seed starts with, cut back to a word boundary
/// (just after whitespace); empty when there is one seed or it is short.
fn common_prefix(seeds: &[String]) -> String {
    if seeds.len() < 2 {
        return String::new();
    }
    let first = &seeds[0];
    let mut len = first.len();
    for s in &seeds[1..] {
        len = len.min(first.bytes().zip(s.bytes()).take_while(|(a, b)| a == b).count());
    }
    while !first.is_char_boundary(len) {
        len -= 1;
    }
    let cut =
        first[..len].rfind(char::is_whitespace).map_or(0, |i| i + first[i..].chars().next().map_or(1, char::len_utf8));
    // A few shared words are not a template.
    if cut < 20 {
        String::new()
    } else {
        first[..cut].to_string()
    }
}

// ---------------------------------------------------------------------------
// Duplicate detection.

/// Hash functions per MinHash signature: the Jaccard estimate's standard
/// error is about sqrt(J(1-J)/64) ≤ 0.0625.
pub const MINHASH_HASHES: usize = 64;

/// Exact and near-duplicate detection over a growing set of texts.
pub struct Dedup {
    exact: HashSet<String>,
    signatures: Vec<[u64; MINHASH_HASHES]>,
    max_similarity: f64,
}

impl Dedup {
    pub fn new(max_similarity: f64) -> Dedup {
        Dedup { exact: HashSet::new(), signatures: Vec::new(), max_similarity }
    }

    /// Why `text` duplicates something already added, if it does.
    pub fn check(&self, text: &str) -> Option<&'static str> {
        if self.exact.contains(&normalize(text)) {
            return Some("exact duplicate");
        }
        let sig = minhash(text);
        if self.signatures.iter().any(|s| estimated_jaccard(s, &sig) >= self.max_similarity) {
            return Some("near duplicate");
        }
        None
    }

    pub fn add(&mut self, text: &str) {
        self.exact.insert(normalize(text));
        self.signatures.push(minhash(text));
    }
}

/// Lower case, words separated by single spaces.
pub fn normalize(t: &str) -> String {
    t.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// Word 3-shingles of the normalized text, with punctuation off the word
/// ends; shorter texts give their whole word list as one shingle.
pub fn shingles(t: &str) -> HashSet<String> {
    let words: Vec<String> = normalize(t)
        .split(' ')
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_string())
        .filter(|w| !w.is_empty())
        .collect();
    if words.len() < 3 {
        return HashSet::from([words.join(" ")]);
    }
    words.windows(3).map(|w| w.join(" ")).collect()
}

/// The MinHash signature: per hash function `i`, the least hash of any
/// shingle (FNV-1a of the shingle, then mixed with a per-`i` constant).
pub fn minhash(t: &str) -> [u64; MINHASH_HASHES] {
    let mut sig = [u64::MAX; MINHASH_HASHES];
    for sh in shingles(t) {
        let base = fnv1a(sh.as_bytes());
        for (i, slot) in sig.iter_mut().enumerate() {
            let h = SplitMix64::new(base ^ (i as u64).wrapping_mul(0xa076_1d64_78bd_642f)).next_u64();
            *slot = (*slot).min(h);
        }
    }
    sig
}

/// Share of hash functions whose minimum agrees: an unbiased estimate of
/// the Jaccard similarity of the two shingle sets.
pub fn estimated_jaccard(a: &[u64; MINHASH_HASHES], b: &[u64; MINHASH_HASHES]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / MINHASH_HASHES as f64
}

fn bar(progress: bool, count: usize, done: usize) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(count as u64);
    if let Ok(s) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} kept {per_sec} ETA {eta}")
    {
        b.set_style(s);
    }
    b.set_position(done as u64);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_cut_at_a_word_boundary() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let p = common_prefix(&s(&[
            "Extract the order as JSON. Message: Anna buys",
            "Extract the order as JSON. Message: Ali sells",
        ]));
        assert_eq!(p, "Extract the order as JSON. Message: ");
        assert_eq!(common_prefix(&s(&["short one", "short two"])), "");
        assert_eq!(common_prefix(&s(&["only seed here and long enough to matter"])), "");
    }

    #[test]
    fn cleaning_and_refusals() {
        assert_eq!(clean("  New input: \"Hi, 3 chairs to Oslo\"\n"), "Hi, 3 chairs to Oslo");
        assert!(is_refusal("I'm sorry, but I can't help with that."));
        assert!(!is_refusal("Sorry for the delay: please send 3 chairs to Oslo."));
        assert!(latin_share("Привет, мир") < 0.1 && latin_share("Hello, Zoë") > 0.99);
    }
}
