//! Text generation for one sequence (`minnow run`): prompt processing in
//! batches, then token-by-token decoding of a [`Sequence`], which samples
//! and decides where to stop, streaming text as it is released and timing
//! both phases.

pub use crate::sequence::{FinishReason, GenerateParams};

use crate::kv_cache::KvCache;
use crate::model::{Logits, Model, ModelError};
use crate::sequence::Sequence;
use crate::tokenizer::Tokenizer;
use minnow_kernels::pool::ThreadPool;
use std::time::Instant;

/// Prompt tokens per forward pass: large enough that weights are read once
/// for many tokens, small enough to bound the activation buffers.
pub const PROMPT_CHUNK: usize = 512;

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

    // The cache may have held a prefix before the prompt: it takes room too.
    let prefix = cache.len() - prompt.len();
    let mut seq = Sequence::new(prompt, params, params.sampling.seed, cache.max_len() - prefix, None);
    let mut text = String::new();
    let gen_start = Instant::now();
    while !seq.is_done() {
        let next = seq.sample(&logits);
        let p = seq.push(tokenizer, next, true, None);
        for piece in [&p.text, &p.tail] {
            text.push_str(piece);
            on_text(piece);
        }
        if p.finish.is_some() {
            break;
        }
        logits = model.forward_one(pool, cache, &[next], Logits::Last)?;
    }
    let gen_secs = gen_start.elapsed().as_secs_f64();
    let ids = seq.ids().to_vec();
    let finish = seq.finish().unwrap_or(FinishReason::Length);
    Ok(Generation { text, gen_tokens: ids.len(), ids, prompt_tokens: prompt.len(), prompt_secs, gen_secs, finish })
}
