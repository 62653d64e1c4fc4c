//! Structured outputs: a per-sequence constraint (JSON Schema, any JSON
//! object, a regular expression, a choice among strings, or a Lark-style
//! context-free grammar) that masks the tokens the answer may not continue
//! with.
//!
//! The grammar engine is `llguidance` (the one behind vLLM's, SGLang's and
//! mistral.rs's structured outputs): it compiles the constraint, walks a
//! token trie of the model's vocabulary (`toktrie`) and gives the set of
//! allowed next tokens in tens of microseconds. This module builds that trie
//! from the GGUF vocabulary minnow's tokenizer reads — byte-level BPE and
//! SentencePiece alike, through [`Tokenizer::token_bytes`], special tokens
//! marked as llguidance expects — and a [`ConstraintEngine`] per model
//! (built on first use: the trie and its parser factory take a moment).
//!
//! A compiled [`Constraint`] is a template: each [`crate::sequence::Sequence`]
//! that carries one gets its own copy of the matcher, consulted at the one
//! place a sequence's logits become what its sampler sees
//! (`Sequence::next_token_logits`) and advanced by every token the sequence
//! takes (`Sequence::push`). When the constraint is complete only the
//! end-of-generation tokens remain allowed; when nothing at all can follow
//! (the closing brace of a schema's object) the sequence stops at once.

use crate::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::{Arc, Mutex};

/// What the answer must be, before compilation.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstraintSpec {
    /// A JSON value valid against this JSON Schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object (OpenAI's `json_object` mode).
    JsonObject,
    /// Text matching this regular expression, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text derived from this grammar (llguidance's Lark syntax; a `start`
    /// rule is where derivation begins).
    Grammar(String),
}

/// A constraint that cannot be compiled, with llguidance's reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConstraintError(pub String);

impl ConstraintSpec {
    /// A short name for messages (`json_schema`, `regex`...).
    pub fn kind(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonSchema(_) => "json_schema",
            ConstraintSpec::JsonObject => "json_object",
            ConstraintSpec::Regex(_) => "regex",
            ConstraintSpec::Choice(_) => "choice",
            ConstraintSpec::Grammar(_) => "grammar",
        }
    }

    /// The same constraint with JSON written compactly — no whitespace
    /// but one space after `,` and `:` (`{"a": 1, "b": [2, 3]}`) — so the
    /// whole skeleton of a JSON answer is forced (vLLM's
    /// `disable_any_whitespace`). Other kinds are unchanged, and so is a
    /// schema that sets llguidance's `x-guidance` options itself.
    pub fn compact(self) -> ConstraintSpec {
        let options = serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        match self {
            ConstraintSpec::JsonObject => {
                ConstraintSpec::JsonSchema(serde_json::json!({"type": "object", "x-guidance": options}))
            }
            ConstraintSpec::JsonSchema(serde_json::Value::Object(mut m)) => {
                m.entry("x-guidance").or_insert(options);
                ConstraintSpec::JsonSchema(serde_json::Value::Object(m))
            }
            other => other,
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar, ConstraintError> {
        Ok(match self {
            ConstraintSpec::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(ConstraintError("a JSON Schema must be an object (or true/false)".into()));
                }
                TopLevelGrammar::from_json_schema(schema.clone())
            }
            ConstraintSpec::JsonObject => TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object"})),
            ConstraintSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            ConstraintSpec::Choice(options) => {
                if options.is_empty() {
                    return Err(ConstraintError("a choice needs at least one option".into()));
                }
                let alts: Vec<String> = options.iter().map(|o| regex_escape(o)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alts.join("|")))
            }
            ConstraintSpec::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
        })
    }
}

/// `s` as a regular expression matching exactly `s`.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/\"".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The token trie of a model's vocabulary and what llguidance tokenizes
/// with: minnow's own tokenizer, so forced text gets the canonical tokens.
struct MinnowTokEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for MinnowTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| self.tokenizer.encode(text, false, false).unwrap_or_default())
    }
}

/// One model's constraint compiler: its vocabulary's token trie and
/// llguidance's parser factory.
pub struct ConstraintEngine {
    factory: ParserFactory,
    /// Every end-of-generation token: allowed wherever the constraint is
    /// complete (llguidance itself knows only one).
    eog: Vec<u32>,
}

impl ConstraintEngine {
    /// The engine for the vocabulary of `tokenizer` (a second copy of the
    /// tokenizer, read from the same GGUF file, goes into the trie's
    /// environment: `file_tokenizer`).
    pub fn new(tokenizer: &Tokenizer, file_tokenizer: Tokenizer) -> Result<ConstraintEngine, ConstraintError> {
        let n = tokenizer.vocab_size();
        let eog: Vec<u32> = (0..n as u32).filter(|&t| tokenizer.is_end_of_generation(t)).collect();
        let eos = tokenizer.eos_id().or(eog.first().copied()).ok_or_else(|| {
            ConstraintError("the vocabulary has no end-of-generation token: a constrained answer could not end".into())
        })?;
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|t| {
                if tokenizer.is_special(t) {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(tokenizer.token_text(t).as_bytes());
                    w
                } else {
                    tokenizer.token_bytes(t)
                }
            })
            .collect();
        let info = TokRxInfo {
            vocab_size: n as u32,
            tok_eos: eos,
            tok_bos: tokenizer.bos_id(),
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let env: TokEnv = Arc::new(MinnowTokEnv { trie: TokTrie::from(&info, &words), tokenizer: file_tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| ConstraintError(e.to_string()))?;
        factory.set_stderr_log_level(0);
        Ok(ConstraintEngine { factory, eog })
    }

    /// Compiles `spec` (bounded by llguidance's default limits on grammar
    /// size and lexer work, so a pathological schema or regex fails rather
    /// than hangs).
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        let parser = self.factory.create_parser(spec.grammar()?).map_err(|e| ConstraintError(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError(e));
        }
        Ok(Constraint { template: Arc::new(Mutex::new(matcher)), eog: self.eog.clone().into(), kind: spec.kind() })
    }
}

/// A compiled constraint, shared by the samples of a request; each
/// [`Sequence`](crate::sequence::Sequence) takes its own [`TokenMask`].
#[derive(Clone)]
pub struct Constraint {
    template: Arc<Mutex<Matcher>>,
    eog: Arc<[u32]>,
    kind: &'static str,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Constraint({})", self.kind)
    }
}

impl Constraint {
    /// A fresh matcher at the start of the answer.
    pub fn start(&self) -> TokenMask {
        let m = self.template.lock().unwrap_or_else(|e| e.into_inner()).deep_clone();
        TokenMask { matcher: m, eog: self.eog.clone(), failed: None, ready: None }
    }
}

/// One sequence's position in its constraint.
pub struct TokenMask {
    matcher: Matcher,
    eog: Arc<[u32]>,
    /// Set when the matcher refused a token or failed: the sequence stops.
    failed: Option<String>,
    /// What [`prepare`](TokenMask::prepare) computed for the current
    /// position: the forced tokens, and the mask when nothing is forced.
    ready: Option<(Vec<u32>, Option<SimpleVob>)>,
}

impl Clone for TokenMask {
    fn clone(&self) -> Self {
        TokenMask {
            matcher: self.matcher.deep_clone(),
            eog: self.eog.clone(),
            failed: self.failed.clone(),
            ready: self.ready.clone(),
        }
    }
}

impl TokenMask {
    /// Sets every logit the constraint does not allow next to −∞ (the
    /// end-of-generation tokens count as allowed where the answer may end).
    pub fn apply(&mut self, logits: &mut [f32]) {
        let ready = self.ready.as_mut().and_then(|(_, m)| m.take());
        let mask: SimpleVob = match ready.map_or_else(|| self.matcher.compute_mask(), Ok) {
            Ok(m) => m,
            Err(e) => {
                // No token can be justified: allow only the end.
                self.failed.get_or_insert(e.to_string());
                let mut m = SimpleVob::alloc(logits.len());
                m.set(self.eog[0] as usize, true);
                m
            }
        };
        let end_allowed = self.eog.iter().any(|&t| (t as usize) < mask.len() && mask.is_allowed(t));
        // The end tokens' logits, restored after masking where the answer may end.
        let ends: Vec<(usize, f32)> = if end_allowed {
            self.eog.iter().filter_map(|&t| logits.get(t as usize).map(|&l| (t as usize, l))).collect()
        } else {
            Vec::new()
        };
        // A word of the mask at a time: most words allow all or none of
        // their 32 tokens.
        let words = mask.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            match words.get(w).copied().unwrap_or(0) {
                u32::MAX if chunk.len() == 32 && (w + 1) * 32 <= mask.len() => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                bits => {
                    for (b, l) in chunk.iter_mut().enumerate() {
                        if bits >> b & 1 == 0 || w * 32 + b >= mask.len() {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        for (t, l) in ends {
            logits[t] = l;
        }
    }

    /// Advances past token `id` (an end-of-generation token ends the answer
    /// and is not fed).
    pub fn consume(&mut self, id: u32) {
        self.ready = None;
        if self.eog.contains(&id) || self.failed.is_some() {
            return;
        }
        if let Err(e) = self.matcher.consume_token(id) {
            self.failed = Some(e.to_string());
        }
    }

    /// How many of `tokens`, in order from here, the constraint allows
    /// (end-of-generation tokens count where the answer may end); the
    /// matcher does not move.
    pub fn allowed_prefix(&mut self, tokens: &[u32]) -> usize {
        if self.failed.is_some() {
            return 0;
        }
        let upto = tokens.iter().position(|t| self.eog.contains(t)).unwrap_or(tokens.len());
        let ok = self.matcher.validate_tokens(&tokens[..upto]).unwrap_or(0);
        if ok == upto && upto < tokens.len() {
            // An end token right after: allowed where the answer is complete.
            let mut probe = self.matcher.deep_clone();
            let complete = probe.consume_tokens(&tokens[..upto]).is_ok() && probe.is_accepting().unwrap_or(false);
            return ok + usize::from(complete);
        }
        ok
    }

    /// Whether nothing more can follow: the answer is complete and no
    /// longer form of it is allowed (or the matcher failed).
    pub fn is_finished(&self) -> bool {
        self.failed.is_some() || self.matcher.is_stopped()
    }

    /// Tokens the constraint forces next (no other continuation is
    /// allowed), as the canonical tokenization of the forced text.
    pub fn forced_tokens(&mut self) -> Vec<u32> {
        if self.failed.is_some() {
            return Vec::new();
        }
        match &mut self.ready {
            Some((ff, _)) => std::mem::take(ff),
            None => self.matcher.compute_ff_tokens(),
        }
    }

    /// Computes, ahead of need, what the next token will ask for here: the
    /// forced tokens and, when there are none, the mask — so they can be
    /// computed on another thread while the forward pass runs. Taking a
    /// token drops them.
    pub fn prepare(&mut self) {
        if self.failed.is_some() || self.ready.is_some() {
            return;
        }
        let ff = self.matcher.compute_ff_tokens();
        let mask = if ff.is_empty() { self.matcher.compute_mask().ok() } else { None };
        self.ready = Some((ff, mask));
    }
}
