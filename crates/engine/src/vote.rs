//! Many samples from one prompt, and self-consistency voting over them.
//!
//! [`generate_n`] reads the prompt once, copies the KV cache per sample and
//! decodes every unfinished sample in one batched forward pass per step
//! (weights read once for all of them): one request with `n` samples on the
//! scheduler's decode loop, as the server runs `n`. Sample `i` samples with seed
//! `seed + i`, as the server's `n` does, so sample 0 is exactly what
//! [`crate::generate::generate`] gives with the same seed.
//!
//! [`vote`] extracts an answer from each sample with an [`AnswerExtractor`]
//! (the last line, a regular expression, a JSON field — or any type
//! implementing the trait) and returns the majority answer with the counts.

use crate::generate::{check_request, FinishReason, GenerateParams};
use crate::model::{Model, ModelError};
use crate::scheduler::{run_one, GenRequest, StepCtx};
use crate::tokenizer::Tokenizer;
use minnow_kernels::pool::ThreadPool;

/// One of several samples.
#[derive(Debug, Clone)]
pub struct Sample {
    pub text: String,
    /// Generated ids (an end-of-generation token that ended it is included).
    pub ids: Vec<u32>,
    pub finish: FinishReason,
}

/// `n` samples of one prompt and what they cost.
#[derive(Debug, Clone)]
pub struct MultiGeneration {
    pub samples: Vec<Sample>,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Prompt tokens run through the model: the prompt once, whatever `n`.
    pub prompt_tokens_processed: usize,
    /// Prompt reads (always 1).
    pub prefills: usize,
    pub prompt_secs: f64,
    /// Batched decoding forward passes.
    pub decode_forwards: usize,
    /// Tokens generated over all samples.
    pub gen_tokens: usize,
    pub gen_secs: f64,
}

impl MultiGeneration {
    /// Generated tokens per second over all samples.
    pub fn gen_tps(&self) -> f64 {
        if self.gen_secs > 0.0 {
            self.gen_tokens as f64 / self.gen_secs
        } else {
            0.0
        }
    }
}

/// `n` samples of `prompt` sharing one prefill, decoded as one batch on the
/// scheduler's decode loop, in-process; `on_text(i, piece)` receives sample
/// `i`'s released text as it comes.
#[allow(clippy::too_many_arguments)]
pub fn generate_n(
    model: &Model,
    tokenizer: &Tokenizer,
    pool: &ThreadPool,
    ctx: usize,
    prompt: &[u32],
    params: &GenerateParams,
    n: usize,
    mut on_text: impl FnMut(usize, &str),
) -> Result<MultiGeneration, ModelError> {
    if n == 0 {
        return Err(ModelError::new("n must be at least 1"));
    }
    check_request(prompt, params, 0, ctx)?;
    let step = StepCtx { model, tokenizer, pool, draft: None };
    let req = GenRequest { n, ..GenRequest::new(prompt.to_vec(), params.clone()) };
    let out = run_one(&step, req, model.new_cache(ctx), None, Vec::new(), &mut on_text)?;
    let samples: Vec<Sample> =
        out.samples.into_iter().map(|(ids, finish, text)| Sample { text, ids, finish }).collect();
    let gen_tokens = samples.iter().map(|s| s.ids.len()).sum();
    Ok(MultiGeneration {
        samples,
        prompt_tokens: prompt.len(),
        prompt_tokens_processed: prompt.len(),
        prefills: 1,
        prompt_secs: out.prompt_secs,
        decode_forwards: out.decode_steps,
        gen_tokens,
        gen_secs: out.gen_secs,
    })
}

/// Turns a sample's text into the answer it gives, or `None` if it gives
/// none. Answers are compared as strings.
pub trait AnswerExtractor {
    fn extract(&self, text: &str) -> Option<String>;
}

/// The last non-empty line, trimmed.
pub struct LastLine;

impl AnswerExtractor for LastLine {
    fn extract(&self, text: &str) -> Option<String> {
        text.lines().map(str::trim).rfind(|l| !l.is_empty()).map(str::to_string)
    }
}

/// A `--vote-regex` that does not compile.
#[derive(Debug, thiserror::Error)]
#[error("bad --vote-regex {pattern:?}")]
pub struct BadRegex {
    pub pattern: String,
    #[source]
    pub source: regex::Error,
}

/// The last match of a regular expression: its first capture group if it
/// has one, else the whole match; trimmed.
pub struct RegexAnswer(pub regex::Regex);

impl RegexAnswer {
    pub fn new(pattern: &str) -> Result<RegexAnswer, BadRegex> {
        regex::Regex::new(pattern).map(RegexAnswer).map_err(|source| BadRegex { pattern: pattern.to_string(), source })
    }
}

impl AnswerExtractor for RegexAnswer {
    fn extract(&self, text: &str) -> Option<String> {
        let caps = self.0.captures_iter(text).last()?;
        let m = if caps.len() > 1 { caps.get(1)? } else { caps.get(0)? };
        Some(m.as_str().trim().to_string())
    }
}

/// A field of the first JSON object or array in the text (code fences and
/// prose around it are skipped). The path is dot-separated (`order.city`,
/// `items.0.name`); `.` means the whole value. Strings give their content,
/// other values their compact JSON with object keys sorted, and numbers are
/// normalised (`79.0` and `79` are the same answer).
pub struct JsonField(pub String);

impl JsonField {
    fn first_json(text: &str) -> Option<serde_json::Value> {
        for (i, c) in text.char_indices() {
            if c == '{' || c == '[' {
                let mut it = serde_json::Deserializer::from_str(&text[i..]).into_iter::<serde_json::Value>();
                if let Some(Ok(v)) = it.next() {
                    return Some(v);
                }
            }
        }
        None
    }
}

/// Compact JSON with sorted keys and integral floats written as integers.
fn canonical(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        Value::Array(a) => format!("[{}]", a.iter().map(canonical).collect::<Vec<_>>().join(",")),
        Value::Object(o) => {
            let mut kv: Vec<(&String, &Value)> = o.iter().collect();
            kv.sort_by(|a, b| a.0.cmp(b.0));
            let parts: Vec<String> =
                kv.iter().map(|(k, v)| format!("{}:{}", Value::String((*k).clone()), canonical(v))).collect();
            format!("{{{}}}", parts.join(","))
        }
        other => other.to_string(),
    }
}

impl AnswerExtractor for JsonField {
    fn extract(&self, text: &str) -> Option<String> {
        let root = Self::first_json(text)?;
        let mut v = &root;
        let path = self.0.trim();
        if !(path.is_empty() || path == ".") {
            for part in path.trim_start_matches('.').split('.') {
                v = match v {
                    serde_json::Value::Object(o) => o.get(part)?,
                    serde_json::Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
                    _ => return None,
                };
            }
        }
        match v {
            serde_json::Value::String(s) => Some(s.trim().to_string()),
            serde_json::Value::Null => None,
            other => Some(canonical(other)),
        }
    }
}

/// The outcome of a vote.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Vote {
    /// The most common answer (ties: the one a lower-numbered sample gave first).
    pub answer: Option<String>,
    /// Every answer with its count, most common first (ties in order of first appearance).
    pub counts: Vec<(String, usize)>,
    /// The first sample giving the winning answer.
    pub winner: Option<usize>,
    /// Samples that gave no answer.
    pub no_answer: usize,
}

/// Majority vote over `texts` with `extractor`.
pub fn vote<S: AsRef<str>>(texts: &[S], extractor: &dyn AnswerExtractor) -> Vote {
    // (answer, count, first sample); few distinct answers, so a list will do.
    let mut tally: Vec<(String, usize, usize)> = Vec::new();
    let mut no_answer = 0;
    for (i, t) in texts.iter().enumerate() {
        match extractor.extract(t.as_ref()) {
            None => no_answer += 1,
            Some(a) => match tally.iter_mut().find(|x| x.0 == a) {
                Some(x) => x.1 += 1,
                None => tally.push((a, 1, i)),
            },
        }
    }
    tally.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    Vote {
        answer: tally.first().map(|x| x.0.clone()),
        winner: tally.first().map(|x| x.2),
        counts: tally.into_iter().map(|(a, c, _)| (a, c)).collect(),
        no_answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_line() {
        assert_eq!(LastLine.extract("reasoning\nmore\n  42 \n\n"), Some("42".into()));
        assert_eq!(LastLine.extract(" \n"), None);
    }

    #[test]
    fn regex_takes_last_match_and_first_group() {
        let r = RegexAnswer::new(r"answer is (\d+)").unwrap();
        assert_eq!(r.extract("the answer is 3, no, the answer is 4."), Some("4".into()));
        assert_eq!(r.extract("no idea"), None);
        let r = RegexAnswer::new(r"\d+").unwrap();
        assert_eq!(r.extract("1 then 22"), Some("22".into()));
        assert!(RegexAnswer::new("(").is_err());
    }

    #[test]
    fn json_field_finds_the_object_and_normalises() {
        let t =
            "Here:\n```json\n{\"customer\": \"Ann Lee\", \"quantity\": 12.0, \"o\": {\"b\": 1, \"a\": [1, 2]}}\n```";
        assert_eq!(JsonField("customer".into()).extract(t), Some("Ann Lee".into()));
        assert_eq!(JsonField("quantity".into()).extract(t), Some("12".into()));
        assert_eq!(JsonField("o.a.1".into()).extract(t), Some("2".into()));
        assert_eq!(JsonField("o".into()).extract(t), Some("{\"a\":[1,2],\"b\":1}".into()));
        assert_eq!(JsonField("missing".into()).extract(t), None);
        assert_eq!(JsonField("x".into()).extract("no json {here"), None);
        // Whole objects compare independently of key order and number spelling.
        let a = JsonField(".".into()).extract("{\"q\": 1, \"p\": \"x\"}");
        let b = JsonField(".".into()).extract("{\"p\": \"x\", \"q\": 1.0}");
        assert_eq!(a, b);
    }

    #[test]
    fn majority_with_ties_and_missing_answers() {
        let v = vote(&["a\n7", "b\n8", "c\n8", "", "d\n7", "e\n8"], &LastLine);
        assert_eq!(v.answer.as_deref(), Some("8"));
        assert_eq!(v.winner, Some(1));
        assert_eq!(v.counts, vec![("8".to_string(), 3), ("7".to_string(), 2)]);
        assert_eq!(v.no_answer, 1);
        // A tie goes to the answer seen first.
        let v = vote(&["x", "y", "y", "x"], &LastLine);
        assert_eq!(v.answer.as_deref(), Some("x"));
        let v = vote::<&str>(&[], &LastLine);
        assert_eq!(v.answer, None);
    }
}
