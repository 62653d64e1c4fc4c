//! One generated sequence: its sampler (and RNG and penalty history), stop
//! strings and end-of-generation tokens, `max_tokens`, the context limit,
//! logprobs, and why it finished — and the one rule for when it stops.
//!
//! Every way minnow decodes holds a [`Sequence`] per sample and does three
//! things with it: asks it for the next token ([`Sequence::sample`], or
//! [`Sequence::distribution`] when speculation verifies a draft), tells it
//! what was chosen ([`Sequence::push`]), and stops when the returned
//! [`Pushed::finish`] says so. There is one loop that does this, the
//! scheduler's [`Core::step`](crate::scheduler) — under `serve`, the local
//! teacher, and in-process under `minnow run`, `--n`, `--draft` and
//! `--lookup` — and the sequence alone decides what text is released and
//! where generation stops.
//!
//! **Where per-token constraints plug in**: `Sequence::next_token_logits`
//! is the single place a sequence's logits are turned into what the sampler
//! sees; a token mask (structured outputs, logit bias) is applied there,
//! and both sampling and speculative verification go through it.

use crate::constraint::{Constraint, TokenMask};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use std::borrow::Cow;

#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these; the
    /// stop string itself is not returned (OpenAI's rule).
    pub stop: Vec<String>,
    /// Stop at end-of-generation tokens (EOS, EOT, `<|im_end|>`...).
    pub stop_at_eog: bool,
    /// What the answer must be (a JSON Schema, a regex...; see
    /// [`crate::constraint`]): tokens it does not allow are masked.
    pub constraint: Option<Constraint>,
    /// Added to the logits of these tokens before sampling (OpenAI's
    /// `logit_bias`, −100 to 100; −100 bans the token outright).
    pub logit_bias: Vec<(u32, f32)>,
    /// The LoRA adapter to run with (`None`: the base model).
    pub adapter: Option<std::sync::Arc<crate::lora::LoraAdapter>>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_at_eog: true,
            constraint: None,
            logit_bias: Vec::new(),
            adapter: None,
        }
    }
}

/// Why generation ended (the OpenAI `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Log-probabilities of one generated token: the log-softmax of the model's
/// raw logits, before penalties, temperature or filters (what OpenAI reports).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// What [`Sequence::push`] reports about one token.
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    /// Text released by this token: complete UTF-8 characters that cannot be
    /// the start of a stop string. Empty for an end-of-generation token.
    pub text: String,
    /// Whether the token is text (false for the end-of-generation token that
    /// ends a sequence: it is counted but has no text event).
    pub is_text: bool,
    /// Its log-probabilities, when the sequence reports them and the logits
    /// were given.
    pub logprob: Option<TokenLogprob>,
    /// Set when the sequence ended with this token.
    pub finish: Option<FinishReason>,
    /// Held-back text released because the sequence ended (not after a stop
    /// string, whose text is dropped).
    pub tail: String,
}

/// One sample's generation state; see the module doc.
#[derive(Clone)]
pub struct Sequence {
    sampler: Sampler,
    text: TextStream,
    max_tokens: usize,
    stop_at_eog: bool,
    /// Prompt tokens, and the context the sequence's cache holds.
    prompt_len: usize,
    ctx: usize,
    /// `Some(k)`: each token's logprob and its `k` likeliest alternatives.
    top_logprobs: Option<usize>,
    ids: Vec<u32>,
    finish: Option<FinishReason>,
    /// Where the answer stands in its constraint, if it has one.
    mask: Option<TokenMask>,
    /// Seconds spent on the constraint's masks and forced tokens so far.
    mask_secs: f64,
    logit_bias: Vec<(u32, f32)>,
}

impl Sequence {
    /// A sequence continuing `prompt` in a context of `ctx` tokens, sampling
    /// with `params.sampling` but seed `seed` (sample `i` of a request uses
    /// the request's seed plus `i`). The prompt counts for the penalties.
    pub fn new(prompt: &[u32], params: &GenerateParams, seed: u64, ctx: usize, top_logprobs: Option<usize>) -> Self {
        let mut sampler = Sampler::new(SamplingParams { seed, ..params.sampling.clone() });
        for &t in prompt {
            sampler.accept(t);
        }
        Sequence {
            sampler,
            text: TextStream::new(&params.stop),
            max_tokens: params.max_tokens,
            stop_at_eog: params.stop_at_eog,
            prompt_len: prompt.len(),
            ctx,
            top_logprobs,
            ids: Vec::new(),
            // Nothing to generate: done before the first token.
            finish: (params.max_tokens == 0).then_some(FinishReason::Length),
            mask: params.constraint.as_ref().map(Constraint::start),
            mask_secs: 0.0,
            logit_bias: params.logit_bias.clone(),
        }
    }

    /// The tokens the constraint allows as the only continuation here (its
    /// canonical tokenization of the forced text), to be taken with
    /// [`push`](Self::push) (`sampled = false`) without sampling; empty
    /// without a constraint.
    pub fn forced_tokens(&mut self) -> Vec<u32> {
        match &mut self.mask {
            Some(m) if self.finish.is_none() => {
                let t = std::time::Instant::now();
                let f = m.forced_tokens();
                self.mask_secs += t.elapsed().as_secs_f64();
                f
            }
            _ => Vec::new(),
        }
    }

    /// How many of `tokens`, in order from here, the constraint allows (all
    /// of them without a constraint); the sequence does not move.
    pub fn allowed_prefix(&mut self, tokens: &[u32]) -> usize {
        match &mut self.mask {
            Some(m) => m.allowed_prefix(tokens),
            None => tokens.len(),
        }
    }

    /// Computes the constraint's forced tokens and mask for the next token
    /// ahead of need (see [`TokenMask::prepare`]); not counted in
    /// [`mask_secs`](Self::mask_secs), which is the time spent waiting on
    /// them. Nothing without a constraint.
    pub fn prepare_constraint(&mut self) {
        if let (Some(m), None) = (&mut self.mask, self.finish) {
            m.prepare();
        }
    }

    /// Whether this sequence carries a constraint (masks to compute).
    pub fn has_constraint(&self) -> bool {
        self.mask.is_some()
    }

    /// Seconds this sequence's constraint has cost (masks and forced tokens).
    pub fn mask_secs(&self) -> f64 {
        self.mask_secs
    }

    /// Whether a constraint or a logit bias shapes this sequence's tokens.
    pub fn is_constrained(&self) -> bool {
        self.mask.is_some() || !self.logit_bias.is_empty()
    }

    /// The logits the sampler sees for the next token: the model's, biased
    /// by `logit_bias` and masked by the constraint. **The one place
    /// per-token constraints act**: sampling and speculative verification
    /// both read logits through here.
    fn next_token_logits<'l>(&mut self, logits: &'l [f32]) -> Cow<'l, [f32]> {
        if !self.is_constrained() {
            return Cow::Borrowed(logits);
        }
        let mut l = logits.to_vec();
        for &(id, bias) in &self.logit_bias {
            if let Some(x) = l.get_mut(id as usize) {
                // OpenAI's −100 bans the token whatever its logit.
                *x = if bias <= -100.0 { f32::NEG_INFINITY } else { *x + bias };
            }
        }
        if let Some(mask) = &mut self.mask {
            let t = std::time::Instant::now();
            mask.apply(&mut l);
            self.mask_secs += t.elapsed().as_secs_f64();
        }
        Cow::Owned(l)
    }

    /// Draws the next token from the model's `logits` (the sampler records
    /// it in its penalty history); pass it to [`push`](Self::push) with
    /// `sampled = true`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let l = self.next_token_logits(logits);
        self.sampler.sample(&l)
    }

    /// The distribution the next token would be drawn from, as `(id, p)`
    /// over its support: what speculative verification compares drafts to.
    pub fn distribution(&mut self, logits: &[f32]) -> Vec<(u32, f32)> {
        let l = self.next_token_logits(logits);
        self.sampler.distribution(&l)
    }

    /// Records the next token — drawn by [`sample`](Self::sample)
    /// (`sampled`), or committed by a speculative round — and decides, in
    /// the one place this is decided, whether the sequence ends with it:
    /// an end-of-generation token or a completed stop string ends it with
    /// `Stop`; `max_tokens` tokens, or prompt and completion filling the
    /// context, with `Length`. `logits`: the model's raw logits the token
    /// was chosen from, for its logprob.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32, sampled: bool, logits: Option<&[f32]>) -> Pushed {
        debug_assert!(self.finish.is_none(), "a token pushed after the sequence finished");
        if !sampled {
            self.sampler.accept(id);
        }
        self.ids.push(id);
        if self.stop_at_eog && tokenizer.is_end_of_generation(id) {
            self.finish = Some(FinishReason::Stop);
            return Pushed {
                text: String::new(),
                is_text: false,
                logprob: None,
                finish: self.finish,
                tail: self.text.finish(),
            };
        }
        let (text, hit) = self.text.push(tokenizer, id);
        let logprob = logits.zip(self.top_logprobs).map(|(l, k)| token_logprob(l, id, k));
        let mut tail = String::new();
        let complete = self.mask.as_mut().is_some_and(|m| {
            m.consume(id);
            m.is_finished()
        });
        if hit {
            self.finish = Some(FinishReason::Stop);
        } else if complete {
            // The constraint allows nothing more: the answer is whole.
            self.finish = Some(FinishReason::Stop);
            tail = self.text.finish();
        } else if self.ids.len() >= self.max_tokens || self.prompt_len + self.ids.len() >= self.ctx {
            // Every generated token takes a context position, as OpenAI
            // counts (prompt + completion ≤ context): a server that admits
            // `prompt + max_tokens ≤ ctx` and `minnow run -n` past the
            // context stop at the same token.
            self.finish = Some(FinishReason::Length);
            tail = self.text.finish();
        }
        Pushed { text, is_text: true, logprob, finish: self.finish, tail }
    }

    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    pub fn is_done(&self) -> bool {
        self.finish.is_some()
    }

    /// Generated ids, an end-of-generation token that ended it included.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Tokens `max_tokens` still allows.
    pub fn tokens_left(&self) -> usize {
        self.max_tokens.saturating_sub(self.ids.len())
    }

    pub fn sampling(&self) -> &SamplingParams {
        self.sampler.params()
    }
}

/// Holds back streamed text that might be the start of a stop string, and
/// finds the first complete stop string.
#[derive(Clone)]
pub(crate) struct StopFilter {
    stops: Vec<String>,
    /// Text decoded but not yet released.
    pending: String,
}

impl StopFilter {
    /// A filter for `stops`; empty strings are ignored (they would match
    /// everywhere).
    pub(crate) fn new(stops: &[String]) -> StopFilter {
        StopFilter { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), pending: String::new() }
    }

    /// Adds text; returns (text safe to release, whether a stop string was hit).
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Generated ids → released text: complete UTF-8 characters, minus anything
/// that may still turn out to be a stop string.
#[derive(Clone)]
pub(crate) struct TextStream {
    decoder: StreamDecoder,
    stops: StopFilter,
}

impl TextStream {
    pub(crate) fn new(stops: &[String]) -> TextStream {
        TextStream { decoder: StreamDecoder::default(), stops: StopFilter::new(stops) }
    }

    /// Adds a generated token; returns (text to release now, whether a stop
    /// string was hit — the stop string and anything after it are dropped).
    pub(crate) fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> (String, bool) {
        self.stops.push(&self.decoder.push(tokenizer, id))
    }

    /// Releases what was held back at the end of generation without a stop
    /// string: a partial character or a stop-string prefix that never completed.
    pub(crate) fn finish(&mut self) -> String {
        let (piece, _) = self.stops.push(&self.decoder.finish());
        piece + &self.stops.finish()
    }
}

/// Log-softmax of the raw logits at `id`, and the `k` most likely tokens.
/// NaN logits count as impossible.
pub fn token_logprob(logits: &[f32], id: u32, k: usize) -> TokenLogprob {
    let clean = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let max = logits.iter().map(|&l| clean(l)).fold(f32::NEG_INFINITY, f32::max);
    // log Σ exp(l) in f64, shifted by the max so nothing overflows.
    let lse = if max.is_finite() {
        max as f64 + logits.iter().map(|&l| ((clean(l) - max) as f64).exp()).sum::<f64>().ln()
    } else {
        max as f64
    };
    let lp = |l: f32| {
        let v = clean(l) as f64 - lse;
        if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            v as f32
        }
    };
    // Top k by a bounded insertion sort: k ≤ 20 against a vocabulary of
    // tens of thousands, so nearly every logit fails the first comparison.
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            let l = clean(l);
            if top.len() == k && l <= top[k - 1].1 {
                continue;
            }
            let at = top.partition_point(|&(_, t)| t >= l);
            top.insert(at, (i as u32, l));
            top.truncate(k);
        }
    }
    TokenLogprob {
        id,
        logprob: logits.get(id as usize).map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: top.into_iter().map(|(t, l)| (t, lp(l))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopFilter::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = f.push(p);
            out.push_str(&t);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&f.finish());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_pieces_is_caught_and_cut() {
        assert_eq!(run(&["END"], &["abc E", "N", "D more"]), ("abc ".to_string(), true));
    }

    #[test]
    fn near_miss_is_released_in_full() {
        assert_eq!(run(&["END"], &["abc E", "N", "x"]), ("abc ENx".to_string(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".to_string(), true));
    }

    #[test]
    fn multibyte_text_is_never_split() {
        assert_eq!(run(&["é!"], &["café", "é", "?"]), ("caféé?".to_string(), false));
    }
}
