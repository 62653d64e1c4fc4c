//! Scorers: how right one reply is against a gold answer.
//!
//! - `exact`: the reply, trimmed, equals the gold text, trimmed.
//! - `json-fields`: as the order-extraction task defines it — parse the
//!   first `{...}` JSON object in the reply (a ```json fence around it is
//!   fine); each key of the gold object is right when the reply's value
//!   equals it (strings case-insensitively after trimming, numbers as
//!   numbers: `25` equals `25.0`). Field accuracy = right keys / gold keys;
//!   exact = every key right. A reply with no JSON object scores zero.
//! - `regex:PATTERN`: the first match of PATTERN in the reply (its first
//!   capture group when it has one), trimmed, equals the gold text, trimmed.
//!
//! The gold text of a JSON-string answer is the string; of any other value,
//! its JSON text.

use anyhow::{anyhow, Result};
use regex::Regex;
use serde_json::Value;

/// How one case scored: `right` of `total` parts (fields, or 1 of 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaseScore {
    pub right: usize,
    pub total: usize,
}

impl CaseScore {
    /// Every part right (and there was something to get right).
    pub fn exact(&self) -> bool {
        self.total > 0 && self.right == self.total
    }
}

#[derive(Debug, Clone)]
pub enum Scorer {
    Exact,
    JsonFields,
    Regex(Regex),
}

impl Scorer {
    /// `exact`, `json-fields` or `regex:PATTERN`.
    pub fn parse(name: &str) -> Result<Scorer> {
        match name {
            "exact" => Ok(Scorer::Exact),
            "json-fields" => Ok(Scorer::JsonFields),
            _ => match name.strip_prefix("regex:") {
                Some(p) => Regex::new(p).map(Scorer::Regex).map_err(|e| anyhow!("--scorer {name:?}: bad regex: {e}")),
                None => Err(anyhow!("unknown scorer {name:?}: use exact, json-fields or regex:PATTERN")),
            },
        }
    }

    pub fn name(&self) -> String {
        match self {
            Scorer::Exact => "exact".into(),
            Scorer::JsonFields => "json-fields".into(),
            Scorer::Regex(r) => format!("regex:{}", r.as_str()),
        }
    }

    /// Scores `reply` against `gold`.
    pub fn score(&self, reply: &str, gold: &Value) -> CaseScore {
        match self {
            Scorer::Exact => one(reply.trim() == gold_text(gold).trim()),
            Scorer::Regex(re) => {
                let got = re.captures(reply).map(|c| c.get(1).or_else(|| c.get(0)).map_or("", |m| m.as_str()));
                one(got.is_some_and(|g| g.trim() == gold_text(gold).trim()))
            }
            Scorer::JsonFields => json_fields(reply, gold),
        }
    }

    /// Scores `reply` against another model's reply (teacher agreement):
    /// for `json-fields` the other reply's first JSON object is the gold.
    /// `None` when the other reply has nothing to compare against.
    pub fn agree(&self, reply: &str, other: &str) -> Option<CaseScore> {
        match self {
            Scorer::JsonFields => first_json_object(other).map(|g| json_fields(reply, &Value::Object(g))),
            Scorer::Exact => Some(one(reply.trim() == other.trim())),
            Scorer::Regex(re) => {
                let pick = |s: &str| {
                    re.captures(s).and_then(|c| c.get(1).or_else(|| c.get(0)).map(|m| m.as_str().trim().to_string()))
                };
                let theirs = pick(other)?;
                Some(one(pick(reply).as_deref() == Some(theirs.as_str())))
            }
        }
    }
}

fn one(ok: bool) -> CaseScore {
    CaseScore { right: ok as usize, total: 1 }
}

/// The text a gold answer stands for.
pub fn gold_text(gold: &Value) -> String {
    match gold {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn json_fields(reply: &str, gold: &Value) -> CaseScore {
    let Value::Object(want) = gold else {
        // A gold answer that is not an object has one "field": itself.
        return one(first_json_value(reply).is_some_and(|v| values_match(&v, gold)));
    };
    let total = want.len();
    let Some(got) = first_json_object(reply) else { return CaseScore { right: 0, total } };
    let right = want.iter().filter(|(k, w)| got.get(*k).is_some_and(|g| values_match(g, w))).count();
    CaseScore { right, total }
}

/// Strings: trimmed, case-insensitive. Numbers: as numbers. Anything else:
/// equal JSON values.
fn values_match(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::String(g), Value::String(w)) => g.trim().to_lowercase() == w.trim().to_lowercase(),
        (Value::Number(g), Value::Number(w)) => match (g.as_f64(), w.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => g == w,
        },
        _ => got == want,
    }
}

/// The first `{...}` in `text` that parses as a JSON object: tried from
/// each `{` in turn, reading one JSON value and ignoring what follows (so
/// fences and trailing prose do not matter).
pub fn first_json_object(text: &str) -> Option<serde_json::Map<String, Value>> {
    text.match_indices('{').find_map(|(i, _)| match parse_one(&text[i..]) {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    })
}

fn first_json_value(text: &str) -> Option<Value> {
    if let Some(v) = parse_one(text.trim()) {
        return Some(v);
    }
    first_json_object(text).map(Value::Object)
}

fn parse_one(s: &str) -> Option<Value> {
    serde_json::Deserializer::from_str(s).into_iter::<Value>().next()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gold() -> Value {
        json!({"customer": "Liam Okafor", "product": "whiteboard", "quantity": 12, "unit_price": 79,
               "city": "Osaka", "delivery_date": "2025-06-07"})
    }

    fn fields(reply: &str) -> (usize, usize) {
        let s = Scorer::JsonFields.score(reply, &gold());
        (s.right, s.total)
    }

    #[test]
    fn json_fields_all_right_with_case_spaces_and_float_numbers() {
        let r = r#"{"customer": " liam okafor ", "product": "Whiteboard", "quantity": 12.0, "unit_price": 79,
                    "city": "OSAKA", "delivery_date": "2025-06-07"}"#;
        assert_eq!(fields(r), (6, 6));
        assert!(Scorer::JsonFields.score(r, &gold()).exact());
    }

    #[test]
    fn json_fields_fenced_with_prose_around() {
        let r = "Here is the order:\n```json\n{\"customer\": \"Liam Okafor\", \"product\": \"whiteboards\", \"quantity\": 12, \"unit_price\": 79.0, \"city\": \"Osaka\", \"delivery_date\": \"2025-06-07\"}\n```\nAnything else?";
        // "whiteboards" is wrong (the task wants the singular).
        assert_eq!(fields(r), (5, 6));
        assert!(!Scorer::JsonFields.score(r, &gold()).exact());
    }

    #[test]
    fn json_fields_first_object_wins_and_types_matter() {
        // The first object has a string quantity ("12" is not the number 12)
        // and no city; the second object, fully right, is never looked at.
        let r = r#"{"customer": "Liam Okafor", "product": "whiteboard", "quantity": "12", "unit_price": 79, "delivery_date": "2025-06-07"} {"customer": "Liam Okafor", "product": "whiteboard", "quantity": 12, "unit_price": 79, "city": "Osaka", "delivery_date": "2025-06-07"}"#;
        assert_eq!(fields(r), (4, 6));
    }

    #[test]
    fn json_fields_skips_braces_that_are_not_json() {
        let r = r#"Use {name} placeholders... {"customer": "Liam Okafor", "product": "whiteboard", "quantity": 12, "unit_price": 78.99, "city": "Osaka", "delivery_date": "07/06/2025"}"#;
        assert_eq!(fields(r), (4, 6));
    }

    #[test]
    fn json_fields_not_json_scores_zero() {
        assert_eq!(fields("Liam Okafor ordered 12 whiteboards."), (0, 6));
        assert_eq!(fields(""), (0, 6));
        assert_eq!(fields(r#"{"customer": "Liam Okafor", "product": "#), (0, 6));
        assert_eq!(fields(r#"["Liam Okafor"]"#), (0, 6));
    }

    #[test]
    fn exact_and_regex() {
        let gold = json!("Paris");
        assert!(Scorer::Exact.score("  Paris\n", &gold).exact());
        assert!(!Scorer::Exact.score("paris", &gold).exact());
        let re = Scorer::parse(r"regex:answer: (\w+)").unwrap();
        assert!(re.score("so the answer: Paris.", &gold).exact());
        assert!(!re.score("the answer is Paris", &gold).exact());
        let whole = Scorer::parse(r"regex:\d+").unwrap();
        assert!(whole.score("about 42 apples", &json!(42)).exact());
        assert!(!whole.score("about 41 apples", &json!(42)).exact());
    }

    #[test]
    fn agreement_uses_the_other_reply_as_gold() {
        let teacher = "```json\n{\"a\": \"X\", \"b\": 2}\n```";
        assert_eq!(Scorer::JsonFields.agree(r#"{"a": "x", "b": 3}"#, teacher), Some(CaseScore { right: 1, total: 2 }));
        assert_eq!(Scorer::JsonFields.agree(r#"{"a": "x"}"#, "no json"), None);
    }

    #[test]
    fn scorer_names() {
        assert!(Scorer::parse("json-fields").is_ok());
        assert!(Scorer::parse("regex:(").unwrap_err().to_string().contains("bad regex"));
        assert!(Scorer::parse("bleu").unwrap_err().to_string().contains("unknown scorer"));
    }
}
