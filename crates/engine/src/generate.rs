//! Text generation outside the server (`minnow run`): [`generate`] runs one
//! request in-process on the scheduler's decode loop
//! ([`crate::scheduler`]), streaming text as it is released and timing both
//! phases; [`prefill`] reads a prompt in chunks for callers that want the
//! logits themselves.

pub use crate::sequence::{FinishReason, GenerateParams};

use crate::kv_cache::KvCache;
use crate::model::{Logits, Model, ModelError};
use crate::scheduler::{run_one, GenRequest, Outcome, StepCtx};
use crate::tokenizer::Tokenizer;
use minnow_kernels::pool::ThreadPool;

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
/// released text as it is produced. `cache` may already hold a prefix (of
/// tokens not in `prompt`); afterwards it holds that, the prompt and the
/// generated tokens up to the last step's output (the last token, and any a
/// constraint forced after it, are not fed back). The request runs on the scheduler's
/// decode loop ([`crate::scheduler`]), in-process.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    pool: &ThreadPool,
    cache: &mut KvCache,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, ModelError> {
    check_request(prompt, params, cache.len(), cache.max_len())?;
    let ctx = StepCtx { model, tokenizer, pool, draft: None };
    let req = GenRequest::new(prompt.to_vec(), params.clone());
    let taken = std::mem::replace(cache, model.new_cache(0));
    let mut out = run_one(&ctx, req, taken, None, Vec::new(), &mut |_, piece| on_text(piece))?;
    *cache = std::mem::replace(&mut out.cache, model.new_cache(0));
    Ok(Generation::first_of(out, prompt.len()))
}

impl Generation {
    /// Sample 0 of an in-process request's outcome.
    pub(crate) fn first_of(out: Outcome, prompt_tokens: usize) -> Generation {
        let Some((ids, finish, text)) = out.samples.into_iter().next() else { unreachable!("a request has a sample") };
        Generation {
            text,
            gen_tokens: ids.len(),
            ids,
            prompt_tokens,
            prompt_secs: out.prompt_secs,
            gen_secs: out.gen_secs,
            finish,
        }
    }
}

/// What every in-process entry point checks before running a request: a
/// prompt to continue, valid sampling, and room for the prompt after the
/// `base` positions a cache of `max_len` already holds.
pub(crate) fn check_request(
    prompt: &[u32],
    params: &GenerateParams,
    base: usize,
    max_len: usize,
) -> Result<(), ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::new("the prompt is empty: nothing to continue from"));
    }
    params.sampling.validate()?;
    if base + prompt.len() > max_len {
        return Err(ModelError::new(format!(
            "the prompt ({} tokens) exceeds the context size of {}",
            prompt.len(),
            max_len - base.min(max_len)
        )));
    }
    Ok(())
}
