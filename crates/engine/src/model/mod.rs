//! Model families and loading.
//!
//! - `config`: hyperparameters from metadata.
//! - `weights`: shape-checked tensor access.
//! - `transformer`: the shared pieces (attention, FFN, norms, output head) and
//!   the batch description.
//! - `llama` (llama, qwen2, and the MoE variants Mixtral, qwen2moe, qwen3moe)
//!   and `gemma3`: one file per architecture family, each a forward pass that
//!   reads top to bottom.
//! - `moe`: the mixture-of-experts FFN shared by the MoE families, and its
//!   router statistics.
//!
//! A forward pass takes a batch of one or more sequences, each with its own
//! KV cache and new tokens, so prompt processing (many tokens of one
//! sequence) and batched decoding (one token of many sequences) are the same
//! call: every weight matrix is read once per call.

mod config;
mod gemma3;
mod llama;
mod moe;
mod transformer;
mod weights;

pub use config::{Arch, ModelConfig, MoeConfig};
pub use moe::{LayerRouting, RouterStats};
pub use transformer::{Logits, SeqBatch};

use crate::kv_cache::{CacheTypes, KvCache};
use minnow_gguf::GgufFile;
use minnow_kernels::pool::ThreadPool;
use std::sync::Arc;
use weights::TensorLoader;

/// A model that cannot be loaded or run, with the reason; errors from the
/// crates below keep their type (and source) in their own variant.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file, the request or the run is wrong in a way a message says.
    #[error("{0}")]
    Invalid(String),
    /// A weight matrix whose bytes do not fit its shape or format.
    #[error(transparent)]
    Layout(#[from] minnow_kernels::formats::LayoutError),
    #[error(transparent)]
    Sampling(#[from] crate::sampler::InvalidSampling),
    #[error(transparent)]
    CacheType(#[from] crate::kv_cache::UnfitCacheType),
}

impl ModelError {
    pub fn new(msg: impl Into<String>) -> ModelError {
        ModelError::Invalid(msg.into())
    }
}

enum Family {
    Llama(llama::Llama),
    Gemma3(gemma3::Gemma3),
}

/// A loaded network: the weights and the forward pass.
pub struct Model {
    file: Arc<GgufFile>,
    family: Family,
    /// How [`Model::new_cache`]'s caches store keys and values.
    cache_types: CacheTypes,
}

impl Model {
    /// Builds the network of a validated GGUF file, checking every tensor.
    pub fn from_gguf(file: Arc<GgufFile>) -> Result<Model, ModelError> {
        let cfg = ModelConfig::from_gguf(&file)?;
        let loader = TensorLoader { file: file.clone() };
        let family = match cfg.arch {
            Arch::Llama | Arch::Qwen2 | Arch::Qwen2Moe | Arch::Qwen3Moe => {
                Family::Llama(llama::Llama::load(cfg, &loader)?)
            }
            Arch::Gemma3 => Family::Gemma3(gemma3::Gemma3::load(cfg, &loader)?),
        };
        Ok(Model { file, family, cache_types: CacheTypes::default() })
    }

    pub fn config(&self) -> &ModelConfig {
        match &self.family {
            Family::Llama(m) => m.config(),
            Family::Gemma3(m) => m.config(),
        }
    }

    /// How the routers of a mixture-of-experts model have spread tokens
    /// over experts since load or the last [`Model::reset_router_stats`];
    /// `None` for a dense model. Cheap: a snapshot of counters.
    pub fn router_stats(&self) -> Option<RouterStats> {
        match &self.family {
            Family::Llama(m) => m.router_stats(),
            Family::Gemma3(_) => None,
        }
    }

    /// Zeroes the router statistics (e.g. between prompt and generation).
    pub fn reset_router_stats(&self) {
        if let Family::Llama(m) = &self.family {
            m.reset_router_stats();
        }
    }

    /// The output projection (vocab × n_embd; the embedding table when tied)
    /// as the kernels see it: what turns a [`Logits::Hidden`] state into logits.
    pub fn output_head(&self) -> minnow_kernels::matmul::QMatrix<'_> {
        match &self.family {
            Family::Llama(m) => m.output_head().q(),
            Family::Gemma3(m) => m.output_head().q(),
        }
    }

    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// An empty KV cache for one sequence of at most `max_len` positions
    /// (capped at the model's training context), stored as
    /// [`Model::cache_types`] says.
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(self.config(), max_len, self.cache_types)
    }

    /// How this model's caches store keys and values (f16 unless set).
    pub fn cache_types(&self) -> CacheTypes {
        self.cache_types
    }

    /// Stores the keys and values of caches made from now on as `types`
    /// says (llama.cpp's `--cache-type-k/-v`); refused, with the reason,
    /// where the model's heads do not suit them.
    pub fn set_cache_types(&mut self, types: CacheTypes) -> Result<(), ModelError> {
        types.check(self.config().head_dim)?;
        self.cache_types = types;
        Ok(())
    }

    /// Runs the batch: appends every sequence's new tokens to its cache and
    /// returns, per sequence, the logits it asked for (shape [rows, vocab]).
    pub fn forward(&self, pool: &ThreadPool, seqs: &mut [SeqBatch]) -> Result<Vec<Vec<f32>>, ModelError> {
        for seq in seqs.iter() {
            let need = seq.cache.len() + seq.tokens.len();
            if need > seq.cache.max_len() {
                return Err(ModelError::new(format!(
                    "context full: {} tokens cached + {} new exceed the context size of {}",
                    seq.cache.len(),
                    seq.tokens.len(),
                    seq.cache.max_len()
                )));
            }
        }
        if seqs.iter().all(|s| s.tokens.is_empty()) {
            return Ok(seqs.iter().map(|_| Vec::new()).collect());
        }
        let layout = transformer::RowLayout::new(seqs);
        transformer::with_run_state(|st| match &self.family {
            Family::Llama(m) => m.forward(pool, seqs, &layout, st),
            Family::Gemma3(m) => m.forward(pool, seqs, &layout, st),
        })
    }

    /// Convenience: one sequence.
    pub fn forward_one(
        &self,
        pool: &ThreadPool,
        cache: &mut KvCache,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        let mut out = self.forward(pool, &mut [SeqBatch { tokens, cache, logits, adapter: None }])?;
        Ok(out.pop().unwrap_or_default())
    }
}
