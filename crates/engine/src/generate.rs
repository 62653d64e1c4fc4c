//! Text generation for one sequence: prompt processing in batches, then
//! token-by-token decoding with a sampler, stop strings and end-of-generation
//! tokens, streaming complete UTF-8 text as it is produced, timing both phases.

use crate::kv_cache::KvCache;
use crate::model::{Logits, Model, ModelError};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use minnow_kernels::pool::ThreadPool;
use std::time::Instant;

/// Prompt tokens per forward pass: large enough that weights are read once
/// for many tokens, small enough to bound the activation buffers.
pub const PROMPT_CHUNK: usize = 512;

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
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams { max_tokens: 256, sampling: SamplingParams::default(), stop: Vec::new(), stop_at_eog: true }
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

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    /// Generated ids (an end-of-generation token that ended it is included).
    pub ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub prompt_secs: f64,
    pub gen_tokens: usize,
    pub gen_secs: f64,
    pub finish: FinishReason,
}

impl Generation {
    pub fn prompt_tps(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_secs)
    }
    pub fn gen_tps(&self) -> f64 {
        rate(self.gen_tokens, self.gen_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Runs the prompt through the model in chunks; returns the last position's
/// logits. `cache` may already hold a prefix.
pub fn prefill(model: &Model, pool: &ThreadPool, cache: &mut KvCache, prompt: &[u32]) -> Result<Vec<f32>, ModelError> {
    prefill_for(model, pool, cache, prompt, Logits::Last)
}

/// [`prefill`] returning what `last` asks of the last chunk (`Logits::Last`,
/// or `Logits::Hidden` for a caller that applies the output head itself).
pub fn prefill_for(
    model: &Model,
    pool: &ThreadPool,
    cache: &mut KvCache,
    prompt: &[u32],
    last: Logits,
) -> Result<Vec<f32>, ModelError> {
    let mut out = Vec::new();
    let n_chunks = prompt.len().div_ceil(PROMPT_CHUNK);
    for (i, chunk) in prompt.chunks(PROMPT_CHUNK).enumerate() {
        let want = if i + 1 == n_chunks { last } else { Logits::None };
        out = model.forward_one(pool, cache, chunk, want)?;
    }
    Ok(out)
}

/// Holds back streamed text that might be the start of a stop string, and
/// finds the first complete stop string.
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
/// that may still turn out to be a stop string. Shared by [`generate`] and the
/// scheduler so both release exactly the same text.
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

/// Generates a continuation of `prompt`, calling `on_text` with each piece of
/// released text as it is produced.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    pool: &ThreadPool,
    cache: &mut KvCache,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::new("the prompt is empty: nothing to continue from"));
    }
    params.sampling.validate().map_err(ModelError::new)?;
    let start = Instant::now();
    let mut logits = prefill(model, pool, cache, prompt)?;
    let prompt_secs = start.elapsed().as_secs_f64();

    let mut sampler = Sampler::new(params.sampling.clone());
    for &t in prompt {
        sampler.accept(t);
    }
    let mut stream = TextStream::new(&params.stop);
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut finish = FinishReason::Length;
    let mut hit_stop_string = false;
    let gen_start = Instant::now();
    while ids.len() < params.max_tokens {
        let next = sampler.sample(&logits);
        ids.push(next);
        if params.stop_at_eog && tokenizer.is_end_of_generation(next) {
            finish = FinishReason::Stop;
            break;
        }
        let (piece, hit) = stream.push(tokenizer, next);
        text.push_str(&piece);
        on_text(&piece);
        if hit {
            finish = FinishReason::Stop;
            hit_stop_string = true;
            break;
        }
        if ids.len() == params.max_tokens || cache.len() + 1 > cache.max_len() {
            break;
        }
        logits = model.forward_one(pool, cache, &[next], Logits::Last)?;
    }
    if !hit_stop_string {
        let rest = stream.finish();
        text.push_str(&rest);
        on_text(&rest);
    }
    let gen_secs = gen_start.elapsed().as_secs_f64();
    Ok(Generation { text, gen_tokens: ids.len(), ids, prompt_tokens: prompt.len(), prompt_secs, gen_secs, finish })
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
