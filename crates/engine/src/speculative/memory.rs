//! Earlier answers as drafts: what prompt lookup copies when the prompt
//! itself has nothing to copy.
//!
//! Requests of one kind get answers of one shape. An extraction answer
//! `{"customer": "Anna Haddad", "product": "paper shredder", ...}` quotes its
//! message for the values, but its skeleton — `", "product": "` — is nowhere
//! in the prompt; it is in every earlier answer to the same instruction.
//! [`LookupMemory`] keeps recent (prompt, answer) pairs; a new sequence takes
//! as references the answers whose prompts share the longest prefix with its
//! own (same instruction, same template), and [`consensus_draft`] proposes
//! what follows in all of them at once:
//!
//! - each reference is *aligned* with the output so far by a pointer that
//!   only moves forward: the next draft comes from the earliest place at or
//!   after the pointer where the reference's bytes end like the output does
//!   (a longest-match search would jump to whichever field happens to share
//!   the most characters, e.g. `d", "` of `"laptop stand", "quantity"` when
//!   the output is at `"Anna Haddad", "`);
//! - only what *every* aligned reference continues with is drafted, so the
//!   skeleton is proposed and the earlier answers' own values are not
//!   (`"laptop stand"` and `"standing desk"` agree on nothing). With a single
//!   reference its whole continuation is drafted.
//!
//! Like every drafter this only proposes: the target verifies each token, so
//! the output is the target's whatever the references hold (llama.cpp's
//! `llama-lookup` has the same idea as a "dynamic n-gram cache").
//!
//! The memory lives in the server (recent answers of all requests) or in a
//! file for the CLI (`--lookup-memory FILE`: JSON lines, one per answer,
//! appended after each run and cut to the most recent [`LookupMemory::cap`]).

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// References taken per sequence: more make the consensus stricter (fewer
/// chance agreements), fewer make it apply sooner.
pub const MAX_REFERENCES: usize = 3;
/// Prompts must share at least this many leading tokens (and a quarter of
/// the new prompt) for an earlier answer to be a reference.
pub const MIN_SHARED_PREFIX: usize = 16;
/// Longest answer kept, in bytes.
const MAX_ANSWER_BYTES: usize = 4096;

/// One earlier answer and the prompt it answered.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Entry {
    prompt: Vec<u32>,
    answer: String,
}

/// A lookup memory file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} the lookup memory {}", path.display())]
pub struct MemoryFileError {
    pub action: &'static str,
    pub path: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Recent answers, oldest first.
#[derive(Clone)]
pub struct LookupMemory {
    entries: VecDeque<Entry>,
    cap: usize,
}

impl LookupMemory {
    /// An empty memory of at most `cap` answers.
    pub fn new(cap: usize) -> LookupMemory {
        LookupMemory { entries: VecDeque::new(), cap: cap.max(1) }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Remembers `answer` to `prompt` (empty answers are not kept; long
    /// ones are cut at a character boundary).
    pub fn record(&mut self, prompt: &[u32], answer: &str) {
        if answer.is_empty() {
            return;
        }
        let mut end = answer.len().min(MAX_ANSWER_BYTES);
        while !answer.is_char_boundary(end) {
            end -= 1;
        }
        self.entries.push_back(Entry { prompt: prompt.to_vec(), answer: answer[..end].to_string() });
        while self.entries.len() > self.cap {
            self.entries.pop_front();
        }
    }

    /// The answers to draft from for `prompt`: those whose prompts share the
    /// longest prefix with it (at least [`MIN_SHARED_PREFIX`] tokens and a
    /// quarter of `prompt`), most recent first among equals, at most
    /// [`MAX_REFERENCES`].
    pub fn references_for(&self, prompt: &[u32]) -> Vec<Arc<[u8]>> {
        let need = MIN_SHARED_PREFIX.max(prompt.len().div_ceil(4));
        let mut scored: Vec<(usize, usize, &Entry)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (shared_prefix(&e.prompt, prompt), i, e))
            .filter(|&(lcp, _, _)| lcp >= need)
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
        scored.into_iter().take(MAX_REFERENCES).map(|(_, _, e)| Arc::from(e.answer.as_bytes())).collect()
    }

    /// Reads a memory file (JSON lines, oldest first; missing file: empty).
    /// Lines that do not parse — a line cut short by a crash — are skipped.
    pub fn load(path: &Path, cap: usize) -> Result<LookupMemory, MemoryFileError> {
        let mut m = LookupMemory::new(cap);
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(m),
            Err(source) => return Err(MemoryFileError { action: "read", path: path.to_path_buf(), source }),
        };
        for line in text.lines() {
            if let Ok(e) = serde_json::from_str::<Entry>(line) {
                m.record(&e.prompt, &e.answer);
            }
        }
        Ok(m)
    }

    /// Writes the memory to `path` atomically (a temporary file renamed over
    /// it), so a crash leaves the old file or the new one.
    pub fn save(&self, path: &Path) -> Result<(), MemoryFileError> {
        let err = |source: std::io::Error| MemoryFileError { action: "write", path: path.to_path_buf(), source };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        for e in &self.entries {
            let line = serde_json::to_string(e).map_err(|e| err(e.into()))?;
            writeln!(f, "{line}").map_err(err)?;
        }
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

/// Length of the common prefix of `a` and `b`.
pub(crate) fn shared_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A reference answer and how far the output has been aligned with it.
#[derive(Clone)]
pub struct Reference {
    text: Arc<[u8]>,
    /// Where the last alignment put the continuation (a byte of `text`)...
    pos: usize,
    /// ... when the output was this long.
    out_at: usize,
}

impl Reference {
    pub fn new(text: Arc<[u8]>) -> Reference {
        Reference { text, pos: 0, out_at: 0 }
    }
}

/// Longest draft taken from references, in bytes.
const MAX_CONSENSUS: usize = 64;
/// Bytes of output compared when aligning (a match longer than this is as good).
const MAX_ALIGN: usize = 32;

/// Where the references stand after the output so far.
pub struct Consensus {
    /// What every reference continues with (empty: they disagree — a value
    /// of this answer's own comes next).
    pub draft: Vec<u8>,
    /// The bytes after `draft` in each reference (up to 16), for the caller
    /// to check that tokenizing `draft` alone is stable.
    pub beyond: Vec<Vec<u8>>,
    /// The shortest of the references' alignment matches, in bytes.
    pub matched: usize,
}

/// Aligns every reference with `output` (the sequence's generated bytes so
/// far) and returns what they all continue with. `None` when some reference
/// does not align. Moves the pointers of aligned references to where their
/// continuation starts.
pub fn consensus_draft(refs: &mut [Reference], output: &[u8]) -> Option<Consensus> {
    if refs.is_empty() {
        return None;
    }
    let mut starts = Vec::with_capacity(refs.len());
    let mut matched = usize::MAX;
    for r in refs.iter() {
        let (s, l) = align(r, output)?;
        starts.push(s);
        matched = matched.min(l);
    }
    let first = &refs[0].text[starts[0]..];
    let mut agreed = first.len().min(MAX_CONSENSUS);
    for (r, &s) in refs.iter().zip(&starts).skip(1) {
        let cont = &r.text[s..];
        agreed = agreed.min(shared_prefix(first, cont));
    }
    let draft = first[..agreed].to_vec();
    let beyond =
        refs.iter().zip(&starts).map(|(r, &s)| r.text[s + agreed..].iter().take(16).copied().collect()).collect();
    for (r, &s) in refs.iter_mut().zip(&starts) {
        (r.pos, r.out_at) = (s, output.len());
    }
    Some(Consensus { draft, beyond, matched })
}

/// Where in the reference the continuation of `output` starts, and how many
/// bytes matched ([`MAX_ALIGN`] when following). First the output is
/// *followed*: if everything generated since the last alignment is what the
/// reference has there (the draft was accepted), the continuation is right
/// after it. Otherwise the search resumes after the part that did follow,
/// for the earliest place whose bytes end like `output` does — three bytes
/// or more, or any length ending in punctuation or space (skeleton
/// characters: the `,` after a number of its own). The earliest wins over
/// longer matches further on, which keeps the alignment monotone. `None` if
/// there is no such place or nothing follows it.
fn align(r: &Reference, output: &[u8]) -> Option<(usize, usize)> {
    let reference = &r.text[..];
    let new = &output[r.out_at.min(output.len())..];
    let followed = shared_prefix(new, &reference[r.pos.min(reference.len())..]);
    let from = r.pos + followed;
    if followed == new.len() {
        return (from < reference.len()).then_some((from, MAX_ALIGN));
    }
    let last = *output.last()?;
    let structural = last.is_ascii_punctuation() || last.is_ascii_whitespace();
    let tail = &output[output.len().saturating_sub(MAX_ALIGN)..];
    // e: end (exclusive) of the matched bytes in the reference.
    for e in from + 1..reference.len() {
        if reference[e - 1] != last {
            continue;
        }
        let l = tail.iter().rev().zip(reference[..e].iter().rev()).take_while(|(a, b)| a == b).count();
        if structural || l >= 3 {
            return Some((e, l));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(texts: &[&str]) -> Vec<Reference> {
        texts.iter().map(|t| Reference::new(Arc::from(t.as_bytes()))).collect()
    }

    #[test]
    fn references_agree_on_the_skeleton_not_the_values() {
        let mut r = refs(&[
            r#"{"customer": "Wei Murphy", "product": "laptop stand", "quantity": 12, "unit_price": 240}"#,
            r#"{"customer": "Hana Patel", "product": "standing desk", "quantity": 10, "unit_price": 489.9}"#,
        ]);
        // Nothing generated yet: the common start.
        let d = |r: &mut Vec<Reference>, out: &str| {
            consensus_draft(r, out.as_bytes()).map(|c| String::from_utf8(c.draft).unwrap())
        };
        // Nothing generated yet: the common start.
        assert_eq!(d(&mut r, "").unwrap(), r#"{"customer": ""#);
        // At the value: aligned, but the references disagree.
        assert_eq!(d(&mut r, r#"{"customer": ""#).unwrap(), "");
        // Inside a value of its own: the references do not align at all.
        assert!(d(&mut r, r#"{"customer": "Anna"#).is_none());
        // After the value: the next key, aligned forward (not the
        // `d", "` of `stand", "quantity"` that a longest match would pick).
        assert_eq!(d(&mut r, r#"{"customer": "Anna Haddad","#).unwrap(), r#" "product": ""#);
        let out = r#"{"customer": "Anna Haddad", "product": "paper shredder","#;
        assert_eq!(d(&mut r, out).unwrap(), r#" "quantity": 1"#, "both references' quantities start with 1");
        // A number of its own, then the comma: aligned on the comma.
        assert_eq!(d(&mut r, &format!("{out} \"quantity\": 5,")).unwrap(), r#" "unit_price": "#);
    }

    #[test]
    fn a_single_reference_drafts_its_whole_continuation() {
        let mut r = refs(&[r#"{"a": 1, "b": 2}"#]);
        let c = consensus_draft(&mut r, br#"{"a": 7,"#).unwrap();
        assert_eq!(c.draft, br#" "b": 2}"#);
        assert!(c.beyond[0].is_empty());
    }

    #[test]
    fn alignment_only_moves_forward() {
        let mut r = refs(&["x, a, b, c"]);
        assert_eq!(consensus_draft(&mut r, b"q,").unwrap().draft, b" a, b, c");
        // The draft was accepted and one more byte generated: followed.
        assert_eq!(consensus_draft(&mut r, b"q, a, b").unwrap().draft, b", c");
        let mut r = refs(&["x, a, b, c"]);
        assert_eq!(consensus_draft(&mut r, b"q,").unwrap().draft, b" a, b, c");
        // Rejected at once: the search resumes after the first comma.
        assert_eq!(consensus_draft(&mut r, b"q, z,").unwrap().draft, b" b, c");
    }

    #[test]
    fn memory_picks_answers_to_the_most_similar_prompts() {
        let mut m = LookupMemory::new(4);
        let task: Vec<u32> = (0..40).collect();
        let other: Vec<u32> = (100..140).collect();
        let with = |p: &[u32], x: u32| -> Vec<u32> { p.iter().copied().chain([x]).collect() };
        m.record(&with(&task, 1), "task one");
        m.record(&with(&other, 1), "other");
        m.record(&with(&task, 2), "task two");
        let got = m.references_for(&with(&task, 3));
        let got: Vec<&[u8]> = got.iter().map(|a| &a[..]).collect();
        assert_eq!(got, vec![&b"task two"[..], &b"task one"[..]], "most recent first, the unrelated prompt left out");
        // Capacity: the oldest goes.
        for i in 0..4 {
            m.record(&with(&other, 10 + i), "o");
        }
        assert!(m.references_for(&with(&task, 3)).is_empty());
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn memory_file_round_trips_and_skips_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("minnow-lookup-memory-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.jsonl");
        let mut m = LookupMemory::new(8);
        let p: Vec<u32> = (0..20).collect();
        m.record(&p, "{\"a\": 1}");
        m.save(&path).unwrap();
        // A crash mid-append leaves a torn last line: skipped on load.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"prompt\": [1, 2").unwrap();
        let back = LookupMemory::load(&path, 8).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(&back.references_for(&p)[0][..], b"{\"a\": 1}");
        assert!(LookupMemory::load(&dir.join("missing.jsonl"), 8).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
